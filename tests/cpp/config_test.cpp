// EngineConfig::FromJson (engine/config.h): every field checked, every refusal naming its field.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/config.h"
#include "test_util.h"

namespace aq {
namespace {

using testing::json;

// Expects FromJson(j) to fail with InvalidConfig naming `field`.
void expect_rejected(const json& j, const std::string& field) {
  auto c = EngineConfig::FromJson(j);
  ASSERT_FALSE(c.ok()) << j.dump() << " was accepted";
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidConfig) << c.status().ToString();
  EXPECT_CONTAINS(c.status().message(), field);
}

TEST(EngineConfig, empty_object_gives_the_documented_defaults) {
  ASSERT_OK_AND_ASSIGN(EngineConfig c, EngineConfig::FromJson(json::object()));
  EXPECT_EQ(c.bit_width, 4);
  EXPECT_EQ(c.group_size, 128);
  EXPECT_FALSE(c.symmetric);
  EXPECT_EQ(c.scale_method, ScaleMethod::kSearch);
  EXPECT_DOUBLE_EQ(c.min_accuracy, 0.85);
  EXPECT_TRUE(c.enable_fallback);
  EXPECT_FALSE(c.fail_fast);
  EXPECT_FALSE(c.keep_nonfinite);
  EXPECT_FALSE(c.overwrite);
  EXPECT_EQ(c.sensitive_bit_width, 8);
  EXPECT_EQ(c.min_tensor_size, 1024u);
  EXPECT_EQ(c.sensitive_patterns.size(), default_sensitive_patterns().size());
  const QuantScheme s = c.scheme(3);
  EXPECT_EQ(s.bits, 3);
  EXPECT_EQ(s.group_size, 128);
  EXPECT_EQ(s.scale_type, ScaleType::kF16);
}

TEST(EngineConfig, reads_every_field) {
  const json j = {{"bit_width", 2}, {"group_size", 0}, {"symmetric", true}, {"scale_method", "minmax"},
                  {"min_accuracy", 0.5}, {"enable_fallback", false}, {"fail_fast", true}, {"num_threads", 3},
                  {"components", json::array({"unet", "vae"})}, {"skip_patterns", json::array({"norm"})},
                  {"bit_overrides", json::array({json::array({"attn", 8}), json::array({"ff", 16})})},
                  {"sensitive_patterns", json::array()}, {"sensitive_bit_width", 16}, {"min_tensor_size", 0},
                  {"nonfinite", "keep"}, {"overwrite", true}, {"modality", "audio"}, {"enable_time_aware", false},
                  {"enable_spatial", false}, {"num_time_groups", 4}, {"calibration_samples", 16},
                  {"deployment_profile", "edge"}, {"time_groups", json::array({json::array({0, 1}), json::array({3})})}};
  ASSERT_OK_AND_ASSIGN(EngineConfig c, EngineConfig::FromJson(j));
  EXPECT_EQ(c.bit_width, 2);
  EXPECT_EQ(c.group_size, 0);
  EXPECT_TRUE(c.symmetric);
  EXPECT_EQ(c.scale_method, ScaleMethod::kMinMax);
  EXPECT_DOUBLE_EQ(c.min_accuracy, 0.5);
  EXPECT_FALSE(c.enable_fallback);
  EXPECT_TRUE(c.fail_fast);
  EXPECT_EQ(c.num_threads, 3);
  EXPECT_EQ(c.components, (std::vector<std::string>{"unet", "vae"}));
  ASSERT_EQ(c.skip_patterns.size(), 1u);
  EXPECT_TRUE(c.skip_patterns[0].matches("mid.norm1.weight"));
  ASSERT_EQ(c.bit_overrides.size(), 2u);
  EXPECT_EQ(c.bit_overrides[0].first.text, "attn");
  EXPECT_EQ(c.bit_overrides[0].second, 8);
  EXPECT_EQ(c.bit_overrides[1].second, 16);
  EXPECT_TRUE(c.sensitive_patterns.empty());
  EXPECT_EQ(c.sensitive_bit_width, 16);
  EXPECT_EQ(c.min_tensor_size, 0u);
  EXPECT_TRUE(c.keep_nonfinite);
  EXPECT_TRUE(c.overwrite);
  EXPECT_EQ(c.modality, "audio");
  EXPECT_EQ(c.num_time_groups, 4);
  EXPECT_EQ(c.time_groups, (std::vector<std::vector<int>>{{0, 1}, {3}}));
  EXPECT_EQ(c.calibration_samples, 16);
  EXPECT_EQ(c.deployment_profile, "edge");
  // the recorded form reads back to itself
  ASSERT_OK_AND_ASSIGN(EngineConfig again, EngineConfig::FromJson(c.as_json));
  EXPECT_EQ(again.as_json, c.as_json);
  EXPECT_EQ(c.as_json["bit_overrides"], j["bit_overrides"]);
}

TEST(EngineConfig, null_values_mean_the_default) {
  ASSERT_OK_AND_ASSIGN(EngineConfig c, EngineConfig::FromJson({{"bit_width", nullptr}, {"modality", nullptr}}));
  EXPECT_EQ(c.bit_width, 4);
  EXPECT_EQ(c.modality, "");
}

TEST(EngineConfig, rejects_unknown_fields_by_name) {
  expect_rejected({{"bitwidth", 4}}, "bitwidth");
  expect_rejected({{"bit_width", 4}, {"calibration_dataset", "x"}}, "calibration_dataset");
  expect_rejected(json::array({1, 2}), "JSON object");
}

TEST(EngineConfig, rejects_bad_bit_widths) {
  for (const json& b : {json(7), json(1), json(0), json(16), json(-4), json("4"), json(4.5), json(true)})
    expect_rejected({{"bit_width", b}}, "bit_width");
  for (const json& b : {json(7), json(1), json("8")}) expect_rejected({{"sensitive_bit_width", b}}, "sensitive_bit_width");
  expect_rejected({{"bit_overrides", json::array({json::array({"attn", 7})})}}, "bit_overrides");
  expect_rejected({{"bit_overrides", json::array({json::array({"attn", "8"})})}}, "bit_overrides");
  expect_rejected({{"bit_overrides", {{"attn", 8}}}}, "bit_overrides");  // an object loses order
}

TEST(EngineConfig, rejects_integers_too_large_for_the_field_instead_of_wrapping_them) {
  // 2^32 + 4 would read as 4 if narrowed to int; 2^32 + 128 as 128; 2^32 + 1 as 1.
  expect_rejected({{"bit_width", uint64_t{4294967300}}}, "bit_width");
  expect_rejected({{"group_size", uint64_t{4294967424}}}, "group_size");
  expect_rejected({{"num_threads", uint64_t{4294967297}}}, "num_threads");
  expect_rejected({{"sensitive_bit_width", int64_t{-4294967288}}}, "sensitive_bit_width");
}

TEST(EngineConfig, rejects_bad_group_sizes) {
  for (const json& g : {json(48), json(-1), json(512), json(1), json(16), json("128")})
    expect_rejected({{"group_size", g}}, "group_size");
  for (int g : {0, 32, 64, 128, 256}) EXPECT_TRUE(EngineConfig::FromJson({{"group_size", g}}).ok()) << g;
}

TEST(EngineConfig, rejects_min_accuracy_outside_zero_to_one) {
  for (const json& a : {json(-0.01), json(1.5), json(2), json("0.9")}) expect_rejected({{"min_accuracy", a}}, "min_accuracy");
  for (double a : {0.0, 1.0, 0.999}) EXPECT_TRUE(EngineConfig::FromJson({{"min_accuracy", a}}).ok()) << a;
}

TEST(EngineConfig, rejects_invalid_regular_expressions_naming_the_field) {
  expect_rejected({{"skip_patterns", json::array({"("})}}, "skip_patterns");
  expect_rejected({{"skip_patterns", json::array({"ok", "[a-"})}}, "[a-");
  expect_rejected({{"bit_overrides", json::array({json::array({"*x", 8})})}}, "bit_overrides");
  expect_rejected({{"sensitive_patterns", json::array({"a{2,1}"})}}, "sensitive_patterns");
  expect_rejected({{"skip_patterns", "attn"}}, "skip_patterns");  // not a list
  expect_rejected({{"skip_patterns", json::array({3})}}, "skip_patterns");
}

TEST(EngineConfig, rejects_other_out_of_range_values_naming_the_field) {
  expect_rejected({{"num_threads", -1}}, "num_threads");
  expect_rejected({{"num_threads", 100000}}, "num_threads");
  expect_rejected({{"min_tensor_size", -5}}, "min_tensor_size");
  expect_rejected({{"nonfinite", "ignore"}}, "nonfinite");
  expect_rejected({{"modality", "video"}}, "modality");
  expect_rejected({{"scale_method", "mse"}}, "scale_method");
  expect_rejected({{"symmetric", 1}}, "symmetric");
  expect_rejected({{"num_time_groups", 0}}, "num_time_groups");
  expect_rejected({{"time_groups", json::array({json::array({1, 0})})}}, "time_groups");       // not ascending
  expect_rejected({{"time_groups", json::array({json::array({0, 1}), json::array({1})})}}, "time_groups");  // overlap
  expect_rejected({{"time_groups", json::array({json::array()})}}, "time_groups");
  expect_rejected({{"time_groups", json::array()}}, "time_groups");
  expect_rejected({{"time_groups", 3}}, "time_groups");
  expect_rejected({{"calibration_samples", 0}}, "calibration_samples");
  expect_rejected({{"components", "unet"}}, "components");
  expect_rejected({{"overwrite", "yes"}}, "overwrite");
}

}  // namespace
}  // namespace aq
