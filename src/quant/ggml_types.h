// ggml's block formats (the types llama.cpp, stable-diffusion.cpp, ComfyUI-GGUF and diffusers'
// GGUF loader compute on), as plain structs of their on-disk bytes, and one integer model of a
// block that the encoders search over and the decoders read.
//
// A row of `cols` weights is cut into blocks along the row (the input dimension): 32 weights a
// block for Q8_0 and IQ4_NL, 256 (a "super-block") for the K types and IQ4_XS, which need
// cols % 256 == 0. Every type decodes a weight as a product of a float16 block scale `d`, a small
// integer sub-block scale and a level, minus (asymmetric K types) a float16 `dmin` times an
// integer sub-block min:
//
//   type     weights/sub-block  sub-scale           level (code index k)        value
//   Q8_0     32 (no subs)       -                   k - 128   (int8)            d * level
//   Q6_K     16                 int8  [-128, 127]   k - 32,   k in [0, 63]      (d * sc) * level
//   Q5_K     32                 6-bit [0, 63] + min k,        k in [0, 31]      (d * sc) * k - dmin * m
//   Q4_K     32                 6-bit [0, 63] + min k,        k in [0, 15]      (d * sc) * k - dmin * m
//   Q3_K     16                 6-bit [-32, 31]     k - 4,    k in [0, 7]       (d * sc) * level
//   Q2_K     16                 4-bit [0, 15] + min k,        k in [0, 3]       (d * sc) * k - dmin * m
//   IQ4_XS   32                 6-bit [-32, 31]     kIq4Levels[k], k in [0, 15] (d * sc) * level
//   IQ4_NL   32 (no subs)       -                   kIq4Levels[k]               d * level
//
// Every product and difference is a float32 operation rounded on its own (no fused multiply-add),
// in the order written: that is how ggml's reference decoders (and gguf-py's numpy ones) compute,
// so our decoded floats equal theirs bit for bit.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace aq {

// The values are ggml's `enum ggml_type` numbers (what a GGUF file stores).
enum class GgmlType : uint8_t {
  kQ8_0 = 8,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kIQ4_NL = 20,
  kIQ4_XS = 23,
};

inline constexpr int kQK = 256;  // weights per K super-block
inline constexpr int kQ32 = 32;  // weights per Q8_0 / IQ4_NL block

// ---- the on-disk blocks (little-endian; float16 fields as their bits) -----------------------

struct BlockQ8_0 {  // 8.5 bits/weight
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_0) == 34);

struct BlockQ6_K {  // 6.5625 bits/weight
  uint8_t ql[128];  // low 4 bits of each code
  uint8_t qh[64];   // high 2 bits
  int8_t scales[16];
  uint16_t d;
};
static_assert(sizeof(BlockQ6_K) == 210);

struct BlockQ5_K {  // 5.5 bits/weight
  uint16_t d, dmin;
  uint8_t scales[12];  // 8 six-bit scales and 8 six-bit mins (packing in ggml_blocks.cpp)
  uint8_t qh[32];      // bit 4 of each code
  uint8_t qs[128];     // low 4 bits
};
static_assert(sizeof(BlockQ5_K) == 176);

struct BlockQ4_K {  // 4.5 bits/weight
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ4_K) == 144);

struct BlockQ3_K {  // 3.4375 bits/weight
  uint8_t hmask[32];   // bit 2 of each code
  uint8_t qs[64];      // low 2 bits
  uint8_t scales[12];  // 16 six-bit scales, stored + 32
  uint16_t d;
};
static_assert(sizeof(BlockQ3_K) == 110);

struct BlockQ2_K {  // 2.625 bits/weight
  uint8_t scales[16];  // low nibble scale, high nibble min
  uint8_t qs[64];
  uint16_t d, dmin;
};
static_assert(sizeof(BlockQ2_K) == 84);

struct BlockIQ4_NL {  // 4.5 bits/weight
  uint16_t d;
  uint8_t qs[16];
};
static_assert(sizeof(BlockIQ4_NL) == 18);

struct BlockIQ4_XS {  // 4.25 bits/weight
  uint16_t d;
  uint16_t scales_h;   // bits 4-5 of the 8 scales, 2 bits each
  uint8_t scales_l[4]; // bits 0-3, a nibble each
  uint8_t qs[128];
};
static_assert(sizeof(BlockIQ4_XS) == 136);

// The fixed non-uniform levels of IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl).
inline constexpr std::array<int8_t, 16> kIq4Levels = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                      1,    13,   25,  38,  53,  69,  89,  113};

// ---- what each type is --------------------------------------------------------------------

struct GgmlTraits {
  GgmlType type;
  const char* name;       // lower case, as in a scheme name: "q4_k"
  const char* ggml_name;  // as ggml spells it: "Q4_K"
  int block;              // weights per block: 32 or 256
  int bytes;              // bytes per block
  int sub;                // weights per sub-block (== block when there are no sub-scales)
  int levels;             // number of code indices
  bool has_min;           // asymmetric (a min per sub-block)
  int sc_lo, sc_hi;       // range of the integer sub-scale (0, 0: none)
  int nominal_bits;       // the code width class (bit_width) the type stands for
};

const GgmlTraits& ggml_traits(GgmlType t);
// "q4_k", "Q4_K", "iq4_xs", ... (any case); nullopt when not one of the types above.
std::optional<GgmlType> parse_ggml_type(std::string_view name);
inline constexpr std::array<GgmlType, 8> kGgmlTypes = {GgmlType::kQ8_0, GgmlType::kQ6_K, GgmlType::kQ5_K,
                                                       GgmlType::kQ4_K, GgmlType::kQ3_K, GgmlType::kQ2_K,
                                                       GgmlType::kIQ4_XS, GgmlType::kIQ4_NL};

inline double ggml_bits_per_weight(GgmlType t) {
  const GgmlTraits& g = ggml_traits(t);
  return 8.0 * g.bytes / g.block;
}
// Bytes of one row of `cols` weights (cols must be a multiple of the block).
inline uint64_t ggml_row_bytes(GgmlType t, uint64_t cols) {
  const GgmlTraits& g = ggml_traits(t);
  return cols / static_cast<uint64_t>(g.block) * static_cast<uint64_t>(g.bytes);
}

// ---- the integer model of one block ---------------------------------------------------------

// A block as numbers: what the encoders choose and the reference decoder reads. For types without
// sub-scales, sc[0] = 1 and m[0] = 0 stand for the single block.
struct GgmlBlock {
  uint16_t d = 0, dmin = 0;  // float16 bits
  int16_t sc[16] = {};
  int16_t m[16] = {};
  uint8_t k[256] = {};       // code index of each weight, in row order
};

// Writes `b` as the type's bytes (out: traits.bytes bytes). Every field must be in range.
void ggml_pack_block(GgmlType t, const GgmlBlock& b, uint8_t* out);
// Reads the type's bytes into the integer model.
void ggml_unpack_block(GgmlType t, const uint8_t* in, GgmlBlock* b);
// The float value of level index k of the type (Q8_0: k - 128, Q6_K: k - 32, IQ4: the table, ...).
float ggml_level(GgmlType t, int k);

// The per-weight error weight the encoder minimises (times the importance, when given):
//   kPlain      1: plain squared error;
//   kMagnitude  sqrt(mean x^2 of the sub-block) + |x| for every type (llama.cpp's Q4_K / Q5_K
//               weighting);
//   kLlama      each type's own llama.cpp weights: Q4_K / Q5_K as kMagnitude, Q2_K |x|, Q3_K,
//               Q6_K and the IQ4 types x^2, Q8_0 1 (llama.cpp rounds it plainly); with an
//               importance q: q sqrt(2 mean x^2 of the block + x^2), as llama.cpp does with an
//               imatrix.
enum class GgmlWeighting : uint8_t { kPlain, kMagnitude, kLlama };

}  // namespace aq
