// GPTQ (quant/gptq.h): against a plain double-precision reference written from the paper
// (column by column, no lazy batches), against round-to-nearest on correlated inputs, the
// identity-Hessian case (nothing to spread: the codes are the data-free codes), the factor against
// the former way of computing it (inverse, then Cholesky factor of the inverse), the AVX2 kernels
// against the baseline ones, and the output-space error against a direct computation over the inputs.
#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "quant/gptq.h"

namespace aq {
namespace {

struct Problem {
  size_t rows, cols, n;
  std::vector<float> w;
  std::vector<double> x;  // n x cols inputs
  std::vector<double> h;  // cols x cols, sum of x x^T
};

// Inputs with strongly correlated features and uneven scales (as activations are).
Problem make_problem(size_t rows, size_t cols, size_t n, uint32_t seed) {
  Problem p{rows, cols, n, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  p.w.resize(rows * cols);
  for (float& v : p.w) v = g(rng);
  const size_t k = std::max<size_t>(2, cols / 4);  // latent factors
  std::vector<double> mix(k * cols), chan(cols);
  for (double& v : mix) v = g(rng);
  for (size_t j = 0; j < cols; ++j) chan[j] = std::exp(0.8 * g(rng));
  p.x.assign(n * cols, 0.0);
  std::vector<double> z(k);
  for (size_t i = 0; i < n; ++i) {
    for (double& v : z) v = g(rng);
    for (size_t j = 0; j < cols; ++j) {
      double s = 0.3 * g(rng);
      for (size_t t = 0; t < k; ++t) s += z[t] * mix[t * cols + j] / std::sqrt(static_cast<double>(k));
      p.x[i * cols + j] = s * chan[j];
    }
  }
  p.h.assign(cols * cols, 0.0);
  for (size_t i = 0; i < n; ++i)
    for (size_t a = 0; a < cols; ++a)
      for (size_t b = 0; b < cols; ++b) p.h[a * cols + b] += p.x[i * cols + a] * p.x[i * cols + b];
  return p;
}

struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> scales, zeros, deq;
};

Quantized run_gptq_on(const QuantScheme& s, const Problem& p, const double* h, const HessianLayout& layout,
                      const GptqOptions& o) {
  auto f = gptq_factor(h, layout, o);
  EXPECT_TRUE(f.ok()) << f.status().message();
  Quantized q;
  const size_t groups = p.rows * groups_per_row(s, p.cols);
  q.codes.assign(p.rows * p.cols, 0xff);
  q.scales.assign(groups, NAN);
  q.zeros.assign(groups, NAN);
  q.deq.resize(p.rows * p.cols);
  gptq_quantize_rows(s, *f, p.w.data(), p.rows, p.cols, q.codes.data(), q.scales.data(), q.zeros.data());
  dequantize_rows(s, q.codes.data(), q.scales.data(), q.zeros.data(), p.rows, p.cols, q.deq.data());
  return q;
}

Quantized run_gptq(const QuantScheme& s, const Problem& p, const GptqOptions& o) {
  return run_gptq_on(s, p, p.h.data(), HessianLayout{p.cols, 0}, o);
}

Quantized run_rtn(const QuantScheme& s, const Problem& p) {
  Quantized q;
  const size_t groups = p.rows * groups_per_row(s, p.cols);
  q.codes.resize(p.rows * p.cols);
  q.scales.resize(groups);
  q.zeros.resize(groups);
  q.deq.resize(p.rows * p.cols);
  quantize_rows(s, p.w.data(), p.rows, p.cols, q.codes.data(), q.scales.data(), q.zeros.data());
  dequantize_rows(s, q.codes.data(), q.scales.data(), q.zeros.data(), p.rows, p.cols, q.deq.data());
  return q;
}

// ||(W - Q) X^T|| / ||W X^T|| straight from the inputs.
double direct_output_error(const Problem& p, const std::vector<float>& q) {
  double num = 0, den = 0;
  for (size_t r = 0; r < p.rows; ++r)
    for (size_t i = 0; i < p.n; ++i) {
      double y = 0, yq = 0;
      for (size_t j = 0; j < p.cols; ++j) {
        y += p.w[r * p.cols + j] * p.x[i * p.cols + j];
        yq += q[r * p.cols + j] * p.x[i * p.cols + j];
      }
      num += (y - yq) * (y - yq);
      den += y * y;
    }
  return std::sqrt(num / den);
}

// The paper's algorithm in double precision, one column at a time, with the group parameters
// given (static groups) and the columns in the order given.
std::vector<uint8_t> reference_gptq(const QuantScheme& s, const Problem& p, const std::vector<uint32_t>& order,
                                    const std::vector<float>& scales, const std::vector<float>& zeros, double damp) {
  const size_t C = p.cols, g = group_len(s, C), gpr = groups_per_row(s, C);
  // H in quantization order, dampened, inverted by Gauss-Jordan, then the upper Cholesky factor.
  std::vector<double> a(C * C), inv(C * C, 0.0);
  double mean = 0;
  for (size_t j = 0; j < C; ++j) mean += p.h[j * C + j];
  mean /= static_cast<double>(C);
  for (size_t i = 0; i < C; ++i)
    for (size_t j = 0; j < C; ++j) a[i * C + j] = p.h[order[i] * C + order[j]] + (i == j ? damp * mean : 0.0);
  for (size_t i = 0; i < C; ++i) inv[i * C + i] = 1.0;
  for (size_t c = 0; c < C; ++c) {
    const double piv = a[c * C + c];
    for (size_t j = 0; j < C; ++j) a[c * C + j] /= piv, inv[c * C + j] /= piv;
    for (size_t r = 0; r < C; ++r) {
      if (r == c) continue;
      const double f = a[r * C + c];
      for (size_t j = 0; j < C; ++j) a[r * C + j] -= f * a[c * C + j], inv[r * C + j] -= f * inv[c * C + j];
    }
  }
  std::vector<double> u(C * C, 0.0);  // inv = U^T U
  for (size_t i = 0; i < C; ++i) {
    double d = inv[i * C + i];
    for (size_t k = 0; k < i; ++k) d -= u[k * C + i] * u[k * C + i];
    u[i * C + i] = std::sqrt(d);
    for (size_t j = i + 1; j < C; ++j) {
      double v = inv[i * C + j];
      for (size_t k = 0; k < i; ++k) v -= u[k * C + i] * u[k * C + j];
      u[i * C + j] = v / u[i * C + i];
    }
  }
  std::vector<uint8_t> codes(p.rows * C);
  const double nmax = (1 << s.bits) - 1;
  for (size_t r = 0; r < p.rows; ++r) {
    std::vector<double> wr(C);
    for (size_t k = 0; k < C; ++k) wr[k] = p.w[r * C + order[k]];
    for (size_t k = 0; k < C; ++k) {
      const size_t col = order[k], gi = r * gpr + col / g;
      const double sc = scales[gi], z = zeros[gi];
      const double c = std::clamp(std::nearbyint((wr[k] - z) / sc), 0.0, nmax);
      codes[r * C + col] = static_cast<uint8_t>(c);
      const double e = (wr[k] - (sc * c + z)) / u[k * C + k];
      for (size_t j = k + 1; j < C; ++j) wr[j] -= e * u[k * C + j];
    }
  }
  return codes;
}

TEST(Gptq, MatchesTheColumnByColumnReference) {
  const Problem p = make_problem(24, 96, 400, 1);
  QuantScheme s;
  s.bits = 3;
  s.group_size = 32;
  s.scale_type = ScaleType::kF32;
  GptqOptions o;
  o.block_size = 16;  // several lazy batches
  const Quantized fast = run_gptq(s, p, o);
  auto f = gptq_factor(p.h.data(), p.cols, o);
  ASSERT_TRUE(f.ok());
  const std::vector<uint8_t> ref = reference_gptq(s, p, f->order, fast.scales, fast.zeros, f->damp_used);
  size_t same = 0;
  for (size_t i = 0; i < ref.size(); ++i) same += ref[i] == fast.codes[i];
  // float32 against double: a weight landing within rounding noise of a decision boundary may go
  // either way, and its error then travels on; nearly every code agrees.
  EXPECT_GE(static_cast<double>(same) / static_cast<double>(ref.size()), 0.97);
  std::vector<float> ref_deq(ref.size());
  dequantize_rows(s, ref.data(), fast.scales.data(), fast.zeros.data(), p.rows, p.cols, ref_deq.data());
  EXPECT_NEAR(direct_output_error(p, fast.deq), direct_output_error(p, ref_deq), 0.02 * direct_output_error(p, ref_deq));
}

TEST(Gptq, BeatsRoundToNearestOnCorrelatedInputs) {
  const Problem p = make_problem(32, 128, 600, 2);
  for (int bits : {2, 3, 4}) {
    for (bool act_order : {true, false}) {
      QuantScheme s;
      s.bits = bits;
      s.group_size = 64;
      GptqOptions o;
      o.act_order = act_order;
      const double e_gptq = direct_output_error(p, run_gptq(s, p, o).deq);
      const double e_rtn = direct_output_error(p, run_rtn(s, p).deq);
      EXPECT_LT(e_gptq, 0.8 * e_rtn) << "bits " << bits << " act_order " << act_order;
    }
  }
}

TEST(Gptq, IdentityHessianGivesTheDataFreeCodes) {
  Problem p = make_problem(16, 64, 1, 3);
  std::fill(p.h.begin(), p.h.end(), 0.0);
  for (size_t j = 0; j < p.cols; ++j) p.h[j * p.cols + j] = 5.0;
  for (bool act_order : {true, false}) {
    for (bool sym : {false, true}) {
      QuantScheme s;
      s.bits = 4;
      s.group_size = 32;
      s.symmetric = sym;
      GptqOptions o;
      o.act_order = act_order;
      const Quantized a = run_gptq(s, p, o), b = run_rtn(s, p);
      EXPECT_EQ(a.codes, b.codes);
      EXPECT_EQ(a.scales, b.scales);
    }
  }
}

TEST(Gptq, OutputErrorMatchesTheInputs) {
  const Problem p = make_problem(20, 48, 300, 4);
  QuantScheme s;
  s.bits = 2;
  s.group_size = 0;
  const Quantized q = run_rtn(s, p);
  const OutputError e = output_error(p.w.data(), q.deq.data(), p.rows, p.cols, p.h.data());
  EXPECT_NEAR(e.rel_error, direct_output_error(p, q.deq), 1e-9);
  EXPECT_GT(e.cosine, 0.0);
  EXPECT_LT(e.cosine, 1.0);
  const OutputError same = output_error(p.w.data(), p.w.data(), p.rows, p.cols, p.h.data());
  EXPECT_EQ(same.rel_error, 0.0);
  EXPECT_NEAR(same.cosine, 1.0, 1e-12);
}

TEST(Gptq, DeadInputsAndBadHessians) {
  Problem p = make_problem(8, 32, 100, 5);
  for (size_t j = 0; j < p.cols; ++j) p.h[3 * p.cols + j] = p.h[j * p.cols + 3] = 0.0;  // input 3 never active
  QuantScheme s;
  s.group_size = 32;
  const Quantized q = run_gptq(s, p, GptqOptions{});
  for (float v : q.deq) EXPECT_TRUE(std::isfinite(v));
  std::vector<double> bad = p.h;
  bad[5] = NAN;
  EXPECT_FALSE(gptq_factor(bad.data(), p.cols, GptqOptions{}).ok());
  bad = p.h;
  bad[1] = bad[p.cols] = 1e30;  // indefinite beyond any dampening
  EXPECT_FALSE(gptq_factor(bad.data(), p.cols, GptqOptions{}).ok());
}

// The kernels to run a test under: the baseline build, and the AVX2 build where this CPU has it.
std::vector<GptqKernel> kernels() {
  std::vector<GptqKernel> k{GptqKernel::kGeneric};
  if (gptq_avx2_available()) k.push_back(GptqKernel::kAvx2);
  return k;
}

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The dampened Hessian in quantization order, as gptq_factor factors it (no dead inputs here).
MatD permuted_damped(const Problem& p, const GptqFactor& f) {
  const Eigen::Index n = static_cast<Eigen::Index>(p.cols);
  double mean = 0;
  for (size_t j = 0; j < p.cols; ++j) mean += p.h[j * p.cols + j];
  mean /= static_cast<double>(p.cols);
  MatD a(n, n);
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < n; ++j) a(i, j) = p.h[f.order[i] * p.cols + f.order[j]];
  a.diagonal().array() += f.damp_used * mean;
  return a;
}

// The factor as gptq_factor computed it before: Cholesky, the full inverse, Cholesky again.
MatD former_factor(const MatD& a) {
  const MatD inv = Eigen::LLT<MatD>(a).solve(MatD::Identity(a.rows(), a.cols()));
  const MatD sym = 0.5 * (inv + inv.transpose());
  return Eigen::LLT<MatD>(sym).matrixU();
}

TEST(Gptq, FactorIsTheUpperCholeskyFactorOfTheInverse) {
  const Problem p = make_problem(8, 300, 500, 6);  // the triangular inverse runs in blocks of 128
  for (GptqKernel kernel : kernels()) {
    for (bool act_order : {true, false}) {
      GptqOptions o;
      o.act_order = act_order;
      o.kernel = kernel;
      auto f = gptq_factor(p.h.data(), p.cols, o);
      ASSERT_TRUE(f.ok()) << f.status().message();
      EXPECT_EQ(f->kernel, kernel);
      EXPECT_EQ(f->damp_used, 0.01);
      const Eigen::Index n = static_cast<Eigen::Index>(p.cols);
      const MatD u = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
                         f->u.data(), n, n).cast<double>();
      for (Eigen::Index i = 0; i < n; ++i) {
        EXPECT_GT(u(i, i), 0.0);
        for (Eigen::Index j = 0; j < i; ++j) ASSERT_EQ(u(i, j), 0.0) << i << " " << j;
      }
      const MatD a = permuted_damped(p, *f);
      // U^T U = A^-1, up to U's float rounding (relative 2^-24, amplified by A's condition)
      const MatD residual = u.transpose() * u * a - MatD::Identity(n, n);
      EXPECT_LT(residual.cwiseAbs().maxCoeff(), 2e-5) << "kernel " << static_cast<int>(kernel);
      // and the very factor the former computation gave, to float rounding
      const MatD before = former_factor(a);
      const double scale = before.cwiseAbs().maxCoeff();
      EXPECT_LT((u - before).cwiseAbs().maxCoeff(), 2e-7 * scale) << "kernel " << static_cast<int>(kernel);
    }
  }
}

TEST(Gptq, DampeningIsRaisedUntilTheFactorExists) {
  // identity but for one pair of inputs: eigenvalues 1 +- 1.05, indefinite until 0.1 x the mean diagonal
  const size_t n = 40;
  std::vector<double> h(n * n, 0.0);
  for (size_t j = 0; j < n; ++j) h[j * n + j] = 1.0;
  h[2 * n + 7] = h[7 * n + 2] = 1.05;
  for (GptqKernel kernel : kernels()) {
    GptqOptions o;
    o.kernel = kernel;
    auto f = gptq_factor(h.data(), n, o);
    ASSERT_TRUE(f.ok()) << f.status().message();
    EXPECT_DOUBLE_EQ(f->damp_used, 0.1);
    for (float v : f->u) EXPECT_TRUE(std::isfinite(v));
    h[2 * n + 7] = h[7 * n + 2] = 12.0;  // beyond 10 x: fails with the same message as before
    auto bad = gptq_factor(h.data(), n, o);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("stays indefinite after dampening by up to 10 x"), std::string::npos)
        << bad.status().message();
    h[2 * n + 7] = h[7 * n + 2] = 1.05;
  }
}

TEST(Gptq, SameCodesAsWithTheFormerFactor) {
  const Problem p = make_problem(48, 160, 500, 7);
  for (GptqKernel kernel : kernels()) {
    for (bool act_order : {true, false}) {
      QuantScheme s;
      s.bits = 4;
      s.group_size = 32;
      GptqOptions o;
      o.act_order = act_order;
      o.kernel = kernel;
      o.block_size = 64;
      auto f = gptq_factor(p.h.data(), p.cols, o);
      ASSERT_TRUE(f.ok());
      GptqFactor former = *f;
      const Eigen::Index n = static_cast<Eigen::Index>(p.cols);
      Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(former.u.data(), n, n) =
          former_factor(permuted_damped(p, *f)).cast<float>();
      const size_t groups = p.rows * groups_per_row(s, p.cols);
      std::vector<uint8_t> c1(p.rows * p.cols), c2(p.rows * p.cols);
      std::vector<float> s1(groups), s2(groups), z1(groups), z2(groups);
      gptq_quantize_rows(s, *f, p.w.data(), p.rows, p.cols, c1.data(), s1.data(), z1.data());
      gptq_quantize_rows(s, former, p.w.data(), p.rows, p.cols, c2.data(), s2.data(), z2.data());
      size_t same = 0;
      for (size_t i = 0; i < c1.size(); ++i) same += c1[i] == c2[i];
      // float rounding of U may tip a weight that lies on a decision boundary; nearly all agree
      EXPECT_GE(static_cast<double>(same) / static_cast<double>(c1.size()), 0.995)
          << "kernel " << static_cast<int>(kernel) << " act_order " << act_order;
      if (act_order) {
        EXPECT_EQ(s1, s2);  // static groups: from the original weights
        EXPECT_EQ(z1, z2);
      }
    }
  }
}

TEST(Gptq, Avx2KernelsAgreeWithTheBaseline) {
  if (!gptq_avx2_available()) GTEST_SKIP() << "no AVX2 + FMA kernels on this build or CPU";
  const Problem p = make_problem(40, 192, 600, 8);
  for (bool act_order : {true, false}) {
    QuantScheme s;
    s.bits = 3;
    s.group_size = 64;
    GptqOptions o;
    o.act_order = act_order;
    o.block_size = 32;
    o.kernel = GptqKernel::kGeneric;
    const Quantized a = run_gptq(s, p, o);
    o.kernel = GptqKernel::kAvx2;
    const Quantized b = run_gptq(s, p, o);
    size_t same = 0;
    for (size_t i = 0; i < a.codes.size(); ++i) same += a.codes[i] == b.codes[i];
    EXPECT_GE(static_cast<double>(same) / static_cast<double>(a.codes.size()), 0.995) << "act_order " << act_order;
    EXPECT_NEAR(direct_output_error(p, a.deq), direct_output_error(p, b.deq), 0.01 * direct_output_error(p, a.deq));
  }
}

// The engine quantizes a tensor in blocks of whole rows, the last one often short; a row must come
// out the same whichever block it is in, for either kernel. Widths and lazy batches that leave
// every kind of remainder in the products' register blocking, and tiny products (which Eigen
// evaluates another way).
TEST(Gptq, RowBlocksDoNotChangeTheResult) {
  for (size_t cols : {13, 205, 212, 256, 300}) {
    const Problem p = make_problem(37, cols, 300, 9);
    for (GptqKernel kernel : kernels()) {
      for (int lazy : {4, 48, 128}) {
        for (bool act_order : {true, false}) {
          QuantScheme s;
          s.bits = 4;
          s.group_size = 0;
          GptqOptions o;
          o.act_order = act_order;
          o.kernel = kernel;
          o.block_size = lazy;
          const Quantized whole = run_gptq(s, p, o);
          auto f = gptq_factor(p.h.data(), p.cols, o);
          ASSERT_TRUE(f.ok());
          for (size_t block : {1, 2, 3, 5, 7, 8, 13}) {
            std::vector<uint8_t> codes(p.rows * p.cols);
            std::vector<float> scales(p.rows), zeros(p.rows);
            for (size_t r0 = 0; r0 < p.rows; r0 += block) {
              const size_t nr = std::min(block, p.rows - r0);
              gptq_quantize_rows(s, *f, p.w.data() + r0 * p.cols, nr, p.cols, codes.data() + r0 * p.cols,
                                 scales.data() + r0, zeros.data() + r0);
            }
            EXPECT_EQ(codes, whole.codes) << "cols " << cols << " kernel " << static_cast<int>(kernel) << " lazy "
                                          << lazy << " act_order " << act_order << " block " << block;
            EXPECT_EQ(scales, whole.scales);
            EXPECT_EQ(zeros, whole.zeros);
          }
        }
      }
    }
  }
}

// Timing, not a test: ./arrowquant_tests --gtest_also_run_disabled_tests --gtest_filter='*DISABLED_Timing*'
// (a Release build; the best of a few runs of gptq_factor and of gptq_quantize_rows on 256 rows,
// int4 g64 asymmetric).
TEST(Gptq, DISABLED_Timing) {
  // {cols, block}: full Hessians, and a block-diagonal one of Dream-7B's MLP down-projection width
  const std::pair<size_t, size_t> cases[] = {{1024, 0}, {2048, 0}, {4096, 0}, {18944, 4096}};
  for (const auto& [cols, block] : cases) {
    // H = S (B B^T / k + 0.05 I) S (each diagonal block of it): correlated, uneven channel scales,
    // positive definite.
    const size_t k = 64, rows = 256;
    const HessianLayout layout{cols, block};
    std::mt19937 rng(7);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<double> b(cols * k), sc(cols), h(layout.values());
    for (double& v : b) v = g(rng);
    for (double& v : sc) v = std::exp(0.8 * g(rng));
    for (size_t blk = 0; blk < layout.blocks(); ++blk) {
      const size_t first = layout.begin(blk), nb = layout.size(blk);
      double* hb = h.data() + layout.offset(blk);
      for (size_t i = first; i < first + nb; ++i)
        for (size_t j = first; j <= i; ++j) {
          double s = 0;
          for (size_t t = 0; t < k; ++t) s += b[i * k + t] * b[j * k + t];
          s = (s / static_cast<double>(k) + (i == j ? 0.05 : 0.0)) * sc[i] * sc[j];
          hb[(i - first) * nb + (j - first)] = hb[(j - first) * nb + (i - first)] = s;
        }
    }
    std::vector<float> w(rows * cols);
    std::normal_distribution<float> gf(0.0f, 1.0f);
    for (float& v : w) v = gf(rng);
    QuantScheme s;
    s.bits = 4;
    s.group_size = 64;
    std::vector<uint8_t> codes(rows * cols);
    std::vector<float> scales(rows * groups_per_row(s, cols)), zeros(scales.size());
    for (GptqKernel kernel : kernels()) {
      GptqOptions o;
      o.kernel = kernel;
      double t_factor = 1e30, t_quant = 1e30;
      for (int rep = 0; rep < 3; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        auto f = gptq_factor(h.data(), layout, o);
        const auto t1 = std::chrono::steady_clock::now();
        ASSERT_TRUE(f.ok());
        gptq_quantize_rows(s, *f, w.data(), rows, cols, codes.data(), scales.data(), zeros.data());
        const auto t2 = std::chrono::steady_clock::now();
        t_factor = std::min(t_factor, std::chrono::duration<double>(t1 - t0).count());
        t_quant = std::min(t_quant, std::chrono::duration<double>(t2 - t1).count());
      }
      std::printf("cols %5zu  block %4zu  %-7s  gptq_factor %8.3f s  gptq_quantize_rows(%zu rows) %8.3f s\n", cols,
                  block, kernel == GptqKernel::kAvx2 ? "avx2" : "generic", t_factor, rows, t_quant);
    }
  }
}


// A Hessian's diagonal blocks of `block` columns (HessianLayout's entries), and the full matrix
// with every entry off those blocks zeroed.
struct BlockHessian {
  HessianLayout layout;
  std::vector<double> blocks, masked;
};
BlockHessian block_diagonal(const std::vector<double>& h, size_t cols, size_t block) {
  BlockHessian out{HessianLayout{cols, block}, {}, std::vector<double>(cols * cols, 0.0)};
  out.blocks.resize(out.layout.values());
  for (size_t b = 0; b < out.layout.blocks(); ++b) {
    const size_t first = out.layout.begin(b), nb = out.layout.size(b);
    for (size_t i = 0; i < nb; ++i)
      for (size_t j = 0; j < nb; ++j) {
        const double v = h[(first + i) * cols + first + j];
        out.blocks[out.layout.offset(b) + i * nb + j] = v;
        out.masked[(first + i) * cols + first + j] = v;
      }
  }
  return out;
}

TEST(GptqBlockDiagonal, LayoutIndexesEveryBlock) {
  const HessianLayout l{160, 64};
  EXPECT_EQ(l.blocks(), 3u);
  EXPECT_EQ(l.size(2), 32u);
  EXPECT_EQ(l.offset(2), 2u * 64 * 64);
  EXPECT_EQ(l.values(), 2u * 64 * 64 + 32u * 32);
  EXPECT_EQ(l.diag(65), 64u * 64 + 64 + 1);
  const HessianLayout full{160, 0};
  EXPECT_EQ(full.blocks(), 1u);
  EXPECT_EQ(full.values(), 160u * 160);
  EXPECT_TRUE((HessianLayout{160, 160}).full());
  EXPECT_TRUE(gptq_groups_fit(l, 32));
  EXPECT_FALSE(gptq_groups_fit(l, 48));
  EXPECT_FALSE(gptq_groups_fit(l, 0));
}

// In natural order, GPTQ on a block-diagonal Hessian given as its blocks is GPTQ on the full
// matrix whose off-block entries are zero (no error crosses a block either way).
TEST(GptqBlockDiagonal, EqualsTheFullMatrixWithTheOffBlockEntriesZeroed) {
  const Problem p = make_problem(16, 160, 600, 11);
  const BlockHessian bh = block_diagonal(p.h, p.cols, 64);  // blocks of 64, 64, 32
  QuantScheme s;
  s.bits = 3;
  s.group_size = 32;
  s.scale_type = ScaleType::kF32;
  GptqOptions o;
  o.act_order = false;
  o.block_size = 16;
  const Quantized a = run_gptq_on(s, p, bh.blocks.data(), bh.layout, o);
  const Quantized b = run_gptq_on(s, p, bh.masked.data(), HessianLayout{p.cols, 0}, o);
  size_t same = 0;
  for (size_t i = 0; i < a.codes.size(); ++i) same += a.codes[i] == b.codes[i];
  EXPECT_GE(static_cast<double>(same) / static_cast<double>(a.codes.size()), 0.99);
  const OutputError ea = output_error(p.w.data(), a.deq.data(), p.rows, bh.blocks.data(), bh.layout);
  const OutputError eb = output_error(p.w.data(), a.deq.data(), p.rows, p.cols, bh.masked.data());
  EXPECT_NEAR(ea.rel_error, eb.rel_error, 1e-12 + 1e-9 * eb.rel_error);
  EXPECT_NEAR(ea.cosine, eb.cosine, 1e-9);
}

// With act-order (within each block), GPTQ on the block-diagonal Hessian still beats rounding on
// the inputs' true output error, and loses to GPTQ on the full Hessian by less than it gains.
TEST(GptqBlockDiagonal, ActOrderBeatsRoundingOnTheTrueOutputError) {
  const Problem p = make_problem(24, 192, 800, 12);
  const BlockHessian bh = block_diagonal(p.h, p.cols, 64);
  QuantScheme s;
  s.bits = 3;
  s.group_size = 32;
  s.scale_type = ScaleType::kF32;
  GptqOptions o;
  const double rtn = direct_output_error(p, run_rtn(s, p).deq);
  const double blocked = direct_output_error(p, run_gptq_on(s, p, bh.blocks.data(), bh.layout, o).deq);
  const double full = direct_output_error(p, run_gptq(s, p, o).deq);
  EXPECT_LT(blocked, 0.9 * rtn) << "rounding " << rtn << ", block-diagonal GPTQ " << blocked;
  EXPECT_LT(full, blocked * 1.001) << "full " << full << ", block-diagonal " << blocked;
  // The factor keeps each block's columns together, sorted within the block.
  auto f = gptq_factor(bh.blocks.data(), bh.layout, o);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->u.size(), bh.layout.values());
  for (size_t k = 0; k < p.cols; ++k) EXPECT_EQ(f->order[k] / 64, k / 64) << k;
}

}  // namespace
}  // namespace aq
