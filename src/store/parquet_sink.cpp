#include "store/parquet_sink.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/writer.h>
#include <parquet/properties.h>

#include <limits>

#include "store/arrow_status.h"
#include "store/schema.h"

namespace aq {

struct ParquetSink::State {
  std::string path;
  std::shared_ptr<arrow::Schema> schema;
  std::shared_ptr<arrow::io::FileOutputStream> out;
  std::unique_ptr<parquet::arrow::FileWriter> writer;
};

ParquetSink::ParquetSink(std::unique_ptr<State> s) : state_(std::move(s)) {}
ParquetSink::~ParquetSink() {
  if (state_ && state_->writer) (void)state_->writer->Close();
}

Result<std::unique_ptr<ParquetSink>> ParquetSink::Open(const std::string& path, const std::string& component) {
  auto s = std::make_unique<State>();
  s->path = path;
  auto kv = arrow::key_value_metadata(
      {"arrowquant.format", "arrowquant.format_version", "arrowquant.component"},
      {kFormatName, std::to_string(kFormatVersion), component});
  s->schema = weights_schema()->WithMetadata(kv);
  AQ_ARROW_ASSIGN(s->out, arrow::io::FileOutputStream::Open(path), path);

  // Codes are high-entropy and large: no dictionary, no compression, no min/max statistics
  // (they would copy bytes of every binary value into the footer).
  parquet::WriterProperties::Builder props;
  props.disable_dictionary()
      ->compression(parquet::Compression::UNCOMPRESSED)
      ->disable_statistics()
      ->version(parquet::ParquetVersion::PARQUET_2_6)
      ->created_by(std::string("arrowquant ") + std::to_string(kFormatVersion));
  auto arrow_props = parquet::ArrowWriterProperties::Builder().store_schema()->build();
  AQ_ARROW_ASSIGN(s->writer,
                  parquet::arrow::FileWriter::Open(*s->schema, arrow::default_memory_pool(), s->out,
                                                   props.build(), arrow_props),
                  path);
  return std::unique_ptr<ParquetSink>(new ParquetSink(std::move(s)));
}

namespace {

// A one-element binary array over memory we own: no copy of the (possibly large) value.
Result<std::shared_ptr<arrow::Array>> binary_view(std::span<const uint8_t> bytes, bool null,
                                                  const std::string& what) {
  if (null) return arrow::MakeArrayOfNull(arrow::binary(), 1).ValueOrDie();
  if (bytes.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    return QuantizationFailure(StrCat(what, " is ", bytes.size(),
                                      " bytes; one stored value is limited to 2 GiB in format version 1"));
  const int32_t offsets[2] = {0, static_cast<int32_t>(bytes.size())};
  auto offset_buf = arrow::Buffer::FromString(std::string(reinterpret_cast<const char*>(offsets), sizeof(offsets)));
  // An empty value (a tensor with a zero dimension) may come as a null pointer; Arrow refuses a
  // null data buffer, so point it at a static byte instead.
  static const uint8_t kNoBytes = 0;
  const uint8_t* data = bytes.empty() ? &kNoBytes : bytes.data();
  auto data_buf = std::make_shared<arrow::Buffer>(data, static_cast<int64_t>(bytes.size()));
  return std::shared_ptr<arrow::Array>(std::make_shared<arrow::BinaryArray>(1, offset_buf, data_buf));
}

std::shared_ptr<arrow::Array> one(const std::shared_ptr<arrow::Scalar>& s) {
  return arrow::MakeArrayFromScalar(*s, 1).ValueOrDie();
}

std::shared_ptr<arrow::Scalar> str(const std::string& v) { return std::make_shared<arrow::StringScalar>(v); }

}  // namespace

Status ParquetSink::Write(const StoredTensorInfo& info, const TensorPayload& payload) {
  if (!state_->writer) return Internal(StrCat(state_->path, ": write after close"));
  const std::string what = StrCat(state_->path, ": tensor '", info.name, "'");

  arrow::Int64Builder shape_b;
  AQ_ARROW_RETURN(shape_b.AppendValues(info.shape), what);
  std::shared_ptr<arrow::Array> shape_values;
  AQ_ARROW_RETURN(shape_b.Finish(&shape_values), what);
  const auto schema = state_->schema;
  auto shape = one(std::make_shared<arrow::ListScalar>(shape_values, schema->field(1)->type()));

  std::shared_ptr<arrow::Array> scheme;
  std::shared_ptr<arrow::Array> metrics;
  if (info.quantized) {
    scheme = one(std::make_shared<arrow::StructScalar>(
        arrow::ScalarVector{std::make_shared<arrow::Int8Scalar>(static_cast<int8_t>(info.scheme.bits)),
                            std::make_shared<arrow::Int32Scalar>(info.scheme.group_size),
                            std::make_shared<arrow::BooleanScalar>(info.scheme.symmetric),
                            str(scale_type_name(info.scheme.scale_type)),
                            str(scale_method_name(info.scheme.method))},
        scheme_type()));
    metrics = one(std::make_shared<arrow::StructScalar>(
        arrow::ScalarVector{std::make_shared<arrow::DoubleScalar>(info.cosine),
                            std::make_shared<arrow::DoubleScalar>(info.relative_error),
                            std::make_shared<arrow::DoubleScalar>(info.sqnr_db),
                            std::make_shared<arrow::DoubleScalar>(info.max_abs_error)},
        metrics_type()));
  } else {
    scheme = arrow::MakeArrayOfNull(scheme_type(), 1).ValueOrDie();
    metrics = arrow::MakeArrayOfNull(metrics_type(), 1).ValueOrDie();
  }

  arrow::Int8Builder rejected_b;
  for (int b : info.rejected_bits) AQ_ARROW_RETURN(rejected_b.Append(static_cast<int8_t>(b)), what);
  std::shared_ptr<arrow::Array> rejected_values;
  AQ_ARROW_RETURN(rejected_b.Finish(&rejected_values), what);
  auto rejected = one(std::make_shared<arrow::ListScalar>(rejected_values, schema->field(10)->type()));

  AQ_ASSIGN_OR_RETURN(auto codes, binary_view(payload.codes, false, what + " codes"));
  AQ_ASSIGN_OR_RETURN(auto scales, binary_view(payload.scales, !info.quantized, what + " scales"));
  AQ_ASSIGN_OR_RETURN(auto zeros, binary_view(payload.zero_points, !info.quantized || info.scheme.symmetric,
                                              what + " zero points"));

  auto table = arrow::Table::Make(
      schema, {one(str(info.name)), shape, one(str(std::string(dtype_name(info.dtype)))),
               one(str(info.quantized ? "quantized" : "raw")), scheme, codes, scales, zeros, metrics,
               one(str(info.reason)), rejected});
  AQ_ARROW_RETURN(table->Validate(), what);
  AQ_ARROW_RETURN(state_->writer->WriteTable(*table, 1), what);
  ++written_;
  return Status::OK();
}

Status ParquetSink::Close() {
  if (!state_->writer) return Status::OK();
  AQ_ARROW_RETURN(state_->writer->Close(), state_->path);
  state_->writer.reset();
  AQ_ARROW_RETURN(state_->out->Close(), state_->path);
  return Status::OK();
}

}  // namespace aq
