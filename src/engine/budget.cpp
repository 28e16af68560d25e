#include "engine/budget.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <queue>

#include "quant/ggml_codec.h"

namespace aq {

std::vector<float> hessian_importance(const std::vector<double>& h, const HessianLayout& layout) {
  const size_t n = layout.cols;
  double mean = 0;
  for (size_t j = 0; j < n; ++j) mean += h[layout.diag(j)];
  mean = n ? mean / static_cast<double>(n) : 0;
  const double floor = mean > 0 ? 1e-4 * mean : 1.0;
  std::vector<float> imp(n);
  for (size_t j = 0; j < n; ++j)
    imp[j] = static_cast<float>(std::max(h[layout.diag(j)], floor) / (mean > 0 ? mean : 1.0));
  return imp;
}

namespace {

constexpr uint64_t kLanes = 8;

// sum_j a_j b_j in kLanes fixed lanes (a loop the compiler vectorizes without reassociating,
// so every build gives the same sum), then the tail.
__attribute__((target_clones("avx512f", "avx2", "default"))) double dot(const double* a, const double* b, uint64_t n) {
  double lane[kLanes] = {};
  uint64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (uint64_t l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
  double s = 0;
  for (uint64_t l = 0; l < kLanes; ++l) s += lane[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// sum_i d_i H d_i^T over the n rows of d (n x cols), H symmetric in `layout`'s entries: n cols^2
// multiply-adds for a full H (a 4096-column layer's 32 sampled rows: 0.5 G per candidate type),
// n cols block for a block-diagonal one. Each row of H is read once and used for every row of d
// while it is in cache.
double quadratic_form(const std::vector<double>& h, const HessianLayout& layout, const double* d, uint64_t n) {
  const uint64_t cols = layout.cols;
  double total = 0;
  for (size_t b = 0; b < layout.blocks(); ++b) {
    const uint64_t first = layout.begin(b), nb = layout.size(b);
    for (uint64_t a = 0; a < nb; ++a) {
      const double* ha = h.data() + layout.offset(b) + a * nb;
      for (uint64_t i = 0; i < n; ++i) total += d[i * cols + first + a] * dot(ha, d + i * cols + first, nb);
    }
  }
  return total;
}

}  // namespace

Status measure_budget_layer(const RowSource& src, ThreadPool* pool, BudgetLayer* layer,
                            const std::vector<double>* hessian, HessianLayout layout) {
  if (layout.cols == 0) layout = {src.cols, 0};  // not given: the full matrix
  if (hessian && (layout.cols != src.cols || hessian->size() != layout.values()))
    return Internal(StrCat("tensor '", src.name, "': a budget Hessian of ", hessian->size(), " values for ",
                                  src.cols, " columns"));
  const uint64_t rows = src.rows, cols = src.cols;
  const uint64_t n = std::min<uint64_t>(rows, kBudgetSampleRows);
  const uint64_t stride = n ? rows / n : 1;
  std::vector<float> x(n * cols);
  for (uint64_t i = 0; i < n; ++i)
    convert_to_f32(src.dtype, src.data + (i * stride) * cols * dtype_size(src.dtype), cols, x.data() + i * cols);
  double energy = 0;
  for (float v : x) {
    if (!std::isfinite(v)) return NonFinite(StrCat("tensor '", src.name, "': a sampled weight is not finite"));
    energy += static_cast<double>(v) * v;
  }
  std::vector<float> importance;
  if (hessian) {
    std::vector<double> xd(x.begin(), x.end());
    energy = quadratic_form(*hessian, layout, xd.data(), n);
    importance = hessian_importance(*hessian, layout);
  }
  layer->error.assign(layer->types.size(), 0.0);
  auto measure = [&, energy](size_t k) {
    const GgmlType t = layer->types[k];
    std::vector<uint8_t> bytes(ggml_row_bytes(t, cols));
    std::vector<float> y(cols);
    std::vector<double> d(hessian ? n * cols : 0);
    GgmlEncodeOptions fast;  // the llama-equivalent start refined once: the ranking, not the last percent
    fast.starts = 1;
    fast.rounds = 1;
    if (hessian) fast.importance = importance.data();
    double e = 0;
    for (uint64_t i = 0; i < n; ++i) {
      ggml_encode_row(t, x.data() + i * cols, cols, bytes.data(), fast);
      ggml_decode(t, bytes.data(), cols / static_cast<uint64_t>(ggml_traits(t).block), y.data());
      for (uint64_t j = 0; j < cols; ++j) {
        const double dj = static_cast<double>(x[i * cols + j]) - y[j];
        if (hessian)
          d[i * cols + j] = dj;
        else
          e += dj * dj;
      }
    }
    if (hessian) e = quadratic_form(*hessian, layout, d.data(), n);
    layer->error[k] = energy > 0 ? std::max(0.0, e) / energy : 0.0;
  };
  if (pool) {
    WaitGroup wg;
    wg.add(static_cast<int>(layer->types.size()));
    for (size_t k = 0; k < layer->types.size(); ++k)
      pool->submit([&measure, &wg, k] {
        measure(k);
        wg.done();
      });
    wg.wait();
  } else {
    for (size_t k = 0; k < layer->types.size(); ++k) measure(k);
  }
  return Status::OK();
}

std::vector<int> allocate_budget(const std::vector<BudgetLayer>& layers, double target_bpw) {
  std::vector<int> pick(layers.size(), 0);
  double total_weights = 0, bits = 0;
  auto bits_of = [&](size_t l, int k) {
    return ggml_bits_per_weight(layers[l].types[static_cast<size_t>(k)]) * static_cast<double>(layers[l].weights);
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    pick[l] = layers[l].fixed >= 0 ? layers[l].fixed : 0;
    total_weights += static_cast<double>(layers[l].weights);
    bits += bits_of(l, pick[l]);
  }
  const double budget = target_bpw * total_weights;
  // The best next step of layer l from its current pick: the candidate with the largest cost
  // drop per added bit (the next vertex of the lower convex hull).
  struct Step {
    double gain;  // cost drop per bit
    size_t layer;
    int to;
    bool operator<(const Step& o) const { return gain < o.gain || (gain == o.gain && layer > o.layer); }
  };
  auto next_step = [&](size_t l) -> std::optional<Step> {
    const BudgetLayer& L = layers[l];
    if (L.fixed >= 0) return std::nullopt;
    const int cur = pick[l];
    std::optional<Step> best;
    for (int k = cur + 1; k < static_cast<int>(L.types.size()); ++k) {
      const double db = bits_of(l, k) - bits_of(l, cur);
      const double dc = L.prior * (L.error[static_cast<size_t>(cur)] - L.error[static_cast<size_t>(k)]);
      if (db <= 0 || dc <= 0) continue;
      const double g = dc / db;
      if (!best || g > best->gain) best = Step{g, l, k};
    }
    return best;
  };
  std::priority_queue<Step> q;
  for (size_t l = 0; l < layers.size(); ++l)
    if (auto s = next_step(l)) q.push(*s);
  while (!q.empty()) {
    const Step s = q.top();
    q.pop();
    if (pick[s.layer] >= s.to) continue;  // stale
    const double add = bits_of(s.layer, s.to) - bits_of(s.layer, pick[s.layer]);
    if (bits + add > budget) {
      // too big a step: a smaller upgrade of the same layer may still fit
      const BudgetLayer& L = layers[s.layer];
      std::optional<Step> smaller;
      for (int k = pick[s.layer] + 1; k < s.to; ++k) {
        const double db = bits_of(s.layer, k) - bits_of(s.layer, pick[s.layer]);
        const double dc = L.prior * (L.error[static_cast<size_t>(pick[s.layer])] - L.error[static_cast<size_t>(k)]);
        if (db > 0 && dc > 0 && bits + db <= budget && (!smaller || dc / db > smaller->gain))
          smaller = Step{dc / db, s.layer, k};
      }
      if (smaller) q.push(*smaller);
      continue;
    }
    bits += add;
    pick[s.layer] = s.to;
    if (auto n = next_step(s.layer)) q.push(*n);
  }
  return pick;
}

}  // namespace aq
