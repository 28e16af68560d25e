#include "engine/output_dir.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

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

std::string read_small_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return {};
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string this_host() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

std::string boot_id() { return trim(read_small_file("/proc/sys/kernel/random/boot_id")); }

// Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, it names one process
// even after the pid is reused. Empty when the process does not exist.
std::string process_start(long pid) {
  const std::string stat = read_small_file(StrCat("/proc/", pid, "/stat"));
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return {};
  std::istringstream fields(stat.substr(paren + 1));
  std::string f;
  for (int i = 3; i <= 22 && (fields >> f); ++i) {}
  return f;
}

struct Owner {
  std::string host, start, boot;
  long pid = 0;
};

std::string owner_text() {
  const long pid = static_cast<long>(::getpid());
  return StrCat("host ", this_host(), "\npid ", pid, "\nstart ", process_start(pid), "\nboot ", boot_id(), "\n");
}

std::optional<Owner> read_owner(const fs::path& staging) {
  const std::string text = read_small_file(staging / kRunDirName / "owner");
  if (text.empty()) return std::nullopt;
  Owner o;
  std::istringstream in(text);
  std::string key, value;
  while (in >> key >> value) {
    if (key == "host") o.host = value;
    else if (key == "pid") o.pid = std::strtol(value.c_str(), nullptr, 10);
    else if (key == "start") o.start = value;
    else if (key == "boot") o.boot = value;
  }
  if (o.pid <= 0 || o.host.empty()) return std::nullopt;
  return o;
}

bool pid_alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

// The leading process id of a staging or moved-aside name's suffix ("<pid>-<time>-<n>").
long pid_of(const std::string& suffix) { return std::strtol(suffix.c_str(), nullptr, 10); }

bool named_pid_dead(const std::string& suffix) {
  const long pid = pid_of(suffix);
  return pid > 0 && pid != static_cast<long>(::getpid()) && !pid_alive(pid);
}

// Dead: the owner's process is gone (or this machine rebooted since). Another host's directory
// is never judged dead; a directory without an owner file (killed in the instant between its
// creation and the owner's write, or moved aside by a replacement) by the pid in its name.
bool owner_dead(const fs::path& dir, const std::string& suffix) {
  std::error_code ec;
  if (fs::exists(dir / kRunDirName / "released", ec)) return true;
  if (auto o = read_owner(dir)) {
    if (o->host != this_host()) return false;
    if (!o->boot.empty() && o->boot != boot_id()) return true;
    const std::string now = process_start(o->pid);
    if (now.empty()) return !pid_alive(o->pid);  // no /proc: ask the kernel
    return now != o->start;
  }
  return named_pid_dead(suffix);
}

std::string tmp_prefix(const fs::path& dest) { return StrCat(".", dest.filename().string(), ".arrowquant-tmp-"); }
std::string old_prefix(const fs::path& dest) { return StrCat(".", dest.filename().string(), ".arrowquant-old-"); }
std::string trash_prefix(const fs::path& dest) { return StrCat(".", dest.filename().string(), ".arrowquant-trash-"); }

// Removes a directory another process might also be looking at: it is first renamed to a name
// of this process's own (only one rename can win), then deleted.
void remove_claimed(const fs::path& dir, const fs::path& dest) {
  std::error_code ec;
  const fs::path trash = dir.parent_path() / StrCat(trash_prefix(dest), unique_suffix());
  fs::rename(dir, trash, ec);
  if (!ec) fs::remove_all(trash, ec);
}

Status write_owner(const fs::path& staging) {
  std::error_code ec;
  fs::create_directories(staging / kRunDirName, ec);
  if (ec) return IoError(StrCat((staging / kRunDirName).string(), ": cannot create: ", ec.message()));
  const fs::path p = staging / kRunDirName / "owner";
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << owner_text();
  out.close();
  if (!out) return IoError(StrCat(p.string(), ": write failed"));
  return Status::OK();
}

// Directories of dead runs beside dest: staging ones (tmp), moved-aside outputs (old) and
// directories a run was deleting when it died (trash).
void find_stale(const fs::path& dest, std::vector<fs::path>* tmp, std::vector<fs::path>* old,
                std::vector<fs::path>* trash) {
  std::error_code ec;
  const std::string tp = tmp_prefix(dest), op = old_prefix(dest), rp = trash_prefix(dest);
  for (const auto& e : fs::directory_iterator(dest.parent_path(), ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory(ec)) continue;
    if (name.starts_with(tp) && owner_dead(e.path(), name.substr(tp.size()))) tmp->push_back(e.path());
    else if (name.starts_with(op) && owner_dead(e.path(), name.substr(op.size()))) old->push_back(e.path());
    else if (name.starts_with(rp) && named_pid_dead(name.substr(rp.size()))) trash->push_back(e.path());
  }
  std::sort(tmp->begin(), tmp->end());
  std::sort(old->begin(), old->end());
}

}  // namespace

std::vector<std::string> stale_staging_dirs(const std::string& destination) {
  std::vector<fs::path> tmp, old, trash;
  find_stale(normalized(destination), &tmp, &old, &trash);
  std::vector<std::string> out;
  for (const auto* v : {&tmp, &old, &trash})
    for (const auto& p : *v) out.push_back(p.string());
  return out;
}

void StagingDir::Keep() {
  committed_ = true;
  std::ofstream(fs::path(run_dir()) / "released") << owner_text();
  std::error_code ec;
  fs::remove(fs::path(run_dir()) / "owner", ec);
}

std::string StagingDir::run_dir() const { return (fs::path(staging_) / kRunDirName).string(); }

Status StagingDir::Reset() {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(staging_, ec))
    if (e.path().filename() != kRunDirName) fs::remove_all(e.path(), ec);
  for (const auto& e : fs::directory_iterator(run_dir(), ec))
    if (e.path().filename() != "owner") fs::remove_all(e.path(), ec);
  if (ec) return IoError(StrCat(staging_, ": cannot empty: ", ec.message()));
  return Status::OK();
}

Result<StagingDir> StagingDir::Create(const std::string& destination, const std::string& input, bool overwrite,
                                      bool resume) {
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
  // Runs that died: an output an interrupted replacement moved aside goes back into place when
  // nothing took its place (else it is removed); staging directories are removed, or continued.
  std::vector<fs::path> stale, moved_aside, trash;
  if (fs::is_directory(dest.parent_path(), ec)) find_stale(dest, &stale, &moved_aside, &trash);
  for (const auto& t : trash) remove_claimed(t, dest);
  for (const auto& old : moved_aside) {
    if (!fs::exists(dest, ec)) fs::rename(old, dest, ec);
    else remove_claimed(old, dest);
  }
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
  const fs::path staging = parent / StrCat(tmp_prefix(dest), unique_suffix());
  // With resume: the newest stale directory that holds a resumable run, claimed by renaming it.
  std::string resumed;
  if (resume) {
    std::optional<fs::path> best;
    fs::file_time_type best_time{};
    for (const auto& d : stale) {
      const fs::path f = d / kRunDirName / kResumeFile;
      if (!fs::is_regular_file(f, ec)) continue;
      const auto t = fs::last_write_time(f, ec);
      if (!ec && (!best || t > best_time)) best = d, best_time = t;
    }
    if (best) {
      fs::rename(*best, staging, ec);
      if (!ec) resumed = best->string();
    }
  }
  for (const auto& d : stale)
    if (d.string() != resumed) remove_claimed(d, dest);
  if (resumed.empty()) {
    fs::create_directory(staging, ec);
    if (ec) return IoError(StrCat(staging.string(), ": cannot create: ", ec.message()));
  }
  StagingDir dir(staging.string(), dest.string(), overwrite);
  dir.created_parents_ = std::move(created);
  dir.resumed_from_ = resumed;
  // released marker first: without either file the directory is judged by the pid in its name (ours)
  fs::remove(staging / kRunDirName / "released", ec);
  AQ_RETURN_IF_ERROR(write_owner(staging));
  return dir;
}

StagingDir::StagingDir(StagingDir&& o) noexcept
    : staging_(std::move(o.staging_)), destination_(std::move(o.destination_)),
      resumed_from_(std::move(o.resumed_from_)), overwrite_(o.overwrite_), committed_(o.committed_),
      created_parents_(std::move(o.created_parents_)) {
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
  fs::remove_all(run_dir(), ec);
  if (ec) return IoError(StrCat(run_dir(), ": cannot remove: ", ec.message()));
  fs::path old;
  if (fs::exists(destination_, ec)) {
    if (!overwrite_) return InvalidConfig(StrCat("output_path ", destination_, " appeared while quantizing; not replacing it"));
    const fs::path dest(destination_);
    old = dest.parent_path() / StrCat(old_prefix(dest), unique_suffix());
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
