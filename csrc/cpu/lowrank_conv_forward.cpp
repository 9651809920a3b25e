// The forward of the fused low-rank convolution: packing, the stage-1 and stage-2 micro-kernels, tiles, threads
// (lowrank_conv.h has the algorithm).
#include "lowrank_conv.h"

namespace PQ_NS {
namespace lowrank {

// Store the lanes of v whose bit is set in `mask` as dtype DT, lane l at out + off + l, rounding once (to
// nearest even, as torch's .to()).
template <int DT>
static inline void store_mask(void* out, int64_t off, fvec v, uint32_t mask) {
#if PQ_AVX512
  const __mmask16 m = (__mmask16)mask;
  if (DT == PQ_DTYPE_FLOAT32) {
    if (mask == 0xFFFFu)
      _mm512_storeu_ps((float*)out + off, v);
    else
      _mm512_mask_storeu_ps((float*)out + off, m, v);
  } else if (DT == PQ_DTYPE_FLOAT16) {
    _mm256_mask_storeu_epi16((uint16_t*)out + off, m, to_half16_keep_nan(v));
  } else {
    _mm256_mask_storeu_epi16((uint16_t*)out + off, m, to_bf16_16(v));
  }
#else
  float tmp[kLanes];
  vstore(tmp, v);
  for (int64_t i = 0; i < kLanes; ++i)
    if (mask >> i & 1u) pq::store_from_float(out, off + i, DT, tmp[i]);
#endif
}

// Store the first `lanes` (1..kLanes, or more: capped at kLanes) lanes of v at out + off.
template <int DT>
static inline void store_lanes(void* out, int64_t off, fvec v, int64_t lanes) {
  store_mask<DT>(out, off, v, lanes >= kLanes ? (uint32_t)((1ull << kLanes) - 1) : (uint32_t)((1ull << lanes) - 1));
}

// The micro-kernel: acc[r][v] = init[r] + sum_k w[k*NR + r] * in[koff[k] + v*kLanes] for r < NR, v < NV,
// k in order (one fused multiply-add per term); then sink(r, v, acc[r][v]).
template <int NR, int NV, class Sink>
static inline void micro(const float* __restrict in, const int64_t* __restrict koff, int64_t K,
                         const float* __restrict w, const float* __restrict init, Sink&& sink) {
  fvec acc[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const fvec b = init ? vbcast(init + r) : vzero();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* src = in + koff[k];
    const float* wk = w + k * NR;
    fvec xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = vload(src + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const fvec wr = vbcast(wk + r);
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

#if PQ_AVX512
// The micro-kernel reading x in place (float32, stride 1): step k = (channel, tap) loads its vectors with
// the masks of its tap (masks[t * SMALL_V + v]; lanes outside the image read as 0, so no padded copy).
template <int NR, int NV, class Sink>
static inline void micro_masked(const float* __restrict in, const int64_t* __restrict koff, int64_t C, int64_t taps,
                                const uint16_t* __restrict masks, const float* __restrict w, Sink&& sink) {
  fvec acc[NR][NV];
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
      fvec xv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = _mm512_maskz_loadu_ps((__mmask16)mt[v], src + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        const fvec wr = vbcast(wk + r);
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

#if PQ_BF16_DOT
// The bfloat16 pair micro-kernel: in and w hold 32-bit pairs (bf16 of channel 2c in the low half, 2c+1
// in the high half); acc[r][v] += w[k][r].lo * in.lo + w[k][r].hi * in.hi per lane, k in order.
template <int NR, int NV, class Sink>
PQ_TARGET_AVX512BF16 __attribute__((noinline))
static void micro_dp(const float* __restrict in, const int64_t* __restrict koff, int64_t K,
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
    for (int v = 0; v < NV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(src + v * kLanes);
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
    const __mmask16 m = mask16(n - i);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, xa + i));
    const __m512i hi =
        xb ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, xb + i)), 16) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + i, m, _mm512_or_si512(lo, hi));
  }
}
#endif

static thread_local Scratch t_packed, t_text, t_tc, t_tmp, t_weights, t_tapmasks;

#if PQ_BF16_DOT
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
  inline void operator()(int r, int v, fvec a) const { vstore(base + r * stride + v * kLanes, a); }
};

template <int DT>
struct OutSink {  // stage 2: accumulators -> y, rounded once, the tail masked, padded rows dropped
  void* y;
  int64_t row0, rowstride, lanes, rows;  // lanes left from the first vector of this call; valid rows
  inline void operator()(int r, int v, fvec a) const {
    const int64_t left = lanes - (int64_t)v * kLanes;
    if (left > 0 && r < rows) store_lanes<DT>(y, row0 + r * rowstride + v * kLanes, a, left);
  }
};

// Batched tiles: where the lanes of each vector of the tile go. Vector v holds batch pixels q0 + v * kLanes ..;
// its lanes fall into n[v] images (more than two only for images smaller than a vector): segment s covers
// the lanes in mask[v][s], of image img[v][s], lane l at pixel l + at[v][s]. Channel ch of a
// [N, planes, HW] tensor: lane l at (img * planes + ch) * HW + at + l.
constexpr int kTileVecs = 8 * SMALL_V;  // the most vectors a batched tile has
struct Segments {
  int32_t n[kTileVecs];
  int32_t img[kTileVecs][kLanes], at[kTileVecs][kLanes];
  uint32_t mask[kTileVecs][kLanes];
  void build(int64_t q0, int64_t count, int64_t HW) {  // batch pixels [q0, q0 + count)
    for (int64_t v = 0; v * kLanes < count; ++v) {
      const int64_t q = q0 + v * kLanes, lanes = std::min<int64_t>(kLanes, count - v * kLanes);
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
  inline void store(void* out, int64_t planes, int64_t HW, int64_t ch, int64_t v, fvec a) const {
    for (int32_t k = 0; k < n[v]; ++k) store_mask<DT>(out, (img[v][k] * planes + ch) * HW + at[v][k], a, mask[v][k]);
  }
};

// Out of line: inlined at each of a micro-kernel's 24 accumulators, the loop over segments grew the tile function
// by a third, and two threads sharing a core ran the float32 1 x 1 layers of small images up to 1.35x slower.
template <int DT>
struct BatchOutSink {  // OutSink for batched tiles: the call's vector v is the tile's vector v0 + v
  void* y;
  int64_t O, HW, o0, v0, rows;
  const Segments* seg;
  __attribute__((noinline)) void operator()(int r, int v, fvec a) const {
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
    const int64_t q0 = t * g.batch_vecs / g.ntiles * kLanes;
    const int64_t q1 = std::min(g.N * HW, (t + 1) * g.batch_vecs / g.ntiles * kLanes);
    for (int64_t c = 0; c < g.Cp; ++c) {
      float* dst = ws.packed + c * g.TP - q0;
      for (int64_t q = q0; q < q1;) {
        const int64_t img = q / HW, p = q % HW, len = std::min(HW - p, q1 - q);
        if constexpr (DP) {
#if PQ_BF16_DOT
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
      for (int64_t c = 0; c < g.C; ++c)
        copy_floats(ws.packed + c * g.TP, (const float*)x + (n * g.C + c) * HW + p0, ext);
    } else {
      in = (const float*)x + n * g.C * HW + p0;
      koff1 = g.koffd;
    }
  } else {
    const int64_t r0 = t * g.rows;
    nrows = std::min(g.rows, g.Ho - r0);
    if constexpr (DP) {
#if PQ_BF16_DOT
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
    const int64_t vecs = (std::min<int64_t>(CH, ext - c0) + kLanes - 1) / kLanes;
#if PQ_AVX512
    if constexpr (DT == PQ_DTYPE_FLOAT32 && !DP) {
      if (g.masked) {
        // the masks of this chunk: lane (pixel) valid for tap (i, j) when its input (oh + i*dh - ph,
        // ow + j*dw - pw) lies in the image (rows past the tile's end included: they read x, or nothing)
        const int64_t r0 = t * g.rows;
        for (int64_t v = 0; v < vecs; ++v) {
          const __m512i row =
              _mm512_add_epi32(_mm512_loadu_si512(g.qrow + c0 + v * kLanes), _mm512_set1_epi32((int)r0));
          const __m512i col = _mm512_loadu_si512(g.qcol + c0 + v * kLanes);
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
            micro_masked_nv<BIG_R, BIG_V>(std::min<int64_t>(BIG_V, vecs - v), in + c0 + v * kLanes, koff1, g.C, taps,
                                          ws.tapmasks + v, w, TextSink{ws.text + b * BIG_R * g.TP + c0 + v * kLanes, g.TP});
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
        TextSink sink{ws.text + b * BIG_R * g.TP + c0 + v * kLanes, g.TP};
        if constexpr (DP) {
#if PQ_BF16_DOT
          micro_dp_nv<BIG_R, BIG_V>(nv, in + c0 + v * kLanes, koff1, g.K1, w, sink);
#endif
        } else {
          micro_nv<BIG_R, BIG_V>(nv, in + c0 + v * kLanes, koff1, g.K1, w, nullptr, sink);
        }
      }
    }
    if (g.Rpad > g.nbig * BIG_R) {
      const float* w = w1p + g.nbig * BIG_R * g.K1;
      TextSink sink{ws.text + g.nbig * BIG_R * g.TP + c0, g.TP};
      if constexpr (DP) {
#if PQ_BF16_DOT
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
      for (int64_t i = 0; i < nv; i += kLanes) seg.store<DT>(tout, g.R, HoWo, r, i / kLanes, vload(tc + r * g.TP + i));
  } else if (tout) {
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t off = (n * g.R + r) * HoWo + v0;
      for (int64_t i = 0; i < nv; i += kLanes) store_lanes<DT>(tout, off + i, vload(tc + r * g.TP + i), nv - i);
    }
  }
  if (g.single) return;  // a plain convolution: its result went out as `tout`
  // stage 2: y[n][o][v0 + i] = bias[o] + sum_r W2[o][r] * tc[r][i]
  for (int64_t ob = 0; ob < g.Opad / SMALL_R; ++ob) {
    const int64_t no = std::min<int64_t>(SMALL_R, g.O - ob * SMALL_R);
    for (int64_t i = 0; i < nv; i += CH) {
      const int64_t vecs = (std::min<int64_t>(CH, nv - i) + kLanes - 1) / kLanes;
      if (g.batched)
        micro_nv<SMALL_R, SMALL_V>(vecs, tc + i, koff2, g.R, w2p + ob * g.R * SMALL_R, biasp + ob * SMALL_R,
                                   BatchOutSink<DT>{y, g.O, HoWo, ob * SMALL_R, i / kLanes, no, &seg});
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

// Floats of the packed weights (g.K1 and the blocks set): W1, W2, bias, each rounded up to 16.
struct PackedSizes {
  int64_t n1, n2, nb;
};
static PackedSizes packed_sizes(const Geometry& g) {
  if (g.single) return {(g.Rpad * g.K1 + 15) / 16 * 16, 0, 0};  // no second stage
  return {(g.Rpad * g.K1 + 15) / 16 * 16, (g.Opad * g.R + 15) / 16 * 16, (g.Opad + 15) / 16 * 16};
}
constexpr int64_t kPackHeader = 16;  // a caller's packed buffer starts with what it was packed for (int32s)

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
#if PQ_BF16_DOT
  const bool dp = DT == PQ_DTYPE_BFLOAT16 && pq_lowrank_bf16_dot != 0 && cpu_has_avx512bf16();
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
  const int64_t HW = g.H * g.W, lanes = (HW + kLanes - 1) / kLanes * kLanes;
  const bool copy_costs = DT == PQ_DTYPE_FLOAT32 && (lanes - HW) * g.R * (g.C + g.O) < 64 * lanes * g.C;
  g.batched = taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && HW < 4 * CH && !copy_costs;
  g.direct = !g.batched && DT == PQ_DTYPE_FLOAT32 && taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  // Reading x in place pays while an image's channels span few pages: beyond that every channel step of
  // stage 1 is a first-level TLB miss (the packed tile sits in huge pages) and packing wins (measured:
  // 128 x 28 x 28 in place 10% faster, 128 x 56 x 56 packed 1.2-2x faster), and while x is likely in the
  // caches: reading it from memory stage 1's way, many channel streams at once, is slower than packing's
  // row-by-row copy (one thread, 128 x 28 x 28 at rank 4: batch 8, 3 MiB, in place 15% faster; batch 32,
  // 12 MiB, packed 1.5x faster).
  g.masked = PQ_AVX512 && DT == PQ_DTYPE_FLOAT32 && taps > 1 && g.sh == 1 && g.sw == 1 && g.kh <= 16 && g.kw <= 16 &&
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
    g.batch_vecs = (g.N * g.H * g.W + kLanes - 1) / kLanes;
    const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kTileVecs, text_floats / (g.Rpad * kLanes)));
    const int64_t tiles = (g.batch_vecs + most - 1) / most;
    g.ntiles = std::min(g.batch_vecs, (tiles + nthreads - 1) / nthreads * nthreads);
    g.TP = ((g.batch_vecs + g.ntiles - 1) / g.ntiles * kLanes + CH - 1) / CH * CH;
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
        if constexpr (DT == PQ_DTYPE_BFLOAT16) {
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

}  // namespace lowrank

int32_t lowrank_conv2d_forward(const void* x, const void* w1, const void* w2, const void* bias, void* y, void* t,
                               int32_t dtype, const int64_t* dims, int32_t threads, float* packed,
                               int32_t packed_valid) {
  lowrank::Geometry g;
  if (!lowrank::read_dims(dims, g)) return 2;
  // w2 NULL: one convolution, y = conv(x, W1) with R output channels (dims O must equal R, t NULL)
  g.single = w2 == nullptr;
  if (g.single) {
    if (g.O != g.R || t != nullptr || bias != nullptr || packed != nullptr) return 2;
    t = y;
  }
  if (g.N == 0 || g.Ho == 0 || g.Wo == 0) return 0;
  switch (dtype) {
    case PQ_DTYPE_FLOAT16:
      return lowrank::run<PQ_DTYPE_FLOAT16>(g, x, w1, w2, bias, y, t, threads, packed, packed_valid);
    case PQ_DTYPE_BFLOAT16:
      return lowrank::run<PQ_DTYPE_BFLOAT16>(g, x, w1, w2, bias, y, t, threads, packed, packed_valid);
    case PQ_DTYPE_FLOAT32:
      return lowrank::run<PQ_DTYPE_FLOAT32>(g, x, w1, w2, bias, y, t, threads, packed, packed_valid);
    default: return 2;
  }
}

// The largest packing of these dims (K1 = C * kh * kw: the bfloat16 pair layout, C / 2 pairs, is smaller).
int64_t lowrank_packed_floats(int32_t dtype, const int64_t* dims) {
  lowrank::Geometry g;
  if (!lowrank::read_dims(dims, g) || !pq::valid_dtype(dtype)) return -1;
  g.single = false;
  g.K1 = g.C * g.kh * g.kw;
  lowrank::set_blocks(g);
  const lowrank::PackedSizes ps = lowrank::packed_sizes(g);
  return lowrank::kPackHeader + ps.n1 + ps.n2 + ps.nb;
}

}  // namespace PQ_NS
