// Quantizing one tensor: cut into blocks of whole rows, each block converted to float32,
// checked for NaN/Inf, quantized, measured and packed into its own byte range of the output.
// Blocks are a fixed number of rows chosen from the tensor's width alone, so the bytes and the
// error figures are identical for every thread count.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "io/dtype.h"
#include "quant/metrics.h"
#include "quant/scheme.h"

namespace aq {

// Where a tensor's rows come from: rows x cols elements of a float dtype, row-major.
struct RowSource {
  const uint8_t* data = nullptr;
  DType dtype = DType::kF32;
  uint64_t rows = 0;
  uint64_t cols = 0;
  std::string name;  // for error messages
  std::string file;  // for error messages ("" for in-memory arrays)
};

struct EncodedTensor {
  QuantScheme scheme;
  uint64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes, scales, zero_points;  // exactly as stored
  ErrorStats stats;
};

// Rows per block: a multiple of 8 (so every block starts on a byte boundary of the packed
// stream for any bit width) holding about 64K weights.
uint64_t rows_per_block(uint64_t cols);

class TensorJob {
 public:
  TensorJob(RowSource source, QuantScheme scheme);

  // Submits every block to the pool; `on_block_done` runs on a worker after each block.
  void start(ThreadPool& pool, const std::atomic<bool>* stop, std::function<void()> on_block_done);
  // Runs every block on the calling thread.
  void run_inline();

  bool finished() const { return remaining_.load(std::memory_order_acquire) == 0; }
  uint64_t blocks_done() const { return blocks_ - static_cast<uint64_t>(remaining_.load()); }
  uint64_t blocks() const { return blocks_; }
  // First error in block order (deterministic), or OK. Valid once finished().
  Status status() const;
  bool needs_f32_scales() const { return imprecise_.load() > 0; }
  // Sums the per-block statistics in block order. Valid once finished() with OK status.
  EncodedTensor take();

 private:
  void run_block(uint64_t b);
  RowSource src_;
  EncodedTensor out_;
  std::vector<ErrorStats> block_stats_;
  std::vector<Status> block_status_;
  std::vector<float> scales_f_, zeros_f_;
  uint64_t block_rows_ = 0, blocks_ = 0;
  std::atomic<int64_t> remaining_{0};
  std::atomic<uint64_t> imprecise_{0};
  const std::atomic<bool>* stop_ = nullptr;
};

// Convenience for in-memory arrays and tests: quantizes a whole tensor, in parallel when a pool
// is given, retrying with float32 scales when float16 cannot hold them.
Result<EncodedTensor> encode_tensor(const RowSource& source, QuantScheme scheme, ThreadPool* pool);

}  // namespace aq
