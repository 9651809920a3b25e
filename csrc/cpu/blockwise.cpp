// CPU kernels of block-wise 8-bit quantisation and of the Adam step (8-bit and float32 states): OpenMP drivers
// over blocks around the per-element math of pyquant/blockwise.h.
// This file is compiled once per instruction set (isa.h) into its own namespace; capi.cpp picks one at run
// time. The avx2 and avx512 builds run the block kernels of blockwise_avx2.h / blockwise_avx512.h, which give
// the same bits as the scalar rules here; the scalar build, and any case those kernels do not cover, runs the
// rules element by element.
// Work is split statically over blocks and no floating-point reduction crosses a block, so results are
// the same for any number of threads.
#include "isa.h"

#include <omp.h>
#include <string.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_sqrt.h"
#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

#if PQ_AVX512
#include "blockwise_avx512.h"
#elif PQ_AVX2
#include "blockwise_avx2.h"
#endif

namespace PQ_NS {
using namespace pq;

// ---- the per-element rules ----
namespace scalar {

static inline void quantize_values(const float* x, int64_t len, float absmax, const uint8_t* table, uint8_t* q) {
  if (absmax == 0.0f) {
    for (int64_t i = 0; i < len; ++i) q[i] = 0;  // a memset of (size_t)len made GCC warn about negative lengths
    return;
  }
  const float inv = block_inverse(absmax);
  for (int64_t i = 0; i < len; ++i) q[i] = table[grid_bin(x[i], inv)];
}

// `buf` holds blocksize floats for float16 / bfloat16 input.
static inline void quantize_block(const void* x, int32_t dtype, int64_t start, int64_t len, const uint8_t* table,
                                  uint8_t* q, float* absmax, float* buf) {
  const float* xb;
  if (dtype == PQ_DTYPE_FLOAT32) {
    xb = (const float*)x + start;
  } else {
    for (int64_t i = 0; i < len; ++i) buf[i] = load_as_float(x, start + i, dtype);
    xb = buf;
  }
  const float amax = block_absmax(xb, len);
  *absmax = amax;
  quantize_values(xb, len, amax, table, q + start);
}

static inline void dequantize_block(const uint8_t* q, float a, int64_t start, int64_t len, const float* code,
                                    void* out, int32_t dtype) {
  if (dtype == PQ_DTYPE_FLOAT32) {
    float* o = (float*)out + start;
    for (int64_t i = 0; i < len; ++i) o[i] = code[q[start + i]] * a;
  } else {
    for (int64_t i = 0; i < len; ++i) store_from_float(out, start + i, dtype, code[q[start + i]] * a);
  }
}

// sqrt(v) for a block, as torch computes it on this CPU (see pq_cpu_sqrt in capi.h).
static inline void block_sqrt(const float* v, float* out, int64_t len, pq_vsqrt_fn fn) {
  if (fn != nullptr) {
    const int32_t n = (int32_t)len;
    fn(&n, v, out);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = sqrtf(v[i]);
  }
}

// The square roots of a block of second moments as torch computes them on this CPU (the one-state rules' state,
// AdEMAMix's nu, LAMB's v): the SIMD emulation or IEEE sqrt (choose_sqrt_mode), else block_sqrt.
static inline void moment_sqrt(const float* v, float* out, int64_t len, int sqrt_mode, pq_vsqrt_fn fn) {
#if PQ_SIMD
  if (sqrt_mode != kSqrtCall) return vec::sqrt_block(v, out, len, sqrt_mode, fn);
#endif
  (void)sqrt_mode;
  block_sqrt(v, out, len, fn);
}

// One block of a tensor with 8-bit states: dequantise and update the moments, update the parameters,
// find the new absmax, requantise. Everything stays in these stack arrays: no full-size temporaries.
static inline int64_t adam_block_8bit(const pq_adam_tensor& t, int64_t start, int64_t len, const float* code1,
                                      const float* code2, const uint8_t* table1, const uint8_t* table2,
                                      int32_t nonfinite, pq_vsqrt_fn fn) {
  float m[kOptimizerBlock], v[kOptimizerBlock], root[kOptimizerBlock];
  bool skip[kOptimizerBlock];
  uint8_t* q1 = (uint8_t*)t.state1 + start;
  uint8_t* q2 = (uint8_t*)t.state2 + start;
  const int64_t b = start / kOptimizerBlock;
  const float a1 = t.absmax1[b], a2 = t.absmax2[b];
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float g = unscaled_grad(load_as_float(t.grad, start + i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
    float mi = code1[q1[i]] * a1;
    float vi = code2[q2[i]] * a2;
    skip[i] = nonfinite == kSkipElement && !is_finite(g);  // such an element keeps its parameter and moments
    bad += skip[i];
    if (!skip[i]) adam_moments(g, mi, vi, t.k);
    m[i] = mi;
    v[i] = vi;
  }
  block_sqrt(v, root, len, fn);
  for (int64_t i = 0; i < len; ++i) {
    if (skip[i]) continue;
    const float p = load_as_float(t.param, start + i, t.param_dtype);
    store_from_float(t.param, start + i, t.param_dtype, adam_param_8bit_given_sqrt(p, m[i], root[i], t.k));
  }
  const float new_a1 = block_absmax(m, len), new_a2 = block_absmax(v, len);
  t.absmax1[b] = new_a1;
  t.absmax2[b] = new_a2;
  quantize_values(m, len, new_a1, table1, q1);
  quantize_values(v, len, new_a2, table2, q2);
  return bad;
}

static inline int64_t adam_block_32bit(const pq_adam_tensor& t, int64_t start, int64_t len, int32_t nonfinite,
                                       pq_vsqrt_fn fn) {
  float* m = (float*)t.state1 + start;
  float* v = (float*)t.state2 + start;
  float root[kOptimizerBlock];
  bool skip[kOptimizerBlock];
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float g = unscaled_grad(load_as_float(t.grad, start + i, t.grad_dtype), t.k.inv_grad_scale, t.grad_dtype);
    skip[i] = nonfinite == kSkipElement && !is_finite(g);
    bad += skip[i];
    if (!skip[i]) adam_moments(g, m[i], v[i], t.k);
  }
  block_sqrt(v, root, len, fn);
  for (int64_t i = 0; i < len; ++i) {
    if (skip[i]) continue;
    const float p = load_as_float(t.param, start + i, t.param_dtype);
    store_from_float(t.param, start + i, t.param_dtype, adam_param_32bit_given_sqrt(p, m[i], root[i], t.k));
  }
  return bad;
}

// `kept` where keep is 1, else `updated`, on the bits. A select (keep ? kept : updated) let GCC move the update's
// arithmetic under a branch (it may trap, -ftrapping-math), and the state loop stayed scalar under nonfinite="skip".
static inline float kept_or_updated(uint32_t keep, float kept, float updated) {
  const uint32_t mask = 0u - keep;
  return bits_float((float_bits(kept) & mask) | (float_bits(updated) & ~mask));
}

// A block's unscaled gradients and parameters as float32, in loops of their own (inside the state loops the loads
// and conversions kept GCC from vectorising them); returns whether a gradient is non-finite.
template <int PDT, int GDT, class Tensor>
static inline uint32_t load_block(const Tensor& t, int64_t start, int64_t len, float inv_grad_scale, float* grad,
                                  float* param) {
  uint32_t nonfinite_seen = 0;
  for (int64_t i = 0; i < len; ++i) {
    grad[i] = unscaled_grad(load_as_float(t.grad, start + i, GDT), inv_grad_scale, GDT);
    nonfinite_seen |= !is_finite(grad[i]);
  }
  for (int64_t i = 0; i < len; ++i) param[i] = load_as_float(t.param, start + i, PDT);
  return nonfinite_seen;
}

// body(std::true_type()) where the skip policy has non-finite gradients to skip in the block, else
// body(std::false_type()): a block without a non-finite gradient needs none of the state loops' per-element blends
// and counts (one-state steps, AdEMAMix, LAMB's norm pass), and without them Lion8bit's step took 0.75x the time
// (bench/NOTES.md).
template <class Body>
static inline void with_skips_if_needed(int32_t nonfinite, uint32_t nonfinite_seen, Body&& body) {
  if (nonfinite == kSkipElement && nonfinite_seen)
    body(std::true_type());
  else
    body(std::false_type());
}

// An 8-bit state block's requantisation left for later: its new values, their absmax and where its codes go.
struct PendingState {
  const float* s = nullptr;  // none pending
  int64_t len;
  float absmax;
  uint8_t* q;
#if PQ_AVX512_VBMI
  vec::StagedSearch search;  // between the stages of a staged requantisation (StateCodec::requantise)
#endif
};

// One block of a one-state step (8-bit or float32 state), in the order of bitsandbytes' CPU code: states and
// gradients first, the block's square roots (RMSprop, Adagrad), then the parameters, then the requantisation.
// RULE and the dtypes are compile-time constants so that each loop holds only its own arithmetic and conversions;
// `codec` dequantises and requantises an 8-bit state (StateCodec).
//
// The requantisation of an 8-bit state is left in `pending` (s is the caller's buffer for the block's state), and
// the one pending before runs once this block's inputs are loaded, in the avx512vbmi build two stages of its search
// after each of this block's loops (StateCodec::requantise): it then no longer waits on its own block's absmax, and
// its search overlaps this block's arithmetic (as adam_blocks_8bit's does; bench/NOTES.md). The codes are the same:
// each block is quantised from its own values and absmax.
template <int RULE, int PDT, int GDT, class Codec>
static inline int64_t one_state_block(const pq_one_state_tensor& t, int64_t start, int64_t len, const Codec& codec,
                                      int32_t nonfinite, int sqrt_mode, pq_vsqrt_fn fn, float* s,
                                      PendingState& pending) {
  constexpr int32_t rule = RULE;
  float g[kOptimizerBlock], p[kOptimizerBlock], dir[kOptimizerBlock], root[kOptimizerBlock];
  bool skip[kOptimizerBlock];
  const pq_one_state_constants k = t.k;  // a local copy: the parameter stores cannot alias it
  const bool eight_bit = t.state_bits == 8;
  uint8_t* q1 = (uint8_t*)t.state1 + start;
  float* s32 = (float*)t.state1 + start;
  const float a1 = eight_bit ? t.absmax1[start / kOptimizerBlock] : 0.0f;
  if (eight_bit)
    codec.dequantize(q1, a1, len, s);
  else
    memcpy(s, s32, (size_t)len * sizeof(float));
  // Bit blends instead of selects: selects kept GCC from vectorising the state loop (as in AdEMAMix's).
  const uint32_t nonfinite_seen = load_block<PDT, GDT>(t, start, len, k.inv_grad_scale, g, p);
  codec.requantise(pending, 0, 2);
  int64_t bad = 0;
  with_skips_if_needed(nonfinite, nonfinite_seen, [&](auto may_skip) {
    for (int64_t i = 0; i < len; ++i) {
      const float g0 = g[i], p0 = p[i], s0 = s[i];
      float pi = p0, gi = g0, si = s0;
      dir[i] = one_state_first(rule, eight_bit, pi, gi, si, k);
      if constexpr (decltype(may_skip)::value) {
        const uint32_t keep = !is_finite(g0);  // 1: keeps its parameter and state
        bad += keep;
        p[i] = kept_or_updated(keep, p0, pi);
        g[i] = kept_or_updated(keep, g0, gi);
        s[i] = kept_or_updated(keep, s0, si);
        skip[i] = keep;
      } else {
        p[i] = pi;
        g[i] = gi;
        s[i] = si;
      }
    }
  });
  codec.requantise(pending, 2, 4);
  constexpr bool needs_root = one_state_needs_root(rule);
  if (needs_root) moment_sqrt(s, root, len, sqrt_mode, fn);
  codec.requantise(pending, 4, 6);
  // Every element, then the skipped ones put back (rare): a select in this loop kept GCC from vectorising it.
  for (int64_t i = 0; i < len; ++i)
    store_from_float(t.param, start + i, PDT,
                     one_state_param(rule, eight_bit, p[i], g[i], s[i], dir[i], needs_root ? root[i] : 0.0f, k));
  if (bad != 0)
    for (int64_t i = 0; i < len; ++i)
      if (skip[i]) store_from_float(t.param, start + i, PDT, p[i]);  // widening and rounding back is exact
  codec.requantise(pending, 6, 8);
  if (eight_bit) {
    const float new_a1 = block_absmax(s, len);
    t.absmax1[start / kOptimizerBlock] = new_a1;
    pending.s = s, pending.len = len, pending.absmax = new_a1, pending.q = q1;
  } else {
    memcpy(s32, s, (size_t)len * sizeof(float));
  }
  return bad;
}

}  // namespace scalar

// ---- helpers of the drivers ----

// Calls f(std::integral_constant<int, dtype>) so that the block kernels are instantiated per storage type.
template <class F>
static inline auto with_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case PQ_DTYPE_FLOAT16:
      return f(std::integral_constant<int, PQ_DTYPE_FLOAT16>());
    case PQ_DTYPE_BFLOAT16:
      return f(std::integral_constant<int, PQ_DTYPE_BFLOAT16>());
    default:
      return f(std::integral_constant<int, PQ_DTYPE_FLOAT32>());
  }
}

// This thread's contiguous share of [0, total), as a static OpenMP schedule would give it.
static inline void thread_range(int64_t total, int64_t& lo, int64_t& hi) {
  const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
  lo = total * id / threads;
  hi = total * (id + 1) / threads;
}

#if PQ_SIMD
// Is the SIMD emulation `mode` of torch's CPU sqrt (cpu_sqrt.h) bit-identical to `fn`? Probes every rsqrtps table
// entry (its approximation depends on the exponent's parity and the top 12 mantissa bits) at exponents of each
// parity, among them those around kSqrtMklAvx512's scaled residual, random values over the whole range and the
// special values.
static bool sqrt_emulation_matches(pq_vsqrt_fn fn, int mode) {
  std::vector<uint32_t> probe;
  uint32_t state = 0x9E3779B9u;
  auto next = [&]() {  // xorshift32: any fixed spread of low bits will do
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    return state;
  };
  for (uint32_t exponent : {1u, 2u, 48u, 49u, 50u, 51u, 126u, 127u, 253u, 254u})
    for (uint32_t top = 0; top < 4096; ++top) probe.push_back(exponent << 23 | top << 11 | (next() & 0x7FFu));
  for (int i = 0; i < 32768; ++i) probe.push_back(next() & 0x7FFFFFFFu);
  for (int i = 0; i < 4096; ++i) probe.push_back(next() & 0x007FFFFFu);  // subnormals
  for (uint32_t special : {0x00000000u, 0x80000000u, 0x00000001u, 0x007FFFFFu, 0x00800000u, 0x7F7FF000u, 0x7F7FF001u,
                           0x7F7FFFFFu, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0x7FA00000u, 0xFFC00001u, 0xBF800000u,
                           0x80800000u, 0x80000001u, 0x3F800000u})
    probe.push_back(special);
  const int64_t n = (int64_t)probe.size();
  std::vector<float> expected(n), got(n);
  const int32_t n32 = (int32_t)n;
  fn(&n32, (const float*)probe.data(), expected.data());
  vec::sqrt_block((const float*)probe.data(), got.data(), n, mode, fn);
  return memcmp(expected.data(), got.data(), (size_t)n * sizeof(float)) == 0;
}
#endif

// How this call computes Adam's sqrt(v): IEEE when torch's is IEEE, else the emulation of the routine's MKL kernel
// once it has been checked against the installed routine, else the routine itself, once per block.
static int choose_sqrt_mode(pq_vsqrt_fn fn) {
  if (fn == nullptr) return kSqrtIeee;
#if PQ_SIMD
  static std::mutex lock;
  static pq_vsqrt_fn checked = nullptr;
  static int mode = kSqrtCall;
  std::lock_guard<std::mutex> guard(lock);
  if (checked != fn) {
    mode = kSqrtCall;
    if (vec::kEmulatesMklAvx512 && sqrt_emulation_matches(fn, kSqrtMklAvx512))
      mode = kSqrtMklAvx512;
    else if (vec::kEmulatesMklSse && sqrt_emulation_matches(fn, kSqrtMklSse))
      mode = kSqrtMklSse;
    checked = fn;
  }
  return mode;
#else
  return kSqrtCall;
#endif
}

// Calls f(std::integral_constant<int, mode>) for a mode of choose_sqrt_mode: the block kernels are instantiated per
// mode, and only for the modes this build can return.
template <class F>
static inline auto with_sqrt_mode(int mode, F&& f) {
#if PQ_AVX512
  if (mode == kSqrtMklAvx512) return f(std::integral_constant<int, kSqrtMklAvx512>());
#endif
  if (mode == kSqrtIeee) return f(std::integral_constant<int, kSqrtIeee>());
  if (mode == kSqrtCall) return f(std::integral_constant<int, kSqrtCall>());
  return f(std::integral_constant<int, kSqrtMklSse>());
}

// ---- entry points ----

void quantize_blockwise(const void* x, int32_t dtype, int64_t n, int64_t blocksize, const uint8_t* table,
                        uint8_t* q, float* absmax) {
  const int64_t blocks = block_count(n, blocksize);
  if (blocks == 0) return;
#if PQ_SIMD
  vec::QuantTable quant;
  if (vec::prepare_quant(table, quant)) {
    with_dtype(dtype, [&](auto d) {
      constexpr int DT = decltype(d)::value;
#pragma omp parallel for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * blocksize;
        vec::quantize_block<DT>(x, start, std::min(blocksize, n - start), quant, q, absmax + b);
      }
    });
    return;
  }
#endif
#pragma omp parallel
  {
    // no more than one block holds
    std::vector<float> buf(dtype == PQ_DTYPE_FLOAT32 ? 0 : (size_t)std::min(blocksize, n));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = b * blocksize;
      scalar::quantize_block(x, dtype, start, std::min(blocksize, n - start), table, q, absmax + b, buf.data());
    }
  }
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int32_t dtype) {
  const int64_t blocks = block_count(n, blocksize);
#if PQ_SIMD
  vec::DequantTable deq;
  vec::prepare_dequant(code, deq);
  // An output beyond the last-level cache goes out with non-temporal stores (blockwise_avx512.h, pq_streaming_bytes).
  const int64_t out_bytes = n * elem_size(dtype);
  const bool streaming = vec::kStreamingDequant && blocksize == kOptimizerBlock && out_bytes >= pq_streaming_bytes() &&
                         ((uintptr_t)out & 63) == 0;
  with_dtype(dtype, [&](auto d) {
    constexpr int DT = decltype(d)::value;
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        if (streaming && len == kOptimizerBlock)
          vec::dequantize_block_streaming<DT>(q, absmax[b], start, deq, out);
        else
          vec::dequantize_block<DT>(q, absmax[b], start, len, deq, out);
      }
      if (streaming) vec::stream_fence();  // before the region's closing barrier
    }
  });
#else
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * blocksize;
    scalar::dequantize_block(q, absmax[b], start, std::min(blocksize, n - start), code, out, dtype);
  }
#endif
}

namespace {
struct AdamCall {
  const float *code1, *code2;
  const uint8_t *table1, *table2;
  int32_t nonfinite;
  int sqrt_mode;
  pq_vsqrt_fn fn;
#if PQ_SIMD
  bool vector;  // the tables suit the SIMD kernels
  vec::AdamTables tables;
#endif
};
}  // namespace

// Calls f(std::integral_constant<int, value>) for a value among the listed ones (the first if none match).
template <int First, int... Rest, class F>
static inline auto with_value(int value, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    return f(std::integral_constant<int, First>());
  } else {
    if (value == First) return f(std::integral_constant<int, First>());
    return with_value<Rest...>(value, f);
  }
}

// Blocks [b0, b1) of one tensor.
static int64_t adam_blocks(const pq_adam_tensor& t, int64_t b0, int64_t b1, const AdamCall& c) {
#if PQ_SIMD
  if (c.vector) {
    return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.param_dtype, [&](auto p) {
      return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.grad_dtype, [&](auto g) {
        return with_value<kSkipElement, kPropagate>(c.nonfinite, [&](auto nf) {
          return with_sqrt_mode(c.sqrt_mode, [&](auto sm) {
            constexpr int PDT = decltype(p)::value, GDT = decltype(g)::value;
            constexpr int NF = decltype(nf)::value, SM = decltype(sm)::value;
            int64_t bad = 0;
#if PQ_AVX512
            if (t.state_bits == 8) {
              // Plain Adam without a fused loss scale on float32 tensors skips two multiplies by 1 a vector (the
              // other dtypes and sqrt modes keep one instantiation each: the build time).
              if constexpr (PDT == PQ_DTYPE_FLOAT32 && GDT == PQ_DTYPE_FLOAT32 &&
                            (SM == kSqrtIeee || SM == kSqrtMklAvx512)) {
                if (t.k.decay == 1.0f && t.k.inv_grad_scale == 1.0f)
                  return vec::adam_blocks_8bit<PDT, GDT, NF, SM, true>(t, b0, b1, c.tables, c.fn);
              }
              return vec::adam_blocks_8bit<PDT, GDT, NF, SM>(t, b0, b1, c.tables, c.fn);
            }
#endif
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t start = b * kOptimizerBlock;
              const int64_t len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
              if (t.state_bits == 8)
                bad += vec::adam_block_8bit<PDT, GDT, NF, SM>(t, start, len, c.tables, c.fn);
              else
                bad += vec::adam_block_32bit<PDT, GDT, NF, SM>(t, start, len, c.fn);
            }
            return bad;
          });
        });
      });
    });
  }
#endif
  int64_t bad = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimizerBlock;
    const int64_t len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
    if (t.state_bits == 8)
      bad += scalar::adam_block_8bit(t, start, len, c.code1, c.code2, c.table1, c.table2, c.nonfinite, c.fn);
    else
      bad += scalar::adam_block_32bit(t, start, len, c.nonfinite, c.fn);
  }
  return bad;
}

// One call for a whole parameter group: the blocks of all tensors form one index space split
// statically over the threads; each thread walks the tensors of its share in order, calling
// blocks(tensor index, first block, end block). Returns the sum of what `blocks` returns.
template <class Tensor, class Blocks>
static int64_t over_group_blocks(const Tensor* tensors, int32_t count, Blocks&& blocks) {
  std::vector<int64_t> first_block(count + 1, 0);
  for (int32_t i = 0; i < count; ++i)
    first_block[i + 1] = first_block[i] + block_count(tensors[i].numel, kOptimizerBlock);
  const int64_t total = first_block[count];
  if (total == 0) return 0;
  int64_t bad = 0;
#pragma omp parallel reduction(+ : bad)
  {
    int64_t lo, hi;
    thread_range(total, lo, hi);
    if (lo < hi) {
      int32_t ti = (int32_t)(std::upper_bound(first_block.begin(), first_block.end(), lo) - first_block.begin()) - 1;
      for (int64_t gb = lo; gb < hi;) {
        while (first_block[ti + 1] <= gb) ++ti;  // steps over empty tensors
        const int64_t end = std::min(hi, first_block[ti + 1]);
        bad += blocks(ti, gb - first_block[ti], end - first_block[ti]);
        gb = end;
      }
    }
  }
  return bad;
}

// Returns the number of non-finite gradient elements seen.
int64_t adam_step(const pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                  const uint8_t* table1, const uint8_t* table2, int32_t nonfinite) {
  AdamCall c;
  c.code1 = code1;
  c.code2 = code2;
  c.table1 = table1;
  c.table2 = table2;
  c.nonfinite = nonfinite;
  c.fn = pq_cpu_sqrt;
  c.sqrt_mode = choose_sqrt_mode(c.fn);
#if PQ_SIMD
  c.vector = vec::prepare_quant(table1, c.tables.quant1) && vec::prepare_quant(table2, c.tables.quant2);
  vec::prepare_dequant(code1, c.tables.deq1);
  vec::prepare_dequant(code2, c.tables.deq2);
#endif
  return over_group_blocks(tensors, count, [&](int32_t ti, int64_t b0, int64_t b1) {
    return adam_blocks(tensors[ti], b0, b1, c);
  });
}

// An 8-bit state's dequantisation and requantisation: the SIMD builds' block kernels (Adam's; the same bits as the
// rules) where the tables suit them, else the rules element by element.
struct StateCodec {
  const float* code;
  const uint8_t* table;
#if PQ_SIMD
  bool vector;
  vec::QuantTable quant_table;
  vec::DequantTable dequant_table;
#endif
  StateCodec(const float* code_, const uint8_t* table_) : code(code_), table(table_) {
#if PQ_SIMD
    vector = vec::prepare_quant(table, quant_table);
    vec::prepare_dequant(code, dequant_table);
#endif
  }
  void dequantize(const uint8_t* q, float absmax, int64_t len, float* out) const {
#if PQ_SIMD
    if (vector) return vec::dequantize_block<PQ_DTYPE_FLOAT32>(q, absmax, 0, len, dequant_table, out);
#endif
    scalar::dequantize_block(q, absmax, 0, len, code, out, PQ_DTYPE_FLOAT32);
  }
  void quantize(const float* s, int64_t len, float absmax, uint8_t* q) const {
#if PQ_SIMD
    if (vector) return vec::quantize_values<PQ_DTYPE_FLOAT32>(s, 0, len, absmax, quant_table, q);
#endif
    scalar::quantize_values(s, len, absmax, table, q);
  }
  // Stages [s0, s1) of 8 of a pending requantisation, which is done once stage 7 has run. The avx512vbmi build takes
  // a full block with a finite inverse a stage at a time (vec::search_stage), so that the next block's loops run
  // between them; any other block is requantised at once in stage 0.
  void requantise(scalar::PendingState& p, int s0, int s1) const {
    if (!p.s) return;
#if PQ_AVX512_VBMI
    if (vector && p.len == kOptimizerBlock && vec::quantizes_unclamped(p.absmax)) {
      const __m512 inv = _mm512_set1_ps(block_inverse(p.absmax));
      for (int s = s0; s < s1; ++s) vec::search_stage(s, p.search, p.s, inv, quant_table, p.q);
      if (s1 == 8) p.s = nullptr;
      return;
    }
#else
    (void)s1;
#endif
    if (s0 == 0) {
      quantize(p.s, p.len, p.absmax, p.q);
      p.s = nullptr;
    }
  }
};

// The one-state rules run the per-element code of every build (the scalar rules, compiled for the build's
// instruction set without contraction: the same bits on each), with the SIMD dequantisation and requantisation.
int64_t one_state_step(const pq_one_state_tensor* tensors, int32_t count, const float* code1, const uint8_t* table1,
                       int32_t rule, int32_t nonfinite) {
  const pq_vsqrt_fn fn = pq_cpu_sqrt;
  const int sqrt_mode = choose_sqrt_mode(fn);
  const StateCodec codec(code1, table1);
  return with_value<PQ_RULE_MOMENTUM, PQ_RULE_LION, PQ_RULE_RMSPROP, PQ_RULE_ADAGRAD>(rule, [&](auto r) {
    constexpr int RULE = decltype(r)::value;
    return over_group_blocks(tensors, count, [&](int32_t ti, int64_t b0, int64_t b1) {
      const pq_one_state_tensor& t = tensors[ti];
      return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.param_dtype, [&](auto p) {
        return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.grad_dtype, [&](auto g) {
          constexpr int PDT = decltype(p)::value, GDT = decltype(g)::value;
          int64_t bad = 0;
          // A block's and the one before's, whose requantisation may be pending.
          alignas(64) float states[2][kOptimizerBlock];
          scalar::PendingState pending;
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t start = b * kOptimizerBlock;
            const int64_t len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
            bad += scalar::one_state_block<RULE, PDT, GDT>(t, start, len, codec, nonfinite, sqrt_mode, fn,
                                                           states[b & 1], pending);
          }
          codec.requantise(pending, 0, 8);
          return bad;
        });
      });
    });
  });
}

// ---- AdEMAMix (docs/numerics.md, "AdEMAMix"): the one-state step's layout with three states ----

// A state block's new absmax and its codes: the SIMD builds find the absmax with vector max instructions (a scalar
// running max is one serial chain per state, which took a third of the step with three states).
static inline float requantize_state(const StateCodec& codec, const float* s, int64_t len, uint8_t* q) {
  float absmax;
#if PQ_SIMD
  if (codec.vector) {
    vec::quantize_block<PQ_DTYPE_FLOAT32>(s, 0, len, codec.quant_table, q, &absmax);
    return absmax;
  }
#endif
  absmax = block_absmax(s, len);
  codec.quantize(s, len, absmax, q);
  return absmax;
}

namespace scalar {

// One block of an AdEMAMix step (8-bit or float32 states), in the order of bitsandbytes' CPU code: the three
// states, the block's square roots, the parameters, the requantisation. state1 holds m1 then m2 (numel apart),
// absmax1 their scales (`blocks` apart). Branch-free loops, so that they vectorise.
template <int PDT, int GDT>
static inline int64_t ademamix_block(const pq_ademamix_tensor& t, int64_t start, int64_t len, const StateCodec& codec1,
                                     const StateCodec& codec2, int32_t nonfinite, int sqrt_mode, pq_vsqrt_fn fn) {
  float m1[kOptimizerBlock], m2[kOptimizerBlock], nu[kOptimizerBlock], root[kOptimizerBlock], p[kOptimizerBlock],
      grad[kOptimizerBlock];
  bool skip[kOptimizerBlock];
  const pq_ademamix_constants k = t.k;  // a local copy: the parameter stores cannot alias it
  const bool eight_bit = t.state_bits == 8;
  const int64_t n = t.numel, b = start / kOptimizerBlock, blocks = block_count(n, kOptimizerBlock);
  uint8_t* q1 = (uint8_t*)t.state1 + start;
  uint8_t* q2 = q1 + n;
  uint8_t* q3 = (uint8_t*)t.state2 + start;
  float* f1 = (float*)t.state1 + start;
  float* f2 = f1 + n;
  float* f3 = (float*)t.state2 + start;
  const size_t bytes = (size_t)len * sizeof(float);
  if (eight_bit) {
    codec1.dequantize(q1, t.absmax1[b], len, m1);
    codec1.dequantize(q2, t.absmax1[blocks + b], len, m2);
    codec2.dequantize(q3, t.absmax2[b], len, nu);
  } else {
    memcpy(m1, f1, bytes);
    memcpy(m2, f2, bytes);
    memcpy(nu, f3, bytes);
  }
  const uint32_t nonfinite_seen = load_block<PDT, GDT>(t, start, len, k.inv_grad_scale, grad, p);
  int64_t bad = 0;
  with_skips_if_needed(nonfinite, nonfinite_seen, [&](auto may_skip) {
    for (int64_t i = 0; i < len; ++i) {
      const float g = grad[i];
      float a = m1[i], c = m2[i], v = nu[i];
      ademamix_moments(g, a, c, v, k);
      if constexpr (decltype(may_skip)::value) {
        const uint32_t keep = !is_finite(g);  // 1: keeps its parameter and states
        bad += keep;
        m1[i] = kept_or_updated(keep, m1[i], a);
        m2[i] = kept_or_updated(keep, m2[i], c);
        nu[i] = kept_or_updated(keep, nu[i], v);
        skip[i] = keep;
      } else {
        m1[i] = a;
        m2[i] = c;
        nu[i] = v;
      }
    }
  });
  moment_sqrt(nu, root, len, sqrt_mode, fn);
  // Every element, then the skipped ones put back (rare): a select in this loop kept GCC from vectorising it.
  for (int64_t i = 0; i < len; ++i)
    store_from_float(t.param, start + i, PDT, ademamix_param_given_sqrt(p[i], m1[i], m2[i], root[i], k));
  if (bad != 0)
    for (int64_t i = 0; i < len; ++i)
      if (skip[i]) store_from_float(t.param, start + i, PDT, p[i]);  // widening and rounding back is exact
  if (eight_bit) {
    t.absmax1[b] = requantize_state(codec1, m1, len, q1);
    t.absmax1[blocks + b] = requantize_state(codec1, m2, len, q2);
    t.absmax2[b] = requantize_state(codec2, nu, len, q3);
  } else {
    memcpy(f1, m1, bytes);
    memcpy(f2, m2, bytes);
    memcpy(f3, nu, bytes);
  }
  return bad;
}

}  // namespace scalar

// Returns the number of non-finite gradient elements seen.
int64_t ademamix_step(const pq_ademamix_tensor* tensors, int32_t count, const float* code1, const float* code2,
                      const uint8_t* table1, const uint8_t* table2, int32_t nonfinite) {
  const pq_vsqrt_fn fn = pq_cpu_sqrt;
  const int sqrt_mode = choose_sqrt_mode(fn);
  const StateCodec codec1(code1, table1), codec2(code2, table2);
  return over_group_blocks(tensors, count, [&](int32_t ti, int64_t b0, int64_t b1) {
    const pq_ademamix_tensor& t = tensors[ti];
    return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.param_dtype, [&](auto p) {
      return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.grad_dtype, [&](auto g) {
        constexpr int PDT = decltype(p)::value, GDT = decltype(g)::value;
        int64_t bad = 0;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * kOptimizerBlock;
          const int64_t len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
          bad += scalar::ademamix_block<PDT, GDT>(t, start, len, codec1, codec2, nonfinite, sqrt_mode, fn);
        }
        return bad;
      });
    });
  });
}

// ---- the trust ratios' norm passes (docs/numerics.md, "LAMB and LARS") ----
// Per tensor, the sums of squares of the parameter and of the direction the ratio scales. Each block's squares
// (in double: a float32 square is exact there) are summed pairwise (halving_sum over 256 slots, zero past the
// end), each block by the thread that owns it; then, after the parallel region, each tensor's block sums are summed
// pairwise in block order. Neither order depends on the thread count, so neither do the sums. Nothing but `sums`
// is written: the step that follows recomputes the moments from the same states.

// The pairwise sum of a tensor's block sums (`count` of them, `stride` apart), zero-padded to a power of two.
static double sum_of_blocks(const double* partial, int64_t count, int64_t stride) {
  int64_t n = 1;
  while (n < count) n *= 2;
  std::vector<double> x((size_t)n, 0.0);
  for (int64_t b = 0; b < count; ++b) x[(size_t)b] = partial[b * stride];
  return halving_sum(x.data(), n);
}

// Runs block(tensor, block, out) over every block of the group (out: that block's two sums), then reduces.
template <class Tensor, class Block>
static void group_norms(const Tensor* tensors, int32_t count, double* sums, Block&& block) {
  std::vector<int64_t> first(count + 1, 0);
  for (int32_t i = 0; i < count; ++i) first[i + 1] = first[i] + block_count(tensors[i].numel, kOptimizerBlock);
  std::vector<double> partial((size_t)(2 * first[count]), 0.0);
  over_group_blocks(tensors, count, [&](int32_t ti, int64_t b0, int64_t b1) -> int64_t {
    for (int64_t b = b0; b < b1; ++b) block(tensors[ti], b, &partial[(size_t)(2 * (first[ti] + b))]);
    return 0;
  });
  for (int32_t i = 0; i < count; ++i)
    for (int j = 0; j < 2; ++j)
      sums[2 * i + j] = sum_of_blocks(partial.data() + 2 * first[i] + j, first[i + 1] - first[i], 2);
}

// out[0] = the pairwise sum of p^2 over a block, out[1] of d^2 (`len` values each; zero past them).
static inline void block_square_sums(const float* p, const float* d, int64_t len, double* out) {
  double sp[kOptimizerBlock], sd[kOptimizerBlock];
  for (int64_t i = 0; i < len; ++i) {
    const double x = (double)p[i], y = (double)d[i];
    sp[i] = x * x;
    sd[i] = y * y;
  }
  for (int64_t i = len; i < kOptimizerBlock; ++i) sp[i] = sd[i] = 0.0;
  out[0] = halving_sum(sp, kOptimizerBlock);
  out[1] = halving_sum(sd, kOptimizerBlock);
}

namespace scalar {

// One block of LAMB's norm pass: the step's moments (adam_moments, from the same states and unscaled gradients),
// the block's square roots (moment_sqrt, as the step's), the direction r (lamb_direction; 0 for a skipped element),
// the two sums. The dtypes are compile-time constants and the loops branch-free, so that they vectorise.
template <int PDT, int GDT>
static inline void lamb_norm_block(const pq_adam_tensor& t, int64_t b, const StateCodec& codec1,
                                   const StateCodec& codec2, int32_t nonfinite, int sqrt_mode, pq_vsqrt_fn fn,
                                   double* out) {
  float m[kOptimizerBlock], v[kOptimizerBlock], root[kOptimizerBlock], p[kOptimizerBlock], r[kOptimizerBlock],
      grad[kOptimizerBlock];
  uint32_t skip[kOptimizerBlock];
  const pq_adam_constants k = t.k;  // a local copy: no store below can alias it
  const int64_t start = b * kOptimizerBlock, len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
  if (t.state_bits == 8) {
    codec1.dequantize((const uint8_t*)t.state1 + start, t.absmax1[b], len, m);
    codec2.dequantize((const uint8_t*)t.state2 + start, t.absmax2[b], len, v);
  } else {
    memcpy(m, (const float*)t.state1 + start, (size_t)len * sizeof(float));
    memcpy(v, (const float*)t.state2 + start, (size_t)len * sizeof(float));
  }
  const uint32_t nonfinite_seen = load_block<PDT, GDT>(t, start, len, k.inv_grad_scale, grad, p);
  uint32_t skipped = 0;
  with_skips_if_needed(nonfinite, nonfinite_seen, [&](auto may_skip) {
    for (int64_t i = 0; i < len; ++i) {
      float a = m[i], c = v[i];
      adam_moments(grad[i], a, c, k);
      if constexpr (decltype(may_skip)::value) {
        const uint32_t keep = !is_finite(grad[i]);  // the step leaves it: no part of the direction
        m[i] = kept_or_updated(keep, m[i], a);
        v[i] = kept_or_updated(keep, v[i], c);
        skip[i] = keep;
        skipped |= keep;
      } else {
        m[i] = a;
        v[i] = c;
      }
    }
  });
  moment_sqrt(v, root, len, sqrt_mode, fn);
  for (int64_t i = 0; i < len; ++i) r[i] = lamb_direction(p[i], m[i], root[i], k);
  if (skipped)
    for (int64_t i = 0; i < len; ++i) r[i] = kept_or_updated(skip[i], 0.0f, r[i]);  // a skipped element: 0
  block_square_sums(p, r, len, out);
}

// One block of LARS' norm pass: d = decayed_grad (0 for a skipped element), the two sums.
template <int PDT, int GDT>
static inline void lars_norm_block(const pq_one_state_tensor& t, int64_t b, int32_t nonfinite, double* out) {
  float p[kOptimizerBlock], d[kOptimizerBlock];
  const pq_one_state_constants k = t.k;
  const int64_t start = b * kOptimizerBlock, len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
  const uint32_t skip_mode = nonfinite == kSkipElement;
  for (int64_t i = 0; i < len; ++i) p[i] = load_as_float(t.param, start + i, PDT);
  for (int64_t i = 0; i < len; ++i) {
    const float g = unscaled_grad(load_as_float(t.grad, start + i, GDT), k.inv_grad_scale, GDT);
    d[i] = kept_or_updated(skip_mode & !is_finite(g), 0.0f, decayed_grad(p[i], g, k));  // a skipped element: 0
  }
  block_square_sums(p, d, len, out);
}

}  // namespace scalar

// Calls f(PDT, GDT) (std::integral_constant each) for a tensor's parameter and gradient dtypes.
template <class F>
static inline void with_dtypes(int32_t param_dtype, int32_t grad_dtype, F&& f) {
  with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(param_dtype, [&](auto p) {
    with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(grad_dtype, [&](auto g) { f(p, g); });
  });
}

void lamb_norms(const pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                const uint8_t* table1, const uint8_t* table2, int32_t nonfinite, double* sums) {
  const pq_vsqrt_fn fn = pq_cpu_sqrt;
  const int sqrt_mode = choose_sqrt_mode(fn);
  const StateCodec codec1(code1, table1), codec2(code2, table2);
  group_norms(tensors, count, sums, [&](const pq_adam_tensor& t, int64_t b, double* out) {
    with_dtypes(t.param_dtype, t.grad_dtype, [&](auto p, auto g) {
      constexpr int PDT = decltype(p)::value, GDT = decltype(g)::value;
      scalar::lamb_norm_block<PDT, GDT>(t, b, codec1, codec2, nonfinite, sqrt_mode, fn, out);
    });
  });
}

void lars_norms(const pq_one_state_tensor* tensors, int32_t count, int32_t nonfinite, double* sums) {
  group_norms(tensors, count, sums, [&](const pq_one_state_tensor& t, int64_t b, double* out) {
    with_dtypes(t.param_dtype, t.grad_dtype, [&](auto p, auto g) {
      constexpr int PDT = decltype(p)::value, GDT = decltype(g)::value;
      scalar::lars_norm_block<PDT, GDT>(t, b, nonfinite, out);
    });
  });
}

}  // namespace PQ_NS
