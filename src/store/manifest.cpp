#include "store/manifest.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "store/format.h"

namespace aq {

Status write_json_file(const std::string& path, const nlohmann::json& j) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return IoError(StrCat(path, ": cannot create"));
  out << j.dump(2) << "\n";
  out.close();
  if (!out) return IoError(StrCat(path, ": write failed"));
  return Status::OK();
}

Result<nlohmann::json> read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!std::filesystem::exists(path)) return NotFound(StrCat(path, ": no such file"));
    return IoError(StrCat(path, ": cannot open"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) return FormatError(StrCat(path, ": not valid JSON"));
  return j;
}

Result<nlohmann::json> read_manifest(const std::string& model_dir) {
  namespace fs = std::filesystem;
  if (!fs::exists(model_dir)) return NotFound(StrCat(model_dir, ": no such directory"));
  const std::string path = (fs::path(model_dir) / kManifestFile).string();
  if (!fs::exists(path))
    return FormatError(StrCat(model_dir, ": no ", kManifestFile, " (not an ArrowQuant model directory, or an unfinished one)"));
  AQ_ASSIGN_OR_RETURN(nlohmann::json j, read_json(path));
  // (json::value throws when the key holds another type: look the fields up and check their types)
  const auto format = j.is_object() ? j.find("format") : j.end();
  if (format == j.end() || !format->is_string() || format->get_ref<const std::string&>() != kFormatName)
    return FormatError(StrCat(path, ": not an ArrowQuant manifest (format is not '", kFormatName, "')"));
  if (!j.contains("format_version") || !j["format_version"].is_number_integer())
    return FormatError(StrCat(path, ": no integer format_version"));
  // int64: get<int> would wrap a large version (2^32 + 2) into a readable one
  const int64_t v = j["format_version"].get<int64_t>();
  if (v < kMinFormatVersion || v > kFormatVersion)
    return FormatError(StrCat(path, ": format version ", v, "; this build reads versions ", kMinFormatVersion, " to ",
                              kFormatVersion));
  return j;
}

}  // namespace aq
