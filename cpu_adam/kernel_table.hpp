// The interface between the dispatcher (cpu_adam.cpp) and the kernel tiers
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp). Each tier is a
// separate object built with its own instruction-set flags and exposes one
// table of plain function pointers; nothing else crosses the boundary, so no
// inline function compiled with AVX flags can leak into baseline code.
#pragma once

#include <cstddef>
#include <cstdint>

namespace zinf::cpu_adam {

// Scalars of one step, computed once by the dispatcher (in double, then
// rounded to float, as torch does with its Python-float hyper-parameters).
struct AdamScalars {
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float eps;
  float weight_decay;      // L2 mode: g += weight_decay * p
  float decay;             // AdamW mode: p *= 1 - lr * weight_decay
  float step_size;         // lr / (1 - beta1^t)
  float inv_bias_correction2;  // 1 / sqrt(1 - beta2^t)
  bool adamw;
  bool use_weight_decay;
};

struct AdagradScalars {
  float lr;
  float eps;
  float weight_decay;
  bool use_weight_decay;
};

struct LionScalars {
  float lr;
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float decay;  // 1 - lr * weight_decay
  bool use_weight_decay;
};

// One contiguous range [begin, end) of one tensor. Pointers are the tensor's
// bases (element 0), of the dtypes the table slot was chosen for.
using AdamKernel = void (*)(const AdamScalars&, void* param, const void* grad, void* exp_avg,
                            void* exp_avg_sq, void* param_copy, std::size_t begin,
                            std::size_t end);
using AdagradKernel = void (*)(const AdagradScalars&, void* param, const void* grad,
                               void* exp_avg_sq, void* param_copy, std::size_t begin,
                               std::size_t end);
using LionKernel = void (*)(const LionScalars&, void* param, const void* grad, void* exp_avg,
                            void* param_copy, std::size_t begin, std::size_t end);
// Adam's memory traffic with trivial arithmetic: the bandwidth limit.
using BandwidthKernel = void (*)(void* param, const void* grad, void* exp_avg, void* exp_avg_sq,
                                 void* param_copy, std::size_t begin, std::size_t end);

// Adam over fp32 master params with compressed moments (bf16 or 8-bit
// block-wise, see kernels_compressed.inc): `count` is the tensor's length
// (the moments' layout depends on it), [begin, end) the range to step
// (8-bit blocks it cuts are decoded and re-encoded whole, their other
// elements unchanged). `salt` seeds the stochastic rounding of
// this step and tensor.
using AdamCompressedKernel = void (*)(const AdamScalars&, std::uint32_t salt, void* param,
                                      const void* grad, void* exp_avg, void* exp_avg_sq,
                                      void* param_copy, std::size_t count, std::size_t begin,
                                      std::size_t end);
// Compressed moment <-> fp32 for [begin, end) of a tensor of `count`
// elements (begin a multiple of kQuantBlock); `second` picks the second
// moment's code (unsigned, wider range) for the 8-bit format.
using EncodeKernel = void (*)(const float* in, void* out, bool second, std::uint32_t salt,
                              std::size_t count, std::size_t begin, std::size_t end);
using DecodeKernel = void (*)(const void* in, float* out, bool second, std::size_t count,
                              std::size_t begin, std::size_t end);

// Elements per scale of the 8-bit format (and the split grain of every
// compressed step).
constexpr std::size_t kQuantBlock = 256;

// Indexed [param][grad][state][copy] by DType value; copy index 0 is "no
// copy", 1 bf16, 2 fp16. Unsupported combinations are null.
struct KernelTable {
  const char* name;
  AdamKernel adam[3][3][3][3];
  AdagradKernel adagrad[3][3][3][3];
  LionKernel lion[3][3][3][3];
  BandwidthKernel bandwidth[3][3][3][3];
  // Indexed [format - 1][grad][copy] (format 1 bf16, 2 int8).
  AdamCompressedKernel adam_compressed[2][3][3];
  EncodeKernel encode[2];
  DecodeKernel decode[2];
};

const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();    // only call where the CPU has AVX2+FMA+F16C
const KernelTable& avx512_kernels();  // only call where the CPU has AVX-512 F/BW/VL/DQ

}  // namespace zinf::cpu_adam
