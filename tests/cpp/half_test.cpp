// Scalar float conversions (common/half.h) and safetensors element types (io/dtype.h).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/half.h"
#include "io/dtype.h"
#include "test_util.h"

namespace aq {
namespace {

bool is_f16_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// float with the next representable value towards +inf / -inf.
float up(float f) { return std::nextafter(f, std::numeric_limits<float>::infinity()); }
float down(float f) { return std::nextafter(f, -std::numeric_limits<float>::infinity()); }

TEST(Half, decodes_known_f16_bit_patterns) {
  EXPECT_EQ(f16_to_f32(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));       // smallest normal
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));       // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));    // largest subnormal
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7c01)));
}

TEST(Half, every_finite_f16_round_trips_through_f32) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    if ((bits & 0x7c00u) == 0x7c00u) continue;  // inf / NaN checked separately
    ASSERT_EQ(f32_to_f16(f16_to_f32(bits)), bits) << std::hex << h;
  }
}

TEST(Half, f32_to_f16_rounds_to_nearest_even_between_every_pair_of_halves) {
  // Covers subnormals (0x0000..0x03ff), the subnormal/normal boundary and every binade.
  for (uint16_t lo = 0; lo < 0x7bff; ++lo) {
    const auto hi = static_cast<uint16_t>(lo + 1);
    const float a = f16_to_f32(lo), b = f16_to_f32(hi);
    const float mid = a + (b - a) / 2;  // exact: halves have 11 significant bits
    ASSERT_GT(mid, a);
    ASSERT_LT(mid, b);
    const uint16_t even = (lo & 1u) ? hi : lo;
    ASSERT_EQ(f32_to_f16(mid), even) << "tie between 0x" << std::hex << lo << " and 0x" << hi;
    ASSERT_EQ(f32_to_f16(down(mid)), lo) << std::hex << lo;
    ASSERT_EQ(f32_to_f16(up(mid)), hi) << std::hex << lo;
    ASSERT_EQ(f32_to_f16(-mid), static_cast<uint16_t>(0x8000u | even)) << std::hex << lo;
  }
}

TEST(Half, f32_to_f16_rounds_below_half_the_smallest_subnormal_to_zero) {
  const float tiny = std::ldexp(1.0f, -24);  // smallest subnormal half
  EXPECT_EQ(f32_to_f16(tiny / 2), 0x0000);   // tie with zero: even is zero
  EXPECT_EQ(f32_to_f16(up(tiny / 2)), 0x0001);
  EXPECT_EQ(f32_to_f16(tiny / 4), 0x0000);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(f32_to_f16(-tiny / 4), 0x8000);  // sign kept
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(1.5f * tiny), 0x0002);  // tie between 1 and 2: even
  EXPECT_EQ(f32_to_f16(2.5f * tiny), 0x0002);  // tie between 2 and 3: even
}

TEST(Half, f32_to_f16_overflows_to_infinity_from_65520) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(down(65520.0f)), 0x7bff);  // below the midpoint to 2^16
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);        // tie rounds to the even "2^16", which is inf
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
}

TEST(Half, f32_to_f16_keeps_nan_a_nan_with_its_sign) {
  for (uint32_t bits : {0x7fc00000u, 0x7f800001u, 0x7f802000u, 0x7fffffffu, 0xffc00000u, 0xff800001u}) {
    const uint16_t h = f32_to_f16(bits_to_f32(bits));
    EXPECT_TRUE(is_f16_nan(h)) << std::hex << bits << " -> " << h;
    EXPECT_EQ((h & 0x8000u) != 0, (bits & 0x80000000u) != 0) << std::hex << bits;
  }
}

TEST(Half, bf16_is_the_upper_half_of_f32_rounded_to_nearest_even) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xc040), -3.0f);
  const float ulp = std::ldexp(1.0f, -7);  // bf16 spacing just above 1
  EXPECT_EQ(f32_to_bf16(1.0f + ulp / 2), 0x3f80);          // tie: 1.0 is even
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * ulp / 2), 0x3f82);      // tie: 1 + 2 ulp is even
  EXPECT_EQ(f32_to_bf16(up(1.0f + ulp / 2)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(down(1.0f + 3 * ulp / 2)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const auto b = static_cast<uint16_t>(h);
    if ((b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0) continue;  // NaN
    ASSERT_EQ(f32_to_bf16(bf16_to_f32(b)), b) << std::hex << h;
  }
}

TEST(Half, bf16_keeps_nan_a_nan_even_when_its_payload_is_in_the_low_bits) {
  for (uint32_t bits : {0x7f800001u, 0x7fc00000u, 0xff80ffffu, 0x7fffffffu}) {
    const float back = bf16_to_f32(f32_to_bf16(bits_to_f32(bits)));
    EXPECT_TRUE(std::isnan(back)) << std::hex << bits;
  }
}

// e4m3fn per the OCP FP8 specification: bias 7, subnormals m * 2^-9, S.1111.111 NaN, no inf.
float e4m3_spec(uint8_t v) {
  const int e = (v >> 3) & 0xf, m = v & 7;
  float r;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) r = std::ldexp(static_cast<float>(m), -9);
  else r = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
  return (v & 0x80) ? -r : r;
}

TEST(Half, decodes_f8_e4m3_known_values_and_matches_the_spec_for_all_bytes) {
  EXPECT_EQ(f8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0xb8), -1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x3c), 1.5f);
  EXPECT_EQ(f8e4m3_to_f32(0x7e), 448.0f);  // the largest finite e4m3fn value
  EXPECT_EQ(f8e4m3_to_f32(0x78), 256.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xff)));
  for (int v = 0; v < 256; ++v) {
    const auto b = static_cast<uint8_t>(v);
    const float want = e4m3_spec(b), got = f8e4m3_to_f32(b);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << v;
    } else {
      EXPECT_EQ(got, want) << v;
    }
  }
}

TEST(Half, decodes_f8_e5m2_known_values) {
  EXPECT_EQ(f8e5m2_to_f32(0x3c), 1.0f);
  EXPECT_EQ(f8e5m2_to_f32(0xc0), -2.0f);
  EXPECT_EQ(f8e5m2_to_f32(0x3e), 1.5f);
  EXPECT_EQ(f8e5m2_to_f32(0x7b), 57344.0f);  // largest finite
  EXPECT_EQ(f8e5m2_to_f32(0x04), std::ldexp(1.0f, -14));
  EXPECT_EQ(f8e5m2_to_f32(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(f8e5m2_to_f32(0x7c), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f8e5m2_to_f32(0xfc), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f8e5m2_to_f32(0x7d)));
  EXPECT_TRUE(std::isnan(f8e5m2_to_f32(0x7f)));
}

struct DTypeCase {
  const char* name;
  size_t size;
  bool is_float;
};

TEST(DTypes, parses_all_fifteen_safetensors_dtypes_with_their_sizes) {
  const DTypeCase cases[] = {
      {"BOOL", 1, false}, {"U8", 1, false},       {"I8", 1, false},  {"F8_E5M2", 1, true},
      {"F8_E4M3", 1, true}, {"I16", 2, false},    {"U16", 2, false}, {"F16", 2, true},
      {"BF16", 2, true},  {"I32", 4, false},      {"U32", 4, false}, {"F32", 4, true},
      {"F64", 8, true},   {"I64", 8, false},      {"U64", 8, false},
  };
  std::vector<DType> seen;
  for (const auto& c : cases) {
    const auto t = parse_dtype(c.name);
    ASSERT_TRUE(t.has_value()) << c.name;
    EXPECT_EQ(dtype_size(*t), c.size) << c.name;
    EXPECT_EQ(dtype_is_float(*t), c.is_float) << c.name;
    EXPECT_EQ(dtype_name(*t), c.name);
    for (DType s : seen) EXPECT_NE(s, *t) << c.name << " parses to the same type as another name";
    seen.push_back(*t);
  }
}

TEST(DTypes, rejects_names_outside_the_safetensors_spelling) {
  for (const char* bad : {"", "f32", "float32", "FLOAT", "F8_E4M3FNUZ", "BF16 ", "C64", "F4"})
    EXPECT_FALSE(parse_dtype(bad).has_value()) << "'" << bad << "'";
}

TEST(DTypes, converts_every_float_dtype_from_unaligned_little_endian_bytes) {
  const std::vector<float> values = {1.0f, -2.5f, 0.0f, 448.0f, 0.0625f};
  std::vector<float> out(values.size());
  auto check = [&](DType t, std::vector<uint8_t> bytes, const std::vector<float>& want) {
    bytes.insert(bytes.begin(), 0xAA);  // misalign the source by one byte
    convert_to_f32(t, bytes.data() + 1, want.size(), out.data());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(out[i], want[i]) << dtype_name(t) << " [" << i << "]";
  };
  check(DType::kF32, testing::f32_bytes(values), values);
  check(DType::kF16, testing::f16_bytes(values), values);
  check(DType::kBF16, testing::bf16_bytes(values), values);
  std::vector<uint8_t> f64;
  for (float v : values) testing::append_le(f64, static_cast<double>(v));
  check(DType::kF64, f64, values);
  // 1.0, -2.5 (1.25 * 2^1), 0, 448, 0.0625 (2^-4) in e4m3 and e5m2
  check(DType::kF8_E4M3, {0x38, 0xc2, 0x00, 0x7e, 0x18}, values);
  check(DType::kF8_E5M2, {0x3c, 0xc1, 0x00, 0x5f, 0x2c}, {1.0f, -2.5f, 0.0f, 448.0f, 0.0625f});
}

}  // namespace
}  // namespace aq
