// validate_quality: recomputes every figure from the files on disk, trusting nothing that the
// quantizer recorded. Each stored tensor is decoded block by block (the same row blocks the
// engine used, so a faithful file reproduces the recorded metrics bit for bit) and compared with
// the source tensor; kept tensors must be byte-identical to the source.
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>

#include "common/thread_pool.h"
#include "engine/engine.h"
#include "engine/tensor_job.h"
#include "io/model_source.h"
#include "quant/metrics.h"
#include "quant/tensor_codec.h"
#include "store/format.h"
#include "store/manifest.h"
#include "store/parquet_source.h"

namespace aq {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct LayerCheck {
  ErrorStats stats;
  Status status;
  bool identical = true;  // raw tensors: bytes equal to the source
};

LayerCheck check_tensor(const ParquetSource& src, std::mutex& read_mu, size_t index, const TensorRef& ref) {
  LayerCheck out;
  const StoredTensorInfo& info = src.tensors()[index];
  const TensorInfo& orig = *ref.info;
  const std::string where = StrCat(src.path(), ": tensor '", info.name, "'");
  if (orig.shape != info.shape || orig.dtype != info.dtype) {
    out.status = ValidationFailure(StrCat(where, ": stored as ", dtype_name(info.dtype), " ",
                                          shape_to_string(info.shape), " but the original is ",
                                          dtype_name(orig.dtype), " ", shape_to_string(orig.shape)));
    return out;
  }
  const uint8_t* source = ref.file->data(orig);
  const uint64_t cols = info.cols();
  const uint64_t row_bytes = cols * dtype_size(orig.dtype);
  // The engine's own row blocks (for entropy-coded tensors also the chunk size), so a faithful
  // file reproduces the recorded statistics bit for bit. A tensor stored in pieces is read one
  // piece at a time (its pieces are whole blocks).
  const uint64_t block = rows_per_block(cols);
  std::vector<float> w, d;
  for (size_t k = 0; k < info.pieces.size(); ++k) {
    const StoredPiece& piece = info.pieces[k];
    Result<LoadedTensor> loaded = [&] {
      std::lock_guard<std::mutex> lock(read_mu);  // one Parquet reader, read serially
      return src.read_piece(index, k);
    }();
    if (!loaded.ok()) {
      out.status = loaded.status();
      return out;
    }
    const TensorPayload& p = loaded->payload;
    const uint8_t* piece_source = source + piece.row_start * row_bytes;
    if (!info.quantized) {
      const uint64_t n = piece.row_count * row_bytes;
      out.identical = out.identical && p.codes.size() == n && (n == 0 || std::memcmp(p.codes.data(), piece_source, n) == 0);
      ref.file->release(orig, piece.row_start * row_bytes, n);
      continue;
    }
    for (uint64_t r0 = 0; r0 < piece.row_count; r0 += block) {
      const uint64_t nr = std::min(block, piece.row_count - r0);
      w.resize(nr * cols);
      d.resize(nr * cols);
      convert_to_f32(orig.dtype, piece_source + r0 * row_bytes, nr * cols, w.data());
      Status st = decode_rows(info.scheme, piece.row_count, cols, p, r0, nr, d.data());
      if (!st.ok()) {
        out.status = st.WithPrefix(where + ": ");
        return out;
      }
      apply_input_scale(info, d.data(), nr);  // the effective weight
      ErrorStats block_stats;
      block_stats.add(w.data(), d.data(), nr * cols);
      out.stats.merge(block_stats);
      // the block's source pages go back to the OS now, not when the whole tensor is done
      ref.file->release(orig, (piece.row_start + r0) * row_bytes, nr * row_bytes);
    }
  }
  if (!info.quantized) out.stats.count = orig.numel;
  ref.file->release(orig);
  return out;
}

}  // namespace

Result<json> validate_model(const std::string& original_path, const std::string& quantized_path,
                            int num_threads, const RunHooks& hooks) {
  const auto start = std::chrono::steady_clock::now();
  AQ_ASSIGN_OR_RETURN(json manifest, read_manifest(quantized_path));
  const double min_accuracy = manifest.value("min_accuracy", 0.0);
  std::vector<std::string> wanted;
  for (const auto& c : manifest["components"])
    if (!c["name"].get<std::string>().empty()) wanted.push_back(c["name"].get<std::string>());
  AQ_ASSIGN_OR_RETURN(ModelSource model, discover_model(original_path, wanted));

  ThreadPool pool(num_threads);
  json layers = json::array(), per_layer = json::object(), failures = json::array();
  uint64_t source_bytes = 0, stored_bytes = 0, quantized = 0;
  double cos_sum = 0, cos_min = 1.0;
  bool passed = true;
  for (const auto& mc : manifest["components"]) {
    const std::string name = mc["name"].get<std::string>();
    const ComponentSource* comp = nullptr;
    for (const auto& c : model.components)
      if (c.name == name) comp = &c;
    if (!comp) return ValidationFailure(StrCat(original_path, ": has no component '", name, "' that ", quantized_path, " holds"));
    AQ_ASSIGN_OR_RETURN(auto refs, open_component_tensors(*comp));
    std::map<std::string, const TensorRef*> by_name;
    for (const auto& r : refs) by_name[r.info->name] = &r;
    const std::string weights = (fs::path(quantized_path) / mc["weights"].get<std::string>()).string();
    AQ_ASSIGN_OR_RETURN(auto src, ParquetSource::Open(weights));
    const auto& infos = src->tensors();
    for (const auto& info : infos)
      if (!by_name.count(info.name))
        return ValidationFailure(StrCat(weights, ": tensor '", info.name, "' is not in the original model ", original_path));
    for (const auto& r : refs)
      if (!src->find(r.info->name))
        return ValidationFailure(StrCat(weights, ": the original's tensor '", r.info->name, "' is missing"));

    std::vector<LayerCheck> checks(infos.size());
    std::mutex read_mu;
    WaitGroup wg;
    wg.add(static_cast<int>(infos.size()));
    std::atomic<uint64_t> done{0};
    for (size_t i = 0; i < infos.size(); ++i)
      pool.submit([&, i] {
        checks[i] = check_tensor(*src, read_mu, i, *by_name.at(infos[i].name));
        done.fetch_add(1);
        wg.done();
      });
    auto last = std::chrono::steady_clock::now();
    while (!wg.wait_for(0.1)) {
      if (hooks.should_stop && hooks.should_stop()) {
        wg.wait();
        return Cancelled("validation interrupted");
      }
      if (hooks.progress && std::chrono::duration<double>(std::chrono::steady_clock::now() - last).count() >=
                                hooks.progress_interval_s) {
        last = std::chrono::steady_clock::now();
        ProgressEvent e;
        e.tensors_done = done.load();
        e.tensors_total = infos.size();
        e.weights_done = e.tensors_done;
        e.weights_total = infos.size();
        e.current = name;
        hooks.progress(e);
      }
    }
    for (size_t i = 0; i < infos.size(); ++i) {
      const auto& info = infos[i];
      AQ_RETURN_IF_ERROR(checks[i].status);
      const std::string qualified = name.empty() ? info.name : name + "/" + info.name;
      source_bytes += info.source_bytes();
      stored_bytes += info.stored_bytes();
      json layer = {{"name", qualified}, {"quantized", info.quantized}};
      if (info.quantized) {
        const double cos = checks[i].stats.cosine();
        layer["cosine_similarity"] = cos;
        layer["relative_error"] = checks[i].stats.relative_error();
        layer["sqnr_db"] = checks[i].stats.sqnr_db();
        layer["bits"] = info.scheme.bits;
        layer["recorded_cosine_similarity"] = info.cosine;
        layer["matches_recorded"] = cos == info.cosine;
        per_layer[qualified] = cos;
        ++quantized;
        cos_sum += cos;
        cos_min = std::min(cos_min, cos);
        if (cos < min_accuracy) {
          passed = false;
          failures.push_back({{"name", qualified}, {"reason", StrCat("cosine ", cos, " < min_accuracy ", min_accuracy)}});
        }
      } else {
        layer["identical_to_source"] = checks[i].identical;
        if (!checks[i].identical) {
          passed = false;
          failures.push_back({{"name", qualified}, {"reason", "kept tensor differs from the source bytes"}});
        }
      }
      layers.push_back(std::move(layer));
    }
  }
  json report = {
      {"original_path", original_path},
      {"quantized_path", quantized_path},
      {"cosine_similarity", quantized ? cos_sum / static_cast<double>(quantized) : 1.0},
      {"min_cosine_similarity", quantized ? cos_min : 1.0},
      {"per_layer_accuracy", per_layer},
      {"layers", layers},
      {"passed", passed},
      {"failures", failures},
      {"min_accuracy", min_accuracy},
      {"compression_ratio", stored_bytes ? static_cast<double>(source_bytes) / static_cast<double>(stored_bytes) : 1.0},
      {"source_weight_bytes", source_bytes},
      {"quantized_weight_bytes", stored_bytes},
      {"quantized_layers", quantized},
      {"validation_time_s", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()},
  };
  return report;
}

}  // namespace aq
