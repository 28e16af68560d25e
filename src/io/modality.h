// What kind of data a model generates: text, code, image or audio. Decided from the model's own
// description first (model_index.json's _class_name, config.json's architectures, model_type and
// _class_name), then from tensor names; the config's `modality` overrides both.
#pragma once

#include <string>
#include <vector>

#include "io/model_source.h"

namespace aq {

struct ModalityGuess {
  std::string modality;  // "text", "code", "image", "audio", or "unknown"
  std::string evidence;  // what decided it, e.g. "model_index.json _class_name=AudioLDMPipeline"
};

// Classifies one identifier (class name, model_type, architecture); "" when it says nothing.
std::string modality_of_identifier(const std::string& identifier);

ModalityGuess detect_modality(const ModelSource& model, const std::vector<std::string>& tensor_names);

}  // namespace aq
