// What the engine does with one layer's calibration data before and after quantizing it
// (docs/calibration.md, docs/architecture.md "Calibration"):
//   - the layer's Hessians per timestep group (GPTQ and output-space validation);
//   - channel equalization: y = W x = (W S)(S^-1 x) with S = diag(s) over input channels,
//       s_c = max|X_c|^alpha / max|W_c|^(1 - alpha)
//     (max over every recorded input / every output row; a convolution's channel spans its kernel
//     positions), normalised to a geometric mean of 1. alpha is searched per layer: no
//     equalization and alpha in kAlphas are each quantized (a strided subset of at most 256 rows,
//     with the layer's own quantizer: GPTQ on S^-1 H S^-1, or the data-free scheme) and scored by
//     the mean over timestep groups of the output relative error on held-out inputs -- for
//     weight-only layers from the Hessians, tr(D H_g D^T) / tr(W H_g W^T) with D = W - Q' S^-1;
//     with activation_bits, on the recorded input samples, with the inputs X S^-1 fake-quantized
//     by parameters fitted for that group. The least score wins, but equalization must beat none
//     by kMinGain (smaller per-layer gains did not carry over to whole denoisers);
//   - GPTQ's factor for the chosen S;
//   - activation parameters per timestep group for the layer's (equalized) input.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/tensor_job.h"
#include "quant/gptq.h"
#include "quant/metrics.h"
#include "quant/scheme.h"
#include "store/calibration.h"

namespace aq {

inline constexpr double kAlphas[] = {0.2, 0.35, 0.5, 0.65, 0.8};
// Equalization is applied only when its score is this fraction below no equalization's.
inline constexpr double kMinGain = 0.1;

struct CalibratedLayerOptions {
  bool time_aware = true;   // GPTQ on the timestep-group Hessian
  bool spatial = true;      // search channel equalization
  int activation_bits = 0;  // 0: weight-only deployment
  // GPTQ's Hessian sum_g w_g H_g / n_g: w_g = 1 / groups (false), or w_g proportional to
  // 1 / tr(W H_g W^T / n_g) (true: every group's relative output error weighs alike).
  bool relative_group_weights = false;
  GptqOptions gptq;
  QuantScheme gptq_scheme;  // the affine scheme GPTQ codes into
  QuantScheme data_free;    // the scheme the layer gets without GPTQ
};

struct CalibratedLayer {
  std::shared_ptr<const LayerHessians> hessians;  // null: the layer is quantized data-free
  std::vector<double> group_weights;              // w_g of GPTQ's Hessian, summing to 1 over groups with data
  std::shared_ptr<const GptqFactor> gptq;         // null: no GPTQ
  std::optional<LayerActivations> activations;
  // Channel equalization; input_scale empty when not applied.
  size_t channels = 0;
  std::vector<float> input_scale;                         // per input channel: 1 / s_c
  // s_c per column (cols values): the job quantizes W S, each row scaled as it is read
  // (RowSource::col_scale), so no scaled copy of the weight is held. Null: no equalization.
  std::shared_ptr<const std::vector<float>> column_scale;
  nlohmann::json equalization;                            // null, or the search: alpha, candidates
  std::vector<std::string> warnings;
};

// w: the layer's weight, rows x cols (cols = channels x kernel positions), read in row blocks
// (its pages handed back through w.release as it goes) and at sampled rows, never whole.
Result<CalibratedLayer> prepare_calibrated_layer(const std::string& name, const RowSource& w, size_t channels,
                                                 const LayerCalibration& lc, const std::vector<TimeGroup>& groups,
                                                 const CalibratedLayerOptions& options);
// The same for a float32 array in memory.
Result<CalibratedLayer> prepare_calibrated_layer(const std::string& name, const float* w, size_t rows, size_t cols,
                                                 size_t channels, const LayerCalibration& lc,
                                                 const std::vector<TimeGroup>& groups,
                                                 const CalibratedLayerOptions& options);

// Multiplies each column j of rows x cols values by scale[j / (cols / scale.size())].
void scale_columns(float* x, size_t rows, size_t cols, const std::vector<float>& scale);

// Output-space check of the stored layer (q: its effective weight, input scaling folded in)
// per timestep group: relative error and cosine of W x against Q x on the group's held-out
// inputs (Hessians), and, with activation parameters and recorded input samples, the relative
// error with the input fake-quantized too ("relative_error_with_activations").
struct OutputCheck {
  nlohmann::json groups = nlohmann::json::array();
  double worst_cosine = 1;
};
// The check uses every output_check_row_step(rows)-th row of the layer (at most ~512 rows): w and
// q hold those rows only, `sampled` of them.
size_t output_check_row_step(size_t rows);
OutputCheck check_layer_output(const float* w, const float* q, size_t sampled, size_t cols, const CalibratedLayer& layer,
                               const LayerCalibration& lc, const std::vector<TimeGroup>& groups);

}  // namespace aq
