// Calibration data (docs/calibration.md): what arrow_quant_v2.calibration recorded of every
// linear and convolution layer's inputs, per step bin (timestep or mask ratio) and split (fit /
// held-out), and the engine's grouping of those bins into num_time_groups timestep groups.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "quant/activation.h"

namespace aq {

// One layer's inputs in one bin and split: rows x in_features inputs X summed.
struct CalibrationBin {
  int bin = 0;
  double step_lo = 0, step_hi = 0;
  int64_t samples = 0;  // forward calls
  int64_t rows = 0;     // input vectors
  double step_sum = 0;
  std::vector<float> absmax, min, max;  // per input feature
  std::vector<double> hessian;          // in_features^2, row-major sum of x x^T; empty when not recorded
  std::string hessian_reason;           // why not
  std::optional<ActivationHistogram> histogram;  // of every input value; absent in older files
  std::vector<float> inputs;            // a random sample of input rows, row-major (input_rows x in_features)
  int64_t input_rows = 0;
};

struct LayerCalibration {
  int in_features = 0;
  std::vector<CalibrationBin> fit, holdout;  // sorted by bin
};

// The step bins merged into timestep groups (adjacent bins only).
struct TimeGroup {
  std::vector<int> bins;
  double step_lo = 0, step_hi = 0;
};

struct CalibrationData {
  std::string path;
  std::string step_kind;  // "timestep" | "mask_ratio"
  double step_lo = 0, step_hi = 0;
  int num_bins = 0;
  int64_t samples = 0;
  // (component, weight tensor name) -> statistics
  std::map<std::pair<std::string, std::string>, LayerCalibration> layers;

  const LayerCalibration* find(const std::string& component, const std::string& tensor) const;
  // Bins that hold fit data in any layer, ascending.
  std::vector<int> bins_present() const;
};

Result<CalibrationData> read_calibration(const std::string& path);

// Groups the bins present into at most `num_groups` groups of adjacent bins. Starting from one
// group per bin, the adjacent pair whose activation ranges are closest is merged until the
// count fits: distance = mean over layers of max over input features of
// |log((absmax_a + eps) / (absmax_b + eps))| (eps = 1e-6 of the larger absmax), ties to the
// earlier pair. With as many bins as groups (or fewer), each bin is its own group: uniform in t.
std::vector<TimeGroup> group_time_bins(const CalibrationData& data, int num_groups);

// A layer's Hessians for GPTQ and validation over the given groups.
struct LayerHessians {
  size_t cols = 0;
  std::vector<double> gptq;                 // sum_g w_g H_g / rows_g over the groups with fit rows
  std::vector<std::vector<double>> check;   // per group: held-out H_g / rows_g (fit data when none held out)
  std::vector<bool> check_held_out;         // per group: whether check[g] is held-out data
  std::vector<int64_t> rows;                // per group: fit rows
};
// nullopt when the layer has no Hessian in some group (recorded without one: too wide).
// `weights`: w_g per group (those of groups without fit rows are ignored, the rest renormalised
// to sum to 1); empty: uniform. `checks` false: only `gptq` and `rows` are filled (`check` is
// left empty), which saves a matrix per group.
std::optional<LayerHessians> layer_hessians(const LayerCalibration& layer, const std::vector<TimeGroup>& groups,
                                            const std::vector<double>& weights = {}, bool checks = true);

// Per timestep group: activation quantization parameters fitted on the group's inputs, and the
// relative error sqrt(E[(x - x')^2] / E[x^2]) on the group's held-out inputs, for the group's
// own parameters and for one static set fitted on the whole trajectory. A group whose own
// parameters do worse on its held-out inputs than the static set keeps the static set.
struct GroupActivation {
  ActivationParams params;
  double rel_error = 0;         // group parameters, held-out inputs
  double static_rel_error = 0;  // static parameters, same inputs
  bool held_out = false;
  // The group's own parameters did worse than the static set on its held-out inputs (too few
  // inputs to fit a clip): the group uses the static set, and rel_error is its error.
  bool uses_static = false;
};
struct LayerActivations {
  ActivationParams static_params;
  std::vector<GroupActivation> groups;  // one per TimeGroup (empty groups keep the static set)
};
// nullopt when the file holds no histograms for the layer.
std::optional<LayerActivations> layer_activations(const LayerCalibration& layer, const std::vector<TimeGroup>& groups,
                                                  int bits);

}  // namespace aq
