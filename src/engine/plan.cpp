#include "engine/plan.h"

#include <algorithm>

namespace aq {

namespace {

TensorPlan plan_bits(const EngineConfig& c, const TensorInfo& t) {
  TensorPlan p;
  if (!dtype_is_float(t.dtype)) {
    p.reason = StrCat("kept: ", dtype_name(t.dtype), " is not a floating-point type");
    return p;
  }
  for (const auto& s : c.skip_patterns)
    if (s.matches(t.name)) {
      p.reason = StrCat("kept: matches skip pattern '", s.text, "'");
      return p;
    }
  if (t.shape.size() < 2) {
    p.reason = t.shape.empty() ? "kept: scalar" : "kept: 1-D tensor (norm, bias or embedding vector)";
    return p;
  }
  if (t.numel < c.min_tensor_size) {
    p.reason = StrCat("kept: ", t.numel, " weights, under min_tensor_size ", c.min_tensor_size);
    return p;
  }
  for (const auto& [pattern, bits] : c.bit_overrides)
    if (pattern.matches(t.name)) {
      if (bits == kKeepBits) {
        p.reason = StrCat("kept: bit override '", pattern.text, "' = 16");
        return p;
      }
      p.quantize = true;
      p.bits = bits;
      p.reason = StrCat("bit override '", pattern.text, "'");
      return p;
    }
  for (const auto& s : c.sensitive_patterns)
    if (s.matches(t.name)) {
      if (c.sensitive_bit_width == kKeepBits) {
        p.reason = StrCat("kept: sensitive layer (pattern '", s.text, "')");
        return p;
      }
      p.quantize = true;
      p.bits = std::max(c.bit_width, c.sensitive_bit_width);
      p.reason = StrCat("sensitive layer (pattern '", s.text, "') at ", p.bits, " bits");
      return p;
    }
  p.quantize = true;
  p.bits = c.bit_width;
  p.reason = "default";
  return p;
}

}  // namespace

TensorPlan plan_tensor(const EngineConfig& c, const TensorInfo& t) {
  TensorPlan p = plan_bits(c, t);
  if (!p.quantize || c.scheme_kind != SchemeKind::kGgml) return p;
  // ggml block types need whole blocks per row
  const uint64_t cols = t.numel / std::max<uint64_t>(1, static_cast<uint64_t>(t.shape[0]));
  std::string note;
  if (!c.ggml_type_for(p.bits, cols, &note)) {
    p.quantize = false;
    p.reason = StrCat("kept: rows of ", cols, " weights fit no ggml block type (a multiple of 32 is needed)");
    return p;
  }
  if (!note.empty()) p.reason += "; " + note;
  return p;
}

std::optional<int> next_fallback_bits(int bits) {
  switch (bits) {
    case 2: return 3;
    case 3: return 4;
    case 4: return 8;
    default: return std::nullopt;
  }
}

FallbackStep fallback_step(const EngineConfig& c, int bits, double cosine) {
  FallbackStep step;
  if (!c.enable_fallback || cosine >= c.min_accuracy) return step;
  step.accept = false;
  step.retry_bits = next_fallback_bits(bits);
  if (!step.retry_bits)
    step.keep_reason = StrCat("kept: cosine ", cosine, " at ", bits, " bits is below min_accuracy ", c.min_accuracy,
                              " (fallback ladder exhausted)");
  return step;
}

}  // namespace aq
