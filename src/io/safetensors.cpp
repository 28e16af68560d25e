#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

namespace aq {

using nlohmann::json;

std::optional<uint64_t> shape_numel(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > UINT64_MAX / static_cast<uint64_t>(d)) return std::nullopt;
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {

Status entry_error(const std::string& path, const std::string& name, const std::string& what) {
  return FormatError(StrCat(path, ": tensor '", name, "': ", what));
}

Result<TensorInfo> parse_entry(const std::string& path, const std::string& name, const json& e,
                               uint64_t data_start, uint64_t data_size) {
  if (name.empty()) return FormatError(StrCat(path, ": header has a tensor with an empty name"));
  if (!e.is_object()) return entry_error(path, name, StrCat("entry is not an object: ", e.dump()));
  TensorInfo t;
  t.name = name;

  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string())
    return entry_error(path, name, "missing or non-string 'dtype'");
  auto parsed = parse_dtype(dt->get<std::string>());
  if (!parsed) return entry_error(path, name, StrCat("unknown dtype '", dt->get<std::string>(), "'"));
  t.dtype = *parsed;

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) return entry_error(path, name, "missing or non-array 'shape'");
  for (const auto& d : *sh) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0)
      return entry_error(path, name, StrCat("shape entry ", d.dump(), " is not a non-negative integer"));
    t.shape.push_back(d.get<int64_t>());
  }
  auto numel = shape_numel(t.shape);
  if (!numel) return entry_error(path, name, StrCat("shape ", shape_to_string(t.shape), " overflows"));
  t.numel = *numel;

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    return entry_error(path, name, "'data_offsets' must be two non-negative integers [begin, end]");
  const auto begin = (*off)[0].get<uint64_t>();
  const auto end = (*off)[1].get<uint64_t>();
  if (end < begin)
    return entry_error(path, name, StrCat("data_offsets [", begin, ", ", end, "] end before begin"));
  if (end > data_size)
    return entry_error(path, name, StrCat("data_offsets [", begin, ", ", end,
                                          "] run past the end of the data section (", data_size,
                                          " bytes)"));
  const uint64_t elem = dtype_size(t.dtype);
  if (t.numel > UINT64_MAX / elem || t.numel * elem != end - begin)
    return entry_error(path, name,
                       StrCat("shape ", shape_to_string(t.shape), " of ", dtype_name(t.dtype),
                              " needs ", t.numel, " x ", elem, " bytes but data_offsets [", begin,
                              ", ", end, "] hold ", end - begin));
  t.offset = data_start + begin;
  t.nbytes = end - begin;
  return t;
}

}  // namespace

Result<std::vector<TensorInfo>> parse_safetensors_header(const std::string& path,
                                                         const char* text, size_t text_size,
                                                         uint64_t data_start, uint64_t data_size,
                                                         std::map<std::string, std::string>* metadata) {
  if (text_size == 0 || text[0] != '{')
    return FormatError(StrCat(path, ": header does not start with '{' (not a safetensors file?)"));
  json header = json::parse(text, text + text_size, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    return FormatError(StrCat(path, ": header is not a valid JSON object"));

  std::vector<TensorInfo> tensors;
  tensors.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) return FormatError(StrCat(path, ": '__metadata__' is not an object"));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          return FormatError(StrCat(path, ": '__metadata__' value for '", m.key(), "' is not a string"));
        if (metadata) (*metadata)[m.key()] = m->get<std::string>();
      }
      continue;
    }
    AQ_ASSIGN_OR_RETURN(TensorInfo t, parse_entry(path, it.key(), *it, data_start, data_size));
    tensors.push_back(std::move(t));
  }

  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.offset != b.offset ? a.offset < b.offset : a.nbytes < b.nbytes;
  });
  uint64_t expected = data_start;
  const TensorInfo* prev = nullptr;
  for (const auto& t : tensors) {
    if (t.offset < expected)
      return FormatError(StrCat(path, ": tensor '", t.name, "' (bytes ", t.offset - data_start, "..",
                                t.offset - data_start + t.nbytes, ") overlaps tensor '",
                                prev ? prev->name : "?", "'"));
    if (t.offset > expected)
      return FormatError(StrCat(path, ": gap of ", t.offset - expected,
                                " unreferenced bytes in the data section before tensor '", t.name, "'"));
    expected = t.offset + t.nbytes;
    prev = &t;
  }
  if (expected != data_start + data_size)
    return FormatError(StrCat(path, ": data section is ", data_size, " bytes but the tensors cover ",
                              expected - data_start,
                              prev ? StrCat(" (", data_size - (expected - data_start),
                                            " unreferenced bytes after the last tensor '", prev->name, "')")
                                   : std::string(" (the header lists no tensors)")));
  return tensors;
}

Result<std::shared_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  AQ_ASSIGN_OR_RETURN(auto mapped, MappedFile::Open(path));
  const uint64_t size = mapped->size();
  if (size < 8)
    return FormatError(StrCat(path, ": file is ", size, " bytes, shorter than the 8-byte header length"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | mapped->data()[i];
  if (n > kMaxSafetensorsHeader)
    return FormatError(StrCat(path, ": header length ", n, " exceeds the ", kMaxSafetensorsHeader,
                              "-byte limit"));
  if (n > size - 8)
    return FormatError(StrCat(path, ": header length ", n, " runs past the end of the file (",
                              size, " bytes)"));
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile(std::move(mapped)));
  const char* text = reinterpret_cast<const char*>(file->file_->data() + 8);
  AQ_ASSIGN_OR_RETURN(file->tensors_, parse_safetensors_header(path, text, n, 8 + n, size - 8 - n,
                                                               &file->metadata_));
  // The header is small and read once; give its pages back right away.
  file->file_->release(0, 8 + n);
  return file;
}

}  // namespace aq
