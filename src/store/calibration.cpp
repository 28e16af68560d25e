#include "store/calibration.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/reader.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include <arrow/array/concatenate.h>

#include "quant/gptq.h"
#include "store/arrow_columns.h"
#include "store/arrow_status.h"

namespace aq {

Result<std::vector<double>> LayerCalibration::hessian_of(const CalibrationBin& b) const {
  if (!b.hessian.empty()) return b.hessian;
  if (b.hessian_file_row < 0 || !reader) return Internal("calibration bin holds no Hessian");
  return reader->load(b.hessian_file_row, layout());
}

namespace {
// [first, last) bins of the aligned span of `span` bins holding `bin`.
std::pair<int, int> span_of(int bin, int span) {
  const int lo = bin / std::max(1, span) * std::max(1, span);
  return {lo, lo + std::max(1, span)};
}
// Whether every bin of `bins` with rows is covered by a Hessian held in the span's row.
bool covered(const std::vector<CalibrationBin>& bins) {
  for (const auto& b : bins) {
    if (b.rows == 0) continue;
    const auto [lo, hi] = span_of(b.bin, b.hessian_span);
    bool ok = false;
    for (const auto& h : bins) ok |= h.holds_hessian() && h.bin >= lo && h.bin < hi;
    if (!ok) return false;
  }
  return true;
}
}  // namespace

// Rows a bin's Hessian sums (a per-bin Hessian built in memory may leave hessian_rows 0).
int64_t hessian_rows_of(const CalibrationBin& b) {
  return b.hessian_rows > 0 ? b.hessian_rows : (b.hessian_span == 1 ? b.rows : 0);
}

bool LayerCalibration::has_hessians() const { return covered(fit); }

const LayerCalibration* CalibrationData::find(const std::string& component, const std::string& tensor) const {
  auto it = layers.find({component, tensor});
  return it == layers.end() ? nullptr : &it->second;
}

const LayerCalibration* CalibrationData::lookup(const std::string& component, const std::string& tensor) const {
  if (const LayerCalibration* lc = find(component, tensor)) return lc;
  if (!component.empty()) return find("", tensor);
  const LayerCalibration* only = nullptr;
  for (const auto& [key, lc] : layers) {
    if (key.second != tensor) continue;
    if (only) return nullptr;  // recorded for several components: ambiguous
    only = &lc;
  }
  return only;
}

std::vector<int> CalibrationData::bins_present() const {
  std::set<int> s;
  for (const auto& [key, layer] : layers)
    for (const auto& b : layer.fit) s.insert(b.bin);
  return {s.begin(), s.end()};
}

namespace {


template <typename ValueArrayT, typename T>
Result<std::vector<T>> list_at(const arrow::ListArray& list, int64_t i, const std::string& what) {
  if (list.IsNull(i)) return std::vector<T>{};
  auto values = std::dynamic_pointer_cast<ValueArrayT>(list.values());
  if (!values) return FormatError(StrCat(what, ": unexpected list value type ", list.values()->type()->ToString()));
  const int64_t off = list.value_offset(i), len = list.value_length(i);
  const auto* raw = values->raw_values() + off;
  return std::vector<T>(raw, raw + len);
}

// Hessians read row by row from the file's hessian column: version 1 holds the full float64
// matrix, version 2 the upper triangle as float32, row by row.
class FileHessianReader final : public HessianReader {
 public:
  FileHessianReader(std::string path, std::unique_ptr<parquet::arrow::FileReader> reader, int column, bool packed)
      : path_(std::move(path)), reader_(std::move(reader)), column_(column), packed_(packed) {
    const int groups = reader_->num_row_groups();
    int64_t at = 0;
    for (int g = 0; g < groups; ++g) {
      starts_.push_back(at);
      at += reader_->parquet_reader()->metadata()->RowGroup(g)->num_rows();
    }
    rows_ = at;
  }
  int64_t rows() const { return rows_; }

  Result<std::vector<double>> load(int64_t row, const HessianLayout& layout) const override {
    const std::string where = StrCat(path_, ": hessian of row ", row);
    if (row < 0 || row >= rows_) return FormatError(StrCat(where, ": no such row"));
    const auto it = std::upper_bound(starts_.begin(), starts_.end(), row);
    const int g = static_cast<int>(it - starts_.begin()) - 1;
    std::shared_ptr<arrow::Table> table;
    {
      std::lock_guard<std::mutex> lock(mu_);
      AQ_ARROW_ASSIGN(table, reader_->ReadRowGroup(g, std::vector<int>{column_}), where);
    }
    std::shared_ptr<arrow::ChunkedArray> col = table->column(0);
    std::shared_ptr<arrow::Array> chunk = col->num_chunks() == 1 ? col->chunk(0) : nullptr;
    if (!chunk) {
      AQ_ARROW_ASSIGN(chunk, arrow::Concatenate(col->chunks()), where);
    }
    auto list = std::dynamic_pointer_cast<arrow::ListArray>(chunk);
    if (!list) return FormatError(StrCat(where, ": the hessian column is not a list"));
    const int64_t i = row - starts_[static_cast<size_t>(g)];
    if (list->IsNull(i)) return FormatError(StrCat(where, ": null, but the row says it holds one"));
    const int64_t off = list->value_offset(i), len = list->value_length(i);
    const size_t n = layout.cols;
    std::vector<double> h;  // allocated once the list's length matches the layout (in_features from the file)
    if (!packed_) {
      auto values = std::dynamic_pointer_cast<arrow::DoubleArray>(list->values());
      if (!values) return FormatError(StrCat(where, ": version 1 Hessians are float64 lists"));
      if (!layout.full()) return FormatError(StrCat(where, ": version 1 has no block-diagonal Hessians"));
      if (static_cast<size_t>(len) != n * n)
        return FormatError(StrCat(where, ": holds ", len, " values, expected in_features^2 = ", n * n));
      h.resize(layout.values());
      std::copy_n(values->raw_values() + off, n * n, h.data());
    } else {
      auto values = std::dynamic_pointer_cast<arrow::FloatArray>(list->values());
      if (!values) return FormatError(StrCat(where, ": version 2 Hessians are float32 lists"));
      // each diagonal block's upper triangle, row by row, blocks in column order
      size_t expected = 0;
      for (size_t b = 0; b < layout.blocks(); ++b) expected += layout.size(b) * (layout.size(b) + 1) / 2;
      if (static_cast<size_t>(len) != expected)
        return FormatError(StrCat(where, ": holds ", len, " values, expected the upper triangle", layout.full() ? "" : "s",
                                  " of ", layout.full() ? StrCat(n, " x ", n) : StrCat(layout.blocks(), " diagonal blocks of ",
                                                                                        layout.block, " of ", n, " columns"),
                                  ": ", expected));
      h.resize(layout.values());
      const float* p = values->raw_values() + off;
      for (size_t b = 0; b < layout.blocks(); ++b) {
        const size_t nb = layout.size(b);
        double* hb = h.data() + layout.offset(b);
        for (size_t r = 0; r < nb; ++r)
          for (size_t c = r; c < nb; ++c, ++p) hb[r * nb + c] = hb[c * nb + r] = static_cast<double>(*p);
      }
    }
    for (size_t k = 0; k < h.size(); ++k)
      if (!std::isfinite(h[k])) return FormatError(StrCat(where, ": non-finite value ", h[k], " (entry ", k, ")"));
    return h;
  }

 private:
  std::string path_;
  std::unique_ptr<parquet::arrow::FileReader> reader_;
  int column_;
  bool packed_;
  std::vector<int64_t> starts_;
  int64_t rows_ = 0;
  mutable std::mutex mu_;
};

}  // namespace

Result<CalibrationData> read_calibration(const std::string& path) {
  CalibrationData d;
  d.path = path;
  std::shared_ptr<arrow::io::ReadableFile> file;
  {
    auto f = arrow::io::ReadableFile::Open(path);
    if (!f.ok()) {
      std::error_code ec;
      if (!std::filesystem::exists(path, ec)) return NotFound(StrCat(path, ": no such calibration file"));
      return from_arrow(f.status(), path);
    }
    file = *f;
  }
  std::unique_ptr<parquet::arrow::FileReader> reader;
  AQ_ARROW_ASSIGN(reader, parquet::arrow::OpenFile(file, arrow::default_memory_pool()), path);
  std::shared_ptr<arrow::Schema> file_schema;
  AQ_ARROW_RETURN(reader->GetSchema(&file_schema), path);
  auto meta = file_schema->metadata();
  const std::string version = meta ? meta->Get("arrowquant.calibration_version").ValueOr("") : "";
  if (version.empty())
    return FormatError(StrCat(path, ": not an ArrowQuant calibration file (no arrowquant.calibration_version metadata)"));
  if (version != "1" && version != "2")
    return FormatError(StrCat(path, ": calibration version ", version, "; this build reads versions 1 and 2"));
  if (meta->Contains("arrowquant.shard"))
    return FormatError(StrCat(path, ": a shard of a recording (a share of its calls, float64 sums); merge the shards "
                                    "into one file with arrow_quant_v2.calibration.merge_calibration"));
  const bool v2 = version == "2";
  // Every column but the Hessians, which are read layer by layer when the engine needs them.
  const int hessian_col = file_schema->GetFieldIndex("hessian");
  if (hessian_col < 0) return FormatError(StrCat(path, ": no hessian column"));
  std::vector<int> columns;
  for (int i = 0; i < file_schema->num_fields(); ++i)
    if (i != hessian_col) columns.push_back(i);
  std::shared_ptr<arrow::Table> t;
  AQ_ARROW_ASSIGN(t, reader->ReadTable(columns), path);
  auto hessians = std::make_shared<FileHessianReader>(path, std::move(reader), hessian_col, v2);
  if (hessians->rows() != t->num_rows())
    return FormatError(StrCat(path, ": row groups hold ", hessians->rows(), " rows, the table ", t->num_rows()));
  d.step_kind = meta->Get("arrowquant.step_kind").ValueOr("timestep");
  try {
    const auto range = nlohmann::json::parse(meta->Get("arrowquant.step_range").ValueOr("[0, 1]"));
    d.step_lo = range.at(0).get<double>();
    d.step_hi = range.at(1).get<double>();
    d.num_bins = std::stoi(meta->Get("arrowquant.num_bins").ValueOr("0"));
    d.samples = std::stoll(meta->Get("arrowquant.samples").ValueOr("0"));
  } catch (const std::exception& e) {
    return FormatError(StrCat(path, ": bad calibration metadata: ", e.what()));
  }

  AQ_ASSIGN_OR_RETURN(auto comp, column_as<arrow::StringArray>(*t, "component", path));
  AQ_ASSIGN_OR_RETURN(auto layer, column_as<arrow::StringArray>(*t, "layer", path));
  AQ_ASSIGN_OR_RETURN(auto bin, column_as<arrow::Int32Array>(*t, "bin", path));
  AQ_ASSIGN_OR_RETURN(auto step_lo, column_as<arrow::DoubleArray>(*t, "step_lo", path));
  AQ_ASSIGN_OR_RETURN(auto step_hi, column_as<arrow::DoubleArray>(*t, "step_hi", path));
  AQ_ASSIGN_OR_RETURN(auto split, column_as<arrow::StringArray>(*t, "split", path));
  AQ_ASSIGN_OR_RETURN(auto samples, column_as<arrow::Int64Array>(*t, "samples", path));
  AQ_ASSIGN_OR_RETURN(auto rows, column_as<arrow::Int64Array>(*t, "rows", path));
  AQ_ASSIGN_OR_RETURN(auto step_sum, column_as<arrow::DoubleArray>(*t, "step_sum", path));
  AQ_ASSIGN_OR_RETURN(auto in_features, column_as<arrow::Int32Array>(*t, "in_features", path));
  AQ_ASSIGN_OR_RETURN(auto absmax, column_as<arrow::ListArray>(*t, "absmax", path));
  AQ_ASSIGN_OR_RETURN(auto mins, column_as<arrow::ListArray>(*t, "min", path));
  AQ_ASSIGN_OR_RETURN(auto maxs, column_as<arrow::ListArray>(*t, "max", path));
  AQ_ASSIGN_OR_RETURN(auto reason, column_as<arrow::StringArray>(*t, "hessian_reason", path));
  std::shared_ptr<arrow::Int32Array> hessian_span;
  std::shared_ptr<arrow::Int64Array> hessian_rows;
  std::shared_ptr<arrow::StringArray> hessian_from;
  std::shared_ptr<arrow::Int32Array> hessian_block;  // optional: files before block-diagonal Hessians lack it
  if (v2 && t->GetColumnByName("hessian_block")) {
    AQ_ASSIGN_OR_RETURN(hessian_block, column_as<arrow::Int32Array>(*t, "hessian_block", path));
  }
  if (v2) {
    AQ_ASSIGN_OR_RETURN(hessian_span, column_as<arrow::Int32Array>(*t, "hessian_span", path));
    AQ_ASSIGN_OR_RETURN(hessian_rows, column_as<arrow::Int64Array>(*t, "hessian_rows", path));
    AQ_ASSIGN_OR_RETURN(hessian_from, column_as<arrow::StringArray>(*t, "hessian_from", path));
  }
  // (component, layer, bin, split) -> file row, to resolve hessian_from
  std::map<std::tuple<std::string, std::string, int, std::string>, int64_t> row_of;
  for (int64_t i = 0; i < t->num_rows(); ++i)
    row_of[{comp->GetString(i), layer->GetString(i), bin->Value(i), split->GetString(i)}] = i;
  // Histograms: optional columns of version 1.
  std::shared_ptr<arrow::ListArray> hist_pos, hist_neg;
  std::shared_ptr<arrow::Int64Array> hist_zero;
  if (t->GetColumnByName("hist_pos")) {
    AQ_ASSIGN_OR_RETURN(hist_pos, column_as<arrow::ListArray>(*t, "hist_pos", path));
    AQ_ASSIGN_OR_RETURN(hist_neg, column_as<arrow::ListArray>(*t, "hist_neg", path));
    AQ_ASSIGN_OR_RETURN(hist_zero, column_as<arrow::Int64Array>(*t, "hist_zero", path));
    const std::string bpo = meta->Get("arrowquant.hist_bins_per_octave").ValueOr("");
    const std::string lo = meta->Get("arrowquant.hist_min_exp").ValueOr("");
    const std::string hi = meta->Get("arrowquant.hist_max_exp").ValueOr("");
    if (bpo != std::to_string(kHistBinsPerOctave) || lo != std::to_string(kHistMinExp) || hi != std::to_string(kHistMaxExp))
      return FormatError(StrCat(path, ": histogram layout ", bpo, " bins/octave from 2^", lo, " to 2^", hi,
                                "; this build reads ", kHistBinsPerOctave, " from 2^", kHistMinExp, " to 2^", kHistMaxExp));
  }

  // Sampled input rows: an optional column of version 1.
  std::shared_ptr<arrow::ListArray> inputs;
  if (t->GetColumnByName("inputs")) {
    AQ_ASSIGN_OR_RETURN(inputs, column_as<arrow::ListArray>(*t, "inputs", path));
  }

  for (int64_t i = 0; i < t->num_rows(); ++i) {
    const std::string name = layer->GetString(i);
    const std::string where = StrCat(path, ": layer ", name, " bin ", bin->Value(i));
    CalibrationBin b;
    b.bin = bin->Value(i);
    b.step_lo = step_lo->Value(i);
    b.step_hi = step_hi->Value(i);
    b.samples = samples->Value(i);
    b.rows = rows->Value(i);
    b.step_sum = step_sum->Value(i);
    const int n = in_features->Value(i);
    if (n <= 0) return FormatError(StrCat(where, ": in_features is ", n));
    AQ_ASSIGN_OR_RETURN(b.absmax, (list_at<arrow::FloatArray, float>(*absmax, i, where)));
    AQ_ASSIGN_OR_RETURN(b.min, (list_at<arrow::FloatArray, float>(*mins, i, where)));
    AQ_ASSIGN_OR_RETURN(b.max, (list_at<arrow::FloatArray, float>(*maxs, i, where)));
    if (!reason->IsNull(i)) b.hessian_reason = reason->GetString(i);
    if (!v2) {
      if (b.hessian_reason.empty()) b.hessian_file_row = i, b.hessian_rows = b.rows;
    } else {
      b.hessian_span = hessian_span->Value(i);
      if (b.hessian_span < 1 || d.num_bins % b.hessian_span != 0)
        return FormatError(StrCat(where, ": hessian_span ", b.hessian_span, " does not divide num_bins ", d.num_bins));
      if (!hessian_from->IsNull(i)) b.hessian_from = hessian_from->GetString(i);
      if (hessian_block && !hessian_block->IsNull(i)) {
        b.hessian_block = hessian_block->Value(i);
        if (b.hessian_block < 0) return FormatError(StrCat(where, ": negative hessian_block ", b.hessian_block));
        if (b.hessian_block >= n) b.hessian_block = 0;  // one block: the full matrix
      }
      if (!hessian_rows->IsNull(i)) {
        b.hessian_rows = hessian_rows->Value(i);
        if (b.hessian_rows < 0) return FormatError(StrCat(where, ": negative hessian_rows"));
        if (b.hessian_from.empty()) {
          b.hessian_file_row = i;
        } else {
          auto it = row_of.find({comp->GetString(i), b.hessian_from, b.bin, split->GetString(i)});
          if (it == row_of.end())
            return FormatError(StrCat(where, ": hessian_from names ", b.hessian_from, ", which has no row for this bin and split"));
          auto block_at = [&](int64_t r) { return hessian_block && !hessian_block->IsNull(r) ? hessian_block->Value(r) : 0; };
          if (in_features->Value(it->second) != in_features->Value(i) || hessian_rows->IsNull(it->second) ||
              !hessian_from->IsNull(it->second) || block_at(it->second) != block_at(i))
            return FormatError(StrCat(where, ": hessian_from names ", b.hessian_from,
                                      ", whose row holds no Hessian of the same size"));
          b.hessian_file_row = it->second;
        }
      }
    }
    if (hist_pos && !hist_pos->IsNull(i)) {
      AQ_ASSIGN_OR_RETURN(auto pos, (list_at<arrow::Int64Array, int64_t>(*hist_pos, i, where)));
      AQ_ASSIGN_OR_RETURN(auto neg, (list_at<arrow::Int64Array, int64_t>(*hist_neg, i, where)));
      if (pos.size() != static_cast<size_t>(kActHistBins) || neg.size() != static_cast<size_t>(kActHistBins))
        return FormatError(StrCat(where, ": histograms hold ", pos.size(), "/", neg.size(), " bins, expected ", kActHistBins));
      ActivationHistogram h;
      for (int k = 0; k < kActHistBins; ++k) {
        if (pos[k] < 0 || neg[k] < 0) return FormatError(StrCat(where, ": negative histogram count"));
        h.pos[k] = static_cast<uint64_t>(pos[k]);
        h.neg[k] = static_cast<uint64_t>(neg[k]);
      }
      h.zero = static_cast<uint64_t>(std::max<int64_t>(0, hist_zero->Value(i)));
      h.min = b.min.empty() ? 0.0f : *std::min_element(b.min.begin(), b.min.end());
      h.max = b.max.empty() ? 0.0f : *std::max_element(b.max.begin(), b.max.end());
      b.histogram = std::move(h);
    }
    const size_t nf = static_cast<size_t>(n);
    if (inputs && !inputs->IsNull(i)) {
      AQ_ASSIGN_OR_RETURN(b.inputs, (list_at<arrow::FloatArray, float>(*inputs, i, where)));
      if (b.inputs.size() % nf != 0)
        return FormatError(StrCat(where, ": inputs hold ", b.inputs.size(), " values, not a multiple of in_features ", n));
      for (float v : b.inputs)
        if (!std::isfinite(v)) return FormatError(StrCat(where, ": inputs have a non-finite value ", v));
      b.input_rows = static_cast<int64_t>(b.inputs.size() / nf);
    }
    if (b.absmax.size() != nf || b.min.size() != nf || b.max.size() != nf)
      return FormatError(StrCat(where, ": absmax/min/max hold ", b.absmax.size(), "/", b.min.size(), "/", b.max.size(),
                                " values, in_features is ", n));
    if (b.rows < 0 || b.samples < 0) return FormatError(StrCat(where, ": negative row or sample count"));
    LayerCalibration& lc = d.layers[{comp->GetString(i), name}];
    if (lc.in_features != 0 && lc.in_features != n)
      return FormatError(StrCat(where, ": in_features ", n, " differs from ", lc.in_features, " in another row"));
    lc.in_features = n;
    lc.reader = hessians;
    if (b.holds_hessian()) {
      bool first = true;
      for (const auto* bins : {&lc.fit, &lc.holdout})
        for (const auto& o : *bins) first &= !o.holds_hessian();
      if (!first && lc.hessian_block != b.hessian_block)
        return FormatError(StrCat(where, ": hessian_block ", b.hessian_block, " differs from ", lc.hessian_block,
                                  " in another row of the layer"));
      lc.hessian_block = b.hessian_block;
    }
    const std::string sp = split->GetString(i);
    if (sp == "fit") {
      lc.fit.push_back(std::move(b));
    } else if (sp == "holdout") {
      lc.holdout.push_back(std::move(b));
    } else {
      return FormatError(StrCat(where, ": split is '", sp, "', expected 'fit' or 'holdout'"));
    }
  }
  for (auto& [key, lc] : d.layers) {
    auto by_bin = [](const CalibrationBin& a, const CalibrationBin& b) { return a.bin < b.bin; };
    std::sort(lc.fit.begin(), lc.fit.end(), by_bin);
    std::sort(lc.holdout.begin(), lc.holdout.end(), by_bin);
  }
  return d;
}

namespace {

std::pair<double, double> bin_edges(const CalibrationData& data, int b) {
  const double w = data.num_bins > 0 ? (data.step_hi - data.step_lo) / data.num_bins : 0.0;
  return {data.step_lo + w * b, data.step_lo + w * (b + 1)};
}

}  // namespace

Result<std::vector<TimeGroup>> given_time_groups(const CalibrationData& data, const std::vector<std::vector<int>>& bins) {
  const std::vector<int> present = data.bins_present();
  std::set<int> named;
  std::vector<TimeGroup> groups;
  for (const auto& g : bins) {
    TimeGroup out;
    for (int b : g) {
      if (b < 0 || b >= data.num_bins)
        return InvalidConfig(StrCat("time_groups names step bin ", b, " but the calibration ", data.path, " has ",
                                    data.num_bins, " bins (0 to ", data.num_bins - 1, ")"));
      named.insert(b);
      if (std::binary_search(present.begin(), present.end(), b)) out.bins.push_back(b);
    }
    if (out.bins.empty()) continue;
    out.step_lo = bin_edges(data, out.bins.front()).first;
    out.step_hi = bin_edges(data, out.bins.back()).second;
    groups.push_back(std::move(out));
  }
  for (int b : present)
    if (!named.count(b))
      return InvalidConfig(StrCat("time_groups leaves out step bin ", b, ", which the calibration ", data.path,
                                  " holds; every bin with data must be in one group"));
  return groups;
}

std::vector<TimeGroup> group_time_bins(const CalibrationData& data, int num_groups) {
  std::vector<TimeGroup> groups;
  const std::vector<int> bins = data.bins_present();
  auto bin_edges = [&](int b) { return aq::bin_edges(data, b); };
  for (int b : bins) {
    const auto [lo, hi] = bin_edges(b);
    groups.push_back({{b}, lo, hi});
  }
  if (num_groups < 1) num_groups = 1;
  // Per layer and group: the elementwise max of the bins' absmax (the group's activation range).
  auto range_of = [&](const LayerCalibration& lc, const TimeGroup& g) {
    std::vector<float> r(static_cast<size_t>(lc.in_features), 0.0f);
    for (const auto& b : lc.fit)
      if (std::find(g.bins.begin(), g.bins.end(), b.bin) != g.bins.end())
        for (size_t j = 0; j < r.size(); ++j) r[j] = std::max(r[j], b.absmax[j]);
    return r;
  };
  while (static_cast<int>(groups.size()) > num_groups) {
    size_t best = 0;
    double best_d = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i + 1 < groups.size(); ++i) {
      double sum = 0;
      size_t count = 0;
      for (const auto& [key, lc] : data.layers) {
        const auto a = range_of(lc, groups[i]), b = range_of(lc, groups[i + 1]);
        double worst = 0;
        bool any = false;
        for (size_t j = 0; j < a.size(); ++j) {
          const double eps = 1e-6 * std::max<double>({a[j], b[j], 1e-30});
          if (a[j] == 0.0f && b[j] == 0.0f) continue;
          worst = std::max(worst, std::fabs(std::log((a[j] + eps) / (b[j] + eps))));
          any = true;
        }
        if (any) sum += worst, ++count;
      }
      const double dist = count ? sum / static_cast<double>(count) : 0.0;
      if (dist < best_d) best_d = dist, best = i;
    }
    TimeGroup& a = groups[best];
    const TimeGroup& b = groups[best + 1];
    a.bins.insert(a.bins.end(), b.bins.begin(), b.bins.end());
    a.step_hi = b.step_hi;
    groups.erase(groups.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  return groups;
}

Result<std::optional<LayerHessians>> layer_hessians(const LayerCalibration& layer, const std::vector<TimeGroup>& groups,
                                                    const std::vector<double>& weights, bool checks) {
  LayerHessians out;
  out.cols = static_cast<size_t>(layer.in_features);
  out.block = layer.layout().full() ? 0 : static_cast<size_t>(layer.hessian_block);
  const size_t nn = out.layout().values();
  if (!covered(layer.fit)) return std::optional<LayerHessians>{};
  auto in_group = [](const TimeGroup& g, int b) { return std::find(g.bins.begin(), g.bins.end(), b) != g.bins.end(); };
  for (const auto& b : layer.fit) out.pooled |= b.holds_hessian() && b.hessian_span > 1;
  for (const auto& b : layer.holdout) out.pooled |= b.holds_hessian() && b.hessian_span > 1;
  for (const TimeGroup& g : groups) {
    int64_t rows = 0;
    for (const auto& b : layer.fit)
      if (in_group(g, b.bin)) rows += b.rows;
    out.rows.push_back(rows);
  }
  // Adds the Hessians held by `bins` in group g (all groups: g < 0) to `sum`; returns the rows.
  auto add = [&](const std::vector<CalibrationBin>& bins, int g, std::vector<double>& sum) -> Result<int64_t> {
    int64_t rows = 0;
    for (const auto& b : bins) {
      if (!b.holds_hessian() || b.rows == 0 || (g >= 0 && !in_group(groups[static_cast<size_t>(g)], b.bin))) continue;
      AQ_ASSIGN_OR_RETURN(std::vector<double> h, layer.hessian_of(b));
      if (sum.empty()) sum.assign(nn, 0.0);
      for (size_t i = 0; i < nn; ++i) sum[i] += h[i];
      rows += hessian_rows_of(b);
    }
    return rows;
  };
  out.gptq.assign(nn, 0.0);
  if (out.pooled) {
    // every span alike: the mean of H_s / rows_s
    size_t spans = 0;
    for (const auto& b : layer.fit) {
      if (!b.holds_hessian() || hessian_rows_of(b) == 0) continue;
      AQ_ASSIGN_OR_RETURN(std::vector<double> h, layer.hessian_of(b));
      const double inv = 1.0 / static_cast<double>(hessian_rows_of(b));
      for (size_t i = 0; i < nn; ++i) out.gptq[i] += h[i] * inv;
      ++spans;
    }
    if (spans == 0) return std::optional<LayerHessians>{};
    for (double& v : out.gptq) v /= static_cast<double>(spans);
  } else {
    double weight_sum = 0;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      if (out.rows[gi] == 0) continue;
      std::vector<double> fit;
      AQ_ASSIGN_OR_RETURN(const int64_t fit_rows, add(layer.fit, static_cast<int>(gi), fit));
      if (fit_rows == 0) continue;
      const double w = weights.empty() ? 1.0 : weights[gi];
      weight_sum += w;
      const double inv = 1.0 / static_cast<double>(fit_rows);
      for (size_t i = 0; i < nn; ++i) out.gptq[i] += w * (fit[i] * inv);
    }
    if (!(weight_sum > 0)) return std::optional<LayerHessians>{};
    for (double& v : out.gptq) v /= weight_sum;
  }
  if (!checks) return std::optional<LayerHessians>(std::move(out));

  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const TimeGroup& g = groups[gi];
    auto samples = [&](const std::vector<CalibrationBin>& bins, std::vector<float>& x) {
      size_t rows = 0;
      for (const auto& b : bins)
        if (in_group(g, b.bin) && b.input_rows > 0) {
          x.insert(x.end(), b.inputs.begin(), b.inputs.end());
          rows += static_cast<size_t>(b.input_rows);
        }
      return rows;
    };
    std::vector<double> h;
    std::vector<float> x;
    size_t x_rows = 0;
    bool held = false;
    // held-out Hessians of this group's bins (one per bin)
    bool hold_h = !out.pooled;
    int64_t hold_rows = 0;
    for (const auto& b : layer.holdout)
      if (in_group(g, b.bin) && b.rows > 0) hold_h &= b.holds_hessian() && b.hessian_span == 1, hold_rows += b.rows;
    if (hold_h && hold_rows > 0) {
      AQ_ASSIGN_OR_RETURN(const int64_t r, add(layer.holdout, static_cast<int>(gi), h));
      for (double& v : h) v /= static_cast<double>(std::max<int64_t>(1, r));
      held = true;
    } else if ((x_rows = samples(layer.holdout, x)) > 0) {
      held = true;
    } else if (!out.pooled && out.rows[gi] > 0) {
      AQ_ASSIGN_OR_RETURN(const int64_t r, add(layer.fit, static_cast<int>(gi), h));
      for (double& v : h) v /= static_cast<double>(std::max<int64_t>(1, r));
    } else {
      x_rows = samples(layer.fit, x);  // none: the check is GPTQ's Hessian (check[g] and check_x[g] empty)
    }
    out.check.push_back(std::move(h));
    out.check_x.push_back(std::move(x));
    out.check_x_rows.push_back(x_rows);
    out.check_held_out.push_back(held);
  }
  return std::optional<LayerHessians>(std::move(out));
}

OutputError group_output_error(const LayerHessians& h, size_t g, const float* w, const float* q, size_t rows,
                               size_t cols, size_t row_step) {
  if (!h.check[g].empty()) return output_error(w, q, rows, h.check[g].data(), h.layout(), row_step);
  if (h.check_x_rows[g] > 0)
    return output_error_samples(w, q, rows, cols, h.check_x[g].data(), h.check_x_rows[g], row_step);
  return output_error(w, q, rows, h.gptq.data(), h.layout(), row_step);
}

}  // namespace aq

namespace aq {

std::optional<LayerActivations> layer_activations(const LayerCalibration& layer, const std::vector<TimeGroup>& groups,
                                                  int bits) {
  auto in_group = [](const TimeGroup& g, int b) { return std::find(g.bins.begin(), g.bins.end(), b) != g.bins.end(); };
  ActivationHistogram all;
  std::vector<ActivationHistogram> fit(groups.size()), hold(groups.size());
  for (const auto& b : layer.fit) {
    if (!b.histogram) return std::nullopt;
    all.add(*b.histogram);
    for (size_t g = 0; g < groups.size(); ++g)
      if (in_group(groups[g], b.bin)) fit[g].add(*b.histogram);
  }
  for (const auto& b : layer.holdout) {
    if (!b.histogram) continue;
    for (size_t g = 0; g < groups.size(); ++g)
      if (in_group(groups[g], b.bin)) hold[g].add(*b.histogram);
  }
  if (all.count() == 0) return std::nullopt;
  LayerActivations out;
  out.static_params = choose_activation_params(all, bits);
  for (size_t g = 0; g < groups.size(); ++g) {
    GroupActivation ga;
    ga.params = fit[g].count() ? choose_activation_params(fit[g], bits) : out.static_params;
    ga.held_out = hold[g].count() > 0;
    const ActivationHistogram& check = ga.held_out ? hold[g] : fit[g];
    const double ms = check.mean_square();
    if (ms > 0) {
      ga.rel_error = std::sqrt(activation_mse(check, ga.params) / ms);
      ga.static_rel_error = std::sqrt(activation_mse(check, out.static_params) / ms);
      if (ga.held_out && ga.static_rel_error < ga.rel_error) {
        ga.params = out.static_params;
        ga.rel_error = ga.static_rel_error;
        ga.uses_static = true;
      }
    }
    out.groups.push_back(ga);
  }
  return out;
}

}  // namespace aq
