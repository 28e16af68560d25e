// Packing of ggml's blocks: where each code, scale and min of the integer model sits in the
// type's bytes (ggml_types.h). Position p of a block is the weight's index along the row.
#include <cctype>
#include <cstring>
#include <string>

#include "quant/ggml_types.h"

namespace aq {

namespace {

constexpr GgmlTraits kTraits[] = {
    // type              name      ggml      block bytes sub levels min   sc range   bits
    {GgmlType::kQ8_0, "q8_0", "Q8_0", 32, 34, 32, 256, false, 0, 0, 8},
    {GgmlType::kQ6_K, "q6_k", "Q6_K", 256, 210, 16, 64, false, -128, 127, 6},
    {GgmlType::kQ5_K, "q5_k", "Q5_K", 256, 176, 32, 32, true, 0, 63, 5},
    {GgmlType::kQ4_K, "q4_k", "Q4_K", 256, 144, 32, 16, true, 0, 63, 4},
    {GgmlType::kQ3_K, "q3_k", "Q3_K", 256, 110, 16, 8, false, -32, 31, 3},
    {GgmlType::kQ2_K, "q2_k", "Q2_K", 256, 84, 16, 4, true, 0, 15, 2},
    {GgmlType::kIQ4_XS, "iq4_xs", "IQ4_XS", 256, 136, 32, 16, false, -32, 31, 4},
    {GgmlType::kIQ4_NL, "iq4_nl", "IQ4_NL", 32, 18, 32, 16, false, 0, 0, 4},
};

void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
uint16_t get16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes. Bytes 0-3 hold scales 0-3 and the top
// two bits of scales 4-7; bytes 4-7 the same for the mins; bytes 8-11 the low nibbles of scales
// 4-7 (low half) and mins 4-7 (high half).
void pack_scale_min_k4(const int16_t* sc, const int16_t* m, uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = static_cast<uint8_t>((m[j] & 63) | ((m[j + 4] >> 4) << 6));
    q[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
}
void unpack_scale_min_k4(const uint8_t* q, int16_t* sc, int16_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = q[j] & 63;
    m[j] = q[j + 4] & 63;
    sc[j + 4] = static_cast<int16_t>((q[j + 8] & 15) | ((q[j] >> 6) << 4));
    m[j + 4] = static_cast<int16_t>((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
  }
}

// Q3_K: sixteen 6-bit values u = sc + 32. Bytes 0-7: low nibble of u[i] (i < 8) and of u[i + 8]
// (high half); bytes 8-11: the top two bits of u[i] at bit 2 * (i / 4) of byte 8 + i % 4.
void pack_scales_q3(const int16_t* sc, uint8_t* q) {
  std::memset(q, 0, 12);
  for (int i = 0; i < 16; ++i) {
    const int u = sc[i] + 32;
    q[i % 8] = static_cast<uint8_t>(q[i % 8] | ((u & 15) << (4 * (i / 8))));
    q[8 + i % 4] = static_cast<uint8_t>(q[8 + i % 4] | ((u >> 4) << (2 * (i / 4))));
  }
}
void unpack_scales_q3(const uint8_t* q, int16_t* sc) {
  for (int i = 0; i < 16; ++i) {
    const int lo = (q[i % 8] >> (4 * (i / 8))) & 15;
    const int hi = (q[8 + i % 4] >> (2 * (i / 4))) & 3;
    sc[i] = static_cast<int16_t>((lo | (hi << 4)) - 32);
  }
}

}  // namespace

const GgmlTraits& ggml_traits(GgmlType t) {
  for (const GgmlTraits& g : kTraits)
    if (g.type == t) return g;
  return kTraits[0];  // unreachable for valid enum values
}

std::optional<GgmlType> parse_ggml_type(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const GgmlTraits& g : kTraits)
    if (lower == g.name) return g.type;
  return std::nullopt;
}

float ggml_level(GgmlType t, int k) {
  switch (t) {
    case GgmlType::kQ8_0: return static_cast<float>(k - 128);
    case GgmlType::kQ6_K: return static_cast<float>(k - 32);
    case GgmlType::kQ3_K: return static_cast<float>(k - 4);
    case GgmlType::kIQ4_XS:
    case GgmlType::kIQ4_NL: return static_cast<float>(kIq4Levels[k]);
    default: return static_cast<float>(k);
  }
}

void ggml_pack_block(GgmlType t, const GgmlBlock& b, uint8_t* out) {
  switch (t) {
    case GgmlType::kQ8_0: {
      put16(out, b.d);
      for (int p = 0; p < 32; ++p) out[2 + p] = static_cast<uint8_t>(static_cast<int8_t>(b.k[p] - 128));
      return;
    }
    case GgmlType::kIQ4_NL: {
      put16(out, b.d);
      for (int l = 0; l < 16; ++l) out[2 + l] = static_cast<uint8_t>(b.k[l] | (b.k[l + 16] << 4));
      return;
    }
    case GgmlType::kQ6_K: {
      BlockQ6_K q{};
      for (int p = 0; p < 256; ++p) {
        const int h = p / 128, r = p % 128, k = b.k[p];
        q.ql[h * 64 + r % 64] = static_cast<uint8_t>(q.ql[h * 64 + r % 64] | ((k & 15) << (4 * (r / 64))));
        q.qh[h * 32 + r % 32] = static_cast<uint8_t>(q.qh[h * 32 + r % 32] | ((k >> 4) << (2 * (r / 32))));
      }
      for (int j = 0; j < 16; ++j) q.scales[j] = static_cast<int8_t>(b.sc[j]);
      q.d = b.d;
      std::memcpy(out, &q, sizeof(q));
      return;
    }
    case GgmlType::kQ5_K:
    case GgmlType::kQ4_K: {
      const bool five = t == GgmlType::kQ5_K;
      uint8_t* scales = out + 4;
      uint8_t* qs = out + 4 + 12 + (five ? 32 : 0);
      uint8_t* qh = out + 16;
      std::memset(out, 0, static_cast<size_t>(ggml_traits(t).bytes));
      put16(out, b.d);
      put16(out + 2, b.dmin);
      pack_scale_min_k4(b.sc, b.m, scales);
      for (int p = 0; p < 256; ++p) {
        const int c = p / 64, s = (p / 32) % 2, l = p % 32, k = b.k[p];
        qs[c * 32 + l] = static_cast<uint8_t>(qs[c * 32 + l] | ((k & 15) << (4 * s)));
        if (five) qh[l] = static_cast<uint8_t>(qh[l] | ((k >> 4) << (p / 32)));
      }
      return;
    }
    case GgmlType::kQ3_K: {
      BlockQ3_K q{};
      for (int p = 0; p < 256; ++p) {
        const int h = p / 128, kk = (p % 128) / 32, l = p % 32, k = b.k[p];
        q.qs[h * 32 + l] = static_cast<uint8_t>(q.qs[h * 32 + l] | ((k & 3) << (2 * kk)));
        q.hmask[l] = static_cast<uint8_t>(q.hmask[l] | ((k >> 2) << (p / 32)));
      }
      pack_scales_q3(b.sc, q.scales);
      q.d = b.d;
      std::memcpy(out, &q, sizeof(q));
      return;
    }
    case GgmlType::kQ2_K: {
      BlockQ2_K q{};
      for (int j = 0; j < 16; ++j) q.scales[j] = static_cast<uint8_t>(b.sc[j] | (b.m[j] << 4));
      for (int p = 0; p < 256; ++p) {
        const int h = p / 128, kk = (p % 128) / 32, l = p % 32;
        q.qs[h * 32 + l] = static_cast<uint8_t>(q.qs[h * 32 + l] | (b.k[p] << (2 * kk)));
      }
      q.d = b.d;
      q.dmin = b.dmin;
      std::memcpy(out, &q, sizeof(q));
      return;
    }
    case GgmlType::kIQ4_XS: {
      BlockIQ4_XS q{};
      q.d = b.d;
      for (int j = 0; j < 8; ++j) {
        const int u = b.sc[j] + 32;
        q.scales_l[j / 2] = static_cast<uint8_t>(q.scales_l[j / 2] | ((u & 15) << (4 * (j % 2))));
        q.scales_h = static_cast<uint16_t>(q.scales_h | ((u >> 4) << (2 * j)));
      }
      for (int p = 0; p < 256; ++p) {
        const int j = p / 32, s = (p / 16) % 2, l = p % 16;
        q.qs[j * 16 + l] = static_cast<uint8_t>(q.qs[j * 16 + l] | (b.k[p] << (4 * s)));
      }
      std::memcpy(out, &q, sizeof(q));
      return;
    }
  }
}

void ggml_unpack_block(GgmlType t, const uint8_t* in, GgmlBlock* b) {
  *b = GgmlBlock{};
  switch (t) {
    case GgmlType::kQ8_0: {
      b->d = get16(in);
      b->sc[0] = 1;
      for (int p = 0; p < 32; ++p) b->k[p] = static_cast<uint8_t>(static_cast<int8_t>(in[2 + p]) + 128);
      return;
    }
    case GgmlType::kIQ4_NL: {
      b->d = get16(in);
      b->sc[0] = 1;
      for (int p = 0; p < 32; ++p) b->k[p] = static_cast<uint8_t>((in[2 + p % 16] >> (4 * (p / 16))) & 15);
      return;
    }
    case GgmlType::kQ6_K: {
      BlockQ6_K q;
      std::memcpy(&q, in, sizeof(q));
      for (int p = 0; p < 256; ++p) {
        const int h = p / 128, r = p % 128;
        const int lo = (q.ql[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
        const int hi = (q.qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
        b->k[p] = static_cast<uint8_t>(lo | (hi << 4));
      }
      for (int j = 0; j < 16; ++j) b->sc[j] = q.scales[j];
      b->d = q.d;
      return;
    }
    case GgmlType::kQ5_K:
    case GgmlType::kQ4_K: {
      const bool five = t == GgmlType::kQ5_K;
      b->d = get16(in);
      b->dmin = get16(in + 2);
      unpack_scale_min_k4(in + 4, b->sc, b->m);
      const uint8_t* qs = in + 16 + (five ? 32 : 0);
      const uint8_t* qh = in + 16;
      for (int p = 0; p < 256; ++p) {
        const int c = p / 64, s = (p / 32) % 2, l = p % 32;
        int k = (qs[c * 32 + l] >> (4 * s)) & 15;
        if (five) k |= ((qh[l] >> (p / 32)) & 1) << 4;
        b->k[p] = static_cast<uint8_t>(k);
      }
      return;
    }
    case GgmlType::kQ3_K: {
      BlockQ3_K q;
      std::memcpy(&q, in, sizeof(q));
      for (int p = 0; p < 256; ++p) {
        const int h = p / 128, kk = (p % 128) / 32, l = p % 32;
        const int lo = (q.qs[h * 32 + l] >> (2 * kk)) & 3;
        const int hi = (q.hmask[l] >> (p / 32)) & 1;
        b->k[p] = static_cast<uint8_t>(lo | (hi << 2));
      }
      unpack_scales_q3(q.scales, b->sc);
      b->d = q.d;
      return;
    }
    case GgmlType::kQ2_K: {
      BlockQ2_K q;
      std::memcpy(&q, in, sizeof(q));
      for (int j = 0; j < 16; ++j) {
        b->sc[j] = q.scales[j] & 15;
        b->m[j] = q.scales[j] >> 4;
      }
      for (int p = 0; p < 256; ++p) {
        const int h = p / 128, kk = (p % 128) / 32, l = p % 32;
        b->k[p] = static_cast<uint8_t>((q.qs[h * 32 + l] >> (2 * kk)) & 3);
      }
      b->d = q.d;
      b->dmin = q.dmin;
      return;
    }
    case GgmlType::kIQ4_XS: {
      BlockIQ4_XS q;
      std::memcpy(&q, in, sizeof(q));
      b->d = q.d;
      for (int j = 0; j < 8; ++j) {
        const int lo = (q.scales_l[j / 2] >> (4 * (j % 2))) & 15;
        const int hi = (q.scales_h >> (2 * j)) & 3;
        b->sc[j] = static_cast<int16_t>((lo | (hi << 4)) - 32);
      }
      for (int p = 0; p < 256; ++p) {
        const int j = p / 32, s = (p / 16) % 2, l = p % 16;
        b->k[p] = static_cast<uint8_t>((q.qs[j * 16 + l] >> (4 * s)) & 15);
      }
      return;
    }
  }
}

}  // namespace aq
