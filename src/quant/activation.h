// Activation quantization parameters from recorded histograms (W8A8 / W4A8 deployment).
//
// A layer's input is quantized at run time per tensor, asymmetrically:
//   c = clamp(round(x / scale) + zero_point, 0, 2^bits - 1),   x' = (c - zero_point) * scale
// with an integer zero_point, so 0 is exact. The clipping range [clip_lo, clip_hi] is chosen to
// minimise the expected squared error over a signed log-scale histogram of the recorded inputs
// (docs/calibration.md: 8 bins per octave from 2^-24 to 2^24, positive and negative values
// apart, exact zeros counted alone). Within the range, a histogram bin wider than the step costs
// step^2 / 12 per value; a narrower bin is evaluated at four points spread over it; outside the
// range a value costs its distance to the clip squared.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace aq {

inline constexpr int kHistBinsPerOctave = 8;
inline constexpr int kHistMinExp = -24;
inline constexpr int kHistMaxExp = 24;
inline constexpr int kActHistBins = (kHistMaxExp - kHistMinExp) * kHistBinsPerOctave;

struct ActivationHistogram {
  std::vector<uint64_t> pos = std::vector<uint64_t>(kActHistBins, 0);
  std::vector<uint64_t> neg = std::vector<uint64_t>(kActHistBins, 0);
  uint64_t zero = 0;
  float min = 0, max = 0;  // the extremes recorded (min <= 0 <= max is not assumed)

  void add(const ActivationHistogram& o);
  // Counts n values into the bins (as the recorder does), each `weight` times (1 if null), and
  // widens min / max.
  void add_values(const float* x, size_t n, const uint32_t* weight = nullptr);
  uint64_t count() const;
  double mean_square() const;  // E[x^2], from the bins' centres
};

struct ActivationParams {
  int bits = 8;
  float scale = 1;
  int32_t zero_point = 0;
  float clip_lo = 0, clip_hi = 0;
};

// The value x becomes after quantization with p (round half to even, as the runtime would).
inline float fake_quantize(float x, const ActivationParams& p) {
  const float nmax = static_cast<float>((1 << p.bits) - 1);
  const float c = std::clamp(std::nearbyint(x / p.scale) + static_cast<float>(p.zero_point), 0.0f, nmax);
  return (c - static_cast<float>(p.zero_point)) * p.scale;
}

// Expected squared error per value of quantizing the histogram's values with `p`.
double activation_mse(const ActivationHistogram& h, const ActivationParams& p);

// The clipping range (searched jointly over the negative and positive ends, `factors` factors
// each from 1 down to 1/64 on a log scale) with the least expected squared error.
ActivationParams choose_activation_params(const ActivationHistogram& h, int bits, int factors = 24);

}  // namespace aq
