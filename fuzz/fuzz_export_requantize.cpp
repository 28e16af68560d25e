// The export path's own C++ (python/arrow_quant_v2/export.py): a stored tensor is read and
// dequantized (the weights_parquet target covers that reader) and, when the export asks for
// another ggml type ("requantize"), re-encoded with _core.encode_array, i.e. encode_tensor. Here
// the first input byte picks the export's target scheme (every ggml type, or affine / entropy as
// encode_array also takes), the rest is a stored tensor (fuzz_util.h's layout) that is checked
// and decoded as the reader does; the decoded values -- whatever floats fuzzed scales make -- are
// encoded, and the result must pass check_encoded and decode.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "engine/tensor_job.h"
#include "fuzz_util.h"
#include "quant/tensor_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aq;
  if (size < 1) return 0;
  const uint8_t pick = data[0];
  const fuzz::FuzzTensor t = fuzz::parse_tensor(data + 1, size - 1);
  const EncodedView v = t.view();
  if (!check_encoded(t.scheme, t.rows, t.cols, v).ok()) return 0;
  const uint64_t n = t.rows * t.cols;
  if (n == 0 || n > fuzz::kMaxValues) return 0;  // speed: the encoders search every block
  std::vector<float> w(n);
  if (!decode_tensor(t.scheme, t.rows, t.cols, v, w.data()).ok()) return 0;

  QuantScheme target;
  const size_t k = pick % (std::size(fuzz::kGgmlTypes) + 2);
  if (k < std::size(fuzz::kGgmlTypes)) {
    target = ggml_scheme(fuzz::kGgmlTypes[k]);
    target.ggml_weighting = static_cast<GgmlWeighting>((pick >> 4) % 3);
  } else if (k == std::size(fuzz::kGgmlTypes)) {
    target.bits = 2 + (pick >> 4) % 7;
    target.group_size = 0;
  } else {
    target.kind = SchemeKind::kEntropy;
    target.bits = 2 + (pick >> 4) % 7;
  }
  RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(w.data());
  src.dtype = DType::kF32;
  src.rows = t.rows;
  src.cols = t.cols;
  src.name = "fuzz";
  auto enc = encode_tensor(src, target, nullptr);
  if (!enc.ok()) return 0;  // e.g. non-finite values, a row length the type cannot take
  const Status st = check_encoded(enc->scheme, enc->rows, enc->cols, enc->view());
  if (!st.ok()) {
    std::fprintf(stderr, "encode_tensor wrote a tensor check_encoded refuses: %s\n", st.ToString().c_str());
    std::abort();
  }
  std::vector<float> back(n);
  const Status st2 = decode_tensor(enc->scheme, enc->rows, enc->cols, enc->view(), back.data());
  if (!st2.ok()) {
    std::fprintf(stderr, "encode_tensor wrote a tensor that does not decode: %s\n", st2.ToString().c_str());
    std::abort();
  }
  return 0;
}
