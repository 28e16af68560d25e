// In-memory arrays (engine/array_quantizer.h) get the engine's own decision: the same policy,
// float32-scale retry and accuracy fallback, so quantize_array equals what quantize_model stores.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/array_quantizer.h"
#include "engine/engine.h"
#include "store/parquet_source.h"
#include "test_util.h"

namespace aq {
namespace {

namespace fs = std::filesystem;
using testing::json;

EngineConfig config(json j = json::object()) {
  auto c = EngineConfig::FromJson(j);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : EngineConfig{};
}

TEST(ArrayQuantizer, equals_what_quantize_model_stores_for_the_same_tensor) {
  testing::TempDir dir;
  struct T {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> w;
  };
  const std::vector<T> tensors = {
      {"blocks.0.attn.to_q.weight", {64, 96}, testing::student_t4(64 * 96, 1, 0.02f)},
      {"conv_in.weight", {32, 4, 3, 3}, testing::gaussian(32 * 36, 2, 0.1f)},  // sensitive: 8 bits
      {"tiny.weight", {4, 4}, testing::gaussian(16, 3)},                        // kept: small
      {"lowres.weight", {48, 64}, testing::gaussian(48 * 64, 4, 1e-7f)},      // float32 scales
  };
  std::vector<testing::StEntry> entries;
  for (const auto& t : tensors) entries.push_back(testing::f32_entry(t.name, t.shape, t.w));
  testing::write_safetensors(dir / "m.safetensors", entries);
  for (const json& j : {json{{"bit_width", 4}}, json{{"bit_width", 2}, {"min_accuracy", 0.99}, {"symmetric", true}}}) {
    const EngineConfig cfg = config(j);
    const std::string out = (dir / ("out" + std::to_string(cfg.bit_width))).string();
    ASSERT_OK(quantize_model((dir / "m.safetensors").string(), out, cfg, RunHooks{}).status());
    ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / "weights.parquet").string()));
    ThreadPool pool(2);
    for (const auto& t : tensors) {
      const std::string what = j.dump() + " " + t.name;
      ASSERT_OK_AND_ASSIGN(ArrayOutcome a, quantize_array(cfg, t.name, DType::kF32, t.shape, t.w.data(), &pool));
      const StoredTensorInfo& info = src->tensors()[*src->find(t.name)];
      EXPECT_EQ(a.encoded.has_value(), info.quantized) << what;
      EXPECT_EQ(a.rejected_bits, info.rejected_bits) << what;
      EXPECT_EQ(a.reason, info.reason) << what;
      if (!a.encoded || !info.quantized) continue;
      EXPECT_EQ(a.encoded->scheme, info.scheme) << what;
      ASSERT_OK_AND_ASSIGN(LoadedTensor stored, src->read(*src->find(t.name)));
      EXPECT_TRUE(std::equal(a.encoded->codes.begin(), a.encoded->codes.end(), stored.payload.codes.begin(),
                             stored.payload.codes.end()))
          << what;
      EXPECT_TRUE(std::equal(a.encoded->scales.begin(), a.encoded->scales.end(), stored.payload.scales.begin(),
                             stored.payload.scales.end()))
          << what;
      EXPECT_EQ(a.encoded->stats.cosine(), info.cosine) << what;
    }
  }
}

TEST(ArrayQuantizer, keeps_vectors_and_non_finite_arrays_when_asked) {
  const std::vector<float> v = testing::gaussian(4096, 5);
  ASSERT_OK_AND_ASSIGN(ArrayOutcome bias, quantize_array(config(), "bias", DType::kF32, {4096}, v.data(), nullptr));
  EXPECT_FALSE(bias.encoded.has_value());
  EXPECT_CONTAINS(bias.reason, "1-D");

  std::vector<float> w = testing::gaussian(64 * 64, 6);
  w[100] = NAN;
  auto err = quantize_array(config(), "lora.up.weight", DType::kF32, {64, 64}, w.data(), nullptr);
  EXPECT_EQ(err.status().code(), StatusCode::kNonFinite);
  EXPECT_CONTAINS(err.status().message(), "lora.up.weight");
  ASSERT_OK_AND_ASSIGN(ArrayOutcome kept,
                       quantize_array(config({{"nonfinite", "keep"}}), "lora.up.weight", DType::kF32, {64, 64},
                                      w.data(), nullptr));
  EXPECT_FALSE(kept.encoded.has_value());
  EXPECT_CONTAINS(kept.reason, "non-finite");
}

TEST(FallbackStep, accepts_retries_on_the_next_rung_or_keeps) {
  const EngineConfig c = config({{"min_accuracy", 0.9}});
  EXPECT_TRUE(fallback_step(c, 2, 0.95).accept);
  EXPECT_TRUE(fallback_step(c, 2, 0.9).accept) << "min_accuracy itself is enough";
  const FallbackStep retry = fallback_step(c, 2, 0.5);
  EXPECT_FALSE(retry.accept);
  EXPECT_EQ(retry.retry_bits, 3);
  EXPECT_EQ(fallback_step(c, 4, 0.5).retry_bits, 8);
  const FallbackStep keep = fallback_step(c, 8, 0.5);
  EXPECT_FALSE(keep.accept);
  EXPECT_FALSE(keep.retry_bits.has_value());
  EXPECT_CONTAINS(keep.keep_reason, "min_accuracy");
  EXPECT_TRUE(fallback_step(config({{"min_accuracy", 0.9}, {"enable_fallback", false}}), 2, 0.1).accept);
}

}  // namespace
}  // namespace aq
