// Randomized Hadamard rotation of rows (incoherence processing, as in QuIP#): each row is cut into
// blocks of B columns (B the largest power of two dividing cols, at most 256), every column is
// multiplied by a pseudo-random sign, and each block is multiplied by the normalized
// Walsh-Hadamard matrix H_B / sqrt(B). The rotation is orthonormal, so it keeps norms and inner
// products, while it spreads heavy tails and outlier columns over the whole block: the rotated
// weights are close to Gaussian, which the quantizers handle best. The decoder applies the
// inverse (the same butterflies, then the signs).
//
// Exact definition (docs/format.md): sign of column j is -1 when bit 0 of splitmix64(kRotationSeed
// + j) is 1; the butterfly stages run h = 1, 2, 4, ..., B/2 with (a, b) -> (a + b, a - b) on
// elements (i, i + h) for i with bit h clear; then every element is multiplied by the float32
// constant 1/sqrt(B).
#pragma once

#include <cstddef>
#include <cstdint>

namespace aq {

inline constexpr uint64_t kRotationSeed = 0x5851F42D4C957F2Dull;
inline constexpr int kMaxRotationBlock = 256;

// Largest power of two dividing cols, capped at kMaxRotationBlock; 1 means "no rotation".
int rotation_block(uint64_t cols);

// In place, `rows` rows of `cols` floats. Reference (scalar) and fast versions give identical
// results bit for bit.
void rotate_rows(float* x, size_t rows, size_t cols, int block);
void unrotate_rows(float* x, size_t rows, size_t cols, int block);
void rotate_rows_reference(float* x, size_t rows, size_t cols, int block);
void unrotate_rows_reference(float* x, size_t rows, size_t cols, int block);

}  // namespace aq
