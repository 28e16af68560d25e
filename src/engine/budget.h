// A model-level bit budget for ggml schemes: each layer's type chosen from measured sensitivity
// so that the stored bits per weight of the quantized layers meet `target_bits_per_weight`.
//
// Per layer, a strided sample of rows is encoded with every candidate type (the K types Q2_K ..
// Q6_K and Q8_0 for rows of a multiple of 256 weights, IQ4_NL and Q8_0 for other multiples of
// 32) and the relative squared error measured: with calibration (the layer's Hessian H, the
// timestep groups' input second moments averaged), the output error
// e_l(t) = tr((W - Q) H (W - Q)^T) / tr(W H W^T), the rows encoded with diag(H) as their
// importance, as the layer's own encoder does; without, the weight error
// e_l(t) = ||W - Q||^2 / ||W||^2. The cost of
// a choice is sum_l p_l e_l(t_l): every layer's relative error counts alike (each adds its share
// to the residual stream whatever its size, so small layers are cheap to protect), times a prior
// p_l = kSensitivePrior for the sensitive layers (embeddings, timestep and conditioning
// projections, output projections: config.sensitive_patterns) and 1 for the rest. Layers with an
// explicit bit override keep it and count against the budget.
//
// The allocation is the greedy solution of the Lagrangian relaxation: every layer starts at its
// cheapest candidate, and the upgrade with the largest cost drop per added bit (on the lower
// convex hull of the layer's (bits, cost) points) is taken while the budget allows it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "engine/config.h"
#include "engine/tensor_job.h"
#include "quant/ggml_types.h"
#include "quant/gptq.h"

namespace aq {

inline constexpr double kSensitivePrior = 8.0;
inline constexpr uint64_t kBudgetSampleRows = 32;

struct BudgetLayer {
  std::string name;
  uint64_t weights = 0;
  double prior = 1.0;
  std::vector<GgmlType> types;  // candidates, by increasing bits per weight
  std::vector<double> error;    // relative squared weight error of each candidate (on the sample)
  int fixed = -1;               // >= 0: the layer's type is set (an override), index into types
  bool output_error = false;    // error measured under a calibration Hessian
};

// Encodes the sampled rows of `src` with every type in `layer.types` (on the pool when given)
// and fills layer.error: the relative output error under `hessian` (in `layout`'s entries, full or
// block-diagonal, layout.cols == src.cols; default: full) when given, else the relative weight error.
Status measure_budget_layer(const RowSource& src, ThreadPool* pool, BudgetLayer* layer,
                            const std::vector<double>* hessian = nullptr, HessianLayout layout = {});

// The encoder's per-column importance from a Hessian: diag(H) over its mean, floored at 1e-4 so
// that columns no calibration input reached still weigh a little and every block keeps a fit.
std::vector<float> hessian_importance(const std::vector<double>& hessian, const HessianLayout& layout);

// The index into each layer's candidates; total bits <= target_bpw * total weights when the
// cheapest choice allows it (otherwise the cheapest choice).
std::vector<int> allocate_budget(const std::vector<BudgetLayer>& layers, double target_bpw);

}  // namespace aq
