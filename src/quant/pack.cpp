#include "quant/pack.h"

#include <cstring>

#include "quant/scheme.h"

namespace aq {

void pack_codes_reference(const uint8_t* codes, size_t n, int bits, uint8_t* out) {
  if (n == 0) return;
  std::memset(out, 0, packed_code_bytes(bits, n));
  for (size_t i = 0; i < n; ++i)
    for (int b = 0; b < bits; ++b) {
      const uint64_t k = static_cast<uint64_t>(i) * static_cast<uint64_t>(bits) + static_cast<uint64_t>(b);
      if ((codes[i] >> b) & 1u) out[k / 8] = static_cast<uint8_t>(out[k / 8] | (1u << (k % 8)));
    }
}

void unpack_codes_reference(const uint8_t* packed, uint64_t first, size_t n, int bits, uint8_t* out) {
  for (size_t i = 0; i < n; ++i) {
    unsigned v = 0;
    for (int b = 0; b < bits; ++b) {
      const uint64_t k = (first + i) * static_cast<uint64_t>(bits) + static_cast<uint64_t>(b);
      v |= ((packed[k / 8] >> (k % 8)) & 1u) << b;
    }
    out[i] = static_cast<uint8_t>(v);
  }
}

namespace {

// Codes per chunk so that a chunk is a whole number of bytes: 8 codes for any bit width.
// Each chunk of 8 codes is bits bytes, assembled in a 64-bit little-endian word.
inline uint64_t gather8(const uint8_t* c, int bits) {
  uint64_t w = 0;
  for (int k = 0; k < 8; ++k) w |= static_cast<uint64_t>(c[k]) << (k * bits);
  return w;
}

inline void scatter8(uint64_t w, int bits, uint8_t* c) {
  const uint64_t mask = (1u << bits) - 1u;
  for (int k = 0; k < 8; ++k) c[k] = static_cast<uint8_t>((w >> (k * bits)) & mask);
}

template <int kBits>
void pack_fixed(const uint8_t* codes, size_t n, uint8_t* out) {
  const size_t chunks = n / 8;
  for (size_t j = 0; j < chunks; ++j) {
    const uint64_t w = gather8(codes + 8 * j, kBits);
    for (int b = 0; b < kBits; ++b) out[j * kBits + b] = static_cast<uint8_t>(w >> (8 * b));
  }
  const size_t done = chunks * 8;
  if (done < n) pack_codes_reference(codes + done, n - done, kBits, out + chunks * kBits);
}

template <int kBits>
void unpack_fixed(const uint8_t* packed, size_t n, uint8_t* out) {
  const size_t chunks = n / 8;
  for (size_t j = 0; j < chunks; ++j) {
    uint64_t w = 0;
    for (int b = 0; b < kBits; ++b) w |= static_cast<uint64_t>(packed[j * kBits + b]) << (8 * b);
    scatter8(w, kBits, out + 8 * j);
  }
  const size_t done = chunks * 8;
  if (done < n) unpack_codes_reference(packed + chunks * kBits, 0, n - done, kBits, out + done);
}

}  // namespace

void pack_codes(const uint8_t* codes, size_t n, int bits, uint8_t* out) {
  switch (bits) {
    case 8: if (n) std::memcpy(out, codes, n); return;
    case 4: pack_fixed<4>(codes, n, out); return;
    case 3: pack_fixed<3>(codes, n, out); return;
    case 2: pack_fixed<2>(codes, n, out); return;
    default: pack_codes_reference(codes, n, bits, out); return;
  }
}

void unpack_codes(const uint8_t* packed, uint64_t first, size_t n, int bits, uint8_t* out) {
  // Fast paths start on a chunk boundary (8 codes = `bits` whole bytes); a misaligned head is
  // read bit by bit until the next boundary.
  const size_t head = static_cast<size_t>((8 - first % 8) % 8);
  if (head > 0) {
    const size_t h = head < n ? head : n;
    unpack_codes_reference(packed, first, h, bits, out);
    first += h;
    n -= h;
    out += h;
    if (n == 0) return;
  }
  const uint8_t* p = packed + first / 8 * static_cast<uint64_t>(bits);
  switch (bits) {
    case 8: if (n) std::memcpy(out, p, n); return;
    case 4: unpack_fixed<4>(p, n, out); return;
    case 3: unpack_fixed<3>(p, n, out); return;
    case 2: unpack_fixed<2>(p, n, out); return;
    default: unpack_codes_reference(packed, first, n, bits, out); return;
  }
}

}  // namespace aq
