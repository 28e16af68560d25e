// The group quantizer (quant/group_quant.h) on its own: the scale search against the min/max
// baseline, group by group, and the code range.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/half.h"
#include "quant/group_quant.h"
#include "quant/metrics.h"
#include "test_util.h"

namespace aq {
namespace {

struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> scales, zeros, deq;
  QuantizeRowsStats stats;
};

Quantized run(const QuantScheme& s, const std::vector<float>& w, size_t rows, size_t cols) {
  Quantized q;
  const size_t groups = rows * groups_per_row(s, cols);
  q.codes.assign(rows * cols, 0xff);
  q.scales.assign(groups, NAN);
  q.zeros.assign(groups, NAN);
  q.deq.assign(rows * cols, NAN);
  q.stats = quantize_rows(s, w.data(), rows, cols, q.codes.data(), q.scales.data(), q.zeros.data());
  dequantize_rows(s, q.codes.data(), q.scales.data(), q.zeros.data(), rows, cols, q.deq.data());
  return q;
}

// Squared error of every group, in double.
std::vector<double> group_errors(const QuantScheme& s, const std::vector<float>& w, const std::vector<float>& d,
                                 size_t rows, size_t cols) {
  const size_t g = group_len(s, cols), gpr = groups_per_row(s, cols);
  std::vector<double> e(rows * gpr, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) {
      const double diff = static_cast<double>(w[r * cols + c]) - static_cast<double>(d[r * cols + c]);
      e[r * gpr + c / g] += diff * diff;
    }
  return e;
}

enum class Dist { kGaussian, kStudentT4 };

std::vector<float> sample(Dist d, size_t n, uint32_t seed) {
  return d == Dist::kGaussian ? testing::gaussian(n, seed, 0.02f) : testing::student_t4(n, seed, 0.02f);
}

TEST(GroupQuant, search_is_never_worse_than_minmax_on_any_group_and_better_in_total) {
  const size_t rows = 16, cols = 512;
  for (Dist dist : {Dist::kGaussian, Dist::kStudentT4}) {
    const std::vector<float> w = sample(dist, rows * cols, dist == Dist::kGaussian ? 11u : 12u);
    for (int bits : {2, 3, 4, 8})
      for (int gs : {0, 32, 128, 256})
        for (bool sym : {false, true})
          for (ScaleType st : {ScaleType::kF16, ScaleType::kF32}) {
            QuantScheme s;
            s.bits = bits;
            s.group_size = gs;
            s.symmetric = sym;
            s.scale_type = st;
            const std::string what = scheme_name(s) + " " + scale_type_name(st) +
                                     (dist == Dist::kGaussian ? " gaussian" : " student-t4");
            s.method = ScaleMethod::kMinMax;
            const Quantized base = run(s, w, rows, cols);
            s.method = ScaleMethod::kSearch;
            const Quantized best = run(s, w, rows, cols);
            const auto eb = group_errors(s, w, base.deq, rows, cols);
            const auto es = group_errors(s, w, best.deq, rows, cols);
            double total_b = 0, total_s = 0;
            size_t worse = 0;
            for (size_t i = 0; i < eb.size(); ++i) {
              total_b += eb[i];
              total_s += es[i];
              if (es[i] > eb[i]) {
                ++worse;
                ADD_FAILURE() << what << ": group " << i << " search error " << es[i] << " > minmax " << eb[i];
                if (worse > 3) break;
              }
            }
            EXPECT_LT(total_s, total_b) << what;
          }
  }
}

TEST(GroupQuant, codes_stay_below_two_to_the_bits_and_scales_are_stored_values) {
  const size_t rows = 9, cols = 77;
  const std::vector<float> w = testing::outlier_columns(rows, cols, 4, {3, 40}, 30.0f);
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {false, true})
      for (ScaleMethod m : {ScaleMethod::kMinMax, ScaleMethod::kSearch}) {
        QuantScheme s;
        s.bits = bits;
        s.group_size = 32;
        s.symmetric = sym;
        s.method = m;
        const Quantized q = run(s, w, rows, cols);
        for (uint8_t c : q.codes) ASSERT_LT(c, 1u << bits) << scheme_name(s);
        for (float sc : q.scales) {
          ASSERT_TRUE(std::isfinite(sc)) << scheme_name(s);
          ASSERT_EQ(sc, round_to_f16(sc)) << scheme_name(s) << ": float16 scale not rounded";
        }
        if (!sym) {
          for (float z : q.zeros) ASSERT_EQ(z, round_to_f16(z)) << scheme_name(s);
        }
        EXPECT_EQ(q.stats.f16_imprecise_groups, 0u) << scheme_name(s);
      }
}

TEST(GroupQuant, minmax_maps_the_group_range_onto_the_code_range) {
  // Asymmetric min/max: the minimum decodes to z, the maximum to about s * (2^bits - 1) + z.
  const size_t cols = 64;
  const std::vector<float> w = testing::gaussian(cols, 8, 1.0f);
  float lo = w[0], hi = w[0];
  for (float x : w) lo = std::min(lo, x), hi = std::max(hi, x);
  for (int bits : {2, 3, 4, 8}) {
    QuantScheme s;
    s.bits = bits;
    s.group_size = 0;
    s.method = ScaleMethod::kMinMax;
    const Quantized q = run(s, w, 1, cols);
    const float nmax = static_cast<float>((1 << bits) - 1);
    EXPECT_EQ(q.scales[0], round_to_f16((hi - lo) / nmax)) << bits;
    EXPECT_EQ(q.zeros[0], round_to_f16(lo)) << bits;
    // every weight gets its nearest code (ties aside)
    for (size_t i = 0; i < cols; ++i) {
      const float err = std::fabs(w[i] - q.deq[i]);
      EXPECT_LE(err, 0.5f * q.scales[0] + std::fabs(lo - q.zeros[0]) + 1e-6f) << bits << " [" << i << "]";
    }
  }
}

TEST(GroupQuant, symmetric_minmax_uses_absmax_over_two_to_the_bits_minus_one_minus_one) {
  const std::vector<float> w = {0.5f, -2.0f, 1.0f, 0.25f, -0.75f, 1.5f, 0.0f, -1.25f};
  for (int bits : {2, 3, 4, 8}) {
    QuantScheme s;
    s.bits = bits;
    s.group_size = 0;
    s.symmetric = true;
    s.method = ScaleMethod::kMinMax;
    const Quantized q = run(s, w, 1, w.size());
    const float m = static_cast<float>(1 << (bits - 1));
    EXPECT_EQ(q.scales[0], round_to_f16(2.0f / (m - 1.0f))) << bits;
    for (size_t i = 0; i < w.size(); ++i)
      EXPECT_EQ(q.deq[i], dequantize_value(true, bits, q.scales[0], 0.0f, q.codes[i])) << bits;
    EXPECT_NEAR(q.deq[1], -2.0f, 1e-3f) << bits << ": the absmax weight is exactly representable";
  }
}

TEST(GroupQuant, reports_groups_whose_scales_float16_cannot_hold) {
  for (float magnitude : {1e-7f, 1e6f}) {
    std::vector<float> w = testing::gaussian(64, 2, magnitude);
    for (bool sym : {false, true}) {
      QuantScheme s;
      s.group_size = 32;
      s.symmetric = sym;
      const Quantized q = run(s, w, 1, 64);
      EXPECT_EQ(q.stats.f16_imprecise_groups, 2u) << magnitude << (sym ? " sym" : " asym");
      s.scale_type = ScaleType::kF32;
      EXPECT_EQ(run(s, w, 1, 64).stats.f16_imprecise_groups, 0u) << "float32 scales are never imprecise";
    }
  }
}

TEST(GroupQuant, reports_constant_groups_whose_value_float16_cannot_hold) {
  // A constant group is stored as its offset alone; an offset beyond float16 needs float32.
  for (float v : {1.0e5f, -7.0e4f, 3.0e-7f}) {
    const std::vector<float> w(32, v);
    QuantScheme s;
    s.group_size = 32;
    const Quantized q = run(s, w, 1, 32);
    EXPECT_EQ(q.stats.f16_imprecise_groups, 1u) << v;
  }
  const std::vector<float> fine(32, 0.75f);
  QuantScheme s;
  s.group_size = 32;
  const Quantized q = run(s, fine, 1, 32);
  EXPECT_EQ(q.stats.f16_imprecise_groups, 0u);
  EXPECT_EQ(q.deq[0], 0.75f);
}

TEST(Metrics, cosine_relative_error_and_sqnr_follow_their_definitions) {
  const std::vector<float> w = {1.0f, 2.0f, -2.0f, 0.5f, 3.0f};
  const std::vector<float> d = {1.0f, 1.5f, -2.0f, 0.0f, 3.5f};
  ErrorStats st;
  st.add(w.data(), d.data(), w.size());
  double ww = 0, dd = 0, wd = 0, ee = 0, mx = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    ww += w[i] * w[i], dd += d[i] * d[i], wd += w[i] * d[i];
    const double e = w[i] - d[i];
    ee += e * e, mx = std::max(mx, std::fabs(e));
  }
  EXPECT_EQ(st.count, 5u);
  EXPECT_DOUBLE_EQ(st.cosine(), wd / std::sqrt(ww * dd));
  EXPECT_DOUBLE_EQ(st.relative_error(), std::sqrt(ee / ww));
  EXPECT_DOUBLE_EQ(st.sqnr_db(), 10.0 * std::log10(ww / ee));
  EXPECT_EQ(st.max_abs_err, mx);

  ErrorStats zero;
  const std::vector<float> z(4, 0.0f);
  zero.add(z.data(), z.data(), 4);
  EXPECT_EQ(zero.cosine(), 1.0);
  EXPECT_EQ(zero.relative_error(), 0.0);
  EXPECT_EQ(zero.sqnr_db(), 300.0);
  ErrorStats exact;
  exact.add(w.data(), w.data(), w.size());
  EXPECT_DOUBLE_EQ(exact.cosine(), 1.0);
  EXPECT_EQ(exact.sqnr_db(), 300.0);
  ErrorStats lost;
  lost.add(w.data(), z.data(), 4);
  EXPECT_EQ(lost.cosine(), 0.0);
}

TEST(Metrics, merge_adds_the_sums_and_keeps_the_largest_error) {
  const std::vector<float> w = testing::gaussian(64, 1), d = testing::gaussian(64, 2);
  ErrorStats a, b;
  a.add(w.data(), d.data(), 40);
  b.add(w.data() + 40, d.data() + 40, 24);
  ErrorStats m = a;
  m.merge(b);
  EXPECT_EQ(m.count, 64u);
  EXPECT_EQ(m.sum_ww, a.sum_ww + b.sum_ww);
  EXPECT_EQ(m.sum_dd, a.sum_dd + b.sum_dd);
  EXPECT_EQ(m.sum_wd, a.sum_wd + b.sum_wd);
  EXPECT_EQ(m.sum_ee, a.sum_ee + b.sum_ee);
  EXPECT_EQ(m.max_abs_err, std::max(a.max_abs_err, b.max_abs_err));
  ErrorStats whole;
  whole.add(w.data(), d.data(), 64);
  EXPECT_NEAR(m.sum_ee, whole.sum_ee, 1e-12 * whole.sum_ee);
  EXPECT_EQ(m.max_abs_err, whole.max_abs_err);
}

}  // namespace
}  // namespace aq
