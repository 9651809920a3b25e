// C ABI of the fused low-rank convolution (csrc/cpu/lowrank_conv_forward.cpp, csrc/cpu/lowrank_conv_weight_grad.cpp);
// bound in pyquant/backends/capi.py.
#include "pyquant/capi.h"

#include <stdint.h>

#include "pyquant/dispatch.h"

#define PQ_DECLARE_LOWRANK(ns)                                                                               \
  namespace ns {                                                                                             \
  int32_t lowrank_conv2d_forward(const void*, const void*, const void*, const void*, void*, void*, int32_t, \
                                 const int64_t*, int32_t, float*, int32_t);                                  \
  int64_t lowrank_packed_floats(int32_t, const int64_t*);                                                    \
  int32_t lowrank_conv2d_wgrad(const void*, const void*, float*, int32_t, const int64_t*, int32_t);          \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_LOWRANK)

extern "C" {

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
// Every tensor has the dtype `dtype` (PQ_DTYPE_FLOAT32, _FLOAT16 or _BFLOAT16); accumulation is float32.
// dims: N, C, H, W, R, O, kh, kw, stride h, w, padding h, w, dilation h, w, Ho, Wo.
// w2 NULL: a single convolution y = conv(x, W1) into R channels (dims O = R, bias and t NULL): the input
// gradient of the backward pass, a stride-1 convolution with the flipped, transposed W1.
// threads <= 0: OpenMP's default. Returns 0; 1 when memory ran out; 2 for invalid arguments.
// packed (NULL: none): a float32 buffer of pq_lowrank_packed_floats(dtype, dims) floats, owned by the caller,
// for W1, W2 and bias in the kernel's layout. packed_valid 0: pack the weights into it (they changed since it
// was last filled, or it is new); 1: it holds these weights, packed by an earlier call with the same dtype and
// dims (repacked anyway when its layout does not match, e.g. after pq_lowrank_set_bf16_dot). Packing costs
// 3-10% of a call of the benchmark layers, on one thread before the others start.
int32_t pq_lowrank_conv2d(const void* x, const void* w1, const void* w2, const void* bias, void* y, void* t,
                          int32_t dtype, const int64_t* dims, int32_t threads, float* packed, int32_t packed_valid) {
  PQ_DISPATCH(lowrank_conv2d_forward(x, w1, w2, bias, y, t, dtype, dims, threads, packed, packed_valid))
}

// The size of pq_lowrank_conv2d's `packed` buffer for these dims and dtype, in floats (-1: invalid dims).
int64_t pq_lowrank_packed_floats(int32_t dtype, const int64_t* dims) {
  PQ_DISPATCH(lowrank_packed_floats(dtype, dims))
}

// The weight gradient of y = conv(x, W) (W [R, C, kh, kw], no bias) for y's gradient g [N, R, Ho, Wo]:
// gw [R, C, kh, kw] in float32, whatever `dtype` (of x and g; accumulation float32, one fixed order of sums per
// element whatever the thread count). dims as pq_lowrank_conv2d's, with O = R. Returns as pq_lowrank_conv2d.
int32_t pq_lowrank_conv2d_wgrad(const void* x, const void* g, float* gw, int32_t dtype, const int64_t* dims,
                                int32_t threads) {
  PQ_DISPATCH(lowrank_conv2d_wgrad(x, g, gw, dtype, dims, threads))
}

}  // extern "C"
