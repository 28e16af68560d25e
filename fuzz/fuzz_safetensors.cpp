// A .safetensors file through the readers the engine opens a model with: the header parser on its
// own (parse_safetensors_header, the 8-byte length, JSON, dtypes, shapes and data_offsets), then
// the file as a Hugging Face directory (discover_model + open_component_tensors, which validate
// every header and map the file), every tensor's bytes read and, for float dtypes, converted to
// float32 as the engine's row reader does.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <vector>

#include "fuzz_util.h"
#include "io/model_source.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aq;
  if (size >= 8) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
    if (n <= size - 8) {
      std::map<std::string, std::string> meta;
      (void)parse_safetensors_header("fuzz.safetensors", reinterpret_cast<const char*>(data + 8), n, 8 + n,
                                     size - 8 - n, &meta);
    }
  }
  const std::filesystem::path dir = fuzz::scratch_dir() / "model";
  fuzz::write_scratch("model/model.safetensors", data, size);
  auto model = discover_model(dir.string(), {});
  if (!model.ok()) return 0;
  for (const auto& c : model->components) {
    if (!c.selected) continue;
    auto refs = open_component_tensors(c);
    if (!refs.ok()) continue;
    std::vector<float> f;
    for (const TensorRef& r : *refs) {
      const TensorInfo& t = *r.info;
      const uint8_t* p = r.file->data(t);
      volatile uint8_t sink = 0;
      for (uint64_t k = 0; k < t.nbytes; k += 61) sink = static_cast<uint8_t>(sink ^ p[k]);
      if (t.nbytes) sink = static_cast<uint8_t>(sink ^ p[t.nbytes - 1]);
      if (dtype_is_float(t.dtype) && t.numel <= (1u << 16)) {
        f.resize(t.numel);
        convert_to_f32(t.dtype, p, t.numel, f.data());
      }
      r.file->release(t);
    }
  }
  return 0;
}
