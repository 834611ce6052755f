// Element types of optimizer tensors and exact scalar conversions. bf16 and
// fp16 values are stored as their bit patterns; float -> bf16/fp16 rounds to
// nearest even, keeps subnormals, turns NaN into a quiet NaN that keeps the
// sign and the top payload bits, exactly as x86's F16C (vcvtps2ph) does, so
// every kernel tier produces the same bits.
#pragma once

#include <cstdint>
#include <string_view>

namespace zinf::cpu_adam {

enum class DType : std::uint8_t { f32 = 0, bf16 = 1, f16 = 2 };

std::string_view to_string(DType dtype);
DType parse_dtype(std::string_view text);  // "fp32"/"f32", "bf16", "fp16"/"f16"

#include "cpu_adam/dtype_convert.inc"

}  // namespace zinf::cpu_adam
