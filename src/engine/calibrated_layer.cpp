#include "engine/calibrated_layer.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/strcat.h"
#include "engine/tensor_job.h"
#include "quant/ggml_types.h"
#include "quant/group_quant.h"
#include "quant/tensor_codec.h"

namespace aq {

using nlohmann::json;

namespace {

using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rows of the weight the alpha search quantizes: every row_step-th, at most about this many.
constexpr size_t kSearchRows = 256;
// s is kept within this factor of 1 either way (after normalisation).
constexpr double kMaxScale = 1e4;

bool in_group(const TimeGroup& g, int bin) { return std::find(g.bins.begin(), g.bins.end(), bin) != g.bins.end(); }

// The recorded input samples of each timestep group: fit rows, and the rows to check against
// (held-out when there are any, else fit).
struct GroupSamples {
  std::vector<float> fit, check;
  size_t fit_rows = 0, check_rows = 0;
  bool held_out = false;
  std::vector<float> col_min, col_max;  // per column, over the group's fit bins (every input, not just samples)
};

std::vector<GroupSamples> group_samples(const LayerCalibration& lc, const std::vector<TimeGroup>& groups) {
  const size_t cols = static_cast<size_t>(lc.in_features);
  std::vector<GroupSamples> out(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    GroupSamples& s = out[g];
    s.col_min.assign(cols, 0.0f);
    s.col_max.assign(cols, 0.0f);
    bool first = true;
    for (const auto& b : lc.fit) {
      if (!in_group(groups[g], b.bin)) continue;
      s.fit.insert(s.fit.end(), b.inputs.begin(), b.inputs.end());
      s.fit_rows += static_cast<size_t>(b.input_rows);
      for (size_t j = 0; j < cols; ++j) {
        s.col_min[j] = first ? b.min[j] : std::min(s.col_min[j], b.min[j]);
        s.col_max[j] = first ? b.max[j] : std::max(s.col_max[j], b.max[j]);
      }
      first = false;
    }
    for (const auto& b : lc.holdout) {
      if (!in_group(groups[g], b.bin)) continue;
      s.check.insert(s.check.end(), b.inputs.begin(), b.inputs.end());
      s.check_rows += static_cast<size_t>(b.input_rows);
    }
    s.held_out = s.check_rows > 0;
    if (!s.held_out) s.check = s.fit, s.check_rows = s.fit_rows;
  }
  return out;
}

// Activation parameters for inputs X / s (inv_col: 1 / s per column) fitted on samples, with
// the range from every recorded input. A value's quantization error reaches the output through
// its column of the stored weight Q' = W S, so each column's values count in proportion to that
// column's squared norm (importance: mean 1, in 64ths): the clip is the one least costly to the
// output, not to the activations.
ActivationParams fit_params(const std::vector<float>& x, size_t rows, size_t cols, const std::vector<float>& inv_col,
                            const std::vector<uint32_t>& importance, const std::vector<float>& col_min,
                            const std::vector<float>& col_max, int bits, int factors) {
  ActivationHistogram h;
  std::vector<float> row(cols);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t j = 0; j < cols; ++j) row[j] = x[r * cols + j] * inv_col[j];
    h.add_values(row.data(), cols, importance.data());
  }
  float lo = 0.0f, hi = 0.0f;
  for (size_t j = 0; j < cols; ++j) {
    lo = std::min(lo, col_min[j] * inv_col[j]);
    hi = std::max(hi, col_max[j] * inv_col[j]);
  }
  h.min = lo;
  h.max = hi;
  return choose_activation_params(h, bits, factors);
}

// ||X W^T - fq(X / s) Q'^T|| / ||X W^T|| over rows x cols samples; q_stored = Q' (= Q S).
double output_error_with_activations(const std::vector<float>& x, size_t rows, size_t cols, const float* w,
                                     const float* q_stored, size_t out_rows, const std::vector<float>& inv_col,
                                     const ActivationParams& p) {
  if (rows == 0) return 0.0;
  const Eigen::Index R = static_cast<Eigen::Index>(rows), C = static_cast<Eigen::Index>(cols),
                     O = static_cast<Eigen::Index>(out_rows);
  Eigen::Map<const MatF> X(x.data(), R, C), W(w, O, C), Q(q_stored, O, C);
  MatF xq(R, C);
  for (Eigen::Index r = 0; r < R; ++r)
    for (Eigen::Index j = 0; j < C; ++j) xq(r, j) = fake_quantize(X(r, j) * inv_col[static_cast<size_t>(j)], p);
  const MatF y = X * W.transpose();
  const MatF yq = xq * Q.transpose();
  const double num = (y - yq).cast<double>().squaredNorm(), den = y.cast<double>().squaredNorm();
  return den > 0 ? std::sqrt(num / den) : (num > 0 ? INFINITY : 0.0);
}

// Per column of q (rows x cols): its squared norm over the mean, in 64ths (at least 1).
std::vector<uint32_t> column_importance(const float* q, size_t rows, size_t cols) {
  std::vector<double> n(cols, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t j = 0; j < cols; ++j) n[j] += static_cast<double>(q[r * cols + j]) * q[r * cols + j];
  double mean = 0;
  for (double v : n) mean += v;
  mean = cols ? mean / static_cast<double>(cols) : 0.0;
  std::vector<uint32_t> out(cols, 64);
  if (mean > 0)
    for (size_t j = 0; j < cols; ++j)
      out[j] = static_cast<uint32_t>(std::clamp(std::nearbyint(64.0 * n[j] / mean), 1.0, 1e9));
  return out;
}

std::vector<float> expand(const std::vector<float>& per_channel, size_t cols) {
  std::vector<float> out(cols, 1.0f);
  if (per_channel.empty()) return out;
  const size_t k = cols / per_channel.size();
  for (size_t j = 0; j < cols; ++j) out[j] = per_channel[j / k];
  return out;
}

// s_c = xa_c^alpha / wa_c^(1 - alpha), geometric mean 1 over the channels where both are > 0
// (the others keep 1), clamped to [1 / kMaxScale, kMaxScale].
std::vector<float> equalization_scales(const std::vector<float>& xa, const std::vector<float>& wa, double alpha) {
  const size_t n = xa.size();
  std::vector<double> logs(n, 0.0);
  std::vector<bool> valid(n, false);
  double sum = 0;
  size_t count = 0;
  for (size_t c = 0; c < n; ++c) {
    if (!(xa[c] > 0.0f) || !(wa[c] > 0.0f)) continue;
    logs[c] = alpha * std::log(static_cast<double>(xa[c])) - (1.0 - alpha) * std::log(static_cast<double>(wa[c]));
    valid[c] = true;
    sum += logs[c];
    ++count;
  }
  const double mean = count ? sum / static_cast<double>(count) : 0.0;
  std::vector<float> s(n, 1.0f);
  for (size_t c = 0; c < n; ++c)
    if (valid[c]) s[c] = static_cast<float>(std::clamp(std::exp(logs[c] - mean), 1.0 / kMaxScale, kMaxScale));
  return s;
}

struct Candidate {
  double alpha = -1;  // < 0: no equalization
  std::vector<float> s;  // per channel (empty: all 1)
  std::shared_ptr<const GptqFactor> factor;
  std::vector<double> errors;  // per group
  double score = INFINITY;
  std::string failure;
};

}  // namespace

void scale_columns(float* x, size_t rows, size_t cols, const std::vector<float>& scale) {
  if (scale.empty() || cols == 0) return;
  const size_t k = cols / scale.size();
  for (size_t r = 0; r < rows; ++r) {
    float* row = x + r * cols;
    for (size_t j = 0; j < cols; ++j) row[j] *= scale[j / k];
  }
}

namespace {

// Every step-th row of the weight as float32 (rows 0, step, 2 step, ...).
std::vector<float> sampled_rows(const RowSource& w, size_t step) {
  const size_t rows = w.rows, cols = w.cols, n = rows == 0 ? 0 : (rows + step - 1) / step;
  const size_t row_bytes = cols * dtype_size(w.dtype);
  std::vector<float> out(n * cols);
  for (size_t i = 0; i < n; ++i) convert_to_f32(w.dtype, w.data + i * step * row_bytes, cols, out.data() + i * cols);
  return out;
}

}  // namespace

Result<CalibratedLayer> prepare_calibrated_layer(const std::string& name, const float* w, size_t rows, size_t cols,
                                                 size_t channels, const LayerCalibration& lc,
                                                 const std::vector<TimeGroup>& groups,
                                                 const CalibratedLayerOptions& o) {
  RowSource src;
  src.data = reinterpret_cast<const uint8_t*>(w);
  src.dtype = DType::kF32;
  src.rows = rows;
  src.cols = cols;
  src.name = name;
  return prepare_calibrated_layer(name, src, channels, lc, groups, o);
}

Result<CalibratedLayer> prepare_calibrated_layer(const std::string& name, const RowSource& w, size_t channels,
                                                 const LayerCalibration& lc, const std::vector<TimeGroup>& groups,
                                                 const CalibratedLayerOptions& o) {
  CalibratedLayer out;
  const size_t ngroups = groups.size(), rows = w.rows, cols = w.cols;
  // GPTQ's timestep-group weights: uniform, or (relative) 1 / the group's output energy
  // tr(W H_g W^T) / n_g, summed bin by bin over a strided subset of at most kSearchRows rows.
  std::vector<double> weights;
  if (o.relative_group_weights && rows > 0 && cols > 0) {
    const size_t step = std::max<size_t>(1, (rows + kSearchRows - 1) / kSearchRows);
    const Eigen::Index n = static_cast<Eigen::Index>((rows + step - 1) / step), C = static_cast<Eigen::Index>(cols);
    const std::vector<float> sampled = sampled_rows(w, step);
    MatD ws(n, C);
    for (Eigen::Index r = 0; r < n; ++r)
      for (Eigen::Index j = 0; j < C; ++j) ws(r, j) = sampled[static_cast<size_t>(r) * cols + static_cast<size_t>(j)];
    std::vector<double> energy(ngroups, 0.0);
    std::vector<int64_t> fit_rows(ngroups, 0);
    bool ok = true, pooled = false;
    for (const auto& b : lc.fit) {
      if (!b.holds_hessian() || b.rows == 0) continue;
      pooled = b.hessian_span > 1;  // pooled Hessians have no per-group energy
      ok = !pooled;
      if (!ok) break;
      for (size_t g = 0; g < ngroups; ++g)
        if (in_group(groups[g], b.bin)) {
          AQ_ASSIGN_OR_RETURN(const std::vector<double> hb, lc.hessian_of(b));
          const HessianLayout lay = lc.layout();
          for (size_t k = 0; k < lay.blocks(); ++k) {
            const Eigen::Index first = static_cast<Eigen::Index>(lay.begin(k)), nb = static_cast<Eigen::Index>(lay.size(k));
            const auto wb = ws.middleCols(first, nb);
            energy[g] += ((wb * Eigen::Map<const MatD>(hb.data() + lay.offset(k), nb, nb)).array() * wb.array()).sum();
          }
          fit_rows[g] += b.rows;
        }
    }
    weights.assign(ngroups, 0.0);
    for (size_t g = 0; g < ngroups; ++g) {
      if (fit_rows[g] == 0) continue;
      const double e = energy[g] / static_cast<double>(fit_rows[g]);
      ok = ok && std::isfinite(e) && e > 0;
      weights[g] = 1.0 / e;
    }
    if (!ok) {
      weights.clear();
      out.warnings.push_back(pooled ? StrCat(name, ": relative timestep-group weights need a Hessian per step bin; "
                                                   "the calibration pools them over spans of bins (the mean over spans "
                                                   "is used)")
                                    : StrCat(name, ": relative timestep-group weights need a positive output energy "
                                                   "in every group; uniform weights used"));
    }
  }
  AQ_ASSIGN_OR_RETURN(auto h, layer_hessians(lc, groups, weights));
  if (!h) {
    std::string why = "no Hessian was recorded";
    for (const auto& b : lc.fit)
      if (!b.hessian_reason.empty()) why = b.hessian_reason;
    out.warnings.push_back(StrCat(name, ": quantized data-free (", why, ")"));
    return out;
  }
  // the weights as used: over the groups with fit rows, summing to 1
  out.group_weights.assign(ngroups, 0.0);
  double weight_sum = 0;
  for (size_t g = 0; g < ngroups; ++g)
    if (h->rows[g] > 0) weight_sum += weights.empty() ? 1.0 : weights[g];
  for (size_t g = 0; g < ngroups; ++g)
    if (h->rows[g] > 0) out.group_weights[g] = (weights.empty() ? 1.0 : weights[g]) / weight_sum;
  out.hessians = std::make_shared<const LayerHessians>(std::move(*h));
  const LayerHessians& H = *out.hessians;
  if (o.time_aware && !o.gptq.act_order) {
    // GPTQ's dynamic groups (natural order) start at a group's first column: no group may
    // straddle two blocks of a block-diagonal Hessian
    const size_t group = o.data_free.kind == SchemeKind::kGgml
                             ? static_cast<size_t>(ggml_traits(o.data_free.ggml).block)
                             : static_cast<size_t>(o.gptq_scheme.group_size);
    if (!gptq_groups_fit(H.layout(), group)) {
      out.warnings.push_back(StrCat(name, ": quantized data-free (its block-diagonal Hessian's blocks of ", H.block,
                                    " columns are not a multiple of the group size ", group, ")"));
      out.hessians.reset();
      out.group_weights.clear();
      return out;
    }
  }
  if (channels == 0 || cols % channels != 0) channels = cols;
  out.channels = channels;
  const size_t k = cols / channels;

  const std::vector<GroupSamples> samples = group_samples(lc, groups);
  bool have_samples = true;
  for (size_t g = 0; g < ngroups; ++g)
    if (H.rows[g] > 0 && (samples[g].fit_rows == 0 || samples[g].check_rows == 0)) have_samples = false;
  const bool act = o.activation_bits > 0;
  if (act && !have_samples)
    out.warnings.push_back(StrCat(name, ": the calibration file holds no input samples (recorded with input_samples=0 "
                                        "or by an older version); activation-aware equalization is off for this layer"));

  std::vector<Candidate> cands(1);  // [0]: no equalization
  if (o.spatial && (!act || have_samples) && cols > 0 && rows > 0) {
    // Each channel's largest |weight|, and whether every weight is finite: one pass in row
    // blocks, each block's pages handed back once read.
    std::vector<float> xa(channels, 0.0f), wa(channels, 0.0f), block;
    bool finite = true;
    const size_t block_rows = rows_per_block(cols), dsize = dtype_size(w.dtype);
    for (size_t r0 = 0; r0 < rows && finite; r0 += block_rows) {
      const size_t nr = std::min(block_rows, rows - r0);
      block.resize(nr * cols);
      convert_to_f32(w.dtype, w.data + r0 * cols * dsize, nr * cols, block.data());
      if (w.release) w.release(r0 * cols * dsize, nr * cols * dsize);
      for (size_t r = 0; r < nr; ++r) {
        const float* row = block.data() + r * cols;
        for (size_t j = 0; j < cols; ++j) {
          finite = finite && std::isfinite(row[j]);
          wa[j / k] = std::max(wa[j / k], std::fabs(row[j]));
        }
      }
    }
    // (a weight that is not finite: no search; the layer's job reports the value)
    for (const auto& b : lc.fit)
      for (size_t j = 0; j < cols; ++j) xa[j / k] = std::max(xa[j / k], b.absmax[j]);
    for (double a : kAlphas) {
      if (!finite) break;
      Candidate c;
      c.alpha = a;
      c.s = equalization_scales(xa, wa, a);
      cands.push_back(std::move(c));
    }
  }

  // The rows the search quantizes.
  const size_t row_step = std::max<size_t>(1, (rows + kSearchRows - 1) / kSearchRows);
  const size_t sub = rows == 0 ? 0 : (rows + row_step - 1) / row_step;
  const std::vector<float> w_sub = sampled_rows(w, row_step);

  const bool search = cands.size() > 1;
  for (Candidate& c : cands) {
    const std::vector<float> sc = expand(c.s, cols);
    std::vector<float> inv(cols);
    for (size_t j = 0; j < cols; ++j) inv[j] = 1.0f / sc[j];
    if (o.time_aware) {
      // GPTQ's Hessian of the scaled inputs X S^-1: H / (s_i s_j)
      std::vector<double> hs;
      const HessianLayout lay = H.layout();
      if (!c.s.empty()) {
        hs = H.gptq;
        for (size_t hb_i = 0; hb_i < lay.blocks(); ++hb_i) {
          const size_t first = lay.begin(hb_i), nb = lay.size(hb_i);
          double* hb = hs.data() + lay.offset(hb_i);
          for (size_t i = 0; i < nb; ++i)
            for (size_t j = 0; j < nb; ++j)
              hb[i * nb + j] *= static_cast<double>(inv[first + i]) * static_cast<double>(inv[first + j]);
        }
      }
      auto f = gptq_factor(c.s.empty() ? H.gptq.data() : hs.data(), lay, o.gptq);
      if (!f.ok()) {
        c.failure = f.status().message();
        continue;
      }
      c.factor = std::make_shared<const GptqFactor>(std::move(*f));
    }
    if (!search) break;
    // Quantize the sampled rows of W S with the layer's quantizer; Q' is what would be stored.
    std::vector<float> ws(w_sub);
    scale_columns(ws.data(), sub, cols, c.s);
    std::vector<float> q(sub * cols);
    if (c.factor) {
      const QuantScheme& sch = o.gptq_scheme;
      const size_t gpr = groups_per_row(sch, cols);
      std::vector<uint8_t> codes(sub * cols);
      std::vector<float> s_(sub * gpr), z_(sub * gpr);
      gptq_quantize_rows(sch, *c.factor, ws.data(), sub, cols, codes.data(), s_.data(), sch.symmetric ? nullptr : z_.data());
      dequantize_rows(sch, codes.data(), s_.data(), sch.symmetric ? nullptr : z_.data(), sub, cols, q.data());
    } else {
      RowSource src;
      src.data = reinterpret_cast<const uint8_t*>(ws.data());
      src.dtype = DType::kF32;
      src.rows = sub;
      src.cols = cols;
      src.name = name;
      auto enc = encode_tensor(src, o.data_free, nullptr);
      if (!enc.ok()) {
        c.failure = enc.status().message();
        continue;
      }
      Status st = decode_tensor(enc->scheme, sub, cols, enc->view(), q.data());
      if (!st.ok()) {
        c.failure = st.message();
        continue;
      }
    }
    double sum = 0;
    size_t used = 0;
    c.errors.assign(ngroups, 0.0);
    const std::vector<uint32_t> importance = act ? column_importance(q.data(), sub, cols) : std::vector<uint32_t>{};
    std::optional<double> on_gptq;  // the error under GPTQ's Hessian, shared by the groups checked on it
    for (size_t g = 0; g < ngroups; ++g) {
      if (H.rows[g] == 0 && !H.check_held_out[g]) continue;
      if (act) {
        const GroupSamples& gs = samples[g];
        const ActivationParams p =
            fit_params(gs.fit, gs.fit_rows, cols, inv, importance, gs.col_min, gs.col_max, o.activation_bits, 12);
        c.errors[g] = output_error_with_activations(gs.check, gs.check_rows, cols, w_sub.data(), q.data(), sub, inv, p);
      } else {
        std::vector<float> q_eff(q);
        scale_columns(q_eff.data(), sub, cols, inv);
        if (H.uses_gptq(g) && on_gptq) {
          c.errors[g] = *on_gptq;
        } else {
          c.errors[g] = group_output_error(H, g, w_sub.data(), q_eff.data(), sub, cols).rel_error;
          if (H.uses_gptq(g)) on_gptq = c.errors[g];
        }
      }
      sum += c.errors[g];
      ++used;
    }
    c.score = used ? sum / static_cast<double>(used) : 0.0;
  }

  // Equalization must beat none by kMinGain: per-layer gains smaller than that did not carry
  // over to the whole denoiser in bench_diffusion (the digits DiT at W4 got worse end to end).
  size_t best = 0;
  for (size_t i = 1; i < cands.size(); ++i)
    if (cands[i].failure.empty() && cands[i].score < cands[best].score &&
        (best != 0 || cands[i].score < (1.0 - kMinGain) * cands[0].score))
      best = i;
  if (o.time_aware && !cands[best].factor) {
    out.warnings.push_back(StrCat(name, ": GPTQ not applied (", cands[best].failure, "); quantized data-free"));
  }
  Candidate& chosen = cands[best];
  out.gptq = chosen.factor;
  if (search) {
    json list = json::array();
    for (const Candidate& c : cands) {
      json e = {{"alpha", c.alpha < 0 ? json(nullptr) : json(c.alpha)}, {"score", c.score}};
      if (!c.failure.empty()) e["failed"] = c.failure;
      list.push_back(std::move(e));
    }
    out.equalization = {{"applied", chosen.alpha >= 0}, {"alpha", chosen.alpha < 0 ? json(nullptr) : json(chosen.alpha)},
                        {"objective", act ? StrCat("mean over timestep groups of the W", o.gptq_scheme.bits, "A",
                                                   o.activation_bits, " output relative error on held-out input samples")
                                          : std::string(H.pooled ? "mean over timestep groups of the output relative "
                                                                   "error (held-out input samples)"
                                                                 : "mean over timestep groups of the output relative "
                                                                   "error (held-out Hessians)")},
                        {"rows_searched", sub}, {"candidates", std::move(list)}};
  }
  if (chosen.alpha >= 0) {
    out.column_scale = std::make_shared<const std::vector<float>>(expand(chosen.s, cols));
    out.input_scale.resize(channels);
    for (size_t c = 0; c < channels; ++c) out.input_scale[c] = 1.0f / chosen.s[c];
  }

  // Activation parameters for the (equalized) input.
  if (act) {
    if (out.input_scale.empty()) {
      out.activations = layer_activations(lc, groups, o.activation_bits);
      if (!out.activations)
        out.warnings.push_back(StrCat(name, ": no activation histograms in the calibration file; no activation parameters"));
    } else {
      const std::vector<float> inv = expand(out.input_scale, cols);
      // importance from the stored weight's sampled rows (W S)
      std::vector<float> ws(w_sub);
      scale_columns(ws.data(), sub, cols, chosen.s);
      const std::vector<uint32_t> importance = column_importance(ws.data(), sub, cols);
      LayerActivations la;
      std::vector<float> all;
      size_t all_rows = 0;
      std::vector<float> all_min(cols, 0.0f), all_max(cols, 0.0f);
      for (size_t g = 0; g < ngroups; ++g) {
        all.insert(all.end(), samples[g].fit.begin(), samples[g].fit.end());
        all_rows += samples[g].fit_rows;
        if (samples[g].fit_rows == 0) continue;
        for (size_t j = 0; j < cols; ++j) {
          all_min[j] = std::min(all_min[j], samples[g].col_min[j]);
          all_max[j] = std::max(all_max[j], samples[g].col_max[j]);
        }
      }
      la.static_params = fit_params(all, all_rows, cols, inv, importance, all_min, all_max, o.activation_bits, 24);
      for (size_t g = 0; g < ngroups; ++g) {
        const GroupSamples& gs = samples[g];
        GroupActivation ga;
        ga.params = gs.fit_rows ? fit_params(gs.fit, gs.fit_rows, cols, inv, importance, gs.col_min, gs.col_max,
                                             o.activation_bits, 24)
                                : la.static_params;
        ga.held_out = gs.held_out;
        double ss = 0, ss_w = 0, eg = 0, es = 0;
        for (size_t r = 0; r < gs.check_rows; ++r)
          for (size_t j = 0; j < cols; ++j) {
            const double x = gs.check[r * cols + j] * inv[j];
            ss += x * x;
            const double a = x - fake_quantize(static_cast<float>(x), ga.params);
            const double b = x - fake_quantize(static_cast<float>(x), la.static_params);
            // each column's error weighs as it reaches the output (the objective of fit_params)
            eg += a * a * importance[j];
            es += b * b * importance[j];
            ss_w += x * x * importance[j];
          }
        if (ss > 0) {
          ga.rel_error = std::sqrt(eg / ss_w);
          ga.static_rel_error = std::sqrt(es / ss_w);
          if (ga.held_out && ga.static_rel_error < ga.rel_error) {
            ga.params = la.static_params;
            ga.rel_error = ga.static_rel_error;
            ga.uses_static = true;
          }
        }
        la.groups.push_back(ga);
      }
      out.activations = std::move(la);
    }
  }
  return out;
}

size_t output_check_row_step(size_t rows) { return std::max<size_t>(1, rows / 256); }

OutputCheck check_layer_output(const float* w, const float* q, size_t sampled, size_t cols, const CalibratedLayer& layer,
                               const LayerCalibration& lc, const std::vector<TimeGroup>& groups) {
  OutputCheck out;
  const LayerHessians& H = *layer.hessians;
  std::vector<GroupSamples> samples;
  std::vector<float> q_stored, inv;
  if (layer.activations) {
    samples = group_samples(lc, groups);
    q_stored.assign(q, q + sampled * cols);
    inv = expand(layer.input_scale, cols);
    // the stored weight Q' = Q S: the effective weight over input_scale (= 1 / s), column by column
    std::vector<float> s(layer.input_scale.size());
    for (size_t c = 0; c < s.size(); ++c) s[c] = 1.0f / layer.input_scale[c];
    scale_columns(q_stored.data(), sampled, cols, s);
  }
  std::optional<OutputError> on_gptq;  // shared by the groups checked on GPTQ's Hessian
  for (size_t g = 0; g < groups.size(); ++g) {
    if (H.rows[g] == 0 && !H.check_held_out[g]) continue;
    if (H.uses_gptq(g) && !on_gptq) on_gptq = group_output_error(H, g, w, q, sampled, cols);
    const OutputError e = H.uses_gptq(g) ? *on_gptq : group_output_error(H, g, w, q, sampled, cols);
    json entry = {{"group", g}, {"step_lo", groups[g].step_lo}, {"step_hi", groups[g].step_hi},
                  {"relative_error", e.rel_error}, {"cosine", e.cosine}, {"held_out", static_cast<bool>(H.check_held_out[g])},
                  {"checked_on", !H.check[g].empty() ? std::string("Hessian")
                                 : H.check_x_rows[g] ? StrCat(H.check_x_rows[g], " input samples")
                                                     : std::string("GPTQ's Hessian (no samples)")}};
    if (layer.activations && g < samples.size() && samples[g].check_rows > 0 && g < layer.activations->groups.size())
      entry["relative_error_with_activations"] =
          output_error_with_activations(samples[g].check, samples[g].check_rows, cols, w, q_stored.data(), sampled,
                                        inv, layer.activations->groups[g].params);
    out.groups.push_back(std::move(entry));
    out.worst_cosine = std::min(out.worst_cosine, e.cosine);
  }
  return out;
}

}  // namespace aq
