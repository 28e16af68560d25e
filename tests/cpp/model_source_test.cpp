// Finding a model's weights on disk (io/model_source.h): single files, Hugging Face directories
// (plain and sharded) and diffusers pipelines, and which files are copied verbatim.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "io/model_source.h"
#include "test_util.h"

namespace aq {
namespace {

namespace fs = std::filesystem;
using testing::json;

std::set<std::string> as_set(const std::vector<std::string>& v) { return {v.begin(), v.end()}; }

void write_weights(const fs::path& p, const std::vector<std::string>& names) {
  std::vector<testing::StEntry> entries;
  for (size_t i = 0; i < names.size(); ++i)
    entries.push_back(testing::f32_entry(names[i], {2, 2}, {1.0f, 2.0f, 3.0f, static_cast<float>(i)}));
  testing::write_safetensors(p, entries);
}

std::vector<std::string> tensor_names(const std::vector<TensorRef>& refs) {
  std::vector<std::string> n;
  for (const auto& r : refs) n.push_back(r.info->name);
  return n;
}

const ComponentSource* component(const ModelSource& m, const std::string& name) {
  for (const auto& c : m.components)
    if (c.name == name) return &c;
  return nullptr;
}

// A Stable-Diffusion-like pipeline: unet, text_encoder, vae with weights; scheduler and
// tokenizer without; a null safety_checker entry.
void make_pipeline(const fs::path& root, const std::string& denoiser = "unet") {
  testing::write_json(root / "model_index.json",
                      {{"_class_name", "StableDiffusionPipeline"},
                       {"_diffusers_version", "0.30.0"},
                       {denoiser, {"diffusers", denoiser == "unet" ? "UNet2DConditionModel" : "SD3Transformer2DModel"}},
                       {"text_encoder", {"transformers", "CLIPTextModel"}},
                       {"vae", {"diffusers", "AutoencoderKL"}},
                       {"scheduler", {"diffusers", "PNDMScheduler"}},
                       {"tokenizer", {"transformers", "CLIPTokenizer"}},
                       {"safety_checker", {nullptr, nullptr}}});
  testing::write_json(root / denoiser / "config.json", {{"_class_name", "UNet2DConditionModel"}});
  write_weights(root / denoiser / "diffusion_pytorch_model.safetensors", {"conv_in.weight", "conv_out.weight"});
  write_weights(root / denoiser / "diffusion_pytorch_model.fp16.safetensors", {"conv_in.weight"});
  testing::write_json(root / "text_encoder" / "config.json", {{"architectures", {"CLIPTextModel"}}});
  write_weights(root / "text_encoder" / "model.safetensors", {"text_model.embeddings.weight"});
  testing::write_json(root / "vae" / "config.json", {{"_class_name", "AutoencoderKL"}});
  write_weights(root / "vae" / "diffusion_pytorch_model.safetensors", {"encoder.conv_in.weight"});
  testing::write_json(root / "scheduler" / "scheduler_config.json", {{"_class_name", "PNDMScheduler"}});
  testing::write_text(root / "tokenizer" / "vocab.json", "{}");
  testing::write_text(root / "tokenizer" / "merges.txt", "#version: 0.2\n");
}

TEST(ModelSource, reads_a_single_safetensors_file) {
  testing::TempDir dir;
  write_weights(dir / "m.safetensors", {"a", "b"});
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model((dir / "m.safetensors").string(), {}));
  EXPECT_EQ(m.layout, ModelLayout::kSingleFile);
  ASSERT_EQ(m.components.size(), 1u);
  EXPECT_EQ(m.components[0].name, "");
  EXPECT_TRUE(m.components[0].selected);
  ASSERT_EQ(m.components[0].weight_files.size(), 1u);
  EXPECT_TRUE(fs::equivalent(m.components[0].weight_files[0], dir / "m.safetensors"));
  EXPECT_TRUE(m.auxiliary_files.empty());
  ASSERT_OK_AND_ASSIGN(auto refs, open_component_tensors(m.components[0]));
  EXPECT_EQ(tensor_names(refs), (std::vector<std::string>{"a", "b"}));

  auto named = discover_model((dir / "m.safetensors").string(), {"unet"});
  EXPECT_EQ(named.status().code(), StatusCode::kInvalidConfig);
}

TEST(ModelSource, reads_a_huggingface_directory_and_copies_everything_but_the_weights) {
  testing::TempDir dir;
  testing::write_json(dir / "config.json", {{"model_type", "llada"}});
  testing::write_text(dir / "tokenizer.json", "{}");
  testing::write_text(dir / "pytorch_model.bin", "not read");  // another copy of the weights
  testing::write_text(dir / ".hidden", "skipped");
  write_weights(dir / "model.safetensors", {"w"});
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {}));
  EXPECT_EQ(m.layout, ModelLayout::kHfDirectory);
  ASSERT_EQ(m.components.size(), 1u);
  EXPECT_TRUE(m.components[0].selected);
  EXPECT_EQ(m.components[0].config.value("model_type", ""), "llada");
  EXPECT_EQ(as_set(m.auxiliary_files), (std::set<std::string>{"config.json", "tokenizer.json"}));
  EXPECT_EQ(discover_model(dir.str(), {"unet"}).status().code(), StatusCode::kInvalidConfig);
}

TEST(ModelSource, accepts_a_trailing_slash_on_the_directory) {
  testing::TempDir dir;
  write_weights(dir / "model.safetensors", {"w"});
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str() + "/", {}));
  EXPECT_TRUE(fs::equivalent(m.root, dir.path()));
}

class ShardedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    write_weights(dir_ / "model-00001-of-00002.safetensors", {"a", "b"});
    write_weights(dir_ / "model-00002-of-00002.safetensors", {"c"});
    testing::write_json(dir_ / "config.json", json::object());
  }
  void write_index(const json& weight_map) {
    testing::write_json(dir_ / "model.safetensors.index.json", {{"metadata", json::object()}, {"weight_map", weight_map}});
  }
  json good_map() const {
    return {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00001-of-00002.safetensors"},
            {"c", "model-00002-of-00002.safetensors"}};
  }
  Status open_status() {
    auto m = discover_model(dir_.str(), {});
    if (!m.ok()) return m.status();
    return open_component_tensors(m->components[0]).status();
  }
  testing::TempDir dir_;
};

TEST_F(ShardedTest, reads_shards_in_order_through_the_index) {
  write_index(good_map());
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir_.str(), {}));
  EXPECT_EQ(m.layout, ModelLayout::kHfDirectory);
  const ComponentSource& c = m.components[0];
  ASSERT_EQ(c.weight_files.size(), 2u);
  EXPECT_EQ(fs::path(c.weight_files[0]).filename(), "model-00001-of-00002.safetensors");
  EXPECT_EQ(fs::path(c.weight_files[1]).filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(fs::path(c.index_file).filename(), "model.safetensors.index.json");
  EXPECT_EQ(as_set(m.auxiliary_files), (std::set<std::string>{"config.json"}));
  ASSERT_OK_AND_ASSIGN(auto refs, open_component_tensors(c));
  EXPECT_EQ(tensor_names(refs), (std::vector<std::string>{"a", "b", "c"}));
}

TEST_F(ShardedTest, rejects_an_index_placing_a_tensor_in_the_wrong_shard) {
  json map = good_map();
  map["b"] = "model-00002-of-00002.safetensors";
  write_index(map);
  const Status st = open_status();
  EXPECT_EQ(st.code(), StatusCode::kFormatError) << st.ToString();
  EXPECT_CONTAINS(st.message(), "'b'");
  EXPECT_CONTAINS(st.message(), "model.safetensors.index.json");
  EXPECT_CONTAINS(st.message(), "model-00001-of-00002.safetensors");
}

TEST_F(ShardedTest, rejects_a_shard_tensor_missing_from_the_index) {
  json map = good_map();
  map.erase("b");
  write_index(map);
  const Status st = open_status();
  EXPECT_EQ(st.code(), StatusCode::kFormatError) << st.ToString();
  EXPECT_CONTAINS(st.message(), "'b'");
  EXPECT_CONTAINS(st.message(), "does not list");
}

TEST_F(ShardedTest, rejects_an_index_listing_a_tensor_no_shard_holds) {
  json map = good_map();
  map["ghost"] = "model-00002-of-00002.safetensors";
  write_index(map);
  const Status st = open_status();
  EXPECT_EQ(st.code(), StatusCode::kFormatError) << st.ToString();
  EXPECT_CONTAINS(st.message(), "'ghost'");
}

TEST_F(ShardedTest, rejects_a_tensor_held_by_two_shards) {
  write_weights(dir_ / "model-00002-of-00002.safetensors", {"c", "a"});
  write_index(good_map());
  const Status st = open_status();
  EXPECT_EQ(st.code(), StatusCode::kFormatError) << st.ToString();
  EXPECT_CONTAINS(st.message(), "'a'");
  EXPECT_CONTAINS(st.message(), "model-00002-of-00002.safetensors");
}

TEST_F(ShardedTest, reports_a_missing_shard) {
  json map = good_map();
  map["c"] = "model-00003-of-00003.safetensors";
  write_index(map);
  const Status st = open_status();
  EXPECT_EQ(st.code(), StatusCode::kNotFound) << st.ToString();
  EXPECT_CONTAINS(st.message(), "model-00003-of-00003.safetensors");
}

TEST_F(ShardedTest, rejects_an_index_naming_a_file_outside_the_directory) {
  json map = good_map();
  map["c"] = "../model-00002-of-00002.safetensors";
  write_index(map);
  EXPECT_EQ(open_status().code(), StatusCode::kFormatError);
  write_index(json::object());
  EXPECT_EQ(open_status().code(), StatusCode::kFormatError);
}

TEST(ModelSource, rejects_several_safetensors_files_without_an_index) {
  testing::TempDir dir;
  write_weights(dir / "one.safetensors", {"a"});
  write_weights(dir / "two.safetensors", {"b"});
  auto m = discover_model(dir.str(), {});
  EXPECT_EQ(m.status().code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(m.status().message(), "one.safetensors");
}

TEST(ModelSource, picks_the_sole_safetensors_file_of_any_name) {
  testing::TempDir dir;
  write_weights(dir / "weights.safetensors", {"a"});
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {}));
  EXPECT_EQ(fs::path(m.components[0].weight_files.at(0)).filename(), "weights.safetensors");
}

TEST(ModelSource, bin_only_weights_are_not_implemented) {
  testing::TempDir dir;
  testing::write_json(dir / "config.json", json::object());
  testing::write_text(dir / "pytorch_model.bin", "pickle");
  auto m = discover_model(dir.str(), {});
  EXPECT_EQ(m.status().code(), StatusCode::kNotImplemented) << m.status().ToString();
  EXPECT_CONTAINS(m.status().message(), "pytorch_model.bin");
  auto f = discover_model((dir / "pytorch_model.bin").string(), {});
  EXPECT_EQ(f.status().code(), StatusCode::kNotImplemented);
}

TEST(ModelSource, missing_path_is_not_found) {
  testing::TempDir dir;
  auto m = discover_model((dir / "nope").string(), {});
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_CONTAINS(m.status().message(), "nope");
  EXPECT_EQ(discover_model(dir.str(), {}).status().code(), StatusCode::kNotFound) << "an empty directory";
}

TEST(ModelSource, a_non_safetensors_file_is_a_format_error) {
  testing::TempDir dir;
  testing::write_text(dir / "notes.txt", "hello");
  EXPECT_EQ(discover_model((dir / "notes.txt").string(), {}).status().code(), StatusCode::kFormatError);
}

TEST(Pipeline, selects_the_unet_by_default_and_copies_the_rest) {
  testing::TempDir dir;
  make_pipeline(dir.path());
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {}));
  EXPECT_EQ(m.layout, ModelLayout::kDiffusersPipeline);
  EXPECT_EQ(m.model_index.value("_class_name", ""), "StableDiffusionPipeline");
  std::vector<std::string> names;
  for (const auto& c : m.components) names.push_back(c.name);
  EXPECT_EQ(as_set(names), (std::set<std::string>{"unet", "text_encoder", "vae"}));
  for (const auto& c : m.components) EXPECT_EQ(c.selected, c.name == "unet") << c.name;
  const ComponentSource* unet = component(m, "unet");
  ASSERT_NE(unet, nullptr);
  ASSERT_EQ(unet->weight_files.size(), 1u);
  EXPECT_EQ(fs::path(unet->weight_files[0]).filename(), "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(unet->config.value("_class_name", ""), "UNet2DConditionModel");
  EXPECT_EQ(fs::path(component(m, "text_encoder")->weight_files.at(0)).filename(), "model.safetensors");

  EXPECT_EQ(as_set(m.auxiliary_files),
            (std::set<std::string>{"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                                   "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                                   "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}));
}

TEST(Pipeline, selects_the_transformer_by_default) {
  testing::TempDir dir;
  make_pipeline(dir.path(), "transformer");
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {}));
  for (const auto& c : m.components) EXPECT_EQ(c.selected, c.name == "transformer") << c.name;
  EXPECT_EQ(std::count(m.auxiliary_files.begin(), m.auxiliary_files.end(),
                       "transformer/diffusion_pytorch_model.safetensors"), 0);
}

TEST(Pipeline, all_selects_every_component_with_weights) {
  testing::TempDir dir;
  make_pipeline(dir.path());
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {"all"}));
  ASSERT_EQ(m.components.size(), 3u);
  for (const auto& c : m.components) EXPECT_TRUE(c.selected) << c.name;
  for (const auto& f : m.auxiliary_files) EXPECT_EQ(f.find(".safetensors"), std::string::npos) << f;
  EXPECT_EQ(as_set(m.auxiliary_files),
            (std::set<std::string>{"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                                   "tokenizer/merges.txt", "tokenizer/vocab.json", "unet/config.json",
                                   "vae/config.json"}));
  for (const auto& c : m.components) {
    ASSERT_OK_AND_ASSIGN(auto refs, open_component_tensors(c));
    EXPECT_FALSE(refs.empty()) << c.name;
  }
}

TEST(Pipeline, named_components_select_only_those) {
  testing::TempDir dir;
  make_pipeline(dir.path());
  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {"vae", "text_encoder"}));
  for (const auto& c : m.components) EXPECT_EQ(c.selected, c.name != "unet") << c.name;
  const auto aux = as_set(m.auxiliary_files);
  EXPECT_TRUE(aux.count("unet/diffusion_pytorch_model.safetensors"));
  EXPECT_FALSE(aux.count("vae/diffusion_pytorch_model.safetensors"));
  EXPECT_FALSE(aux.count("text_encoder/model.safetensors"));
}

TEST(Pipeline, unknown_component_is_invalid_config_listing_the_available_ones) {
  testing::TempDir dir;
  make_pipeline(dir.path());
  for (const std::string bad : {"controlnet", "scheduler"}) {
    auto m = discover_model(dir.str(), {bad});
    ASSERT_EQ(m.status().code(), StatusCode::kInvalidConfig) << bad;
    EXPECT_CONTAINS(m.status().message(), "'" + bad + "'");
    for (const char* name : {"unet", "text_encoder", "vae"}) EXPECT_CONTAINS(m.status().message(), name);
  }
}

TEST(Pipeline, a_component_with_only_bin_weights_is_copied_unless_it_is_asked_for) {
  testing::TempDir dir;
  make_pipeline(dir.path());
  json index = json::parse(testing::read_bytes(dir / "model_index.json"));
  index["safety_checker"] = json::array({"stable_diffusion", "StableDiffusionSafetyChecker"});
  testing::write_json(dir / "model_index.json", index);
  testing::write_json(dir / "safety_checker" / "config.json", json::object());
  testing::write_text(dir / "safety_checker" / "pytorch_model.bin", "pickle");

  ASSERT_OK_AND_ASSIGN(ModelSource m, discover_model(dir.str(), {}));
  EXPECT_EQ(component(m, "safety_checker"), nullptr);
  const auto aux = as_set(m.auxiliary_files);
  EXPECT_TRUE(aux.count("safety_checker/pytorch_model.bin"));
  EXPECT_TRUE(aux.count("safety_checker/config.json"));
  ASSERT_OK_AND_ASSIGN(ModelSource all, discover_model(dir.str(), {"all"}));
  EXPECT_EQ(all.components.size(), 3u);

  auto named = discover_model(dir.str(), {"safety_checker"});
  EXPECT_EQ(named.status().code(), StatusCode::kNotImplemented) << named.status().ToString();
  EXPECT_CONTAINS(named.status().message(), "pytorch_model.bin");
}

TEST(Pipeline, without_a_denoiser_the_default_selection_is_invalid_config) {
  testing::TempDir dir;
  make_pipeline(dir.path());
  fs::remove_all(dir / "unet");
  auto m = discover_model(dir.str(), {});
  ASSERT_EQ(m.status().code(), StatusCode::kInvalidConfig);
  EXPECT_CONTAINS(m.status().message(), "vae");
}

}  // namespace
}  // namespace aq
