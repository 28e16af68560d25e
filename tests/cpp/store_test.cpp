// weights.parquet and manifest.json (store/): what the sink writes the source reads back, field
// for field and byte for byte, and files that are not ours are refused.
#include <arrow/api.h>
#include <arrow/io/file.h>
#include <gtest/gtest.h>
#include <parquet/arrow/reader.h>
#include <parquet/arrow/writer.h>

#include <cmath>
#include <cstring>
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
    EXPECT_EQ((*sink)->rows_written(), tensors_.size());
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
  EXPECT_EQ(schema->metadata()->Get("arrowquant.format_version").ValueOr(""), "4");
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
    // stored whole: piece 0 of all its rows
    EXPECT_EQ(t.GetColumnByName("piece")->chunk(0)->GetScalar(row).ValueOrDie()->ToString(), "0");
    EXPECT_EQ(t.GetColumnByName("row_start")->chunk(0)->GetScalar(row).ValueOrDie()->ToString(), "0");
    EXPECT_EQ(t.GetColumnByName("row_count")->chunk(0)->GetScalar(row).ValueOrDie()->ToString(),
              std::to_string(info.rows()));
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

// ---- entropy-coded tensors ------------------------------------------------------------------

struct EntropyWritten {
  StoredTensorInfo info;
  EncodedTensor enc;
  std::vector<float> w;
};

// An entropy-coded tensor as the engine would write it. The nominal width is ceil(budget), so
// the affine codes of that width (which a small tensor may get instead) are over the budget.
EntropyWritten entropy_tensor(const std::string& name, size_t rows, size_t cols, double budget, bool rotate,
                              uint32_t seed, bool outliers) {
  EntropyWritten t;
  t.w = testing::student_t4(rows * cols, seed, 0.02f);
  if (outliers)
    for (size_t r = 0; r < rows; r += 97) t.w[r * cols + (r % cols)] = (r % 2 ? -1e4f : 1e4f);
  const std::vector<uint8_t> bytes = testing::f32_bytes(t.w);
  RowSource src;
  src.data = bytes.data();
  src.rows = rows;
  src.cols = cols;
  src.name = name;
  QuantScheme s;
  s.kind = SchemeKind::kEntropy;
  s.bits = static_cast<int>(std::ceil(budget));
  s.target_bpw = budget;
  s.rotate = rotate;
  auto enc = encode_tensor(src, s, nullptr);
  EXPECT_TRUE(enc.ok()) << enc.status().ToString();
  t.enc = std::move(enc).value();
  EXPECT_EQ(t.enc.scheme.kind, SchemeKind::kEntropy) << name;
  t.info.name = name;
  t.info.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
  t.info.dtype = DType::kF32;
  t.info.quantized = true;
  t.info.scheme = t.enc.scheme;
  t.info.reason = "default";
  t.info.cosine = t.enc.stats.cosine();
  t.info.relative_error = t.enc.stats.relative_error();
  t.info.sqnr_db = t.enc.stats.sqnr_db();
  t.info.max_abs_error = t.enc.stats.max_abs_err;
  t.info.stored = t.enc.stored_bytes();
  return t;
}

TEST(StoreEntropy, round_trips_entropy_coded_tensors_with_their_tables) {
  testing::TempDir dir;
  std::vector<EntropyWritten> tensors;
  tensors.push_back(entropy_tensor("blocks.0.ff.weight", 300, 256, 4.5, true, 1, false));   // rotation 256
  tensors.push_back(entropy_tensor("blocks.1.ff.weight", 1400, 96, 3.0, false, 2, true));   // escapes, 3 chunks
  tensors.push_back(entropy_tensor("blocks.2.attn.weight", 200, 96, 8.25, true, 3, true));  // rotation 32
  ASSERT_GE(tensors[1].enc.entropy->escape_symbol, 0) << "the test wants escapes";
  ASSERT_GE(tensors[1].enc.entropy->chunk_offsets.size(), 3u);
  Written affine = quantized("blocks.3.affine.weight", 24, 300, QuantScheme{}, 4);
  affine.info.stored = quantized_size(affine.info.scheme, 24, 300).total();

  const std::string path = (dir / "weights.parquet").string();
  {
    ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, ""));
    for (const auto& t : tensors) ASSERT_OK(sink->Write(t.info, t.enc.view()));
    ASSERT_OK(sink->Write(affine.info, TensorPayload{affine.codes, affine.scales, affine.zeros}));
    ASSERT_OK(sink->Close());
  }
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open(path));
  ASSERT_EQ(src->tensors().size(), 4u);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const EntropyWritten& t = tensors[i];
    const StoredTensorInfo& got = src->tensors()[i];
    SCOPED_TRACE(t.info.name);
    EXPECT_EQ(got.name, t.info.name);
    EXPECT_TRUE(got.quantized);
    EXPECT_EQ(got.scheme.kind, SchemeKind::kEntropy);
    EXPECT_EQ(got.scheme.bits, t.enc.scheme.bits);
    EXPECT_EQ(got.scheme.rotate, t.enc.scheme.rotate);
    EXPECT_EQ(got.scheme.scale_type, ScaleType::kF32);
    EXPECT_EQ(got.scheme.entropy_budget(), t.enc.scheme.entropy_budget());
    EXPECT_EQ(got.cosine, t.info.cosine);
    EXPECT_EQ(got.relative_error, t.info.relative_error);
    EXPECT_EQ(got.max_abs_error, t.info.max_abs_error);
    EXPECT_EQ(got.stored_bytes(), t.enc.stored_bytes());

    ASSERT_OK_AND_ASSIGN(LoadedTensor l, src->read(i));
    EXPECT_TRUE(std::vector<uint8_t>(l.payload.codes.begin(), l.payload.codes.end()) == t.enc.codes);
    EXPECT_TRUE(std::vector<uint8_t>(l.payload.scales.begin(), l.payload.scales.end()) == t.enc.scales);
    EXPECT_TRUE(l.payload.zero_points.empty());
    ASSERT_NE(l.entropy, nullptr);
    ASSERT_EQ(l.payload.entropy, l.entropy.get());
    const EntropySide &a = *l.entropy, &b = *t.enc.entropy;
    EXPECT_EQ(a.symbol_min, b.symbol_min);
    EXPECT_EQ(a.frequencies, b.frequencies);
    EXPECT_EQ(a.escape_symbol, b.escape_symbol);
    EXPECT_EQ(a.chunk_rows, b.chunk_rows);
    EXPECT_EQ(a.chunk_offsets, b.chunk_offsets);
    ASSERT_EQ(a.centroids.size(), b.centroids.size());
    EXPECT_EQ(std::memcmp(a.centroids.data(), b.centroids.data(), 4 * a.centroids.size()), 0);

    // what the source dequantizes is what decode_tensor gives for the encoded tensor, and its
    // error against the source weights is the recorded one
    const uint64_t n = got.numel();
    std::vector<float> from_file(n + 1, -7.0f), from_memory(n, 0.0f);
    ASSERT_OK(src->dequantize(i, from_file.data()));
    EXPECT_EQ(from_file[n], -7.0f) << "wrote past numel";
    from_file.pop_back();
    ASSERT_OK(decode_tensor(t.enc.scheme, t.enc.rows, t.enc.cols, t.enc.view(), from_memory.data()));
    EXPECT_EQ(std::memcmp(from_file.data(), from_memory.data(), 4 * n), 0);
    ErrorStats stats;
    const uint64_t block = rows_per_block(got.cols());
    for (uint64_t r0 = 0; r0 < got.rows(); r0 += block) {
      ErrorStats b2;
      const uint64_t nr = std::min(block, got.rows() - r0);
      b2.add(t.w.data() + r0 * got.cols(), from_file.data() + r0 * got.cols(), nr * got.cols());
      stats.merge(b2);
    }
    EXPECT_EQ(stats.cosine(), got.cosine);
  }
  // the affine tensor beside them is unaffected
  const StoredTensorInfo& a = src->tensors()[3];
  EXPECT_EQ(a.scheme.kind, SchemeKind::kAffine);
  ASSERT_OK_AND_ASSIGN(LoadedTensor la, src->read(3));
  EXPECT_EQ(la.entropy, nullptr);
  EXPECT_EQ(la.payload.entropy, nullptr);
}

TEST(StoreEntropy, the_parquet_columns_follow_the_format_document) {
  testing::TempDir dir;
  EntropyWritten rot = entropy_tensor("a.weight", 64, 96, 4.25, true, 5, false);
  EntropyWritten plain = entropy_tensor("b.weight", 700, 160, 3.0, false, 6, true);
  Written affine = quantized("c.weight", 24, 300, QuantScheme{}, 7);
  affine.info.stored = quantized_size(affine.info.scheme, 24, 300).total();
  Written bias = raw("c.bias", DType::kF32, {4}, testing::f32_bytes({1, 2, 3, 4}));
  bias.info.stored = 16;
  const std::string path = (dir / "weights.parquet").string();
  {
    ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, "unet"));
    ASSERT_OK(sink->Write(rot.info, rot.enc.view()));
    ASSERT_OK(sink->Write(plain.info, plain.enc.view()));
    ASSERT_OK(sink->Write(affine.info, TensorPayload{affine.codes, affine.scales, affine.zeros}));
    ASSERT_OK(sink->Write(bias.info, TensorPayload{bias.codes, {}, {}}));
    ASSERT_OK(sink->Close());
  }
  auto file = arrow::io::ReadableFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto reader = parquet::arrow::OpenFile(*file, arrow::default_memory_pool());
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  auto read = (*reader)->ReadTable();
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  auto combined = (*read)->CombineChunks();
  ASSERT_TRUE(combined.ok());
  const auto& t = **combined;
  auto scheme = std::static_pointer_cast<arrow::StructArray>(t.GetColumnByName("scheme")->chunk(0));
  auto entropy = std::static_pointer_cast<arrow::StructArray>(t.GetColumnByName("entropy")->chunk(0));
  auto zeros = t.GetColumnByName("zero_points")->chunk(0);
  auto kind = std::static_pointer_cast<arrow::StringArray>(scheme->GetFieldByName("kind"));
  auto rotation = std::static_pointer_cast<arrow::Int32Array>(scheme->GetFieldByName("rotation"));
  auto target = std::static_pointer_cast<arrow::DoubleArray>(scheme->GetFieldByName("target_bpw"));
  auto scale_type = std::static_pointer_cast<arrow::StringArray>(scheme->GetFieldByName("scale_type"));
  auto stored = std::static_pointer_cast<arrow::Int64Array>(t.GetColumnByName("stored_bytes")->chunk(0));
  auto codes = std::static_pointer_cast<arrow::BinaryArray>(t.GetColumnByName("codes")->chunk(0));
  auto scales = std::static_pointer_cast<arrow::BinaryArray>(t.GetColumnByName("scales")->chunk(0));

  EXPECT_EQ(kind->GetString(0), "entropy");
  EXPECT_EQ(kind->GetString(1), "entropy");
  EXPECT_EQ(kind->GetString(2), "affine");
  EXPECT_TRUE(scheme->IsNull(3));
  EXPECT_EQ(rotation->Value(0), 32) << "96 columns: blocks of 32";
  EXPECT_EQ(rotation->Value(1), 1);
  EXPECT_EQ(target->Value(0), 4.25);
  EXPECT_EQ(target->Value(1), 3.0);
  EXPECT_TRUE(target->IsNull(2)) << "affine tensors have no budget";
  EXPECT_EQ(scale_type->GetString(0), "f32");
  for (int64_t i : {0, 1}) {
    EXPECT_FALSE(entropy->IsNull(i));
    EXPECT_TRUE(zeros->IsNull(i)) << "entropy-coded tensors have no zero points";
  }
  EXPECT_TRUE(entropy->IsNull(2));
  EXPECT_TRUE(entropy->IsNull(3));

  // stored_bytes: codes, steps and the entropy fields at their types' sizes
  auto freqs = std::static_pointer_cast<arrow::ListArray>(entropy->GetFieldByName("frequencies"));
  auto offsets = std::static_pointer_cast<arrow::ListArray>(entropy->GetFieldByName("chunk_offsets"));
  auto centroids = std::static_pointer_cast<arrow::ListArray>(entropy->GetFieldByName("centroids"));
  auto chunk_rows = std::static_pointer_cast<arrow::Int32Array>(entropy->GetFieldByName("chunk_rows"));
  const EntropyWritten* written[] = {&rot, &plain};
  for (int64_t i : {0, 1}) {
    const int64_t expect = codes->value_length(i) + scales->value_length(i) + 4 /* symbol_min */ +
                           4 /* escape_symbol */ + 4 /* chunk_rows */ + 2 * freqs->value_length(i) +
                           4 * offsets->value_length(i) + 4 * centroids->value_length(i);
    EXPECT_EQ(stored->Value(i), expect) << i;
    EXPECT_EQ(scales->value_length(i), 4 * written[i]->info.shape[0]) << "one float32 step per row";
    EXPECT_EQ(centroids->value_length(i), 8);
    EXPECT_EQ(static_cast<uint64_t>(chunk_rows->Value(i)), written[i]->enc.entropy->chunk_rows);
    EXPECT_EQ(offsets->value_length(i),
              (written[i]->info.shape[0] + chunk_rows->Value(i) - 1) / chunk_rows->Value(i) + 1);
  }
}

TEST(Manifest, reads_only_complete_arrowquant_manifests_of_our_version) {
  testing::TempDir dir;
  EXPECT_EQ(read_manifest((dir / "absent").string()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError) << "no manifest.json";
  testing::write_text(dir / "manifest.json", "{not json");
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "other"}, {"format_version", 1}}));
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "arrowquant"}, {"format_version", 5}}));
  auto wrong = read_manifest(dir.str());
  EXPECT_EQ(wrong.status().code(), StatusCode::kFormatError);
  EXPECT_CONTAINS(wrong.status().message(), "5");
  EXPECT_CONTAINS(wrong.status().message(), "versions 1 to 4");
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "arrowquant"}, {"format_version", 0}}));
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  for (int v : {1, 2, 3, 4}) {
    ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "arrowquant"}, {"format_version", v}}));
    EXPECT_TRUE(read_manifest(dir.str()).ok()) << v;
  }
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), {{"format", "arrowquant"}, {"format_version", "1"}}));
  EXPECT_EQ(read_manifest(dir.str()).status().code(), StatusCode::kFormatError);
  const json good = {{"format", "arrowquant"}, {"format_version", 1}, {"components", json::array()}};
  ASSERT_OK(write_json_file((dir / "manifest.json").string(), good));
  ASSERT_OK_AND_ASSIGN(json m, read_manifest(dir.str()));
  EXPECT_EQ(m, good);
}

TEST(StoreInputScale, round_trips_and_dequantize_returns_the_effective_weight) {
  testing::TempDir dir;
  // a convolution-shaped weight: 6 rows, 3 input channels x 4 kernel positions
  Written conv = quantized("conv.weight", 6, 12, QuantScheme{}, 11);
  conv.info.shape = {6, 3, 2, 2};
  conv.info.input_scale = {0.5f, 2.0f, 4.0f};
  conv.info.stored = quantized_size(conv.info.scheme, 6, 12).total() + 12;
  Written plain = quantized("lin.weight", 8, 16, QuantScheme{}, 12);
  plain.info.stored = quantized_size(plain.info.scheme, 8, 16).total();
  const std::string path = (dir / "weights.parquet").string();
  {
    ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, ""));
    ASSERT_OK(sink->Write(conv.info, TensorPayload{conv.codes, conv.scales, conv.zeros}));
    ASSERT_OK(sink->Write(plain.info, TensorPayload{plain.codes, plain.scales, plain.zeros}));
    ASSERT_OK(sink->Close());
  }
  ASSERT_OK_AND_ASSIGN(auto src, ParquetSource::Open(path));
  EXPECT_EQ(src->tensors()[0].input_scale, conv.info.input_scale);
  EXPECT_TRUE(src->tensors()[1].input_scale.empty());
  std::vector<float> stored(72), effective(72);
  ASSERT_OK(decode_tensor(conv.info.scheme, 6, 12, EncodedView{conv.codes, conv.scales, conv.zeros, nullptr, nullptr},
                          stored.data()));
  ASSERT_OK(src->dequantize(0, effective.data()));
  for (size_t r = 0; r < 6; ++r)
    for (size_t j = 0; j < 12; ++j)
      EXPECT_EQ(effective[r * 12 + j], stored[r * 12 + j] * conv.info.input_scale[j / 4]) << r << "," << j;
}

TEST(StoreInputScale, refuses_scales_that_do_not_fit_the_tensor) {
  testing::TempDir dir;
  for (const std::vector<float>& bad : {std::vector<float>{1.0f, 2.0f}, std::vector<float>{1.0f, 0.0f, 1.0f},
                                        std::vector<float>{1.0f, NAN, 1.0f}}) {
    Written conv = quantized("conv.weight", 6, 12, QuantScheme{}, 11);
    conv.info.shape = {6, 3, 2, 2};
    conv.info.input_scale = bad;
    const std::string path = (dir / "bad.parquet").string();
    {
      ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, ""));
      ASSERT_OK(sink->Write(conv.info, TensorPayload{conv.codes, conv.scales, conv.zeros}));
      ASSERT_OK(sink->Close());
    }
    auto src = ParquetSource::Open(path);
    ASSERT_FALSE(src.ok());
    EXPECT_EQ(src.status().code(), StatusCode::kFormatError);
    EXPECT_CONTAINS(src.status().message(), "conv.weight");
    EXPECT_CONTAINS(src.status().message(), "input_scale");
  }
}

// Tensors stored in pieces (format version 4): every kind read back exactly as stored whole.
struct PieceCase {
  StoredTensorInfo info;
  EncodedTensor enc;  // quantized
  std::vector<uint8_t> raw;
  TensorPayload payload() const { return info.quantized ? enc.view() : TensorPayload{raw, {}, {}}; }
};

PieceCase piece_case(const std::string& name, size_t rows, size_t cols, QuantScheme s, uint32_t seed) {
  PieceCase c;
  const std::vector<uint8_t> bytes = testing::f32_bytes(testing::student_t4(rows * cols, seed, 0.02f));
  RowSource src;
  src.data = bytes.data();
  src.rows = rows;
  src.cols = cols;
  src.name = name;
  auto enc = encode_tensor(src, s, nullptr);
  EXPECT_TRUE(enc.ok()) << enc.status().ToString();
  c.enc = std::move(enc).value();
  c.info.name = name;
  c.info.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
  c.info.dtype = DType::kF32;
  c.info.quantized = true;
  c.info.scheme = c.enc.scheme;
  c.info.reason = "default";
  c.info.cosine = c.enc.stats.cosine();
  c.info.stored = c.enc.stored_bytes();
  return c;
}

std::vector<PieceCase> piece_cases() {
  std::vector<PieceCase> v;
  v.push_back(piece_case("affine4.weight", 200, 300, QuantScheme{}, 1));  // g128: a short last group
  QuantScheme b;
  b.bits = 3;
  b.group_size = 0;
  b.symmetric = true;
  b.scale_type = ScaleType::kF32;
  v.push_back(piece_case("affine3.weight", 123, 17, b, 2));  // codes cross bytes; 8-row units
  QuantScheme e;
  e.kind = SchemeKind::kEntropy;
  e.bits = 4;
  e.target_bpw = 4.0;
  v.push_back(piece_case("entropy.weight", 3000, 96, e, 3));  // chunks of rows_per_block(96)
  QuantScheme g;
  g.kind = SchemeKind::kGgml;
  g.ggml = GgmlType::kQ4_K;
  g.bits = 4;
  g.group_size = 256;
  g.symmetric = false;
  g.scale_type = ScaleType::kF16;
  v.push_back(piece_case("q4k.weight", 40, 512, g, 4));
  PieceCase r;
  r.info.name = "kept.weight";
  r.info.shape = {400, 6};
  r.info.dtype = DType::kF16;
  r.info.reason = "kept";
  r.raw = testing::f16_bytes(testing::gaussian(2400, 5));
  r.info.stored = r.raw.size();
  v.push_back(r);
  return v;
}

TEST(StorePieces, a_tensor_in_pieces_reads_back_as_the_tensor_stored_whole) {
  testing::TempDir dir;
  const auto cases = piece_cases();
  ASSERT_EQ(cases[2].enc.scheme.kind, SchemeKind::kEntropy);
  const std::string whole = (dir / "whole.parquet").string(), pieces = (dir / "pieces.parquet").string();
  for (const auto& [path, max_bytes] : {std::pair{whole, UINT64_MAX}, std::pair{pieces, uint64_t{700}}}) {
    ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, "unet"));
    for (const auto& c : cases) ASSERT_OK(sink->Write(c.info, c.payload(), 8, max_bytes));
    ASSERT_OK(sink->Close());
  }
  ASSERT_OK_AND_ASSIGN(auto a, ParquetSource::Open(whole));
  ASSERT_OK_AND_ASSIGN(auto b, ParquetSource::Open(pieces));
  ASSERT_EQ(b->tensors().size(), cases.size());
  size_t row_groups = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const StoredTensorInfo& got = b->tensors()[i];
    SCOPED_TRACE(got.name);
    EXPECT_EQ(a->tensors()[i].pieces.size(), 1u);
    EXPECT_GT(got.pieces.size(), 1u);
    row_groups += got.pieces.size();
    EXPECT_EQ(got.stored_bytes(), cases[i].info.stored_bytes());  // the pieces' rows sum to the tensor
    EXPECT_EQ(got.cosine, cases[i].info.cosine);
    EXPECT_EQ(got.pieces.front().row_start, 0u);
    EXPECT_EQ(got.pieces.back().row_start + got.pieces.back().row_count, got.rows());
    // gathered: the values of the tensor stored whole, byte for byte
    ASSERT_OK_AND_ASSIGN(LoadedTensor x, a->read(i));
    ASSERT_OK_AND_ASSIGN(LoadedTensor y, b->read(i));
    auto bytes = [](std::span<const uint8_t> s) { return std::vector<uint8_t>(s.begin(), s.end()); };
    EXPECT_EQ(bytes(y.payload.codes), bytes(x.payload.codes));
    EXPECT_EQ(bytes(y.payload.scales), bytes(x.payload.scales));
    EXPECT_EQ(bytes(y.payload.zero_points), bytes(x.payload.zero_points));
    if (x.entropy) {
      ASSERT_NE(y.entropy, nullptr);
      EXPECT_EQ(y.entropy->chunk_offsets, x.entropy->chunk_offsets);
      EXPECT_EQ(y.entropy->frequencies, x.entropy->frequencies);
    }
    // owned (what the runtime keeps): the same bytes in buffers of their exact size, both layouts
    for (const auto* src : {a.get(), b.get()}) {
      ASSERT_OK_AND_ASSIGN(OwnedTensor o, src->read_owned(i));
      EXPECT_EQ(o.codes, bytes(x.payload.codes));
      EXPECT_EQ(o.scales, bytes(x.payload.scales));
      EXPECT_EQ(o.zero_points, bytes(x.payload.zero_points));
      EXPECT_EQ(o.codes.capacity(), o.codes.size());
      EXPECT_EQ(o.entropy != nullptr, x.entropy != nullptr);
      if (x.entropy) {
        EXPECT_EQ(o.entropy->chunk_offsets, x.entropy->chunk_offsets);
        ASSERT_NE(o.table, nullptr);
        std::vector<float> d(got.numel());
        ASSERT_OK(decode_tensor(got.scheme, got.rows(), got.cols(), o.view(), d.data()));
      }
    }
    // dequantized (piece by piece) and each piece decoded on its own: the same floats
    std::vector<float> dx(got.numel()), dy(got.numel());
    ASSERT_OK(a->dequantize(i, dx.data()));
    ASSERT_OK(b->dequantize(i, dy.data()));
    EXPECT_EQ(dx, dy);
    if (!got.quantized) continue;
    for (size_t k = 0; k < got.pieces.size(); ++k) {
      const StoredPiece& p = got.pieces[k];
      ASSERT_OK_AND_ASSIGN(LoadedTensor t, b->read_piece(i, k));
      std::vector<float> d(p.row_count * got.cols());
      ASSERT_OK(decode_tensor(got.scheme, p.row_count, got.cols(), t.payload, d.data()));
      EXPECT_TRUE(std::equal(d.begin(), d.end(), dx.begin() + static_cast<std::ptrdiff_t>(p.row_start * got.cols())))
          << "piece " << k;
    }
  }
  // The file: one row group per piece, the piece columns filled in, the entropy tables on piece 0 only.
  auto file = arrow::io::ReadableFile::Open(pieces);
  ASSERT_TRUE(file.ok());
  auto reader = parquet::arrow::OpenFile(*file, arrow::default_memory_pool());
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ(static_cast<size_t>((*reader)->num_row_groups()), row_groups);
  auto read = (*reader)->ReadTable();
  ASSERT_TRUE(read.ok());
  std::shared_ptr<arrow::Table> table = (*read)->CombineChunks().ValueOrDie();
  auto names = std::static_pointer_cast<arrow::StringArray>(table->GetColumnByName("name")->chunk(0));
  auto piece = std::static_pointer_cast<arrow::Int32Array>(table->GetColumnByName("piece")->chunk(0));
  auto entropy = table->GetColumnByName("entropy")->chunk(0);
  auto stored = std::static_pointer_cast<arrow::Int64Array>(table->GetColumnByName("stored_bytes")->chunk(0));
  int64_t entropy_rows_with_tables = 0, stored_sum = 0, stored_want = 0;
  for (int64_t r = 0; r < table->num_rows(); ++r) {
    if (names->GetString(r) == "entropy.weight" && !entropy->IsNull(r)) {
      ++entropy_rows_with_tables;
      EXPECT_EQ(piece->Value(r), 0);
    }
    stored_sum += stored->Value(r);
  }
  for (const auto& c : cases) stored_want += static_cast<int64_t>(c.info.stored_bytes());
  EXPECT_EQ(entropy_rows_with_tables, 1);
  EXPECT_EQ(stored_sum, stored_want);
}

TEST(StorePieces, pieces_out_of_order_or_missing_are_a_format_error_naming_the_tensor) {
  testing::TempDir dir;
  const auto cases = piece_cases();
  const PieceCase& c = cases[0];
  ASSERT_OK_AND_ASSIGN(auto pieces, split_pieces(c.info, c.payload(), 8, 700));
  ASSERT_GT(pieces.size(), 2u);
  auto write = [&](const std::string& path, std::vector<size_t> order) {
    ASSERT_OK_AND_ASSIGN(auto sink, ParquetSink::Open(path, ""));
    for (size_t k : order) {
      ASSERT_OK_AND_ASSIGN(auto row, tensor_row_table(c.info, c.payload(), path, &pieces[k]));
      ASSERT_OK(sink->WriteRow(*row, c.info.name));
    }
    ASSERT_OK(sink->Close());
  };
  const std::string missing = (dir / "missing.parquet").string(), swapped = (dir / "swapped.parquet").string();
  std::vector<size_t> all(pieces.size());
  for (size_t k = 0; k < all.size(); ++k) all[k] = k;
  std::vector<size_t> head(all.begin(), all.end() - 1), order = all;
  std::swap(order[1], order[2]);
  write(missing, head);
  write(swapped, order);
  for (const auto& [path, words] : {std::pair{missing, "piece(s) hold rows 0.."}, std::pair{swapped, "does not follow"}}) {
    auto src = ParquetSource::Open(path);
    ASSERT_FALSE(src.ok()) << path;
    EXPECT_EQ(src.status().code(), StatusCode::kFormatError);
    EXPECT_CONTAINS(src.status().message(), "affine4.weight");
    EXPECT_CONTAINS(src.status().message(), words);
  }
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
