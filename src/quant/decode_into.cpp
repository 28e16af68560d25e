#include "quant/decode_into.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "common/strcat.h"
#include "common/thread_pool.h"
#include "quant/ggml_codec.h"

namespace aq {
namespace {

// float32 -> bfloat16, round to nearest even, NaN kept quiet: f32_to_bf16 (common/half.h)
// without its branch, so the loop vectorizes (the same bits for every input).
__attribute__((target_clones("avx512f", "avx2", "default"))) void to_bf16(const float* in, uint64_t n, uint16_t* out) {
  for (uint64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, in + i, 4);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const uint32_t nan = (b >> 16) | 0x40u;
    out[i] = static_cast<uint16_t>((b & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
}

// Rows [r0, r1) into out (row r0 first): float32 directly, 16-bit types through a small float buffer that
// stays in the first-level cache (about 4K values per step, in whole decoding units: the
// decoders run at several times the memory's write bandwidth, so only the 16-bit values should
// leave the core).
Status decode_range(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, OutType t,
                    void* out, uint64_t unit, uint64_t r0, uint64_t r1) {
  if (t == OutType::kF32) {
    if (r1 > r0) return decode_rows(scheme, rows, cols, v, r0, r1 - r0, static_cast<float*>(out));
    return Status::OK();
  }
  uint16_t* o = static_cast<uint16_t*>(out);
  auto convert = [&](const float* in, uint64_t n, uint16_t* dst) {
    if (t == OutType::kBF16) {
      to_bf16(in, n, dst);
    } else {
      for (uint64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(in[i]);
    }
  };
  if (scheme.kind == SchemeKind::kGgml) {
    // rows are whole blocks, back to back: decode a few blocks at a time, whatever the row length
    const GgmlTraits& g = ggml_traits(scheme.ggml);
    const uint64_t block = static_cast<uint64_t>(g.block), per_step = std::max<uint64_t>(1, 4096 / block);
    const uint64_t b0 = r0 * cols / block, b1 = r1 * cols / block;
    if (t == OutType::kBF16 && ggml_decode_bf16(scheme.ggml, v.codes.data() + b0 * static_cast<uint64_t>(g.bytes), b1 - b0, o))
      return Status::OK();
    float buf[4096 + 256];
    for (uint64_t b = b0; b < b1; b += per_step) {
      const uint64_t nb = std::min(per_step, b1 - b);
      ggml_decode(scheme.ggml, v.codes.data() + b * static_cast<uint64_t>(g.bytes), nb, buf);
      convert(buf, nb * block, o + (b - b0) * block);
    }
    return Status::OK();
  }
  const uint64_t step = std::max<uint64_t>(1, (1u << 12) / std::max<uint64_t>(cols, 1) / unit) * unit;
  std::vector<float> buf(std::min(step, r1 - r0) * cols);
  for (uint64_t r = r0; r < r1; r += step) {
    const uint64_t nr = std::min(step, r1 - r);
    AQ_RETURN_IF_ERROR(decode_rows(scheme, rows, cols, v, r, nr, buf.data()));
    convert(buf.data(), nr * cols, o + (r - r0) * cols);
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
  const size_t elem = t == OutType::kF32 ? 4 : 2;
  auto at = [&](uint64_t r) { return static_cast<void*>(static_cast<uint8_t*>(out) + r * cols * elem); };
  std::vector<Status> st(n);
  WaitGroup wg;
  auto bound = [&](uint64_t k) { return std::min(rows, (units * k / n) * unit); };
  wg.add(static_cast<int>(n - 1));
  for (uint64_t k = 1; k < n; ++k)
    pool->submit([&, k] {
      st[k] = decode_range(scheme, rows, cols, v, t, at(bound(k)), unit, bound(k), bound(k + 1));
      wg.done();
    });
  st[0] = decode_range(scheme, rows, cols, v, t, out, unit, 0, bound(1));
  wg.wait();
  for (const Status& s : st) AQ_RETURN_IF_ERROR(s);
  return Status::OK();
}

Status decode_rows_into(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, OutType t,
                        uint64_t r0, uint64_t nr, void* out) {
  if (nr == 0 || cols == 0) return Status::OK();
  const uint64_t unit = decode_granularity(scheme, v);
  if (r0 % unit != 0 || (nr % unit != 0 && r0 + nr != rows) || r0 + nr > rows)
    return InvalidConfig(StrCat("decode_rows_into: rows [", r0, ", ", r0 + nr, ") must lie in the tensor's ", rows,
                                " rows and start and end on multiples of ", unit));
  return decode_range(scheme, rows, cols, v, t, out, unit, r0, r0 + nr);
}

}  // namespace aq
