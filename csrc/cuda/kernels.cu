// CUDA kernels: launch drivers around the per-element math of pyquant/blockwise.h, mirroring the CPU
// drivers in csrc/cpu/kernels.cpp so that a GPU run and a CPU run of pyquant agree bit for bit
// (docs/numerics.md, sections 2 to 4).
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
#include <cuda_runtime.h>
#include <stdint.h>

#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

namespace {
using namespace pq;

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;                // threads of a quantisation block (at most)
constexpr int kAdamThreads = kOptimizerBlock;   // one thread per element of a 256-element state block
constexpr int64_t kMaxGrid = 2147483647;        // gridDim.x limit; kernels stride over the rest
static_assert(kAdamThreads % kWarp == 0 && kAdamThreads <= 1024, "bad Adam block shape");
// pyquant/_cuda.py packs ctypes mirrors of pq_adam_tensor (pyquant._native.AdamTensor) back to back, then the
// int64 first-block array at the next multiple of 8 bytes.
static_assert(alignof(pq_adam_tensor) == 8 && sizeof(pq_adam_tensor) % 8 == 0, "pq_adam_tensor layout changed");

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

// ---- quantize_blockwise: one CUDA block per quantisation block (any blocksize > 0) ----
// blockDim.x is a multiple of 32 (<= 256); a block larger than blockDim.x is covered by a stride loop.
// Pass 1 finds the absmax, pass 2 (re-reading x, mostly from L2) writes the codes.
__global__ void __launch_bounds__(kMaxThreads) quantize_kernel(const void* __restrict__ x, int32_t dtype, int64_t n,
                                                                int64_t blocksize, int64_t blocks,
                                                                const uint8_t* __restrict__ table,
                                                                uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float scratch[kMaxThreads / kWarp];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t start = b * blocksize;
    const int64_t len = blocksize < n - start ? blocksize : n - start;
    float amax = 0.0f;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x)
      amax = absmax_update(amax, load_as_float(x, start + i, dtype));
    amax = block_max(amax, scratch);
    if (threadIdx.x == 0) absmax[b] = amax;
    if (amax == 0.0f) {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) q[start + i] = 0;
    } else {
      const float inv = block_inverse(amax);  // IEEE 1/absmax (rcp.rn.f32), as on the CPU
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x)
        q[start + i] = __ldg(table + grid_bin(load_as_float(x, start + i, dtype), inv));
    }
  }
}

// ---- dequantize_blockwise: out = code[q] * absmax[block], one float32 multiply, rounded once to dtype ----
__global__ void __launch_bounds__(kMaxThreads) dequantize_kernel(const uint8_t* __restrict__ q,
                                                                  const float* __restrict__ absmax,
                                                                  const float* __restrict__ code, int64_t n,
                                                                  int64_t blocksize, void* __restrict__ out,
                                                                  int32_t dtype) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];
  __syncthreads();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    store_from_float(out, i, dtype, s_code[q[i]] * __ldg(absmax + i / blocksize));
}

// ---- multi-tensor Adam step: one CUDA block (256 threads) per 256-element state block ----
// first_block[i] is the global index of tensor i's first state block (prefix sums of ceil(numel/256));
// the tensor of global block gb is the last i with first_block[i] <= gb (empty tensors are skipped).
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
    const int32_t ti = tensor_of_block(first_block, count, gb);
    const pq_adam_tensor& t = tensors[ti];  // block-uniform: every branch on it below is taken by the whole block
    const int64_t b = gb - first_block[ti];
    const int64_t start = b * kOptimizerBlock;
    const int64_t len = kOptimizerBlock < t.numel - start ? (int64_t)kOptimizerBlock : t.numel - start;
    const int64_t i = start + tid;
    const bool live = tid < len;
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
        q1[i] = new_a1 == 0.0f ? (uint8_t)0 : __ldg(table1 + grid_bin(m, block_inverse(new_a1)));
        q2[i] = new_a2 == 0.0f ? (uint8_t)0 : __ldg(table2 + grid_bin(v, block_inverse(new_a2)));
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
    const int block_bad = __syncthreads_count(bad);
    if (tid == 0 && block_bad > 0) atomicAdd((unsigned long long*)bad_count, (unsigned long long)block_bad);
  }
}

// GradScaler's unscale_ over many gradients in one launch. meta holds 4 rows of `count` int64 values: the
// gradients' addresses, their numels, their dtypes (pq::DType or kFloat64) and the index of their first chunk
// of kUnscaleChunk elements among all chunks. Each CUDA block takes whole chunks; the per-element rule is
// pq::unscale_element, as in the CPU kernel. found_inf is only ever set to 1 (a benign race: same value).
constexpr int64_t kUnscaleChunk = 4096;
constexpr int kUnscaleThreads = 256;

__global__ void __launch_bounds__(kUnscaleThreads) unscale_kernel(const int64_t* __restrict__ meta, int32_t count,
                                                                  int64_t total_chunks, float* found_inf,
                                                                  const float* __restrict__ inv_scale) {
  const int64_t* addresses = meta;
  const int64_t* numels = meta + count;
  const int64_t* dtypes = meta + 2 * count;
  const int64_t* first_chunk = meta + 3 * count;
  const float inv = *inv_scale;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int32_t t = tensor_of_block(first_chunk, count, c);
    const int64_t begin = (c - first_chunk[t]) * kUnscaleChunk;
    const int64_t end = begin + kUnscaleChunk < numels[t] ? begin + kUnscaleChunk : numels[t];
    void* base = (void*)addresses[t];
    int bad = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
      bad |= unscale_element(base, i, (int32_t)dtypes[t], inv) ? 1 : 0;
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  }
}

inline unsigned grid_for(int64_t blocks) { return (unsigned)(blocks < kMaxGrid ? blocks : kMaxGrid); }

// Threads of a quantisation block: the block size rounded up to a warp, at most kMaxThreads.
inline unsigned quantize_threads(int64_t blocksize) {
  if (blocksize >= kMaxThreads) return (unsigned)kMaxThreads;  // before rounding up, which could overflow
  const int64_t rounded = (blocksize + kWarp - 1) / kWarp * kWarp;
  return (unsigned)(rounded < kMaxThreads ? rounded : kMaxThreads);
}

}  // namespace

extern "C" {

// Every entry point returns a cudaError_t (0 = success): the launch-configuration error, if any. Errors of
// the asynchronous execution surface at the next synchronising CUDA call, as for any CUDA kernel.
// All pointers are device pointers; `stream` is a cudaStream_t (torch's current stream).

int32_t pq_abi_version(void) { return PQ_ABI_VERSION; }

int32_t pq_cuda_quantize_blockwise(const void* x, int32_t dtype, int64_t n, int64_t blocksize, const uint8_t* table,
                                   uint8_t* q, float* absmax, void* stream) {
  if (n < 0 || blocksize <= 0 || !pq::valid_dtype(dtype)) return (int32_t)cudaErrorInvalidValue;
  if (n == 0) return (int32_t)cudaSuccess;
  const int64_t blocks = pq::block_count(n, blocksize);
  quantize_kernel<<<grid_for(blocks), quantize_threads(blocksize), 0, (cudaStream_t)stream>>>(
      x, dtype, n, blocksize, blocks, table, q, absmax);
  return (int32_t)cudaGetLastError();
}

int32_t pq_cuda_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                     int64_t blocksize, void* out, int32_t dtype, void* stream) {
  if (n < 0 || blocksize <= 0 || !pq::valid_dtype(dtype)) return (int32_t)cudaErrorInvalidValue;
  if (n == 0) return (int32_t)cudaSuccess;
  const int64_t threads = kMaxThreads;
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t cap = (int64_t)1 << 20;  // enough blocks to fill any GPU; the kernel strides over the rest
  dequantize_kernel<<<(unsigned)(wanted < cap ? wanted : cap), (unsigned)threads, 0, (cudaStream_t)stream>>>(
      q, absmax, code, n, blocksize, out, dtype);
  return (int32_t)cudaGetLastError();
}

// One launch for a parameter group. device_first_block holds `count` int64 values: tensor i's first global
// block index (a prefix sum of ceil(numel / 256) over tensors 0..i-1); total_blocks is the sum over all
// tensors. device_bad_count is incremented (atomically) by the number of non-finite gradient elements seen
// when nonfinite == 0 (skip element); with nonfinite == 1 (propagate) it is left unchanged.
int32_t pq_cuda_adam_step(const pq_adam_tensor* device_descriptors, const int64_t* device_first_block, int32_t count,
                          int64_t total_blocks, const float* code1, const float* code2, const uint8_t* table1,
                          const uint8_t* table2, int32_t nonfinite, int64_t* device_bad_count, void* stream) {
  if (count < 0 || total_blocks < 0 || (nonfinite != pq::kSkipElement && nonfinite != pq::kPropagate))
    return (int32_t)cudaErrorInvalidValue;
  if (count == 0 || total_blocks == 0) return (int32_t)cudaSuccess;
  adam_kernel<<<grid_for(total_blocks), kAdamThreads, 0, (cudaStream_t)stream>>>(
      device_descriptors, device_first_block, count, total_blocks, code1, code2, table1, table2, nonfinite,
      device_bad_count);
  return (int32_t)cudaGetLastError();
}

// device_meta: see unscale_kernel (4 x count int64 values in device memory); found_inf and inv_scale are
// one-element float32 device tensors.
int32_t pq_cuda_unscale_(const int64_t* device_meta, int32_t count, int64_t total_chunks, float* found_inf,
                         const float* inv_scale, void* stream) {
  if (count < 0 || total_chunks < 0) return (int32_t)cudaErrorInvalidValue;
  if (count == 0 || total_chunks == 0) return (int32_t)cudaSuccess;
  unscale_kernel<<<grid_for(total_chunks), kUnscaleThreads, 0, (cudaStream_t)stream>>>(device_meta, count,
                                                                                      total_chunks, found_inf,
                                                                                      inv_scale);
  return (int32_t)cudaGetLastError();
}

const char* pq_cuda_error_string(int32_t error) { return cudaGetErrorString((cudaError_t)error); }

}  // extern "C"
