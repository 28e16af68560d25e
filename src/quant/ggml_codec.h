// Encoding and decoding of whole rows in ggml's block types (ggml_types.h).
//
// Decoding: ggml_decode walks the bytes block by block with loops the compiler vectorizes
// (built for AVX-512, AVX2 and plain x86-64, chosen at run time); ggml_decode_reference reads
// every block through the integer model (ggml_unpack_block) one weight at a time. Tests hold
// the two equal, and both equal ggml's own decoders bit for bit.
//
// Encoding (ggml_encode.cpp): per block, a joint search of the float16 scales, the integer
// sub-scales and mins and the codes that minimises the (optionally weighted) squared error of
// the decoded values, started from several points -- one of them the choice llama.cpp's
// quantizer makes -- keeping the best per block. See ggml_encode.cpp for the search.
#pragma once

#include <cstdint>

#include "quant/ggml_types.h"

namespace aq {

// Decodes `nblocks` consecutive blocks of type t from `in` into `out` (nblocks * block floats).
void ggml_decode(GgmlType t, const uint8_t* in, uint64_t nblocks, float* out);
void ggml_decode_reference(GgmlType t, const uint8_t* in, uint64_t nblocks, float* out);
// The same values rounded to bfloat16 (round to nearest even, as f32_to_bf16), written directly:
// false, writing nothing, where this CPU or type has no such path (decode, then convert).
bool ggml_decode_bf16(GgmlType t, const uint8_t* in, uint64_t nblocks, uint16_t* out);

// The decoded value of weight p of an integer block (exactly what the decoders compute).
float ggml_block_value(GgmlType t, const GgmlBlock& b, int p);
// The value weight p of block b would decode to with code index k instead of b.k[p].
float ggml_code_value(GgmlType t, const GgmlBlock& b, int p, int k);

struct GgmlEncodeOptions {
  // Per input column importance (length = the row length, all > 0), or null: plain squared
  // error. With it the search minimises sum_i importance[i] * (x_i - q_i)^2.
  const float* importance = nullptr;
  // Start points tried per block (the llama.cpp-equivalent start is always one): 1 = only that
  // start, refined; 2 = also ours.
  int starts = 2;
  // Coordinate-descent rounds after each start.
  int rounds = 2;
  GgmlWeighting weighting = GgmlWeighting::kPlain;  // ggml_types.h
};

// Encodes one row of `cols` weights (a multiple of the type's block) into
// ggml_row_bytes(t, cols) bytes at `out`. Weights must be finite.
void ggml_encode_row(GgmlType t, const float* x, uint64_t cols, uint8_t* out, const GgmlEncodeOptions& opt = {});

// The code index of weight p of block b nearest to x given the block's scales (the exact decoded
// value goes to *value).
int ggml_nearest_code(GgmlType t, const GgmlBlock& b, int p, float x, float* value);

// GPTQ on the type's grid (quant/gptq.h for the method): each block's scales are chosen by
// ggml_encode_block from the weights as updated so far when GPTQ reaches the block's first
// column, then its columns are quantized one by one to the nearest level, each column's error
// moved onto the columns not yet quantized through the factor. Blocks are contiguous runs of
// columns, so the factor must keep the natural column order (no act-order). Writes rows x
// ggml_row_bytes(t, cols) bytes to out.
struct GptqFactor;
void ggml_gptq_rows(GgmlType t, const GptqFactor& factor, const float* w, uint64_t rows, uint64_t cols,
                    const GgmlEncodeOptions& opt, uint8_t* out);

// Building blocks, exposed for tests and benchmarks. `w` are the per-weight error weights of the
// block (null: all 1). The block's squared error sum_i w_i (x_i - value_i)^2 (double).
double ggml_block_error(GgmlType t, const GgmlBlock& b, const float* x, const float* w);
// The start that follows llama.cpp's quantizer for the type (its trial grids, its error
// weights, one rounding of the sub-scales), without refinement.
void ggml_start_llama(GgmlType t, const float* x, const float* importance, GgmlBlock* b);
// The full search for one block (x: the block's weights; importance: its slice or null).
void ggml_encode_block(GgmlType t, const float* x, const float* importance, const GgmlEncodeOptions& opt,
                       GgmlBlock* b);

}  // namespace aq
