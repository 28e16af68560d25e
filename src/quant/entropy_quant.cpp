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

SymbolPlan plan_symbols(std::span<const uint64_t> hist) {
  // Histogram by magnitude; codes beyond 2047 (the last bin) are always escaped.
  const uint64_t overflow = hist[kCodeRange];
  uint64_t total = overflow;
  int lo_code = kCodeRange, hi_code = -1;
  for (int i = 0; i < kCodeRange; ++i)
    if (hist[i]) total += hist[i], lo_code = std::min(lo_code, i), hi_code = std::max(hi_code, i);
  SymbolPlan best;
  if (total == 0) return best;
  const double N = static_cast<double>(total);
  auto nlog = [&](uint64_t n) { return n ? static_cast<double>(n) * std::log2(N / static_cast<double>(n)) : 0.0; };
  if (hi_code < 0) {  // everything escaped
    best.escape = true;
    best.bits = 32.0 * N;
    best.table_bits = 16.0;
    return best;
  }
  const int max_mag = std::max(std::abs(lo_code - kMaxCode), std::abs(hi_code - kMaxCode));
  // Grow the direct range one magnitude at a time: +-K symbols, the rest escaped.
  double direct_bits = 0;
  uint64_t escaped = total;
  double best_cost = INFINITY;
  for (int k = 0; k <= max_mag; ++k) {
    for (int sgn : {1, -1}) {
      if (k == 0 && sgn < 0) continue;
      const uint64_t n = hist[kMaxCode + sgn * k];
      direct_bits += nlog(n);
      escaped -= n;
    }
    const int lo = std::max(lo_code, kMaxCode - k) - kMaxCode;
    const int hi = std::min(hi_code, kMaxCode + k) - kMaxCode;
    const bool esc = escaped > 0;
    const double code = direct_bits + (esc ? nlog(escaped) + 32.0 * static_cast<double>(escaped) : 0.0);
    const double table = 16.0 * ((hi - lo + 1) + (esc ? 1 : 0));
    if (code + table < best_cost) {
      best_cost = code + table;
      best = SymbolPlan{lo, hi, esc, code, table};
    }
  }
  return best;
}

namespace {

std::vector<uint64_t> sample_histogram(std::span<const float> sample, float d) {
  std::vector<uint64_t> hist(kHistBins, 0);
  const float inv = 1.0f / d;
  for (float v : sample) hist[static_cast<size_t>(bin_of(code_of(v * inv)))]++;
  return hist;
}

}  // namespace

double sample_code_cost(std::span<const float> sample, float d, uint64_t weights) {
  if (sample.empty() || weights == 0) return 0.0;
  const SymbolPlan p = plan_symbols(sample_histogram(sample, d));
  return p.bits / static_cast<double>(sample.size()) + p.table_bits / static_cast<double>(weights);
}

float choose_entropy_step(std::span<const float> sample, uint64_t weights, double side_bits, double budget) {
  if (sample.empty() || weights == 0) return 1.0f;
  float amax = 0.0f;
  double ss = 0;
  for (float v : sample) amax = std::max(amax, std::fabs(v)), ss += static_cast<double>(v) * v;
  if (amax == 0.0f) return 1.0f;
  const double target = budget - side_bits / static_cast<double>(weights);
  // The step at which every code of the sample is 0: nothing coarser helps.
  const double log_max = std::log2(static_cast<double>(amax)) + 2.0;
  auto cost_at = [&](double log_d) { return sample_code_cost(sample, static_cast<float>(std::exp2(log_d)), weights); };
  if (cost_at(log_max) > target) return static_cast<float>(std::exp2(log_max));
  // Cost falls as the step grows. Bracket the target between lo (cost above it) and hi (at or
  // below it), from the high-rate Gaussian estimate H = log2(sigma * sqrt(2 pi e)) - log2(d).
  const double sigma = std::sqrt(ss / static_cast<double>(sample.size()));
  double guess = std::min(log_max, std::log2(sigma) + 2.0471 - std::max(target, 0.1));
  double lo = guess, hi = guess;
  double h_lo = cost_at(lo), h_hi = h_lo;
  for (int i = 0; h_lo <= target && i < 64; ++i) lo -= 1.0, h_lo = cost_at(lo);
  for (int i = 0; h_hi > target && i < 64 && hi < log_max; ++i) hi = std::min(log_max, hi + 1.0), h_hi = cost_at(hi);
  // Secant steps kept inside the bracket (bisection when a step would leave it).
  for (int it = 0; it < 30 && hi - lo > 1e-5 && target - h_hi > 5e-4; ++it) {
    double next = lo + (hi - lo) * (h_lo - target) / (h_lo - h_hi);
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    const double h = cost_at(next);
    if (h > target) lo = next, h_lo = h;
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

void entropy_histogram(const int32_t* q, size_t n, uint64_t* hist) {
  // Two interleaved sub-histograms: neighbouring weights often share a code, and a single table
  // would make each increment wait for the previous one to the same bin.
  thread_local std::vector<uint32_t> tls_a, tls_b;
  std::vector<uint32_t>& a = tls_a;
  std::vector<uint32_t>& b = tls_b;
  a.assign(kHistBins, 0);
  b.assign(kHistBins, 0);
  size_t i = 0;
  for (; i + 2 <= n; i += 2) {
    a[static_cast<size_t>(bin_of(q[i]))]++;
    b[static_cast<size_t>(bin_of(q[i + 1]))]++;
  }
  if (i < n) a[static_cast<size_t>(bin_of(q[i]))]++;
  for (int k = 0; k < kHistBins; ++k) hist[k] += static_cast<uint64_t>(a[k]) + b[k];
}

void entropy_centroid_sums(const float* y, const int32_t* q, size_t rows, size_t cols, const float* steps,
                           double* centroid_sum, uint64_t* centroid_count) {
  // In float per call (the caller merges calls in a fixed order), one slot per magnitude
  // 0..kCentroids and one for everything beyond.
  float sums[kCentroids + 2] = {};
  uint32_t counts[kCentroids + 2] = {};
  for (size_t r = 0; r < rows; ++r) {
    const float step = steps[r];
    const float inv = step > 0.0f ? 1.0f / step : 0.0f;
    const float* yr = y + r * cols;
    const int32_t* qr = q + r * cols;
    for (size_t j = 0; j < cols; ++j) {
      const int32_t c = qr[j];
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
  const SymbolPlan p = plan_symbols(hist);
  std::vector<uint64_t> counts;
  uint64_t escaped = hist[kCodeRange];
  for (int i = 0; i < kCodeRange; ++i) {
    const int c = i - kMaxCode;
    if (c >= p.lo && c <= p.hi) counts.push_back(hist[i]);
    else escaped += hist[i];
  }
  side->symbol_min = p.lo;
  side->escape_symbol = -1;
  if (escaped > 0) {
    side->escape_symbol = static_cast<int32_t>(counts.size());
    counts.push_back(escaped);
  }
  if (std::all_of(counts.begin(), counts.end(), [](uint64_t c) { return c == 0; })) counts.assign(1, 1);  // no codes
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

float entropy_escaped_value(float y, float step) {
  const float inv = step > 0.0f ? 1.0f / step : 0.0f;
  const float lim = 3.0e38f;
  return std::nearbyint(std::clamp(y * inv, -lim, lim));
}

void entropy_reconstruct_rows(const float* y, const int32_t* q, size_t rows, size_t cols, const float* steps,
                              const EntropySide& side, const float* symbol_values, float* out) {
  const int64_t direct = static_cast<int64_t>(side.frequencies.size()) - (side.escape_symbol >= 0 ? 1 : 0);
  const int32_t last = static_cast<int32_t>(std::max<int64_t>(direct - 1, 0));
  for (size_t r = 0; r < rows; ++r) {
    const float step = steps[r];
    const int32_t* qr = q + r * cols;
    float* o = out + r * cols;
    // the same products the decoder forms: table value times the step ...
    bool any_escaped = false;
    for (size_t j = 0; j < cols; ++j) {
      const int32_t k = qr[j] - side.symbol_min;
      any_escaped |= k < 0 || k > last;
      o[j] = symbol_values[std::clamp(k, 0, last)] * step;
    }
    // ... and for the rare escaped code, the code itself
    if (any_escaped)
      for (size_t j = 0; j < cols; ++j)
        if (entropy_escaped(side, qr[j])) o[j] = entropy_escaped_value(y[r * cols + j], step) * step;
  }
}

namespace {

// Symbol indices of codes, clamped into the direct range (escapes are fixed up afterwards);
// returns whether any code lies outside it.
__attribute__((target_clones("avx512f", "avx2", "default")))
bool symbols_of(const int32_t* q, size_t n, int32_t symbol_min, int32_t last, uint16_t* sym) {
  int32_t outside = 0;
  for (size_t i = 0; i < n; ++i) {
    const int32_t k = q[i] - symbol_min;
    outside |= static_cast<int32_t>(k < 0) | static_cast<int32_t>(k > last);
    sym[i] = static_cast<uint16_t>(std::clamp(k, 0, last));
  }
  return outside != 0;
}

}  // namespace

void entropy_encode_chunk(const FrequencyTable& table, const EntropySide& side, const float* y, const float* steps,
                          size_t rows, size_t cols, const int32_t* q, std::vector<uint8_t>* out) {
  thread_local std::vector<uint16_t> tls_sym;
  thread_local std::vector<float> tls_escapes;
  std::vector<uint16_t>& sym = tls_sym;
  std::vector<float>& escapes = tls_escapes;
  const size_t n = rows * cols;
  sym.resize(n);
  escapes.clear();
  const int64_t direct = static_cast<int64_t>(side.frequencies.size()) - (side.escape_symbol >= 0 ? 1 : 0);
  const int32_t last = static_cast<int32_t>(std::max<int64_t>(direct - 1, 0));
  if (n > 0 && symbols_of(q, n, side.symbol_min, last, sym.data())) {
    for (size_t i = 0; i < n; ++i)
      if (entropy_escaped(side, q[i])) {
        sym[i] = static_cast<uint16_t>(side.escape_symbol);
        escapes.push_back(entropy_escaped_value(y[i], steps[i / cols]));
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
  thread_local std::vector<uint16_t> tls_sym;
  std::vector<uint16_t>& sym = tls_sym;
  sym.resize(rows * cols);
  AQ_RETURN_IF_ERROR(rans_decode(table, chunk.subspan(4 + 4 * static_cast<size_t>(count)), sym));
  for (size_t r = 0; r < rows; ++r) values_of_row(sym.data() + r * cols, cols, symbol_values, steps[r], out + r * cols);
  if (side.escape_symbol >= 0) {
    const auto esc = static_cast<uint16_t>(side.escape_symbol);
    uint32_t k = 0;
    for (size_t i = 0; i < sym.size(); ++i) {
      if (sym[i] != esc) continue;
      if (k == count) return FormatError("more escape symbols than escaped codes");
      float c;
      std::memcpy(&c, escapes + 4 * static_cast<size_t>(k++), 4);
      out[i] = c * steps[i / cols];
    }
    if (k != count) return FormatError("fewer escape symbols than escaped codes");
  } else if (count) {
    return FormatError("escaped codes in a tensor without an escape symbol");
  }
  return Status::OK();
}

}  // namespace aq
