#include "quant/tensor_codec.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "quant/ggml_codec.h"
#include "quant/group_quant.h"
#include "quant/hadamard.h"
#include "quant/pack.h"
#include "quant/rans.h"

namespace aq {

void store_scales(ScaleType t, const float* in, size_t n, uint8_t* out) {
  if (n == 0) return;
  if (t == ScaleType::kF32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = f32_to_f16(in[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void load_scales(ScaleType t, const uint8_t* in, size_t n, float* out) {
  if (n == 0) return;
  if (t == ScaleType::kF32) {
    std::memcpy(out, in, n * 4);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    out[i] = f16_to_f32(h);
  }
}

namespace {

Status check_entropy(uint64_t rows, uint64_t cols, const EncodedView& v) {
  if (!v.entropy) return FormatError("entropy-coded tensor without its entropy table");
  const EntropySide& e = *v.entropy;
  if (v.scales.size() != rows * 4)
    return FormatError(StrCat("row steps hold ", v.scales.size(), " bytes; expected ", rows * 4));
  if (!v.zero_points.empty()) return FormatError("entropy-coded tensor with zero points");
  if (e.centroids.size() != static_cast<size_t>(kCentroids))
    return FormatError(StrCat(e.centroids.size(), " centroids; expected ", kCentroids));
  if (rows == 0 || cols == 0) return Status::OK();
  if (e.chunk_rows == 0) return FormatError("chunk_rows is 0");
  const uint64_t chunks = (rows + e.chunk_rows - 1) / e.chunk_rows;
  if (e.chunk_offsets.size() != chunks + 1)
    return FormatError(StrCat(e.chunk_offsets.size(), " chunk offsets for ", chunks, " chunks"));
  if (e.chunk_offsets.front() != 0 || e.chunk_offsets.back() != v.codes.size())
    return FormatError(StrCat("chunk offsets span ", e.chunk_offsets.front(), "..", e.chunk_offsets.back(),
                              " but the codes hold ", v.codes.size(), " bytes"));
  for (size_t i = 1; i < e.chunk_offsets.size(); ++i)
    if (e.chunk_offsets[i] < e.chunk_offsets[i - 1]) return FormatError("chunk offsets decrease");
  if (e.frequencies.empty() || e.frequencies.size() > kMaxAlphabet)
    return FormatError(StrCat(e.frequencies.size(), " symbol frequencies"));
  if (e.escape_symbol < -1) return FormatError(StrCat("escape symbol ", e.escape_symbol, " (must be the last symbol or -1)"));
  const int64_t direct = static_cast<int64_t>(e.frequencies.size()) - (e.escape_symbol >= 0 ? 1 : 0);
  if (e.escape_symbol >= 0 && e.escape_symbol != direct)
    return FormatError(StrCat("escape symbol ", e.escape_symbol, " is not the last of ", e.frequencies.size()));
  if (e.symbol_min < -kMaxCode || e.symbol_min + direct - 1 > kMaxCode)
    return FormatError(StrCat("symbols ", e.symbol_min, "..", e.symbol_min + direct - 1, " outside the code range"));
  return Status::OK();
}

Status decode_entropy_rows(uint64_t cols, const EncodedView& v, int rotation, uint64_t r0, uint64_t nr, float* out) {
  const EntropySide& e = *v.entropy;
  std::shared_ptr<const FrequencyTable> own;
  const FrequencyTable* table = v.table;
  if (!table) {
    AQ_ASSIGN_OR_RETURN(own, make_decode_table(v));
    table = own.get();
  }
  thread_local std::vector<float> steps;
  const std::vector<float> values = entropy_symbol_values(e);
  for (uint64_t r = r0; r < r0 + nr; r += e.chunk_rows) {
    const uint64_t c = r / e.chunk_rows;
    const uint64_t rows_here = std::min<uint64_t>(e.chunk_rows, r0 + nr - r);
    steps.resize(rows_here);
    load_scales(ScaleType::kF32, v.scales.data() + r * 4, rows_here, steps.data());
    const auto chunk = v.codes.subspan(e.chunk_offsets[c], e.chunk_offsets[c + 1] - e.chunk_offsets[c]);
    float* o = out + (r - r0) * cols;
    AQ_RETURN_IF_ERROR(entropy_decode_chunk(*table, e, values.data(), chunk, rows_here, cols, steps.data(), o)
                           .WithPrefix(StrCat("chunk ", c, ": ")));
    unrotate_rows(o, rows_here, cols, rotation);
  }
  return Status::OK();
}

}  // namespace

Result<std::shared_ptr<const FrequencyTable>> make_decode_table(const EncodedView& v) {
  if (!v.entropy) return FormatError("entropy-coded tensor without its entropy table");
  auto t = std::make_shared<FrequencyTable>();
  t->freq = v.entropy->frequencies;
  AQ_RETURN_IF_ERROR(finish_frequency_table(t.get()));
  return std::shared_ptr<const FrequencyTable>(std::move(t));
}

Status check_encoded(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v) {
  AQ_RETURN_IF_ERROR(validate_scheme(scheme));
  if (scheme.kind == SchemeKind::kEntropy) return check_entropy(rows, cols, v);
  if (scheme.kind == SchemeKind::kGgml && cols % static_cast<uint64_t>(ggml_traits(scheme.ggml).block) != 0)
    return FormatError(StrCat(scheme_name(scheme), " needs rows of a multiple of ", ggml_traits(scheme.ggml).block,
                              " weights; this tensor's rows hold ", cols));
  const QuantizedSize want = quantized_size(scheme, rows, cols);
  if (v.codes.size() != want.code_bytes)
    return FormatError(StrCat("codes hold ", v.codes.size(), " bytes; ", scheme_name(scheme), " of ", rows, "x", cols,
                              " needs ", want.code_bytes));
  if (v.scales.size() != want.scale_bytes)
    return FormatError(StrCat("scales hold ", v.scales.size(), " bytes; expected ", want.scale_bytes));
  if (v.zero_points.size() != want.zero_point_bytes)
    return FormatError(StrCat("zero_points hold ", v.zero_points.size(), " bytes; expected ", want.zero_point_bytes));
  return Status::OK();
}

uint64_t decode_granularity(const QuantScheme& scheme, const EncodedView& v) {
  if (scheme.kind == SchemeKind::kEntropy && v.entropy && v.entropy->chunk_rows) return v.entropy->chunk_rows;
  return 1;
}

uint64_t code_offset(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, uint64_t row) {
  if (row >= rows) return v.codes.size();
  if (scheme.kind == SchemeKind::kEntropy) return v.entropy->chunk_offsets[row / v.entropy->chunk_rows];
  if (scheme.kind == SchemeKind::kGgml) return row * ggml_row_bytes(scheme.ggml, cols);
  return row * cols * static_cast<uint64_t>(scheme.bits) / 8;
}

namespace {

// Fused unpack-and-scale for byte-aligned groups of 2-, 4- and 8-bit codes: one pass from the
// packed bytes to floats, the group's scale and offset in registers. Same arithmetic, in the
// same order, as unpack_codes + dequantize_rows (s * c + z; symmetric s * (c - m)).
// (clang does not multiversion function templates: one version there, built for the baseline.)
#if defined(__clang__)
#define AQ_TEMPLATE_CLONES
#else
#define AQ_TEMPLATE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
template <int kBits, bool kSymmetric>
AQ_TEMPLATE_CLONES
void decode_group_fast(const uint8_t* p, size_t n, float s, float z, float* o) {
  constexpr int kPerByte = 8 / kBits;
  constexpr unsigned kMask = (1u << kBits) - 1u;
  constexpr float kMid = static_cast<float>(1 << (kBits - 1));
  for (size_t k = 0; k < n / kPerByte; ++k) {
    const unsigned b = p[k];
    for (int t = 0; t < kPerByte; ++t) {
      const float c = static_cast<float>((b >> (t * kBits)) & kMask);
      o[k * kPerByte + t] = kSymmetric ? s * (c - kMid) : s * c + z;
    }
  }
}

template <int kBits>
void decode_affine_fast(const QuantScheme& scheme, uint64_t cols, const EncodedView& v, uint64_t r0, uint64_t nr,
                        float* out) {
  const size_t g = group_len(scheme, cols);
  const size_t gpr = groups_per_row(scheme, cols);
  const size_t ssize = scale_type_size(scheme.scale_type);
  const uint8_t* codes = v.codes.data() + r0 * cols * kBits / 8;
  for (uint64_t r = 0; r < nr; ++r) {
    const uint64_t row = r0 + r;
    for (size_t j = 0; j < gpr; ++j) {
      const size_t begin = j * g, n = std::min(g, static_cast<size_t>(cols) - begin);
      float s, z = 0.0f;
      load_scales(scheme.scale_type, v.scales.data() + (row * gpr + j) * ssize, 1, &s);
      if (!scheme.symmetric) load_scales(scheme.scale_type, v.zero_points.data() + (row * gpr + j) * ssize, 1, &z);
      const uint8_t* p = codes + (r * cols + begin) * kBits / 8;
      float* o = out + r * cols + begin;
      if (scheme.symmetric) decode_group_fast<kBits, true>(p, n, s, z, o);
      else decode_group_fast<kBits, false>(p, n, s, z, o);
    }
  }
}

}  // namespace

Status decode_rows(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, uint64_t r0,
                   uint64_t nr, float* out) {
  (void)rows;
  const int rotation = scheme.rotate ? rotation_block(cols) : 1;
  if (scheme.kind == SchemeKind::kEntropy) return decode_entropy_rows(cols, v, rotation, r0, nr, out);
  if (scheme.kind == SchemeKind::kGgml) {
    const uint64_t row_bytes = ggml_row_bytes(scheme.ggml, cols);
    ggml_decode(scheme.ggml, v.codes.data() + r0 * row_bytes,
                nr * cols / static_cast<uint64_t>(ggml_traits(scheme.ggml).block), out);
    return Status::OK();
  }
  // Every group starts on a byte when group and row lengths are whole numbers of bytes.
  const size_t g = group_len(scheme, cols);
  const bool aligned = (cols * scheme.bits) % 8 == 0 && (g * scheme.bits) % 8 == 0 &&
                       (scheme.bits == 2 || scheme.bits == 4 || scheme.bits == 8);
  if (aligned) {
    if (scheme.bits == 4) decode_affine_fast<4>(scheme, cols, v, r0, nr, out);
    else if (scheme.bits == 8) decode_affine_fast<8>(scheme, cols, v, r0, nr, out);
    else decode_affine_fast<2>(scheme, cols, v, r0, nr, out);
    unrotate_rows(out, nr, cols, rotation);
    return Status::OK();
  }
  const size_t gpr = groups_per_row(scheme, cols);
  const size_t ssize = scale_type_size(scheme.scale_type);
  thread_local std::vector<uint8_t> q;
  thread_local std::vector<float> s, z;
  q.resize(nr * cols);
  s.resize(nr * gpr);
  z.resize(scheme.symmetric ? 0 : nr * gpr);
  unpack_codes(v.codes.data(), r0 * cols, nr * cols, scheme.bits, q.data());
  load_scales(scheme.scale_type, v.scales.data() + r0 * gpr * ssize, nr * gpr, s.data());
  if (!scheme.symmetric) load_scales(scheme.scale_type, v.zero_points.data() + r0 * gpr * ssize, nr * gpr, z.data());
  dequantize_rows(scheme, q.data(), s.data(), z.data(), nr, cols, out);
  unrotate_rows(out, nr, cols, rotation);
  return Status::OK();
}

Status decode_tensor(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, float* out) {
  AQ_RETURN_IF_ERROR(check_encoded(scheme, rows, cols, v));
  if (rows == 0 || cols == 0) return Status::OK();
  EncodedView view = v;
  std::shared_ptr<const FrequencyTable> table;
  if (scheme.kind == SchemeKind::kEntropy && !view.table) {
    AQ_ASSIGN_OR_RETURN(table, make_decode_table(view));
    view.table = table.get();
  }
  const uint64_t unit = decode_granularity(scheme, v);
  // About 64K weights per step, in whole decoding units.
  const uint64_t block = std::max<uint64_t>(1, (1u << 16) / cols / unit) * unit;
  for (uint64_t r0 = 0; r0 < rows; r0 += block)
    AQ_RETURN_IF_ERROR(decode_rows(scheme, rows, cols, view, r0, std::min(block, rows - r0), out + r0 * cols));
  return Status::OK();
}

}  // namespace aq
