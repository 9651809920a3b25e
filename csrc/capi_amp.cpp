// C ABI of gradient unscaling (csrc/cpu/amp.cpp), bound in pyquant/backends/capi.py.
#include "pyquant/capi.h"

#include <stdint.h>

#include "pyquant/dispatch.h"

#define PQ_DECLARE_AMP(ns)                                                                                  \
  namespace ns {                                                                                            \
  void unscale(int32_t, void* const*, const int64_t*, const int32_t*, float*, const float*, int32_t, int32_t); \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_AMP)

extern "C" {

// torch's _amp_foreach_non_finite_check_and_unscale_ over `count` contiguous tensors: grads[t] holds
// numels[t] elements of dtype dtypes[t] (enum pq_dtype: float32, float16, bfloat16 or float64). Each element
// is widened to float32 (float64 stays), checked, multiplied by *inv_scale unless it is 1, rounded back
// (nearest even, no flushing). *found_inf becomes 1.0 if any element was inf or NaN (never cleared).
// threads <= 0: OpenMP's default; the bits do not depend on it. vector == 0 forces the element-by-element
// code (same bits as the vector code).
// Returns 0, or PQ_INVALID_ARGUMENT (doing nothing) for an invalid argument: a negative count or size, an unknown dtype code, a
// missing pointer. The element counts themselves cannot be checked here: Python passes each tensor's own.
int32_t pq_unscale_(int32_t count, void* const* grads, const int64_t* numels, const int32_t* dtypes, float* found_inf,
                    const float* inv_scale, int32_t threads, int32_t vector) {
  if (count < 0) return PQ_INVALID_ARGUMENT;
  if (count == 0) return 0;
  if (!grads || !numels || !dtypes || !found_inf || !inv_scale) return PQ_INVALID_ARGUMENT;
  for (int32_t t = 0; t < count; ++t)
    if (numels[t] < 0 || dtypes[t] < PQ_DTYPE_FLOAT32 || dtypes[t] > PQ_DTYPE_FLOAT64 ||
        (numels[t] > 0 && !grads[t]))
      return PQ_INVALID_ARGUMENT;
  PQ_DISPATCH_VOID(unscale(count, grads, numels, dtypes, found_inf, inv_scale, threads, vector))
  return 0;
}

}  // extern "C"
