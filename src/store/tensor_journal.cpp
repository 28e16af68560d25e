#include "store/tensor_journal.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <arrow/ipc/api.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "store/arrow_status.h"
#include "store/parquet_sink.h"
#include "store/schema.h"

namespace aq {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kRecordKey = "arrowquant.record";
constexpr const char* kPiecesKey = "arrowquant.pieces";  // on piece 0's file: how many pieces
constexpr const char* kFinishedFile = "finished.json";

// Writes `text` to path through a temporary file and a rename: the file is whole or absent.
Status write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".part";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return IoError(StrCat(tmp, ": cannot create"));
    out << text;
    out.close();
    if (!out) return IoError(StrCat(tmp, ": write failed"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return IoError(StrCat(path, ": cannot rename into place: ", ec.message()));
  return Status::OK();
}

struct Entry {
  std::shared_ptr<arrow::Table> table;
  json record;      // piece 0 only
  size_t pieces = 1;  // piece 0 only
};

// Writes one row (with its schema's metadata) as an IPC file, through a temporary name.
Status write_entry(const std::string& path, const arrow::Table& table) {
  const std::string tmp = path + ".part";
  {
    std::shared_ptr<arrow::io::FileOutputStream> out;
    AQ_ARROW_ASSIGN(out, arrow::io::FileOutputStream::Open(tmp), tmp);
    std::shared_ptr<arrow::ipc::RecordBatchWriter> writer;
    AQ_ARROW_ASSIGN(writer, arrow::ipc::MakeFileWriter(out, table.schema()), tmp);
    AQ_ARROW_RETURN(writer->WriteTable(table), tmp);
    AQ_ARROW_RETURN(writer->Close(), tmp);
    AQ_ARROW_RETURN(out->Close(), tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return IoError(StrCat(path, ": cannot rename into place: ", ec.message()));
  return Status::OK();
}

// `head`: piece 0, which carries the record.
Result<Entry> read_entry(const std::string& path, bool head) {
  // A memory map: the row's buffers are views of the file's pages (no copy of a tensor's codes),
  // resident only while the entry is alive: it is read once, written into weights.parquet and
  // dropped, which unmaps it.
  std::shared_ptr<arrow::io::MemoryMappedFile> file;
  AQ_ARROW_ASSIGN(file, arrow::io::MemoryMappedFile::Open(path, arrow::io::FileMode::READ), path);
  std::shared_ptr<arrow::ipc::RecordBatchFileReader> reader;
  AQ_ARROW_ASSIGN(reader, arrow::ipc::RecordBatchFileReader::Open(file), path);
  auto meta = reader->schema()->metadata();
  Entry e;
  if (head) {
    const std::string text = meta ? meta->Get(kRecordKey).ValueOr("") : "";
    e.record = json::parse(text, nullptr, false);
    if (e.record.is_discarded() || !e.record.is_object()) return FormatError(StrCat(path, ": journal record is not JSON"));
    const std::string pieces = meta->Get(kPiecesKey).ValueOr("1");
    char* end = nullptr;
    const unsigned long long n = std::strtoull(pieces.c_str(), &end, 10);
    if (pieces.empty() || *end != '\0' || n == 0 || n > (1u << 20))
      return FormatError(StrCat(path, ": journal piece count '", pieces, "'"));
    e.pieces = static_cast<size_t>(n);
  }
  if (reader->num_record_batches() != 1) return FormatError(StrCat(path, ": journal entry holds no single row"));
  std::shared_ptr<arrow::RecordBatch> batch;
  AQ_ARROW_ASSIGN(batch, reader->ReadRecordBatch(0), path);
  AQ_ARROW_RETURN(batch->ValidateFull(), path);
  AQ_ARROW_ASSIGN(e.table, arrow::Table::FromRecordBatches({batch}), path);
  if (e.table->num_rows() != 1 || !e.table->schema()->Equals(*weights_schema(), /*check_metadata=*/false))
    return FormatError(StrCat(path, ": journal entry is not one row of the weights schema"));
  return e;
}

}  // namespace

Result<TensorJournal> TensorJournal::Open(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return IoError(StrCat(dir, ": cannot create: ", ec.message()));
  return TensorJournal(dir);
}

std::string TensorJournal::entry(size_t index, size_t piece) const {
  return (fs::path(dir_) / (piece == 0 ? StrCat("t", index, ".arrow") : StrCat("t", index, ".", piece, ".arrow")))
      .string();
}

Status TensorJournal::Append(size_t index, const StoredTensorInfo& info, const TensorPayload& payload,
                             const json& record, uint64_t unit_rows, uint64_t max_piece_bytes,
                             const std::function<void(uint64_t, uint64_t)>& release) const {
  const std::string path = entry(index);
  AQ_ASSIGN_OR_RETURN(auto pieces, split_pieces(info, payload, unit_rows, max_piece_bytes));
  // Later pieces first: the file of piece 0, with the record, is what makes the entry complete.
  for (size_t k = pieces.size(); k-- > 0;) {
    const PieceSpan* piece = pieces.size() > 1 ? &pieces[k] : nullptr;
    AQ_ASSIGN_OR_RETURN(auto table, tensor_row_table(info, payload, path, piece));
    if (k == 0)
      table = table->ReplaceSchemaMetadata(
          arrow::key_value_metadata({kRecordKey, kPiecesKey}, {record.dump(), std::to_string(pieces.size())}));
    AQ_RETURN_IF_ERROR(write_entry(entry(index, k), *table));
    if (release) {
      const auto codes = pieces[k].payload.codes;
      release(codes.empty() ? 0 : static_cast<uint64_t>(codes.data() - payload.codes.data()), codes.size());
    }
  }
  return Status::OK();
}

std::optional<json> TensorJournal::Record(size_t index) const {
  std::error_code ec;
  if (!fs::is_regular_file(entry(index), ec)) return std::nullopt;
  auto e = read_entry(entry(index), true);
  if (!e.ok()) return std::nullopt;  // damaged: quantized again
  for (size_t k = 1; k < e->pieces; ++k)
    if (!read_entry(entry(index, k), false).ok()) return std::nullopt;
  return std::move(e->record);
}

Status TensorJournal::Truncate(size_t index) const {
  std::error_code ec;
  for (const auto& d : fs::directory_iterator(dir_, ec)) {
    const std::string name = d.path().filename().string();
    if (name.size() < 2 || name[0] != 't') continue;
    const size_t i = std::strtoull(name.c_str() + 1, nullptr, 10);
    if (i >= index || name.ends_with(".part")) fs::remove(d.path(), ec);
  }
  return Status::OK();
}

Status TensorJournal::CopyInto(ParquetSink& sink, size_t count) const {
  for (size_t i = 0; i < count; ++i) {
    AQ_ASSIGN_OR_RETURN(Entry e, read_entry(entry(i), true));
    const auto name = e.record.find("name");
    const std::string tensor = name != e.record.end() && name->is_string() ? name->get<std::string>() : "";
    AQ_RETURN_IF_ERROR(sink.WriteRow(*e.table, tensor));
    for (size_t k = 1; k < e.pieces; ++k) {
      AQ_ASSIGN_OR_RETURN(Entry piece, read_entry(entry(i, k), false));
      AQ_RETURN_IF_ERROR(sink.WriteRow(*piece.table, tensor));
    }
  }
  return Status::OK();
}

Status TensorJournal::Finish(const json& summary) const {
  AQ_RETURN_IF_ERROR(write_atomically((fs::path(dir_) / kFinishedFile).string(), summary.dump()));
  return Truncate(0);
}

std::optional<json> TensorJournal::Finished() const {
  std::ifstream in(fs::path(dir_) / kFinishedFile, std::ios::binary);
  if (!in) return std::nullopt;
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  return j;
}

}  // namespace aq
