// The engine: model directory in, quantized model directory out.
//
//   discover_model -> per component: open tensors -> plan_tensor -> TensorJob (thread pool)
//   -> accuracy fallback -> ParquetSink (in tensor order) -> copy auxiliary files -> manifest
//   -> rename the staging directory onto the destination.
//
// The calling thread plans, writes and reports; workers only quantize blocks. A bounded window
// of tensors is in flight, so memory holds a few tensors, never the model.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "common/status.h"
#include "engine/config.h"

namespace aq {

struct ProgressEvent {
  uint64_t tensors_done = 0;
  uint64_t tensors_total = 0;
  uint64_t weights_done = 0;  // source elements finished
  uint64_t weights_total = 0;
  double elapsed_s = 0;
  double eta_s = -1;    // < 0 while unknown
  std::string current;  // the tensor last finished (or being worked on, for heartbeats)
  double fraction() const {
    return weights_total ? static_cast<double>(weights_done) / static_cast<double>(weights_total) : 1.0;
  }
};

struct RunHooks {
  // Called on the calling thread: every `progress_every_tensors` tensors, at least every
  // `progress_interval_s` seconds while work goes on, and once at the end.
  std::function<void(const ProgressEvent&)> progress;
  int progress_every_tensors = 10;
  double progress_interval_s = 5.0;
  // Polled on the calling thread about every 100 ms; true stops the run (Ctrl-C).
  std::function<bool()> should_stop;
};

// Returns the result report (see docs/architecture.md, "Result"); the output exists only when
// the returned status is OK. With resume, an interrupted run's staging directory for the same
// output (same configuration and source files) is continued after the tensors it completed, with
// a result byte-identical to an uninterrupted run; and an interruption (should_stop) keeps this
// run's staging directory for the next resume instead of removing it.
Result<nlohmann::json> quantize_model(const std::string& model_path, const std::string& output_path,
                                      const EngineConfig& config, const RunHooks& hooks, bool resume = false);

// A distributed run (arrow_quant_v2.cluster; docs/architecture.md, "Distributed runs"): the
// driver plans once and owns the staging directory; workers quantize parts of the plan into its
// journal (quantize_part), each reading its tensors from the same source path; the driver then
// assembles the output from the journal -- quantizing itself any tensor no part journaled -- and
// renames it into place. The output is byte-identical to quantize_model's for the same config.
class DistributedRun {
 public:
  // Validates the model and config, creates the staging directory (with resume, takes over an
  // interrupted run's, as quantize_model does) and plans the model budget once.
  static Result<std::unique_ptr<DistributedRun>> Plan(const std::string& model_path, const std::string& output_path,
                                                      const EngineConfig& config, bool resume = false);
  ~DistributedRun();  // removes the staging directory unless assembled or kept
  DistributedRun(DistributedRun&&) noexcept;
  DistributedRun& operator=(DistributedRun&&) = delete;

  // What the workers need: "staging", "run_dir", "fingerprint" (config, source files, producer),
  // "modality", "resume", and "components": per selected component its "index", "name",
  // "tensors" (name, numel, bytes, journaled) and "budget".
  const nlohmann::json& plan() const;
  // Completes the output from the journal and renames it into place; once. Interrupted with
  // resume, the staging directory is kept for the next run.
  Result<nlohmann::json> Assemble(const RunHooks& hooks);
  // Leaves the staging directory (and the parts journaled so far) for a later resume.
  void Keep();

 private:
  struct Impl;
  explicit DistributedRun(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A worker's part of a distributed run: tensors [first, last) of the plan's component `component`
// (its index in the model) quantized into the plan's journal. The worker must see the source and
// the output's parent folder at the driver's paths, and the same files (checked against the
// plan's fingerprint). Entries are written atomically and are the same every time, so a part can
// be retried. Returns {"tensors", "weights", "seconds", "threads"}.
Result<nlohmann::json> quantize_part(const std::string& model_path, const nlohmann::json& plan,
                                     const EngineConfig& config, size_t component, size_t first, size_t last,
                                     const RunHooks& hooks);

// Recomputes quality from the files: every stored tensor against its source tensor.
Result<nlohmann::json> validate_model(const std::string& original_path, const std::string& quantized_path,
                                      int num_threads, const RunHooks& hooks);

}  // namespace aq
