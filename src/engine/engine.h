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

// Recomputes quality from the files: every stored tensor against its source tensor.
Result<nlohmann::json> validate_model(const std::string& original_path, const std::string& quantized_path,
                                      int num_threads, const RunHooks& hooks);

}  // namespace aq
