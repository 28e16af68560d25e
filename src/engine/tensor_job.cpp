#include "engine/tensor_job.h"

#include <algorithm>
#include <cmath>

#include "common/half.h"
#include "quant/group_quant.h"
#include "quant/pack.h"
#include "quant/tensor_codec.h"

namespace aq {

uint64_t rows_per_block(uint64_t cols) {
  const uint64_t target = 65536;
  uint64_t r = cols == 0 ? 8 : target / cols;
  r = std::max<uint64_t>(8, r / 8 * 8);
  return r;
}

TensorJob::TensorJob(RowSource source, QuantScheme scheme) : src_(std::move(source)) {
  out_.scheme = scheme;
  out_.rows = src_.rows;
  out_.cols = src_.cols;
  const QuantizedSize size = quantized_size(scheme, src_.rows, src_.cols);
  out_.codes.assign(size.code_bytes, 0);
  out_.scales.assign(size.scale_bytes, 0);
  out_.zero_points.assign(size.zero_point_bytes, 0);
  const uint64_t groups = src_.rows * groups_per_row(scheme, src_.cols);
  scales_f_.assign(groups, 0.0f);
  if (!scheme.symmetric) zeros_f_.assign(groups, 0.0f);
  block_rows_ = rows_per_block(src_.cols);
  blocks_ = src_.rows == 0 ? 0 : (src_.rows + block_rows_ - 1) / block_rows_;
  block_stats_.resize(blocks_);
  block_status_.resize(blocks_);
  remaining_.store(static_cast<int64_t>(blocks_));
}

void TensorJob::start(ThreadPool& pool, const std::atomic<bool>* stop, std::function<void()> on_block_done) {
  stop_ = stop;
  for (uint64_t b = 0; b < blocks_; ++b)
    pool.submit([this, b, on_block_done] {
      run_block(b);
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
      if (on_block_done) on_block_done();
    });
}

void TensorJob::run_inline() {
  for (uint64_t b = 0; b < blocks_; ++b) {
    run_block(b);
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void TensorJob::run_block(uint64_t b) {
  if (stop_ && stop_->load(std::memory_order_relaxed)) {
    block_status_[b] = Cancelled("stopped");
    return;
  }
  const QuantScheme& scheme = out_.scheme;
  const uint64_t cols = src_.cols;
  const uint64_t r0 = b * block_rows_;
  const uint64_t nr = std::min(block_rows_, src_.rows - r0);
  const uint64_t n = nr * cols;
  const size_t gpr = groups_per_row(scheme, cols);

  thread_local std::vector<float> w, deq;
  thread_local std::vector<uint8_t> q;
  w.resize(n);
  deq.resize(n);
  q.resize(n);
  convert_to_f32(src_.dtype, src_.data + r0 * cols * dtype_size(src_.dtype), n, w.data());

  for (uint64_t i = 0; i < n; ++i) {
    if (!std::isfinite(w[i])) {
      const uint64_t row = r0 + i / cols, col = i % cols;
      block_status_[b] = NonFinite(StrCat(src_.file.empty() ? "" : src_.file + ": ", "tensor '", src_.name,
                                          "': weight [", row, ", ", col, "] is ", std::isnan(w[i]) ? "NaN" : (w[i] > 0 ? "+Inf" : "-Inf")));
      return;
    }
  }

  float* s = scales_f_.data() + r0 * gpr;
  float* z = scheme.symmetric ? nullptr : zeros_f_.data() + r0 * gpr;
  const QuantizeRowsStats st = quantize_rows(scheme, w.data(), nr, cols, q.data(), s, z);
  if (st.f16_imprecise_groups) imprecise_.fetch_add(st.f16_imprecise_groups);
  dequantize_rows(scheme, q.data(), s, z, nr, cols, deq.data());
  block_stats_[b].add(w.data(), deq.data(), n);

  // r0 is a multiple of 8, so r0 * cols * bits is a whole number of bytes.
  pack_codes(q.data(), n, scheme.bits, out_.codes.data() + r0 * cols * static_cast<uint64_t>(scheme.bits) / 8);
  const size_t ssize = scale_type_size(scheme.scale_type);
  store_scales(scheme.scale_type, s, nr * gpr, out_.scales.data() + r0 * gpr * ssize);
  if (z) store_scales(scheme.scale_type, z, nr * gpr, out_.zero_points.data() + r0 * gpr * ssize);
}

Status TensorJob::status() const {
  for (const auto& s : block_status_)
    if (!s.ok() && s.code() != StatusCode::kCancelled) return s;
  for (const auto& s : block_status_)
    if (!s.ok()) return s;
  return Status::OK();
}

EncodedTensor TensorJob::take() {
  for (const auto& s : block_stats_) out_.stats.merge(s);
  return std::move(out_);
}

Result<EncodedTensor> encode_tensor(const RowSource& source, QuantScheme scheme, ThreadPool* pool) {
  AQ_RETURN_IF_ERROR(validate_scheme(scheme));
  for (int attempt = 0; attempt < 2; ++attempt) {
    TensorJob job(source, scheme);
    if (pool) {
      WaitGroup wg;
      wg.add(static_cast<int>(job.blocks()));
      job.start(*pool, nullptr, [&wg] { wg.done(); });
      wg.wait();
    } else {
      job.run_inline();
    }
    AQ_RETURN_IF_ERROR(job.status());
    if (job.needs_f32_scales() && scheme.scale_type == ScaleType::kF16) {
      scheme.scale_type = ScaleType::kF32;
      continue;
    }
    return job.take();
  }
  return Internal("encode_tensor: float32 scales reported as imprecise");
}

}  // namespace aq
