#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "quant/pack.h"
#include "quant/scheme.h"

namespace aq {
namespace {

TEST(Pack, packs_int3_across_byte_boundaries) {
  // Eight 3-bit codes fill exactly three bytes, LSB first.
  const std::vector<uint8_t> codes = {1, 2, 3, 4, 5, 6, 7, 0};
  std::vector<uint8_t> out(packed_code_bytes(3, codes.size()));
  pack_codes(codes.data(), codes.size(), 3, out.data());
  uint32_t word = out[0] | (out[1] << 8) | (out[2] << 16);
  for (size_t i = 0; i < codes.size(); ++i) EXPECT_EQ((word >> (3 * i)) & 7u, codes[i]) << i;
}

TEST(Pack, packs_int4_low_nibble_first_and_int2_from_the_low_bits) {
  const std::vector<uint8_t> four = {0x1, 0x2, 0xf, 0x0, 0x7};
  std::vector<uint8_t> out4(packed_code_bytes(4, four.size()));
  ASSERT_EQ(out4.size(), 3u);
  pack_codes(four.data(), four.size(), 4, out4.data());
  EXPECT_EQ(out4, (std::vector<uint8_t>{0x21, 0x0f, 0x07}));
  const std::vector<uint8_t> two = {3, 0, 1, 2, 1};
  std::vector<uint8_t> out2(packed_code_bytes(2, two.size()));
  ASSERT_EQ(out2.size(), 2u);
  pack_codes(two.data(), two.size(), 2, out2.data());
  EXPECT_EQ(out2, (std::vector<uint8_t>{0b10010011, 0b01}));
  std::vector<uint8_t> back(3);
  unpack_codes(out2.data(), 2, 3, 2, back.data());
  EXPECT_EQ(back, (std::vector<uint8_t>{1, 2, 1}));
}

TEST(Pack, unpacks_any_window_of_a_long_stream) {
  std::mt19937 rng(3);
  for (int bits : {2, 3, 4, 8}) {
    std::vector<uint8_t> codes(5000);
    for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
    std::vector<uint8_t> packed(packed_code_bytes(bits, codes.size()));
    pack_codes(codes.data(), codes.size(), bits, packed.data());
    for (uint64_t first : {0u, 7u, 8u, 13u, 1024u, 4093u}) {
      for (size_t n : {1u, 2u, 9u, 100u}) {
        if (first + n > codes.size()) continue;
        std::vector<uint8_t> got(n);
        unpack_codes(packed.data(), first, n, bits, got.data());
        ASSERT_TRUE(std::equal(got.begin(), got.end(), codes.begin() + static_cast<long>(first)))
            << bits << " bits, first=" << first << " n=" << n;
      }
    }
  }
}

TEST(Pack, fast_paths_equal_reference_for_every_width_and_length) {
  std::mt19937 rng(7);
  for (int bits : {2, 3, 4, 8}) {
    for (size_t n : {0u, 1u, 7u, 8u, 9u, 63u, 64u, 1000u, 1023u}) {
      std::vector<uint8_t> codes(n);
      for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
      std::vector<uint8_t> fast(packed_code_bytes(bits, n)), ref(packed_code_bytes(bits, n));
      pack_codes(codes.data(), n, bits, fast.data());
      pack_codes_reference(codes.data(), n, bits, ref.data());
      ASSERT_EQ(fast, ref) << bits << " bits, n=" << n;
      for (uint64_t first : {0u, 1u, 3u, 5u, 8u}) {
        if (first > n) continue;
        std::vector<uint8_t> back(n - first), back_ref(n - first);
        unpack_codes(fast.data(), first, n - first, bits, back.data());
        unpack_codes_reference(fast.data(), first, n - first, bits, back_ref.data());
        ASSERT_EQ(back, back_ref) << bits << " bits, n=" << n << " first=" << first;
        ASSERT_TRUE(std::equal(back.begin(), back.end(), codes.begin() + static_cast<long>(first)));
      }
    }
  }
}

}  // namespace
}  // namespace aq
