// The instruction set of a CPU kernel file, and everything the kernel files share about it.
//
// Every csrc/cpu/*.cpp is compiled once per instruction set (CMakeLists.txt: PQ_ISA = scalar, avx2, avx512 or
// avx512vbmi, each with its own -m flags) and puts its kernels in namespace PQ_NS (pq_scalar, pq_avx2, ...); the C
// ABI files (csrc/capi*.cpp) pick one at run time (csrc/include/pyquant/dispatch.h). This header is the one place for:
// - PQ_NS, and the ISA of the build as macros: PQ_AVX512 or PQ_AVX2 is 1 in that build (both 0 in the scalar
//   one; PQ_AVX512 also in the avx512vbmi build, where PQ_AVX512_VBMI is 1 as well), PQ_SIMD is 1 in either;
// - the vector shim: the float vector of the build (fvec, kLanes lanes; a float in the scalar build) with the
//   operations the micro-kernels are written in, and the loads, stores, masks and conversions the kernels
//   share. Each wrapper is the intrinsic sequence the kernels used before they shared it, so the kernels
//   compile to the same instructions;
// - the AVX512-BF16 target attribute (the avx512 build's flags stop at AVX-512 F/BW/VL/DQ) and the run-time
//   probe that must pass before a function compiled with it runs;
// - the pragmas every file of the build needs.
#pragma once
#include <stdint.h>
#include <string.h>

#include "pyquant/blockwise.h"

#ifndef PQ_ISA
#error "csrc/cpu files are compiled once per instruction set, with PQ_ISA set (CMakeLists.txt)"
#endif
#define PQ_CAT2(a, b) a##b
#define PQ_CAT(a, b) PQ_CAT2(a, b)
#define PQ_NS PQ_CAT(pq_, PQ_ISA)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__) && defined(__F16C__)
#define PQ_AVX512 1
#define PQ_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PQ_AVX512 0
#define PQ_AVX2 1
#else
#define PQ_AVX512 0
#define PQ_AVX2 0
#endif
#define PQ_SIMD (PQ_AVX512 || PQ_AVX2)
// The avx512vbmi build: AVX-512 with the byte permutes (VBMI) and the GFNI bit permutation the 8-bit codecs use.
#if PQ_AVX512 && defined(__AVX512VBMI__) && defined(__GFNI__)
#define PQ_AVX512_VBMI 1
#else
#define PQ_AVX512_VBMI 0
#endif

#if PQ_SIMD
#include <immintrin.h>
#endif

// GCC before 13 reports the deliberately undefined pass-through operand (_mm512_undefined_ps and kin) of its
// own unmasked intrinsics as uninitialized wherever they are inlined, i.e. in every function that uses them,
// so the warning stays off for the kernel files.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Forced inlining, for the pieces of a kernel's inner loop: GCC otherwise outlined some (e.g. the block
// quantiser), kept masked loads and stores that a full block does not need, and the Adam step ran at half
// the speed.
#define PQ_INLINE __attribute__((always_inline)) static inline

// The AVX512-BF16 dot product (vdpbf16ps) is compiled into the functions marked PQ_TARGET_AVX512BF16 only, and
// such a function runs only after cpu_has_avx512bf16() said yes. PQ_BF16_DOT: this build has such functions.
#if PQ_AVX512 && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define PQ_BF16_DOT 1
#define PQ_TARGET_AVX512BF16 __attribute__((target("avx512bf16")))
#else
#define PQ_BF16_DOT 0
#endif

namespace PQ_NS {

// Bytes per element of a storage dtype (pq::DType).
constexpr int64_t elem_size(int32_t dtype) { return dtype == PQ_DTYPE_FLOAT32 ? 4 : 2; }

#if PQ_BF16_DOT
// Whether this CPU has AVX512-BF16; asked once.
static inline bool cpu_has_avx512bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}
#endif

// ---- the float vector of the build: what the micro-kernels (gemm.cpp, lowrank_conv*.cpp) are written in ----
#if PQ_AVX512
using fvec = __m512;
constexpr int kLanes = 16;
static inline fvec vzero() { return _mm512_setzero_ps(); }
static inline fvec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, fvec v) { _mm512_storeu_ps(p, v); }
static inline fvec vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline fvec vfma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(fvec a) { return _mm512_reduce_add_ps(a); }
#elif PQ_AVX2
using fvec = __m256;
constexpr int kLanes = 8;
static inline fvec vzero() { return _mm256_setzero_ps(); }
static inline fvec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, fvec v) { _mm256_storeu_ps(p, v); }
static inline fvec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline fvec vfma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(fvec a) {  // a fixed tree of sums
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
using fvec = float;
constexpr int kLanes = 1;
static inline fvec vzero() { return 0.0f; }
static inline fvec vload(const float* p) { return *p; }
static inline void vstore(float* p, fvec v) { *p = v; }
static inline fvec vbcast(const float* p) { return *p; }
static inline fvec vfma(fvec a, fvec b, fvec c) { return a * b + c; }  // two roundings: no FMA unit assumed
static inline float hsum(fvec a) { return a; }
#endif

#if PQ_AVX512
// ---- AVX-512: masks, and float16 / bfloat16 <-> float32 on 16 lanes ----

// Lanes 0 .. n-1 (all of them from n = 16 or 32), for n >= 1: the remainder of a loop that has not ended.
PQ_INLINE __mmask8 mask8(int64_t n) { return n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << n) - 1u); }
PQ_INLINE __mmask16 mask16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
PQ_INLINE __mmask32 mask32(int64_t n) { return n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1u); }
PQ_INLINE __mmask64 mask64(int64_t n) { return n >= 64 ? ~(__mmask64)0 : (__mmask64)((1ull << n) - 1ull); }
// The same for any n (none for n <= 0), for callers that may ask for an empty remainder.
static inline __mmask16 mask16_any(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
static inline __mmask32 mask32_any(int64_t n) {
  return n >= 32 ? (__mmask32)0xFFFFFFFFu : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u);
}

// 16 float16 or bfloat16 values (exactly) as float32: F16C for float16, a shift for bfloat16.
template <int DT>
PQ_INLINE __m512 widen16(__m256i h) {
  if constexpr (DT == PQ_DTYPE_FLOAT16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Elements i .. i+15 of base (dtype DT) as float32, the lanes in k only (the others 0, and not read: masked-off
// lanes never fault).
template <int DT>
PQ_INLINE __m512 load16(const void* base, int64_t i, __mmask16 k) {
  if constexpr (DT == PQ_DTYPE_FLOAT32) {
    return _mm512_maskz_loadu_ps(k, (const float*)base + i);
  } else {
    // vcvtph2ps quiets a signalling NaN where half_to_float keeps it; every loaded value goes through
    // arithmetic (which quiets it the same way) or a comparison before it can reach an output, so the
    // outputs agree.
    return widen16<DT>(_mm256_maskz_loadu_epi16(k, (const uint16_t*)base + i));
  }
}

// float32 -> float16 with the hardware's rounding to nearest even; a NaN keeps its payload.
PQ_INLINE __m256i to_half16_keep_nan(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// float_to_half: the hardware rounding, and the scalar rule's NaN (the canonical quiet NaN with the input's sign).
PQ_INLINE __m256i to_half16(__m512 v) {
  const __m256i h = to_half16_keep_nan(v);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
  const __m256i quiet = _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7E00)));
  return _mm256_mask_blend_epi16(nan, h, quiet);
}

// float_to_bf16, the integer rounding of blockwise.h lane by lane (NaN stays a quiet NaN).
PQ_INLINE __m256i to_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// Stores the lanes in k of v at elements i .. i+15 of base, rounded once to dtype DT as store_from_float does.
template <int DT>
PQ_INLINE void store16(void* base, int64_t i, __m512 v, __mmask16 k) {
  if constexpr (DT == PQ_DTYPE_FLOAT32)
    _mm512_mask_storeu_ps((float*)base + i, k, v);
  else if constexpr (DT == PQ_DTYPE_FLOAT16)
    _mm256_mask_storeu_epi16((uint16_t*)base + i, k, to_half16(v));
  else
    _mm256_mask_storeu_epi16((uint16_t*)base + i, k, to_bf16_16(v));
}
#endif

#if PQ_AVX2
// ---- AVX2: float16 / bfloat16 <-> float32 on 8 lanes; partial vectors through a zero-padded copy (AVX2 has no
// masked loads and stores of 16-bit elements) ----

// 8 float16 or bfloat16 values (exactly) as float32.
template <int DT>
PQ_INLINE __m256 widen8(__m128i h) {
  if constexpr (DT == PQ_DTYPE_FLOAT16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Elements i .. i+n-1 (n <= 8) of base (dtype DT) as float32, zero beyond n.
template <int DT>
PQ_INLINE __m256 load8(const void* base, int64_t i, int64_t n) {
  const char* src = (const char*)base + i * elem_size(DT);
  alignas(32) char pad[32];
  if (n < 8) {
    memset(pad, 0, sizeof pad);
    memcpy(pad, src, (size_t)(n * elem_size(DT)));
    src = pad;
  }
  if constexpr (DT == PQ_DTYPE_FLOAT32) {
    return _mm256_loadu_ps((const float*)src);
  } else {
    const __m128i h = _mm_loadu_si128((const __m128i*)src);
    // vcvtph2ps quiets a signalling NaN; every loaded value reaches an output only through arithmetic
    // (which quiets it the same way) or comparisons, so the outputs agree with half_to_float's.
    return widen8<DT>(h);
  }
}

PQ_INLINE __m128i pack_u32_to_u16(__m256i w) {  // every lane must be in [0, 65535]
  return _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

// float32 -> float16 with the hardware's rounding to nearest even; a NaN keeps its payload.
PQ_INLINE __m128i to_half8_keep_nan(__m256 v) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// float_to_half: the hardware rounding, then the scalar rule's canonical NaN.
PQ_INLINE __m128i to_half8(__m256 v) {
  const __m128i h = to_half8_keep_nan(v);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000));
  const __m128i quiet = pack_u32_to_u16(_mm256_or_si256(sign, _mm256_set1_epi32(0x7E00)));
  return _mm_blendv_epi8(h, quiet, _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1)));
}

// float_to_bf16, the integer rounding of blockwise.h lane by lane.
PQ_INLINE __m128i to_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i odd = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return pack_u32_to_u16(_mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan));
}

// Stores the lanes of `v` selected by `keep` (all-ones lanes) among the first n at elements i .. i+n-1 of base,
// rounded once to dtype DT as store_from_float does; other lanes keep their bits.
template <int DT>
PQ_INLINE void store8(void* base, int64_t i, int64_t n, __m256 v, __m256 keep) {
  char* dst = (char*)base + i * elem_size(DT);
  alignas(32) char buf[32];
  char* out = n < 8 ? buf : dst;
  if (n < 8) memcpy(buf, dst, (size_t)(n * elem_size(DT)));
  if constexpr (DT == PQ_DTYPE_FLOAT32) {
    _mm256_storeu_ps((float*)out, _mm256_blendv_ps(_mm256_loadu_ps((const float*)out), v, keep));
  } else {
    const __m128i bits = DT == PQ_DTYPE_FLOAT16 ? to_half8(v) : to_bf16_8(v);
    const __m256i k = _mm256_castps_si256(keep);
    const __m128i k16 = _mm_packs_epi32(_mm256_castsi256_si128(k), _mm256_extracti128_si256(k, 1));
    _mm_storeu_si128((__m128i*)out, _mm_blendv_epi8(_mm_loadu_si128((const __m128i*)out), bits, k16));
  }
  if (n < 8) memcpy(dst, buf, (size_t)(n * elem_size(DT)));
}

PQ_INLINE __m256 first_lanes(int64_t n) {  // all-ones in lanes 0 .. n-1
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

PQ_INLINE __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

PQ_INLINE float hmax8(__m256 v) {  // exact: max of non-NaN values in any order
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#endif

}  // namespace PQ_NS
