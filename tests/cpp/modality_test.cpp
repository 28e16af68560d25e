// What a model generates (io/modality.h): from model_index.json / config.json identifiers first,
// then from tensor names.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "io/modality.h"
#include "test_util.h"

namespace aq {
namespace {

using testing::json;

// A single-model source whose one (selected) component has `config`.
ModelSource single(const json& config) {
  ModelSource m;
  m.layout = ModelLayout::kHfDirectory;
  ComponentSource c;
  c.config = config;
  c.selected = true;
  m.components.push_back(std::move(c));
  return m;
}

ModelSource pipeline(const json& model_index, const std::string& denoiser, const json& denoiser_config) {
  ModelSource m;
  m.layout = ModelLayout::kDiffusersPipeline;
  m.model_index = model_index;
  ComponentSource c;
  c.name = denoiser;
  c.config = denoiser_config;
  c.selected = true;
  m.components.push_back(std::move(c));
  return m;
}

TEST(Modality, audioldm_pipeline_is_audio_although_its_denoiser_is_a_unet) {
  const auto m = pipeline({{"_class_name", "AudioLDMPipeline"}, {"unet", json::array({"diffusers", "UNet2DConditionModel"})}},
                          "unet", {{"_class_name", "UNet2DConditionModel"}});
  const ModalityGuess g = detect_modality(m, {"conv_in.weight"});
  EXPECT_EQ(g.modality, "audio");
  EXPECT_CONTAINS(g.evidence, "AudioLDMPipeline");
  EXPECT_CONTAINS(g.evidence, "model_index.json");
}

TEST(Modality, dream_and_llada_model_types_are_text) {
  EXPECT_EQ(detect_modality(single({{"model_type", "Dream"}}), {}).modality, "text");
  EXPECT_EQ(detect_modality(single({{"model_type", "llada"}}), {}).modality, "text");
  EXPECT_EQ(detect_modality(single({{"architectures", json::array({"LLaDAModelLM"})}}), {}).modality, "text");
  const ModalityGuess g = detect_modality(single({{"model_type", "Dream"}}), {"conv_in.weight"});
  EXPECT_EQ(g.modality, "text") << "a config outranks tensor names";
  EXPECT_CONTAINS(g.evidence, "Dream");
}

TEST(Modality, diffucoder_built_on_dream_is_code) {
  const json cfg = {{"architectures", json::array({"DreamModel"})},
                    {"model_type", "Dream"},
                    {"_name_or_path", "apple/DiffuCoder-7B-Instruct"}};
  const ModalityGuess g = detect_modality(single(cfg), {"model.embed_tokens.weight"});
  EXPECT_EQ(g.modality, "code");
  EXPECT_CONTAINS(g.evidence, "DiffuCoder");
}

TEST(Modality, a_repository_name_does_not_override_the_model_class) {
  // DreamShaper is a Stable Diffusion fine-tune: "dream" in its name does not make it a Dream LM.
  const auto m = pipeline({{"_class_name", "StableDiffusionPipeline"}, {"_name_or_path", "Lykon/DreamShaper"}},
                          "unet", {{"_class_name", "UNet2DConditionModel"}, {"_name_or_path", "Lykon/DreamShaper"}});
  const ModalityGuess g = detect_modality(m, {"conv_in.weight"});
  EXPECT_EQ(g.modality, "image");
  EXPECT_EQ(detect_modality(single({{"_class_name", "UNet2DConditionModel"}, {"_name_or_path", "me/music-sd"}}), {}).modality,
            "image");
  // with no class at all, the name is still evidence
  EXPECT_EQ(detect_modality(single({{"_name_or_path", "GSAI-ML/LLaDA-8B-Base"}}), {}).modality, "text");
}

TEST(Modality, unet2d_condition_model_is_image) {
  const ModalityGuess g = detect_modality(single({{"_class_name", "UNet2DConditionModel"}}), {});
  EXPECT_EQ(g.modality, "image");
  EXPECT_CONTAINS(g.evidence, "UNet2DConditionModel");
}

TEST(Modality, autoencoder_kl_alone_is_image_not_code) {
  const json cfg = {{"_class_name", "AutoencoderKL"}, {"_diffusers_version", "0.30.0"},
                    {"down_block_types", json::array({"DownEncoderBlock2D"})}};
  const ModalityGuess g = detect_modality(single(cfg), {"encoder.conv_in.weight", "decoder.conv_out.weight"});
  EXPECT_NE(g.modality, "code");
  EXPECT_EQ(g.modality, "image");
}

TEST(Modality, falls_back_to_tensor_names) {
  EXPECT_EQ(detect_modality(single(nullptr), {"model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"}).modality,
            "text");
  const ModalityGuess g = detect_modality(single(json::object()), {"time_embedding.linear_1.weight", "conv_in.weight"});
  EXPECT_EQ(g.modality, "image");
  EXPECT_CONTAINS(g.evidence, "conv_in.weight");
  // an identifier that says nothing leaves the decision to the tensor names
  EXPECT_EQ(detect_modality(single({{"model_type", "custom"}}), {"lm_head.weight"}).modality, "text");
}

TEST(Modality, nothing_telling_is_unknown) {
  EXPECT_EQ(detect_modality(single(nullptr), {}).modality, "unknown");
  EXPECT_EQ(detect_modality(single({{"hidden_size", 64}}), {"layers.0.weight", "blocks.1.bias"}).modality, "unknown");
  EXPECT_EQ(detect_modality(ModelSource{}, {}).modality, "unknown");
}

TEST(Modality, unselected_components_still_inform_the_guess) {
  ModelSource m = pipeline(json::object(), "transformer", json::object());
  ComponentSource vae;
  vae.name = "vae";
  vae.config = {{"_class_name", "AutoencoderKL"}};
  m.components.push_back(vae);
  EXPECT_EQ(detect_modality(m, {}).modality, "image");
}

TEST(Modality, classifies_single_identifiers) {
  EXPECT_EQ(modality_of_identifier("AudioLDM2Pipeline"), "audio");
  EXPECT_EQ(modality_of_identifier("StableAudioPipeline"), "audio");
  EXPECT_EQ(modality_of_identifier("FluxTransformer2DModel"), "image");
  EXPECT_EQ(modality_of_identifier("GSAI-ML/LLaDA-8B-Instruct"), "text");
  EXPECT_EQ(modality_of_identifier("apple/DiffuCoder-7B-cpGRPO"), "code");
  EXPECT_EQ(modality_of_identifier("AutoencoderKL"), "image");
  EXPECT_EQ(modality_of_identifier("BertModel"), "");
  EXPECT_EQ(modality_of_identifier(""), "");
}

}  // namespace
}  // namespace aq
