// The entropy-coded scheme: uniform scalar quantization at a per-row step, then rANS coding of
// the codes (quant/rans.h). Entropy-coded uniform quantization is within about 1.5 dB of the
// rate-distortion bound at every rate; fixed-rate codes (what llama.cpp's K-quants and our
// affine scheme store) pay for every level whether it is likely or not.
//
//   row step      step_r = d * rms_r^0.5   (d chosen per tensor to meet the bit budget; the
//                 square root sits between "same step everywhere" (least total squared error at
//                 high rate) and "same relative error per row"; it measured best at low rates)
//   code          q = round(y / step_r)    (y: the weight, rotated when the scheme says so)
//   symbols       codes in [-2047, 2047] are rANS symbols; a larger |q| (an outlier at a fine
//                 step) is coded as the escape symbol and stored whole, so nothing is clipped
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

// Bits per weight that round(sample / d) costs: rANS symbols at the frequencies the coder would
// use, plus 32 bits per escaped code.
double sample_code_cost(std::span<const float> sample, float d, int* max_abs_code);

// Picks the tensor step d so that sample_code_cost is `code_bits`. `sample` holds weights
// divided by their row norms.
float choose_entropy_step(std::span<const float> sample, double code_bits);

// Codes of `rows` rows at their steps.
void entropy_codes_rows(const float* y, size_t rows, size_t cols, const float* steps, int32_t* q);

// Adds codes to a histogram of kHistBins counts (index q + kMaxCode; escapes in the last bin)
// and to the centroid sums (kCentroids each: sum of |y|/step - |q|, and counts).
void entropy_statistics(const float* y, const int32_t* q, size_t rows, size_t cols, const float* steps,
                        uint64_t* hist, double* centroid_sum, uint64_t* centroid_count);

// Symbols of a histogram: fills symbol_min, frequencies and escape_symbol of `side`.
Result<FrequencyTable> entropy_table(std::span<const uint64_t> hist, EntropySide* side);

// Reconstruction value, in steps, of every symbol (the formula above, tabulated once per
// tensor; the escape symbol's entry is unused).
std::vector<float> entropy_symbol_values(const EntropySide& side);

// The values of codes (what entropy_decode_chunk gives for the chunk that codes them).
void entropy_reconstruct_rows(const int32_t* q, size_t rows, size_t cols, const float* steps, const EntropySide& side,
                              const float* symbol_values, float* out);

// One chunk: appends [uint32 escape count][int32 escaped codes][rANS stream] to out.
void entropy_encode_chunk(const FrequencyTable& table, const EntropySide& side, const int32_t* q, size_t n,
                          std::vector<uint8_t>* out);

// Decodes a chunk of `rows` rows into values (out = value * step of the row).
Status entropy_decode_chunk(const FrequencyTable& table, const EntropySide& side, const float* symbol_values,
                            std::span<const uint8_t> chunk, size_t rows, size_t cols, const float* steps,
                            float* out);

}  // namespace aq
