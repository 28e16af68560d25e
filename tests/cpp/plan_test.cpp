// Layer policy (engine/plan.h): which tensors are kept, and at how many bits the rest are coded.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/plan.h"
#include "test_util.h"

namespace aq {
namespace {

using testing::json;

EngineConfig config(const json& j = json::object()) {
  auto c = EngineConfig::FromJson(j);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : EngineConfig{};
}

TensorInfo tensor(const std::string& name, std::vector<int64_t> shape, DType dt = DType::kF32) {
  TensorInfo t;
  t.name = name;
  t.dtype = dt;
  t.shape = std::move(shape);
  t.numel = shape_numel(t.shape).value();
  t.nbytes = t.numel * dtype_size(dt);
  return t;
}

TEST(Plan, quantizes_an_ordinary_matrix_at_bit_width) {
  const TensorPlan p = plan_tensor(config(), tensor("down_blocks.0.resnets.0.conv1.weight", {64, 32, 3, 3}));
  EXPECT_TRUE(p.quantize);
  EXPECT_EQ(p.bits, 4);
  EXPECT_EQ(plan_tensor(config({{"bit_width", 3}}), tensor("blocks.0.attn.qkv.weight", {96, 32})).bits, 3);
}

TEST(Plan, keeps_one_dimensional_tensors_and_scalars) {
  const TensorPlan p = plan_tensor(config(), tensor("mid_block.resnets.0.norm1.weight", {4096}));
  EXPECT_FALSE(p.quantize);
  EXPECT_CONTAINS(p.reason, "1-D");
  EXPECT_FALSE(plan_tensor(config(), tensor("logit_scale", {})).quantize);
  // min_tensor_size 0 does not make a vector quantizable
  EXPECT_FALSE(plan_tensor(config({{"min_tensor_size", 0}}), tensor("bias", {100000})).quantize);
}

TEST(Plan, keeps_tensors_under_min_tensor_size) {
  const TensorPlan small = plan_tensor(config(), tensor("blocks.0.w", {32, 31}));  // 992 < 1024
  EXPECT_FALSE(small.quantize);
  EXPECT_CONTAINS(small.reason, "min_tensor_size");
  EXPECT_TRUE(plan_tensor(config(), tensor("blocks.0.w", {32, 32})).quantize) << "1024 is not under 1024";
  EXPECT_FALSE(plan_tensor(config({{"min_tensor_size", 5000}}), tensor("blocks.0.w", {64, 64})).quantize);
  EXPECT_TRUE(plan_tensor(config({{"min_tensor_size", 0}}), tensor("blocks.0.w", {2, 2})).quantize);
}

TEST(Plan, keeps_integer_and_bool_tensors) {
  for (DType dt : {DType::kI64, DType::kI32, DType::kU8, DType::kBool, DType::kI8}) {
    const TensorPlan p = plan_tensor(config(), tensor("position_ids", {512, 512}, dt));
    EXPECT_FALSE(p.quantize) << dtype_name(dt);
    EXPECT_CONTAINS(p.reason, std::string(dtype_name(dt)));
  }
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF64, DType::kF8_E4M3, DType::kF8_E5M2})
    EXPECT_TRUE(plan_tensor(config(), tensor("blocks.0.w", {64, 64}, dt)).quantize) << dtype_name(dt);
}

TEST(Plan, keeps_tensors_matching_a_skip_pattern) {
  const EngineConfig c = config({{"skip_patterns", json::array({"attn2\\.", "^final"})}});
  const TensorPlan p = plan_tensor(c, tensor("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight", {320, 320}));
  EXPECT_FALSE(p.quantize);
  EXPECT_CONTAINS(p.reason, "attn2");
  EXPECT_FALSE(plan_tensor(c, tensor("final.weight", {64, 64})).quantize);
  EXPECT_TRUE(plan_tensor(c, tensor("not_final.weight", {64, 64})).quantize) << "^ anchors at the name's start";
  EXPECT_TRUE(plan_tensor(c, tensor("attn1.to_q.weight", {64, 64})).quantize);
}

TEST(Plan, first_matching_bit_override_sets_the_bits_and_sixteen_keeps) {
  const EngineConfig c = config({{"bit_overrides", json::array({json::array({"to_q", 8}), json::array({"attn", 2}),
                                                                json::array({"ff\\.net", 16})})}});
  const TensorPlan q = plan_tensor(c, tensor("blocks.0.attn.to_q.weight", {64, 64}));
  EXPECT_TRUE(q.quantize);
  EXPECT_EQ(q.bits, 8);
  EXPECT_CONTAINS(q.reason, "to_q");
  EXPECT_EQ(plan_tensor(c, tensor("blocks.0.attn.to_k.weight", {64, 64})).bits, 2);
  const TensorPlan kept = plan_tensor(c, tensor("blocks.0.ff.net.0.proj.weight", {64, 64}));
  EXPECT_FALSE(kept.quantize);
  EXPECT_CONTAINS(kept.reason, "16");
  // an override outranks the sensitive defaults, in both directions
  const EngineConfig low = config({{"bit_overrides", json::array({json::array({"conv_in", 3})})}});
  EXPECT_EQ(plan_tensor(low, tensor("conv_in.weight", {64, 4, 3, 3})).bits, 3);
  // but never a kept 1-D tensor
  EXPECT_FALSE(plan_tensor(c, tensor("blocks.0.attn.to_q.bias", {64})).quantize);
}

TEST(Plan, default_sensitive_patterns_raise_top_level_and_conditioning_layers_to_8_bits) {
  const EngineConfig c = config();
  for (const char* name : {"time_embedding.linear_1.weight", "conv_in.weight", "proj_out.weight", "conv_out.weight",
                           "down_blocks.0.resnets.0.time_emb_proj.weight", "transformer_blocks.0.norm1.linear.weight",
                           "x_embedder.proj.weight", "lm_head.weight", "model.embed_tokens.weight",
                           "blocks.3.adaLN_modulation.1.weight"}) {
    const TensorPlan p = plan_tensor(c, tensor(name, {64, 64}));
    EXPECT_TRUE(p.quantize) << name;
    EXPECT_EQ(p.bits, 8) << name;
    EXPECT_CONTAINS(p.reason, "sensitive");
  }
  for (const char* name : {"down_blocks.0.attentions.0.proj_out.weight", "up_blocks.1.resnets.0.conv_out.weight",
                           "down_blocks.1.resnets.0.conv1.weight", "blocks.0.attn.proj.weight"})
    EXPECT_EQ(plan_tensor(c, tensor(name, {64, 64})).bits, 4) << name << " is not a sensitive layer";
}

TEST(Plan, sensitive_layers_never_get_fewer_bits_than_bit_width_and_sixteen_keeps_them) {
  EXPECT_EQ(plan_tensor(config({{"bit_width", 8}, {"sensitive_bit_width", 4}}), tensor("conv_in.weight", {64, 64})).bits, 8);
  EXPECT_EQ(plan_tensor(config({{"bit_width", 2}, {"sensitive_bit_width", 4}}), tensor("conv_in.weight", {64, 64})).bits, 4);
  EXPECT_FALSE(plan_tensor(config({{"sensitive_bit_width", 16}}), tensor("conv_in.weight", {64, 64})).quantize);
  // replacing the patterns replaces the defaults
  const EngineConfig custom = config({{"sensitive_patterns", json::array({"attn"})}});
  EXPECT_EQ(plan_tensor(custom, tensor("conv_in.weight", {64, 64})).bits, 4);
  EXPECT_EQ(plan_tensor(custom, tensor("attn.to_q.weight", {64, 64})).bits, 8);
}

TEST(Plan, fallback_ladder_climbs_two_three_four_eight_then_keeps) {
  EXPECT_EQ(next_fallback_bits(2), 3);
  EXPECT_EQ(next_fallback_bits(3), 4);
  EXPECT_EQ(next_fallback_bits(4), 8);
  EXPECT_FALSE(next_fallback_bits(8).has_value());
}

}  // namespace
}  // namespace aq
