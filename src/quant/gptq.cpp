#include "quant/gptq.h"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/strcat.h"

namespace aq {
namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr float kRoundMagic = 12582912.0f;  // as in group_quant.cpp: round half to even
inline float round_small(float v) { return (v + kRoundMagic) - kRoundMagic; }

// One weight with its group's parameters, exactly as quantize_rows assigns codes.
inline uint8_t code_of(bool symmetric, float nmax, float m, float s, float z, float x) {
  const float inv = s != 0.0f ? 1.0f / s : 0.0f;
  if (symmetric) return static_cast<uint8_t>(round_small(std::clamp(x * inv, -m, m - 1.0f) + m));
  return static_cast<uint8_t>(round_small(std::clamp((x - z) * inv, 0.0f, nmax)));
}

}  // namespace

Result<GptqFactor> gptq_factor(const double* h, size_t cols, const GptqOptions& options) {
  GptqFactor f;
  f.cols = cols;
  f.act_order = options.act_order;
  f.block_size = std::max(1, options.block_size);
  f.order.resize(cols);
  std::iota(f.order.begin(), f.order.end(), 0u);
  if (cols == 0) return f;

  const Eigen::Index n = static_cast<Eigen::Index>(cols);
  Eigen::Map<const MatD> H(h, n, n);
  Eigen::VectorXd diag = H.diagonal();
  double mean = 0.0;
  for (Eigen::Index j = 0; j < n; ++j) {
    if (!std::isfinite(diag[j])) return QuantizationFailure(StrCat("Hessian diagonal entry ", j, " is ", diag[j]));
    mean += diag[j];
  }
  mean /= static_cast<double>(n);
  if (!(mean > 0.0)) mean = 1.0;  // no input ever reached the layer: plain rounding, in order
  for (Eigen::Index j = 0; j < n; ++j)
    if (diag[j] <= 0.0) diag[j] = mean;  // a dead input: its error goes nowhere, any positive value does
  if (options.act_order)
    std::stable_sort(f.order.begin(), f.order.end(), [&](uint32_t a, uint32_t b) { return diag[a] > diag[b]; });

  MatD hp(n, n);
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < n; ++j) hp(i, j) = H(f.order[i], f.order[j]);
  for (Eigen::Index i = 0; i < n; ++i) {
    if (H(f.order[i], f.order[i]) <= 0.0) {
      hp.row(i).setZero();
      hp.col(i).setZero();
    }
    hp(i, i) = diag[f.order[i]];
  }
  if (!hp.allFinite()) return QuantizationFailure("the Hessian has non-finite entries");

  double damp = options.damp > 0 ? options.damp : 1e-6;
  for (int attempt = 0; attempt < 4; ++attempt, damp *= 10.0) {
    MatD a = hp;
    a.diagonal().array() += damp * mean;
    Eigen::LLT<MatD> llt(a);
    if (llt.info() != Eigen::Success) continue;
    const MatD inv = llt.solve(MatD::Identity(n, n));
    const MatD sym = 0.5 * (inv + inv.transpose());
    Eigen::LLT<MatD> llt_inv(sym);
    if (llt_inv.info() != Eigen::Success) continue;
    const MatD u = llt_inv.matrixU();
    f.u.resize(cols * cols);
    Eigen::Map<MatF>(f.u.data(), n, n) = u.cast<float>();
    f.damp_used = damp;
    return f;
  }
  return QuantizationFailure(StrCat("the Hessian stays indefinite after dampening by up to ", damp / 10.0,
                                " x its mean diagonal"));
}

QuantizeRowsStats gptq_quantize_rows(const QuantScheme& scheme, const GptqFactor& factor, const float* w,
                                     size_t rows, size_t cols, uint8_t* codes, float* scales, float* zeros) {
  QuantizeRowsStats stats;
  if (rows == 0 || cols == 0) return stats;
  const size_t g = group_len(scheme, cols);
  const size_t gpr = groups_per_row(scheme, cols);
  const bool sym = scheme.symmetric;
  const float nmax = static_cast<float>((1 << scheme.bits) - 1);
  const float m = static_cast<float>(1 << (scheme.bits - 1));
  const Eigen::Index R = static_cast<Eigen::Index>(rows), C = static_cast<Eigen::Index>(cols);

  // Static groups (act-order): every group's parameters from the original weights, up front.
  std::vector<uint8_t> scratch;
  if (factor.act_order) {
    scratch.resize(rows * cols);
    stats = quantize_rows(scheme, w, rows, cols, scratch.data(), scales, zeros);
  }

  // The weights in quantization order; updated in place as errors move right.
  MatF wp(R, C);
  for (Eigen::Index r = 0; r < R; ++r)
    for (Eigen::Index k = 0; k < C; ++k) wp(r, k) = w[static_cast<size_t>(r) * cols + factor.order[k]];
  Eigen::Map<const MatF> U(factor.u.data(), C, C);

  std::vector<float> group_in, group_s(rows), group_z(rows);
  std::vector<uint8_t> group_codes;
  const Eigen::Index B = factor.block_size;
  MatF err(R, B);
  for (Eigen::Index i1 = 0; i1 < C; i1 += B) {
    const Eigen::Index i2 = std::min(C, i1 + B);
    for (Eigen::Index k = i1; k < i2; ++k) {
      const size_t col = factor.order[k];
      const size_t grp = col / g;
      if (!factor.act_order && col % g == 0) {
        // Dynamic groups (natural order, so the group's columns are k .. k + len - 1).
        const size_t len = std::min(g, cols - col);
        group_in.resize(rows * len);
        group_codes.resize(rows * len);
        for (size_t r = 0; r < rows; ++r)
          for (size_t j = 0; j < len; ++j) group_in[r * len + j] = wp(static_cast<Eigen::Index>(r), k + static_cast<Eigen::Index>(j));
        QuantScheme one = scheme;
        one.group_size = 0;  // one group per row of the slice
        const QuantizeRowsStats st = quantize_rows(one, group_in.data(), rows, len, group_codes.data(), group_s.data(),
                                                   sym ? nullptr : group_z.data());
        stats.f16_imprecise_groups += st.f16_imprecise_groups;
        for (size_t r = 0; r < rows; ++r) {
          scales[r * gpr + grp] = group_s[r];
          if (!sym) zeros[r * gpr + grp] = group_z[r];
        }
      }
      const float d = U(k, k);
      for (Eigen::Index r = 0; r < R; ++r) {
        const size_t p = static_cast<size_t>(r) * gpr + grp;
        const float s = scales[p], z = sym ? 0.0f : zeros[p];
        const float x = wp(r, k);
        const uint8_t c = code_of(sym, nmax, m, s, z, x);
        codes[static_cast<size_t>(r) * cols + col] = c;
        err(r, k - i1) = (x - dequantize_value(sym, scheme.bits, s, z, c)) / d;
      }
      // Spread this column's error over the rest of the block.
      if (k + 1 < i2)
        wp.block(0, k + 1, R, i2 - k - 1).noalias() -= err.col(k - i1) * U.block(k, k + 1, 1, i2 - k - 1);
    }
    // Lazy batch: the whole block's error onto every later column at once.
    if (i2 < C)
      wp.rightCols(C - i2).noalias() -= err.leftCols(i2 - i1) * U.block(i1, i2, i2 - i1, C - i2);
  }
  return stats;
}

OutputError output_error(const float* w, const float* q, size_t rows, size_t cols, const double* h,
                         size_t row_step) {
  OutputError out;
  if (rows == 0 || cols == 0) return out;
  row_step = std::max<size_t>(1, row_step);
  const Eigen::Index C = static_cast<Eigen::Index>(cols);
  const Eigen::Index n = static_cast<Eigen::Index>((rows + row_step - 1) / row_step);
  MatD W(n, C), Q(n, C);
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < C; ++j) {
      const size_t at = static_cast<size_t>(i) * row_step * cols + static_cast<size_t>(j);
      W(i, j) = w[at];
      Q(i, j) = q[at];
    }
  Eigen::Map<const MatD> H(h, C, C);
  const MatD D = W - Q;
  const MatD WH = W * H, DH = D * H;
  const double ww = (WH.array() * W.array()).sum();
  const double dd = std::max(0.0, (DH.array() * D.array()).sum());
  const double wd = (WH.array() * D.array()).sum();
  const double qq = std::max(0.0, ww - 2.0 * wd + dd);
  const double wq = ww - wd;
  out.rel_error = ww > 0 ? std::sqrt(dd / ww) : (dd > 0 ? INFINITY : 0.0);
  out.cosine = (ww > 0 && qq > 0) ? wq / std::sqrt(ww * qq) : (ww == qq ? 1.0 : 0.0);
  return out;
}

}  // namespace aq
