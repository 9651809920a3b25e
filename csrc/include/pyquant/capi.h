// The C ABI of pyquant's compiled libraries: raw pointers, sizes and scalars, nothing else.
#pragma once
#include <stdint.h>

#include "pyquant/blockwise.h"

// Bumped whenever a struct or a signature below (or pq::AdamConstants) changes: Python refuses a library
// built from other sources rather than passing it descriptors it would misread.
#define PQ_ABI_VERSION 4

// What the validating entry points return when an argument is invalid (a negative size, a block size <= 0,
// an unknown dtype code, a missing pointer, a block count that does not fit in int64): they do nothing then.
// They cannot see how large the caller's buffers are; Python checks the tensors against the sizes first.
#define PQ_INVALID_ARGUMENT 2

extern "C" {

// One tensor of a multi-tensor Adam step. state_bits 8: state1/state2 are uint8 codes with float32
// absmax per block of 256; state_bits 32: state1/state2 are float32 and absmax1/absmax2 are unused.
struct pq_adam_tensor {  // every pointer covers `numel` elements (absmax: ceil(numel / 256))
  void* param;
  const void* grad;
  void* state1;
  void* state2;
  float* absmax1;
  float* absmax2;
  int64_t numel;
  int32_t param_dtype;  // pq::DType
  int32_t grad_dtype;   // pq::DType
  int32_t state_bits;   // 8 or 32
  int32_t reserved;
  pq::AdamConstants k;  // per tensor: the step count (hence c1, c2) can differ inside a group
};

// The CPU library's square root of a block of second moments: torch's CPU sqrt, which is not always IEEE
// sqrtf (torch 2.14.1 computes it with MKL's vsSqrt, up to 1 ulp away). NULL means IEEE sqrtf. The
// signature is MKL's Fortran-style vsSqrt(n, in, out); pyquant._native installs it after checking that it
// reproduces torch.sqrt bit for bit.
typedef void (*pq_vsqrt_fn)(const int32_t* n, const float* in, float* out);
extern pq_vsqrt_fn pq_cpu_sqrt;

}  // extern "C"
