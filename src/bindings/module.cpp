// The Python binding: converts types, releases the GIL around engine work, and turns Status
// errors into the package's exceptions (arrow_quant_v2.errors). No algorithm lives here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <mutex>
#include <cstring>
#include <optional>
#include <regex>
#include <stdexcept>

#include "common/strcat.h"
#include "common/thread_pool.h"
#include "engine/array_quantizer.h"
#include "engine/config.h"
#include "engine/engine.h"
#include "engine/plan.h"
#include "engine/tensor_job.h"
#include "io/modality.h"
#include "io/model_source.h"
#include "quant/decode_into.h"
#include "quant/hadamard.h"
#include "quant/pack.h"
#include "quant/rans.h"
#include "quant/tensor_codec.h"
#include "store/calibration.h"
#include "store/parquet_source.h"

namespace nb = nanobind;
using nlohmann::json;

namespace {

// Carries a Status across the binding; the translator below raises the matching Python class.
struct CoreError : std::runtime_error {
  CoreError(aq::StatusCode c, const std::string& m) : std::runtime_error(m), code(c) {}
  aq::StatusCode code;
};

[[noreturn]] void raise(const aq::Status& st) {
  if (st.code() == aq::StatusCode::kCancelled) {
    PyErr_SetString(PyExc_KeyboardInterrupt, st.message().c_str());
    throw nb::python_error();
  }
  throw CoreError(st.code(), st.message());
}

template <typename T>
T unwrap(aq::Result<T> r) {
  if (!r.ok()) raise(r.status());
  return std::move(r).value();
}

const char* exception_class(aq::StatusCode code) {
  switch (code) {
    case aq::StatusCode::kInvalidConfig: return "ConfigurationError";
    case aq::StatusCode::kNotFound: return "ModelNotFoundError";
    case aq::StatusCode::kFormatError: return "ModelFormatError";
    case aq::StatusCode::kNonFinite: return "NonFiniteWeightError";
    case aq::StatusCode::kValidation: return "ValidationError";
    case aq::StatusCode::kNotImplemented: return "UnsupportedFeatureError";
    default: return "QuantizationError";
  }
}

aq::EngineConfig parse_config(const std::string& text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) raise(aq::InvalidConfig("configuration is not valid JSON"));
  return unwrap(aq::EngineConfig::FromJson(j));
}

// Hooks that call back into Python. The engine calls them on this (the calling) thread with
// the GIL released; each call takes the GIL for its own duration.
struct PythonHooks {
  aq::RunHooks hooks;
  std::atomic<bool> interrupted{false};

  PythonHooks(nb::object progress, int every, double interval) {
    hooks.progress_every_tensors = every;
    hooks.progress_interval_s = interval;
    if (!progress.is_none()) {
      hooks.progress = [this, progress](const aq::ProgressEvent& e) {
        nb::gil_scoped_acquire gil;
        try {
          // The Python side returns True to ask for a stop (Ctrl-C inside the callback).
          nb::object stop = progress(e.tensors_done, e.tensors_total, e.weights_done, e.weights_total,
                                     e.elapsed_s, e.eta_s, e.current);
          if (nb::isinstance<nb::bool_>(stop) && nb::cast<bool>(stop)) interrupted = true;
        } catch (nb::python_error& err) {
          err.discard_as_unraisable("arrow_quant_v2 progress callback");
        }
      };
    }
    hooks.should_stop = [this] {
      if (interrupted) return true;
      nb::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) {
        PyErr_Clear();
        interrupted = true;
      }
      return interrupted.load();
    };
  }
};

nb::bytes to_bytes(std::span<const uint8_t> s) { return nb::bytes(s.data(), s.size()); }

std::span<const uint8_t> as_span(const nb::bytes& b) {
  return {static_cast<const uint8_t*>(b.data()), b.size()};
}

nb::ndarray<nb::numpy, float> float_array(std::vector<float>&& v, const std::vector<size_t>& shape) {
  auto* heap = new std::vector<float>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  return nb::ndarray<nb::numpy, float>(heap->data(), shape.size(), shape.data(), owner);
}

aq::QuantScheme scheme_from(int bits, int group_size, bool symmetric, const std::string& scale_type,
                            const std::string& method, const std::string& kind = "affine", bool rotate = false,
                            double target_bpw = 0) {
  aq::QuantScheme s;
  s.bits = bits;
  s.group_size = group_size;
  s.symmetric = symmetric;
  if (scale_type == "f16") s.scale_type = aq::ScaleType::kF16;
  else if (scale_type == "f32") s.scale_type = aq::ScaleType::kF32;
  else raise(aq::InvalidConfig("scale_type must be 'f16' or 'f32', got '" + scale_type + "'"));
  if (method == "search") s.method = aq::ScaleMethod::kSearch;
  else if (method == "minmax") s.method = aq::ScaleMethod::kMinMax;
  else raise(aq::InvalidConfig("scale_method must be 'search' or 'minmax', got '" + method + "'"));
  if (kind == "affine") s.kind = aq::SchemeKind::kAffine;
  else if (kind == "entropy") s.kind = aq::SchemeKind::kEntropy;
  else if (auto t = aq::parse_ggml_type(kind)) s = aq::ggml_scheme(*t);
  else raise(aq::InvalidConfig("scheme must be 'affine', 'entropy' or a ggml type (q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, iq4_xs, iq4_nl), got '" + kind + "'"));
  s.rotate = rotate;
  s.target_bpw = target_bpw;
  if (auto st = aq::validate_scheme(s); !st.ok()) raise(st);
  return s;
}

void put_scheme(nb::dict& d, const aq::QuantScheme& s, uint64_t cols) {
  d["scheme_kind"] = aq::scheme_kind_name(s.kind);
  d["bits"] = s.bits;
  d["group_size"] = s.group_size;
  d["symmetric"] = s.symmetric;
  d["scale_type"] = aq::scale_type_name(s.scale_type);
  d["scale_method"] = aq::scale_method_name(s.method);
  d["rotation"] = s.rotate ? aq::rotation_block(cols) : 1;
  d["scheme"] = aq::scheme_name(s);
  if (s.kind == aq::SchemeKind::kEntropy) d["target_bits_per_weight"] = s.entropy_budget();
  if (s.kind == aq::SchemeKind::kGgml) d["ggml_type"] = aq::ggml_traits(s.ggml).ggml_name;
}

void put_entropy(nb::dict& d, const aq::EntropySide* e) {
  if (!e) {
    d["entropy"] = nb::none();
    return;
  }
  nb::dict t;
  t["symbol_min"] = e->symbol_min;
  t["frequencies"] = nb::cast(e->frequencies);
  t["escape_symbol"] = e->escape_symbol;
  t["chunk_rows"] = e->chunk_rows;
  t["chunk_offsets"] = nb::cast(e->chunk_offsets);
  t["centroids"] = nb::cast(e->centroids);
  d["entropy"] = t;
}

// An encoded in-memory tensor (ArrowQuantV2.quantize, benchmarks): its stored form, its error
// figures, and decoding with the same functions the loader uses.
class Encoded {
 public:
  explicit Encoded(aq::EncodedTensor t) : t_(std::move(t)) {
    if (t_.scheme.kind == aq::SchemeKind::kEntropy) table_ = unwrap(aq::make_decode_table(t_.view()));
  }
  uint64_t rows() const { return t_.rows; }
  uint64_t cols() const { return t_.cols; }
  nb::bytes codes() const { return to_bytes(t_.codes); }
  nb::bytes scales() const { return to_bytes(t_.scales); }
  nb::object zero_points() const { return t_.zero_points.empty() ? nb::none() : nb::object(to_bytes(t_.zero_points)); }
  uint64_t stored_bytes() const { return t_.stored_bytes(); }
  nb::dict info() const {
    nb::dict d;
    put_scheme(d, t_.scheme, t_.cols);
    put_entropy(d, t_.entropy ? &*t_.entropy : nullptr);
    d["stored_bytes"] = t_.stored_bytes();
    d["bits_per_weight"] = t_.rows * t_.cols ? 8.0 * static_cast<double>(t_.stored_bytes()) / static_cast<double>(t_.rows * t_.cols) : 0.0;
    d["cosine_similarity"] = t_.stats.cosine();
    d["relative_error"] = t_.stats.relative_error();
    d["sqnr_db"] = t_.stats.sqnr_db();
    d["max_abs_error"] = t_.stats.max_abs_err;
    return d;
  }
  nb::ndarray<nb::numpy, float> decode() const {
    std::vector<float> out(t_.rows * t_.cols);
    aq::Status st;
    {
      nb::gil_scoped_release release;
      st = aq::decode_tensor(t_.scheme, t_.rows, t_.cols, view(), out.data());
    }
    if (!st.ok()) raise(st);
    return float_array(std::move(out), {static_cast<size_t>(t_.rows), static_cast<size_t>(t_.cols)});
  }
  // Rows [r0, r0 + nr) into out (nr x cols float32, C order); r0 and nr in whole decoding units.
  void decode_rows(uint64_t r0, uint64_t nr, nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu> out) const {
    if (out.shape(0) != nr || out.shape(1) != t_.cols || r0 + nr > t_.rows)
      raise(aq::InvalidConfig("decode_rows: out must be (nr, cols) and the rows inside the tensor"));
    const uint64_t unit = aq::decode_granularity(t_.scheme, view());
    if (r0 % unit != 0 || (nr % unit != 0 && r0 + nr != t_.rows))
      raise(aq::InvalidConfig("decode_rows: rows must start and end on multiples of " + std::to_string(unit)));
    aq::Status st;
    {
      nb::gil_scoped_release release;
      st = aq::decode_rows(t_.scheme, t_.rows, t_.cols, view(), r0, nr, out.data());
    }
    if (!st.ok()) raise(st);
  }
  uint64_t decode_granularity() const { return aq::decode_granularity(t_.scheme, view()); }

 private:
  aq::EncodedView view() const {
    aq::EncodedView v = t_.view();
    v.table = table_.get();
    return v;
  }
  aq::EncodedTensor t_;
  std::shared_ptr<const aq::FrequencyTable> table_;
};

nb::dict info_dict(const aq::StoredTensorInfo& t) {
  nb::dict d;
  d["name"] = t.name;
  d["shape"] = nb::cast(t.shape);
  d["dtype"] = std::string(aq::dtype_name(t.dtype));
  d["quantized"] = t.quantized;
  d["reason"] = t.reason;
  d["rejected_bits"] = nb::cast(t.rejected_bits);
  d["source_bytes"] = t.source_bytes();
  d["stored_bytes"] = t.stored_bytes();
  if (t.quantized) {
    put_scheme(d, t.scheme, t.cols());
    d["cosine_similarity"] = t.cosine;
    d["relative_error"] = t.relative_error;
    d["sqnr_db"] = t.sqnr_db;
    d["max_abs_error"] = t.max_abs_error;
  }
  d["equalized"] = !t.input_scale.empty();
  nb::list pieces;  // (row_start, row_count) of each stored piece, in row order
  for (const auto& p : t.pieces) pieces.append(nb::make_tuple(p.row_start, p.row_count));
  d["pieces"] = pieces;
  return d;
}

// The worker threads the runtime decodes layers on (one per hardware thread; the calling thread
// takes a share too). Created on first use, never torn down while the module lives.
aq::ThreadPool& runtime_pool() {
  static aq::ThreadPool* pool = new aq::ThreadPool(0);
  return *pool;
}

// One quantized layer's stored bytes, kept in memory for the PyTorch runtime, which decodes
// them into a scratch tensor before every dense op (arrow_quant_v2.runtime).
class PackedLayer {
 public:
  // Its bytes in buffers of their exact size (ParquetSource::read_owned for a whole tensor: Arrow's
  // binary column buffers are grown by doubling and would stay resident at up to twice the
  // stored size; a tensor stored in pieces is appended piece after piece, never gathered beside
  // its copy). rows: the rows they hold (the tensor's, or one piece's).
  PackedLayer(aq::OwnedTensor t, const aq::StoredTensorInfo& info, uint64_t rows, std::string where)
      : data_(std::move(t)), scheme_(info.scheme), rows_(rows), cols_(info.cols()), where_(std::move(where)) {
    if (auto st = aq::check_encoded(scheme_, rows_, cols_, view()); !st.ok()) raise(st.WithPrefix(where_ + ": "));
    if (scheme_.kind == aq::SchemeKind::kEntropy && !data_.table) data_.table = unwrap(aq::make_decode_table(view()));
  }
  // One piece's rows, copied out of the reader's buffers (which are then let go).
  PackedLayer(aq::LoadedTensor t, const aq::StoredTensorInfo& info, uint64_t rows, std::string where)
      : PackedLayer(aq::OwnedTensor{{t.payload.codes.begin(), t.payload.codes.end()},
                                    {t.payload.scales.begin(), t.payload.scales.end()},
                                    {t.payload.zero_points.begin(), t.payload.zero_points.end()},
                                    std::move(t.entropy), std::move(t.table)},
                    info, rows, std::move(where)) {}
  uint64_t rows() const { return rows_; }
  uint64_t cols() const { return cols_; }
  // Bytes held: codes, scales and zero points (entropy side tables not counted).
  uint64_t nbytes() const { return data_.codes.size() + data_.scales.size() + data_.zero_points.size(); }

  // Decodes every value into out: a C-contiguous CPU array (numpy or torch) of rows * cols
  // float32, float16 or bfloat16 values, on `threads` threads (<= 1: this thread only).
  void decode_into(nb::ndarray<nb::device::cpu, nb::c_contig> out, int threads) const {
    const aq::OutType t = out_type(out, "decode_into");
    if (out.size() != rows_ * cols_)
      raise(aq::InvalidConfig(aq::StrCat(where_, ": decode_into: out holds ", out.size(), " values, the tensor ", rows_ * cols_)));
    aq::Status st;
    {
      nb::gil_scoped_release release;
      st = aq::decode_into(scheme_, rows_, cols_, view(), t, out.data(), threads > 1 ? &runtime_pool() : nullptr,
                           threads);
    }
    if (!st.ok()) raise(st.WithPrefix(where_ + ": "));
  }

  // Rows [r0, r0 + nr) into out (nr * cols values), on this thread: embedding lookups.
  void decode_rows_into(nb::ndarray<nb::device::cpu, nb::c_contig> out, uint64_t r0, uint64_t nr) const {
    const aq::OutType t = out_type(out, "decode_rows_into");
    if (out.size() != nr * cols_)
      raise(aq::InvalidConfig(aq::StrCat(where_, ": decode_rows_into: out holds ", out.size(), " values, ", nr,
                                         " rows ", nr * cols_)));
    aq::Status st;
    {
      nb::gil_scoped_release release;
      st = aq::decode_rows_into(scheme_, rows_, cols_, view(), t, r0, nr, out.data());
    }
    if (!st.ok()) raise(st.WithPrefix(where_ + ": "));
  }
  uint64_t decode_granularity() const { return aq::decode_granularity(scheme_, view()); }

 private:
  aq::OutType out_type(const nb::ndarray<nb::device::cpu, nb::c_contig>& out, const char* what) const {
    const auto dt = out.dtype();
    if (dt == nb::dtype<float>()) return aq::OutType::kF32;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16 && dt.lanes == 1) return aq::OutType::kF16;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1) return aq::OutType::kBF16;
    raise(aq::InvalidConfig(where_ + ": " + what + ": out must be float32, float16 or bfloat16"));
  }
  aq::EncodedView view() const { return data_.view(); }
  aq::OwnedTensor data_;
  aq::QuantScheme scheme_;
  uint64_t rows_, cols_;
  std::string where_;
};

class WeightsReader {
 public:
  explicit WeightsReader(const std::string& path) : src_(unwrap(aq::ParquetSource::Open(path))) {}

  nb::list tensors() const {
    nb::list l;
    for (const auto& t : src_->tensors()) l.append(info_dict(t));
    return l;
  }

  nb::ndarray<nb::numpy, float> dequantize(size_t index) const {
    check(index);
    const auto& info = src_->tensors()[index];
    std::vector<float> out(info.numel());
    aq::Status st;
    {
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mu_);  // one Parquet reader: reads are serialized
      st = src_->dequantize(index, out.data());
    }
    if (!st.ok()) raise(st);
    std::vector<size_t> shape(info.shape.begin(), info.shape.end());
    return float_array(std::move(out), shape);
  }

  // The stored values of tensor `index`, or of its piece `piece` only (rows info["pieces"][piece]).
  nb::dict packed(size_t index, std::optional<size_t> piece) const {
    aq::LoadedTensor t = read(index, piece);
    nb::dict d = info_dict(src_->tensors()[index]);
    d["codes"] = to_bytes(t.payload.codes);
    d["scales"] = src_->tensors()[index].quantized ? nb::object(to_bytes(t.payload.scales)) : nb::none();
    d["zero_points"] = t.payload.zero_points.empty() ? nb::none() : nb::object(to_bytes(t.payload.zero_points));
    put_entropy(d, t.entropy.get());
    const auto& scale = src_->tensors()[index].input_scale;
    if (scale.empty()) d["input_scale"] = nb::none();
    else d["input_scale"] = float_array(std::vector<float>(scale), {scale.size()});
    return d;
  }

  // The stored bytes of a quantized tensor, for the runtime (ModelFormatError when they do not
  // match its scheme and shape); with `piece`, the rows of that piece only.
  PackedLayer layer(size_t index, std::optional<size_t> piece) const {
    check(index);
    const auto& info = src_->tensors()[index];
    std::string where = src_->path() + ": tensor '" + info.name + "'";
    if (!info.quantized) raise(aq::InvalidConfig(where + " is not quantized (kept as it was)"));
    if (!piece) {
      std::optional<aq::Result<aq::OwnedTensor>> r;
      {
        nb::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(mu_);
        r.emplace(src_->read_owned(index));
      }
      return PackedLayer(unwrap(std::move(*r)), info, info.rows(), where);
    }
    return PackedLayer(read(index, piece), info, info.pieces[*piece].row_count,
                       where + " piece " + std::to_string(*piece));
  }

  size_t size() const { return src_->tensors().size(); }
  std::string path() const { return src_->path(); }

 private:
  void check(size_t index) const {
    if (index >= src_->tensors().size())
      throw nb::index_error(("tensor index " + std::to_string(index) + " out of range").c_str());
  }
  aq::LoadedTensor read(size_t index, std::optional<size_t> piece) const {
    check(index);
    if (piece && *piece >= src_->tensors()[index].pieces.size())
      throw nb::index_error(("piece " + std::to_string(*piece) + " out of range").c_str());
    std::optional<aq::Result<aq::LoadedTensor>> r;
    {
      nb::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mu_);  // one Parquet reader: reads are serialized
      r.emplace(piece ? src_->read_piece(index, *piece) : src_->read(index));
    }
    return unwrap(std::move(*r));
  }
  std::unique_ptr<aq::ParquetSource> src_;
  mutable std::mutex mu_;
};

// A run's report as JSON text; KeyboardInterrupt when the user stopped it (the engine says what it
// left: nothing, or with resume the kept staging directory).
std::string quantization_report(const PythonHooks& py, aq::Result<json> r) {
  if (py.interrupted) {
    const std::string why = !r.ok() && r.status().code() == aq::StatusCode::kCancelled
                                ? "quantization " + r.status().message()
                                : std::string("quantization interrupted; no output was written");
    PyErr_SetString(PyExc_KeyboardInterrupt, why.c_str());
    throw nb::python_error();
  }
  return unwrap(std::move(r)).dump();
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "ArrowQuant C++ core (internal; use the arrow_quant_v2 package API)";
  m.attr("FORMAT_VERSION") = aq::kFormatVersion;
  m.attr("MIN_FORMAT_VERSION") = aq::kMinFormatVersion;

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const CoreError& e) {
      nb::object errors = nb::module_::import_("arrow_quant_v2.errors");
      nb::object cls = errors.attr(exception_class(e.code));
      nb::object exc = cls(nb::str(e.what()));
      exc.attr("code") = nb::str(aq::status_code_name(e.code));
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });

  m.def("quantize_model",
        [](const std::string& model, const std::string& out, const std::string& config, nb::object progress,
           int every, double interval, bool resume) {
          aq::EngineConfig cfg = parse_config(config);
          PythonHooks py(std::move(progress), every, interval);
          std::optional<aq::Result<json>> r;
          {
            nb::gil_scoped_release release;
            r.emplace(aq::quantize_model(model, out, cfg, py.hooks, resume));
          }
          return quantization_report(py, std::move(*r));
        },
        nb::arg("model_path"), nb::arg("output_path"), nb::arg("config_json"), nb::arg("progress").none(),
        nb::arg("progress_every") = 10, nb::arg("progress_interval_s") = 5.0, nb::arg("resume") = false,
        "Quantizes a model directory; returns the report as JSON text.");

  // Distributed runs (arrow_quant_v2.cluster): the driver's side.
  nb::class_<aq::DistributedRun>(m, "DistributedRun")
      .def("__init__",
           [](aq::DistributedRun* self, const std::string& model, const std::string& out, const std::string& config,
              bool resume) {
             aq::EngineConfig cfg = parse_config(config);
             std::optional<aq::Result<std::unique_ptr<aq::DistributedRun>>> r;
             {
               nb::gil_scoped_release release;
               r.emplace(aq::DistributedRun::Plan(model, out, cfg, resume));
             }
             std::unique_ptr<aq::DistributedRun> run = unwrap(std::move(*r));
             // nanobind constructs in place: move the planned run's state into self
             new (self) aq::DistributedRun(std::move(*run));
           },
           nb::arg("model_path"), nb::arg("output_path"), nb::arg("config_json"), nb::arg("resume") = false,
           "Validates the model, creates the staging directory and plans the run (plan_json).")
      .def_prop_ro("plan_json", [](const aq::DistributedRun& r) { return r.plan().dump(); })
      .def("keep", &aq::DistributedRun::Keep, "Leaves the staging directory for a later resume.")
      .def("assemble",
           [](aq::DistributedRun& run, nb::object progress, int every, double interval) {
             PythonHooks py(std::move(progress), every, interval);
             std::optional<aq::Result<json>> r;
             {
               nb::gil_scoped_release release;
               r.emplace(run.Assemble(py.hooks));
             }
             return quantization_report(py, std::move(*r));
           },
           nb::arg("progress").none() = nb::none(), nb::arg("progress_every") = 10,
           nb::arg("progress_interval_s") = 5.0,
           "Completes the output from the journal (quantizing what no part did); returns the report as JSON text.");

  m.def("quantize_part",
        [](const std::string& model, const std::string& plan, const std::string& config, size_t component,
           size_t first, size_t last) {
          aq::EngineConfig cfg = parse_config(config);
          json p = json::parse(plan, nullptr, false);
          if (p.is_discarded() || !p.is_object()) raise(aq::InvalidConfig("quantize_part: the plan is not a JSON object"));
          std::optional<aq::Result<json>> r;
          {
            nb::gil_scoped_release release;
            aq::RunHooks hooks;
            r.emplace(aq::quantize_part(model, p, cfg, component, first, last, hooks));
          }
          return unwrap(std::move(*r)).dump();
        },
        nb::arg("model_path"), nb::arg("plan_json"), nb::arg("config_json"), nb::arg("component"), nb::arg("first"),
        nb::arg("last"), "A worker's part of a distributed run; returns what it did as JSON text.");

  m.def("validate_model",
        [](const std::string& original, const std::string& quantized, int threads, nb::object progress) {
          PythonHooks py(std::move(progress), 1 << 30, 5.0);
          std::optional<aq::Result<json>> r;
          {
            nb::gil_scoped_release release;
            r.emplace(aq::validate_model(original, quantized, threads, py.hooks));
          }
          if (py.interrupted) {
            PyErr_SetString(PyExc_KeyboardInterrupt, "validation interrupted");
            throw nb::python_error();
          }
          return unwrap(std::move(*r)).dump();
        },
        nb::arg("original_path"), nb::arg("quantized_path"), nb::arg("num_threads") = 0,
        nb::arg("progress").none() = nb::none());

  m.def("encode_array",
        [](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> a, int bits, int group_size,
           bool symmetric, const std::string& method, int threads, const std::string& name, const std::string& scheme,
           bool rotate, double target_bpw,
           std::optional<nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>> importance) {
          aq::QuantScheme sch = scheme_from(bits, group_size, symmetric, "f16", method, scheme, rotate, target_bpw);
          std::shared_ptr<const std::vector<float>> imp;
          if (importance) {
            if (importance->shape(0) != a.shape(1))
              raise(aq::InvalidConfig("importance holds " + std::to_string(importance->shape(0)) +
                                      " values; the array's rows hold " + std::to_string(a.shape(1))));
            imp = std::make_shared<const std::vector<float>>(importance->data(), importance->data() + importance->shape(0));
          }
          aq::RowSource src;
          src.data = reinterpret_cast<const uint8_t*>(a.data());
          src.dtype = aq::DType::kF32;
          src.rows = a.shape(0);
          src.cols = a.shape(1);
          src.name = name;
          std::optional<aq::Result<aq::EncodedTensor>> r;
          {
            nb::gil_scoped_release release;
            std::optional<aq::ThreadPool> pool;
            if (threads != 1) pool.emplace(threads);
            r.emplace(aq::encode_tensor(src, sch, pool ? &*pool : nullptr, imp));
          }
          return Encoded(unwrap(std::move(*r)));
        },
        nb::arg("array"), nb::arg("bits"), nb::arg("group_size") = 128, nb::arg("symmetric") = false,
        nb::arg("scale_method") = "search", nb::arg("num_threads") = 0, nb::arg("name") = "array",
        nb::arg("scheme") = "affine", nb::arg("rotate") = false, nb::arg("target_bpw") = 0.0,
        nb::arg("importance").none() = nb::none(),
        "Encodes a float32 matrix with one scheme (no layer policy); returns an Encoded.");

  m.def("quantize_array",
        [](const std::string& config, const std::string& name, const std::string& dtype,
           const std::vector<int64_t>& shape, nb::ndarray<const float, nb::c_contig, nb::device::cpu> data) {
          aq::EngineConfig cfg = parse_config(config);
          auto dt = aq::parse_dtype(dtype);
          if (!dt) raise(aq::InvalidConfig("unknown dtype '" + dtype + "'"));
          if (data.size() != aq::shape_numel(shape).value_or(0))
            raise(aq::InvalidConfig("quantize_array: data holds " + std::to_string(data.size()) +
                                    " values but the shape needs " + std::to_string(aq::shape_numel(shape).value_or(0))));
          std::optional<aq::Result<aq::ArrayOutcome>> r;
          {
            nb::gil_scoped_release release;
            std::optional<aq::ThreadPool> pool;
            if (cfg.num_threads != 1) pool.emplace(cfg.num_threads);
            r.emplace(aq::quantize_array(cfg, name, *dt, shape, data.data(), pool ? &*pool : nullptr));
          }
          aq::ArrayOutcome o = unwrap(std::move(*r));
          nb::dict d;
          d["quantized"] = o.encoded.has_value();
          d["reason"] = o.reason;
          d["rejected_bits"] = nb::cast(o.rejected_bits);
          d["encoded"] = o.encoded ? nb::cast(Encoded(std::move(*o.encoded))) : nb::none();
          return d;
        },
        nb::arg("config_json"), nb::arg("name"), nb::arg("dtype"), nb::arg("shape"), nb::arg("data"),
        "Quantizes one in-memory array with the engine's layer policy and accuracy fallback.");

  m.def("time_groups",
        [](const std::string& path, int num_groups) {
          aq::CalibrationData data = unwrap(aq::read_calibration(path));
          std::vector<std::vector<int>> out;
          for (const auto& g : aq::group_time_bins(data, num_groups)) out.push_back(g.bins);
          return out;
        },
        nb::arg("path"), nb::arg("num_groups"),
        "The step bins of each timestep group the engine forms from a calibration file with num_time_groups.");

  m.def("check_pattern",
        [](const std::string& field, const std::string& pattern) {
          try {
            std::regex re(pattern, std::regex::ECMAScript);
          } catch (const std::regex_error& e) {
            raise(aq::InvalidConfig(field + ": '" + pattern + "' is not a valid ECMAScript regular expression (" +
                                    e.what() + ")"));
          }
        },
        nb::arg("field"), nb::arg("pattern"),
        "Raises ConfigurationError unless the engine can compile the pattern.");

  m.def("pack_codes",
        [](nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> codes, int bits) {
          if (bits < 1 || bits > 8) raise(aq::InvalidConfig("bits must be 1..8"));
          const uint8_t limit = static_cast<uint8_t>((1u << bits) - 1u);
          for (size_t i = 0; i < codes.shape(0); ++i)
            if (codes.data()[i] > limit)
              raise(aq::InvalidConfig("code " + std::to_string(codes.data()[i]) + " at index " + std::to_string(i) +
                                      " does not fit in " + std::to_string(bits) + " bits"));
          std::vector<uint8_t> out(aq::packed_code_bytes(bits, codes.shape(0)));
          aq::pack_codes(codes.data(), codes.shape(0), bits, out.data());
          return nb::bytes(out.data(), out.size());
        },
        nb::arg("codes"), nb::arg("bits"));

  m.def("unpack_codes",
        [](nb::bytes packed, uint64_t first, uint64_t count, int bits) {
          if (bits < 1 || bits > 8) raise(aq::InvalidConfig("bits must be 1..8"));
          if (aq::packed_code_bytes(bits, first + count) > packed.size())
            raise(aq::FormatError("packed stream too short for the codes asked for"));
          auto* heap = new std::vector<uint8_t>(count);
          aq::unpack_codes(static_cast<const uint8_t*>(packed.data()), first, count, bits, heap->data());
          nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
          size_t shape[1] = {static_cast<size_t>(count)};
          return nb::ndarray<nb::numpy, uint8_t>(heap->data(), 1, shape, owner);
        },
        nb::arg("packed"), nb::arg("first"), nb::arg("count"), nb::arg("bits"));

  m.def("describe_model",
        [](const std::string& path, const std::vector<std::string>& components) {
          aq::ModelSource model = unwrap(aq::discover_model(path, components));
          json comps = json::array();
          std::vector<std::string> names;
          for (const auto& c : model.components) {
            json jc = {{"name", c.name}, {"selected", c.selected}, {"weight_files", c.weight_files},
                       {"tensors", json::array()}};
            if (c.selected) {
              auto refs = unwrap(aq::open_component_tensors(c));
              for (const auto& r : refs) {
                names.push_back(r.info->name);
                jc["tensors"].push_back({{"name", r.info->name}, {"dtype", std::string(aq::dtype_name(r.info->dtype))},
                                         {"shape", r.info->shape}, {"nbytes", r.info->nbytes}});
              }
            }
            comps.push_back(std::move(jc));
          }
          auto m = aq::detect_modality(model, names);
          json out = {{"root", model.root}, {"layout", aq::layout_name(model.layout)}, {"components", comps},
                      {"auxiliary_files", model.auxiliary_files}, {"modality", m.modality},
                      {"modality_evidence", m.evidence}};
          return out.dump();
        },
        nb::arg("path"), nb::arg("components") = std::vector<std::string>{});

  m.def("plan_tensor",
        [](const std::string& config, const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape) {
          aq::EngineConfig cfg = parse_config(config);
          aq::TensorInfo t;
          t.name = name;
          auto dt = aq::parse_dtype(dtype);
          if (!dt) raise(aq::InvalidConfig("unknown dtype '" + dtype + "'"));
          t.dtype = *dt;
          t.shape = shape;
          t.numel = aq::shape_numel(shape).value_or(0);
          aq::TensorPlan p = aq::plan_tensor(cfg, t);
          nb::dict d;
          d["quantize"] = p.quantize;
          d["bits"] = p.bits;
          d["reason"] = p.reason;
          return d;
        },
        nb::arg("config_json"), nb::arg("name"), nb::arg("dtype"), nb::arg("shape"),
        "The layer policy's decision for one tensor (see engine/plan.h).");

  m.def("default_sensitive_patterns", [] { return aq::default_sensitive_patterns(); });
  m.def("hardware_threads", [] { return aq::ThreadPool::resolve_threads(0); });

  nb::class_<Encoded>(m, "Encoded")
      .def_prop_ro("rows", &Encoded::rows)
      .def_prop_ro("cols", &Encoded::cols)
      .def_prop_ro("codes", &Encoded::codes)
      .def_prop_ro("scales", &Encoded::scales)
      .def_prop_ro("zero_points", &Encoded::zero_points)
      .def_prop_ro("stored_bytes", &Encoded::stored_bytes)
      .def_prop_ro("decode_granularity", &Encoded::decode_granularity)
      .def("info", &Encoded::info)
      .def("decode", &Encoded::decode)
      .def("decode_rows", &Encoded::decode_rows, nb::arg("r0"), nb::arg("nr"), nb::arg("out"));

  nb::class_<PackedLayer>(m, "PackedLayer")
      .def_prop_ro("rows", &PackedLayer::rows)
      .def_prop_ro("cols", &PackedLayer::cols)
      .def_prop_ro("nbytes", &PackedLayer::nbytes)
      .def_prop_ro("decode_granularity", &PackedLayer::decode_granularity)
      .def("decode_into", &PackedLayer::decode_into, nb::arg("out"), nb::arg("threads") = 1)
      .def("decode_rows_into", &PackedLayer::decode_rows_into, nb::arg("out"), nb::arg("r0"), nb::arg("nr"));

  nb::class_<WeightsReader>(m, "WeightsReader")
      .def(nb::init<const std::string&>(), nb::arg("path"))
      .def("tensors", &WeightsReader::tensors)
      .def("dequantize", &WeightsReader::dequantize, nb::arg("index"))
      .def("packed", &WeightsReader::packed, nb::arg("index"), nb::arg("piece").none() = nb::none())
      .def("layer", &WeightsReader::layer, nb::arg("index"), nb::arg("piece").none() = nb::none())
      .def("__len__", &WeightsReader::size)
      .def_prop_ro("path", &WeightsReader::path);
}
