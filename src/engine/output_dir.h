// Writing the output directory so that nothing is ever half-written: all files go to a hidden
// staging directory beside the destination, which is renamed onto the destination only when
// complete. A failure or Ctrl-C removes the staging directory; the input is never touched.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace aq {

class StagingDir {
 public:
  // Checks the destination (not the input, not inside it, not containing it; absent unless
  // overwrite) and creates the staging directory next to it.
  static Result<StagingDir> Create(const std::string& destination, const std::string& input, bool overwrite);
  StagingDir(StagingDir&& o) noexcept;
  StagingDir& operator=(StagingDir&&) = delete;
  ~StagingDir();

  const std::string& path() const { return staging_; }
  const std::string& destination() const { return destination_; }
  // Moves the finished directory into place (replacing an old one when overwrite was given).
  Status Commit();

 private:
  StagingDir(std::string staging, std::string destination, bool overwrite)
      : staging_(std::move(staging)), destination_(std::move(destination)), overwrite_(overwrite) {}
  std::string staging_;
  std::string destination_;
  bool overwrite_ = false;
  bool committed_ = false;
  std::vector<std::string> created_parents_;  // folders made for the destination, deepest first
};

// Copies root/relative to dest/relative, creating folders.
Status copy_relative_file(const std::string& root, const std::string& relative, const std::string& dest);

}  // namespace aq
