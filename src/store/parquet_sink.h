// Writes weights.parquet one tensor at a time (one row group each), so memory holds only the
// tensor being written.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "common/status.h"
#include "store/format.h"

namespace arrow {
class Table;
}

namespace aq {

// The one-row table weights.parquet stores for a tensor (schema: weights_schema()). Its data
// columns are views of the payload's memory, which must outlive the table. `where` (a path)
// prefixes errors.
Result<std::shared_ptr<arrow::Table>> tensor_row_table(const StoredTensorInfo& info, const TensorPayload& payload,
                                                       const std::string& where);

class ParquetSink {
 public:
  // key_value: file-level metadata (format version and component are added here).
  static Result<std::unique_ptr<ParquetSink>> Open(const std::string& path, const std::string& component);
  ~ParquetSink();

  Status Write(const StoredTensorInfo& info, const TensorPayload& payload);
  // Writes a row made by tensor_row_table (possibly read back from a journal) as the next tensor.
  Status WriteRow(const arrow::Table& row, const std::string& name);
  Status Close();
  uint64_t tensors_written() const { return written_; }

 private:
  struct State;
  explicit ParquetSink(std::unique_ptr<State> s);
  std::unique_ptr<State> state_;
  uint64_t written_ = 0;
};

}  // namespace aq
