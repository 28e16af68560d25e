#include "io/modality.h"

#include <algorithm>
#include <cctype>
#include <optional>
#include <utility>

namespace aq {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool contains(const std::string& s, const char* needle) { return s.find(needle) != std::string::npos; }

// Checked in order: code before text (DiffuCoder is built on Dream), audio before image
// (AudioLDM and Stable Audio use UNet/DiT denoisers too).
const std::pair<const char*, const char*> kIdentifierRules[] = {
    {"diffucoder", "code"},  {"dreamcoder", "code"},   {"dream-coder", "code"},
    {"audioldm", "audio"},   {"stableaudio", "audio"}, {"stable_audio", "audio"}, {"musicldm", "audio"},
    {"dancediffusion", "audio"}, {"audio", "audio"},   {"music", "audio"},
    {"llada", "text"},       {"dream", "text"},        {"mdlm", "text"},         {"sedd", "text"},
    {"masked_diffusion", "text"}, {"maskeddiffusion", "text"},
    {"unet2d", "image"},     {"unet3d", "image"},      {"dit", "image"},         {"flux", "image"},
    {"sd3", "image"},        {"stablediffusion", "image"}, {"pixart", "image"}, {"sana", "image"},
    {"transformer2d", "image"}, {"hunyuan", "image"}, {"kandinsky", "image"},  {"latte", "image"},
    {"cogvideo", "image"},   {"wan", "image"},         {"ltx", "image"},        {"mochi", "image"},
    {"autoencoderkl", "image"}, {"vqmodel", "image"},
};

// Tensor-name hints, weaker than any config: token embeddings and LM heads mean a language
// model; convolutions over latents and patch embedders mean images.
const std::pair<const char*, const char*> kTensorRules[] = {
    {"embed_tokens", "text"}, {"lm_head", "text"}, {"wte.", "text"}, {"word_embeddings", "text"},
    {"conv_in.", "image"},    {"x_embedder", "image"}, {"patch_embed", "image"}, {"pos_embed", "image"},
    {"down_blocks.", "image"},
};

struct Identifier {
  std::string id;
  std::string where;
  bool is_name = false;  // a repository or folder name (_name_or_path), not a class
};

void add_identifiers(const nlohmann::json& j, const std::string& where, std::vector<Identifier>* out) {
  if (!j.is_object()) return;
  for (const char* key : {"_class_name", "model_type", "_name_or_path"}) {
    auto it = j.find(key);
    if (it != j.end() && it->is_string())
      out->push_back({it->get<std::string>(), where + " " + key, std::string(key) == "_name_or_path"});
  }
  auto arch = j.find("architectures");
  if (arch != j.end() && arch->is_array())
    for (const auto& a : *arch)
      if (a.is_string()) out->push_back({a.get<std::string>(), where + " architectures", false});
  auto auto_map = j.find("auto_map");  // remote-code models (Dream, LLaDA) name their classes here
  if (auto_map != j.end() && auto_map->is_object())
    for (auto it = auto_map->begin(); it != auto_map->end(); ++it)
      if (it->is_string()) out->push_back({it->get<std::string>(), where + " auto_map", false});
}

}  // namespace

std::string modality_of_identifier(const std::string& identifier) {
  const std::string id = lower(identifier);
  for (const auto& [needle, modality] : kIdentifierRules)
    if (contains(id, needle)) return modality;
  return "";
}

ModalityGuess detect_modality(const ModelSource& model, const std::vector<std::string>& tensor_names) {
  std::vector<Identifier> ids;
  add_identifiers(model.model_index, "model_index.json", &ids);
  for (const auto& c : model.components)
    if (c.selected) add_identifiers(c.config, (c.name.empty() ? "" : c.name + "/") + "config.json", &ids);
  for (const auto& c : model.components)
    if (!c.selected) add_identifiers(c.config, c.name + "/config.json", &ids);
  // Rule-major: a more specific rule (code, audio) wins over a generic one (text, image) even
  // when the generic one matches an identifier seen earlier.
  auto match = [&](bool names) -> std::optional<ModalityGuess> {
    for (const auto& [needle, modality] : kIdentifierRules)
      for (const auto& i : ids)
        if (i.is_name == names && contains(lower(i.id), needle)) return ModalityGuess{modality, i.where + "=" + i.id};
    return std::nullopt;
  };
  // Class names outrank repository names, which are free text ("Lykon/DreamShaper" is a Stable
  // Diffusion fine-tune, not a Dream LM). A name only refines text to code: DiffuCoder's classes
  // are Dream's.
  const auto by_class = match(false), by_name = match(true);
  if (by_class) {
    if (by_name && by_class->modality == "text" && by_name->modality == "code") return *by_name;
    return *by_class;
  }
  if (by_name) return *by_name;
  for (const auto& [needle, modality] : kTensorRules)
    for (const auto& n : tensor_names)
      if (contains(n, needle)) return {modality, "tensor name " + n};
  return {"unknown", "no config.json or model_index.json names a known model class, and no tensor name is telling"};
}

}  // namespace aq
