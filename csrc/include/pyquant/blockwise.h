// Per-element math of block-wise 8-bit quantisation and of the Adam step with 8-bit states.
//
// Written once, compiled for the host (the C++ CPU library) and, under nvcc, for the device (the CUDA
// library). The Python reference (pyquant/backends/reference/) and the Triton kernels follow the same rules;
// docs/numerics.md states them. Every operation below is one IEEE float32 operation, in the order
// written: the build forbids fp contraction (-ffp-contract=off, nvcc --fmad=false) and fast math,
// and fmaf() appears exactly where the contract asks for a fused multiply-add.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pyquant/capi.h"

#if defined(__CUDACC__)
#define PQ_HD __host__ __device__ __forceinline__
#else
#define PQ_HD static inline
#endif

namespace pq {

enum NonFinite : int32_t { kSkipElement = 0, kPropagate = 1 };

constexpr int kOptimizerBlock = 256;  // block size of the optimizer states (bitsandbytes' value)
constexpr int kGridPoints = 65536;    // the quantiser snaps y in [-1, 1] to this grid first

// ceil(n / blocksize) for n >= 0, blocksize > 0, without the overflow of (n + blocksize - 1) / blocksize
// (a blocksize near 2**63 made that negative: no block was processed and the outputs stayed uninitialised).
PQ_HD int64_t block_count(int64_t n, int64_t blocksize) { return n / blocksize + (n % blocksize != 0); }

// The dtypes the quantisation and Adam kernels store (enum pq_dtype of capi.h, float64 excepted).
PQ_HD bool valid_dtype(int32_t dtype) {
  return dtype == PQ_DTYPE_FLOAT32 || dtype == PQ_DTYPE_FLOAT16 || dtype == PQ_DTYPE_BFLOAT16;
}

PQ_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
PQ_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- storage conversions (exact widening, round-to-nearest-even narrowing, as torch's .to()) ----
PQ_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    // zero or subnormal: man * 2^-24 is exact in float32
    float mag = (float)man * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

PQ_HD uint16_t float_to_half(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN (quiet) / inf
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: overflow to inf
  if (abs < 0x38800000u) {
    // result is a half subnormal (or zero): scale so the half ulp (2^-24) becomes 1, round to even
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal: +-0
    uint32_t exp = abs >> 23;
    uint32_t man = (abs & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 14..24
    uint32_t kept = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (kept & 1u))) kept += 1u;
    return sign | (uint16_t)kept;
  }
  uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}

PQ_HD float bf16_to_float(uint16_t b) { return bits_float((uint32_t)b << 16); }

PQ_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // NaN stays a quiet NaN
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

PQ_HD float load_as_float(const void* base, int64_t i, int32_t dtype) {
  if (dtype == PQ_DTYPE_FLOAT32) return ((const float*)base)[i];
  if (dtype == PQ_DTYPE_FLOAT16) return half_to_float(((const uint16_t*)base)[i]);
  return bf16_to_float(((const uint16_t*)base)[i]);
}

PQ_HD void store_from_float(void* base, int64_t i, int32_t dtype, float v) {
  if (dtype == PQ_DTYPE_FLOAT32)
    ((float*)base)[i] = v;
  else if (dtype == PQ_DTYPE_FLOAT16)
    ((uint16_t*)base)[i] = float_to_half(v);
  else
    ((uint16_t*)base)[i] = float_to_bf16(v);
}

// ---- quantisation (docs/numerics.md, section 2) ----

// Running block absmax: NaN never wins a comparison, so it is ignored; +-inf counts.
PQ_HD float absmax_update(float running, float x) {
  float a = fabsf(x);
  return a > running ? a : running;
}

// max |x| over len values, NaN ignored (absmax_update), as eight running maxima so that compilers vectorise it (one
// serial maxss chain took a quarter of a one-state step); a max is order-independent, so the result is the
// sequential one.
PQ_HD float block_absmax(const float* x, int64_t len) {
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int l = 0; l < 8; ++l) part[l] = absmax_update(part[l], x[i + l]);
  float amax = 0.0f;
  for (; i < len; ++i) amax = absmax_update(amax, x[i]);
  for (int l = 0; l < 8; ++l) amax = absmax_update(amax, part[l]);
  return amax;
}

// Step 3-4: scale by the block's reciprocal absmax, clamp (NaN passes), snap to the 65536-point grid.
PQ_HD uint32_t grid_bin(float x, float inv_absmax) {
  float y = x * inv_absmax;
  y = y > 1.0f ? 1.0f : y;
  y = y < -1.0f ? -1.0f : y;
  float t = (y + 1.0f) * 0.5f;
  float s = t * 65535.0f + 0.5f;
  if (s != s) return 0u;  // NaN -> bin 0
  return ((uint32_t)s) & 0xFFFFu;  // s is in [0.5, 65535.5]: truncation is the contract's rounding
}

// Step 5: the centre of a grid bin, mapped back to [-1, 1].
PQ_HD float grid_centre(uint32_t bin) { return (2.0f * (float)bin) / 65535.0f - 1.0f; }

// Step 5: the code index is the number of midpoints strictly below the bin's centre (ties go low).
// `mids` holds the 255 float32 midpoints (code[j] + code[j+1]) * 0.5 of a sorted 256-entry code.
PQ_HD uint32_t code_index_of_bin(uint32_t bin, const float* mids) {
  float c = grid_centre(bin);
  uint32_t lo = 0, hi = 255;  // answer in [0, 255]: count of mids[j] < c
  while (lo < hi) {
    uint32_t mid = (lo + hi) >> 1;
    if (mids[mid] < c)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

PQ_HD float code_midpoint(const float* code, int j) { return (code[j] + code[j + 1]) * 0.5f; }

// The reciprocal used for one block; an all-zero block is special-cased by the caller (every code 0).
PQ_HD float block_inverse(float absmax) { return 1.0f / absmax; }

// ---- Adam with 8-bit states (docs/numerics.md, section 4; the constants: pq_adam_constants in capi.h) ----
PQ_HD bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// The gradient as a separate unscale pass (GradScaler.unscale_) would have left it: g * inv_scale rounded to
// the gradient's dtype. With inv_scale == 1 it is g itself (a NaN may come back quieted, which the
// arithmetic that follows does anyway).
PQ_HD float unscaled_grad(float g, float inv_scale, int32_t dtype) {
  const float x = g * inv_scale;
  if (dtype == PQ_DTYPE_FLOAT32) return x;
  return dtype == PQ_DTYPE_FLOAT16 ? half_to_float(float_to_half(x)) : bf16_to_float(float_to_bf16(x));
}

PQ_HD void adam_moments(float g, float& m, float& v, const pq_adam_constants& k) {
  m = fmaf(k.one_minus_beta1, g, m * k.beta1);
  v = fmaf(k.one_minus_beta2 * g, g, v * k.beta2);
}

// The square root is torch's sqrt on the device the tensors live on: IEEE sqrtf on a GPU, and on a CPU
// whatever torch's CPU sqrt is (MKL's vsSqrt in torch 2.14.1 builds, up to 1 ulp from IEEE). The CPU
// library therefore takes the block's sqrt(v) from outside (see capi.cpp, pq_set_cpu_sqrt), and these
// functions come in two forms: one taking sqrt(v), one computing it with IEEE sqrtf.

// Parameter update with the moments of 8-bit states: denom = sqrt(v)/c2 + eps, p += (step*m)/denom.
PQ_HD float adam_param_8bit_given_sqrt(float p, float m, float sqrt_v, const pq_adam_constants& k) {
  float denom = sqrt_v / k.c2 + k.eps;
  p = p * k.decay;
  return p + (k.step_size * m) / denom;
}

// Parameter update with float32 states (tensors below min_8bit_size): u = m/(sqrt(v)+eps*c2), p += step*u.
PQ_HD float adam_param_32bit_given_sqrt(float p, float m, float sqrt_v, const pq_adam_constants& k) {
  float u = m / (sqrt_v + k.eps_c2);
  p = p * k.decay;
  return fmaf(k.step_size, u, p);
}

PQ_HD float adam_param_8bit(float p, float m, float v, const pq_adam_constants& k) {
  return adam_param_8bit_given_sqrt(p, m, sqrtf(v), k);
}

PQ_HD float adam_param_32bit(float p, float m, float v, const pq_adam_constants& k) {
  return adam_param_32bit_given_sqrt(p, m, sqrtf(v), k);
}

// ---- the one-state rules (docs/numerics.md, section 5; bitsandbytes 0.50.2's CPU code op for op) ----
// torch's x.add_(y, alpha=a) is fmaf(a, y, x); x.addcmul_(y, z, value=a) is fmaf(a * y, z, x);
// x.addcdiv_(y, z, value=a) is x + (a * y) / z.

// torch.sign: +-1 (x's sign bit on 1.0), and +0 for +-0 and NaN. On the bits, without a comparison of floats: the
// signs of a momentum are random, and the branch compilers made of the comparisons was mispredicted about every
// other element (Lion's step ran at a third of SGD's speed).
PQ_HD float torch_sign(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  const uint32_t keep = 0u - (uint32_t)(magnitude - 1u < 0x7F800000u);  // all ones unless +-0 or NaN
  const uint32_t r = ((u & 0x80000000u) | 0x3F800000u) & keep;
  float out;
  memcpy(&out, &r, sizeof out);
  return out;
}

// The gradient with the weight decay term of SGD, RMSprop and Adagrad (and LARS' direction g + wd*p).
PQ_HD float decayed_grad(float p, float g, const pq_one_state_constants& k) {
  return k.grad_decay != 0.0f ? fmaf(k.weight_decay, p, g) : g;
}

// The state update and everything before the square root. `p` may be decayed (Lion); `g` may get the weight
// decay term (the others). Returns the value the parameter update needs besides p (Lion: the direction).
PQ_HD float one_state_first(int32_t rule, bool eight_bit, float& p, float& g, float& s,
                            const pq_one_state_constants& k) {
  if (rule == PQ_RULE_LION) {
    p = p * k.decay;
    const float u = eight_bit ? s * k.beta1 + g * k.one_minus_beta1 : fmaf(k.one_minus_beta1, g, s * k.beta1);
    s = fmaf(k.one_minus_beta2, g, s * k.beta2);
    return torch_sign(u);
  }
  g = decayed_grad(p, g, k);
  if (rule == PQ_RULE_MOMENTUM) {
    g = g * k.trust_ratio;  // LARS' ratio; SGD's is 1, an exact no-op
    s = k.first_step != 0.0f ? g : s * k.beta1 + g;
  }
  else if (rule == PQ_RULE_RMSPROP)
    s = fmaf(k.one_minus_beta1 * g, g, s * k.beta1);
  else
    s = fmaf(g, g, s);
  return 0.0f;
}

// Whether the rule's parameter update takes sqrt(s): RMSprop and Adagrad.
PQ_HD constexpr bool one_state_needs_root(int32_t rule) { return rule == PQ_RULE_RMSPROP || rule == PQ_RULE_ADAGRAD; }

// The parameter update, given `direction` from one_state_first and sqrt(s) (RMSprop, Adagrad).
PQ_HD float one_state_param(int32_t rule, bool eight_bit, float p, float g, float s, float direction, float sqrt_s,
                            const pq_one_state_constants& k) {
  if (rule == PQ_RULE_LION) return fmaf(k.neg_lr, direction, p);
  if (rule == PQ_RULE_MOMENTUM) return fmaf(k.neg_lr, s, p);
  const float denom = sqrt_s + k.eps;
  return eight_bit ? p + (k.neg_lr * g) / denom : fmaf(k.neg_lr, g / denom, p);
}

// ---- AdEMAMix (docs/numerics.md, "AdEMAMix"; bitsandbytes 0.50.2's CPU code op for op, whose 8-bit and
// 32-bit paths do the same arithmetic) ----
PQ_HD void ademamix_moments(float g, float& m1, float& m2, float& nu, const pq_ademamix_constants& k) {
  m1 = fmaf(k.one_minus_beta1, g, m1 * k.beta1);
  m2 = fmaf(k.one_minus_beta3, g, m2 * k.beta3);
  nu = fmaf(k.one_minus_beta2 * g, g, nu * k.beta2);
}

// p * decay + (-lr) * ((m1/c1 + alpha*m2) / (sqrt(nu)/c2 + eps)), the last step fused (torch's add_ with alpha).
// Takes sqrt(nu), torch's sqrt on the device (see Adam's functions above).
PQ_HD float ademamix_param_given_sqrt(float p, float m1, float m2, float sqrt_nu, const pq_ademamix_constants& k) {
  const float mixed = m1 / k.c1 + k.alpha * m2;
  const float denom = sqrt_nu / k.c2 + k.eps;
  return fmaf(k.neg_lr, mixed / denom, p * k.decay);
}

// ---- LAMB's direction (docs/numerics.md, "LAMB and LARS"): what its norm pass sums the squares of ----
// r = m/c1 / (sqrt(v)/c2 + eps) + wd*p from the updated moments (adam_moments) and sqrt(v), for 8-bit and float32
// states alike. Only the trust ratio depends on it: the step itself is Adam's with the ratio in its constants.
PQ_HD float lamb_direction(float p, float m, float sqrt_v, const pq_adam_constants& k) {
  const float u = (m * k.inv_c1) / (sqrt_v / k.c2 + k.eps);
  return k.weight_decay > 0.0f ? fmaf(k.weight_decay, p, u) : u;
}

// The sum of n (a power of two) doubles, pairwise by halving: x[i] += x[i + h] for h = n/2, ..., 1. A fixed order,
// whatever the thread count; the reference backend sums in the same order. Overwrites x.
PQ_HD double halving_sum(double* x, int64_t n) {
  for (int64_t h = n / 2; h >= 1; h /= 2)
    for (int64_t i = 0; i < h; ++i) x[i] = x[i] + x[i + h];
  return n > 0 ? x[0] : 0.0;
}

// ---- GradScaler's unscale_ (pyquant/amp.py; torch's _amp_foreach_non_finite_check_and_unscale_) ----
PQ_HD bool is_finite64(double x) {
  uint64_t u;
  memcpy(&u, &x, 8);
  return (u & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
}

// One stored gradient element: widened to float32 (float64 stays float64), checked, multiplied by inv_scale
// unless that is exactly 1, and rounded back to its dtype (round to nearest even; a float16/bfloat16 element
// is always rewritten, which only canonicalises a NaN). Returns whether the element was inf or NaN.
PQ_HD bool unscale_element(void* base, int64_t i, int32_t dtype, float inv_scale) {
  const bool unit = inv_scale == 1.0f;
  if (dtype == PQ_DTYPE_FLOAT64) {
    double* p = (double*)base;
    const double v = p[i];
    if (!unit) p[i] = v * (double)inv_scale;
    return !is_finite64(v);
  }
  const float v = load_as_float(base, i, dtype);
  if (!unit)
    store_from_float(base, i, dtype, v * inv_scale);
  else if (dtype != PQ_DTYPE_FLOAT32)
    store_from_float(base, i, dtype, v);
  return !is_finite(v);
}

}  // namespace pq
