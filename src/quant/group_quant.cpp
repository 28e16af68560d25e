#include "quant/group_quant.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/half.h"

namespace aq {
namespace {

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to nearest even

// v must already lie in [0, 2^bits - 1] (clamped), far below 2^22.
inline float round_small(float v) { return (v + kRoundMagic) - kRoundMagic; }

inline float to_storage(ScaleType t, float v) { return t == ScaleType::kF16 ? round_to_f16(v) : v; }

inline bool f16_imprecise(float s) {
  const float a = std::fabs(s);
  return a != 0.0f && (a < 6.103515625e-05f || a > 65504.0f);  // below the smallest normal half
}

// Clipping factors tried by the search, from no clipping inward. Low bit widths gain from deep
// clipping (the optimum for Gaussian data at 2-3 bits is near 0.6-0.8 of the range); 8-bit
// codes lose almost nothing to the extremes, so a short, shallow list suffices.
struct ClipList {
  const float* alphas;
  int count;
};
constexpr float kClipLow[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f, 0.65f, 0.6f, 0.55f, 0.5f, 0.45f};
constexpr float kClipHigh[] = {1.0f, 0.97f, 0.94f, 0.91f, 0.88f, 0.85f};
ClipList clip_list(int bits) {
  if (bits >= 8) return {kClipHigh, static_cast<int>(std::size(kClipHigh))};
  return {kClipLow, static_cast<int>(std::size(kClipLow))};
}

// The stored code of c (a rounded code in [0, nmax], or NaN where the weight and the scale
// overflow: x - z = inf times 1 / s = 0, or 0 times an infinite 1 / s of a subnormal scale).
// Converting NaN to an integer is undefined; such a weight gets code 0.
inline uint8_t to_code(float c) { return static_cast<uint8_t>(c >= 0.0f ? c : 0.0f); }

// ---- asymmetric: w ~= s * c + z, c in [0, nmax] ------------------------------------------

// Squared error of coding x with (s, z); codes written when q != nullptr.
float asym_error(const float* x, size_t n, float s, float z, float nmax, uint8_t* q) {
  const float inv = s != 0.0f ? 1.0f / s : 0.0f;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float c = round_small(std::clamp((x[i + k] - z) * inv, 0.0f, nmax));
      if (q) q[i + k] = to_code(c);
      const float e = x[i + k] - (s * c + z);
      acc[k] += e * e;
    }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float c = round_small(std::clamp((x[i] - z) * inv, 0.0f, nmax));
    if (q) q[i] = to_code(c);
    const float e = x[i] - (s * c + z);
    tail += e * e;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Assigns codes with (s0, z0) and returns the least-squares (s, z) for that assignment.
void asym_refit(const float* x, size_t n, float s0, float z0, float nmax, float* s, float* z) {
  const float inv = s0 != 0.0f ? 1.0f / s0 : 0.0f;
  float sc[8] = {}, scc[8] = {}, sx[8] = {}, sxc[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float v = x[i + k];
      const float c = round_small(std::clamp((v - z0) * inv, 0.0f, nmax));
      sc[k] += c;
      scc[k] += c * c;
      sx[k] += v;
      sxc[k] += v * c;
    }
  double Sc = 0, Scc = 0, Sx = 0, Sxc = 0;
  for (int k = 0; k < 8; ++k) Sc += sc[k], Scc += scc[k], Sx += sx[k], Sxc += sxc[k];
  for (; i < n; ++i) {
    const float v = x[i];
    const float c = round_small(std::clamp((v - z0) * inv, 0.0f, nmax));
    Sc += c, Scc += static_cast<double>(c) * c, Sx += v, Sxc += static_cast<double>(v) * c;
  }
  const double N = static_cast<double>(n);
  const double det = N * Scc - Sc * Sc;
  if (det <= 0.0) {  // every weight got the same code: keep the candidate
    *s = s0;
    *z = z0;
    return;
  }
  *s = static_cast<float>((N * Sxc - Sx * Sc) / det);
  *z = static_cast<float>((Sx - static_cast<double>(*s) * Sc) / N);
}

// A group whose weights are all equal (or whose range a half cannot resolve): every code 0, the
// value carried by the offset. Kept out of line: inlining this cold path into the search made
// GCC lay the hot loops out 40% slower.
[[gnu::noinline, gnu::cold]] bool constant_group_asym(const QuantScheme& sch, size_t n, float lo, float hi,
                                                      float z, uint8_t* q, float* s_out, float* z_out) {
  *s_out = 0.0f;
  *z_out = z;
  for (size_t i = 0; i < n; ++i) q[i] = 0;
  // A range too small for a half, or a constant group whose value (stored as the offset alone)
  // a half cannot hold: beyond 65504 it would become inf, below the normal range it loses digits.
  return sch.scale_type == ScaleType::kF16 && (hi != lo || f16_imprecise(lo));
}

bool quantize_group_asym(const QuantScheme& sch, const float* x, size_t n, uint8_t* q, float* s_out,
                         float* z_out) {
  const float nmax = static_cast<float>((1 << sch.bits) - 1);
  float lo = x[0], hi = x[0];
  for (size_t i = 1; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);

  // (hi - lo overflows for weights near +-FLT_MAX: the step is then taken as hi / nmax - lo / nmax)
  const float range = hi - lo;
  float best_s = to_storage(sch.scale_type, std::isfinite(range) ? range / nmax : hi / nmax - lo / nmax);
  float best_z = to_storage(sch.scale_type, lo);
  if (hi == lo || best_s == 0.0f) return constant_group_asym(sch, n, lo, hi, best_z, q, s_out, z_out);
  if (sch.method == ScaleMethod::kSearch) {
    float best_err = asym_error(x, n, best_s, best_z, nmax, nullptr);
    const ClipList clips = clip_list(sch.bits);
    for (int a = 0; a < clips.count; ++a) {
      const float alpha = clips.alphas[a];
      // Shrink the range about its midpoint; keeps a one-signed range one-signed.
      const float mid = 0.5f * (lo + hi), half = 0.5f * (hi - lo) * alpha;
      const float z0 = mid - half, s0 = 2.0f * half / nmax;
      float s, z;
      asym_refit(x, n, s0, z0, nmax, &s, &z);
      s = to_storage(sch.scale_type, s);
      z = to_storage(sch.scale_type, z);
      if (!(s > 0.0f) || !std::isfinite(z)) continue;
      const float err = asym_error(x, n, s, z, nmax, nullptr);
      if (err < best_err) best_err = err, best_s = s, best_z = z;
    }
    // One more refit from the winner's own assignment.
    float s, z;
    asym_refit(x, n, best_s, best_z, nmax, &s, &z);
    s = to_storage(sch.scale_type, s);
    z = to_storage(sch.scale_type, z);
    if (s > 0.0f && std::isfinite(z) && asym_error(x, n, s, z, nmax, nullptr) < best_err) best_s = s, best_z = z;
  }
  asym_error(x, n, best_s, best_z, nmax, q);
  *s_out = best_s;
  *z_out = best_z;
  return sch.scale_type == ScaleType::kF16 && (f16_imprecise(best_s) || std::fabs(best_z) > 65504.0f);
}

// ---- symmetric: w ~= s * (c - m), m = 2^(bits-1), c - m in [-m, m-1] ------------------------

float sym_error(const float* x, size_t n, float s, float m, uint8_t* q) {
  const float inv = s != 0.0f ? 1.0f / s : 0.0f;
  const float qmin = -m, qmax = m - 1.0f;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      // round after shifting into [0, 2m-1] so the magic-number rounding sees a non-negative value
      const float c = round_small(std::clamp(x[i + k] * inv, qmin, qmax) + m);
      if (q) q[i + k] = to_code(c);
      const float e = x[i + k] - s * (c - m);
      acc[k] += e * e;
    }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float c = round_small(std::clamp(x[i] * inv, qmin, qmax) + m);
    if (q) q[i] = to_code(c);
    const float e = x[i] - s * (c - m);
    tail += e * e;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

float sym_refit(const float* x, size_t n, float s0, float m) {
  const float inv = 1.0f / s0;
  const float qmin = -m, qmax = m - 1.0f;
  float sxq[8] = {}, sqq[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float c = round_small(std::clamp(x[i + k] * inv, qmin, qmax) + m) - m;
      sxq[k] += x[i + k] * c;
      sqq[k] += c * c;
    }
  double Sxq = 0, Sqq = 0;
  for (int k = 0; k < 8; ++k) Sxq += sxq[k], Sqq += sqq[k];
  for (; i < n; ++i) {
    const float c = round_small(std::clamp(x[i] * inv, qmin, qmax) + m) - m;
    Sxq += static_cast<double>(x[i]) * c, Sqq += static_cast<double>(c) * c;
  }
  return Sqq > 0.0 ? static_cast<float>(Sxq / Sqq) : s0;
}

bool quantize_group_sym(const QuantScheme& sch, const float* x, size_t n, uint8_t* q, float* s_out) {
  const float m = static_cast<float>(1 << (sch.bits - 1));
  float amax = 0.0f, signed_max = 0.0f;
  for (size_t i = 0; i < n; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), signed_max = x[i];

  // Baseline: [-absmax, absmax] onto [-(m-1), m-1].
  float best_s = to_storage(sch.scale_type, amax / (m - 1.0f));
  if (best_s == 0.0f) {
    *s_out = 0.0f;
    for (size_t i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(m);
    return sch.scale_type == ScaleType::kF16 && amax != 0.0f;
  }
  if (sch.method == ScaleMethod::kSearch) {
    float best_err = sym_error(x, n, best_s, m, nullptr);
    const ClipList clips = clip_list(sch.bits);
    for (int a = 0; a < clips.count; ++a) {
      // A negative scale maps the largest-magnitude weight onto the extra level -m.
      const float s0 = -signed_max / m * clips.alphas[a];
      const float s = to_storage(sch.scale_type, sym_refit(x, n, s0, m));
      if (s == 0.0f || !std::isfinite(s)) continue;
      const float err = sym_error(x, n, s, m, nullptr);
      if (err < best_err) best_err = err, best_s = s;
    }
    const float s = to_storage(sch.scale_type, sym_refit(x, n, best_s, m));
    if (s != 0.0f && std::isfinite(s) && sym_error(x, n, s, m, nullptr) < best_err) best_s = s;
  }
  sym_error(x, n, best_s, m, q);
  *s_out = best_s;
  return sch.scale_type == ScaleType::kF16 && f16_imprecise(best_s);
}

}  // namespace

QuantizeRowsStats quantize_rows(const QuantScheme& scheme, const float* w, size_t rows, size_t cols,
                                uint8_t* codes, float* scales, float* zeros) {
  QuantizeRowsStats stats;
  const size_t g = group_len(scheme, cols);
  const size_t gpr = groups_per_row(scheme, cols);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t j = 0; j < gpr; ++j) {
      const size_t begin = j * g;
      const size_t n = std::min(g, cols - begin);
      const float* x = w + r * cols + begin;
      uint8_t* q = codes + r * cols + begin;
      const size_t p = r * gpr + j;
      const bool imprecise = scheme.symmetric
                                 ? quantize_group_sym(scheme, x, n, q, &scales[p])
                                 : quantize_group_asym(scheme, x, n, q, &scales[p], &zeros[p]);
      stats.f16_imprecise_groups += imprecise ? 1 : 0;
    }
  }
  return stats;
}

void dequantize_rows(const QuantScheme& scheme, const uint8_t* codes, const float* scales,
                     const float* zeros, size_t rows, size_t cols, float* out) {
  const size_t g = group_len(scheme, cols);
  const size_t gpr = groups_per_row(scheme, cols);
  const float m = static_cast<float>(1 << (scheme.bits - 1));
  for (size_t r = 0; r < rows; ++r)
    for (size_t j = 0; j < gpr; ++j) {
      const size_t begin = j * g, n = std::min(g, cols - begin);
      const float s = scales[r * gpr + j];
      const uint8_t* q = codes + r * cols + begin;
      float* o = out + r * cols + begin;
      if (scheme.symmetric) {
        for (size_t i = 0; i < n; ++i) o[i] = s * (static_cast<float>(q[i]) - m);
      } else {
        const float z = zeros[r * gpr + j];
        for (size_t i = 0; i < n; ++i) o[i] = s * static_cast<float>(q[i]) + z;
      }
    }
}

}  // namespace aq
