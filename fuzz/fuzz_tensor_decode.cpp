// Structured target: a stored tensor's scheme fields, shape and byte arrays (fuzz_util.h has the
// layout) through check_encoded, then, when it passes, every decoder a reader runs on it:
// decode_tensor (the loader, ParquetSource::dequantize), decode_into to float32 / float16 /
// bfloat16 on one and on two threads, and decode_rows_into of the first and last decoding units
// (the runtime's embedding lookups). The float32 results must agree bit for bit. This is where
// "codes length against shape, bits, type and scales" is exercised for every scheme, the ggml
// block types included.
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <vector>

#include "common/thread_pool.h"
#include "fuzz_util.h"
#include "quant/decode_into.h"
#include "quant/tensor_codec.h"

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_tensor_decode: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aq;
  const fuzz::FuzzTensor t = fuzz::parse_tensor(data, size);
  const EncodedView v = t.view();
  if (!check_encoded(t.scheme, t.rows, t.cols, v).ok()) return 0;
  const uint64_t n = t.rows * t.cols;
  if (n == 0 || n > fuzz::kMaxValues) return 0;

  std::vector<float> ref(n), out(n);
  const Status st = decode_tensor(t.scheme, t.rows, t.cols, v, ref.data());
  EncodedView tv = v;
  std::shared_ptr<const FrequencyTable> table;
  if (t.scheme.kind == SchemeKind::kEntropy) {
    auto r = make_decode_table(v);
    check(r.ok() == st.ok() || !st.ok(), "decode_tensor passed but make_decode_table failed");
    if (!r.ok()) return 0;
    table = *r;
    tv.table = table.get();
  }
  static ThreadPool pool(1);
  const Status st1 = decode_into(t.scheme, t.rows, t.cols, tv, OutType::kF32, out.data(), nullptr, 1);
  check(st1.ok() == st.ok(), "decode_into and decode_tensor disagree on the error");
  if (!st.ok()) return 0;
  check(fuzz::same_floats(ref.data(), out.data(), n), "decode_into (f32, 1 task) differs from decode_tensor");
  const Status st2 = decode_into(t.scheme, t.rows, t.cols, tv, OutType::kF32, out.data(), &pool, 2);
  check(st2.ok(), "decode_into on 2 tasks failed where 1 task passed");
  check(fuzz::same_floats(ref.data(), out.data(), n), "decode_into (f32, 2 tasks) differs from decode_tensor");
  std::vector<uint16_t> half(n);
  check(decode_into(t.scheme, t.rows, t.cols, tv, OutType::kF16, half.data(), nullptr, 1).ok(), "f16 decode failed");
  check(decode_into(t.scheme, t.rows, t.cols, tv, OutType::kBF16, half.data(), &pool, 2).ok(), "bf16 decode failed");

  const uint64_t unit = decode_granularity(t.scheme, tv);
  const uint64_t last = (t.rows - 1) / unit * unit;
  for (uint64_t r0 : {uint64_t{0}, last}) {
    const uint64_t nr = std::min(unit, t.rows - r0);
    std::vector<float> rows(nr * t.cols);
    check(decode_rows_into(t.scheme, t.rows, t.cols, tv, OutType::kF32, r0, nr, rows.data()).ok(),
          "decode_rows_into failed");
    check(fuzz::same_floats(ref.data() + r0 * t.cols, rows.data(), rows.size()),
          "decode_rows_into differs from decode_tensor");
  }
  return 0;
}
