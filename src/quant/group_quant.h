// Group-wise uniform quantization of row-major float matrices (see quant/scheme.h for the code
// layout). Pure functions over (const float* w, rows, cols): no files, no threads. The engine
// cuts tensors into row blocks and calls these on each, so the result of a block never depends
// on which thread ran it.
//
// Scale choice (ScaleMethod::kSearch): for each group, candidate clipping ranges
// [alpha*lo, alpha*hi] (symmetric: alpha*absmax, with the largest-magnitude weight mapped to the
// extra negative level) are tried; each candidate's code assignment is refit by closed-form least
// squares (asymmetric: the 2x2 normal equations for s and z; symmetric: s = <x,q>/<q,q>), the
// refit parameters are rounded to the storage type, the codes are reassigned with them, and the
// candidate with the least squared error wins. Plain min/max is always among the candidates, so
// the search is never worse than the baseline on any group.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/scheme.h"

namespace aq {

struct QuantizeRowsStats {
  // Groups whose scale is too small (or large) to be stored exactly enough as float16; the
  // engine requantizes such a tensor with float32 scales.
  uint64_t f16_imprecise_groups = 0;
};

// codes: rows*cols bytes, one code per weight. scales, zeros: rows*groups_per_row floats each,
// already rounded to the scheme's scale type (zeros untouched for symmetric schemes).
// Precondition: every weight is finite.
QuantizeRowsStats quantize_rows(const QuantScheme& scheme, const float* w, size_t rows, size_t cols,
                                uint8_t* codes, float* scales, float* zeros);

// The one dequantization formula (the loader uses this same function):
//   asymmetric: s * float(c) + z;  symmetric: s * float(int(c) - 2^(bits-1)).
void dequantize_rows(const QuantScheme& scheme, const uint8_t* codes, const float* scales,
                     const float* zeros, size_t rows, size_t cols, float* out);

inline float dequantize_value(bool symmetric, int bits, float s, float z, uint8_t c) {
  if (symmetric) return s * static_cast<float>(static_cast<int>(c) - (1 << (bits - 1)));
  return s * static_cast<float>(c) + z;
}

}  // namespace aq
