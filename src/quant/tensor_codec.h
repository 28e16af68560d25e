// Whole-tensor encode/decode between float32 and the stored form. The engine encodes row blocks
// in parallel (engine/tensor_job.h); every reader decodes with decode_rows/decode_tensor, so what
// the loader returns is exactly what the engine measured.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "common/status.h"
#include "quant/entropy_quant.h"
#include "quant/scheme.h"

namespace aq {

void store_scales(ScaleType t, const float* in, size_t n, uint8_t* out);
void load_scales(ScaleType t, const uint8_t* in, size_t n, float* out);

// A stored tensor's data, as views.
//   affine:  codes = packed codes, scales / zero_points = per group
//   entropy: codes = concatenated rANS chunks, scales = per-row steps (float32), entropy = side
struct FrequencyTable;
struct EncodedView {
  std::span<const uint8_t> codes;
  std::span<const uint8_t> scales;
  std::span<const uint8_t> zero_points;
  const EntropySide* entropy = nullptr;
  // The rANS decoding table built from entropy->frequencies; decode_tensor builds it once, and a
  // caller decoding block by block should too (make_decode_table). Null: built per call.
  const FrequencyTable* table = nullptr;
};

// The decoding table of an entropy-coded view (FormatError when the frequencies are invalid).
Result<std::shared_ptr<const FrequencyTable>> make_decode_table(const EncodedView& v);

// Checks that the view has the sizes (and for entropy-coded tensors the side information) the
// scheme requires for rows x cols; FormatError naming what differs.
Status check_encoded(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v);

// Rows per unit of decoding: any row range for affine tensors, whole chunks for entropy-coded.
uint64_t decode_granularity(const QuantScheme& scheme, const EncodedView& v);

// Where row `row` starts in the codes (a multiple of decode_granularity, or `rows`: the codes'
// size). Affine rows must start on a byte (row * cols * bits a multiple of 8), as every row block
// and piece does. The view must have passed check_encoded.
uint64_t code_offset(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, uint64_t row);

// Decodes rows [r0, r0 + nr) into out (nr * cols floats); r0 must be a multiple of
// decode_granularity and nr too unless the range ends the tensor. The view must have passed
// check_encoded.
Status decode_rows(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, uint64_t r0,
                   uint64_t nr, float* out);

Status decode_tensor(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, float* out);

}  // namespace aq
