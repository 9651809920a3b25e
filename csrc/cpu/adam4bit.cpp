// CPU driver of the Adam step with 4-bit states (docs/numerics.md, "4-bit states"), around the per-element math of
// pyquant/adam4bit.h and pyquant/blockwise.h. Compiled once per instruction set (isa.h); plain loops that GCC
// vectorises for the build's ISA.
//
// Two passes keep the states at 4 bits: a rank-1 second moment needs the NEW v's maxima over every dimension before
// any element can be quantised, so
//   pass 1 (rank-1 tensors only, static partition over the rows of their Rank1View: runs along the trailing
//     dimensions, merged until a row has 128 elements): recompute the new v of each element and fold it into
//     per-thread maxima per row and per column, then combine them with max into every dimension's maxima;
//   pass 2 (every tensor, static partition over blocks of 128 elements): recompute the new v (the same operations
//     on the same inputs: the same bits), update m and p, quantise both moments, write the codes.
// No float32 copy of a state is made. max is order-independent, so the maxima, and everything after them, are the
// same for any number of threads. Blocks of 128 are whole bytes of codes: no two threads write one byte.
#include "isa.h"

#include <omp.h>
#include <string.h>

#include <algorithm>
#include <new>
#include <vector>

#include "pyquant/adam4bit.h"
#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

namespace PQ_NS {
using namespace pq;

namespace {

struct Maps {
  float code1[16], code2[16], mids1[kFourBitMids], mids2[kFourBitMids];
  Maps(const float* c1, const float* c2) {
    memcpy(code1, c1, sizeof code1);
    memcpy(code2, c2, sizeof code2);
    for (int j = 0; j < kFourBitMids; ++j) {
      mids1[j] = code_midpoint(code1, j);
      mids2[j] = code_midpoint(code2, j);
    }
  }
};

template <int V, int... Rest, class F>
inline auto with_value(int value, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    return f(std::integral_constant<int, V>());
  } else {
    if (value == V) return f(std::integral_constant<int, V>());
    return with_value<Rest...>(value, f);
  }
}

template <class F>
inline auto with_dtypes(const pq_adam4bit_tensor& t, F&& f) {
  return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.param_dtype, [&](auto p) {
    return with_value<PQ_DTYPE_FLOAT32, PQ_DTYPE_FLOAT16, PQ_DTYPE_BFLOAT16>(t.grad_dtype, [&](auto g) {
      return f(std::integral_constant<int, decltype(p)::value>(), std::integral_constant<int, decltype(g)::value>());
    });
  });
}

// Where dimension d's maxima start in a rank-1 tensor's absmax2 (and in its new maxima).
inline int64_t dim_offset(const pq_adam4bit_tensor& t, int d) {
  int64_t off = 0;
  for (int i = 0; i < d; ++i) off += t.shape[i];
  return off;
}

inline int64_t maxima_count(const pq_adam4bit_tensor& t) { return dim_offset(t, t.ndim); }

// A rank-1 tensor as rows x columns: the trailing dimensions [split, ndim) are merged into `columns` (at least
// kMinRow of them where the shape allows, so that a convolution's (.., 3, 3) or (.., 1, 1) weight does not run
// rows of one to nine elements), the leading ones [0, split) index the rows. An element's scale, the min over
// every dimension of that dimension's maximum at its index, is then min(lead(row), trail[column]): the min over
// the leading dimensions, and `trail`, the min over the merged ones, tabulated once per step for old and new
// maxima. Pass 1 keeps the new v's max per merged column and per row, and folds them into every dimension's maxima
// afterwards. min and max are exact and order-independent: the same scales, maxima and bits as element by element.
constexpr int64_t kMinRow = 128;
constexpr int64_t kMaxColumns = 1 << 16;  // a bound on the per-thread column maxima of a merged view

struct Rank1View {
  int split = 0;          // dimensions [split, ndim) are the columns
  int64_t columns = 1;    // their product
  int64_t lead_count = 0; // sum(shape[0:split]): the leading dimensions' maxima (at the start of the maxima)
  const float* trail_old = nullptr;  // min over the merged dimensions' old maxima, per column
  const float* trail_new = nullptr;  // the same over the new maxima (after pass 1)
};

inline Rank1View rank1_view(const pq_adam4bit_tensor& t) {
  Rank1View v;
  v.split = t.ndim - 1;
  v.columns = t.shape[t.ndim - 1];
  while (v.split > 0 && v.columns < kMinRow && v.columns * t.shape[v.split - 1] <= kMaxColumns)
    v.columns *= t.shape[--v.split];
  v.lead_count = dim_offset(t, v.split);
  return v;
}

// Calls f(d, index along d) for the merged dimensions of column `c` (d from the last to `split`).
template <class F>
inline void for_merged_indices(const pq_adam4bit_tensor& t, const Rank1View& v, int64_t c, F&& f) {
  for (int d = t.ndim - 1; d >= v.split; --d) {
    f(d, c % t.shape[d]);
    c /= t.shape[d];
  }
}

// trail[c] = min over the merged dimensions of `maxima` at column c's indices.
inline void tabulate_trail(const pq_adam4bit_tensor& t, const Rank1View& v, const float* maxima, float* trail) {
  for (int64_t c = 0; c < v.columns; ++c) {
    float m = INFINITY;
    for_merged_indices(t, v, c, [&](int d, int64_t i) { m = min_float(m, maxima[dim_offset(t, d) + i]); });
    trail[c] = m;
  }
}

// The min of the leading dimensions' maxima at row r (+inf when every dimension is merged into the columns).
inline float lead_min(const pq_adam4bit_tensor& t, const Rank1View& v, const float* maxima, int64_t r) {
  float lead = INFINITY;
  int64_t off = v.lead_count;
  for (int d = v.split - 1; d >= 0; --d) {
    off -= t.shape[d];
    lead = min_float(lead, maxima[off + r % t.shape[d]]);
    r /= t.shape[d];
  }
  return lead;
}

// The rank-1 scales of elements [start, start + len) from `maxima` and their `trail` table.
inline void rank1_scales(const pq_adam4bit_tensor& t, const Rank1View& v, const float* maxima, const float* trail,
                         int64_t start, int64_t len, float* out) {
  int64_t r = start / v.columns, j = start % v.columns;
  for (int64_t i = 0; i < len;) {
    const float lead = lead_min(t, v, maxima, r);
    const int64_t run = std::min(len - i, v.columns - j);
    for (int64_t e = 0; e < run; ++e) out[i + e] = min_float(lead, trail[j + e]);
    i += run;
    j = 0;
    ++r;
  }
}

// Dequantised codes [start, start + len) of a packed state under per-element scales.
inline void dequantize4(const uint8_t* q, const float* code, int64_t start, int64_t len, const float* scale,
                        float* out) {
  int64_t i = 0;
#if PQ_SIMD
  // 8 codes (4 bytes) at a time from an even element: the nibbles by variable shifts, the 16-entry table as two
  // 8-lane permutes and a blend (GCC made the table lookup scalar). The same multiplication, the same bits.
  if ((start & 1) == 0) {
    const __m256 lo = _mm256_loadu_ps(code), hi = _mm256_loadu_ps(code + 8);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; i + 8 <= len; i += 8) {
      int32_t word;
      memcpy(&word, q + (start + i) / 2, 4);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(15));
      const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // sign bit set for codes 8..15
      const __m256 value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), upper);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(value, _mm256_loadu_ps(scale + i)));
    }
  }
#endif
  for (; i < len; ++i) out[i] = code[fourbit_nibble(q, start + i)] * scale[i];
}

// The codes of the first elements of x (a multiple of 8 of them, from the start of a block) under per-element
// scales, packed two a byte into out; returns how many were done (the rest: fourbit_code). fourbit_normalised's
// division, then fourbit_code's count of the midpoints strictly below y as a binary search over the sorted
// midpoints, 8 lanes at a time: c = 0, then c += 8, 4, 2, 1 where mids[c + 7], mids[c + 3], mids[c + 1], mids[c]
// is below y, each candidate midpoint picked with one lane permute (4 compares instead of 15; GCC's vectorisation
// of the scalar loop spent most of its time packing comparison masks into bytes). NaN compares false: code 0.
inline int64_t quantize4_pairs(const float* x, const float* scale, int64_t len, const float* mids, uint8_t* out) {
  int64_t i = 0;
#if PQ_SIMD
  const __m256 level1 = _mm256_set1_ps(mids[7]);
  const __m256 level2 = _mm256_setr_ps(mids[3], mids[11], 0, 0, 0, 0, 0, 0);               // by c / 8
  const __m256 level3 = _mm256_setr_ps(mids[1], mids[5], mids[9], mids[13], 0, 0, 0, 0);    // by c / 4
  const __m256 level4 = _mm256_setr_ps(mids[0], mids[2], mids[4], mids[6], mids[8], mids[10], mids[12], mids[14]);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  // bytes 0 and 8 of each 128-bit lane: the packed pairs of its two 64-bit lanes
  const __m256i pick = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (; i + 8 <= len; i += 8) {
    const __m256 s = _mm256_loadu_ps(scale + i);
    const __m256 is_zero = _mm256_cmp_ps(s, zero, _CMP_EQ_OQ);
    const __m256 y = _mm256_andnot_ps(is_zero, _mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_blendv_ps(s, one, is_zero)));
    // a true comparison is all ones: masked with the step, or subtracted for the last step of 1
    __m256i c = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(level1, y, _CMP_LT_OQ)), _mm256_set1_epi32(8));
    __m256 mid = _mm256_permutevar8x32_ps(level2, _mm256_srli_epi32(c, 3));
    c = _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(mid, y, _CMP_LT_OQ)), _mm256_set1_epi32(4)));
    mid = _mm256_permutevar8x32_ps(level3, _mm256_srli_epi32(c, 2));
    c = _mm256_add_epi32(c, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(mid, y, _CMP_LT_OQ)), _mm256_set1_epi32(2)));
    mid = _mm256_permutevar8x32_ps(level4, _mm256_srli_epi32(c, 1));
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(mid, y, _CMP_LT_OQ)));
    // each 64-bit lane holds an even element's code (low word) and the next one's (high word): code | next << 4
    const __m256i pairs = _mm256_shuffle_epi8(_mm256_or_si256(c, _mm256_srli_epi64(c, 28)), pick);
    const uint16_t lo = (uint16_t)_mm256_extract_epi16(pairs, 0), hi = (uint16_t)_mm256_extract_epi16(pairs, 8);
    memcpy(out + i / 2, &lo, 2);
    memcpy(out + i / 2 + 2, &hi, 2);
  }
#else
  (void)x, (void)scale, (void)len, (void)mids, (void)out;
#endif
  return i;
}

// The new v of `len` elements (skipped ones keep theirs), given their gradients and old v.
inline void new_second_moment(const float* g, float* v, int64_t len, const pq_adam_constants& k, uint32_t skip_mode) {
  for (int64_t i = 0; i < len; ++i) {
    const float nv = fmaf(k.one_minus_beta2 * g[i], g[i], v[i] * k.beta2);  // adam_moments' v, on its own
    v[i] = kept_or_new(skip_mode & !is_finite(g[i]), v[i], nv);
  }
}

template <int GDT>
inline void load_grads(const pq_adam4bit_tensor& t, int64_t start, int64_t len, float* g) {
  for (int64_t i = 0; i < len; ++i) g[i] = unscaled_grad(load_as_float(t.grad, start + i, GDT), t.k.inv_grad_scale, GDT);
}

// ---- pass 1: the new v's maxima of one row of a rank-1 tensor's view, folded into `part` (this thread's maxima:
// the leading dimensions' lead_count, then one per column) ----
template <int GDT>
void rank1_row(const pq_adam4bit_tensor& t, const Rank1View& view, int64_t r, const Maps& maps, uint32_t skip_mode,
               float* part) {
  float g[kFourBitBlock], v[kFourBitBlock], scale[kFourBitBlock];
  const float lead = lead_min(t, view, t.absmax2, r);
  float row_max = 0.0f;
  for (int64_t j0 = 0; j0 < view.columns; j0 += kFourBitBlock) {
    const int64_t start = r * view.columns + j0, len = std::min<int64_t>(kFourBitBlock, view.columns - j0);
    load_grads<GDT>(t, start, len, g);
    for (int64_t i = 0; i < len; ++i) scale[i] = min_float(lead, view.trail_old[j0 + i]);
    dequantize4((const uint8_t*)t.state2, maps.code2, start, len, scale, v);
    new_second_moment(g, v, len, t.k, skip_mode);
    float* col = part + view.lead_count + j0;
    row_max = absmax_update(row_max, block_absmax(v, len));  // v >= 0: its absolute value; NaN ignored
    for (int64_t i = 0; i < len; ++i) col[i] = absmax_update(col[i], v[i]);
  }
  int64_t off = view.lead_count, rr = r;
  for (int d = view.split - 1; d >= 0; --d) {
    off -= t.shape[d];
    float& m = part[off + rr % t.shape[d]];
    m = absmax_update(m, row_max);
    rr /= t.shape[d];
  }
}

// ---- pass 2: one block of 128 elements (or the tensor's last, partial one) ----
template <int PDT, int GDT>
int64_t step_block(const pq_adam4bit_tensor& t, const Rank1View& view, int64_t start, int64_t len, const Maps& maps,
                   const float* new_max, uint32_t skip_mode) {
  float g[kFourBitBlock], p[kFourBitBlock], m[kFourBitBlock], v[kFourBitBlock], scale[kFourBitBlock];
  uint8_t c[kFourBitBlock];
  const pq_adam_constants k = t.k;  // a local copy: the parameter stores cannot alias it
  load_grads<GDT>(t, start, len, g);
  for (int64_t i = 0; i < len; ++i) p[i] = load_as_float(t.param, start + i, PDT);
  const int64_t b = start / kFourBitBlock;
  const bool quantized = t.state_bits == 4;
  uint8_t* q1 = (uint8_t*)t.state1;
  uint8_t* q2 = (uint8_t*)t.state2;
  if (quantized) {
    for (int64_t i = 0; i < len; ++i) scale[i] = t.absmax1[b];
    dequantize4(q1, maps.code1, start, len, scale, m);
    if (t.rank1)
      rank1_scales(t, view, t.absmax2, view.trail_old, start, len, scale);
    else
      for (int64_t i = 0; i < len; ++i) scale[i] = t.absmax2[b];
    dequantize4(q2, maps.code2, start, len, scale, v);
  } else {
    memcpy(m, (const float*)t.state1 + start, (size_t)len * sizeof(float));
    memcpy(v, (const float*)t.state2 + start, (size_t)len * sizeof(float));
  }
  // Branch-free loops, each simple enough for GCC to vectorise: the moments, the parameters, the skip selects,
  // the stores.
  float nm[kFourBitBlock], nv[kFourBitBlock], np[kFourBitBlock];
  for (int64_t i = 0; i < len; ++i) {
    nm[i] = m[i];
    nv[i] = v[i];
    adam_moments(g[i], nm[i], nv[i], k);
  }
  if (quantized)
    for (int64_t i = 0; i < len; ++i) np[i] = adam_param_8bit(p[i], nm[i], nv[i], k);
  else
    for (int64_t i = 0; i < len; ++i) np[i] = adam_param_32bit(p[i], nm[i], nv[i], k);
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t keep = skip_mode & !is_finite(g[i]);
    bad += keep;
    m[i] = kept_or_new(keep, m[i], nm[i]);
    v[i] = kept_or_new(keep, v[i], nv[i]);
    np[i] = kept_or_new(keep, p[i], np[i]);
  }
  if (PDT == PQ_DTYPE_FLOAT32)
    memcpy((float*)t.param + start, np, (size_t)len * sizeof(float));
  else
    for (int64_t i = 0; i < len; ++i) store_from_float(t.param, start + i, PDT, np[i]);
  if (!quantized) {
    memcpy((float*)t.state1 + start, m, (size_t)len * sizeof(float));
    memcpy((float*)t.state2 + start, v, (size_t)len * sizeof(float));
    return bad;
  }
  // m: the block's max |m|, then codes; v: the block's max or the new rank-1 scales, then codes.
  for (int pass = 0; pass < 2; ++pass) {
    const float* x = pass == 0 ? m : v;
    float mids[kFourBitMids];  // a local copy: the byte stores below may alias anything else
    memcpy(mids, pass == 0 ? maps.mids1 : maps.mids2, sizeof mids);
    uint8_t* q = pass == 0 ? q1 : q2;
    if (pass == 1 && t.rank1) {
      rank1_scales(t, view, new_max, view.trail_new, start, len, scale);
    } else {
      const float amax = block_absmax(x, len);
      (pass == 0 ? t.absmax1 : t.absmax2)[b] = amax;
      for (int64_t i = 0; i < len; ++i) scale[i] = amax;
    }
    uint8_t* out = q + start / 2;  // start is a multiple of 128: whole bytes
    const int64_t done = quantize4_pairs(x, scale, len, mids, out);
    for (int64_t i = done; i < len; ++i) c[i] = (uint8_t)fourbit_code(fourbit_normalised(x[i], scale[i]), mids);
    for (int64_t i = done / 2; i < len / 2; ++i) out[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
    if (len & 1) out[len / 2] = c[len - 1];  // the tensor's odd last element: high nibble 0
  }
  return bad;
}

inline void thread_range(int64_t total, int64_t& lo, int64_t& hi) {
  const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
  lo = total * id / threads;
  hi = total * (id + 1) / threads;
}

// Items [0, first[count]) of all tensors (tensor i owns [first[i], first[i + 1])), split statically over the
// threads; each thread calls run(tensor, first item, end item) over its share, in order. Returns the sum.
template <class Run>
int64_t over_items(const std::vector<int64_t>& first, Run&& run) {
  const int64_t total = first.back();
  if (total == 0) return 0;
  int64_t sum = 0;
#pragma omp parallel reduction(+ : sum)
  {
    int64_t lo, hi;
    thread_range(total, lo, hi);
    if (lo < hi) {
      int32_t ti = (int32_t)(std::upper_bound(first.begin(), first.end(), lo) - first.begin()) - 1;
      for (int64_t x = lo; x < hi;) {
        while (first[ti + 1] <= x) ++ti;  // steps over tensors without items
        const int64_t end = std::min(hi, first[ti + 1]);
        sum += run(ti, x - first[ti], end - first[ti]);
        x = end;
      }
    }
  }
  return sum;
}

}  // namespace

// Returns the number of non-finite gradient elements seen, or -1 when the maxima buffers cannot be allocated.
int64_t adam4bit_step(const pq_adam4bit_tensor* tensors, int32_t count, const float* code1, const float* code2,
                      int32_t nonfinite) {
  const Maps maps(code1, code2);
  const uint32_t skip_mode = nonfinite == kSkipElement;
  try {
    // pass 1: rows of the rank-1 tensors' views; per-thread maxima (leading dimensions, then columns), combined
    // with max and folded into every dimension's maxima
    std::vector<Rank1View> views(count);
    std::vector<int64_t> first_row(count + 1, 0), first_max(count + 1, 0), first_work(count + 1, 0),
        first_column(count + 1, 0);
    for (int32_t i = 0; i < count; ++i) {
      const pq_adam4bit_tensor& t = tensors[i];
      const bool r1 = t.rank1 && t.numel > 0;
      if (r1) views[i] = rank1_view(t);
      const Rank1View& v = views[i];
      first_row[i + 1] = first_row[i] + (r1 ? t.numel / v.columns : 0);
      first_max[i + 1] = first_max[i] + (r1 ? maxima_count(t) : 0);
      first_work[i + 1] = first_work[i] + (r1 ? v.lead_count + v.columns : 0);
      first_column[i + 1] = first_column[i] + (r1 ? v.columns : 0);
    }
    const int64_t stats = first_max[count], work = first_work[count];
    const int threads = omp_get_max_threads();
    std::vector<float> part((size_t)(work * threads), 0.0f), new_max((size_t)stats, 0.0f);
    std::vector<float> trail_old((size_t)first_column[count]), trail_new((size_t)first_column[count]);
    for (int32_t i = 0; i < count; ++i) {
      if (first_max[i + 1] == first_max[i]) continue;
      views[i].trail_old = trail_old.data() + first_column[i];
      views[i].trail_new = trail_new.data() + first_column[i];
      tabulate_trail(tensors[i], views[i], tensors[i].absmax2, trail_old.data() + first_column[i]);
    }
    if (stats > 0) {
      over_items(first_row, [&](int32_t ti, int64_t r0, int64_t r1) {
        const pq_adam4bit_tensor& t = tensors[ti];
        float* mine = part.data() + (size_t)omp_get_thread_num() * work + first_work[ti];
        with_dtypes(t, [&](auto, auto g) {
          for (int64_t r = r0; r < r1; ++r) rank1_row<decltype(g)::value>(t, views[ti], r, maps, skip_mode, mine);
        });
        return (int64_t)0;
      });
      std::vector<float> combined((size_t)work, 0.0f);
      for (int th = 0; th < threads; ++th)
        for (int64_t s = 0; s < work; ++s) combined[s] = absmax_update(combined[s], part[(size_t)(th * work + s)]);
      for (int32_t i = 0; i < count; ++i) {
        if (first_max[i + 1] == first_max[i]) continue;
        const pq_adam4bit_tensor& t = tensors[i];
        const Rank1View& v = views[i];
        const float* lead = combined.data() + first_work[i];
        float* maxima = new_max.data() + first_max[i];
        memcpy(maxima, lead, (size_t)v.lead_count * sizeof(float));
        for (int64_t c = 0; c < v.columns; ++c)
          for_merged_indices(t, v, c, [&](int d, int64_t x) {
            float& m = maxima[dim_offset(t, d) + x];
            m = absmax_update(m, lead[v.lead_count + c]);
          });
        tabulate_trail(t, v, maxima, trail_new.data() + first_column[i]);
      }
    }
    // pass 2: blocks of 128 of every tensor
    std::vector<int64_t> first_block(count + 1, 0);
    for (int32_t i = 0; i < count; ++i) first_block[i + 1] = first_block[i] + block_count(tensors[i].numel, kFourBitBlock);
    const int64_t bad = over_items(first_block, [&](int32_t ti, int64_t b0, int64_t b1) {
      const pq_adam4bit_tensor& t = tensors[ti];
      const float* mx = new_max.data() + first_max[ti];
      return with_dtypes(t, [&](auto p, auto g) {
        int64_t n = 0;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * kFourBitBlock;
          n += step_block<decltype(p)::value, decltype(g)::value>(t, views[ti], start,
                                                                 std::min<int64_t>(kFourBitBlock, t.numel - start),
                                                                 maps, mx, skip_mode);
        }
        return n;
      });
    });
    // the rank-1 tensors' new maxima replace the old ones only now: pass 2 read the old ones everywhere
    for (int32_t i = 0; i < count; ++i)
      if (first_max[i + 1] > first_max[i])
        memcpy(tensors[i].absmax2, new_max.data() + first_max[i], (size_t)(first_max[i + 1] - first_max[i]) * sizeof(float));
    return bad;
  } catch (const std::bad_alloc&) {
    return -1;
  }
}

}  // namespace PQ_NS
