#include "store/parquet_source.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/reader.h>
#include <parquet/file_reader.h>
#include <parquet/metadata.h>
#include <parquet/schema.h>

#include <cmath>
#include <filesystem>
#include <mutex>

#include "quant/hadamard.h"
#include "quant/rans.h"
#include "quant/tensor_codec.h"
#include "store/arrow_columns.h"
#include "store/arrow_status.h"
#include "store/schema.h"

namespace aq {

struct ParquetSource::State {
  std::unique_ptr<parquet::arrow::FileReader> reader;
  std::vector<int> data_cols;  // leaves of codes, scales, zero_points, entropy (in schema order)
  std::mutex cache_mu;         // the entropy tables of the last tensor read in pieces
  size_t cached_index = 0;
  std::shared_ptr<const EntropySide> cached_tables;
};

ParquetSource::ParquetSource(std::string path, std::unique_ptr<State> s)
    : path_(std::move(path)), state_(std::move(s)) {}
ParquetSource::~ParquetSource() = default;

namespace {


Result<ScaleType> parse_scale_type(const std::string& s, const std::string& where) {
  if (s == "f16") return ScaleType::kF16;
  if (s == "f32") return ScaleType::kF32;
  return FormatError(StrCat(where, ": unknown scale_type '", s, "'"));
}

Result<ScaleMethod> parse_method(const std::string& s, const std::string& where) {
  if (s == "minmax") return ScaleMethod::kMinMax;
  if (s == "search") return ScaleMethod::kSearch;
  return FormatError(StrCat(where, ": unknown scale method '", s, "'"));
}

}  // namespace

Result<std::unique_ptr<ParquetSource>> ParquetSource::Open(const std::string& path) {
  auto st = std::make_unique<State>();
  // Read with pread, not a memory map: a map leaves every page read resident (and counted in the
  // process's RSS) until the file is closed, so reading a 7B model's codes once would hold the
  // whole file; read buffers are freed with the arrays that use them.
  std::shared_ptr<arrow::io::ReadableFile> file;
  {
    auto f = arrow::io::ReadableFile::Open(path);
    if (!f.ok()) {
      // Arrow's message does not always carry strerror's text ("Failed to open local file"), so
      // ask the file system whether the file is there.
      std::error_code ec;
      if (f.status().IsIOError() && !std::filesystem::exists(path, ec) && !ec)
        return NotFound(StrCat(path, ": no such file"));
      return from_arrow(f.status(), path);
    }
    file = *f;
  }
  AQ_ARROW_ASSIGN(st->reader, parquet::arrow::OpenFile(file, arrow::default_memory_pool()), path);

  std::shared_ptr<arrow::Schema> schema;
  AQ_ARROW_RETURN(st->reader->GetSchema(&schema), path);
  auto meta = schema->metadata();
  if (!meta || meta->Get("arrowquant.format_version").ValueOr("") == "")
    return FormatError(StrCat(path, ": not an ArrowQuant weights file (no arrowquant.format_version metadata)"));
  const std::string version = meta->Get("arrowquant.format_version").ValueOr("");
  int version_number = 0;
  for (int v = kMinFormatVersion; v <= kFormatVersion; ++v)
    if (version == std::to_string(v)) version_number = v;
  if (version_number == 0)
    return FormatError(StrCat(path, ": format version ", version, "; this build reads versions ", kMinFormatVersion,
                              " to ", kFormatVersion));

  // Column indices here are Parquet leaf indices; the data columns (read per tensor) are the
  // binary ones and the entropy tables, everything else is read up front.
  std::vector<int> small;
  const auto* pschema = st->reader->parquet_reader()->metadata()->schema();
  int found = 0;
  for (int i = 0; i < pschema->num_columns(); ++i) {
    const std::string top = pschema->Column(i)->path()->ToDotVector().front();
    const bool data = top == column::kCodes || top == column::kScales || top == column::kZeroPoints ||
                      top == column::kEntropy;
    if (data) st->data_cols.push_back(i);
    else small.push_back(i);
    found += top == column::kCodes || top == column::kScales || top == column::kZeroPoints;
  }
  if (found != 3) return FormatError(StrCat(path, ": missing one of the codes/scales/zero_points columns"));
  std::shared_ptr<arrow::Table> table;
  AQ_ARROW_ASSIGN(table, st->reader->ReadTable(small), path);
  if (table->num_rows() != st->reader->num_row_groups())
    return FormatError(StrCat(path, ": ", table->num_rows(), " rows in ", st->reader->num_row_groups(),
                              " row groups; format version 1 has one row group per tensor"));

  AQ_ASSIGN_OR_RETURN(auto names, column_as<arrow::StringArray>(*table, column::kName, path));
  AQ_ASSIGN_OR_RETURN(auto shapes, column_as<arrow::ListArray>(*table, column::kShape, path));
  AQ_ASSIGN_OR_RETURN(auto dtypes, column_as<arrow::StringArray>(*table, column::kDType, path));
  AQ_ASSIGN_OR_RETURN(auto encodings, column_as<arrow::StringArray>(*table, column::kEncoding, path));
  AQ_ASSIGN_OR_RETURN(auto schemes, column_as<arrow::StructArray>(*table, column::kScheme, path));
  AQ_ASSIGN_OR_RETURN(auto metrics, column_as<arrow::StructArray>(*table, column::kMetrics, path));
  AQ_ASSIGN_OR_RETURN(auto reasons, column_as<arrow::StringArray>(*table, column::kReason, path));
  AQ_ASSIGN_OR_RETURN(auto rejected, column_as<arrow::ListArray>(*table, column::kRejectedBits, path));
  auto shape_values = std::dynamic_pointer_cast<arrow::Int64Array>(shapes->values());
  auto rejected_values = std::dynamic_pointer_cast<arrow::Int8Array>(rejected->values());
  auto bits = std::dynamic_pointer_cast<arrow::Int8Array>(schemes->GetFieldByName("bits"));
  auto gsize = std::dynamic_pointer_cast<arrow::Int32Array>(schemes->GetFieldByName("group_size"));
  auto sym = std::dynamic_pointer_cast<arrow::BooleanArray>(schemes->GetFieldByName("symmetric"));
  auto stype = std::dynamic_pointer_cast<arrow::StringArray>(schemes->GetFieldByName("scale_type"));
  auto method = std::dynamic_pointer_cast<arrow::StringArray>(schemes->GetFieldByName("method"));
  auto kind = std::dynamic_pointer_cast<arrow::StringArray>(schemes->GetFieldByName("kind"));
  auto rotation = std::dynamic_pointer_cast<arrow::Int32Array>(schemes->GetFieldByName("rotation"));
  auto target = std::dynamic_pointer_cast<arrow::DoubleArray>(schemes->GetFieldByName("target_bpw"));
  AQ_ASSIGN_OR_RETURN(auto stored, column_as<arrow::Int64Array>(*table, column::kStoredBytes, path));
  std::shared_ptr<arrow::ListArray> input_scale;  // version 2; absent in version 1 files
  std::shared_ptr<arrow::FloatArray> input_scale_values;
  if (table->GetColumnByName(column::kInputScale)) {
    AQ_ASSIGN_OR_RETURN(input_scale, column_as<arrow::ListArray>(*table, column::kInputScale, path));
    input_scale_values = std::dynamic_pointer_cast<arrow::FloatArray>(input_scale->values());
    if (!input_scale_values) return FormatError(StrCat(path, ": input_scale is not a list of float32"));
  }
  auto cosine = std::dynamic_pointer_cast<arrow::DoubleArray>(metrics->GetFieldByName("cosine"));
  auto relerr = std::dynamic_pointer_cast<arrow::DoubleArray>(metrics->GetFieldByName("relative_error"));
  auto sqnr = std::dynamic_pointer_cast<arrow::DoubleArray>(metrics->GetFieldByName("sqnr_db"));
  auto maxerr = std::dynamic_pointer_cast<arrow::DoubleArray>(metrics->GetFieldByName("max_abs_error"));
  if (!shape_values || !rejected_values || !bits || !gsize || !sym || !stype || !method || !kind || !rotation ||
      !target || !cosine || !relerr || !sqnr || !maxerr)
    return FormatError(StrCat(path, ": column types differ from format version 1"));

  // Version 4: the piece columns (absent before: every row a whole tensor).
  std::shared_ptr<arrow::Int32Array> piece_col;
  std::shared_ptr<arrow::Int64Array> row_start_col, row_count_col;
  if (version_number >= 4) {
    AQ_ASSIGN_OR_RETURN(piece_col, column_as<arrow::Int32Array>(*table, column::kPiece, path));
    AQ_ASSIGN_OR_RETURN(row_start_col, column_as<arrow::Int64Array>(*table, column::kRowStart, path));
    AQ_ASSIGN_OR_RETURN(row_count_col, column_as<arrow::Int64Array>(*table, column::kRowCount, path));
  }

  auto source = std::unique_ptr<ParquetSource>(new ParquetSource(path, std::move(st)));
  for (int64_t i = 0; i < table->num_rows(); ++i) {
    const int64_t row_start = row_start_col ? row_start_col->Value(i) : 0;
    const int64_t row_count = row_count_col ? row_count_col->Value(i) : -1;
    if (row_start < 0 || (row_count_col && row_count < 0))
      return FormatError(StrCat(path, ": row ", i, " ('", names->GetString(i), "') has row_start ", row_start,
                                " and row_count ", row_count));
    if (piece_col && piece_col->Value(i) != 0) {
      // A later piece: it continues the tensor of the row before.
      StoredTensorInfo* t = source->infos_.empty() ? nullptr : &source->infos_.back();
      const std::string where = StrCat(path, ": tensor '", names->GetString(i), "' piece ", piece_col->Value(i));
      if (!t || t->name != names->GetString(i) || static_cast<size_t>(piece_col->Value(i)) != t->pieces.size())
        return FormatError(StrCat(where, " does not follow piece ", piece_col->Value(i) - 1, " of the same tensor"));
      const StoredPiece& prev = t->pieces.back();
      if (static_cast<uint64_t>(row_start) != prev.row_start + prev.row_count)
        return FormatError(StrCat(where, " starts at row ", row_start, "; the pieces before end at row ",
                                  prev.row_start + prev.row_count));
      if (t->quantized && t->scheme.kind == SchemeKind::kAffine &&
          (static_cast<uint64_t>(row_start) * t->cols() * static_cast<uint64_t>(t->scheme.bits)) % 8 != 0)
        return FormatError(StrCat(where, " starts at row ", row_start, ", inside a byte of the packed codes"));
      t->pieces.push_back({static_cast<int>(i), static_cast<uint64_t>(row_start), static_cast<uint64_t>(row_count)});
      t->stored += static_cast<uint64_t>(stored->Value(i));
      continue;
    }
    StoredTensorInfo t;
    t.name = names->GetString(i);
    const std::string where = StrCat(path, ": tensor '", t.name, "'");
    if (row_start != 0) return FormatError(StrCat(where, ": piece 0 starts at row ", row_start));
    for (int64_t k = shapes->value_offset(i); k < shapes->value_offset(i + 1); ++k)
      t.shape.push_back(shape_values->Value(k));
    auto dt = parse_dtype(dtypes->GetString(i));
    if (!dt) return FormatError(StrCat(where, ": unknown dtype '", dtypes->GetString(i), "'"));
    t.dtype = *dt;
    const std::string enc = encodings->GetString(i);
    if (enc != "quantized" && enc != "raw") return FormatError(StrCat(where, ": unknown encoding '", enc, "'"));
    t.quantized = enc == "quantized";
    if (t.quantized) {
      if (schemes->IsNull(i) || metrics->IsNull(i))
        return FormatError(StrCat(where, ": quantized tensor without scheme or metrics"));
      t.scheme.bits = bits->Value(i);
      t.scheme.group_size = gsize->Value(i);
      t.scheme.symmetric = sym->Value(i);
      AQ_ASSIGN_OR_RETURN(t.scheme.scale_type, parse_scale_type(stype->GetString(i), where));
      AQ_ASSIGN_OR_RETURN(t.scheme.method, parse_method(method->GetString(i), where));
      const std::string k = kind->GetString(i);
      if (k == "affine") t.scheme.kind = SchemeKind::kAffine;
      else if (k == "entropy") t.scheme.kind = SchemeKind::kEntropy;
      else if (auto g = parse_ggml_type(k); g && version_number >= 3) {
        t.scheme.kind = SchemeKind::kGgml;
        t.scheme.ggml = *g;
      } else return FormatError(StrCat(where, ": unknown scheme kind '", k, "'"));
      if (!target->IsNull(i)) t.scheme.target_bpw = target->Value(i);
      t.scheme.rotate = rotation->Value(i) > 1;
      AQ_RETURN_IF_ERROR(validate_scheme(t.scheme).WithPrefix(where + ": "));
      t.cosine = cosine->Value(i);
      t.relative_error = relerr->Value(i);
      t.sqnr_db = sqnr->Value(i);
      t.max_abs_error = maxerr->Value(i);
    }
    t.reason = reasons->GetString(i);
    t.stored = static_cast<uint64_t>(stored->Value(i));
    if (t.quantized) {
      const int expected = t.scheme.rotate ? rotation_block(t.cols()) : 1;
      if (rotation->Value(i) != expected)
        return FormatError(StrCat(where, ": rotation block ", rotation->Value(i), "; format version 1 uses ", expected,
                                  " for ", t.cols(), " columns"));
    }
    for (int64_t k = rejected->value_offset(i); k < rejected->value_offset(i + 1); ++k)
      t.rejected_bits.push_back(rejected_values->Value(k));
    if (input_scale && !input_scale->IsNull(i) && input_scale->value_length(i) > 0) {
      for (int64_t k = input_scale->value_offset(i); k < input_scale->value_offset(i + 1); ++k)
        t.input_scale.push_back(input_scale_values->Value(k));
      const uint64_t n = t.input_scale.size();
      if (!t.quantized || t.shape.size() < 2 || static_cast<uint64_t>(t.shape[1]) != n || t.cols() % n != 0)
        return FormatError(StrCat(where, ": input_scale holds ", n, " values; it needs a quantized tensor whose "
                                  "second dimension (input channels) is that size"));
      for (float v : t.input_scale)
        if (!std::isfinite(v) || !(v > 0.0f))
          return FormatError(StrCat(where, ": input_scale has the value ", v, " (must be finite and > 0)"));
    }
    t.pieces.push_back({static_cast<int>(i), 0, row_count_col ? static_cast<uint64_t>(row_count) : t.rows()});
    if (!source->by_name_.emplace(t.name, source->infos_.size()).second)
      return FormatError(StrCat(where, ": appears twice"));
    source->infos_.push_back(std::move(t));
  }
  for (const StoredTensorInfo& t : source->infos_) {
    const StoredPiece& last = t.pieces.back();
    if (last.row_start + last.row_count != t.rows())
      return FormatError(StrCat(path, ": tensor '", t.name, "': its ", t.pieces.size(), " piece(s) hold rows 0..",
                                last.row_start + last.row_count, " of ", t.rows()));
  }
  return source;
}

std::optional<size_t> ParquetSource::find(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return std::nullopt;
  return it->second;
}

Result<LoadedTensor> ParquetSource::read_group(int row_group, const std::string& where) const {
  std::shared_ptr<arrow::Table> table;
  AQ_ARROW_ASSIGN(table, state_->reader->ReadRowGroup(row_group, state_->data_cols), where);
  LoadedTensor out;
  const std::pair<const char*, std::span<const uint8_t>*> binaries[] = {
      {column::kCodes, &out.payload.codes}, {column::kScales, &out.payload.scales},
      {column::kZeroPoints, &out.payload.zero_points}};
  for (const auto& [name, span] : binaries) {
    auto col = table->GetColumnByName(name);
    if (!col || col->num_chunks() != 1 || col->chunk(0)->length() != 1)
      return FormatError(StrCat(where, ": expected one value in column ", name));
    auto arr = std::dynamic_pointer_cast<arrow::BinaryArray>(col->chunk(0));
    if (!arr) return FormatError(StrCat(where, ": column ", name, " is not binary"));
    if (arr->IsNull(0)) continue;
    auto view = arr->GetView(0);
    *span = std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(view.data()), view.size());
  }
  if (auto col = table->GetColumnByName(column::kEntropy); col && col->num_chunks() == 1 && !col->chunk(0)->IsNull(0)) {
    auto st = std::dynamic_pointer_cast<arrow::StructArray>(col->chunk(0));
    auto symbol_min = std::dynamic_pointer_cast<arrow::Int32Array>(st ? st->GetFieldByName("symbol_min") : nullptr);
    auto freqs = std::dynamic_pointer_cast<arrow::ListArray>(st ? st->GetFieldByName("frequencies") : nullptr);
    auto chunk_rows = std::dynamic_pointer_cast<arrow::Int32Array>(st ? st->GetFieldByName("chunk_rows") : nullptr);
    auto escape = std::dynamic_pointer_cast<arrow::Int32Array>(st ? st->GetFieldByName("escape_symbol") : nullptr);
    auto offsets = std::dynamic_pointer_cast<arrow::ListArray>(st ? st->GetFieldByName("chunk_offsets") : nullptr);
    auto centroids = std::dynamic_pointer_cast<arrow::ListArray>(st ? st->GetFieldByName("centroids") : nullptr);
    if (!symbol_min || !freqs || !chunk_rows || !escape || !offsets || !centroids)
      return FormatError(StrCat(where, ": entropy column types differ from format version 1"));
    auto f = std::dynamic_pointer_cast<arrow::UInt16Array>(freqs->value_slice(0));
    auto o = std::dynamic_pointer_cast<arrow::UInt32Array>(offsets->value_slice(0));
    auto c = std::dynamic_pointer_cast<arrow::FloatArray>(centroids->value_slice(0));
    if (!f || !o || !c) return FormatError(StrCat(where, ": entropy list types differ from format version 1"));
    out.entropy = std::make_shared<EntropySide>();
    out.entropy->symbol_min = symbol_min->Value(0);
    out.entropy->escape_symbol = escape->Value(0);
    out.entropy->chunk_rows = static_cast<uint32_t>(std::max(0, chunk_rows->Value(0)));
    out.entropy->frequencies.assign(f->raw_values(), f->raw_values() + f->length());
    out.entropy->chunk_offsets.assign(o->raw_values(), o->raw_values() + o->length());
    out.entropy->centroids.assign(c->raw_values(), c->raw_values() + c->length());
    out.payload.entropy = out.entropy.get();
  }
  out.keep_alive = table;
  return out;
}

namespace {

// Checks a loaded tensor (or piece: `rows` of them) against its scheme and builds the entropy
// decoding table.
Status finish_loaded(const StoredTensorInfo& info, uint64_t rows, LoadedTensor& t, const std::string& where) {
  if (!info.quantized) {
    const uint64_t row_bytes = info.rows() == 0 ? 0 : info.source_bytes() / info.rows();
    if (t.payload.codes.size() != rows * row_bytes)
      return FormatError(StrCat(where, ": raw data holds ", t.payload.codes.size(), " bytes; ", rows,
                                " rows of the shape need ", rows * row_bytes));
    return Status::OK();
  }
  AQ_RETURN_IF_ERROR(check_encoded(info.scheme, rows, info.cols(), t.payload).WithPrefix(where + ": "));
  if (info.scheme.kind == SchemeKind::kEntropy) {
    AQ_ASSIGN_OR_RETURN(t.table, make_decode_table(t.payload));
    t.payload.table = t.table.get();
  }
  return Status::OK();
}

}  // namespace

TensorPayload OwnedTensor::view() const {
  TensorPayload v;
  v.codes = codes;
  v.scales = scales;
  v.zero_points = zero_points;
  v.entropy = entropy.get();
  v.table = table.get();
  return v;
}

Result<LoadedTensor> ParquetSource::read(size_t index) const {
  if (index >= infos_.size()) return Internal(StrCat(path_, ": tensor index ", index, " out of range"));
  const auto& info = infos_[index];
  if (info.pieces.size() == 1) {
    const std::string where = StrCat(path_, ": tensor '", info.name, "'");
    AQ_ASSIGN_OR_RETURN(LoadedTensor out, read_group(info.pieces[0].row_group, where));
    AQ_RETURN_IF_ERROR(finish_loaded(info, info.rows(), out, where));
    return out;
  }
  AQ_ASSIGN_OR_RETURN(OwnedTensor owned, read_owned(index));
  auto g = std::make_shared<OwnedTensor>(std::move(owned));
  LoadedTensor out;
  out.payload = g->view();
  out.entropy = g->entropy;
  out.table = g->table;
  out.keep_alive = g;
  return out;
}

Result<OwnedTensor> ParquetSource::read_owned(size_t index) const {
  if (index >= infos_.size()) return Internal(StrCat(path_, ": tensor index ", index, " out of range"));
  const auto& info = infos_[index];
  const std::string where = StrCat(path_, ": tensor '", info.name, "'");
  OwnedTensor g;
  auto append = [&g](const TensorPayload& p) {
    g.codes.insert(g.codes.end(), p.codes.begin(), p.codes.end());
    g.scales.insert(g.scales.end(), p.scales.begin(), p.scales.end());
    g.zero_points.insert(g.zero_points.end(), p.zero_points.begin(), p.zero_points.end());
  };
  if (info.pieces.size() == 1) {
    AQ_ASSIGN_OR_RETURN(LoadedTensor t, read(index));
    g.codes.reserve(t.payload.codes.size());
    g.scales.reserve(t.payload.scales.size());
    g.zero_points.reserve(t.payload.zero_points.size());
    append(t.payload);
    g.entropy = std::move(t.entropy);
    g.table = std::move(t.table);
    return g;
  }
  // In pieces: each piece is checked on its own, then its values are appended; the pieces'
  // values end to end are the tensor's.
  for (size_t k = 0; k < info.pieces.size(); ++k) {
    AQ_ASSIGN_OR_RETURN(LoadedTensor p, read_piece(index, k));
    if (k == 0) {
      // The sizes the whole values must have (a file that disagrees fails finish_loaded below),
      // reserved once so appending never moves a big buffer.
      QuantizedSize size;
      if (!info.quantized) size.code_bytes = info.source_bytes();
      else if (info.scheme.kind != SchemeKind::kEntropy) size = quantized_size(info.scheme, info.rows(), info.cols());
      if (p.entropy) {
        AQ_ASSIGN_OR_RETURN(auto tables, entropy_tables(index));
        g.entropy = std::make_shared<EntropySide>(*tables);
        size.code_bytes = g.entropy->chunk_offsets.empty() ? 0 : g.entropy->chunk_offsets.back();
        size.scale_bytes = info.rows() * 4;
      }
      g.codes.reserve(size.code_bytes);
      g.scales.reserve(size.scale_bytes);
      g.zero_points.reserve(size.zero_point_bytes);
    }
    append(p.payload);
  }
  LoadedTensor whole;
  whole.payload = g.view();
  whole.entropy = g.entropy;
  AQ_RETURN_IF_ERROR(finish_loaded(info, info.rows(), whole, where));
  g.table = std::move(whole.table);
  return g;
}

Result<std::shared_ptr<const EntropySide>> ParquetSource::entropy_tables(size_t index) const {
  std::lock_guard<std::mutex> lock(state_->cache_mu);
  if (state_->cached_tables && state_->cached_index == index) return state_->cached_tables;
  // A later piece read before piece 0 (readers in row order never get here).
  const auto& info = infos_[index];
  const std::string where = StrCat(path_, ": tensor '", info.name, "'");
  AQ_ASSIGN_OR_RETURN(LoadedTensor first, read_group(info.pieces[0].row_group, where));
  if (!first.entropy) return FormatError(StrCat(where, ": entropy-coded tensor without its entropy table in piece 0"));
  state_->cached_index = index;
  state_->cached_tables = first.entropy;
  return state_->cached_tables;
}

Result<LoadedTensor> ParquetSource::read_piece(size_t index, size_t k) const {
  if (index >= infos_.size() || k >= infos_[index].pieces.size())
    return Internal(StrCat(path_, ": tensor index ", index, " piece ", k, " out of range"));
  const auto& info = infos_[index];
  const StoredPiece& piece = info.pieces[k];
  const std::string where = info.pieces.size() == 1 ? StrCat(path_, ": tensor '", info.name, "'")
                                                    : StrCat(path_, ": tensor '", info.name, "' piece ", k);
  AQ_ASSIGN_OR_RETURN(LoadedTensor out, read_group(piece.row_group, where));
  if (info.pieces.size() > 1) {
    if (k > 0 && out.entropy)
      return FormatError(StrCat(where, ": holds entropy tables; only piece 0 does"));
    if (info.quantized && info.scheme.kind == SchemeKind::kEntropy) {
      if (k == 0 && out.entropy) {  // the tables are here: keep them for the later pieces
        std::lock_guard<std::mutex> lock(state_->cache_mu);
        state_->cached_index = index;
        state_->cached_tables = out.entropy;
      }
      AQ_ASSIGN_OR_RETURN(auto tables, entropy_tables(index));
      auto local = entropy_rows(*tables, info.rows(), piece.row_start, piece.row_start + piece.row_count);
      if (!local.ok()) return local.status().WithPrefix(where + ": ");
      out.entropy = std::make_shared<EntropySide>(std::move(*local));
      out.payload.entropy = out.entropy.get();
    }
  }
  AQ_RETURN_IF_ERROR(finish_loaded(info, piece.row_count, out, where));
  return out;
}

Status ParquetSource::dequantize(size_t index, float* out) const {
  if (index >= infos_.size()) return Internal(StrCat(path_, ": tensor index ", index, " out of range"));
  const auto& info = infos_[index];
  const std::string where = StrCat(path_, ": tensor '", info.name, "': ");
  if (!info.quantized && !dtype_is_float(info.dtype))
    return NotImplemented(StrCat(where, dtype_name(info.dtype), " tensors have no float32 form; read them packed"));
  const uint64_t cols = info.cols();
  for (size_t k = 0; k < info.pieces.size(); ++k) {
    const StoredPiece& piece = info.pieces[k];
    AQ_ASSIGN_OR_RETURN(LoadedTensor t, read_piece(index, k));
    float* o = out + piece.row_start * cols;
    if (!info.quantized) {
      convert_to_f32(info.dtype, t.payload.codes.data(), piece.row_count * cols, o);
      continue;
    }
    AQ_RETURN_IF_ERROR(decode_tensor(info.scheme, piece.row_count, cols, t.payload, o).WithPrefix(where));
  }
  if (info.quantized) apply_input_scale(info, out, info.rows());
  return Status::OK();
}

}  // namespace aq
