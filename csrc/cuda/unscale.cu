// CUDA kernel of GradScaler's unscale_ (device.cuh: the numerics).
#include "device.cuh"

namespace {
using namespace pq_cuda;

// GradScaler's unscale_ over many gradients in one launch. meta holds 4 rows of `count` int64 values: the
// gradients' addresses, their numels, their dtypes (enum pq_dtype) and the index of their first chunk of
// kUnscaleChunk elements among all chunks. Each CUDA block takes whole chunks; the per-element rule is
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

}  // namespace

extern "C" {

// Returns a cudaError_t, as the entry points of quantize.cu.
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

}  // extern "C"
