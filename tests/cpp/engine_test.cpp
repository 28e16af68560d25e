// The engine end to end (engine/engine.h): small generated models in every layout are quantized
// into complete output directories, validated from the files, and every failure leaves nothing
// behind.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/output_dir.h"
#include "engine/plan.h"
#include "store/manifest.h"
#include "store/parquet_source.h"
#include "store/tensor_journal.h"
#include "test_util.h"

namespace aq {
namespace {

namespace fs = std::filesystem;
using testing::json;
using testing::StEntry;

// A small UNet-like set of tensors in several dtypes: quantized, sensitive, kept for shape,
// size and dtype.
std::vector<StEntry> unet_tensors(uint32_t seed = 1) {
  std::vector<StEntry> t;
  t.push_back(testing::f32_entry("conv_in.weight", {32, 4, 3, 3}, testing::gaussian(32 * 36, seed, 0.1f)));
  t.push_back(testing::f32_entry("down_blocks.0.resnets.0.conv1.weight", {64, 32, 3, 3},
                                 testing::student_t4(64 * 288, seed + 1, 0.02f)));
  t.push_back({"down_blocks.0.attentions.0.proj_in.weight", "BF16", {96, 64},
               testing::bf16_bytes(testing::gaussian(96 * 64, seed + 2, 0.05f))});
  t.push_back({"down_blocks.0.attentions.0.proj_out.weight", "F16", {64, 96},
               testing::f16_bytes(testing::gaussian(64 * 96, seed + 3, 0.05f))});
  t.push_back(testing::f32_entry("time_embedding.linear_1.weight", {128, 32}, testing::gaussian(128 * 32, seed + 4)));
  t.push_back(testing::f32_entry("down_blocks.0.resnets.0.norm1.weight", {64}, testing::gaussian(64, seed + 5)));
  t.push_back(testing::f32_entry("tiny.weight", {8, 8}, testing::gaussian(64, seed + 6)));
  std::vector<uint8_t> ids;
  for (int64_t i = 0; i < 77; ++i) testing::append_le(ids, i);
  t.push_back({"position_ids", "I64", {1, 77}, ids});
  return t;
}

enum class Layout { kSingleFile, kHfDir, kSharded, kPipeline };
const char* layout_label(Layout l) {
  switch (l) {
    case Layout::kSingleFile: return "single-file";
    case Layout::kHfDir: return "hf-dir";
    case Layout::kSharded: return "sharded";
    case Layout::kPipeline: return "pipeline";
  }
  return "?";
}

struct Model {
  std::string input;                       // what to pass to quantize_model
  std::string weights_rel;                 // the component's weights.parquet inside the output
  std::vector<StEntry> tensors;            // of the quantized component, in file order
  std::vector<std::string> aux;            // files expected to be copied
};

Model make_model(const fs::path& root, Layout layout, std::vector<StEntry> tensors = unet_tensors()) {
  Model m;
  m.tensors = tensors;
  m.weights_rel = "weights.parquet";
  switch (layout) {
    case Layout::kSingleFile:
      testing::write_safetensors(root / "model.safetensors", tensors);
      m.input = (root / "model.safetensors").string();
      break;
    case Layout::kHfDir:
      testing::write_safetensors(root / "model" / "model.safetensors", tensors);
      testing::write_json(root / "model" / "config.json", {{"_class_name", "UNet2DConditionModel"}});
      testing::write_text(root / "model" / "README.md", "# a test model\n");
      m.input = (root / "model").string();
      m.aux = {"README.md", "config.json"};
      break;
    case Layout::kSharded: {
      const size_t half = tensors.size() / 2;
      std::vector<StEntry> a(tensors.begin(), tensors.begin() + static_cast<long>(half));
      std::vector<StEntry> b(tensors.begin() + static_cast<long>(half), tensors.end());
      testing::write_safetensors(root / "model" / "model-00001-of-00002.safetensors", a);
      testing::write_safetensors(root / "model" / "model-00002-of-00002.safetensors", b);
      json map = json::object();
      for (const auto& e : a) map[e.name] = "model-00001-of-00002.safetensors";
      for (const auto& e : b) map[e.name] = "model-00002-of-00002.safetensors";
      testing::write_json(root / "model" / "model.safetensors.index.json", {{"weight_map", map}});
      testing::write_json(root / "model" / "config.json", {{"model_type", "test"}});
      m.input = (root / "model").string();
      m.aux = {"config.json"};
      break;
    }
    case Layout::kPipeline: {
      const fs::path p = root / "pipe";
      testing::write_json(p / "model_index.json", {{"_class_name", "StableDiffusionPipeline"},
                                                   {"unet", json::array({"diffusers", "UNet2DConditionModel"})},
                                                   {"vae", json::array({"diffusers", "AutoencoderKL"})},
                                                   {"scheduler", json::array({"diffusers", "PNDMScheduler"})}});
      testing::write_json(p / "unet" / "config.json", {{"_class_name", "UNet2DConditionModel"}});
      testing::write_safetensors(p / "unet" / "diffusion_pytorch_model.safetensors", tensors);
      testing::write_json(p / "vae" / "config.json", {{"_class_name", "AutoencoderKL"}});
      testing::write_safetensors(p / "vae" / "diffusion_pytorch_model.safetensors",
                                 {testing::f32_entry("encoder.conv_in.weight", {16, 16}, testing::gaussian(256, 99))});
      testing::write_json(p / "scheduler" / "scheduler_config.json", {{"_class_name", "PNDMScheduler"}});
      m.input = p.string();
      m.weights_rel = "unet/weights.parquet";
      m.aux = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors"};
      break;
    }
  }
  return m;
}

EngineConfig config(json j = json::object()) {
  if (!j.contains("num_threads")) j["num_threads"] = 2;
  auto c = EngineConfig::FromJson(j);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : EngineConfig{};
}

// Entries of `dir` whose names mark an unfinished output ("."<name>".arrowquant-tmp-...").
std::vector<std::string> staging_leftovers(const fs::path& dir) {
  std::vector<std::string> out;
  if (!fs::exists(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.find("arrowquant-tmp") != std::string::npos || n.find("arrowquant-old") != std::string::npos)
      out.push_back(n);
  }
  return out;
}

const json* layer(const json& report, const std::string& tensor) {
  for (const auto& l : report["layers"])
    if (l["tensor"] == tensor) return &l;
  return nullptr;
}

class EngineLayoutTest : public ::testing::TestWithParam<Layout> {};

TEST_P(EngineLayoutTest, writes_a_complete_output_directory_that_validates) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), GetParam());
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out, config(), RunHooks{}));

  ASSERT_TRUE(fs::exists(fs::path(out) / "manifest.json"));
  ASSERT_TRUE(fs::exists(fs::path(out) / m.weights_rel));
  ASSERT_OK_AND_ASSIGN(json manifest, read_manifest(out));
  EXPECT_EQ(manifest["modality"], "image");
  for (const auto& f : m.aux) {
    ASSERT_TRUE(fs::exists(fs::path(out) / f)) << f;
    EXPECT_EQ(testing::read_bytes(fs::path(out) / f), testing::read_bytes(fs::path(m.input) / f)) << f;
  }
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());

  // every tensor, in file order; quantized ones close to the source, kept ones byte-identical
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / m.weights_rel).string()));
  ASSERT_EQ(src->tensors().size(), m.tensors.size());
  ASSERT_EQ(report["layers"].size(), m.tensors.size());
  std::map<std::string, bool> quantized;
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const StoredTensorInfo& info = src->tensors()[i];
    const StEntry& e = m.tensors[i];
    EXPECT_EQ(info.name, e.name);
    EXPECT_EQ(info.shape, e.shape) << e.name;
    EXPECT_EQ(dtype_name(info.dtype), e.dtype) << e.name;
    quantized[e.name] = info.quantized;
    if (!info.quantized) {
      ASSERT_OK_AND_ASSIGN(LoadedTensor t, src->read(i));
      EXPECT_EQ(std::vector<uint8_t>(t.payload.codes.begin(), t.payload.codes.end()), e.data) << e.name;
    } else {
      EXPECT_GE(info.cosine, 0.85) << e.name;
    }
  }
  EXPECT_TRUE(quantized["down_blocks.0.resnets.0.conv1.weight"]);
  EXPECT_TRUE(quantized["down_blocks.0.attentions.0.proj_in.weight"]);
  EXPECT_FALSE(quantized["down_blocks.0.resnets.0.norm1.weight"]);
  EXPECT_FALSE(quantized["tiny.weight"]);
  EXPECT_FALSE(quantized["position_ids"]);
  EXPECT_EQ(src->tensors()[*src->find("conv_in.weight")].scheme.bits, 8);
  EXPECT_EQ(src->tensors()[*src->find("time_embedding.linear_1.weight")].scheme.bits, 8);
  EXPECT_EQ(src->tensors()[*src->find("down_blocks.0.attentions.0.proj_out.weight")].scheme.bits, 4);

  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>()) << v.dump(2);
  size_t checked = 0;
  for (const auto& l : v["layers"]) {
    if (!l["quantized"].get<bool>()) {
      EXPECT_TRUE(l["identical_to_source"].get<bool>()) << l.dump();
      continue;
    }
    const std::string name = l["name"];  // "unet/<tensor>" for a pipeline
    const json* rec = layer(report, name.substr(name.find('/') + 1));
    ASSERT_NE(rec, nullptr) << name;
    EXPECT_EQ(l["cosine_similarity"].get<double>(), (*rec)["cosine_similarity"].get<double>()) << name;
    EXPECT_EQ(v["per_layer_accuracy"][name].get<double>(), (*rec)["cosine_similarity"].get<double>()) << name;
    EXPECT_TRUE(l["matches_recorded"].get<bool>()) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 5u);
}

TEST_P(EngineLayoutTest, output_is_byte_identical_for_one_and_two_threads) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), GetParam());
  const std::string out1 = (dir / "out1").string(), out2 = (dir / "out2").string();
  ASSERT_OK(quantize_model(m.input, out1, config({{"num_threads", 1}}), RunHooks{}).status());
  ASSERT_OK(quantize_model(m.input, out2, config({{"num_threads", 2}}), RunHooks{}).status());
  const auto a = testing::read_bytes(fs::path(out1) / m.weights_rel);
  const auto b = testing::read_bytes(fs::path(out2) / m.weights_rel);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "weights.parquet differs between 1 and 2 threads";
}

INSTANTIATE_TEST_SUITE_P(Layouts, EngineLayoutTest,
                         ::testing::Values(Layout::kSingleFile, Layout::kHfDir, Layout::kSharded, Layout::kPipeline),
                         [](const ::testing::TestParamInfo<Layout>& i) {
                           std::string s = layout_label(i.param);
                           for (char& c : s)
                             if (c == '-') c = '_';
                           return s;
                         });

std::vector<StEntry> with_nan() {
  std::vector<StEntry> t = unet_tensors();
  std::vector<float> w = testing::gaussian(64 * 64, 7);
  w[5 * 64 + 9] = NAN;
  t.push_back(testing::f32_entry("mid_block.attentions.0.to_v.weight", {64, 64}, w));
  return t;
}

TEST(Engine, quantizes_and_validates_tensors_with_a_zero_dimension) {
  testing::TempDir dir;
  std::vector<StEntry> t = unet_tensors();
  t.push_back(testing::f32_entry("empty_rows.weight", {0, 64}, {}));
  t.push_back(testing::f32_entry("empty_cols.weight", {4, 0}, {}));
  const Model m = make_model(dir.path(), Layout::kSingleFile, t);
  for (int min_size : {0, 1024}) {  // quantized, then kept
    SCOPED_TRACE(min_size);
    const std::string out = (dir / ("out" + std::to_string(min_size))).string();
    ASSERT_OK_AND_ASSIGN(json report,
                         quantize_model(m.input, out, config({{"min_tensor_size", min_size}}), RunHooks{}));
    for (const char* name : {"empty_rows.weight", "empty_cols.weight"}) {
      const json* l = layer(report, name);
      ASSERT_NE(l, nullptr) << name;
      EXPECT_EQ((*l)["quantized"].get<bool>(), min_size == 0) << name;
    }
    ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
    EXPECT_TRUE(v["passed"].get<bool>()) << v.dump(2);
  }
}

TEST(Engine, nan_weight_fails_the_run_naming_tensor_and_file_when_fail_fast) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kHfDir, with_nan());
  const std::string out = (dir / "new" / "nested" / "out").string();
  auto r = quantize_model(m.input, out, config({{"fail_fast", true}}), RunHooks{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNonFinite);
  EXPECT_CONTAINS(r.status().message(), "mid_block.attentions.0.to_v.weight");
  EXPECT_CONTAINS(r.status().message(), "model.safetensors");
  EXPECT_CONTAINS(r.status().message(), "NaN");
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(dir / "new")) << "folders made for the output are taken away again";
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
}

TEST(Engine, nan_weight_is_listed_in_errors_and_stored_raw_without_fail_fast) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kHfDir, with_nan());
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out, config({{"fail_fast", false}}), RunHooks{}));
  ASSERT_EQ(report["errors"].size(), 1u) << report["errors"].dump();
  EXPECT_EQ(report["errors"][0]["name"], "mid_block.attentions.0.to_v.weight");
  EXPECT_CONTAINS(report["errors"][0]["error"].get<std::string>(), "NaN");
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / "weights.parquet").string()));
  const auto i = src->find("mid_block.attentions.0.to_v.weight");
  ASSERT_TRUE(i.has_value());
  EXPECT_FALSE(src->tensors()[*i].quantized);
  ASSERT_OK_AND_ASSIGN(LoadedTensor t, src->read(*i));
  EXPECT_EQ(std::vector<uint8_t>(t.payload.codes.begin(), t.payload.codes.end()), m.tensors.back().data);
  EXPECT_EQ(report["quantized_layers"].get<uint64_t>(), 5u) << "the other tensors are still quantized";
}

TEST(Engine, nonfinite_keep_stores_the_tensor_raw_without_an_error) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile, with_nan());
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report,
                       quantize_model(m.input, out, config({{"nonfinite", "keep"}, {"fail_fast", true}}), RunHooks{}));
  EXPECT_TRUE(report["errors"].empty());
  const json* l = layer(report, "mid_block.attentions.0.to_v.weight");
  ASSERT_NE(l, nullptr);
  EXPECT_FALSE((*l)["quantized"].get<bool>());
  EXPECT_CONTAINS((*l)["reason"].get<std::string>(), "non-finite");
  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 1, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>());
}

TEST(Engine, falls_back_to_more_bits_when_accuracy_is_below_min_accuracy) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report,
                       quantize_model(m.input, out, config({{"bit_width", 2}, {"min_accuracy", 0.99}}), RunHooks{}));
  const json* l = layer(report, "down_blocks.0.resnets.0.conv1.weight");
  ASSERT_NE(l, nullptr);
  ASSERT_TRUE((*l)["quantized"].get<bool>()) << l->dump();
  const auto rejected = (*l)["rejected_bits"].get<std::vector<int>>();
  ASSERT_FALSE(rejected.empty()) << "2-bit codes of Student-t weights are far below cosine 0.99";
  EXPECT_EQ(rejected[0], 2);
  for (size_t i = 1; i < rejected.size(); ++i) EXPECT_EQ(rejected[i], *next_fallback_bits(rejected[i - 1]));
  EXPECT_EQ((*l)["bits"].get<int>(), *next_fallback_bits(rejected.back()));
  EXPECT_GE((*l)["cosine_similarity"].get<double>(), 0.99);
  bool listed = false;
  for (const auto& f : report["fallbacks"]) listed |= f["name"] == "down_blocks.0.resnets.0.conv1.weight";
  EXPECT_TRUE(listed);
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / "weights.parquet").string()));
  const StoredTensorInfo& info = src->tensors()[*src->find("down_blocks.0.resnets.0.conv1.weight")];
  EXPECT_EQ(info.rejected_bits, rejected);
  EXPECT_EQ(info.scheme.bits, (*l)["bits"].get<int>());
}

TEST(Engine, keeps_a_tensor_raw_when_even_8_bits_miss_min_accuracy) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out, config({{"bit_width", 8}, {"min_accuracy", 1.0}}),
                                                   RunHooks{}));
  const json* l = layer(report, "down_blocks.0.resnets.0.conv1.weight");
  ASSERT_NE(l, nullptr);
  EXPECT_FALSE((*l)["quantized"].get<bool>());
  EXPECT_EQ((*l)["rejected_bits"].get<std::vector<int>>(), std::vector<int>{8});
  EXPECT_EQ(report["quantized_layers"].get<uint64_t>(), 0u);
  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>()) << "every tensor is stored as it was";
}

TEST(Engine, without_fallback_low_accuracy_layers_stay_and_validation_fails_naming_them) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out,
                                                   config({{"bit_width", 2}, {"min_accuracy", 0.99},
                                                           {"enable_fallback", false}}),
                                                   RunHooks{}));
  const json* l = layer(report, "down_blocks.0.resnets.0.conv1.weight");
  ASSERT_NE(l, nullptr);
  EXPECT_EQ((*l)["bits"].get<int>(), 2);
  EXPECT_TRUE((*l)["rejected_bits"].empty());
  EXPECT_TRUE(report["fallbacks"].empty());
  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
  EXPECT_FALSE(v["passed"].get<bool>());
  bool named = false;
  for (const auto& f : v["failures"]) named |= f["name"] == "down_blocks.0.resnets.0.conv1.weight";
  EXPECT_TRUE(named) << v["failures"].dump();
}

// ---- the entropy-coded scheme ---------------------------------------------------------------

// The stored budget of a layer: entropy-coded tensors carry it; the affine codes a small tensor
// may keep instead cost bits + their scales.
double stored_budget(const StoredTensorInfo& info) { return info.scheme.entropy_budget(); }

TEST(Engine, entropy_scheme_writes_a_model_that_validates_with_the_recorded_cosines) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kPipeline);
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report,
                       quantize_model(m.input, out, config({{"scheme", "entropy"}, {"bit_width", 4}}), RunHooks{}));
  ASSERT_OK_AND_ASSIGN(json manifest, read_manifest(out));
  EXPECT_EQ(manifest["config"]["scheme"], "entropy");
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / m.weights_rel).string()));
  size_t entropy_coded = 0;
  for (size_t i = 0; i < src->tensors().size(); ++i) {
    const StoredTensorInfo& info = src->tensors()[i];
    if (!info.quantized) continue;
    SCOPED_TRACE(info.name);
    const json* l = layer(report, info.name);
    ASSERT_NE(l, nullptr);
    EXPECT_EQ((*l)["cosine_similarity"].get<double>(), info.cosine);
    EXPECT_EQ((*l)["stored_bytes"].get<uint64_t>(), info.stored_bytes());
    ASSERT_OK_AND_ASSIGN(LoadedTensor t, src->read(i));
    if (info.scheme.kind == SchemeKind::kEntropy) {
      ++entropy_coded;
      EXPECT_NE(t.payload.entropy, nullptr);
      EXPECT_EQ(stored_budget(info), info.scheme.bits + 0.5) << "no target: bits + 0.5";
      EXPECT_EQ((*l)["scheme"], scheme_name(info.scheme));
    }
    EXPECT_LE((*l)["bits_per_weight"].get<double>(), info.scheme.bits + 0.5) << l->dump();
  }
  EXPECT_GE(entropy_coded, 1u) << "the 64 x 288 Student-t layer at least is entropy-coded";
  const StoredTensorInfo& big = src->tensors()[*src->find("down_blocks.0.resnets.0.conv1.weight")];
  EXPECT_TRUE(big.quantized);
  EXPECT_EQ(big.scheme.kind, SchemeKind::kEntropy);

  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>()) << v.dump(2);
  size_t checked = 0;
  for (const auto& l : v["layers"]) {
    if (!l["quantized"].get<bool>()) {
      EXPECT_TRUE(l["identical_to_source"].get<bool>()) << l.dump();
      continue;
    }
    const std::string name = l["name"];
    const json* rec = layer(report, name.substr(name.find('/') + 1));
    ASSERT_NE(rec, nullptr) << name;
    EXPECT_EQ(l["cosine_similarity"].get<double>(), (*rec)["cosine_similarity"].get<double>()) << name;
    EXPECT_EQ(v["per_layer_accuracy"][name].get<double>(), (*rec)["cosine_similarity"].get<double>()) << name;
    EXPECT_TRUE(l["matches_recorded"].get<bool>()) << name;
    ++checked;
  }
  EXPECT_EQ(checked, report["quantized_layers"].get<uint64_t>());
}

TEST(Engine, entropy_scheme_is_byte_identical_for_one_and_two_threads) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const std::string out1 = (dir / "out1").string(), out2 = (dir / "out2").string();
  const json base = {{"scheme", "entropy"}, {"rotate", true}, {"target_bits_per_weight", 3.3}, {"bit_width", 3}};
  json c1 = base, c2 = base;
  c1["num_threads"] = 1;
  c2["num_threads"] = 2;
  ASSERT_OK(quantize_model(m.input, out1, config(c1), RunHooks{}).status());
  ASSERT_OK(quantize_model(m.input, out2, config(c2), RunHooks{}).status());
  const auto a = testing::read_bytes(fs::path(out1) / m.weights_rel);
  const auto b = testing::read_bytes(fs::path(out2) / m.weights_rel);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "weights.parquet differs between 1 and 2 threads";
}

TEST(Engine, entropy_scheme_quantizes_sensitive_layers_at_their_higher_budget) {
  // Sensitive layers are planned at sensitive_bit_width (8): an entropy budget of 8.5 bits per
  // weight, where a reconstruction is all but exact. They must be stored quantized, close to the
  // source, and within that budget.
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report,
                       quantize_model(m.input, out, config({{"scheme", "entropy"}, {"bit_width", 4}}), RunHooks{}));
  for (const char* name : {"conv_in.weight", "time_embedding.linear_1.weight"}) {
    const json* l = layer(report, name);
    ASSERT_NE(l, nullptr) << name;
    EXPECT_TRUE((*l)["quantized"].get<bool>()) << l->dump();
    EXPECT_TRUE((*l)["rejected_bits"].empty()) << l->dump();
    if (!(*l)["quantized"].get<bool>()) continue;
    EXPECT_EQ((*l)["bits"].get<int>(), 8) << name;
    EXPECT_GE((*l)["cosine_similarity"].get<double>(), 0.999) << l->dump();
    EXPECT_LE((*l)["bits_per_weight"].get<double>(), 8.5) << l->dump();
  }
}

TEST(Engine, entropy_fallback_raises_the_budget_with_the_bits) {
  // The ladder 2 -> 3 -> 4 -> 8 moves the budget with the bits: bits + 0.5 without a target,
  // target + (bits - bit_width) with one.
  struct Case {
    json cfg;
    double budget_at_2;
  };
  const Case cases[] = {{{{"scheme", "entropy"}, {"bit_width", 2}, {"min_accuracy", 0.99}}, 2.5},
                        {{{"scheme", "entropy"}, {"bit_width", 2}, {"min_accuracy", 0.99}, {"target_bits_per_weight", 2.2}},
                         2.2}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.cfg.dump());
    testing::TempDir dir;
    const Model m = make_model(dir.path(), Layout::kSingleFile);
    const std::string out = (dir / "out").string();
    ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out, config(c.cfg), RunHooks{}));
    const json* l = layer(report, "down_blocks.0.resnets.0.conv1.weight");
    ASSERT_NE(l, nullptr);
    ASSERT_TRUE((*l)["quantized"].get<bool>()) << l->dump();
    const auto rejected = (*l)["rejected_bits"].get<std::vector<int>>();
    ASSERT_FALSE(rejected.empty()) << "Student-t weights at " << c.budget_at_2 << " bits are below cosine 0.99";
    EXPECT_EQ(rejected[0], 2);
    for (size_t i = 1; i < rejected.size(); ++i) EXPECT_EQ(rejected[i], *next_fallback_bits(rejected[i - 1]));
    const int bits = (*l)["bits"].get<int>();
    EXPECT_EQ(bits, *next_fallback_bits(rejected.back()));
    EXPECT_GE((*l)["cosine_similarity"].get<double>(), 0.99);
    const double budget = c.budget_at_2 + (bits - 2);
    const double bpw = (*l)["bits_per_weight"].get<double>();
    EXPECT_LE(bpw, budget) << "the budget of the rung taken";
    EXPECT_GT(bpw, c.budget_at_2) << "more bits than the rejected rung's budget";
    ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / "weights.parquet").string()));
    const StoredTensorInfo& info = src->tensors()[*src->find("down_blocks.0.resnets.0.conv1.weight")];
    EXPECT_EQ(info.rejected_bits, rejected);
    EXPECT_EQ(info.scheme.bits, bits);
    if (info.scheme.kind == SchemeKind::kEntropy) {
      EXPECT_DOUBLE_EQ(stored_budget(info), budget);
    }
    ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
    EXPECT_TRUE(v["passed"].get<bool>()) << v.dump(2);
  }
}

TEST(Engine, entropy_scheme_quantizes_and_validates_tensors_with_a_zero_dimension) {
  testing::TempDir dir;
  std::vector<StEntry> t = unet_tensors();
  t.push_back(testing::f32_entry("empty_rows.weight", {0, 64}, {}));
  t.push_back(testing::f32_entry("empty_cols.weight", {4, 0}, {}));
  const Model m = make_model(dir.str(), Layout::kSingleFile, t);
  const std::string out = dir.str() + "/out";
  ASSERT_OK_AND_ASSIGN(json r, quantize_model(m.input, out, config({{"scheme", "entropy"}, {"min_tensor_size", 0},
                                                                    {"fail_fast", true}}),
                                              RunHooks{}));
  for (const char* name : {"empty_rows.weight", "empty_cols.weight"}) {
    const json* l = layer(r, name);
    ASSERT_NE(l, nullptr) << name;
    EXPECT_TRUE((*l)["quantized"].get<bool>()) << l->dump();
  }
  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, out, 2, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>()) << v.dump();
}

TEST(Engine, quantizes_a_model_without_tensors) {
  testing::TempDir dir;
  testing::write_safetensors_raw(dir / "empty.safetensors", "{}", {});
  const std::string out = (dir / "out").string();
  ASSERT_OK_AND_ASSIGN(json report, quantize_model((dir / "empty.safetensors").string(), out, config(), RunHooks{}));
  EXPECT_TRUE(report["layers"].empty());
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open((fs::path(out) / "weights.parquet").string()));
  EXPECT_TRUE(src->tensors().empty());
  ASSERT_OK_AND_ASSIGN(json v, validate_model((dir / "empty.safetensors").string(), out, 1, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>());
}

TEST(Engine, refuses_an_output_path_inside_the_input_directory) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kHfDir);
  const std::string out = m.input + "/quantized";
  auto r = quantize_model(m.input, out, config(), RunHooks{});
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidConfig) << r.status().ToString();
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(staging_leftovers(m.input).empty());
  EXPECT_EQ(quantize_model(m.input, m.input, config(), RunHooks{}).status().code(), StatusCode::kInvalidConfig);
  EXPECT_EQ(quantize_model(m.input, dir.str(), config({{"overwrite", true}}), RunHooks{}).status().code(),
            StatusCode::kInvalidConfig)
      << "an output that contains the input";
  EXPECT_TRUE(fs::exists(fs::path(m.input) / "model.safetensors"));
}

TEST(Engine, replaces_an_existing_output_only_with_overwrite) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const fs::path out = dir / "out";
  testing::write_text(out / "old.txt", "previous run");
  auto r = quantize_model(m.input, out.string(), config(), RunHooks{});
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidConfig);
  EXPECT_CONTAINS(r.status().message(), "overwrite");
  EXPECT_TRUE(fs::exists(out / "old.txt"));
  ASSERT_OK(quantize_model(m.input, out.string(), config({{"overwrite", true}}), RunHooks{}).status());
  EXPECT_FALSE(fs::exists(out / "old.txt"));
  EXPECT_TRUE(fs::exists(out / "manifest.json"));
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
}

TEST(Engine, accepts_an_output_path_with_a_trailing_slash) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kHfDir);
  const fs::path out = dir / "out";
  auto r = quantize_model(m.input, out.string() + "/", config(), RunHooks{});
  ASSERT_OK(r.status());
  EXPECT_TRUE(fs::exists(out / "manifest.json"));
  EXPECT_TRUE(fs::exists(out / "weights.parquet"));
  EXPECT_TRUE(staging_leftovers(out).empty()) << "the staging directory was made inside the destination";
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
  // and replacing it the same way
  ASSERT_OK(quantize_model(m.input, out.string() + "/", config({{"overwrite", true}}), RunHooks{}).status());
  EXPECT_TRUE(fs::exists(out / "manifest.json"));
  EXPECT_TRUE(staging_leftovers(out).empty());
}

TEST(Engine, missing_input_is_not_found_and_leaves_nothing_behind) {
  testing::TempDir dir;
  const fs::path out = dir / "sub" / "out";
  auto r = quantize_model((dir / "no-such-model").string(), out.string(), config(), RunHooks{});
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_CONTAINS(r.status().message(), "no-such-model");
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
  EXPECT_TRUE(staging_leftovers(dir / "sub").empty());
}

TEST(Engine, a_malformed_weight_file_fails_before_any_output_is_left) {
  testing::TempDir dir;
  fs::create_directories(dir / "model");
  testing::write_safetensors_raw(dir / "model" / "model.safetensors", "{\"w\": 1}", {});
  const fs::path out = dir / "out";
  auto r = quantize_model((dir / "model").string(), out.string(), config(), RunHooks{});
  EXPECT_EQ(r.status().code(), StatusCode::kFormatError);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
}

TEST(Engine, a_stop_request_cancels_and_leaves_nothing_behind) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const fs::path out = dir / "out";
  RunHooks hooks;
  hooks.should_stop = [] { return true; };
  auto r = quantize_model(m.input, out.string(), config(), hooks);
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
}

// Every file under root (relative path -> bytes).
std::map<std::string, std::vector<uint8_t>> tree(const fs::path& root) {
  std::map<std::string, std::vector<uint8_t>> out;
  for (const auto& e : fs::recursive_directory_iterator(root))
    if (e.is_regular_file()) out[fs::relative(e.path(), root).string()] = testing::read_bytes(e.path());
  return out;
}

// Stops the run once `after` tensors are done.
RunHooks stop_after(size_t after, std::shared_ptr<size_t> done) {
  RunHooks hooks;
  hooks.progress_every_tensors = 1;
  hooks.progress = [done](const ProgressEvent& e) { *done = e.tensors_done; };
  hooks.should_stop = [done, after] { return *done >= after; };
  return hooks;
}

TEST_P(EngineLayoutTest, a_resumed_run_is_byte_identical_to_an_uninterrupted_one) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), GetParam());
  const fs::path straight = dir / "straight", out = dir / "out";
  ASSERT_OK(quantize_model(m.input, straight.string(), config(), RunHooks{}).status());
  auto done = std::make_shared<size_t>(0);
  auto r = quantize_model(m.input, out.string(), config(), stop_after(2, done), /*resume=*/true);
  ASSERT_EQ(r.status().code(), StatusCode::kCancelled) << r.status().message();
  EXPECT_CONTAINS(r.status().message(), "kept in");
  EXPECT_FALSE(fs::exists(out));
  ASSERT_EQ(staging_leftovers(dir.path()).size(), 1u);
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out.string(), config(), RunHooks{}, /*resume=*/true));
  EXPECT_GE(report["resume"]["tensors"].get<uint64_t>(), 2u);
  EXPECT_LT(report["resume"]["tensors"].get<uint64_t>(), m.tensors.size());
  EXPECT_EQ(report["layers"].size(), m.tensors.size());
  EXPECT_TRUE(tree(out) == tree(straight)) << "the resumed output differs from the uninterrupted one";
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
}

// A model quantized straight through, and the same run stopped after 3 tensors with resume.
struct Interrupted {
  testing::TempDir dir;
  Model m;
  fs::path straight, out, journal;  // journal: the kept run's folder for component 0
  void SetUp() {
    m = make_model(dir.path(), Layout::kSingleFile);
    straight = dir / "straight";
    out = dir / "out";
    ASSERT_OK(quantize_model(m.input, straight.string(), config(), RunHooks{}).status());
    auto done = std::make_shared<size_t>(0);
    ASSERT_EQ(quantize_model(m.input, out.string(), config(), stop_after(3, done), true).status().code(),
              StatusCode::kCancelled);
    const auto left = staging_leftovers(dir.path());
    ASSERT_EQ(left.size(), 1u);
    journal = dir / left[0] / kRunDirName / "c0";
  }
};

// Tensors of several row blocks, to be stored in pieces with a small piece_bytes.
std::vector<StEntry> big_tensors() {
  std::vector<StEntry> t;
  t.push_back(testing::f32_entry("blocks.0.ff.weight", {6000, 32}, testing::student_t4(6000 * 32, 11, 0.02f)));
  t.push_back({"embed_tokens.weight", "BF16", {5000, 64}, testing::bf16_bytes(testing::gaussian(5000 * 64, 12, 0.05f))});
  t.push_back(testing::f32_entry("blocks.0.norm.weight", {64}, testing::gaussian(64, 13)));
  t.push_back({"kept.weight", "F16", {3000, 32}, testing::f16_bytes(testing::gaussian(3000 * 32, 14, 0.05f))});
  return t;
}

class EnginePiecesTest : public ::testing::TestWithParam<const char*> {};

TEST_P(EnginePiecesTest, big_tensors_in_pieces_validate_and_match_the_tensors_stored_whole) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile, big_tensors());
  const fs::path whole = dir / "whole", pieces = dir / "pieces";
  json c = {{"scheme", GetParam()}, {"skip_patterns", {"^kept"}}};
  if (std::string(GetParam()) == "q8_0") c["bit_width"] = 8;
  ASSERT_OK_AND_ASSIGN(json a, quantize_model(m.input, whole.string(), config(c), RunHooks{}));
  c["piece_bytes"] = 4096;
  ASSERT_OK_AND_ASSIGN(json b, quantize_model(m.input, pieces.string(), config(c), RunHooks{}));
  EXPECT_EQ(a["compression_ratio"], b["compression_ratio"]);
  ASSERT_OK_AND_ASSIGN(auto sa, ParquetSource::Open((whole / "weights.parquet").string()));
  ASSERT_OK_AND_ASSIGN(auto sb, ParquetSource::Open((pieces / "weights.parquet").string()));
  ASSERT_EQ(sb->tensors().size(), m.tensors.size());
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const StoredTensorInfo &x = sa->tensors()[i], &y = sb->tensors()[i];
    SCOPED_TRACE(x.name);
    EXPECT_EQ(x.pieces.size(), 1u);
    if (x.stored_bytes() > 4096) {
      EXPECT_GT(y.pieces.size(), 1u);
    }
    EXPECT_EQ(y.stored_bytes(), x.stored_bytes());
    EXPECT_EQ(y.cosine, x.cosine);
    EXPECT_EQ(y.scheme, x.scheme);
    ASSERT_OK_AND_ASSIGN(LoadedTensor lx, sa->read(i));
    ASSERT_OK_AND_ASSIGN(LoadedTensor ly, sb->read(i));
    EXPECT_TRUE(std::equal(lx.payload.codes.begin(), lx.payload.codes.end(), ly.payload.codes.begin(),
                           ly.payload.codes.end()));
    EXPECT_TRUE(std::equal(lx.payload.scales.begin(), lx.payload.scales.end(), ly.payload.scales.begin(),
                           ly.payload.scales.end()));
  }
  EXPECT_TRUE(sb->tensors()[*sb->find("kept.weight")].pieces.size() > 1);
  ASSERT_OK_AND_ASSIGN(json v, validate_model(m.input, pieces.string(), 2, RunHooks{}));
  EXPECT_TRUE(v["passed"].get<bool>()) << v.dump(2);
  for (const auto& l : v["layers"]) {
    if (!l["quantized"].get<bool>()) {
      EXPECT_TRUE(l["identical_to_source"].get<bool>()) << l.dump();
      continue;
    }
    EXPECT_TRUE(l["matches_recorded"].get<bool>()) << l.dump();
  }
  // A resumed run of the pieced output: byte-identical too.
  const fs::path out = dir / "resumed";
  auto done = std::make_shared<size_t>(0);
  ASSERT_EQ(quantize_model(m.input, out.string(), config(c), stop_after(1, done), true).status().code(),
            StatusCode::kCancelled);
  ASSERT_OK_AND_ASSIGN(json r, quantize_model(m.input, out.string(), config(c), RunHooks{}, true));
  EXPECT_GE(r["resume"]["tensors"].get<uint64_t>(), 1u);
  EXPECT_TRUE(tree(out) == tree(pieces));
}

INSTANTIATE_TEST_SUITE_P(Schemes, EnginePiecesTest, ::testing::Values("affine", "entropy", "q8_0"),
                         [](const auto& p) { return std::string(p.param); });

TEST(Engine, a_journal_entry_missing_a_piece_is_quantized_again) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile, big_tensors());
  const json c = {{"piece_bytes", 4096}, {"skip_patterns", {"^kept"}}};
  const fs::path straight = dir / "straight", out = dir / "out";
  ASSERT_OK(quantize_model(m.input, straight.string(), config(c), RunHooks{}).status());
  auto done = std::make_shared<size_t>(0);
  ASSERT_EQ(quantize_model(m.input, out.string(), config(c), stop_after(2, done), true).status().code(),
            StatusCode::kCancelled);
  const auto left = staging_leftovers(dir.path());
  ASSERT_EQ(left.size(), 1u);
  const fs::path journal = dir / left[0] / kRunDirName / "c0";
  ASSERT_TRUE(fs::exists(journal / "t0.1.arrow"));
  fs::remove(journal / "t0.1.arrow");
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out.string(), config(c), RunHooks{}, true));
  EXPECT_EQ(report["resume"]["tensors"].get<uint64_t>(), 1u);  // t1 is taken, t0 redone
  EXPECT_EQ(report["journaled_tensors"].get<uint64_t>(), 1u);
  EXPECT_TRUE(tree(out) == tree(straight));
}

TEST(Engine, a_damaged_journal_entry_is_quantized_again) {
  Interrupted run;
  ASSERT_NO_FATAL_FAILURE(run.SetUp());
  const fs::path& journal = run.journal;
  const Model& m = run.m;
  const fs::path &straight = run.straight, &out = run.out;
  ASSERT_TRUE(fs::exists(journal / "t1.arrow"));
  fs::resize_file(journal / "t1.arrow", fs::file_size(journal / "t1.arrow") / 2);  // a torn entry
  testing::write_text(journal / "t2.arrow.part", "half-written");
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out.string(), config(), RunHooks{}, true));
  // the torn entry alone is redone: the complete ones on either side of it are taken
  EXPECT_EQ(report["resume"]["tensors"].get<uint64_t>(), 2u);
  EXPECT_TRUE(tree(out) == tree(straight));
}

TEST(Engine, a_journal_record_of_the_wrong_shape_is_not_replayed) {
  Interrupted run;
  ASSERT_NO_FATAL_FAILURE(run.SetUp());
  const Model& m = run.m;
  const fs::path &straight = run.straight, &out = run.out;
  ASSERT_OK_AND_ASSIGN(TensorJournal journal, TensorJournal::Open(run.journal.string()));
  StoredTensorInfo info;
  info.name = "x";
  info.shape = {1};
  const uint8_t bytes[4] = {};
  TensorPayload payload;
  payload.codes = std::span<const uint8_t>(bytes, 4);
  info.stored = 4;
  // a readable entry whose record has a number where a name belongs
  ASSERT_OK(journal.Append(0, info, payload, json{{"name", 5}, {"numel", "many"}}));
  ASSERT_OK_AND_ASSIGN(json report, quantize_model(m.input, out.string(), config(), RunHooks{}, true));
  EXPECT_EQ(report["resume"]["tensors"].get<uint64_t>(), 2u);  // t0 redone, t1 and t2 taken
  EXPECT_TRUE(tree(out) == tree(straight));
}

TEST(Engine, stale_staging_directories_are_those_of_dead_or_released_runs_only) {
  testing::TempDir dir;
  const fs::path dest = dir / "out";
  // ours (a live process) without an owner file, a released one, and one of a pid that cannot exist
  fs::create_directories(dir / StrCat(".out.arrowquant-tmp-", ::getpid(), "-1-0"));
  fs::create_directories(dir / StrCat(".out.arrowquant-tmp-", ::getpid(), "-2-0") / kRunDirName);
  testing::write_text(dir / StrCat(".out.arrowquant-tmp-", ::getpid(), "-2-0") / kRunDirName / "released", "x");
  fs::create_directories(dir / ".out.arrowquant-tmp-2147483646-3-0");
  fs::create_directories(dir / ".other.arrowquant-tmp-2147483646-3-0");
  std::vector<std::string> names;
  for (const auto& p : stale_staging_dirs(dest.string())) names.push_back(fs::path(p).filename().string());
  std::vector<std::string> expected = {StrCat(".out.arrowquant-tmp-", ::getpid(), "-2-0"),
                                       ".out.arrowquant-tmp-2147483646-3-0"};
  std::sort(names.begin(), names.end());
  std::sort(expected.begin(), expected.end());  // by name: the order depends on this process's pid
  EXPECT_EQ(names, expected);
}

TEST(Engine, reports_progress_ending_with_every_tensor_done) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  std::vector<ProgressEvent> events;
  RunHooks hooks;
  hooks.progress = [&](const ProgressEvent& e) { events.push_back(e); };
  hooks.progress_every_tensors = 1;
  ASSERT_OK(quantize_model(m.input, (dir / "out").string(), config(), hooks).status());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().tensors_done, m.tensors.size());
  EXPECT_EQ(events.back().tensors_total, m.tensors.size());
  EXPECT_DOUBLE_EQ(events.back().fraction(), 1.0);
  for (size_t i = 1; i < events.size(); ++i) EXPECT_GE(events[i].tensors_done, events[i - 1].tensors_done);
}

}  // namespace
}  // namespace aq

namespace aq {
namespace {

// A distributed run done by hand: the plan, its tensors in parts (some left to the driver), the
// assembly -- byte for byte the output of quantize_model.
TEST(Distributed, parts_and_assembly_give_the_output_of_one_run) {
  for (const json& c : {json::object(), json{{"scheme", "q4_k"}, {"target_bits_per_weight", 4.8}},
                        json{{"piece_bytes", 4096}, {"skip_patterns", {"^kept"}}}}) {
    testing::TempDir dir;
    const Model m = make_model(dir.path(), c.contains("piece_bytes") ? Layout::kSingleFile : Layout::kPipeline,
                               c.contains("piece_bytes") ? big_tensors() : unet_tensors());
    const fs::path straight = dir / "straight", out = dir / "out";
    ASSERT_OK(quantize_model(m.input, straight.string(), config(c), RunHooks{}).status());
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<DistributedRun> run, DistributedRun::Plan(m.input, out.string(), config(c)));
    const json& plan = run->plan();
    ASSERT_EQ(plan["components"].size(), 1u) << plan.dump();
    const json& comp = plan["components"][0];
    const size_t n = comp["tensors"].size(), index = comp["index"].get<size_t>();
    ASSERT_GE(n, 3u);
    if (c.contains("target_bits_per_weight")) {
      EXPECT_FALSE(comp["budget"]["layers"].empty()) << comp.dump();
    }
    // parts of one tensor and of two, one thread each; the last tensor left to the driver
    json one_thread = c;
    one_thread["num_threads"] = 1;
    for (size_t a = 0; a + 1 < n; a += 2) {
      const size_t b = std::min(n - 1, a + 2);
      ASSERT_OK_AND_ASSIGN(json part, quantize_part(m.input, plan, config(one_thread), index, a, b, RunHooks{}));
      EXPECT_EQ(part["tensors"].get<size_t>(), b - a);
    }
    // a part done twice (a retry) changes nothing
    ASSERT_OK(quantize_part(m.input, plan, config(c), index, 0, 1, RunHooks{}).status());
    ASSERT_OK_AND_ASSIGN(json report, run->Assemble(RunHooks{}));
    EXPECT_EQ(report["journaled_tensors"].get<size_t>(), n - 1) << c.dump();
    EXPECT_TRUE(tree(out) == tree(straight)) << c.dump();
    EXPECT_TRUE(staging_leftovers(dir.path()).empty());
  }
}

TEST(Distributed, a_part_refuses_other_sources_and_an_unseen_run_folder) {
  testing::TempDir dir;
  const Model m = make_model(dir.path(), Layout::kSingleFile);
  const fs::path out = dir / "out";
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<DistributedRun> run, DistributedRun::Plan(m.input, out.string(), config()));
  json plan = run->plan();
  const size_t index = plan["components"][0]["index"].get<size_t>();
  // another configuration than the plan's
  auto r = quantize_part(m.input, plan, config({{"bit_width", 3}}), index, 0, 1, RunHooks{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidConfig);
  EXPECT_CONTAINS(r.status().message(), "the configuration differs");
  // the source changed after the plan
  json changed = plan;
  changed["fingerprint"]["files"][0][1] = 1;
  r = quantize_part(m.input, changed, config(), index, 0, 1, RunHooks{});
  ASSERT_FALSE(r.ok());
  EXPECT_CONTAINS(r.status().message(), "the source weights differ");
  // a run folder this worker does not see
  json elsewhere = plan;
  elsewhere["run_dir"] = (dir / "nowhere").string();
  r = quantize_part(m.input, elsewhere, config(), index, 0, 1, RunHooks{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_CONTAINS(r.status().message(), "shared file system");
  // a range beyond the component
  r = quantize_part(m.input, plan, config(), index, 0, 1000, RunHooks{});
  ASSERT_FALSE(r.ok());
  EXPECT_CONTAINS(r.status().message(), "which has");
  // dropped without assembling: nothing is left
  run.reset();
  EXPECT_TRUE(staging_leftovers(dir.path()).empty());
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
}  // namespace aq
