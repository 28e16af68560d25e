// Writing the output directory so that nothing is ever half-written: all files go to a hidden
// staging directory beside the destination, which is renamed onto the destination only when
// complete. A failure or Ctrl-C removes the staging directory; the input is never touched.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace aq {

// The run folder inside a staging directory, and the file in it that makes a run resumable.
inline constexpr const char* kRunDirName = ".arrowquant-run";
inline constexpr const char* kResumeFile = "resume.json";

// Every staging directory carries, in its run folder (.arrowquant-run/, removed before the
// rename), an owner file: host, process id, the process's start time and the boot id. A staging
// directory whose owner is dead (killed, crashed) is stale: the next run into the same
// destination removes it, or, with resume, continues from it. A live run's staging directory,
// and one owned by another host, are never touched.
class StagingDir {
 public:
  // Checks the destination (not the input, not inside it, not containing it; absent unless
  // overwrite) and creates the staging directory next to it, after taking the stale ones of dead
  // runs away. With resume, the newest stale one that holds a run folder becomes this run's
  // staging directory instead (resumed_from() names it).
  static Result<StagingDir> Create(const std::string& destination, const std::string& input, bool overwrite,
                                   bool resume = false);
  StagingDir(StagingDir&& o) noexcept;
  StagingDir& operator=(StagingDir&&) = delete;
  ~StagingDir();

  const std::string& path() const { return staging_; }
  const std::string& destination() const { return destination_; }
  // The run's private folder inside the staging directory (owner file, journal).
  std::string run_dir() const;
  // The stale staging directory this run continues from; empty for a fresh one.
  const std::string& resumed_from() const { return resumed_from_; }
  // Empties the staging directory (a resumed one that turned out unusable), keeping the owner.
  Status Reset();
  // Leaves the staging directory in place when this object goes, released (free for any later
  // run to take, this process's too): an interrupted run to resume.
  void Keep();
  // Moves the finished directory into place (replacing an old one when overwrite was given).
  Status Commit();

 private:
  StagingDir(std::string staging, std::string destination, bool overwrite)
      : staging_(std::move(staging)), destination_(std::move(destination)), overwrite_(overwrite) {}
  std::string staging_;
  std::string destination_;
  std::string resumed_from_;
  bool overwrite_ = false;
  bool committed_ = false;
  std::vector<std::string> created_parents_;  // folders made for the destination, deepest first
};

// Stale staging directories (and directories an interrupted replacement moved aside) of dead
// runs for `destination`: the paths, found by name beside it.
std::vector<std::string> stale_staging_dirs(const std::string& destination);

// Copies root/relative to dest/relative, creating folders.
Status copy_relative_file(const std::string& root, const std::string& relative, const std::string& dest);

}  // namespace aq
