#include "engine/engine.h"

#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>

#include "common/thread_pool.h"
#include "engine/budget.h"
#include "engine/calibrated_layer.h"
#include "engine/output_dir.h"
#include "engine/plan.h"
#include "engine/tensor_job.h"
#include "io/modality.h"
#include "io/model_source.h"
#include "quant/gptq.h"
#include "store/activation_params.h"
#include "store/calibration.h"
#include "store/format.h"
#include "store/manifest.h"
#include "store/parquet_sink.h"
#include "store/tensor_journal.h"

#ifndef ARROWQUANT_VERSION
#define ARROWQUANT_VERSION "0.0.0"
#endif

namespace aq {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// A run with resume that stops, interrupted or on an error (a full disk, a tensor it refuses),
// leaves its staging directory, released, for the next run with resume: that one continues after
// the tensors journaled. `done` says which those are.
Status keep_for_resume(StagingDir& staging, const Status& stopped, const std::string& done) {
  staging.Keep();
  const std::string kept = StrCat(done, " are kept in ", staging.path(), ": the same command with resume continues from there");
  if (stopped.code() == StatusCode::kCancelled) return Cancelled(StrCat("interrupted; ", kept));
  return Status(stopped.code(), StrCat(stopped.message(), "; ", kept));
}

// Source bytes allowed in flight at once (tensors being quantized or waiting to be written).
constexpr uint64_t kInflightBudget = 256ull << 20;

// A journal record as make_record writes it: every field apply_record reads, of its type. A
// record that is not (a damaged or foreign file) is not replayed: its tensor is quantized again.
bool well_formed_record(const json& r) {
  if (!r.is_object()) return false;
  auto has = [&](const char* k, auto pred) { auto it = r.find(k); return it != r.end() && pred(*it); };
  auto str = [](const json& v) { return v.is_string(); };
  auto uns = [](const json& v) { return v.is_number_unsigned(); };
  auto boolean = [](const json& v) { return v.is_boolean(); };
  auto number = [](const json& v) { return v.is_number(); };
  auto null_or_obj = [](const json& v) { return v.is_null() || v.is_object(); };
  if (!(has("name", str) && has("dtype", str) && has("component", str) && has("qualified", str) &&
        has("shape", [](const json& v) { return v.is_array(); }) && has("numel", uns) && has("source_bytes", uns) &&
        has("stored_bytes", uns) && has("quantized", boolean) && has("cosine", number) && has("skipped", null_or_obj) &&
        has("fallback", null_or_obj) && has("error", null_or_obj) && has("output_error", null_or_obj) &&
        has("calibrated", boolean) && has("gptq", boolean) && has("importance", boolean) && has("equalized", boolean) &&
        has("layer", [](const json& v) { return v.is_object(); })))
    return false;
  if (!r["quantized"].get<bool>() && !r["skipped"].is_object()) return false;
  if (!r.contains("warnings") || !r["warnings"].is_array() || !r.contains("activations") || !r["activations"].is_array())
    return false;
  for (const json& w : r["warnings"])
    if (!w.is_string()) return false;
  for (const json& a : r["activations"]) {
    if (!a.is_object()) return false;
    for (const char* k : {"group", "bits", "zero_point"})
      if (!a.contains(k) || !a[k].is_number_integer()) return false;
    for (const char* k : {"step_lo", "step_hi", "scale", "clip_lo", "clip_hi"})
      if (!a.contains(k) || !a[k].is_number()) return false;
  }
  return true;
}

// A source tensor's rows as 2-D (rows = its first dimension), its pages handed back on release.
RowSource row_source(const TensorRef& r) {
  const TensorInfo& t = *r.info;
  RowSource src;
  src.data = r.file->data(t);
  src.dtype = t.dtype;
  src.rows = t.shape.empty() ? 1 : static_cast<uint64_t>(t.shape[0]);
  src.cols = src.rows ? t.numel / src.rows : 0;
  src.name = t.name;
  src.file = r.file->path();
  src.release = [file = r.file, info = r.info](uint64_t begin, uint64_t n) { file->release(*info, begin, n); };
  return src;
}

std::string component_weights_path(const std::string& component) {
  return component.empty() ? std::string(kWeightsFile) : component + "/" + kWeightsFile;
}

struct Slot {
  std::string component;
  TensorRef ref;
  TensorPlan plan;
  QuantScheme scheme;
  std::unique_ptr<TensorJob> job;
  std::optional<EncodedTensor> encoded;  // set once the job has finished and been accepted
  std::vector<int> rejected_bits;
  std::string keep_reason;  // non-empty: store raw
  std::string error;        // a per-layer error collected under fail_fast = false
  // calibration (when the layer has it): prepared on a worker (preparing until prepared is set),
  // then Hessians per timestep group, the GPTQ factor, equalization, activation parameters
  const LayerCalibration* calibration = nullptr;
  bool preparing = false;
  std::atomic<bool> prepared{false};
  std::optional<Result<CalibratedLayer>> prepare_result;  // written by the worker before `prepared`
  std::shared_ptr<const CalibratedLayer> cal;             // set when hessians were found
  json output_error;        // per timestep group, once encoded
  double output_cosine = 1; // worst group's output cosine
  json warnings = json::array();  // reported with the tensor, in tensor order
  // what calibration gave the layer, counted in the manifest when it is written
  bool calibrated = false, gptq_done = false, importance = false, equalized = false;
  const TensorInfo& info() const { return *ref.info; }
  const GptqFactor* gptq() const { return cal ? cal->gptq.get() : nullptr; }
};

class QuantizeRun {
 public:
  QuantizeRun(const EngineConfig& config, const RunHooks& hooks, bool resume)
      : cfg_(config), hooks_(hooks), resume_(resume), pool_(config.num_threads), start_(Clock::now()) {}

  Result<json> run(const std::string& model_path, const std::string& output_path);

  // The phases of a run, which a distributed run (DistributedRun, quantize_part) takes apart:
  // Discovers the model and opens (validates) its selected components, reads the calibration,
  // detects the modality. Nothing is written.
  Status open_model(const std::string& model_path);
  // In the staging directory: the run record (resume.json), or the check of an interrupted one's.
  Status begin_run(StagingDir& staging);
  // Everything after the staging directory exists: components (journaled tensors replayed, the
  // others quantized), copied files, manifest, rename.
  Result<json> write_output(StagingDir& staging);
  // After begin_run: what the workers of a distributed run need (docs/architecture.md).
  Result<json> plan(StagingDir& staging);
  // A worker's part: tensors [first, last) of component `component` into the plan's journal.
  Result<json> run_part(const std::string& model_path, const json& plan, size_t component, size_t first, size_t last);
  const ModelSource& model() const { return *model_; }

 private:
  // Quantizes tensors [first, last) of the component into its journal (with budget_ set).
  Status run_component(const ComponentSource& comp, const std::vector<TensorRef>& refs, size_t first, size_t last,
                       const TensorJournal& journal, json& comp_report);
  void start_job(Slot& s);
  Status wait_for(Slot& s, std::deque<std::unique_ptr<Slot>>& window);
  // Decides what happens to a finished slot: true when it is ready to write, false when it was
  // restarted (float32 scales, or the next rung of the accuracy fallback).
  Result<bool> settle(Slot& s);
  // Journals the finished tensor `index` and adds it to the report.
  Status write(Slot& s, size_t index, const TensorJournal& journal, json& comp_report);
  // Everything the report and the manifest take from a finished tensor; journaled with it, so a
  // resumed run rebuilds the same report from the tensors it does not quantize again.
  json make_record(const Slot& s, const StoredTensorInfo& info) const;
  void apply_record(const json& record, json& comp_report);
  // What a resumed run must match: the configuration, the source files and the producer.
  json run_fingerprint(const ModelSource& model, const std::string& calib_path) const;
  void drain(std::deque<std::unique_ptr<Slot>>& window);
  void emit_progress(bool force, const std::string& current, uint64_t partial_weights = 0);
  // Looks up the slot's calibration; when there is some, prepares it on a worker (Hessians,
  // equalization search, GPTQ factor, activation parameters) and returns true.
  bool attach_calibration(Slot& s);
  // On this thread, for slots whose preparation finished: records its outcome and starts the job.
  void start_prepared(std::deque<std::unique_ptr<Slot>>& window);
  QuantScheme scheme_for(const Slot& s, int bits) const;
  // Output-space error of the encoded tensor on each timestep group's (held-out) inputs; for an
  // equalized layer also its weight-space statistics in the original space.
  Status measure_output(Slot& s, EncodedTensor& enc);

  const EngineConfig& cfg_;
  const RunHooks& hooks_;
  const bool resume_;
  json records_ = json::array();  // of the component being written
  uint64_t resumed_tensors_ = 0;   // taken from an interrupted run's journal
  uint64_t journaled_tensors_ = 0; // taken from the journal: resumed, or a distributed run's parts
  double journal_copy_s_ = 0;      // writing weights.parquet from the journal
  std::string spill_dir_;          // the run's folder: codes of tensors over piece_bytes go there
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  // Declared after what its workers touch (stop_, mu_, cv_) so that it is destroyed, and its
  // workers joined, before those are.
  ThreadPool pool_;
  Clock::time_point start_;
  Clock::time_point last_emit_ = Clock::now();
  uint64_t last_emit_tensors_ = 0;
  ProgressEvent progress_;

  json layers_ = json::array(), skipped_ = json::array(), fallbacks_ = json::array(), errors_ = json::array();
  json warnings_ = json::array();
  std::optional<CalibrationData> calib_;
  std::vector<TimeGroup> groups_;
  std::string modality_;  // detected or configured, set before any component is quantized
  // Modality strategy: text and code diffusion LMs deployed weight-only get no equalization search
  bool text_like() const { return modality_ == "text" || modality_ == "code"; }
  bool ggml() const { return cfg_.scheme_kind == SchemeKind::kGgml; }
  // ggml runtimes (llama.cpp, stable-diffusion.cpp, diffusers' GGUF loader) have no per-channel
  // input scale to apply, so ggml schemes get no equalization.
  bool search_equalization() const {
    return cfg_.enable_spatial && !ggml() && !(text_like() && cfg_.activation_bits == 0);
  }
  // ggml schemes with calibration: the encoder's per-column importance, the diagonal of the
  // timestep-group-weighted Hessian (llama.cpp's imatrix, but over timestep groups).
  bool importance_weighted(const Slot& s) const { return ggml() && cfg_.enable_time_aware && s.cal && s.cal->hessians; }
  uint64_t importance_layers_ = 0;
  // Model budget (ggml schemes with target_bits_per_weight): per tensor of the component being
  // quantized, the bits of its chosen type and the reason.
  Status plan_budget(const std::string& component, const std::vector<TensorRef>& refs);
  // budget_ and budget_report_ of component i: the plan's when a distributed run gave one, else
  // planned here (ggml schemes with a model budget), else none.
  Status component_budget(size_t i);
  std::map<std::string, std::pair<int, std::string>> budget_;
  json budget_report_ = nullptr;
  std::map<size_t, json> planned_budgets_;  // component index -> {"layers": {name: [bits, reason]}, "report"}
  // Per tensor of a component, the record of its complete journal entry, or null.
  std::vector<json> journaled_records(const TensorJournal& journal, const std::vector<TensorRef>& refs) const;

  // Set by open_model and begin_run.
  std::optional<ModelSource> model_;
  std::vector<std::vector<TensorRef>> refs_;
  std::string calib_path_;
  ModalityGuess modality_guess_;
  json fingerprint_ = nullptr;
  json resume_report_ = nullptr;
  bool resuming_ = false;
  uint64_t gptq_layers_ = 0, calibrated_layers_ = 0, equalized_layers_ = 0;
  json output_errors_ = json::object();  // qualified layer -> output error per timestep group
  std::vector<ActivationRow> activation_rows_;
  uint64_t source_bytes_ = 0, stored_bytes_ = 0, quantized_weights_ = 0, quantized_stored_bytes_ = 0;
  double cosine_sum_ = 0, cosine_min_ = 1.0;
  uint64_t quantized_layers_ = 0;
  std::string worst_layer_;
};

void QuantizeRun::emit_progress(bool force, const std::string& current, uint64_t partial_weights) {
  if (!hooks_.progress) return;
  const auto now = Clock::now();
  const double since = std::chrono::duration<double>(now - last_emit_).count();
  const bool due = force || since >= hooks_.progress_interval_s ||
                   progress_.tensors_done - last_emit_tensors_ >= static_cast<uint64_t>(hooks_.progress_every_tensors);
  if (!due) return;
  ProgressEvent e = progress_;
  e.weights_done += partial_weights;
  e.current = current;
  e.elapsed_s = std::chrono::duration<double>(now - start_).count();
  e.eta_s = e.weights_done > 0 ? e.elapsed_s * static_cast<double>(e.weights_total - e.weights_done) /
                                     static_cast<double>(e.weights_done)
                               : -1.0;
  last_emit_ = now;
  last_emit_tensors_ = progress_.tensors_done;
  try {
    hooks_.progress(e);
  } catch (const std::exception& ex) {
    // The Python layer already shields user callbacks; this guards C++ callers.
    if (warnings_.empty()) warnings_.push_back(StrCat("progress callback raised: ", ex.what()));
  }
}

void QuantizeRun::start_job(Slot& s) {
  RowSource src = row_source(s.ref);
  if (s.cal) src.col_scale = s.cal->column_scale;  // equalized: the job quantizes W S
  s.job = s.gptq() ? std::make_unique<TensorJob>(src, s.scheme, s.cal->gptq) : std::make_unique<TensorJob>(src, s.scheme);
  // Codes bigger than a piece are written to a scratch file as they are made: a tensor of any
  // size then costs its row blocks in flight and, when journaled, one piece at a time.
  s.job->spill_codes(spill_dir_, cfg_.piece_bytes);
  if (importance_weighted(s)) {
    s.job->set_importance(std::make_shared<std::vector<float>>(
        hessian_importance(s.cal->hessians->gptq, s.cal->hessians->layout())));
  }
  s.job->start(pool_, &stop_, [this] {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  });
}

QuantScheme QuantizeRun::scheme_for(const Slot& s, int bits) const {
  const uint64_t rows = s.info().shape[0], cols = s.info().numel / std::max<uint64_t>(1, rows);
  QuantScheme scheme = cfg_.scheme(bits, rows, cols);
  if (s.gptq() && scheme.kind != SchemeKind::kGgml) {
    // GPTQ works on the group-wise affine codes at the configured bits and group size. At the
    // profiles' settings these cost no more than the entropy budget they replace (2.5 / 4.25 /
    // 8.0 bits per weight against 2.5 / 4.5 / 8.5), and the rotation does not apply.
    scheme.kind = SchemeKind::kAffine;
    scheme.rotate = false;
    scheme.target_bpw = 0;
  }
  return scheme;
}

bool QuantizeRun::attach_calibration(Slot& s) {
  const TensorInfo& t = s.info();
  const LayerCalibration* lc = calib_->lookup(s.component, t.name);
  if (!lc) return false;
  const uint64_t rows = t.shape[0], cols = t.numel / std::max<uint64_t>(1, rows);
  const std::string qualified = s.component.empty() ? t.name : s.component + "/" + t.name;
  if (static_cast<uint64_t>(lc->in_features) != cols) {
    s.warnings.push_back(StrCat(qualified, ": calibration recorded ", lc->in_features, " input features, the weight has ",
                               cols, " columns; its calibration is not used"));
    return false;
  }
  s.calibration = lc;
  s.preparing = true;
  // Modality strategy for image / video / audio denoisers: a convolution with a spatial kernel
  // that calibration has no Hessian for (wider than max_hessian_features, as the deep blocks of
  // a UNet are, or grouped) cannot get GPTQ; it is quantized at 8 bits instead of low-bit
  // data-free codes.
  if (!text_like() && s.plan.bits < 8 && t.shape.size() >= 3 && cols > static_cast<uint64_t>(t.shape[1])) {
    if (!lc->has_hessians()) {
      s.plan.bits = 8;
      s.plan.reason = StrCat("convolution without a calibration Hessian (", cols,
                             " input features) at 8 bits: modality strategy for ", modality_, " denoisers");
    }
  }
  CalibratedLayerOptions o;
  o.time_aware = cfg_.enable_time_aware;
  o.spatial = search_equalization();
  o.activation_bits = cfg_.activation_bits;
  o.relative_group_weights = cfg_.time_group_weighting == "relative";
  o.gptq.damp = cfg_.gptq_damp;
  // ggml blocks are contiguous runs of columns: GPTQ on their grids keeps the column order
  o.gptq.act_order = cfg_.gptq_act_order && !ggml();
  o.data_free = cfg_.scheme(s.plan.bits, rows, cols);
  o.gptq_scheme = o.data_free;
  o.gptq_scheme.kind = SchemeKind::kAffine;
  o.gptq_scheme.rotate = false;
  o.gptq_scheme.target_bpw = 0;
  // Input channels: a weight's second dimension (a convolution's channel spans its kernel positions).
  const uint64_t channels = t.shape.size() >= 2 ? static_cast<uint64_t>(t.shape[1]) : cols;
  Slot* slot = &s;
  pool_.submit([this, slot, o, channels, qualified] {
    auto r = prepare_calibrated_layer(qualified, row_source(slot->ref), channels, *slot->calibration, groups_, o);
    std::lock_guard<std::mutex> lock(mu_);
    slot->prepare_result = std::move(r);
    slot->prepared.store(true, std::memory_order_release);
    cv_.notify_all();
  });
  return true;
}

void QuantizeRun::start_prepared(std::deque<std::unique_ptr<Slot>>& window) {
  for (auto& sp : window) {
    Slot& s = *sp;
    if (!s.preparing || !s.prepared.load(std::memory_order_acquire)) continue;
    s.preparing = false;
    const std::string qualified = s.component.empty() ? s.info().name : s.component + "/" + s.info().name;
    Result<CalibratedLayer>& r = *s.prepare_result;
    if (!r.ok()) {
      s.warnings.push_back(StrCat(qualified, ": calibration not used (", r.status().message(), "); quantized data-free"));
    } else {
      for (auto& w : r->warnings) s.warnings.push_back(std::move(w));
      if (r->hessians) {
        s.calibrated = true;
        s.gptq_done = r->gptq != nullptr;
        s.importance = ggml() && cfg_.enable_time_aware;
        s.equalized = !r->input_scale.empty();
        s.cal = std::make_shared<const CalibratedLayer>(std::move(*r));
      }
    }
    s.prepare_result.reset();
    s.scheme = scheme_for(s, s.plan.bits);
    start_job(s);
  }
}

Status QuantizeRun::measure_output(Slot& s, EncodedTensor& enc) {
  const TensorInfo& t = s.info();
  const uint64_t rows = enc.rows, cols = enc.cols, dsize = dtype_size(t.dtype);
  // Row blocks: the source and the stored weight are decoded block by block (their pages handed
  // back as it goes), keeping the rows the output check samples.
  const EncodedView view = enc.view();
  AQ_RETURN_IF_ERROR(check_encoded(enc.scheme, rows, cols, view));
  std::shared_ptr<const FrequencyTable> table;
  EncodedView v = view;
  if (enc.scheme.kind == SchemeKind::kEntropy) {
    AQ_ASSIGN_OR_RETURN(table, make_decode_table(view));
    v.table = table.get();
  }
  const uint64_t block = rows_per_block(cols), step = output_check_row_step(rows);
  std::vector<float> w, q, w_rows, q_rows;
  ErrorStats stats;
  for (uint64_t r0 = 0; r0 < rows; r0 += block) {
    const uint64_t nr = std::min(block, rows - r0);
    w.resize(nr * cols);
    q.resize(nr * cols);
    convert_to_f32(t.dtype, s.ref.file->data(t) + r0 * cols * dsize, nr * cols, w.data());
    s.ref.file->release(t, r0 * cols * dsize, nr * cols * dsize);
    AQ_RETURN_IF_ERROR(decode_rows(enc.scheme, rows, cols, v, r0, nr, q.data()));
    if (enc.spill) {
      const uint64_t begin = code_offset(enc.scheme, rows, cols, view, r0);
      enc.spill->release(begin, code_offset(enc.scheme, rows, cols, view, r0 + nr) - begin);
    }
    if (!s.cal->input_scale.empty()) {
      // The effective weight (stored weight times the input scale, column by column), compared
      // with the original block by block exactly as validate_model does.
      scale_columns(q.data(), nr, cols, s.cal->input_scale);
      ErrorStats b;
      b.add(w.data(), q.data(), nr * cols);
      stats.merge(b);
    }
    for (uint64_t r = (r0 + step - 1) / step * step; r < r0 + nr; r += step) {
      w_rows.insert(w_rows.end(), w.begin() + (r - r0) * cols, w.begin() + (r - r0 + 1) * cols);
      q_rows.insert(q_rows.end(), q.begin() + (r - r0) * cols, q.begin() + (r - r0 + 1) * cols);
    }
  }
  if (!s.cal->input_scale.empty()) enc.stats = stats;
  const OutputCheck c =
      check_layer_output(w_rows.data(), q_rows.data(), cols ? w_rows.size() / cols : 0, cols, *s.cal, *s.calibration, groups_);
  s.output_error = c.groups;
  s.output_cosine = c.worst_cosine;
  return Status::OK();
}

Status QuantizeRun::wait_for(Slot& s, std::deque<std::unique_ptr<Slot>>& window) {
  start_prepared(window);
  if (!s.job && !s.preparing) return Status::OK();
  std::unique_lock<std::mutex> lock(mu_);
  while (s.preparing || !s.job->finished()) {
    cv_.wait_for(lock, std::chrono::milliseconds(100));
    lock.unlock();
    start_prepared(window);
    if (hooks_.should_stop && hooks_.should_stop()) {
      stop_ = true;
      return Cancelled("interrupted; no output was written");
    }
    const uint64_t partial =
        s.job ? s.info().numel * s.job->blocks_done() / std::max<uint64_t>(1, s.job->blocks()) : 0;
    emit_progress(false, s.info().name, partial);
    lock.lock();
  }
  return Status::OK();
}

Result<bool> QuantizeRun::settle(Slot& s) {
  if (!s.job) return true;  // planned to be kept
  Status st = s.job->status();
  if (!st.ok()) {
    s.job.reset();
    if (st.code() == StatusCode::kCancelled) return st;
    if (st.code() == StatusCode::kNonFinite && cfg_.keep_nonfinite) {
      s.keep_reason = StrCat("kept: non-finite weight (", st.message(), ")");
      return true;
    }
    if (st.code() == StatusCode::kNonFinite)
      st = Status(st.code(), st.message() + " (set nonfinite='keep' to store such tensors unquantized)");
    if (cfg_.fail_fast) return st;
    s.error = st.message();
    s.keep_reason = StrCat("kept after error: ", st.message());
    return true;
  }
  if (s.job->needs_f32_scales() && s.scheme.scale_type == ScaleType::kF16) {
    s.scheme.scale_type = ScaleType::kF32;  // float16 cannot hold this tensor's scales closely enough
    start_job(s);
    return false;
  }
  EncodedTensor enc = s.job->take();
  s.job.reset();
  double cosine = enc.stats.cosine();
  if (s.cal) {
    AQ_RETURN_IF_ERROR(measure_output(s, enc));
    cosine = s.output_cosine;  // what the layer's outputs see, on held-out inputs
  }
  const FallbackStep step = fallback_step(cfg_, s.scheme.bits, cosine);
  if (!step.accept) {
    s.rejected_bits.push_back(s.scheme.bits);
    if (step.retry_bits) {
      s.scheme = scheme_for(s, *step.retry_bits);
      start_job(s);
      return false;
    }
    s.keep_reason = step.keep_reason;
    return true;
  }
  s.encoded = std::move(enc);
  return true;
}

Status QuantizeRun::write(Slot& s, size_t index, const TensorJournal& journal, json& comp_report) {
  const TensorInfo& t = s.info();
  StoredTensorInfo info;
  info.name = t.name;
  info.shape = t.shape;
  info.dtype = t.dtype;
  info.rejected_bits = s.rejected_bits;
  TensorPayload payload;
  std::function<void(uint64_t, uint64_t)> release;  // each journaled piece's pages, handed back
  if (s.encoded) {
    const EncodedTensor& enc = *s.encoded;
    info.quantized = true;
    info.scheme = enc.scheme;
    info.reason = s.plan.reason;
    if (!s.rejected_bits.empty())
      info.reason += StrCat("; fell back to ", enc.scheme.bits, " bits");
    info.cosine = enc.stats.cosine();
    info.relative_error = enc.stats.relative_error();
    info.sqnr_db = enc.stats.sqnr_db();
    info.max_abs_error = enc.stats.max_abs_err;
    if (s.cal) info.input_scale = s.cal->input_scale;
    payload = enc.view();
    info.stored = enc.stored_bytes() + 4 * info.input_scale.size();
    if (enc.spill) release = [spill = enc.spill.get()](uint64_t begin, uint64_t n) { spill->release(begin, n); };
  } else {
    info.quantized = false;
    info.reason = s.keep_reason.empty() ? s.plan.reason : s.keep_reason;
    payload.codes = std::span<const uint8_t>(s.ref.file->data(t), t.nbytes);
    info.stored = t.nbytes;
    release = [file = s.ref.file, &t](uint64_t begin, uint64_t n) { file->release(t, begin, n); };
  }
  const json record = make_record(s, info);
  AQ_RETURN_IF_ERROR(
      journal.Append(index, info, payload, record, rows_per_block(info.cols()), cfg_.piece_bytes, release));
  s.ref.file->release(t);
  apply_record(record, comp_report);
  return Status::OK();
}

json QuantizeRun::make_record(const Slot& s, const StoredTensorInfo& info) const {
  const TensorInfo& t = s.info();
  const std::string qualified = s.component.empty() ? t.name : s.component + "/" + t.name;
  const uint64_t stored = info.stored_bytes();
  json layer = {{"name", qualified}, {"component", s.component}, {"tensor", t.name},
                {"shape", t.shape}, {"dtype", std::string(dtype_name(t.dtype))},
                {"quantized", info.quantized}, {"reason", info.reason},
                {"source_bytes", t.nbytes}, {"stored_bytes", stored},
                {"rejected_bits", info.rejected_bits}};
  json rec = {{"name", t.name}, {"shape", t.shape}, {"dtype", std::string(dtype_name(t.dtype))},
              {"component", s.component}, {"qualified", qualified}, {"numel", t.numel},
              {"source_bytes", t.nbytes}, {"stored_bytes", stored}, {"quantized", info.quantized},
              {"cosine", info.cosine}, {"skipped", nullptr}, {"fallback", nullptr}, {"error", nullptr},
              {"output_error", nullptr}, {"activations", json::array()}, {"warnings", s.warnings},
              {"calibrated", s.calibrated}, {"gptq", s.gptq_done}, {"importance", s.importance},
              {"equalized", s.equalized}};
  if (info.quantized) {
    layer["bits"] = info.scheme.bits;
    layer["group_size"] = info.scheme.group_size;
    layer["symmetric"] = info.scheme.symmetric;
    layer["scheme"] = scheme_name(info.scheme);
    layer["scale_type"] = scale_type_name(info.scheme.scale_type);
    layer["cosine_similarity"] = info.cosine;
    layer["relative_error"] = info.relative_error;
    layer["sqnr_db"] = info.sqnr_db;
    layer["bits_per_weight"] = 8.0 * static_cast<double>(stored) / static_cast<double>(t.numel);
    layer["method"] = s.gptq() ? "gptq" : importance_weighted(s) ? "importance" : "data-free";
    if (s.cal && !s.cal->equalization.is_null()) layer["equalization"] = s.cal->equalization;
    if (s.cal && s.gptq()) layer["time_group_weights"] = s.cal->group_weights;
    if (s.cal && s.cal->hessians && s.cal->hessians->block) layer["hessian_block"] = s.cal->hessians->block;
    if (!s.output_error.is_null()) {
      layer["output_error"] = s.output_error;
      layer["output_cosine"] = s.output_cosine;
      rec["output_error"] = {{"method", layer["method"]}, {"output_cosine", s.output_cosine},
                             {"equalization_alpha", s.cal && !s.cal->input_scale.empty()
                                                        ? s.cal->equalization.value("alpha", json(nullptr))
                                                        : json(nullptr)},
                             {"groups", s.output_error}};
    }
    if (s.cal && s.cal->activations) {
      const LayerActivations& a = *s.cal->activations;
      auto params_json = [](const ActivationParams& p) {
        return json{{"bits", p.bits}, {"scale", p.scale}, {"zero_point", p.zero_point},
                    {"clip_lo", p.clip_lo}, {"clip_hi", p.clip_hi}};
      };
      json groups = json::array();
      for (size_t g = 0; g < a.groups.size(); ++g) {
        json e = params_json(a.groups[g].params);
        e["group"] = g;
        e["step_lo"] = groups_[g].step_lo;
        e["step_hi"] = groups_[g].step_hi;
        json row = e;  // the activations.parquet row
        e["relative_error"] = a.groups[g].rel_error;
        e["static_relative_error"] = a.groups[g].static_rel_error;
        e["held_out"] = a.groups[g].held_out;
        e["uses_static"] = a.groups[g].uses_static;
        groups.push_back(std::move(e));
        rec["activations"].push_back(std::move(row));
      }
      layer["activation"] = {{"static", params_json(a.static_params)}, {"groups", groups}};
    }
  } else {
    rec["skipped"] = {{"name", qualified}, {"reason", info.reason}};
  }
  if (!info.rejected_bits.empty())
    rec["fallback"] = {{"name", qualified}, {"rejected_bits", info.rejected_bits},
                       {"final", info.quantized ? json(info.scheme.bits) : json("kept")}};
  if (!s.error.empty()) rec["error"] = {{"name", qualified}, {"error", s.error}};
  rec["layer"] = std::move(layer);
  return rec;
}

void QuantizeRun::apply_record(const json& rec, json& comp_report) {
  const std::string qualified = rec["qualified"].get<std::string>();
  const uint64_t source = rec["source_bytes"].get<uint64_t>(), stored = rec["stored_bytes"].get<uint64_t>();
  const uint64_t numel = rec["numel"].get<uint64_t>();
  source_bytes_ += source;
  stored_bytes_ += stored;
  comp_report["source_bytes"] = comp_report["source_bytes"].get<uint64_t>() + source;
  comp_report["stored_bytes"] = comp_report["stored_bytes"].get<uint64_t>() + stored;
  comp_report["tensors"] = comp_report["tensors"].get<uint64_t>() + 1;
  if (rec["quantized"].get<bool>()) {
    comp_report["quantized"] = comp_report["quantized"].get<uint64_t>() + 1;
    if (!rec["output_error"].is_null()) output_errors_[qualified] = rec["output_error"];
    for (const json& a : rec["activations"]) {
      ActivationRow row;
      row.component = rec["component"].get<std::string>();
      row.layer = rec["name"].get<std::string>();
      row.group = a["group"].get<int>();
      row.step_lo = a["step_lo"].get<double>();
      row.step_hi = a["step_hi"].get<double>();
      row.params = {a["bits"].get<int>(), a["scale"].get<float>(), a["zero_point"].get<int32_t>(),
                    a["clip_lo"].get<float>(), a["clip_hi"].get<float>()};
      activation_rows_.push_back(row);
    }
    const double cosine = rec["cosine"].get<double>();
    ++quantized_layers_;
    cosine_sum_ += cosine;
    if (cosine < cosine_min_ || worst_layer_.empty()) cosine_min_ = cosine, worst_layer_ = qualified;
    quantized_weights_ += numel;
    quantized_stored_bytes_ += stored;
  } else {
    skipped_.push_back(rec["skipped"]);
  }
  if (!rec["fallback"].is_null()) fallbacks_.push_back(rec["fallback"]);
  if (!rec["error"].is_null()) errors_.push_back(rec["error"]);
  for (const json& w : rec["warnings"]) warnings_.push_back(w);
  calibrated_layers_ += rec["calibrated"].get<bool>();
  gptq_layers_ += rec["gptq"].get<bool>();
  importance_layers_ += rec["importance"].get<bool>();
  equalized_layers_ += rec["equalized"].get<bool>();
  layers_.push_back(rec["layer"]);
  records_.push_back(rec);
  progress_.tensors_done += 1;
  progress_.weights_done += numel;
  emit_progress(false, qualified);
}

json QuantizeRun::run_fingerprint(const ModelSource& model, const std::string& calib_path) const {
  auto file = [](const std::string& p) {
    std::error_code ec;
    const auto size = fs::file_size(p, ec);
    const auto time = fs::last_write_time(p, ec).time_since_epoch().count();
    return json::array({p, ec ? 0 : size, ec ? 0 : static_cast<int64_t>(time)});
  };
  json files = json::array();
  for (const auto& c : model.components)
    if (c.selected)
      for (const auto& f : c.weight_files) files.push_back(file(f));
  json config = cfg_.as_json;
  config.erase("num_threads");  // the output is the same for every thread count
  return {{"producer", std::string("arrow_quant_v2 ") + ARROWQUANT_VERSION}, {"format_version", kFormatVersion},
          {"source", model.root}, {"config", config}, {"files", files},
          {"calibration", calib_path.empty() ? json(nullptr) : file(calib_path)}};
}

void QuantizeRun::drain(std::deque<std::unique_ptr<Slot>>& window) {
  stop_ = true;
  for (auto& s : window)
    while ((s->preparing && !s->prepared.load(std::memory_order_acquire)) || (s->job && !s->job->finished())) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
  window.clear();
}

Status QuantizeRun::run_component(const ComponentSource& comp, const std::vector<TensorRef>& refs, size_t first,
                                  size_t last, const TensorJournal& journal, json& comp_report) {
  std::deque<std::unique_ptr<Slot>> window;
  uint64_t inflight = 0;
  size_t next = first, written = first;
  const size_t max_window = 2 * static_cast<size_t>(pool_.size()) + 2;
  Status result = Status::OK();
  while (next < last || !window.empty()) {
    while (next < last &&
           (window.empty() || (window.size() < max_window && inflight + refs[next].info->nbytes <= kInflightBudget))) {
      auto s = std::make_unique<Slot>();
      s->component = comp.name;
      s->ref = refs[next++];
      s->plan = plan_tensor(cfg_, s->info());
      if (auto b = budget_.find(s->info().name); b != budget_.end() && s->plan.quantize) {
        s->plan.bits = b->second.first;
        s->plan.reason = b->second.second;
      }
      if (s->plan.quantize && !(calib_ && attach_calibration(*s))) {
        s->scheme = scheme_for(*s, s->plan.bits);
        start_job(*s);
      }
      inflight += s->info().nbytes;
      window.push_back(std::move(s));
    }
    Slot& head = *window.front();
    result = wait_for(head, window);
    if (!result.ok()) break;
    auto settled = settle(head);
    if (!settled.ok()) {
      result = settled.status();
      break;
    }
    if (!*settled) continue;
    result = write(head, written++, journal, comp_report);
    if (!result.ok()) break;
    if (hooks_.should_stop && hooks_.should_stop()) {  // small tensors may never make wait_for wait
      stop_ = true;
      result = Cancelled("interrupted; no output was written");
      break;
    }
    inflight -= head.info().nbytes;
    window.pop_front();
  }
  if (!result.ok()) drain(window);
  return result;
}


Status QuantizeRun::plan_budget(const std::string& component, const std::vector<TensorRef>& refs) {
  std::vector<BudgetLayer> layers;
  uint64_t calibrated = 0;
  std::vector<int> widths;
  for (const TensorRef& r : refs) {
    const TensorInfo& t = *r.info;
    const TensorPlan plan = plan_tensor(cfg_, t);
    if (!plan.quantize) continue;
    const uint64_t rows = static_cast<uint64_t>(t.shape[0]), cols = t.numel / std::max<uint64_t>(1, rows);
    BudgetLayer L;
    L.name = t.name;
    L.weights = t.numel;
    const bool override = plan.reason.rfind("bit override", 0) == 0;
    if (plan.reason.rfind("sensitive layer", 0) == 0) L.prior = kSensitivePrior;
    for (int bits : {2, 3, 4, 5, 6, 8}) {
      const auto type = cfg_.ggml_type_for(override ? plan.bits : bits, cols);
      if (type && std::find(L.types.begin(), L.types.end(), *type) == L.types.end()) L.types.push_back(*type);
    }
    std::sort(L.types.begin(), L.types.end(),
              [](GgmlType a, GgmlType b) { return ggml_bits_per_weight(a) < ggml_bits_per_weight(b); });
    if (override) {
      L.fixed = 0;
      L.error.assign(L.types.size(), 0.0);
    } else {
      const RowSource src = row_source(r);
      // With calibration the layer's output error under its Hessian (timestep groups averaged),
      // else its weight error.
      std::optional<LayerHessians> h;
      if (calib_ && cfg_.enable_time_aware) {
        const LayerCalibration* lc = calib_->lookup(component, t.name);
        if (lc && static_cast<uint64_t>(lc->in_features) == cols) {
          auto hr = layer_hessians(*lc, groups_, {}, false);
          if (!hr.ok()) return hr.status().WithPrefix(StrCat(component.empty() ? t.name : component + "/" + t.name, ": "));
          h = std::move(*hr);
        }
      }
      if (h) ++calibrated, L.output_error = true;
      const Status st = measure_budget_layer(src, &pool_, &L, h ? &h->gptq : nullptr,
                                             h ? h->layout() : HessianLayout{});
      if (!st.ok()) continue;  // left to the layer's own job, which reports it
    }
    layers.push_back(std::move(L));
  }
  const std::vector<int> pick = allocate_budget(layers, cfg_.target_bits_per_weight);
  double bits = 0, weights = 0;
  json counts = json::object();
  for (size_t i = 0; i < layers.size(); ++i) {
    const BudgetLayer& L = layers[i];
    const GgmlType t = L.types[static_cast<size_t>(pick[i])];
    bits += ggml_bits_per_weight(t) * static_cast<double>(L.weights);
    weights += static_cast<double>(L.weights);
    const std::string name = ggml_traits(t).name;
    counts[name] = counts.value(name, 0) + 1;
    if (L.fixed >= 0) continue;  // keeps its override (and reason)
    char err[32];
    std::snprintf(err, sizeof(err), "%.3g", std::sqrt(L.error[static_cast<size_t>(pick[i])]));
    budget_[L.name] = {ggml_traits(t).nominal_bits,
                       StrCat("model budget ", cfg_.target_bits_per_weight, " bits/weight: ", name, " (sampled relative ",
                              L.output_error ? "output" : "weight", " error ", err, L.prior > 1 ? ", sensitive layer" : "",
                              ")")};
  }
  budget_report_ = {{"target_bits_per_weight", cfg_.target_bits_per_weight},
                    {"planned_bits_per_weight", weights > 0 ? bits / weights : 0.0},
                    {"layers", layers.size()}, {"types", counts}, {"calibrated_layers", calibrated},
                    {"rule", "per layer, the type minimising sum_l p_l e_l within the budget, greedy on cost per bit; e_l "
                             "the relative output error tr(D H D^T) / tr(W H W^T) under the layer's calibration Hessian "
                             "(timestep groups averaged), or without one the relative weight error ||D||^2 / ||W||^2, "
                             "D = W - Q on sampled rows; p = 8 for sensitive layers, 1 otherwise"}};
  return Status::OK();
}

Status QuantizeRun::open_model(const std::string& model_path) {
  AQ_ASSIGN_OR_RETURN(ModelSource model, discover_model(model_path, cfg_.components));
  model_ = std::move(model);
  const ModelSource& m = *model_;
  // Open (and so validate) every selected component before quantizing anything.
  refs_.assign(m.components.size(), {});
  std::vector<std::string> names;
  for (size_t i = 0; i < m.components.size(); ++i) {
    const auto& c = m.components[i];
    if (!c.selected) continue;
    AQ_ASSIGN_OR_RETURN(refs_[i], open_component_tensors(c));
    for (const auto& r : refs_[i]) {
      names.push_back(r.info->name);
      progress_.tensors_total += 1;
      progress_.weights_total += r.info->numel;
    }
  }
  // Calibration: the configured file, or calibration.parquet beside the weights.
  calib_path_ = cfg_.calibration_path;
  if (calib_path_.empty()) {
    // calibration.parquet in the model directory, else in a selected component's folder
    const fs::path dir = m.layout == ModelLayout::kSingleFile ? fs::path(m.root).parent_path() : fs::path(m.root);
    std::vector<fs::path> candidates = {dir / "calibration.parquet"};
    for (const auto& c : m.components)
      if (c.selected && !c.name.empty()) candidates.push_back(dir / c.name / "calibration.parquet");
    for (const auto& p : candidates) {
      std::error_code ec;
      if (fs::is_regular_file(p, ec)) {
        calib_path_ = p.string();
        break;
      }
    }
  }
  if (!calib_path_.empty()) {
    AQ_ASSIGN_OR_RETURN(CalibrationData data, read_calibration(calib_path_));
    if (cfg_.time_groups.empty()) {
      groups_ = group_time_bins(data, cfg_.num_time_groups);
    } else {
      AQ_ASSIGN_OR_RETURN(groups_, given_time_groups(data, cfg_.time_groups));
    }
    calib_ = std::move(data);
  }
  modality_guess_ = detect_modality(m, names);
  if (!cfg_.modality.empty())
    modality_guess_ = {cfg_.modality, "set in the config (detected: " + modality_guess_.modality + ")"};
  modality_ = modality_guess_.modality;
  return Status::OK();
}

Status QuantizeRun::begin_run(StagingDir& staging) {
  // Every run records what it quantizes with, so that an interrupted one can be resumed; a
  // resumed run continues only when that matches exactly.
  fingerprint_ = run_fingerprint(*model_, calib_path_);
  const std::string resume_file = (fs::path(staging.run_dir()) / kResumeFile).string();
  resume_report_ = {{"requested", resume_}, {"resumed_from", nullptr}, {"tensors", 0}, {"reason", nullptr}};
  resuming_ = false;
  if (!staging.resumed_from().empty()) {
    auto previous = read_json(resume_file);
    std::string why;
    if (!previous.ok()) why = "its run record is unreadable";
    else if ((*previous)["config"] != fingerprint_["config"]) why = "the configuration differs";
    else if ((*previous)["files"] != fingerprint_["files"] || (*previous)["source"] != fingerprint_["source"])
      why = "the source weights changed (paths, sizes or modification times)";
    else if ((*previous)["calibration"] != fingerprint_["calibration"]) why = "the calibration file changed";
    else if (*previous != fingerprint_) why = "it was written by another version";
    if (why.empty()) {
      resuming_ = true;
      resume_report_["resumed_from"] = staging.resumed_from();
    } else {
      AQ_RETURN_IF_ERROR(staging.Reset());
      resume_report_["reason"] = StrCat("not resumed from ", staging.resumed_from(), ": ", why, "; quantized from the start");
      warnings_.push_back(resume_report_["reason"]);
    }
  } else if (resume_) {
    resume_report_["reason"] = "no interrupted run of this output was found; quantized from the start";
  }
  if (!resuming_) AQ_RETURN_IF_ERROR(write_json_file(resume_file, fingerprint_));
  return Status::OK();
}

Result<json> QuantizeRun::run(const std::string& model_path, const std::string& output_path) {
  AQ_RETURN_IF_ERROR(open_model(model_path));
  // Only now, with every header validated, is anything created on disk.
  AQ_ASSIGN_OR_RETURN(StagingDir staging, StagingDir::Create(output_path, model_->root, cfg_.overwrite, resume_));
  AQ_RETURN_IF_ERROR(begin_run(staging));
  auto result = write_output(staging);
  if (!result.ok() && resume_)
    return keep_for_resume(staging, result.status(),
                           StrCat(progress_.tensors_done, " of ", progress_.tensors_total, " tensors"));
  return result;
}

Status QuantizeRun::component_budget(size_t i) {
  budget_.clear();
  budget_report_ = nullptr;
  const ComponentSource& c = model_->components[i];
  if (auto p = planned_budgets_.find(i); p != planned_budgets_.end()) {
    for (const auto& [name, v] : p->second["layers"].items())
      budget_[name] = {v.at(0).get<int>(), v.at(1).get<std::string>()};
    budget_report_ = p->second["report"];
    return Status::OK();
  }
  if (ggml() && cfg_.target_bits_per_weight > 0) AQ_RETURN_IF_ERROR(plan_budget(c.name, refs_[i]));
  return Status::OK();
}

Result<json> QuantizeRun::plan(StagingDir& staging) {
  json components = json::array();
  for (size_t i = 0; i < model_->components.size(); ++i) {
    const ComponentSource& c = model_->components[i];
    if (!c.selected) continue;
    AQ_ASSIGN_OR_RETURN(TensorJournal journal, TensorJournal::Open((fs::path(staging.run_dir()) / StrCat("c", i)).string()));
    AQ_RETURN_IF_ERROR(component_budget(i));
    json layers = json::object();
    for (const auto& [name, b] : budget_) layers[name] = json::array({b.first, b.second});
    planned_budgets_[i] = {{"layers", layers}, {"report", budget_report_}};
    json tensors = json::array();
    const std::vector<json> journaled = resuming_ ? journaled_records(journal, refs_[i]) : std::vector<json>{};
    for (size_t k = 0; k < refs_[i].size(); ++k) {
      const TensorInfo& t = *refs_[i][k].info;
      tensors.push_back({{"name", t.name}, {"numel", t.numel}, {"bytes", t.nbytes},
                         {"journaled", k < journaled.size() && !journaled[k].is_null()}});
    }
    components.push_back({{"index", i}, {"name", c.name}, {"tensors", tensors}, {"budget", planned_budgets_[i]}});
  }
  return json{{"staging", staging.path()}, {"run_dir", staging.run_dir()}, {"fingerprint", fingerprint_},
              {"modality", modality_}, {"resume", resume_report_}, {"components", components}};
}

Result<json> QuantizeRun::run_part(const std::string& model_path, const json& plan, size_t component, size_t first,
                                   size_t last) {
  AQ_RETURN_IF_ERROR(open_model(model_path));
  const std::string run_dir = plan.at("run_dir").get<std::string>();
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec))
    return NotFound(StrCat(run_dir, ": the run folder of the output is not visible here; every worker must see the "
                           "output's parent folder at the same path as the driver (a shared file system)"));
  const json mine = run_fingerprint(*model_, calib_path_);
  const json& theirs = plan.at("fingerprint");
  if (mine != theirs) {
    std::string why = mine["config"] != theirs["config"] ? "the configuration differs"
                      : mine["calibration"] != theirs["calibration"]
                          ? "the calibration file differs (path, size or modification time)"
                          : mine["producer"] != theirs["producer"] ? "another version of arrow_quant_v2 runs here"
                                                                   : "the source weights differ (paths, sizes or "
                                                                     "modification times)";
    return InvalidConfig(StrCat(model_path, ": this worker does not see what the driver planned: ", why));
  }
  if (component >= model_->components.size() || !model_->components[component].selected)
    return InvalidConfig(StrCat("component index ", component, " is not one the plan quantizes"));
  const std::vector<TensorRef>& refs = refs_[component];
  if (first > last || last > refs.size())
    return InvalidConfig(StrCat("tensors ", first, "..", last, " of component ", component, ", which has ", refs.size()));
  modality_ = plan.at("modality").get<std::string>();
  const json* planned = nullptr;
  for (const json& c : plan.at("components"))
    if (c.at("index").get<size_t>() == component) planned = &c;
  if (!planned) return InvalidConfig(StrCat("component index ", component, " is not in the plan"));
  planned_budgets_[component] = planned->at("budget");
  AQ_RETURN_IF_ERROR(component_budget(component));
  AQ_ASSIGN_OR_RETURN(TensorJournal journal, TensorJournal::Open((fs::path(run_dir) / StrCat("c", component)).string()));
  spill_dir_ = run_dir;
  json comp = {{"tensors", 0}, {"quantized", 0}, {"source_bytes", 0}, {"stored_bytes", 0}};
  AQ_RETURN_IF_ERROR(run_component(model_->components[component], refs, first, last, journal, comp));
  return json{{"tensors", last - first}, {"weights", progress_.weights_done},
              {"seconds", std::chrono::duration<double>(Clock::now() - start_).count()}, {"threads", pool_.size()}};
}

std::vector<json> QuantizeRun::journaled_records(const TensorJournal& journal, const std::vector<TensorRef>& refs) const {
  std::vector<json> out(refs.size());
  for (size_t k = 0; k < refs.size(); ++k) {
    std::optional<json> rec = journal.Record(k);
    if (!rec) continue;
    const TensorInfo& t = *refs[k].info;
    if (well_formed_record(*rec) && (*rec)["name"] == t.name && (*rec)["shape"] == json(t.shape) &&
        (*rec)["dtype"] == dtype_name(t.dtype))
      out[k] = std::move(*rec);
  }
  return out;
}

Result<json> QuantizeRun::write_output(StagingDir& staging) {
  const ModelSource& model = *model_;
  std::vector<std::vector<TensorRef>>& refs = refs_;
  const ModalityGuess& modality = modality_guess_;
  const bool resuming = resuming_;
  json& resume_report = resume_report_;
  json components = json::array();
  for (size_t i = 0; i < model.components.size(); ++i) {
    const auto& c = model.components[i];
    if (!c.selected) continue;
    const std::string rel = component_weights_path(c.name);
    const fs::path file = fs::path(staging.path()) / rel;
    std::error_code ec;
    fs::create_directories(file.parent_path(), ec);
    if (ec) return IoError(StrCat(file.parent_path().string(), ": cannot create: ", ec.message()));
    json comp = {{"name", c.name}, {"weights", rel}, {"source_files", json::array()},
                 {"tensors", 0}, {"quantized", 0}, {"source_bytes", 0}, {"stored_bytes", 0}};
    const fs::path base = model.layout == ModelLayout::kSingleFile ? fs::path(model.root).parent_path() : fs::path(model.root);
    for (const auto& f : c.weight_files) comp["source_files"].push_back(fs::path(f).lexically_relative(base).string());
    // Each finished tensor goes to the component's journal; weights.parquet is written from it
    // once all are there.
    AQ_ASSIGN_OR_RETURN(TensorJournal journal, TensorJournal::Open((fs::path(staging.run_dir()) / StrCat("c", i)).string()));
    spill_dir_ = staging.run_dir();
    records_ = json::array();
    std::optional<json> finished = resuming ? journal.Finished() : std::nullopt;
    if (finished) {
      const json& recs = finished->contains("records") ? (*finished)["records"] : json();
      bool ok = recs.is_array() && recs.size() == refs[i].size() && finished->contains("budget");
      for (size_t k = 0; ok && k < recs.size(); ++k)
        ok = well_formed_record(recs[k]) && recs[k]["name"] == refs[i][k].info->name;
      if (!ok || !fs::is_regular_file(file, ec)) finished.reset();
    }
    if (finished) {
      for (const json& rec : (*finished)["records"]) apply_record(rec, comp);
      budget_report_ = (*finished)["budget"];
      resumed_tensors_ += refs[i].size();
    } else {
      // Journaled tensors (an interrupted run's, or a distributed run's parts) are replayed, the
      // others quantized here, in tensor order either way.
      AQ_RETURN_IF_ERROR(component_budget(i));
      const size_t n = refs[i].size();
      const std::vector<json> journaled = journaled_records(journal, refs[i]);
      auto replay = [&](size_t k) { return !journaled[k].is_null(); };
      for (size_t k = 0; k < n;) {
        if (replay(k)) {
          apply_record(journaled[k], comp);
          ++journaled_tensors_;
          if (resuming) ++resumed_tensors_;
          ++k;
          continue;
        }
        size_t end = k + 1;
        while (end < n && !replay(end)) ++end;
        AQ_RETURN_IF_ERROR(run_component(c, refs[i], k, end, journal, comp));
        k = end;
      }
      AQ_RETURN_IF_ERROR(journal.Truncate(n));  // what torn writes left
      const auto copy_start = Clock::now();
      AQ_ASSIGN_OR_RETURN(auto sink, ParquetSink::Open(file.string(), c.name));
      AQ_RETURN_IF_ERROR(journal.CopyInto(*sink, refs[i].size()));
      AQ_RETURN_IF_ERROR(sink->Close());
      journal_copy_s_ += std::chrono::duration<double>(Clock::now() - copy_start).count();
      AQ_RETURN_IF_ERROR(journal.Finish({{"records", records_}, {"budget", budget_report_}}));
    }
    refs[i].clear();  // unmaps the component's files
    components.push_back(std::move(comp));
  }
  if (hooks_.should_stop && hooks_.should_stop()) return Cancelled("interrupted; no output was written");

  for (const auto& f : model.auxiliary_files) AQ_RETURN_IF_ERROR(copy_relative_file(model.root, f, staging.path()));

  const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  const double mean_cos = quantized_layers_ ? cosine_sum_ / static_cast<double>(quantized_layers_) : 1.0;
  const char* no_calibration =
      "needs calibration data (activations recorded across the sampling trajectory with "
      "arrow_quant_v2.calibration, saved as calibration.parquet beside the model or given as calibration_path); "
      "none was found, so weights were quantized data-free";
  json time_aware = {{"requested", cfg_.enable_time_aware}, {"applied", false},
                     {"reason", cfg_.enable_time_aware ? no_calibration : "disabled in the config"}};
  json spatial = {{"requested", cfg_.enable_spatial}, {"applied", false},
                  {"reason", cfg_.enable_spatial ? no_calibration : "disabled in the config"}};
  json calibration = nullptr;
  if (calib_) {
    json groups = json::array();
    for (const auto& g : groups_) groups.push_back({{"bins", g.bins}, {"step_lo", g.step_lo}, {"step_hi", g.step_hi}});
    calibration = {{"path", calib_->path}, {"step_kind", calib_->step_kind},
                   {"step_range", {calib_->step_lo, calib_->step_hi}}, {"num_bins", calib_->num_bins},
                   {"samples", calib_->samples}, {"time_groups", groups},
                   {"grouping_rule", cfg_.time_groups.empty()
                                         ? "adjacent bins with the closest activation ranges merged until num_time_groups remain"
                                         : "given in the config (time_groups)"},
                   {"layers_calibrated", calibrated_layers_}, {"layers_gptq", gptq_layers_},
                   {"activation_bits", cfg_.activation_bits},
                   {"activation_params", activation_rows_.empty() ? json(nullptr) : json(kActivationsFile)},
                   {"output_error", output_errors_}};
    if (!activation_rows_.empty()) {
      // each layer's one static set (activations.parquet holds the per-group ones), for reports
      json statics = json::object();
      for (const json& l : layers_)
        if (l.contains("activation")) statics[l["name"].get<std::string>()] = l["activation"]["static"];
      calibration["activation_static"] = std::move(statics);
    }
    if (cfg_.enable_time_aware && ggml()) {
      time_aware["applied"] = importance_layers_ > 0;
      time_aware["reason"] = importance_layers_ > 0
          ? StrCat("GPTQ on the ggml grids with H = sum_g w_g X_g^T X_g / n_g over ", groups_.size(),
                   " timestep groups for ", gptq_layers_, " of ", importance_layers_,
                   " calibrated layers (each block's scales fitted with per-column importance diag(H) when GPTQ "
                   "reaches it, then column-by-column error feedback in the natural column order; the others: "
                   "importance only); output error per group measured on held-out inputs")
          : std::string("the calibration file matched no quantized layer with a Hessian");
      time_aware["time_groups"] = groups.size();
    } else if (cfg_.enable_time_aware) {
      time_aware["applied"] = gptq_layers_ > 0;
      time_aware["reason"] = gptq_layers_ > 0
          ? StrCat("GPTQ on H = sum_g w_g X_g^T X_g / n_g over ", groups_.size(), " timestep groups (",
                   cfg_.time_group_weighting == "relative" ? "w_g proportional to 1 / the group's output energy"
                                                            : "uniform weights",
                   ") for ",
                   gptq_layers_, " layers; output error per group measured on held-out inputs")
          : std::string("the calibration file matched no quantized layer with a Hessian");
      time_aware["time_groups"] = groups.size();
    }
    if (cfg_.enable_spatial && ggml()) {
      spatial["reason"] = "ggml block types: the runtimes that compute on them (llama.cpp, stable-diffusion.cpp, "
                          "diffusers' GGUF loader) have no per-channel input scale, so no channel equalization";
    } else if (cfg_.enable_spatial && !search_equalization()) {
      spatial["reason"] = StrCat("modality strategy: ", modality_, " diffusion LMs are quantized weight-only with GPTQ "
                                 "and no channel equalization (set activation_bits to search it for W8A8 / W4A8)");
    } else if (cfg_.enable_spatial) {
      spatial["applied"] = equalized_layers_ > 0;
      spatial["layers"] = equalized_layers_;
      spatial["reason"] = StrCat(
          "channel equalization s_c = max|X_c|^alpha / max|W_c|^(1-alpha), alpha searched per layer (none, ",
          kAlphas[0], "..", kAlphas[std::size(kAlphas) - 1], ") on the mean output error over timestep groups",
          cfg_.activation_bits > 0 ? StrCat(" with ", cfg_.activation_bits, "-bit activations") : std::string(),
          "; applied to ", equalized_layers_, " of ", calibrated_layers_,
          " calibrated layers (the others were best left as they are); stored weights are W diag(s), "
          "their input_scale 1/s");
    }
    calibration["layers_equalized"] = equalized_layers_;
  }
  uint64_t total_weights = 0;
  for (const auto& l : layers_) total_weights += shape_numel(l["shape"].get<std::vector<int64_t>>()).value_or(0);

  json summary = {
      {"compression_ratio", stored_bytes_ ? static_cast<double>(source_bytes_) / static_cast<double>(stored_bytes_) : 1.0},
      {"source_weight_bytes", source_bytes_},
      {"quantized_weight_bytes", stored_bytes_},
      {"bits_per_weight", total_weights ? 8.0 * static_cast<double>(stored_bytes_) / static_cast<double>(total_weights) : 0.0},
      {"quantized_bits_per_weight", quantized_weights_ ? 8.0 * static_cast<double>(quantized_stored_bytes_) / static_cast<double>(quantized_weights_) : 0.0},
      {"cosine_similarity", mean_cos},
      {"min_cosine_similarity", quantized_layers_ ? cosine_min_ : 1.0},
      {"worst_layer", worst_layer_},
      {"quantized_layers", quantized_layers_},
      {"kept_layers", skipped_.size()},
      {"fallback_layers", fallbacks_.size()},
      {"error_layers", errors_.size()},
  };
  json manifest = {
      {"format", kFormatName},
      {"format_version", kFormatVersion},
      {"producer", std::string("arrow_quant_v2 ") + ARROWQUANT_VERSION},
      {"source", {{"path", model.root}, {"layout", layout_name(model.layout)}}},
      {"modality", modality.modality},
      {"modality_evidence", modality.evidence},
      {"config", cfg_.as_json},
      {"min_accuracy", cfg_.min_accuracy},
      {"components", components},
      {"copied_files", model.auxiliary_files},
      {"summary", summary},
      {"calibration", {{"time_aware", time_aware}, {"spatial", spatial}, {"data", calibration}}},
  };
  if (!activation_rows_.empty())
    AQ_RETURN_IF_ERROR(write_activation_params((fs::path(staging.path()) / kActivationsFile).string(), activation_rows_,
                                               calib_->step_kind));
  AQ_RETURN_IF_ERROR(write_json_file((fs::path(staging.path()) / kManifestFile).string(), manifest));

  AQ_RETURN_IF_ERROR(staging.Commit());
  uint64_t dir_bytes = 0;
  for (const auto& e : fs::recursive_directory_iterator(staging.destination()))
    if (e.is_regular_file()) dir_bytes += e.file_size();
  emit_progress(true, "done");

  json report = summary;
  report["quantized_path"] = staging.destination();
  report["source_path"] = model.root;
  report["layout"] = layout_name(model.layout);
  report["modality"] = modality.modality;
  report["modality_evidence"] = modality.evidence;
  report["bit_width"] = cfg_.bit_width;
  report["group_size"] = cfg_.group_size;
  report["symmetric"] = cfg_.symmetric;
  report["min_accuracy"] = cfg_.min_accuracy;
  report["model_size_mb"] = static_cast<double>(dir_bytes) / (1024.0 * 1024.0);
  report["quantization_time_s"] = seconds;
  report["parquet_from_journal_s"] = journal_copy_s_;
  report["journaled_tensors"] = journaled_tensors_;
  report["num_threads"] = pool_.size();
  report["components"] = components;
  report["layers"] = layers_;
  report["skipped"] = skipped_;
  report["fallbacks"] = fallbacks_;
  report["errors"] = errors_;
  report["warnings"] = warnings_;
  report["time_aware"] = time_aware;
  report["spatial"] = spatial;
  report["budget"] = budget_report_;
  report["calibration"] = calibration;
  report["copied_files"] = model.auxiliary_files.size();
  resume_report["tensors"] = resumed_tensors_;
  report["resume"] = resume_report;
  return report;
}

}  // namespace

Result<json> quantize_model(const std::string& model_path, const std::string& output_path,
                            const EngineConfig& config, const RunHooks& hooks, bool resume) {
  QuantizeRun run(config, hooks, resume);
  return run.run(model_path, output_path);
}

struct DistributedRun::Impl {
  EngineConfig cfg;
  RunHooks hooks;  // QuantizeRun refers to these two
  bool resume = false;
  std::unique_ptr<QuantizeRun> run;
  std::optional<StagingDir> staging;
  json plan;
  bool assembled = false;
};

DistributedRun::DistributedRun(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DistributedRun::DistributedRun(DistributedRun&&) noexcept = default;
DistributedRun::~DistributedRun() = default;

Result<std::unique_ptr<DistributedRun>> DistributedRun::Plan(const std::string& model_path,
                                                             const std::string& output_path,
                                                             const EngineConfig& config, bool resume) {
  auto impl = std::make_unique<Impl>();
  impl->cfg = config;
  impl->resume = resume;
  impl->run = std::make_unique<QuantizeRun>(impl->cfg, impl->hooks, resume);
  QuantizeRun& run = *impl->run;
  AQ_RETURN_IF_ERROR(run.open_model(model_path));
  AQ_ASSIGN_OR_RETURN(StagingDir staging, StagingDir::Create(output_path, run.model().root, config.overwrite, resume));
  impl->staging.emplace(std::move(staging));
  AQ_RETURN_IF_ERROR(run.begin_run(*impl->staging));
  AQ_ASSIGN_OR_RETURN(impl->plan, run.plan(*impl->staging));
  return std::unique_ptr<DistributedRun>(new DistributedRun(std::move(impl)));
}

const json& DistributedRun::plan() const { return impl_->plan; }

void DistributedRun::Keep() {
  if (impl_->staging && !impl_->assembled) impl_->staging->Keep();
}

Result<json> DistributedRun::Assemble(const RunHooks& hooks) {
  if (impl_->assembled) return Internal("DistributedRun::Assemble called twice");
  impl_->assembled = true;
  impl_->hooks = hooks;
  auto result = impl_->run->write_output(*impl_->staging);
  if (!result.ok() && impl_->resume)
    return keep_for_resume(*impl_->staging, result.status(), "the tensors journaled so far");
  return result;
}

Result<json> quantize_part(const std::string& model_path, const json& plan, const EngineConfig& config,
                           size_t component, size_t first, size_t last, const RunHooks& hooks) {
  QuantizeRun run(config, hooks, false);
  return run.run_part(model_path, plan, component, first, last);
}

}  // namespace aq
