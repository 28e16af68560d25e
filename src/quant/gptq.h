// GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers", 2022) on the group-wise affine codes of quant/scheme.h.
//
// A linear layer y = W x sees inputs whose second moment is H = sum x x^T (recorded by
// calibration, see docs/calibration.md). GPTQ quantizes W one input column at a time and, after
// each column, moves that column's rounding error onto the columns not yet quantized, in the
// proportions given by the inverse of H: what it minimises is the output error
// tr((W - Q) H (W - Q)^T), not the weight error. Written here from the paper's algorithm:
//   - dampening: H + damp * mean(diag H) * I (dead inputs, H_jj = 0, get H_jj = 1);
//   - act-order: columns taken in order of decreasing H_jj, so the large-activation columns are
//     quantized first, while many columns remain to absorb their error;
//   - lazy batches: the error of a block of `block_size` columns is applied to the rest of the
//     matrix in one matrix product (Eigen) instead of column by column;
//   - groups: with act-order, each group's scale and offset are chosen up front from the original
//     weights (static groups, so the order does not change what is stored); without it, at the
//     group's first column from the weights as updated so far. Either way by the same scale
//     search as the data-free scheme (quant/group_quant.h).
// Rows are independent given H, so the engine runs GPTQ over the same row blocks as every other
// scheme, and the output does not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"
#include "quant/group_quant.h"
#include "quant/scheme.h"

namespace aq {

// Which build of the dense kernels (Eigen: the Cholesky factor, the triangular inverse, the lazy
// batch products) runs. kAuto: AVX2 + FMA where the library was built with it (x86-64, GCC or
// Clang) and the CPU has both, else the baseline build; ARROWQUANT_GPTQ_KERNEL=generic in the
// environment makes kAuto the baseline build everywhere. The two give the same result up to float
// rounding (a fused multiply-add rounds once; the products sum in another order), not bit for bit:
// a few codes in a tensor may differ between a CPU with AVX2 and one without. Either is
// independent of how the rows are split into blocks.
enum class GptqKernel { kAuto, kGeneric, kAvx2 };

// True when the AVX2 kernels are built and this CPU can run them (a kAvx2 request falls back to
// kGeneric otherwise).
bool gptq_avx2_available();

// Where a Hessian's entries are. block 0 (or >= cols): the full cols x cols matrix, row-major.
// Otherwise a block-diagonal Hessian: only its diagonal blocks of `block` columns (the last one
// smaller when block does not divide cols), each row-major, concatenated in column order -- what
// calibration records for layers too wide for a full matrix (docs/calibration.md). GPTQ on a
// block-diagonal Hessian is GPTQ on each column block independently: a column's rounding error is
// moved onto the later columns of its own block only.
struct HessianLayout {
  size_t cols = 0;
  size_t block = 0;
  bool full() const { return block == 0 || block >= cols; }
  size_t block_cols() const { return full() ? cols : block; }
  size_t blocks() const { return cols == 0 ? 0 : (cols + block_cols() - 1) / block_cols(); }
  size_t begin(size_t b) const { return b * block_cols(); }
  size_t size(size_t b) const { return std::min(block_cols(), cols - begin(b)); }
  // Index of the block's first entry: every earlier block is full-size.
  size_t offset(size_t b) const { return b * block_cols() * block_cols(); }
  size_t values() const { return blocks() == 0 ? 0 : offset(blocks() - 1) + size(blocks() - 1) * size(blocks() - 1); }
  // Index of the diagonal entry H_jj.
  size_t diag(size_t j) const {
    const size_t b = j / block_cols(), i = j - begin(b);
    return offset(b) + i * size(b) + i;
  }
};

struct GptqOptions {
  double damp = 0.01;     // fraction of mean(diag H) added to the diagonal
  bool act_order = true;  // quantize columns in order of decreasing H_jj
  int block_size = 128;   // columns per lazy batch
  GptqKernel kernel = GptqKernel::kAuto;
};

// What GPTQ needs of H, computed once per tensor and shared by every row block.
struct GptqFactor {
  size_t cols = 0;
  bool act_order = true;
  int block_size = 128;
  double damp_used = 0;          // the dampening that made H positive definite
  GptqKernel kernel = GptqKernel::kAuto;  // as resolved by gptq_factor; gptq_quantize_rows uses the same
  HessianLayout layout;          // the Hessian's blocks: the factor has the same
  // order[k]: the column quantized k-th; the columns of each block come before those of the next
  // (act-order sorts within each block)
  std::vector<uint32_t> order;
  // per block b (size n_b, at layout.offset(b)): n_b x n_b row-major, the upper Cholesky factor of
  // (P_b^T H_b P_b)^-1
  std::vector<float> u;
};

// H: symmetric positive semi-definite (the sum of x x^T), `layout`'s entries. Fails when H is not
// finite or stays indefinite after dampening is raised a thousandfold. Dampening is relative to
// the mean diagonal over every column.
Result<GptqFactor> gptq_factor(const double* h, const HessianLayout& layout, const GptqOptions& options);
// H: cols x cols, row-major.
inline Result<GptqFactor> gptq_factor(const double* h, size_t cols, const GptqOptions& options) {
  return gptq_factor(h, HessianLayout{cols, 0}, options);
}

// Quantizes rows x cols weights (row-major) into the layout of quantize_rows: one code per weight
// (in the weight's own position), scales and zeros per row per group, rounded to the scheme's
// scale type. The scheme must be affine and not rotated; with a block-diagonal factor and no
// act-order, its group size must divide the factor's block (gptq_groups_fit).
QuantizeRowsStats gptq_quantize_rows(const QuantScheme& scheme, const GptqFactor& factor, const float* w,
                                     size_t rows, size_t cols, uint8_t* codes, float* scales, float* zeros);

// Output-space comparison of a weight W and its reconstruction Q over inputs with second moment H
// (cols x cols): rel_error = sqrt(tr(D H D^T) / tr(W H W^T)) with D = W - Q, and the cosine
// between the outputs, tr(W H Q^T) / sqrt(tr(W H W^T) tr(Q H Q^T)); both over every input the
// Hessian summed and every output row (`row_step` > 1 takes every row_step-th row only).
struct OutputError {
  double rel_error = 0;
  double cosine = 1;
};
OutputError output_error(const float* w, const float* q, size_t rows, size_t cols, const double* h,
                         size_t row_step = 1);
// The same with H in `layout` (layout.cols == cols).
OutputError output_error(const float* w, const float* q, size_t rows, const double* h, const HessianLayout& layout,
                         size_t row_step = 1);
// Whether groups of `group_size` columns (0: one per row) never straddle two of layout's blocks.
inline bool gptq_groups_fit(const HessianLayout& layout, size_t group_size) {
  return layout.full() || (group_size != 0 && layout.block % group_size == 0);
}
// The same over input samples x (x_rows x cols, row-major): ||(W - Q) x^T|| / ||W x^T|| and the
// cosine of W x^T and Q x^T.
OutputError output_error_samples(const float* w, const float* q, size_t rows, size_t cols, const float* x,
                                 size_t x_rows, size_t row_step = 1);

}  // namespace aq
