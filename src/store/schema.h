// The Arrow schema of weights.parquet (format version 4; older versions lack some columns), shared by the sink and the source.
#pragma once

#include <arrow/type.h>

#include <memory>

namespace aq {

namespace column {
inline constexpr const char* kName = "name";
inline constexpr const char* kShape = "shape";
inline constexpr const char* kDType = "dtype";
inline constexpr const char* kEncoding = "encoding";
inline constexpr const char* kScheme = "scheme";
inline constexpr const char* kCodes = "codes";
inline constexpr const char* kScales = "scales";
inline constexpr const char* kZeroPoints = "zero_points";
inline constexpr const char* kEntropy = "entropy";
inline constexpr const char* kStoredBytes = "stored_bytes";
inline constexpr const char* kInputScale = "input_scale";  // version 2
inline constexpr const char* kPiece = "piece";            // version 4
inline constexpr const char* kRowStart = "row_start";      // version 4
inline constexpr const char* kRowCount = "row_count";      // version 4
inline constexpr const char* kMetrics = "metrics";
inline constexpr const char* kReason = "reason";
inline constexpr const char* kRejectedBits = "rejected_bits";
}  // namespace column

std::shared_ptr<arrow::DataType> scheme_type();
std::shared_ptr<arrow::DataType> metrics_type();
std::shared_ptr<arrow::DataType> entropy_type();
std::shared_ptr<arrow::Schema> weights_schema();

}  // namespace aq
