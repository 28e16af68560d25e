// The entropy-coded scheme end to end through encode_tensor (engine/tensor_job.h) and
// decode_tensor (quant/tensor_codec.h), checked against docs/format.md ("Entropy-coded tensors"):
// the stored size meets the bit budget, the values follow the documented reconstruction rule,
// outliers are escaped rather than clipped, the bytes do not depend on the thread count, and
// inconsistent side information is refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "engine/tensor_job.h"
#include "quant/entropy_quant.h"
#include "quant/hadamard.h"
#include "quant/rans.h"
#include "quant/tensor_codec.h"
#include "test_util.h"

namespace aq {
namespace {

// The nominal width is ceil(budget): fixed-rate (affine) codes of that width, which encode_tensor
// may keep instead for a small tensor when they do better within the budget, cost more than the
// budget here, so these tests see the entropy coder itself.
QuantScheme entropy_scheme(double budget, bool rotate = false) {
  QuantScheme s;
  s.kind = SchemeKind::kEntropy;
  s.bits = std::clamp(static_cast<int>(std::ceil(budget)), 1, 12);
  s.target_bpw = budget;
  s.rotate = rotate;
  return s;
}

Result<EncodedTensor> encode_any(const std::vector<float>& w, size_t rows, size_t cols, const QuantScheme& s,
                                 ThreadPool* pool = nullptr) {
  const std::vector<uint8_t> bytes = testing::f32_bytes(w);
  RowSource src;
  src.data = bytes.data();
  src.dtype = DType::kF32;
  src.rows = rows;
  src.cols = cols;
  src.name = "t";
  return encode_tensor(src, s, pool);
}

// encode_any, and a failure unless the result is entropy-coded.
Result<EncodedTensor> encode(const std::vector<float>& w, size_t rows, size_t cols, const QuantScheme& s,
                             ThreadPool* pool = nullptr) {
  auto e = encode_any(w, rows, cols, s, pool);
  if (e.ok() && (e->scheme.kind != SchemeKind::kEntropy || !e->entropy))
    return Internal(StrCat("asked for ", scheme_name(s), ", got ", scheme_name(e->scheme)));
  return e;
}

std::vector<float> decode(const EncodedTensor& e) {
  std::vector<float> out(e.rows * e.cols + 1, -12345.0f);
  const Status st = decode_tensor(e.scheme, e.rows, e.cols, e.view(), out.data());
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(out.back(), -12345.0f) << "decode_tensor wrote past rows x cols";
  out.pop_back();
  return out;
}

std::vector<float> steps_of(const EncodedTensor& e) {
  std::vector<float> s(e.scales.size() / 4);
  std::memcpy(s.data(), e.scales.data(), e.scales.size());
  return s;
}

double bits_per_weight(const EncodedTensor& e) {
  return 8.0 * static_cast<double>(e.stored_bytes()) / static_cast<double>(e.rows * e.cols);
}

// The error figures as the engine defines them: per row block of rows_per_block(cols) rows,
// merged in block order.
ErrorStats blockwise_stats(const std::vector<float>& w, const std::vector<float>& d, size_t rows, size_t cols) {
  ErrorStats total;
  const uint64_t block = rows_per_block(cols);
  for (uint64_t r0 = 0; r0 < rows; r0 += block) {
    const uint64_t nr = std::min<uint64_t>(block, rows - r0);
    ErrorStats b;
    b.add(w.data() + r0 * cols, d.data() + r0 * cols, nr * cols);
    total.merge(b);
  }
  return total;
}

void expect_same_stats(const ErrorStats& a, const ErrorStats& b, const std::string& what) {
  EXPECT_EQ(a.count, b.count) << what;
  EXPECT_EQ(a.sum_ww, b.sum_ww) << what;
  EXPECT_EQ(a.sum_dd, b.sum_dd) << what;
  EXPECT_EQ(a.sum_wd, b.sum_wd) << what;
  EXPECT_EQ(a.sum_ee, b.sum_ee) << what;
  EXPECT_EQ(a.max_abs_err, b.max_abs_err) << what;
}

double relative_error(const std::vector<float>& w, const std::vector<float>& d) {
  double ee = 0, ww = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    const double e = static_cast<double>(w[i]) - d[i];
    ee += e * e;
    ww += static_cast<double>(w[i]) * w[i];
  }
  return std::sqrt(ee / ww);
}

// The documented value of code q at step s (docs/format.md, "Values").
float doc_value(int64_t q, float s, const std::vector<float>& centroids) {
  const int64_t m = q < 0 ? -q : q;
  if (m == 0) return 0.0f * s;
  if (m <= 8) {
    const float mag = static_cast<float>(m) + centroids[static_cast<size_t>(m - 1)];
    return (q < 0 ? -mag : mag) * s;
  }
  return static_cast<float>(q) * s;
}

struct Data {
  std::string name;
  std::vector<float> w;
};

std::vector<Data> test_data(size_t rows, size_t cols) {
  return {{"gaussian", testing::gaussian(rows * cols, 11, 0.02f)},
          {"student-t4", testing::student_t4(rows * cols, 12, 0.02f)},
          {"outlier-columns", testing::outlier_columns(rows, cols, 13, {3, cols / 3, cols - 1}, 50.0f)}};
}

// ---- the budget --------------------------------------------------------------------------------

TEST(EntropyScheme, stored_bits_per_weight_meet_the_budget_and_error_falls_as_it_rises) {
  const size_t rows = 300, cols = 256;  // two chunks of 256 rows
  const double budgets[] = {2.0, 2.5, 3.5, 4.5, 6.0, 8.0, 9.0};
  for (const Data& d : test_data(rows, cols)) {
    for (bool rotate : {false, true}) {
      double last_error = INFINITY;
      for (double budget : budgets) {
        const std::string what = d.name + (rotate ? " rotated" : "") + " at " + std::to_string(budget);
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(d.w, rows, cols, entropy_scheme(budget, rotate)));
        ASSERT_TRUE(e.entropy.has_value()) << what;
        EXPECT_EQ(e.scheme.kind, SchemeKind::kEntropy) << what;
        EXPECT_EQ(e.scheme.rotate, rotate) << what;
        const double bpw = bits_per_weight(e);
        EXPECT_LE(bpw, budget) << what;
        const double err = relative_error(d.w, decode(e));
        EXPECT_LT(err, last_error) << what << ": a larger budget must not give a larger error";
        EXPECT_NEAR(err, e.stats.relative_error(), 1e-9 * err + 1e-12) << what;
        if (d.name == "gaussian") {  // no code beats the rate-distortion bound of a Gaussian source
          EXPECT_GE(err, 0.97 * std::exp2(-budget)) << what << ": better than Shannon -- the size is miscounted";
        }
        last_error = err;
      }
    }
  }
}

TEST(EntropyScheme, the_step_search_leaves_little_of_the_budget_unused) {
  // docs/format.md: "d is searched so that the stored bits per weight meet target_bpw". Bits
  // left unused are error not removed (about 6 dB per bit), so the search should end close to
  // the budget: within a quarter of a bit per weight for a tensor of 77K weights.
  const size_t rows = 300, cols = 256;
  for (const Data& d : test_data(rows, cols)) {
    for (bool rotate : {false, true}) {
      for (double budget : {3.0, 7.0, 9.0}) {
        const std::string what = d.name + (rotate ? " rotated" : "") + " at " + std::to_string(budget);
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(d.w, rows, cols, entropy_scheme(budget, rotate)));
        EXPECT_GE(bits_per_weight(e), budget - 0.25)
            << what << ": stored " << bits_per_weight(e) << " bits per weight ("
            << e.entropy->frequencies.size() << " symbols in the table)";
      }
    }
  }
}

TEST(EntropyScheme, budget_defaults_to_bits_plus_one_half_whichever_codes_are_kept) {
  // Without a target the budget is bits + 0.5; a small tensor may come back with the affine codes
  // of the same width when they do better within that budget -- either way the stored size
  // meets it and the recorded error is the decoded tensor's.
  struct Shape {
    size_t rows, cols;
  };
  for (Shape sh : {Shape{200, 192}, Shape{17, 1000}, Shape{64, 96}}) {
    const std::vector<float> w = testing::student_t4(sh.rows * sh.cols, 21, 0.05f);
    for (int bits : {2, 3, 4, 8}) {
      QuantScheme s;
      s.kind = SchemeKind::kEntropy;
      s.bits = bits;
      EXPECT_EQ(s.entropy_budget(), bits + 0.5);
      const std::string what = std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " bits " + std::to_string(bits);
      ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode_any(w, sh.rows, sh.cols, s));
      EXPECT_LE(bits_per_weight(e), bits + 0.5) << what << " as " << scheme_name(e.scheme);
      EXPECT_EQ(e.scheme.bits, bits) << what;
      EXPECT_EQ(e.entropy.has_value(), e.scheme.kind == SchemeKind::kEntropy) << what;
      expect_same_stats(blockwise_stats(w, decode(e), sh.rows, sh.cols), e.stats, what);
    }
  }
}

TEST(EntropyScheme, stored_bytes_count_codes_steps_and_every_side_field) {
  const size_t rows = 300, cols = 100;
  ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(testing::gaussian(rows * cols, 3), rows, cols, entropy_scheme(4.5)));
  const EntropySide& s = *e.entropy;
  EXPECT_TRUE(e.zero_points.empty());
  EXPECT_EQ(e.scales.size(), rows * 4) << "one float32 step per row";
  EXPECT_EQ(s.centroids.size(), 8u);
  EXPECT_EQ(s.chunk_rows, rows_per_block(cols));
  const size_t chunks = (rows + s.chunk_rows - 1) / s.chunk_rows;
  EXPECT_EQ(s.chunk_offsets.size(), chunks + 1);
  EXPECT_EQ(s.chunk_offsets.front(), 0u);
  EXPECT_EQ(s.chunk_offsets.back(), e.codes.size());
  // symbol_min, escape_symbol, chunk_rows (int32 each), the lists at their element sizes
  const uint64_t side = 4 + 4 + 4 + 2 * s.frequencies.size() + 4 * s.chunk_offsets.size() + 4 * s.centroids.size();
  EXPECT_EQ(e.stored_bytes(), e.codes.size() + e.scales.size() + side);
}

// ---- decoding follows the document ---------------------------------------------------------------

TEST(EntropyScheme, decode_reproduces_the_recorded_error_statistics_exactly) {
  struct Shape {
    size_t rows, cols;
  };
  for (Shape sh : {Shape{300, 256}, Shape{1000, 96}, Shape{17, 1000}, Shape{40, 37}}) {
    for (bool rotate : {false, true}) {
      for (double budget : {2.5, 4.5, 8.5}) {
        const std::string what = std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + (rotate ? " rot " : " ") +
                                  std::to_string(budget);
        const std::vector<float> w = testing::student_t4(sh.rows * sh.cols, 7, 0.03f);
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, sh.rows, sh.cols, entropy_scheme(budget, rotate)));
        ASSERT_OK(check_encoded(e.scheme, e.rows, e.cols, e.view()));
        const std::vector<float> d = decode(e);
        expect_same_stats(blockwise_stats(w, d, sh.rows, sh.cols), e.stats, what);
        // decoding chunk by chunk gives the same values as the whole tensor
        const uint64_t unit = decode_granularity(e.scheme, e.view());
        EXPECT_EQ(unit, e.entropy->chunk_rows);
        std::vector<float> part(unit * sh.cols);
        for (uint64_t r0 = 0; r0 < sh.rows; r0 += unit) {
          const uint64_t nr = std::min<uint64_t>(unit, sh.rows - r0);
          ASSERT_OK(decode_rows(e.scheme, e.rows, e.cols, e.view(), r0, nr, part.data()));
          EXPECT_TRUE(std::equal(part.begin(), part.begin() + static_cast<long>(nr * sh.cols),
                                 d.begin() + static_cast<long>(r0 * sh.cols)))
              << what << " chunk at row " << r0;
        }
      }
    }
  }
}

TEST(EntropyScheme, values_are_rounded_codes_times_the_row_step_with_centroids_for_small_codes) {
  // Unrotated: every decoded weight is the documented value of q = round(w / s_r), and the
  // centroids are the mean offsets of the weights coded m from m.
  const size_t rows = 300, cols = 160;
  for (const Data& data : test_data(rows, cols)) {
    for (double budget : {2.0, 3.5, 6.0}) {
      const std::string what = data.name + " " + std::to_string(budget);
      ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(data.w, rows, cols, entropy_scheme(budget)));
      const std::vector<float> d = decode(e);
      const std::vector<float> steps = steps_of(e);
      const std::vector<float>& c = e.entropy->centroids;
      ASSERT_EQ(c.size(), 8u);
      for (float x : c) {
        EXPECT_GE(x, -0.5f - 1e-4f) << what << ": a mean of offsets in [-0.5, 0.5]";
        EXPECT_LE(x, 0.5f + 1e-4f) << what;
      }
      double sum[8] = {}, cnt[8] = {};
      size_t bad = 0;
      for (size_t r = 0; r < rows; ++r) {
        const float s = steps[r];
        ASSERT_GT(s, 0.0f) << what;
        for (size_t j = 0; j < cols; ++j) {
          const float w = data.w[r * cols + j];
          const double exact = static_cast<double>(w) / s;
          const auto q0 = static_cast<int64_t>(std::llround(exact));
          // q = round(w / s); allow the neighbour only where w / s is within rounding of a tie
          bool matched = d[r * cols + j] == doc_value(q0, s, c);
          int64_t q = q0;
          for (int64_t alt : {q0 - 1, q0 + 1})
            if (!matched && std::fabs(std::fabs(exact - static_cast<double>(alt)) - 0.5) < 1e-4 &&
                d[r * cols + j] == doc_value(alt, s, c))
              matched = true, q = alt;
          if (!matched && ++bad <= 5)
            ADD_FAILURE() << what << ": [" << r << ", " << j << "] w = " << w << " step " << s << " decoded "
                          << d[r * cols + j] << " but code " << q0 << " gives " << doc_value(q0, s, c);
          const int64_t m = q < 0 ? -q : q;
          if (m >= 1 && m <= 8) sum[m - 1] += std::fabs(exact) - static_cast<double>(m), cnt[m - 1] += 1;
        }
      }
      EXPECT_EQ(bad, 0u) << what;
      for (int m = 0; m < 8; ++m) {
        if (cnt[m] > 0) {
          EXPECT_NEAR(c[m], sum[m] / cnt[m], 1e-3) << what << " m=" << m + 1 << " (" << cnt[m] << " weights)";
        }
      }
    }
  }
}

TEST(EntropyScheme, rows_get_steps_proportional_to_the_square_root_of_their_rms) {
  // "s_r = d * rms(row r)^(1/2)" with one d per tensor: s_r^2 / rms_r is the same for every row.
  const size_t rows = 64, cols = 128;
  std::vector<float> w = testing::gaussian(rows * cols, 5);
  for (size_t r = 0; r < rows; ++r)
    for (size_t j = 0; j < cols; ++j) w[r * cols + j] *= std::exp2(static_cast<float>(r % 9) - 4.0f);
  ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, rows, cols, entropy_scheme(4.0)));
  const std::vector<float> steps = steps_of(e);
  double ref = 0;
  for (size_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (size_t j = 0; j < cols; ++j) ss += static_cast<double>(w[r * cols + j]) * w[r * cols + j];
    const double rms = std::sqrt(ss / cols);
    const double d = steps[r] / std::sqrt(rms);
    if (r == 0) ref = d;
    EXPECT_NEAR(d, ref, 1e-5 * ref) << "row " << r;
  }
}

// ---- outliers --------------------------------------------------------------------------------

TEST(EntropyScheme, outliers_beyond_2047_steps_are_escaped_and_reconstructed_without_clipping) {
  const size_t rows = 1500, cols = 96;  // chunks of 680 rows: outliers in all three
  ASSERT_EQ(rows_per_block(cols), 680u);
  const size_t planted[][2] = {{0, 0}, {7, 13}, {679, 95}, {680, 40}, {1499, 1}};
  for (bool rotate : {false, true}) {
    for (double budget : {2.5, 4.5, 9.0}) {
      const std::string what = std::string(rotate ? "rotated " : "") + std::to_string(budget);
      std::vector<float> w = testing::gaussian(rows * cols, 17, 0.02f);
      float sign = 1.0f;
      for (const auto& p : planted) {
        w[p[0] * cols + p[1]] = sign * 0.02f * 1e6f;
        sign = -sign;
      }
      ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, rows, cols, entropy_scheme(budget, rotate)));
      const std::vector<float> d = decode(e);
      const std::vector<float> steps = steps_of(e);
      const int block = rotate ? rotation_block(cols) : 1;
      bool beyond = false;  // does some code need an escape?
      for (const auto& p : planted) {
        const float x = w[p[0] * cols + p[1]], s = steps[p[0]];
        const float got = d[p[0] * cols + p[1]];
        std::vector<float> y(w.begin() + static_cast<long>(p[0] * cols), w.begin() + static_cast<long>((p[0] + 1) * cols));
        rotate_rows_reference(y.data(), 1, cols, block);
        for (float v : y) beyond |= std::fabs(v) / s > 2048.0f;
        if (!rotate) {
          ASSERT_GT(std::fabs(x) / s, 2048.0) << what << ": the test wants a code beyond the symbols";
          EXPECT_LE(std::fabs(got - x), 0.5f * s + std::fabs(x) * 1e-6f)
              << what << ": outlier " << x << " came back as " << got << " (step " << s << ")";
        } else {
          // each rotated coordinate is within a step of its value (half a step, and a centroid
          // shift for small codes); the inverse rotation is orthonormal, so no weight of the
          // block moves by more than sqrt(B) steps
          EXPECT_LE(std::fabs(got - x), s * std::sqrt(static_cast<float>(block)) + std::fabs(x) * 1e-5f)
              << what << ": outlier " << x << " came back as " << got << " (step " << s << ")";
        }
      }
      uint64_t escaped = 0;
      for (size_t c = 0; c + 1 < e.entropy->chunk_offsets.size(); ++c) {
        const uint8_t* p = e.codes.data() + e.entropy->chunk_offsets[c];
        uint32_t count;
        std::memcpy(&count, p, 4);
        ASSERT_LE(4 + 4ull * count, e.entropy->chunk_offsets[c + 1] - e.entropy->chunk_offsets[c]);
        // docs/format.md: escaped codes are float32 integers outside the direct symbol range
        const int64_t direct = static_cast<int64_t>(e.entropy->frequencies.size()) - 1;
        for (uint32_t k = 0; k < count; ++k) {
          float q;
          std::memcpy(&q, p + 4 + 4 * k, 4);
          EXPECT_EQ(q, std::nearbyint(q)) << what << ": escaped code " << q << " is not an integer";
          EXPECT_TRUE(static_cast<double>(q) < e.entropy->symbol_min ||
                      static_cast<double>(q) >= static_cast<double>(e.entropy->symbol_min + direct))
              << what << ": escaped code " << q << " has its own symbol";
        }
        escaped += count;
      }
      if (beyond) {
        ASSERT_GE(e.entropy->escape_symbol, 0) << what << ": codes beyond 2047 need the escape symbol";
        EXPECT_EQ(static_cast<size_t>(e.entropy->escape_symbol), e.entropy->frequencies.size() - 1)
            << "the escape symbol is the last";
        EXPECT_GE(escaped, rotate ? 1u : 5u) << what;
      }
      EXPECT_LT(e.stats.relative_error(), 0.05) << what << ": the outliers dominate the norm and must come back";
      expect_same_stats(blockwise_stats(w, d, rows, cols), e.stats, what);
    }
  }
}

TEST(EntropyScheme, extreme_outliers_are_not_clipped) {
  // One weight 10^15 times the rest of a float32 tensor: its code is far beyond any symbol; the
  // encoder chooses the row steps (docs/format.md: "Readers need neither rule"), so nothing
  // forces a clipped code -- it must still come back within half a step.
  const size_t rows = 64, cols = 96;
  for (double budget : {4.5, 9.0}) {
    std::vector<float> w = testing::gaussian(rows * cols, 23, 1.0f);
    w[5 * cols + 17] = 1e15f;
    ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, rows, cols, entropy_scheme(budget)));
    const std::vector<float> d = decode(e);
    const float s = steps_of(e)[5];
    EXPECT_LE(std::fabs(d[5 * cols + 17] - w[5 * cols + 17]), 0.5f * s + 1e15f * 1e-6f)
        << "budget " << budget << ": 1e15 came back as " << d[5 * cols + 17] << " (step " << s << ", code "
        << 1e15 / s << ")";
    EXPECT_GT(e.stats.cosine(), 0.999) << budget;
  }
}

TEST(EntropyScheme, an_outlier_does_not_cost_the_rest_of_a_small_tensor_its_budget) {
  // One weight far out (10^4 and 10^6 times the others) in a 64 x 96 tensor: escaped or coded
  // with a large symbol, it costs its own bits, but the other rows keep most of the budget.
  const size_t rows = 64, cols = 96;
  std::vector<std::string> failures;
  for (float factor : {1e4f, 1e6f}) {
    for (double budget : {4.5, 8.5}) {
      std::vector<float> w = testing::gaussian(rows * cols, 29, 0.02f);
      w[5 * cols + 17] = 0.02f * factor;
      ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, rows, cols, entropy_scheme(budget)));
      const std::vector<float> d = decode(e);
      std::vector<float> w_rest, d_rest;
      for (size_t r = 0; r < rows; ++r)
        if (r != 5)
          for (size_t j = 0; j < cols; ++j) w_rest.push_back(w[r * cols + j]), d_rest.push_back(d[r * cols + j]);
      const double err = relative_error(w_rest, d_rest);
      const double bound = std::exp2(-(budget - 2.5));  // two bits of slack for the side information
      if (!(err <= bound))
        failures.push_back(StrCat("outlier x", factor, " at ", budget, " bits: the other rows' relative error is ",
                                  err, " (bound ", bound, "), ", bits_per_weight(e), " bits per weight stored, row 0 step ",
                                  steps_of(e)[0]));
      EXPECT_LE(std::fabs(d[5 * cols + 17] - w[5 * cols + 17]), steps_of(e)[5] * 1.0001f) << "the outlier itself";
    }
  }
  std::string all;
  for (const auto& f : failures) all += "\n  " + f;
  EXPECT_TRUE(failures.empty()) << all;
}

// ---- edge cases ------------------------------------------------------------------------------

TEST(EntropyScheme, all_zero_tensors_and_rows_decode_to_exact_zeros) {
  for (bool rotate : {false, true}) {
    const size_t rows = 50, cols = 64;
    ASSERT_OK_AND_ASSIGN(EncodedTensor z, encode(std::vector<float>(rows * cols, 0.0f), rows, cols,
                                                 entropy_scheme(4.5, rotate)));
    for (float v : decode(z)) ASSERT_EQ(v, 0.0f);
    EXPECT_EQ(z.stats.cosine(), 1.0);
    EXPECT_EQ(z.stats.sum_ee, 0.0);
    std::vector<float> w = testing::gaussian(rows * cols, 9);
    for (size_t r : {0, 13, 49})
      for (size_t j = 0; j < cols; ++j) w[r * cols + j] = 0.0f;
    ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, rows, cols, entropy_scheme(4.5, rotate)));
    const std::vector<float> d = decode(e);
    for (size_t r : {0, 13, 49})
      for (size_t j = 0; j < cols; ++j) ASSERT_EQ(d[r * cols + j], 0.0f) << "row " << r;
    EXPECT_GT(e.stats.cosine(), 0.99);
  }
}

TEST(EntropyScheme, tiny_and_ragged_tensors_round_trip) {
  struct Shape {
    size_t rows, cols;
  };
  std::vector<std::string> failures;
  for (Shape sh : {Shape{1, 1}, Shape{1, 7}, Shape{1, 300}, Shape{9, 1}, Shape{3, 13}, Shape{5, 6}, Shape{2, 24},
                   Shape{33, 10}}) {
    for (bool rotate : {false, true}) {
      for (double budget : {1.0, 4.5, 12.0}) {
        const std::string what = std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + (rotate ? " rot " : " ") +
                                 std::to_string(budget);
        const std::vector<float> w = testing::gaussian(sh.rows * sh.cols, static_cast<uint32_t>(sh.rows * 31 + sh.cols));
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, sh.rows, sh.cols, entropy_scheme(budget, rotate)));
        SCOPED_TRACE(what);
        ASSERT_OK(check_encoded(e.scheme, e.rows, e.cols, e.view()));
        const std::vector<float> steps = steps_of(e);
        const std::vector<float> d = decode(e);
        size_t bad_steps = 0, bad_values = 0;
        for (float s : steps) bad_steps += (std::isfinite(s) && s > 0.0f) ? 0 : 1;
        for (float v : d) bad_values += std::isfinite(v) ? 0 : 1;
        if (bad_steps || bad_values || !std::isfinite(e.stats.sum_ee)) {
          failures.push_back(StrCat(what, ": step of row 0 ", steps[0], ", [0, 0] decodes to ", d[0],
                                    ", recorded squared error ", e.stats.sum_ee));
          continue;
        }
        expect_same_stats(blockwise_stats(w, d, sh.rows, sh.cols), e.stats, what);
        if (!rotate || rotation_block(sh.cols) == 1) {
          // each weight within one step (half a step, plus a centroid shift of at most half a step)
          size_t far = 0;
          for (size_t r = 0; r < sh.rows; ++r)
            for (size_t j = 0; j < sh.cols; ++j)
              far += std::fabs(d[r * sh.cols + j] - w[r * sh.cols + j]) <= steps[r] * 1.0001f ? 0 : 1;
          EXPECT_EQ(far, 0u) << "weights more than a step away from their value";
        }
      }
    }
  }
  std::string all;
  for (const auto& f : failures) all += "\n  " + f;
  EXPECT_TRUE(failures.empty()) << failures.size()
                                << " cases with non-finite row steps, values or error figures:" << all;
}

TEST(EntropyScheme, small_tensors_error_does_not_grow_with_the_budget) {
  // Small tensors pay a larger share of the budget for side information (row steps, the
  // frequency table), but more bits must never give a worse tensor.
  struct Shape {
    size_t rows, cols;
  };
  std::vector<std::string> failures;
  for (Shape sh : {Shape{1, 300}, Shape{4, 256}, Shape{32, 36}, Shape{16, 128}, Shape{64, 96}}) {
    for (bool rotate : {false, true}) {
      const std::vector<float> w = testing::student_t4(sh.rows * sh.cols, static_cast<uint32_t>(sh.rows + sh.cols), 0.1f);
      double last = INFINITY, last_budget = 0;
      for (double budget : {2.0, 3.0, 4.5, 6.0, 8.5, 10.0, 12.0}) {
        const std::string what = StrCat(sh.rows, "x", sh.cols, rotate ? " rotated" : "", " at ", budget);
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(w, sh.rows, sh.cols, entropy_scheme(budget, rotate)));
        const double err = relative_error(w, decode(e));
        if (!(err <= last))
          failures.push_back(StrCat(what, " bits: relative error ", err, " (", bits_per_weight(e),
                                    " bits per weight stored), but ", last, " at ", last_budget, " bits"));
        if (std::isfinite(err)) last = err, last_budget = budget;
      }
    }
  }
  std::string all;
  for (const auto& f : failures) all += "\n  " + f;
  EXPECT_TRUE(failures.empty()) << failures.size() << " budgets gave a larger error than a smaller one:" << all;
}

TEST(EntropyScheme, tensors_with_a_zero_dimension_encode_and_decode) {
  for (auto [rows, cols] : {std::pair<size_t, size_t>{0, 64}, {4, 0}, {0, 0}}) {
    SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols));
    ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode({}, rows, cols, entropy_scheme(4.5)));
    ASSERT_OK(check_encoded(e.scheme, e.rows, e.cols, e.view()));
    float out[1] = {-1.0f};
    ASSERT_OK(decode_tensor(e.scheme, e.rows, e.cols, e.view(), out));
    EXPECT_EQ(out[0], -1.0f) << "nothing is written for an empty tensor";
    EXPECT_EQ(e.stats.count, 0u);
  }
}

TEST(EntropyScheme, float16_sources_are_measured_against_their_float_values) {
  const size_t rows = 40, cols = 64;
  const std::vector<float> w = testing::as_f16(testing::gaussian(rows * cols, 8, 0.1f));
  const std::vector<uint8_t> bytes = testing::f16_bytes(w);
  RowSource src;
  src.data = bytes.data();
  src.dtype = DType::kF16;
  src.rows = rows;
  src.cols = cols;
  ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode_tensor(src, entropy_scheme(5.0, true), nullptr));
  EXPECT_EQ(e.scheme.scale_type, ScaleType::kF32) << "row steps are stored as float32";
  expect_same_stats(blockwise_stats(w, decode(e), rows, cols), e.stats, "f16");
}

// ---- determinism -------------------------------------------------------------------------------

TEST(EntropyScheme, bytes_are_identical_for_every_thread_count) {
  // 3100 x 64: chunks of 1024 rows (four chunks, the last of 28 rows) land on different workers.
  const size_t rows = 3100, cols = 64;
  ASSERT_EQ(rows_per_block(cols), 1024u);
  ThreadPool p1(1), p2(2), p4(4);
  struct Case {
    Data data;
    bool rotate;
  };
  for (const Case& c : {Case{Data{"student-t4", testing::student_t4(rows * cols, 41, 0.02f)}, false},
                        Case{Data{"outliers", testing::outlier_columns(rows, cols, 42, {5, 60}, 1e4f)}, true}}) {
    const Data& data = c.data;
    for (bool rotate : {c.rotate}) {
      const QuantScheme s = entropy_scheme(3.5, rotate);
      const std::string what = data.name + (rotate ? " rotated" : "");
      ASSERT_OK_AND_ASSIGN(EncodedTensor ref, encode(data.w, rows, cols, s, nullptr));
      EXPECT_EQ(ref.entropy->chunk_offsets.size(), 5u);
      for (ThreadPool* pool : {&p1, &p2, &p4}) {
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(data.w, rows, cols, s, pool));
        const std::string w2 = what + " with " + std::to_string(pool->size()) + " threads";
        EXPECT_EQ(e.scheme, ref.scheme) << w2;
        EXPECT_TRUE(e.codes == ref.codes) << w2;
        EXPECT_TRUE(e.scales == ref.scales) << w2;
        const EntropySide &a = *e.entropy, &b = *ref.entropy;
        EXPECT_EQ(a.symbol_min, b.symbol_min) << w2;
        EXPECT_EQ(a.frequencies, b.frequencies) << w2;
        EXPECT_EQ(a.escape_symbol, b.escape_symbol) << w2;
        EXPECT_EQ(a.chunk_rows, b.chunk_rows) << w2;
        EXPECT_EQ(a.chunk_offsets, b.chunk_offsets) << w2;
        ASSERT_EQ(a.centroids.size(), b.centroids.size()) << w2;
        EXPECT_EQ(std::memcmp(a.centroids.data(), b.centroids.data(), 4 * a.centroids.size()), 0) << w2;
        expect_same_stats(e.stats, ref.stats, w2);
      }
    }
  }
}

// ---- inconsistent side information -------------------------------------------------------------

class EntropyCheck : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<float> w = testing::gaussian(kRows * kCols, 61, 0.02f);
    w[3 * kCols + 4] = 1e4f;  // an escape
    auto e = encode(w, kRows, kCols, entropy_scheme(4.5));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    enc_ = std::move(e).value();
    ASSERT_GE(enc_.entropy->escape_symbol, 0);
    ASSERT_GE(enc_.entropy->chunk_offsets.size(), 3u) << "at least two chunks";
    ASSERT_OK(check_encoded(enc_.scheme, kRows, kCols, enc_.view()));
  }

  // check_encoded and decode_tensor on a copy changed by `mutate`: both FormatError.
  template <typename F>
  void expect_rejected(F mutate, const std::string& what) {
    EncodedTensor e = enc_;
    mutate(e);
    const Status st = check_encoded(e.scheme, kRows, kCols, e.view());
    EXPECT_EQ(st.code(), StatusCode::kFormatError) << what << ": " << st.ToString();
    std::vector<float> out(kRows * kCols);
    const Status dt = decode_tensor(e.scheme, kRows, kCols, e.view(), out.data());
    EXPECT_EQ(dt.code(), StatusCode::kFormatError) << what << ": " << dt.ToString();
  }

  static constexpr size_t kRows = 700, kCols = 160;  // chunks of 408 rows: two
  EncodedTensor enc_;
};

TEST_F(EntropyCheck, rejects_chunk_offsets_that_do_not_cover_the_codes) {
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_offsets.back() -= 1; }, "end short of the codes");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_offsets.back() += 1; }, "end past the codes");
  expect_rejected([](EncodedTensor& e) { e.codes.push_back(0); }, "codes longer than the offsets say");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_offsets.front() = 1; }, "first offset not 0");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_offsets.pop_back(); }, "one offset too few");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_offsets.push_back(static_cast<uint32_t>(e.codes.size())); },
                  "one offset too many");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_offsets[1] = static_cast<uint32_t>(e.codes.size()) + 8; },
                  "an offset past the end (offsets decrease)");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_rows = 0; }, "chunk_rows 0");
  expect_rejected([](EncodedTensor& e) { e.entropy->chunk_rows /= 2; }, "chunk_rows that disagree with the offsets");
}

TEST_F(EntropyCheck, rejects_a_wrong_number_of_centroids) {
  expect_rejected([](EncodedTensor& e) { e.entropy->centroids.pop_back(); }, "7 centroids");
  expect_rejected([](EncodedTensor& e) { e.entropy->centroids.push_back(0.0f); }, "9 centroids");
  expect_rejected([](EncodedTensor& e) { e.entropy->centroids.clear(); }, "no centroids");
}

TEST_F(EntropyCheck, rejects_an_escape_symbol_that_is_not_the_last) {
  expect_rejected([](EncodedTensor& e) { e.entropy->escape_symbol = 0; }, "escape symbol 0");
  expect_rejected([](EncodedTensor& e) { e.entropy->escape_symbol -= 1; }, "escape symbol second to last");
  expect_rejected([](EncodedTensor& e) { e.entropy->escape_symbol = static_cast<int32_t>(e.entropy->frequencies.size()); },
                  "escape symbol past the table");
}

TEST_F(EntropyCheck, rejects_an_escape_symbol_that_is_neither_last_nor_minus_one) {
  // docs/format.md: "escape_symbol (the last index, or -1 when absent)"
  expect_rejected([](EncodedTensor& e) { e.entropy->escape_symbol = -2; }, "escape symbol -2");
}

TEST_F(EntropyCheck, rejects_symbols_outside_the_code_range) {
  expect_rejected([](EncodedTensor& e) { e.entropy->symbol_min = -2048; }, "symbol_min -2048");
  expect_rejected(
      [](EncodedTensor& e) {
        // the last direct symbol at 2048
        const int32_t direct = static_cast<int32_t>(e.entropy->frequencies.size()) - 1;
        e.entropy->symbol_min = 2048 - direct + 1;
      },
      "largest symbol 2048");
  expect_rejected([](EncodedTensor& e) { e.entropy->symbol_min = INT32_MIN; }, "symbol_min INT32_MIN");
  expect_rejected([](EncodedTensor& e) { e.entropy->symbol_min = INT32_MAX; }, "symbol_min INT32_MAX");
}

TEST_F(EntropyCheck, rejects_frequency_tables_that_are_empty_too_large_or_do_not_sum_to_2_15) {
  expect_rejected([](EncodedTensor& e) { e.entropy->frequencies.clear(); e.entropy->escape_symbol = -1; },
                  "no frequencies");
  expect_rejected(
      [](EncodedTensor& e) {
        e.entropy->frequencies.assign(kMaxAlphabet + 1, 0);
        e.entropy->frequencies[0] = 32768;
        e.entropy->escape_symbol = static_cast<int32_t>(kMaxAlphabet);
        e.entropy->symbol_min = -2047;
      },
      "4097 symbols");
  EncodedTensor e = enc_;
  e.entropy->frequencies[0] += 1;
  std::vector<float> out(kRows * kCols);
  EXPECT_EQ(decode_tensor(e.scheme, kRows, kCols, e.view(), out.data()).code(), StatusCode::kFormatError)
      << "frequencies summing to 2^15 + 1";
}

TEST_F(EntropyCheck, rejects_steps_and_zero_points_of_the_wrong_size) {
  expect_rejected([](EncodedTensor& e) { e.scales.resize(e.scales.size() - 4); }, "one step short");
  expect_rejected([](EncodedTensor& e) { e.scales.resize(e.scales.size() / 2); }, "float16 steps");
  expect_rejected([](EncodedTensor& e) { e.zero_points.assign(kRows * 4, 0); }, "zero points");
  expect_rejected([](EncodedTensor& e) { e.entropy.reset(); }, "no entropy side");
}

TEST_F(EntropyCheck, damaged_chunks_are_format_errors_never_crashes) {
  const EntropySide& side = *enc_.entropy;
  // truncating a chunk (the offsets still consistent)
  for (uint32_t cut : {1u, 2u, 3u, 16u}) {
    EncodedTensor e = enc_;
    const uint32_t end0 = e.entropy->chunk_offsets[1];
    e.codes.erase(e.codes.begin() + end0 - cut, e.codes.begin() + end0);
    for (size_t i = 1; i < e.entropy->chunk_offsets.size(); ++i) e.entropy->chunk_offsets[i] -= cut;
    ASSERT_OK(check_encoded(e.scheme, kRows, kCols, e.view()));
    std::vector<float> out(kRows * kCols);
    EXPECT_EQ(decode_tensor(e.scheme, kRows, kCols, e.view(), out.data()).code(), StatusCode::kFormatError)
        << "chunk 0 shortened by " << cut;
  }
  // an escape count that does not match the escape symbols (the rANS stream left intact)
  auto with_escapes = [&](const std::vector<int32_t>& escapes) {
    EncodedTensor e = enc_;
    const uint8_t* c0 = enc_.codes.data();
    uint32_t count;
    std::memcpy(&count, c0, 4);
    std::vector<uint8_t> chunk;
    testing::append_le(chunk, static_cast<uint32_t>(escapes.size()));
    for (int32_t q : escapes) testing::append_le(chunk, q);
    chunk.insert(chunk.end(), c0 + 4 + 4 * static_cast<size_t>(count), c0 + side.chunk_offsets[1]);
    e.codes.erase(e.codes.begin(), e.codes.begin() + side.chunk_offsets[1]);
    e.codes.insert(e.codes.begin(), chunk.begin(), chunk.end());
    const int64_t shift = static_cast<int64_t>(chunk.size()) - static_cast<int64_t>(side.chunk_offsets[1]);
    for (size_t i = 1; i < e.entropy->chunk_offsets.size(); ++i)
      e.entropy->chunk_offsets[i] = static_cast<uint32_t>(e.entropy->chunk_offsets[i] + shift);
    return e;
  };
  {
    uint32_t count;
    std::memcpy(&count, enc_.codes.data(), 4);
    ASSERT_EQ(count, 1u) << "chunk 0 holds the planted outlier's escape";
    int32_t q;
    std::memcpy(&q, enc_.codes.data() + 4, 4);
    EncodedTensor same = with_escapes({q});
    EXPECT_TRUE(same.codes == enc_.codes) << "the rebuilt chunk is the original";
    for (const std::vector<int32_t>& escapes : {std::vector<int32_t>{}, std::vector<int32_t>{q, q},
                                                std::vector<int32_t>{q, -5000, 7000}}) {
      EncodedTensor e = with_escapes(escapes);
      ASSERT_OK(check_encoded(e.scheme, kRows, kCols, e.view()));
      std::vector<float> out(kRows * kCols);
      const Status st = decode_tensor(e.scheme, kRows, kCols, e.view(), out.data());
      EXPECT_EQ(st.code(), StatusCode::kFormatError) << escapes.size() << " escaped codes for one escape symbol: "
                                                     << st.ToString();
    }
  }
  // an escape count past the chunk, or past every weight of it
  for (uint32_t count : {(side.chunk_offsets[1] - 4) / 4 + 1, 0x40000000u, 0xFFFFFFFFu}) {
    EncodedTensor e = enc_;
    std::memcpy(e.codes.data() + side.chunk_offsets[0], &count, 4);
    std::vector<float> out(kRows * kCols);
    const Status st = decode_tensor(e.scheme, kRows, kCols, e.view(), out.data());
    EXPECT_EQ(st.code(), StatusCode::kFormatError) << "escape count " << count << ": " << st.ToString();
  }
  // a chunk of fewer than four bytes
  {
    EncodedTensor e = enc_;
    e.entropy->chunk_offsets[1] = 2;
    std::vector<float> out(kRows * kCols);
    EXPECT_EQ(decode_tensor(e.scheme, kRows, kCols, e.view(), out.data()).code(), StatusCode::kFormatError);
  }
  // random damage anywhere: OK or FormatError, nothing else (AddressSanitizer watches the reads)
  std::mt19937 rng(3);
  for (int trial = 0; trial < 60; ++trial) {
    EncodedTensor e = enc_;
    for (int f = 0; f < 1 + trial % 5; ++f) e.codes[rng() % e.codes.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    std::vector<float> out(kRows * kCols);
    const Status st = decode_tensor(e.scheme, kRows, kCols, e.view(), out.data());
    EXPECT_TRUE(st.ok() || st.code() == StatusCode::kFormatError) << st.ToString();
  }
}

// ---- the scheme's configuration --------------------------------------------------------------

TEST(EntropyScheme, validate_scheme_accepts_budgets_1_to_12_only) {
  QuantScheme s = entropy_scheme(4.5);
  EXPECT_TRUE(validate_scheme(s).ok());
  for (double bad : {0.5, 0.999, 12.01, 100.0, -1.0, std::nan("")}) {
    s.target_bpw = bad;
    EXPECT_EQ(validate_scheme(s).code(), StatusCode::kInvalidConfig) << bad;
  }
  for (double good : {1.0, 2.0, 12.0}) {
    s.target_bpw = good;
    EXPECT_TRUE(validate_scheme(s).ok()) << good;
  }
  s.target_bpw = 0;  // bits + 0.5
  for (int bits : {0, 13}) {
    s.bits = bits;
    EXPECT_EQ(validate_scheme(s).code(), StatusCode::kInvalidConfig) << bits;
  }
  EXPECT_EQ(scheme_name(entropy_scheme(4.5)), "entropy_4.50");
  EXPECT_EQ(scheme_name(entropy_scheme(2.25, true)), "entropy_2.25_rot");
}

}  // namespace
}  // namespace aq
