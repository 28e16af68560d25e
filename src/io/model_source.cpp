#include "io/model_source.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace aq {

namespace fs = std::filesystem;
using nlohmann::json;

const char* layout_name(ModelLayout l) {
  switch (l) {
    case ModelLayout::kSingleFile: return "safetensors-file";
    case ModelLayout::kHfDirectory: return "huggingface";
    case ModelLayout::kDiffusersPipeline: return "diffusers";
  }
  return "?";
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Result<json> read_json_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return IoError(StrCat(p.string(), ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return FormatError(StrCat(p.string(), ": not valid JSON"));
  return j;
}

// Weight files of other frameworks that a component folder may carry next to safetensors.
bool is_foreign_weight_file(const std::string& name) {
  for (const char* ext : {".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf"})
    if (ends_with(name, ext)) return true;
  return false;
}

// Locates the safetensors weights in one folder. Preference: the diffusers name, then the
// transformers name, then a sole *.safetensors file; each may be sharded through an index.
Result<ComponentSource> find_weights(const fs::path& dir, const std::string& name) {
  ComponentSource c;
  c.name = name;
  c.dir = dir.string();
  if (fs::exists(dir / "config.json")) {
    AQ_ASSIGN_OR_RETURN(c.config, read_json_file(dir / "config.json"));
  }
  for (const char* stem : {"diffusion_pytorch_model", "model"}) {
    const fs::path single = dir / (std::string(stem) + ".safetensors");
    const fs::path index = dir / (std::string(stem) + ".safetensors.index.json");
    if (fs::exists(index)) {
      AQ_ASSIGN_OR_RETURN(json j, read_json_file(index));
      auto wm = j.find("weight_map");
      if (wm == j.end() || !wm->is_object() || wm->empty())
        return FormatError(StrCat(index.string(), ": missing or empty 'weight_map'"));
      std::set<std::string> shards;
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it->is_string())
          return FormatError(StrCat(index.string(), ": weight_map entry for '", it.key(), "' is not a file name"));
        const std::string f = it->get<std::string>();
        if (f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == ".." || f == ".")
          return FormatError(StrCat(index.string(), ": weight_map names '", f, "', which is not a file in ", dir.string()));
        shards.insert(f);
      }
      for (const auto& f : shards) {
        if (!fs::exists(dir / f))
          return NotFound(StrCat(index.string(), ": lists shard '", f, "', which does not exist"));
        c.weight_files.push_back((dir / f).string());
      }
      c.index_file = index.string();
      return c;
    }
    if (fs::exists(single)) {
      c.weight_files.push_back(single.string());
      return c;
    }
  }
  std::vector<std::string> found, foreign;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string f = e.path().filename().string();
    if (ends_with(f, ".safetensors")) found.push_back(f);
    else if (is_foreign_weight_file(f)) foreign.push_back(f);
  }
  std::sort(found.begin(), found.end());
  if (found.size() == 1) {
    c.weight_files.push_back((dir / found[0]).string());
    return c;
  }
  if (found.size() > 1) {
    std::string list;
    for (const auto& f : found) list += (list.empty() ? "" : ", ") + f;
    return FormatError(StrCat(dir.string(), ": several .safetensors files (", list,
                              ") and no *.safetensors.index.json saying which belong together"));
  }
  if (!foreign.empty())
    return NotImplemented(StrCat(dir.string(), ": holds only ", foreign[0],
                                 "-style weights; ArrowQuant reads safetensors only (convert with "
                                 "safetensors' convert script or save_pretrained(safe_serialization=True))"));
  return NotFound(StrCat(dir.string(), ": no .safetensors weights found"));
}

void list_files(const fs::path& root, const fs::path& dir, std::vector<std::string>* out) {
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(dir)) entries.push_back(e.path());
  std::sort(entries.begin(), entries.end());
  for (const auto& p : entries) {
    const std::string fname = p.filename().string();
    if (!fname.empty() && fname[0] == '.') continue;  // .git, .cache, editor files
    if (fs::is_directory(p)) list_files(root, p, out);
    else if (fs::is_regular_file(p)) out->push_back(p.lexically_relative(root).string());
  }
}

}  // namespace

Result<ModelSource> discover_model(const std::string& path, const std::vector<std::string>& components) {
  std::error_code ec;
  fs::path p = fs::absolute(fs::path(path), ec);
  if (ec || !fs::exists(p)) return NotFound(StrCat(path, ": no such file or directory"));
  ModelSource m;
  m.root = p.lexically_normal().string();
  if (!m.root.empty() && m.root.size() > 1 && m.root.back() == '/') m.root.pop_back();
  p = fs::path(m.root);

  if (fs::is_regular_file(p)) {
    if (!ends_with(p.filename().string(), ".safetensors")) {
      if (is_foreign_weight_file(p.filename().string()))
        return NotImplemented(StrCat(path, ": only .safetensors weights are read; convert this checkpoint first"));
      return FormatError(StrCat(path, ": not a .safetensors file or a model directory"));
    }
    for (const auto& c : components)
      if (c != "all" && !c.empty())
        return InvalidConfig(StrCat("components: '", c, "' was asked for, but ", path,
                                    " is a single safetensors file with no components"));
    ComponentSource c;
    c.weight_files.push_back(m.root);
    c.selected = true;
    m.layout = ModelLayout::kSingleFile;
    m.components.push_back(std::move(c));
    return m;
  }
  if (!fs::is_directory(p)) return FormatError(StrCat(path, ": neither a file nor a directory"));

  if (fs::exists(p / "model_index.json")) {
    m.layout = ModelLayout::kDiffusersPipeline;
    AQ_ASSIGN_OR_RETURN(m.model_index, read_json_file(p / "model_index.json"));
    if (!m.model_index.is_object())
      return FormatError(StrCat((p / "model_index.json").string(), ": not a JSON object"));
    std::vector<std::string> names;
    for (auto it = m.model_index.begin(); it != m.model_index.end(); ++it) {
      if (it.key().empty() || it.key()[0] == '_') continue;
      // a component entry is ["library", "ClassName"]; null entries are absent components
      if (it->is_array() && it->size() == 2 && (*it)[0].is_string() && fs::is_directory(p / it.key()))
        names.push_back(it.key());
    }
    std::sort(names.begin(), names.end());
    std::vector<std::string> with_weights;
    // Components whose weights are another framework's (.bin, ...): copied like any other file
    // unless asked for by name, which is then NotImplemented.
    std::map<std::string, Status> foreign_only;
    for (const auto& n : names) {
      auto comp = find_weights(p / n, n);
      if (comp.ok()) {
        m.components.push_back(std::move(comp).value());
        with_weights.push_back(n);
      } else if (comp.status().code() == StatusCode::kNotImplemented) {
        foreign_only.emplace(n, comp.status());
      } else if (comp.status().code() != StatusCode::kNotFound) {
        return comp.status();  // a component whose weights exist but are unreadable is an error
      }
    }
    std::set<std::string> want;
    if (components.empty()) {
      for (const char* d : {"unet", "transformer"})
        if (std::find(with_weights.begin(), with_weights.end(), d) != with_weights.end()) want.insert(d);
      if (want.empty()) {
        for (const char* d : {"unet", "transformer"})
          if (foreign_only.count(d)) return foreign_only.at(d);
        std::string list;
        for (const auto& n : with_weights) list += (list.empty() ? "" : ", ") + n;
        return InvalidConfig(StrCat(path, ": a diffusers pipeline without a 'unet' or 'transformer' "
                                    "component; name the components to quantize (components=[...]); "
                                    "available: ", list.empty() ? "none" : list));
      }
    } else {
      for (const auto& c : components) {
        if (c == "all") {
          want.insert(with_weights.begin(), with_weights.end());
        } else if (std::find(with_weights.begin(), with_weights.end(), c) == with_weights.end()) {
          if (foreign_only.count(c)) return foreign_only.at(c);
          std::string list;
          for (const auto& n : with_weights) list += (list.empty() ? "" : ", ") + n;
          return InvalidConfig(StrCat("components: '", c, "' is not a component with safetensors weights in ",
                                      path, "; available: ", list));
        } else {
          want.insert(c);
        }
      }
    }
    for (auto& c : m.components) c.selected = want.count(c.name) > 0;
  } else {
    m.layout = ModelLayout::kHfDirectory;
    for (const auto& c : components)
      if (c != "all" && !c.empty())
        return InvalidConfig(StrCat("components: '", c, "' was asked for, but ", path,
                                    " is a single-model directory (no model_index.json)"));
    AQ_ASSIGN_OR_RETURN(ComponentSource c, find_weights(p, ""));
    c.selected = true;
    m.components.push_back(std::move(c));
  }

  // Everything not a weight file of a selected component is copied.
  std::set<std::string> skip;
  std::vector<std::string> selected_dirs;
  for (const auto& c : m.components) {
    if (!c.selected) continue;
    for (const auto& f : c.weight_files) skip.insert(fs::path(f).lexically_relative(p).string());
    if (!c.index_file.empty()) skip.insert(fs::path(c.index_file).lexically_relative(p).string());
    selected_dirs.push_back(c.name);
  }
  std::vector<std::string> files;
  list_files(p, p, &files);
  for (const auto& f : files) {
    if (skip.count(f)) continue;
    const fs::path rel(f);
    const std::string top = rel.has_parent_path() ? rel.begin()->string() : "";
    const bool in_selected = std::find(selected_dirs.begin(), selected_dirs.end(), top) != selected_dirs.end();
    const std::string fname = rel.filename().string();
    // Other copies of the selected weights (other variants, other frameworks) are not copied:
    // the Parquet data replaces them.
    if (in_selected && (ends_with(fname, ".safetensors") || ends_with(fname, ".safetensors.index.json") ||
                        is_foreign_weight_file(fname) || ends_with(fname, ".bin.index.json")))
      continue;
    // Calibration data (docs/calibration.md) is input to the engine, not part of the model.
    if (fname == "calibration.parquet") continue;
    m.auxiliary_files.push_back(f);
  }
  return m;
}

Result<std::vector<TensorRef>> open_component_tensors(const ComponentSource& component) {
  std::vector<TensorRef> refs;
  std::map<std::string, std::string> where;  // tensor -> file name
  for (const auto& path : component.weight_files) {
    AQ_ASSIGN_OR_RETURN(std::shared_ptr<SafetensorsFile> f, SafetensorsFile::Open(path));
    for (const auto& t : f->tensors()) {
      auto [it, fresh] = where.emplace(t.name, path);
      if (!fresh)
        return FormatError(StrCat("tensor '", t.name, "' appears in both ", it->second, " and ", path));
      refs.push_back(TensorRef{f, &t});
    }
  }
  if (!component.index_file.empty()) {
    AQ_ASSIGN_OR_RETURN(json j, read_json_file(component.index_file));
    const json& wm = j["weight_map"];
    for (auto it = wm.begin(); it != wm.end(); ++it) {
      auto w = where.find(it.key());
      if (w == where.end())
        return FormatError(StrCat(component.index_file, ": lists tensor '", it.key(), "' in ",
                                  it->get<std::string>(), ", which does not hold it"));
      if (fs::path(w->second).filename().string() != it->get<std::string>())
        return FormatError(StrCat(component.index_file, ": says tensor '", it.key(), "' is in ",
                                  it->get<std::string>(), " but it is in ", w->second));
    }
    if (where.size() != wm.size()) {
      for (const auto& [name, file] : where)
        if (!wm.contains(name))
          return FormatError(StrCat(file, ": holds tensor '", name, "', which ", component.index_file,
                                    " does not list"));
    }
  }
  return refs;
}

}  // namespace aq
