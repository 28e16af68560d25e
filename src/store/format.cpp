#include "store/format.h"

#include "io/safetensors.h"

namespace aq {

uint64_t StoredTensorInfo::numel() const { return shape_numel(shape).value_or(0); }

void apply_input_scale(const StoredTensorInfo& info, float* out, uint64_t rows) {
  if (info.input_scale.empty()) return;
  const uint64_t cols = info.cols(), k = cols / info.input_scale.size();
  for (uint64_t r = 0; r < rows; ++r) {
    float* row = out + r * cols;
    for (uint64_t j = 0; j < cols; ++j) row[j] *= info.input_scale[j / k];
  }
}

namespace {

// Byte offsets of the row boundary r in the codes, scales and zero points.
struct RowOffsets {
  uint64_t codes = 0, scales = 0, zero_points = 0;
};

}  // namespace

Result<std::vector<PieceSpan>> split_pieces(const StoredTensorInfo& info, const TensorPayload& p, uint64_t unit_rows,
                                            uint64_t max_bytes) {
  const uint64_t rows = info.rows(), cols = info.cols();
  const uint64_t data = p.codes.size() + p.scales.size() + p.zero_points.size();
  auto whole = [&]() -> std::vector<PieceSpan> {
    PieceSpan one;
    one.row_count = rows;
    one.payload = p;
    one.stored = info.stored_bytes();
    return {one};
  };
  if (data <= max_bytes || rows < 2 || cols == 0) return whole();
  const bool entropy = info.quantized && info.scheme.kind == SchemeKind::kEntropy;
  const bool affine = info.quantized && info.scheme.kind == SchemeKind::kAffine;
  uint64_t unit = std::max<uint64_t>(1, unit_rows);
  if (entropy) {
    if (!p.entropy || p.entropy->chunk_rows == 0) return Internal(StrCat(info.name, ": entropy tables missing"));
    unit = p.entropy->chunk_rows;
  }
  // Affine codes are one bit stream: a piece must start on a byte.
  if (affine)
    while ((unit * cols * static_cast<uint64_t>(info.scheme.bits)) % 8 != 0) unit *= 2;
  uint64_t row_bytes = 0, group_bytes = 0;
  if (!info.quantized || info.scheme.kind == SchemeKind::kGgml) {
    if (p.codes.size() % rows != 0)
      return Internal(StrCat(info.name, ": ", p.codes.size(), " bytes do not split into ", rows, " rows"));
    row_bytes = p.codes.size() / rows;
  } else if (affine) {
    group_bytes = groups_per_row(info.scheme, cols) * scale_type_size(info.scheme.scale_type);
  }
  auto at = [&](uint64_t r) {
    RowOffsets o;
    if (r >= rows) return RowOffsets{p.codes.size(), p.scales.size(), p.zero_points.size()};
    o.codes = row_bytes ? r * row_bytes : code_offset(info.scheme, rows, cols, p, r);
    if (entropy) {
      o.scales = r * 4;
    } else if (affine) {
      o.scales = r * group_bytes;
      o.zero_points = p.zero_points.empty() ? 0 : r * group_bytes;
    }
    return o;
  };
  auto span_of = [](std::span<const uint8_t> s, uint64_t a, uint64_t b) { return s.empty() ? s : s.subspan(a, b - a); };
  std::vector<PieceSpan> out;
  uint64_t data_after_first = 0;
  for (uint64_t r0 = 0; r0 < rows;) {
    const RowOffsets a = at(r0);
    uint64_t r1 = std::min(rows, r0 + unit);
    for (;;) {
      const uint64_t next = std::min(rows, r1 + unit);
      if (next == r1) break;
      const RowOffsets b = at(next);
      if ((b.codes - a.codes) + (b.scales - a.scales) + (b.zero_points - a.zero_points) > max_bytes) break;
      r1 = next;
    }
    const RowOffsets b = at(r1);
    PieceSpan piece;
    piece.index = static_cast<uint32_t>(out.size());
    piece.row_start = r0;
    piece.row_count = r1 - r0;
    piece.payload.codes = span_of(p.codes, a.codes, b.codes);
    piece.payload.scales = span_of(p.scales, a.scales, b.scales);
    piece.payload.zero_points = span_of(p.zero_points, a.zero_points, b.zero_points);
    piece.stored = (b.codes - a.codes) + (b.scales - a.scales) + (b.zero_points - a.zero_points);
    if (piece.index == 0) piece.payload.entropy = p.entropy;
    else data_after_first += piece.stored;
    out.push_back(piece);
    r0 = r1;
  }
  if (out.size() == 1) return whole();
  out[0].stored = info.stored_bytes() - data_after_first;
  return out;
}

Result<EntropySide> entropy_rows(const EntropySide& e, uint64_t rows, uint64_t r0, uint64_t r1) {
  if (e.chunk_rows == 0 || r0 % e.chunk_rows != 0 || (r1 % e.chunk_rows != 0 && r1 != rows) || r1 < r0 || r1 > rows)
    return FormatError(StrCat("rows ", r0, "..", r1, " are not whole chunks of ", e.chunk_rows, " rows"));
  const uint64_t c0 = r0 / e.chunk_rows, c1 = (r1 + e.chunk_rows - 1) / e.chunk_rows;
  if (c1 >= e.chunk_offsets.size())
    return FormatError(StrCat(e.chunk_offsets.size(), " chunk offsets for rows up to ", r1));
  EntropySide out = e;
  out.chunk_offsets.assign(e.chunk_offsets.begin() + static_cast<std::ptrdiff_t>(c0),
                           e.chunk_offsets.begin() + static_cast<std::ptrdiff_t>(c1) + 1);
  for (auto& o : out.chunk_offsets) o -= e.chunk_offsets[c0];
  return out;
}

}  // namespace aq
