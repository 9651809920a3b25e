// The C ABI of pyquant's compiled libraries: raw pointers, sizes and scalars, nothing else.
#pragma once
#include <stdint.h>

#include "pyquant/blockwise.h"

extern "C" {

// One tensor of a multi-tensor Adam step. state_bits 8: state1/state2 are uint8 codes with float32
// absmax per block of 256; state_bits 32: state1/state2 are float32 and absmax1/absmax2 are unused.
struct pq_adam_tensor {
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

}  // extern "C"
