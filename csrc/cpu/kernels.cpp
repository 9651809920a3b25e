// CPU kernels: OpenMP drivers over blocks around the per-element math of pyquant/blockwise.h.
// This file is compiled once per instruction set (PQ_ISA = scalar, avx2, avx512, see CMakeLists.txt)
// into its own namespace; capi.cpp picks one at run time. Work is split statically over blocks and no
// floating-point reduction crosses a block, so results are the same for any number of threads.
#include <omp.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "pyquant/blockwise.h"
#include "pyquant/capi.h"

#define PQ_CAT2(a, b) a##b
#define PQ_CAT(a, b) PQ_CAT2(a, b)
#define PQ_NS PQ_CAT(pq_, PQ_ISA)

namespace PQ_NS {
using namespace pq;

// Quantise `len` float32 values of one block with its absmax (already computed).
static inline void quantize_block(const float* x, int64_t len, float absmax, const uint8_t* table, uint8_t* q) {
  if (absmax == 0.0f) {
    memset(q, 0, (size_t)len);
    return;
  }
  const float inv = block_inverse(absmax);
  for (int64_t i = 0; i < len; ++i) q[i] = table[grid_bin(x[i], inv)];
}

static inline float block_absmax(const float* x, int64_t len) {
  float amax = 0.0f;
  for (int64_t i = 0; i < len; ++i) amax = absmax_update(amax, x[i]);
  return amax;
}

void quantize_blockwise(const void* x, int32_t dtype, int64_t n, int64_t blocksize, const uint8_t* table,
                        uint8_t* q, float* absmax) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel
  {
    std::vector<float> buf(dtype == kFloat32 ? 0 : (size_t)blocksize);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float* xb;
      if (dtype == kFloat32) {
        xb = (const float*)x + start;
      } else {
        for (int64_t i = 0; i < len; ++i) buf[i] = load_as_float(x, start + i, dtype);
        xb = buf.data();
      }
      const float amax = block_absmax(xb, len);
      absmax[b] = amax;
      quantize_block(xb, len, amax, table, q + start);
    }
  }
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                          int64_t blocksize, void* out, int32_t dtype) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const float a = absmax[b];
    if (dtype == kFloat32) {
      float* o = (float*)out + start;
      for (int64_t i = 0; i < len; ++i) o[i] = code[q[start + i]] * a;
    } else {
      for (int64_t i = 0; i < len; ++i) store_from_float(out, start + i, dtype, code[q[start + i]] * a);
    }
  }
}

// sqrt(v) for a block, as torch computes it on this CPU (see pq_cpu_sqrt in capi.h).
static inline void block_sqrt(const float* v, float* out, int64_t len) {
  if (pq_cpu_sqrt != nullptr) {
    const int32_t n = (int32_t)len;
    pq_cpu_sqrt(&n, v, out);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = sqrtf(v[i]);
  }
}

// One block of a tensor with 8-bit states: dequantise and update the moments, update the parameters,
// find the new absmax, requantise. Everything stays in these stack arrays: no full-size temporaries.
static inline int64_t adam_block_8bit(const pq_adam_tensor& t, int64_t start, int64_t len, const float* code1,
                                      const float* code2, const uint8_t* table1, const uint8_t* table2,
                                      int32_t nonfinite) {
  float m[kOptimizerBlock], v[kOptimizerBlock], root[kOptimizerBlock];
  bool skip[kOptimizerBlock];
  uint8_t* q1 = (uint8_t*)t.state1 + start;
  uint8_t* q2 = (uint8_t*)t.state2 + start;
  const int64_t b = start / kOptimizerBlock;
  const float a1 = t.absmax1[b], a2 = t.absmax2[b];
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float g = load_as_float(t.grad, start + i, t.grad_dtype);
    float mi = code1[q1[i]] * a1;
    float vi = code2[q2[i]] * a2;
    skip[i] = nonfinite == kSkipElement && !is_finite(g);  // such an element keeps its parameter and moments
    bad += skip[i];
    if (!skip[i]) adam_moments(g, mi, vi, t.k);
    m[i] = mi;
    v[i] = vi;
  }
  block_sqrt(v, root, len);
  for (int64_t i = 0; i < len; ++i) {
    if (skip[i]) continue;
    const float p = load_as_float(t.param, start + i, t.param_dtype);
    store_from_float(t.param, start + i, t.param_dtype, adam_param_8bit_given_sqrt(p, m[i], root[i], t.k));
  }
  const float new_a1 = block_absmax(m, len), new_a2 = block_absmax(v, len);
  t.absmax1[b] = new_a1;
  t.absmax2[b] = new_a2;
  quantize_block(m, len, new_a1, table1, q1);
  quantize_block(v, len, new_a2, table2, q2);
  return bad;
}

static inline int64_t adam_block_32bit(const pq_adam_tensor& t, int64_t start, int64_t len, int32_t nonfinite) {
  float* m = (float*)t.state1 + start;
  float* v = (float*)t.state2 + start;
  float root[kOptimizerBlock];
  bool skip[kOptimizerBlock];
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float g = load_as_float(t.grad, start + i, t.grad_dtype);
    skip[i] = nonfinite == kSkipElement && !is_finite(g);
    bad += skip[i];
    if (!skip[i]) adam_moments(g, m[i], v[i], t.k);
  }
  block_sqrt(v, root, len);
  for (int64_t i = 0; i < len; ++i) {
    if (skip[i]) continue;
    const float p = load_as_float(t.param, start + i, t.param_dtype);
    store_from_float(t.param, start + i, t.param_dtype, adam_param_32bit_given_sqrt(p, m[i], root[i], t.k));
  }
  return bad;
}

// One call for a whole parameter group: the blocks of all tensors form one index space split
// statically over the threads. Returns the number of non-finite gradient elements seen.
int64_t adam_step(const pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                  const uint8_t* table1, const uint8_t* table2, int32_t nonfinite) {
  std::vector<int64_t> first_block(count + 1, 0);
  for (int32_t i = 0; i < count; ++i)
    first_block[i + 1] = first_block[i] + (tensors[i].numel + kOptimizerBlock - 1) / kOptimizerBlock;
  const int64_t total = first_block[count];
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (int64_t gb = 0; gb < total; ++gb) {
    const int32_t ti = (int32_t)(std::upper_bound(first_block.begin(), first_block.end(), gb) - first_block.begin()) - 1;
    const pq_adam_tensor& t = tensors[ti];
    const int64_t start = (gb - first_block[ti]) * kOptimizerBlock;
    const int64_t len = std::min<int64_t>(kOptimizerBlock, t.numel - start);
    if (t.state_bits == 8)
      bad += adam_block_8bit(t, start, len, code1, code2, table1, table2, nonfinite);
    else
      bad += adam_block_32bit(t, start, len, nonfinite);
  }
  return bad;
}

}  // namespace PQ_NS
