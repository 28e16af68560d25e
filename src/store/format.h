// The on-disk quantized format (docs/format.md is the specification; this header is its mirror
// in code). A quantized model is a directory:
//   manifest.json                  format version, source, config, modality, summary
//   <component>/weights.parquet    one row (and one row group) per tensor, or per piece of a big one
//   ...                            the source model's other files, copied unchanged
// Row groups are written one per row so writing streams and a reader can fetch one tensor (or
// one piece of it) without touching the rest.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "io/dtype.h"
#include "quant/scheme.h"
#include "quant/tensor_codec.h"

namespace aq {

// Version 2 added the optional input_scale column (channel equalization); version 3 the ggml
// block types as scheme kinds (q8_0 ... iq4_nl); version 4 big tensors stored in pieces (the
// piece, row_start and row_count columns). Readers read 1 to 4.
inline constexpr int kFormatVersion = 4;
inline constexpr int kMinFormatVersion = 1;
inline constexpr const char* kFormatName = "arrowquant";
inline constexpr const char* kManifestFile = "manifest.json";
inline constexpr const char* kWeightsFile = "weights.parquet";
// Activation quantization parameters per layer per timestep group (when activation_bits is set).
inline constexpr const char* kActivationsFile = "activations.parquet";

// Where a reader finds one piece of a stored tensor: its row group and the rows of the 2-D view
// it holds.
struct StoredPiece {
  int row_group = 0;
  uint64_t row_start = 0, row_count = 0;
};

// A stored tensor: what the writer takes and the reader gives back (without data).
struct StoredTensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::kF32;  // the source dtype
  bool quantized = false;     // false: `codes` holds the source bytes unchanged ("raw")
  QuantScheme scheme;         // meaningful when quantized
  std::string reason;         // why this tensor got this treatment, in words
  std::vector<int> rejected_bits;  // bit widths tried first and rejected by the accuracy fallback
  // Weight-space quality of the stored tensor (quantized tensors only).
  double cosine = 1.0;
  double relative_error = 0.0;
  double sqnr_db = 300.0;
  double max_abs_error = 0.0;
  // Channel equalization (format version 2): per input channel, the factor the layer's input is
  // multiplied by before the stored weight; the stored codes decode to W diag(1 / input_scale)
  // (column j to channel j / (cols / input_scale.size())). Empty: none.
  std::vector<float> input_scale;

  uint64_t rows() const { return shape.empty() ? 1 : static_cast<uint64_t>(shape[0]); }
  uint64_t numel() const;
  uint64_t cols() const { return rows() == 0 ? 0 : numel() / rows(); }
  uint64_t source_bytes() const { return numel() * dtype_size(dtype); }
  // Everything stored for the tensor: codes, scales, zero points and entropy tables (quantized),
  // or the source bytes (raw).
  uint64_t stored = 0;
  uint64_t stored_bytes() const { return stored; }
  // Reader: the tensor's pieces in row order (one for a tensor stored whole, and for every
  // tensor of a version 1-3 file). Ignored by the writer.
  std::vector<StoredPiece> pieces;
};

// The data of one row: views of the encoded tensor (raw tensors: codes = the source bytes).
using TensorPayload = EncodedView;

// One piece to write: rows [row_start, row_start + row_count) of the 2-D view. Its payload is the
// byte ranges of the tensor's codes, scales and zero points that hold those rows, so the pieces'
// values end to end are the values of the tensor stored whole. The entropy tables (with chunk
// offsets into the whole codes) and input_scale travel with piece 0 only. `stored` is what the
// row stores: its data, plus on piece 0 the tensor's tables, so the pieces' sum is the tensor's.
struct PieceSpan {
  uint32_t index = 0;
  uint64_t row_start = 0, row_count = 0;
  TensorPayload payload;
  uint64_t stored = 0;
};

// Cuts a tensor into pieces of whole units of rows (`unit_rows`: the engine's row blocks; for
// entropy-coded tensors their chunks), each piece as many units as fit in `max_bytes` of data
// and at least one. A tensor within max_bytes is one piece. The cut depends only on the sizes,
// so the same tensor is always stored the same way.
Result<std::vector<PieceSpan>> split_pieces(const StoredTensorInfo& info, const TensorPayload& payload,
                                            uint64_t unit_rows, uint64_t max_bytes);

// The entropy tables of rows [r0, r1) (whole chunks) of an entropy-coded tensor, with chunk
// offsets into those rows' own codes: how a reader decodes one piece without the others.
Result<EntropySide> entropy_rows(const EntropySide& e, uint64_t rows, uint64_t r0, uint64_t r1);

// Turns `rows` decoded rows of the stored weight into the effective weight: column j times
// input_scale[j / (cols / input_scale.size())]. Nothing to do without an input_scale.
void apply_input_scale(const StoredTensorInfo& info, float* rows_out, uint64_t rows);

}  // namespace aq
