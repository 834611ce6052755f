// CPU optimizers for offloaded training: Adam/AdamW, Adagrad and Lion over
// many tensors per call, on a persistent thread pool, with kernels chosen at
// run time (AVX-512, AVX2 or scalar; see cpu_features.hpp). The update is
// DeepSpeed's and torch's, in float arithmetic (docs/cpu_adam.md gives the
// order of operations and the accuracy bounds the tests hold it to):
//
//   Adam (step t from 1; bc1 = 1 - beta1^t, bc2 = sqrt(1 - beta2^t), or 1
//   without bias correction):
//     L2 mode (adamw_mode false):  g += weight_decay * p
//     m = beta1 * m + (1 - beta1) * g
//     v = beta2 * v + (1 - beta2) * g * g
//     denom = sqrt(v) / bc2 + eps
//     AdamW mode:                  p *= 1 - lr * weight_decay
//     p -= (lr / bc1) * (m / denom)
//   Adagrad:  g += weight_decay * p;  v += g * g;  p -= lr * g / (sqrt(v) + eps)
//   Lion:     c = beta1 * m + (1 - beta1) * g;  p *= 1 - lr * weight_decay;
//             p -= lr * sign(c);  m = beta2 * m + (1 - beta2) * g
//
// Tensors: fp32 master params with fp32 states and fp32, bf16 or fp16 grads,
// optionally writing the updated param rounded to bf16/fp16 (nearest even)
// into a second buffer in the same pass; or bf16/fp16 params with states of
// the same type or fp32 and grads of the param type or fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "cpu_adam/cpu_features.hpp"
#include "cpu_adam/dtype.hpp"

namespace zinf::cpu_adam {

struct AdamOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  bool adamw_mode = true;  // DeepSpeed's default: decoupled weight decay
  bool bias_correction = true;
};

struct AdagradOptions {
  float lr = 1e-2f;
  float eps = 1e-10f;
  float weight_decay = 0.0f;
};

struct LionOptions {
  float lr = 1e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float weight_decay = 0.0f;
};

// A typed view of caller memory: `count` elements of `dtype` at `data`.
// Any alignment is accepted.
struct Buffer {
  void* data = nullptr;
  std::size_t count = 0;
  DType dtype = DType::f32;
};

// One tensor's buffers. exp_avg is Adam's and Lion's first moment,
// exp_avg_sq Adam's second moment and Adagrad's sum of squares; a state the
// optimizer does not use may be left empty. param_copy is optional: when set
// (bf16 or fp16) it receives the updated param, for fp32 params only.
struct TensorState {
  Buffer param;
  Buffer grad;  // read only
  Buffer exp_avg;
  Buffer exp_avg_sq;
  Buffer param_copy;
};

// How Adam's two moments are stored (docs/swap.md, "State formats"):
// fp32, bf16, or 8-bit codes with one fp32 scale per kMomentBlock elements,
// both compressed forms rounded stochastically. The fp32 master is exact in
// every format.
enum class MomentFormat : std::uint8_t { fp32 = 0, bf16 = 1, int8 = 2 };
std::string_view to_string(MomentFormat format);
MomentFormat parse_moment_format(std::string_view text);  // "fp32", "bf16", "int8"
inline constexpr std::size_t kMomentBlock = 256;
// Bytes one moment tensor of `elements` takes in `format`.
std::size_t moment_bytes(MomentFormat format, std::size_t elements);

// A tensor whose moments are compressed: param fp32, grad any dtype,
// exp_avg/exp_avg_sq moment_bytes(format, param.count) bytes each, an
// optional bf16/fp16 param_copy. `seed` tells tensors' rounding apart (a
// sub-group index, say): the same seed, step and values give the same bits.
// [begin, end) limits the step to part of the tensor (param groups with
// their own settings); the moments keep the whole tensor's layout, and an
// 8-bit block the range cuts keeps its other elements' values (re-encoded
// once more). end 0 means param.count.
struct CompressedTensorState {
  Buffer param;
  Buffer grad;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  Buffer param_copy;
  std::uint64_t seed = 0;
  std::size_t begin = 0;
  std::size_t end = 0;
};

// fp32 values <-> one moment tensor in `format` (`second`: the second
// moment's code); encode rounds stochastically from `seed`.
void encode_moment(MomentFormat format, bool second, std::span<const float> values, void* out,
                   std::uint64_t seed = 0);
void decode_moment(MomentFormat format, bool second, const void* in, std::span<float> values);

class CpuOptimizer {
 public:
  // `threads` workers (the caller's thread is one of them); `tier` forces a
  // kernel tier, which must be supported by this CPU (default: the best,
  // lowered by ZINF_CPU_ADAM_TIER).
  explicit CpuOptimizer(std::size_t threads, std::optional<Tier> tier = std::nullopt);
  ~CpuOptimizer();
  CpuOptimizer(const CpuOptimizer&) = delete;
  CpuOptimizer& operator=(const CpuOptimizer&) = delete;

  // One optimizer step over every tensor, `step` counted from 1. Throws
  // Error{invalid} naming the tensor and the rule for bad input (length
  // mismatch, null buffer, unsupported dtype pair, non-finite or out-of-range
  // hyper-parameter) before touching any memory.
  void adam_step(const AdamOptions& options, std::int64_t step,
                 std::span<const TensorState> tensors);
  // Adam over tensors with compressed moments (format bf16 or int8), in one
  // pass: each block of moments is decoded, stepped and encoded in cache.
  void adam_step(const AdamOptions& options, std::int64_t step, MomentFormat format,
                 std::span<const CompressedTensorState> tensors);
  void adagrad_step(const AdagradOptions& options, std::int64_t step,
                    std::span<const TensorState> tensors);
  void lion_step(const LionOptions& options, std::int64_t step,
                 std::span<const TensorState> tensors);
  // Adam's memory traffic (same loads and stores, trivial arithmetic): the
  // memory-bound limit Adam is measured against. Changes the buffers.
  void bandwidth_step(std::span<const TensorState> tensors);

  Tier tier() const { return tier_; }
  std::size_t threads() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Tier tier_;
};

}  // namespace zinf::cpu_adam
