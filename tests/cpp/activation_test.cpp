// Activation quantization parameters from log-scale histograms (quant/activation.h): the
// histogram's error estimate against quantizing the very samples, and the clipping search.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "quant/activation.h"

namespace aq {
namespace {

ActivationHistogram histogram_of(const std::vector<float>& x) {
  ActivationHistogram h;
  h.min = *std::min_element(x.begin(), x.end());
  h.max = *std::max_element(x.begin(), x.end());
  for (float v : x) {
    if (v == 0.0f) {
      ++h.zero;
      continue;
    }
    const int k = std::clamp(static_cast<int>(std::floor(std::log2(std::fabs(v)) * kHistBinsPerOctave)) -
                                 kHistMinExp * kHistBinsPerOctave, 0, kActHistBins - 1);
    (v > 0 ? h.pos : h.neg)[k] += 1;
  }
  return h;
}

double true_mse(const std::vector<float>& x, const ActivationParams& p) {
  const double nmax = std::ldexp(1.0, p.bits) - 1.0;
  double e = 0;
  for (float v : x) {
    const double c = std::clamp(std::nearbyint(static_cast<double>(v) / p.scale) + p.zero_point, 0.0, nmax);
    const double d = v - (c - p.zero_point) * p.scale;
    e += d * d;
  }
  return e / static_cast<double>(x.size());
}

std::vector<float> samples(int kind, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::student_t_distribution<float> t(3.0f);
  std::vector<float> x(n);
  for (float& v : x) {
    if (kind == 0) v = g(rng);
    else if (kind == 1) v = t(rng);
    else v = std::max(0.0f, g(rng)) * 3.0f - 0.1f;  // post-activation: skewed, mostly one-sided
  }
  return x;
}

TEST(ActivationParams, HistogramEstimateMatchesTheSamples) {
  for (int kind : {0, 1, 2})
    for (int bits : {4, 8}) {
      const auto x = samples(kind, 200000, 7 + kind);
      const ActivationHistogram h = histogram_of(x);
      const ActivationParams p = choose_activation_params(h, bits);
      const double est = activation_mse(h, p), real = true_mse(x, p);
      EXPECT_NEAR(est, real, 0.15 * real) << "kind " << kind << " bits " << bits;
      EXPECT_LE(p.clip_lo, 0.0f);
      EXPECT_GE(p.clip_hi, 0.0f);
      EXPECT_GE(p.zero_point, 0);
      EXPECT_LE(p.zero_point, (1 << bits) - 1);
    }
}

TEST(ActivationParams, ClippingBeatsMinMaxOnHeavyTails) {
  const auto x = samples(1, 200000, 3);
  const ActivationHistogram h = histogram_of(x);
  const ActivationParams searched = choose_activation_params(h, 4);
  ActivationParams minmax;
  minmax.bits = 4;
  minmax.scale = (h.max - h.min) / 15.0f;
  minmax.zero_point = static_cast<int32_t>(std::nearbyint(static_cast<double>(-h.min / minmax.scale)));
  EXPECT_LT(true_mse(x, searched), 0.5 * true_mse(x, minmax));
  EXPECT_LT(searched.clip_hi, h.max);
}

TEST(ActivationParams, ZerosOnlyAndMerging) {
  ActivationHistogram z;
  z.zero = 10;
  const ActivationParams p = choose_activation_params(z, 8);
  EXPECT_EQ(activation_mse(z, p), 0.0);
  const auto a = samples(0, 1000, 1), b = samples(1, 1000, 2);
  ActivationHistogram ha = histogram_of(a), hb = histogram_of(b), hab = ha;
  hab.add(hb);
  std::vector<float> ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  const ActivationHistogram direct = histogram_of(ab);
  EXPECT_EQ(hab.pos, direct.pos);
  EXPECT_EQ(hab.neg, direct.neg);
  EXPECT_EQ(hab.min, direct.min);
  EXPECT_EQ(hab.max, direct.max);
  EXPECT_EQ(hab.count(), 2000u);
}

}  // namespace
}  // namespace aq
