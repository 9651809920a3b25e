// C ABI of the fused low-rank convolution (csrc/cpu/lowrank_conv.cpp); pyquant/ops/lowrank_conv.py loads it.
#include <stdint.h>

#include "pyquant/dispatch.h"

#define PQ_DECLARE_LOWRANK(ns)                                                                               \
  namespace ns {                                                                                             \
  int32_t lowrank_conv2d_forward(const void*, const void*, const void*, const void*, void*, void*, int32_t, \
                                 const int64_t*, int32_t);                                                   \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_LOWRANK)

extern "C" {

// The version of this ABI: pyquant/ops/lowrank_conv.py refuses a library whose version differs (a stale
// build), and runs the reference implementation instead. Bump on any change of the functions below.
int32_t pq_lowrank_abi(void) { return 2; }

// 1: bfloat16 convolutions use the AVX512_BF16 pair kernel where the CPU has it; 0: the float32 path.
int32_t pq_lowrank_bf16_dot = 1;

// Returns the previous setting (tests and benchmarks compare both paths).
int32_t pq_lowrank_set_bf16_dot(int32_t on) {
  const int32_t previous = pq_lowrank_bf16_dot;
  pq_lowrank_bf16_dot = on ? 1 : 0;
  return previous;
}

// y = W2 . conv(x, W1) + bias for contiguous NCHW x [N, C, H, W], W1 [R, C, kh, kw], W2 [O, R], bias [O]
// (NULL: none), y [N, O, Ho, Wo]; t (NULL: not wanted) receives the intermediate [N, R, Ho, Wo].
// Every tensor has the dtype `dtype` (0 float32, 1 float16, 2 bfloat16); accumulation is float32.
// dims: N, C, H, W, R, O, kh, kw, stride h, w, padding h, w, dilation h, w, Ho, Wo.
// w2 NULL: a single convolution y = conv(x, W1) into R channels (dims O = R, bias and t NULL): the input
// gradient of the backward pass, a stride-1 convolution with the flipped, transposed W1.
// threads <= 0: OpenMP's default. Returns 0; 1 when memory ran out; 2 for invalid arguments.
int32_t pq_lowrank_conv2d(const void* x, const void* w1, const void* w2, const void* bias, void* y, void* t,
                          int32_t dtype, const int64_t* dims, int32_t threads) {
  PQ_DISPATCH(lowrank_conv2d_forward(x, w1, w2, bias, y, t, dtype, dims, threads))
}

}  // extern "C"
