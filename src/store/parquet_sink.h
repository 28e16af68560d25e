// Writes weights.parquet one tensor at a time (one row group each), so memory holds only the
// tensor being written.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "common/status.h"
#include "store/format.h"

namespace aq {

class ParquetSink {
 public:
  // key_value: file-level metadata (format version and component are added here).
  static Result<std::unique_ptr<ParquetSink>> Open(const std::string& path, const std::string& component);
  ~ParquetSink();

  Status Write(const StoredTensorInfo& info, const TensorPayload& payload);
  Status Close();
  uint64_t tensors_written() const { return written_; }

 private:
  struct State;
  explicit ParquetSink(std::unique_ptr<State> s);
  std::unique_ptr<State> state_;
  uint64_t written_ = 0;
};

}  // namespace aq
