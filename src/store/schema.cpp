#include "store/schema.h"

namespace aq {

// Children are nullable because a null struct (a raw tensor) stores null children in Parquet.
std::shared_ptr<arrow::DataType> scheme_type() {
  return arrow::struct_({
      arrow::field("kind", arrow::utf8(), true),          // "affine" | "entropy"
      arrow::field("bits", arrow::int8(), true),
      arrow::field("group_size", arrow::int32(), true),  // 0 = one group per row
      arrow::field("symmetric", arrow::boolean(), true),
      arrow::field("scale_type", arrow::utf8(), true),   // "f16" | "f32"
      arrow::field("method", arrow::utf8(), true),       // how scales were chosen
      arrow::field("rotation", arrow::int32(), true),     // Hadamard block size; 1 = not rotated
      arrow::field("target_bpw", arrow::float64(), true), // entropy: the budget aimed at
  });
}

std::shared_ptr<arrow::DataType> metrics_type() {
  return arrow::struct_({
      arrow::field("cosine", arrow::float64(), true),
      arrow::field("relative_error", arrow::float64(), true),
      arrow::field("sqnr_db", arrow::float64(), true),
      arrow::field("max_abs_error", arrow::float64(), true),
  });
}

std::shared_ptr<arrow::DataType> entropy_type() {
  return arrow::struct_({
      arrow::field("symbol_min", arrow::int32(), true),
      arrow::field("frequencies", arrow::list(arrow::field("item", arrow::uint16(), false)), true),
      arrow::field("escape_symbol", arrow::int32(), true),
      arrow::field("chunk_rows", arrow::int32(), true),
      arrow::field("chunk_offsets", arrow::list(arrow::field("item", arrow::uint32(), false)), true),
      arrow::field("centroids", arrow::list(arrow::field("item", arrow::float32(), false)), true),
  });
}

std::shared_ptr<arrow::Schema> weights_schema() {
  using arrow::field;
  return arrow::schema({
      field(column::kName, arrow::utf8(), false),
      field(column::kShape, arrow::list(field("item", arrow::int64(), false)), false),
      field(column::kDType, arrow::utf8(), false),
      field(column::kEncoding, arrow::utf8(), false),  // "quantized" | "raw"
      field(column::kScheme, scheme_type(), true),
      field(column::kCodes, arrow::binary(), false),
      field(column::kScales, arrow::binary(), true),
      field(column::kZeroPoints, arrow::binary(), true),
      field(column::kEntropy, entropy_type(), true),
      field(column::kMetrics, metrics_type(), true),
      field(column::kReason, arrow::utf8(), false),
      field(column::kRejectedBits, arrow::list(field("item", arrow::int8(), false)), false),
      field(column::kStoredBytes, arrow::int64(), false),
      field(column::kInputScale, arrow::list(field("item", arrow::float32(), false)), true),  // version 2
      field(column::kPiece, arrow::int32(), false),     // version 4: which piece of the tensor this row is
      field(column::kRowStart, arrow::int64(), false),  // version 4: its first row of the 2-D view
      field(column::kRowCount, arrow::int64(), false),  // version 4: how many rows it holds
  });
}

}  // namespace aq
