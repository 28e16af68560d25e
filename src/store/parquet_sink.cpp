#include "store/parquet_sink.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/writer.h>
#include <parquet/properties.h>

#include <limits>

#include "store/arrow_status.h"
#include "store/schema.h"
#include "quant/hadamard.h"

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
                                      " bytes; one stored value is limited to 2 GiB (a smaller piece_bytes splits the tensor)"));
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

template <typename Builder, typename T>
std::shared_ptr<arrow::Scalar> list_scalar(const std::vector<T>& values, const std::shared_ptr<arrow::DataType>& list_type) {
  Builder b;
  (void)b.AppendValues(values);
  std::shared_ptr<arrow::Array> items;
  (void)b.Finish(&items);
  return std::make_shared<arrow::ListScalar>(items, list_type);
}

template <typename Builder, typename T>
std::shared_ptr<arrow::Array> list_of(const std::vector<T>& values, const std::shared_ptr<arrow::DataType>& list_type) {
  return one(list_scalar<Builder>(values, list_type));
}

}  // namespace

Result<std::shared_ptr<arrow::Table>> tensor_row_table(const StoredTensorInfo& info, const TensorPayload& whole,
                                                       const std::string& where, const PieceSpan* piece) {
  const std::string what = piece && piece->index > 0 ? StrCat(where, ": tensor '", info.name, "' piece ", piece->index)
                                                     : StrCat(where, ": tensor '", info.name, "'");
  const TensorPayload& payload = piece ? piece->payload : whole;
  const bool first = !piece || piece->index == 0;
  const auto schema = weights_schema();
  auto type_of = [&](const char* name) { return schema->GetFieldByName(name)->type(); };

  auto shape = list_of<arrow::Int64Builder>(info.shape, type_of(column::kShape));
  std::vector<int8_t> rejected_bits(info.rejected_bits.begin(), info.rejected_bits.end());
  auto rejected = list_of<arrow::Int8Builder>(rejected_bits, type_of(column::kRejectedBits));

  std::shared_ptr<arrow::Array> scheme, metrics, entropy;
  const QuantScheme& q = info.scheme;
  const bool is_entropy = info.quantized && q.kind == SchemeKind::kEntropy;
  const bool has_tables = is_entropy && first;  // later pieces use piece 0's
  if (info.quantized) {
    const int rotation = q.rotate ? rotation_block(info.cols()) : 1;
    scheme = one(std::make_shared<arrow::StructScalar>(
        arrow::ScalarVector{str(q.kind == SchemeKind::kGgml ? ggml_traits(q.ggml).name : scheme_kind_name(q.kind)),
                            std::make_shared<arrow::Int8Scalar>(static_cast<int8_t>(q.bits)),
                            std::make_shared<arrow::Int32Scalar>(q.group_size),
                            std::make_shared<arrow::BooleanScalar>(q.symmetric),
                            str(scale_type_name(q.scale_type)), str(scale_method_name(q.method)),
                            std::make_shared<arrow::Int32Scalar>(rotation),
                            is_entropy ? std::static_pointer_cast<arrow::Scalar>(
                                             std::make_shared<arrow::DoubleScalar>(q.entropy_budget()))
                                       : arrow::MakeNullScalar(arrow::float64())},
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
  if (has_tables) {
    if (!payload.entropy) return Internal(what + ": entropy-coded tensor without its tables");
    const EntropySide& e = *payload.entropy;
    auto et = std::static_pointer_cast<arrow::StructType>(entropy_type());
    entropy = one(std::make_shared<arrow::StructScalar>(
        arrow::ScalarVector{std::make_shared<arrow::Int32Scalar>(e.symbol_min),
                            list_scalar<arrow::UInt16Builder>(e.frequencies, et->GetFieldByName("frequencies")->type()),
                            std::make_shared<arrow::Int32Scalar>(e.escape_symbol),
                            std::make_shared<arrow::Int32Scalar>(static_cast<int32_t>(e.chunk_rows)),
                            list_scalar<arrow::UInt32Builder>(e.chunk_offsets, et->GetFieldByName("chunk_offsets")->type()),
                            list_scalar<arrow::FloatBuilder>(e.centroids, et->GetFieldByName("centroids")->type())},
        entropy_type()));
  } else {
    entropy = arrow::MakeArrayOfNull(entropy_type(), 1).ValueOrDie();
  }

  AQ_ASSIGN_OR_RETURN(auto codes, binary_view(payload.codes, false, what + " codes"));
  AQ_ASSIGN_OR_RETURN(auto scales, binary_view(payload.scales, !info.quantized, what + " scales"));
  AQ_ASSIGN_OR_RETURN(auto zeros, binary_view(payload.zero_points, !info.quantized || q.symmetric || is_entropy,
                                              what + " zero points"));

  auto table = arrow::Table::Make(
      schema, {one(str(info.name)), shape, one(str(std::string(dtype_name(info.dtype)))),
               one(str(info.quantized ? "quantized" : "raw")), scheme, codes, scales, zeros, entropy, metrics,
               one(str(info.reason)), rejected,
               one(std::make_shared<arrow::Int64Scalar>(
                   static_cast<int64_t>(piece ? piece->stored : info.stored_bytes()))),
               info.input_scale.empty() || !first
                   ? arrow::MakeArrayOfNull(type_of(column::kInputScale), 1).ValueOrDie()
                   : list_of<arrow::FloatBuilder>(info.input_scale, type_of(column::kInputScale)),
               one(std::make_shared<arrow::Int32Scalar>(piece ? static_cast<int32_t>(piece->index) : 0)),
               one(std::make_shared<arrow::Int64Scalar>(piece ? static_cast<int64_t>(piece->row_start) : 0)),
               one(std::make_shared<arrow::Int64Scalar>(
                   static_cast<int64_t>(piece ? piece->row_count : info.rows())))});
  AQ_ARROW_RETURN(table->Validate(), what);
  return table;
}

Status ParquetSink::Write(const StoredTensorInfo& info, const TensorPayload& payload, uint64_t unit_rows,
                          uint64_t max_piece_bytes) {
  if (!state_->writer) return Internal(StrCat(state_->path, ": write after close"));
  AQ_ASSIGN_OR_RETURN(auto pieces, split_pieces(info, payload, unit_rows, max_piece_bytes));
  for (const PieceSpan& p : pieces) {
    AQ_ASSIGN_OR_RETURN(auto table, tensor_row_table(info, payload, state_->path, pieces.size() > 1 ? &p : nullptr));
    AQ_RETURN_IF_ERROR(WriteRow(*table, info.name));
  }
  return Status::OK();
}

Status ParquetSink::WriteRow(const arrow::Table& row, const std::string& name) {
  const std::string what = StrCat(state_->path, ": tensor '", name, "'");
  if (!state_->writer) return Internal(what + ": write after close");
  if (row.num_rows() != 1 || !row.schema()->Equals(*weights_schema(), /*check_metadata=*/false))
    return Internal(StrCat(what, ": not a one-row table of the weights schema"));
  // The sink's schema carries the file's key-value metadata; the columns are the row's.
  auto table = arrow::Table::Make(state_->schema, row.columns(), 1);
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
