// CUDA kernels of block-wise 8-bit quantisation and dequantisation (device.cuh: the numerics).
#include "device.cuh"

namespace {
using namespace pq_cuda;

constexpr int kMaxThreads = 256;                // threads of a quantisation block (at most)

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

}  // extern "C"
