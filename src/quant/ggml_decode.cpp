// Decoders of ggml's block types. The fast path follows each type's byte layout (a block's
// codes are interleaved so that 16 or 32 consecutive weights share a shift); the reference reads
// the integer model. Both compute every product and difference as its own float32 operation
// (the core is built with -ffp-contract=off), as ggml's reference decoders do.
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/half.h"
#include "quant/ggml_codec.h"

namespace aq {

namespace {

inline __attribute__((always_inline)) float h2f(uint16_t h) { return f16_to_f32(h); }

#define AQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

AQ_CLONES void decode_q8_0(const uint8_t* in, uint64_t nb, float* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockQ8_0), y += 32) {
    uint16_t h;
    std::memcpy(&h, in, 2);
    const float d = h2f(h);
    const int8_t* qs = reinterpret_cast<const int8_t*>(in + 2);
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
  }
}

AQ_CLONES void decode_iq4_nl(const uint8_t* in, uint64_t nb, float* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockIQ4_NL), y += 32) {
    BlockIQ4_NL b;
    std::memcpy(&b, in, sizeof(b));
    const float d = h2f(b.d);
    for (int l = 0; l < 16; ++l) {
      y[l] = d * static_cast<float>(kIq4Levels[b.qs[l] & 15]);
      y[l + 16] = d * static_cast<float>(kIq4Levels[b.qs[l] >> 4]);
    }
  }
}

AQ_CLONES void decode_q6_k(const uint8_t* in, uint64_t nb, float* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockQ6_K), y += 256) {
    const uint8_t* ql0 = in;
    const uint8_t* qh0 = in + 128;
    const int8_t* sc0 = reinterpret_cast<const int8_t*>(in + 192);
    uint16_t dh;
    std::memcpy(&dh, in + 208, 2);
    const float d = h2f(dh);
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 4; ++k) {
        // weights 128 h + 32 k + l: nibble k / 2 of ql[64 h + (32 k + l) % 64], bits 2k of qh[32 h + l]
        const uint8_t* ql = ql0 + 64 * h + (32 * k) % 64;
        const uint8_t* qh = qh0 + 32 * h;
        const int sl = 4 * (k / 2), sh = 2 * k;
        float* o = y + 128 * h + 32 * k;
        for (int half = 0; half < 2; ++half) {
          const float dl = d * static_cast<float>(sc0[8 * h + 2 * k + half]);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int q = (((ql[l] >> sl) & 15) | (((qh[l] >> sh) & 3) << 4)) - 32;
            o[l] = dl * static_cast<float>(q);
          }
        }
      }
    }
  }
}

// The float16 super-block scale and min at the start of a Q4_K / Q5_K block.
inline __attribute__((always_inline)) void k_super_scales(const uint8_t* in, float* d, float* dmin) {
  uint16_t dh, mh;
  std::memcpy(&dh, in, 2);
  std::memcpy(&mh, in + 2, 2);
  *d = h2f(dh);
  *dmin = h2f(mh);
}

// Sub-block j's 6-bit scale and min from the 12 packed bytes of a Q4_K / Q5_K block.
inline __attribute__((always_inline)) void k_scale_min(const uint8_t* q, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

template <bool kFive>
inline __attribute__((always_inline)) void decode_q45_k_impl(const uint8_t* in, uint64_t nb, float* y) {
  constexpr size_t kBytes = kFive ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K);
  for (uint64_t i = 0; i < nb; ++i, in += kBytes, y += 256) {
    float d, dmin;
    k_super_scales(in, &d, &dmin);
    const uint8_t* q = in + 4;
    const uint8_t* qh = in + 16;
    const uint8_t* qs = in + 16 + (kFive ? 32 : 0);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      k_scale_min(q, j, &sc, &m);
      const float d1 = d * static_cast<float>(sc);
      const float m1 = dmin * static_cast<float>(m);
      const uint8_t* s = qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      float* o = y + 32 * j;
      for (int l = 0; l < 32; ++l) {
        int c = (s[l] >> shift) & 15;
        if constexpr (kFive) c |= ((qh[l] >> j) & 1) << 4;
        o[l] = d1 * static_cast<float>(c) - m1;
      }
    }
  }
}
AQ_CLONES void decode_q4_k(const uint8_t* in, uint64_t nb, float* y) { decode_q45_k_impl<false>(in, nb, y); }
AQ_CLONES void decode_q5_k(const uint8_t* in, uint64_t nb, float* y) { decode_q45_k_impl<true>(in, nb, y); }

AQ_CLONES void decode_q3_k(const uint8_t* in, uint64_t nb, float* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockQ3_K), y += 256) {
    const uint8_t* hmask = in;
    const uint8_t* qs0 = in + 32;
    const uint8_t* sc = in + 96;
    uint16_t dh;
    std::memcpy(&dh, in + 108, 2);
    const float d = h2f(dh);
    for (int g = 0; g < 8; ++g) {  // 32 weights: half g / 4, shift g % 4
      const uint8_t* qs = qs0 + 32 * (g / 4);
      const int shift = 2 * (g % 4);
      float* o = y + 32 * g;
      for (int half = 0; half < 2; ++half) {
        const int s = 2 * g + half;
        const int lo = (sc[s % 8] >> (4 * (s / 8))) & 15;
        const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
        const float dl = d * static_cast<float>((lo | (hi << 4)) - 32);
        for (int l = 16 * half; l < 16 * half + 16; ++l) {
          const int q = ((qs[l] >> shift) & 3) + (((hmask[l] >> g) & 1) << 2) - 4;
          o[l] = dl * static_cast<float>(q);
        }
      }
    }
  }
}

AQ_CLONES void decode_q2_k(const uint8_t* in, uint64_t nb, float* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockQ2_K), y += 256) {
    BlockQ2_K b;
    std::memcpy(&b, in, sizeof(b));
    const float d = h2f(b.d), dmin = h2f(b.dmin);
    for (int g = 0; g < 8; ++g) {
      const uint8_t* qs = b.qs + 32 * (g / 4);
      const int shift = 2 * (g % 4);
      const float dl0 = d * static_cast<float>(b.scales[2 * g] & 15);
      const float ml0 = dmin * static_cast<float>(b.scales[2 * g] >> 4);
      const float dl1 = d * static_cast<float>(b.scales[2 * g + 1] & 15);
      const float ml1 = dmin * static_cast<float>(b.scales[2 * g + 1] >> 4);
      float* o = y + 32 * g;
      for (int l = 0; l < 16; ++l) o[l] = dl0 * static_cast<float>((qs[l] >> shift) & 3) - ml0;
      for (int l = 16; l < 32; ++l) o[l] = dl1 * static_cast<float>((qs[l] >> shift) & 3) - ml1;
    }
  }
}

// Sub-block j's scale of an IQ4_XS block: d times its 6-bit signed sub-scale.
inline __attribute__((always_inline)) float iq4_xs_scale(const BlockIQ4_XS& b, float d, int j) {
  const int ls = ((b.scales_l[j / 2] >> (4 * (j % 2))) & 15) | (((b.scales_h >> (2 * j)) & 3) << 4);
  return d * static_cast<float>(ls - 32);
}

AQ_CLONES void decode_iq4_xs(const uint8_t* in, uint64_t nb, float* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockIQ4_XS), y += 256) {
    BlockIQ4_XS b;
    std::memcpy(&b, in, sizeof(b));
    const float d = h2f(b.d);
    for (int j = 0; j < 8; ++j) {
      const float dl = iq4_xs_scale(b, d, j);
      const uint8_t* qs = b.qs + 16 * j;
      float* o = y + 32 * j;
      for (int l = 0; l < 16; ++l) {
        o[l] = dl * static_cast<float>(kIq4Levels[qs[l] & 15]);
        o[l + 16] = dl * static_cast<float>(kIq4Levels[qs[l] >> 4]);
      }
    }
  }
}


#if defined(__x86_64__)
// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which
// -Wuninitialized reports inside every function that inlines them (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The 4-bit non-linear types look each code up in a table of 16 levels, which the compiler turns
// into scalar loads. With AVX-512 one permute reads 16 table entries at once: the table is the
// block's scale times each level (the very products the scalar loop computes), so the values
// are the same bits.
__attribute__((target("avx512f"))) inline __m512 iq4_levels_ps() {
  alignas(64) float lv[16];
  for (int i = 0; i < 16; ++i) lv[i] = static_cast<float>(kIq4Levels[static_cast<size_t>(i)]);
  return _mm512_load_ps(lv);
}

// Straight to bfloat16 (the PyTorch runtime's scratch), for the types the profiles choose: the
// float32 values of the decoders above, computed the same way (one multiply, then one subtract),
// rounded to nearest even as f32_to_bf16 does, 16 at a time. The IQ4 decoders below write
// either type.
__attribute__((target("avx512f"))) inline __m256i bf16_of(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

__attribute__((target("avx512f"))) inline void store_bf16(uint16_t* o, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), bf16_of(v));
}

__attribute__((target("avx512f"))) void decode_q4_k_bf16(const uint8_t* in, uint64_t nb, uint16_t* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockQ4_K), y += 256) {
    float d, dmin;
    k_super_scales(in, &d, &dmin);
    const uint8_t* q = in + 4;
    const uint8_t* qs = in + 16;
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      k_scale_min(q, j, &sc, &m);
      const __m512 d1 = _mm512_set1_ps(d * static_cast<float>(sc));
      const __m512 m1 = _mm512_set1_ps(dmin * static_cast<float>(m));
      const uint8_t* src = qs + 32 * (j / 2);
      for (int half = 0; half < 2; ++half) {
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * half)));
        c = (j % 2) ? _mm512_srli_epi32(c, 4) : _mm512_and_si512(c, _mm512_set1_epi32(15));
        store_bf16(y + 32 * j + 16 * half, _mm512_sub_ps(_mm512_mul_ps(d1, _mm512_cvtepi32_ps(c)), m1));
      }
    }
  }
}

__attribute__((target("avx512f"))) void decode_q8_0_bf16(const uint8_t* in, uint64_t nb, uint16_t* y) {
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockQ8_0), y += 32) {
    uint16_t h;
    std::memcpy(&h, in, 2);
    const __m512 d = _mm512_set1_ps(h2f(h));
    for (int half = 0; half < 2; ++half) {
      const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 + 16 * half)));
      store_bf16(y + 16 * half, _mm512_mul_ps(_mm512_cvtepi32_ps(c), d));
    }
  }
}

// 16 values to float32 or bfloat16
__attribute__((target("avx512f"))) inline void put16(float* o, __m512 v) { _mm512_storeu_ps(o, v); }
__attribute__((target("avx512f"))) inline void put16(uint16_t* o, __m512 v) { store_bf16(o, v); }

template <typename T>
__attribute__((target("avx512f"))) inline void iq4_16x2(const uint8_t* qs, __m512 table, T* lo, T* hi) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  put16(lo, _mm512_permutexvar_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)), table));
  put16(hi, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table));
}

template <typename T>
__attribute__((target("avx512f"))) void decode_iq4_nl_avx512(const uint8_t* in, uint64_t nb, T* y) {
  const __m512 levels = iq4_levels_ps();
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockIQ4_NL), y += 32) {
    uint16_t h;
    std::memcpy(&h, in, 2);
    iq4_16x2(in + 2, _mm512_mul_ps(_mm512_set1_ps(h2f(h)), levels), y, y + 16);
  }
}

template <typename T>
__attribute__((target("avx512f"))) void decode_iq4_xs_avx512(const uint8_t* in, uint64_t nb, T* y) {
  const __m512 levels = iq4_levels_ps();
  for (uint64_t i = 0; i < nb; ++i, in += sizeof(BlockIQ4_XS), y += 256) {
    BlockIQ4_XS b;
    std::memcpy(&b, in, sizeof(b));
    const float d = h2f(b.d);
    for (int j = 0; j < 8; ++j) {
      const float dl = iq4_xs_scale(b, d, j);
      iq4_16x2(b.qs + 16 * j, _mm512_mul_ps(_mm512_set1_ps(dl), levels), y + 32 * j, y + 32 * j + 16);
    }
  }
}

#pragma GCC diagnostic pop

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
#endif
}  // namespace

float ggml_block_value(GgmlType t, const GgmlBlock& b, int p) { return ggml_code_value(t, b, p, b.k[p]); }

float ggml_code_value(GgmlType t, const GgmlBlock& b, int p, int k) {
  const GgmlTraits& g = ggml_traits(t);
  const float d = h2f(b.d);
  const float level = ggml_level(t, k);
  if (g.sc_lo == g.sc_hi) return d * level;  // no sub-scales (Q8_0, IQ4_NL)
  const int j = p / g.sub;
  const float dl = d * static_cast<float>(b.sc[j]);
  if (!g.has_min) return dl * level;
  return dl * level - h2f(b.dmin) * static_cast<float>(b.m[j]);
}

void ggml_decode_reference(GgmlType t, const uint8_t* in, uint64_t nblocks, float* out) {
  const GgmlTraits& g = ggml_traits(t);
  GgmlBlock b;
  for (uint64_t i = 0; i < nblocks; ++i) {
    ggml_unpack_block(t, in + i * static_cast<uint64_t>(g.bytes), &b);
    for (int p = 0; p < g.block; ++p) out[i * static_cast<uint64_t>(g.block) + p] = ggml_block_value(t, b, p);
  }
}

bool ggml_decode_bf16(GgmlType t, const uint8_t* in, uint64_t nblocks, uint16_t* out) {
#if defined(__x86_64__)
  if (!have_avx512()) return false;
  switch (t) {
    case GgmlType::kQ8_0: decode_q8_0_bf16(in, nblocks, out); return true;
    case GgmlType::kQ4_K: decode_q4_k_bf16(in, nblocks, out); return true;
    case GgmlType::kIQ4_XS: decode_iq4_xs_avx512(in, nblocks, out); return true;
    case GgmlType::kIQ4_NL: decode_iq4_nl_avx512(in, nblocks, out); return true;
    default: return false;
  }
#else
  (void)t, (void)in, (void)nblocks, (void)out;
  return false;
#endif
}

void ggml_decode(GgmlType t, const uint8_t* in, uint64_t nblocks, float* out) {
  switch (t) {
    case GgmlType::kQ8_0: return decode_q8_0(in, nblocks, out);
    case GgmlType::kQ6_K: return decode_q6_k(in, nblocks, out);
    case GgmlType::kQ5_K: return decode_q5_k(in, nblocks, out);
    case GgmlType::kQ4_K: return decode_q4_k(in, nblocks, out);
    case GgmlType::kQ3_K: return decode_q3_k(in, nblocks, out);
    case GgmlType::kQ2_K: return decode_q2_k(in, nblocks, out);
    case GgmlType::kIQ4_XS:
#if defined(__x86_64__)
      if (have_avx512()) return decode_iq4_xs_avx512(in, nblocks, out);
#endif
      return decode_iq4_xs(in, nblocks, out);
    case GgmlType::kIQ4_NL:
#if defined(__x86_64__)
      if (have_avx512()) return decode_iq4_nl_avx512(in, nblocks, out);
#endif
      return decode_iq4_nl(in, nblocks, out);
  }
}

}  // namespace aq
