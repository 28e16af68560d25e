// JSON inputs: one input is used as each JSON file the C++ reads --
//   manifest.json of a quantized directory (read_manifest), and its "config" through
//   EngineConfig::FromJson (the configuration the Python API hands to the engine; validate and
//   the loader read the manifest's copy), with the parsed configuration's scheme choices;
//   the input itself as an engine configuration (EngineConfig::FromJson);
//   model.safetensors.index.json of a sharded Hugging Face directory and model_index.json of a
//   diffusers pipeline, next to a valid shard (discover_model + open_component_tensors).
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/config.h"
#include "fuzz_util.h"
#include "io/model_source.h"
#include "store/manifest.h"

namespace {

// A valid one-tensor safetensors file.
std::string tiny_safetensors() {
  std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  while (header.size() % 8) header += ' ';
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += header;
  const float w[2] = {1.0f, -2.0f};
  out.append(reinterpret_cast<const char*>(w), sizeof(w));
  return out;
}

void write(const std::string& rel, const std::string& s) {
  aq::fuzz::write_scratch(rel, reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

void use_config(const aq::EngineConfig& c) {
  for (int bits : {2, 3, 4, 8, c.bit_width})
    for (uint64_t cols : {uint64_t{0}, uint64_t{32}, uint64_t{100}, uint64_t{256}}) {
      (void)c.scheme(bits, 16, cols);
      std::string note;
      (void)c.ggml_type_for(bits, cols, &note);
    }
  (void)c.as_json.dump();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  write("hf/model-00001-of-00001.safetensors", tiny_safetensors());
  write("pipe/unet/diffusion_pytorch_model.safetensors", tiny_safetensors());
  write("pipe/unet/config.json", "{}");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aq;
  namespace fs = std::filesystem;
  const fs::path& dir = fuzz::scratch_dir();
  fuzz::write_scratch("q/manifest.json", data, size);
  if (auto m = read_manifest((dir / "q").string()); m.ok()) {
    if (auto it = m->find("config"); it != m->end())
      if (auto c = EngineConfig::FromJson(*it); c.ok()) use_config(*c);
  }
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (!j.is_discarded())
    if (auto c = EngineConfig::FromJson(j); c.ok()) use_config(*c);

  fuzz::write_scratch("hf/model.safetensors.index.json", data, size);
  if (auto model = discover_model((dir / "hf").string(), {}); model.ok())
    for (const auto& c : model->components) (void)open_component_tensors(c);
  fuzz::write_scratch("pipe/model_index.json", data, size);
  for (const std::vector<std::string>& sel : {std::vector<std::string>{}, std::vector<std::string>{"all"}})
    if (auto model = discover_model((dir / "pipe").string(), sel); model.ok())
      for (const auto& c : model->components)
        if (c.selected) (void)open_component_tensors(c);
  return 0;
}
