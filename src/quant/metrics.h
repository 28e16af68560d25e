// Error statistics between a weight tensor and its reconstruction. One small module that every
// report and test reads from. Sums are kept in double and merged in a fixed order (row-block
// order), so the figures are the same for any thread count.
#pragma once

#include <cstddef>

namespace aq {

struct ErrorStats {
  double sum_ww = 0;   // sum of w^2
  double sum_dd = 0;   // sum of deq^2
  double sum_wd = 0;   // sum of w*deq
  double sum_ee = 0;   // sum of (w - deq)^2
  double max_abs_err = 0;
  size_t count = 0;

  void add(const float* w, const float* deq, size_t n);
  void merge(const ErrorStats& other);

  // Cosine similarity of the flattened tensors; 1 when both are all zeros.
  double cosine() const;
  // ||w - deq|| / ||w||; 0 when both are zeros.
  double relative_error() const;
  // 10 log10(||w||^2 / ||w - deq||^2), capped at 300 dB for exact reconstructions.
  double sqnr_db() const;
};

}  // namespace aq
