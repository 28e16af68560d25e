// weights.parquet and manifest.json (store/): what the sink writes the source reads back, field
// for field and byte for byte, and files that are not ours are refused.
#include <arrow/api.h>
#include <arrow/io/file.h>
#include <gtest/gtest.h>
#include <parquet/arrow/reader.h>
#include <parquet/arrow/writer.h>

#include <string>
#include <vector>

#include "engine/tensor_job.h"
#include "quant/tensor_codec.h"
#include "store/manifest.h"
#include "store/parquet_sink.h"
#include "store/parquet_source.h"
#include "test_util.h"

namespace aq {
namespace {

using testing::json;

struct Written {
  StoredTensorInfo info;
  std::vector<uint8_t> codes, scales, zeros;
};

Written quantized(const std::string& name, size_t rows, size_t cols, QuantScheme s, uint32_t seed) {
  const std::vector<uint8_t> bytes = testing::f32_bytes(testing::gaussian(rows * cols, seed, 0.1f));
  RowSource src;
  src.data = bytes.data();
  src.rows = rows;
  src.cols = cols;
  auto enc = encode_tensor(src, s, nullptr);
  EXPECT_TRUE(enc.ok()) << enc.status().ToString();
  Written w;
  w.info.name = name;
  w.info.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
  w.info.dtype = DType::kF32;
  w.info.quantized = true;
  w.info.scheme = enc->scheme;
  w.info.reason = "default";
  w.info.cosine = enc->stats.cosine();
  w.info.relative_error = enc->stats.relative_error();
  w.info.sqnr_db = enc->stats.sqnr_db();
  w.info.max_abs_error = enc->stats.max_abs_err;
  w.codes = enc->codes;
  w.scales = enc->scales;
  w.zeros = enc->zero_points;
  return w;
}

Written raw(const std::string& name, DType dt, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  Written w;
  w.info.name = name;
  w.info.shape = std::move(shape);
  w.info.dtype = dt;
  w.info.reason = "kept: 1-D tensor";
  w.codes = std::move(bytes);
  return w;
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    QuantScheme a;  // int4 g128 asymmetric
    tensors_.push_back(quantized("down.0.weight", 24, 300, a, 1));
    QuantScheme b;
    b.bits = 3;
    b.group_size = 0;
    b.symmetric = true;
    b.scale_type = ScaleType::kF32;
    b.method = ScaleMethod::kMinMax;
    tensors_.push_back(quantized("attn.to_q.weight", 17, 64, b, 2));
    tensors_.back().info.rejected_bits = {2};
    tensors_.back().info.reason = "default; fell back to 3 bits";
    tensors_.push_back(raw("norm.weight", DType::kF16, {5}, testing::f16_bytes({1.0f, 0.5f, -2.0f, 3.0f, 0.25f})));
    std::vector<uint8_t> ids;
    for (int64_t v : {7, -1, 42}) testing::append_le(ids, v);
    tensors_.push_back(raw("position_ids", DType::kI64, {1, 3}, ids));
    tensors_.push_back(raw("scalar", DType::kF32, {}, testing::f32_bytes({2.5f})));
    tensors_.push_back(raw("empty", DType::kF32, {0, 4}, {}));
  }

  std::string write_all() {
    const std::string path = (dir_ / "weights.parquet").string();
    auto sink = ParquetSink::Open(path, "unet");
    EXPECT_TRUE(sink.ok()) << sink.status().ToString();
    for (const auto& t : tensors_) {
      const Status st = (*sink)->Write(t.info, TensorPayload{t.codes, t.scales, t.zeros});
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
    EXPECT_EQ((*sink)->tensors_written(), tensors_.size());
    const Status st = (*sink)->Close();
    EXPECT_TRUE(st.ok()) << st.ToString();
    return path;
  }

  testing::TempDir dir_;
  std::vector<Written> tensors_;
};

TEST_F(StoreTest, reads_back_every_field_and_byte_that_was_written) {
  const std::string path = write_all();
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open(path));
  ASSERT_EQ(src->tensors().size(), tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const StoredTensorInfo& want = tensors_[i].info;
    const StoredTensorInfo& got = src->tensors()[i];
    EXPECT_EQ(got.name, want.name);
    EXPECT_EQ(got.shape, want.shape) << want.name;
    EXPECT_EQ(got.dtype, want.dtype) << want.name;
    EXPECT_EQ(got.quantized, want.quantized) << want.name;
    EXPECT_EQ(got.reason, want.reason) << want.name;
    EXPECT_EQ(got.rejected_bits, want.rejected_bits) << want.name;
    if (want.quantized) {
      EXPECT_EQ(got.scheme, want.scheme) << want.name;
      EXPECT_EQ(got.cosine, want.cosine) << want.name;
      EXPECT_EQ(got.relative_error, want.relative_error) << want.name;
      EXPECT_EQ(got.sqnr_db, want.sqnr_db) << want.name;
      EXPECT_EQ(got.max_abs_error, want.max_abs_error) << want.name;
    }
    EXPECT_EQ(got.stored_bytes(), want.stored_bytes()) << want.name;
    ASSERT_EQ(src->find(want.name), i);

    ASSERT_OK_AND_ASSIGN(LoadedTensor t, src->read(i));
    EXPECT_EQ(std::vector<uint8_t>(t.payload.codes.begin(), t.payload.codes.end()), tensors_[i].codes) << want.name;
    EXPECT_EQ(std::vector<uint8_t>(t.payload.scales.begin(), t.payload.scales.end()), tensors_[i].scales) << want.name;
    EXPECT_EQ(std::vector<uint8_t>(t.payload.zero_points.begin(), t.payload.zero_points.end()), tensors_[i].zeros)
        << want.name;
  }
  EXPECT_FALSE(src->find("absent").has_value());
}

TEST_F(StoreTest, writes_one_row_group_per_tensor_with_nulls_where_the_format_says) {
  const std::string path = write_all();
  auto file = arrow::io::ReadableFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto reader = parquet::arrow::OpenFile(*file, arrow::default_memory_pool());
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->num_row_groups(), static_cast<int>(tensors_.size()));
  std::shared_ptr<arrow::Schema> schema;
  ASSERT_TRUE((*reader)->GetSchema(&schema).ok());
  ASSERT_NE(schema->metadata(), nullptr);
  EXPECT_EQ(schema->metadata()->Get("arrowquant.format").ValueOr(""), "arrowquant");
  EXPECT_EQ(schema->metadata()->Get("arrowquant.format_version").ValueOr(""), "1");
  EXPECT_EQ(schema->metadata()->Get("arrowquant.component").ValueOr(""), "unet");
  auto read = (*reader)->ReadTable();
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  const std::shared_ptr<arrow::Table> table = *read;
  ASSERT_EQ(table->num_rows(), static_cast<int64_t>(tensors_.size()));
  auto combined = table->CombineChunks();
  ASSERT_TRUE(combined.ok());
  const auto& t = **combined;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto row = static_cast<int64_t>(i);
    const StoredTensorInfo& info = tensors_[i].info;
    EXPECT_EQ(t.GetColumnByName("encoding")->chunk(0)->GetScalar(row).ValueOrDie()->ToString(),
              info.quantized ? "quantized" : "raw");
    EXPECT_EQ(t.GetColumnByName("scheme")->chunk(0)->IsNull(row), !info.quantized) << info.name;
    EXPECT_EQ(t.GetColumnByName("metrics")->chunk(0)->IsNull(row), !info.quantized) << info.name;
    EXPECT_EQ(t.GetColumnByName("scales")->chunk(0)->IsNull(row), !info.quantized) << info.name;
    EXPECT_EQ(t.GetColumnByName("zero_points")->chunk(0)->IsNull(row), !info.quantized || info.scheme.symmetric)
        << info.name;
    EXPECT_FALSE(t.GetColumnByName("codes")->chunk(0)->IsNull(row)) << info.name;
  }
}

TEST_F(StoreTest, dequantize_equals_decode_tensor_and_converts_raw_floats) {
  const std::string path = write_all();
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open(path));
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const Written& w = tensors_[i];
    const uint64_t n = w.info.numel();
    std::vector<float> got(n + 1, -7.0f), want(n + 1, -7.0f);
    const Status st = src->dequantize(i, got.data());
    if (w.info.quantized) {
      ASSERT_OK(st);
      ASSERT_OK(decode_tensor(w.info.scheme, w.info.rows(), w.info.cols(), EncodedView{w.codes, w.scales, w.zeros}, want.data()));
      EXPECT_EQ(got, want) << w.info.name;
    } else if (w.info.dtype == DType::kI64) {
      EXPECT_EQ(st.code(), StatusCode::kNotImplemented) << st.ToString();
      EXPECT_CONTAINS(st.message(), "position_ids");
    } else {
      ASSERT_OK(st);
      convert_to_f32(w.info.dtype, w.codes.data(), n, want.data());
      EXPECT_EQ(got, want) << w.info.name;
    }
    EXPECT_EQ(got[n], -7.0f) << w.info.name << ": wrote past numel";
  }
  std::vector<float> f(5);
  ASSERT_OK(src->dequantize(*src->find("norm.weight"), f.data()));
  EXPECT_EQ(f, (std::vector<float>{1.0f, 0.5f, -2.0f, 3.0f, 0.25f}));
}

TEST_F(StoreTest, refuses_to_write_after_close) {
  const std::string path = (dir_ / "w.parquet").string();
  ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, ""));
  ASSERT_OK(sink->Close());
  const Status st = sink->Write(tensors_[2].info, TensorPayload{tensors_[2].codes, {}, {}});
  EXPECT_FALSE(st.ok());
}

TEST_F(StoreTest, a_file_that_is_not_parquet_is_a_format_error) {
  const auto path = dir_ / "weights.parquet";
  testing::write_text(path, "this is not a parquet file at all, just some text");
  auto r = ParquetSource::Open(path.string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kFormatError) << r.status().ToString();
  EXPECT_CONTAINS(r.status().message(), path.string());
}

TEST_F(StoreTest, a_parquet_file_written_by_someone_else_is_a_format_error) {
  const std::string path = (dir_ / "other.parquet").string();
  arrow::Int64Builder b;
  ASSERT_TRUE(b.AppendValues({1, 2, 3}).ok());
  std::shared_ptr<arrow::Array> col;
  ASSERT_TRUE(b.Finish(&col).ok());
  auto table = arrow::Table::Make(arrow::schema({arrow::field("x", arrow::int64())}), {col});
  auto out = arrow::io::FileOutputStream::Open(path);
  ASSERT_TRUE(out.ok());
  ASSERT_TRUE(parquet::arrow::WriteTable(*table, arrow::default_memory_pool(), *out, 3).ok());
  ASSERT_TRUE((*out)->Close().ok());
  auto r = ParquetSource::Open(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kFormatError) << r.status().ToString();
  EXPECT_CONTAINS(r.status().message(), "other.parquet");
}

TEST_F(StoreTest, a_missing_file_is_not_found) {
  auto r = ParquetSource::Open((dir_ / "absent.parquet").string());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound) << r.status().ToString();
}

TEST(Manifest, reads_only_complete_arrowquant_manifests_of_our_version) {
  testing::TempDir dir;
  EXPECT_EQ(read_manifest((dir / "absent").string()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError) << "no manifest.json";
  testing::write_text(dir / "manifest.json", "{not json");
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "other"}, {"format_version", 1}}));
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "arrowquant"}, {"format_version", 2}}));
  auto wrong = read_manifest(dir.str());
  EXPECT_EQ(wrong.status().code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(wrong.status().message(), "2");
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "arrowquant"}, {"format_version", "1"}}));
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  const json good = {{"format", "arrowquant"}, {"format_version", 1}, {"components", json::array()}};
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), good));
  ASSERT_OK_AND_ASSIGN(json m, read_manifest(dir.str()));
  EXPECT_EQ(m, good);
}

TEST(StoredTensorInfo, sizes_follow_the_shape_and_scheme) {
  StoredTensorInfo t;
  t.shape = {4, 3, 3, 3};  // a convolution: 4 rows of 27
  t.dtype = DType::kBF16;
  EXPECT_EQ(t.rows(), 4u);
  EXPECT_EQ(t.cols(), 27u);
  EXPECT_EQ(t.numel(), 108u);
  EXPECT_EQ(t.source_bytes(), 216u);
  // Stored sizes are recorded (entropy-coded sizes are known only once coded); an affine
  // scheme's size still follows from the shape.
  QuantScheme affine;
  affine.bits = 4;
  affine.group_size = 0;
  EXPECT_EQ(quantized_size(affine, t.rows(), t.cols()).total(), 54u + 4 * 2 + 4 * 2);
  StoredTensorInfo scalar;
  EXPECT_EQ(scalar.rows(), 1u);
  EXPECT_EQ(scalar.numel(), 1u);
}

}  // namespace
}  // namespace aq
