// CUDA kernel of the multi-tensor AdEMAMix step with 8-bit or float32 states: the per-element rules of
// pyquant/blockwise.h (ademamix_moments, ademamix_param_given_sqrt) in the order of the CPU driver
// (csrc/cpu/blockwise.cpp, ademamix_block), laid out as adam.cu (device.cuh: the numerics).
#include "device.cuh"

namespace {
using namespace pq_cuda;

// pyquant/backends/cuda/optimizer.py packs ctypes mirrors of pq_ademamix_tensor (backends/capi.py AdemamixTensor)
// back to back, then the int64 first-block array at the next multiple of 8 bytes.
static_assert(alignof(pq_ademamix_tensor) == 8 && sizeof(pq_ademamix_tensor) % 8 == 0,
              "pq_ademamix_tensor layout changed");

// ---- one CUDA block (256 threads) per 256-element state block; state1 holds m1 then m2 (numel apart), absmax1
// their scales (the tensor's block count apart) ----
__global__ void __launch_bounds__(kOptimizerThreads)
    ademamix_kernel(const pq_ademamix_tensor* __restrict__ tensors, const int64_t* __restrict__ first_block,
                    int32_t count, int64_t total_blocks, const float* __restrict__ code1,
                    const float* __restrict__ code2, const uint8_t* __restrict__ table1,
                    const uint8_t* __restrict__ table2, int32_t nonfinite, int64_t* __restrict__ bad_count) {
  __shared__ float s_code1[256], s_code2[256];
  __shared__ float scratch[kOptimizerThreads / kWarp];
  const int tid = (int)threadIdx.x;
  s_code1[tid] = code1[tid];  // kOptimizerThreads == 256 == code size
  s_code2[tid] = code2[tid];
  __syncthreads();
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const GroupElement at = group_element(tensors, first_block, count, gb);
    const pq_ademamix_tensor& t = tensors[at.tensor];  // block-uniform: so is every branch on it below
    const int64_t b = at.block, i = at.i, n = t.numel, blocks = block_count(n, kOptimizerBlock);
    const bool eight_bit = t.state_bits == 8;
    uint8_t* q1 = (uint8_t*)t.state1;
    uint8_t* q3 = (uint8_t*)t.state2;
    float* f1 = (float*)t.state1;
    float* f3 = (float*)t.state2;
    float m1 = 0.0f, m2 = 0.0f, nu = 0.0f;  // padding threads hold 0, which never changes an absmax
    int bad = 0;
    if (at.live) {
      // Read before block_max's first barrier, after which thread 0 overwrites the block's scales.
      if (eight_bit) {
        m1 = s_code1[q1[i]] * t.absmax1[b];
        m2 = s_code1[q1[n + i]] * t.absmax1[blocks + b];
        nu = s_code2[q3[i]] * t.absmax2[b];
      } else {
        m1 = f1[i];
        m2 = f1[n + i];
        nu = f3[i];
      }
      const float g = unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
      if (nonfinite == kSkipElement && !is_finite(g)) {
        bad = 1;  // this element keeps its parameter and states
      } else {
        ademamix_moments(g, m1, m2, nu, t.k);
        const float p = load_as_float(t.param, i, t.param_dtype);
        // IEEE sqrtf (sqrt.rn.f32): torch's sqrt on a GPU, as Adam's kernel takes it.
        store_from_float(t.param, i, t.param_dtype, ademamix_param_given_sqrt(p, m1, m2, sqrtf(nu), t.k));
        if (!eight_bit) {
          f1[i] = m1;
          f1[n + i] = m2;
          f3[i] = nu;
        }
      }
    }
    if (eight_bit) {
      // New scales over the UPDATED states (NaN ignored), then the requantisation, as adam.cu.
      const float a1 = block_max(absmax_update(0.0f, m1), scratch);
      const float a2 = block_max(absmax_update(0.0f, m2), scratch);
      const float a3 = block_max(absmax_update(0.0f, nu), scratch);
      if (tid == 0) {
        t.absmax1[b] = a1;
        t.absmax1[blocks + b] = a2;
        t.absmax2[b] = a3;
      }
      if (at.live) {
        q1[i] = requantize(m1, a1, table1);
        q1[n + i] = requantize(m2, a2, table1);
        q3[i] = requantize(nu, a3, table2);
      }
    }
    count_bad_elements(bad, bad_count);  // every thread of the block reaches this barrier
  }
}

}  // namespace

extern "C" {

// Returns a cudaError_t, as pq_cuda_adam_step, whose conventions it follows: the descriptors, then device_first_block
// (`count` int64 values: tensor i's first global block index), in device memory; total_blocks the sum of the
// tensors' ceil(numel / 256); device_bad_count incremented (atomically) by the number of non-finite gradient
// elements seen when nonfinite == 0 (skip element), left unchanged with nonfinite == 1 (propagate).
int32_t pq_cuda_ademamix_step(const pq_ademamix_tensor* device_descriptors, const int64_t* device_first_block,
                              int32_t count, int64_t total_blocks, const float* code1, const float* code2,
                              const uint8_t* table1, const uint8_t* table2, int32_t nonfinite,
                              int64_t* device_bad_count, void* stream) {
  const int32_t early = group_launch_precheck(count, total_blocks, nonfinite);
  if (early >= 0) return early;
  ademamix_kernel<<<grid_for(total_blocks), kOptimizerThreads, 0, (cudaStream_t)stream>>>(
      device_descriptors, device_first_block, count, total_blocks, code1, code2, table1, table2, nonfinite,
      device_bad_count);
  return (int32_t)cudaGetLastError();
}

}  // extern "C"
