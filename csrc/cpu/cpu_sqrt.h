// The square root of Adam's denominator on the CPU, and how the SIMD kernels reproduce it.
//
// The contract's sqrt is torch's CPU sqrt (blockwise.h, capi.h: pq_cpu_sqrt). With torch 2.14.1 that is
// MKL's vsSqrt, and on this AMD CPU MKL runs its generic SSE kernel (mkl_vml_kernel_sSqrt_EXHAynn):
//   special(x) = (int32)(bits(x) + 0x7F800000) > (int32)0xFEFFF000
//                (true for +-0, subnormals, x > 0x7F7FF000, inf, NaN and negatives)
//   otherwise:  r = rsqrtps(x); s0 = x*r; h0 = r*0.5; e = 0.5 - s0*h0;
//               s1 = s0*e + s0; h1 = h0*e + h0; result = (x - s1*s1)*h1 + s1
//   (float32, each product and sum rounded separately; up to 1 ulp from IEEE for ~1 value in 6), and
//   special inputs go to a scalar routine lane by lane (+-0 return themselves).
// Calling vsSqrt costs about 1.6 cycles per element (a quarter of the whole step on 2 cores); the
// kernels instead evaluate the sequence above with the same rsqrtps instruction (the VEX form: AVX-512 has
// no 512-bit rsqrtps, and its rsqrt14 is a different approximation) and hand only the rare special lanes
// other than +-0 to vsSqrt itself, which works element by element.
//
// That is only valid while pq_cpu_sqrt really is this kernel: MKL picks kernels by CPU (an Intel CPU gets
// another one) and by VML mode. So blockwise.cpp checks the emulation against pq_cpu_sqrt, bit for bit, on a
// probe before first use with each routine (every rsqrtps table entry at two exponents of each parity,
// random values over the whole range and the special values), and otherwise calls the routine once per
// block. On the development machine the emulation was also checked against vsSqrt on all 2^32 inputs.
#pragma once
#include <stdint.h>

#include "isa.h"

namespace PQ_NS {

enum SqrtMode : int { kSqrtIeee = 0, kSqrtEmulated = 1, kSqrtCall = 2 };

constexpr int32_t kCpuSqrtBias = 0x7F800000;
constexpr int32_t kCpuSqrtLimit = (int32_t)0xFEFFF000;

}  // namespace PQ_NS
