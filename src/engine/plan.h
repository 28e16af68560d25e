// Layer policy: which tensor is quantized, at how many bits, and why. Applied in order:
//   1. non-float dtypes are kept;         2. skip_patterns keep a tensor;
//   3. tensors of fewer than 2 dimensions (norms, biases) are kept;
//   4. tensors under min_tensor_size weights are kept;
//   5. the first matching bit_overrides entry sets the bits (16 keeps);
//   6. a sensitive pattern raises the bits to sensitive_bit_width;
//   7. everything else gets bit_width.
// After quantizing, a tensor whose cosine similarity falls below min_accuracy moves up the
// fallback ladder 2 -> 3 -> 4 -> 8 -> kept, each step recorded.
#pragma once

#include <optional>
#include <string>

#include "engine/config.h"
#include "io/safetensors.h"

namespace aq {

struct TensorPlan {
  bool quantize = false;
  int bits = 0;
  std::string reason;
};

TensorPlan plan_tensor(const EngineConfig& config, const TensorInfo& tensor);

// The next rung of the fallback ladder, or nullopt when the next step is keeping the tensor.
std::optional<int> next_fallback_bits(int bits);

// What to do with a tensor just encoded at `bits` whose cosine similarity is `cosine`:
// accept it, retry at `retry_bits`, or keep it unquantized (`keep_reason`).
struct FallbackStep {
  bool accept = true;
  std::optional<int> retry_bits;
  std::string keep_reason;
};
FallbackStep fallback_step(const EngineConfig& config, int bits, double cosine);

}  // namespace aq
