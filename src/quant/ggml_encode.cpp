// Encoders of ggml's block types: a joint search of a block's float16 scales, integer sub-scales
// and mins, and codes.
//
// llama.cpp's quantizer (ggml-quants.c) fits each sub-block's float scale (and min) on a fixed
// trial grid with one least-squares refit, under a *weighted* error (|x| or x^2 weights when no
// importance matrix is given), then rounds the sub-scales to their integer width once against
// the largest of them and re-rounds the codes. The float16 block scale is never refit to the
// rounded sub-scales, nor the sub-scales to the codes they produce.
//
// Here the objective is the error actually paid, sum_i w_i (x_i - decoded_i)^2 with w_i = 1
// (plain squared error) or the caller's per-column importance (the diagonal of a calibration
// Hessian). Each block is searched from two starts:
//   - "llama": the choice llama.cpp's algorithm makes (its trial grids and error weights, one
//     rounding of the sub-scales), written from its description;
//   - "ours": each sub-block's float fit polished under the true objective (Lloyd steps: codes
//     given the scale, then the scale and min by least squares given the codes) from the best of
//     llama's trials and of trials mapping the largest weight to either end of the levels;
// and each start is refined by coordinate descent, every step of which can only lower the
// objective:
//   1. each sub-block's integer scale (and min): the integers around the least-squares optimum,
//      each with its codes re-assigned, the best kept;
//   2. the float16 block scale(s) d (and dmin): least squares given the integers, rounded to
//      float16 with its neighbours tried;
//   3. the codes: nearest level given the scales.
// The unrefined llama start stays among the candidates, so no block is ever worse under the
// objective than the llama-equivalent choice; the best candidate per block is kept, measured on
// the exact decoded floats.
//
// Speed: the inner loops run over a sub-block (16 or 32 weights) with sums kept in 8 explicit
// lanes, which the compiler turns into SIMD without reordering any float operation; so the
// result is the same on every CPU, whichever of the AVX-512 / AVX2 / baseline builds of the
// row encoder runs (target_clones).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "quant/ggml_codec.h"

namespace aq {

namespace {

#define AQ_INLINE inline __attribute__((always_inline))

// Compile-time description of a type (the table in ggml_types.h). Every type lists every field,
// used or not (clang reports the unused ones).
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wunused-const-variable"
#endif
template <GgmlType T>
struct K;
template <>
struct K<GgmlType::kQ8_0> {
  static constexpr int N = 32, S = 32, NL = 256, LO = -128, HI = 127, SC_LO = 0, SC_HI = 0;
  static constexpr bool kMin = false, kSub = false, kTable = false;
};
template <>
struct K<GgmlType::kIQ4_NL> {
  static constexpr int N = 32, S = 32, NL = 16, LO = -127, HI = 113, SC_LO = 0, SC_HI = 0;
  static constexpr bool kMin = false, kSub = false, kTable = true;
};
template <>
struct K<GgmlType::kQ6_K> {
  static constexpr int N = 256, S = 16, NL = 64, LO = -32, HI = 31, SC_LO = -128, SC_HI = 127;
  static constexpr bool kMin = false, kSub = true, kTable = false;
};
template <>
struct K<GgmlType::kQ3_K> {
  static constexpr int N = 256, S = 16, NL = 8, LO = -4, HI = 3, SC_LO = -32, SC_HI = 31;
  static constexpr bool kMin = false, kSub = true, kTable = false;
};
template <>
struct K<GgmlType::kIQ4_XS> {
  static constexpr int N = 256, S = 32, NL = 16, LO = -127, HI = 113, SC_LO = -32, SC_HI = 31;
  static constexpr bool kMin = false, kSub = true, kTable = true;
};
template <>
struct K<GgmlType::kQ5_K> {
  static constexpr int N = 256, S = 32, NL = 32, LO = 0, HI = 31, SC_LO = 0, SC_HI = 63;
  static constexpr bool kMin = true, kSub = true, kTable = false;
};
template <>
struct K<GgmlType::kQ4_K> {
  static constexpr int N = 256, S = 32, NL = 16, LO = 0, HI = 15, SC_LO = 0, SC_HI = 63;
  static constexpr bool kMin = true, kSub = true, kTable = false;
};
template <>
struct K<GgmlType::kQ2_K> {
  static constexpr int N = 256, S = 16, NL = 4, LO = 0, HI = 3, SC_LO = 0, SC_HI = 15;
  static constexpr bool kMin = true, kSub = true, kTable = false;
};

constexpr int kLanes = 8;

// Round half to even for |v| < 2^22, branch-free (vectorizes; the core never contracts or
// reassociates float operations).
AQ_INLINE float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }
AQ_INLINE int nearest_int(float v) { return static_cast<int>(std::nearbyint(v)); }

// float16 rounding that saturates at the largest finite value instead of overflowing.
AQ_INLINE uint16_t f16_sat(float v) {
  uint16_t h = f32_to_f16(v);
  if ((h & 0x7fffu) >= 0x7c00u) h = static_cast<uint16_t>((h & 0x8000u) | 0x7bffu);
  return h;
}
AQ_INLINE float h2f(uint16_t h) { return f16_to_f32(h); }
// The float16 one step away from h in magnitude (dir = +1 larger, -1 smaller), same sign.
AQ_INLINE uint16_t f16_step(uint16_t h, int dir) {
  const uint16_t mag = h & 0x7fffu, sign = h & 0x8000u;
  if (dir > 0) return mag >= 0x7bffu ? h : static_cast<uint16_t>(sign | (mag + 1));
  return mag == 0 ? h : static_cast<uint16_t>(sign | (mag - 1));
}

// Level value of each of the type's code indices; the IQ4 table's midpoints.
template <GgmlType T>
struct Levels {
  float level[K<T>::NL] = {};
  float mid[K<T>::NL] = {};
  constexpr Levels() {
    for (int k = 0; k < K<T>::NL; ++k)
      level[k] = K<T>::kTable ? static_cast<float>(kIq4Levels[static_cast<size_t>(k)]) : static_cast<float>(k + K<T>::LO);
    for (int k = 0; k + 1 < K<T>::NL; ++k) mid[k] = 0.5f * (level[k] + level[k + 1]);
  }
};
template <GgmlType T>
inline constexpr Levels<T> kLevels{};
template <GgmlType T>
AQ_INLINE const Levels<T>& levels() {
  return kLevels<T>;
}

// ---- per sub-block primitives (S weights; L = the chosen level of each weight) ----------------

// Symmetric types: L[i] = the level nearest x[i] * inv (inv = 1 / scale, any sign).
template <GgmlType T>
AQ_INLINE void assign_sym(const float* x, float inv, float* L) {
  constexpr int S = K<T>::S;
  if constexpr (!K<T>::kTable) {
    constexpr float lo = static_cast<float>(K<T>::LO), hi = static_cast<float>(K<T>::HI);
    for (int i = 0; i < S; ++i) L[i] = std::min(hi, std::max(lo, round_even(x[i] * inv)));
  } else {
    const Levels<T>& lv = levels<T>();
    for (int i = 0; i < S; ++i) {
      const float y = x[i] * inv;
      float v = lv.level[0];
      for (int t = 0; t + 1 < K<T>::NL; ++t) v = y > lv.mid[t] ? lv.level[t + 1] : v;
      L[i] = v;
    }
  }
}

// Asymmetric types: code = clamp(round((x + mn) * inv)), value = scale * code - mn.
template <GgmlType T>
AQ_INLINE void assign_asym(const float* x, float inv, float mn, float* L) {
  constexpr int S = K<T>::S;
  constexpr float hi = static_cast<float>(K<T>::HI);
  for (int i = 0; i < S; ++i) L[i] = std::min(hi, std::max(0.0f, round_even((x[i] + mn) * inv)));
}

// Lanes summed as a fixed tree (the order every build uses).
AQ_INLINE float hsum(const float* a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

// Weighted sums over a sub-block, in 8 lanes summed in a fixed order. sums_l computes only the
// sums that depend on the levels, taking sum w and sum w x from `base`.
struct Sums {
  float w = 0, l = 0, ll = 0, x = 0, lx = 0;
};
template <int S>
AQ_INLINE Sums sums_l(const float* x, const float* w, const float* L, const Sums& base) {
  float sl[kLanes] = {}, sll[kLanes] = {}, slx[kLanes] = {};
  for (int i = 0; i < S; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float wl = w[i + j] * L[i + j];
      sl[j] += wl;
      sll[j] += wl * L[i + j];
      slx[j] += wl * x[i + j];
    }
  Sums s = base;
  s.l = hsum(sl);
  s.ll = hsum(sll);
  s.lx = hsum(slx);
  return s;
}
template <int S>
AQ_INLINE Sums sums_base(const float* x, const float* w) {
  float sw[kLanes] = {}, sx[kLanes] = {};
  for (int i = 0; i < S; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      sw[j] += w[i + j];
      sx[j] += w[i + j] * x[i + j];
    }
  Sums s;
  s.w = hsum(sw);
  s.x = hsum(sx);
  return s;
}
template <int S>
AQ_INLINE Sums sums(const float* x, const float* w, const float* L) {
  return sums_l<S>(x, w, L, sums_base<S>(x, w));
}
template <int S>
AQ_INLINE void sums_sym(const float* x, const float* w, const float* L, float* ll_out, float* lx_out) {
  float sll[kLanes] = {}, slx[kLanes] = {};
  for (int i = 0; i < S; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float wl = w[i + j] * L[i + j];
      sll[j] += wl * L[i + j];
      slx[j] += wl * x[i + j];
    }
  *ll_out = hsum(sll);
  *lx_out = hsum(slx);
}
// sum w (x - (a L - b))^2 in lanes
template <int S>
AQ_INLINE float sub_error(const float* x, const float* w, const float* L, float a, float b) {
  float e[kLanes] = {};
  for (int i = 0; i < S; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float r = x[i + j] - (a * L[i + j] - b);
      e[j] += w[i + j] * r * r;
    }
  return hsum(e);
}

// ---- float fits of one sub-block --------------------------------------------------------------

struct Fit {
  float scale = 0, mn = 0;  // value = scale * level - mn (mn = 0 for symmetric types)
  float err = 0;            // of the fit, under its weights
};

// Least squares of value = a L + c over the sums (c <= 0 enforced: the min is stored >= 0).
// When every weight got the same code (a constant sub-block) the line through the origin.
AQ_INLINE bool lsq_asym(const Sums& s, float* a, float* c) {
  const float det = s.w * s.ll - s.l * s.l;
  if (det > 0) {
    *a = (s.w * s.lx - s.l * s.x) / det;
    *c = (s.ll * s.x - s.l * s.lx) / det;
  } else {
    *c = 1;  // refit through the origin below
  }
  if (*c > 0) {
    *c = 0;
    *a = s.ll > 0 ? s.lx / s.ll : 0;
  }
  return *a > 0;
}
AQ_INLINE float err_asym(const Sums& s, float sxx, float a, float c) {
  return sxx - 2 * a * s.lx - 2 * c * s.x + a * a * s.ll + 2 * a * c * s.l + c * c * s.w;
}

// Trial inverse scales (rmin + rdelta * i + nmax) / (max - min), i < nstep (plus nmax itself),
// each refit by least squares; the best under weights w. With w2 (kTwo), the same trials are
// also scored under a second set of weights, into *f2: the assignment is shared.
//
// Eight trials run at once, one per lane: each lane walks the sub-block's weights in order, so
// no sum is ever split across lanes and every lane's arithmetic is the scalar one.
template <GgmlType T, bool kTwo = false>
AQ_INLINE Fit fit_asym_grid(const float* x, const float* w, float sxx, float rmin, float rdelta, int nstep,
                            const float* w2 = nullptr, float sxx2 = 0, Fit* f2 = nullptr) {
  constexpr int S = K<T>::S;
  float xmin = x[0], xmax = x[0];
  for (int i = 1; i < S; ++i) {
    xmin = std::min(xmin, x[i]);
    xmax = std::max(xmax, x[i]);
  }
  if (xmin > 0) xmin = 0;
  Fit best, best2;
  best.mn = best2.mn = -xmin;
  {
    float L0[S] = {};
    best.err = sub_error<S>(x, w, L0, 0.0f, -xmin);
    if constexpr (kTwo) best2.err = sub_error<S>(x, w2, L0, 0.0f, -xmin);
  }
  if (xmax != xmin) {
    constexpr float nmax = static_cast<float>(K<T>::HI);
    const Sums base = sums_base<S>(x, w);
    Sums base2;
    if constexpr (kTwo) base2 = sums_base<S>(x, w2);
    const float mn = -xmin, range = xmax - xmin;
    const int ntrial = nstep + 1;  // trial 0: nmax itself
    for (int t0 = 0; t0 < ntrial; t0 += kLanes) {
      float inv[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const int t = std::min(t0 + l, ntrial - 1);  // the last chunk repeats its final trial
        inv[l] = (t == 0 ? nmax : rmin + rdelta * static_cast<float>(t - 1) + nmax) / range;
      }
      float sl[kLanes] = {}, sll[kLanes] = {}, slx[kLanes] = {};
      float tl[kLanes] = {}, tll[kLanes] = {}, tlx[kLanes] = {};
      for (int i = 0; i < S; ++i) {
        const float xi = x[i], xs = x[i] + mn, wi = w[i];
        const float w2i = kTwo ? w2[i] : 0.0f;
        for (int l = 0; l < kLanes; ++l) {
          const float k = std::min(nmax, std::max(0.0f, round_even(xs * inv[l])));
          const float wk = wi * k;
          sl[l] += wk;
          sll[l] += wk * k;
          slx[l] += wk * xi;
          if constexpr (kTwo) {
            const float vk = w2i * k;
            tl[l] += vk;
            tll[l] += vk * k;
            tlx[l] += vk * xi;
          }
        }
      }
      for (int l = 0; l < kLanes && t0 + l < ntrial; ++l) {
        if (!(inv[l] > 0)) continue;
        float a, c;
        Sums st = base;
        st.l = sl[l];
        st.ll = sll[l];
        st.lx = slx[l];
        if (lsq_asym(st, &a, &c)) {
          const float e = err_asym(st, sxx, a, c);
          if (e < best.err) best = {a, -c, e};
        }
        if constexpr (kTwo) {
          Sums s2 = base2;
          s2.l = tl[l];
          s2.ll = tll[l];
          s2.lx = tlx[l];
          if (lsq_asym(s2, &a, &c)) {
            const float e = err_asym(s2, sxx2, a, c);
            if (e < best2.err) best2 = {a, -c, e};
          }
        }
      }
    }
  }
  if constexpr (kTwo) *f2 = best2;
  return best;
}

// Lloyd steps from a fit: codes given (scale, mn), then (scale, mn) by least squares.
template <GgmlType T>
AQ_INLINE Fit polish_asym(const float* x, const float* w, Fit f, int steps) {
  constexpr int S = K<T>::S;
  float L[S];
  if (f.scale > 0) {
    assign_asym<T>(x, 1.0f / f.scale, f.mn, L);
    f.err = sub_error<S>(x, w, L, f.scale, f.mn);
  }
  for (int it = 0; it < steps && f.scale > 0; ++it) {
    const Sums s = sums<S>(x, w, L);
    float a, c;
    if (!lsq_asym(s, &a, &c)) break;
    float L2[S];
    assign_asym<T>(x, 1.0f / a, -c, L2);
    const float e = sub_error<S>(x, w, L2, a, -c);
    if (!(e < f.err)) break;
    f = {a, -c, e};
    std::memcpy(L, L2, sizeof(L));
  }
  return f;
}

// Symmetric: trial scales vmax / (end + step * i), i in [-ntry, ntry], for the negative end of
// the levels, each refit by least squares; the best under weights w. With w2 (kTwo) the same
// trials, and those for the positive end, are scored under w2 into *f2. Eight trials at once,
// one per lane, as in fit_asym_grid.
template <GgmlType T, bool kTwo = false>
AQ_INLINE Fit fit_sym_grid(const float* x, const float* w, float sxx, int ntry, float step, const float* w2 = nullptr,
                           float sxx2 = 0, Fit* f2 = nullptr) {
  constexpr int S = K<T>::S;
  float amax = 0, vmax = 0;
  for (int i = 0; i < S; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) {
      amax = a;
      vmax = x[i];
    }
  }
  Fit best, best2;
  best.err = sxx;
  best2.err = sxx2;
  if (amax != 0 && K<T>::kTable) {
    // the table's nearest-level search vectorizes along the weights, not across trials
    float L[S];
    const float ends[2] = {static_cast<float>(K<T>::LO), static_cast<float>(K<T>::HI)};
    for (int e = 0; e < (kTwo ? 2 : 1); ++e)
      for (int it = -ntry; it <= ntry; ++it) {
        const float lev = ends[e] + (e == 0 ? -step : step) * static_cast<float>(it);
        if (lev == 0) continue;
        assign_sym<T>(x, lev / vmax, L);
        float ll, lx;
        if (e == 0) {
          sums_sym<S>(x, w, L, &ll, &lx);
          if (ll > 0 && sxx - lx / ll * lx < best.err) best = {lx / ll, 0.0f, sxx - lx / ll * lx};
        }
        if constexpr (kTwo) {
          sums_sym<S>(x, w2, L, &ll, &lx);
          if (ll > 0 && sxx2 - lx / ll * lx < best2.err) best2 = {lx / ll, 0.0f, sxx2 - lx / ll * lx};
        }
      }
  } else if (amax != 0) {
    const int per_end = 2 * ntry + 1;
    const int ntrial = kTwo ? 2 * per_end : per_end;  // [0, per_end): the negative end
    const float lo = static_cast<float>(K<T>::LO), hi = static_cast<float>(K<T>::HI);
    for (int t0 = 0; t0 < ntrial; t0 += kLanes) {
      float inv[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const int t = std::min(t0 + l, ntrial - 1);
        const int it = t % per_end - ntry;
        const float lev = t < per_end ? lo - step * static_cast<float>(it) : hi + step * static_cast<float>(it);
        inv[l] = lev == 0 ? 0.0f : lev / vmax;
      }
      float sll[kLanes] = {}, slx[kLanes] = {}, tll[kLanes] = {}, tlx[kLanes] = {};
      for (int i = 0; i < S; ++i) {
        const float xi = x[i], wi = w[i];
        const float w2i = kTwo ? w2[i] : 0.0f;
        for (int l = 0; l < kLanes; ++l) {
          const float v = std::min(hi, std::max(lo, round_even(xi * inv[l])));
          const float wv = wi * v;
          sll[l] += wv * v;
          slx[l] += wv * xi;
          if constexpr (kTwo) {
            const float uv = w2i * v;
            tll[l] += uv * v;
            tlx[l] += uv * xi;
          }
        }
      }
      for (int l = 0; l < kLanes && t0 + l < ntrial; ++l) {
        if (inv[l] == 0) continue;
        if (t0 + l < per_end && sll[l] > 0 && sxx - slx[l] / sll[l] * slx[l] < best.err)
          best = {slx[l] / sll[l], 0.0f, sxx - slx[l] / sll[l] * slx[l]};
        if constexpr (kTwo)
          if (tll[l] > 0 && sxx2 - tlx[l] / tll[l] * tlx[l] < best2.err)
            best2 = {tlx[l] / tll[l], 0.0f, sxx2 - tlx[l] / tll[l] * tlx[l]};
      }
    }
  }
  if constexpr (kTwo) *f2 = best2;
  return best;
}

template <GgmlType T>
AQ_INLINE Fit polish_sym(const float* x, const float* w, float sxx, Fit f, int steps) {
  constexpr int S = K<T>::S;
  for (int it = 0; it < steps && f.scale != 0; ++it) {
    float L[S];
    assign_sym<T>(x, 1.0f / f.scale, L);
    float ll, lx;
    sums_sym<S>(x, w, L, &ll, &lx);
    if (!(ll > 0)) break;
    const float a = lx / ll, e = sxx - a * lx;
    if (!(e < f.err)) break;
    f.scale = a;
    f.err = e;
  }
  return f;
}

// ---- a block under search ---------------------------------------------------------------------

template <GgmlType T>
struct State {
  static constexpr int N = K<T>::N, S = K<T>::S, NS = N / S;
  uint16_t d = 0, dmin = 0;
  int sc[NS > 0 ? NS : 1] = {};
  int m[NS > 0 ? NS : 1] = {};
  float L[N] = {};  // level (symmetric) or code (asymmetric) of each weight
};

template <GgmlType T>
AQ_INLINE float sub_a(const State<T>& st, int j) {
  const float d = h2f(st.d);
  return K<T>::kSub ? d * static_cast<float>(st.sc[j]) : d;
}
template <GgmlType T>
AQ_INLINE float sub_b(const State<T>& st, int j) {
  return K<T>::kMin ? h2f(st.dmin) * static_cast<float>(st.m[j]) : 0.0f;
}

template <GgmlType T>
AQ_INLINE void assign_sub(const float* x, float a, float b, float* L) {
  if constexpr (K<T>::kMin) {
    if (a > 0) assign_asym<T>(x, 1.0f / a, b, L);
    else std::fill(L, L + K<T>::S, 0.0f);
  } else {
    if (a != 0) assign_sym<T>(x, 1.0f / a, L);
    else if constexpr (K<T>::kTable) std::fill(L, L + K<T>::S, levels<T>().level[8]);
    else std::fill(L, L + K<T>::S, 0.0f);
  }
}

template <GgmlType T>
AQ_INLINE void assign_all(const float* x, State<T>* st) {
  for (int j = 0; j < State<T>::NS; ++j)
    assign_sub<T>(x + j * K<T>::S, sub_a(*st, j), sub_b(*st, j), st->L + j * K<T>::S);
}

template <GgmlType T>
AQ_INLINE float state_error(const float* x, const float* w, const State<T>& st) {
  float e = 0;
  for (int j = 0; j < State<T>::NS; ++j) {
    const int o = j * K<T>::S;
    e += sub_error<K<T>::S>(x + o, w + o, st.L + o, sub_a(st, j), sub_b(st, j));
  }
  return e;
}

// Sub-scales from float fits: d chosen so that the largest |scale| lands on the end of the
// integer range, each rounded once (llama.cpp's rule; our first guess too).
template <GgmlType T>
AQ_INLINE void quantize_sub_scales(const Fit* f, State<T>* st) {
  constexpr int NS = State<T>::NS;
  if constexpr (!K<T>::kSub) {
    st->d = f16_sat(f[0].scale);
  } else if constexpr (K<T>::kMin) {
    float smax = 0, mmax = 0;
    for (int j = 0; j < NS; ++j) {
      smax = std::max(smax, f[j].scale);
      mmax = std::max(mmax, f[j].mn);
    }
    constexpr float top = static_cast<float>(K<T>::SC_HI);
    const float is = smax > 0 ? top / smax : 0, im = mmax > 0 ? top / mmax : 0;
    for (int j = 0; j < NS; ++j) {
      st->sc[j] = std::min(K<T>::SC_HI, nearest_int(is * f[j].scale));
      st->m[j] = std::min(K<T>::SC_HI, nearest_int(im * f[j].mn));
    }
    st->d = f16_sat(smax / top);
    st->dmin = f16_sat(mmax / top);
  } else {
    float vmax = 0;
    for (int j = 0; j < NS; ++j)
      if (std::fabs(f[j].scale) > std::fabs(vmax)) vmax = f[j].scale;
    if (vmax == 0) {
      st->d = 0;
      for (int j = 0; j < NS; ++j) st->sc[j] = 0;
      return;
    }
    // the largest sub-scale maps onto the negative end (the one with more room: -32, -128)
    const float iscale = static_cast<float>(K<T>::SC_LO) / vmax;
    for (int j = 0; j < NS; ++j) st->sc[j] = std::clamp(nearest_int(iscale * f[j].scale), K<T>::SC_LO, K<T>::SC_HI);
    st->d = f16_sat(1.0f / iscale);
  }
}

// The kTry candidates of least predicted error (errors e[0..n), lowest first) into idx.
template <int kTry>
AQ_INLINE int best_few(const float* e, int n, int* idx) {
  int k = 0;
  for (int i = 0; i < n; ++i) {
    if (!(e[i] < INFINITY)) continue;
    int pos = k < kTry ? k++ : kTry;
    if (pos == kTry && !(e[i] < e[idx[kTry - 1]])) continue;
    if (pos == kTry) pos = kTry - 1;
    while (pos > 0 && e[i] < e[idx[pos - 1]]) {
      idx[pos] = idx[pos - 1];
      --pos;
    }
    idx[pos] = i;
  }
  return k;
}

// Step 1: each sub-block's integers around their least-squares optimum. Candidates are ranked by
// their error with the current codes (a quadratic in the integers, from the sub-block's sums);
// the two best get their codes re-assigned and are measured, the best kept if it lowers the error.
template <GgmlType T>
AQ_INLINE void refit_sub(const float* x, const float* w, State<T>* st) {
  if constexpr (K<T>::kSub) {
    constexpr int S = K<T>::S;
    const float d = h2f(st->d), dmin = h2f(st->dmin);
    if (d == 0) return;
    for (int j = 0; j < State<T>::NS; ++j) {
      const float* xs = x + j * S;
      const float* ws = w + j * S;
      float* Ls = st->L + j * S;
      float best = sub_error<S>(xs, ws, Ls, sub_a(*st, j), sub_b(*st, j));
      float L[S];
      int csc[9], cm[9];
      float pred[9];
      int n = 0;
      if constexpr (K<T>::kMin) {
        const Sums s = sums<S>(xs, ws, Ls);
        float a, c;
        if (!lsq_asym(s, &a, &c)) {
          // a zero sub-scale leaves every code 0, which says nothing of the scale: start from
          // the sub-block's range
          const Fit f = fit_asym_grid<T>(xs, ws, 0.0f, 0.0f, 0.0f, 0);
          if (!(f.scale > 0)) continue;
          a = f.scale;
          c = -f.mn;
        }
        const int s0 = nearest_int(a / d), m0 = dmin > 0 ? nearest_int(-c / dmin) : st->m[j];
        for (int ds = -1; ds <= 1; ++ds)
          for (int dm = -1; dm <= 1; ++dm) {
            const int sc = std::clamp(s0 + ds, K<T>::SC_LO, K<T>::SC_HI);
            const int m = std::clamp(m0 + dm, 0, K<T>::SC_HI);
            csc[n] = sc;
            cm[n] = m;
            const bool same = sc == st->sc[j] && m == st->m[j];
            const float aa = d * static_cast<float>(sc), cc = -dmin * static_cast<float>(m);
            // with the current codes (sxx left out: a constant)
            pred[n++] = same ? INFINITY : err_asym(s, 0.0f, aa, cc);
          }
      } else {
        float ll, lx;
        sums_sym<S>(xs, ws, Ls, &ll, &lx);
        if (!(ll > 0) || st->sc[j] == 0) {
          // a zero sub-scale leaves every level at 0: start from the largest weight on an end
          const Fit f = fit_sym_grid<T>(xs, ws, 0.0f, 0, 0.0f);
          if (f.scale == 0) continue;
          ll = 1;
          lx = f.scale;
        }
        const int s0 = nearest_int(lx / ll / d);
        for (int ds = -1; ds <= 1; ++ds) {
          const int sc = std::clamp(s0 + ds, K<T>::SC_LO, K<T>::SC_HI);
          csc[n] = sc;
          cm[n] = 0;
          const float aa = d * static_cast<float>(sc);
          pred[n++] = sc == st->sc[j] ? INFINITY : aa * aa * ll - 2 * aa * lx;
        }
      }
      int idx[3];
      const int k = best_few<3>(pred, n, idx);
      for (int t = 0; t < k; ++t) {
        const int i = idx[t];
        const float aa = d * static_cast<float>(csc[i]), bb = K<T>::kMin ? dmin * static_cast<float>(cm[i]) : 0.0f;
        assign_sub<T>(xs, aa, bb, L);
        const float e = sub_error<S>(xs, ws, L, aa, bb);
        if (e < best) {
          best = e;
          st->sc[j] = csc[i];
          st->m[j] = cm[i];
          std::memcpy(Ls, L, sizeof(L));
        }
      }
    }
  }
}

// Step 2: the float16 block scale(s) by least squares given the integers and codes. The float16
// neighbours are ranked by their error with the current codes; the two best get the codes
// re-assigned and are measured. Kept only when the error drops.
template <GgmlType T>
AQ_INLINE void refit_super(const float* x, const float* w, State<T>* st, float* err) {
  constexpr int S = K<T>::S, NS = State<T>::NS;
  uint16_t cd[9], cm[9];
  float pred[9];
  int n = 0;
  if constexpr (!K<T>::kMin) {
    // value = d u, u = sc L
    float suu = 0, sxu = 0;
    for (int j = 0; j < NS; ++j) {
      float ll, lx;
      sums_sym<S>(x + j * S, w + j * S, st->L + j * S, &ll, &lx);
      const float sc = K<T>::kSub ? static_cast<float>(st->sc[j]) : 1.0f;
      suu += sc * sc * ll;
      sxu += sc * lx;
    }
    if (!(suu > 0)) return;
    const uint16_t h0 = f16_sat(sxu / suu);
    for (uint16_t h : {h0, f16_step(h0, 1), f16_step(h0, -1)}) {
      const float dd = h2f(h);
      cd[n] = h;
      cm[n] = 0;
      pred[n++] = h == st->d ? INFINITY : dd * dd * suu - 2 * dd * sxu;
    }
  } else {
    // value = d u - dmin v, u = sc L, v = m
    float suu = 0, svv = 0, suv = 0, sxu = 0, sxv = 0;
    for (int j = 0; j < NS; ++j) {
      const Sums s = sums<S>(x + j * S, w + j * S, st->L + j * S);
      const float sc = static_cast<float>(st->sc[j]), m = static_cast<float>(st->m[j]);
      suu += sc * sc * s.ll;
      svv += m * m * s.w;
      suv += sc * m * s.l;
      sxu += sc * s.lx;
      sxv += m * s.x;
    }
    const float det = suu * svv - suv * suv;
    float d, dm;
    if (det > 0) {
      d = (sxu * svv - suv * sxv) / det;
      dm = (suv * sxu - suu * sxv) / det;
    } else if (suu > 0) {
      d = sxu / suu;
      dm = h2f(st->dmin);
    } else {
      return;
    }
    if (!(d > 0)) return;
    if (!(dm > 0)) dm = 0;
    const uint16_t hd = f16_sat(d), hm = f16_sat(dm);
    for (uint16_t a : {hd, f16_step(hd, 1), f16_step(hd, -1)})
      for (uint16_t b : {hm, f16_step(hm, 1), f16_step(hm, -1)}) {
        const float dd = h2f(a), mm = h2f(b);
        cd[n] = a;
        cm[n] = b;
        pred[n++] = a == st->d && b == st->dmin
                        ? INFINITY
                        : -2 * dd * sxu + 2 * mm * sxv + dd * dd * suu - 2 * dd * mm * suv + mm * mm * svv;
      }
  }
  int idx[2];
  const int k = best_few<2>(pred, n, idx);
  State<T> next = *st;
  float be = *err;
  for (int t = 0; t < k; ++t) {
    State<T> c = *st;
    c.d = cd[idx[t]];
    c.dmin = cm[idx[t]];
    assign_all<T>(x, &c);
    const float e = state_error<T>(x, w, c);
    if (e < be) {
      be = e;
      next = c;
    }
  }
  *st = next;
  *err = be;
}

template <GgmlType T>
AQ_INLINE void refine(const float* x, const float* w, int rounds, State<T>* st) {
  float err = state_error<T>(x, w, *st);
  for (int r = 0; r < rounds; ++r) {
    refit_sub<T>(x, w, st);
    float e2 = state_error<T>(x, w, *st);
    refit_super<T>(x, w, st, &e2);
    if (!(e2 < err * (1.0f - 1e-6f))) break;
    err = e2;
  }
}

// llama.cpp's error weights for the type (no importance: |x|-based; with importance qw:
// qw * sqrt(sigma^2 + x^2), sigma^2 = 2 * mean x^2 of the block).
template <GgmlType T>
AQ_INLINE void llama_weights(const float* x, const float* imp, float* w) {
  constexpr int N = K<T>::N, S = K<T>::S;
  if (imp) {
    float sumx2 = 0;
    for (int i = 0; i < N; ++i) sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / N;
    for (int i = 0; i < N; ++i) w[i] = imp[i] * std::sqrt(sigma2 + x[i] * x[i]);
    return;
  }
  if constexpr (T == GgmlType::kQ4_K || T == GgmlType::kQ5_K) {
    for (int j = 0; j < N / S; ++j) {
      const float* xs = x + j * S;
      float sum = 0;
      for (int i = 0; i < S; ++i) sum += xs[i] * xs[i];
      const float av = std::sqrt(sum / static_cast<float>(S));
      for (int i = 0; i < S; ++i) w[j * S + i] = av + std::fabs(xs[i]);
    }
  } else if constexpr (T == GgmlType::kQ2_K) {
    for (int i = 0; i < N; ++i) w[i] = std::fabs(x[i]);
  } else {
    for (int i = 0; i < N; ++i) w[i] = x[i] * x[i];
  }
}

template <GgmlType T>
AQ_INLINE float wsq(const float* x, const float* w) {
  constexpr int S = K<T>::S;
  float e[kLanes] = {};
  for (int i = 0; i < S; i += kLanes)
    for (int j = 0; j < kLanes; ++j) e[j] += w[i + j] * x[i + j] * x[i + j];
  return hsum(e);
}

// llama.cpp's trial grids for the float fit of each sub-block under its weights lw, into
// fits. With w (kTwo) the same trials are also scored under the true objective into ours.
template <GgmlType T, bool kTwo = false>
AQ_INLINE void llama_fits(const float* x, const float* lw, bool importance, Fit* fits, const float* w = nullptr,
                          Fit* ours = nullptr) {
  constexpr int S = K<T>::S, NS = K<T>::N / S;
  for (int j = 0; j < NS; ++j) {
    const float* xs = x + j * S;
    const float* ws = lw + j * S;
    const float sxx = wsq<T>(xs, ws);
    const float* w2 = kTwo ? w + j * S : nullptr;
    const float sxx2 = kTwo ? wsq<T>(xs, w2) : 0.0f;
    Fit* f2 = kTwo ? ours + j : nullptr;
    if constexpr (K<T>::kMin) {
      float rmin = -0.5f, rdelta = 0.1f;
      int nstep = 15;
      if (T == GgmlType::kQ4_K) {
        rmin = importance ? -0.9f : -1.0f;
        rdelta = importance ? 0.05f : 0.1f;
        nstep = importance ? 36 : 20;
      } else if (importance) {
        rmin = -0.9f;
        rdelta = 0.05f;
        nstep = 36;
      }
      fits[j] = fit_asym_grid<T, kTwo>(xs, ws, sxx, rmin, rdelta, nstep, w2, sxx2, f2);
    } else if constexpr (K<T>::kTable) {
      fits[j] = fit_sym_grid<T, kTwo>(xs, ws, sxx, 7, 1.0f, w2, sxx2, f2);
    } else {
      fits[j] = fit_sym_grid<T, kTwo>(xs, ws, sxx, 9, 0.1f, w2, sxx2, f2);
    }
    if constexpr (kTwo) {
      if constexpr (K<T>::kMin) *f2 = polish_asym<T>(xs, w2, *f2, 3);
      else *f2 = polish_sym<T>(xs, w2, sxx2, *f2, 3);
    }
  }
}

template <GgmlType T>
void to_block(const State<T>& st, GgmlBlock* b) {
  constexpr int N = K<T>::N;
  *b = GgmlBlock{};
  b->d = st.d;
  b->dmin = st.dmin;
  if constexpr (K<T>::kSub) {
    for (int j = 0; j < State<T>::NS; ++j) {
      b->sc[j] = static_cast<int16_t>(st.sc[j]);
      b->m[j] = static_cast<int16_t>(st.m[j]);
    }
  } else {
    b->sc[0] = 1;
  }
  if constexpr (K<T>::kTable) {
    const Levels<T>& lv = levels<T>();
    for (int i = 0; i < N; ++i) {
      int k = 0;
      while (k + 1 < K<T>::NL && lv.level[k] != st.L[i]) ++k;
      b->k[i] = static_cast<uint8_t>(k);
    }
  } else {
    for (int i = 0; i < N; ++i) b->k[i] = static_cast<uint8_t>(static_cast<int>(st.L[i]) - K<T>::LO);
  }
}

// Exact error of a state: the decoded float32 values, as the decoders compute them, against x,
// summed in double in 4 fixed lanes.
template <GgmlType T>
AQ_INLINE double exact_error(const float* x, const float* w, const State<T>& st) {
  constexpr int S = K<T>::S;
  double e[4] = {};
  for (int j = 0; j < State<T>::NS; ++j) {
    const float a = sub_a(st, j), b = sub_b(st, j);
    for (int i = 0; i < S; ++i) {
      const float v = K<T>::kMin ? a * st.L[j * S + i] - b : a * st.L[j * S + i];
      const double r = static_cast<double>(x[j * S + i]) - v;
      e[i % 4] += w[j * S + i] * r * r;
    }
  }
  return (e[0] + e[1]) + (e[2] + e[3]);
}

template <GgmlType T>
void start_llama(const float* x, const float* imp, State<T>* st) {
  constexpr int N = K<T>::N;
  if constexpr (T == GgmlType::kQ8_0) {  // absmax / 127, codes rounded (importance is ignored)
    float amax = 0;
    for (int i = 0; i < N; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    st->d = f16_sat(d);
    const float id = d > 0 ? 1.0f / d : 0.0f;
    for (int i = 0; i < N; ++i) st->L[i] = static_cast<float>(std::clamp(nearest_int(x[i] * id), -128, 127));
    return;
  } else {
    float lw[N];
    llama_weights<T>(x, imp, lw);
    Fit fits[N / K<T>::S];
    llama_fits<T>(x, lw, imp != nullptr, fits);
    quantize_sub_scales<T>(fits, st);
    assign_all<T>(x, st);
  }
}

template <GgmlType T>
void encode_block_t(const float* x, const float* imp, const GgmlEncodeOptions& opt, GgmlBlock* out) {
  constexpr int N = K<T>::N, NS = N / K<T>::S;
  float w[N];
  if (imp) std::memcpy(w, imp, sizeof(w));
  else std::fill(w, w + N, 1.0f);
  if (opt.weighting == GgmlWeighting::kMagnitude) {
    constexpr int S = K<T>::S;
    for (int j = 0; j < NS; ++j) {
      float sum = 0;
      for (int i = 0; i < S; ++i) sum += x[j * S + i] * x[j * S + i];
      const float rms = std::sqrt(sum / static_cast<float>(S));
      for (int i = 0; i < S; ++i) w[j * S + i] *= rms + std::fabs(x[j * S + i]) + 1e-30f;
    }
  } else if (opt.weighting == GgmlWeighting::kLlama && T != GgmlType::kQ8_0) {
    float lw[N];
    llama_weights<T>(x, imp, lw);  // with an importance its product with it, as llama.cpp's
    for (int i = 0; i < N; ++i) w[i] = lw[i] + 1e-30f;
  }

  State<T> llama, ours;
  const bool two = opt.starts >= 2;
  if constexpr (T == GgmlType::kQ8_0) {
    start_llama<T>(x, imp, &llama);
    if (two) {
      const float sxx = wsq<T>(x, w);
      Fit g;  // the largest weight on either end, at the end or half a level inside it
      Fit f = fit_sym_grid<T, true>(x, w, sxx, 1, 0.5f, w, sxx, &g);
      if (g.err < f.err) f = g;
      f = polish_sym<T>(x, w, sxx, f, 3);
      quantize_sub_scales<T>(&f, &ours);
      assign_all<T>(x, &ours);
    }
  } else {
    float lw[N];
    llama_weights<T>(x, imp, lw);
    Fit fl[NS], fo[NS];
    if (two) llama_fits<T, true>(x, lw, imp != nullptr, fl, w, fo);
    else llama_fits<T>(x, lw, imp != nullptr, fl);
    quantize_sub_scales<T>(fl, &llama);
    assign_all<T>(x, &llama);
    if (two) {
      quantize_sub_scales<T>(fo, &ours);
      assign_all<T>(x, &ours);
    }
  }
  State<T> best = llama;
  double best_err = exact_error<T>(x, w, llama);
  auto consider = [&](State<T>& c) {
    refine<T>(x, w, opt.rounds, &c);
    const double e = exact_error<T>(x, w, c);
    if (e < best_err) {
      best_err = e;
      best = c;
    }
  };
  if (!two) {
    consider(llama);
  } else {
    // Refinement costs as much as a start: only the start with the lower error is refined
    // (the other stays a candidate as it is).
    const double e_ours = exact_error<T>(x, w, ours);
    if (e_ours < best_err) {
      best_err = e_ours;
      best = ours;
      consider(ours);
    } else {
      consider(llama);
    }
  }
  {
    // Every weight 0: the floor no block may be worse than (tiny weights whose scales float16
    // cannot hold).
    State<T> zero;
    assign_all<T>(x, &zero);
    const double e = exact_error<T>(x, w, zero);
    if (e < best_err) {
      best_err = e;
      best = zero;
    }
  }
  to_block<T>(best, out);
}

template <GgmlType T>
void encode_row_t(const float* x, uint64_t cols, uint8_t* out, const GgmlEncodeOptions& opt) {
  constexpr int N = K<T>::N;
  const int bytes = ggml_traits(T).bytes;
  GgmlBlock b;
  for (uint64_t c = 0; c + N <= cols; c += N) {
    encode_block_t<T>(x + c, opt.importance ? opt.importance + c : nullptr, opt, &b);
    ggml_pack_block(T, b, out);
    out += bytes;
  }
}

// clang refuses flatten on multiversioned functions: there the clones inline what they choose.
#if defined(__clang__)
#define AQ_ROW_ENCODER_ATTRS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AQ_ROW_ENCODER_ATTRS __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#endif
#define AQ_ROW_ENCODER(NAME, TYPE)                                                                       \
  AQ_ROW_ENCODER_ATTRS void NAME(                                                                        \
      const float* x, uint64_t cols, uint8_t* out, const GgmlEncodeOptions& opt) {                       \
    encode_row_t<TYPE>(x, cols, out, opt);                                                               \
  }
AQ_ROW_ENCODER(encode_row_q8_0, GgmlType::kQ8_0)
AQ_ROW_ENCODER(encode_row_q6_k, GgmlType::kQ6_K)
AQ_ROW_ENCODER(encode_row_q5_k, GgmlType::kQ5_K)
AQ_ROW_ENCODER(encode_row_q4_k, GgmlType::kQ4_K)
AQ_ROW_ENCODER(encode_row_q3_k, GgmlType::kQ3_K)
AQ_ROW_ENCODER(encode_row_q2_k, GgmlType::kQ2_K)
AQ_ROW_ENCODER(encode_row_iq4_xs, GgmlType::kIQ4_XS)
AQ_ROW_ENCODER(encode_row_iq4_nl, GgmlType::kIQ4_NL)
#undef AQ_ROW_ENCODER
#undef AQ_ROW_ENCODER_ATTRS

template <typename F>
void dispatch(GgmlType t, F&& f) {
  switch (t) {
    case GgmlType::kQ8_0: return f(std::integral_constant<GgmlType, GgmlType::kQ8_0>{});
    case GgmlType::kQ6_K: return f(std::integral_constant<GgmlType, GgmlType::kQ6_K>{});
    case GgmlType::kQ5_K: return f(std::integral_constant<GgmlType, GgmlType::kQ5_K>{});
    case GgmlType::kQ4_K: return f(std::integral_constant<GgmlType, GgmlType::kQ4_K>{});
    case GgmlType::kQ3_K: return f(std::integral_constant<GgmlType, GgmlType::kQ3_K>{});
    case GgmlType::kQ2_K: return f(std::integral_constant<GgmlType, GgmlType::kQ2_K>{});
    case GgmlType::kIQ4_XS: return f(std::integral_constant<GgmlType, GgmlType::kIQ4_XS>{});
    case GgmlType::kIQ4_NL: return f(std::integral_constant<GgmlType, GgmlType::kIQ4_NL>{});
  }
}

}  // namespace

double ggml_block_error(GgmlType t, const GgmlBlock& b, const float* x, const float* w) {
  const GgmlTraits& g = ggml_traits(t);
  double e = 0;
  for (int p = 0; p < g.block; ++p) {
    const double diff = static_cast<double>(x[p]) - ggml_block_value(t, b, p);
    e += (w ? w[p] : 1.0) * diff * diff;
  }
  return e;
}

void ggml_start_llama(GgmlType t, const float* x, const float* importance, GgmlBlock* b) {
  dispatch(t, [&](auto tc) {
    constexpr GgmlType T = decltype(tc)::value;
    State<T> st;
    start_llama<T>(x, importance, &st);
    to_block<T>(st, b);
  });
}

void ggml_encode_block(GgmlType t, const float* x, const float* importance, const GgmlEncodeOptions& opt,
                       GgmlBlock* b) {
  dispatch(t, [&](auto tc) { encode_block_t<decltype(tc)::value>(x, importance, opt, b); });
}

void ggml_encode_row(GgmlType t, const float* x, uint64_t cols, uint8_t* out, const GgmlEncodeOptions& opt) {
  switch (t) {
    case GgmlType::kQ8_0: return encode_row_q8_0(x, cols, out, opt);
    case GgmlType::kQ6_K: return encode_row_q6_k(x, cols, out, opt);
    case GgmlType::kQ5_K: return encode_row_q5_k(x, cols, out, opt);
    case GgmlType::kQ4_K: return encode_row_q4_k(x, cols, out, opt);
    case GgmlType::kQ3_K: return encode_row_q3_k(x, cols, out, opt);
    case GgmlType::kQ2_K: return encode_row_q2_k(x, cols, out, opt);
    case GgmlType::kIQ4_XS: return encode_row_iq4_xs(x, cols, out, opt);
    case GgmlType::kIQ4_NL: return encode_row_iq4_nl(x, cols, out, opt);
  }
}

}  // namespace aq
