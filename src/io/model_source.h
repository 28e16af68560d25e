// Finding the weights of a model on disk. Three layouts:
//   a single .safetensors file;
//   a Hugging Face directory: model.safetensors, or shards listed by *.safetensors.index.json;
//   a diffusers pipeline: model_index.json at the root and one folder per component (unet/,
//   transformer/, text_encoder*/, vae/, ...), each with config.json and
//   diffusion_pytorch_model*.safetensors (or model*.safetensors for transformers' classes).
// A model is a list of components (one, named "", for the first two layouts). Everything that is
// not a weight file of a selected component is an auxiliary file, copied to the output so the
// result is a complete model directory.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.h"
#include "io/safetensors.h"

namespace aq {

enum class ModelLayout { kSingleFile, kHfDirectory, kDiffusersPipeline };
const char* layout_name(ModelLayout l);

struct ComponentSource {
  std::string name;                       // "" for a single-model layout, else the folder name
  std::string dir;                        // folder holding config.json ("" for a single file)
  std::vector<std::string> weight_files;  // safetensors files in shard order
  std::string index_file;                 // the *.safetensors.index.json, when sharded
  nlohmann::json config;                  // config.json, or null
  bool selected = false;                  // quantized (true) or copied verbatim (false)
};

struct ModelSource {
  std::string root;  // the path the user gave, made absolute
  ModelLayout layout = ModelLayout::kSingleFile;
  nlohmann::json model_index;  // diffusers' model_index.json, or null
  std::vector<ComponentSource> components;
  // Paths relative to root of every file to copy unchanged into the output.
  std::vector<std::string> auxiliary_files;
};

// `components`: names to quantize; empty selects the denoiser ("unet" or "transformer") of a
// pipeline; {"all"} selects every component with safetensors weights.
Result<ModelSource> discover_model(const std::string& path, const std::vector<std::string>& components);

// One tensor of a component, with the open file that holds it.
struct TensorRef {
  std::shared_ptr<const SafetensorsFile> file;
  const TensorInfo* info = nullptr;
};

// Opens a component's files (validating every header) and lists its tensors: shards in order,
// tensors in file order. A sharded index must agree with the shards: each tensor it names is in
// the file it names, and no shard holds a tensor the index does not list.
Result<std::vector<TensorRef>> open_component_tensors(const ComponentSource& component);

}  // namespace aq
