// ggml's block types: packing, the two decoders, and the encoder's promises (never worse than
// the llama.cpp-equivalent start nor than all zeros on any block, finite output at any
// magnitude, the same bytes for any thread count).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/tensor_job.h"
#include "quant/ggml_codec.h"
#include "quant/gptq.h"

namespace aq {
namespace {

class GgmlTypes : public ::testing::TestWithParam<GgmlType> {};

std::string type_name(const ::testing::TestParamInfo<GgmlType>& info) { return ggml_traits(info.param).name; }

// A random block whose every field is in the type's range.
GgmlBlock random_block(GgmlType t, std::mt19937& g) {
  const GgmlTraits& tr = ggml_traits(t);
  GgmlBlock b;
  std::uniform_real_distribution<float> scale(1e-4f, 2.0f);
  b.d = f32_to_f16(scale(g));
  b.dmin = tr.has_min ? f32_to_f16(scale(g)) : 0;
  const int nsub = tr.block / tr.sub;
  for (int j = 0; j < (tr.sc_lo == tr.sc_hi ? 0 : nsub); ++j) {
    b.sc[j] = static_cast<int16_t>(std::uniform_int_distribution<int>(tr.sc_lo, tr.sc_hi)(g));
    if (tr.has_min) b.m[j] = static_cast<int16_t>(std::uniform_int_distribution<int>(0, tr.sc_hi)(g));
  }
  if (tr.sc_lo == tr.sc_hi) b.sc[0] = 1;
  for (int p = 0; p < tr.block; ++p) b.k[p] = static_cast<uint8_t>(std::uniform_int_distribution<int>(0, tr.levels - 1)(g));
  return b;
}

// `blocks` random blocks of type t, packed back to back.
std::vector<uint8_t> random_blocks(GgmlType t, int blocks, uint32_t seed) {
  const GgmlTraits& tr = ggml_traits(t);
  std::mt19937 g(seed);
  std::vector<uint8_t> bytes(static_cast<size_t>(blocks * tr.bytes));
  for (int i = 0; i < blocks; ++i) ggml_pack_block(t, random_block(t, g), bytes.data() + i * tr.bytes);
  return bytes;
}

std::vector<float> gaussian(size_t n, float sigma, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> x(n);
  for (auto& v : x) v = nd(g);
  return x;
}

TEST_P(GgmlTypes, packing_round_trips_every_field) {
  const GgmlType t = GetParam();
  const GgmlTraits& tr = ggml_traits(t);
  std::mt19937 g(1);
  for (int i = 0; i < 200; ++i) {
    const GgmlBlock b = random_block(t, g);
    std::vector<uint8_t> bytes(static_cast<size_t>(tr.bytes));
    ggml_pack_block(t, b, bytes.data());
    GgmlBlock back;
    ggml_unpack_block(t, bytes.data(), &back);
    ASSERT_EQ(back.d, b.d);
    ASSERT_EQ(back.dmin, b.dmin);
    ASSERT_EQ(0, std::memcmp(back.sc, b.sc, sizeof(b.sc)));
    ASSERT_EQ(0, std::memcmp(back.m, b.m, sizeof(b.m)));
    ASSERT_EQ(0, std::memcmp(back.k, b.k, static_cast<size_t>(tr.block)));
  }
}

TEST_P(GgmlTypes, fast_decoder_equals_the_reference_bit_for_bit) {
  const GgmlType t = GetParam();
  const GgmlTraits& tr = ggml_traits(t);
  const int blocks = 37;
  const std::vector<uint8_t> bytes = random_blocks(t, blocks, 2);
  std::vector<float> fast(static_cast<size_t>(blocks * tr.block)), ref(fast.size());
  ggml_decode(t, bytes.data(), blocks, fast.data());
  ggml_decode_reference(t, bytes.data(), blocks, ref.data());
  ASSERT_EQ(0, std::memcmp(fast.data(), ref.data(), fast.size() * sizeof(float)));
}

TEST_P(GgmlTypes, bfloat16_decoder_equals_the_float_decoder_rounded) {
  // the runtime's direct path (where the CPU and type have one) against decode-then-round
  const GgmlType t = GetParam();
  const GgmlTraits& tr = ggml_traits(t);
  const int blocks = 41;
  const std::vector<uint8_t> bytes = random_blocks(t, blocks, 5);
  std::vector<float> ref(static_cast<size_t>(blocks * tr.block));
  ggml_decode_reference(t, bytes.data(), blocks, ref.data());
  std::vector<uint16_t> out(ref.size(), 0xffff);
  if (!ggml_decode_bf16(t, bytes.data(), blocks, out.data())) {
    EXPECT_EQ(out[0], 0xffff);  // nothing written
    GTEST_SKIP() << "no direct bfloat16 path for " << tr.name << " on this CPU";
  }
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(out[i], f32_to_bf16(ref[i])) << i;
}

TEST_P(GgmlTypes, the_search_is_never_worse_than_the_llama_start_nor_all_zeros_on_any_block) {
  const GgmlType t = GetParam();
  const int n = ggml_traits(t).block;
  std::mt19937 g(3);
  std::student_t_distribution<float> heavy(3.0f);
  std::vector<float> imp(static_cast<size_t>(n));
  std::lognormal_distribution<float> ln(0.0f, 1.5f);
  for (auto& v : imp) v = ln(g);
  for (int trial = 0; trial < 120; ++trial) {
    std::vector<float> x = gaussian(static_cast<size_t>(n), 0.02f, 100 + static_cast<uint32_t>(trial));
    if (trial % 3 == 1)
      for (auto& v : x) v = 0.02f * heavy(g);
    if (trial % 3 == 2) x[static_cast<size_t>(trial) % x.size()] *= 30.0f;  // an outlier
    const float* w = trial % 2 ? imp.data() : nullptr;
    GgmlBlock start, best;
    ggml_start_llama(t, x.data(), w, &start);
    ggml_encode_block(t, x.data(), w, GgmlEncodeOptions{}, &best);
    const double e_best = ggml_block_error(t, best, x.data(), w);
    EXPECT_LE(e_best, ggml_block_error(t, start, x.data(), w)) << "trial " << trial;
    double zeros = 0;
    for (int i = 0; i < n; ++i) zeros += (w ? w[i] : 1.0) * static_cast<double>(x[i]) * x[i];
    EXPECT_LE(e_best, zeros) << "trial " << trial;
  }
}

TEST_P(GgmlTypes, the_search_lowers_the_error_of_the_llama_start_on_gaussian_rows) {
  const GgmlType t = GetParam();
  const uint64_t cols = 4096, rows = 16;
  const std::vector<float> x = gaussian(rows * cols, 0.02f, 7);
  std::vector<uint8_t> ours(rows * ggml_row_bytes(t, cols));
  double e_ours = 0, e_start = 0;
  const int n = ggml_traits(t).block;
  for (uint64_t r = 0; r < rows; ++r)
    for (uint64_t c = 0; c < cols; c += static_cast<uint64_t>(n)) {
      GgmlBlock start, best;
      ggml_start_llama(t, x.data() + r * cols + c, nullptr, &start);
      ggml_encode_block(t, x.data() + r * cols + c, nullptr, GgmlEncodeOptions{}, &best);
      e_start += ggml_block_error(t, start, x.data() + r * cols + c, nullptr);
      e_ours += ggml_block_error(t, best, x.data() + r * cols + c, nullptr);
    }
  // at least 1% less squared error (the measured gain is 3-25% by type)
  EXPECT_LT(e_ours, 0.99 * e_start);
}

TEST_P(GgmlTypes, encoded_rows_decode_to_what_the_integer_model_says) {
  const GgmlType t = GetParam();
  const GgmlTraits& tr = ggml_traits(t);
  const uint64_t cols = 512;
  const std::vector<float> x = gaussian(cols, 0.05f, 9);
  std::vector<uint8_t> bytes(ggml_row_bytes(t, cols));
  ggml_encode_row(t, x.data(), cols, bytes.data());
  std::vector<float> y(cols);
  ggml_decode(t, bytes.data(), cols / static_cast<uint64_t>(tr.block), y.data());
  for (uint64_t c = 0; c < cols; c += static_cast<uint64_t>(tr.block)) {
    GgmlBlock b;
    ggml_unpack_block(t, bytes.data() + c / static_cast<uint64_t>(tr.block) * static_cast<uint64_t>(tr.bytes), &b);
    for (int p = 0; p < tr.block; ++p) ASSERT_EQ(y[c + static_cast<uint64_t>(p)], ggml_block_value(t, b, p));
  }
}

TEST_P(GgmlTypes, any_magnitude_decodes_finite_and_zeros_stay_zero) {
  const GgmlType t = GetParam();
  const uint64_t cols = 256;
  for (float sigma : {0.0f, 1e-9f, 1e-5f, 1.0f, 1e3f, 1e5f, 3e6f}) {
    const std::vector<float> x = gaussian(cols, sigma, 11);
    std::vector<uint8_t> bytes(ggml_row_bytes(t, cols));
    ggml_encode_row(t, x.data(), cols, bytes.data());
    std::vector<float> y(cols);
    ggml_decode(t, bytes.data(), cols / static_cast<uint64_t>(ggml_traits(t).block), y.data());
    double e = 0, s = 0;
    for (uint64_t i = 0; i < cols; ++i) {
      ASSERT_TRUE(std::isfinite(y[i])) << "sigma " << sigma << " weight " << i;
      e += (static_cast<double>(x[i]) - y[i]) * (static_cast<double>(x[i]) - y[i]);
      s += static_cast<double>(x[i]) * x[i];
    }
    if (sigma == 0.0f) EXPECT_EQ(e, 0.0);
    else EXPECT_LE(e, s) << "sigma " << sigma;  // never worse than storing zeros
  }
}

TEST_P(GgmlTypes, a_constant_block_decodes_to_its_value) {
  const GgmlType t = GetParam();
  const int n = ggml_traits(t).block;
  for (float v : {0.5f, -1.25f, 3.0f}) {
    std::vector<float> x(static_cast<size_t>(n), v);
    std::vector<uint8_t> bytes(ggml_row_bytes(t, static_cast<uint64_t>(n)));
    ggml_encode_row(t, x.data(), static_cast<uint64_t>(n), bytes.data());
    std::vector<float> y(static_cast<size_t>(n));
    ggml_decode(t, bytes.data(), 1, y.data());
    for (float yi : y) EXPECT_NEAR(yi, v, 1e-3 * std::fabs(v)) << ggml_traits(t).name << " " << v;
  }
}

TEST_P(GgmlTypes, tensors_encode_to_the_same_bytes_for_any_thread_count) {
  const GgmlType t = GetParam();
  const uint64_t rows = 40, cols = 768;
  const std::vector<float> x = gaussian(rows * cols, 0.02f, 13);
  RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(x.data());
  src.dtype = DType::kF32;
  src.rows = rows;
  src.cols = cols;
  src.name = "w";
  auto one = encode_tensor(src, ggml_scheme(t), nullptr);
  ThreadPool pool(3);
  auto three = encode_tensor(src, ggml_scheme(t), &pool);
  ASSERT_TRUE(one.ok() && three.ok());
  EXPECT_EQ(one->codes, three->codes);
  EXPECT_EQ(one->codes.size(), rows * ggml_row_bytes(t, cols));
  EXPECT_EQ(one->stats.sum_ee, three->stats.sum_ee);
}

TEST_P(GgmlTypes, gptq_on_the_grid_lowers_the_output_error_of_a_calibrated_layer) {
  const GgmlType t = GetParam();
  const uint64_t rows = 16, cols = 512, n = 2048;
  // inputs with correlated, unevenly scaled features: H = X^T X
  std::mt19937 g(21);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> mix(8 * cols), scale(cols);
  for (auto& v : mix) v = nd(g);
  for (auto& v : scale) v = std::exp(nd(g));
  std::vector<double> h(cols * cols, 0.0);
  std::vector<double> xrow(cols);
  for (uint64_t s = 0; s < n; ++s) {
    double z[8];
    for (double& v : z) v = nd(g);
    for (uint64_t j = 0; j < cols; ++j) {
      double v = 0.3 * nd(g);
      for (int k = 0; k < 8; ++k) v += z[k] * mix[static_cast<size_t>(k) * cols + j];
      xrow[j] = v * scale[j];
    }
    for (uint64_t i = 0; i < cols; ++i)
      for (uint64_t j = 0; j < cols; ++j) h[i * cols + j] += xrow[i] * xrow[j];
  }
  const std::vector<float> w = gaussian(rows * cols, 0.02f, 23);
  GptqOptions go;
  go.act_order = false;
  auto f = gptq_factor(h.data(), cols, go);
  ASSERT_TRUE(f.ok()) << f.status().message();
  std::vector<float> imp(cols);
  for (uint64_t j = 0; j < cols; ++j) imp[j] = static_cast<float>(h[j * cols + j] / n);
  GgmlEncodeOptions opt;
  opt.importance = imp.data();
  const uint64_t rb = ggml_row_bytes(t, cols);
  std::vector<uint8_t> a(rows * rb), b(rows * rb);
  for (uint64_t r = 0; r < rows; ++r) ggml_encode_row(t, w.data() + r * cols, cols, a.data() + r * rb, opt);
  ggml_gptq_rows(t, *f, w.data(), rows, cols, opt, b.data());
  std::vector<float> qa(rows * cols), qb(rows * cols);
  ggml_decode(t, a.data(), rows * cols / static_cast<uint64_t>(ggml_traits(t).block), qa.data());
  ggml_decode(t, b.data(), rows * cols / static_cast<uint64_t>(ggml_traits(t).block), qb.data());
  const double ea = output_error(w.data(), qa.data(), rows, cols, h.data()).rel_error;
  const double eb = output_error(w.data(), qb.data(), rows, cols, h.data()).rel_error;
  EXPECT_LT(eb, 0.9 * ea) << "importance only " << ea << ", GPTQ on the grid " << eb;
}

// GPTQ on the grid with a block-diagonal Hessian: the same bytes as with the full matrix whose
// off-block entries are zero (errors stay in their block either way).
TEST(Ggml, gptq_on_a_block_diagonal_hessian_equals_the_zeroed_full_matrix) {
  const GgmlType t = GgmlType::kQ4_K;
  const uint64_t rows = 8, cols = 1280, block = 512, n = 400;  // blocks of 512, 512, 256
  std::mt19937 g(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> x(n * cols);
  for (uint64_t s = 0; s < n; ++s) {
    const double z = nd(g);
    for (uint64_t j = 0; j < cols; ++j) x[s * cols + j] = (z + 0.5 * nd(g)) * (1.0 + static_cast<double>(j % 7));
  }
  const HessianLayout lay{cols, block};
  std::vector<double> blocks(lay.values(), 0.0), masked(cols * cols, 0.0);
  for (size_t b = 0; b < lay.blocks(); ++b) {
    const size_t first = lay.begin(b), nb = lay.size(b);
    for (size_t i = 0; i < nb; ++i)
      for (size_t j = 0; j < nb; ++j) {
        double v = 0;
        for (uint64_t s = 0; s < n; ++s) v += x[s * cols + first + i] * x[s * cols + first + j];
        blocks[lay.offset(b) + i * nb + j] = v;
        masked[(first + i) * cols + first + j] = v;
      }
  }
  const std::vector<float> w = gaussian(rows * cols, 0.02f, 29);
  GptqOptions go;
  go.act_order = false;
  auto fb = gptq_factor(blocks.data(), lay, go);
  auto ff = gptq_factor(masked.data(), cols, go);
  ASSERT_TRUE(fb.ok() && ff.ok());
  GgmlEncodeOptions opt;
  const uint64_t rb = ggml_row_bytes(t, cols);
  std::vector<uint8_t> a(rows * rb), b(rows * rb);
  ggml_gptq_rows(t, *fb, w.data(), rows, cols, opt, a.data());
  ggml_gptq_rows(t, *ff, w.data(), rows, cols, opt, b.data());
  std::vector<float> qa(rows * cols), qb(rows * cols);
  ggml_decode(t, a.data(), rows * cols / 256, qa.data());
  ggml_decode(t, b.data(), rows * cols / 256, qb.data());
  const double ea = output_error(w.data(), qa.data(), rows, blocks.data(), lay).rel_error;
  const double eb = output_error(w.data(), qb.data(), rows, cols, masked.data()).rel_error;
  EXPECT_NEAR(ea, eb, 0.01 * eb);
  size_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  EXPECT_GE(static_cast<double>(same) / static_cast<double>(a.size()), 0.98);
}

TEST(Ggml, a_row_length_the_type_cannot_take_is_an_error_naming_the_tensor) {
  std::vector<float> x(8 * 288, 0.1f);
  RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(x.data());
  src.rows = 8;
  src.cols = 288;
  src.name = "blocks.3.ff.weight";
  auto r = encode_tensor(src, ggml_scheme(GgmlType::kQ4_K), nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("blocks.3.ff.weight"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("multiple of 256"), std::string::npos) << r.status().message();
}

TEST(Ggml, type_names_parse_in_any_case) {
  EXPECT_EQ(parse_ggml_type("Q4_K"), GgmlType::kQ4_K);
  EXPECT_EQ(parse_ggml_type("iq4_XS"), GgmlType::kIQ4_XS);
  EXPECT_FALSE(parse_ggml_type("q4_0").has_value());
  EXPECT_DOUBLE_EQ(ggml_bits_per_weight(GgmlType::kQ3_K), 3.4375);
  EXPECT_EQ(ggml_row_bytes(GgmlType::kQ8_0, 64), 68u);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, GgmlTypes, ::testing::ValuesIn(kGgmlTypes), type_name);

}  // namespace
}  // namespace aq
