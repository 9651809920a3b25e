// The square root of Adam's denominator on the CPU, and how the SIMD kernels reproduce it.
//
// The contract's sqrt is torch's CPU sqrt (blockwise.h, capi.h: pq_cpu_sqrt). With torch 2.14.1 that is
// MKL's vsSqrt, and MKL picks its kernel by CPU. Two of them are reproduced here, bit for bit:
//
// kSqrtMklSse: on the AMD CPUs MKL runs its generic SSE kernel (mkl_vml_kernel_sSqrt_EXHAynn):
//   special(x) = (int32)(bits(x) + 0x7F800000) > (int32)0xFEFFF000
//                (true for +-0, subnormals, x > 0x7F7FF000, inf, NaN and negatives)
//   otherwise:  r = rsqrtps(x); s0 = x*r; h0 = r*0.5; e = 0.5 - s0*h0;
//               s1 = s0*e + s0; h1 = h0*e + h0; result = (x - s1*s1)*h1 + s1
//   (float32, each product and sum rounded separately; up to 1 ulp from IEEE for ~1 value in 6). The kernels
//   use the same rsqrtps instruction (its VEX form: AVX-512 has no 512-bit rsqrtps). Checked against vsSqrt on
//   all 2^32 inputs on an AMD EPYC (Zen 3).
//
// kSqrtMklAvx512: on Intel CPUs with AVX-512 MKL runs mkl_vml_kernel_sSqrt_Z0HAynn:
//   r = rsqrt14(x); s = r*x; h = r*0.5; result = fma(fma(-s, s, x), h, s)
//   where r > 2^39 (x below about 2^-78, subnormals included) the residual is taken on x*2^78, s*2^39 and
//   h*2^-78 (all exact scalings), so that it does not underflow; the result is then the same sum at full
//   precision. +-0 return themselves; negatives, +-inf and NaN go to a scalar routine. Only the avx512 build
//   has rsqrt14. Checked against vsSqrt on all 2^32 inputs on an Intel Xeon (Sapphire Rapids class) with
//   bench/micro/cpu_sqrt_exhaustive.cpp.
//
// In both, the special inputs other than +-0 are handed to vsSqrt itself (it works element by element), outside
// the kernels' loops. Calling vsSqrt for every block instead costs about 1.6 cycles per element on the AMD CPU,
// and far more on the Intel one once torch.set_num_threads has been called: the 8-bit Adam kernel over 16M
// parameters then took 29 ms on two threads against 15 ms without that call (measured, cause inside MKL not
// traced; bench/NOTES.md).
//
// The choice is only valid while pq_cpu_sqrt really is that kernel (MKL also picks by VML mode). So
// blockwise.cpp checks each emulation against pq_cpu_sqrt, bit for bit, on a probe before first use with each
// routine (every rsqrtps table entry at several exponents of each parity, random values over the whole range
// and the special values), and otherwise calls the routine once per block.
#pragma once
#include <stdint.h>

#include "isa.h"

namespace PQ_NS {

enum SqrtMode : int { kSqrtIeee = 0, kSqrtMklSse = 1, kSqrtCall = 2, kSqrtMklAvx512 = 3 };

// kSqrtMklSse's special(x).
constexpr int32_t kCpuSqrtBias = 0x7F800000;
constexpr int32_t kCpuSqrtLimit = (int32_t)0xFEFFF000;

// kSqrtMklAvx512's scaled residual: where rsqrt14(x) exceeds kTinyRoot the residual is taken on x*kTinyScale2,
// s*kTinyScale and h/kTinyScale2.
constexpr float kTinyRoot = 0x1p39f, kTinyScale = 0x1p39f, kTinyScale2 = 0x1p78f, kTinyUnscale2 = 0x1p-78f;

}  // namespace PQ_NS
