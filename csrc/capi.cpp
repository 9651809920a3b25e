// The C ABI that Python loads with ctypes. Picks the widest instruction set the CPU supports, once.
#include "pyquant/capi.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <omp.h>

#include "pyquant/blockwise.h"
#include "pyquant/dispatch.h"

#define PQ_DECLARE_ISA(ns)                                                                                   \
  namespace ns {                                                                                             \
  void quantize_blockwise(const void*, int32_t, int64_t, int64_t, const uint8_t*, uint8_t*, float*);         \
  void dequantize_blockwise(const uint8_t*, const float*, const float*, int64_t, int64_t, void*, int32_t);   \
  int64_t adam_step(const pq_adam_tensor*, int32_t, const float*, const float*, const uint8_t*,             \
                    const uint8_t*, int32_t);                                                               \
  int64_t one_state_step(const pq_one_state_tensor*, int32_t, const float*, const uint8_t*, int32_t, int32_t); \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_ISA)
#define PQ_DECLARE_ADEMAMIX(ns)                                                                            \
  namespace ns {                                                                                           \
  int64_t ademamix_step(const pq_ademamix_tensor*, int32_t, const float*, const float*, const uint8_t*,   \
                        const uint8_t*, int32_t);                                                         \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_ADEMAMIX)
#define PQ_DECLARE_ADAM4BIT(ns) \
  namespace ns {                \
  int64_t adam4bit_step(const pq_adam4bit_tensor*, int32_t, const float*, const float*, int32_t); \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_ADAM4BIT)
#define PQ_DECLARE_NORMS(ns)                                                                                \
  namespace ns {                                                                                          \
  void lamb_norms(const pq_adam_tensor*, int32_t, const float*, const float*, const uint8_t*, const uint8_t*, \
                  int32_t, double*);                                                                      \
  void lars_norms(const pq_one_state_tensor*, int32_t, int32_t, double*);                                 \
  }
PQ_FOR_EACH_ISA(PQ_DECLARE_NORMS)

namespace {
int32_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("popcnt"))
    return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni") ? PQ_ISA_AVX512VBMI
                                                                                         : PQ_ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return PQ_ISA_AVX2;
  return PQ_ISA_SCALAR;
}

int32_t g_isa = detect_isa();

int64_t default_streaming_bytes() {
  const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return llc > 0 ? (int64_t)llc : (int64_t)32 << 20;
}

int64_t g_streaming_bytes = default_streaming_bytes();
}  // namespace

extern "C" {

pq_vsqrt_fn pq_cpu_sqrt = nullptr;

void pq_set_cpu_sqrt(pq_vsqrt_fn fn) { pq_cpu_sqrt = fn; }

int32_t pq_isa(void) { return g_isa; }

int64_t pq_streaming_bytes(void) { return g_streaming_bytes; }

int64_t pq_set_streaming_bytes(int64_t bytes) {
  const int64_t previous = g_streaming_bytes;
  g_streaming_bytes = bytes > 0 ? bytes : default_streaming_bytes();
  return previous;
}

int32_t pq_abi_version(void) { return PQ_ABI_VERSION; }

int32_t pq_write_field(void* records, int64_t count, int64_t record_bytes, int64_t offset, int64_t width,
                       const void* rows, int64_t row_count, const int32_t* row_of) {
  if (count < 0 || width <= 0 || offset < 0 || record_bytes < width || offset > record_bytes - width ||
      row_count < 0 || (count > 0 && (row_count < 1 || !records || !rows)) ||
      (!row_of && row_count != count && row_count != 1))
    return PQ_INVALID_ARGUMENT;
  if (row_of)
    for (int64_t i = 0; i < count; ++i)
      if (row_of[i] < 0 || row_of[i] >= row_count) return PQ_INVALID_ARGUMENT;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = row_of ? row_of[i] : row_count == 1 ? 0 : i;
    memcpy((char*)records + i * record_bytes + offset, (const char*)rows + row * width, (size_t)width);
  }
  return 0;
}

// Lets tests and benchmarks force a narrower path.
int32_t pq_set_isa(int32_t isa) {
  const int32_t previous = g_isa;
  const int32_t best = detect_isa();
  g_isa = isa < best ? isa : best;
  return previous;
}

// table[bin] = code index for each of the 65536 grid bins (docs/numerics.md, section 2, step 5).
void pq_build_code_table(const float* code, uint8_t* table) {
  float mids[255];
  for (int j = 0; j < 255; ++j) mids[j] = pq::code_midpoint(code, j);
  for (uint32_t bin = 0; bin < (uint32_t)pq::kGridPoints; ++bin) table[bin] = (uint8_t)pq::code_index_of_bin(bin, mids);
}

// The entry points below check the sizes, codes and pointers they are given and return
// PQ_INVALID_ARGUMENT (doing nothing) when one is invalid, so that no call writes outside what it was told
// exists; 0 on success.
static bool valid_blocks(int64_t n, int64_t blocksize) { return n >= 0 && blocksize > 0; }

int32_t pq_quantize_blockwise(const void* x, int32_t dtype, int64_t n, int64_t blocksize, const uint8_t* table,
                              uint8_t* q, float* absmax) {
  if (!valid_blocks(n, blocksize) || !pq::valid_dtype(dtype)) return PQ_INVALID_ARGUMENT;
  if (n == 0) return 0;
  if (!x || !table || !q || !absmax) return PQ_INVALID_ARGUMENT;
  PQ_DISPATCH_VOID(quantize_blockwise(x, dtype, n, blocksize, table, q, absmax))
  return 0;
}

int32_t pq_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                int64_t blocksize, void* out, int32_t dtype) {
  if (!valid_blocks(n, blocksize) || !pq::valid_dtype(dtype)) return PQ_INVALID_ARGUMENT;
  if (n == 0) return 0;
  if (!q || !absmax || !code || !out) return PQ_INVALID_ARGUMENT;
  PQ_DISPATCH_VOID(dequantize_blockwise(q, absmax, code, n, blocksize, out, dtype))
  return 0;
}

// The blocks of all tensors of a multi-tensor optimizer step (the kernels index them with one int64), or
// -PQ_INVALID_ARGUMENT for a bad count, tensor array, non-finite policy or tensor, or a total that overflows.
extern "C++" {  // inside this file's extern "C" block
template <class Tensor, class Valid>
static int64_t group_blocks(const Tensor* tensors, int32_t count, int32_t nonfinite, Valid valid) {
  if (count < 0 || (count > 0 && !tensors) || (nonfinite != pq::kSkipElement && nonfinite != pq::kPropagate))
    return -PQ_INVALID_ARGUMENT;
  int64_t blocks = 0;
  for (int32_t i = 0; i < count; ++i) {
    if (!valid(tensors[i])) return -PQ_INVALID_ARGUMENT;
    const int64_t b = pq::block_count(tensors[i].numel, pq::kOptimizerBlock);
    if (b > INT64_MAX - blocks) return -PQ_INVALID_ARGUMENT;
    blocks += b;
  }
  return blocks;
}
}

static bool valid_adam_tensor(const pq_adam_tensor& t) {
  if (t.numel < 0 || !pq::valid_dtype(t.param_dtype) || !pq::valid_dtype(t.grad_dtype)) return false;
  if (t.state_bits != 8 && t.state_bits != 32) return false;
  if (t.numel == 0) return true;
  return t.param && t.grad && t.state1 && t.state2 && (t.state_bits == 32 || (t.absmax1 && t.absmax2));
}

// Returns the number of non-finite gradient elements seen, or -PQ_INVALID_ARGUMENT.
int64_t pq_adam_step(const pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                     const uint8_t* table1, const uint8_t* table2, int32_t nonfinite) {
  const int64_t blocks = group_blocks(tensors, count, nonfinite, valid_adam_tensor);
  if (blocks <= 0) return blocks;
  if (!code1 || !code2 || !table1 || !table2) return -PQ_INVALID_ARGUMENT;
  PQ_DISPATCH(adam_step(tensors, count, code1, code2, table1, table2, nonfinite))
}

static bool valid_one_state_tensor(const pq_one_state_tensor& t) {
  if (t.numel < 0 || !pq::valid_dtype(t.param_dtype) || !pq::valid_dtype(t.grad_dtype)) return false;
  if (t.state_bits != 8 && t.state_bits != 32) return false;
  if (t.numel == 0) return true;
  return t.param && t.grad && t.state1 && (t.state_bits == 32 || t.absmax1);
}

// Returns the number of non-finite gradient elements seen, or -PQ_INVALID_ARGUMENT.
int64_t pq_one_state_step(const pq_one_state_tensor* tensors, int32_t count, const float* code1,
                          const uint8_t* table1, int32_t rule, int32_t nonfinite) {
  if (rule < PQ_RULE_MOMENTUM || rule > PQ_RULE_ADAGRAD) return -PQ_INVALID_ARGUMENT;
  const int64_t blocks = group_blocks(tensors, count, nonfinite, valid_one_state_tensor);
  if (blocks <= 0) return blocks;
  if (!code1 || !table1) return -PQ_INVALID_ARGUMENT;
  PQ_DISPATCH(one_state_step(tensors, count, code1, table1, rule, nonfinite))
}

static bool valid_ademamix_tensor(const pq_ademamix_tensor& t) {
  // numel <= INT64_MAX / 2: state1 holds 2 * numel values
  if (t.numel < 0 || t.numel > INT64_MAX / 2 || !pq::valid_dtype(t.param_dtype) || !pq::valid_dtype(t.grad_dtype))
    return false;
  if (t.state_bits != 8 && t.state_bits != 32) return false;
  if (t.numel == 0) return true;
  return t.param && t.grad && t.state1 && t.state2 && (t.state_bits == 32 || (t.absmax1 && t.absmax2));
}

// Returns the number of non-finite gradient elements seen, or -PQ_INVALID_ARGUMENT.
int64_t pq_ademamix_step(const pq_ademamix_tensor* tensors, int32_t count, const float* code1, const float* code2,
                         const uint8_t* table1, const uint8_t* table2, int32_t nonfinite) {
  const int64_t blocks = group_blocks(tensors, count, nonfinite, valid_ademamix_tensor);
  if (blocks <= 0) return blocks;
  if (!code1 || !code2 || !table1 || !table2) return -PQ_INVALID_ARGUMENT;
  PQ_DISPATCH(ademamix_step(tensors, count, code1, code2, table1, table2, nonfinite))
}

static bool valid_adam4bit_tensor(const pq_adam4bit_tensor& t) {
  if (t.numel < 0 || !pq::valid_dtype(t.param_dtype) || !pq::valid_dtype(t.grad_dtype)) return false;
  if ((t.state_bits != 4 && t.state_bits != 32) || (t.rank1 != 0 && t.rank1 != 1)) return false;
  if (t.rank1) {
    // the shape must describe numel elements: its product, computed without overflow. A dimension may be 0 (an
    // empty tensor, e.g. an FSDP2 rank's empty shard of a matrix): no element, its maxima are left as they are.
    if (t.state_bits != 4 || t.ndim < 2 || t.ndim > PQ_RANK1_MAX_DIMS) return false;
    int64_t product = 1, sum = 0;
    for (int d = 0; d < t.ndim; ++d) {
      const int64_t s = t.shape[d];
      if (s < 0 || (s > 0 && product > INT64_MAX / s) || sum > INT64_MAX - s) return false;
      product *= s;
      sum += s;
    }
    if (product != t.numel) return false;
  }
  if (t.numel == 0) return true;
  return t.param && t.grad && t.state1 && t.state2 && (t.state_bits == 32 || (t.absmax1 && t.absmax2));
}

// Returns the number of non-finite gradient elements seen, -PQ_INVALID_ARGUMENT, or -1 (out of memory).
int64_t pq_adam4bit_step(const pq_adam4bit_tensor* tensors, int32_t count, const float* code1, const float* code2,
                         int32_t nonfinite) {
  const int64_t blocks = group_blocks(tensors, count, nonfinite, valid_adam4bit_tensor);
  if (blocks <= 0) return blocks;
  if (!code1 || !code2) return -PQ_INVALID_ARGUMENT;
  // the kernels binary-search the midpoints of each 16-value map: it must be sorted (NaN fails the test too)
  for (int j = 0; j < 15; ++j)
    if (!(code1[j + 1] >= code1[j]) || !(code2[j + 1] >= code2[j])) return -PQ_INVALID_ARGUMENT;
  PQ_DISPATCH(adam4bit_step(tensors, count, code1, code2, nonfinite))
}

// The trust ratios' norm passes: 0 (sums written) or PQ_INVALID_ARGUMENT (nothing written).
int32_t pq_lamb_norms(const pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                      const uint8_t* table1, const uint8_t* table2, int32_t nonfinite, double* sums) {
  const int64_t blocks = group_blocks(tensors, count, nonfinite, valid_adam_tensor);
  if (blocks < 0) return (int32_t)-blocks;
  if (count > 0 && !sums) return PQ_INVALID_ARGUMENT;
  if (blocks > 0 && (!code1 || !code2 || !table1 || !table2)) return PQ_INVALID_ARGUMENT;
  PQ_DISPATCH_VOID(lamb_norms(tensors, count, code1, code2, table1, table2, nonfinite, sums))
  return 0;
}

static bool valid_lars_tensor(const pq_one_state_tensor& t) {
  if (t.numel < 0 || !pq::valid_dtype(t.param_dtype) || !pq::valid_dtype(t.grad_dtype)) return false;
  return t.numel == 0 || (t.param && t.grad);
}

int32_t pq_lars_norms(const pq_one_state_tensor* tensors, int32_t count, int32_t nonfinite, double* sums) {
  const int64_t blocks = group_blocks(tensors, count, nonfinite, valid_lars_tensor);
  if (blocks < 0) return (int32_t)-blocks;
  if (count > 0 && !sums) return PQ_INVALID_ARGUMENT;
  PQ_DISPATCH_VOID(lars_norms(tensors, count, nonfinite, sums))
  return 0;
}

}  // extern "C"
