// Channel equalization, GPTQ preparation and the output check of one calibrated layer
// (engine/calibrated_layer.h), on calibration data built in memory from known inputs.
#include "engine/calibrated_layer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "test_util.h"

namespace aq {
namespace {

constexpr size_t kCols = 32, kRows = 64;

// A bin whose statistics are those of `x` (n x cols): absmax/min/max, X^T X, and x as the sample.
CalibrationBin bin_of(int bin, const std::vector<float>& x, size_t n, size_t cols) {
  CalibrationBin b;
  b.bin = bin;
  b.samples = 1;
  b.rows = static_cast<int64_t>(n);
  b.absmax.assign(cols, 0.0f);
  b.min.assign(cols, 0.0f);
  b.max.assign(cols, 0.0f);
  b.hessian.assign(cols * cols, 0.0);
  for (size_t r = 0; r < n; ++r)
    for (size_t i = 0; i < cols; ++i) {
      const float v = x[r * cols + i];
      b.absmax[i] = std::max(b.absmax[i], std::fabs(v));
      b.min[i] = std::min(b.min[i], v);
      b.max[i] = std::max(b.max[i], v);
      for (size_t j = 0; j < cols; ++j) b.hessian[i * cols + j] += static_cast<double>(v) * x[r * cols + j];
    }
  b.inputs = x;
  b.input_rows = static_cast<int64_t>(n);
  ActivationHistogram h;
  h.add_values(x.data(), x.size());
  b.histogram = h;
  return b;
}

// Inputs whose column `outlier` is 50x the others, scaled by (1 + bin) per bin.
// (outlier_width columns from `outlier` on: a convolution channel spans its kernel positions)
std::vector<float> inputs(size_t n, uint32_t seed, int bin, size_t outlier, size_t outlier_width) {
  std::vector<float> x = testing::gaussian(n * kCols, seed);
  for (size_t r = 0; r < n; ++r) {
    for (size_t j = outlier; j < outlier + outlier_width; ++j) x[r * kCols + j] *= 50.0f;
    for (size_t j = 0; j < kCols; ++j) x[r * kCols + j] *= static_cast<float>(1 + bin);
  }
  return x;
}

struct Fixture {
  LayerCalibration lc;
  std::vector<TimeGroup> groups;
  std::vector<float> w = testing::gaussian(kRows * kCols, 7, 0.05f);
  explicit Fixture(size_t outlier = 3, size_t outlier_width = 1) {
    lc.in_features = static_cast<int>(kCols);
    for (int b = 0; b < 2; ++b) {
      lc.fit.push_back(bin_of(b, inputs(256, 100 + b, b, outlier, outlier_width), 256, kCols));
      lc.holdout.push_back(bin_of(b, inputs(96, 200 + b, b, outlier, outlier_width), 96, kCols));
      groups.push_back({{b}, 500.0 * b, 500.0 * (b + 1)});
    }
  }
};

CalibratedLayerOptions options(int activation_bits, bool spatial) {
  CalibratedLayerOptions o;
  o.activation_bits = activation_bits;
  o.spatial = spatial;
  o.gptq_scheme.bits = 8;
  o.gptq_scheme.group_size = 32;
  o.data_free = o.gptq_scheme;
  return o;
}

// The stored layer's effective weight: the GPTQ codes of the (scaled) weight, times input_scale.
std::vector<float> effective(const Fixture& f, const CalibratedLayer& cl, const CalibratedLayerOptions& o) {
  std::vector<float> src = f.w;  // W S when equalized
  if (cl.column_scale)
    for (size_t r = 0; r < kRows; ++r)
      for (size_t j = 0; j < kCols; ++j) src[r * kCols + j] *= (*cl.column_scale)[j];
  const size_t gpr = groups_per_row(o.gptq_scheme, kCols);
  std::vector<uint8_t> codes(kRows * kCols);
  std::vector<float> s(kRows * gpr), z(kRows * gpr), q(kRows * kCols);
  gptq_quantize_rows(o.gptq_scheme, *cl.gptq, src.data(), kRows, kCols, codes.data(), s.data(), z.data());
  dequantize_rows(o.gptq_scheme, codes.data(), s.data(), z.data(), kRows, kCols, q.data());
  scale_columns(q.data(), kRows, kCols, cl.input_scale);
  return q;
}

double worst_with_activations(const OutputCheck& c) {
  double worst = 0;
  for (const auto& g : c.groups) worst = std::max(worst, g.at("relative_error_with_activations").get<double>());
  return worst;
}

TEST(Equalization, OutlierChannelIsScaledDownAndW8A8ErrorFalls) {
  Fixture f;
  const auto o_eq = options(8, true), o_plain = options(8, false);
  ASSERT_OK_AND_ASSIGN(CalibratedLayer eq, prepare_calibrated_layer("l", f.w.data(), kRows, kCols, kCols, f.lc, f.groups, o_eq));
  ASSERT_OK_AND_ASSIGN(CalibratedLayer plain,
                       prepare_calibrated_layer("l", f.w.data(), kRows, kCols, kCols, f.lc, f.groups, o_plain));
  ASSERT_TRUE(eq.gptq && plain.gptq);
  ASSERT_EQ(eq.input_scale.size(), kCols);
  EXPECT_TRUE(plain.input_scale.empty() && !plain.column_scale && plain.equalization.is_null());
  EXPECT_TRUE(eq.equalization.at("applied").get<bool>());
  // the outlier column's input is divided most
  for (size_t j = 0; j < kCols; ++j)
    if (j != 3) {
      EXPECT_GT(eq.input_scale[j], eq.input_scale[3]) << j;
    }
  // stored weight = W diag(1 / input_scale): the job scales column j by 1 / input_scale[j]
  ASSERT_TRUE(eq.column_scale);
  ASSERT_EQ(eq.column_scale->size(), kCols);
  for (size_t j = 0; j < kCols; ++j) EXPECT_FLOAT_EQ((*eq.column_scale)[j], 1.0f / eq.input_scale[j]);
  // chosen = least score, and at least kMinGain below none's
  const auto& cands = eq.equalization.at("candidates");
  ASSERT_EQ(cands.size(), 1 + std::size(kAlphas));
  double least = INFINITY;
  for (const auto& c : cands) least = std::min(least, c.at("score").get<double>());
  for (const auto& c : cands)
    if (!c.at("alpha").is_null() && c.at("alpha").get<double>() == eq.equalization.at("alpha").get<double>()) {
      EXPECT_EQ(c.at("score").get<double>(), least);
    }
  EXPECT_LT(least, (1.0 - kMinGain) * cands[0].at("score").get<double>());
  // activation parameters exist per group for the equalized input
  ASSERT_TRUE(eq.activations && plain.activations);
  ASSERT_EQ(eq.activations->groups.size(), 2u);

  const OutputCheck ce = check_layer_output(f.w.data(), effective(f, eq, o_eq).data(), kRows, kCols, eq, f.lc, f.groups);
  const OutputCheck cp =
      check_layer_output(f.w.data(), effective(f, plain, o_plain).data(), kRows, kCols, plain, f.lc, f.groups);
  ASSERT_EQ(ce.groups.size(), 2u);
  EXPECT_LT(worst_with_activations(ce), 0.5 * worst_with_activations(cp))
      << worst_with_activations(ce) << " vs " << worst_with_activations(cp);
}

TEST(Equalization, ConvolutionChannelsSpanTheirKernelPositions) {
  Fixture f(4, 4);  // 8 input channels x 4 kernel positions; channel 1 (columns 4..7) the outlier one
  ASSERT_OK_AND_ASSIGN(CalibratedLayer cl,
                       prepare_calibrated_layer("conv", f.w.data(), kRows, kCols, 8, f.lc, f.groups, options(8, true)));
  ASSERT_EQ(cl.channels, 8u);
  ASSERT_EQ(cl.input_scale.size(), 8u) << cl.equalization.dump();
  ASSERT_TRUE(cl.column_scale);
  for (size_t j = 0; j < kCols; ++j) EXPECT_FLOAT_EQ((*cl.column_scale)[j], 1.0f / cl.input_scale[j / 4]);
  for (size_t c = 0; c < 8; ++c)
    if (c != 1) {
      EXPECT_GT(cl.input_scale[c], cl.input_scale[1]) << c;
    }
}

TEST(Equalization, WeightOnlySearchNeverPicksAWorseScore) {
  Fixture f;
  ASSERT_OK_AND_ASSIGN(CalibratedLayer cl,
                       prepare_calibrated_layer("l", f.w.data(), kRows, kCols, kCols, f.lc, f.groups, options(0, true)));
  const auto& cands = cl.equalization.at("candidates");
  const double none = cands[0].at("score").get<double>();
  for (const auto& c : cands) EXPECT_TRUE(std::isfinite(c.at("score").get<double>()));
  if (cl.input_scale.empty()) {
    for (const auto& c : cands) EXPECT_GE(c.at("score").get<double>(), (1.0 - kMinGain) * none);
  }
  EXPECT_FALSE(cl.activations) << "weight-only: no activation parameters";
}

TEST(TimeGroupWeights, RelativeWeightsFollowTheInverseOutputEnergy) {
  Fixture f;  // bin 1's inputs are twice bin 0's: four times the output energy
  auto o = options(0, false);
  ASSERT_OK_AND_ASSIGN(CalibratedLayer uniform, prepare_calibrated_layer("l", f.w.data(), kRows, kCols, kCols, f.lc, f.groups, o));
  EXPECT_EQ(uniform.group_weights, (std::vector<double>{0.5, 0.5}));
  o.relative_group_weights = true;
  ASSERT_OK_AND_ASSIGN(CalibratedLayer rel, prepare_calibrated_layer("l", f.w.data(), kRows, kCols, kCols, f.lc, f.groups, o));
  ASSERT_EQ(rel.group_weights.size(), 2u);
  EXPECT_NEAR(rel.group_weights[0], 0.8, 0.02);
  EXPECT_NEAR(rel.group_weights[1], 0.2, 0.02);
  EXPECT_NEAR(rel.group_weights[0] + rel.group_weights[1], 1.0, 1e-12);
  // the GPTQ Hessian is sum_g (groups * w_g) H_g / n_g / groups: 0.8 H_0 + 0.2 H_1
  const auto& h = rel.hessians->gptq;
  const double h0 = f.lc.fit[0].hessian[0] / 256.0, h1 = f.lc.fit[1].hessian[0] / 256.0;
  EXPECT_NEAR(h[0], rel.group_weights[0] * h0 + rel.group_weights[1] * h1, 1e-9 * h1);
}

TEST(Equalization, NoHessianMeansDataFreeWithAWarning) {
  Fixture f;
  for (auto& b : f.lc.fit) b.hessian.clear(), b.hessian_reason = "in_features 32 > max_hessian_features 16";
  ASSERT_OK_AND_ASSIGN(CalibratedLayer cl,
                       prepare_calibrated_layer("l", f.w.data(), kRows, kCols, kCols, f.lc, f.groups, options(8, true)));
  EXPECT_FALSE(cl.hessians);
  ASSERT_EQ(cl.warnings.size(), 1u);
  EXPECT_NE(cl.warnings[0].find("max_hessian_features"), std::string::npos);
}

TEST(ActivationHistogram, AddValuesBinsAsTheRecorderDoes) {
  ActivationHistogram h;
  const float x[] = {1.0f, -1.0f, 0.0f, 3.0f, 1e-30f};
  const uint32_t weight[] = {1, 2, 3, 1, 1};
  h.add_values(x, 5, weight);
  EXPECT_EQ(h.pos[(0 - kHistMinExp) * kHistBinsPerOctave], 1u);  // [1, 2^(1/8))
  EXPECT_EQ(h.neg[(0 - kHistMinExp) * kHistBinsPerOctave], 2u);
  EXPECT_EQ(h.zero, 3u);
  EXPECT_EQ(h.pos[0], 1u) << "below 2^-24: the first bin";
  EXPECT_EQ(h.count(), 8u);
  EXPECT_EQ(h.min, -1.0f);
  EXPECT_EQ(h.max, 3.0f);
}

}  // namespace
}  // namespace aq
