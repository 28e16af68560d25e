#include "store/format.h"

#include "io/safetensors.h"

namespace aq {

uint64_t StoredTensorInfo::numel() const { return shape_numel(shape).value_or(0); }

uint64_t StoredTensorInfo::stored_bytes() const {
  if (!quantized) return source_bytes();
  return quantized_size(scheme, rows(), cols()).total();
}

}  // namespace aq
