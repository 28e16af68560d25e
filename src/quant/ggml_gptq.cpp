// GPTQ on ggml's block grids (ggml_codec.h). Written from GPTQ's algorithm (quant/gptq.h) with
// the type's blocks as its groups: a block's scales are fixed from the weights as updated when
// the block's first column comes up, its columns then go to their nearest level one at a time,
// and each column's error w - q, divided by the factor's diagonal, is subtracted from the later
// columns of the block at once and from the columns after the block in one batch when the block
// is done (lazy batches).
#include <algorithm>
#include <cmath>
#include <vector>

#include "quant/ggml_codec.h"
#include "quant/gptq.h"

namespace aq {

int ggml_nearest_code(GgmlType t, const GgmlBlock& b, int p, float x, float* value) {
  const GgmlTraits& g = ggml_traits(t);
  int best = 0;
  float best_v = 0, best_d = INFINITY;
  auto consider = [&](int k) {
    if (k < 0 || k >= g.levels) return;
    const float v = ggml_code_value(t, b, p, k);
    const float d = std::fabs(v - x);
    if (d < best_d) {
      best_d = d;
      best = k;
      best_v = v;
    }
  };
  const bool table = t == GgmlType::kIQ4_NL || t == GgmlType::kIQ4_XS;
  if (table) {
    for (int k = 0; k < g.levels; ++k) consider(k);
  } else {
    // the level index the affine formula rounds to, and its neighbours (float rounding)
    const float v0 = ggml_code_value(t, b, p, 0);
    const float step = ggml_code_value(t, b, p, 1) - v0;
    const int k0 = step != 0 ? static_cast<int>(std::lround((x - v0) / step)) : 0;
    const int kc = std::clamp(k0, 0, g.levels - 1);
    consider(kc - 1);
    consider(kc);
    consider(kc + 1);
  }
  *value = best_v;
  return best;
}

void ggml_gptq_rows(GgmlType t, const GptqFactor& f, const float* w, uint64_t rows, uint64_t cols,
                    const GgmlEncodeOptions& opt, uint8_t* out) {
  const GgmlTraits& g = ggml_traits(t);
  const uint64_t B = static_cast<uint64_t>(g.block);
  const uint64_t row_bytes = ggml_row_bytes(t, cols);
  std::vector<float> W(w, w + rows * cols);
  std::vector<float> E(rows * B);
  std::vector<GgmlBlock> blk(rows);
  // A block-diagonal factor (its blocks a multiple of B: gptq_groups_fit) moves errors within
  // its block only. Natural order (no act-order on ggml grids): position k is column k.
  const HessianLayout& lay = f.layout;
  for (uint64_t c0 = 0; c0 < cols; c0 += B) {
    const size_t hb = c0 / lay.block_cols();
    const uint64_t first = lay.begin(hb), end = first + lay.size(hb), n = lay.size(hb);
    const float* U = f.u.data() + lay.offset(hb);  // U(i, j) at U[(i - first) * n + (j - first)]
    for (uint64_t r = 0; r < rows; ++r)
      ggml_encode_block(t, W.data() + r * cols + c0, opt.importance ? opt.importance + c0 : nullptr, opt, &blk[r]);
    for (uint64_t c = c0; c < c0 + B; ++c) {
      const float* uc = U + (c - first) * n;  // uc[j - first] = U(c, j)
      const float ucc = uc[c - first];
      for (uint64_t r = 0; r < rows; ++r) {
        float* wr = W.data() + r * cols;
        float v;
        blk[r].k[c - c0] = static_cast<uint8_t>(ggml_nearest_code(t, blk[r], static_cast<int>(c - c0), wr[c], &v));
        const float e = (wr[c] - v) / ucc;
        E[r * B + (c - c0)] = e;
        for (uint64_t c2 = c + 1; c2 < c0 + B; ++c2) wr[c2] -= e * uc[c2 - first];
      }
    }
    // the block's errors onto every later column of the Hessian block
    for (uint64_t r = 0; r < rows; ++r) {
      float* wr = W.data() + r * cols;
      for (uint64_t k = 0; k < B; ++k) {
        const float e = E[r * B + k];
        if (e == 0) continue;
        const float* uk = U + (c0 + k - first) * n;
        for (uint64_t c2 = c0 + B; c2 < end; ++c2) wr[c2] -= e * uk[c2 - first];
      }
    }
    for (uint64_t r = 0; r < rows; ++r)
      ggml_pack_block(t, blk[r], out + r * row_bytes + c0 / B * static_cast<uint64_t>(g.bytes));
  }
}

}  // namespace aq
