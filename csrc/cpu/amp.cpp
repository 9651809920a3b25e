// Gradient unscaling for dynamic loss scaling (pyquant/amp.py, op `pyquant::unscale_`): torch's
// `_amp_foreach_non_finite_check_and_unscale_` over all gradients of the CPU in one call.
//
// Per element: v = the gradient widened to float32 (float64 stays float64); if v is inf or NaN the call
// reports it; the gradient becomes (inv_scale == 1 ? v : v * inv_scale) rounded back to its dtype
// (round to nearest even, pyquant/blockwise.h; subnormals are kept, never flushed). One multiplication,
// so the result does not depend on the instruction set: the avx512 build runs 16 (8 for float64)
// elements at a time (F16C conversions for float16, integer rounding for bfloat16) and gives the same
// bits as the element-by-element rule, NaNs included (a float16 NaN is written as sign | 0x7E00, as
// float_to_half does).
//
// Work: every tensor is cut into chunks of kChunk elements; the chunks of all tensors, in order, are
// split statically over the OpenMP threads (one contiguous run each, of about the same number of
// elements). Each thread keeps its own "non-finite seen" flag; the flags are OR-ed at the end, so the
// result and every written bit are the same for any number of threads.
//
// Compiled once per instruction set (isa.h); csrc/capi_amp.cpp picks one.
#include "isa.h"

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "pyquant/blockwise.h"

namespace PQ_NS {
namespace {
using namespace pq;

constexpr int64_t kChunk = 1 << 15;    // elements per work item
constexpr int64_t kSerialBelow = 1 << 16;  // fewer elements in all: one thread

// ---- the element-by-element rule, pq::unscale_element (every build; the avx512 build's tails use the
// masked vector code) ----
bool scalar_piece(void* base, int32_t dtype, int64_t begin, int64_t end, float inv) {
  bool bad = false;
  for (int64_t i = begin; i < end; ++i) bad |= unscale_element(base, i, dtype, inv);
  return bad;
}

#if PQ_AVX512
// fpclass categories: QNaN (0x01), +inf (0x08), -inf (0x10), SNaN (0x80)
constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;
constexpr int kNaN = 0x01 | 0x80;

bool vec_f32(float* p, int64_t n, float inv, bool unit) {
  const __m512 vinv = _mm512_set1_ps(inv);
  __mmask16 bad = 0;
  int64_t i = 0;
  if (unit) {
    for (; i + 16 <= n; i += 16) bad |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(p + i), kNonFinite);
    if (i < n) {
      const __mmask16 m = mask16(n - i);
      bad |= _mm512_mask_fpclass_ps_mask(m, _mm512_maskz_loadu_ps(m, p + i), kNonFinite);
    }
    return bad != 0;
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(p + i);
    bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
    _mm512_storeu_ps(p + i, _mm512_mul_ps(v, vinv));
  }
  if (i < n) {
    const __mmask16 m = mask16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, p + i);
    bad |= _mm512_mask_fpclass_ps_mask(m, v, kNonFinite);
    _mm512_mask_storeu_ps(p + i, m, _mm512_mul_ps(v, vinv));
  }
  return bad != 0;
}

bool vec_f64(double* p, int64_t n, double inv, bool unit) {
  const __m512d vinv = _mm512_set1_pd(inv);
  __mmask8 bad = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const __mmask8 m = mask8(n - i);
    const __m512d v = _mm512_maskz_loadu_pd(m, p + i);
    bad |= _mm512_mask_fpclass_pd_mask(m, v, kNonFinite);
    if (!unit) _mm512_mask_storeu_pd(p + i, m, _mm512_mul_pd(v, vinv));
  }
  return bad != 0;
}

// 16 float16 -> float32 (exact), the product, back with round to nearest even; NaN lanes -> sign | 0x7E00.
inline __m256i f16_step(__m256i h, __m512 vinv, bool unit, __mmask16 m, __mmask16& bad) {
  const __m512 v = _mm512_cvtph_ps(h);
  bad |= _mm512_mask_fpclass_ps_mask(m, v, kNonFinite);
  const __m512 r = unit ? v : _mm512_mul_ps(v, vinv);
  __m256i out = _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_fpclass_ps_mask(r, kNaN);
  const __m256i canon = _mm256_or_si256(_mm256_and_si256(out, _mm256_set1_epi16((short)0x8000)),
                                        _mm256_set1_epi16(0x7E00));
  return _mm256_mask_blend_epi16(nan, out, canon);
}

bool vec_f16(uint16_t* p, int64_t n, float inv, bool unit) {
  const __m512 vinv = _mm512_set1_ps(inv);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256((const __m256i*)(p + i));
    _mm256_storeu_si256((__m256i*)(p + i), f16_step(h, vinv, unit, (__mmask16)0xFFFF, bad));
  }
  if (i < n) {
    const __mmask16 m = mask16(n - i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, p + i);
    _mm256_mask_storeu_epi16(p + i, m, f16_step(h, vinv, unit, m, bad));
  }
  return bad != 0;
}

// 16 bfloat16 -> float32 (a shift), the product, back as float_to_bf16 does it in integer arithmetic.
inline __m256i bf16_step(__m256i b, __m512 vinv, bool unit, __mmask16 m, __mmask16& bad) {
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  bad |= _mm512_mask_fpclass_ps_mask(m, v, kNonFinite);
  const __m512i u = _mm512_castps_si512(unit ? v : _mm512_mul_ps(v, vinv));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

bool vec_bf16(uint16_t* p, int64_t n, float inv, bool unit) {
  const __m512 vinv = _mm512_set1_ps(inv);
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i b = _mm256_loadu_si256((const __m256i*)(p + i));
    _mm256_storeu_si256((__m256i*)(p + i), bf16_step(b, vinv, unit, (__mmask16)0xFFFF, bad));
  }
  if (i < n) {
    const __mmask16 m = mask16(n - i);
    const __m256i b = _mm256_maskz_loadu_epi16(m, p + i);
    _mm256_mask_storeu_epi16(p + i, m, bf16_step(b, vinv, unit, m, bad));
  }
  return bad != 0;
}
#endif

#if !PQ_AVX512
// The scalar and avx2 builds: the element-by-element rule written as loops without branches, which GCC
// vectorises for the build's instruction set (the element-by-element code does not vectorise: it was 2.4x
// slower than torch's kernel over DenseNet-121's float32 gradients on an AVX2 CPU). Same bits: one
// multiplication per element, and bfloat16 rounded and NaNs quietened as float_to_bf16 does (so also when
// inv == 1, as store_from_float would). float16 keeps the element-by-element rule.
constexpr uint32_t kExponent = 0x7F800000u;

bool plain_f32(float* p, int64_t n, float inv, bool unit) {
  uint32_t bad = 0;
  if (unit) {
    for (int64_t i = 0; i < n; ++i) bad |= (float_bits(p[i]) & kExponent) == kExponent;
    return bad != 0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float v = p[i];
    bad |= (float_bits(v) & kExponent) == kExponent;
    p[i] = v * inv;
  }
  return bad != 0;
}

bool plain_f64(double* p, int64_t n, double inv, bool unit) {
  constexpr uint64_t exponent = 0x7FF0000000000000ull;
  uint64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = p[i];
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    bad |= (bits & exponent) == exponent;
    if (!unit) p[i] = v * inv;
  }
  return bad != 0;
}

bool plain_bf16(uint16_t* p, int64_t n, float inv, bool unit) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = bits_float((uint32_t)p[i] << 16);
    bad |= (float_bits(v) & kExponent) == kExponent;
    const uint32_t u = float_bits(unit ? v : v * inv);
    const uint32_t nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > kExponent);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    p[i] = (uint16_t)((quiet & nan) | (rounded & ~nan));
  }
  return bad != 0;
}
#endif

// One piece [begin, end) of one tensor; true if it holds a non-finite value.
bool unscale_piece(void* base, int32_t dtype, int64_t begin, int64_t end, float inv, bool unit, bool vector) {
#if PQ_AVX512
  if (vector) {
    const int64_t n = end - begin;
    switch (dtype) {
      case PQ_DTYPE_FLOAT32: return vec_f32((float*)base + begin, n, inv, unit);
      case PQ_DTYPE_FLOAT16: return vec_f16((uint16_t*)base + begin, n, inv, unit);
      case PQ_DTYPE_BFLOAT16: return vec_bf16((uint16_t*)base + begin, n, inv, unit);
      case PQ_DTYPE_FLOAT64: return vec_f64((double*)base + begin, n, (double)inv, unit);
      default: return false;
    }
  }
#else
  if (vector) {
    const int64_t n = end - begin;
    switch (dtype) {
      case PQ_DTYPE_FLOAT32: return plain_f32((float*)base + begin, n, inv, unit);
      case PQ_DTYPE_BFLOAT16: return plain_bf16((uint16_t*)base + begin, n, inv, unit);
      case PQ_DTYPE_FLOAT64: return plain_f64((double*)base + begin, n, (double)inv, unit);
      default: break;
    }
  }
#endif
  return scalar_piece(base, dtype, begin, end, inv);
}
}  // namespace

// grads[t]: numels[t] contiguous elements of dtype dtypes[t] (0 float32, 1 float16, 2 bfloat16, 3 float64).
// Sets *found_inf = 1 if any element is inf or NaN (never clears it). threads <= 0: OpenMP's default.
// vector == 0 forces the element-by-element rule (tests: both give the same bits).
void unscale(int32_t count, void* const* grads, const int64_t* numels, const int32_t* dtypes, float* found_inf,
             const float* inv_scale, int32_t threads, int32_t vector) {
  if (count <= 0) return;
  const float inv = *inv_scale;
  const bool unit = inv == 1.0f;
  // The chunks of all tensors in order, as (tensor, first element), and each chunk's first element in the
  // concatenation of all tensors: threads split the ELEMENTS evenly (a model's many small tensors would
  // otherwise weigh as much as full chunks and leave one thread with most of the bytes).
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_begin, chunk_offset;
  int64_t total = 0;
  for (int32_t t = 0; t < count; ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += kChunk) {
      chunk_tensor.push_back(t);
      chunk_begin.push_back(begin);
      chunk_offset.push_back(total + begin);
    }
    total += numels[t] > 0 ? numels[t] : 0;
  }
  const int64_t chunks = (int64_t)chunk_tensor.size();
  if (chunks == 0) return;
  int nt = threads > 0 ? threads : omp_get_max_threads();
  if (total < kSerialBelow) nt = 1;
  if ((int64_t)nt > chunks) nt = (int)chunks;
  std::vector<unsigned char> flags((size_t)nt, 0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = omp_get_thread_num();
    const int used = omp_get_num_threads();
    // this thread's chunks: those starting in its share [total*tid/used, total*(tid+1)/used) of the elements
    const auto first = [&](int64_t element) {
      return (int64_t)(std::lower_bound(chunk_offset.begin(), chunk_offset.end(), element) - chunk_offset.begin());
    };
    const int64_t c0 = first(total * tid / used), c1 = first(total * (tid + 1) / used);
    bool bad = false;
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t t = chunk_tensor[(size_t)c];
      const int64_t begin = chunk_begin[(size_t)c];
      const int64_t end = std::min(begin + kChunk, numels[t]);
      bad |= unscale_piece(grads[t], dtypes[t], begin, end, inv, unit, vector != 0);
    }
    flags[(size_t)tid] = bad ? 1 : 0;
  }
  bool any = false;
  for (unsigned char f : flags) any |= f != 0;
  if (any) *found_inf = 1.0f;
}

}  // namespace PQ_NS
