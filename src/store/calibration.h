// Calibration data (docs/calibration.md): what arrow_quant_v2.calibration recorded of every
// linear and convolution layer's inputs, per step bin (timestep or mask ratio) and split (fit /
// held-out), and the engine's grouping of those bins into num_time_groups timestep groups.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "quant/activation.h"
#include "quant/gptq.h"

namespace aq {

// One layer's inputs in one bin and split: rows x in_features inputs X summed.
struct CalibrationBin {
  int bin = 0;
  double step_lo = 0, step_hi = 0;
  int64_t samples = 0;  // forward calls
  int64_t rows = 0;     // input vectors
  double step_sum = 0;
  std::vector<float> absmax, min, max;  // per input feature
  // The Hessian (sum of x x^T) this row holds, over the aligned span of hessian_span bins that
  // contains `bin` (hessian_rows rows): in memory (in_features^2, row-major), or in the file at
  // row hessian_file_row (its own row, or through hessian_from the row of the layer it shares);
  // neither when the row holds none (its span's Hessian is in another row, or none was recorded).
  std::vector<double> hessian;
  int64_t hessian_file_row = -1;
  int hessian_span = 1;
  int64_t hessian_rows = 0;
  std::string hessian_from;             // the layer whose Hessian this one shares ("" when its own)
  // 0: the Hessian is the full matrix; else block-diagonal, in diagonal blocks of this many
  // columns (quant/gptq.h HessianLayout) -- recorded for layers wider than max_hessian_features
  int64_t hessian_block = 0;
  std::string hessian_reason;           // why the row's bins have no Hessian ("" when they have one)
  bool holds_hessian() const { return !hessian.empty() || hessian_file_row >= 0; }
  std::optional<ActivationHistogram> histogram;  // of every input value; absent in older files
  std::vector<float> inputs;            // a random sample of input rows, row-major (input_rows x in_features)
  int64_t input_rows = 0;
};

// Reads Hessians from a calibration file on demand (they can take gigabytes; the rest of the file
// is read at once). Thread-safe.
class HessianReader {
 public:
  virtual ~HessianReader() = default;
  // The symmetric Hessian held in file row `row`, in `layout`'s entries (the full in_features^2
  // matrix row-major, or its diagonal blocks).
  virtual Result<std::vector<double>> load(int64_t row, const HessianLayout& layout) const = 0;
};

struct LayerCalibration {
  int in_features = 0;
  int64_t hessian_block = 0;  // of every row holding a Hessian (the file reader checks they agree)
  HessianLayout layout() const { return {static_cast<size_t>(in_features), static_cast<size_t>(hessian_block)}; }
  std::vector<CalibrationBin> fit, holdout;  // sorted by bin
  std::shared_ptr<const HessianReader> reader;  // for the bins' hessian_file_row
  // The Hessian a bin holds, in layout()'s entries (loaded from the file when not in memory).
  Result<std::vector<double>> hessian_of(const CalibrationBin& b) const;
  // Whether every fit bin with rows is covered by a Hessian (held by its span's row).
  bool has_hessians() const;
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
  // The statistics of a model's tensor: recorded for its component, else for a single model (""),
  // else -- for a tensor of a single model -- for the one component that recorded that name (a
  // file recorded from pipe.transformer, used on the transformer's own directory).
  const LayerCalibration* lookup(const std::string& component, const std::string& tensor) const;
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

// The given groups of step bins (EngineConfig::time_groups) over the data's bins: each group keeps
// the bins the data holds, a group left with none is dropped, and a bin the data holds that no
// group names is an error (as is a bin beyond the data's num_bins).
Result<std::vector<TimeGroup>> given_time_groups(const CalibrationData& data, const std::vector<std::vector<int>>& bins);

// A layer's Hessians for GPTQ and validation over the given groups.
//
// With one Hessian per step bin (hessian_span 1), GPTQ's is sum_g w_g H_g / rows_g and each
// group is checked on its held-out Hessian. With Hessians over spans of several bins (recorded
// with hessian_bins < num_bins, for models whose per-bin Hessians would not fit), GPTQ's is the
// mean over the spans of H_s / rows_s, and each group is checked on its recorded input samples.
// Per group, the check is, in order of preference: the held-out Hessian, the held-out input
// samples, the fit Hessian, the fit input samples, GPTQ's Hessian.
struct LayerHessians {
  size_t cols = 0;
  size_t block = 0;                         // every Hessian below is in layout()'s entries
  HessianLayout layout() const { return {cols, block}; }
  bool pooled = false;                      // Hessians over spans of several bins
  std::vector<double> gptq;                 // GPTQ's Hessian (above)
  // Per group: a normalised Hessian; or, when empty, input samples (check_x, rows x cols); or, when
  // both are empty, GPTQ's Hessian (uses_gptq).
  std::vector<std::vector<double>> check;
  std::vector<std::vector<float>> check_x;
  std::vector<size_t> check_x_rows;
  std::vector<bool> check_held_out;         // per group: whether the check is on held-out data
  std::vector<int64_t> rows;                // per group: fit rows
  bool uses_gptq(size_t g) const { return check[g].empty() && check_x_rows[g] == 0; }
};
// nullopt when some fit bin with rows has no Hessian (recorded without one: too wide, grouped).
// `weights`: w_g per group (those of groups without fit rows are ignored, the rest renormalised
// to sum to 1); empty: uniform; not used with pooled Hessians. `checks` false: only `gptq` and
// `rows` are filled. An error when a Hessian cannot be read from the file.
Result<std::optional<LayerHessians>> layer_hessians(const LayerCalibration& layer, const std::vector<TimeGroup>& groups,
                                                    const std::vector<double>& weights = {}, bool checks = true);

// Output error of q against w (rows x cols, every row_step-th row) on group g's check: its
// Hessian, or its input samples.
OutputError group_output_error(const LayerHessians& h, size_t g, const float* w, const float* q, size_t rows,
                               size_t cols, size_t row_step = 1);

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
