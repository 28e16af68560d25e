#include "quant/hadamard.h"

#include <cmath>
#include <vector>

namespace aq {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Signs of the first kMaxRotationBlock... columns repeat with the column index, so a table of
// signs for the widest rows seen is built once per call.
void column_signs(size_t cols, std::vector<float>* out) {
  out->resize(cols);
  for (size_t j = 0; j < cols; ++j) (*out)[j] = (splitmix64(kRotationSeed + j) & 1u) ? -1.0f : 1.0f;
}

float block_norm(int block) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block))); }

void butterflies_reference(float* v, int n) {
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int k = i; k < i + h; ++k) {
        const float a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
}

// The same butterflies, written so the compiler vectorizes the inner loop for every stage with
// h >= 8 and for the whole block at once (each stage sweeps contiguous halves).
__attribute__((target_clones("avx512f", "avx2", "default")))
void butterflies_fast(float* v, int n) {
  for (int h = 1; h < n; h *= 2) {
    for (int i = 0; i < n; i += 2 * h) {
      float* lo = v + i;
      float* hi = v + i + h;
      for (int k = 0; k < h; ++k) {
        const float a = lo[k], b = hi[k];
        lo[k] = a + b;
        hi[k] = a - b;
      }
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void scale_signs(float* x, const float* signs, float norm, size_t n, bool signs_first) {
  // forward: (x * sign) then butterflies then * norm; the sign step and the norm step are
  // separate passes so every element sees the same operation order as the reference
  if (signs_first)
    for (size_t i = 0; i < n; ++i) x[i] = x[i] * signs[i];
  else
    for (size_t i = 0; i < n; ++i) x[i] = x[i] * norm;
}

template <bool kFast>
void rotate_impl(float* x, size_t rows, size_t cols, int block, bool inverse) {
  if (block <= 1 || rows == 0) return;
  std::vector<float> signs;
  column_signs(cols, &signs);
  const float norm = block_norm(block);
  for (size_t r = 0; r < rows; ++r) {
    float* row = x + r * cols;
    if (!inverse) {
      if constexpr (kFast) scale_signs(row, signs.data(), norm, cols, true);
      else for (size_t j = 0; j < cols; ++j) row[j] = row[j] * signs[j];
    }
    for (size_t b = 0; b < cols; b += static_cast<size_t>(block)) {
      if constexpr (kFast) butterflies_fast(row + b, block);
      else butterflies_reference(row + b, block);
    }
    if constexpr (kFast) scale_signs(row, signs.data(), norm, cols, false);
    else for (size_t j = 0; j < cols; ++j) row[j] = row[j] * norm;
    if (inverse) {
      if constexpr (kFast) scale_signs(row, signs.data(), norm, cols, true);
      else for (size_t j = 0; j < cols; ++j) row[j] = row[j] * signs[j];
    }
  }
}

}  // namespace

int rotation_block(uint64_t cols) {
  if (cols == 0) return 1;
  int b = 1;
  while (b < kMaxRotationBlock && cols % static_cast<uint64_t>(2 * b) == 0) b *= 2;
  return b;
}

void rotate_rows(float* x, size_t rows, size_t cols, int block) { rotate_impl<true>(x, rows, cols, block, false); }
void unrotate_rows(float* x, size_t rows, size_t cols, int block) { rotate_impl<true>(x, rows, cols, block, true); }
void rotate_rows_reference(float* x, size_t rows, size_t cols, int block) {
  rotate_impl<false>(x, rows, cols, block, false);
}
void unrotate_rows_reference(float* x, size_t rows, size_t cols, int block) {
  rotate_impl<false>(x, rows, cols, block, true);
}

}  // namespace aq
