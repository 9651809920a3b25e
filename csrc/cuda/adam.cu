// CUDA kernel of the multi-tensor Adam step with 8-bit or float32 states (device.cuh: the numerics).
#include "device.cuh"

namespace {
using namespace pq_cuda;

constexpr int kAdamThreads = kOptimizerThreads;  // one thread per element of a 256-element state block
// pyquant/backends/cuda/optimizer.py packs ctypes mirrors of pq_adam_tensor (backends/capi.py AdamTensor) back to back, then the
// int64 first-block array at the next multiple of 8 bytes.
static_assert(alignof(pq_adam_tensor) == 8 && sizeof(pq_adam_tensor) % 8 == 0, "pq_adam_tensor layout changed");

// ---- multi-tensor Adam step: one CUDA block (256 threads) per 256-element state block ----
__global__ void __launch_bounds__(kAdamThreads) adam_kernel(const pq_adam_tensor* __restrict__ tensors,
                                                             const int64_t* __restrict__ first_block, int32_t count,
                                                             int64_t total_blocks, const float* __restrict__ code1,
                                                             const float* __restrict__ code2,
                                                             const uint8_t* __restrict__ table1,
                                                             const uint8_t* __restrict__ table2, int32_t nonfinite,
                                                             int64_t* __restrict__ bad_count) {
  __shared__ float s_code1[256], s_code2[256];
  __shared__ float scratch[kAdamThreads / kWarp];
  const int tid = (int)threadIdx.x;
  s_code1[tid] = code1[tid];  // kAdamThreads == 256 == code size
  s_code2[tid] = code2[tid];
  __syncthreads();
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const GroupElement at = group_element(tensors, first_block, count, gb);
    const pq_adam_tensor& t = tensors[at.tensor];  // block-uniform: every branch on it below is taken by the whole block
    const int64_t b = at.block, i = at.i;
    const bool live = at.live;
    int bad = 0;
    if (t.state_bits == 8) {
      uint8_t* q1 = (uint8_t*)t.state1;
      uint8_t* q2 = (uint8_t*)t.state2;
      const float a1 = t.absmax1[b], a2 = t.absmax2[b];
      float m = 0.0f, v = 0.0f;  // padding threads hold 0, which never changes an absmax
      if (live) {
        const float g = unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
        m = s_code1[q1[i]] * a1;
        v = s_code2[q2[i]] * a2;
        if (nonfinite == kSkipElement && !is_finite(g)) {
          bad = 1;  // this element keeps its parameter and moments
        } else {
          adam_moments(g, m, v, t.k);
          const float p = load_as_float(t.param, i, t.param_dtype);
          store_from_float(t.param, i, t.param_dtype, adam_param_8bit(p, m, v, t.k));
        }
      }
      // New absmax over the UPDATED m and v (NaN ignored); block_max's first barrier also orders every
      // thread's read of absmax1[b] / absmax2[b] above before thread 0 overwrites them below.
      const float new_a1 = block_max(absmax_update(0.0f, m), scratch);
      const float new_a2 = block_max(absmax_update(0.0f, v), scratch);
      if (tid == 0) {
        t.absmax1[b] = new_a1;
        t.absmax2[b] = new_a2;
      }
      if (live) {
        q1[i] = requantize(m, new_a1, table1);
        q2[i] = requantize(v, new_a2, table2);
      }
    } else if (live) {
      float* ms = (float*)t.state1;
      float* vs = (float*)t.state2;
      const float g = unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
      if (nonfinite == kSkipElement && !is_finite(g)) {
        bad = 1;
      } else {
        float m = ms[i], v = vs[i];
        adam_moments(g, m, v, t.k);
        ms[i] = m;
        vs[i] = v;
        const float p = load_as_float(t.param, i, t.param_dtype);
        store_from_float(t.param, i, t.param_dtype, adam_param_32bit(p, m, v, t.k));
      }
    }
    // Count this block's non-finite gradient elements (every thread of the block reaches this barrier).
    count_bad_elements(bad, bad_count);
  }
}

}  // namespace

extern "C" {

// Returns a cudaError_t, as the entry points of quantize.cu.
// One launch for a parameter group. device_first_block holds `count` int64 values: tensor i's first global
// block index (a prefix sum of ceil(numel / 256) over tensors 0..i-1); total_blocks is the sum over all
// tensors. device_bad_count is incremented (atomically) by the number of non-finite gradient elements seen
// when nonfinite == 0 (skip element); with nonfinite == 1 (propagate) it is left unchanged.
int32_t pq_cuda_adam_step(const pq_adam_tensor* device_descriptors, const int64_t* device_first_block, int32_t count,
                          int64_t total_blocks, const float* code1, const float* code2, const uint8_t* table1,
                          const uint8_t* table2, int32_t nonfinite, int64_t* device_bad_count, void* stream) {
  const int32_t early = group_launch_precheck(count, total_blocks, nonfinite);
  if (early >= 0) return early;
  adam_kernel<<<grid_for(total_blocks), kAdamThreads, 0, (cudaStream_t)stream>>>(
      device_descriptors, device_first_block, count, total_blocks, code1, code2, table1, table2, nonfinite,
      device_bad_count);
  return (int32_t)cudaGetLastError();
}

}  // extern "C"
