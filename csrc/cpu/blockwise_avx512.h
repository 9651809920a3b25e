// AVX-512 (F, BW, VL, DQ) block kernels of block-wise quantisation and the 8-bit Adam step, included by
// blockwise.cpp in its avx512 build only (the loads, stores and conversions they use are isa.h's).
//
// Same bits as the scalar rules of pyquant/blockwise.h, with the expensive steps replaced by exact SIMD
// equivalents:
// - dequantise: the 256 float32 codes are held as two 16-bit planes (high and low halves of each code)
//   and looked up with two-table word permutes, 32 elements at a time; a gather from the 1 KiB code costs
//   about 20 cycles per 16 lanes on this class of CPU, the permutes about 4. The avx512vbmi build holds four
//   byte planes instead and looks them up with two-table byte permutes, 64 elements at a time: half the
//   permutes per element. Both hold a map that mirrors around code 127 (the signed dynamic one) in half the
//   entries, with half the permutes;
// - quantise: the 65536-entry bin -> index table is monotone, so it is fully described by its 255 step
//   positions; the index of a bin is found by an 8-level branchless binary search over those positions
//   (Eytzinger order, 16-bit lanes, one permute per level) instead of one scalar or gathered byte load
//   per element; the avx512vbmi build gathers the decisions least significant first, reads each level's
//   positions with byte permutes and takes each decision with a compare and a masked add (three operations a
//   level instead of four), and orders the index's bits with one GFNI bit permutation at the end;
// - sqrt for Adam: IEEE vsqrtps, or an exact emulation of either non-IEEE routine torch uses (cpu_sqrt.h).
// Only IEEE-exact operations are used (mul/add/div/sqrt/min/max/compare/convert, integer ops), each in
// the order the contract writes it; fused multiply-adds only where the contract has fmaf, and in the grid bin, where
// one rounding was checked to give the contract's bins for every input.
#pragma once
#include "isa.h"

#include <algorithm>
#include <type_traits>

#include "cpu_sqrt.h"
#include "pyquant/capi.h"

namespace PQ_NS {
namespace vec {
using namespace pq;

// The length of a full optimizer block, as a type: converts to int64_t and is known at compile time.
using FullBlock = std::integral_constant<int64_t, kOptimizerBlock>;

// The emulations of torch's CPU sqrt this build has (cpu_sqrt.h).
constexpr bool kEmulatesMklSse = true, kEmulatesMklAvx512 = true;

// ---- dequantisation: code[q] for 64 indices ----

// A map mirrored around code 127 (the signed dynamic one): code[127] is +0 and code[i] = -code[254 - i] for i < 127,
// so 128 entries hold it. With d = i - 127 as a signed byte (i = 255 gives -128), |d| mod 128 indexes the half
// `mirror_half`, d < 0 flips its sign and d = 0 is +0; entry 0 is -code[255], which the flip of i = 255 restores.
static inline bool mirrors_around_127(const float* code) {
  bool mirrored = float_bits(code[127]) == 0;
  for (int i = 0; i < 127; ++i) mirrored &= float_bits(code[i]) == (float_bits(code[254 - i]) ^ 0x80000000u);
  return mirrored;
}
static inline uint32_t mirror_half(const float* code, int j) {
  return j == 0 ? float_bits(code[255]) ^ 0x80000000u : float_bits(code[127 + j]);
}

#if PQ_AVX512_VBMI
struct DequantTable {
  alignas(64) uint8_t plane[4][256];  // plane[k][i]: byte k (least significant first) of code i's float32 pattern
  bool mirrored;                      // mirrors_around_127; half[k][j]: byte k of mirror_half(j)
  alignas(64) uint8_t half[4][128];
  // lookup64's byte constants, read from memory (see QuantTable::splats).
  alignas(64) uint8_t middle[64], sign_bit[64];
};

static inline void prepare_dequant(const float* code, DequantTable& t) {
  for (int i = 0; i < 256; ++i)
    for (int k = 0; k < 4; ++k) t.plane[k][i] = (uint8_t)(float_bits(code[i]) >> (8 * k));
  t.mirrored = mirrors_around_127(code);
  for (int j = 0; j < 128; ++j)
    for (int k = 0; k < 4; ++k) t.half[k][j] = (uint8_t)(mirror_half(code, j) >> (8 * k));
  memset(t.middle, 127, sizeof t.middle);
  memset(t.sign_bit, 0x80, sizeof t.sign_bit);
}

// One byte plane: vpermt2b covers 128 entries, bit 7 of the index picks between two of them.
PQ_INLINE __m512i plane_lookup(const uint8_t* p, __m512i idx, __mmask64 bit7) {
  const __m512i r0 = _mm512_permutex2var_epi8(_mm512_load_si512(p), idx, _mm512_load_si512(p + 64));
  const __m512i r1 = _mm512_permutex2var_epi8(_mm512_load_si512(p + 128), idx, _mm512_load_si512(p + 192));
  return _mm512_mask_blend_epi8(bit7, r0, r1);
}

// The codes of 64 byte indices: c[k] holds elements 16k .. 16k+15.
PQ_INLINE void lookup64(const DequantTable& t, __m512i q, __m512 (&c)[4]) {
  // The byte and word unpacks that assemble the floats work inside 128-bit lanes: c[k]'s lane L (elements
  // 16k+4L .. 16k+4L+3) comes from bytes 16L+4k .. 16L+4k+3 of the permuted indices. The permutation swaps k and
  // L, so it is its own inverse.
  const __m512i order = _mm512_set_epi32(0x3f3e3d3c, 0x2f2e2d2c, 0x1f1e1d1c, 0x0f0e0d0c, 0x3b3a3938, 0x2b2a2928,
                                         0x1b1a1918, 0x0b0a0908, 0x37363534, 0x27262524, 0x17161514, 0x07060504,
                                         0x33323130, 0x23222120, 0x13121110, 0x03020100);
  const __m512i idx = _mm512_permutexvar_epi8(order, q);
  __m512i b0, b1, b2, b3;
  if (t.mirrored) {
    // See mirrors_around_127: one permute per plane where the full table takes two (each holds the shuffle port
    // for two cycles).
    const __m512i d = _mm512_sub_epi8(idx, _mm512_load_si512(t.middle)), j = _mm512_abs_epi8(d);
    const __mmask64 nonzero = _mm512_test_epi8_mask(d, d);
    const auto half = [&](int k) {
      return _mm512_maskz_permutex2var_epi8(nonzero, _mm512_load_si512(t.half[k]), j,
                                            _mm512_load_si512(t.half[k] + 64));
    };
    b0 = half(0), b1 = half(1), b2 = half(2);
    b3 = _mm512_xor_si512(half(3), _mm512_maskz_mov_epi8(_mm512_movepi8_mask(d), _mm512_load_si512(t.sign_bit)));
  } else {
    const __mmask64 bit7 = _mm512_movepi8_mask(idx);
    b0 = plane_lookup(t.plane[0], idx, bit7), b1 = plane_lookup(t.plane[1], idx, bit7);
    b2 = plane_lookup(t.plane[2], idx, bit7), b3 = plane_lookup(t.plane[3], idx, bit7);
  }
  const __m512i w01_lo = _mm512_unpacklo_epi8(b0, b1), w01_hi = _mm512_unpackhi_epi8(b0, b1);
  const __m512i w23_lo = _mm512_unpacklo_epi8(b2, b3), w23_hi = _mm512_unpackhi_epi8(b2, b3);
  c[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01_lo, w23_lo));
  c[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01_lo, w23_lo));
  c[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01_hi, w23_hi));
  c[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01_hi, w23_hi));
}
#else
struct DequantTable {
  alignas(64) uint16_t hi[256];  // high 16 bits of each code's float32 pattern
  alignas(64) uint16_t lo[256];  // low 16 bits
  bool mirrored;                 // mirrors_around_127; the halves of mirror_half(j)
  alignas(64) uint16_t half_hi[128];
  alignas(64) uint16_t half_lo[128];
};

static inline void prepare_dequant(const float* code, DequantTable& t) {
  for (int i = 0; i < 256; ++i) {
    const uint32_t u = float_bits(code[i]);
    t.hi[i] = (uint16_t)(u >> 16);
    t.lo[i] = (uint16_t)(u & 0xFFFFu);
  }
  t.mirrored = mirrors_around_127(code);
  for (int j = 0; j < 128; ++j) {
    t.half_hi[j] = (uint16_t)(mirror_half(code, j) >> 16);
    t.half_lo[j] = (uint16_t)(mirror_half(code, j) & 0xFFFFu);
  }
}

// One 16-bit plane: vpermt2w covers 64 entries, bits 6 and 7 of the index pick among four of them.
PQ_INLINE __m512i plane_lookup(const uint16_t* p, __m512i idx, __mmask32 bit6, __mmask32 bit7) {
  const __m512i r0 = _mm512_permutex2var_epi16(_mm512_load_si512(p), idx, _mm512_load_si512(p + 32));
  const __m512i r1 = _mm512_permutex2var_epi16(_mm512_load_si512(p + 64), idx, _mm512_load_si512(p + 96));
  const __m512i r2 = _mm512_permutex2var_epi16(_mm512_load_si512(p + 128), idx, _mm512_load_si512(p + 160));
  const __m512i r3 = _mm512_permutex2var_epi16(_mm512_load_si512(p + 192), idx, _mm512_load_si512(p + 224));
  return _mm512_mask_blend_epi16(bit7, _mm512_mask_blend_epi16(bit6, r0, r1), _mm512_mask_blend_epi16(bit6, r2, r3));
}

// The codes of 32 byte indices: elements 0-15 in `a`, 16-31 in `b`.
PQ_INLINE void lookup32(const DequantTable& t, __m256i q, __m512& a, __m512& b) {
  // The final 16-bit unpacks pair words inside 128-bit lanes; interleaving the indices' dwords first makes
  // their output come out in element order (word 8L+i holds q[4L+i], word 8L+4+i holds q[16+4L+i]).
  const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
  const __m256i mixed = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi32(q0, q1)),
                                                _mm_unpackhi_epi32(q0, q1), 1);
  const __m512i idx = _mm512_cvtepu8_epi16(mixed);
  __m512i hi, lo;
  if (t.mirrored) {
    // See mirrors_around_127, with d in 16 bits: its bit 7 is set for i < 127 and i = 255 (d = 128), and
    // |d| = 128 indexes entry 0. Two permutes per plane instead of four.
    const __m512i d = _mm512_sub_epi16(idx, _mm512_set1_epi16(127)), j = _mm512_abs_epi16(d);
    const __mmask32 nonzero = _mm512_test_epi16_mask(d, d);
    const __mmask32 bit6 = _mm512_test_epi16_mask(j, _mm512_set1_epi16(64));
    const auto half = [&](const uint16_t* p) {
      const __m512i r0 = _mm512_maskz_permutex2var_epi16(nonzero, _mm512_load_si512(p), j, _mm512_load_si512(p + 32));
      const __m512i r1 = _mm512_maskz_permutex2var_epi16(nonzero, _mm512_load_si512(p + 64), j, _mm512_load_si512(p + 96));
      return _mm512_mask_blend_epi16(bit6, r0, r1);
    };
    const __mmask32 flip = _mm512_test_epi16_mask(d, _mm512_set1_epi16(128));
    hi = _mm512_xor_si512(half(t.half_hi), _mm512_maskz_mov_epi16(flip, _mm512_set1_epi16((short)0x8000)));
    lo = half(t.half_lo);
  } else {
    const __mmask32 bit6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
    const __mmask32 bit7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
    hi = plane_lookup(t.hi, idx, bit6, bit7);
    lo = plane_lookup(t.lo, idx, bit6, bit7);
  }
  a = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo, hi));
  b = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo, hi));
}

// The codes of 64 byte indices: c[k] holds elements 16k .. 16k+15.
PQ_INLINE void lookup64(const DequantTable& t, __m512i q, __m512 (&c)[4]) {
  lookup32(t, _mm512_castsi512_si256(q), c[0], c[1]);
  lookup32(t, _mm512_extracti64x4_epi64(q, 1), c[2], c[3]);
}
#endif

// ---- quantisation: grid bin, then code index ----

// An 8-level branchless binary search over the table's 255 step positions (the first bin whose index exceeds j,
// clamped to 65535): node h (Eytzinger order, level k holds nodes 2^(k-1) .. 2^k - 1) tests step position j(h).
#if !PQ_AVX512_VBMI
struct QuantTable {
  // The search carries H = h + 1, so each level's table is stored rotated by one: entry (h + 1) mod size holds
  // node h's position.
  alignas(64) uint16_t upper[32];   // levels 2-5, nodes 2..31 (vpermw reads 5 index bits)
  alignas(64) uint16_t level6[32];  // nodes 32..63
  alignas(64) uint16_t level7[64];  // nodes 64..127 (vpermt2w reads 6 index bits)
  alignas(64) uint16_t level8[128]; // nodes 128..255, two vpermt2w halves picked by bit 6
  uint16_t root;                    // node 1
  uint8_t top;  // table[65535]: no bin has a larger index, which repairs the clamp at 65536
};
#else
struct QuantTable {
  // The avx512vbmi build gathers the decisions least significant first: after level l the path is
  // p = d1 + 2 d2 + ... + 2^(l-1) dl, and level l + 1 has a table of its own, entry p holding the position of
  // the node that path reaches. The positions are read with byte permutes (see code_index).
  alignas(64) uint16_t level[5][32];  // levels 2..6 (2^(l-1) entries each)
  alignas(64) uint16_t level7[64];
  alignas(64) uint16_t level8[128];
  uint16_t root;
  uint8_t top;  // as above
  // The search's constants as whole vectors in memory, for search_stage and code_index to load: GCC materialises a
  // _mm512_set1_epi16 or _epi8 at each stage with a move into a general register and a broadcast from it, and on
  // this class of CPU the broadcast of a byte or word takes the shuffle port (0.12 of its 2.2 cycles a parameter in
  // the Adam step; bench/NOTES.md), where a load does not.
  struct Splats {
    alignas(64) uint16_t root[32], start[32], first_step[32], one[32];
    alignas(64) uint16_t step[8][32];  // step[l]: 0x0101 << l, the path bit of level l in both bytes
    alignas(64) uint8_t top[64];
    alignas(64) uint64_t index_bits[8];
  } splats;
};
#endif

#if PQ_AVX512_VBMI
// vgf2p8affineqb's matrix that moves bit j of a byte to bit 8 - j (j = 1..7) and keeps bit 0 (byte 7 - i of the
// matrix selects the input bits of output bit i).
constexpr uint64_t index_bits_matrix() {
  uint64_t m = 0;
  for (int i = 0; i < 8; ++i) m |= (uint64_t)(1u << (i == 0 ? 0 : 8 - i)) << (8 * (7 - i));
  return m;
}
#endif

// The table's 255 step positions: first_above[j] is the first bin whose index exceeds j (65536 when none), that is
// the number of bins whose index is at most j. Returns false if the table is not monotone (it always is when built
// from a sorted code; the caller then falls back to plain table lookups). This runs on every call (two tables for
// Adam), so it has no branch per step: walking the steps one by one took most of a call's fixed cost, with a
// mispredicted branch at about every fourth 64-bin chunk. Here one pass checks the order and notes each chunk's
// last index, then each j counts its bins in three levels: the 64 groups of 1024 bins, then the group's 16 chunks,
// then the chunk's 64 bins.
static inline bool step_positions(const uint8_t* table, uint32_t (&first_above)[255]) {
  alignas(64) uint8_t chunk_last[1024], group_last[64];  // the index of bins 64k + 63 and 1024g + 1023
  __mmask64 descending = 0;
  for (uint32_t k = 0; k < 1024; ++k) {
    // bins 64k .. 64k + 63 against the bins before them (chunk 0: bins 1 .. 64)
    const uint8_t* cur = table + (k ? 64 * k : 1);
    descending |= _mm512_cmplt_epu8_mask(_mm512_loadu_si512(cur), _mm512_loadu_si512(cur - 1));
    chunk_last[k] = table[64 * k + 63];
  }
  if (descending) return false;
  for (uint32_t g = 0; g < 64; ++g) group_last[g] = chunk_last[16 * g + 15];
  const __m512i groups = _mm512_load_si512(group_last);
  for (uint32_t j = 0; j < 255; ++j) {
    const __m512i at_most = _mm512_set1_epi8((char)j);
    // A j at or above table[65535] counts all 64 groups: clamped to the last group and chunk, whose 64 bins count
    // too, it gives 65536.
    const uint32_t g = std::min<uint32_t>(63, (uint32_t)_mm_popcnt_u64(_mm512_cmple_epu8_mask(groups, at_most)));
    const uint32_t k = std::min<uint32_t>(
        1023, 16 * g + (uint32_t)_mm_popcnt_u32(
                           _mm_cmple_epu8_mask(_mm_load_si128((const __m128i*)(chunk_last + 16 * g)),
                                               _mm512_castsi512_si128(at_most))));
    first_above[j] = 64 * k + (uint32_t)_mm_popcnt_u64(
                                  _mm512_cmple_epu8_mask(_mm512_loadu_si512(table + 64 * k), at_most));
  }
  return true;
}

// Reverses the low n bits of x < 256 (n <= 8).
constexpr uint32_t reversed_bits(uint32_t x, uint32_t n) {
  x = ((x & 0x55u) << 1) | ((x >> 1) & 0x55u);
  x = ((x & 0x33u) << 2) | ((x >> 2) & 0x33u);
  x = ((x & 0x0Fu) << 4) | ((x >> 4) & 0x0Fu);
  return x >> (8 - n);
}

// Reads the table's 255 step positions into t. Returns false if the table is not monotone.
static inline bool prepare_quant(const uint8_t* table, QuantTable& t) {
  uint32_t first_above[255];
  if (!step_positions(table, first_above)) return false;
#if !PQ_AVX512_VBMI
  memset(t.upper, 0, sizeof t.upper);
#else
  memset(t.level, 0, sizeof t.level);
#endif
  for (uint32_t h = 1; h < 256; ++h) {
    const uint32_t level = 32 - (uint32_t)__builtin_clz(h);  // node h sits on this level (1..8)
    const uint32_t r = h - (1u << (level - 1));  // the decisions that reach it, the first one most significant
    const uint32_t j = ((2 * r + 1) << (8 - level)) - 1;  // the step position node h tests
    const uint16_t position = (uint16_t)(first_above[j] < 65535u ? first_above[j] : 65535u);
#if !PQ_AVX512_VBMI
    const uint32_t slot = h + 1;
    if (h == 1)
      t.root = position;
    else if (h < 32)
      t.upper[slot & 31] = position;
    else if (h < 64)
      t.level6[slot & 31] = position;
    else if (h < 128)
      t.level7[slot & 63] = position;
    else
      t.level8[slot & 127] = position;
#else
    const uint32_t p = reversed_bits(r, level - 1);  // the decisions least significant first
    if (level == 1)
      t.root = position;
    else if (level <= 6)
      t.level[level - 2][p] = position;
    else if (level == 7)
      t.level7[p] = position;
    else
      t.level8[p] = position;
#endif
  }
  t.top = table[65535];
#if PQ_AVX512_VBMI
  for (int i = 0; i < 32; ++i) {
    t.splats.root[i] = t.root, t.splats.start[i] = 0x0100, t.splats.first_step[i] = 0x0202, t.splats.one[i] = 1;
    for (int l = 0; l < 8; ++l) t.splats.step[l][i] = (uint16_t)(0x0101 << l);
  }
  memset(t.splats.top, t.top, sizeof t.splats.top);
  for (uint64_t& m : t.splats.index_bits) m = index_bits_matrix();
#endif
  return true;
}

// grid_bin without the final truncation to 16 bits: NaN gives 0x80000000, which the signed-to-unsigned
// saturating pack below turns into bin 0, as the contract wants. With a finite inverse the clamps cannot act:
// |x| <= absmax makes |x * inv| at most 1 + 2^-24 before rounding, so 1 after; NaN passes either way. An absmax
// below 2^-128 has an infinite inverse, and the clamps then turn infinite y into the end bins.
template <bool Clamp>
PQ_INLINE __m512i grid_bins(__m512 x, __m512 inv) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  __m512 y = _mm512_mul_ps(x, inv);
  if constexpr (Clamp) {
    // vminps/vmaxps return the second operand when either is NaN: with y second, NaN passes like in grid_bin.
    y = _mm512_min_ps(one, y);
    y = _mm512_max_ps(_mm512_set1_ps(-1.0f), y);
  }
  // t = (y + 1) * 0.5 is exact (y + 1 is 0 or at least 2^-24), so t * 65535 rounds exactly like
  // (y + 1) * 32767.5: one multiply fewer, same bits. The multiply and the + 0.5 as one fused multiply-add give the
  // same bins as the contract's two roundings for every y in [-1, 1] (bench/micro/grid_fma_exhaustive.cpp checks all
  // 2^31 of them); NaN stays NaN.
  const __m512 s = _mm512_fmadd_ps(_mm512_add_ps(y, one), _mm512_set1_ps(32767.5f), half);
  return _mm512_cvttps_epi32(s);
}

#if !PQ_AVX512_VBMI
// The eight levels of the search over NC chunks: `level(c, position)` takes chunk c's decision against the position
// of the node it has reached (H = node[c]) and moves H on.
template <int NC, class Level>
PQ_INLINE void walk_levels(const QuantTable& t, const __m512i (&node)[NC], Level&& level) {
  const __m512i root = _mm512_set1_epi16((short)t.root);
  for (int c = 0; c < NC; ++c) level(c, root);
  const __m512i upper = _mm512_load_si512(t.upper);
  for (int l = 2; l <= 5; ++l)
    for (int c = 0; c < NC; ++c) level(c, _mm512_permutexvar_epi16(node[c], upper));
  const __m512i l6 = _mm512_load_si512(t.level6);
  for (int c = 0; c < NC; ++c) level(c, _mm512_permutexvar_epi16(node[c], l6));
  const __m512i l7a = _mm512_load_si512(t.level7), l7b = _mm512_load_si512(t.level7 + 32);
  for (int c = 0; c < NC; ++c) level(c, _mm512_permutex2var_epi16(l7a, node[c], l7b));
  const __m512i l8a = _mm512_load_si512(t.level8), l8b = _mm512_load_si512(t.level8 + 32);
  const __m512i l8c = _mm512_load_si512(t.level8 + 64), l8d = _mm512_load_si512(t.level8 + 96);
  const __m512i bit6 = _mm512_set1_epi16(64);
  for (int c = 0; c < NC; ++c) {
    const __m512i lo = _mm512_permutex2var_epi16(l8a, node[c], l8b);
    const __m512i hi = _mm512_permutex2var_epi16(l8c, node[c], l8d);
    level(c, _mm512_mask_blend_epi16(_mm512_test_epi16_mask(node[c], bit6), lo, hi));
  }
}

// Code indices of NC x 32 unsigned 16-bit bins: the count of step positions <= bin, found one tree level at
// a time. Each level is h = 2h + (bin >= position(h)); with H = h + 1 that is H = 2H - (bin < position): a compare
// into a mask and a masked subtract (one op fewer a level than min(position -sat bin, 1) and a plain subtract,
// 0.91-0.96x of the step's time; bench/NOTES.md). The levels form a long dependent chain (a permute and the
// decision), so NC independent chunks go through each level together: one chunk at a time ran at under half the
// throughput of eight on this CPU.
template <int NC>
PQ_INLINE void code_index(const QuantTable& t, const __m512i (&bins)[NC], uint8_t* q, int64_t len) {
  const __m512i one = _mm512_set1_epi16(1);
  __m512i H[NC];
  for (int c = 0; c < NC; ++c) H[c] = _mm512_set1_epi16(2);
  auto level = [&](int c, __m512i position) {
    const __mmask32 below = _mm512_cmplt_epu16_mask(bins[c], position);
    const __m512i twice = _mm512_add_epi16(H[c], H[c]);
    H[c] = _mm512_mask_sub_epi16(twice, below, twice, one);
  };
  walk_levels<NC>(t, H, level);
  // H = 257 + index: its low byte is index + 1. packus (see quantize_chunks) interleaved 4-element groups of
  // the two input vectors within 128-bit lanes: the dword permute restores element order.
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i top = _mm256_set1_epi8((char)t.top);
  for (int c = 0; c < NC; ++c) {
    const __m256i idx = _mm256_permutevar8x32_epi32(_mm512_cvtepi16_epi8(H[c]), order);
    const __m256i index = _mm256_min_epu8(_mm256_sub_epi8(idx, _mm256_set1_epi8(1)), top);
    _mm256_mask_storeu_epi8(q + 32 * c, mask32(len - 32 * c), index);
  }
}
#else
// Where the low bytes of two vectors of code_index's results go: output byte e (element e of 64) is byte
// order[e] of the two vectors' concatenation. packus (see quantize_chunks) left word 8L+i of a vector holding
// element 4L+i and word 8L+4+i element 16+4L+i (i < 4).
struct ByteOrder {
  alignas(64) uint8_t at[64];
};
constexpr ByteOrder low_byte_order() {
  ByteOrder o{};
  for (int e = 0; e < 64; ++e) {
    const int k = e % 32, word = k < 16 ? 8 * (k / 4) + k % 4 : 8 * ((k - 16) / 4) + 4 + k % 4;
    o.at[e] = (uint8_t)(64 * (e / 32) + 2 * word);
  }
  return o;
}
constexpr ByteOrder kLowByteOrder = low_byte_order();

// The search with the decisions least significant first (see QuantTable). On this class of CPU vpermw and
// vpavgw / vpshldw compete for one port (vpermw takes two operations, one on each of the two vector ports),
// while vpermb takes one on the shuffle port: so each level is one byte permute, one compare into a mask (the
// shuffle port) and one masked add (either port), where building the index most significant first needs a
// doubling that costs an operation. The search carries G = 0x0101 * 2p + 0x0100, whose bytes 2p and 2p + 1
// make vpermb read both bytes of word p of a level's table; level l adds 0x0101 << l where dl = 1. Level 8's
// 128 entries are two vpermt2b halves (bit 7 of G's bytes, i.e. d7, picks the half); its decision is added as 1,
// so G's low byte ends as d8 + 2 d1 + 4 d2 + ... + 128 d7, and one bit permutation (GFNI) makes the index
// 128 d1 + 64 d2 + ... + 2 d7 + d8. Same positions, same bits as the search above; 0.93-0.98x of the 8-bit
// Adam step's kernel time (bench/NOTES.md).
template <int NC>
PQ_INLINE void code_index(const QuantTable& t, const __m512i (&bins)[NC], uint8_t* q, int64_t len) {
  __m512i g[NC];
  __mmask32 d[NC];
  const __m512i root = _mm512_load_si512(t.splats.root), start = _mm512_load_si512(t.splats.start);
  const __m512i first_step = _mm512_load_si512(t.splats.first_step);
  for (int c = 0; c < NC; ++c) {
    d[c] = _mm512_cmpge_epu16_mask(bins[c], root);
    g[c] = _mm512_mask_add_epi16(start, d[c], start, first_step);
  }
  for (int l = 2; l <= 6; ++l) {
    const __m512i table = _mm512_load_si512(t.level[l - 2]), step = _mm512_load_si512(t.splats.step[l]);
    for (int c = 0; c < NC; ++c) {
      d[c] = _mm512_cmpge_epu16_mask(bins[c], _mm512_permutexvar_epi8(g[c], table));
      g[c] = _mm512_mask_add_epi16(g[c], d[c], g[c], step);
    }
  }
  const __m512i l7a = _mm512_load_si512(t.level7), l7b = _mm512_load_si512(t.level7 + 32);
  const __m512i step7 = _mm512_load_si512(t.splats.step[7]);
  for (int c = 0; c < NC; ++c) {
    d[c] = _mm512_cmpge_epu16_mask(bins[c], _mm512_permutex2var_epi8(l7a, g[c], l7b));
    g[c] = _mm512_mask_add_epi16(g[c], d[c], g[c], step7);
  }
  const __m512i l8a = _mm512_load_si512(t.level8), l8b = _mm512_load_si512(t.level8 + 32);
  const __m512i l8c = _mm512_load_si512(t.level8 + 64), l8d = _mm512_load_si512(t.level8 + 96);
  const __m512i one = _mm512_load_si512(t.splats.one);
  for (int c = 0; c < NC; ++c) {
    const __m512i lo = _mm512_permutex2var_epi8(l8a, g[c], l8b), hi = _mm512_permutex2var_epi8(l8c, g[c], l8d);
    const __mmask32 d8 = _mm512_cmpge_epu16_mask(bins[c], _mm512_mask_blend_epi16(d[c], lo, hi));
    g[c] = _mm512_mask_add_epi16(g[c], d8, g[c], one);
  }
  // One byte permute takes the low bytes of two vectors, in element order.
  const __m512i order = _mm512_load_si512(kLowByteOrder.at);
  const __m512i top = _mm512_load_si512(t.splats.top), index_bits = _mm512_load_si512(t.splats.index_bits);
  for (int c = 0; c < NC; c += 2) {
    const bool pair = c + 1 < NC;
    const __m512i low = _mm512_permutex2var_epi8(g[c], order, g[pair ? c + 1 : c]);
    const __m512i index = _mm512_gf2p8affine_epi64_epi8(low, index_bits, 0);
    const __mmask64 k = mask64(len - 32 * c) & (pair ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu);
    _mm512_mask_storeu_epi8(q + 32 * c, k, _mm512_min_epu8(index, top));
  }
}

// The search of one full block's 256 values (8 chunks) cut into 8 stages, so that a block's requantisation can be
// spread over the next block's main loop a stage at a time (see adam_blocks_8bit): the bins and the root level,
// levels 2-6 one a stage, levels 7 and 8, the codes. The state lives in memory between stages. The levels are
// code_index's, written out again: built from shared per-level functions, the staged Adam step ran 5-11 % slower
// (bench/NOTES.md). Both are checked against the reference (test_blockwise.py, test_optimizer_kernels.py).
struct StagedSearch {
  __m512i bins[8], g[8];
};

PQ_INLINE void search_stage(int s, StagedSearch& st, const float* x, __m512 inv, const QuantTable& t, uint8_t* q) {
  if (s == 0) {
    const __m512i root = _mm512_load_si512(t.splats.root), start = _mm512_load_si512(t.splats.start);
    const __m512i first_step = _mm512_load_si512(t.splats.first_step);
    for (int c = 0; c < 8; ++c) {
      const __m512 x0 = _mm512_loadu_ps(x + 32 * c), x1 = _mm512_loadu_ps(x + 32 * c + 16);
      const __m512i bins = _mm512_packus_epi32(grid_bins<false>(x0, inv), grid_bins<false>(x1, inv));
      st.bins[c] = bins;
      st.g[c] = _mm512_mask_add_epi16(start, _mm512_cmpge_epu16_mask(bins, root), start, first_step);
    }
  } else if (s <= 5) {
    const int l = s + 1;
    const __m512i table = _mm512_load_si512(t.level[l - 2]), step = _mm512_load_si512(t.splats.step[l]);
    for (int c = 0; c < 8; ++c) {
      const __mmask32 d = _mm512_cmpge_epu16_mask(st.bins[c], _mm512_permutexvar_epi8(st.g[c], table));
      st.g[c] = _mm512_mask_add_epi16(st.g[c], d, st.g[c], step);
    }
  } else if (s == 6) {
    const __m512i l7a = _mm512_load_si512(t.level7), l7b = _mm512_load_si512(t.level7 + 32);
    const __m512i step7 = _mm512_load_si512(t.splats.step[7]);
    const __m512i l8a = _mm512_load_si512(t.level8), l8b = _mm512_load_si512(t.level8 + 32);
    const __m512i l8c = _mm512_load_si512(t.level8 + 64), l8d = _mm512_load_si512(t.level8 + 96);
    const __m512i one = _mm512_load_si512(t.splats.one);
    for (int c = 0; c < 8; ++c) {
      const __m512i bins = st.bins[c];
      __m512i g = st.g[c];
      const __mmask32 d7 = _mm512_cmpge_epu16_mask(bins, _mm512_permutex2var_epi8(l7a, g, l7b));
      g = _mm512_mask_add_epi16(g, d7, g, step7);
      const __m512i lo = _mm512_permutex2var_epi8(l8a, g, l8b), hi = _mm512_permutex2var_epi8(l8c, g, l8d);
      const __mmask32 d8 = _mm512_cmpge_epu16_mask(bins, _mm512_mask_blend_epi16(d7, lo, hi));
      st.g[c] = _mm512_mask_add_epi16(g, d8, g, one);
    }
  } else {
    const __m512i order = _mm512_load_si512(kLowByteOrder.at);
    const __m512i top = _mm512_load_si512(t.splats.top), index_bits = _mm512_load_si512(t.splats.index_bits);
    for (int c = 0; c < 8; c += 2) {
      const __m512i low = _mm512_permutex2var_epi8(st.g[c], order, st.g[c + 1]);
      const __m512i index = _mm512_gf2p8affine_epi64_epi8(low, index_bits, 0);
      _mm512_storeu_si512(q + 32 * c, _mm512_min_epu8(index, top));
    }
  }
}
#endif

// Quantises NC chunks of 32 values starting at x + start + i (elements beyond len read as 0, not stored), whose
// magnitudes are at most the absmax that `inv` inverts.
template <int DT, int NC, bool Clamp>
PQ_INLINE void quantize_chunks(const void* x, int64_t start, int64_t i, int64_t len, __m512 inv,
                                   const QuantTable& t, uint8_t* q) {
  __m512i bins[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t j = i + 32 * c;
    const __mmask32 k = mask32(len - j);
    const __m512 x0 = load16<DT>(x, start + j, (__mmask16)k);
    const __m512 x1 = load16<DT>(x, start + j + 16, (__mmask16)(k >> 16));
    bins[c] = _mm512_packus_epi32(grid_bins<Clamp>(x0, inv), grid_bins<Clamp>(x1, inv));
  }
  code_index<NC>(t, bins, q + i, len - i);
}

template <int DT, bool Clamp, class Len>
PQ_INLINE void quantize_values_impl(const void* x, int64_t start, Len len, __m512 inv, const QuantTable& t, uint8_t* q) {
  int64_t i = 0;
  for (; i + 224 < len; i += 256) quantize_chunks<DT, 8, Clamp>(x, start, i, len, inv, t, q);
  for (; i + 96 < len; i += 128) quantize_chunks<DT, 4, Clamp>(x, start, i, len, inv, t, q);
  for (; i < len; i += 32) quantize_chunks<DT, 1, Clamp>(x, start, i, len, inv, t, q);
}

// Quantise `len` values of one block whose absmax (the largest magnitude among them, NaN aside) is known.
template <int DT, class Len>
PQ_INLINE void quantize_values(const void* x, int64_t start, Len len, float absmax, const QuantTable& t,
                                   uint8_t* q) {
  if (absmax == 0.0f) {
    memset(q, 0, (size_t)len);
    return;
  }
  const float inverse = block_inverse(absmax);
  const __m512 inv = _mm512_set1_ps(inverse);
  if (is_finite(inverse))
    quantize_values_impl<DT, false>(x, start, len, inv, t, q);
  else
    quantize_values_impl<DT, true>(x, start, len, inv, t, q);
}

template <int DT, class Len>
PQ_INLINE void quantize_block_impl(const void* x, int64_t start, Len len, const QuantTable& t, uint8_t* q,
                                       float* absmax) {
  // max is exact and NaN-free here (vmaxps keeps the running value when |x| is NaN), so lane order is free.
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16)
    amax = _mm512_max_ps(_mm512_abs_ps(load16<DT>(x, start + i, mask16(len - i))), amax);
  const float a = _mm512_reduce_max_ps(amax);
  *absmax = a;
  quantize_values<DT>(x, start, len, a, t, q + start);
}

template <int DT, class Len>
PQ_INLINE void dequantize_block_impl(const uint8_t* q, float absmax, int64_t start, Len len, const DequantTable& t,
                                         void* out) {
  const __m512 a = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < len; i += 64) {
    const __mmask64 k = mask64(len - i);
    __m512 c[4];
    lookup64(t, _mm512_maskz_loadu_epi8(k, q + start + i), c);
    for (int r = 0; r < 4; ++r)
      store16<DT>(out, start + i + 16 * r, _mm512_mul_ps(c[r], a), (__mmask16)(k >> (16 * r)));
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

// Full blocks of a dequantised output larger than the last-level cache (pq_streaming_bytes), written with
// non-temporal stores: plain stores first read every line (on an AMD EPYC with 32 MiB of L3 a 64 MiB float32
// output ran at three quarters of the speed). Where the output fits in that cache, plain stores win (on an Intel
// Xeon with 480 MiB of L3, 64 MiB in 13.8 ms against 23.3 ms streamed; bench/NOTES.md). `out` must be 64-byte
// aligned; call stream_fence() before other threads may read the output.
template <int DT>
static inline void dequantize_block_streaming(const uint8_t* q, float absmax, int64_t start, const DequantTable& t,
                                              void* out) {
  const __m512 a = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < kOptimizerBlock; i += 64) {
    __m512 c[4];
    lookup64(t, _mm512_loadu_si512(q + start + i), c);
    for (int r = 0; r < 4; ++r) {
      const __m512 x = _mm512_mul_ps(c[r], a);
      if constexpr (DT == PQ_DTYPE_FLOAT32) {
        _mm512_stream_ps((float*)out + start + i + 16 * r, x);
      } else {
        const __m256i h = DT == PQ_DTYPE_FLOAT16 ? to_half16(x) : to_bf16_16(x);
        _mm256_stream_si256((__m256i*)((uint16_t*)out + start + i + 16 * r), h);
      }
    }
  }
}
constexpr bool kStreamingDequant = true;
static inline void stream_fence() { _mm_sfence(); }

// ---- sqrt(v) of Adam's denominator ----

// Whether every lane of x takes sqrt16's main sequence (sqrt16_main: no rule, no routine). kSqrtMklAvx512: every
// lane finite and at least 2^-76 (bits in [0x19800000, 0x7F800000)), where rsqrt14(x) <= 2^38 (1 + 2^-14) stays
// below kTinyRoot; one compare and a mask test, where the rules take three mask compares on the shuffle port.
// kSqrtMklSse: its rules are masks applied to every vector, so never.
PQ_INLINE bool sqrt16_main_only(__m512 x, int mode) {
  if (mode == kSqrtIeee) return true;
  if (mode != kSqrtMklAvx512) return false;
  const __m512i above_floor = _mm512_sub_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x19800000));
  const __mmask16 inside = _mm512_cmplt_epu32_mask(above_floor, _mm512_set1_epi32(0x7F800000 - 0x19800000));
  return _kortestc_mask16_u8(inside, inside);
}

// sqrt16's result where sqrt16_main_only(x, mode).
PQ_INLINE __m512 sqrt16_main(__m512 x, int mode) {
  if (mode == kSqrtIeee) return _mm512_sqrt_ps(x);
  const __m512 r = _mm512_rsqrt14_ps(x);
  const __m512 s = _mm512_mul_ps(r, x), h = _mm512_mul_ps(r, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(s, s, x), h, s);
}

// IEEE, or torch's CPU sqrt emulated (cpu_sqrt.h): either of MKL's two kernels. Their rare inputs come back in
// `needs_routine` for the caller to pass to the routine itself, outside its loop: a call inside the loop would make
// the compiler keep every vector in memory across it (all zmm registers are caller-saved), which halved the speed.
PQ_INLINE __m512 sqrt16(__m512 x, int mode, __mmask16& needs_routine) {
  needs_routine = 0;
  if (mode == kSqrtIeee) return _mm512_sqrt_ps(x);
  const __m512 half = _mm512_set1_ps(0.5f);
  if (mode == kSqrtMklAvx512) {
    __m512 res = sqrt16_main(x, mode);
    if (__builtin_expect(sqrt16_main_only(x, mode), 1)) return res;
    // The rules take the main sequence's terms (the compiler shares them with sqrt16_main's).
    const __m512 r = _mm512_rsqrt14_ps(x);
    const __m512 s = _mm512_mul_ps(r, x), h = _mm512_mul_ps(r, half);
    const __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_set1_ps(kTinyRoot), r, _CMP_LT_OS);
    if (__builtin_expect(tiny != 0, 0)) {  // the scaled residual of tiny x
      const __m512 xs = _mm512_mask_mul_ps(x, tiny, x, _mm512_set1_ps(kTinyScale2));
      const __m512 ss = _mm512_mask_mul_ps(s, tiny, s, _mm512_set1_ps(kTinyScale));
      const __m512 hs = _mm512_mask_mul_ps(h, tiny, h, _mm512_set1_ps(kTinyUnscale2));
      res = _mm512_fmadd_ps(_mm512_fnmadd_ps(ss, ss, xs), hs, s);
    }
    // QNaN | +inf | -inf | negative finite | SNaN go to the routine; +-0 return themselves.
    needs_routine = _mm512_fpclass_ps_mask(x, 0xD9);
    return _mm512_mask_mov_ps(res, _mm512_fpclass_ps_mask(x, 0x06), x);
  }
  // kSqrtMklSse: rsqrtps (no 512-bit form; rsqrt14 is a different approximation), then two Newton steps in
  // float32 with separate multiplies and adds; its special inputs, but +-0, go to the routine.
  const __m256 r_lo = _mm256_rsqrt_ps(_mm512_castps512_ps256(x));
  const __m256 r_hi = _mm256_rsqrt_ps(_mm512_extractf32x8_ps(x, 1));
  const __m512 r = _mm512_insertf32x8(_mm512_castps256_ps512(r_lo), r_hi, 1);
  const __m512 s0 = _mm512_mul_ps(x, r);
  // h0 = r * 0.5, exactly: r is a normal number near 1/sqrt(x), between about 2^-64 and 2^63 for every
  // main-path x, so halving it is an exponent decrement (an integer op, off the busy multiply pipes).
  const __m512 h0 = _mm512_castsi512_ps(_mm512_sub_epi32(_mm512_castps_si512(r), _mm512_set1_epi32(0x00800000)));
  const __m512 e = _mm512_sub_ps(half, _mm512_mul_ps(s0, h0));
  const __m512 s1 = _mm512_add_ps(_mm512_mul_ps(s0, e), s0);
  const __m512 h1 = _mm512_add_ps(_mm512_mul_ps(h0, e), h0);
  const __m512 d = _mm512_sub_ps(x, _mm512_mul_ps(s1, s1));
  const __m512 res = _mm512_add_ps(_mm512_mul_ps(d, h1), s1);
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 special =
      _mm512_cmpgt_epi32_mask(_mm512_add_epi32(bits, _mm512_set1_epi32(kCpuSqrtBias)), _mm512_set1_epi32(kCpuSqrtLimit));
  const __mmask16 zero = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7FFFFFFF));
  needs_routine = special & (__mmask16)~zero;
  return _mm512_mask_mov_ps(res, zero, x);
}

static inline void sqrt_block(const float* x, float* out, int64_t n, int mode, pq_vsqrt_fn fn) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = mask16(n - i);
    __mmask16 rest;
    _mm512_mask_storeu_ps(out + i, k, sqrt16(_mm512_maskz_loadu_ps(k, x + i), mode, rest));
    rest &= k;
    if (rest) {
      alignas(64) float in[16], res[16];
      _mm512_store_ps(in, _mm512_maskz_loadu_ps(k, x + i));
      const int32_t n16 = 16;
      fn(&n16, in, res);  // element-wise: each lane's result depends on that lane only
      _mm512_mask_storeu_ps(out + i, rest, _mm512_load_ps(res));
    }
  }
}

// ---- Adam ----

// A block does a lot of arithmetic per byte: the out-of-order window fills long before the next block's
// loads issue, and the hardware prefetchers alone left a step over DRAM-resident tensors at half the speed
// of the same step on cache-resident ones. Touching the data kPrefetchBlocks blocks ahead hides the latency.
#ifndef PQ_PREFETCH_BLOCKS
#define PQ_PREFETCH_BLOCKS 2
#endif
constexpr int64_t kPrefetchBlocks = PQ_PREFETCH_BLOCKS;

PQ_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char*)p + o, _MM_HINT_T0);
}

template <int PDT, int GDT>
PQ_INLINE void prefetch_block(const pq_adam_tensor& t, int64_t start, int64_t state_bytes) {
  const int64_t ahead = start + kPrefetchBlocks * kOptimizerBlock;
  if (ahead >= t.numel) return;
  const int64_t n = t.numel - ahead < kOptimizerBlock ? t.numel - ahead : kOptimizerBlock;
  prefetch_bytes((const char*)t.param + ahead * elem_size(PDT), n * elem_size(PDT));
  prefetch_bytes((const char*)t.grad + ahead * elem_size(GDT), n * elem_size(GDT));
  prefetch_bytes((const char*)t.state1 + ahead * state_bytes, n * state_bytes);
  prefetch_bytes((const char*)t.state2 + ahead * state_bytes, n * state_bytes);
}

struct AdamTables {
  DequantTable deq1, deq2;
  QuantTable quant1, quant2;
};

struct AdamVectors {
  __m512 beta1, one_minus_beta1, beta2, one_minus_beta2, eps, eps_c2, c2, step_size, decay, inv_grad_scale;
  __m512 inv_c2;        // RN(1 / c2), for divide_by_c2
  bool divides_by_c2;   // c2 in [2^-60, 1]: divide_by_c2 is exact for roots in [2^-38, 2^64)
  bool c2_is_one;       // root / c2 is root itself (float32 c2 reaches 1 after some 16,600 steps at beta2 = 0.999)
  explicit AdamVectors(const pq_adam_constants& k)
      : beta1(_mm512_set1_ps(k.beta1)), one_minus_beta1(_mm512_set1_ps(k.one_minus_beta1)),
        beta2(_mm512_set1_ps(k.beta2)), one_minus_beta2(_mm512_set1_ps(k.one_minus_beta2)),
        eps(_mm512_set1_ps(k.eps)), eps_c2(_mm512_set1_ps(k.eps_c2)), c2(_mm512_set1_ps(k.c2)),
        step_size(_mm512_set1_ps(k.step_size)), decay(_mm512_set1_ps(k.decay)),
        inv_grad_scale(_mm512_set1_ps(k.inv_grad_scale)), inv_c2(_mm512_set1_ps(1.0f / k.c2)),
        divides_by_c2(k.c2 >= 0x1p-60f && k.c2 <= 1.0f), c2_is_one(k.c2 == 1.0f) {}
};

// unscaled_grad, lane by lane: always applied (a multiply by 1 and an exact round trip when no scale is fused),
// because a run-time branch here cost more than the arithmetic.
template <int GDT>
PQ_INLINE __m512 unscaled16(const AdamVectors& k, __m512 g) {
  const __m512 x = _mm512_mul_ps(g, k.inv_grad_scale);
  if constexpr (GDT == PQ_DTYPE_FLOAT16) return widen16<GDT>(to_half16(x));
  if constexpr (GDT == PQ_DTYPE_BFLOAT16) return widen16<GDT>(to_bf16_16(x));
  return x;
}

// adam_moments, lane by lane.
PQ_INLINE void moments16(const AdamVectors& k, __m512 g, __m512& m, __m512& v) {
  m = _mm512_fmadd_ps(k.one_minus_beta1, g, _mm512_mul_ps(m, k.beta1));
  v = _mm512_fmadd_ps(_mm512_mul_ps(k.one_minus_beta2, g), g, _mm512_mul_ps(v, k.beta2));
}

// adam_param_8bit_given_sqrt, with root / c2 given as `scaled`. UNIT: the decay is 1 (p * 1 is p).
template <bool UNIT = false>
PQ_INLINE __m512 param8_scaled(const AdamVectors& k, __m512 p, __m512 m, __m512 scaled) {
  const __m512 denom = _mm512_add_ps(scaled, k.eps);
  return _mm512_add_ps(UNIT ? p : _mm512_mul_ps(p, k.decay), _mm512_div_ps(_mm512_mul_ps(k.step_size, m), denom));
}

// adam_param_8bit_given_sqrt.
PQ_INLINE __m512 param8(const AdamVectors& k, __m512 p, __m512 m, __m512 root) {
  return param8_scaled(k, p, m, _mm512_div_ps(root, k.c2));
}

// root / c2 correctly rounded, by the reciprocal and two corrections, off the divider (the block's other division
// keeps it busy): q0 = RN(root * RN(1/c2)) is within 1.5 ulps, the first correction brings it within one, and the
// second is then exact by Markstein's theorem (r = root - q c2 exact, RN(q + r RN(1/c2)) = RN(root / c2)), where
// nothing underflows or overflows: AdamVectors::divides_by_c2 and a root in [2^-38, 2^64) (sqrt16_main_only).
// bench/micro/divide_by_c2_exhaustive.cpp compares it with the division for every such root and thousands of c2.
PQ_INLINE __m512 divide_by_c2(const AdamVectors& k, __m512 root) {
  __m512 q = _mm512_mul_ps(root, k.inv_c2);
  q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, k.c2, root), k.inv_c2, q);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, k.c2, root), k.inv_c2, q);
}

// adam_param_32bit_given_sqrt.
PQ_INLINE __m512 param32(const AdamVectors& k, __m512 p, __m512 m, __m512 root) {
  const __m512 u = _mm512_div_ps(m, _mm512_add_ps(root, k.eps_c2));
  return _mm512_fmadd_ps(k.step_size, u, _mm512_mul_ps(p, k.decay));
}

// Lanes whose gradient is NaN or ±inf (QNaN | +inf | -inf | SNaN).
PQ_INLINE __mmask16 nonfinite16(__mmask16 k, __m512 g) { return _mm512_mask_fpclass_ps_mask(k, g, 0x99); }

// Parameter updates left for after a block's main loop: the lanes whose sqrt needs the routine (all of them
// in kSqrtCall mode), with the new moments in m and v. `m` and `v` hold the block's values at offset 0.
template <int PDT, bool EightBit>
static inline void finish_deferred(const pq_adam_tensor& t, int64_t start, int64_t len, const AdamVectors& k,
                                   const float* m, const float* v, const __mmask16* later, pq_vsqrt_fn fn) {
  alignas(64) float root[kOptimizerBlock];
  const int32_t n = (int32_t)len;
  fn(&n, v, root);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 lanes = later[j / 16];
    if (!lanes) continue;
    const __m512 p = load16<PDT>(t.param, start + j, lanes);
    const __m512 mj = _mm512_maskz_loadu_ps(lanes, m + j), rj = _mm512_maskz_loadu_ps(lanes, root + j);
    store16<PDT>(t.param, start + j, EightBit ? param8(k, p, mj, rj) : param32(k, p, mj, rj), lanes);
  }
}

// A block's step but its requantisation: the new parameters, and the new moments into m and v, their absmax into
// new_a1, new_a2 and the tensor's absmax arrays. between(j) runs after the parameters of the 16 elements from j (other
// work for the core while these wait on their divisions: see adam_blocks_8bit).
// UNIT: the gradient scale and the decay are 1, so that the common case skips multiplying by them (exact either
// way; the caller picks it per tensor).
// NONFINITE and SQRT_MODE are template parameters: with them as run-time values (even perfectly predicted
// branches) GCC generated code that ran at half the speed.
template <int PDT, int GDT, int NONFINITE, int SQRT_MODE, bool UNIT, class Len, class Between>
PQ_INLINE int64_t adam_block_8bit_update(const pq_adam_tensor& t, int64_t start, Len len, const AdamTables& tab,
                                         pq_vsqrt_fn fn, float* m, float* v, float& new_a1, float& new_a2,
                                         Between&& between) {
  __mmask16 later[kOptimizerBlock / 16] = {};  // written only for the vectors with deferred lanes
  __mmask16 any_later = 0;
  const AdamVectors k(t.k);
  uint8_t* q1 = (uint8_t*)t.state1 + start;
  uint8_t* q2 = (uint8_t*)t.state2 + start;
  const int64_t b = start / kOptimizerBlock;
  const __m512 a1 = _mm512_set1_ps(t.absmax1[b]), a2 = _mm512_set1_ps(t.absmax2[b]);
  prefetch_block<PDT, GDT>(t, start, 1);
  __m512 amax1 = _mm512_setzero_ps(), amax2 = _mm512_setzero_ps();
  int64_t bad = 0;
  // One 64-element stretch at offset i. In the avx512vbmi build a full block with search stages to run in between
  // takes its four with compile-time offsets, so that each call of `between` keeps only its own slot's stages: with
  // a run-time offset every call site carried the code of all of them (0.96x of the kernel's time at 1M parameters,
  // 0.98-0.99x at 4M and 16M; bench/NOTES.md). Elsewhere the loop stays: unrolled, the library grew by a fifth.
  const auto stretch = [&](auto i) __attribute__((always_inline)) {
    const __mmask64 k64 = mask64(len - i);
    __m512 mq[4], vq[4];
    lookup64(tab.deq1, _mm512_maskz_loadu_epi8(k64, q1 + i), mq);
    lookup64(tab.deq2, _mm512_maskz_loadu_epi8(k64, q2 + i), vq);
    // Two passes over the four vectors. First their moments; then, in the common case (every lane's new v on the
    // main sqrt sequence), their parameters in one straight-line stretch whose four dependent chains (sqrt,
    // division: some 80 cycles) the core overlaps with each other and with the search stages `between` runs.
    // Interleaved per vector, with a branch in each, the step ran 2-4 % slower (bench/NOTES.md).
    // The common case is one test of the four vectors' v bits: an unsigned min and max over them, where a compare
    // and a mask test per vector (and a class test of each gradient) took the shuffle port the searches need. It
    // also rules out every skipped lane: a NaN or infinite gradient gives a NaN or infinite v, and the main
    // range holds neither (nor negatives, so the absmax of v needs no abs there).
    __m512 mi[4], vi[4];
    __m512i v_low = _mm512_set1_epi32(-1), v_high = _mm512_setzero_si512();  // v's bits, unsigned
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const int64_t j = i + 16 * r;
      const __mmask16 valid = (__mmask16)(k64 >> (16 * r));
      const __m512 loaded = load16<GDT>(t.grad, start + j, valid);
      const __m512 g = UNIT ? loaded : unscaled16<GDT>(k, loaded);
      mi[r] = _mm512_mul_ps(mq[r], a1), vi[r] = _mm512_mul_ps(vq[r], a2);
      moments16(k, g, mi[r], vi[r]);
      v_high = _mm512_max_epu32(v_high, _mm512_castps_si512(vi[r]));
      if constexpr (SQRT_MODE == kSqrtMklAvx512) v_low = _mm512_min_epu32(v_low, _mm512_castps_si512(vi[r]));
    }
    if constexpr (SQRT_MODE == kSqrtIeee || SQRT_MODE == kSqrtMklAvx512) {
      // kSqrtIeee: v finite and not negative; kSqrtMklAvx512: sqrt16_main_only's [0x19800000, 0x7F800000).
      const __m512i floor = _mm512_set1_epi32(SQRT_MODE == kSqrtIeee ? 0 : 0x19800000);
      const __mmask16 inside = _mm512_cmplt_epu32_mask(v_high, _mm512_set1_epi32(0x7F800000)) &
                               _mm512_cmpge_epu32_mask(v_low, floor);
      if (__builtin_expect(_kortestc_mask16_u8(inside, inside), 1)) {
        const bool reciprocal = SQRT_MODE == kSqrtMklAvx512 && k.divides_by_c2;
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const int64_t j = i + 16 * r;
          const __mmask16 valid = (__mmask16)(k64 >> (16 * r));
          _mm512_store_ps(m + j, mi[r]);
          _mm512_store_ps(v + j, vi[r]);
          amax1 = _mm512_mask_max_ps(amax1, valid, _mm512_abs_ps(mi[r]), amax1);
          amax2 = _mm512_mask_max_ps(amax2, valid, vi[r], amax2);
        }
        // The four roots first, then root / c2 for all four behind one branch (none once c2 is 1: x / 1 is x),
        // then the parameters and the search stages. Against each vector's root and division between the stages,
        // with c2 below 1: 0.93x of the kernel's time at 4M parameters, 0.96x at 16M, 0.91-0.92x on two threads,
        // unchanged at 1M on one; with c2 = 1, 0.85-0.95x (bench/NOTES.md).
        __m512 scaled[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) scaled[r] = sqrt16_main(vi[r], SQRT_MODE);
        if (!k.c2_is_one) {
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r)
            scaled[r] = reciprocal ? divide_by_c2(k, scaled[r]) : _mm512_div_ps(scaled[r], k.c2);
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const int64_t j = i + 16 * r;
          const __mmask16 valid = (__mmask16)(k64 >> (16 * r));
          const __m512 p = load16<PDT>(t.param, start + j, valid);
          store16<PDT>(t.param, start + j, param8_scaled<UNIT>(k, p, mi[r], scaled[r]), valid);
          between(j);
        }
        return;
      }
    }
    // Otherwise vector by vector: skipped lanes (kSkipElement) keep their moments, each sqrt takes its own path.
    __mmask16 skips[4] = {};
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const int64_t j = i + 16 * r;
      const __mmask16 valid = (__mmask16)(k64 >> (16 * r));
      if constexpr (NONFINITE == kSkipElement) {
        const __m512 g = unscaled16<GDT>(k, load16<GDT>(t.grad, start + j, valid));
        const __mmask16 skip = nonfinite16(valid, g);
        if (__builtin_expect(skip != 0, 0)) {
          skips[r] = skip;
          bad += __builtin_popcount((unsigned)skip);
          mi[r] = _mm512_mask_mov_ps(mi[r], skip, _mm512_mul_ps(mq[r], a1));
          vi[r] = _mm512_mask_mov_ps(vi[r], skip, _mm512_mul_ps(vq[r], a2));
        }
      }
      _mm512_store_ps(m + j, mi[r]);
      _mm512_store_ps(v + j, vi[r]);
      amax1 = _mm512_mask_max_ps(amax1, valid, _mm512_abs_ps(mi[r]), amax1);
      amax2 = _mm512_mask_max_ps(amax2, valid, _mm512_abs_ps(vi[r]), amax2);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const int64_t j = i + 16 * r;
      const __mmask16 valid = (__mmask16)(k64 >> (16 * r));
      const __mmask16 skip = skips[r];
      const __m512 mi_r = mi[r], vi_r = vi[r];
      // The parameters of lanes `upd`. Called with `valid` in the common case, a constant in a full block, so that
      // the loads and stores take no mask register; likewise the common sqrt takes no blend of deferred lanes.
      const auto update = [&](__mmask16 upd) {
        if constexpr (SQRT_MODE != kSqrtCall) {
          // Load and store masks must not depend on the arithmetic: with a late mask the core holds younger
          // loads behind the store and memory latency is no longer hidden (the step ran at half speed). The
          // lanes left for the routine get a placeholder here and their final value in finish_deferred.
          const __m512 p = load16<PDT>(t.param, start + j, upd);
          if (__builtin_expect(sqrt16_main_only(vi_r, SQRT_MODE), 1)) {
            const __m512 root = sqrt16_main(vi_r, SQRT_MODE);
            // Only the emulated sqrt's common path bounds the root (IEEE mode takes every root here).
            const bool reciprocal = SQRT_MODE == kSqrtMklAvx512 && k.divides_by_c2;
            const __m512 scaled = reciprocal ? divide_by_c2(k, root) : _mm512_div_ps(root, k.c2);
            store16<PDT>(t.param, start + j, param8_scaled(k, p, mi_r, scaled), upd);
            return;
          }
          __mmask16 rest;
          const __m512 root = sqrt16(vi_r, SQRT_MODE, rest);
          rest &= upd;
          store16<PDT>(t.param, start + j, _mm512_mask_mov_ps(param8(k, p, mi_r, root), rest, p), upd);
          later[j / 16] = rest;
          any_later |= rest;
        } else {
          later[j / 16] = upd;
          any_later |= upd;
        }
      };
      if (__builtin_expect(skip != 0, 0))
        update(valid & (__mmask16)~skip);
      else
        update(valid);
      between(j);
    }
  };
  if constexpr (PQ_AVX512_VBMI && std::is_same_v<Len, FullBlock> && !std::is_empty_v<std::decay_t<Between>>) {
    stretch(std::integral_constant<int64_t, 0>());
    stretch(std::integral_constant<int64_t, 64>());
    stretch(std::integral_constant<int64_t, 128>());
    stretch(std::integral_constant<int64_t, 192>());
  } else {
    for (int64_t i = 0; i < len; i += 64) stretch(i);
  }
  if (any_later) finish_deferred<PDT, true>(t, start, len, k, m, v, later, fn);
  new_a1 = _mm512_reduce_max_ps(amax1), new_a2 = _mm512_reduce_max_ps(amax2);
  t.absmax1[b] = new_a1;
  t.absmax2[b] = new_a2;
  return bad;
}

template <int PDT, int GDT, int NONFINITE, int SQRT_MODE, class Len>
PQ_INLINE int64_t adam_block_8bit_impl(const pq_adam_tensor& t, int64_t start, Len len, const AdamTables& tab,
                                       pq_vsqrt_fn fn) {
  alignas(64) float m[kOptimizerBlock], v[kOptimizerBlock];
  float a1, a2;
  const int64_t bad = adam_block_8bit_update<PDT, GDT, NONFINITE, SQRT_MODE, false>(t, start, len, tab, fn, m, v,
                                                                                    a1, a2, [](int64_t) {});
  quantize_values<PQ_DTYPE_FLOAT32>(m, 0, len, a1, tab.quant1, (uint8_t*)t.state1 + start);
  quantize_values<PQ_DTYPE_FLOAT32>(v, 0, len, a2, tab.quant2, (uint8_t*)t.state2 + start);
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

// Whether quantize_values takes a block of this absmax without the clamps (its common case: see grid_bins).
static inline bool quantizes_unclamped(float absmax) { return absmax != 0.0f && is_finite(block_inverse(absmax)); }

// Blocks [b0, b1) of one tensor, software-pipelined: a full block's requantisation runs inside the next block's
// main loop (the avx512vbmi build's in eight stages per moment spread over the loop's vectors, the avx512 build's
// the first moment's after its first 64 elements and the second's after the next 64). At the end of its
// own block it waited on the block's absmax (two reductions and a division) and its search, which keeps the
// shuffle port busy, ran beside nothing else: 0.91-0.98x of the kernel's time at 1M and 4M parameters on one
// thread (bench/NOTES.md). Same bits: each block is still quantised from its own moments and absmax. Blocks whose
// absmax takes the clamps or is 0, and the partial last block, take adam_block_8bit_impl's order.
template <int PDT, int GDT, int NONFINITE, int SQRT_MODE, bool UNIT = false>
static inline int64_t adam_blocks_8bit(const pq_adam_tensor& t, int64_t b0, int64_t b1, const AdamTables& tab,
                                       pq_vsqrt_fn fn) {
  struct NewMoments {
    alignas(64) float m[kOptimizerBlock], v[kOptimizerBlock];
    float absmax1, absmax2;
    uint8_t *q1, *q2;  // where the block's codes go
  };
  NewMoments moments[2];
#if PQ_AVX512_VBMI
  StagedSearch st1, st2;
#endif
  NewMoments* pending = nullptr;  // a full block's new moments, not yet requantised
  const auto requantise_pending = [&]() {
    if (!pending) return;
    quantize_values<PQ_DTYPE_FLOAT32>(pending->m, 0, FullBlock(), pending->absmax1, tab.quant1, pending->q1);
    quantize_values<PQ_DTYPE_FLOAT32>(pending->v, 0, FullBlock(), pending->absmax2, tab.quant2, pending->q2);
    pending = nullptr;
  };
  int64_t bad = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimizerBlock;
    if (t.numel - start < kOptimizerBlock) {  // the partial last block (its own buffers)
      bad += adam_block_8bit_impl<PDT, GDT, NONFINITE, SQRT_MODE>(t, start, t.numel - start, tab, fn);
      break;
    }
    NewMoments& out = moments[b & 1];
    out.q1 = (uint8_t*)t.state1 + start;
    out.q2 = (uint8_t*)t.state2 + start;
    if (pending && quantizes_unclamped(pending->absmax1) && quantizes_unclamped(pending->absmax2)) {
      const NewMoments& p = *pending;
      const __m512 inv1 = _mm512_set1_ps(block_inverse(p.absmax1)), inv2 = _mm512_set1_ps(block_inverse(p.absmax2));
      bad += adam_block_8bit_update<PDT, GDT, NONFINITE, SQRT_MODE, UNIT>(
          t, start, FullBlock(), tab, fn, out.m, out.v, out.absmax1, out.absmax2,
          [&](int64_t j) __attribute__((always_inline)) {
#if PQ_AVX512_VBMI
            // m's eight stages after vectors 0-7, v's after vectors 4-11: two searches overlapping by half
            // measured 6-10 % faster than one after the other, and 5 % than both at once (bench/NOTES.md).
            const int slot = (int)(j / 16);
            if (slot < 8) search_stage(slot, st1, p.m, inv1, tab.quant1, p.q1);
            if (slot >= 4 && slot < 12) search_stage(slot - 4, st2, p.v, inv2, tab.quant2, p.q2);
#else
            if (j == 0) quantize_chunks<PQ_DTYPE_FLOAT32, 8, false>(p.m, 0, 0, kOptimizerBlock, inv1, tab.quant1, p.q1);
            if (j == 64) quantize_chunks<PQ_DTYPE_FLOAT32, 8, false>(p.v, 0, 0, kOptimizerBlock, inv2, tab.quant2, p.q2);
#endif
          });
    } else {
      requantise_pending();
      bad += adam_block_8bit_update<PDT, GDT, NONFINITE, SQRT_MODE, UNIT>(t, start, FullBlock(), tab, fn, out.m,
                                                                          out.v, out.absmax1, out.absmax2,
                                                                          [](int64_t) {});
    }
    pending = &out;
  }
  requantise_pending();
  return bad;
}

template <int PDT, int GDT, int NONFINITE, int SQRT_MODE, class Len>
PQ_INLINE int64_t adam_block_32bit_impl(const pq_adam_tensor& t, int64_t start, Len len, pq_vsqrt_fn fn) {
  __mmask16 later[kOptimizerBlock / 16];
  __mmask16 any_later = 0;
  const AdamVectors k(t.k);
  float* m = (float*)t.state1 + start;
  float* v = (float*)t.state2 + start;
  prefetch_block<PDT, GDT>(t, start, 4);
  int64_t bad = 0;
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 valid = mask16(len - j);
    const __m512 g = unscaled16<GDT>(k, load16<GDT>(t.grad, start + j, valid));
    __mmask16 upd = valid;
    if constexpr (NONFINITE == kSkipElement) {
      const __mmask16 skip = nonfinite16(valid, g);
      bad += __builtin_popcount((unsigned)skip);
      upd = valid & (__mmask16)~skip;
    }
    __m512 mi = _mm512_maskz_loadu_ps(valid, m + j), vi = _mm512_maskz_loadu_ps(valid, v + j);
    moments16(k, g, mi, vi);
    _mm512_mask_storeu_ps(m + j, upd, mi);
    _mm512_mask_storeu_ps(v + j, upd, vi);
    __mmask16 rest = upd;
    if constexpr (SQRT_MODE != kSqrtCall) {
      const __m512 p = load16<PDT>(t.param, start + j, upd);  // masks independent of the arithmetic
      const __m512 root = sqrt16(vi, SQRT_MODE, rest);
      rest &= upd;
      store16<PDT>(t.param, start + j, _mm512_mask_mov_ps(param32(k, p, mi, root), rest, p), upd);
    }
    later[j / 16] = rest;
    any_later |= rest;
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
