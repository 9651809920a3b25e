// Half-precision matrix multiply on the CPU: C = A @ B (+ bias), float16 / bfloat16 / float32 operands,
// float32 accumulation, one rounding to C's dtype (docs/low_precision.md).
//
// Compiled once per instruction set (PQ_ISA = scalar, avx2, avx512; isa.h);
// csrc/capi_gemm.cpp picks one at run time.
//
// Structure (the BLIS / GotoBLAS scheme):
//   for each block of NC columns of C                   (sequential)
//     pack B[:, block] for all of K as float32 panels of NR columns   (threads split the panels)
//     for each (MC rows of C, part of the NR panels)    (OpenMP work items, handed out dynamically)
//       for each block of KC of K                       (sequential, in order)
//         pack A[rows, kblock] in panels of MR rows, converting to float32 (F16C; a shift for bfloat16)
//         for each NR panel, for each MR panel: the MR x NR micro-kernel (register accumulators)
// A panel is "rows" layout (row r at [r*LDA + k]: a plain conversion when A's rows are contiguous) or
// "k-major" ([k*MR + r]: when its columns are contiguous, or any other strides); B panels are [k*NR + j],
// transposed 16 x 16 in registers when B's columns are contiguous (x @ W.T). Between K blocks the
// micro-kernel keeps its float32 accumulators in a per-thread buffer; after the last K block it rounds
// them once to C's dtype and stores them. Work is split over output tiles only, never over K.
// Two register tiles (AVX-512): 14 x 32, and 28 x 16 for products with at most 16 columns; a product with at
// most 16 rows and more columns is computed as its transpose (gemm_any_tile). The functions are templates on
// the tile.
//
// Numerics: every element of C is c = bias_j or bias_i (or 0); c = fma(a_ik, b_kj, c) for k = 0, ..., K-1
// in order; one rounding of c to C's dtype. The blocking (MC, KC, NC), the tile an element lands in, the
// number of threads and the instruction set do not change that sequence, so the bits are the same for any
// thread count and on every build (the scalar build, which has no fma instruction, computes a*b + c with
// two roundings; for float16 / bfloat16 operands the product is exact, so that is the same number).
// One exception, bfloat16 x bfloat16 on a CPU with AVX512-BF16 (unless the caller clears PQ_MATMUL_BF16_DOT):
// vdpbf16ps takes k in pairs, c = fma(a_2u, b_2u, fma(a_2u+1, b_2u+1, c)), with inputs and results below
// 2^-126 flushed to zero: a fixed order too, so still independent of the thread count.
// The build forbids contraction (-ffp-contract=off): the fmas are written explicitly.
#include "isa.h"

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <utility>

#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

namespace PQ_NS {
namespace {
using namespace pq;

// ---- register tile and cache blocking ----
#if PQ_AVX512
#ifndef PQ_GEMM_MR  // tile shape, overridable for tuning (-DPQ_GEMM_MR=8 -DPQ_GEMM_NV=3: 8 x 48)
#define PQ_GEMM_MR 14
#define PQ_GEMM_NV 2
#endif
constexpr int VW = kLanes;           // floats per vector
constexpr int MR_WIDE = PQ_GEMM_MR;  // 14 x 32 tile: 28 zmm accumulators + 2 for B + 1 broadcast
constexpr int NV_WIDE = PQ_GEMM_NV;
// Products with at most 16 columns (a 16-channel convolution; the transpose of a product with at most 16
// rows) use a 28 x 16 tile instead: 28 accumulators + 1 for B, where the wide tile would leave half of
// its lanes idle (measured 1.5x faster on such shapes, docs/low_precision.md section 8).
constexpr int MR_NARROW = 28;
constexpr int NV_NARROW = 1;
#elif PQ_AVX2
constexpr int VW = kLanes;
constexpr int MR_WIDE = 6;  // 6 x 16 tile: 12 ymm accumulators + 2 for B + 1 broadcast
constexpr int NV_WIDE = 2;
constexpr int MR_NARROW = MR_WIDE;  // one tile only
constexpr int NV_NARROW = NV_WIDE;
#else
constexpr int VW = 4;
constexpr int MR_WIDE = 4;
constexpr int NV_WIDE = 2;
constexpr int MR_NARROW = MR_WIDE;
constexpr int NV_NARROW = NV_WIDE;
#endif
constexpr bool kNarrowTile = MR_NARROW != MR_WIDE || NV_NARROW != NV_WIDE;
// The functions below are templates on the tile: MR rows, NV vectors (NR = NV * VW columns).
constexpr int64_t KC_MAX = 256;              // a KC x NR float32 panel of B (32 KiB) stays in L1
constexpr int64_t LDA = KC_MAX + 16;         // row stride of a packed A panel in rows layout (1088 B: no set aliasing)
constexpr int64_t B_BUDGET = 4 << 20;        // bytes of packed B per column block (K x NC floats), L3
constexpr double PARALLEL_MIN_FLOPS = 1 << 20;  // products with fewer multiply-adds run on one thread
constexpr double SMALL_FLOPS = 1 << 24;         // batches of products this small: one product per thread

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

static float* alloc_floats(int64_t n) {
  const size_t bytes = (size_t)round_up(std::max<int64_t>(n, 1) * 4 + 256, 64);
  return (float*)aligned_alloc(64, bytes);
}

// Per-thread scratch that only grows: allocating (mmap) and freeing (munmap, TLB shootdowns) the packing
// buffers on every call costs more than a small product, and serialises the threads.
struct Scratch {
  float* p = nullptr;
  int64_t cap = 0;
  ~Scratch() { free(p); }
  float* get(int64_t n) {
    if (n > cap) {
      free(p);
      p = alloc_floats(n);
      cap = n;
    }
    return p;
  }
};
static thread_local Scratch tl_packed_b, tl_packed_a, tl_row, tl_partial, tl_row_bias;

// The im2col matrix of a channels-last input x (N, H, W, C), never materialised (an implicit im2col):
//   columns[(n, oy, ox), (ky, kx, c)] = x[n, oy*sh + ky*dh - ph, ox*sw + kx*dw - pw, c], 0 outside x,
// rows P = N*Ho*Wo output positions, columns kh*kw*C. The packing routines gather it in runs of C contiguous
// values, so a product on it computes exactly what it computes on the explicit copy (the same packed panels).
struct Im2col {
  const char* x;                      // element (n, y, x, c) at x + n*sn + y*sy + x*sx + c elements
  int64_t H, W, C, Ho, Wo, kw;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t sn, sy, sx;
};

// An operand: element (i, j) at data + i*rs + j*cs elements; or, with `cols`, element (i, j) of the im2col
// matrix (cols_t false) or of its transpose (cols_t true).
struct Mat {
  const char* data;
  int32_t dt;
  int64_t rs, cs;
  const Im2col* cols = nullptr;
  bool cols_t = false;
};

// A pixel (output position) of an Im2col: its input origin, y0 = oy*sh - ph and x0 = ox*sw - pw, and the offset of
// x[n, y0, x0, 0] (outside x when y0 or x0 is negative: only used for positions checked to be inside).
struct Pixel {
  int64_t y0, x0, off;
};

static inline Pixel pixel_of(const Im2col& g, int64_t i) {
  const int64_t per_image = g.Ho * g.Wo;
  const int64_t n = i / per_image, rest = i - n * per_image;
  const int64_t oy = rest / g.Wo, ox = rest - oy * g.Wo;
  const int64_t y0 = oy * g.sh - g.ph, x0 = ox * g.sw - g.pw;
  return Pixel{y0, x0, n * g.sn + y0 * g.sy + x0 * g.sx};
}

// A run of im2col columns within one kernel position (ky, kx): `len` channels from c, at `dst` in the packed
// range; dy = ky*dh, dx = kx*dw, and `off` the offset of (dy, dx, c) relative to a pixel's origin.
struct Seg {
  int64_t dst, len, dy, dx, off;
};

// The columns [j0, j0 + count) of an im2col matrix as runs (at most count / C + 2); returns their number.
static int64_t im2col_segments(const Im2col& g, int64_t j0, int64_t count, Seg* out) {
  int64_t n = 0;
  for (int64_t j = j0; j < j0 + count;) {
    const int64_t pos = j / g.C, c = j - pos * g.C;
    const int64_t len = std::min(g.C - c, j0 + count - j);
    const int64_t dy = (pos / g.kw) * g.dh, dx = (pos % g.kw) * g.dw;
    out[n++] = Seg{j - j0, len, dy, dx, dy * g.sy + dx * g.sx + c};
    j += len;
  }
  return n;
}

// Where run `s` of pixel `px` starts in x, or null where the kernel position falls in the zero padding.
static inline const char* im2col_run(const Im2col& g, const Pixel& px, const Seg& s, int64_t es) {
  const bool inside = (uint64_t)(px.y0 + s.dy) < (uint64_t)g.H && (uint64_t)(px.x0 + s.dx) < (uint64_t)g.W;
  return inside ? g.x + (px.off + s.off) * es : nullptr;
}

// ---- conversion of a contiguous run to float32 ----
template <int DT>
static inline float cvt_one(const void* p, int64_t i) {
  if constexpr (DT == PQ_DTYPE_FLOAT32) return ((const float*)p)[i];
  if constexpr (DT == PQ_DTYPE_FLOAT16) return half_to_float(((const uint16_t*)p)[i]);
  return bf16_to_float(((const uint16_t*)p)[i]);
}

#if PQ_AVX512
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// Lines l < nl start at base + l*ld elements (contiguous runs); loads positions [k, k+cnt) of each (zeros
// elsewhere), so that afterwards r[kk] holds position k+kk of lines 0..15.
template <int DT>
static inline void load_transposed(const char* base, int64_t ld, int nl, int64_t k, int64_t cnt, __m512 r[16]) {
  const __mmask16 m = mask16_any(cnt);
  const int64_t es = elem_size(DT);
  for (int l = 0; l < 16; ++l) r[l] = l < nl ? load16<DT>(base + (l * ld + k) * es, 0, m) : _mm512_setzero_ps();
  transpose16(r);
}
#endif

// out[i] = float32(p[i*stride]) for i < n.
template <int DT>
static inline void convert_run(const char* p, int64_t stride, int64_t n, float* out) {
  int64_t i = 0;
  if (stride == 1) {
#if PQ_AVX512
    const int64_t es = elem_size(DT);
    for (; i < n; i += 16) _mm512_storeu_ps(out + i, load16<DT>(p + i * es, 0, mask16_any(n - i)));
    return;
#elif PQ_AVX2
    if constexpr (DT == PQ_DTYPE_FLOAT16) {
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, widen8<DT>(_mm_loadu_si128((const __m128i*)(p + 2 * i))));
    } else if constexpr (DT == PQ_DTYPE_BFLOAT16) {
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, widen8<DT>(_mm_loadu_si128((const __m128i*)(p + 2 * i))));
    }
#endif
    for (; i < n; ++i) out[i] = cvt_one<DT>(p, i);
    return;
  }
  for (; i < n; ++i) out[i] = cvt_one<DT>(p, i * stride);
}

static inline void convert_run(const char* p, int32_t dt, int64_t stride, int64_t n, float* out) {
  if (dt == PQ_DTYPE_FLOAT16)
    convert_run<PQ_DTYPE_FLOAT16>(p, stride, n, out);
  else if (dt == PQ_DTYPE_BFLOAT16)
    convert_run<PQ_DTYPE_BFLOAT16>(p, stride, n, out);
  else
    convert_run<PQ_DTYPE_FLOAT32>(p, stride, n, out);
}

// ---- packing ----
// Prefetch `rows` runs of `bytes` bytes at stride `ld` bytes (the next panel's rows: the hardware
// prefetchers do not follow many short runs).
static inline void prefetch_rows(const char* p, int64_t rows, int64_t ld, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + r * ld + off, 0, 3);
}

// An im2col A block (see pack_a_t for the layouts): the same packed values as the explicit copy would give.
// cols_t false: rows are pixels, k runs along the kernel positions: rows layout, each row a few runs of C.
// cols_t true (the transposed product of a weight gradient): rows are kernel positions, k runs over pixels:
// k-major, each k a few runs of the panel's rows. convert_run may write zeros up to 15 floats past a run;
// the runs are written in increasing order within the panel's slack, so later runs overwrite them.
template <int DT, int MR>
static void pack_a_im2col(const Mat& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* out) {
  const Im2col& g = *A.cols;
  const int64_t es = elem_size(DT);
  Seg segs[KC_MAX + 2];
  if (!A.cols_t) {
    const int64_t nseg = im2col_segments(g, k0, kc, segs);
    for (int64_t p = 0; p * MR < mc; ++p) {
      float* o = out + p * MR * LDA;
      const int mr = (int)std::min<int64_t>(MR, mc - p * MR);
      for (int r = 0; r < MR; ++r) {
        float* row = o + r * LDA;
        if (r >= mr) {
          memset(row, 0, (size_t)kc * sizeof(float));
          continue;
        }
        const Pixel px = pixel_of(g, i0 + p * MR + r);
        for (int64_t q = 0; q < nseg; ++q) {
          const char* src = im2col_run(g, px, segs[q], es);
          if (src)
            convert_run<DT>(src, 1, segs[q].len, row + segs[q].dst);
          else
            memset(row + segs[q].dst, 0, (size_t)segs[q].len * sizeof(float));
        }
      }
    }
    return;
  }
  Pixel pixels[KC_MAX];
  for (int64_t k = 0; k < kc; ++k) pixels[k] = pixel_of(g, k0 + k);
  for (int64_t p = 0; p * MR < mc; ++p) {
    float* o = out + p * MR * LDA;
    const int mr = (int)std::min<int64_t>(MR, mc - p * MR);
    const int64_t nseg = im2col_segments(g, i0 + p * MR, mr, segs);
#if PQ_AVX512
    // one run (at most MR <= 32 rows: two vectors) at a time over all k, with exact masks
    static_assert(MR <= 32, "a run of the k-major im2col gather is at most two vectors");
    for (int64_t q = 0; q < nseg; ++q) {
      const Seg s = segs[q];
      const __mmask16 m0 = mask16_any(s.len), m1 = mask16_any(s.len - 16);
      for (int64_t k = 0; k < kc; ++k) {
        const char* src = im2col_run(g, pixels[k], s, es);
        float* dst = o + k * MR + s.dst;
        _mm512_mask_storeu_ps(dst, m0, src ? load16<DT>(src, 0, m0) : _mm512_setzero_ps());
        if (m1) _mm512_mask_storeu_ps(dst + 16, m1, src ? load16<DT>(src + 16 * es, 0, m1) : _mm512_setzero_ps());
      }
    }
    if (mr < MR)
      for (int64_t k = 0; k < kc; ++k) memset(o + k * MR + mr, 0, (size_t)(MR - mr) * sizeof(float));
#else
    for (int64_t k = 0; k < kc; ++k) {
      float* col = o + k * MR;
      for (int64_t q = 0; q < nseg; ++q) {
        const char* src = im2col_run(g, pixels[k], segs[q], es);
        if (src)
          convert_run<DT>(src, 1, segs[q].len, col + segs[q].dst);
        else
          memset(col + segs[q].dst, 0, (size_t)segs[q].len * sizeof(float));
      }
      for (int r = mr; r < MR; ++r) col[r] = 0.0f;
    }
#endif
  }
}

// A block: rows [i0, i0+mc), k in [k0, k0+kc) -> panels of MR rows, panel p at out + p*MR*kc, element
// (r, k) at [k*MR + r]; rows past mc are 0.
template <int DT, int MR>
static void pack_a_t(const Mat& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* out, float* tmp) {
  if (A.cols) return pack_a_im2col<DT, MR>(A, i0, mc, k0, kc, out);
  const int64_t es = elem_size(DT);
  for (int64_t p = 0; p * MR < mc; ++p) {
    float* o = out + p * MR * LDA;
    const int mr = (int)std::min<int64_t>(MR, mc - p * MR);
    const char* base = A.data + ((i0 + p * MR) * A.rs + k0 * A.cs) * es;  // element (row 0 of panel, k0)
    if (A.cs == 1) {
      // rows layout: row r at [r*LDA + k], converted run by run (no transpose)
      prefetch_rows(base + MR * A.rs * es, std::min<int64_t>(MR, mc - (p + 1) * MR), A.rs * es, kc * es);
      for (int r = 0; r < MR; ++r) {
        if (r < mr)
          convert_run<DT>(base + r * A.rs * es, 1, kc, o + r * LDA);
        else
          memset(o + r * LDA, 0, (size_t)kc * sizeof(float));
      }
    } else if (A.rs == 1) {
      // columns of the panel are contiguous: one short run per k
      for (int64_t k = 0; k < kc; ++k) {
#if PQ_AVX512
        for (int r = 0; r < MR; r += 16)  // MR may exceed one vector (the narrow tile)
          _mm512_mask_storeu_ps(o + k * MR + r, mask16_any(MR - r),
                                load16<DT>(base + (k * A.cs + r) * es, 0, mask16_any(mr - r)));
#else
        convert_run<DT>(base + k * A.cs * es, 1, mr, o + k * MR);
        for (int r = mr; r < MR; ++r) o[k * MR + r] = 0.0f;
#endif
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int r = 0; r < MR; ++r) o[k * MR + r] = r < mr ? cvt_one<DT>(base, r * A.rs + k * A.cs) : 0.0f;
    }
  }
  (void)tmp;
}

// B block: k in [0, K), columns [j0, j0+nc) -> panels of NR columns, panel p at out + p*NR*K, element
// (k, j) at [k*NR + j]; columns past nc are 0.
template <int DT, int NV>
static void pack_b_panel(const Mat& B, int64_t K, int64_t j0, int64_t nr, float* o, float* tmp) {
  constexpr int NR = NV * VW;
  const int64_t es = elem_size(DT);
  const char* base = B.data + j0 * B.cs * es;
  if (B.cs == 1) {
    for (int64_t k = 0; k < K; ++k) {
      const char* row = base + k * B.rs * es;
#if PQ_AVX512
      for (int h = 0; h < NV; ++h)
        _mm512_storeu_ps(o + k * NR + 16 * h, load16<DT>(row + 16 * h * es, 0, mask16_any(nr - 16 * h)));
#else
      convert_run<DT>(row, 1, nr, o + k * NR);
      for (int64_t j = nr; j < NR; ++j) o[k * NR + j] = 0.0f;
#endif
    }
  } else if (B.rs == 1) {
    // columns contiguous along k (B is the transpose of a row-major matrix, as in x @ W.T): transpose
#if PQ_AVX512
    __m512 v[16];
    for (int h = 0; h < NR / 16; ++h) {
      const int nl = (int)std::max<int64_t>(0, std::min<int64_t>(16, nr - 16 * h));
      const char* hb = base + 16 * h * B.cs * es;
      for (int64_t k = 0; k < K; k += 16) {
        const int64_t cnt = std::min<int64_t>(16, K - k);
        load_transposed<DT>(hb, B.cs, nl, k, cnt, v);
        for (int64_t kk = 0; kk < cnt; ++kk) _mm512_storeu_ps(o + (k + kk) * NR + 16 * h, v[kk]);
      }
    }
#else
    for (int64_t j = 0; j < NR; ++j) {
      if (j < nr) {
        convert_run<DT>(base + j * B.cs * es, 1, K, tmp);
        for (int64_t k = 0; k < K; ++k) o[k * NR + j] = tmp[k];
      } else {
        for (int64_t k = 0; k < K; ++k) o[k * NR + j] = 0.0f;
      }
    }
#endif
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < NR; ++j) o[k * NR + j] = j < nr ? cvt_one<DT>(base, k * B.rs + j * B.cs) : 0.0f;
  }
  (void)tmp;
}

#if PQ_AVX512
static inline uint32_t bits16(const char* p, int64_t i) { return ((const uint16_t*)p)[i]; }

// 16 words (lo[j] | hi[j] << 16) from two runs of 16 bfloat16 values
static inline __m512i interleave16(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

// pack_a_pairs for an im2col A (the layouts of pack_a_im2col): rows layout is a copy of the 16-bit values (a word
// holds two consecutive k), k-major interleaves the runs of two pixels.
template <int MR>
static void pack_a_pairs_im2col(const Mat& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, uint32_t* out) {
  const Im2col& g = *A.cols;
  const int64_t units = cdiv(kc, 2);
  Seg segs[2 * KC_MAX + 2];
  if (!A.cols_t) {
    const int64_t nseg = im2col_segments(g, k0, kc, segs);
    for (int64_t p = 0; p * MR < mc; ++p) {
      uint32_t* o = out + p * MR * LDA;
      const int mr = (int)std::min<int64_t>(MR, mc - p * MR);
      for (int r = 0; r < MR; ++r) {
        uint16_t* row = (uint16_t*)(o + r * LDA);
        if (r >= mr) {
          memset(row, 0, (size_t)units * 4);
          continue;
        }
        const Pixel px = pixel_of(g, i0 + p * MR + r);
        for (int64_t q = 0; q < nseg; ++q) {
          const char* src = im2col_run(g, px, segs[q], 2);
          if (src)
            memcpy(row + segs[q].dst, src, (size_t)segs[q].len * 2);
          else
            memset(row + segs[q].dst, 0, (size_t)segs[q].len * 2);
        }
        if (kc % 2) row[kc] = 0;
      }
    }
    return;
  }
  Pixel pixels[2 * KC_MAX];
  for (int64_t k = 0; k < kc; ++k) pixels[k] = pixel_of(g, k0 + k);
  for (int64_t p = 0; p * MR < mc; ++p) {
    uint32_t* o = out + p * MR * LDA;
    const int mr = (int)std::min<int64_t>(MR, mc - p * MR);
    const int64_t nseg = im2col_segments(g, i0 + p * MR, mr, segs);
    for (int64_t u = 0; u < units; ++u) {
      uint32_t* col = o + u * MR;
      for (int64_t q = 0; q < nseg; ++q) {
        const Seg& s = segs[q];
        const char* lo = im2col_run(g, pixels[2 * u], s, 2);
        const char* hi = 2 * u + 1 < kc ? im2col_run(g, pixels[2 * u + 1], s, 2) : nullptr;
        for (int64_t r = 0; r < s.len; r += 16) {
          const __mmask16 m = mask16_any(s.len - r);
          const __m256i vlo = lo ? _mm256_maskz_loadu_epi16(m, lo + 2 * r) : _mm256_setzero_si256();
          const __m256i vhi = hi ? _mm256_maskz_loadu_epi16(m, hi + 2 * r) : _mm256_setzero_si256();
          _mm512_mask_storeu_epi32(col + s.dst + r, m, interleave16(vlo, vhi));
        }
      }
      for (int r = mr; r < MR; ++r) col[r] = 0;
    }
  }
}

// bfloat16 pairs: A block rows [i0, i0+mc), k in [k0, k0+kc) -> panels of MR rows, unit u of row r at
// word [u*MR + r] = a(r, k0+2u) | a(r, k0+2u+1) << 16 (0 past kc and past mc).
template <int MR>
static void pack_a_pairs(const Mat& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, uint32_t* out) {
  if (A.cols) return pack_a_pairs_im2col<MR>(A, i0, mc, k0, kc, out);
  const int64_t units = cdiv(kc, 2);
  for (int64_t p = 0; p * MR < mc; ++p) {
    uint32_t* o = out + p * MR * LDA;
    const int mr = (int)std::min<int64_t>(MR, mc - p * MR);
    const char* base = A.data + ((i0 + p * MR) * A.rs + k0 * A.cs) * 2;
    if (A.cs == 1) {
      // rows layout: each pair is already a word, row r at [r*LDA + u]: a copy
      prefetch_rows(base + MR * A.rs * 2, std::min<int64_t>(MR, mc - (p + 1) * MR), A.rs * 2, kc * 2);
      for (int r = 0; r < MR; ++r) {
        const char* row = base + r * A.rs * 2;
        for (int64_t u = 0; u < units; u += 16)
          _mm512_storeu_si512(o + r * LDA + u, r < mr ? _mm512_maskz_loadu_epi16(mask32_any(kc - 2 * u), row + 4 * u)
                                                      : _mm512_setzero_si512());
      }
    } else if (A.rs == 1) {
      for (int64_t u = 0; u < units; ++u)
        for (int r = 0; r < MR; r += 16) {  // MR may exceed one vector (the narrow tile)
          const char* lo_p = base + (2 * u * A.cs + r) * 2;
          const __m256i lo = _mm256_maskz_loadu_epi16(mask16_any(mr - r), lo_p);
          const __m256i hi = 2 * u + 1 < kc ? _mm256_maskz_loadu_epi16(mask16_any(mr - r), lo_p + A.cs * 2)
                                            : _mm256_setzero_si256();
          _mm512_mask_storeu_epi32(o + u * MR + r, mask16_any(MR - r), interleave16(lo, hi));
        }
    } else {
      for (int64_t u = 0; u < units; ++u)
        for (int r = 0; r < MR; ++r) {
          const uint32_t lo = r < mr ? bits16(base, r * A.rs + 2 * u * A.cs) : 0;
          const uint32_t hi = (r < mr && 2 * u + 1 < kc) ? bits16(base, r * A.rs + (2 * u + 1) * A.cs) : 0;
          o[u * MR + r] = lo | hi << 16;
        }
    }
  }
}

// bfloat16 pairs: B, k in [0, K), columns [j0, j0+nr) -> one panel, unit u of column j at word
// [u*NR + j] = b(2u, j) | b(2u+1, j) << 16 (0 past K and past nr).
template <int NV>
static void pack_b_pairs(const Mat& B, int64_t K, int64_t j0, int64_t nr, uint32_t* o) {
  constexpr int NR = NV * VW;
  const int64_t units = cdiv(K, 2);
  const char* base = B.data + j0 * B.cs * 2;
  if (B.cs == 1) {
    for (int64_t u = 0; u < units; ++u) {
      const char* row0 = base + 2 * u * B.rs * 2;
      const char* row1 = base + (2 * u + 1) * B.rs * 2;
      for (int h = 0; h < NR / 16; ++h) {
        const __mmask16 m = mask16_any(nr - 16 * h);
        const __m256i lo = _mm256_maskz_loadu_epi16(m, row0 + 32 * h);
        const __m256i hi = 2 * u + 1 < K ? _mm256_maskz_loadu_epi16(m, row1 + 32 * h) : _mm256_setzero_si256();
        _mm512_storeu_si512(o + u * NR + 16 * h, interleave16(lo, hi));
      }
    }
  } else if (B.rs == 1) {
    // columns contiguous along k (x @ W.T): each pair is a word; transpose words
    __m512 v[16];
    for (int h = 0; h < NR / 16; ++h) {
      const int nl = (int)std::max<int64_t>(0, std::min<int64_t>(16, nr - 16 * h));
      const char* hb = base + 16 * h * B.cs * 2;
      for (int64_t u = 0; u < units; u += 16) {
        const __mmask32 m = mask32_any(K - 2 * u);
        for (int l = 0; l < 16; ++l)
          v[l] = l < nl ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, hb + (l * B.cs + 2 * u) * 2))
                        : _mm512_setzero_ps();
        transpose16(v);
        const int64_t cnt = std::min<int64_t>(16, units - u);
        for (int64_t uu = 0; uu < cnt; ++uu) _mm512_storeu_ps(o + (u + uu) * NR + 16 * h, v[uu]);
      }
    }
  } else {
    for (int64_t u = 0; u < units; ++u)
      for (int64_t j = 0; j < NR; ++j) {
        const uint32_t lo = j < nr ? bits16(base, 2 * u * B.rs + j * B.cs) : 0;
        const uint32_t hi = (j < nr && 2 * u + 1 < K) ? bits16(base, (2 * u + 1) * B.rs + j * B.cs) : 0;
        o[u * NR + j] = lo | hi << 16;
      }
  }
}
#endif

template <int MR>
static void pack_a(const Mat& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* out, float* tmp) {
  if (A.dt == PQ_DTYPE_FLOAT16)
    pack_a_t<PQ_DTYPE_FLOAT16, MR>(A, i0, mc, k0, kc, out, tmp);
  else if (A.dt == PQ_DTYPE_BFLOAT16)
    pack_a_t<PQ_DTYPE_BFLOAT16, MR>(A, i0, mc, k0, kc, out, tmp);
  else
    pack_a_t<PQ_DTYPE_FLOAT32, MR>(A, i0, mc, k0, kc, out, tmp);
}

template <int NV>
static void pack_b(const Mat& B, int64_t K, int64_t j0, int64_t nr, float* out, float* tmp) {
  if (B.dt == PQ_DTYPE_FLOAT16)
    pack_b_panel<PQ_DTYPE_FLOAT16, NV>(B, K, j0, nr, out, tmp);
  else if (B.dt == PQ_DTYPE_BFLOAT16)
    pack_b_panel<PQ_DTYPE_BFLOAT16, NV>(B, K, j0, nr, out, tmp);
  else
    pack_b_panel<PQ_DTYPE_FLOAT32, NV>(B, K, j0, nr, out, tmp);
}

// ---- output: round float32 rows to C's dtype once ----
struct Out {
  char* data;
  int32_t dt;
  int64_t rs, cs;
};

// tile[r*NR + j] for r < mr, j < nr -> C(i0 + r, j0 + j)
template <int NV>
static inline void store_tile(const float* tile, const Out& c, int64_t i0, int64_t j0, int mr, int nr) {
  constexpr int NR = NV * VW;
  const int64_t es = elem_size(c.dt);
  for (int r = 0; r < mr; ++r) {
    char* row = c.data + ((i0 + r) * c.rs + j0 * c.cs) * es;
    const float* t = tile + r * NR;
    if (c.cs == 1) {
#if PQ_AVX512
      for (int h = 0; h < NR / 16; ++h) {
        const __mmask16 m = mask16_any(nr - 16 * h);
        if (!m) break;
        const __m512 v = _mm512_loadu_ps(t + 16 * h);
        if (c.dt == PQ_DTYPE_FLOAT32) {
          _mm512_mask_storeu_ps(row + 64 * h, m, v);
        } else if (c.dt == PQ_DTYPE_FLOAT16) {
          _mm256_mask_storeu_epi16(row + 32 * h, m, to_half16_keep_nan(v));
        } else {
          _mm256_mask_storeu_epi16(row + 32 * h, m, to_bf16_16(v));
        }
      }
      continue;
#elif PQ_AVX2
      if (c.dt == PQ_DTYPE_FLOAT16 && nr == NR) {
        for (int h = 0; h < NR / 8; ++h)
          _mm_storeu_si128((__m128i*)(row + 16 * h), to_half8_keep_nan(_mm256_loadu_ps(t + 8 * h)));
        continue;
      }
#endif
      for (int j = 0; j < nr; ++j) store_from_float(row, j, c.dt, t[j]);
    } else {
      for (int j = 0; j < nr; ++j) store_from_float(row, j * c.cs, c.dt, t[j]);
    }
  }
}

// ---- micro-kernel ----
// One MR x NR tile over kc steps of K. Accumulators start from 0, from a column bias (NR floats), a row
// bias (MR floats) or from `buf` (the tile's float32 partial sums, row stride ldb); end in `buf` or, after
// the last K block, rounded into C.
struct TileJob {
  int64_t kc;
  const float* a;     // packed A panel: kc x MR
  const float* b;     // packed B panel: kc x NR
  const float* bias;      // NR floats (one per column), or null
  const float* bias_row;  // MR floats (one per row), or null
  float* buf;         // partial sums (MR x NR at row stride ldb)
  int64_t ldb;
  bool from_buf, last;
  bool a_rows;  // packed A in rows layout ([r*LDA + k]) instead of [k*MR + r]
  const Out* c;
  int64_t i0, j0;
  int mr, nr;
};

#if PQ_SIMD
template <int MR, int NV>
PQ_INLINE void init_acc(const TileJob& t, fvec (*c)[NV]) {
  if (t.from_buf) {
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) c[r][h] = vload(t.buf + r * t.ldb + h * VW);
  } else if (t.bias) {
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) c[r][h] = vload(t.bias + h * VW);
  } else if (t.bias_row) {
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) c[r][h] = vbcast(t.bias_row + r);
  } else {
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) c[r][h] = vzero();
  }
}

template <int MR, int NV>
PQ_INLINE void finish_acc(const TileJob& t, fvec (*c)[NV]) {
  constexpr int NR = NV * VW;
  float* dst = t.last ? nullptr : t.buf;
  alignas(64) float tile[MR * NR];
  const int64_t ld = t.last ? NR : t.ldb;
  if (!dst) dst = tile;
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int h = 0; h < NV; ++h) vstore(dst + r * ld + h * VW, c[r][h]);
  if (t.last) store_tile<NV>(tile, *t.c, t.i0, t.j0, t.mr, t.nr);
}

// AROWS: A element (r, k) at a[r*LDA + k] (rows layout), else at a[k*MR + r].
template <bool AROWS, int MR, int NV>
static void micro_kernel(const TileJob& t) {
  constexpr int NR = NV * VW;
  fvec c[MR][NV];
  init_acc<MR, NV>(t, c);
  const float* a = t.a;
  const float* b = t.b;
  for (int64_t k = 0; k < t.kc; ++k) {
    fvec bv[NV];
#pragma GCC unroll 4
    for (int h = 0; h < NV; ++h) bv[h] = vload(b + h * VW);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const fvec ar = vbcast(a + (AROWS ? r * LDA : r));
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) c[r][h] = vfma(ar, bv[h], c[r][h]);
    }
    a += AROWS ? 1 : MR;
    b += NR;
  }
  finish_acc<MR, NV>(t, c);
}

#if PQ_BF16_DOT
// bfloat16 x bfloat16 with the AVX512-BF16 dot product: a packed unit is a 32-bit word holding the pair
// (k = 2u, 2u + 1). vdpbf16ps computes, per lane, c = fma(a_2u, b_2u, fma(a_2u+1, b_2u+1, c)) (checked
// bit for bit on this CPU class; Intel documents the same order) with inputs and results below 2^-126
// flushed to zero. Compiled for avx512bf16 only here; used after a run-time check.
template <bool AROWS, int MR, int NV>
PQ_TARGET_AVX512BF16 static void micro_kernel_bf16(const TileJob& t) {
  constexpr int NR = NV * VW;
  fvec c[MR][NV];
  init_acc<MR, NV>(t, c);
  const uint32_t* a = (const uint32_t*)t.a;
  const float* b = t.b;
  for (int64_t u = 0; u < t.kc; ++u) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int h = 0; h < NV; ++h) bv[h] = (__m512bh)_mm512_loadu_ps(b + h * VW);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[AROWS ? r * LDA : r]);
#pragma GCC unroll 4
      for (int h = 0; h < NV; ++h) c[r][h] = _mm512_dpbf16_ps(c[r][h], ar, bv[h]);
    }
    a += AROWS ? 1 : MR;
    b += NR;
  }
  finish_acc<MR, NV>(t, c);
}

static const bool kHaveBf16Dot = cpu_has_avx512bf16();
#endif
#else
// Portable build: plain loops (no fma instruction; a*b + c, see the file comment).
template <bool AROWS, int MR, int NV>
static inline void micro_kernel(const TileJob& t) {
  constexpr int NR = NV * VW;
  float c[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j)
      c[r][j] = t.from_buf ? t.buf[r * t.ldb + j] : t.bias ? t.bias[j] : t.bias_row ? t.bias_row[r] : 0.0f;
  const float* a = t.a;
  const float* b = t.b;
  for (int64_t k = 0; k < t.kc; ++k) {
    for (int r = 0; r < MR; ++r) {
      const float ar = a[AROWS ? r * LDA : r];
      for (int j = 0; j < NR; ++j) c[r][j] = ar * b[j] + c[r][j];
    }
    a += AROWS ? 1 : MR;
    b += NR;
  }
  if (!t.last) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) t.buf[r * t.ldb + j] = c[r][j];
    return;
  }
  store_tile<NV>(&c[0][0], *t.c, t.i0, t.j0, t.mr, t.nr);
}
#endif

// ---- one product C = A @ B (+ bias): M x K times K x N ----
struct Problem {
  int64_t M, N, K;
  Mat A, B;
  Out C;
  const char* bias;  // N values (bias_rows false) or M values (bias_rows true) at stride bias_stride, or null
  int32_t bias_dt;
  int64_t bias_stride;
  bool bias_rows;
  float bias_at(int64_t index) const { return load_as_float(bias, index * bias_stride, bias_dt); }
};

template <int MR, int NV>
static void gemm(const Problem& p, int nthreads, bool allow_bf16_dot) {
  constexpr int NR = NV * VW;
  constexpr int64_t MC_MAX = (160 / MR) * MR;  // an MC x KC block of A (~150 KiB) stays in L2
  const int64_t M = p.M, N = p.N, K = p.K;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    // C = bias (or 0), rounded once
    alignas(64) float tile[MR * NR];
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const int mr = (int)std::min<int64_t>(MR, M - i0);
      for (int64_t j0 = 0; j0 < N; j0 += NR) {
        const int nr = (int)std::min<int64_t>(NR, N - j0);
        for (int r = 0; r < mr; ++r)
          for (int j = 0; j < nr; ++j)
            tile[r * NR + j] = !p.bias ? 0.0f : p.bias_rows ? p.bias_at(i0 + r) : p.bias_at(j0 + j);
        store_tile<NV>(tile, p.C, i0, j0, mr, nr);
      }
    }
    return;
  }
  // bfloat16 x bfloat16 on a CPU with AVX512-BF16: pairs of k per packed unit, vdpbf16ps
#if PQ_BF16_DOT
  const bool pairs = allow_bf16_dot && kHaveBf16Dot && p.A.dt == PQ_DTYPE_BFLOAT16 && p.B.dt == PQ_DTYPE_BFLOAT16;
#else
  const bool pairs = false;
  (void)allow_bf16_dot;
#endif
  const int64_t step = pairs ? 2 : 1;  // elements of K per packed unit (a word or a float)
  const int64_t KU = cdiv(K, step);    // packed depth
  // K blocks: as few as possible, of equal length (any split gives the same bits)
  const int64_t nk = cdiv(KU, KC_MAX);
  const int64_t KC = cdiv(KU, nk);
  // column blocks: packed B (K x NC floats) within B_BUDGET
  const int64_t nc_max = std::max<int64_t>(NR, (B_BUDGET / (4 * KU)) / NR * NR);
  const int64_t nj = cdiv(N, nc_max);
  const int64_t NC = round_up(cdiv(N, nj), NR);
  const int64_t npanels_max = NC / NR;
  // row blocks, and a split of the column panels when there are too few row blocks for the threads
  int nt = nthreads;
  if ((double)M * N * K < PARALLEL_MIN_FLOPS) nt = 1;
  int64_t ni = cdiv(M, MC_MAX);
  if (nt > 1 && ni % nt && M > (int64_t)nt * MR) ni = round_up(ni, nt);
  const int64_t MC = round_up(cdiv(M, ni), MR);
  ni = cdiv(M, MC);
  int64_t nparts = 1;
  if (nt > 1 && ni < 4 * nt) nparts = std::min<int64_t>(npanels_max, cdiv(4 * nt, ni));
  const int64_t items = ni * nparts;
  nt = (int)std::min<int64_t>(nt, std::max<int64_t>(items, cdiv(N, NR)));

  float* bp = tl_packed_b.get(KU * NC + NC);
  float* bias_p = bp + KU * NC;  // NC column-bias values of the column block, float32

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* ap = tl_packed_a.get(MC * LDA + 16);
    float* tmp = tl_row.get(K + 16);
    float* row_bias = tl_row_bias.get(MC + MR);
    float* cbuf = nk > 1 ? tl_partial.get(MC * NC) : nullptr;
    for (int64_t jb = 0; jb < nj; ++jb) {
      const int64_t j0 = jb * NC;
      const int64_t nc = std::min(NC, N - j0);
      const int64_t npan = cdiv(nc, NR);
#pragma omp for schedule(dynamic)
      for (int64_t q = 0; q < npan; ++q) {
        const int64_t nr = std::min<int64_t>(NR, nc - q * NR);
#if PQ_AVX512
        if (pairs)
          pack_b_pairs<NV>(p.B, K, j0 + q * NR, nr, (uint32_t*)(bp + q * NR * KU));
        else
#endif
          pack_b<NV>(p.B, K, j0 + q * NR, nr, bp + q * NR * KU, tmp);
        if (p.bias && !p.bias_rows)
          for (int64_t j = 0; j < NR; ++j) bias_p[q * NR + j] = j < nr ? p.bias_at(j0 + q * NR + j) : 0.0f;
      }
      // parts: panel ranges of equal size
      const int64_t parts = std::min<int64_t>(nparts, npan);
      const int64_t per_part = cdiv(npan, parts);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < ni * parts; ++item) {
        const int64_t ib = item / parts, part = item % parts;
        const int64_t i0 = ib * MC, mc = std::min(MC, M - i0);
        const int64_t q0 = part * per_part, q1 = std::min(npan, q0 + per_part);
        if (q0 >= q1) continue;
        if (p.bias && p.bias_rows)
          for (int64_t r = 0; r < round_up(mc, MR); ++r) row_bias[r] = r < mc ? p.bias_at(i0 + r) : 0.0f;
        for (int64_t kb = 0; kb < nk; ++kb) {
          const int64_t u0 = kb * KC, kc = std::min(KC, KU - u0);  // in packed units
          const int64_t k0 = u0 * step, kc_elems = std::min(kc * step, K - k0);
#if PQ_AVX512
          if (pairs)
            pack_a_pairs<MR>(p.A, i0, mc, k0, kc_elems, (uint32_t*)ap);
          else
#endif
            pack_a<MR>(p.A, i0, mc, k0, kc_elems, ap, tmp);
          TileJob t;
          t.kc = kc;
          t.ldb = NR;
          t.a_rows = p.A.cols ? !p.A.cols_t : p.A.cs == 1;  // the layout pack_a / pack_a_pairs chose
          t.from_buf = kb > 0;
          t.last = kb == nk - 1;
          t.c = &p.C;
          for (int64_t q = q0; q < q1; ++q) {
            t.b = bp + q * NR * KU + u0 * NR;
            t.bias = (p.bias && !p.bias_rows && kb == 0) ? bias_p + q * NR : nullptr;
            t.j0 = j0 + q * NR;
            t.nr = (int)std::min<int64_t>(NR, nc - q * NR);
            for (int64_t s = 0; s * MR < mc; ++s) {
              t.a = ap + s * MR * LDA;
              t.buf = cbuf ? cbuf + (q * (MC / MR) + s) * (MR * NR) : nullptr;  // tiles stored contiguously
              t.i0 = i0 + s * MR;
              t.mr = (int)std::min<int64_t>(MR, mc - s * MR);
              t.bias_row = (p.bias && p.bias_rows && kb == 0) ? row_bias + s * MR : nullptr;
#if PQ_BF16_DOT
              if (pairs) {
                if (t.a_rows)
                  micro_kernel_bf16<true, MR, NV>(t);
                else
                  micro_kernel_bf16<false, MR, NV>(t);
                continue;
              }
#endif
              if (t.a_rows)
                micro_kernel<true, MR, NV>(t);
              else
                micro_kernel<false, MR, NV>(t);
            }
          }
        }
      }
    }
  }
}

// The tile for one product. With the narrow tile available, a product with at most 16 columns uses it, and
// one with at most 16 rows and more columns is computed as its transpose, C^T = B^T @ A^T, so that its few
// rows become the narrow tile's columns (a convolution's weight gradient: C_out x (kh*kw*C_in) over a long K).
// Every element is still the same chain c = fma(a_ik, b_kj, c), k = 0..K-1 (fma(a, b, c) = fma(b, a, c)),
// so the choice does not change the bits.
// An im2col operand is only gathered as A (pack_a_im2col): a product with one as B is always transposed, one with
// one as A never.
static void gemm_any_tile(Problem p, int nthreads, bool allow_bf16_dot) {
  constexpr int64_t narrow = NV_NARROW * VW;
  const bool transpose = p.B.cols || (kNarrowTile && !p.A.cols && p.M <= narrow && p.N > narrow);
  if (transpose) {
    std::swap(p.M, p.N);
    std::swap(p.A, p.B);
    for (Mat* m : {&p.A, &p.B}) {
      std::swap(m->rs, m->cs);
      m->cols_t = !m->cols_t;
    }
    std::swap(p.C.rs, p.C.cs);
    p.bias_rows = !p.bias_rows;
  }
  if (kNarrowTile && p.N <= narrow)
    gemm<MR_NARROW, NV_NARROW>(p, nthreads, allow_bf16_dot);
  else
    gemm<MR_WIDE, NV_WIDE>(p, nthreads, allow_bf16_dot);
}

}  // namespace

// C[batch] = A[batch] @ B[batch] (+ bias), batch over `nb` broadcast dimensions of sizes batch_shape.
// Each *_strides array holds nb batch strides then the row and column strides, in elements (0 for a
// broadcast dimension). bias: null, or one value per column (bias_rows 0: N values) or per row
// (bias_rows 1: M values) at stride bias_stride. threads <= 0: OpenMP's default. flags PQ_MATMUL_BF16_DOT:
// bfloat16 x bfloat16 may use the AVX512-BF16 dot product (where the CPU has it).
void matmul(int32_t nb, const int64_t* batch_shape, const void* a, int32_t a_dt, const int64_t* a_strides,
            const void* b, int32_t b_dt, const int64_t* b_strides, const void* bias, int32_t bias_dt,
            int64_t bias_stride, int32_t bias_rows, void* c, int32_t c_dt, const int64_t* c_strides, int64_t M,
            int64_t N, int64_t K,
            int32_t threads, int32_t flags) {
  const bool allow_bf16_dot = (flags & PQ_MATMUL_BF16_DOT) != 0;
  int64_t count = 1;
  for (int i = 0; i < nb; ++i) count *= batch_shape[i];
  if (count <= 0) return;
  auto problem = [&](int64_t index) {
    int64_t ao = 0, bo = 0, co = 0;
    for (int i = nb - 1; i >= 0; --i) {
      const int64_t idx = index % batch_shape[i];
      index /= batch_shape[i];
      ao += idx * a_strides[i];
      bo += idx * b_strides[i];
      co += idx * c_strides[i];
    }
    Problem p;
    p.M = M;
    p.N = N;
    p.K = K;
    p.A = Mat{(const char*)a + ao * elem_size(a_dt), a_dt, a_strides[nb], a_strides[nb + 1]};
    p.B = Mat{(const char*)b + bo * elem_size(b_dt), b_dt, b_strides[nb], b_strides[nb + 1]};
    p.C = Out{(char*)c + co * elem_size(c_dt), c_dt, c_strides[nb], c_strides[nb + 1]};
    p.bias = (const char*)bias;
    p.bias_dt = bias_dt;
    p.bias_stride = bias_stride;
    p.bias_rows = bias_rows != 0;
    return p;
  };
  if (threads <= 0) threads = omp_get_max_threads();
  const double flops = (double)M * N * K;
  // Products that split evenly over the threads, or many of them, or small ones: one per thread at a time
  // (no synchronisation inside a product). Otherwise one product after the other, each threaded. Either
  // way every element is computed the same way (see the file comment).
  if (count > 1 && threads > 1 && (count % threads == 0 || count >= 4 * threads || flops < SMALL_FLOPS)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < count; ++i) gemm_any_tile(problem(i), 1, allow_bf16_dot);
  } else {
    for (int64_t i = 0; i < count; ++i) gemm_any_tile(problem(i), threads, allow_bf16_dot);
  }
}

// C = columns(x) @ B (+ bias) (cols_side 0: columns is A, M = N*Ho*Wo, K = kh*kw*C, N = other_dim) or
// C = A @ columns(x) (cols_side 1: columns is B, K = N*Ho*Wo, N = kh*kw*C, M = other_dim), where columns is the
// im2col matrix of the channels-last x (x_shape N, H, W, C; x_strides n, y, x in elements, channels contiguous;
// geometry kh, kw, sh, sw, ph, pw, dh, dw) gathered while packing. Bits: those of matmul on the explicit copy.
void matmul_im2col(const void* x, int32_t x_dt, const int64_t* x_shape, const int64_t* x_strides,
                   const int64_t* geometry, int32_t cols_side, const void* other, int32_t other_dt,
                   const int64_t* other_strides, int64_t other_dim, const void* bias, int32_t bias_dt,
                   int64_t bias_stride, int32_t bias_rows, void* c, int32_t c_dt, const int64_t* c_strides,
                   int32_t threads, int32_t flags) {
  const int64_t kh = geometry[0], kw = geometry[1], sh = geometry[2], sw = geometry[3];
  const int64_t ph = geometry[4], pw = geometry[5], dh = geometry[6], dw = geometry[7];
  Im2col g;
  g.x = (const char*)x;
  g.H = x_shape[1];
  g.W = x_shape[2];
  g.C = x_shape[3];
  g.Ho = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  g.kw = kw;
  g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw, g.dh = dh, g.dw = dw;
  g.sn = x_strides[0], g.sy = x_strides[1], g.sx = x_strides[2];
  const int64_t pixels = x_shape[0] * g.Ho * g.Wo, depth = kh * kw * g.C;
  Problem p;
  const Mat cols{g.x, x_dt, 0, 1, &g, false};
  const Mat mat{(const char*)other, other_dt, other_strides[0], other_strides[1]};
  if (cols_side == 0) {
    p.M = pixels, p.K = depth, p.N = other_dim;
    p.A = cols, p.B = mat;
  } else {
    p.M = other_dim, p.K = pixels, p.N = depth;
    p.A = mat, p.B = cols;
  }
  p.C = Out{(char*)c, c_dt, c_strides[0], c_strides[1]};
  p.bias = (const char*)bias;
  p.bias_dt = bias_dt;
  p.bias_stride = bias_stride;
  p.bias_rows = bias_rows != 0;
  if (p.M <= 0 || p.N <= 0) return;
  gemm_any_tile(p, threads <= 0 ? omp_get_max_threads() : threads, (flags & PQ_MATMUL_BF16_DOT) != 0);
}

}  // namespace PQ_NS
