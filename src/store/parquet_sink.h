// Writes weights.parquet one tensor at a time (one row group each), so memory holds only the
// tensor being written.
#pragma once

#include <map>
#include <memory>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "store/format.h"

namespace arrow {
class Table;
}

namespace aq {

// The one-row table weights.parquet stores for a tensor (schema: weights_schema()), or for one
// piece of it (split_pieces) when `piece` is given. Its data columns are views of the payload's
// memory, which must outlive the table. `where` (a path) prefixes errors.
Result<std::shared_ptr<arrow::Table>> tensor_row_table(const StoredTensorInfo& info, const TensorPayload& payload,
                                                       const std::string& where, const PieceSpan* piece = nullptr);

class ParquetSink {
 public:
  // key_value: file-level metadata (format version and component are added here).
  static Result<std::unique_ptr<ParquetSink>> Open(const std::string& path, const std::string& component);
  ~ParquetSink();

  // Writes the tensor as one row, or as pieces of at most max_piece_bytes (split_pieces with
  // unit_rows) when it is bigger.
  Status Write(const StoredTensorInfo& info, const TensorPayload& payload, uint64_t unit_rows = 1,
               uint64_t max_piece_bytes = UINT64_MAX);
  // Writes a row made by tensor_row_table (possibly read back from a journal) as the next tensor.
  Status WriteRow(const arrow::Table& row, const std::string& name);
  Status Close();
  uint64_t rows_written() const { return written_; }  // tensors, and pieces counted each

 private:
  struct State;
  explicit ParquetSink(std::unique_ptr<State> s);
  std::unique_ptr<State> state_;
  uint64_t written_ = 0;
};

}  // namespace aq
