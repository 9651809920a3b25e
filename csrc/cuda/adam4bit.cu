// CUDA kernels of the Adam step with 4-bit states: the per-element math of pyquant/adam4bit.h and blockwise.h in the
// order of the CPU driver (csrc/cpu/adam4bit.cpp), one CUDA block of 128 threads per 128-element block, one thread
// per element. Pass 1 recomputes the rank-1 tensors' new v and folds it into their new maxima with atomic max on the
// bit patterns (v >= 0: the integer order of non-negative floats is their order; max is order-independent, so the
// result is the CPU's); pass 2 recomputes v (the same operations: the same bits), steps and quantises.
#include "device.cuh"
#include "pyquant/adam4bit.h"

namespace {
using namespace pq_cuda;

static_assert(alignof(pq_adam4bit_tensor) == 8 && sizeof(pq_adam4bit_tensor) % 8 == 0,
              "pq_adam4bit_tensor layout changed");
constexpr int kThreads = kFourBitBlock;

// The rank-1 scale of element i under `maxima` (the min over dimensions of its slices' maxima).
__device__ __forceinline__ float rank1_scale(const pq_adam4bit_tensor& t, const float* maxima, int64_t i) {
  float scale = INFINITY;
  int64_t rest = i, off = 0;
  for (int d = 0; d < t.ndim; ++d) off += t.shape[d];
  for (int d = t.ndim - 1; d >= 0; --d) {
    off -= t.shape[d];
    scale = min_float(scale, maxima[off + rest % t.shape[d]]);
    rest /= t.shape[d];
  }
  return scale;
}

struct Element {
  const pq_adam4bit_tensor* t;
  int64_t block, i;
  bool live;
  int32_t tensor;
};

__device__ __forceinline__ Element element_of(const pq_adam4bit_tensor* tensors, const int64_t* first_block,
                                              int32_t count, int64_t gb) {
  const int32_t ti = tensor_of_block(first_block, count, gb);
  const int64_t b = gb - first_block[ti];
  const int64_t i = b * kFourBitBlock + (int64_t)threadIdx.x;
  return Element{&tensors[ti], b, i, i < tensors[ti].numel, ti};
}

__device__ __forceinline__ float grad_of(const pq_adam4bit_tensor& t, int64_t i) {
  return unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
}

__global__ void __launch_bounds__(kThreads)
    rank1_maxima_kernel(const pq_adam4bit_tensor* __restrict__ tensors, const int64_t* __restrict__ first_block,
                        int32_t count, int64_t total_blocks, const float* __restrict__ code2,
                        float* __restrict__ new_maxima, const int64_t* __restrict__ maxima_offset, int32_t nonfinite) {
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const Element e = element_of(tensors, first_block, count, gb);
    const pq_adam4bit_tensor& t = *e.t;
    if (!t.rank1 || !e.live) continue;
    const float g = grad_of(t, e.i);
    const float v = code2[fourbit_nibble((const uint8_t*)t.state2, e.i)] * rank1_scale(t, t.absmax2, e.i);
    float nv = fmaf(t.k.one_minus_beta2 * g, g, v * t.k.beta2);  // adam_moments' v
    if (nonfinite == kSkipElement && !is_finite(g)) nv = v;
    nv = absmax_update(0.0f, nv);  // NaN ignored, -0 as +0: a non-negative float whose bits order as ints
    float* mx = new_maxima + maxima_offset[e.tensor];
    int64_t rest = e.i, off = 0;
    for (int d = 0; d < t.ndim; ++d) off += t.shape[d];
    for (int d = t.ndim - 1; d >= 0; --d) {
      off -= t.shape[d];
      atomicMax((int*)(mx + off + rest % t.shape[d]), __float_as_int(nv));
      rest /= t.shape[d];
    }
  }
}

// Thread i's code of x under `scale`, packed with its neighbour's through shared memory: even threads write bytes.
__device__ __forceinline__ void store_code(uint8_t* q, float x, float scale, const float* mids, int64_t i, int64_t n,
                                           bool live, uint8_t* s_codes) {
  const int tid = (int)threadIdx.x;
  s_codes[tid] = live ? (uint8_t)fourbit_code(fourbit_normalised(x, scale), mids) : (uint8_t)0;
  __syncthreads();
  if (live && (tid & 1) == 0) q[i >> 1] = (uint8_t)(s_codes[tid] | (i + 1 < n ? s_codes[tid + 1] << 4 : 0));
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads)
    adam4bit_kernel(const pq_adam4bit_tensor* __restrict__ tensors, const int64_t* __restrict__ first_block,
                    int32_t count, int64_t total_blocks, const float* __restrict__ code1,
                    const float* __restrict__ code2, const float* __restrict__ new_maxima,
                    const int64_t* __restrict__ maxima_offset, int32_t nonfinite, int64_t* __restrict__ bad_count) {
  __shared__ float s_code1[16], s_code2[16], s_mids1[kFourBitMids], s_mids2[kFourBitMids];
  __shared__ float scratch[kThreads / kWarp];
  __shared__ uint8_t s_codes[kThreads];
  const int tid = (int)threadIdx.x;
  if (tid < 16) {
    s_code1[tid] = code1[tid];
    s_code2[tid] = code2[tid];
  }
  __syncthreads();
  if (tid < kFourBitMids) {
    s_mids1[tid] = code_midpoint(s_code1, tid);
    s_mids2[tid] = code_midpoint(s_code2, tid);
  }
  __syncthreads();
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const Element e = element_of(tensors, first_block, count, gb);
    const pq_adam4bit_tensor& t = *e.t;  // block-uniform: so is every branch on it below
    const bool quantized = t.state_bits == 4;
    const uint8_t* q1 = (const uint8_t*)t.state1;
    const uint8_t* q2 = (const uint8_t*)t.state2;
    float m = 0.0f, v = 0.0f;  // padding threads hold 0, which never changes a max
    int bad = 0;
    if (e.live) {
      // read before block_max's first barrier, after which thread 0 overwrites the block's scales
      if (quantized) {
        m = s_code1[fourbit_nibble(q1, e.i)] * t.absmax1[e.block];
        v = s_code2[fourbit_nibble(q2, e.i)] * (t.rank1 ? rank1_scale(t, t.absmax2, e.i) : t.absmax2[e.block]);
      } else {
        m = ((const float*)t.state1)[e.i];
        v = ((const float*)t.state2)[e.i];
      }
      const float g = grad_of(t, e.i);
      if (nonfinite == kSkipElement && !is_finite(g)) {
        bad = 1;  // keeps its parameter and moments
      } else {
        adam_moments(g, m, v, t.k);
        const float p = load_as_float(t.param, e.i, t.param_dtype);
        store_from_float(t.param, e.i, t.param_dtype, quantized ? adam_param_8bit(p, m, v, t.k) : adam_param_32bit(p, m, v, t.k));
        if (!quantized) {
          ((float*)t.state1)[e.i] = m;
          ((float*)t.state2)[e.i] = v;
        }
      }
    }
    if (quantized) {
      const float a1 = block_max(absmax_update(0.0f, m), scratch);
      const float a2 = t.rank1 ? 0.0f : block_max(absmax_update(0.0f, v), scratch);
      if (tid == 0) {
        t.absmax1[e.block] = a1;
        if (!t.rank1) t.absmax2[e.block] = a2;
      }
      const float v_scale = t.rank1 && e.live ? rank1_scale(t, new_maxima + maxima_offset[e.tensor], e.i) : a2;
      store_code((uint8_t*)t.state1, m, a1, s_mids1, e.i, t.numel, e.live, s_codes);
      store_code((uint8_t*)t.state2, v, v_scale, s_mids2, e.i, t.numel, e.live, s_codes);
    }
    count_bad_elements(bad, bad_count);  // every thread of the block reaches this barrier
  }
}

}  // namespace

extern "C" {

// Returns a cudaError_t (see capi.h).
int32_t pq_cuda_adam4bit_step(const pq_adam4bit_tensor* device_descriptors, const int64_t* device_first_block,
                              int32_t count, int64_t total_blocks, const float* code1, const float* code2,
                              float* new_maxima, const int64_t* device_maxima_offset, int32_t pass, int32_t nonfinite,
                              int64_t* device_bad_count, void* stream) {
  const int32_t early = group_launch_precheck(count, total_blocks, nonfinite);
  if (early >= 0) return early;
  if (pass != 1 && pass != 2) return (int32_t)cudaErrorInvalidValue;
  if (pass == 1)
    rank1_maxima_kernel<<<grid_for(total_blocks), kThreads, 0, (cudaStream_t)stream>>>(
        device_descriptors, device_first_block, count, total_blocks, code2, new_maxima, device_maxima_offset,
        nonfinite);
  else
    adam4bit_kernel<<<grid_for(total_blocks), kThreads, 0, (cudaStream_t)stream>>>(
        device_descriptors, device_first_block, count, total_blocks, code1, code2, new_maxima, device_maxima_offset,
        nonfinite, device_bad_count);
  return (int32_t)cudaGetLastError();
}

}  // extern "C"
