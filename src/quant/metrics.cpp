#include "quant/metrics.h"

#include <algorithm>
#include <cmath>

namespace aq {

// clang (14) emits a multiversioned function only under its resolver's name, which callers in
// other files (declared without the attribute) do not reference: one version there.
#if !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void ErrorStats::add(const float* w, const float* deq, size_t n) {
  // Four-lane partial sums in double: vectorizable, and the order is fixed by n alone.
  double ww[4] = {}, dd[4] = {}, wd[4] = {}, ee[4] = {};
  double mx = max_abs_err;
  size_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) {
      const double a = w[i + k], b = deq[i + k], e = a - b;
      ww[k] += a * a, dd[k] += b * b, wd[k] += a * b, ee[k] += e * e;
      mx = std::max(mx, std::fabs(e));
    }
  for (; i < n; ++i) {
    const double a = w[i], b = deq[i], e = a - b;
    ww[0] += a * a, dd[0] += b * b, wd[0] += a * b, ee[0] += e * e;
    mx = std::max(mx, std::fabs(e));
  }
  sum_ww += (ww[0] + ww[1]) + (ww[2] + ww[3]);
  sum_dd += (dd[0] + dd[1]) + (dd[2] + dd[3]);
  sum_wd += (wd[0] + wd[1]) + (wd[2] + wd[3]);
  sum_ee += (ee[0] + ee[1]) + (ee[2] + ee[3]);
  max_abs_err = mx;
  count += n;
}

void ErrorStats::merge(const ErrorStats& o) {
  sum_ww += o.sum_ww;
  sum_dd += o.sum_dd;
  sum_wd += o.sum_wd;
  sum_ee += o.sum_ee;
  max_abs_err = std::max(max_abs_err, o.max_abs_err);
  count += o.count;
}

double ErrorStats::cosine() const {
  if (sum_ww == 0.0 && sum_dd == 0.0) return 1.0;
  if (sum_ww == 0.0 || sum_dd == 0.0) return 0.0;
  return std::clamp(sum_wd / (std::sqrt(sum_ww) * std::sqrt(sum_dd)), -1.0, 1.0);
}

double ErrorStats::relative_error() const {
  if (sum_ww == 0.0) return sum_ee == 0.0 ? 0.0 : INFINITY;
  return std::sqrt(sum_ee / sum_ww);
}

double ErrorStats::sqnr_db() const {
  if (sum_ee == 0.0) return 300.0;
  if (sum_ww == 0.0) return -300.0;
  return std::min(300.0, 10.0 * std::log10(sum_ww / sum_ee));
}

}  // namespace aq
