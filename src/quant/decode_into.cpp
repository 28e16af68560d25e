#include "quant/decode_into.h"

#include <algorithm>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"

namespace aq {
namespace {

// Rows [r0, r1) into out: float32 directly, 16-bit types through a small float buffer that
// stays in cache (about 16K values per step, in whole decoding units).
Status decode_range(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, OutType t,
                    void* out, uint64_t unit, uint64_t r0, uint64_t r1) {
  if (t == OutType::kF32) {
    if (r1 > r0) return decode_rows(scheme, rows, cols, v, r0, r1 - r0, static_cast<float*>(out) + r0 * cols);
    return Status::OK();
  }
  const uint64_t step = std::max<uint64_t>(1, (1u << 14) / std::max<uint64_t>(cols, 1) / unit) * unit;
  std::vector<float> buf(std::min(step, r1 - r0) * cols);
  uint16_t* o = static_cast<uint16_t*>(out);
  for (uint64_t r = r0; r < r1; r += step) {
    const uint64_t nr = std::min(step, r1 - r);
    AQ_RETURN_IF_ERROR(decode_rows(scheme, rows, cols, v, r, nr, buf.data()));
    uint16_t* dst = o + r * cols;
    const uint64_t n = nr * cols;
    if (t == OutType::kBF16) {
      for (uint64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(buf[i]);
    } else {
      for (uint64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(buf[i]);
    }
  }
  return Status::OK();
}

}  // namespace

Status decode_into(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, OutType t, void* out,
                   ThreadPool* pool, int tasks) {
  if (rows == 0 || cols == 0) return Status::OK();
  const uint64_t unit = decode_granularity(scheme, v);
  const uint64_t units = (rows + unit - 1) / unit;
  const uint64_t n = pool ? std::clamp<uint64_t>(static_cast<uint64_t>(std::max(tasks, 1)), 1, units) : 1;
  if (n == 1) return decode_range(scheme, rows, cols, v, t, out, unit, 0, rows);
  std::vector<Status> st(n);
  WaitGroup wg;
  auto bound = [&](uint64_t k) { return std::min(rows, (units * k / n) * unit); };
  wg.add(static_cast<int>(n - 1));
  for (uint64_t k = 1; k < n; ++k)
    pool->submit([&, k] {
      st[k] = decode_range(scheme, rows, cols, v, t, out, unit, bound(k), bound(k + 1));
      wg.done();
    });
  st[0] = decode_range(scheme, rows, cols, v, t, out, unit, 0, bound(1));
  wg.wait();
  for (const Status& s : st) AQ_RETURN_IF_ERROR(s);
  return Status::OK();
}

}  // namespace aq
