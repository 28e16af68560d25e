#include "engine/config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

namespace aq {

using nlohmann::json;

const std::vector<std::string>& default_sensitive_patterns() {
  static const std::vector<std::string> p = {
      "embed",                 // token/position/patch embeddings, timestep and label embedders
      "adaLN_modulation",      // DiT adaptive layer-norm modulation
      "norm1\\.linear",        // AdaLayerNormZero (SD3, Flux, PixArt)
      "norm1_context\\.linear",
      "norm_out\\.linear",     // final adaLN
      "scale_shift_table",
      "time_emb_proj",         // UNet resnets' timestep projection
      "^time_proj",
      "^proj_out\\.",          // DiT / Flux / SD3 output projection (top level only)
      "^conv_in\\.",           // UNet input convolution
      "^conv_out\\.",          // UNet output convolution
      "final_layer",
      "lm_head",               // diffusion LMs' output head (Dream)
      "transformer\\.ff_out",  // LLaDA's output head
  };
  return p;
}

namespace {

Result<NamePattern> compile(const std::string& field, const std::string& text) {
  try {
    return NamePattern{text, std::regex(text, std::regex::ECMAScript)};
  } catch (const std::regex_error& e) {
    return InvalidConfig(StrCat(field, ": '", text, "' is not a valid regular expression (", e.what(), ")"));
  }
}

Status check_bits(const std::string& field, int bits, bool allow_keep) {
  if ((bits >= 2 && bits <= 6) || bits == 8 || (allow_keep && bits == kKeepBits)) return Status::OK();
  return InvalidConfig(StrCat(field, " must be 2, 3, 4, 5, 6 or 8", allow_keep ? " (or 16 to keep unquantized)" : "",
                              ", got ", bits));
}

template <typename T>
Status get(const json& j, const char* key, T* out, const char* what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::OK();
  try {
    if constexpr (std::is_same_v<T, bool>) {
      if (!it->is_boolean()) throw std::invalid_argument("");
    } else if constexpr (std::is_integral_v<T>) {
      if (!it->is_number_integer()) throw std::invalid_argument("");
      // nlohmann's get<int> narrows silently; 2^32 + 4 must not read as 4
      if (it->is_number_unsigned() ? it->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<T>::max())
                                   : (it->get<int64_t>() < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
                                      it->get<int64_t>() > static_cast<int64_t>(std::numeric_limits<T>::max())))
        throw std::invalid_argument("");
    } else if constexpr (std::is_floating_point_v<T>) {
      if (!it->is_number()) throw std::invalid_argument("");
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!it->is_string()) throw std::invalid_argument("");
    }
    *out = it->get<T>();
  } catch (const std::exception&) {
    return InvalidConfig(StrCat(key, " must be ", what, ", got ", it->dump()));
  }
  return Status::OK();
}

Result<std::vector<std::string>> get_strings(const json& j, const char* key) {
  std::vector<std::string> v;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return v;
  if (!it->is_array()) return InvalidConfig(StrCat(key, " must be a list of strings, got ", it->dump()));
  for (const auto& e : *it) {
    if (!e.is_string()) return InvalidConfig(StrCat(key, " must be a list of strings, got element ", e.dump()));
    v.push_back(e.get<std::string>());
  }
  return v;
}

const std::set<std::string>& known_keys() {
  static const std::set<std::string> k = {
      "bit_width", "group_size", "symmetric", "scale_method", "scheme", "rotate", "target_bits_per_weight", "min_accuracy", "enable_fallback",
      "fail_fast", "num_threads", "components", "skip_patterns", "bit_overrides",
      "sensitive_patterns", "sensitive_bit_width", "min_tensor_size", "piece_bytes", "nonfinite", "overwrite",
      "modality", "enable_time_aware", "enable_spatial", "num_time_groups", "time_groups", "calibration_samples",
      "deployment_profile", "calibration_path", "gptq_damp", "gptq_act_order", "time_group_weighting",
      "activation_bits", "ggml_weighting"};
  return k;
}

}  // namespace

Result<EngineConfig> EngineConfig::FromJson(const json& j) {
  if (!j.is_object()) return InvalidConfig("configuration must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!known_keys().count(it.key())) return InvalidConfig(StrCat("unknown configuration field '", it.key(), "'"));

  EngineConfig c;
  AQ_RETURN_IF_ERROR(get(j, "bit_width", &c.bit_width, "an integer"));
  AQ_RETURN_IF_ERROR(check_bits("bit_width", c.bit_width, false));
  AQ_RETURN_IF_ERROR(get(j, "group_size", &c.group_size, "an integer"));
  AQ_RETURN_IF_ERROR(get(j, "symmetric", &c.symmetric, "true or false"));
  std::string method = "search";
  AQ_RETURN_IF_ERROR(get(j, "scale_method", &method, "a string"));
  if (method == "search") c.scale_method = ScaleMethod::kSearch;
  else if (method == "minmax") c.scale_method = ScaleMethod::kMinMax;
  else return InvalidConfig(StrCat("scale_method must be 'search' or 'minmax', got '", method, "'"));
  std::string kind = "affine";
  AQ_RETURN_IF_ERROR(get(j, "scheme", &kind, "a string"));
  if (kind == "affine") c.scheme_kind = SchemeKind::kAffine;
  else if (kind == "entropy") c.scheme_kind = SchemeKind::kEntropy;
  else if (auto g = parse_ggml_type(kind)) {
    c.scheme_kind = SchemeKind::kGgml;
    c.ggml_type = *g;
    if (c.bit_width != ggml_traits(*g).nominal_bits)
      return InvalidConfig(StrCat("scheme '", ggml_traits(*g).name, "' is ", ggml_traits(*g).nominal_bits,
                                  "-bit; bit_width ", c.bit_width, " was given (leave it out, or give ",
                                  ggml_traits(*g).nominal_bits, ")"));
  } else {
    return InvalidConfig(StrCat("scheme must be 'affine', 'entropy' or a ggml type (q8_0, q6_k, q5_k, q4_k, q3_k, "
                                "q2_k, iq4_xs, iq4_nl), got '", kind, "'"));
  }
  std::string weighting = "llama";
  AQ_RETURN_IF_ERROR(get(j, "ggml_weighting", &weighting, "a string"));
  if (weighting != "plain" && weighting != "magnitude" && weighting != "llama")
    return InvalidConfig(StrCat("ggml_weighting must be 'plain', 'magnitude' or 'llama', got '", weighting, "'"));
  c.ggml_weighting = weighting == "magnitude" ? GgmlWeighting::kMagnitude
                     : weighting == "llama"   ? GgmlWeighting::kLlama
                                              : GgmlWeighting::kPlain;
  if (auto it = j.find("rotate"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) return InvalidConfig(StrCat("rotate must be true, false or null, got ", it->dump()));
    c.rotate = it->get<bool>() ? 1 : 0;
  }
  AQ_RETURN_IF_ERROR(get(j, "target_bits_per_weight", &c.target_bits_per_weight, "a number"));
  if (c.target_bits_per_weight != 0 && !(c.target_bits_per_weight >= 1.0 && c.target_bits_per_weight <= 12.0))
    return InvalidConfig(StrCat("target_bits_per_weight must be between 1 and 12 (or None), got ", c.target_bits_per_weight));
  if (c.target_bits_per_weight != 0 && c.scheme_kind == SchemeKind::kAffine)
    return InvalidConfig("target_bits_per_weight applies to scheme='entropy' (the tensor budget) and ggml schemes (the "
                         "model budget); affine schemes' size follows bit_width and group_size");
  if (c.target_bits_per_weight != 0 && c.scheme_kind == SchemeKind::kGgml &&
      !(c.target_bits_per_weight >= 2.625 && c.target_bits_per_weight <= 8.5))
    return InvalidConfig(StrCat("target_bits_per_weight for ggml schemes (the model budget) must be between 2.625 "
                                "(every layer Q2_K) and 8.5 (every layer Q8_0), got ", c.target_bits_per_weight));
  AQ_RETURN_IF_ERROR(validate_scheme(c.scheme(c.bit_width)));
  AQ_RETURN_IF_ERROR(get(j, "min_accuracy", &c.min_accuracy, "a number"));
  if (!(c.min_accuracy >= 0.0 && c.min_accuracy <= 1.0))
    return InvalidConfig(StrCat("min_accuracy must be between 0 and 1, got ", c.min_accuracy));
  AQ_RETURN_IF_ERROR(get(j, "enable_fallback", &c.enable_fallback, "true or false"));
  AQ_RETURN_IF_ERROR(get(j, "fail_fast", &c.fail_fast, "true or false"));
  AQ_RETURN_IF_ERROR(get(j, "num_threads", &c.num_threads, "an integer"));
  if (c.num_threads < 0 || c.num_threads > 1024)
    return InvalidConfig(StrCat("num_threads must be 0 (all cores) or a positive count, got ", c.num_threads));
  AQ_ASSIGN_OR_RETURN(c.components, get_strings(j, "components"));
  AQ_ASSIGN_OR_RETURN(auto skips, get_strings(j, "skip_patterns"));
  for (const auto& s : skips) {
    AQ_ASSIGN_OR_RETURN(auto p, compile("skip_patterns", s));
    c.skip_patterns.push_back(std::move(p));
  }
  if (auto it = j.find("bit_overrides"); it != j.end() && !it->is_null()) {
    // A JSON object loses order; the Python side sends [[pattern, bits], ...] to keep it.
    if (!it->is_array()) return InvalidConfig("bit_overrides must be a list of [pattern, bits] pairs");
    for (const auto& e : *it) {
      if (!e.is_array() || e.size() != 2 || !e[0].is_string() || !e[1].is_number_integer() ||
          e[1].get<int64_t>() < 0 || e[1].get<int64_t>() > kKeepBits)
        return InvalidConfig(StrCat("bit_overrides entry must be [pattern, bits] with bits 2, 3, 4, 8 or 16, got ",
                                    e.dump()));
      AQ_ASSIGN_OR_RETURN(auto p, compile("bit_overrides", e[0].get<std::string>()));
      const int bits = e[1].get<int>();
      AQ_RETURN_IF_ERROR(check_bits(StrCat("bit_overrides['", p.text, "']"), bits, true));
      c.bit_overrides.emplace_back(std::move(p), bits);
    }
  }
  std::vector<std::string> sensitive = default_sensitive_patterns();
  if (auto it = j.find("sensitive_patterns"); it != j.end() && !it->is_null()) {
    AQ_ASSIGN_OR_RETURN(sensitive, get_strings(j, "sensitive_patterns"));
  }
  for (const auto& s : sensitive) {
    AQ_ASSIGN_OR_RETURN(auto p, compile("sensitive_patterns", s));
    c.sensitive_patterns.push_back(std::move(p));
  }
  AQ_RETURN_IF_ERROR(get(j, "sensitive_bit_width", &c.sensitive_bit_width, "an integer"));
  AQ_RETURN_IF_ERROR(check_bits("sensitive_bit_width", c.sensitive_bit_width, true));
  int64_t min_size = static_cast<int64_t>(c.min_tensor_size);
  AQ_RETURN_IF_ERROR(get(j, "min_tensor_size", &min_size, "an integer"));
  if (min_size < 0) return InvalidConfig(StrCat("min_tensor_size must be >= 0, got ", min_size));
  c.min_tensor_size = static_cast<uint64_t>(min_size);
  int64_t piece_bytes = static_cast<int64_t>(c.piece_bytes);
  AQ_RETURN_IF_ERROR(get(j, "piece_bytes", &piece_bytes, "an integer"));
  if (piece_bytes < 1) return InvalidConfig(StrCat("piece_bytes must be >= 1, got ", piece_bytes));
  c.piece_bytes = static_cast<uint64_t>(piece_bytes);
  std::string nonfinite = "error";
  AQ_RETURN_IF_ERROR(get(j, "nonfinite", &nonfinite, "a string"));
  if (nonfinite != "error" && nonfinite != "keep")
    return InvalidConfig(StrCat("nonfinite must be 'error' or 'keep', got '", nonfinite, "'"));
  c.keep_nonfinite = nonfinite == "keep";
  AQ_RETURN_IF_ERROR(get(j, "overwrite", &c.overwrite, "true or false"));
  AQ_RETURN_IF_ERROR(get(j, "modality", &c.modality, "a string"));
  if (!c.modality.empty() && c.modality != "text" && c.modality != "code" && c.modality != "image" &&
      c.modality != "audio")
    return InvalidConfig(StrCat("modality must be one of text, code, image, audio (or None to detect), got '",
                                c.modality, "'"));
  AQ_RETURN_IF_ERROR(get(j, "enable_time_aware", &c.enable_time_aware, "true or false"));
  AQ_RETURN_IF_ERROR(get(j, "enable_spatial", &c.enable_spatial, "true or false"));
  AQ_RETURN_IF_ERROR(get(j, "num_time_groups", &c.num_time_groups, "an integer"));
  if (c.num_time_groups < 1) return InvalidConfig(StrCat("num_time_groups must be >= 1, got ", c.num_time_groups));
  if (auto it = j.find("time_groups"); it != j.end() && !it->is_null()) {
    const char* expected = "time_groups must be null or a list of non-empty lists of step bins (integers >= 0), "
                           "ascending and disjoint";
    if (!it->is_array() || it->empty()) return InvalidConfig(StrCat(expected, "; got ", it->dump()));
    int last = -1;
    for (const auto& g : *it) {
      if (!g.is_array() || g.empty()) return InvalidConfig(StrCat(expected, "; got ", it->dump()));
      std::vector<int> bins;
      for (const auto& b : g) {
        if (!b.is_number_integer() || b.get<int64_t>() <= last || b.get<int64_t>() > 100000)
          return InvalidConfig(StrCat(expected, "; got ", it->dump()));
        last = b.get<int>();
        bins.push_back(last);
      }
      c.time_groups.push_back(std::move(bins));
    }
  }
  AQ_RETURN_IF_ERROR(get(j, "calibration_samples", &c.calibration_samples, "an integer"));
  if (c.calibration_samples < 1)
    return InvalidConfig(StrCat("calibration_samples must be >= 1, got ", c.calibration_samples));
  AQ_RETURN_IF_ERROR(get(j, "deployment_profile", &c.deployment_profile, "a string"));
  AQ_RETURN_IF_ERROR(get(j, "calibration_path", &c.calibration_path, "a string"));
  AQ_RETURN_IF_ERROR(get(j, "gptq_damp", &c.gptq_damp, "a number"));
  if (!(c.gptq_damp > 0.0 && c.gptq_damp <= 1.0))
    return InvalidConfig(StrCat("gptq_damp must be in (0, 1], got ", c.gptq_damp));
  AQ_RETURN_IF_ERROR(get(j, "gptq_act_order", &c.gptq_act_order, "true or false"));
  AQ_RETURN_IF_ERROR(get(j, "time_group_weighting", &c.time_group_weighting, "a string"));
  if (c.time_group_weighting != "uniform" && c.time_group_weighting != "relative")
    return InvalidConfig(StrCat("time_group_weighting must be 'uniform' or 'relative', got '", c.time_group_weighting, "'"));
  AQ_RETURN_IF_ERROR(get(j, "activation_bits", &c.activation_bits, "an integer"));
  if (c.activation_bits != 0 && c.activation_bits != 4 && c.activation_bits != 8)
    return InvalidConfig(StrCat("activation_bits must be 4, 8 or None (weight-only), got ", c.activation_bits));

  c.as_json = {
      {"bit_width", c.bit_width}, {"group_size", c.group_size}, {"symmetric", c.symmetric},
      {"scale_method", method}, {"scheme", kind},
      {"rotate", c.rotate < 0 ? json(nullptr) : json(c.rotate == 1)},
      {"target_bits_per_weight", c.target_bits_per_weight > 0 ? json(c.target_bits_per_weight) : json(nullptr)},
      {"min_accuracy", c.min_accuracy}, {"enable_fallback", c.enable_fallback},
      {"fail_fast", c.fail_fast}, {"num_threads", c.num_threads}, {"components", c.components},
      {"skip_patterns", skips}, {"bit_overrides", json::array()}, {"sensitive_patterns", sensitive},
      {"sensitive_bit_width", c.sensitive_bit_width}, {"min_tensor_size", c.min_tensor_size},
      {"piece_bytes", c.piece_bytes},
      {"nonfinite", nonfinite}, {"overwrite", c.overwrite},
      {"modality", c.modality.empty() ? json(nullptr) : json(c.modality)},
      {"enable_time_aware", c.enable_time_aware}, {"enable_spatial", c.enable_spatial},
      {"num_time_groups", c.num_time_groups},
      {"time_groups", c.time_groups.empty() ? json(nullptr) : json(c.time_groups)},
      {"calibration_samples", c.calibration_samples},
      {"deployment_profile", c.deployment_profile},
      {"calibration_path", c.calibration_path.empty() ? json(nullptr) : json(c.calibration_path)},
      {"gptq_damp", c.gptq_damp}, {"gptq_act_order", c.gptq_act_order},
      {"time_group_weighting", c.time_group_weighting},
      {"ggml_weighting", c.ggml_weighting == GgmlWeighting::kMagnitude ? "magnitude"
                         : c.ggml_weighting == GgmlWeighting::kLlama   ? "llama"
                                                                       : "plain"},
      {"activation_bits", c.activation_bits ? json(c.activation_bits) : json(nullptr)}};
  for (const auto& [p, b] : c.bit_overrides) c.as_json["bit_overrides"].push_back(json::array({p.text, b}));
  return c;
}

std::optional<GgmlType> EngineConfig::ggml_type_for(int bits, uint64_t cols, std::string* note) const {
  GgmlType t = ggml_type;
  if (bits != bit_width) {
    switch (bits) {
      case 2: t = GgmlType::kQ2_K; break;
      case 3: t = GgmlType::kQ3_K; break;
      case 4: t = GgmlType::kQ4_K; break;
      case 5: t = GgmlType::kQ5_K; break;
      case 6: t = GgmlType::kQ6_K; break;
      default: t = GgmlType::kQ8_0; break;
    }
  }
  const GgmlTraits& g = ggml_traits(t);
  if (cols % static_cast<uint64_t>(g.block) == 0) return t;
  if (cols % static_cast<uint64_t>(kQ32) != 0) return std::nullopt;
  const GgmlType f = g.nominal_bits <= 4 ? GgmlType::kIQ4_NL : GgmlType::kQ8_0;
  if (note)
    *note = StrCat(g.name, " needs rows of a multiple of ", g.block, " weights, these hold ", cols, ": ",
                   ggml_traits(f).name);
  return f;
}

QuantScheme EngineConfig::scheme(int bits, uint64_t rows, uint64_t cols) const {
  if (scheme_kind == SchemeKind::kGgml) {
    (void)rows;
    // A row length no ggml type takes never gets here (plan_tensor keeps such tensors); cols 0
    // (validation of the configuration) asks for the type at bit_width.
    QuantScheme g = ggml_scheme(cols == 0 ? ggml_type : ggml_type_for(bits, cols).value_or(GgmlType::kQ8_0));
    g.ggml_weighting = ggml_weighting;
    return g;
  }
  QuantScheme s;
  s.bits = bits;
  s.group_size = group_size;
  s.symmetric = symmetric;
  s.method = scale_method;
  s.kind = scheme_kind;
  // Rotation is opt-in. It makes any tensor Gaussian: a gain for fixed-rate codes on heavy-tailed
  // or outlier-channel weights, a loss for entropy coding (a Gaussian has the most entropy for its
  // variance, so a peaky distribution codes cheaper as it is). BENCHMARKS.md has the figures.
  s.rotate = rotate == 1;
  if (scheme_kind == SchemeKind::kEntropy && target_bits_per_weight > 0)
    s.target_bpw = std::clamp(target_bits_per_weight + (bits - bit_width), 1.0, 12.0);
  (void)rows;
  (void)cols;
  return s;
}

}  // namespace aq
