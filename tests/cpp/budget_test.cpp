// The model-level bit budget's allocation (engine/budget.h).
#include <gtest/gtest.h>

#include "engine/budget.h"

#include <random>

#include "quant/ggml_codec.h"

namespace aq {
namespace {

BudgetLayer layer(const char* name, uint64_t weights, std::vector<double> error, double prior = 1.0) {
  BudgetLayer l;
  l.name = name;
  l.weights = weights;
  l.prior = prior;
  l.types = {GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K, GgmlType::kQ8_0};
  l.error = std::move(error);
  return l;
}

double bpw(const std::vector<BudgetLayer>& ls, const std::vector<int>& pick) {
  double bits = 0, n = 0;
  for (size_t i = 0; i < ls.size(); ++i) {
    bits += ggml_bits_per_weight(ls[i].types[static_cast<size_t>(pick[i])]) * static_cast<double>(ls[i].weights);
    n += static_cast<double>(ls[i].weights);
  }
  return bits / n;
}

const std::vector<double> kGauss = {0.069, 0.020, 0.0049, 0.0012, 0.00029, 0.000024};

TEST(Budget, stays_within_the_budget_and_uses_it) {
  std::vector<BudgetLayer> ls;
  for (int i = 0; i < 10; ++i) ls.push_back(layer("l", 1000 + 100 * static_cast<uint64_t>(i), kGauss));
  for (double target : {2.625, 3.0, 4.0, 4.8, 6.0, 8.5}) {
    const auto pick = allocate_budget(ls, target);
    EXPECT_LE(bpw(ls, pick), target + 1e-12) << target;
    EXPECT_GE(bpw(ls, pick), target - 1.0) << target;
  }
}

TEST(Budget, gives_the_bits_to_the_layer_whose_error_they_cut_most) {
  std::vector<double> sensitive = kGauss;
  for (double& e : sensitive) e *= 10;  // ten times the error at every type
  std::vector<BudgetLayer> ls = {layer("plain", 1000, kGauss), layer("hard", 1000, sensitive),
                                 layer("prior", 1000, kGauss, kSensitivePrior)};
  const auto pick = allocate_budget(ls, 3.2);
  EXPECT_GT(pick[1], pick[0]);
  EXPECT_GT(pick[2], pick[0]);
}

TEST(Budget, small_layers_are_cheap_to_protect) {
  std::vector<BudgetLayer> ls = {layer("big", 100000, kGauss), layer("small", 1000, kGauss)};
  const auto pick = allocate_budget(ls, 2.7);
  EXPECT_EQ(pick[0], 0);
  EXPECT_EQ(pick[1], 5);  // Q8_0 for the small one costs 0.06 bits per weight of the model
}

TEST(Budget, a_fixed_layer_keeps_its_type_and_counts_against_the_budget) {
  std::vector<BudgetLayer> ls = {layer("a", 1000, kGauss), layer("b", 1000, kGauss)};
  ls[0].fixed = 5;
  const auto pick = allocate_budget(ls, 5.6);
  EXPECT_EQ(pick[0], 5);
  EXPECT_LE(bpw(ls, pick), 5.6);
  EXPECT_EQ(pick[1], 0);  // 8.5 + 3.4375 over two layers is 5.97: no room for Q3_K
}

TEST(Budget, a_budget_under_the_cheapest_choice_gives_the_cheapest_choice) {
  std::vector<BudgetLayer> ls = {layer("a", 1000, kGauss)};
  EXPECT_EQ(allocate_budget(ls, 1.0), std::vector<int>{0});
}

// A 64 x 512 float32 weight with Laplace-like values and its RowSource.
struct Weight {
  std::vector<float> w;
  RowSource src;
  Weight() : w(64 * 512) {
    std::mt19937 rng(5);
    std::exponential_distribution<float> e(50.f);
    std::bernoulli_distribution sign(0.5);
    for (float& v : w) v = sign(rng) ? e(rng) : -e(rng);
    src.data = reinterpret_cast<const uint8_t*>(w.data());
    src.rows = 64;
    src.cols = 512;
    src.name = "w";
  }
};

BudgetLayer candidates() {
  BudgetLayer l;
  l.types = {GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ4_K, GgmlType::kQ6_K, GgmlType::kQ8_0};
  return l;
}

TEST(BudgetMeasure, errors_fall_with_bits_and_a_hessian_counts_only_up_to_scale) {
  Weight x;
  BudgetLayer plain = candidates(), one = candidates(), three = candidates();
  ASSERT_TRUE(measure_budget_layer(x.src, nullptr, &plain).ok());
  std::vector<double> h(512 * 512, 0.0);
  for (size_t j = 0; j < 512; ++j) h[j * 512 + j] = 1.0;
  ASSERT_TRUE(measure_budget_layer(x.src, nullptr, &one, &h).ok());
  for (double& v : h) v *= 3.0;
  ASSERT_TRUE(measure_budget_layer(x.src, nullptr, &three, &h).ok());
  for (size_t k = 0; k < plain.types.size(); ++k) {
    EXPECT_NEAR(three.error[k], one.error[k], 1e-12 * one.error[k]) << k;
    // H = I: the weight error of rows encoded with unit importance, close to the plain encoding's
    EXPECT_NEAR(one.error[k], plain.error[k], 0.1 * plain.error[k]) << k;
    if (k) {
      EXPECT_LT(plain.error[k], plain.error[k - 1]) << k;  // more bits, less error
      EXPECT_LT(one.error[k], one.error[k - 1]) << k;
    }
  }
}

TEST(BudgetMeasure, the_output_error_counts_the_columns_the_inputs_reach) {
  // Inputs reach only the first 256 columns: the output error is that of those columns alone, and
  // their rows are encoded for them (the importance follows diag(H)).
  Weight x;
  BudgetLayer cal = candidates();
  std::vector<double> h(512 * 512, 0.0);
  for (size_t j = 0; j < 256; ++j) h[j * 512 + j] = 1.0;
  ASSERT_TRUE(measure_budget_layer(x.src, nullptr, &cal, &h).ok());
  const std::vector<float> imp = hessian_importance(h, HessianLayout{512, 0});
  EXPECT_FLOAT_EQ(imp[0], 2.0f);        // diag over its mean (0.5)
  EXPECT_FLOAT_EQ(imp[300], 1e-4f);     // the floor: 1e-4 of the mean, over the mean
  for (size_t k = 0; k < cal.types.size(); ++k) {
    const GgmlType t = cal.types[k];
    std::vector<uint8_t> bytes(ggml_row_bytes(t, 512));
    std::vector<float> y(512);
    GgmlEncodeOptions o;
    o.starts = 1;
    o.rounds = 1;
    o.importance = imp.data();
    double e = 0, energy = 0;
    for (uint64_t i = 0; i < 32; ++i) {  // the 32 sampled rows: stride 2
      const float* r = x.w.data() + (2 * i) * 512;
      ggml_encode_row(t, r, 512, bytes.data(), o);
      ggml_decode(t, bytes.data(), 512 / static_cast<uint64_t>(ggml_traits(t).block), y.data());
      for (size_t j = 0; j < 256; ++j) {
        e += (static_cast<double>(r[j]) - y[j]) * (static_cast<double>(r[j]) - y[j]);
        energy += static_cast<double>(r[j]) * r[j];
      }
    }
    EXPECT_NEAR(cal.error[k], e / energy, 1e-9 * e / energy) << k;
  }
}

TEST(BudgetMeasure, a_hessian_of_the_wrong_size_is_an_error) {
  Weight x;
  BudgetLayer cal = candidates();
  std::vector<double> h(100, 1.0);
  const Status st = measure_budget_layer(x.src, nullptr, &cal, &h);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("'w'"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace aq
