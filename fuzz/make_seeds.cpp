// Writes the seed corpora of the fuzz targets with the project's own writers, so nothing binary is
// committed: make_seeds <out dir> creates <out>/<target>/ for every target but
// calibration_parquet (make_calibration_seeds.py writes those with the Python package's writer).
//   safetensors        small valid files (several dtypes, metadata, a 0-d and an empty tensor)
//   weights_parquet    weights.parquet files of small random tensors encoded with every scheme
//                      (affine 2..8 bits, grouped / per channel, symmetric, f32 scales, rotated;
//                      entropy-coded; every ggml type) plus raw tensors and an input_scale, and
//                      one file with its tensors stored in pieces
//   tensor_decode      the same encoded tensors in fuzz_util.h's structured layout
//   export_requantize  those, each with a target-scheme byte in front
//   manifest_json      a manifest, a full engine configuration, a shard index, a model_index.json
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "engine/config.h"
#include "engine/tensor_job.h"
#include "fuzz_util.h"
#include "store/format.h"
#include "store/parquet_sink.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

void put(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << s;
}
void put(const fs::path& p, const std::vector<uint8_t>& b) {
  put(p, std::string(b.begin(), b.end()));
}

std::string safetensors(const json& header, const std::string& data) {
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
  return out + h + data;
}

std::vector<float> random_matrix(uint64_t rows, uint64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<float> w(rows * cols);
  for (auto& x : w) x = nd(rng);
  return w;
}

struct Case {
  std::string name;
  aq::QuantScheme scheme;
  uint64_t rows, cols;
};

std::vector<Case> cases() {
  using namespace aq;
  std::vector<Case> out;
  for (int bits : {2, 3, 4, 5, 6, 8}) {
    QuantScheme s;
    s.bits = bits;
    s.group_size = bits == 3 ? 0 : 32;
    s.symmetric = bits % 2 == 0;
    out.push_back({"int" + std::to_string(bits), s, 6, 96});
  }
  QuantScheme f32;
  f32.bits = 4;
  f32.group_size = 64;
  f32.scale_type = ScaleType::kF32;
  f32.method = ScaleMethod::kMinMax;
  out.push_back({"int4_f32", f32, 5, 128});
  QuantScheme rot;
  rot.bits = 4;
  rot.group_size = 32;
  rot.rotate = true;
  out.push_back({"int4_rot", rot, 4, 128});
  QuantScheme ent;
  ent.kind = SchemeKind::kEntropy;
  ent.bits = 4;
  out.push_back({"entropy4", ent, 40, 64});
  QuantScheme ent2 = ent;
  ent2.bits = 2;
  ent2.rotate = true;
  out.push_back({"entropy2_rot", ent2, 8, 128});
  for (GgmlType t : fuzz::kGgmlTypes) {
    const QuantScheme g = ggml_scheme(t);
    out.push_back({std::string(ggml_traits(t).name), g, 3, 256});
  }
  return out;
}

aq::EncodedTensor encode(const Case& c, uint32_t seed) {
  const std::vector<float> w = random_matrix(c.rows, c.cols, seed);
  aq::RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(w.data());
  src.rows = c.rows;
  src.cols = c.cols;
  src.name = c.name;
  auto r = aq::encode_tensor(src, c.scheme, nullptr);
  if (!r.ok()) {
    std::fprintf(stderr, "make_seeds: %s: %s\n", c.name.c_str(), r.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*r);
}

aq::fuzz::FuzzTensor as_fuzz(const aq::EncodedTensor& e) {
  aq::fuzz::FuzzTensor t;
  t.scheme = e.scheme;
  t.rows = e.rows;
  t.cols = e.cols;
  t.codes = e.codes;
  t.scales = e.scales;
  t.zero_points = e.zero_points;
  if (e.entropy) t.has_entropy = true, t.entropy = *e.entropy;
  return t;
}

// max_piece_bytes: tensors storing more are written in pieces (format version 4), as the engine
// writes big tensors.
void write_weights(const fs::path& path, const std::vector<std::pair<Case, aq::EncodedTensor>>& tensors, bool raw,
                   uint64_t max_piece_bytes = UINT64_MAX) {
  using namespace aq;
  fs::create_directories(path.parent_path());
  auto sink = ParquetSink::Open(path.string(), "unet");
  if (!sink.ok()) std::fprintf(stderr, "%s\n", sink.status().ToString().c_str()), std::exit(1);
  for (const auto& [c, e] : tensors) {
    StoredTensorInfo info;
    info.name = c.name + ".weight";
    info.shape = {static_cast<int64_t>(c.rows), static_cast<int64_t>(c.cols)};
    info.quantized = true;
    info.scheme = e.scheme;
    info.reason = "seed";
    info.cosine = 0.99;
    info.relative_error = 0.1;
    info.sqnr_db = 20;
    info.max_abs_error = 0.01;
    info.stored = e.stored_bytes();
    if (c.name == "int4_f32") info.input_scale.assign(c.cols, 1.5f);
    const Status st = (*sink)->Write(info, e.view(), 1, max_piece_bytes);
    if (!st.ok()) std::fprintf(stderr, "%s\n", st.ToString().c_str()), std::exit(1);
  }
  if (raw) {
    std::vector<uint8_t> f16;
    for (float v : {1.0f, -0.5f, 2.0f, 0.25f}) {
      const uint16_t h = f32_to_f16(v);
      f16.push_back(static_cast<uint8_t>(h)), f16.push_back(static_cast<uint8_t>(h >> 8));
    }
    StoredTensorInfo norm;
    norm.name = "norm.weight";
    norm.shape = {4};
    norm.dtype = DType::kF16;
    norm.reason = "kept: 1-D tensor";
    norm.stored = f16.size();
    (void)(*sink)->Write(norm, TensorPayload{f16, {}, {}}, 1, max_piece_bytes);
    std::vector<uint8_t> ids(16, 0);
    ids[0] = 7, ids[8] = 42;
    StoredTensorInfo pos;
    pos.name = "position_ids";
    pos.shape = {1, 2};
    pos.dtype = DType::kI64;
    pos.reason = "kept: integer";
    pos.stored = ids.size();
    (void)(*sink)->Write(pos, TensorPayload{ids, {}, {}});
  }
  const Status st = (*sink)->Close();
  if (!st.ok()) std::fprintf(stderr, "%s\n", st.ToString().c_str()), std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  aq::fuzz::use_system_memory_pool();
  const fs::path out = argv[1];

  // safetensors
  {
    std::string data(2 * 3 * 4 + 4 * 2 + 2 * 2 + 8, '\0');
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 37 + 11);
    json h = {{"__metadata__", {{"format", "pt"}}},
              {"a.weight", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}},
              {"b.bias", {{"dtype", "BF16"}, {"shape", {4}}, {"data_offsets", {24, 32}}}},
              {"c", {{"dtype", "F16"}, {"shape", {2}}, {"data_offsets", {32, 36}}}},
              {"empty", {{"dtype", "I8"}, {"shape", {0, 5}}, {"data_offsets", {36, 36}}}},
              {"step", {{"dtype", "I64"}, {"shape", json::array()}, {"data_offsets", {36, 44}}}}};
    put(out / "safetensors" / "seed_model", safetensors(h, data));
    json h2 = {{"x", {{"dtype", "F8_E4M3"}, {"shape", {8}}, {"data_offsets", {0, 8}}}},
               {"y", {{"dtype", "F64"}, {"shape", {1}}, {"data_offsets", {8, 16}}}}};
    put(out / "safetensors" / "seed_fp8", safetensors(h2, data.substr(0, 16)));
  }

  // weights_parquet, tensor_decode, export_requantize
  std::vector<std::pair<Case, aq::EncodedTensor>> all;
  uint32_t seed = 1;
  for (const Case& c : cases()) all.emplace_back(c, encode(c, seed++));
  for (size_t i = 0; i < all.size(); ++i) {
    const auto bytes = aq::fuzz::serialize_tensor(as_fuzz(all[i].second));
    put(out / "tensor_decode" / ("seed_" + all[i].first.name), bytes);
    std::vector<uint8_t> ex{static_cast<uint8_t>(i * 5 + 3)};
    ex.insert(ex.end(), bytes.begin(), bytes.end());
    put(out / "export_requantize" / ("seed_" + all[i].first.name), ex);
    write_weights(out / "weights_parquet" / ("seed_" + all[i].first.name), {all[i]}, false);
  }
  write_weights(out / "weights_parquet" / "seed_mixed", {all[0], all[6], all[8], all[12]}, true);
  // every tensor over 96 bytes in pieces: affine 2..8 bits, entropy (pieces of whole chunks), ggml
  write_weights(out / "weights_parquet" / "seed_pieces", {all[0], all[1], all[2], all[6], all[8], all[12]}, true, 96);

  // manifest_json: a manifest (its config a full engine configuration), a shard index, a model_index
  {
    auto cfg = aq::EngineConfig::FromJson(json{{"bit_width", 4}, {"scheme", "q4_k"}, {"skip_patterns", {"norm"}},
                                               {"bit_overrides", json::array({json::array({"attn", 8})})}, {"sensitive_patterns", {"conv_in"}}});
    if (!cfg.ok()) std::fprintf(stderr, "%s\n", cfg.status().ToString().c_str()), std::exit(1);
    json m = {{"format", "arrowquant"},
              {"format_version", 3},
              {"source", {{"path", "model"}, {"layout", "hf_directory"}}},
              {"config", cfg->as_json},
              {"modality", "image"},
              {"components", {{{"name", ""}, {"weights", "weights.parquet"}, {"tensors", 3}}}},
              {"summary", {{"compression_ratio", 3.5}, {"bits_per_weight", 4.5}}}};
    put(out / "manifest_json" / "seed_manifest", m.dump(1));
    auto def = aq::EngineConfig::FromJson(json::object());
    put(out / "manifest_json" / "seed_config", def->as_json.dump());
    put(out / "manifest_json" / "seed_index",
        json{{"metadata", {{"total_size", 8}}}, {"weight_map", {{"w", "model-00001-of-00001.safetensors"}}}}.dump());
    put(out / "manifest_json" / "seed_model_index",
        json{{"_class_name", "DiTPipeline"}, {"unet", {"diffusers", "UNet2DModel"}}, {"scheduler", {"diffusers", "DDIM"}}}
            .dump());
  }
  std::printf("seed corpora written to %s\n", out.c_str());
  return 0;
}
