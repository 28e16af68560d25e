#include "quant/activation.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace aq {
namespace {

double bin_lo(int k) { return std::exp2(kHistMinExp + static_cast<double>(k) / kHistBinsPerOctave); }
double bin_hi(int k) { return std::exp2(kHistMinExp + static_cast<double>(k + 1) / kHistBinsPerOctave); }

double quant_error(double x, const ActivationParams& p, double nmax) {
  const double c = std::clamp(std::nearbyint(x / p.scale) + p.zero_point, 0.0, nmax);
  const double e = x - (c - p.zero_point) * p.scale;
  return e * e;
}

// Squared error summed over `n` values spread over [a, b) (a > 0), signed by `sign`.
double bin_error(double a, double b, double sign, double n, const ActivationParams& p, double nmax) {
  const double s = p.scale;
  const double width = b - a;
  const double lo = p.clip_lo, hi = p.clip_hi;
  const double x0 = sign * a, x1 = sign * b;
  const double inside_lo = std::min(x0, x1), inside_hi = std::max(x0, x1);
  if (width <= 8.0 * s) {
    double e = 0;
    for (int i = 0; i < 4; ++i) e += quant_error(sign * a * std::pow(b / a, (i + 0.5) / 4.0), p, nmax);
    return n * e / 4.0;
  }
  if (inside_lo >= lo && inside_hi <= hi) return n * s * s / 12.0;
  double e = 0;
  for (int i = 0; i < 16; ++i) {
    const double x = sign * a * std::pow(b / a, (i + 0.5) / 16.0);
    e += x < lo ? (lo - x) * (lo - x) : x > hi ? (x - hi) * (x - hi) : s * s / 12.0;
  }
  return n * e / 16.0;
}

}  // namespace

void ActivationHistogram::add(const ActivationHistogram& o) {
  const bool empty = count() == 0;
  for (int k = 0; k < kActHistBins; ++k) pos[k] += o.pos[k], neg[k] += o.neg[k];
  zero += o.zero;
  min = empty ? o.min : std::min(min, o.min);
  max = empty ? o.max : std::max(max, o.max);
}

void ActivationHistogram::add_values(const float* x, size_t n, const uint32_t* weight) {
  const bool empty = count() == 0;
  float lo = empty ? INFINITY : min, hi = empty ? -INFINITY : max;
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    const uint64_t c = weight ? weight[i] : 1;
    if (v == 0.0f) {
      zero += c;
      continue;
    }
    const double k = std::floor((std::log2(std::fabs(static_cast<double>(v))) - kHistMinExp) * kHistBinsPerOctave);
    const int b = static_cast<int>(std::clamp(k, 0.0, static_cast<double>(kActHistBins - 1)));
    (v > 0 ? pos : neg)[b] += c;
  }
  if (n > 0) min = lo, max = hi;
}

uint64_t ActivationHistogram::count() const {
  uint64_t n = zero;
  for (int k = 0; k < kActHistBins; ++k) n += pos[k] + neg[k];
  return n;
}

double ActivationHistogram::mean_square() const {
  const uint64_t n = count();
  if (n == 0) return 0;
  double s = 0;
  for (int k = 0; k < kActHistBins; ++k) {
    const double v = std::sqrt(bin_lo(k) * bin_hi(k));
    s += static_cast<double>(pos[k] + neg[k]) * v * v;
  }
  return s / static_cast<double>(n);
}

double activation_mse(const ActivationHistogram& h, const ActivationParams& p) {
  const uint64_t n = h.count();
  if (n == 0) return 0;
  const double nmax = std::ldexp(1.0, p.bits) - 1.0;
  double e = 0;
  for (int k = 0; k < kActHistBins; ++k) {
    if (h.pos[k]) e += bin_error(bin_lo(k), bin_hi(k), 1.0, static_cast<double>(h.pos[k]), p, nmax);
    if (h.neg[k]) e += bin_error(bin_lo(k), bin_hi(k), -1.0, static_cast<double>(h.neg[k]), p, nmax);
  }
  return e / static_cast<double>(n);
}

ActivationParams choose_activation_params(const ActivationHistogram& h, int bits, int factors) {
  ActivationParams best;
  best.bits = bits;
  const double nmax = std::ldexp(1.0, bits) - 1.0;
  const double lo = std::min<double>(h.min, 0.0), hi = std::max<double>(h.max, 0.0);
  if (!(hi > lo) || h.count() == 0) return best;  // nothing but zeros: any scale is exact
  auto make = [&](double clip_lo, double clip_hi) {
    ActivationParams p;
    p.bits = bits;
    const double scale = std::max((clip_hi - clip_lo) / nmax, 1e-30);
    const double zp = std::clamp(std::nearbyint(-clip_lo / scale), 0.0, nmax);
    p.scale = static_cast<float>(scale);
    p.zero_point = static_cast<int32_t>(zp);
    p.clip_lo = static_cast<float>((0.0 - zp) * p.scale);
    p.clip_hi = static_cast<float>((nmax - zp) * p.scale);
    return p;
  };
  const int kFactors = std::max(2, factors);
  double best_e = std::numeric_limits<double>::infinity();
  for (int a = 0; a < kFactors; ++a) {
    if (lo == 0.0 && a > 0) break;
    for (int b = 0; b < kFactors; ++b) {
      if (hi == 0.0 && b > 0) break;
      const double fa = std::exp2(-6.0 * a / (kFactors - 1)), fb = std::exp2(-6.0 * b / (kFactors - 1));
      const ActivationParams p = make(lo * fa, hi * fb);
      const double e = activation_mse(h, p);
      if (e < best_e) best_e = e, best = p;
    }
  }
  return best;
}

}  // namespace aq
