// The engine's configuration: the C++ side of DiffusionQuantConfig. It arrives as JSON (the
// Python config's to_dict()), is checked here field by field, and is recorded in the manifest.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "quant/scheme.h"

namespace aq {

// A name pattern (ECMAScript regular expression, matched anywhere in the tensor name).
struct NamePattern {
  std::string text;
  std::regex re;
  bool matches(const std::string& name) const { return std::regex_search(name, re); }
};

inline constexpr int kKeepBits = 16;  // a bit override of 16 keeps the tensor unquantized

struct EngineConfig {
  int bit_width = 4;
  int group_size = 128;  // 0 = per channel
  bool symmetric = false;
  ScaleMethod scale_method = ScaleMethod::kSearch;
  SchemeKind scheme_kind = SchemeKind::kAffine;  // "affine" | "entropy" | a ggml type
  GgmlType ggml_type = GgmlType::kQ4_K;          // kGgml: the type at bit_width
  // "plain" | "magnitude" | "llama" (the default: of the three it gave the least denoiser output
  // error data-free on the trained DiT of bench_ggml_calibrated.py, BENCHMARKS.md)
  GgmlWeighting ggml_weighting = GgmlWeighting::kLlama;
  int rotate = -1;                   // randomized Hadamard rotation: 1 on; 0 or -1 (unset) off
  double target_bits_per_weight = 0; // entropy: the budget at bit_width (0 = bit_width + 0.5)
  double min_accuracy = 0.85;
  bool enable_fallback = true;
  bool fail_fast = false;
  int num_threads = 0;  // 0 = every core
  std::vector<std::string> components;
  std::vector<NamePattern> skip_patterns;
  std::vector<std::pair<NamePattern, int>> bit_overrides;  // first match wins
  std::vector<NamePattern> sensitive_patterns;
  int sensitive_bit_width = 8;
  uint64_t min_tensor_size = 1024;  // tensors with fewer weights are kept as they are
  // A tensor that stores more bytes than this is written as pieces of at most this much (whole
  // row blocks), so no writer or reader holds a whole big tensor (format version 4).
  uint64_t piece_bytes = 64ull << 20;
  bool keep_nonfinite = false;      // false: a NaN/Inf weight is an error naming the tensor
  bool overwrite = false;
  std::string modality;  // "" = detect
  bool enable_time_aware = true;
  bool enable_spatial = true;
  int num_time_groups = 10;
  // The timestep groups as lists of step bins, given instead of found from the calibration's
  // activation ranges (empty: found). Ascending, disjoint bins; every bin the calibration holds
  // must be in one. calibrate_and_quantize(sequential=True) fixes them before quantizing anything.
  std::vector<std::vector<int>> time_groups;
  int calibration_samples = 128;
  std::string deployment_profile = "local";
  // Calibration (docs/calibration.md): "" = <model>/calibration.parquet when it exists.
  std::string calibration_path;
  double gptq_damp = 0.01;    // GPTQ dampening, a fraction of the Hessian's mean diagonal
  bool gptq_act_order = true; // GPTQ: columns in order of decreasing input energy
  std::string time_group_weighting = "uniform";  // "uniform" | "relative" (sensitivity: 1 / output energy)
  int activation_bits = 0;    // W8A8 / W4A8: 8 or 4 stores activation parameters per timestep group; 0 none

  nlohmann::json as_json;  // the configuration as given, with defaults filled in

  static Result<EngineConfig> FromJson(const nlohmann::json& j);
  // The scheme for a rows x cols tensor planned at `bits` (bit_width, a sensitive width, or a
  // fallback rung). Entropy budgets move with the bits: target + (bits - bit_width), or bits + 0.5.
  QuantScheme scheme(int bits, uint64_t rows = 0, uint64_t cols = 0) const;
  // ggml schemes: the type for a layer at `bits` with rows of `cols` weights. At bit_width the
  // configured type, at other widths the K type of that width (8 and 7: Q8_0). A row length the
  // type cannot take falls back to a 32-weight block type of about the same size (IQ4_NL up to 4
  // bits, Q8_0 above; `note` says so); nullopt when cols is no multiple of 32 either (the layer
  // is kept).
  std::optional<GgmlType> ggml_type_for(int bits, uint64_t cols, std::string* note = nullptr) const;
};

// Defaults that hold embeddings, timestep and conditioning embedders, adaLN modulation and the
// output projection at sensitive_bit_width (see docs/architecture.md, "Layer policy").
const std::vector<std::string>& default_sensitive_patterns();

}  // namespace aq
