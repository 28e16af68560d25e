#include "quant/tensor_codec.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "quant/group_quant.h"
#include "quant/pack.h"

namespace aq {

void store_scales(ScaleType t, const float* in, size_t n, uint8_t* out) {
  if (t == ScaleType::kF32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = f32_to_f16(in[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void load_scales(ScaleType t, const uint8_t* in, size_t n, float* out) {
  if (t == ScaleType::kF32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    out[i] = f16_to_f32(h);
  }
}

void decode_rows(const QuantScheme& scheme, uint64_t cols, std::span<const uint8_t> codes,
                 std::span<const uint8_t> scales, std::span<const uint8_t> zero_points, uint64_t r0,
                 uint64_t nr, float* out) {
  const size_t gpr = groups_per_row(scheme, cols);
  const size_t ssize = scale_type_size(scheme.scale_type);
  thread_local std::vector<uint8_t> q;
  thread_local std::vector<float> s, z;
  q.resize(nr * cols);
  s.resize(nr * gpr);
  z.resize(scheme.symmetric ? 0 : nr * gpr);
  unpack_codes(codes.data(), r0 * cols, nr * cols, scheme.bits, q.data());
  load_scales(scheme.scale_type, scales.data() + r0 * gpr * ssize, nr * gpr, s.data());
  if (!scheme.symmetric) load_scales(scheme.scale_type, zero_points.data() + r0 * gpr * ssize, nr * gpr, z.data());
  dequantize_rows(scheme, q.data(), s.data(), z.data(), nr, cols, out);
}

Status check_encoded_sizes(const QuantScheme& scheme, uint64_t rows, uint64_t cols, std::span<const uint8_t> codes,
                           std::span<const uint8_t> scales, std::span<const uint8_t> zero_points) {
  AQ_RETURN_IF_ERROR(validate_scheme(scheme));
  const QuantizedSize want = quantized_size(scheme, rows, cols);
  if (codes.size() != want.code_bytes)
    return FormatError(StrCat("codes hold ", codes.size(), " bytes; ", scheme_name(scheme), " of ", rows,
                              "x", cols, " needs ", want.code_bytes));
  if (scales.size() != want.scale_bytes)
    return FormatError(StrCat("scales hold ", scales.size(), " bytes; expected ", want.scale_bytes));
  if (zero_points.size() != want.zero_point_bytes)
    return FormatError(StrCat("zero_points hold ", zero_points.size(), " bytes; expected ", want.zero_point_bytes));
  return Status::OK();
}

Status decode_tensor(const QuantScheme& scheme, uint64_t rows, uint64_t cols,
                     std::span<const uint8_t> codes, std::span<const uint8_t> scales,
                     std::span<const uint8_t> zero_points, float* out) {
  AQ_RETURN_IF_ERROR(check_encoded_sizes(scheme, rows, cols, codes, scales, zero_points));
  if (rows == 0 || cols == 0) return Status::OK();

  // Decode in blocks of rows to bound the scratch memory.
  const uint64_t block = std::max<uint64_t>(1, (1u << 16) / cols);
  for (uint64_t r0 = 0; r0 < rows; r0 += block)
    decode_rows(scheme, cols, codes, scales, zero_points, r0, std::min(block, rows - r0), out + r0 * cols);
  return Status::OK();
}

}  // namespace aq
