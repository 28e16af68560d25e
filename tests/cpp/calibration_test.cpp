// Timestep grouping and per-group Hessians (store/calibration.h), on calibration data built in
// memory. Reading the Parquet file is tested from Python, where the recorder writes it.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "store/calibration.h"

namespace aq {
namespace {

CalibrationBin make_bin(int bin, float absmax, int64_t rows, double h_scale) {
  CalibrationBin b;
  b.bin = bin;
  b.rows = rows;
  b.samples = 1;
  b.absmax = {absmax, absmax};
  b.min = {-absmax, -absmax};
  b.max = {absmax, absmax};
  b.hessian = {h_scale * static_cast<double>(rows), 0.0, 0.0, h_scale * static_cast<double>(rows)};
  return b;
}

CalibrationData make_data(const std::vector<float>& absmax_per_bin) {
  CalibrationData d;
  d.step_lo = 0;
  d.step_hi = 1000;
  d.num_bins = static_cast<int>(absmax_per_bin.size());
  LayerCalibration lc;
  lc.in_features = 2;
  for (size_t i = 0; i < absmax_per_bin.size(); ++i)
    lc.fit.push_back(make_bin(static_cast<int>(i), absmax_per_bin[i], 10, absmax_per_bin[i]));
  d.layers[{"", "layer.weight"}] = lc;
  return d;
}

TEST(TimeGroups, OneGroupPerBinWhenTheyFit) {
  const CalibrationData d = make_data({1, 2, 3, 4});
  const auto g = group_time_bins(d, 10);
  ASSERT_EQ(g.size(), 4u);
  EXPECT_EQ(g[2].bins, std::vector<int>{2});
  EXPECT_DOUBLE_EQ(g[2].step_lo, 500.0);
  EXPECT_DOUBLE_EQ(g[2].step_hi, 750.0);
}

TEST(TimeGroups, MergesTheClosestAdjacentRanges) {
  // bins 0-1 alike, 2 far from both neighbours, 3-4 alike
  const CalibrationData d = make_data({1.0f, 1.05f, 4.0f, 10.0f, 10.2f});
  auto g = group_time_bins(d, 3);
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[0].bins, (std::vector<int>{0, 1}));
  EXPECT_EQ(g[1].bins, std::vector<int>{2});
  EXPECT_EQ(g[2].bins, (std::vector<int>{3, 4}));
  EXPECT_DOUBLE_EQ(g[2].step_lo, 600.0);
  EXPECT_DOUBLE_EQ(g[2].step_hi, 1000.0);
  g = group_time_bins(d, 1);
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(g[0].bins, (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(TimeGroups, GivenGroupsKeepTheBinsWithDataAndCheckCoverage) {
  CalibrationData d = make_data({1.0f, 1.05f, 4.0f, 10.0f, 10.2f});
  d.layers.begin()->second.fit.erase(d.layers.begin()->second.fit.begin() + 1);  // bin 1 has no data
  auto g = given_time_groups(d, {{0, 1}, {2, 3, 4}});
  ASSERT_TRUE(g.ok()) << g.status().message();
  ASSERT_EQ(g->size(), 2u);
  EXPECT_EQ((*g)[0].bins, std::vector<int>{0});
  EXPECT_DOUBLE_EQ((*g)[0].step_lo, 0.0);
  EXPECT_DOUBLE_EQ((*g)[0].step_hi, 200.0);
  EXPECT_EQ((*g)[1].bins, (std::vector<int>{2, 3, 4}));
  EXPECT_DOUBLE_EQ((*g)[1].step_lo, 400.0);
  EXPECT_DOUBLE_EQ((*g)[1].step_hi, 1000.0);
  // a group whose bins hold no data is dropped
  g = given_time_groups(d, {{0}, {1}, {2, 3, 4}});
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->size(), 2u);
  // a bin with data left out, or one beyond num_bins: errors naming the bin
  g = given_time_groups(d, {{0}, {2, 3}});
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("leaves out step bin 4"), std::string::npos) << g.status().message();
  g = given_time_groups(d, {{0, 2, 3, 4, 5}});
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("step bin 5"), std::string::npos) << g.status().message();
}

TEST(TimeGroups, HessiansAreWeightedUniformlyOverGroups) {
  CalibrationData d = make_data({1, 3});
  // group 1 has ten times the rows of group 0: per-group normalisation makes them count alike
  d.layers.begin()->second.fit[1] = make_bin(1, 3.0f, 100, 3.0);
  d.layers.begin()->second.holdout.push_back(make_bin(1, 3.0f, 5, 7.0));
  const auto groups = group_time_bins(d, 2);
  const auto r = layer_hessians(d.layers.begin()->second, groups);
  ASSERT_TRUE(r.ok() && r->has_value());
  const auto& h = *r;
  EXPECT_DOUBLE_EQ(h->gptq[0], (1.0 + 3.0) / 2.0);
  EXPECT_DOUBLE_EQ(h->gptq[1], 0.0);
  ASSERT_EQ(h->check.size(), 2u);
  EXPECT_FALSE(h->check_held_out[0]);  // no held-out rows: the fit data, normalised
  EXPECT_DOUBLE_EQ(h->check[0][0], 1.0);
  EXPECT_TRUE(h->check_held_out[1]);
  EXPECT_DOUBLE_EQ(h->check[1][3], 7.0);
  // one group: pooled over rows
  const auto pooled = layer_hessians(d.layers.begin()->second, group_time_bins(d, 1));
  ASSERT_TRUE(pooled.ok() && pooled->has_value());
  EXPECT_DOUBLE_EQ((*pooled)->gptq[0], (1.0 * 10 + 3.0 * 100) / 110.0);
  EXPECT_FALSE((*pooled)->pooled);
}

TEST(TimeGroups, MissingHessianMeansNoGptq) {
  CalibrationData d = make_data({1, 2});
  d.layers.begin()->second.fit[0].hessian.clear();
  const auto r = layer_hessians(d.layers.begin()->second, group_time_bins(d, 2));
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
}

// Hessians over spans of two bins (recorded with hessian_bins = num_bins / 2): the span's first bin
// with data holds it; GPTQ's is the mean over spans of H_s / rows_s; groups are checked on their
// input samples, held-out ones first.
TEST(TimeGroups, PooledHessiansAndSampleChecks) {
  CalibrationData d = make_data({1, 1, 3, 3});
  LayerCalibration& lc = d.layers.begin()->second;
  for (auto& b : lc.fit) {
    b.hessian_span = 2;
    b.inputs = {static_cast<float>(b.bin + 1), 0.0f};
    b.input_rows = 1;
  }
  lc.fit[0].hessian = {20.0, 0.0, 0.0, 20.0};  // bins 0-1: 20 rows, H / rows = 1
  lc.fit[0].hessian_rows = 20;
  lc.fit[1].hessian.clear();
  lc.fit[2].hessian = {120.0, 0.0, 0.0, 60.0};  // bins 2-3: 20 rows, H / rows = diag(6, 3)
  lc.fit[2].hessian_rows = 20;
  lc.fit[3].hessian.clear();
  CalibrationBin hold = make_bin(3, 3.0f, 5, 7.0);
  hold.hessian.clear();
  hold.inputs = {0.0f, 2.0f, 0.0f, 4.0f};
  hold.input_rows = 2;
  lc.holdout.push_back(hold);
  const std::vector<TimeGroup> groups = group_time_bins(d, 2);  // {0, 1}, {2, 3}
  ASSERT_EQ(groups.size(), 2u);
  const auto r = layer_hessians(lc, groups);
  ASSERT_TRUE(r.ok() && r->has_value());
  const LayerHessians& h = **r;
  EXPECT_TRUE(h.pooled);
  EXPECT_DOUBLE_EQ(h.gptq[0], (1.0 + 6.0) / 2.0);
  EXPECT_DOUBLE_EQ(h.gptq[3], (1.0 + 3.0) / 2.0);
  EXPECT_EQ(h.rows, (std::vector<int64_t>{20, 20}));
  // group 0: no held-out data, its fit samples (bins 0 and 1); group 1: the held-out samples
  EXPECT_FALSE(h.check_held_out[0]);
  EXPECT_TRUE(h.check[0].empty());
  EXPECT_EQ(h.check_x_rows[0], 2u);
  EXPECT_EQ(h.check_x[0], (std::vector<float>{1, 0, 2, 0}));
  EXPECT_TRUE(h.check_held_out[1]);
  EXPECT_EQ(h.check_x_rows[1], 2u);
  EXPECT_EQ(h.check_x[1], (std::vector<float>{0, 2, 0, 4}));
  // the error on samples is the error under their Hessian X^T X
  const std::vector<float> w = {1.0f, 2.0f, -1.0f, 0.5f}, q = {1.1f, 1.9f, -1.0f, 0.4f};
  const OutputError e = group_output_error(h, 1, w.data(), q.data(), 2, 2);
  const std::vector<double> xtx = {0.0, 0.0, 0.0, 4.0 + 16.0};
  const OutputError ref = output_error(w.data(), q.data(), 2, 2, xtx.data());
  EXPECT_NEAR(e.rel_error, ref.rel_error, 1e-12);
  EXPECT_NEAR(e.cosine, ref.cosine, 1e-12);
  // without fit samples, a group with no held-out data is checked on GPTQ's Hessian
  for (auto& b : lc.fit) b.inputs.clear(), b.input_rows = 0;
  const auto r2 = layer_hessians(lc, groups);
  ASSERT_TRUE(r2.ok() && r2->has_value());
  EXPECT_TRUE((*r2)->uses_gptq(0));
  EXPECT_FALSE((*r2)->uses_gptq(1));
  const OutputError on_gptq = group_output_error(**r2, 0, w.data(), q.data(), 2, 2);
  const OutputError ref_gptq = output_error(w.data(), q.data(), 2, 2, (*r2)->gptq.data());
  EXPECT_DOUBLE_EQ(on_gptq.rel_error, ref_gptq.rel_error);
  // a span without its Hessian: those bins are not covered, no GPTQ
  lc.fit[2].hessian.clear();
  EXPECT_FALSE(lc.has_hessians());
  const auto none = layer_hessians(lc, groups);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

}  // namespace
}  // namespace aq
