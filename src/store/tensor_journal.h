// The journal of a run in progress: each finished tensor of a component as its own small Arrow
// IPC file (the row weights.parquet will hold, plus a JSON record of what the report takes from
// it; a tensor in pieces as one file per piece), written under a temporary name and renamed, so that a run killed at any moment leaves
// only complete entries. weights.parquet is then written from the journal in tensor order, and
// a resumed run (quantize_model with resume) continues after the entries it finds.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "store/format.h"

namespace aq {

class ParquetSink;

class TensorJournal {
 public:
  // dir: one component's journal folder (created when missing).
  static Result<TensorJournal> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // Entry `index`: the stored row and the record; a tensor over max_piece_bytes as its pieces
  // (split_pieces), each in its own file, the one holding piece 0 and the record written last.
  // `release`, when given, is called with each piece's byte range of payload.codes once the
  // piece is written, to hand back the pages it was read from (a spilled or a source tensor's).
  Status Append(size_t index, const StoredTensorInfo& info, const TensorPayload& payload,
                const nlohmann::json& record, uint64_t unit_rows = 1, uint64_t max_piece_bytes = UINT64_MAX,
                const std::function<void(uint64_t offset, uint64_t n)>& release = {}) const;
  // The record of entry `index` when the entry is complete (every piece readable), else nullopt.
  std::optional<nlohmann::json> Record(size_t index) const;
  // Removes entries from `index` on.
  Status Truncate(size_t index) const;
  // Writes entries 0 .. count-1 into the sink, in order, one piece in memory at a time.
  Status CopyInto(ParquetSink& sink, size_t count) const;
  // Marks the component finished (its weights.parquet is complete): `summary` is kept, the
  // entries are removed.
  Status Finish(const nlohmann::json& summary) const;
  // The summary of a finished component, when Finish completed.
  std::optional<nlohmann::json> Finished() const;

 private:
  explicit TensorJournal(std::string dir) : dir_(std::move(dir)) {}
  std::string entry(size_t index, size_t piece = 0) const;
  std::string dir_;
};

}  // namespace aq
