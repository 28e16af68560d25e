// The engine's per-tensor decision for an in-memory array (LoRA / ControlNet weights through
// ArrowQuantV2.quantize): the same layer policy, float32-scale retry and accuracy fallback as a
// model file gets, run synchronously. A saved model and quantize() give identical values.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "engine/config.h"
#include "engine/plan.h"
#include "engine/tensor_job.h"

namespace aq {

struct ArrayOutcome {
  std::optional<EncodedTensor> encoded;  // empty: keep the array as it is
  std::string reason;
  std::vector<int> rejected_bits;
};

// `data`: rows x cols float32 values of the array named `name` whose original shape is `shape`.
Result<ArrayOutcome> quantize_array(const EngineConfig& config, const std::string& name, DType dtype,
                                    const std::vector<int64_t>& shape, const float* data, ThreadPool* pool);

}  // namespace aq
