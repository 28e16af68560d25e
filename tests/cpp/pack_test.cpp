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
