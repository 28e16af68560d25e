#include "store/format.h"

#include "io/safetensors.h"

namespace aq {

uint64_t StoredTensorInfo::numel() const { return shape_numel(shape).value_or(0); }

void apply_input_scale(const StoredTensorInfo& info, float* out, uint64_t rows) {
  if (info.input_scale.empty()) return;
  const uint64_t cols = info.cols(), k = cols / info.input_scale.size();
  for (uint64_t r = 0; r < rows; ++r) {
    float* row = out + r * cols;
    for (uint64_t j = 0; j < cols; ++j) row[j] *= info.input_scale[j / k];
  }
}

}  // namespace aq
