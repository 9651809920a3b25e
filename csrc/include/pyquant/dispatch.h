// Run-time choice of the instruction set for the CPU kernels.
//
// Each file in csrc/cpu/ is compiled once per instruction set (CMakeLists.txt) with PQ_ISA set to
// scalar, avx2 or avx512, and puts its kernels in namespace PQ_NS (pq_scalar, pq_avx2, pq_avx512).
// The C ABI files (csrc/capi*.cpp) declare the kernels for every ISA with PQ_FOR_EACH_ISA and call the
// chosen one with PQ_DISPATCH.
#pragma once
#include <stdint.h>

#define PQ_CAT2(a, b) a##b
#define PQ_CAT(a, b) PQ_CAT2(a, b)
#ifdef PQ_ISA
#define PQ_NS PQ_CAT(pq_, PQ_ISA)
#endif

#define PQ_FOR_EACH_ISA(X) X(pq_scalar) X(pq_avx2) X(pq_avx512)

extern "C" int32_t pq_isa(void);  // 0 scalar, 1 avx2, 2 avx512 (capi.cpp)

#define PQ_DISPATCH(call)                 \
  switch (pq_isa()) {                     \
    case 2: return pq_avx512::call;       \
    case 1: return pq_avx2::call;         \
    default: return pq_scalar::call;      \
  }

// PQ_DISPATCH for a call whose result is not returned (the entry point returns its own status).
#define PQ_DISPATCH_VOID(call)            \
  switch (pq_isa()) {                     \
    case 2: pq_avx512::call; break;       \
    case 1: pq_avx2::call; break;         \
    default: pq_scalar::call; break;      \
  }
