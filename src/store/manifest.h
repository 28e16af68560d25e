// manifest.json: what a quantized model directory is (format, version, source, config,
// modality, components, summary). Written last, so a directory with a manifest is complete.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "common/status.h"

namespace aq {

Status write_json_file(const std::string& path, const nlohmann::json& j);
Result<nlohmann::json> read_json(const std::string& path);

// Reads <dir>/manifest.json and checks that it is an ArrowQuant manifest of a version we read.
Result<nlohmann::json> read_manifest(const std::string& model_dir);

}  // namespace aq
