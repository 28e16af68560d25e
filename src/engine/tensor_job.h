// Quantizing one tensor: cut into blocks of whole rows, each block converted to float32, checked
// for NaN/Inf, (rotated,) quantized, measured and packed into its own place in the output.
// Blocks are a fixed number of rows chosen from the tensor's width alone, so the bytes and the
// error figures are identical for every thread count.
//
// Affine schemes take one pass over the blocks. The entropy-coded scheme takes three, with a
// tensor-level step between them (run by whichever worker finishes a pass last):
//   1. row norms and a fixed sample of rotated rows       -> the step that meets the budget
//   2. codes, histogram and centroid sums                  -> rANS frequencies and centroids
//   3. codes again, rANS-coded per block; reconstruction measured against the source.
#pragma once

#include <array>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "io/dtype.h"
#include "io/spill_file.h"
#include "quant/entropy_quant.h"
#include "quant/gptq.h"
#include "quant/metrics.h"
#include "quant/rans.h"
#include "quant/scheme.h"
#include "quant/tensor_codec.h"

namespace aq {

// Where a tensor's rows come from: rows x cols elements of a float dtype, row-major.
struct RowSource {
  const uint8_t* data = nullptr;
  DType dtype = DType::kF32;
  uint64_t rows = 0;
  uint64_t cols = 0;
  std::string name;  // for error messages
  std::string file;  // for error messages ("" for in-memory arrays)
  // Memory-mapped sources: hands the pages of bytes [begin, begin + n) of `data` back to the OS
  // once a block has read them (the entropy-coded scheme's later passes fault them back in), so
  // a tensor of gigabytes (a 7B model's embedding) does not stay resident while it is encoded.
  // Null: nothing to release.
  std::function<void(uint64_t begin, uint64_t n)> release;
  // Column j of every row is multiplied by (*col_scale)[j] once converted to float32 (channel
  // equalization: the weight quantized is W S, made as its rows are read). Null: none.
  std::shared_ptr<const std::vector<float>> col_scale;
};

struct EncodedTensor {
  QuantScheme scheme;
  uint64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes, scales, zero_points;  // exactly as stored
  std::optional<EntropySide> entropy;               // entropy-coded tensors
  ErrorStats stats;
  // Codes too big to hold in memory (TensorJob::spill_codes) are in this file instead of `codes`,
  // mapped read-only: a reader hands back the pages of what it has read (SpillFile::release).
  std::shared_ptr<SpillFile> spill;

  std::span<const uint8_t> code_bytes() const { return spill ? spill->bytes() : std::span<const uint8_t>(codes); }
  uint64_t stored_bytes() const {
    return code_bytes().size() + scales.size() + zero_points.size() + (entropy ? entropy->stored_bytes() : 0);
  }
  EncodedView view() const { return {code_bytes(), scales, zero_points, entropy ? &*entropy : nullptr, nullptr}; }
};

// Rows per block: a multiple of 8 (so every block starts on a byte boundary of the packed
// stream for any bit width) holding about 64K weights. Entropy-coded tensors use it as their
// chunk size.
uint64_t rows_per_block(uint64_t cols);

class TensorJob {
 public:
  TensorJob(RowSource source, QuantScheme scheme);
  // GPTQ instead of the data-free scale search (affine, unrotated schemes only): the factor of
  // the layer's input Hessian, shared by every block.
  TensorJob(RowSource source, QuantScheme scheme, std::shared_ptr<const GptqFactor> gptq);

  // ggml schemes: per input column weights of the squared error (the diagonal of the layer's
  // calibration Hessian), or null for plain squared error. Before start().
  void set_importance(std::shared_ptr<const std::vector<float>> importance);
  // Before start(): codes of more than `above_bytes` (for the entropy-coded scheme: expected at
  // its budget) are written to a SpillFile in `dir` as blocks finish, not held in memory, so a
  // tensor of any size costs the blocks in flight. The result's codes are then `spill`.
  void spill_codes(std::string dir, uint64_t above_bytes);

  // Submits the first pass to the pool; `on_block_done` runs on a worker after every block.
  void start(ThreadPool& pool, const std::atomic<bool>* stop, std::function<void()> on_block_done);
  // Runs every pass on the calling thread.
  void run_inline();
  // Runs every pass on the pool's workers, the calling thread waiting for them; inline without one.
  void run(ThreadPool* pool);

  bool finished() const { return finished_.load(std::memory_order_acquire); }
  uint64_t blocks_done() const { return work_done_.load(); }
  uint64_t blocks() const { return blocks_ * static_cast<uint64_t>(passes()); }
  // First error in block order (deterministic), or OK. Valid once finished().
  Status status() const;
  bool needs_f32_scales() const { return imprecise_.load() > 0; }
  // The encoded tensor, statistics merged in block order. Valid once finished() with OK status.
  EncodedTensor take();

 private:
  int passes() const { return out_.scheme.kind == SchemeKind::kEntropy ? 3 : 1; }
  // The codes' buffer (in memory, or a SpillFile), when the first pass starts; false after
  // recording an error.
  bool allocate_codes();
  // Once the last pass is done: the spilled codes in block order, mapped for the readers.
  void finish_codes();
  // Codes of block b, n bytes at `offset` of the tensor's codes, into the SpillFile.
  void spill_block(uint64_t b, uint64_t offset, const uint8_t* p, uint64_t n);
  void submit_pass(int pass);
  void run_block(int pass, uint64_t b);
  // Runs the tensor-level step after `pass`; returns the pass to run next, or -1 when done (then
  // finishes the codes).
  int after_pass(int pass);
  int next_pass(int pass);
  void block_done(int pass);
  uint64_t block_begin(uint64_t b) const { return b * block_rows_; }
  uint64_t block_count_rows(uint64_t b) const;
  // Converts rows of block b into w, checking for NaN/Inf when `check`; false after recording an
  // error (or a stop request).
  bool load_block(uint64_t b, std::vector<float>& w, bool check = true);

  void affine_block(uint64_t b);
  void ggml_block(uint64_t b);
  void entropy_norms_block(uint64_t b);
  void entropy_histogram_block(uint64_t b);
  void entropy_code_block(uint64_t b);
  // Small tensors: the entropy scheme's tables (row steps, frequencies, chunk offsets) cost a
  // noticeable share of the budget, so the affine codes of the same width are tried too and
  // whichever has less error within the budget is kept.
  void entropy_compare_affine();
  void entropy_choose_step();
  double entropy_fixed_side_bits() const;
  void entropy_set_steps(float d);
  Status entropy_build_table();
  // Bits the tensor will take with the current table: codes at their rANS cost plus every side field.
  double entropy_predicted_bits() const;
  // The spilled chunks, written in the order blocks finished, copied in block order into a new
  // SpillFile (chunk offsets set).
  Status entropy_order_spill();

  RowSource src_;
  EncodedTensor out_;
  uint64_t code_bytes_ = 0;  // fixed-rate schemes: the size of the codes
  std::string spill_dir_;
  uint64_t spill_above_ = UINT64_MAX;
  std::shared_ptr<SpillFile> spill_;
  // entropy-coded, spilled: each block's chunk where it landed in the SpillFile (blocks are
  // written in the order they finish, then laid out in block order by finish_codes)
  std::atomic<uint64_t> spill_end_{0};
  std::vector<uint64_t> spill_offset_, spill_size_;
  std::vector<ErrorStats> block_stats_;
  std::vector<Status> block_status_;
  std::vector<float> scales_f_, zeros_f_;
  uint64_t block_rows_ = 0, blocks_ = 0;
  int rotation_ = 1;
  std::shared_ptr<const GptqFactor> gptq_;
  std::shared_ptr<const std::vector<float>> importance_;
  Status init_error_ = Status::OK();
  ThreadPool* pool_ = nullptr;
  std::function<void()> on_block_done_;
  std::atomic<int64_t> pass_remaining_{0};
  std::atomic<bool> finished_{false};
  std::atomic<uint64_t> work_done_{0};
  std::atomic<uint64_t> imprecise_{0};
  const std::atomic<bool>* stop_ = nullptr;

  // entropy-coded scheme
  std::vector<float> row_norm_, sample_;
  uint64_t sample_stride_ = 1;
  std::vector<float> row_absmax_;
  float step_ = 1.0f;
  float step_max_ = 1.0f;              // every code 0 beyond this step
  float step_over_ = 0.0f;             // largest step seen over budget (0: none)
  float step_under_ = INFINITY;        // smallest step seen within budget
  int step_retries_ = 0;
  std::mutex hist_mu_;
  std::vector<uint64_t> hist_;
  std::vector<std::array<double, kCentroids>> centroid_sum_;
  std::vector<std::array<uint64_t, kCentroids>> centroid_count_;
  std::vector<std::vector<uint8_t>> block_bytes_;
  FrequencyTable table_;
  std::vector<float> symbol_values_;  // reconstruction, in steps, per symbol
  bool replaced_ = false;             // out_ holds the affine alternative, statistics merged
};

// Tensors up to this many weights get the affine comparison.
inline constexpr uint64_t kEntropyCompareBelow = 1u << 20;

// Convenience for in-memory arrays and tests: quantizes a whole tensor, in parallel when a pool
// is given, retrying with float32 scales when float16 cannot hold them.
// `importance`: per-column error weights for ggml schemes (TensorJob::set_importance), or null.
Result<EncodedTensor> encode_tensor(const RowSource& source, QuantScheme scheme, ThreadPool* pool,
                                    std::shared_ptr<const std::vector<float>> importance = nullptr);

}  // namespace aq
