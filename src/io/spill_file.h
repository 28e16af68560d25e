// A scratch file for the codes of a tensor too big to hold in memory while it is encoded and
// journaled (a 7B model's embedding: 0.6 GB at Q8_0, more for bigger vocabularies). It is created
// unlinked in a folder of the run, so nothing is left behind whatever ends the process; it is
// written with pwrite, so the bytes go to the page cache and not to this process's resident set;
// then mapped read-only for the readers (the journal, the output-error check), which hand each
// range's pages back once done with it. Memory then follows the pieces in flight, not the
// tensor's size.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/status.h"

namespace aq {

class SpillFile {
 public:
  // An empty file in `dir` (created when missing); `what` names it in errors ("tensor 'x'").
  static Result<std::shared_ptr<SpillFile>> Create(const std::string& dir, std::string what);
  ~SpillFile();
  SpillFile(const SpillFile&) = delete;
  SpillFile& operator=(const SpillFile&) = delete;

  // Writes n bytes at offset (thread-safe for disjoint ranges; the file grows as needed).
  Status Write(uint64_t offset, const uint8_t* p, uint64_t n);
  // Reads n bytes at offset.
  Status Read(uint64_t offset, uint8_t* p, uint64_t n) const;
  // After the last Write: maps the first `size` bytes read-only (bytes() views them).
  Status Map(uint64_t size);
  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  // Drops the mapped pages holding [offset, offset + n) from the resident set (release_pages:
  // their bytes stay in the file; a later read faults them back in).
  void release(uint64_t offset, uint64_t n) const;

 private:
  SpillFile(int fd, std::string where) : fd_(fd), where_(std::move(where)) {}
  int fd_ = -1;
  std::string where_;  // for errors: the folder and what the file holds
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace aq
