// What the CUDA kernels (csrc/cuda/*.cu) share: block reductions, the tensor of a global block index, grid sizes.
// The kernels are launch drivers around the per-element math of pyquant/blockwise.h, mirroring the CPU
// drivers in csrc/cpu/blockwise.cpp and csrc/cpu/amp.cpp so that a GPU run and a CPU run of pyquant agree bit
// for bit (docs/numerics.md, sections 2 to 4).
//
// Exact IEEE float32, by construction:
// - Build without fast math and with --fmad=false (CMakeLists.txt, .ci/compile_cuda.sh): no a*b+c is
//   contracted into a fused multiply-add; fmaf() in blockwise.h is the only fused operation, exactly where
//   the contract asks for one.
// - The float32 `/` and sqrtf() in blockwise.h are plain IEEE operations: nvcc's defaults
//   (-prec-div=true, -prec-sqrt=true, -ftz=false) compile them to div.rn.f32 / rcp.rn.f32 / sqrt.rn.f32,
//   correctly rounded, with subnormals kept. Never pass --use_fast_math, -prec-div=false, -prec-sqrt=false
//   or -ftz=true; .ci/compile_cuda.sh greps the PTX for approximate or flush-to-zero instructions.
// - Absmax reductions are max reductions (NaN ignored, +-inf counted): a maximum is exact and independent
//   of the reduction order, so the tree reductions below give the CPU's sequential result.
// No floating-point reduction crosses a block, so the results do not depend on the launch shape.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

// Inline functions in a named namespace: each kernel file uses some of them (anonymous-namespace ones it does not
// use would be warnings, and the compile check makes warnings errors).
namespace pq_cuda {
using namespace pq;

constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit; kernels stride over the rest

// NaN-ignoring max of |x| over the threads of a block, returned to every thread. Each argument is a
// thread's running absmax (already >= 0 and never NaN), so combining them with absmax_update is a plain max.
// `scratch` holds one float per warp; the call ends with every thread past a barrier, and the barrier at its
// start lets the same scratch be used by consecutive calls.
__device__ __forceinline__ float block_max(float a, float* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) a = absmax_update(a, __shfl_xor_sync(0xFFFFFFFFu, a, offset));
  const int warps = (int)(blockDim.x / kWarp);
  const int lane = (int)(threadIdx.x % kWarp), warp = (int)(threadIdx.x / kWarp);
  __syncthreads();  // earlier readers of scratch are done
  if (lane == 0) scratch[warp] = a;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < warps; ++w) r = absmax_update(r, scratch[w]);
  return r;
}

// The tensor of a global block: first_block[i] is the global index of tensor i's first block (prefix sums of the
// tensors' block counts); the tensor of global block gb is the last i with first_block[i] <= gb (empty tensors
// are skipped).
__device__ __forceinline__ int32_t tensor_of_block(const int64_t* __restrict__ first_block, int32_t count, int64_t gb) {
  int32_t lo = 0, hi = count;  // first index with first_block[index] > gb
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (first_block[mid] <= gb)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo - 1;
}

inline unsigned grid_for(int64_t blocks) { return (unsigned)(blocks < kMaxGrid ? blocks : kMaxGrid); }

// ---- the multi-tensor optimizer kernels (adam.cu, one_state.cu): one CUDA block per 256-element state block ----
constexpr int kOptimizerThreads = kOptimizerBlock;  // one thread per element of a state block
static_assert(kOptimizerThreads % kWarp == 0 && kOptimizerThreads <= 1024, "bad optimizer block shape");

// This thread's place in global block gb of a group: its tensor, the block's index in that tensor, its element
// and whether that element exists (the last block of a tensor may be partial). Block-uniform but for i and live.
struct GroupElement {
  int32_t tensor;
  int64_t block, i;
  bool live;
};

template <class Tensor>
__device__ __forceinline__ GroupElement group_element(const Tensor* __restrict__ tensors,
                                                      const int64_t* __restrict__ first_block, int32_t count,
                                                      int64_t gb) {
  const int32_t ti = tensor_of_block(first_block, count, gb);
  const int64_t b = gb - first_block[ti];
  const int64_t start = b * kOptimizerBlock;
  const int64_t numel = tensors[ti].numel;
  const int64_t len = kOptimizerBlock < numel - start ? (int64_t)kOptimizerBlock : numel - start;
  const int tid = (int)threadIdx.x;
  return GroupElement{ti, b, start + tid, tid < len};
}

// The 8-bit code of x in a block whose new absmax is `absmax` (an all-zero block is all code 0).
__device__ __forceinline__ uint8_t requantize(float x, float absmax, const uint8_t* __restrict__ table) {
  return absmax == 0.0f ? (uint8_t)0 : __ldg(table + grid_bin(x, block_inverse(absmax)));
}

// Adds the block's count of non-finite gradient elements (`bad`: 0 or 1 per thread) to *bad_count. Every thread
// of the block must reach it (it is a barrier).
__device__ __forceinline__ void count_bad_elements(int bad, int64_t* __restrict__ bad_count) {
  const int block_bad = __syncthreads_count(bad);
  if (threadIdx.x == 0 && block_bad > 0) atomicAdd((unsigned long long*)bad_count, (unsigned long long)block_bad);
}

// What a multi-tensor optimizer entry point returns without launching: cudaErrorInvalidValue for a negative count
// or block total or an unknown non-finite policy, cudaSuccess for an empty group; -1 when the kernel must run.
inline int32_t group_launch_precheck(int32_t count, int64_t total_blocks, int32_t nonfinite) {
  if (count < 0 || total_blocks < 0 || (nonfinite != kSkipElement && nonfinite != kPropagate))
    return (int32_t)cudaErrorInvalidValue;
  if (count == 0 || total_blocks == 0) return (int32_t)cudaSuccess;
  return -1;
}

}  // namespace pq_cuda
