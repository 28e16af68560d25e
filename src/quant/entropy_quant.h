// The entropy-coded scheme: uniform scalar quantization at a per-row step, then rANS coding of
// the codes (quant/rans.h). Entropy-coded uniform quantization is within about 1.5 dB of the
// rate-distortion bound at every rate; fixed-rate codes (what llama.cpp's K-quants and our
// affine scheme store) pay for every level whether it is likely or not.
//
//   row step      step_r = d * rms_r^0.5   (d chosen per tensor to meet the bit budget; the
//                 square root sits between "same step everywhere" (least total squared error at
//                 high rate) and "same relative error per row"; it measured best at low rates)
//   code          q = round(y / step_r)    (y: the weight, rotated when the scheme says so)
//   symbols       codes in a dense range within [-2047, 2047] are rANS symbols; the rest (an
//                 outlier at a fine step, a sparse tail) are coded as the escape symbol and
//                 stored whole as float32, so nothing is clipped
//   value         sign(q) * (|q| + c[|q|]) * step_r, c[m] for m = 1..8 the mean offset of the
//                 weights coded m from m (centroid reconstruction; 0 beyond 8 and for q = 0)
//
// Codes are coded in chunks of whole rows, each independent (docs/format.md has the layout), so
// chunks encode and decode in parallel and a reader can start at any chunk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "quant/rans.h"

namespace aq {

inline constexpr int kMaxCode = 2047;                   // largest |code| coded as its own symbol
inline constexpr int kCodeRange = 2 * kMaxCode + 1;
inline constexpr int kHistBins = kCodeRange + 1;        // codes -2047..2047, then escapes
inline constexpr int32_t kMaxEscaped = 1 << 30;         // codes are clamped to +-2^30
inline constexpr int kCentroids = 8;

// Everything an entropy-coded tensor stores besides its codes and per-row steps.
struct EntropySide {
  int32_t symbol_min = 0;               // the code of symbol index 0
  std::vector<uint16_t> frequencies;    // rANS frequencies per symbol index (sum 2^15)
  int32_t escape_symbol = -1;           // index of the escape symbol, or -1 when none is used
  uint32_t chunk_rows = 0;              // rows per chunk (the last chunk may be shorter)
  std::vector<uint32_t> chunk_offsets;  // byte offset of each chunk in the codes, then the end
  std::vector<float> centroids;         // c[1..kCentroids], in steps
  uint64_t stored_bytes() const {
    return 4 + 2 * frequencies.size() + 4 + 4 + 4 * chunk_offsets.size() + 4 * centroids.size();
  }
};

// rms(row)^0.5, the row's share of its step; 0 for an all-zero row.
float entropy_row_norm(const float* row, size_t cols);

// Which codes get their own symbol: [lo, hi] (a sub-range of [-2047, 2047]); the rest are
// escaped. A symbol costs its table entry (16 bits) whether used or not, and an escape costs 32
// bits on top of its symbol, so a sparse tail is cheaper escaped. `bits` predicts the codes'
// stored size (ideal entropy; rANS adds a little) and `table_bits` the frequency table's.
struct SymbolPlan {
  int lo = 0, hi = 0;
  bool escape = false;
  double bits = 0;
  double table_bits = 0;
};
SymbolPlan plan_symbols(std::span<const uint64_t> hist);

// Picks the tensor step d for a tensor of `weights` weights whose side information (everything
// but the codes and the frequency table) is `side_bits`, so that its predicted stored size meets
// `budget` bits per weight, judging the codes on `sample` (weights divided by their row norms).
// When even all-zero codes exceed the budget, returns the step that makes every code zero.
float choose_entropy_step(std::span<const float> sample, uint64_t weights, double side_bits, double budget);

// Predicted bits per weight of the codes of `sample` at step d plus their table, amortized
// over `weights` weights.
double sample_code_cost(std::span<const float> sample, float d, uint64_t weights);

// Codes of `rows` rows at their steps.
void entropy_codes_rows(const float* y, size_t rows, size_t cols, const float* steps, int32_t* q);

// Adds n codes to a histogram of kHistBins counts (index q + kMaxCode; codes beyond +-2047 in
// the last bin).
void entropy_histogram(const int32_t* q, size_t n, uint64_t* hist);

// Adds to the centroid sums (kCentroids each: sum of |y|/step - |q| over weights coded +-m, and
// their counts) of `rows` rows.
void entropy_centroid_sums(const float* y, const int32_t* q, size_t rows, size_t cols, const float* steps,
                           double* centroid_sum, uint64_t* centroid_count);

// Symbols of a histogram (plan_symbols' range): fills symbol_min, frequencies and escape_symbol.
Result<FrequencyTable> entropy_table(std::span<const uint64_t> hist, EntropySide* side);

// Whether a code is coded as the escape symbol under `side`'s direct range.
inline bool entropy_escaped(const EntropySide& side, int32_t q) {
  const int64_t direct = static_cast<int64_t>(side.frequencies.size()) - (side.escape_symbol >= 0 ? 1 : 0);
  return q < side.symbol_min || static_cast<int64_t>(q) >= side.symbol_min + direct;
}

// Reconstruction value, in steps, of every symbol (the formula above, tabulated once per
// tensor; the escape symbol's entry is unused).
std::vector<float> entropy_symbol_values(const EntropySide& side);

// An escaped weight's stored code: round(y / step) in float32, unbounded (exact up to 2^24).
float entropy_escaped_value(float y, float step);

// The values of codes (what entropy_decode_chunk gives for the chunk that codes them); y are
// the weights the codes came from (escaped codes are taken from them).
void entropy_reconstruct_rows(const float* y, const int32_t* q, size_t rows, size_t cols, const float* steps,
                              const EntropySide& side, const float* symbol_values, float* out);

// One chunk of `rows` rows: appends [uint32 escape count][float32 escaped codes][rANS stream].
void entropy_encode_chunk(const FrequencyTable& table, const EntropySide& side, const float* y, const float* steps,
                          size_t rows, size_t cols, const int32_t* q, std::vector<uint8_t>* out);

// Decodes a chunk of `rows` rows into values (out = value * step of the row).
Status entropy_decode_chunk(const FrequencyTable& table, const EntropySide& side, const float* symbol_values,
                            std::span<const uint8_t> chunk, size_t rows, size_t cols, const float* steps,
                            float* out);

}  // namespace aq
