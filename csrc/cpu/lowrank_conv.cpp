// Fused low-rank convolution (pyquant.ops.lowrank_conv2d): y = W2 . (W1 (*) x) + b, where W1 is a k x k
// convolution into R channels and W2 a 1 x 1 convolution from R to O channels. Compiled once per ISA
// (scalar, avx2, avx512; see dispatch.h); csrc/capi_lowrank.cpp picks one at run time.
//
// Algorithm (per tile of whole output rows of one image; docs/compress.md has the numerics):
// 1. Packing. The tile's input rows (and the k-1 halo rows below) are copied, converted to float32, into a
//    per-thread buffer of "phase planes": for stride s the zero-padded input is split into s*s planes
//    P[ph][pw][a][b] = xpad[a*s + ph][b*s + pw] (only the phases some tap uses). Tap (i, j) of output
//    (oh, ow) then reads plane ((i*d) % s, (j*d) % s) at (oh + (i*d) / s, ow + (j*d) / s), so with plane
//    width Wq every tap reads the CONTIGUOUS run plane[q + off(i, j)] for consecutive "extended" pixels
//    q = oh*Wq + ow. Columns ow >= Wo of the extended grid are computed and thrown away ((k-1)*d/s of
//    every Wq). Not im2col: the copy has the size of the padded input rows, not k*k times it, and it
//    stays in L2 (the tile height is chosen for that) until stage 1 has read it.
//    Two float32 cases skip the copy: a stride-1 convolution padded at most to "same" (AVX-512 build)
//    reads x itself, the extended grid being x's own rows (width W), with masked loads that zero the
//    lanes whose input lies outside the image (masks per tap and vector, made once per chunk; the rows
//    of the tile are prefetched first, stage 1 walking more channel streams than hardware prefetchers
//    follow); a 1x1 stride-1 unpadded one reads x in tiles of pixels (the last tile of the batch through
//    the tile buffer, so that no read passes x's end). A 1x1 stride-1 unpadded one on small images takes
//    the batch's pixels as one sequence (tiles of whole vectors that may span images, packed; outputs
//    stored image by image with masked stores: struct Segments), so no lanes idle at every image's end.
// 2. Stage 1 (the k x k conv into R channels): an implicit GEMM whose micro-kernel holds 8 rank channels x
//    3 vectors of 16 pixels (or 4 x 6 for the last channels) in 24 of the 32 zmm registers and, for each
//    (channel, tap), loads the pixel vectors and broadcasts the weights: one fused multiply-add per
//    register per step. bfloat16 input on a CPU with AVX512_BF16 runs VDPBF16PS on pairs of channels
//    instead (twice the multiply-adds per instruction). The intermediate goes to a small per-thread buffer
//    (R x tile floats, L1/L2-resident), never to memory another tile or the caller sees.
// 3. The valid columns of the tile are compacted: they are consecutive output pixels of y.
// 4. Stage 2 (the 1 x 1 projection to O channels) with the same micro-kernel (K = R, one tap), the bias as
//    the accumulators' initial value, and one rounding to the output dtype on the store.
// Optionally (training) the compacted intermediate is also written out, for the backward pass.
// The avx2 build runs the same code with 8-lane vectors (4 x 3 blocks), the scalar build with floats and
// separate multiply and add.
//
// Numerics: float32 accumulation; each output is one chain of multiply-adds over (channel, tap) in a
// fixed order, so results do not depend on the thread count or the schedule. They differ from torch's
// convolutions in the order of the sums (and, for the bfloat16 pair kernel, in flushing float32
// subnormals to zero inside VDPBF16PS).
// Threads: OpenMP over (image, tile), handed out dynamically; an output element is always computed whole
// by one thread.
// The backward's weight gradient (lowrank_conv2d_wgrad, at the end of the file) reuses the phase planes and
// the micro-kernel's blocking with pixels and channels swapped; its comment says how.
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <type_traits>

#include "pyquant/blockwise.h"
#include "pyquant/dispatch.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PQ_LR_ISA 2
// GCC before 13 reports the undefined pass-through operand of its own unmasked AVX-512 intrinsics as
// uninitialized wherever they are inlined (as csrc/cpu/simd_avx512.h notes).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PQ_LR_ISA 1
#include <immintrin.h>
#else
#define PQ_LR_ISA 0
#endif

// bfloat16 inputs on CPUs with AVX512_BF16: stage 1 multiplies pairs of channels with VDPBF16PS (two
// exact bf16 products added to the float32 accumulator per lane, i.e. twice the multiply-adds of an FMA).
// The instructions come from a function-level target attribute (the avx512 build's flags stop at
// AVX-512 F/BW/VL/DQ), and run only when the CPU reports avx512bf16 at run time.
#if PQ_LR_ISA == 2 && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define PQ_LR_BF16DOT 1
#define PQ_LR_BF16_TARGET __attribute__((target("avx512bf16"), noinline))
#else
#define PQ_LR_BF16DOT 0
#endif

extern "C" int32_t pq_lowrank_bf16_dot;  // capi_lowrank.cpp: 0 forces the float32 path for bfloat16

namespace PQ_NS {
namespace lowrank {
using pq::kBFloat16;
using pq::kFloat16;
using pq::kFloat32;

// ---- the vector abstraction: one register of VL float32 lanes ----
// Micro-kernel shapes (rows = rank channels in stage 1, output channels in stage 2; vectors of pixels):
// stage 1 takes BIG blocks while at least BIG_R rows are left, then one SMALL block (zero-padded rows);
// stage 2 takes SMALL blocks. SMALL_V * VL pixels is the chunk, a multiple of BIG_V * VL.
#if PQ_LR_ISA == 2
using vec = __m512;
constexpr int VL = 16;
constexpr int BIG_R = 8, BIG_V = 3;    // 24 accumulators of 32 registers, 3 loads + 8 broadcasts per step
constexpr int SMALL_R = 4, SMALL_V = 6;  // 24 accumulators, 6 loads + 4 broadcasts per step
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
#elif PQ_LR_ISA == 1
using vec = __m256;
constexpr int VL = 8;
constexpr int BIG_R = 4, BIG_V = 3;  // 12 accumulators of 16 registers
constexpr int SMALL_R = 4, SMALL_V = 3;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
#else
using vec = float;
constexpr int VL = 1;
constexpr int BIG_R = 4, BIG_V = 8;
constexpr int SMALL_R = 4, SMALL_V = 8;
static inline vec vzero() { return 0.0f; }
static inline vec vload(const float* p) { return *p; }
static inline vec vbcast(const float* p) { return *p; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }  // two roundings: no FMA unit assumed
static inline void vstore(float* p, vec v) { *p = v; }
#endif
constexpr int CH = VL * SMALL_V;  // pixels per chunk
static_assert(CH % (VL * BIG_V) == 0, "a chunk must hold whole BIG micro-kernel calls");

// Store the lanes of v whose bit is set in `mask` as dtype DT, lane l at out + off + l, rounding once (to
// nearest even, as torch's .to()).
template <int DT>
static inline void store_mask(void* out, int64_t off, vec v, uint32_t mask) {
#if PQ_LR_ISA == 2
  const __mmask16 m = (__mmask16)mask;
  if (DT == kFloat32) {
    if (mask == 0xFFFFu)
      _mm512_storeu_ps((float*)out + off, v);
    else
      _mm512_mask_storeu_ps((float*)out + off, m, v);
  } else if (DT == kFloat16) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16((uint16_t*)out + off, m, h);
  } else {
    // round to nearest even on the 16 dropped bits; NaN stays a quiet NaN (as pq::float_to_bf16)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16((uint16_t*)out + off, m, _mm512_cvtepi32_epi16(r));
  }
#else
  float tmp[VL];
  vstore(tmp, v);
  for (int64_t i = 0; i < VL; ++i)
    if (mask >> i & 1u) pq::store_from_float(out, off + i, DT, tmp[i]);
#endif
}

// Store the first `lanes` (1..VL, or more: capped at VL) lanes of v at out + off.
template <int DT>
static inline void store_lanes(void* out, int64_t off, vec v, int64_t lanes) {
  store_mask<DT>(out, off, v, lanes >= VL ? (uint32_t)((1ull << VL) - 1) : (uint32_t)((1ull << lanes) - 1));
}

// out[0..n) = float32(x[off .. off + n)) (exact widening).
template <int DT>
static inline void load_row(const void* x, int64_t off, int64_t n, float* __restrict out) {
  int64_t i = 0;
#if PQ_LR_ISA == 2
  if (DT == kFloat32) {
    const float* src = (const float*)x + off;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_loadu_ps(src + i));
    if (i < n) {
      const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
      _mm512_mask_storeu_ps(out + i, m, _mm512_maskz_loadu_ps(m, src + i));
    }
    return;
  }
  const uint16_t* src = (const uint16_t*)x + off;
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    const __m256i h = _mm256_maskz_loadu_epi16(m, src + i);
    if (DT == kFloat16)
      _mm512_mask_storeu_ps(out + i, m, _mm512_cvtph_ps(h));
    else
      _mm512_mask_storeu_ps(out + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#else
  if (DT == kFloat32) {
    const float* src = (const float*)x + off;
    for (; i < n; ++i) out[i] = src[i];
  } else {
    for (; i < n; ++i) out[i] = pq::load_as_float(x, off + i, DT);
  }
#endif
}

// Small copies and fills are written as masked vector loops: the libc calls GCC would otherwise make of
// them cost more than the copies themselves (rows of a few dozen floats).
static inline void zero_floats(float* __restrict p, int64_t n) {
#if PQ_LR_ISA == 2
  for (int64_t i = 0; i < n; i += 16)
    _mm512_mask_storeu_ps(p + i, n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u),
                          _mm512_setzero_ps());
#else
  for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;
#endif
}

static inline void copy_floats(float* __restrict dst, const float* __restrict src, int64_t n) {
#if PQ_LR_ISA == 2
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
#endif
}

// rows[a][b] = float32(x[off + a * xstride + b - lo]) for b - lo in [0, len), 0 elsewhere, b in [0, n),
// a in [0, count): padded input rows, stored Wq = n apart.
// masks[v] (AVX-512): the lanes of vector v (floats 16 v .. 16 v + 16 of a row) that load, the same for
// every row. The AVX-512 version stores whole vectors: up to 15 floats past the last row are overwritten
// (with zeros), and the caller leaves room there (a masked store costs several plain ones here).
#if PQ_LR_ISA == 2
template <int DT>
static inline __m512 load_masked(const void* x, int64_t at, __mmask16 m) {
  if (DT == kFloat32) return _mm512_maskz_loadu_ps(m, (const float*)x + at);  // masked-off lanes never fault
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)x + at);
  return DT == kFloat16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// NV vectors per row, the masks in registers.
template <int DT, int NV>
static inline void padded_rows_fixed(const void* x, int64_t at, int64_t xstride, float* __restrict rows, int64_t n,
                                     int64_t count, const uint16_t* masks) {
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) m[v] = (__mmask16)masks[v];
  for (int64_t a = 0; a < count; ++a, at += xstride, rows += n)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(rows + 16 * v, load_masked<DT>(x, at + 16 * v, m[v]));
}
#endif

template <int DT>
static inline void padded_rows(const void* x, int64_t off, int64_t xstride, int64_t lo, int64_t len,
                               float* __restrict rows, int64_t n, int64_t count, const uint16_t* masks) {
#if PQ_LR_ISA == 2
  (void)len;  // in the masks
  const int64_t at = off - lo;
  switch ((n + 15) / 16) {
    case 1: return padded_rows_fixed<DT, 1>(x, at, xstride, rows, n, count, masks);
    case 2: return padded_rows_fixed<DT, 2>(x, at, xstride, rows, n, count, masks);
    case 3: return padded_rows_fixed<DT, 3>(x, at, xstride, rows, n, count, masks);
    case 4: return padded_rows_fixed<DT, 4>(x, at, xstride, rows, n, count, masks);
    default:
      for (int64_t a = 0; a < count; ++a)
        for (int64_t b = 0, v = 0; b < n; b += 16, ++v)
          _mm512_storeu_ps(rows + a * n + b, load_masked<DT>(x, at + a * xstride + b, (__mmask16)masks[v]));
  }
#else
  (void)masks;
  const int64_t l0 = std::min(lo, n), l1 = std::min(lo + len, n);
  for (int64_t a = 0; a < count; ++a) {
    float* row = rows + a * n;
    for (int64_t b = 0; b < l0; ++b) row[b] = 0.0f;
    load_row<DT>(x, off + a * xstride, l1 - l0, row + l0);
    for (int64_t b = l1; b < n; ++b) row[b] = 0.0f;
  }
#endif
}

// The load masks of padded_row.
static inline void padded_row_masks(int64_t lo, int64_t len, int64_t n, uint16_t* masks) {
  for (int64_t b = 0, v = 0; b < n; b += 16, ++v) {
    uint32_t m = 0;
    for (int64_t l = 0; l < 16; ++l)
      if (b + l >= lo && b + l < lo + len) m |= 1u << l;
    masks[v] = (uint16_t)m;
  }
}

struct Geometry {
  int64_t N, C, H, W, R, O, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;        // output size
  int64_t Wq;            // phase plane width: the extended grid of a tile is rows x Wq
  int64_t amax, bmax;    // largest tap offset in plane rows / columns
  int64_t nphase;        // phase planes packed per channel
  int64_t phase_of[64];  // (ph * sw + pw) -> plane index, -1 when no tap uses it (sh * sw <= 64)
  bool batched;          // 1x1, stride 1, no padding, small images: tiles of "batch pixels" that may span
                         // images (pixel p of image n is batch pixel n * H * W + p), packed
  int64_t batch_vecs;    // batched: vectors of VL batch pixels, split evenly over the tiles
  bool direct;           // float32 1x1, stride 1, no padding: stage 1 reads x itself (tiles of TP pixels)
  const int64_t* koffd;  // direct: the stage-1 offsets into x (c * H * W)
  bool masked;           // float32, stride 1, k > 1, padding <= "same" (AVX-512): stage 1 reads x with masks
  const int32_t* qrow;   // masked: row and column of each tile-local pixel of the extended grid (Wq = W)
  const int32_t* qcol;
  int64_t rows;          // output rows per tile
  int64_t ntiles;        // tiles per image
  int64_t TP;            // stride of the intermediate buffers: rows * Wq rounded up to a chunk
  int64_t pstride;       // floats per packed phase plane of a tile: (rows + amax) * Wq and room
  int64_t cstride;       // floats per packed channel
  int64_t tile_floats;   // packed tile, slack included
  bool single;           // no 1 x 1 stage: y = conv(x, W1) (the backward's input gradient)
  int64_t Cp;            // packed channels: C, or channel pairs for the bfloat16 pair kernel
  int64_t K1;            // Cp * kh * kw: the stage-1 reduction steps
  int64_t nbig;          // stage-1 BIG row blocks; then one SMALL block if Rpad > nbig * BIG_R
  int64_t Rpad, Opad;    // R rounded up to the stage-1 blocks, O to SMALL_R
};

// The micro-kernel: acc[r][v] = init[r] + sum_k w[k*NR + r] * in[koff[k] + v*VL] for r < NR, v < NV,
// k in order (one fused multiply-add per term); then sink(r, v, acc[r][v]).
template <int NR, int NV, class Sink>
static inline void micro(const float* __restrict in, const int64_t* __restrict koff, int64_t K,
                         const float* __restrict w, const float* __restrict init, Sink&& sink) {
  vec acc[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const vec b = init ? vbcast(init + r) : vzero();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* src = in + koff[k];
    const float* wk = w + k * NR;
    vec xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = vload(src + v * VL);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const vec wr = vbcast(wk + r);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(wr, xv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sink(r, v, acc[r][v]);
}

// micro<NR, nv> for a run-time nv in 1..NV.
template <int NR, int NV, class Sink>
static inline void micro_nv(int64_t nv, const float* in, const int64_t* koff, int64_t K, const float* w,
                            const float* init, Sink&& sink) {
  if constexpr (NV > 1) {
    if (nv < NV) return micro_nv<NR, NV - 1>(nv, in, koff, K, w, init, sink);
  }
  micro<NR, NV>(in, koff, K, w, init, sink);
}

#if PQ_LR_ISA == 2
// The micro-kernel reading x in place (float32, stride 1): step k = (channel, tap) loads its vectors with
// the masks of its tap (masks[t * SMALL_V + v]; lanes outside the image read as 0, so no padded copy).
template <int NR, int NV, class Sink>
static inline void micro_masked(const float* __restrict in, const int64_t* __restrict koff, int64_t C, int64_t taps,
                                const uint16_t* __restrict masks, const float* __restrict w, Sink&& sink) {
  vec acc[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  const float* wk = w;
  const int64_t* kk = koff;
  for (int64_t c = 0; c < C; ++c) {
    const uint16_t* mt = masks;
    for (int64_t t = 0; t < taps; ++t, ++kk, wk += NR, mt += SMALL_V) {
      const float* src = in + *kk;
      vec xv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = _mm512_maskz_loadu_ps((__mmask16)mt[v], src + v * VL);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        const vec wr = vbcast(wk + r);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = vfma(wr, xv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sink(r, v, acc[r][v]);
}

template <int NR, int NV, class Sink>
static inline void micro_masked_nv(int64_t nv, const float* in, const int64_t* koff, int64_t C, int64_t taps,
                                   const uint16_t* masks, const float* w, Sink&& sink) {
  if constexpr (NV > 1) {
    if (nv < NV) return micro_masked_nv<NR, NV - 1>(nv, in, koff, C, taps, masks, w, sink);
  }
  micro_masked<NR, NV>(in, koff, C, taps, masks, w, sink);
}
#endif

#if PQ_LR_BF16DOT
// The bfloat16 pair micro-kernel: in and w hold 32-bit pairs (bf16 of channel 2c in the low half, 2c+1
// in the high half); acc[r][v] += w[k][r].lo * in.lo + w[k][r].hi * in.hi per lane, k in order.
template <int NR, int NV, class Sink>
PQ_LR_BF16_TARGET static void micro_dp(const float* __restrict in, const int64_t* __restrict koff, int64_t K,
                                       const float* __restrict w, Sink& sink) {
  __m512 acc[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int32_t* wi = (const int32_t*)w;
  for (int64_t k = 0; k < K; ++k) {
    const float* src = in + koff[k];
    __m512bh xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(src + v * VL);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512bh wr = (__m512bh)_mm512_set1_epi32(wi[k * NR + r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wr, xv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sink(r, v, acc[r][v]);
}

template <int NR, int NV, class Sink>
static inline void micro_dp_nv(int64_t nv, const float* in, const int64_t* koff, int64_t K, const float* w,
                               Sink&& sink) {
  if constexpr (NV > 1) {
    if (nv < NV) return micro_dp_nv<NR, NV - 1>(nv, in, koff, K, w, sink);
  }
  micro_dp<NR, NV>(in, koff, K, w, sink);
}

static bool bf16_dot_supported() {
  __builtin_cpu_init();
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// Pairs rows: rows[a][b] = bits(xa[..]) | bits(xb[..]) << 16 for the padded rows of channels 2c and 2c + 1
// (xb null: channel 2c + 1 does not exist, zeros); as padded_rows, whole-vector stores.
template <int NV>
static inline void pair_rows_fixed(const uint16_t* xa, const uint16_t* xb, int64_t xstride, float* __restrict rows,
                                   int64_t n, int64_t count, const uint16_t* masks) {
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) m[v] = (__mmask16)masks[v];
  for (int64_t a = 0; a < count; ++a, xa += xstride, xb = xb ? xb + xstride : xb, rows += n)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m[v], xa + 16 * v));
      const __m512i hi = xb ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m[v], xb + 16 * v)), 16)
                            : _mm512_setzero_si512();
      _mm512_storeu_si512(rows + 16 * v, _mm512_or_si512(lo, hi));
    }
}

static void pair_rows(const uint16_t* xa, const uint16_t* xb, int64_t xstride, float* rows, int64_t n, int64_t count,
                      const uint16_t* masks) {
  switch ((n + 15) / 16) {
    case 1: return pair_rows_fixed<1>(xa, xb, xstride, rows, n, count, masks);
    case 2: return pair_rows_fixed<2>(xa, xb, xstride, rows, n, count, masks);
    case 3: return pair_rows_fixed<3>(xa, xb, xstride, rows, n, count, masks);
    case 4: return pair_rows_fixed<4>(xa, xb, xstride, rows, n, count, masks);
    default:
      for (int64_t a = 0; a < count; ++a)
        for (int64_t b = 0, v = 0; b < n; b += 16, ++v) {
          const __mmask16 mv = (__mmask16)masks[v];
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mv, xa + a * xstride + b));
          const __m512i hi =
              xb ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mv, xb + a * xstride + b)), 16)
                 : _mm512_setzero_si512();
          _mm512_storeu_si512(rows + a * n + b, _mm512_or_si512(lo, hi));
        }
  }
}

// One run of n pixels of channels a and b (null: zeros) as 32-bit pairs, as pair_rows; stores n pairs only.
static inline void pair_run(const uint16_t* xa, const uint16_t* xb, int64_t n, float* __restrict dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, xa + i));
    const __m512i hi =
        xb ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, xb + i)), 16) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + i, m, _mm512_or_si512(lo, hi));
  }
}
#endif

static void* alloc_floats(int64_t n) {
  const size_t bytes = (((size_t)n * sizeof(float)) + 63) & ~(size_t)63;
  return aligned_alloc(64, bytes ? bytes : 64);
}

static void* huge_floats(int64_t n) {
  const size_t align = (size_t)2 << 20;
  const size_t bytes = ((size_t)n * sizeof(float) + align - 1) & ~(align - 1);
  void* p = aligned_alloc(align, bytes);
#ifdef MADV_HUGEPAGE
  if (p) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

// A buffer kept by a thread from call to call (fresh pages on every call cost as much as packing the input
// for small layers), zero-filled when it grows. Buffers over kKeepFloats are freed after the call.
constexpr int64_t kKeepFloats = (int64_t)64 << 20 >> 2;  // 64 MiB
struct Scratch {
  float* ptr = nullptr;
  int64_t size = 0;
  ~Scratch() { free(ptr); }
  bool huge = false;  // 2 MiB aligned and madvise(MADV_HUGEPAGE): the packed tiles, read with a 4 KiB
                      // page step per channel, otherwise miss the first-level TLB on every channel
  float* get(int64_t n) {
    if (n > size) {
      free(ptr);
      ptr = huge ? (float*)huge_floats(n) : (float*)alloc_floats(n);
      size = ptr ? n : 0;
      if (ptr) memset(ptr, 0, (size_t)n * sizeof(float));
    }
    return ptr;
  }
  void trim() {
    if (size > kKeepFloats) free(ptr), ptr = nullptr, size = 0;
  }
};
static thread_local Scratch t_packed, t_text, t_tc, t_tmp, t_weights, t_tapmasks;

// Pack plane rows [r0, r0 + nr) of channel c of image n into dst (cstride floats; plane row A holds
// padded input row A * sh + phase). tmp: W floats.
template <int DT>
static void pack_channel(const Geometry& g, const void* x, int64_t n, int64_t c, int64_t r0, int64_t nr, float* dst,
                         float* tmp, const uint16_t* masks) {
  for (int64_t phh = 0; phh < g.sh; ++phh)
    for (int64_t phw = 0; phw < g.sw; ++phw) {
      const int64_t p = g.phase_of[phh * g.sw + phw];
      if (p < 0) continue;
      float* P = dst + p * g.pstride;
      // plane row a holds input row ih = (r0 + a) * sh + phh - ph: rows [a0, a1) are inside the input
      const int64_t base = r0 * g.sh + phh - g.ph;  // ih of a = 0
      const int64_t a0 = std::min(nr, base >= 0 ? 0 : (-base + g.sh - 1) / g.sh);
      const int64_t a1 = std::max(a0, std::min(nr, base >= g.H ? 0 : (g.H - 1 - base) / g.sh + 1));
      zero_floats(P, a0 * g.Wq);
      zero_floats(P + a1 * g.Wq, (nr - a1) * g.Wq);
      if (a1 == a0) continue;
      const int64_t src = ((n * g.C + c) * g.H + base + a0 * g.sh) * g.W;
      if (g.sw == 1) {
        // row[b] = x[b - pw]: zeros, the input row, zeros
        padded_rows<DT>(x, src, g.sh * g.W, g.pw, g.W, P + a0 * g.Wq, g.Wq, a1 - a0, masks);
      } else {
        for (int64_t a = a0; a < a1; ++a) {
          float* row = P + a * g.Wq;
          load_row<DT>(x, src + (a - a0) * g.sh * g.W, g.W, tmp);
          for (int64_t b = 0; b < g.Wq; ++b) {
            const int64_t iw = b * g.sw + phw - g.pw;
            row[b] = (iw >= 0 && iw < g.W) ? tmp[iw] : 0.0f;
          }
        }
      }
    }
}

#if PQ_LR_BF16DOT
// pack_channel for the pair kernel: channels 2 cp and 2 cp + 1 of bfloat16 x interleaved (32-bit pairs).
// tmp: W floats (two bf16 rows).
static void pack_pair(const Geometry& g, const void* x, int64_t n, int64_t cp, int64_t r0, int64_t nr, float* dst,
                      float* tmp, const uint16_t* masks) {
  const int64_t c = 2 * cp;
  const bool has_b = c + 1 < g.C;
  for (int64_t phh = 0; phh < g.sh; ++phh)
    for (int64_t phw = 0; phw < g.sw; ++phw) {
      const int64_t p = g.phase_of[phh * g.sw + phw];
      if (p < 0) continue;
      float* P = dst + p * g.pstride;
      const int64_t base = r0 * g.sh + phh - g.ph;
      const int64_t a0 = std::min(nr, base >= 0 ? 0 : (-base + g.sh - 1) / g.sh);
      const int64_t a1 = std::max(a0, std::min(nr, base >= g.H ? 0 : (g.H - 1 - base) / g.sh + 1));
      zero_floats(P, a0 * g.Wq);
      zero_floats(P + a1 * g.Wq, (nr - a1) * g.Wq);
      if (a1 == a0) continue;
      const uint16_t* xa = (const uint16_t*)x + ((n * g.C + c) * g.H + base + a0 * g.sh) * g.W;
      const uint16_t* xb = has_b ? xa + g.H * g.W : nullptr;
      if (g.sw == 1) {
        pair_rows(xa - g.pw, xb ? xb - g.pw : nullptr, g.sh * g.W, P + a0 * g.Wq, g.Wq, a1 - a0, masks);
      } else {
        uint16_t* ta = (uint16_t*)tmp;
        for (int64_t a = a0; a < a1; ++a) {
          uint32_t* row = (uint32_t*)(P + a * g.Wq);
          const int64_t off = (a - a0) * g.sh * g.W;
          for (int64_t b = 0; b < g.Wq; ++b) {
            const int64_t iw = b * g.sw + phw - g.pw;
            const bool in = iw >= 0 && iw < g.W;
            const uint32_t lo = in ? xa[off + iw] : 0u, hi = (in && xb) ? xb[off + iw] : 0u;
            row[b] = lo | hi << 16;
          }
          (void)ta;
        }
      }
    }
}
#endif

struct TextSink {  // stage 1: accumulators -> the per-thread intermediate buffer
  float* base;
  int64_t stride;
  inline void operator()(int r, int v, vec a) const { vstore(base + r * stride + v * VL, a); }
};

template <int DT>
struct OutSink {  // stage 2: accumulators -> y, rounded once, the tail masked, padded rows dropped
  void* y;
  int64_t row0, rowstride, lanes, rows;  // lanes left from the first vector of this call; valid rows
  inline void operator()(int r, int v, vec a) const {
    const int64_t left = lanes - (int64_t)v * VL;
    if (left > 0 && r < rows) store_lanes<DT>(y, row0 + r * rowstride + v * VL, a, left);
  }
};

// Batched tiles: where the lanes of each vector of the tile go. Vector v holds batch pixels q0 + v * VL ..;
// its lanes fall into n[v] images (more than two only for images smaller than a vector): segment s covers
// the lanes in mask[v][s], of image img[v][s], lane l at pixel l + at[v][s]. Channel ch of a
// [N, planes, HW] tensor: lane l at (img * planes + ch) * HW + at + l.
constexpr int kTileVecs = 8 * SMALL_V;  // the most vectors a batched tile has
struct Segments {
  int32_t n[kTileVecs];
  int32_t img[kTileVecs][VL], at[kTileVecs][VL];
  uint32_t mask[kTileVecs][VL];
  void build(int64_t q0, int64_t count, int64_t HW) {  // batch pixels [q0, q0 + count)
    for (int64_t v = 0; v * VL < count; ++v) {
      const int64_t q = q0 + v * VL, lanes = std::min<int64_t>(VL, count - v * VL);
      int32_t k = 0;
      for (int64_t l = 0; l < lanes; ++k) {
        const int64_t img_ = (q + l) / HW, p = (q + l) % HW, len = std::min(lanes - l, HW - p);
        img[v][k] = (int32_t)img_, at[v][k] = (int32_t)(p - l), mask[v][k] = (uint32_t)(((1ull << len) - 1) << l);
        l += len;
      }
      n[v] = k;
    }
  }
  template <int DT>
  inline void store(void* out, int64_t planes, int64_t HW, int64_t ch, int64_t v, vec a) const {
    for (int32_t k = 0; k < n[v]; ++k) store_mask<DT>(out, (img[v][k] * planes + ch) * HW + at[v][k], a, mask[v][k]);
  }
};

template <int DT>
struct BatchOutSink {  // OutSink for batched tiles: the call's vector v is the tile's vector v0 + v
  void* y;
  int64_t O, HW, o0, v0, rows;
  const Segments* seg;
  inline void operator()(int r, int v, vec a) const {
    if (r < rows) seg->template store<DT>(y, O, HW, o0 + r, v0 + v, a);
  }
};

struct Workspace {
  float* packed;  // the tile's input, tile_floats
  float* text;    // Rpad x TP: stage-1 result on the extended grid
  float* tc;      // R x TP (+ a chunk): its valid columns, compacted
  float* tmp;     // one input row
  const uint16_t* masks;  // padded_row's load masks
  uint16_t* tapmasks;     // masked: the load masks of one chunk, [tap][SMALL_V]
};

// Prefetch (into L2) input rows [ih0, ih1) of every channel of image n (es: bytes per element).
static inline void prefetch_rows(const Geometry& g, const void* x, int64_t es, int64_t n, int64_t ih0, int64_t ih1) {
  const int64_t bytes = (ih1 - ih0) * g.W * es;
  for (int64_t c = 0; c < g.C; ++c) {
    const char* base = (const char*)x + (((n * g.C + c) * g.H + ih0) * g.W) * es;
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + b, 0, 2);
  }
}

// Tile t of image n: output rows [t * rows, t * rows + nrows), all columns. DP: the bfloat16 pair kernel.
template <int DT, bool DP>
static void tile(const Geometry& g, const void* x, int64_t n, int64_t t, const int64_t* koff1,
                 const int64_t* koff2, const float* w1p, const float* w2p, const float* biasp, void* y, void* tout,
                 const Workspace& ws) {
  const float* in = ws.packed;
  int64_t ext, v0, nv, nrows = 0;
  if (g.masked) {
    const int64_t r0 = t * g.rows;
    nrows = std::min(g.rows, g.Ho - r0);
    in = (const float*)x + n * g.C * g.H * g.W + r0 * g.W;
    // Stage 1 walks the channels of x in turn, far more streams than the hardware prefetchers follow:
    // ask for the tile's rows of every channel first, so that the misses overlap. Not for images of at most
    // 128 KiB, which are in L2 when the layer before has just written them (DenseNet 14x14, 100 KiB: 1-4%
    // faster without the 1600 prefetches per image; 28x28: no difference).
    if (g.C * g.H * g.W > (32 << 10))
      prefetch_rows(g, x, 4, n, std::max<int64_t>(0, r0 - g.ph),
                    std::min<int64_t>(g.H, r0 + nrows + (g.kh - 1) * g.dh - g.ph));
    ext = nrows * g.Wq;
    v0 = r0 * g.Wo;
    nv = nrows * g.Wo;
  } else if (g.batched) {
    // batch pixels [q0, q1): whole vectors (the last one may be partial), any number of images
    const int64_t HW = g.H * g.W;
    const int64_t q0 = t * g.batch_vecs / g.ntiles * VL, q1 = std::min(g.N * HW, (t + 1) * g.batch_vecs / g.ntiles * VL);
    for (int64_t c = 0; c < g.Cp; ++c) {
      float* dst = ws.packed + c * g.TP - q0;
      for (int64_t q = q0; q < q1;) {
        const int64_t img = q / HW, p = q % HW, len = std::min(HW - p, q1 - q);
        if constexpr (DP) {
#if PQ_LR_BF16DOT
          const uint16_t* xa = (const uint16_t*)x + (img * g.C + 2 * c) * HW + p;
          pair_run(xa, 2 * c + 1 < g.C ? xa + HW : nullptr, len, dst + q);
#endif
        } else {
          load_row<DT>(x, (img * g.C + c) * HW + p, len, dst + q);
        }
        q += len;
      }
    }
    ext = q1 - q0;
    v0 = q0;
    nv = ext;
  } else if (g.direct) {
    // pixels [p0, p0 + ext) of every channel straight from x. Stage 1 reads up to a chunk past them:
    // still inside x except in the last tile of the last image, which goes through the tile buffer.
    const int64_t HW = g.H * g.W, p0 = t * g.TP;
    ext = std::min(g.TP, HW - p0);
    v0 = p0;
    nv = ext;
    if (n == g.N - 1 && t == g.ntiles - 1) {
      for (int64_t c = 0; c < g.C; ++c) copy_floats(ws.packed + c * g.TP, (const float*)x + (n * g.C + c) * HW + p0, ext);
    } else {
      in = (const float*)x + n * g.C * HW + p0;
      koff1 = g.koffd;
    }
  } else {
    const int64_t r0 = t * g.rows;
    nrows = std::min(g.rows, g.Ho - r0);
    if constexpr (DP) {
#if PQ_LR_BF16DOT
      for (int64_t cp = 0; cp < g.Cp; ++cp)
        pack_pair(g, x, n, cp, r0, nrows + g.amax, ws.packed + cp * g.cstride, ws.tmp, ws.masks);
#endif
    } else {
      for (int64_t c = 0; c < g.C; ++c)
        pack_channel<DT>(g, x, n, c, r0, nrows + g.amax, ws.packed + c * g.cstride, ws.tmp, ws.masks);
    }
    ext = nrows * g.Wq;
    v0 = r0 * g.Wo;
    nv = nrows * g.Wo;
  }
  // stage 1: text[r][q] for every rank channel, chunk by chunk, row block by row block
  for (int64_t c0 = 0; c0 < ext; c0 += CH) {
    const int64_t vecs = (std::min<int64_t>(CH, ext - c0) + VL - 1) / VL;
#if PQ_LR_ISA == 2
    if constexpr (DT == kFloat32 && !DP) {
      if (g.masked) {
        // the masks of this chunk: lane (pixel) valid for tap (i, j) when its input (oh + i*dh - ph,
        // ow + j*dw - pw) lies in the image (rows past the tile's end included: they read x, or nothing)
        const int64_t r0 = t * g.rows;
        for (int64_t v = 0; v < vecs; ++v) {
          const __m512i row = _mm512_add_epi32(_mm512_loadu_si512(g.qrow + c0 + v * VL), _mm512_set1_epi32((int)r0));
          const __m512i col = _mm512_loadu_si512(g.qcol + c0 + v * VL);
          __mmask16 rm[16], cm[16];
          for (int64_t i = 0; i < g.kh; ++i) {
            const __m512i ih = _mm512_add_epi32(row, _mm512_set1_epi32((int)(i * g.dh - g.ph)));
            rm[i] = _mm512_cmpge_epi32_mask(ih, _mm512_setzero_si512()) &
                    _mm512_cmplt_epi32_mask(ih, _mm512_set1_epi32((int)g.H));
          }
          for (int64_t j = 0; j < g.kw; ++j) {
            const __m512i iw = _mm512_add_epi32(col, _mm512_set1_epi32((int)(j * g.dw - g.pw)));
            cm[j] = _mm512_cmpge_epi32_mask(iw, _mm512_setzero_si512()) &
                    _mm512_cmplt_epi32_mask(iw, _mm512_set1_epi32((int)g.W));
          }
          for (int64_t i = 0; i < g.kh; ++i)
            for (int64_t j = 0; j < g.kw; ++j) ws.tapmasks[(i * g.kw + j) * SMALL_V + v] = rm[i] & cm[j];
        }
        const int64_t taps = g.kh * g.kw;
        for (int64_t b = 0; b < g.nbig; ++b) {
          const float* w = w1p + b * BIG_R * g.K1;
          for (int64_t v = 0; v < vecs; v += BIG_V)
            micro_masked_nv<BIG_R, BIG_V>(std::min<int64_t>(BIG_V, vecs - v), in + c0 + v * VL, koff1, g.C, taps,
                                          ws.tapmasks + v, w, TextSink{ws.text + b * BIG_R * g.TP + c0 + v * VL, g.TP});
        }
        if (g.Rpad > g.nbig * BIG_R)
          micro_masked_nv<SMALL_R, SMALL_V>(vecs, in + c0, koff1, g.C, taps, ws.tapmasks, w1p + g.nbig * BIG_R * g.K1,
                                            TextSink{ws.text + g.nbig * BIG_R * g.TP + c0, g.TP});
        continue;
      }
    }
#endif
    for (int64_t b = 0; b < g.nbig; ++b) {
      const float* w = w1p + b * BIG_R * g.K1;
      for (int64_t v = 0; v < vecs; v += BIG_V) {
        const int64_t nv = std::min<int64_t>(BIG_V, vecs - v);
        TextSink sink{ws.text + b * BIG_R * g.TP + c0 + v * VL, g.TP};
        if constexpr (DP) {
#if PQ_LR_BF16DOT
          micro_dp_nv<BIG_R, BIG_V>(nv, in + c0 + v * VL, koff1, g.K1, w, sink);
#endif
        } else {
          micro_nv<BIG_R, BIG_V>(nv, in + c0 + v * VL, koff1, g.K1, w, nullptr, sink);
        }
      }
    }
    if (g.Rpad > g.nbig * BIG_R) {
      const float* w = w1p + g.nbig * BIG_R * g.K1;
      TextSink sink{ws.text + g.nbig * BIG_R * g.TP + c0, g.TP};
      if constexpr (DP) {
#if PQ_LR_BF16DOT
        micro_dp_nv<SMALL_R, SMALL_V>(vecs, in + c0, koff1, g.K1, w, sink);
#endif
      } else {
        micro_nv<SMALL_R, SMALL_V>(vecs, in + c0, koff1, g.K1, w, nullptr, sink);
      }
    }
  }
  // the valid columns: output pixels [v0, v0 + nv) of image n, consecutive
  const float* tc = ws.text;
  if (g.Wq != g.Wo) {
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t i = 0; i < nrows; ++i) copy_floats(ws.tc + r * g.TP + i * g.Wo, ws.text + r * g.TP + i * g.Wq, g.Wo);
    tc = ws.tc;
  }
  const int64_t HoWo = g.Ho * g.Wo;
  Segments seg;
  if (g.batched) seg.build(v0, nv, HoWo);
  if (tout && g.batched) {
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t i = 0; i < nv; i += VL) seg.store<DT>(tout, g.R, HoWo, r, i / VL, vload(tc + r * g.TP + i));
  } else if (tout) {
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t off = (n * g.R + r) * HoWo + v0;
      for (int64_t i = 0; i < nv; i += VL) store_lanes<DT>(tout, off + i, vload(tc + r * g.TP + i), nv - i);
    }
  }
  if (g.single) return;  // a plain convolution: its result went out as `tout`
  // stage 2: y[n][o][v0 + i] = bias[o] + sum_r W2[o][r] * tc[r][i]
  for (int64_t ob = 0; ob < g.Opad / SMALL_R; ++ob) {
    const int64_t no = std::min<int64_t>(SMALL_R, g.O - ob * SMALL_R);
    for (int64_t i = 0; i < nv; i += CH) {
      const int64_t vecs = (std::min<int64_t>(CH, nv - i) + VL - 1) / VL;
      if (g.batched)
        micro_nv<SMALL_R, SMALL_V>(vecs, tc + i, koff2, g.R, w2p + ob * g.R * SMALL_R, biasp + ob * SMALL_R,
                                   BatchOutSink<DT>{y, g.O, HoWo, ob * SMALL_R, i / VL, no, &seg});
      else
        micro_nv<SMALL_R, SMALL_V>(vecs, tc + i, koff2, g.R, w2p + ob * g.R * SMALL_R, biasp + ob * SMALL_R,
                                   OutSink<DT>{y, (n * g.O + ob * SMALL_R) * HoWo + v0 + i, HoWo, nv - i, no});
    }
  }
}

// Row blocks of the packed W1 (g.R set): nbig blocks of BIG_R rows, then one of SMALL_R (zero rows) when
// Rpad > nbig * BIG_R; W2 and the bias in blocks of SMALL_R output channels.
static void set_blocks(Geometry& g) {
  g.nbig = g.R / BIG_R;
  const int64_t rest = g.R - g.nbig * BIG_R;
  g.Rpad = g.nbig * BIG_R + (rest > 0 ? SMALL_R : 0);
  if (rest > SMALL_R) g.nbig += 1, g.Rpad = g.nbig * BIG_R;  // BIG_R <= 2 * SMALL_R: at most one SMALL block
  g.Opad = (g.O + SMALL_R - 1) / SMALL_R * SMALL_R;
}

// The phase planes of the geometry (see the algorithm above): which (row, column) phases some tap reads, the
// largest tap offsets in plane rows and columns, and the plane width of the extended grid, Wq = Wo + bmax.
static void set_phases(Geometry& g) {
  for (int64_t i = 0; i < 64; ++i) g.phase_of[i] = -1;
  g.nphase = 0;
  g.amax = g.bmax = 0;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t key = ((i * g.dh) % g.sh) * g.sw + (j * g.dw) % g.sw;
      if (g.phase_of[key] < 0) g.phase_of[key] = g.nphase++;
      g.amax = std::max(g.amax, i * g.dh / g.sh);
      g.bmax = std::max(g.bmax, j * g.dw / g.sw);
    }
  g.Wq = g.Wo + g.bmax;
}

// Offset of tap (i, j) in the phase planes of one channel (pstride floats per plane, Wq per row).
static inline int64_t tap_offset(const Geometry& g, int64_t i, int64_t j) {
  const int64_t p = g.phase_of[((i * g.dh) % g.sh) * g.sw + (j * g.dw) % g.sw];
  return p * g.pstride + (i * g.dh / g.sh) * g.Wq + (j * g.dw / g.sw);
}

// Floats of the packed weights (g.K1 and the blocks set): W1, W2, bias, each rounded up to 16.
struct PackedSizes {
  int64_t n1, n2, nb;
};
static PackedSizes packed_sizes(const Geometry& g) {
  if (g.single) return {(g.Rpad * g.K1 + 15) / 16 * 16, 0, 0};  // no second stage
  return {(g.Rpad * g.K1 + 15) / 16 * 16, (g.Opad * g.R + 15) / 16 * 16, (g.Opad + 15) / 16 * 16};
}
constexpr int64_t kPackHeader = 16;  // a caller's packed buffer starts with what it was packed for (int32s)
constexpr int64_t kSerialMacs = (int64_t)1 << 20;  // about 8 us of one core's multiply-adds

// The weights as the micro-kernels read them (float32): stage-1 blocks w1p[block][k][rows in block] (dp: k
// counts channel pairs, each a 32-bit pair of bfloat16), w2p[ob][r][SMALL_R], biasp[Opad]; zeros for padding.
template <int DT>
static void pack_weights(const Geometry& g, bool dp, const void* w1, const void* w2, const void* bias, float* w1p,
                         float* w2p, float* biasp) {
  const int64_t taps = g.kh * g.kw;
  for (int64_t r = 0; r < g.Rpad; ++r) {
    const int64_t b = r / BIG_R;
    const int64_t r0 = b < g.nbig ? b * BIG_R : g.nbig * BIG_R;
    const int64_t nrb = b < g.nbig ? BIG_R : SMALL_R;
    float* dst = w1p + r0 * g.K1 + (r - r0);
    if (dp) {  // 32-bit pairs of bfloat16 weights: channel 2 cp low, 2 cp + 1 high
      const uint16_t* src = (const uint16_t*)w1 + r * g.C * taps;
      for (int64_t cp = 0; cp < g.Cp; ++cp)
        for (int64_t t = 0; t < taps; ++t) {
          uint32_t pair = 0;
          if (r < g.R) {
            pair = src[2 * cp * taps + t];
            if (2 * cp + 1 < g.C) pair |= (uint32_t)src[(2 * cp + 1) * taps + t] << 16;
          }
          memcpy(dst + (cp * taps + t) * nrb, &pair, 4);
        }
    } else {
      for (int64_t k = 0; k < g.K1; ++k) dst[k * nrb] = r < g.R ? pq::load_as_float(w1, r * g.K1 + k, DT) : 0.0f;
    }
  }
  if (g.single) return;  // no second stage (and O = R: its R x R zeros would cost more than the first's)
  for (int64_t o = 0; o < g.Opad; ++o) {
    for (int64_t r = 0; r < g.R; ++r)
      w2p[(o / SMALL_R) * g.R * SMALL_R + r * SMALL_R + o % SMALL_R] =
          o < g.O ? pq::load_as_float(w2, o * g.R + r, DT) : 0.0f;
    biasp[o] = (o < g.O && bias) ? pq::load_as_float(bias, o, DT) : 0.0f;
  }
}

template <int DT>
static int32_t run(Geometry& g, const void* x, const void* w1, const void* w2, const void* bias, void* y,
                   void* tout, int32_t threads, float* packed, int32_t packed_valid) {
  const int64_t taps = g.kh * g.kw;
#if PQ_LR_BF16DOT
  const bool dp = DT == kBFloat16 && pq_lowrank_bf16_dot != 0 && bf16_dot_supported();
#else
  const bool dp = false;
#endif
  g.Cp = dp ? (g.C + 1) / 2 : g.C;  // packed channels: pairs for the bfloat16 pair kernel
  g.K1 = g.Cp * taps;
  set_blocks(g);
  set_phases(g);
  // Tiles of whole output rows: about 768 extended pixels (8 chunks), fewer rows when the packed tile
  // would pass 512 KiB (it should stay in L2 between packing and use) or the intermediate 64 KiB; then
  // the rows are spread evenly over the tiles. Each tile packs amax halo rows more than it computes.
  // A call with little work runs on the calling thread alone: starting and joining another thread costs a few
  // microseconds (a scheduler time slice when another process holds its core), the time of kSerialMacs.
  const int64_t macs = g.N * g.Ho * g.Wo * (g.R * g.K1 + (g.single ? 0 : g.O * g.R));
  const int nthreads = macs < kSerialMacs ? 1 : threads > 0 ? threads : omp_get_max_threads();
  // A 1x1 convolution of small images in tiles of one image each leaves lanes of the last vector of every
  // image idle (7x7: 15 of 64): take the batch's pixels as one sequence instead. That needs a packed copy of
  // x, which the float32 path otherwise reads in place: there, only when the idle lanes' share of the
  // multiply-adds (R (C + O) per pixel) outweighs the copy (C per pixel) 64 times. Measured with one thread
  // (about +-10%): batching EfficientNet-B0's 320 -> 1280 head at 7x7 made it 1.1-1.2x faster at ranks 80
  // and 160 but 0.75x at rank 40 (float32), and its 14x14 projection (6% idle) 0.74-0.97x.
  const int64_t HW = g.H * g.W, lanes = (HW + VL - 1) / VL * VL;
  const bool copy_costs = DT == kFloat32 && (lanes - HW) * g.R * (g.C + g.O) < 64 * lanes * g.C;
  g.batched = taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && HW < 4 * CH && !copy_costs;
  g.direct = !g.batched && DT == kFloat32 && taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  // Reading x in place pays while an image's channels span few pages: beyond that every channel step of
  // stage 1 is a first-level TLB miss (the packed tile sits in huge pages) and packing wins (measured:
  // 128 x 28 x 28 in place 10% faster, 128 x 56 x 56 packed 1.2-2x faster), and while x is likely in the
  // caches: reading it from memory stage 1's way, many channel streams at once, is slower than packing's
  // row-by-row copy (one thread, 128 x 28 x 28 at rank 4: batch 8, 3 MiB, in place 15% faster; batch 32,
  // 12 MiB, packed 1.5x faster).
  g.masked = PQ_LR_ISA == 2 && DT == kFloat32 && taps > 1 && g.sh == 1 && g.sw == 1 && g.kh <= 16 && g.kw <= 16 &&
             2 * g.ph <= g.dh * (g.kh - 1) && 2 * g.pw <= g.dw * (g.kw - 1) && g.C * g.H * g.W <= (192 << 10) &&
             g.N * g.C * g.H * g.W <= (1 << 20);
  // A tile's intermediate (Rpad x TP floats) stays within 64 KiB, in L1/L2 for stage 2. A single convolution
  // has no stage 2 (the intermediate goes straight out) and, as the backward's input gradient, as many output
  // channels as the layer has input channels: 512 KiB there, or its tiles would hold a vector or two of pixels,
  // too few for the micro-kernel's blocks.
  const int64_t text_floats = g.single ? (128 << 10) : (16 << 10);
  if (g.masked) {
    // The extended grid is x's own: width W (>= Wo), output pixel (oh, ow) at oh * W + ow.
    g.Wq = g.W;
    int64_t rows = std::max<int64_t>(1, (8 * CH) / g.Wq);
    while (rows > 1 && g.Rpad * rows * g.Wq > text_floats) --rows;
    rows = std::min(rows, g.Ho);
    g.ntiles = (g.Ho + rows - 1) / rows;
    g.rows = (g.Ho + g.ntiles - 1) / g.ntiles;
    g.TP = (g.rows * g.Wq + CH - 1) / CH * CH;
    g.pstride = g.cstride = 0;
    g.tile_floats = 16;
  } else if (g.batched) {
    // Up to 8 chunks per tile (the intermediate up to 64 KiB), and a whole number of tiles per thread: the
    // tiles are as even as whole vectors allow (the tiling changes no bit: every output is one chain of sums).
    g.batch_vecs = (g.N * g.H * g.W + VL - 1) / VL;
    const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kTileVecs, text_floats / (g.Rpad * VL)));
    const int64_t tiles = (g.batch_vecs + most - 1) / most;
    g.ntiles = std::min(g.batch_vecs, (tiles + nthreads - 1) / nthreads * nthreads);
    g.TP = ((g.batch_vecs + g.ntiles - 1) / g.ntiles * VL + CH - 1) / CH * CH;
    g.rows = 0;
    g.pstride = g.cstride = g.TP;
    g.tile_floats = g.Cp * g.TP + 2 * CH;
  } else if (g.direct) {
    // Tiles of up to 8 chunks of pixels (the intermediate up to 64 KiB), the same number per image.
    const int64_t HW = g.H * g.W;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(8, text_floats / (g.Rpad * CH)));
    g.ntiles = (HW + chunks * CH - 1) / (chunks * CH);
    g.TP = ((HW + g.ntiles - 1) / g.ntiles + CH - 1) / CH * CH;
    g.rows = 0;
    g.pstride = g.cstride = g.TP;  // the bounce buffer of the last tile: TP floats per channel
    g.tile_floats = g.C * g.TP + 2 * CH;
  } else {
    const int64_t per_row = g.Cp * g.nphase * g.Wq;  // packed floats per plane row of all channels
    int64_t rows = std::max<int64_t>(1, (8 * CH) / g.Wq);
    while (rows > 1 && ((rows + g.amax) * per_row > (128 << 10) || g.Rpad * rows * g.Wq > text_floats)) --rows;
    rows = std::min(rows, g.Ho);
    g.ntiles = (g.Ho + rows - 1) / rows;
    g.rows = (g.Ho + g.ntiles - 1) / g.ntiles;
    g.TP = (g.rows * g.Wq + CH - 1) / CH * CH;
    g.pstride = (g.rows + g.amax) * g.Wq + 16;  // room for padded_row's whole-vector stores
    g.cstride = g.nphase * g.pstride;
    g.tile_floats = g.Cp * g.cstride + g.Wq + g.TP + 2 * CH;  // stage 1 reads a chunk and a row past the end
  }

  // Offsets and masks, then (unless the caller keeps them in `packed`) the packed weights.
  const PackedSizes ps = packed_sizes(g);
  const int64_t nk1 = (2 * g.K1 + 15) / 16 * 16, nk2 = (2 * g.R + 15) / 16 * 16, nm = (g.Wq / 16 + 1 + 15) / 16 * 16,
                nkd = (2 * g.C + 15) / 16 * 16, nq = g.masked ? (g.TP + CH + 15) / 16 * 16 : 0;
  float* wbuf = t_weights.get(nk1 + nk2 + nm + nkd + 2 * nq + (packed ? 0 : ps.n1 + ps.n2 + ps.nb));
  if (!wbuf) {
    t_weights.trim();
    return 1;
  }
  int64_t* koff1 = (int64_t*)wbuf;
  int64_t* koff2 = (int64_t*)(wbuf + nk1);
  uint16_t* masks = (uint16_t*)(wbuf + nk1 + nk2);
  int64_t* koffd = (int64_t*)(wbuf + nk1 + nk2 + nm);
  float* w1p = packed ? packed + kPackHeader : wbuf + nk1 + nk2 + nm + nkd + 2 * nq;
  float* w2p = w1p + ps.n1;
  float* biasp = w2p + ps.n2;
  for (int64_t c = 0; c < g.C; ++c) koffd[c] = c * g.H * g.W;
  g.koffd = koffd;
  if (g.masked) {
    int32_t* qrow = (int32_t*)(wbuf + nk1 + nk2 + nm + nkd);
    int32_t* qcol = qrow + nq;
    for (int64_t q = 0; q < nq; ++q) qrow[q] = (int32_t)(q / g.W), qcol[q] = (int32_t)(q % g.W);
    g.qrow = qrow;
    g.qcol = qcol;
  }
  padded_row_masks(g.pw, g.W, g.Wq, masks);
  // What the packed weights were made for: a buffer whose header matches holds them already.
  const int32_t header[kPackHeader] = {0x4c52, DT, dp, (int32_t)g.R, (int32_t)g.K1, (int32_t)g.O, (int32_t)g.C,
                                       (int32_t)taps, g.single, bias != nullptr};
  if (!(packed && packed_valid && memcmp(packed, header, sizeof header) == 0)) {
    pack_weights<DT>(g, dp, w1, w2, bias, w1p, w2p, biasp);
    if (packed) memcpy(packed, header, sizeof header);
  }

  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) koff1[i * g.kw + j] = tap_offset(g, i, j);
  if (g.masked) {  // offsets into x itself (negative ones only for masked-off lanes)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) koff1[i * g.kw + j] = (i * g.dh - g.ph) * g.W + (j * g.dw - g.pw);
    for (int64_t c = 1; c < g.C; ++c)
      for (int64_t t = 0; t < taps; ++t) koff1[c * taps + t] = c * g.H * g.W + koff1[t];
  } else {
    for (int64_t c = 1; c < g.Cp; ++c)
      for (int64_t t = 0; t < taps; ++t) koff1[c * taps + t] = c * g.cstride + koff1[t];
  }
  for (int64_t r = 0; r < g.R; ++r) koff2[r] = r * g.TP;

  const int64_t items = g.batched ? g.ntiles : g.N * g.ntiles;
  int64_t next = 0, done = 0;
#pragma omp parallel num_threads((int)std::min<int64_t>(nthreads, items))
  {
    // Reads past what a tile packed (the last chunk, the last tile's shorter planes) feed only discarded
    // lanes; Scratch zero-fills new memory, later the floats there are stale but harmless.
    Workspace ws;
    t_packed.huge = true;
    ws.packed = t_packed.get(g.tile_floats);
    ws.text = t_text.get(g.Rpad * g.TP);
    ws.tc = t_tc.get(g.R * g.TP + CH);
    ws.tmp = t_tmp.get(g.W);
    ws.masks = masks;
    ws.tapmasks = (uint16_t*)t_tapmasks.get((taps * SMALL_V + 1) / 2 + 16);
    // Tiles are handed out one at a time from a shared counter (no barrier: a thread that waits for its
    // core, taken by another process, holds up one tile at most, and one whose buffers could not be
    // allocated takes none; `done` tells whether every tile was computed).
    int64_t mine = 0;
    if (ws.packed && ws.text && ws.tc && ws.tmp && ws.tapmasks) {
      for (;;) {
        int64_t item;
#pragma omp atomic capture
        item = next++;
        if (item >= items) break;
        if constexpr (DT == kBFloat16) {
          if (dp) {
            tile<DT, true>(g, x, g.batched ? 0 : item / g.ntiles, g.batched ? item : item % g.ntiles, koff1, koff2,
                           w1p, w2p, biasp, y, tout, ws);
            ++mine;
            continue;
          }
        }
        tile<DT, false>(g, x, g.batched ? 0 : item / g.ntiles, g.batched ? item : item % g.ntiles, koff1, koff2, w1p,
                        w2p, biasp, y, tout, ws);
        ++mine;
      }
    }
#pragma omp atomic
    done += mine;
    t_packed.trim(), t_text.trim(), t_tc.trim(), t_tmp.trim();
  }
  t_weights.trim();
  return done == items ? 0 : 1;
}

// ---- weight gradient: gw[r][c][i][j] = sum over n, oh, ow of g[n][r][oh][ow] * xpad[n][c][oh sh + i dh][ow sw + j dw]
// The weight gradient of a convolution into few channels (the k x k factor's W1, for the rank-channel gradient g
// [N, R, Ho, Wo]; or the 1 x 1 factor's W2, with the intermediate as x and y's gradient as g), where oneDNN runs
// at 15-30% of the FMA peak (docs/compress.md). Stage 1 with the roles swapped: the reduction runs over the
// pixels of the extended grid (q = oh * Wq + ow) in vector lanes and over the images in turn; the outputs
// (rank, channel, tap) are blocked WR x WT in registers. Each output is then summed across its lanes (a fixed
// tree) and stored in float32: one fixed chain of sums per output, computed whole by one thread, so the bits do
// not depend on the thread count.
// Packing: g in float32 on the extended grid [N][R][GQ] (zeros in the columns ow >= Wo and past Ho * Wq), once,
// unless it has no such columns (1 x 1 unpadded: Wq = Wo), where the AVX-512 build reads it in place, widening
// bfloat16 and float16 in registers, with the lanes past Ho * Wq masked off (the weight gradient of
// EfficientNet-B0's 40 -> 5 -> 240 expansion's second factor, g with 240 channels, spent more time in the copy
// than in the multiply-adds). Per work item (a
// group of Cg channels and a range of ranks): the phase planes of those channels of every image,
// [N][Cg][cstride], as the forward packs a tile. The columns ow >= Wo of the extended grid read input that other
// taps use: the loads of x mask them off (an inf there must not turn 0 * inf into a NaN).
#if PQ_LR_ISA == 2
constexpr int WR = 4, WT = 6;  // 24 accumulators, 4 + 6 loads per 24 multiply-adds
using lane_word = uint32_t;    // per vector: its valid lanes
static inline int64_t lane_words(int64_t nvec) { return nvec; }
static inline vec load_valid(const float* p, const lane_word* m, int64_t v) {
  return _mm512_maskz_loadu_ps((__mmask16)m[v], p);  // masked-off lanes are not read
}
static inline float hsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif PQ_LR_ISA == 1
constexpr int WR = 2, WT = 5;  // 10 accumulators of 16 registers
using lane_word = uint32_t;    // per lane: all ones when valid
static inline int64_t lane_words(int64_t nvec) { return nvec * VL; }
static inline vec load_valid(const float* p, const lane_word* m, int64_t v) {
  return _mm256_and_ps(_mm256_loadu_ps(p), _mm256_loadu_ps((const float*)(m + v * VL)));
}
static inline float hsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
constexpr int WR = 4, WT = 4;
using lane_word = uint32_t;
static inline int64_t lane_words(int64_t nvec) { return nvec; }
static inline vec load_valid(const float* p, const lane_word* m, int64_t v) { return m[v] ? *p : 0.0f; }
static inline float hsum(vec a) { return a; }
#endif

// A vector of g (the lanes in `valid`) as float32: g packed in float32, or read in place in its own dtype GDT and
// widened in registers (exact; AVX-512 only, which is where wgrad reads g in place).
template <int GDT>
using g_elem = typename std::conditional<GDT == kFloat32, float, uint16_t>::type;

template <int GDT>
static inline vec load_g(const g_elem<GDT>* p, const lane_word* m, int64_t v) {
  if constexpr (GDT == kFloat32) {
    return load_valid(p, m, v);
  } else {
#if PQ_LR_ISA == 2
    const __m256i h = _mm256_maskz_loadu_epi16((__mmask16)m[v], p);
    if constexpr (GDT == kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    static_assert(GDT == kFloat32, "g is read in place only by the AVX-512 build");
    return vzero();
#endif
  }
}

// out[r * ostride + t] = sum over n < N, v < nvec of g[n][r][v] * x[n][koff[t] + v] (vectors of VL pixels, the
// lanes in `valid` only, summed last), r < NR, t < NT.
template <int NR, int NT, int GDT>
static void wgrad_micro(const g_elem<GDT>* __restrict gq, int64_t GQ, int64_t gimg, const float* __restrict xp,
                        int64_t ximg, const int64_t* __restrict koff, int64_t N, int64_t nvec,
                        const lane_word* __restrict valid, float* __restrict out, int64_t ostride) {
  vec acc[NR][NT];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[r][t] = vzero();
  int64_t off[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) off[t] = koff[t];
  for (int64_t n = 0; n < N; ++n, gq += gimg, xp += ximg)
    for (int64_t v = 0; v < nvec; ++v) {
      vec gv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) gv[r] = load_g<GDT>(gq + r * GQ + v * VL, valid, v);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const vec xv = load_valid(xp + off[t] + v * VL, valid, v);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[r][t] = vfma(gv[r], xv, acc[r][t]);
      }
    }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) out[r * ostride + t] = hsum(acc[r][t]);
}

// wgrad_micro<nr, nt, GDT> for run-time nr <= NR, nt <= NT.
template <int NR, int NT, int GDT, class... Args>
static inline void wgrad_micro_n(int64_t nr, int64_t nt, Args... args) {
  if constexpr (NR > 1) {
    if (nr < NR) return wgrad_micro_n<NR - 1, NT, GDT>(nr, nt, args...);
  }
  if constexpr (NT > 1) {
    if (nt < NT) return wgrad_micro_n<NR, NT - 1, GDT>(nr, nt, args...);
  }
  wgrad_micro<NR, NT, GDT>(args...);
}

static thread_local Scratch t_wplanes, t_wgrad;

template <int DT>
static int32_t wgrad(Geometry& g, const void* x, const void* gy, float* gw, int32_t threads) {
  const int64_t taps = g.kh * g.kw;
  set_phases(g);
  g.rows = g.Ho;
  g.pstride = (g.Ho + g.amax) * g.Wq + g.bmax + VL + 16;  // whole-vector stores and reads past the last row
  g.cstride = g.nphase * g.pstride;
  const int64_t ext = g.Ho * g.Wq, nvec = (ext + VL - 1) / VL, GQ = nvec * VL;
  // Channels per work item: a whole number of WT-column blocks where the taps allow it (3 x 3: 2 channels,
  // 18 columns), fewer when their planes would pass 1 MiB.
  int64_t Cg = WT;
  for (int64_t d = WT; d >= 1; --d)
    if (WT % d == 0 && taps % d == 0) {
      Cg = WT / d;
      break;
    }
  Cg = std::max<int64_t>(1, std::min({Cg, g.C, ((int64_t)256 << 10) / std::max<int64_t>(1, g.N * g.cstride)}));
  const int64_t ngroups = (g.C + Cg - 1) / Cg, K = g.C * taps;
  const int64_t macs = g.N * ext * g.R * K;
  const int nthreads = macs < kSerialMacs ? 1 : threads > 0 ? threads : omp_get_max_threads();
  // Ranks per work item: all of them, or fewer when there are too few channel groups to keep the threads busy.
  const int64_t rblocks = (g.R + WR - 1) / WR;
  const int64_t nrc = std::max<int64_t>(1, std::min<int64_t>(rblocks, (2 * nthreads + ngroups - 1) / ngroups));
  const int64_t rchunk = (rblocks + nrc - 1) / nrc * WR;
  const int64_t items = ngroups * ((g.R + rchunk - 1) / rchunk);

  const bool g_in_place = PQ_LR_ISA == 2 && g.Wq == g.Wo;
  const int64_t gstride = g_in_place ? ext : GQ;  // elements from one channel of g to the next
  // one buffer (floats, each part rounded up to 16): lane masks, padded_row's masks, column offsets, packed g
  const int64_t nl = (lane_words(nvec) + 15) / 16 * 16, nm = (g.Wq / 16 + 1 + 15) / 16 * 16,
                nk = (Cg * taps * 2 + 15) / 16 * 16;
  lane_word* valid = (lane_word*)t_wgrad.get(nl + nm + nk + (g_in_place ? 0 : g.N * g.R * GQ));
  if (!valid) {
    t_wgrad.trim();
    return 1;
  }
  uint16_t* masks = (uint16_t*)(valid + nl);
  int64_t* koff = (int64_t*)(valid + nl + nm);
  float* gq = (float*)valid + nl + nm + nk;  // packed g (unless g_in_place)
  padded_row_masks(g.pw, g.W, g.Wq, masks);
  for (int64_t q = 0; q < nvec * VL; ++q) {
    const bool ok = q < ext && q % g.Wq < g.Wo;
#if PQ_LR_ISA == 2
    if (q % VL == 0) valid[q / VL] = 0;
    if (ok) valid[q / VL] |= 1u << (q % VL);
#elif PQ_LR_ISA == 1
    valid[q] = ok ? 0xFFFFFFFFu : 0u;
#else
    valid[q] = ok;
#endif
  }
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) koff[(c * g.kh + i) * g.kw + j] = c * g.cstride + tap_offset(g, i, j);

  int64_t next = 0, done = 0;
#pragma omp parallel num_threads((int)std::min<int64_t>(nthreads, std::max(items, g.N * g.R)))
  {
    // g on the extended grid, float32
#pragma omp for schedule(static)
    for (int64_t nr = 0; nr < (g_in_place ? 0 : g.N * g.R); ++nr) {
      float* dst = gq + nr * GQ;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        load_row<DT>(gy, (nr * g.Ho + oh) * g.Wo, g.Wo, dst + oh * g.Wq);
        zero_floats(dst + oh * g.Wq + g.Wo, g.Wq - g.Wo);
      }
      zero_floats(dst + ext, GQ - ext);
    }
    t_wplanes.huge = true;
    float* planes = t_wplanes.get(g.N * Cg * g.cstride);
    float* tmp = t_tmp.get(g.W);
    int64_t mine = 0;
    if (planes && tmp) {
      int64_t packed_group = -1;
      for (;;) {
        int64_t item;
#pragma omp atomic capture
        item = next++;
        if (item >= items) break;
        const int64_t group = item % ngroups, r0 = item / ngroups * rchunk, r1 = std::min(g.R, r0 + rchunk);
        const int64_t c0 = group * Cg, nc = std::min(Cg, g.C - c0);
        if (group != packed_group) {
          for (int64_t n = 0; n < g.N; ++n)
            for (int64_t c = 0; c < nc; ++c)
              pack_channel<DT>(g, x, n, c0 + c, 0, g.Ho + g.amax, planes + (n * Cg + c) * g.cstride, tmp, masks);
          packed_group = group;
        }
        for (int64_t r = r0; r < r1; r += WR)
          for (int64_t k = 0; k < nc * taps; k += WT) {
            const int64_t nr = std::min<int64_t>(WR, r1 - r), nt = std::min<int64_t>(WT, nc * taps - k);
            float* out = gw + r * K + c0 * taps + k;
            if (g_in_place && DT != kFloat32) {
              if constexpr (DT != kFloat32 && PQ_LR_ISA == 2)
                wgrad_micro_n<WR, WT, DT>(nr, nt, (const g_elem<DT>*)gy + r * gstride, gstride, g.R * gstride,
                                          planes, Cg * g.cstride, koff + k, g.N, nvec, valid, out, K);
            } else {
              const float* g32 = g_in_place ? (const float*)gy : gq;
              wgrad_micro_n<WR, WT, kFloat32>(nr, nt, g32 + r * gstride, gstride, g.R * gstride, planes,
                                              Cg * g.cstride, koff + k, g.N, nvec, valid, out, K);
            }
          }
        ++mine;
      }
    }
#pragma omp atomic
    done += mine;
    t_wplanes.trim(), t_tmp.trim();
  }
  t_wgrad.trim();
  return done == items ? 0 : 1;
}

}  // namespace lowrank

// dims: N, C, H, W, R, O, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo. Returns 0, or 1 when memory ran out,
// 2 for arguments this kernel does not take.
static bool read_dims(const int64_t* dims, lowrank::Geometry& g) {
  int64_t* fields[] = {&g.N, &g.C, &g.H, &g.W, &g.R, &g.O, &g.kh, &g.kw, &g.sh, &g.sw, &g.ph, &g.pw,
                       &g.dh, &g.dw, &g.Ho, &g.Wo};
  for (int i = 0; i < 16; ++i) *fields[i] = dims[i];
  return !(g.N < 0 || g.C < 1 || g.R < 1 || g.O < 1 || g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 ||
           g.sh * g.sw > 64 || g.ph < 0 || g.pw < 0 || g.dh < 1 || g.dw < 1 || g.Ho < 0 || g.Wo < 0);
}

int32_t lowrank_conv2d_forward(const void* x, const void* w1, const void* w2, const void* bias, void* y, void* t,
                               int32_t dtype, const int64_t* dims, int32_t threads, float* packed,
                               int32_t packed_valid) {
  lowrank::Geometry g;
  if (!read_dims(dims, g)) return 2;
  // w2 NULL: one convolution, y = conv(x, W1) with R output channels (dims O must equal R, t NULL)
  g.single = w2 == nullptr;
  if (g.single) {
    if (g.O != g.R || t != nullptr || bias != nullptr || packed != nullptr) return 2;
    t = y;
  }
  if (g.N == 0 || g.Ho == 0 || g.Wo == 0) return 0;
  switch (dtype) {
    case pq::kFloat16: return lowrank::run<pq::kFloat16>(g, x, w1, w2, bias, y, t, threads, packed, packed_valid);
    case pq::kBFloat16: return lowrank::run<pq::kBFloat16>(g, x, w1, w2, bias, y, t, threads, packed, packed_valid);
    case pq::kFloat32: return lowrank::run<pq::kFloat32>(g, x, w1, w2, bias, y, t, threads, packed, packed_valid);
    default: return 2;
  }
}

// The largest packing of these dims (K1 = C * kh * kw: the bfloat16 pair layout, C / 2 pairs, is smaller).
int64_t lowrank_packed_floats(int32_t dtype, const int64_t* dims) {
  lowrank::Geometry g;
  if (!read_dims(dims, g) || dtype < 0 || dtype > 2) return -1;
  g.single = false;
  g.K1 = g.C * g.kh * g.kw;
  lowrank::set_blocks(g);
  const lowrank::PackedSizes ps = lowrank::packed_sizes(g);
  return lowrank::kPackHeader + ps.n1 + ps.n2 + ps.nb;
}

// dims as lowrank_conv2d_forward's, with O = R. gw: float32 [R, C, kh, kw].
int32_t lowrank_conv2d_wgrad(const void* x, const void* g, float* gw, int32_t dtype, const int64_t* dims,
                             int32_t threads) {
  lowrank::Geometry geo;
  if (!read_dims(dims, geo) || geo.O != geo.R) return 2;
  if (geo.N == 0 || geo.Ho == 0 || geo.Wo == 0) {
    memset(gw, 0, (size_t)(geo.R * geo.C * geo.kh * geo.kw) * sizeof(float));
    return 0;
  }
  switch (dtype) {
    case pq::kFloat16: return lowrank::wgrad<pq::kFloat16>(geo, x, g, gw, threads);
    case pq::kBFloat16: return lowrank::wgrad<pq::kBFloat16>(geo, x, g, gw, threads);
    case pq::kFloat32: return lowrank::wgrad<pq::kFloat32>(geo, x, g, gw, threads);
    default: return 2;
  }
}

}  // namespace PQ_NS
