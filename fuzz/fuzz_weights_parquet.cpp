// A whole weights.parquet through the reader the loader, the runtime and the exporters use
// (ParquetSource, what arrow_quant_v2's WeightsReader binding wraps): Open (schema, metadata and
// every tensor's description), then for every tensor what WeightsReader does -- read() (its
// packed bytes: packed(), the exporters' "copy" path), check_encoded + decode_into (layer(),
// the runtime's PackedLayer) and dequantize() (numpy(), the exporters' re-encoding input).
#include <cstdint>
#include <vector>

#include "fuzz_util.h"
#include "quant/decode_into.h"
#include "store/parquet_source.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  aq::fuzz::use_system_memory_pool();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aq;
  const std::string path = fuzz::write_scratch("weights.parquet", data, size);
  auto src = ParquetSource::Open(path);
  if (!src.ok()) return 0;
  const auto& infos = (*src)->tensors();
  for (size_t i = 0; i < infos.size(); ++i) {
    const StoredTensorInfo& info = infos[i];
    (void)(*src)->find(info.name);
    (void)info.stored_bytes();
    (void)info.source_bytes();
    if (info.quantized) (void)scheme_name(info.scheme);
    auto t = (*src)->read(i);
    if (!t.ok()) continue;
    const uint64_t n = info.numel();
    if (n > fuzz::kMaxValues) continue;  // speed: the decoders are the same at any size
    std::vector<float> out(n);
    if (info.quantized) {
      // WeightsReader::layer: the runtime's copy of the bytes, checked and decoded on this thread
      if (check_encoded(info.scheme, info.rows(), info.cols(), t->payload).ok())
        (void)decode_into(info.scheme, info.rows(), info.cols(), t->payload, OutType::kBF16, out.data(), nullptr, 1);
    }
    (void)(*src)->dequantize(i, out.data());
  }
  return 0;
}
