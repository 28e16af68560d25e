// GPTQ (quant/gptq.h): against a plain double-precision reference written from the paper
// (column by column, no lazy batches), against round-to-nearest on correlated inputs, the
// identity-Hessian case (nothing to spread: the codes are the data-free codes), and the
// output-space error against a direct computation over the inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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

Quantized run_gptq(const QuantScheme& s, const Problem& p, const GptqOptions& o) {
  auto f = gptq_factor(p.h.data(), p.cols, o);
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

}  // namespace
}  // namespace aq
