// A quantization scheme: how a 2-D weight (rows = output channels, cols = input features; a
// convolution is flattened to [out, in x kh x kw]) becomes integer codes plus per-group scales.
//
// Groups run along the input dimension: each row is cut into groups of `group_size` consecutive
// weights (the last group of a row is shorter when cols is not a multiple); group_size 0 means one
// group per row (per-channel). Every group has its own scale s, and for asymmetric schemes an
// offset z, and its weights are coded as
//   asymmetric: w ~= s * c + z          c in [0, 2^bits - 1]
//   symmetric:  w ~= s * (c - 2^(bits-1))
// The offset is stored as a value (the weight that code 0 stands for) rather than as an integer
// code: it costs the same 16 bits and no precision is lost to rounding it to a code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "quant/ggml_types.h"

namespace aq {

enum class ScaleType : uint8_t { kF16, kF32 };

// How the scale of each group is chosen.
enum class ScaleMethod : uint8_t {
  kMinMax,  // plain round-to-nearest over [min, max] (symmetric: [-absmax, absmax]); the baseline
  kSearch,  // search over clipping ranges, each refit by least squares, keep the least error
};

enum class SchemeKind : uint8_t {
  kAffine,   // fixed-rate group-wise codes (every weight costs `bits`; fastest to decode)
  kEntropy,  // per-row uniform step, rANS-coded codes (quant/entropy_quant.h): least error per bit
  kGgml,     // one of ggml's block types (quant/ggml_types.h): the bytes llama.cpp & co. compute on
};

struct QuantScheme {
  SchemeKind kind = SchemeKind::kAffine;
  int bits = 4;          // affine: the code width, 2..8. entropy: the nominal width of the budget
  int group_size = 128;  // affine: 32, 64, 128, 256, or 0 = per output channel
  bool symmetric = false;
  ScaleType scale_type = ScaleType::kF16;
  ScaleMethod method = ScaleMethod::kSearch;
  bool rotate = false;     // randomized Hadamard rotation of the rows first (quant/hadamard.h)
  double target_bpw = 0;   // entropy: stored bits per weight to aim for; 0 = bits + 0.5
  GgmlType ggml = GgmlType::kQ4_K;  // kGgml: which block type (bits = its nominal width)
  // kGgml: the error weight the encoder minimises (ggml_codec.h). How the codes were chosen, not
  // how they decode: not stored.
  GgmlWeighting ggml_weighting = GgmlWeighting::kPlain;

  double entropy_budget() const { return target_bpw > 0 ? target_bpw : bits + 0.5; }
  bool operator==(const QuantScheme&) const = default;
};

Status validate_scheme(const QuantScheme& s);

// "int4_g128_asym", "int8_pc_sym" (pc = per channel), "int4_g64_asym_rot" (rotated),
// "entropy_4.50" (entropy-coded at a 4.5 bits/weight budget, "_rot" when rotated), "q4_k" (a ggml
// type); scale type and method are not in it.
std::string scheme_name(const QuantScheme& s);
const char* scale_type_name(ScaleType t);
const char* scale_method_name(ScaleMethod m);
const char* scheme_kind_name(SchemeKind k);

inline size_t group_len(const QuantScheme& s, size_t cols) {
  return s.group_size == 0 ? cols : static_cast<size_t>(s.group_size);
}
inline size_t groups_per_row(const QuantScheme& s, size_t cols) {
  const size_t g = group_len(s, cols);
  return g == 0 ? 0 : (cols + g - 1) / g;
}
inline size_t packed_code_bytes(int bits, uint64_t count) {
  return static_cast<size_t>((count * static_cast<uint64_t>(bits) + 7) / 8);
}
inline size_t scale_type_size(ScaleType t) { return t == ScaleType::kF16 ? 2 : 4; }

// A ggml scheme of type t.
QuantScheme ggml_scheme(GgmlType t);

// Bytes stored for a rows x cols affine or ggml tensor: packed codes + scales (+ offsets). Entropy-coded
// sizes are known only once coded.
struct QuantizedSize {
  uint64_t code_bytes = 0;
  uint64_t scale_bytes = 0;
  uint64_t zero_point_bytes = 0;
  uint64_t total() const { return code_bytes + scale_bytes + zero_point_bytes; }
};
QuantizedSize quantized_size(const QuantScheme& s, uint64_t rows, uint64_t cols);

}  // namespace aq
