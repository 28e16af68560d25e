// Regression tests for what the fuzz targets (fuzz/, scripts/fuzz.sh) found: each builds the
// input that failed, small and in code, and checks that it now gets a clear result.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <vector>

#include "engine/tensor_job.h"
#include "quant/group_quant.h"
#include "quant/tensor_codec.h"
#include "store/manifest.h"
#include "test_util.h"

namespace aq {
namespace {

// fuzz_export_requantize: a decoded tensor whose values span about +-FLT_MAX (fuzzed float32
// scales) re-encoded as affine codes. hi - lo overflowed to inf, the step became inf, its inverse
// 0, and (x - z) * 0 = inf * 0 = NaN was converted to a uint8 code (undefined behaviour; clang's
// UBSan: "-nan is outside the range of representable values of type 'unsigned char'").
TEST(FuzzRegression, affine_group_spanning_the_float_range_gets_a_finite_step_and_valid_codes) {
  for (bool search : {false, true})
    for (ScaleType st : {ScaleType::kF32, ScaleType::kF16}) {
      QuantScheme s;
      s.bits = 4;
      s.group_size = 32;
      s.scale_type = st;
      s.method = search ? ScaleMethod::kSearch : ScaleMethod::kMinMax;
      std::vector<float> w(32, 0.0f);
      w[0] = FLT_MAX;
      w[1] = -FLT_MAX;
      w[2] = 3.0e38f;
      w[3] = 1.0f;
      std::vector<uint8_t> q(32, 0xff);
      std::vector<float> sc(1), z(1);
      quantize_rows(s, w.data(), 1, 32, q.data(), sc.data(), z.data());
      for (uint8_t c : q) EXPECT_LE(c, 15) << scale_type_name(st);
      if (st == ScaleType::kF32) {
        EXPECT_TRUE(std::isfinite(sc[0])) << sc[0];
        EXPECT_GT(sc[0], 0.0f);
        EXPECT_EQ(q[0], 15);  // the largest weight takes the top code, the smallest code 0
        EXPECT_EQ(q[1], 0);
      }
    }
}

// The same through encode_tensor (what _core.encode_array, the exporters' re-encoding, calls):
// an encoded tensor that passes check_encoded and decodes, or a clear error.
TEST(FuzzRegression, encode_tensor_of_values_near_float_max_stores_a_decodable_tensor) {
  std::vector<float> w(2 * 64);
  for (size_t i = 0; i < w.size(); ++i) w[i] = (i % 3 == 0 ? 1.0f : -1.0f) * (i % 2 ? FLT_MAX : 1.0e30f);
  RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(w.data());
  src.rows = 2;
  src.cols = 64;
  src.name = "huge";
  QuantScheme s;
  s.bits = 4;
  s.group_size = 32;
  auto r = encode_tensor(src, s, nullptr);
  if (!r.ok()) {
    EXPECT_CONTAINS(r.status().message(), "huge");
    return;
  }
  ASSERT_OK(check_encoded(r->scheme, r->rows, r->cols, r->view()));
  std::vector<float> back(w.size());
  ASSERT_OK(decode_tensor(r->scheme, r->rows, r->cols, r->view(), back.data()));
}

// fuzz_manifest_json: {"format": 1} made json::value throw (type_error 302) out of read_manifest,
// an uncaught exception instead of a FormatError naming the file.
TEST(FuzzRegression, manifest_whose_format_is_not_a_string_is_a_format_error) {
  testing::TempDir dir;
  for (const char* text : {R"({"format": 1})", R"({"format": null, "format_version": 3})", R"({"format": ["arrowquant"]})",
                           R"([1, 2])", R"("arrowquant")"}) {
    testing::write_text(dir / "manifest.json", text);
    const Status st = read_manifest(dir.str()).status();
    EXPECT_EQ(st.code(), StatusCode::kFormatError) << text;
    EXPECT_CONTAINS(st.message(), "manifest.json");
    EXPECT_CONTAINS(st.message(), "not an ArrowQuant manifest");
  }
}

// A format_version beyond int wrapped (get<int>): 2^32 + 2 read as version 2.
TEST(FuzzRegression, manifest_format_version_beyond_int_is_refused_with_its_value) {
  testing::TempDir dir;
  testing::write_text(dir / "manifest.json", R"({"format": "arrowquant", "format_version": 4294967298})");
  const Status st = read_manifest(dir.str()).status();
  EXPECT_EQ(st.code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(st.message(), "format version 4294967298");
}

}  // namespace
}  // namespace aq
