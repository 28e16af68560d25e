#include "store/format.h"

#include "io/safetensors.h"

namespace aq {

uint64_t StoredTensorInfo::numel() const { return shape_numel(shape).value_or(0); }

}  // namespace aq
