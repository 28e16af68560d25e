#include "io/spill_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "io/mapped_file.h"

namespace aq {

Result<std::shared_ptr<SpillFile>> SpillFile::Create(const std::string& dir, std::string what) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return IoError(StrCat(dir, ": cannot create: ", ec.message()));
  const std::string where = StrCat(dir, ": scratch file for the codes of ", what);
  // Unnamed from the start where the file system allows it, else named and unlinked at once.
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::string path = (std::filesystem::path(dir) / "spill-XXXXXX").string();
    fd = ::mkostemp(path.data(), O_CLOEXEC);
    if (fd < 0) return IoError(StrCat(where, ": cannot create: ", std::strerror(errno)));
    ::unlink(path.c_str());
  }
  return std::shared_ptr<SpillFile>(new SpillFile(fd, where));
}

SpillFile::~SpillFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
}

Status SpillFile::Write(uint64_t offset, const uint8_t* p, uint64_t n) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return IoError(StrCat(where_, ": write of ", n, " bytes at ", offset, " failed: ",
                                      w < 0 ? std::strerror(errno) : "nothing written"));
    p += w, offset += static_cast<uint64_t>(w), n -= static_cast<uint64_t>(w);
  }
  return Status::OK();
}

Status SpillFile::Read(uint64_t offset, uint8_t* p, uint64_t n) const {
  while (n > 0) {
    const ssize_t r = ::pread(fd_, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return IoError(StrCat(where_, ": read of ", n, " bytes at ", offset, " failed: ",
                                      r < 0 ? std::strerror(errno) : "end of file"));
    p += r, offset += static_cast<uint64_t>(r), n -= static_cast<uint64_t>(r);
  }
  return Status::OK();
}

Status SpillFile::Map(uint64_t size) {
  if (data_ != nullptr) return Internal(StrCat(where_, ": mapped twice"));
  if (size == 0) return Status::OK();
  // Bytes never written (a tensor whose codes end in zeros written nowhere) read as zeros.
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0)
    return IoError(StrCat(where_, ": cannot size to ", size, " bytes: ", std::strerror(errno)));
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd_, 0);
  if (m == MAP_FAILED) return IoError(StrCat(where_, ": cannot map ", size, " bytes: ", std::strerror(errno)));
  ::madvise(m, size, MADV_SEQUENTIAL);
  data_ = static_cast<const uint8_t*>(m);
  size_ = size;
  return Status::OK();
}

void SpillFile::release(uint64_t offset, uint64_t n) const { release_pages(data_, size_, offset, n); }

}  // namespace aq
