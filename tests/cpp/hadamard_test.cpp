// The randomized Hadamard rotation (quant/hadamard.h): the block size rule, the fast path equal
// to the scalar reference bit for bit, orthonormality (inverse, norms), and the exact definition
// of docs/format.md ("Rotation") reproduced by an implementation written here from that text.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "quant/hadamard.h"
#include "test_util.h"

namespace aq {
namespace {

// Weights with a wide dynamic range (so rounding differences would show): Gaussian times
// log-uniform magnitudes, plus a few exact zeros.
std::vector<float> wide_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_real_distribution<float> e(-8.0f, 8.0f);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = (i % 37 == 5) ? 0.0f : g(rng) * std::exp2(e(rng));
  return v;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(Hadamard, rotation_block_is_the_largest_power_of_two_dividing_cols_up_to_256) {
  EXPECT_EQ(rotation_block(0), 1);
  for (uint64_t cols = 1; cols <= 5000; ++cols) {
    uint64_t p = cols & (~cols + 1);  // lowest set bit: the largest power of two dividing cols
    if (p > 256) p = 256;
    ASSERT_EQ(rotation_block(cols), static_cast<int>(p)) << cols;
  }
  EXPECT_EQ(rotation_block(1), 1);
  EXPECT_EQ(rotation_block(999), 1) << "odd widths are not rotated";
  EXPECT_EQ(rotation_block(96), 32);
  EXPECT_EQ(rotation_block(1ull << 40), 256);
  EXPECT_EQ(rotation_block((1ull << 40) * 3), 256);
  EXPECT_EQ(rotation_block(6 * 1000003ull), 2);
}

TEST(Hadamard, fast_path_equals_the_reference_bit_for_bit) {
  uint32_t seed = 1;
  for (int block = 2; block <= 256; block *= 2) {
    for (size_t rows : {1, 3, 8, 17}) {
      for (size_t mult : {1, 3}) {
        const size_t cols = static_cast<size_t>(block) * mult;
        SCOPED_TRACE(::testing::Message() << "block " << block << " rows " << rows << " cols " << cols);
        const std::vector<float> x = wide_values(rows * cols, seed++);
        std::vector<float> fast = x, ref = x;
        rotate_rows(fast.data(), rows, cols, block);
        rotate_rows_reference(ref.data(), rows, cols, block);
        ASSERT_TRUE(bit_equal(fast, ref)) << "rotate";
        unrotate_rows(fast.data(), rows, cols, block);
        unrotate_rows_reference(ref.data(), rows, cols, block);
        ASSERT_TRUE(bit_equal(fast, ref)) << "unrotate";
        // and the inverse applied to data that was not rotated
        std::vector<float> fast2 = x, ref2 = x;
        unrotate_rows(fast2.data(), rows, cols, block);
        unrotate_rows_reference(ref2.data(), rows, cols, block);
        ASSERT_TRUE(bit_equal(fast2, ref2)) << "unrotate of raw data";
      }
    }
  }
}

TEST(Hadamard, block_one_and_zero_rows_leave_the_data_alone) {
  const std::vector<float> x = wide_values(3 * 7, 4);
  std::vector<float> y = x;
  rotate_rows(y.data(), 3, 7, 1);
  EXPECT_TRUE(bit_equal(y, x));
  unrotate_rows(y.data(), 3, 7, 1);
  EXPECT_TRUE(bit_equal(y, x));
  rotate_rows(nullptr, 0, 64, 64);  // nothing to touch
  unrotate_rows(nullptr, 0, 64, 64);
}

double norm(const float* v, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return std::sqrt(s);
}

TEST(Hadamard, unrotate_inverts_rotate_and_rows_keep_their_norms) {
  uint32_t seed = 100;
  for (int block = 2; block <= 256; block *= 2) {
    for (size_t mult : {1, 2, 5}) {
      const size_t rows = 6, cols = static_cast<size_t>(block) * mult;
      SCOPED_TRACE(::testing::Message() << "block " << block << " cols " << cols);
      const std::vector<float> x = testing::gaussian(rows * cols, seed++);
      std::vector<float> y = x;
      rotate_rows(y.data(), rows, cols, block);
      EXPECT_FALSE(bit_equal(y, x)) << "the rotation changes the data";
      for (size_t r = 0; r < rows; ++r) {
        const double a = norm(x.data() + r * cols, cols), b = norm(y.data() + r * cols, cols);
        EXPECT_NEAR(b, a, 1e-6 * a) << "row " << r;
        for (size_t b0 = 0; b0 < cols; b0 += static_cast<size_t>(block)) {  // each block on its own
          const double na = norm(x.data() + r * cols + b0, static_cast<size_t>(block));
          const double nb = norm(y.data() + r * cols + b0, static_cast<size_t>(block));
          EXPECT_NEAR(nb, na, 1e-6 * na + 1e-30);
        }
      }
      std::vector<float> z = y;
      unrotate_rows(z.data(), rows, cols, block);
      double err = 0, ref = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        err += (static_cast<double>(z[i]) - x[i]) * (static_cast<double>(z[i]) - x[i]);
        ref += static_cast<double>(x[i]) * x[i];
      }
      EXPECT_LE(std::sqrt(err / ref), 1e-6);
      for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(z[i], x[i], 1e-5 * (1.0 + std::fabs(x[i]))) << i;
    }
  }
}

TEST(Hadamard, rotation_spreads_an_outlier_over_its_block) {
  const size_t cols = 64;
  std::vector<float> x(cols, 0.0f);
  x[10] = 8.0f;
  rotate_rows(x.data(), 1, cols, 64);
  for (float v : x) EXPECT_FLOAT_EQ(std::fabs(v), 1.0f) << "H e_j / sqrt(64) has every entry +-1/8";
}

// ---- docs/format.md, "Rotation", implemented from the text alone ----------------------------

uint64_t doc_splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

float doc_sign(uint64_t j) { return (doc_splitmix64(0x5851F42D4C957F2Dull + j) & 1u) ? -1.0f : 1.0f; }

// Butterflies h = 1, 2, ..., B/2: (a, b) -> (a + b, a - b) on elements (i, i + h) of the block
// for every i with bit h clear.
void doc_butterflies(float* v, int block) {
  for (int h = 1; h < block; h *= 2)
    for (int i = 0; i < block; ++i)
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
}

float doc_scale(int block) {
  // "the float32 constant 1 / sqrt(B)": the float nearest to the exact value
  return static_cast<float>(1.0L / std::sqrt(static_cast<long double>(block)));
}

void doc_rotate(std::vector<float>& x, size_t rows, size_t cols, int block) {
  const float s = doc_scale(block);
  for (size_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * cols;
    for (size_t j = 0; j < cols; ++j) row[j] = row[j] * doc_sign(j);
    for (size_t b = 0; b < cols; b += static_cast<size_t>(block)) doc_butterflies(row + b, block);
    for (size_t j = 0; j < cols; ++j) row[j] = row[j] * s;
  }
}

void doc_unrotate(std::vector<float>& x, size_t rows, size_t cols, int block) {
  const float s = doc_scale(block);
  for (size_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * cols;
    for (size_t b = 0; b < cols; b += static_cast<size_t>(block)) doc_butterflies(row + b, block);
    for (size_t j = 0; j < cols; ++j) row[j] = row[j] * s;
    for (size_t j = 0; j < cols; ++j) row[j] = row[j] * doc_sign(j);
  }
}

TEST(Hadamard, the_documented_definition_reproduces_the_reference_and_fast_paths) {
  uint32_t seed = 500;
  for (int block = 2; block <= 256; block *= 2) {
    for (size_t mult : {1, 3}) {
      const size_t rows = 4, cols = static_cast<size_t>(block) * mult;
      SCOPED_TRACE(::testing::Message() << "block " << block << " cols " << cols);
      const std::vector<float> x = wide_values(rows * cols, seed++);
      std::vector<float> doc = x, ref = x, fast = x;
      doc_rotate(doc, rows, cols, block);
      rotate_rows_reference(ref.data(), rows, cols, block);
      rotate_rows(fast.data(), rows, cols, block);
      ASSERT_TRUE(bit_equal(doc, ref)) << "rotate_rows_reference differs from docs/format.md";
      ASSERT_TRUE(bit_equal(doc, fast)) << "rotate_rows differs from docs/format.md";
      doc_unrotate(doc, rows, cols, block);
      unrotate_rows_reference(ref.data(), rows, cols, block);
      unrotate_rows(fast.data(), rows, cols, block);
      ASSERT_TRUE(bit_equal(doc, ref)) << "unrotate_rows_reference differs from docs/format.md";
      ASSERT_TRUE(bit_equal(doc, fast)) << "unrotate_rows differs from docs/format.md";
    }
  }
}

TEST(Hadamard, signs_follow_the_column_index_across_blocks) {
  // Column j's sign depends on j itself, not on j mod B: rotating a row of unit impulses one
  // block at a time shows each block's sign pattern.
  const int block = 4;
  const size_t cols = 12;
  for (size_t j = 0; j < cols; ++j) {
    std::vector<float> x(cols, 0.0f);
    x[j] = 1.0f;
    rotate_rows(x.data(), 1, cols, block);
    // the impulse at j lands on its block's first element as sign(j) / sqrt(B) (H's first row is all +1)
    const size_t first = j / block * block;
    EXPECT_EQ(x[first], doc_sign(j) * doc_scale(block)) << j;
  }
}

}  // namespace
}  // namespace aq
