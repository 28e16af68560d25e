// calibration.parquet through read_calibration, then what the engine asks of it: every layer's
// Hessians (hessian_of, read row by row from the file; layer_hessians over one and two timestep
// groups), the activation histograms (layer_activations) and the grouping of the step bins
// (group_time_bins).
#include <cstdint>
#include <vector>

#include "fuzz_util.h"
#include "store/calibration.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  aq::fuzz::use_system_memory_pool();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aq;
  const std::string path = fuzz::write_scratch("calibration.parquet", data, size);
  auto d = read_calibration(path);
  if (!d.ok()) return 0;
  (void)d->bins_present();
  for (int groups : {1, 2}) {
    const std::vector<TimeGroup> tg = group_time_bins(*d, groups);
    for (const auto& [key, layer] : d->layers) {
      if (layer.in_features > 512) continue;  // speed: a Hessian is in_features^2 doubles
      (void)d->lookup(key.first, key.second);
      for (const auto* bins : {&layer.fit, &layer.holdout})
        for (const CalibrationBin& b : *bins)
          if (b.holds_hessian()) (void)layer.hessian_of(b);
      (void)layer.has_hessians();
      (void)layer_hessians(layer, tg);
      (void)layer_activations(layer, tg, 8);
    }
  }
  return 0;
}
