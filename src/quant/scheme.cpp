#include "quant/scheme.h"

namespace aq {

Status validate_scheme(const QuantScheme& s) {
  if (s.bits != 2 && s.bits != 3 && s.bits != 4 && s.bits != 8)
    return InvalidConfig(StrCat("bit_width must be 2, 3, 4 or 8, got ", s.bits));
  if (s.group_size != 0 && s.group_size != 32 && s.group_size != 64 && s.group_size != 128 &&
      s.group_size != 256)
    return InvalidConfig(StrCat("group_size must be 32, 64, 128, 256 or 0 (per channel), got ", s.group_size));
  return Status::OK();
}

std::string scheme_name(const QuantScheme& s) {
  return StrCat("int", s.bits, "_", s.group_size == 0 ? std::string("pc") : StrCat("g", s.group_size),
                s.symmetric ? "_sym" : "_asym");
}

const char* scale_type_name(ScaleType t) { return t == ScaleType::kF16 ? "f16" : "f32"; }
const char* scale_method_name(ScaleMethod m) { return m == ScaleMethod::kMinMax ? "minmax" : "search"; }

QuantizedSize quantized_size(const QuantScheme& s, uint64_t rows, uint64_t cols) {
  QuantizedSize q;
  q.code_bytes = packed_code_bytes(s.bits, rows * cols);
  const uint64_t groups = rows * groups_per_row(s, cols);
  q.scale_bytes = groups * scale_type_size(s.scale_type);
  q.zero_point_bytes = s.symmetric ? 0 : groups * scale_type_size(s.scale_type);
  return q;
}

}  // namespace aq
