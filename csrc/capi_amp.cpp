// C ABI of gradient unscaling (csrc/cpu/amp.cpp), loaded by pyquant/amp.py.
#include <stdint.h>

#include "pyquant/dispatch.h"

#define PQ_DECLARE_AMP(ns)                                                                                  \
  namespace ns {                                                                                            \
  void unscale(int32_t, void* const*, const int64_t*, const int32_t*, float*, const float*, int32_t, int32_t); \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_AMP)

extern "C" {

// torch's _amp_foreach_non_finite_check_and_unscale_ over `count` contiguous tensors: grads[t] holds
// numels[t] elements of dtype dtypes[t] (0 float32, 1 float16, 2 bfloat16, 3 float64). Each element is
// widened to float32 (float64 stays), checked, multiplied by *inv_scale unless it is 1, rounded back
// (nearest even, no flushing). *found_inf becomes 1.0 if any element was inf or NaN (never cleared).
// threads <= 0: OpenMP's default; the bits do not depend on it. vector == 0 forces the element-by-element
// code (same bits as the vector code).
void pq_unscale_(int32_t count, void* const* grads, const int64_t* numels, const int32_t* dtypes, float* found_inf,
                 const float* inv_scale, int32_t threads, int32_t vector) {
  PQ_DISPATCH(unscale(count, grads, numels, dtypes, found_inf, inv_scale, threads, vector))
}

}  // extern "C"
