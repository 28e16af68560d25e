// activations.parquet: activation quantization parameters per layer per timestep group, for
// W8A8 / W4A8 runtimes that pick the group from the current timestep (docs/format.md).
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "quant/activation.h"

namespace aq {

struct ActivationRow {
  std::string component, layer;
  int group = 0;
  double step_lo = 0, step_hi = 0;
  ActivationParams params;
};

// Written in one piece (the file is small): one row per (layer, group).
Status write_activation_params(const std::string& path, const std::vector<ActivationRow>& rows,
                               const std::string& step_kind);

}  // namespace aq
