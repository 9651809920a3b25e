// Per-element math of the Adam step with 4-bit states (docs/numerics.md, "4-bit states"; the executable spec is
// pyquant/backends/reference/adam4bit.py). Written once for the host (csrc/cpu/adam4bit.cpp) and, under nvcc, the
// device (csrc/cuda/adam4bit.cu). The update itself is Adam's (blockwise.h: adam_moments, adam_param_8bit for
// quantised states, adam_param_32bit for float32 ones), always with IEEE sqrtf: no bitsandbytes bits to follow here.
#pragma once
#include <math.h>
#include <stdint.h>

#include "pyquant/blockwise.h"

namespace pq {

constexpr int kFourBitBlock = 128;  // elements per scale of m (and of a block-wise v)
constexpr int kFourBitMids = 15;    // midpoints between the 16 codes of a map

PQ_HD float min_float(float a, float b) { return a < b ? a : b; }

// `kept` where keep is 1, else `updated`, on the bits: a select of floats became a branch that kept GCC from
// vectorising the loops (the arithmetic may trap under -ftrapping-math).
PQ_HD float kept_or_new(uint32_t keep, float kept, float updated) {
  const uint32_t mask = 0u - keep;
  return bits_float((float_bits(kept) & mask) | (float_bits(updated) & ~mask));
}

// x / scale, or 0 where the scale is 0 (every value under that scale is 0: the signed map's zero code, the
// unsigned map's smallest). Divides by 1 there rather than branching, so that the loops vectorise.
PQ_HD float fourbit_normalised(float x, float scale) {
  const uint32_t zero = scale == 0.0f;
  return kept_or_new(zero, 0.0f, x / kept_or_new(zero, 1.0f, scale));
}

// The code of a normalised value: the number of midpoints strictly below it (nearest code, ties to the lower one;
// NaN compares false and gets code 0). `mids` holds (code[j] + code[j + 1]) * 0.5 for j = 0..14.
PQ_HD uint32_t fourbit_code(float y, const float* mids) {
  uint32_t c = 0;
  for (int j = 0; j < kFourBitMids; ++j) c += (uint32_t)(mids[j] < y);
  return c;
}

// Code i of a packed state: element 2k in the low nibble of byte k, element 2k + 1 in the high one.
PQ_HD uint32_t fourbit_nibble(const uint8_t* q, int64_t i) { return (q[i >> 1] >> ((uint32_t)(i & 1) * 4u)) & 15u; }

}  // namespace pq
