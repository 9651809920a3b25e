// The weight gradient of a convolution into few channels, on the forward's phase planes (lowrank_conv.h).
#include "lowrank_conv.h"

namespace PQ_NS {
namespace lowrank {

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
#if PQ_AVX512
constexpr int WR = 4, WT = 6;  // 24 accumulators, 4 + 6 loads per 24 multiply-adds
using lane_word = uint32_t;    // per vector: its valid lanes
static inline int64_t lane_words(int64_t nvec) { return nvec; }
static inline fvec load_valid(const float* p, const lane_word* m, int64_t v) {
  return _mm512_maskz_loadu_ps((__mmask16)m[v], p);  // masked-off lanes are not read
}
#elif PQ_AVX2
constexpr int WR = 2, WT = 5;  // 10 accumulators of 16 registers
using lane_word = uint32_t;    // per lane: all ones when valid
static inline int64_t lane_words(int64_t nvec) { return nvec * kLanes; }
static inline fvec load_valid(const float* p, const lane_word* m, int64_t v) {
  return _mm256_and_ps(_mm256_loadu_ps(p), _mm256_loadu_ps((const float*)(m + v * kLanes)));
}
#else
constexpr int WR = 4, WT = 4;
using lane_word = uint32_t;
static inline int64_t lane_words(int64_t nvec) { return nvec; }
static inline fvec load_valid(const float* p, const lane_word* m, int64_t v) { return m[v] ? *p : 0.0f; }
#endif

// A vector of g (the lanes in `valid`) as float32: g packed in float32, or read in place in its own dtype GDT and
// widened in registers (exact; AVX-512 only, which is where wgrad reads g in place).
template <int GDT>
using g_elem = typename std::conditional<GDT == PQ_DTYPE_FLOAT32, float, uint16_t>::type;

template <int GDT>
static inline fvec load_g(const g_elem<GDT>* p, const lane_word* m, int64_t v) {
  if constexpr (GDT == PQ_DTYPE_FLOAT32) {
    return load_valid(p, m, v);
  } else {
#if PQ_AVX512
    return load16<GDT>(p, 0, (__mmask16)m[v]);
#else
    static_assert(GDT == PQ_DTYPE_FLOAT32, "g is read in place only by the AVX-512 build");
    return vzero();
#endif
  }
}

// out[r * ostride + t] = sum over n < N, v < nvec of g[n][r][v] * x[n][koff[t] + v] (vectors of kLanes pixels, the
// lanes in `valid` only, summed last), r < NR, t < NT.
template <int NR, int NT, int GDT>
static void wgrad_micro(const g_elem<GDT>* __restrict gq, int64_t GQ, int64_t gimg, const float* __restrict xp,
                        int64_t ximg, const int64_t* __restrict koff, int64_t N, int64_t nvec,
                        const lane_word* __restrict valid, float* __restrict out, int64_t ostride) {
  fvec acc[NR][NT];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[r][t] = vzero();
  int64_t off[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) off[t] = koff[t];
  for (int64_t n = 0; n < N; ++n, gq += gimg, xp += ximg)
    for (int64_t v = 0; v < nvec; ++v) {
      fvec gv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) gv[r] = load_g<GDT>(gq + r * GQ + v * kLanes, valid, v);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const fvec xv = load_valid(xp + off[t] + v * kLanes, valid, v);
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

static thread_local Scratch t_wplanes, t_wgrad, t_tmp;

template <int DT>
static int32_t wgrad(Geometry& g, const void* x, const void* gy, float* gw, int32_t threads) {
  const int64_t taps = g.kh * g.kw;
  set_phases(g);
  g.rows = g.Ho;
  g.pstride = (g.Ho + g.amax) * g.Wq + g.bmax + kLanes + 16;  // whole-vector stores and reads past the last row
  g.cstride = g.nphase * g.pstride;
  const int64_t ext = g.Ho * g.Wq, nvec = (ext + kLanes - 1) / kLanes, GQ = nvec * kLanes;
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

  const bool g_in_place = PQ_AVX512 && g.Wq == g.Wo;
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
  for (int64_t q = 0; q < nvec * kLanes; ++q) {
    const bool ok = q < ext && q % g.Wq < g.Wo;
#if PQ_AVX512
    if (q % kLanes == 0) valid[q / kLanes] = 0;
    if (ok) valid[q / kLanes] |= 1u << (q % kLanes);
#elif PQ_AVX2
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
            if (g_in_place && DT != PQ_DTYPE_FLOAT32) {
              if constexpr (DT != PQ_DTYPE_FLOAT32 && PQ_AVX512)
                wgrad_micro_n<WR, WT, DT>(nr, nt, (const g_elem<DT>*)gy + r * gstride, gstride, g.R * gstride,
                                          planes, Cg * g.cstride, koff + k, g.N, nvec, valid, out, K);
            } else {
              const float* g32 = g_in_place ? (const float*)gy : gq;
              wgrad_micro_n<WR, WT, PQ_DTYPE_FLOAT32>(nr, nt, g32 + r * gstride, gstride, g.R * gstride, planes,
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

// dims as lowrank_conv2d_forward's, with O = R. gw: float32 [R, C, kh, kw].
int32_t lowrank_conv2d_wgrad(const void* x, const void* g, float* gw, int32_t dtype, const int64_t* dims,
                             int32_t threads) {
  lowrank::Geometry geo;
  if (!lowrank::read_dims(dims, geo) || geo.O != geo.R) return 2;
  if (geo.N == 0 || geo.Ho == 0 || geo.Wo == 0) {
    memset(gw, 0, (size_t)(geo.R * geo.C * geo.kh * geo.kw) * sizeof(float));
    return 0;
  }
  switch (dtype) {
    case PQ_DTYPE_FLOAT16: return lowrank::wgrad<PQ_DTYPE_FLOAT16>(geo, x, g, gw, threads);
    case PQ_DTYPE_BFLOAT16: return lowrank::wgrad<PQ_DTYPE_BFLOAT16>(geo, x, g, gw, threads);
    case PQ_DTYPE_FLOAT32: return lowrank::wgrad<PQ_DTYPE_FLOAT32>(geo, x, g, gw, threads);
    default: return 2;
  }
}

}  // namespace PQ_NS

