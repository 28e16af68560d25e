#include "io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace aq {

Result<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return NotFound(StrCat(path, ": no such file"));
    return IoError(StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return IoError(StrCat(path, ": cannot stat: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return FormatError(StrCat(path, ": not a regular file"));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  const uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return IoError(StrCat(path, ": cannot map ", size, " bytes: ", std::strerror(err)));
    }
    ::madvise(p, size, MADV_SEQUENTIAL);
    data = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file open
  return std::unique_ptr<MappedFile>(new MappedFile(path, data, size));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

void release_pages(const uint8_t* base, uint64_t size, uint64_t offset, uint64_t length) {
  if (base == nullptr || length == 0 || offset >= size) return;
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  // Reading a page maps its neighbours too when they are in the page cache (the kernel's
  // fault-around, 64 KiB aligned windows by default): the first read of a range maps again up to
  // 64 KiB of a range released just before it. So each release also takes back the 64 KiB before
  // its range, which a reader going forward has finished with (one that has not faults them in
  // again).
  constexpr uint64_t kFaultAround = 64 << 10;
  const uint64_t begin = (offset > kFaultAround ? offset - kFaultAround : 0) / page * page;
  const uint64_t end = (std::min(size, offset + length) + page - 1) / page * page;
  ::madvise(const_cast<uint8_t*>(base) + begin, end - begin, MADV_DONTNEED);
}

}  // namespace aq
