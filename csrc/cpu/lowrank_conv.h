// Fused low-rank convolution (pyquant.ops.lowrank_conv2d): y = W2 . (W1 (*) x) + b, where W1 is a k x k
// convolution into R channels and W2 a 1 x 1 convolution from R to O channels. Compiled once per ISA
// (scalar, avx2, avx512; isa.h); csrc/capi_lowrank.cpp picks one at run time.
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
// The backward's weight gradient (lowrank_conv_weight_grad.cpp) reuses the phase planes and the micro-kernel's
// blocking with pixels and channels swapped; its comment says how.
//
// This header holds what the forward (lowrank_conv_forward.cpp) and the weight gradient share: the geometry,
// the packing of input rows into phase planes, the per-thread buffers.
#pragma once
#include "isa.h"

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <type_traits>

#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

namespace PQ_NS {
namespace lowrank {

// ---- micro-kernel shapes, in vectors of kLanes float32 lanes (isa.h's fvec) ----
// Rows = rank channels in stage 1, output channels in stage 2; vectors of pixels. Stage 1 takes BIG blocks while
// at least BIG_R rows are left, then one SMALL block (zero-padded rows); stage 2 takes SMALL blocks.
// SMALL_V * kLanes pixels is the chunk, a multiple of BIG_V * kLanes.
#if PQ_AVX512
constexpr int BIG_R = 8, BIG_V = 3;    // 24 accumulators of 32 registers, 3 loads + 8 broadcasts per step
constexpr int SMALL_R = 4, SMALL_V = 6;  // 24 accumulators, 6 loads + 4 broadcasts per step
#elif PQ_AVX2
constexpr int BIG_R = 4, BIG_V = 3;  // 12 accumulators of 16 registers
constexpr int SMALL_R = 4, SMALL_V = 3;
#else
constexpr int BIG_R = 4, BIG_V = 8;
constexpr int SMALL_R = 4, SMALL_V = 8;
#endif
constexpr int CH = kLanes * SMALL_V;  // pixels per chunk
static_assert(CH % (kLanes * BIG_V) == 0, "a chunk must hold whole BIG micro-kernel calls");

// out[0..n) = float32(x[off .. off + n)) (exact widening).
template <int DT>
static inline void load_row(const void* x, int64_t off, int64_t n, float* __restrict out) {
  int64_t i = 0;
#if PQ_AVX512
  if (DT == PQ_DTYPE_FLOAT32) {
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
    const __mmask16 m = mask16(n - i);
    _mm512_mask_storeu_ps(out + i, m, load16<DT>(src, i, m));
  }
#else
  if (DT == PQ_DTYPE_FLOAT32) {
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
#if PQ_AVX512
  for (int64_t i = 0; i < n; i += 16)
    _mm512_mask_storeu_ps(p + i, mask16(n - i), _mm512_setzero_ps());
#else
  for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;
#endif
}

static inline void copy_floats(float* __restrict dst, const float* __restrict src, int64_t n) {
#if PQ_AVX512
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
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
#if PQ_AVX512
// NV vectors per row, the masks in registers.
template <int DT, int NV>
static inline void padded_rows_fixed(const void* x, int64_t at, int64_t xstride, float* __restrict rows, int64_t n,
                                     int64_t count, const uint16_t* masks) {
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) m[v] = (__mmask16)masks[v];
  for (int64_t a = 0; a < count; ++a, at += xstride, rows += n)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(rows + 16 * v, load16<DT>(x, at + 16 * v, m[v]));
}
#endif

template <int DT>
static inline void padded_rows(const void* x, int64_t off, int64_t xstride, int64_t lo, int64_t len,
                               float* __restrict rows, int64_t n, int64_t count, const uint16_t* masks) {
#if PQ_AVX512
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
          _mm512_storeu_ps(rows + a * n + b, load16<DT>(x, at + a * xstride + b, (__mmask16)masks[v]));
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
  int64_t batch_vecs;    // batched: vectors of kLanes batch pixels, split evenly over the tiles
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

constexpr int64_t kSerialMacs = (int64_t)1 << 20;  // about 8 us of one core's multiply-adds

// dims: N, C, H, W, R, O, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo. Returns 0, or 1 when memory ran out,
// 2 for arguments this kernel does not take.
static bool read_dims(const int64_t* dims, Geometry& g) {
  int64_t* fields[] = {&g.N, &g.C, &g.H, &g.W, &g.R, &g.O, &g.kh, &g.kw, &g.sh, &g.sw, &g.ph, &g.pw,
                       &g.dh, &g.dw, &g.Ho, &g.Wo};
  for (int i = 0; i < 16; ++i) *fields[i] = dims[i];
  return !(g.N < 0 || g.C < 1 || g.R < 1 || g.O < 1 || g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 ||
           g.sh * g.sw > 64 || g.ph < 0 || g.pw < 0 || g.dh < 1 || g.dw < 1 || g.Ho < 0 || g.Wo < 0);
}


}  // namespace lowrank
}  // namespace PQ_NS
