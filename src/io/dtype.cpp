#include "io/dtype.h"

#include <array>
#include <cstring>

#include "common/half.h"

namespace aq {
namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
  bool is_float;
};

constexpr std::array<DTypeInfo, 15> kTypes = {{
    {DType::kBool, "BOOL", 1, false},    {DType::kU8, "U8", 1, false},
    {DType::kI8, "I8", 1, false},        {DType::kF8_E5M2, "F8_E5M2", 1, true},
    {DType::kF8_E4M3, "F8_E4M3", 1, true}, {DType::kI16, "I16", 2, false},
    {DType::kU16, "U16", 2, false},      {DType::kF16, "F16", 2, true},
    {DType::kBF16, "BF16", 2, true},     {DType::kI32, "I32", 4, false},
    {DType::kU32, "U32", 4, false},      {DType::kF32, "F32", 4, true},
    {DType::kF64, "F64", 8, true},       {DType::kI64, "I64", 8, false},
    {DType::kU64, "U64", 8, false},
}};

const DTypeInfo& info(DType t) { return kTypes[static_cast<size_t>(t)]; }

// bfloat16 -> float32 for a whole block: a shift per element, vectorized per instruction set.
__attribute__((target_clones("avx512f", "avx2", "default")))
void bf16_block(const uint8_t* src, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    const uint32_t b = static_cast<uint32_t>(h) << 16;
    std::memcpy(dst + i, &b, 4);
  }
}

template <typename Bits, typename Fn>
void convert_each(const uint8_t* src, size_t n, float* dst, Fn fn) {
  for (size_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, src + i * sizeof(Bits), sizeof(Bits));
    dst[i] = fn(b);
  }
}

}  // namespace

std::string_view dtype_name(DType t) { return info(t).name; }
size_t dtype_size(DType t) { return info(t).size; }
bool dtype_is_float(DType t) { return info(t).is_float; }

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& i : kTypes)
    if (i.name == name) return i.type;
  return std::nullopt;
}

void convert_to_f32(DType t, const uint8_t* src, size_t n, float* dst) {
  if (n == 0) return;  // an empty tensor's data may be a null pointer, which memcpy must not see
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16:
      bf16_block(src, n, dst);
      return;
    case DType::kF16:
      convert_each<uint16_t>(src, n, dst, f16_to_f32);
      return;
    case DType::kF64:
      convert_each<double>(src, n, dst, [](double d) { return static_cast<float>(d); });
      return;
    case DType::kF8_E4M3:
      convert_each<uint8_t>(src, n, dst, f8e4m3_to_f32);
      return;
    case DType::kF8_E5M2:
      convert_each<uint8_t>(src, n, dst, f8e5m2_to_f32);
      return;
    default:
      // Callers check dtype_is_float first; integer tensors are never converted.
      std::memset(dst, 0, n * sizeof(float));
      return;
  }
}

}  // namespace aq
