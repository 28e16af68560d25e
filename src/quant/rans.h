// rANS entropy coding of small-alphabet symbol streams (the codes of the entropy-coded scheme).
//
// Stream layout of one chunk (docs/format.md): four little-endian uint32 final encoder states,
// then little-endian uint16 renormalization words in the order the decoder reads them. Symbol i
// of the chunk is coded by state i mod 4 (four interleaved coders, so a decoder has four
// independent dependency chains). Probabilities are integers summing to 2^15; the state lives
// in [2^16, 2^32) and is renormalized 16 bits at a time:
//   decode: slot = x mod 2^15; s = symbol at slot; x = f[s] * (x >> 15) + slot - c[s];
//           if x < 2^16: x = (x << 16) | next word
// where c[s] is the sum of the frequencies of the symbols before s.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace aq {

inline constexpr int kProbBits = 15;
inline constexpr uint32_t kProbScale = 1u << kProbBits;
inline constexpr int kRansLanes = 4;
inline constexpr size_t kMaxAlphabet = 4096;

struct FrequencyTable {
  std::vector<uint16_t> freq;  // per symbol index; sum == kProbScale
  std::vector<uint32_t> cum;   // prefix sums (size freq.size() + 1)
  std::vector<uint16_t> slot_symbol;  // kProbScale entries: the symbol owning each slot
  // kProbScale entries: freq of the slot's symbol | (slot - cum) << 16, so a decode step needs
  // one table read instead of a chain of three
  std::vector<uint32_t> slot_entry;
  std::vector<double> inverse;  // 1 / freq, for the encoder's division
};

// Scales histogram counts to frequencies summing to 2^15 (every present symbol >= 1) by a fixed
// rule: proportional shares rounded down, the remainder handed out one by one to the symbols with
// the largest fractional parts (ties to the lower index). Deterministic.
Result<FrequencyTable> normalize_frequencies(std::span<const uint64_t> counts);

// Builds cum and slot_symbol from freq and checks that the frequencies sum to 2^15.
Status finish_frequency_table(FrequencyTable* t);

// Appends the encoding of `symbols` (indices into t.freq, each with a nonzero frequency).
void rans_encode(const FrequencyTable& t, std::span<const uint16_t> symbols, std::vector<uint8_t>* out);

// Decodes exactly symbols.size() symbols from `data`; FormatError when the data runs out.
Status rans_decode(const FrequencyTable& t, std::span<const uint8_t> data, std::span<uint16_t> symbols);

// Shannon bound for the counts with these frequencies, in bits (rate estimates and tests).
double coded_bits(std::span<const uint64_t> counts, const FrequencyTable& t);

}  // namespace aq
