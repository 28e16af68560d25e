#include "quant/entropy_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace aq {

__attribute__((target_clones("avx512f", "avx2", "default")))
float entropy_row_norm(const float* row, size_t cols) {
  // four partial sums: vectorizable, and the order depends on cols alone
  double part[4] = {0, 0, 0, 0};
  size_t j = 0;
  for (; j + 4 <= cols; j += 4)
    for (int k = 0; k < 4; ++k) part[k] += static_cast<double>(row[j + k]) * row[j + k];
  double ss = (part[0] + part[1]) + (part[2] + part[3]);
  for (; j < cols; ++j) ss += static_cast<double>(row[j]) * row[j];
  if (ss == 0.0 || cols == 0) return 0.0f;
  return static_cast<float>(std::pow(ss / static_cast<double>(cols), 0.25));
}

namespace {

inline int32_t code_of(float v) {
  const float lim = static_cast<float>(kMaxEscaped);
  return static_cast<int32_t>(std::nearbyint(std::clamp(v, -lim, lim)));
}

inline int bin_of(int32_t c) { return (c < -kMaxCode || c > kMaxCode) ? kCodeRange : c + kMaxCode; }

// Codes of one row. nearbyint rounds half to even in the default rounding mode; the AVX2 and
// AVX-512 builds compile it to a vector round with the same rounding.
__attribute__((target_clones("avx512f", "avx2", "default")))
void codes_of_row(const float* y, size_t n, float inv, int32_t* q) {
  const float lim = static_cast<float>(kMaxEscaped);
  for (size_t j = 0; j < n; ++j) q[j] = static_cast<int32_t>(std::nearbyint(std::clamp(y[j] * inv, -lim, lim)));
}

}  // namespace

double sample_code_cost(std::span<const float> sample, float d, int* max_abs_code) {
  std::vector<uint64_t> hist(kHistBins, 0);
  const float inv = 1.0f / d;
  int32_t maxq = 0;
  for (float v : sample) {
    const int32_t c = code_of(v * inv);
    hist[static_cast<size_t>(bin_of(c))]++;
    maxq = std::max(maxq, c < 0 ? -c : c);
  }
  if (max_abs_code) *max_abs_code = std::min<int32_t>(maxq, kMaxCode);
  EntropySide side;
  auto table = entropy_table(hist, &side);
  if (!table.ok()) return 0.0;
  const int lo = side.symbol_min + kMaxCode;
  std::vector<uint64_t> counts(hist.begin() + lo, hist.begin() + lo + (side.escape_symbol >= 0 ? side.frequencies.size() - 1
                                                                                               : side.frequencies.size()));
  if (side.escape_symbol >= 0) counts.push_back(hist[kCodeRange]);
  // The cost with the frequencies the coder will really use (rounded to 2^-15), not the ideal
  // entropy: at high rates hundreds of rare symbols each hold at least one slot.
  const double bits = coded_bits(counts, *table) + 32.0 * static_cast<double>(hist[kCodeRange]);
  return bits / static_cast<double>(sample.size());
}

float choose_entropy_step(std::span<const float> sample, double code_bits) {
  if (sample.empty()) return 1.0f;
  double ss = 0;
  for (float v : sample) ss += static_cast<double>(v) * v;
  const double sigma = std::sqrt(ss / static_cast<double>(sample.size()));
  if (sigma == 0.0) return 1.0f;
  auto cost_at = [&](double log_d) { return sample_code_cost(sample, static_cast<float>(std::exp2(log_d)), nullptr); };
  // Cost falls as the step grows. Bracket the target between lo (cost above it) and hi (at or
  // below it), from the high-rate Gaussian estimate H = log2(sigma * sqrt(2 pi e)) - log2(d).
  const double guess = std::log2(sigma) + 2.0471 - code_bits;
  double lo = guess, hi = guess;
  double h_lo = cost_at(lo), h_hi = h_lo;
  for (int i = 0; h_lo <= code_bits && i < 64; ++i) lo -= 1.0, h_lo = cost_at(lo);
  for (int i = 0; h_hi > code_bits && i < 64; ++i) hi += 1.0, h_hi = cost_at(hi);
  // Secant steps kept inside the bracket (bisection when a step would leave it).
  for (int it = 0; it < 30 && hi - lo > 1e-5 && code_bits - h_hi > 5e-4; ++it) {
    double next = lo + (hi - lo) * (h_lo - code_bits) / (h_lo - h_hi);
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    const double h = cost_at(next);
    if (h > code_bits) lo = next, h_lo = h;
    else hi = next, h_hi = h;
  }
  return static_cast<float>(std::exp2(hi));  // the side that does not exceed the budget
}

void entropy_codes_rows(const float* y, size_t rows, size_t cols, const float* steps, int32_t* q) {
  for (size_t r = 0; r < rows; ++r) {
    const float step = steps[r];
    codes_of_row(y + r * cols, cols, step > 0.0f ? 1.0f / step : 0.0f, q + r * cols);
  }
}

void entropy_statistics(const float* y, const int32_t* q, size_t rows, size_t cols, const float* steps,
                        uint64_t* hist, double* centroid_sum, uint64_t* centroid_count) {
  // Centroid sums in float per call (the caller merges calls in a fixed order), one slot per
  // magnitude 0..kCentroids and one for everything beyond.
  float sums[kCentroids + 2] = {};
  uint32_t counts[kCentroids + 2] = {};
  for (size_t r = 0; r < rows; ++r) {
    const float step = steps[r];
    const float inv = step > 0.0f ? 1.0f / step : 0.0f;
    const float* yr = y + r * cols;
    const int32_t* qr = q + r * cols;
    for (size_t j = 0; j < cols; ++j) {
      const int32_t c = qr[j];
      hist[bin_of(c)]++;
      const int32_t m = c < 0 ? -c : c;
      const int slot = m <= kCentroids ? m : kCentroids + 1;
      sums[slot] += std::fabs(yr[j] * inv) - static_cast<float>(std::min<int32_t>(m, kCentroids + 1));
      counts[slot]++;
    }
  }
  for (int m = 1; m <= kCentroids; ++m) {
    centroid_sum[m - 1] += sums[m];
    centroid_count[m - 1] += counts[m];
  }
}

Result<FrequencyTable> entropy_table(std::span<const uint64_t> hist, EntropySide* side) {
  int lo = 0, hi = kCodeRange - 1;
  while (lo < hi && hist[lo] == 0) ++lo;
  while (hi > lo && hist[hi] == 0) --hi;
  std::vector<uint64_t> counts(hist.begin() + lo, hist.begin() + hi + 1);
  side->symbol_min = lo - kMaxCode;
  side->escape_symbol = -1;
  if (hist[kCodeRange] > 0) {
    side->escape_symbol = static_cast<int32_t>(counts.size());
    counts.push_back(hist[kCodeRange]);
  }
  AQ_ASSIGN_OR_RETURN(FrequencyTable t, normalize_frequencies(counts));
  side->frequencies = t.freq;
  return t;
}

std::vector<float> entropy_symbol_values(const EntropySide& side) {
  std::vector<float> v(side.frequencies.size(), 0.0f);
  for (size_t i = 0; i < v.size(); ++i) {
    if (static_cast<int32_t>(i) == side.escape_symbol) continue;
    const int c = side.symbol_min + static_cast<int>(i);
    const int m = c < 0 ? -c : c;
    const float mag = m == 0 ? 0.0f
                             : (m <= kCentroids ? static_cast<float>(m) + side.centroids[m - 1] : static_cast<float>(m));
    v[i] = c < 0 ? -mag : mag;
  }
  return v;
}

void entropy_reconstruct_rows(const int32_t* q, size_t rows, size_t cols, const float* steps, const EntropySide& side,
                              const float* symbol_values, float* out) {
  for (size_t r = 0; r < rows; ++r) {
    const float step = steps[r];
    for (size_t j = 0; j < cols; ++j) {
      const int32_t c = q[r * cols + j];
      // the same products the decoder forms: table value (or the escaped code) times the step
      const float v = (c < -kMaxCode || c > kMaxCode) ? static_cast<float>(c)
                                                      : symbol_values[c - side.symbol_min];
      out[r * cols + j] = v * step;
    }
  }
}

void entropy_encode_chunk(const FrequencyTable& table, const EntropySide& side, const int32_t* q, size_t n,
                          std::vector<uint8_t>* out) {
  thread_local std::vector<uint16_t> sym;
  thread_local std::vector<int32_t> escapes;
  sym.resize(n);
  escapes.clear();
  for (size_t i = 0; i < n; ++i) {
    const int32_t c = q[i];
    if (c < -kMaxCode || c > kMaxCode) {
      sym[i] = static_cast<uint16_t>(side.escape_symbol);
      escapes.push_back(c);
    } else {
      sym[i] = static_cast<uint16_t>(c - side.symbol_min);
    }
  }
  const uint32_t count = static_cast<uint32_t>(escapes.size());
  const size_t base = out->size();
  out->resize(base + 4 + 4 * escapes.size());
  std::memcpy(out->data() + base, &count, 4);
  if (count) std::memcpy(out->data() + base + 4, escapes.data(), 4 * escapes.size());
  rans_encode(table, sym, out);
}

namespace {

__attribute__((target_clones("avx512f", "avx2", "default")))
void values_of_row(const uint16_t* s, size_t n, const float* values, float step, float* o) {
  for (size_t j = 0; j < n; ++j) o[j] = values[s[j]] * step;
}

}  // namespace

Status entropy_decode_chunk(const FrequencyTable& table, const EntropySide& side, const float* symbol_values,
                            std::span<const uint8_t> chunk, size_t rows, size_t cols, const float* steps,
                            float* out) {
  if (chunk.size() < 4) return FormatError(StrCat("chunk of ", chunk.size(), " bytes"));
  uint32_t count;
  std::memcpy(&count, chunk.data(), 4);
  if (count > rows * cols || 4 + 4 * static_cast<uint64_t>(count) > chunk.size())
    return FormatError(StrCat("chunk claims ", count, " escaped codes"));
  const uint8_t* escapes = chunk.data() + 4;
  thread_local std::vector<uint16_t> sym;
  sym.resize(rows * cols);
  AQ_RETURN_IF_ERROR(rans_decode(table, chunk.subspan(4 + 4 * static_cast<size_t>(count)), sym));
  for (size_t r = 0; r < rows; ++r) values_of_row(sym.data() + r * cols, cols, symbol_values, steps[r], out + r * cols);
  if (side.escape_symbol >= 0) {
    const auto esc = static_cast<uint16_t>(side.escape_symbol);
    uint32_t k = 0;
    for (size_t i = 0; i < sym.size(); ++i) {
      if (sym[i] != esc) continue;
      if (k == count) return FormatError("more escape symbols than escaped codes");
      int32_t c;
      std::memcpy(&c, escapes + 4 * static_cast<size_t>(k++), 4);
      out[i] = static_cast<float>(c) * steps[i / cols];
    }
    if (k != count) return FormatError("fewer escape symbols than escaped codes");
  } else if (count) {
    return FormatError("escaped codes in a tensor without an escape symbol");
  }
  return Status::OK();
}

}  // namespace aq
