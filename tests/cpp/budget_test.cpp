// The model-level bit budget's allocation (engine/budget.h).
#include <gtest/gtest.h>

#include "engine/budget.h"

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

}  // namespace
}  // namespace aq
