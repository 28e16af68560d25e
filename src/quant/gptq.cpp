// GPTQ (quant/gptq.h).
//
// This file is compiled twice (CMakeLists.txt):
//   - as part of arrowquant_core, with the project's baseline flags (SSE2 on x86-64): the public
//     functions, and the dense kernels in namespace aq::gptq_generic;
//   - once more with AQ_GPTQ_AVX2_KERNEL defined and -mavx2 -mfma: only the dense kernels, in
//     namespace aq::gptq_avx2, reached through two extern "C" entry points. Eigen picks its packet
//     width and fused multiply-adds from the compiler's flags, so that build runs its products,
//     Cholesky factor and triangular inverse on 256-bit registers.
// The public functions choose the AVX2 kernels at run time when the CPU has AVX2 and FMA.
//
// One definition rule: the AVX2 object instantiates Eigen's templates (and the standard library's)
// under the same mangled names as the baseline one, with different code. Left as they are, the
// linker would keep one copy of each for both paths (an AVX2 instruction reached on a CPU without
// it, or a silently slow AVX2 path). So CMake links that object relocatably with its section groups
// dissolved (ld -r --force-group-allocation) and then makes every symbol in it local except the
// entry points aq_gptq_avx2_* (objcopy --keep-global-symbol): nothing of it is shared with, or
// replaced by, the rest of the program.
#include "quant/gptq.h"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string_view>

#include "common/strcat.h"

#if defined(AQ_GPTQ_AVX2_KERNEL)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "the AVX2 build of the GPTQ kernels needs -mavx2 -mfma"
#endif
#define AQ_GPTQ_KERNEL_NS gptq_avx2
#else
#define AQ_GPTQ_KERNEL_NS gptq_generic
#endif

namespace aq {
namespace AQ_GPTQ_KERNEL_NS {
namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr float kRoundMagic = 12582912.0f;  // as in group_quant.cpp: round half to even
inline float round_small(float v) { return (v + kRoundMagic) - kRoundMagic; }

// One weight with its group's parameters, exactly as quantize_rows assigns codes.
inline uint8_t code_of(bool symmetric, float nmax, float m, float s, float z, float x) {
  const float inv = s != 0.0f ? 1.0f / s : 0.0f;
  if (symmetric) return static_cast<uint8_t>(round_small(std::clamp(x * inv, -m, m - 1.0f) + m));
  return static_cast<uint8_t>(round_small(std::clamp((x - z) * inv, 0.0f, nmax)));
}

// dequantize_value (quant/group_quant.h), repeated here so that this file's AVX2 build compiles
// no copy of that inline function (-ffp-contract=off holds in both builds: no fused rounding).
inline float dequant(bool symmetric, int bits, float s, float z, uint8_t c) {
  if (symmetric) return s * static_cast<float>(static_cast<int>(c) - (1 << (bits - 1)));
  return s * static_cast<float>(c) + z;
}

// L (lower triangular, positive diagonal) -> L^-1, in place, touching only the lower triangle.
// Blocked from the bottom right: with L = [L11 0; L21 L22] and L22^-1 already in place,
// (L^-1)21 = -L22^-1 L21 L11^-1. About n^3/6 multiply-adds, a third of solving L X = I.
void invert_lower_in_place(Eigen::Ref<MatD> l) {
  const Eigen::Index n = l.rows();
  constexpr Eigen::Index kBlock = 128;
  MatD x11, tmp;
  for (Eigen::Index j = ((n - 1) / kBlock) * kBlock; j >= 0; j -= kBlock) {
    const Eigen::Index jb = std::min(kBlock, n - j), t0 = j + jb, tn = n - t0;
    // minus the diagonal block's inverse
    x11 = -l.block(j, j, jb, jb).triangularView<Eigen::Lower>().solve(MatD::Identity(jb, jb));
    if (tn > 0) {
      tmp.noalias() = l.block(t0, t0, tn, tn).triangularView<Eigen::Lower>() * l.block(t0, j, tn, jb);
      l.block(t0, j, tn, jb).noalias() = tmp * x11.triangularView<Eigen::Lower>();
    }
    l.block(j, j, jb, jb).triangularView<Eigen::Lower>() = -x11;
  }
}

}  // namespace

// One attempt at the factor with `shift` added to the diagonal. h: cols x cols, the Hessian;
// order: the quantization order; diag[k]: the diagonal entry to use at position k (dead inputs
// already replaced); an input with h_jj <= 0 is dead and its off-diagonal entries count as 0.
// u: cols x cols row-major, its strictly lower triangle already zero; the upper triangle is
// written. False when the dampened matrix is not positive definite (or the factor not finite).
//
// With J the reversal permutation and A the permuted, dampened Hessian: the lower Cholesky factor
// of J A J = L L^T gives A = (J L J)(J L J)^T with J L J upper triangular, so
// A^-1 = (J L^-1 J)^T (J L^-1 J): U = J L^-1 J is the upper Cholesky factor of A^-1 (upper
// triangular with a positive diagonal, hence the unique one). One Cholesky factor and one
// triangular inverse: about n^3/3 multiply-adds in all, where inverting A and factoring the
// inverse took 4n^3/3.
bool factor_attempt(const double* h, size_t cols, const uint32_t* order, const double* diag, double shift,
                    float* u) {
  const Eigen::Index n = static_cast<Eigen::Index>(cols);
  MatD a(n, n);  // J A J, lower triangle only (column q of it: column order[n-1-q] of H, reversed)
  for (Eigen::Index q = 0; q < n; ++q) {
    const size_t oq = order[n - 1 - q];
    const double* hrow = h + oq * cols;  // H symmetric: its row oq is its column oq
    const bool dead_q = hrow[oq] <= 0.0;
    double* out = a.col(q).data();
    out[q] = diag[n - 1 - q] + shift;
    for (Eigen::Index p = q + 1; p < n; ++p) {
      const size_t op = order[n - 1 - p];
      out[p] = (dead_q || h[op * cols + op] <= 0.0) ? 0.0 : hrow[op];
    }
  }
  Eigen::LLT<Eigen::Ref<MatD>, Eigen::Lower> llt(a);
  if (llt.info() != Eigen::Success) return false;
  invert_lower_in_place(a);
  // U(i, j) = L^-1(n-1-i, n-1-j) for j >= i, copied in tiles of columns of L^-1 (each read in
  // order) so that the writes to a row of U stay close together.
  constexpr Eigen::Index kTile = 32;
  for (Eigen::Index c0 = 0; c0 < n; c0 += kTile) {
    const Eigen::Index c1 = std::min(n, c0 + kTile);
    for (Eigen::Index r = c0; r < n; ++r) {
      float* urow = u + static_cast<size_t>(n - 1 - r) * cols + (n - 1);  // &U(n-1-r, n-1)
      for (Eigen::Index c = c0; c < std::min(c1, r + 1); ++c) {
        const double v = a(r, c);
        if (!std::isfinite(v)) return false;
        urow[-c] = static_cast<float>(v);  // U(n-1-r, n-1-c)
      }
    }
  }
  return true;
}

// gptq_quantize_rows after the static groups' parameters are in scales/zeros (act-order): each
// of the factor's blocks in turn, independently.
QuantizeRowsStats quantize_rows_kernel(const QuantScheme& scheme, const GptqFactor& factor, const float* w,
                                       size_t rows, size_t cols, uint8_t* codes, float* scales, float* zeros) {
  QuantizeRowsStats stats;
  const size_t g = scheme.group_size == 0 ? cols : static_cast<size_t>(scheme.group_size);
  const size_t gpr = (cols + g - 1) / g;
  const bool sym = scheme.symmetric;
  const float nmax = static_cast<float>((1 << scheme.bits) - 1);
  const float m = static_cast<float>(1 << (scheme.bits - 1));
  const Eigen::Index R = static_cast<Eigen::Index>(rows);
  const HessianLayout& lay = factor.layout;

  MatF wp, group_in;
  Eigen::Matrix<uint8_t, Eigen::Dynamic, 1> group_codes;
  Eigen::VectorXf group_s(R), group_z(R);
  const Eigen::Index B = factor.block_size;
  MatF err(R, B);
  for (size_t hb = 0; hb < lay.blocks(); ++hb) {
    const size_t first = lay.begin(hb);
    const uint32_t* order = factor.order.data() + first;
    const Eigen::Index C = static_cast<Eigen::Index>(lay.size(hb));
    // The block's weights in quantization order; updated in place as errors move right.
    wp.resize(R, C);
    for (Eigen::Index r = 0; r < R; ++r)
      for (Eigen::Index k = 0; k < C; ++k) wp(r, k) = w[static_cast<size_t>(r) * cols + order[k]];
    Eigen::Map<const MatF> U(factor.u.data() + lay.offset(hb), C, C);
    for (Eigen::Index i1 = 0; i1 < C; i1 += B) {
      const Eigen::Index i2 = std::min(C, i1 + B);
      for (Eigen::Index k = i1; k < i2; ++k) {
        const size_t col = order[k];
        const size_t grp = col / g;
        if (!factor.act_order && col % g == 0) {
          // Dynamic groups (natural order, so the group's columns are k .. k + len - 1).
          const Eigen::Index len = static_cast<Eigen::Index>(std::min(g, cols - col));
          group_in = wp.middleCols(k, len);
          group_codes.resize(R * len);
          QuantScheme one = scheme;
          one.group_size = 0;  // one group per row of the slice
          const QuantizeRowsStats st = quantize_rows(one, group_in.data(), rows, static_cast<size_t>(len),
                                                     group_codes.data(), group_s.data(), sym ? nullptr : group_z.data());
          stats.f16_imprecise_groups += st.f16_imprecise_groups;
          for (size_t r = 0; r < rows; ++r) {
            scales[r * gpr + grp] = group_s[static_cast<Eigen::Index>(r)];
            if (!sym) zeros[r * gpr + grp] = group_z[static_cast<Eigen::Index>(r)];
          }
        }
        const float d = U(k, k);
        for (Eigen::Index r = 0; r < R; ++r) {
          const size_t p = static_cast<size_t>(r) * gpr + grp;
          const float s = scales[p], z = sym ? 0.0f : zeros[p];
          const float x = wp(r, k);
          const uint8_t c = code_of(sym, nmax, m, s, z, x);
          codes[static_cast<size_t>(r) * cols + col] = c;
          err(r, k - i1) = (x - dequant(sym, scheme.bits, s, z, c)) / d;
        }
        // Spread this column's error over the rest of the batch.
        if (k + 1 < i2)
          wp.block(0, k + 1, R, i2 - k - 1).noalias() -= err.col(k - i1) * U.block(k, k + 1, 1, i2 - k - 1);
      }
      // Lazy batch: the whole batch's error onto every later column of the block at once.
      if (i2 < C)
        wp.rightCols(C - i2).noalias() -= err.leftCols(i2 - i1) * U.block(i1, i2, i2 - i1, C - i2);
    }
  }
  return stats;
}

}  // namespace AQ_GPTQ_KERNEL_NS
}  // namespace aq

#if defined(AQ_GPTQ_AVX2_KERNEL)

// The AVX2 build's only global symbols (see the top of the file).
extern "C" bool aq_gptq_avx2_factor_attempt(const double* h, size_t cols, const uint32_t* order,
                                            const double* diag, double shift, float* u) {
  return aq::gptq_avx2::factor_attempt(h, cols, order, diag, shift, u);
}
extern "C" void aq_gptq_avx2_quantize_rows(const aq::QuantScheme* scheme, const aq::GptqFactor* factor,
                                           const float* w, size_t rows, size_t cols, uint8_t* codes,
                                           float* scales, float* zeros, aq::QuantizeRowsStats* stats) {
  *stats = aq::gptq_avx2::quantize_rows_kernel(*scheme, *factor, w, rows, cols, codes, scales, zeros);
}

#else  // the baseline build: the public functions

#if defined(AQ_GPTQ_HAVE_AVX2)
extern "C" bool aq_gptq_avx2_factor_attempt(const double* h, size_t cols, const uint32_t* order,
                                            const double* diag, double shift, float* u);
extern "C" void aq_gptq_avx2_quantize_rows(const aq::QuantScheme* scheme, const aq::GptqFactor* factor,
                                           const float* w, size_t rows, size_t cols, uint8_t* codes,
                                           float* scales, float* zeros, aq::QuantizeRowsStats* stats);
#endif

namespace aq {
namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// ARROWQUANT_GPTQ_KERNEL=generic in the environment: kAuto means the baseline kernels.
bool auto_means_generic() {
  static const bool generic = [] {
    const char* v = std::getenv("ARROWQUANT_GPTQ_KERNEL");
    return v != nullptr && std::string_view(v) == "generic";
  }();
  return generic;
}

GptqKernel resolve(GptqKernel k) {
  if (k == GptqKernel::kGeneric || (k == GptqKernel::kAuto && auto_means_generic())) return GptqKernel::kGeneric;
  return gptq_avx2_available() ? GptqKernel::kAvx2 : GptqKernel::kGeneric;
}

}  // namespace

bool gptq_avx2_available() {
#if defined(AQ_GPTQ_HAVE_AVX2)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

Result<GptqFactor> gptq_factor(const double* h, const HessianLayout& layout, const GptqOptions& options) {
  GptqFactor f;
  const size_t cols = layout.cols;
  f.cols = cols;
  f.layout = layout;
  if (f.layout.full()) f.layout.block = 0;
  f.act_order = options.act_order;
  f.block_size = std::max(1, options.block_size);
  f.kernel = resolve(options.kernel);
  f.order.resize(cols);
  std::iota(f.order.begin(), f.order.end(), 0u);
  if (cols == 0) return f;
  const HessianLayout& lay = f.layout;

  const size_t n = cols;
  std::vector<double> diag(n);
  double mean = 0.0;
  for (size_t j = 0; j < n; ++j) {
    diag[j] = h[lay.diag(j)];
    if (!std::isfinite(diag[j])) return QuantizationFailure(StrCat("Hessian diagonal entry ", j, " is ", diag[j]));
    mean += diag[j];
  }
  mean /= static_cast<double>(n);
  if (!(mean > 0.0)) mean = 1.0;  // no input ever reached the layer: plain rounding, in order
  // Off the diagonal, only the entries between live inputs are used (a dead input's are zeroed).
  for (size_t b = 0; b < lay.blocks(); ++b) {
    const size_t first = lay.begin(b), nb = lay.size(b);
    const double* hb = h + lay.offset(b);
    for (size_t i = 0; i < nb; ++i) {
      if (!(diag[first + i] > 0.0)) continue;
      for (size_t j = 0; j < nb; ++j)
        if (!std::isfinite(hb[i * nb + j]) && diag[first + j] > 0.0)
          return QuantizationFailure("the Hessian has non-finite entries");
    }
  }
  for (size_t j = 0; j < n; ++j)
    if (diag[j] <= 0.0) diag[j] = mean;  // a dead input: its error goes nowhere, any positive value does
  if (options.act_order)
    for (size_t b = 0; b < lay.blocks(); ++b)
      std::stable_sort(f.order.begin() + static_cast<std::ptrdiff_t>(lay.begin(b)),
                       f.order.begin() + static_cast<std::ptrdiff_t>(lay.begin(b) + lay.size(b)),
                       [&](uint32_t a, uint32_t c) { return diag[a] > diag[c]; });
  std::vector<double> pdiag(n);  // in quantization order
  for (size_t k = 0; k < n; ++k) pdiag[k] = diag[f.order[k]];
  std::vector<uint32_t> local;  // a block's order, relative to its first column

  f.u.assign(lay.values(), 0.0f);
  double damp = options.damp > 0 ? options.damp : 1e-6;
  for (int attempt = 0; attempt < 4; ++attempt, damp *= 10.0) {
    bool ok = true;
    for (size_t b = 0; b < lay.blocks() && ok; ++b) {
      const size_t first = lay.begin(b), nb = lay.size(b);
      local.assign(f.order.begin() + static_cast<std::ptrdiff_t>(first),
                   f.order.begin() + static_cast<std::ptrdiff_t>(first + nb));
      for (uint32_t& c : local) c -= static_cast<uint32_t>(first);
      const double* hb = h + lay.offset(b);
      float* ub = f.u.data() + lay.offset(b);
#if defined(AQ_GPTQ_HAVE_AVX2)
      if (f.kernel == GptqKernel::kAvx2)
        ok = aq_gptq_avx2_factor_attempt(hb, nb, local.data(), pdiag.data() + first, damp * mean, ub);
      else
#endif
        ok = gptq_generic::factor_attempt(hb, nb, local.data(), pdiag.data() + first, damp * mean, ub);
    }
    if (!ok) continue;
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
  // Static groups (act-order): every group's parameters from the original weights, up front.
  if (factor.act_order) {
    std::vector<uint8_t> scratch(rows * cols);
    stats = quantize_rows(scheme, w, rows, cols, scratch.data(), scales, zeros);
  }
  QuantizeRowsStats more;
#if defined(AQ_GPTQ_HAVE_AVX2)
  if (resolve(factor.kernel) == GptqKernel::kAvx2)
    aq_gptq_avx2_quantize_rows(&scheme, &factor, w, rows, cols, codes, scales, zeros, &more);
  else
#endif
    more = gptq_generic::quantize_rows_kernel(scheme, factor, w, rows, cols, codes, scales, zeros);
  stats.f16_imprecise_groups += more.f16_imprecise_groups;
  return stats;
}

namespace {
// Every row_step-th row of w and q (rows x cols) as float64 matrices.
void sampled_rows(const float* w, const float* q, size_t rows, size_t cols, size_t row_step, MatD& W, MatD& Q) {
  const Eigen::Index C = static_cast<Eigen::Index>(cols);
  const Eigen::Index n = static_cast<Eigen::Index>((rows + row_step - 1) / row_step);
  W.resize(n, C);
  Q.resize(n, C);
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < C; ++j) {
      const size_t at = static_cast<size_t>(i) * row_step * cols + static_cast<size_t>(j);
      W(i, j) = w[at];
      Q(i, j) = q[at];
    }
}
}  // namespace

OutputError output_error(const float* w, const float* q, size_t rows, size_t cols, const double* h,
                         size_t row_step) {
  return output_error(w, q, rows, h, HessianLayout{cols, 0}, row_step);
}

OutputError output_error(const float* w, const float* q, size_t rows, const double* h, const HessianLayout& layout,
                         size_t row_step) {
  OutputError out;
  const size_t cols = layout.cols;
  if (rows == 0 || cols == 0) return out;
  MatD W, Q;
  sampled_rows(w, q, rows, cols, std::max<size_t>(1, row_step), W, Q);
  const MatD D = W - Q;
  double ww = 0, dd = 0, wd = 0;
  for (size_t b = 0; b < layout.blocks(); ++b) {
    const Eigen::Index first = static_cast<Eigen::Index>(layout.begin(b)), nb = static_cast<Eigen::Index>(layout.size(b));
    Eigen::Map<const MatD> H(h + layout.offset(b), nb, nb);
    const auto Wb = W.middleCols(first, nb);
    const auto Db = D.middleCols(first, nb);
    const MatD WH = Wb * H, DH = Db * H;
    ww += (WH.array() * Wb.array()).sum();
    dd += (DH.array() * Db.array()).sum();
    wd += (WH.array() * Db.array()).sum();
  }
  dd = std::max(0.0, dd);
  const double qq = std::max(0.0, ww - 2.0 * wd + dd);
  const double wq = ww - wd;
  out.rel_error = ww > 0 ? std::sqrt(dd / ww) : (dd > 0 ? INFINITY : 0.0);
  out.cosine = (ww > 0 && qq > 0) ? wq / std::sqrt(ww * qq) : (ww == qq ? 1.0 : 0.0);
  return out;
}

OutputError output_error_samples(const float* w, const float* q, size_t rows, size_t cols, const float* x,
                                 size_t x_rows, size_t row_step) {
  OutputError out;
  if (rows == 0 || cols == 0 || x_rows == 0) return out;
  const Eigen::Index C = static_cast<Eigen::Index>(cols), R = static_cast<Eigen::Index>(x_rows);
  MatD W, Q;
  sampled_rows(w, q, rows, cols, std::max<size_t>(1, row_step), W, Q);
  const MatD X = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(x, R, C)
                     .cast<double>();
  const MatD Y = W * X.transpose(), YQ = Q * X.transpose();
  const double ww = Y.squaredNorm(), qq = YQ.squaredNorm(), dd = (Y - YQ).squaredNorm();
  const double wq = (Y.array() * YQ.array()).sum();
  out.rel_error = ww > 0 ? std::sqrt(dd / ww) : (dd > 0 ? INFINITY : 0.0);
  out.cosine = (ww > 0 && qq > 0) ? wq / std::sqrt(ww * qq) : (ww == qq ? 1.0 : 0.0);
  return out;
}

}  // namespace aq

#endif  // AQ_GPTQ_AVX2_KERNEL
