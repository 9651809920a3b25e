// CUDA kernel of the multi-tensor one-state step (momentum, Lion, RMSprop, Adagrad) with an 8-bit or float32 state:
// the per-element rules of pyquant/blockwise.h (one_state_first, one_state_param) in the order of the CPU driver
// (csrc/cpu/blockwise.cpp, one_state_block), laid out as adam.cu (device.cuh: the numerics).
#include "device.cuh"

namespace {
using namespace pq_cuda;

// pyquant/backends/cuda/optimizer.py packs ctypes mirrors of pq_one_state_tensor (backends/capi.py OneStateTensor)
// back to back, then the int64 first-block array at the next multiple of 8 bytes.
static_assert(alignof(pq_one_state_tensor) == 8 && sizeof(pq_one_state_tensor) % 8 == 0,
              "pq_one_state_tensor layout changed");

// ---- multi-tensor one-state step: one CUDA block (256 threads) per 256-element state block; RULE: enum
// pq_one_state_rule, a compile-time constant as in the CPU driver ----
template <int RULE>
__global__ void __launch_bounds__(kOptimizerThreads)
    one_state_kernel(const pq_one_state_tensor* __restrict__ tensors, const int64_t* __restrict__ first_block,
                     int32_t count, int64_t total_blocks, const float* __restrict__ code1,
                     const uint8_t* __restrict__ table1, int32_t nonfinite, int64_t* __restrict__ bad_count) {
  __shared__ float s_code1[256];
  __shared__ float scratch[kOptimizerThreads / kWarp];
  const int tid = (int)threadIdx.x;
  s_code1[tid] = code1[tid];  // kOptimizerThreads == 256 == code size
  __syncthreads();
  for (int64_t gb = blockIdx.x; gb < total_blocks; gb += gridDim.x) {
    const GroupElement at = group_element(tensors, first_block, count, gb);
    const pq_one_state_tensor& t = tensors[at.tensor];  // block-uniform: so is every branch on it below
    const int64_t b = at.block, i = at.i;
    const bool eight_bit = t.state_bits == 8;
    uint8_t* q1 = (uint8_t*)t.state1;
    float* s32 = (float*)t.state1;
    float s = 0.0f;  // padding threads hold 0, which never changes an absmax
    int bad = 0;
    if (at.live) {
      // Read before block_max's first barrier, after which thread 0 overwrites absmax1[b].
      s = eight_bit ? s_code1[q1[i]] * t.absmax1[b] : s32[i];
      float g = unscaled_grad(load_as_float(t.grad, i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
      if (nonfinite == kSkipElement && !is_finite(g)) {
        bad = 1;  // this element keeps its parameter and state
      } else {
        float p = load_as_float(t.param, i, t.param_dtype);
        const float direction = one_state_first(RULE, eight_bit, p, g, s, t.k);
        // The square root as Adam's kernel takes it: IEEE sqrtf (sqrt.rn.f32), torch's sqrt on a GPU.
        const float root = one_state_needs_root(RULE) ? sqrtf(s) : 0.0f;
        store_from_float(t.param, i, t.param_dtype, one_state_param(RULE, eight_bit, p, g, s, direction, root, t.k));
        if (!eight_bit) s32[i] = s;
      }
    }
    if (eight_bit) {
      // New absmax over the UPDATED state (NaN ignored), then the requantisation, as adam.cu.
      const float new_a1 = block_max(absmax_update(0.0f, s), scratch);
      if (tid == 0) t.absmax1[b] = new_a1;
      if (at.live) q1[i] = requantize(s, new_a1, table1);
    }
    count_bad_elements(bad, bad_count);  // every thread of the block reaches this barrier
  }
}

template <int RULE>
int32_t launch(const pq_one_state_tensor* tensors, const int64_t* first_block, int32_t count, int64_t total_blocks,
               const float* code1, const uint8_t* table1, int32_t nonfinite, int64_t* bad_count, cudaStream_t stream) {
  one_state_kernel<RULE><<<grid_for(total_blocks), kOptimizerThreads, 0, stream>>>(
      tensors, first_block, count, total_blocks, code1, table1, nonfinite, bad_count);
  return (int32_t)cudaGetLastError();
}

// The launcher of each rule, indexed by its code.
static_assert(PQ_RULE_MOMENTUM == 0 && PQ_RULE_LION == 1 && PQ_RULE_RMSPROP == 2 && PQ_RULE_ADAGRAD == 3,
              "the rule codes index kLaunchRule");
constexpr decltype(&launch<0>) kLaunchRule[] = {launch<PQ_RULE_MOMENTUM>, launch<PQ_RULE_LION>,
                                                launch<PQ_RULE_RMSPROP>, launch<PQ_RULE_ADAGRAD>};

}  // namespace

extern "C" {

// Returns a cudaError_t, as pq_cuda_adam_step, whose conventions it follows: the descriptors, then device_first_block
// (`count` int64 values: tensor i's first global block index), in device memory; total_blocks the sum of the
// tensors' ceil(numel / 256); device_bad_count incremented (atomically) by the number of non-finite gradient
// elements seen when nonfinite == 0 (skip element), left unchanged with nonfinite == 1 (propagate).
int32_t pq_cuda_one_state_step(const pq_one_state_tensor* device_descriptors, const int64_t* device_first_block,
                               int32_t count, int64_t total_blocks, const float* code1, const uint8_t* table1,
                               int32_t rule, int32_t nonfinite, int64_t* device_bad_count, void* stream) {
  if (rule < PQ_RULE_MOMENTUM || rule > PQ_RULE_ADAGRAD) return (int32_t)cudaErrorInvalidValue;
  const int32_t early = group_launch_precheck(count, total_blocks, nonfinite);
  if (early >= 0) return early;
  return kLaunchRule[rule](device_descriptors, device_first_block, count, total_blocks, code1, table1, nonfinite,
                           device_bad_count, (cudaStream_t)stream);
}

}  // extern "C"
