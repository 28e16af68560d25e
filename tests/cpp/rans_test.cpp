// rANS coding (quant/rans.h): round trips over many alphabets and lengths, the frequency
// normalization rule, the coded size against the Shannon bound, the stream layout of
// docs/format.md ("The rANS stream"), and damaged streams (FormatError, never a crash: the tests
// run under AddressSanitizer).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "quant/rans.h"
#include "test_util.h"

namespace aq {
namespace {

enum class Dist { kUniform, kSkewed };

// A random symbol stream over `alphabet` symbols: uniform, or geometric-like (symbol k with
// weight 0.7^k, so a large alphabet leaves most symbols absent).
std::vector<uint16_t> random_symbols(size_t n, size_t alphabet, Dist dist, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint16_t> s(n);
  if (dist == Dist::kUniform) {
    std::uniform_int_distribution<int> d(0, static_cast<int>(alphabet) - 1);
    for (auto& x : s) x = static_cast<uint16_t>(d(rng));
  } else {
    std::vector<double> w(alphabet);
    for (size_t k = 0; k < alphabet; ++k) w[k] = std::pow(0.7, static_cast<double>(k));
    std::discrete_distribution<int> d(w.begin(), w.end());
    for (auto& x : s) x = static_cast<uint16_t>(d(rng));
  }
  return s;
}

std::vector<uint64_t> histogram(const std::vector<uint16_t>& s, size_t alphabet) {
  std::vector<uint64_t> h(alphabet, 0);
  for (uint16_t x : s) h[x]++;
  return h;
}

// A table for the stream; streams of no symbols still need a model, so such a stream gets one
// from a single pseudo-count of symbol 0.
FrequencyTable table_for(const std::vector<uint16_t>& s, size_t alphabet) {
  std::vector<uint64_t> h = histogram(s, alphabet);
  if (s.empty()) h[0] = 1;
  auto t = normalize_frequencies(h);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : FrequencyTable{};
}

uint32_t le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}

// The decoder of docs/format.md, written from its text: four little-endian uint32 states, then
// little-endian uint16 words; symbol i uses state i mod 4; slot = x mod 2^15; k with
// c[k] <= slot < c[k] + f[k]; x = f[k] * (x >> 15) + slot - c[k]; if x < 2^16, x = x << 16 | word.
// Returns false when the words run out; *consumed is the number of bytes read.
bool doc_decode(const std::vector<uint16_t>& freq, const std::vector<uint8_t>& data, size_t n,
                std::vector<uint16_t>* out, size_t* consumed) {
  if (data.size() < 16) return false;
  std::vector<uint64_t> c(freq.size() + 1, 0);
  for (size_t k = 0; k < freq.size(); ++k) c[k + 1] = c[k] + freq[k];
  uint64_t x[4];
  for (int l = 0; l < 4; ++l) x[l] = le32(data.data() + 4 * l);
  size_t pos = 16;
  out->assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    uint64_t& st = x[i % 4];
    const uint64_t slot = st % 32768;
    size_t k = 0;
    while (!(c[k] <= slot && slot < c[k] + freq[k])) ++k;
    (*out)[i] = static_cast<uint16_t>(k);
    st = freq[k] * (st >> 15) + slot - c[k];
    if (st < 65536) {
      if (pos + 2 > data.size()) return false;
      st = (st << 16) | (static_cast<uint64_t>(data[pos]) | static_cast<uint64_t>(data[pos + 1]) << 8);
      pos += 2;
    }
  }
  *consumed = pos;
  return true;
}

struct Case {
  size_t alphabet;
  Dist dist;
};

TEST(Rans, round_trips_random_streams_over_many_alphabets_and_lengths) {
  const Case cases[] = {{1, Dist::kUniform}, {2, Dist::kUniform}, {2, Dist::kSkewed}, {17, Dist::kUniform},
                        {17, Dist::kSkewed}, {4096, Dist::kUniform}, {4096, Dist::kSkewed}};
  const size_t lengths[] = {0, 1, 2, 3, 4, 5, 6, 7, 9, 63, 1001, 4097, 100000};
  uint32_t seed = 1;
  for (const Case& c : cases) {
    for (size_t n : lengths) {
      SCOPED_TRACE(::testing::Message() << "alphabet " << c.alphabet << " skewed " << (c.dist == Dist::kSkewed)
                                        << " n " << n);
      const std::vector<uint16_t> s = random_symbols(n, c.alphabet, c.dist, seed++);
      const FrequencyTable t = table_for(s, c.alphabet);
      std::vector<uint8_t> bytes = {0xAB, 0xCD};  // rans_encode appends: what is there stays
      rans_encode(t, s, &bytes);
      ASSERT_GE(bytes.size(), 2u + 16u);
      EXPECT_EQ(bytes[0], 0xAB);
      EXPECT_EQ(bytes[1], 0xCD);
      EXPECT_EQ((bytes.size() - 2) % 2, 0u) << "16 bytes of states, then whole 16-bit words";
      const std::span<const uint8_t> stream(bytes.data() + 2, bytes.size() - 2);
      std::vector<uint16_t> back(n, 0xFFFF);
      ASSERT_OK(rans_decode(t, stream, back));
      ASSERT_EQ(back, s);
    }
  }
}

TEST(Rans, decoding_a_prefix_gives_the_first_symbols) {
  const std::vector<uint16_t> s = random_symbols(5000, 17, Dist::kSkewed, 77);
  const FrequencyTable t = table_for(s, 17);
  std::vector<uint8_t> bytes;
  rans_encode(t, s, &bytes);
  for (size_t k : {0, 1, 3, 4, 5, 100, 4999}) {
    std::vector<uint16_t> back(k);
    ASSERT_OK(rans_decode(t, bytes, back));
    EXPECT_TRUE(std::equal(back.begin(), back.end(), s.begin())) << k;
  }
}

TEST(Rans, stream_layout_follows_the_format_document) {
  // An independent decoder written from docs/format.md reads the encoder's streams, and reads
  // every byte of them (no word is written that a decoder never reads).
  const Case cases[] = {{1, Dist::kUniform}, {2, Dist::kSkewed}, {17, Dist::kUniform}, {300, Dist::kSkewed},
                        {4096, Dist::kUniform}};
  uint32_t seed = 1000;
  for (const Case& c : cases)
    for (size_t n : {0, 1, 4, 7, 333, 20001}) {
      SCOPED_TRACE(::testing::Message() << "alphabet " << c.alphabet << " n " << n);
      const std::vector<uint16_t> s = random_symbols(n, c.alphabet, c.dist, seed++);
      const FrequencyTable t = table_for(s, c.alphabet);
      std::vector<uint8_t> bytes;
      rans_encode(t, s, &bytes);
      ASSERT_GE(bytes.size(), 16u) << "four uint32 states come first";
      for (int l = 0; l < 4; ++l) {
        const uint32_t x = le32(bytes.data() + 4 * l);
        EXPECT_GE(x, 1u << 16) << "a decoder state lives in [2^16, 2^32)";
      }
      std::vector<uint16_t> back;
      size_t consumed = 0;
      ASSERT_TRUE(doc_decode(t.freq, bytes, n, &back, &consumed)) << "the words ran out";
      EXPECT_EQ(back, s);
      EXPECT_EQ(consumed, bytes.size()) << "bytes after the last word a decoder reads";
    }
}

TEST(Rans, a_single_symbol_alphabet_costs_only_the_states) {
  const std::vector<uint16_t> s(100000, 0);
  const FrequencyTable t = table_for(s, 1);
  ASSERT_EQ(t.freq, std::vector<uint16_t>{32768});
  std::vector<uint8_t> bytes;
  rans_encode(t, s, &bytes);
  EXPECT_EQ(bytes.size(), 16u) << "a certain symbol carries no information";
}

TEST(Rans, normalize_frequencies_sums_to_2_15_and_keeps_every_present_symbol) {
  std::mt19937_64 rng(5);
  for (size_t alphabet : {1, 2, 3, 17, 255, 1000, 4096}) {
    for (int trial = 0; trial < 6; ++trial) {
      SCOPED_TRACE(::testing::Message() << "alphabet " << alphabet << " trial " << trial);
      std::vector<uint64_t> counts(alphabet, 0);
      // trial 0: all ones; 1: sparse; 2: one dominant symbol; 3: random small; 4: huge counts; 5: powers
      for (size_t k = 0; k < alphabet; ++k) {
        switch (trial) {
          case 0: counts[k] = 1; break;
          case 1: counts[k] = (rng() % 5 == 0) ? 1 + rng() % 1000 : 0; break;
          case 2: counts[k] = k == alphabet / 2 ? 1'000'000'000ull : (rng() % 3 == 0 ? 1 : 0); break;
          case 3: counts[k] = rng() % 50; break;
          case 4: counts[k] = (rng() >> 24) + 1; break;  // up to 2^40
          default: counts[k] = 1ull << (k % 40); break;
        }
      }
      if (std::accumulate(counts.begin(), counts.end(), uint64_t{0}) == 0) counts[0] = 3;
      ASSERT_OK_AND_ASSIGN(FrequencyTable t, normalize_frequencies(counts));
      ASSERT_EQ(t.freq.size(), alphabet);
      uint64_t sum = 0;
      double total = 0;
      for (uint64_t c : counts) total += static_cast<double>(c);
      size_t present = 0;
      for (size_t k = 0; k < alphabet; ++k) {
        sum += t.freq[k];
        if (counts[k] == 0) {
          EXPECT_EQ(t.freq[k], 0) << "absent symbol " << k;
        } else {
          ++present;
          EXPECT_GE(t.freq[k], 1) << "present symbol " << k;
        }
      }
      EXPECT_EQ(sum, kProbScale);
      // The rule (rans.h): 1 for every present symbol plus its proportional share of the rest,
      // rounded down, plus at most one of the remainder slots.
      const double spare = static_cast<double>(kProbScale - present);
      for (size_t k = 0; k < alphabet; ++k) {
        if (!counts[k]) continue;
        const double share = spare * static_cast<double>(counts[k]) / total;
        EXPECT_GE(t.freq[k] + 1e-6, 1.0 + std::floor(share)) << k;
        EXPECT_LE(t.freq[k], 2.0 + std::floor(share) + 1e-6) << k;
      }
      ASSERT_EQ(t.cum.size(), alphabet + 1);
      EXPECT_EQ(t.cum.front(), 0u);
      EXPECT_EQ(t.cum.back(), kProbScale);
      // Deterministic: the same counts give the same table.
      ASSERT_OK_AND_ASSIGN(FrequencyTable again, normalize_frequencies(counts));
      EXPECT_EQ(again.freq, t.freq);
    }
  }
}

TEST(Rans, normalize_frequencies_breaks_remainder_ties_toward_the_lower_index) {
  // Three equal counts: 32765 spare slots split 10921 + 2/3 each; the two leftover slots go to
  // the two lowest indices.
  ASSERT_OK_AND_ASSIGN(FrequencyTable t, normalize_frequencies(std::vector<uint64_t>{5, 5, 5}));
  EXPECT_EQ(t.freq, (std::vector<uint16_t>{10923, 10923, 10922}));
}

TEST(Rans, normalize_frequencies_refuses_impossible_alphabets) {
  EXPECT_FALSE(normalize_frequencies(std::vector<uint64_t>{}).ok());
  EXPECT_FALSE(normalize_frequencies(std::vector<uint64_t>{0, 0, 0}).ok());
  EXPECT_FALSE(normalize_frequencies(std::vector<uint64_t>(kMaxAlphabet + 1, 1)).ok());
  EXPECT_TRUE(normalize_frequencies(std::vector<uint64_t>(kMaxAlphabet, 1)).ok());
}

TEST(Rans, finish_frequency_table_refuses_tables_that_do_not_sum_to_2_15) {
  FrequencyTable t;
  t.freq = {16384, 16383};
  EXPECT_EQ(finish_frequency_table(&t).code(), StatusCode::kFormatError);
  t.freq = {40000, 40000};
  EXPECT_EQ(finish_frequency_table(&t).code(), StatusCode::kFormatError) << "sums past 2^16 must not wrap";
  t.freq = {};
  EXPECT_EQ(finish_frequency_table(&t).code(), StatusCode::kFormatError);
  t.freq = {16384, 0, 16384};
  ASSERT_OK(finish_frequency_table(&t));
  EXPECT_EQ(t.cum, (std::vector<uint32_t>{0, 16384, 16384, 32768}));
}

// Empirical entropy of a stream, in bits.
double entropy_bits(const std::vector<uint64_t>& counts) {
  double n = 0, bits = 0;
  for (uint64_t c : counts) n += static_cast<double>(c);
  for (uint64_t c : counts)
    if (c) bits -= static_cast<double>(c) * std::log2(static_cast<double>(c) / n);
  return bits;
}

TEST(Rans, long_streams_code_within_a_small_margin_of_the_shannon_bound) {
  const Case cases[] = {{2, Dist::kSkewed}, {17, Dist::kSkewed}, {17, Dist::kUniform}, {256, Dist::kSkewed},
                        {256, Dist::kUniform}};
  uint32_t seed = 300;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "alphabet " << c.alphabet << " skewed " << (c.dist == Dist::kSkewed));
    const size_t n = 100000;
    const std::vector<uint16_t> s = random_symbols(n, c.alphabet, c.dist, seed++);
    const std::vector<uint64_t> h = histogram(s, c.alphabet);
    const FrequencyTable t = table_for(s, c.alphabet);
    // coded_bits is the cost at the table's own (quantized) probabilities
    double at_table = 0;
    for (size_t k = 0; k < h.size(); ++k)
      if (h[k]) at_table += static_cast<double>(h[k]) * (15.0 - std::log2(static_cast<double>(t.freq[k])));
    EXPECT_NEAR(coded_bits(h, t), at_table, 1e-6 * at_table + 1e-9);
    const double shannon = entropy_bits(h);
    EXPECT_GE(at_table + 1e-6, shannon) << "no table beats the empirical entropy";
    EXPECT_LE(at_table, shannon * 1.002 + 64) << "2^15 slots model these distributions closely";
    std::vector<uint8_t> bytes;
    rans_encode(t, s, &bytes);
    const double actual = 8.0 * static_cast<double>(bytes.size());
    EXPECT_GE(actual, shannon);
    // four 32-bit states and at most one partial word per lane on top of the ideal cost
    EXPECT_LE(actual, at_table * 1.001 + 4 * 32 + 4 * 16) << "coded " << actual << " bits, bound " << at_table;
  }
}

TEST(Rans, truncated_streams_are_format_errors) {
  for (size_t alphabet : {2, 17, 4096}) {
    const std::vector<uint16_t> s = random_symbols(600, alphabet, Dist::kSkewed, static_cast<uint32_t>(alphabet));
    const FrequencyTable t = table_for(s, alphabet);
    std::vector<uint8_t> bytes;
    rans_encode(t, s, &bytes);
    ASSERT_GT(bytes.size(), 16u);
    for (size_t len = 0; len < bytes.size(); ++len) {
      // a copy of exactly `len` bytes, so AddressSanitizer catches any read past the end
      std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<long>(len));
      std::vector<uint16_t> back(s.size());
      const Status st = rans_decode(t, cut, back);
      EXPECT_EQ(st.code(), StatusCode::kFormatError) << "alphabet " << alphabet << ", " << len << " of "
                                                     << bytes.size() << " bytes: " << st.ToString();
    }
  }
}

TEST(Rans, corrupted_or_random_streams_never_read_out_of_bounds) {
  std::mt19937 rng(11);
  for (size_t alphabet : {1, 2, 17, 4096}) {
    const std::vector<uint16_t> s = random_symbols(2000, alphabet, Dist::kSkewed, static_cast<uint32_t>(alphabet) + 9);
    const FrequencyTable t = table_for(s, alphabet);
    std::vector<uint8_t> bytes;
    rans_encode(t, s, &bytes);
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<uint8_t> bad = bytes;
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int f = 0; f < flips; ++f) bad[rng() % bad.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
      if (trial % 3 == 0) bad.resize(rng() % (bad.size() + 1));
      std::vector<uint16_t> back(s.size());
      const Status st = rans_decode(t, bad, back);
      EXPECT_TRUE(st.ok() || st.code() == StatusCode::kFormatError) << st.ToString();
      if (st.ok()) {
        for (uint16_t v : back) ASSERT_TRUE(v < alphabet && t.freq[v] > 0) << "decoded a symbol outside the table";
      }
    }
    for (int trial = 0; trial < 100; ++trial) {
      std::vector<uint8_t> junk(rng() % 64);
      for (auto& b : junk) b = static_cast<uint8_t>(rng());
      std::vector<uint16_t> back(1 + rng() % 50);
      const Status st = rans_decode(t, junk, back);
      EXPECT_TRUE(st.ok() || st.code() == StatusCode::kFormatError) << st.ToString();
      if (junk.size() < 16) {
        EXPECT_EQ(st.code(), StatusCode::kFormatError) << "shorter than the four states";
      }
    }
  }
}

}  // namespace
}  // namespace aq
