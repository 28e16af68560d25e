#include "engine/tensor_job.h"

#include <algorithm>
#include <condition_variable>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "quant/ggml_codec.h"
#include "quant/group_quant.h"
#include "quant/hadamard.h"
#include "quant/pack.h"

namespace aq {

namespace {

// Rotated rows sampled to choose the entropy step: about this many weights per tensor.
constexpr uint64_t kEntropySample = 1u << 16;

}  // namespace

uint64_t rows_per_block(uint64_t cols) {
  const uint64_t target = 65536;
  uint64_t r = cols == 0 ? 8 : target / cols;
  r = std::max<uint64_t>(8, r / 8 * 8);
  return r;
}

TensorJob::TensorJob(RowSource source, QuantScheme scheme, std::shared_ptr<const GptqFactor> gptq)
    : TensorJob(std::move(source), scheme) {
  const bool ggml_ok = scheme.kind == SchemeKind::kGgml && gptq && !gptq->act_order;
  if (gptq && ((scheme.kind != SchemeKind::kAffine && !ggml_ok) || scheme.rotate || gptq->cols != src_.cols)) {
    init_error_ = QuantizationFailure(StrCat(src_.name, ": GPTQ needs an unrotated affine scheme (or a ggml type, "
                                         "without act-order) and a Hessian of ", src_.cols, " columns"));
    return;
  }
  gptq_ = std::move(gptq);
}

TensorJob::TensorJob(RowSource source, QuantScheme scheme) : src_(std::move(source)) {
  if (scheme.kind == SchemeKind::kEntropy) scheme.scale_type = ScaleType::kF32;  // row steps are float32
  out_.scheme = scheme;
  out_.rows = src_.rows;
  out_.cols = src_.cols;
  block_rows_ = rows_per_block(src_.cols);
  blocks_ = src_.rows == 0 ? 0 : (src_.rows + block_rows_ - 1) / block_rows_;
  block_stats_.resize(blocks_);
  block_status_.resize(blocks_);
  rotation_ = scheme.rotate ? rotation_block(src_.cols) : 1;
  if (scheme.kind == SchemeKind::kGgml) {
    const GgmlTraits& g = ggml_traits(scheme.ggml);
    if (src_.cols % static_cast<uint64_t>(g.block) != 0) {
      init_error_ = InvalidConfig(StrCat(src_.file.empty() ? "" : src_.file + ": ", "tensor '", src_.name, "': ",
                                         g.name, " needs rows of a multiple of ", g.block, " weights; its rows hold ",
                                         src_.cols));
      blocks_ = 0;
    } else {
      code_bytes_ = src_.rows * ggml_row_bytes(scheme.ggml, src_.cols);
    }
  } else if (scheme.kind == SchemeKind::kAffine) {
    const QuantizedSize size = quantized_size(scheme, src_.rows, src_.cols);
    code_bytes_ = size.code_bytes;
    out_.scales.assign(size.scale_bytes, 0);
    out_.zero_points.assign(size.zero_point_bytes, 0);
    const uint64_t groups = src_.rows * groups_per_row(scheme, src_.cols);
    scales_f_.assign(groups, 0.0f);
    if (!scheme.symmetric) zeros_f_.assign(groups, 0.0f);
  } else {
    out_.scales.assign(src_.rows * 4, 0);
    out_.entropy.emplace();
    out_.entropy->chunk_rows = static_cast<uint32_t>(block_rows_);
    row_norm_.assign(src_.rows, 0.0f);
    row_absmax_.assign(src_.rows, 0.0f);
    scales_f_.assign(src_.rows, 0.0f);
    const uint64_t n = src_.rows * src_.cols;
    sample_stride_ = std::max<uint64_t>(1, n / kEntropySample);
    sample_.assign(((src_.rows + sample_stride_ - 1) / sample_stride_) * src_.cols, 0.0f);
    hist_.assign(kHistBins, 0);
    centroid_sum_.assign(blocks_, {});
    centroid_count_.assign(blocks_, {});
    block_bytes_.resize(blocks_);
  }
  if (scheme.kind == SchemeKind::kEntropy && src_.rows * src_.cols == 0) {
    // Nothing to code: a one-symbol table, no chunks (or empty ones), zero centroids.
    auto& e = *out_.entropy;
    e.frequencies = {static_cast<uint16_t>(kProbScale)};
    e.centroids.assign(kCentroids, 0.0f);
    e.chunk_offsets.assign(blocks_ + 1, 0);
    for (uint64_t b = 0; b < blocks_; ++b) {
      // zero-column rows: each chunk codes no symbols, but is still a valid (empty) chunk
      std::vector<uint8_t> chunk;
      entropy_encode_chunk(normalize_frequencies(std::vector<uint64_t>{1}).value(), e, nullptr, nullptr, 0, 0, nullptr,
                           &chunk);
      out_.codes.insert(out_.codes.end(), chunk.begin(), chunk.end());
      e.chunk_offsets[b + 1] = static_cast<uint32_t>(out_.codes.size());
    }
    blocks_ = 0;
  }
  if (blocks_ == 0) finished_ = true;
}

void TensorJob::set_importance(std::shared_ptr<const std::vector<float>> importance) {
  if (importance && importance->size() != src_.cols) {
    init_error_ = Internal(StrCat(src_.name, ": importance of ", importance->size(), " columns for rows of ", src_.cols));
    return;
  }
  importance_ = std::move(importance);
}

void TensorJob::spill_codes(std::string dir, uint64_t above_bytes) {
  spill_dir_ = std::move(dir);
  spill_above_ = above_bytes;
}

bool TensorJob::allocate_codes() {
  const bool entropy = out_.scheme.kind == SchemeKind::kEntropy;
  const double expected = entropy ? out_.scheme.entropy_budget() * static_cast<double>(src_.rows * src_.cols) / 8
                                  : static_cast<double>(code_bytes_);
  if (!spill_dir_.empty() && expected > static_cast<double>(spill_above_)) {
    auto file = SpillFile::Create(spill_dir_, StrCat("tensor '", src_.name, "'"));
    if (!file.ok()) {
      init_error_ = file.status();
      return false;
    }
    spill_ = std::move(*file);
    if (entropy) {
      spill_offset_.assign(blocks_, 0);
      spill_size_.assign(blocks_, 0);
    }
  } else if (!entropy) {
    out_.codes.assign(code_bytes_, 0);
  }
  return true;
}

void TensorJob::spill_block(uint64_t b, uint64_t offset, const uint8_t* p, uint64_t n) {
  Status st = spill_->Write(offset, p, n);
  if (!st.ok()) block_status_[b] = std::move(st);
}

void TensorJob::finish_codes() {
  if (!spill_ || !status().ok()) return;
  Status st = spill_->Map(code_bytes_);
  if (!st.ok()) block_status_[0] = std::move(st);
}

uint64_t TensorJob::block_count_rows(uint64_t b) const {
  return std::min(block_rows_, src_.rows - block_begin(b));
}

void TensorJob::start(ThreadPool& pool, const std::atomic<bool>* stop, std::function<void()> on_block_done) {
  pool_ = &pool;
  stop_ = stop;
  on_block_done_ = std::move(on_block_done);
  if (!init_error_.ok() || blocks_ == 0 || !allocate_codes()) {
    finished_.store(true, std::memory_order_release);
    if (on_block_done_) on_block_done_();
    return;
  }
  submit_pass(0);
}

void TensorJob::submit_pass(int pass) {
  pass_remaining_.store(static_cast<int64_t>(blocks_));
  // Everything the loop needs is copied first: the tasks it submits may finish the whole job
  // before the loop ends, and the engine may then destroy the job. The callback is copied into
  // each task for the same reason (the last task runs it after the job may be gone).
  ThreadPool* pool = pool_;
  const uint64_t blocks = blocks_;
  const std::function<void()> notify = on_block_done_;
  for (uint64_t b = 0; b < blocks; ++b)
    pool->submit([this, pass, b, notify] {
      run_block(pass, b);
      block_done(pass);
      if (notify) notify();
    });
}

void TensorJob::block_done(int pass) {
  work_done_.fetch_add(1);
  if (pass_remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  const int next = after_pass(pass);
  if (next >= 0) submit_pass(next);
  else finished_.store(true, std::memory_order_release);
}

void TensorJob::run_inline() {
  if (blocks_ > 0 && init_error_.ok() && allocate_codes())
    for (int pass = 0; pass >= 0;) {
      for (uint64_t b = 0; b < blocks_; ++b) {
        run_block(pass, b);
        work_done_.fetch_add(1);
      }
      pass = after_pass(pass);
    }
  finished_ = true;
}

namespace {

// Whether every value is finite: one branch-free sweep (the position of the first offender is
// looked for only when there is one).
__attribute__((target_clones("avx512f", "avx2", "default")))
bool all_finite(const float* w, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &w[i], 4);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
float row_absmax(const float* x, size_t n) {
  float m = 0.0f;
  for (size_t j = 0; j < n; ++j) m = std::max(m, std::fabs(x[j]));
  return m;
}

}  // namespace

bool TensorJob::load_block(uint64_t b, std::vector<float>& w, bool check) {
  if (stop_ && stop_->load(std::memory_order_relaxed)) {
    block_status_[b] = Cancelled("stopped");
    return false;
  }
  const uint64_t r0 = block_begin(b), n = block_count_rows(b) * src_.cols;
  w.resize(n);
  convert_to_f32(src_.dtype, src_.data + r0 * src_.cols * dtype_size(src_.dtype), n, w.data());
  // The block's pages go back now (the entropy-coded scheme's later passes fault them in again
  // from the page cache): a tensor of any size holds only the blocks being read.
  if (src_.release) src_.release(r0 * src_.cols * dtype_size(src_.dtype), n * dtype_size(src_.dtype));
  if (src_.col_scale)
    for (uint64_t i = 0; i < n; i += src_.cols)
      for (uint64_t j = 0; j < src_.cols; ++j) w[i + j] *= (*src_.col_scale)[j];
  if (!check || all_finite(w.data(), n)) return true;
  for (uint64_t i = 0; i < n; ++i) {
    if (!std::isfinite(w[i])) {
      const uint64_t row = r0 + i / src_.cols, col = i % src_.cols;
      block_status_[b] = NonFinite(StrCat(src_.file.empty() ? "" : src_.file + ": ", "tensor '", src_.name,
                                          "': weight [", row, ", ", col, "] is ",
                                          std::isnan(w[i]) ? "NaN" : (w[i] > 0 ? "+Inf" : "-Inf")));
      return false;
    }
  }
  return true;
}

void TensorJob::run_block(int pass, uint64_t b) {
  if (out_.scheme.kind == SchemeKind::kAffine) return affine_block(b);
  if (out_.scheme.kind == SchemeKind::kGgml) return ggml_block(b);
  if (!block_status_[b].ok()) return;  // failed in an earlier pass
  switch (pass) {
    case 0: return entropy_norms_block(b);
    case 1: return entropy_histogram_block(b);
    default: return entropy_code_block(b);
  }
}

int TensorJob::after_pass(int pass) {
  const int next = next_pass(pass);
  if (next < 0) finish_codes();
  return next;
}

int TensorJob::next_pass(int pass) {
  if (!status().ok()) return -1;
  if (out_.scheme.kind != SchemeKind::kEntropy) return -1;
  if (pass == 0) {
    entropy_choose_step();
    return 1;
  }
  if (pass == 1) {
    Status st = entropy_build_table();
    if (!st.ok()) {
      block_status_[0] = st;
      return -1;
    }
    // The step came from a sample; the full histogram says what the tensor really costs. Over
    // budget (rare codes the sample missed), widen the step; well under it (a table the sample
    // overestimated), narrow it -- each time by the excess at the high-rate slope of one bit per
    // doubling, at most 4x, bisecting once the budget is bracketed -- and count again.
    const double n = static_cast<double>(src_.rows * src_.cols);
    // (a thousandth of a bit of margin for what rANS adds beyond the prediction)
    const double over = entropy_predicted_bits() / n - (out_.scheme.entropy_budget() - 0.001);
    if (over > 0) step_over_ = std::max(step_over_, step_);
    else step_under_ = std::min(step_under_, step_);
    const bool waste = over < -0.02 && step_ > step_over_;  // budget left on the table
    if ((over > 0 || waste) && step_retries_ < 4 && !(over > 0 && step_ >= step_max_)) {
      ++step_retries_;
      float next;
      if (step_over_ > 0.0f && step_under_ < INFINITY) next = std::sqrt(step_over_ * step_under_);
      else next = step_ * static_cast<float>(std::exp2(std::clamp(over + (over > 0 ? 0.002 : 0.0), -2.0, 2.0)));
      next = std::min(next, step_max_);
      if (next != step_) {
        entropy_set_steps(next);
        std::fill(hist_.begin(), hist_.end(), 0);
        for (auto& c : centroid_sum_) c.fill(0.0);
        for (auto& c : centroid_count_) c.fill(0);
        return 1;
      }
    }
    if (over > 0 && step_under_ < INFINITY && step_under_ != step_) {
      // out of retries on the wrong side: go back to the best step known to fit
      entropy_set_steps(step_under_);
      std::fill(hist_.begin(), hist_.end(), 0);
      for (auto& c : centroid_sum_) c.fill(0.0);
      for (auto& c : centroid_count_) c.fill(0);
      step_retries_ = 99;
      return 1;
    }
    return 2;
  }
  // pass 2: lay the chunks end to end
  auto& e = *out_.entropy;
  e.chunk_offsets.assign(1, 0);
  uint64_t total = 0;
  for (uint64_t b = 0; b < blocks_; ++b) total += spill_ ? spill_size_[b] : block_bytes_[b].size();
  if (total > UINT32_MAX) {  // chunk offsets are 32-bit (docs/format.md)
    block_status_[0] = QuantizationFailure(StrCat(src_.name, ": ", total, " bytes of entropy-coded codes; the "
                                                  "format's chunk offsets reach 4 GiB"));
    return -1;
  }
  if (spill_) {
    if (Status st = entropy_order_spill(); !st.ok()) {
      block_status_[0] = std::move(st);
      return -1;
    }
  } else {
    out_.codes.reserve(total);
    for (auto& bytes : block_bytes_) {
      out_.codes.insert(out_.codes.end(), bytes.begin(), bytes.end());
      e.chunk_offsets.push_back(static_cast<uint32_t>(out_.codes.size()));
      std::vector<uint8_t>().swap(bytes);
    }
  }
  // Spilled or not (piece_bytes decides only where the codes wait), a small tensor is stored
  // as the better of the two.
  if (src_.rows * src_.cols <= kEntropyCompareBelow) {
    entropy_compare_affine();
    if (replaced_) spill_.reset();  // the affine alternative's codes are in memory
  }
  return -1;
}

Status TensorJob::entropy_order_spill() {
  AQ_ASSIGN_OR_RETURN(auto ordered, SpillFile::Create(spill_dir_, StrCat("tensor '", src_.name, "'")));
  auto& e = *out_.entropy;
  std::vector<uint8_t> chunk;
  uint64_t at = 0;
  for (uint64_t b = 0; b < blocks_; ++b) {
    chunk.resize(spill_size_[b]);
    AQ_RETURN_IF_ERROR(spill_->Read(spill_offset_[b], chunk.data(), chunk.size()));
    AQ_RETURN_IF_ERROR(ordered->Write(at, chunk.data(), chunk.size()));
    at += chunk.size();
    e.chunk_offsets.push_back(static_cast<uint32_t>(at));
  }
  spill_ = std::move(ordered);
  code_bytes_ = at;
  return Status::OK();
}

void TensorJob::entropy_compare_affine() {
  QuantScheme affine = out_.scheme;
  affine.kind = SchemeKind::kAffine;
  affine.target_bpw = 0;
  affine.scale_type = ScaleType::kF16;
  if (!validate_scheme(affine).ok()) return;
  const double budget = out_.scheme.entropy_budget();
  for (int attempt = 0; attempt < 2; ++attempt) {
    TensorJob alt(src_, affine);
    alt.run_inline();  // a small tensor: on this worker, block after block
    if (!alt.status().ok()) return;
    if (alt.needs_f32_scales() && affine.scale_type == ScaleType::kF16) {
      affine.scale_type = ScaleType::kF32;
      continue;
    }
    EncodedTensor e = alt.take();
    ErrorStats mine;
    for (const auto& st : block_stats_) mine.merge(st);
    const double n = static_cast<double>(src_.rows * src_.cols);
    if (8.0 * static_cast<double>(e.stored_bytes()) / n <= budget && e.stats.sum_ee < mine.sum_ee) {
      out_ = std::move(e);
      replaced_ = true;
    }
    return;
  }
}

// ---- affine ---------------------------------------------------------------------------------

void TensorJob::affine_block(uint64_t b) {
  thread_local std::vector<float> w, rot, deq;
  thread_local std::vector<uint8_t> q, spilled;
  if (!load_block(b, w)) return;
  const QuantScheme& scheme = out_.scheme;
  const uint64_t cols = src_.cols, r0 = block_begin(b), nr = block_count_rows(b), n = nr * cols;
  const size_t gpr = groups_per_row(scheme, cols);
  const float* x = w.data();
  if (rotation_ > 1) {
    rot.assign(w.begin(), w.end());
    rotate_rows(rot.data(), nr, cols, rotation_);
    x = rot.data();
  }
  deq.resize(n);
  q.resize(n);
  float* s = scales_f_.data() + r0 * gpr;
  float* z = scheme.symmetric ? nullptr : zeros_f_.data() + r0 * gpr;
  const QuantizeRowsStats st = gptq_ ? gptq_quantize_rows(scheme, *gptq_, x, nr, cols, q.data(), s, z)
                                     : quantize_rows(scheme, x, nr, cols, q.data(), s, z);
  if (st.f16_imprecise_groups) imprecise_.fetch_add(st.f16_imprecise_groups);
  dequantize_rows(scheme, q.data(), s, z, nr, cols, deq.data());
  unrotate_rows(deq.data(), nr, cols, rotation_);
  block_stats_[b].add(w.data(), deq.data(), n);

  // r0 is a multiple of 8, so r0 * cols * bits is a whole number of bytes.
  const uint64_t at = r0 * cols * static_cast<uint64_t>(scheme.bits) / 8, packed = packed_code_bytes(scheme.bits, n);
  if (spill_) {
    spilled.resize(packed);
    pack_codes(q.data(), n, scheme.bits, spilled.data());
    spill_block(b, at, spilled.data(), packed);
  } else {
    pack_codes(q.data(), n, scheme.bits, out_.codes.data() + at);
  }
  const size_t ssize = scale_type_size(scheme.scale_type);
  store_scales(scheme.scale_type, s, nr * gpr, out_.scales.data() + r0 * gpr * ssize);
  if (z) store_scales(scheme.scale_type, z, nr * gpr, out_.zero_points.data() + r0 * gpr * ssize);
}

// ---- ggml block types -----------------------------------------------------------------------

void TensorJob::ggml_block(uint64_t b) {
  thread_local std::vector<float> w, deq;
  thread_local std::vector<uint8_t> spilled;
  if (!load_block(b, w)) return;
  const GgmlType t = out_.scheme.ggml;
  const uint64_t cols = src_.cols, r0 = block_begin(b), nr = block_count_rows(b), n = nr * cols;
  const uint64_t row_bytes = ggml_row_bytes(t, cols);
  GgmlEncodeOptions opt;
  opt.importance = importance_ ? importance_->data() : nullptr;
  opt.weighting = out_.scheme.ggml_weighting;
  if (spill_) spilled.resize(nr * row_bytes);
  uint8_t* out = spill_ ? spilled.data() : out_.codes.data() + r0 * row_bytes;
  if (gptq_) ggml_gptq_rows(t, *gptq_, w.data(), nr, cols, opt, out);
  else
    for (uint64_t r = 0; r < nr; ++r) ggml_encode_row(t, w.data() + r * cols, cols, out + r * row_bytes, opt);
  deq.resize(n);
  ggml_decode(t, out, n / static_cast<uint64_t>(ggml_traits(t).block), deq.data());
  block_stats_[b].add(w.data(), deq.data(), n);
  if (spill_) spill_block(b, r0 * row_bytes, out, nr * row_bytes);
}

// ---- entropy-coded --------------------------------------------------------------------------

void TensorJob::entropy_norms_block(uint64_t b) {
  thread_local std::vector<float> w;
  if (!load_block(b, w)) return;
  const uint64_t cols = src_.cols, r0 = block_begin(b), nr = block_count_rows(b);
  for (uint64_t i = 0; i < nr; ++i) {
    const uint64_t r = r0 + i;
    row_norm_[r] = entropy_row_norm(w.data() + i * cols, cols);
    row_absmax_[r] = row_absmax(w.data() + i * cols, cols);
    if (r % sample_stride_ != 0) continue;
    if (cols == 0) continue;
    float* dst = sample_.data() + (r / sample_stride_) * cols;
    std::memcpy(dst, w.data() + i * cols, cols * sizeof(float));
    rotate_rows(dst, 1, cols, rotation_);
    const float inv = row_norm_[r] > 0.0f ? 1.0f / row_norm_[r] : 0.0f;
    for (uint64_t j = 0; j < cols; ++j) dst[j] *= inv;
  }
}

double TensorJob::entropy_fixed_side_bits() const {
  // Side information besides the frequency table, in bits: per-row steps; per chunk the offset,
  // the escape count, the four rANS final states and about half a word per lane; the fixed fields.
  return 32.0 * static_cast<double>(src_.rows) + (32.0 + 32.0 + 128.0 + 32.0) * static_cast<double>(blocks_) +
         32.0 * (kCentroids + 5);
}

void TensorJob::entropy_choose_step() {
  // 0.003 bits of margin: the sample is not the tensor, and rANS adds a little to the ideal
  // entropy the search predicts. The full histogram corrects what remains (after_pass).
  // The coarsest step worth trying: every code 0 (max |w| / norm over the tensor, twice over).
  step_max_ = 1.0f;
  for (uint64_t r = 0; r < src_.rows; ++r)
    if (row_norm_[r] > 0.0f) step_max_ = std::max(step_max_, 4.0f * row_absmax_[r] / row_norm_[r]);
  const float d = choose_entropy_step(sample_, src_.rows * src_.cols, entropy_fixed_side_bits(),
                                      out_.scheme.entropy_budget() - 0.003);
  entropy_set_steps(d);
  std::vector<float>().swap(sample_);
}

void TensorJob::entropy_set_steps(float d) {
  if (!std::isfinite(d) || d <= 0.0f) d = step_max_;
  step_ = d;
  // An all-zero row gets step d: every code is 0 and the step is never used.
  for (uint64_t r = 0; r < src_.rows; ++r) scales_f_[r] = row_norm_[r] > 0.0f ? d * row_norm_[r] : d;
  store_scales(ScaleType::kF32, scales_f_.data(), src_.rows, out_.scales.data());
}

double TensorJob::entropy_predicted_bits() const {
  const auto& e = *out_.entropy;
  std::vector<uint64_t> counts(e.frequencies.size(), 0);
  uint64_t escaped = 0;
  for (int i = 0; i < kHistBins; ++i) {
    const int32_t c = i - kMaxCode;
    if (i == kCodeRange || entropy_escaped(e, c)) escaped += hist_[i];
    else counts[static_cast<size_t>(c - e.symbol_min)] += hist_[i];
  }
  if (e.escape_symbol >= 0) counts[static_cast<size_t>(e.escape_symbol)] = escaped;
  const double codes = coded_bits(counts, table_) + 32.0 * static_cast<double>(escaped);
  // per chunk: the escape count, four 32-bit final states and up to a 16-bit word per lane
  const double flush = static_cast<double>(blocks_) * (32 + 4 * 32 + 4 * 16);
  EntropySide side = e;
  side.chunk_offsets.assign(blocks_ + 1, 0);
  side.centroids.assign(kCentroids, 0.0f);
  return codes + flush + 8.0 * static_cast<double>(side.stored_bytes() + out_.scales.size());
}

void TensorJob::entropy_histogram_block(uint64_t b) {
  thread_local std::vector<float> w;
  thread_local std::vector<int32_t> q;
  thread_local std::vector<uint64_t> hist;
  if (!load_block(b, w, /*check=*/false)) return;  // the first pass checked these values
  const uint64_t cols = src_.cols, r0 = block_begin(b), nr = block_count_rows(b);
  rotate_rows(w.data(), nr, cols, rotation_);
  q.resize(nr * cols);
  hist.assign(kHistBins, 0);
  entropy_codes_rows(w.data(), nr, cols, scales_f_.data() + r0, q.data());
  entropy_histogram(q.data(), nr * cols, hist.data());
  // Centroids are means: the sampled rows (every sample_stride_-th) estimate them well enough.
  for (uint64_t i = 0; i < nr; ++i)
    if ((r0 + i) % sample_stride_ == 0)
      entropy_centroid_sums(w.data() + i * cols, q.data() + i * cols, 1, cols, scales_f_.data() + r0 + i,
                            centroid_sum_[b].data(), centroid_count_[b].data());
  std::lock_guard<std::mutex> lock(hist_mu_);  // integer counts: the order of adding does not matter
  for (int i = 0; i < kHistBins; ++i) hist_[i] += hist[i];
}

Status TensorJob::entropy_build_table() {
  auto& e = *out_.entropy;
  AQ_ASSIGN_OR_RETURN(table_, entropy_table(hist_, &e));
  std::array<double, kCentroids> sum{};
  std::array<uint64_t, kCentroids> count{};
  for (uint64_t b = 0; b < blocks_; ++b)
    for (int m = 0; m < kCentroids; ++m) sum[m] += centroid_sum_[b][m], count[m] += centroid_count_[b][m];
  e.centroids.assign(kCentroids, 0.0f);
  for (int m = 0; m < kCentroids; ++m)
    if (count[m]) e.centroids[m] = static_cast<float>(sum[m] / static_cast<double>(count[m]));
  symbol_values_ = entropy_symbol_values(e);
  return Status::OK();
}

void TensorJob::entropy_code_block(uint64_t b) {
  thread_local std::vector<float> w, y, deq;
  thread_local std::vector<int32_t> q;
  if (!load_block(b, w, /*check=*/false)) return;  // the first pass checked these values
  const auto& e = *out_.entropy;
  const uint64_t cols = src_.cols, r0 = block_begin(b), nr = block_count_rows(b), n = nr * cols;
  const float* x = w.data();
  if (rotation_ > 1) {
    y.assign(w.begin(), w.end());
    rotate_rows(y.data(), nr, cols, rotation_);
    x = y.data();
  }
  q.resize(n);
  entropy_codes_rows(x, nr, cols, scales_f_.data() + r0, q.data());
  block_bytes_[b].reserve(static_cast<size_t>(out_.scheme.entropy_budget() * static_cast<double>(n) / 8) + 1024);
  entropy_encode_chunk(table_, e, x, scales_f_.data() + r0, nr, cols, q.data(), &block_bytes_[b]);
  if (spill_) {  // into the SpillFile where it fits now; finish_codes lays the chunks in order
    std::vector<uint8_t>& bytes = block_bytes_[b];
    spill_size_[b] = bytes.size();
    spill_offset_[b] = spill_end_.fetch_add(bytes.size());
    spill_block(b, spill_offset_[b], bytes.data(), bytes.size());
    std::vector<uint8_t>().swap(bytes);
  }
  // The reconstruction a reader will get, from the codes (rANS is lossless; validate_quality
  // decodes the files and checks these statistics bit for bit).
  deq.resize(n);
  entropy_reconstruct_rows(x, q.data(), nr, cols, scales_f_.data() + r0, e, symbol_values_.data(), deq.data());
  unrotate_rows(deq.data(), nr, cols, rotation_);
  block_stats_[b].add(w.data(), deq.data(), n);
}

Status TensorJob::status() const {
  if (!init_error_.ok()) return init_error_;
  for (const auto& s : block_status_)
    if (!s.ok() && s.code() != StatusCode::kCancelled) return s;
  for (const auto& s : block_status_)
    if (!s.ok()) return s;
  return Status::OK();
}

EncodedTensor TensorJob::take() {
  if (!replaced_)
    for (const auto& s : block_stats_) out_.stats.merge(s);
  if (spill_) out_.spill = std::move(spill_);
  return std::move(out_);
}

void TensorJob::run(ThreadPool* pool) {
  if (pool == nullptr) return run_inline();
  // Shared so that a worker still signalling after the job finished finds it alive.
  struct Signal {
    std::mutex mu;
    std::condition_variable cv;
  };
  auto sig = std::make_shared<Signal>();
  start(*pool, nullptr, [sig] {
    std::lock_guard<std::mutex> lock(sig->mu);
    sig->cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(sig->mu);
  sig->cv.wait(lock, [&] { return finished(); });
}

Result<EncodedTensor> encode_tensor(const RowSource& source, QuantScheme scheme, ThreadPool* pool,
                                    std::shared_ptr<const std::vector<float>> importance) {
  AQ_RETURN_IF_ERROR(validate_scheme(scheme));
  for (int attempt = 0; attempt < 2; ++attempt) {
    TensorJob job(source, scheme);
    if (importance) job.set_importance(importance);
    job.run(pool);
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
