#include "engine/output_dir.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>

namespace aq {

namespace fs = std::filesystem;

namespace {

// True when `inner` is `outer` or lies inside it (both absolute and normalized).
bool is_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

fs::path normalized(const std::string& p) {
  std::error_code ec;
  fs::path abs = fs::weakly_canonical(fs::absolute(p, ec), ec);
  if (ec) abs = fs::absolute(p).lexically_normal();
  // "out/" names the folder "out": drop a trailing separator so parent_path() is out's parent
  while (!abs.has_filename() && abs.has_parent_path() && abs != abs.root_path()) abs = abs.parent_path();
  return abs;
}

std::string unique_suffix() {
  static std::atomic<uint64_t> counter{0};
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  return StrCat(::getpid(), "-", now, "-", counter.fetch_add(1));
}

}  // namespace

Result<StagingDir> StagingDir::Create(const std::string& destination, const std::string& input, bool overwrite) {
  if (destination.empty()) return InvalidConfig("output_path is empty");
  const fs::path dest = normalized(destination);
  const fs::path in = normalized(input);
  if (dest == in) return InvalidConfig(StrCat("output_path ", destination, " is the input model itself"));
  if (fs::is_directory(in) && is_within(dest, in))
    return InvalidConfig(StrCat("output_path ", destination, " lies inside the input model directory ", input,
                                "; choose a folder outside it"));
  if (is_within(in, dest))
    return InvalidConfig(StrCat("output_path ", destination, " contains the input model ", input,
                                "; writing there could destroy the input"));
  std::error_code ec;
  if (fs::exists(dest, ec)) {
    if (!overwrite)
      return InvalidConfig(StrCat("output_path ", destination, " already exists; pass overwrite=True (--overwrite) to replace it"));
    if (!fs::is_directory(dest))
      return InvalidConfig(StrCat("output_path ", destination, " exists and is not a directory"));
  }
  const fs::path parent = dest.parent_path();
  // Remember which folders we create, so that a failed run can take them away again.
  std::vector<std::string> created;
  for (fs::path p = parent; !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
    created.push_back(p.string());
    if (p == p.root_path()) break;
  }
  fs::create_directories(parent, ec);
  if (ec) return IoError(StrCat(parent.string(), ": cannot create: ", ec.message()));
  const fs::path staging = parent / StrCat(".", dest.filename().string(), ".arrowquant-tmp-", unique_suffix());
  fs::create_directory(staging, ec);
  if (ec) return IoError(StrCat(staging.string(), ": cannot create: ", ec.message()));
  StagingDir dir(staging.string(), dest.string(), overwrite);
  dir.created_parents_ = std::move(created);
  return dir;
}

StagingDir::StagingDir(StagingDir&& o) noexcept
    : staging_(std::move(o.staging_)), destination_(std::move(o.destination_)),
      overwrite_(o.overwrite_), committed_(o.committed_), created_parents_(std::move(o.created_parents_)) {
  o.committed_ = true;  // the moved-from object owns nothing
}

StagingDir::~StagingDir() {
  if (committed_ || staging_.empty()) return;
  std::error_code ec;
  fs::remove_all(staging_, ec);
  // deepest first; fs::remove leaves a folder that is no longer empty alone
  for (const auto& d : created_parents_) fs::remove(d, ec);
}

Status StagingDir::Commit() {
  std::error_code ec;
  fs::path old;
  if (fs::exists(destination_, ec)) {
    if (!overwrite_) return InvalidConfig(StrCat("output_path ", destination_, " appeared while quantizing; not replacing it"));
    const fs::path dest(destination_);
    old = dest.parent_path() / StrCat(".", dest.filename().string(), ".arrowquant-old-", unique_suffix());
    fs::rename(destination_, old, ec);
    if (ec) return IoError(StrCat(destination_, ": cannot move the old output aside: ", ec.message()));
  }
  fs::rename(staging_, destination_, ec);
  if (ec) {
    if (!old.empty()) {
      std::error_code ec2;
      fs::rename(old, destination_, ec2);
    }
    return IoError(StrCat(destination_, ": cannot rename the finished output into place: ", ec.message()));
  }
  committed_ = true;
  if (!old.empty()) fs::remove_all(old, ec);
  return Status::OK();
}

Status copy_relative_file(const std::string& root, const std::string& relative, const std::string& dest) {
  std::error_code ec;
  const fs::path rel = fs::path(relative).lexically_normal();
  if (rel.is_absolute() || rel.empty() || *rel.begin() == "..")
    return Internal(StrCat(relative, ": not a path inside ", root, "; nothing is copied outside the output"));
  const fs::path to = fs::path(dest) / rel;
  fs::create_directories(to.parent_path(), ec);
  if (ec) return IoError(StrCat(to.parent_path().string(), ": cannot create: ", ec.message()));
  fs::copy_file(fs::path(root) / relative, to, fs::copy_options::overwrite_existing, ec);
  if (ec) return IoError(StrCat((fs::path(root) / relative).string(), ": cannot copy: ", ec.message()));
  return Status::OK();
}

}  // namespace aq
