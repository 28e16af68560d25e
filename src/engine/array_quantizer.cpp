#include "engine/array_quantizer.h"

namespace aq {

Result<ArrayOutcome> quantize_array(const EngineConfig& config, const std::string& name, DType dtype,
                                    const std::vector<int64_t>& shape, const float* data, ThreadPool* pool) {
  TensorInfo info;
  info.name = name;
  info.dtype = dtype;
  info.shape = shape;
  info.numel = shape_numel(shape).value_or(0);
  const TensorPlan plan = plan_tensor(config, info);
  ArrayOutcome out;
  out.reason = plan.reason;
  if (!plan.quantize) return out;

  RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(data);
  src.dtype = DType::kF32;
  src.rows = static_cast<uint64_t>(shape[0]);
  src.cols = src.rows ? info.numel / src.rows : 0;
  src.name = name;
  int bits = plan.bits;
  for (;;) {
    auto enc = encode_tensor(src, config.scheme(bits, src.rows, src.cols), pool);
    if (!enc.ok()) {
      if (enc.status().code() == StatusCode::kNonFinite && config.keep_nonfinite) {
        out.reason = StrCat("kept: non-finite weight (", enc.status().message(), ")");
        return out;
      }
      return enc.status();
    }
    const FallbackStep step = fallback_step(config, bits, enc->stats.cosine());
    if (step.accept) {
      out.encoded = std::move(enc).value();
      if (!out.rejected_bits.empty()) out.reason += StrCat("; fell back to ", bits, " bits");
      return out;
    }
    out.rejected_bits.push_back(bits);
    if (!step.retry_bits) {
      out.reason = step.keep_reason;
      return out;
    }
    bits = *step.retry_bits;
  }
}

}  // namespace aq
