// Run-time choice of the instruction set for the CPU kernels.
//
// Each file in csrc/cpu/ is compiled once per instruction set and puts its kernels in namespace pq_scalar,
// pq_avx2, pq_avx512 or pq_avx512vbmi (csrc/cpu/isa.h). The C ABI files (csrc/capi*.cpp) declare the kernels
// for every ISA with PQ_FOR_EACH_ISA and call the chosen one (pq_isa(), enum pq_isa_code) with PQ_DISPATCH.
#pragma once
#include <stdint.h>

#include "pyquant/capi.h"

#define PQ_FOR_EACH_ISA(X) X(pq_scalar) X(pq_avx2) X(pq_avx512) X(pq_avx512vbmi)

#define PQ_DISPATCH(call)                                \
  switch (pq_isa()) {                                    \
    case PQ_ISA_AVX512VBMI: return pq_avx512vbmi::call;  \
    case PQ_ISA_AVX512: return pq_avx512::call;          \
    case PQ_ISA_AVX2: return pq_avx2::call;              \
    default: return pq_scalar::call;                     \
  }

// PQ_DISPATCH for a call whose result is not returned (the entry point returns its own status).
#define PQ_DISPATCH_VOID(call)                           \
  switch (pq_isa()) {                                    \
    case PQ_ISA_AVX512VBMI: pq_avx512vbmi::call; break;  \
    case PQ_ISA_AVX512: pq_avx512::call; break;          \
    case PQ_ISA_AVX2: pq_avx2::call; break;              \
    default: pq_scalar::call; break;                     \
  }
