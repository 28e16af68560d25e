// Reads weights.parquet: the per-tensor descriptions up front (small columns only), the data of
// one tensor on demand (one row group, or one per piece of a tensor stored in pieces).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "store/format.h"

namespace aq {

// A tensor's data as read: the views stay valid while this object lives (moving it is fine).
struct LoadedTensor {
  TensorPayload payload;
  std::shared_ptr<EntropySide> entropy;               // entropy-coded tensors
  std::shared_ptr<const FrequencyTable> table;        // their rANS decoding table
  std::shared_ptr<void> keep_alive;
};

// A tensor's data in buffers of their exact size that the holder owns (read_owned).
struct OwnedTensor {
  std::vector<uint8_t> codes, scales, zero_points;
  std::shared_ptr<EntropySide> entropy;
  std::shared_ptr<const FrequencyTable> table;
  TensorPayload view() const;
};

class ParquetSource {
 public:
  static Result<std::unique_ptr<ParquetSource>> Open(const std::string& path);
  ~ParquetSource();

  const std::string& path() const { return path_; }
  const std::vector<StoredTensorInfo>& tensors() const { return infos_; }
  std::optional<size_t> find(const std::string& name) const;

  // The whole tensor: a tensor stored in pieces is gathered into one buffer per value.
  Result<LoadedTensor> read(size_t index) const;
  // The whole tensor copied into buffers of their exact size, a piece at a time: the tensor and
  // one piece's read buffers in memory at once. (read() of a tensor stored whole hands out the
  // Parquet reader's buffers, which Arrow grows by doubling: a holder keeps this instead.)
  Result<OwnedTensor> read_owned(size_t index) const;
  // Piece `piece` of tensor `index` (tensors().pieces[piece] says which rows), as a tensor of
  // those rows: its own entropy chunk offsets, checked against its scheme. Decoding a tensor
  // piece by piece holds one piece's data at a time.
  Result<LoadedTensor> read_piece(size_t index, size_t piece) const;
  // Reconstructs tensor `index` as float32 into out (numel floats): the quantized tensor
  // dequantized, or a raw tensor converted from its source dtype. Reads one piece at a time.
  Status dequantize(size_t index, float* out) const;

 private:
  struct State;
  ParquetSource(std::string path, std::unique_ptr<State> s);
  // The data columns of one row group, unchecked.
  Result<LoadedTensor> read_group(int row_group, const std::string& where) const;
  // Piece 0's entropy tables of tensor `index` (cached: the last tensor whose piece 0 was read or
  // asked for).
  Result<std::shared_ptr<const EntropySide>> entropy_tables(size_t index) const;
  std::string path_;
  std::unique_ptr<State> state_;
  std::vector<StoredTensorInfo> infos_;
  std::map<std::string, size_t> by_name_;
};

}  // namespace aq
