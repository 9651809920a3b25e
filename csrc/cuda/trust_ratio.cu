// CUDA kernels of the norm passes of LAMB's and LARS' trust ratios (docs/numerics.md, "LAMB and LARS"), laid out as
// adam.cu (device.cuh: the numerics): one CUDA block of 256 threads per 256-element state block, each thread one
// element, per element blockwise.h's adam_moments and lamb_direction (LAMB) or decayed_grad (LARS). Each block writes
// its sums of p^2 and of the direction's squares, each square in double (exact) and the block summed by halving
// (x[i] += x[i + h], h = 128, ..., 1: blockwise.h halving_sum's order, one level per barrier); the host sums each
// tensor's block sums in the same fixed order (pyquant/backends/cuda/optimizer.py). Nothing else is written.
#include "device.cuh"

namespace {
using namespace pq_cuda;

// Block sums of this block's (p, d) pairs into block_sums[2 gb], [2 gb + 1]. Every thread of the block calls it.
__device__ __forceinline__ void store_block_sums(float p, float d, double* __restrict__ sp, double* __restrict__ sd,
                                                 double* __restrict__ block_sums, int64_t gb) {
  const int tid = (int)threadIdx.x;
  __syncthreads();  // the previous block's sums have been read
  sp[tid] = (double)p * (double)p;
  sd[tid] = (double)d * (double)d;
  __syncthreads();
  for (int h = kOptimizerThreads / 2; h >= 1; h /= 2) {
    if (tid < h) {
      sp[tid] = sp[tid] + sp[tid + h];
      sd[tid] = sd[tid] + sd[tid + h];
    }
    __syncthreads();
  }
  if (tid == 0) {
    block_sums[2 * gb] = sp[0];
    block_sums[2 * gb + 1] = sd[0];
  }
}

__global__ void __launch_bounds__(kOptimizerThreads)
    lamb_norms_kernel(const pq_adam_tensor* __restrict__ tensors, const int64_t* __restrict__ first_block,
                      int32_t count, int64_t total_blocks, const float* __restrict__ code1,
                      const float* __restrict__ code2, int32_t nonfinite, double* __restrict__ block_sums) {
  __shared__ float s_code1[256], s_code2[256];
  __shared__ double sp[kOptimizerThreads], sd[kOptimizerThreads];
  const int tid = (int)threadIdx.x;
  s_code1[tid] = code1[tid];  // kOptimizerThreads == 256 == code size
  s_code2[tid] = code2[tid];
  __syncthreads();
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const GroupElement at = group_element(tensors, first_block, count, gb);
    const pq_adam_tensor& t = tensors[at.tensor];
    const int64_t b = at.block, i = at.i;
    float p = 0.0f, r = 0.0f;  // padding threads and skipped elements add 0
    if (at.live) {
      const float g = unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
      p = load_as_float(t.param, i, t.param_dtype);
      if (nonfinite != kSkipElement || is_finite(g)) {
        float m, v;
        if (t.state_bits == 8) {
          m = s_code1[((const uint8_t*)t.state1)[i]] * t.absmax1[b];
          v = s_code2[((const uint8_t*)t.state2)[i]] * t.absmax2[b];
        } else {
          m = ((const float*)t.state1)[i];
          v = ((const float*)t.state2)[i];
        }
        adam_moments(g, m, v, t.k);
        r = lamb_direction(p, m, sqrtf(v), t.k);  // IEEE sqrtf (sqrt.rn.f32), as adam.cu's step
      }
    }
    store_block_sums(p, r, sp, sd, block_sums, gb);
  }
}

__global__ void __launch_bounds__(kOptimizerThreads)
    lars_norms_kernel(const pq_one_state_tensor* __restrict__ tensors, const int64_t* __restrict__ first_block,
                      int32_t count, int64_t total_blocks, int32_t nonfinite, double* __restrict__ block_sums) {
  __shared__ double sp[kOptimizerThreads], sd[kOptimizerThreads];
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const GroupElement at = group_element(tensors, first_block, count, gb);
    const pq_one_state_tensor& t = tensors[at.tensor];
    const int64_t i = at.i;
    float p = 0.0f, d = 0.0f;
    if (at.live) {
      const float g = unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
      p = load_as_float(t.param, i, t.param_dtype);
      if (nonfinite != kSkipElement || is_finite(g)) d = decayed_grad(p, g, t.k);
    }
    store_block_sums(p, d, sp, sd, block_sums, gb);
  }
}

}  // namespace

extern "C" {

// Return a cudaError_t; the descriptors and device_first_block as for pq_cuda_adam_step (pq_cuda_one_state_step for
// LARS). device_block_sums: 2 * total_blocks doubles in device memory, (sum of p^2, sum of the direction's squares)
// per global block.
int32_t pq_cuda_lamb_norms(const pq_adam_tensor* device_descriptors, const int64_t* device_first_block, int32_t count,
                           int64_t total_blocks, const float* code1, const float* code2, int32_t nonfinite,
                           double* device_block_sums, void* stream) {
  const int32_t early = group_launch_precheck(count, total_blocks, nonfinite);
  if (early >= 0) return early;
  lamb_norms_kernel<<<grid_for(total_blocks), kOptimizerThreads, 0, (cudaStream_t)stream>>>(
      device_descriptors, device_first_block, count, total_blocks, code1, code2, nonfinite, device_block_sums);
  return (int32_t)cudaGetLastError();
}

int32_t pq_cuda_lars_norms(const pq_one_state_tensor* device_descriptors, const int64_t* device_first_block,
                           int32_t count, int64_t total_blocks, int32_t nonfinite, double* device_block_sums,
                           void* stream) {
  const int32_t early = group_launch_precheck(count, total_blocks, nonfinite);
  if (early >= 0) return early;
  lars_norms_kernel<<<grid_for(total_blocks), kOptimizerThreads, 0, (cudaStream_t)stream>>>(
      device_descriptors, device_first_block, count, total_blocks, nonfinite, device_block_sums);
  return (int32_t)cudaGetLastError();
}

}  // extern "C"
