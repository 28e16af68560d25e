#include "quant/scheme.h"

#include <cstdio>

namespace aq {

Status validate_scheme(const QuantScheme& s) {
  if (s.kind == SchemeKind::kGgml) {
    if (!parse_ggml_type(ggml_traits(s.ggml).name)) return InvalidConfig("unknown ggml type");
    if (s.rotate) return InvalidConfig(StrCat(ggml_traits(s.ggml).name, ": ggml types cannot be combined with rotate"));
    return Status::OK();
  }
  if (s.kind == SchemeKind::kEntropy) {
    if (s.bits < 1 || s.bits > 12) return InvalidConfig(StrCat("bit_width must be 1..12 for the entropy scheme, got ", s.bits));
    if (s.target_bpw != 0 && !(s.target_bpw >= 1.0 && s.target_bpw <= 12.0))
      return InvalidConfig(StrCat("target_bits_per_weight must be between 1 and 12, got ", s.target_bpw));
    return Status::OK();
  }
  if (s.bits < 2 || s.bits > 8) return InvalidConfig(StrCat("bit_width must be 2..8, got ", s.bits));
  if (s.group_size != 0 && s.group_size != 32 && s.group_size != 64 && s.group_size != 128 &&
      s.group_size != 256)
    return InvalidConfig(StrCat("group_size must be 32, 64, 128, 256 or 0 (per channel), got ", s.group_size));
  return Status::OK();
}

std::string scheme_name(const QuantScheme& s) {
  if (s.kind == SchemeKind::kGgml) return ggml_traits(s.ggml).name;
  if (s.kind == SchemeKind::kEntropy) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "entropy_%.2f", s.entropy_budget());
    return std::string(buf) + (s.rotate ? "_rot" : "");
  }
  return StrCat("int", s.bits, "_", s.group_size == 0 ? std::string("pc") : StrCat("g", s.group_size),
                s.symmetric ? "_sym" : "_asym", s.rotate ? "_rot" : "");
}

const char* scheme_kind_name(SchemeKind k) {
  switch (k) {
    case SchemeKind::kAffine: return "affine";
    case SchemeKind::kEntropy: return "entropy";
    case SchemeKind::kGgml: return "ggml";
  }
  return "?";
}

QuantScheme ggml_scheme(GgmlType t) {
  QuantScheme s;
  s.kind = SchemeKind::kGgml;
  s.ggml = t;
  s.bits = ggml_traits(t).nominal_bits;
  s.group_size = ggml_traits(t).block;
  s.symmetric = !ggml_traits(t).has_min;
  return s;
}

const char* scale_type_name(ScaleType t) { return t == ScaleType::kF16 ? "f16" : "f32"; }
const char* scale_method_name(ScaleMethod m) { return m == ScaleMethod::kMinMax ? "minmax" : "search"; }

QuantizedSize quantized_size(const QuantScheme& s, uint64_t rows, uint64_t cols) {
  QuantizedSize q;
  if (s.kind == SchemeKind::kGgml) {  // scales live inside the blocks
    q.code_bytes = rows * ggml_row_bytes(s.ggml, cols);
    return q;
  }
  q.code_bytes = packed_code_bytes(s.bits, rows * cols);
  const uint64_t groups = rows * groups_per_row(s, cols);
  q.scale_bytes = groups * scale_type_size(s.scale_type);
  q.zero_point_bytes = s.symmetric ? 0 : groups * scale_type_size(s.scale_type);
  return q;
}

}  // namespace aq
