// Element types of safetensors files and their conversion to float32, row block by row block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace aq {

enum class DType : uint8_t {
  kBool, kU8, kI8, kF8_E5M2, kF8_E4M3, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kF64, kI64, kU64,
};

// The safetensors spelling ("BF16"); parse_dtype returns nullopt for anything else.
std::string_view dtype_name(DType t);
std::optional<DType> parse_dtype(std::string_view name);
size_t dtype_size(DType t);

// Floating-point types that the engine can quantize.
bool dtype_is_float(DType t);

// Converts n little-endian elements of a float type to float32. `src` needs no alignment.
void convert_to_f32(DType t, const uint8_t* src, size_t n, float* dst);

}  // namespace aq
