// AVX2 (+FMA, F16C) block kernels of block-wise quantisation and the 8-bit Adam step, included by
// blockwise.cpp in its avx2 build only (the loads, stores and conversions they use are isa.h's).
//
// Same bits as the scalar rules of pyquant/blockwise.h. AVX2 has no two-table permutes and no mask
// registers, so the lookups (the 256 codes for dequantisation, the 65536-entry table for quantisation) are
// scalar loads put into vectors: on AMD Zen 3 a gather of 8 lanes took about 10 cycles, more than the
// 8 loads and inserts (bench/NOTES.md). A partial vector at the end of a block goes through a zero-padded
// copy. Only IEEE-exact operations, in the contract's order; fma only where it has fmaf, and in the grid bin (checked).
#pragma once
#include "isa.h"

#include <type_traits>
#include <utility>

#include "cpu_sqrt.h"
#include "pyquant/capi.h"

namespace PQ_NS {
namespace vec {
using namespace pq;

// The length of a full optimizer block, as a type: converts to int64_t and is known at compile time.
using FullBlock = std::integral_constant<int64_t, kOptimizerBlock>;

// The emulations of torch's CPU sqrt this build has (cpu_sqrt.h): not MKL's AVX-512 kernel, which needs rsqrt14.
constexpr bool kEmulatesMklSse = true, kEmulatesMklAvx512 = false;

// The lanes of the vector at offset j of a block of length len (8 but at a partial end); a compile-time 8
// for full blocks, whose loops then carry no tail masks.
template <class Len>
PQ_INLINE int64_t lanes_at(Len len, int64_t j) {
  if constexpr (std::is_same_v<Len, FullBlock>) return 8;
  return len - j < 8 ? len - j : 8;
}

// ---- dequantisation ----

struct DequantTable {
  const float* code;
};
static inline void prepare_dequant(const float* code, DequantTable& t) { t.code = code; }

// code[q[0..n-1]] (code[0] in lanes n..7), from scalar loads.
PQ_INLINE __m256 codes8(const DequantTable& t, const uint8_t* q, int64_t n) {
  uint8_t padded[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (n < 8) q = (const uint8_t*)memcpy(padded, q, (size_t)n);
  const float* c = t.code;
  return _mm256_setr_ps(c[q[0]], c[q[1]], c[q[2]], c[q[3]], c[q[4]], c[q[5]], c[q[6]], c[q[7]]);
}

// ---- quantisation ----

struct QuantTable {
  const uint8_t* table;
};
static inline bool prepare_quant(const uint8_t* table, QuantTable& t) {
  t.table = table;
  return true;
}

// grid_bin, lane by lane, as 16-bit bins. With a finite inverse the clamps cannot act: |x| <= absmax makes
// |x * inv| at most 1 + 2^-24 before rounding, so 1 after; NaN passes either way. An absmax below 2^-128 has an
// infinite inverse, and the clamps then turn infinite y into the end bins.
template <bool Clamp>
PQ_INLINE __m128i grid_bins(__m256 x, __m256 inv) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  __m256 y = _mm256_mul_ps(x, inv);
  if constexpr (Clamp) {
    // vminps/vmaxps return the second operand when either is NaN: with y second, NaN passes like in grid_bin.
    y = _mm256_min_ps(one, y);
    y = _mm256_max_ps(_mm256_set1_ps(-1.0f), y);
  }
  // t = (y + 1) * 0.5 is exact (y + 1 is 0 or at least 2^-24), so t * 65535 rounds exactly like
  // (y + 1) * 32767.5: one multiply fewer, same bits. The multiply and the + 0.5 as one fused multiply-add give the
  // same bins as the contract's two roundings for every y in [-1, 1] (bench/micro/grid_fma_exhaustive.cpp checks all
  // 2^31 of them); NaN stays NaN.
  const __m256 s = _mm256_fmadd_ps(_mm256_add_ps(y, one), _mm256_set1_ps(32767.5f), half);
  // NaN converts to 0x80000000, negative as a signed lane, which the unsigned saturation packs to bin 0.
  const __m256i b = _mm256_cvttps_epi32(s);
  return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

// table[bins[0..15]] as 16 bytes: scalar loads put in place with byte inserts (on this class of CPU faster than
// a gather, and than assembling the bytes in a general register).
template <size_t... K>
PQ_INLINE __m128i table_lookup16(const uint8_t* table, const uint16_t* bins, std::index_sequence<K...>) {
  __m128i r = _mm_setzero_si128();
  ((r = _mm_insert_epi8(r, table[bins[K]], K)), ...);
  return r;
}

// q[i] = table[bins[i]] for i < n.
PQ_INLINE void table_lookups(const uint8_t* table, const uint16_t* bins, int64_t n, uint8_t* q) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128((__m128i*)(q + i), table_lookup16(table, bins + i, std::make_index_sequence<16>()));
  for (; i < n; ++i) q[i] = table[bins[i]];
}

// grid_bins with the clamps only where the block's inverse absmax is infinite (the branch is the same for every
// vector of a block).
PQ_INLINE __m128i grid_bins(__m256 x, __m256 inv, bool infinite_inverse) {
  return infinite_inverse ? grid_bins<true>(x, inv) : grid_bins<false>(x, inv);
}

// The grid bins of a full block of float32 values with a nonzero absmax.
PQ_INLINE void grid_bins_block(const float* x, float absmax, uint16_t* bins) {
  const float inverse = block_inverse(absmax);
  const __m256 inv = _mm256_set1_ps(inverse);
  if (is_finite(inverse)) {
    for (int64_t i = 0; i < kOptimizerBlock; i += 8)
      _mm_store_si128((__m128i*)(bins + i), grid_bins<false>(_mm256_load_ps(x + i), inv));
  } else {
    for (int64_t i = 0; i < kOptimizerBlock; i += 8)
      _mm_store_si128((__m128i*)(bins + i), grid_bins<true>(_mm256_load_ps(x + i), inv));
  }
}

template <int DT, class Len>
PQ_INLINE void quantize_values(const void* x, int64_t start, Len len, float absmax, const QuantTable& t,
                                   uint8_t* q) {
  if (absmax == 0.0f) {
    for (int64_t i = 0; i < len; ++i) q[i] = 0;  // a memset of (size_t)len made GCC warn about negative lengths
    return;
  }
  const float inverse = block_inverse(absmax);
  const __m256 inv = _mm256_set1_ps(inverse);
  // The bins of a chunk first, then its lookups: one loop doing both per vector ran 1.2x slower.
  alignas(32) uint16_t bins[kOptimizerBlock];
  for (int64_t c = 0; c < len; c += kOptimizerBlock) {
    const int64_t cl = len - c < kOptimizerBlock ? len - c : kOptimizerBlock;
    for (int64_t i = 0; i < cl; i += 8)
      _mm_store_si128((__m128i*)(bins + i),
                      grid_bins(load8<DT>(x, start + c + i, cl - i < 8 ? cl - i : 8), inv, !is_finite(inverse)));
    table_lookups(t.table, bins, cl, q + c);
  }
}

template <int DT, class Len>
PQ_INLINE void quantize_block_impl(const void* x, int64_t start, Len len, const QuantTable& t, uint8_t* q,
                                       float* absmax) {
  __m256 amax = _mm256_setzero_ps();  // vmaxps keeps the running value when |x| is NaN
  for (int64_t i = 0; i < len; i += 8) amax = _mm256_max_ps(abs8(load8<DT>(x, start + i, len - i < 8 ? len - i : 8)), amax);
  const float a = hmax8(amax);
  *absmax = a;
  quantize_values<DT>(x, start, len, a, t, q + start);
}

template <int DT, class Len>
PQ_INLINE void dequantize_block_impl(const uint8_t* q, float absmax, int64_t start, Len len, const DequantTable& t,
                                         void* out) {
  const __m256 a = _mm256_set1_ps(absmax);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t i = 0; i < len; i += 8) {
    const int64_t n = lanes_at(len, i);
    store8<DT>(out, start + i, n, _mm256_mul_ps(codes8(t, q + start + i, n), a), all);
  }
}

// Blocks of the optimizers' size take instantiations with a compile-time length (see adam_block_8bit).
template <int DT>
static inline void quantize_block(const void* x, int64_t start, int64_t len, const QuantTable& t, uint8_t* q,
                                  float* absmax) {
  if (len == kOptimizerBlock)
    quantize_block_impl<DT>(x, start, FullBlock(), t, q, absmax);
  else
    quantize_block_impl<DT>(x, start, len, t, q, absmax);
}

template <int DT>
static inline void dequantize_block(const uint8_t* q, float absmax, int64_t start, int64_t len, const DequantTable& t,
                                    void* out) {
  if (len == kOptimizerBlock)
    dequantize_block_impl<DT>(q, absmax, start, FullBlock(), t, out);
  else
    dequantize_block_impl<DT>(q, absmax, start, len, t, out);
}

// No streaming variant here (see blockwise_avx512.h): the AVX2 path is a fallback.
template <int DT>
static inline void dequantize_block_streaming(const uint8_t* q, float absmax, int64_t start, const DequantTable& t,
                                              void* out) {
  dequantize_block<DT>(q, absmax, start, kOptimizerBlock, t, out);
}
constexpr bool kStreamingDequant = false;
static inline void stream_fence() {}

// ---- sqrt(v) of Adam's denominator: IEEE, or torch's CPU sqrt emulated (kSqrtMklSse; blockwise_avx512.h, cpu_sqrt.h) ----

// Lanes whose inputs need the routine itself come back in `needs_routine` (all-ones lanes), for the caller
// to handle outside its loop.
PQ_INLINE __m256 sqrt8(__m256 x, int mode, __m256& needs_routine) {
  needs_routine = _mm256_setzero_ps();
  if (mode == kSqrtIeee) return _mm256_sqrt_ps(x);
  const __m256 r = _mm256_rsqrt_ps(x);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 s0 = _mm256_mul_ps(x, r);
  // h0 = r * 0.5 exactly, as an exponent decrement (see blockwise_avx512.h).
  const __m256 h0 = _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_castps_si256(r), _mm256_set1_epi32(0x00800000)));
  const __m256 e = _mm256_sub_ps(half, _mm256_mul_ps(s0, h0));
  const __m256 s1 = _mm256_add_ps(_mm256_mul_ps(s0, e), s0);
  const __m256 h1 = _mm256_add_ps(_mm256_mul_ps(h0, e), h0);
  const __m256 d = _mm256_sub_ps(x, _mm256_mul_ps(s1, s1));
  const __m256 res = _mm256_add_ps(_mm256_mul_ps(d, h1), s1);
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i special =
      _mm256_cmpgt_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(kCpuSqrtBias)), _mm256_set1_epi32(kCpuSqrtLimit));
  const __m256i zero = _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_setzero_si256());
  needs_routine = _mm256_castsi256_ps(_mm256_andnot_si256(zero, special));
  return _mm256_blendv_ps(res, x, _mm256_castsi256_ps(zero));  // the routine returns +-0 unchanged
}

static inline void sqrt_block(const float* x, float* out, int64_t n, int mode, pq_vsqrt_fn fn) {
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t c = n - i < 8 ? n - i : 8;
    alignas(32) float in[8], r[8], routine[8];
    const __m256 xv = load8<PQ_DTYPE_FLOAT32>(x, i, c);
    __m256 rest;
    __m256 res = sqrt8(xv, mode, rest);
    if (_mm256_movemask_ps(rest)) {
      _mm256_store_ps(in, xv);
      const int32_t n8 = 8;
      fn(&n8, in, routine);  // element-wise: each lane's result depends on that lane only
      res = _mm256_blendv_ps(res, _mm256_load_ps(routine), rest);
    }
    _mm256_store_ps(r, res);
    memcpy(out + i, r, (size_t)c * 4);
  }
}

// ---- Adam ----

// Touching the data a few blocks ahead hides memory latency (see blockwise_avx512.h).
constexpr int64_t kPrefetchBlocks = 2;

PQ_INLINE void prefetch_block(const pq_adam_tensor& t, int64_t start, int64_t param_bytes, int64_t grad_bytes,
                              int64_t state_bytes) {
  const int64_t ahead = start + kPrefetchBlocks * kOptimizerBlock;
  if (ahead >= t.numel) return;
  const int64_t n = t.numel - ahead < kOptimizerBlock ? t.numel - ahead : kOptimizerBlock;
  const void* streams[4] = {(const char*)t.param + ahead * param_bytes, (const char*)t.grad + ahead * grad_bytes,
                            (const char*)t.state1 + ahead * state_bytes, (const char*)t.state2 + ahead * state_bytes};
  const int64_t bytes[4] = {n * param_bytes, n * grad_bytes, n * state_bytes, n * state_bytes};
  for (int s = 0; s < 4; ++s)
    for (int64_t o = 0; o < bytes[s]; o += 64) _mm_prefetch((const char*)streams[s] + o, _MM_HINT_T0);
}

struct AdamTables {
  DequantTable deq1, deq2;
  QuantTable quant1, quant2;
};

struct AdamVectors {
  __m256 beta1, one_minus_beta1, beta2, one_minus_beta2, eps, eps_c2, c2, step_size, decay, inv_grad_scale;
  explicit AdamVectors(const pq_adam_constants& k)
      : beta1(_mm256_set1_ps(k.beta1)), one_minus_beta1(_mm256_set1_ps(k.one_minus_beta1)),
        beta2(_mm256_set1_ps(k.beta2)), one_minus_beta2(_mm256_set1_ps(k.one_minus_beta2)),
        eps(_mm256_set1_ps(k.eps)), eps_c2(_mm256_set1_ps(k.eps_c2)), c2(_mm256_set1_ps(k.c2)),
        step_size(_mm256_set1_ps(k.step_size)), decay(_mm256_set1_ps(k.decay)),
        inv_grad_scale(_mm256_set1_ps(k.inv_grad_scale)) {}
};

// unscaled_grad, lane by lane (always applied, see blockwise_avx512.h).
template <int GDT>
PQ_INLINE __m256 unscaled8(const AdamVectors& k, __m256 g) {
  const __m256 x = _mm256_mul_ps(g, k.inv_grad_scale);
  if constexpr (GDT == PQ_DTYPE_FLOAT16) return widen8<GDT>(to_half8(x));
  if constexpr (GDT == PQ_DTYPE_BFLOAT16) return widen8<GDT>(to_bf16_8(x));
  return x;
}

PQ_INLINE void moments8(const AdamVectors& k, __m256 g, __m256& m, __m256& v) {
  m = _mm256_fmadd_ps(k.one_minus_beta1, g, _mm256_mul_ps(m, k.beta1));
  v = _mm256_fmadd_ps(_mm256_mul_ps(k.one_minus_beta2, g), g, _mm256_mul_ps(v, k.beta2));
}

PQ_INLINE __m256 param8(const AdamVectors& k, __m256 p, __m256 m, __m256 root) {
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(root, k.c2), k.eps);
  return _mm256_add_ps(_mm256_mul_ps(p, k.decay), _mm256_div_ps(_mm256_mul_ps(k.step_size, m), denom));
}

PQ_INLINE __m256 param32(const AdamVectors& k, __m256 p, __m256 m, __m256 root) {
  const __m256 u = _mm256_div_ps(m, _mm256_add_ps(root, k.eps_c2));
  return _mm256_fmadd_ps(k.step_size, u, _mm256_mul_ps(p, k.decay));
}

PQ_INLINE __m256 nonfinite8(__m256 g) {  // all-ones where the exponent is all ones (NaN, ±inf)
  const __m256i e = _mm256_and_si256(_mm256_castps_si256(g), _mm256_set1_epi32(0x7F800000));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_set1_epi32(0x7F800000)));
}

// Parameter updates left for after a block's main loop (see blockwise_avx512.h).
template <int PDT, bool EightBit>
static inline void finish_deferred(const pq_adam_tensor& t, int64_t start, int64_t len, const AdamVectors& k,
                                   const float* m, const float* v, const __m256* later, pq_vsqrt_fn fn) {
  alignas(32) float root[kOptimizerBlock];
  const int32_t n32 = (int32_t)len;
  fn(&n32, v, root);
  for (int64_t j = 0; j < len; j += 8) {
    if (!_mm256_movemask_ps(later[j / 8])) continue;
    const int64_t n = len - j < 8 ? len - j : 8;
    const __m256 p = load8<PDT>(t.param, start + j, n);
    const __m256 mj = load8<PQ_DTYPE_FLOAT32>(m, j, n), rj = load8<PQ_DTYPE_FLOAT32>(root, j, n);
    store8<PDT>(t.param, start + j, n, EightBit ? param8(k, p, mj, rj) : param32(k, p, mj, rj), later[j / 8]);
  }
}

// NONFINITE and SQRT_MODE are template parameters for the reason given in blockwise_avx512.h.
template <int PDT, int GDT, int NONFINITE, int SQRT_MODE, class Len>
PQ_INLINE int64_t adam_block_8bit_impl(const pq_adam_tensor& t, int64_t start, Len len, const AdamTables& tab,
                                           pq_vsqrt_fn fn) {
  alignas(32) float m[kOptimizerBlock], v[kOptimizerBlock];
  __m256 later[kOptimizerBlock / 8];
  int any_later = 0;
  const AdamVectors k(t.k);
  uint8_t* q1 = (uint8_t*)t.state1 + start;
  uint8_t* q2 = (uint8_t*)t.state2 + start;
  const int64_t b = start / kOptimizerBlock;
  const __m256 a1 = _mm256_set1_ps(t.absmax1[b]), a2 = _mm256_set1_ps(t.absmax2[b]);
  prefetch_block(t, start, elem_size(PDT), elem_size(GDT), 1);
  __m256 amax1, amax2;
  int64_t bad = 0;
  // Two passes, the moments and then the parameters: one loop with both had too long a dependency chain per
  // vector (two divisions, the square root) for the out-of-order window.
  // Under the skip policy the moments pass first runs as if every gradient were finite, noting only whether one
  // was not, and runs again with the per-lane skips when one was (its inputs are unchanged until the
  // requantisation at the end): the blends and counts per vector cost 3% of the step.
  __m256 upd[kOptimizerBlock / 8];
  __m256 seen_nonfinite = _mm256_setzero_ps();
  const auto moments_pass = [&](auto with_skips) {
    constexpr bool kSkips = decltype(with_skips)::value;
    amax1 = _mm256_setzero_ps();
    amax2 = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; j += 8) {
      const int64_t n = lanes_at(len, j);
      const __m256 valid = first_lanes(n);
      const __m256 m_old = _mm256_mul_ps(codes8(tab.deq1, q1 + j, n), a1);
      const __m256 v_old = _mm256_mul_ps(codes8(tab.deq2, q2 + j, n), a2);
      const __m256 g = unscaled8<GDT>(k, load8<GDT>(t.grad, start + j, n));
      __m256 mi = m_old, vi = v_old;
      moments8(k, g, mi, vi);
      upd[j / 8] = valid;
      if constexpr (kSkips) {
        const __m256 skip = _mm256_and_ps(nonfinite8(g), valid);  // keeps its parameter and moments
        bad += __builtin_popcount((unsigned)_mm256_movemask_ps(skip));
        upd[j / 8] = _mm256_andnot_ps(skip, valid);
        mi = _mm256_blendv_ps(mi, m_old, skip);
        vi = _mm256_blendv_ps(vi, v_old, skip);
      } else if constexpr (NONFINITE == kSkipElement) {
        seen_nonfinite = _mm256_or_ps(seen_nonfinite, _mm256_and_ps(nonfinite8(g), valid));
      }
      _mm256_store_ps(m + j, mi);
      _mm256_store_ps(v + j, vi);
      amax1 = _mm256_max_ps(_mm256_and_ps(abs8(mi), valid), amax1);
      amax2 = _mm256_max_ps(_mm256_and_ps(abs8(vi), valid), amax2);
    }
  };
  moments_pass(std::false_type());
  if (NONFINITE == kSkipElement && _mm256_movemask_ps(seen_nonfinite)) moments_pass(std::true_type());
  const auto update_params = [&](int64_t j) {
    __m256 rest = upd[j / 8];
    if constexpr (SQRT_MODE != kSqrtCall) {
      const int64_t n = lanes_at(len, j);
      const __m256 mi = _mm256_load_ps(m + j), root = sqrt8(_mm256_load_ps(v + j), SQRT_MODE, rest);
      rest = _mm256_and_ps(rest, upd[j / 8]);
      const __m256 p = load8<PDT>(t.param, start + j, n);
      store8<PDT>(t.param, start + j, n, param8(k, p, mi, root), _mm256_andnot_ps(rest, upd[j / 8]));
    }
    later[j / 8] = rest;
    any_later |= _mm256_movemask_ps(rest);
  };
  const float new_a1 = hmax8(amax1), new_a2 = hmax8(amax2);
  t.absmax1[b] = new_a1;
  t.absmax2[b] = new_a2;
  // In a full block the parameter updates, which mostly wait on their divisions, share a loop with the
  // requantisation's table lookups, which do not depend on them (5% of the step, bench/NOTES.md). The
  // separate quantize_values of a partial block or a zero absmax (every code 0) is the same rule.
  bool fused = false;
  if constexpr (std::is_same_v<Len, FullBlock>) {
    if (new_a1 != 0.0f && new_a2 != 0.0f) {
      alignas(32) uint16_t bins1[kOptimizerBlock], bins2[kOptimizerBlock];
      grid_bins_block(m, new_a1, bins1);
      grid_bins_block(v, new_a2, bins2);
      for (int64_t j = 0; j < kOptimizerBlock; j += 16) {
        update_params(j);
        _mm_storeu_si128((__m128i*)(q1 + j), table_lookup16(tab.quant1.table, bins1 + j, std::make_index_sequence<16>()));
        update_params(j + 8);
        _mm_storeu_si128((__m128i*)(q2 + j), table_lookup16(tab.quant2.table, bins2 + j, std::make_index_sequence<16>()));
      }
      fused = true;
    }
  }
  if (!fused) {
    for (int64_t j = 0; j < len; j += 8) update_params(j);
    quantize_values<PQ_DTYPE_FLOAT32>(m, 0, len, new_a1, tab.quant1, q1);
    quantize_values<PQ_DTYPE_FLOAT32>(v, 0, len, new_a2, tab.quant2, q2);
  }
  if (any_later) finish_deferred<PDT, true>(t, start, len, k, m, v, later, fn);
  return bad;
}

// A full block takes an instantiation where the length is a compile-time constant: with a run-time length
// GCC neither unrolled nor inlined the block's loops, and the step ran at half the speed.
template <int PDT, int GDT, int NONFINITE, int SQRT_MODE>
static inline int64_t adam_block_8bit(const pq_adam_tensor& t, int64_t start, int64_t len, const AdamTables& tab,
                                      pq_vsqrt_fn fn) {
  if (len == kOptimizerBlock)
    return adam_block_8bit_impl<PDT, GDT, NONFINITE, SQRT_MODE>(t, start, FullBlock(), tab, fn);
  return adam_block_8bit_impl<PDT, GDT, NONFINITE, SQRT_MODE>(t, start, len, tab, fn);
}

template <int PDT, int GDT, int NONFINITE, int SQRT_MODE, class Len>
PQ_INLINE int64_t adam_block_32bit_impl(const pq_adam_tensor& t, int64_t start, Len len, pq_vsqrt_fn fn) {
  __m256 later[kOptimizerBlock / 8];
  int any_later = 0;
  const AdamVectors k(t.k);
  float* m = (float*)t.state1 + start;
  float* v = (float*)t.state2 + start;
  prefetch_block(t, start, elem_size(PDT), elem_size(GDT), 4);
  int64_t bad = 0;
  for (int64_t j = 0; j < len; j += 8) {
    const int64_t n = len - j < 8 ? len - j : 8;
    const __m256 g = unscaled8<GDT>(k, load8<GDT>(t.grad, start + j, n));
    __m256 upd = first_lanes(n);
    if constexpr (NONFINITE == kSkipElement) {
      const __m256 skip = _mm256_and_ps(nonfinite8(g), upd);
      bad += __builtin_popcount((unsigned)_mm256_movemask_ps(skip));
      upd = _mm256_andnot_ps(skip, upd);
    }
    __m256 mi = load8<PQ_DTYPE_FLOAT32>(m, j, n), vi = load8<PQ_DTYPE_FLOAT32>(v, j, n);
    moments8(k, g, mi, vi);
    store8<PQ_DTYPE_FLOAT32>(m, j, n, mi, upd);
    store8<PQ_DTYPE_FLOAT32>(v, j, n, vi, upd);
    __m256 rest = upd;
    if constexpr (SQRT_MODE != kSqrtCall) {
      const __m256 root = sqrt8(vi, SQRT_MODE, rest);
      rest = _mm256_and_ps(rest, upd);
      const __m256 p = load8<PDT>(t.param, start + j, n);
      store8<PDT>(t.param, start + j, n, param32(k, p, mi, root), _mm256_andnot_ps(rest, upd));
    }
    later[j / 8] = rest;
    any_later |= _mm256_movemask_ps(rest);
  }
  // The routine reads v for the whole block; skipped lanes kept their old v, and their results are unused.
  if (any_later) finish_deferred<PDT, false>(t, start, len, k, m, v, later, fn);
  return bad;
}

template <int PDT, int GDT, int NONFINITE, int SQRT_MODE>
static inline int64_t adam_block_32bit(const pq_adam_tensor& t, int64_t start, int64_t len, pq_vsqrt_fn fn) {
  if (len == kOptimizerBlock) return adam_block_32bit_impl<PDT, GDT, NONFINITE, SQRT_MODE>(t, start, FullBlock(), fn);
  return adam_block_32bit_impl<PDT, GDT, NONFINITE, SQRT_MODE>(t, start, len, fn);
}

}  // namespace vec
}  // namespace PQ_NS
