// Whole-tensor encode/decode between float32 and the stored form (packed codes + scale bytes).
// The engine encodes row blocks in parallel with encode_rows; every reader decodes with
// decode_tensor, so what the loader returns is exactly what the engine measured.
#pragma once

#include <cstdint>
#include <span>

#include "common/status.h"
#include "quant/scheme.h"

namespace aq {

void store_scales(ScaleType t, const float* in, size_t n, uint8_t* out);
void load_scales(ScaleType t, const uint8_t* in, size_t n, float* out);

// Decodes rows [r0, r0 + nr) of a stored tensor with `cols` columns into out (nr * cols
// floats). Spans must already have the sizes decode_tensor checks.
void decode_rows(const QuantScheme& scheme, uint64_t cols, std::span<const uint8_t> codes,
                 std::span<const uint8_t> scales, std::span<const uint8_t> zero_points, uint64_t r0,
                 uint64_t nr, float* out);

// Checks that the spans have the sizes the scheme requires for rows x cols.
Status check_encoded_sizes(const QuantScheme& scheme, uint64_t rows, uint64_t cols, std::span<const uint8_t> codes,
                           std::span<const uint8_t> scales, std::span<const uint8_t> zero_points);

// Decodes a stored tensor (rows x cols) into out. Sizes of the spans are checked against the
// scheme; a mismatch is a FormatError naming what differs.
Status decode_tensor(const QuantScheme& scheme, uint64_t rows, uint64_t cols,
                     std::span<const uint8_t> codes, std::span<const uint8_t> scales,
                     std::span<const uint8_t> zero_points, float* out);

}  // namespace aq
