// A read-only memory map of one file. Pages are touched only when a tensor is read and are
// handed back to the OS (release) once the tensor has been quantized, so the resident set
// stays bounded by the tensors in flight, not by the model's size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace aq {

// Drops every page of the read-only file mapping [base, base + size) that holds a byte of
// [offset, offset + length) from this process's resident set (madvise MADV_DONTNEED). The file is
// unchanged, and a later read of a page (a neighbouring range sharing the first or last one,
// perhaps on another thread) faults it back in from the page cache: so pages are rounded
// outwards, and a tensor released block by block leaves no page behind at its block boundaries.
void release_pages(const uint8_t* base, uint64_t size, uint64_t offset, uint64_t length);

class MappedFile {
 public:
  static Result<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

  // release_pages over this file's mapping.
  void release(uint64_t offset, uint64_t length) const { release_pages(data_, size_, offset, length); }

 private:
  MappedFile(std::string path, const uint8_t* data, uint64_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace aq
