// Whole-tensor encode (engine/tensor_job.h encode_tensor) and decode (quant/tensor_codec.h):
// the stored bytes follow the layout of quant/scheme.h and quant/pack.h, decoding applies the
// formula of quant/group_quant.h, and the recorded error figures are those of the decoded tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/tensor_job.h"
#include "quant/decode_into.h"
#include "quant/ggml_types.h"
#include "quant/pack.h"
#include "quant/tensor_codec.h"
#include "test_util.h"

namespace aq {
namespace {

struct Matrix {
  std::vector<float> w;
  size_t rows, cols;
};

RowSource f32_source(const std::vector<uint8_t>& bytes, size_t rows, size_t cols, DType dt = DType::kF32) {
  RowSource s;
  s.data = bytes.data();
  s.dtype = dt;
  s.rows = rows;
  s.cols = cols;
  s.name = "t";
  return s;
}

Result<EncodedTensor> encode(const Matrix& m, const QuantScheme& scheme, ThreadPool* pool = nullptr) {
  const std::vector<uint8_t> bytes = testing::f32_bytes(m.w);
  return encode_tensor(f32_source(bytes, m.rows, m.cols), scheme, pool);
}

std::vector<float> decode(const EncodedTensor& e) {
  std::vector<float> out(e.rows * e.cols, -12345.0f);
  const Status st = decode_tensor(e.scheme, e.rows, e.cols, e.view(), out.data());
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
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

// Checks an encoded tensor against the specification of the stored form and returns the decode.
std::vector<float> check_encoding(const EncodedTensor& e, const std::vector<float>& w, const std::string& what) {
  const QuantScheme& s = e.scheme;
  const QuantizedSize size = quantized_size(s, e.rows, e.cols);
  EXPECT_EQ(e.codes.size(), size.code_bytes) << what;
  EXPECT_EQ(e.codes.size(), (e.rows * e.cols * static_cast<uint64_t>(s.bits) + 7) / 8) << what;
  const size_t gpr = groups_per_row(s, e.cols);
  const size_t g = s.group_size == 0 ? e.cols : static_cast<size_t>(s.group_size);
  EXPECT_EQ(gpr, (e.cols + g - 1) / g) << what;
  EXPECT_EQ(e.scales.size(), e.rows * gpr * scale_type_size(s.scale_type)) << what;
  EXPECT_EQ(e.zero_points.size(), s.symmetric ? 0u : e.scales.size()) << what;

  std::vector<uint8_t> codes(e.rows * e.cols);
  unpack_codes_reference(e.codes.data(), 0, codes.size(), s.bits, codes.data());
  std::vector<float> scales(e.rows * gpr), zeros(e.rows * gpr, 0.0f);
  load_scales(s.scale_type, e.scales.data(), scales.size(), scales.data());
  if (!s.symmetric) load_scales(s.scale_type, e.zero_points.data(), zeros.size(), zeros.data());

  const std::vector<float> d = decode(e);
  const int half = 1 << (s.bits - 1);
  size_t bad_codes = 0, bad_values = 0;
  for (size_t r = 0; r < e.rows; ++r)
    for (size_t c = 0; c < e.cols; ++c) {
      const size_t i = r * e.cols + c, p = r * gpr + c / g;
      if (codes[i] >= (1u << s.bits)) ++bad_codes;
      const float want = s.symmetric ? scales[p] * static_cast<float>(static_cast<int>(codes[i]) - half)
                                     : scales[p] * static_cast<float>(codes[i]) + zeros[p];
      if (!(d[i] == want)) ++bad_values;
    }
  EXPECT_EQ(bad_codes, 0u) << what << ": codes >= 2^bits";
  EXPECT_EQ(bad_values, 0u) << what << ": decode differs from s*c+z / s*(c-2^(bits-1))";

  const ErrorStats want = blockwise_stats(w, d, e.rows, e.cols);
  EXPECT_EQ(e.stats.count, want.count) << what;
  EXPECT_EQ(e.stats.sum_ww, want.sum_ww) << what;
  EXPECT_EQ(e.stats.sum_dd, want.sum_dd) << what;
  EXPECT_EQ(e.stats.sum_wd, want.sum_wd) << what;
  EXPECT_EQ(e.stats.sum_ee, want.sum_ee) << what;
  EXPECT_EQ(e.stats.max_abs_err, want.max_abs_err) << what;
  return d;
}

// Loose quality floors: a broken quantizer (wrong group, wrong scale) lands far below these.
double max_relative_error(int bits) {
  switch (bits) {
    case 2: return 0.65;
    case 3: return 0.3;
    case 4: return 0.15;
    default: return 0.01;
  }
}

TEST(TensorCodec, round_trips_every_scheme_and_ragged_shape) {
  const std::vector<std::pair<size_t, size_t>> shapes = {{13, 200}, {9, 100}, {11, 7}, {8, 256}, {5, 300}, {6, 129}};
  uint32_t seed = 1;
  for (const auto& [rows, cols] : shapes) {
    const Matrix m{testing::gaussian(rows * cols, seed++, 0.05f), rows, cols};
    for (int bits : {2, 3, 4, 8})
      for (int gs : {0, 32, 64, 128, 256})
        for (bool sym : {false, true}) {
          QuantScheme s;
          s.bits = bits;
          s.group_size = gs;
          s.symmetric = sym;
          const std::string what = scheme_name(s) + " " + std::to_string(rows) + "x" + std::to_string(cols);
          ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(m, s));
          EXPECT_EQ(e.scheme.bits, bits);
          EXPECT_EQ(e.scheme.group_size, gs);
          EXPECT_EQ(e.scheme.symmetric, sym);
          EXPECT_EQ(e.scheme.scale_type, ScaleType::kF16) << what << ": weights of 0.05 fit float16 scales";
          EXPECT_EQ(e.rows, rows);
          EXPECT_EQ(e.cols, cols);
          check_encoding(e, m.w, what);
          EXPECT_LT(e.stats.relative_error(), max_relative_error(bits)) << what;
        }
  }
}

TEST(TensorCodec, round_trips_tensors_spanning_several_row_blocks) {
  // 4000 columns: 16 rows per block, so 21 rows are blocks of 16 and 5.
  const size_t rows = 21, cols = 4000;
  ASSERT_EQ(rows_per_block(cols), 16u);
  const Matrix m{testing::student_t4(rows * cols, 5, 0.01f), rows, cols};
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {false, true}) {
      QuantScheme s;
      s.bits = bits;
      s.group_size = 128;
      s.symmetric = sym;
      ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(m, s));
      check_encoding(e, m.w, scheme_name(s));
    }
}

TEST(TensorCodec, rows_per_block_is_a_multiple_of_eight_near_64k_weights) {
  for (uint64_t cols : {1u, 7u, 100u, 200u, 4096u, 8193u, 100000u}) {
    const uint64_t r = rows_per_block(cols);
    EXPECT_EQ(r % 8, 0u) << cols;
    EXPECT_GE(r, 8u) << cols;
    if (r > 8) {
      EXPECT_LE(r * cols, 65536u) << cols;
    }
  }
}

TEST(TensorCodec, encodes_f16_and_bf16_sources_against_their_float_values) {
  const size_t rows = 12, cols = 96;
  const std::vector<float> w = testing::gaussian(rows * cols, 9, 0.05f);
  QuantScheme s;
  s.group_size = 32;
  for (DType dt : {DType::kF16, DType::kBF16}) {
    const auto bytes = dt == DType::kF16 ? testing::f16_bytes(w) : testing::bf16_bytes(w);
    const auto values = dt == DType::kF16 ? testing::as_f16(w) : testing::as_bf16(w);
    ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode_tensor(f32_source(bytes, rows, cols, dt), s, nullptr));
    ASSERT_OK_AND_ASSIGN(EncodedTensor ref, encode(Matrix{values, rows, cols}, s));
    check_encoding(e, values, std::string(dtype_name(dt)));
    EXPECT_EQ(e.codes, ref.codes) << dtype_name(dt);
    EXPECT_EQ(e.scales, ref.scales) << dtype_name(dt);
  }
}

TEST(TensorCodec, all_zero_rows_and_groups_decode_to_exact_zeros) {
  const size_t rows = 10, cols = 200;
  std::vector<float> w = testing::gaussian(rows * cols, 3);
  for (size_t c = 0; c < cols; ++c) w[3 * cols + c] = 0.0f;  // a zero row
  for (size_t c = 64; c < 128; ++c) w[c] = 0.0f;             // a zero group (of 32 and of 64)
  for (int bits : {2, 3, 4, 8})
    for (int gs : {0, 32, 64})
      for (bool sym : {false, true}) {
        QuantScheme s;
        s.bits = bits;
        s.group_size = gs;
        s.symmetric = sym;
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(Matrix{w, rows, cols}, s));
        const std::vector<float> d = check_encoding(e, w, scheme_name(s));
        for (size_t c = 0; c < cols; ++c) ASSERT_EQ(d[3 * cols + c], 0.0f) << scheme_name(s) << " col " << c;
        if (gs != 0) {
          for (size_t c = 64; c < 128; ++c) ASSERT_EQ(d[c], 0.0f) << scheme_name(s) << " col " << c;
        }
      }
}

TEST(TensorCodec, constant_groups_reconstruct_within_half_a_float16_ulp_at_any_magnitude) {
  // Each row is one constant; per-channel groups make every group constant.
  const std::vector<float> values = {0.3f, -1.7f, 1000.0f, -0.015625f, 3.0e-3f, 1.0e5f, -2.5e6f, 1.0e-5f, -3.0e-7f};
  const size_t cols = 40;
  std::vector<float> w;
  for (float v : values) w.insert(w.end(), cols, v);
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {false, true})
      for (ScaleMethod method : {ScaleMethod::kSearch, ScaleMethod::kMinMax}) {
        QuantScheme s;
        s.bits = bits;
        s.group_size = 0;
        s.symmetric = sym;
        s.method = method;
        const std::string what = scheme_name(s) + " " + scale_method_name(method);
        ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(Matrix{w, values.size(), cols}, s));
        const std::vector<float> d = check_encoding(e, w, what);
        for (size_t r = 0; r < values.size(); ++r) {
          const float v = values[r];
          const double bound = std::fabs(static_cast<double>(v)) * (std::ldexp(1.0, -11) + std::ldexp(1.0, -20));
          for (size_t c = 0; c < cols; ++c)
            ASSERT_LE(std::fabs(static_cast<double>(d[r * cols + c]) - v), bound) << what << " value " << v;
        }
      }
}

TEST(TensorCodec, tiny_weights_get_float32_scales_and_still_reconstruct_well) {
  const size_t rows = 16, cols = 256;
  const std::vector<float> normal = testing::gaussian(rows * cols, 21, 1.0f);
  for (float magnitude : {1e-7f, 1e-9f, 1e6f}) {
    std::vector<float> w = normal;
    for (float& x : w) x *= magnitude;
    for (bool sym : {false, true}) {
      QuantScheme s;
      s.bits = 4;
      s.group_size = 64;
      s.symmetric = sym;
      ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(Matrix{w, rows, cols}, s));
      EXPECT_EQ(e.scheme.scale_type, ScaleType::kF32) << magnitude;
      check_encoding(e, w, scheme_name(s));
      // as good as the same weights at unit scale
      ASSERT_OK_AND_ASSIGN(EncodedTensor unit, encode(Matrix{normal, rows, cols}, s));
      EXPECT_EQ(unit.scheme.scale_type, ScaleType::kF16);
      EXPECT_GT(e.stats.cosine(), 0.98) << magnitude;
      EXPECT_LT(e.stats.relative_error(), unit.stats.relative_error() * 1.05) << magnitude;
    }
  }
}

TEST(TensorCodec, rejects_schemes_outside_the_supported_set) {
  const Matrix m{testing::gaussian(64, 1), 8, 8};
  // affine codes are 2..8 bits wide
  for (auto [bits, gs] : {std::pair{9, 128}, std::pair{1, 128}, std::pair{16, 128}, std::pair{4, 48}, std::pair{4, -32}}) {
    QuantScheme s;
    s.bits = bits;
    s.group_size = gs;
    auto r = encode(m, s);
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidConfig) << bits << " " << gs;
  }
}

TEST(TensorCodec, decode_rejects_byte_counts_that_differ_from_the_scheme) {
  const Matrix m{testing::gaussian(16 * 64, 2), 16, 64};
  QuantScheme s;
  s.group_size = 32;
  ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(m, s));
  std::vector<float> out(16 * 64);
  std::vector<uint8_t> shorter(e.codes.begin(), e.codes.end() - 1);
  Status st = decode_tensor(s, 16, 64, EncodedView{shorter, e.scales, e.zero_points}, out.data());
  EXPECT_EQ(st.code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(st.message(), "codes");
  std::vector<uint8_t> longer_scales(e.scales);
  longer_scales.push_back(0);
  st = decode_tensor(s, 16, 64, EncodedView{e.codes, longer_scales, e.zero_points}, out.data());
  EXPECT_EQ(st.code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(st.message(), "scales");
  st = decode_tensor(s, 16, 64, EncodedView{e.codes, e.scales, {}}, out.data());
  EXPECT_EQ(st.code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(st.message(), "zero_points");
  st = decode_tensor(s, 16, 65, e.view(), out.data());
  EXPECT_EQ(st.code(), StatusCode::kFormatError) << "the wrong shape";
}

TEST(TensorCodec, stores_float16_scales_as_ieee_halves) {
  const std::vector<float> v = {1.0f, 0.000244140625f, 65504.0f, -2.0f};
  std::vector<uint8_t> bytes(8);
  store_scales(ScaleType::kF16, v.data(), v.size(), bytes.data());
  EXPECT_EQ(bytes, (std::vector<uint8_t>{0x00, 0x3c, 0x00, 0x0c, 0xff, 0x7b, 0x00, 0xc0}));
  std::vector<float> back(4);
  load_scales(ScaleType::kF16, bytes.data(), 4, back.data());
  EXPECT_EQ(back, v);
  std::vector<uint8_t> f32(16);
  store_scales(ScaleType::kF32, v.data(), v.size(), f32.data());
  EXPECT_EQ(f32, testing::f32_bytes(v));
}

TEST(Scheme, names_and_sizes_follow_the_layout) {
  QuantScheme s;
  s.bits = 3;
  s.group_size = 64;
  EXPECT_EQ(scheme_name(s), "int3_g64_asym");
  s.group_size = 0;
  s.symmetric = true;
  s.bits = 8;
  EXPECT_EQ(scheme_name(s), "int8_pc_sym");
  QuantScheme a;  // int4, g128, asymmetric, f16 scales
  const QuantizedSize q = quantized_size(a, 10, 300);  // 3 groups per row
  EXPECT_EQ(q.code_bytes, 1500u);
  EXPECT_EQ(q.scale_bytes, 10u * 3 * 2);
  EXPECT_EQ(q.zero_point_bytes, 10u * 3 * 2);
  QuantScheme b;
  b.bits = 3;
  b.symmetric = true;
  b.scale_type = ScaleType::kF32;
  const QuantizedSize r = quantized_size(b, 3, 7);  // 21 codes of 3 bits = 63 bits
  EXPECT_EQ(r.code_bytes, 8u);
  EXPECT_EQ(r.scale_bytes, 12u);
  EXPECT_EQ(r.zero_point_bytes, 0u);
}

TEST(DecodeInto, every_output_type_and_thread_count_gives_the_decoded_values_rounded) {
  // the PyTorch runtime's decoder (quant/decode_into.h) against decode_tensor
  const size_t rows = 37, cols = 512;
  const std::vector<float> w = testing::gaussian(rows * cols, 21, 0.05f);
  std::vector<QuantScheme> schemes;
  for (int bits : {3, 4, 8}) {
    QuantScheme s;
    s.bits = bits;
    s.group_size = 64;
    schemes.push_back(s);
  }
  for (GgmlType t : {GgmlType::kQ4_K, GgmlType::kQ8_0, GgmlType::kIQ4_NL, GgmlType::kQ6_K, GgmlType::kQ2_K})
    schemes.push_back(ggml_scheme(t));
  ThreadPool pool(3);
  for (const QuantScheme& s : schemes) {
    ASSERT_OK_AND_ASSIGN(EncodedTensor e, encode(Matrix{w, rows, cols}, s));
    const std::vector<float> ref = decode(e);
    for (int tasks : {1, 2, 4, 64}) {
      std::vector<float> f(rows * cols, -1.0f);
      ASSERT_OK(decode_into(s, rows, cols, e.view(), OutType::kF32, f.data(), &pool, tasks));
      ASSERT_EQ(f, ref) << scheme_name(s) << " tasks " << tasks;
      std::vector<uint16_t> b(rows * cols), h(rows * cols);
      ASSERT_OK(decode_into(s, rows, cols, e.view(), OutType::kBF16, b.data(), &pool, tasks));
      ASSERT_OK(decode_into(s, rows, cols, e.view(), OutType::kF16, h.data(), &pool, tasks));
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_EQ(b[i], f32_to_bf16(ref[i])) << scheme_name(s) << " " << i;
        ASSERT_EQ(h[i], f32_to_f16(ref[i])) << scheme_name(s) << " " << i;
      }
    }
    std::vector<uint16_t> part(7 * cols);
    ASSERT_OK(decode_rows_into(s, rows, cols, e.view(), OutType::kBF16, 5, 7, part.data()));
    for (size_t i = 0; i < part.size(); ++i) ASSERT_EQ(part[i], f32_to_bf16(ref[5 * cols + i])) << scheme_name(s);
    EXPECT_EQ(decode_rows_into(s, rows, cols, e.view(), OutType::kBF16, 35, 3, part.data()).code(),
              StatusCode::kInvalidConfig);
  }
}

}  // namespace
}  // namespace aq
