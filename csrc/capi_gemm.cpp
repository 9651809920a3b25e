// C ABI of the half-precision matrix multiply (csrc/cpu/gemm.cpp), bound in pyquant/backends/capi.py.
#include "pyquant/capi.h"

#include <stdint.h>

#include "pyquant/dispatch.h"

#define PQ_DECLARE_GEMM(ns)                                                                                    \
  namespace ns {                                                                                               \
  void matmul(int32_t, const int64_t*, const void*, int32_t, const int64_t*, const void*, int32_t,             \
              const int64_t*, const void*, int32_t, int64_t, int32_t, void*, int32_t, const int64_t*, int64_t, \
              int64_t, int64_t, int32_t, int32_t);                                                             \
  void matmul_im2col(const void*, int32_t, const int64_t*, const int64_t*, const int64_t*, int32_t, const void*,  \
                     int32_t, const int64_t*, int64_t, const void*, int32_t, int64_t, int32_t, void*, int32_t,    \
                     const int64_t*, int32_t, int32_t);                                                        \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_GEMM)

extern "C" {

// C[batch] = A[batch] @ B[batch] (+ bias): float32 accumulation, one rounding to C's dtype.
// Dtypes are enum pq_dtype codes (float32, float16, bfloat16) for every operand. `nb` batch dimensions
// of sizes batch_shape; a_strides, b_strides, c_strides hold nb batch strides then the row and column
// strides, in elements (0 broadcasts). A is M x K, B is K x N, C is M x N. bias (nullable) is added to
// the accumulators before the products: N values (bias_rows 0, one per column) or M values (bias_rows 1,
// one per row) at stride bias_stride. C must not overlap A, B or bias. threads <= 0: OpenMP's default (the bits do
// not depend on it). flags PQ_MATMUL_BF16_DOT: bfloat16 x bfloat16 products may use the AVX512-BF16
// dot product on CPUs that have it (pairs of k per instruction, subnormals flushed; docs/low_precision.md);
// without it every product is the sequential float32 fma chain.
void pq_matmul(int32_t nb, const int64_t* batch_shape, const void* a, int32_t a_dtype, const int64_t* a_strides,
               const void* b, int32_t b_dtype, const int64_t* b_strides, const void* bias, int32_t bias_dtype,
               int64_t bias_stride, int32_t bias_rows, void* c, int32_t c_dtype, const int64_t* c_strides,
               int64_t m, int64_t n, int64_t k, int32_t threads, int32_t flags) {
  PQ_DISPATCH(matmul(nb, batch_shape, a, a_dtype, a_strides, b, b_dtype, b_strides, bias, bias_dtype, bias_stride,
                     bias_rows, c, c_dtype, c_strides, m, n, k, threads, flags))
}

// The same product with one operand the im2col matrix of a convolution input, gathered while packing instead of
// copied (an implicit im2col): columns[(n, oy, ox), (ky, kx, c)] = x[n, oy*sh + ky*dh - ph, ox*sw + kx*dw - pw, c],
// 0 outside x, for a channels-last x of shape x_shape = (N, H, W, C) with element strides x_strides = (n, y, x)
// (channels contiguous) and geometry = (kh, kw, sh, sw, ph, pw, dh, dw). cols_side 0: C = columns @ other (+ bias),
// other is K x N with K = kh*kw*C and N = other_dim; cols_side 1: C = other @ columns, other is M x K with
// M = other_dim and K = N*Ho*Wo. other_strides and c_strides: row, column strides in elements; bias, threads
// and flags as pq_matmul. The bits are pq_matmul's on the explicit columns.
void pq_matmul_im2col(const void* x, int32_t x_dtype, const int64_t* x_shape, const int64_t* x_strides,
                      const int64_t* geometry, int32_t cols_side, const void* other, int32_t other_dtype,
                      const int64_t* other_strides, int64_t other_dim, const void* bias, int32_t bias_dtype,
                      int64_t bias_stride, int32_t bias_rows, void* c, int32_t c_dtype, const int64_t* c_strides,
                      int32_t threads, int32_t flags) {
  PQ_DISPATCH(matmul_im2col(x, x_dtype, x_shape, x_strides, geometry, cols_side, other, other_dtype, other_strides,
                            other_dim, bias, bias_dtype, bias_stride, bias_rows, c, c_dtype, c_strides, threads,
                            flags))
}

}  // extern "C"
