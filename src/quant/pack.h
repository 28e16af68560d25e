// Bit packing of integer codes. Stream layout (docs/format.md): code i of a tensor occupies bits
// [i*bits, (i+1)*bits) of one little-endian bit stream, where stream bit k is bit (k mod 8) of
// byte k/8. So 4-bit code 0 is the low nibble of byte 0, and 3-bit codes cross byte boundaries
// (8 codes fill exactly 3 bytes). Rows are not padded: a tensor of n codes takes ceil(n*bits/8)
// bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aq {

// Packs n codes (each < 2^bits) into out, which holds packed_code_bytes(bits, n) bytes.
// Writes whole bytes only: the caller packs a stream in pieces only at byte-aligned boundaries
// (n * bits a multiple of 8 for every piece but the last).
void pack_codes(const uint8_t* codes, size_t n, int bits, uint8_t* out);

// Reads codes [first, first + n) of a packed stream into out (one byte per code).
void unpack_codes(const uint8_t* packed, uint64_t first, size_t n, int bits, uint8_t* out);

// Bit-at-a-time reference implementations: the specification the fast paths are tested against.
void pack_codes_reference(const uint8_t* codes, size_t n, int bits, uint8_t* out);
void unpack_codes_reference(const uint8_t* packed, uint64_t first, size_t n, int bits, uint8_t* out);

}  // namespace aq
