// Decoding a stored tensor straight into a caller's buffer in the dtype a runtime computes in
// (float32, float16 or bfloat16), row blocks spread over a thread pool. This is what the PyTorch
// runtime (arrow_quant_v2.runtime) calls before every dense op of a layer whose weights stay
// packed: the values are those of decode_rows (the loader's and the engine's decoder), rounded
// to the output type (round to nearest even), so they never depend on the number of threads.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "quant/tensor_codec.h"

namespace aq {

class ThreadPool;

enum class OutType { kF32, kF16, kBF16 };

// Decodes all rows x cols values into out (row-major, of type t). The view must have passed
// check_encoded (and, for entropy-coded tensors, carry its decoding table). tasks > 1 splits the
// rows into that many ranges (whole decoding units), one run on the calling thread and the rest
// on pool; pool may be null when tasks <= 1.
Status decode_into(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, OutType t, void* out,
                   ThreadPool* pool, int tasks);

// Rows [r0, r0 + nr) into out (nr x cols values of type t), on this thread: an embedding's
// looked-up rows. r0 and nr in whole decoding units (decode_granularity), else InvalidConfig.
Status decode_rows_into(const QuantScheme& scheme, uint64_t rows, uint64_t cols, const EncodedView& v, OutType t,
                        uint64_t r0, uint64_t nr, void* out);

}  // namespace aq
