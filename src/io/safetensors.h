// Reading .safetensors files: 8-byte little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the
// data. Every header is validated before any byte of data is trusted, as the reference
// implementation does: header length capped and inside the file, known dtypes, shape x dtype
// size equal to the byte range, ranges inside the data section, and the ranges covering the data
// exactly (no overlaps, no gaps).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "io/dtype.h"
#include "io/mapped_file.h"

namespace aq {

// The reference implementation refuses headers over 100 MB; so do we.
inline constexpr uint64_t kMaxSafetensorsHeader = 100ull * 1000 * 1000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  uint64_t offset = 0;  // absolute offset of the first byte in the file
  uint64_t nbytes = 0;
};

class SafetensorsFile {
 public:
  static Result<std::shared_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  uint64_t file_size() const { return file_->size(); }
  // Tensors in the order of their data in the file (sequential reads).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  const uint8_t* data(const TensorInfo& t) const { return file_->data() + t.offset; }
  // Gives the tensor's pages back to the OS once it has been consumed.
  void release(const TensorInfo& t) const { file_->release(t.offset, t.nbytes); }
  // Drops the pages of bytes [begin, begin + n) of tensor t (a block already read).
  void release(const TensorInfo& t, uint64_t begin, uint64_t n) const { file_->release(t.offset + begin, n); }

 private:
  explicit SafetensorsFile(std::unique_ptr<MappedFile> f) : file_(std::move(f)) {}
  std::unique_ptr<MappedFile> file_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Validates a header against a data section of `data_size` bytes; exposed for tests and fuzzing.
Result<std::vector<TensorInfo>> parse_safetensors_header(const std::string& path,
                                                         const char* json, size_t json_size,
                                                         uint64_t data_start, uint64_t data_size,
                                                         std::map<std::string, std::string>* metadata);

// Product of a shape with overflow detection; nullopt when it does not fit in 64 bits.
std::optional<uint64_t> shape_numel(const std::vector<int64_t>& shape);

std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace aq
