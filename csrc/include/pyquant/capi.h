// The C ABI of pyquant's compiled libraries: raw pointers, sizes and scalars, nothing else. Every exported
// function of the CPU library (libpyquant_cpu: csrc/capi*.cpp) and of the CUDA library (libpyquant_cuda:
// csrc/cuda/*.cu) is declared here. Python loads them with ctypes (pyquant/backends/capi.py), and a test reads the
// enums below from this file to check Python's tables against them: keep them one `NAME = value,` a line.
#pragma once
#include <stdint.h>

// Bumped whenever an enum, a struct or a signature below changes, for either library: Python refuses a library
// built from other sources rather than passing it arguments it would misread.
#define PQ_ABI_VERSION 12

// What the validating entry points return when an argument is invalid (a negative size, a block size <= 0,
// an unknown dtype code, a missing pointer, a block count that does not fit in int64): they do nothing then.
// They cannot see how large the caller's buffers are; Python checks the tensors against the sizes first.
#define PQ_INVALID_ARGUMENT 2

// pq_matmul / pq_matmul_im2col `flags` bit: bfloat16 x bfloat16 products may use the AVX512-BF16 dot product.
#define PQ_MATMUL_BF16_DOT 1

#ifdef __cplusplus
extern "C" {
#endif

// The dtype codes of every `dtype` argument and field. The kernels store float32, float16 and bfloat16;
// float64 is taken by the unscale entry points only.
enum pq_dtype {
  PQ_DTYPE_FLOAT32 = 0,
  PQ_DTYPE_FLOAT16 = 1,
  PQ_DTYPE_BFLOAT16 = 2,
  PQ_DTYPE_FLOAT64 = 3,
};

// The instruction sets of the CPU library's kernels (pq_isa, pq_set_isa), narrowest first.
enum pq_isa_code {
  PQ_ISA_SCALAR = 0,
  PQ_ISA_AVX2 = 1,
  PQ_ISA_AVX512 = 2,
  PQ_ISA_AVX512VBMI = 3,  // AVX-512 with VBMI and GFNI
};

// The constants of one tensor's Adam step (docs/numerics.md, section 4), each rounded once to float32.
struct pq_adam_constants {
  float beta1, one_minus_beta1;  // f32(b1), f32(1 - b1)
  float beta2, one_minus_beta2;  // f32(b2), f32(1 - b2)
  float eps;                     // f32(eps)           (8-bit states)
  float eps_c2;                  // f32(eps * c2)      (float32 states)
  float c2;                      // f32(sqrt(1 - b2^t))
  float step_size;               // f32(-lr / c1) for 8-bit states, f32(-lr * c2 / c1) for float32 states
  float decay;                   // f32(1 - lr * wd); exactly 1 when wd == 0
  float inv_grad_scale;          // f32(1 / loss scale) when GradScaler's unscale is fused into the step, else 1
  float inv_c1;                  // f32(1 / c1)        (LAMB's norm pass only: pq_lamb_norms)
  float weight_decay;            // f32(wd)            (LAMB's norm pass only)
};

// One tensor of a multi-tensor Adam step. state_bits 8: state1/state2 are uint8 codes with float32
// absmax per block of 256; state_bits 32: state1/state2 are float32 and absmax1/absmax2 are unused.
struct pq_adam_tensor {  // every pointer covers `numel` elements (absmax: ceil(numel / 256))
  void* param;
  const void* grad;
  void* state1;
  void* state2;
  float* absmax1;
  float* absmax2;
  int64_t numel;
  int32_t param_dtype, grad_dtype;  // enum pq_dtype (not float64)
  int32_t state_bits, reserved;     // 8 or 32; 0
  struct pq_adam_constants k;  // per tensor: the step count (hence c1, c2) can differ inside a group
};

// The update rules of pq_one_state_step (pyquant._contract.ONE_STATE_RULES: bitsandbytes' optimizer names).
enum pq_one_state_rule {
  PQ_RULE_MOMENTUM = 0,
  PQ_RULE_LION = 1,
  PQ_RULE_RMSPROP = 2,
  PQ_RULE_ADAGRAD = 3,
};

// The constants of one tensor's one-state step (docs/numerics.md, section 5), each rounded once to float32.
struct pq_one_state_constants {
  float beta1, one_minus_beta1;  // f32(b1), f32(1 - b1) (RMSprop: alpha; SGD: momentum)
  float beta2, one_minus_beta2;  // f32(b2), f32(1 - b2) (Lion)
  float eps;                     // f32(eps) (RMSprop, Adagrad)
  float neg_lr;                  // f32(-lr)
  float decay;                   // f32(1 - lr * wd) when wd > 0, else 1 (Lion)
  float weight_decay;            // f32(wd) (SGD, RMSprop, Adagrad: g = fma(wd, p, g) when grad_decay != 0)
  float grad_decay;              // 1 or 0
  float first_step;              // 1 on the first step (SGD copies the gradient into the momentum), else 0
  float inv_grad_scale;          // as in pq_adam_constants
  float trust_ratio;             // momentum: the decayed gradient is multiplied by it (LARS' ratio; 1 for SGD)
};

// One tensor of a multi-tensor one-state step; state_bits 8: uint8 codes with float32 absmax per block of 256.
struct pq_one_state_tensor {  // every pointer covers `numel` elements (absmax: ceil(numel / 256))
  void* param;
  const void* grad;
  void* state1;
  float* absmax1;
  int64_t numel;
  int32_t param_dtype, grad_dtype;  // enum pq_dtype (not float64)
  int32_t state_bits, reserved;     // 8 or 32; 0
  struct pq_one_state_constants k;
};

// The constants of one tensor's AdEMAMix step (docs/numerics.md, "AdEMAMix"), each rounded once to float32; alpha
// and beta3 are the schedulers' values at this step.
struct pq_ademamix_constants {
  float beta1, one_minus_beta1;  // f32(b1), f32(1 - b1)       (fast EMA m1)
  float beta2, one_minus_beta2;  // f32(b2), f32(1 - b2)       (second moment nu)
  float beta3, one_minus_beta3;  // f32(b3), f32(1 - b3)       (slow EMA m2)
  float alpha;                   // f32(alpha)
  float eps;                     // f32(eps)
  float c1, c2;                  // f32(1 - b1^t), f32(sqrt(1 - b2^t))
  float neg_lr;                  // f32(-lr)
  float decay;                   // f32(1 - lr * wd) when wd > 0, else 1
  float inv_grad_scale;          // as in pq_adam_constants
};

// One tensor of a multi-tensor AdEMAMix step. state1 holds m1 then m2 (2 * numel values: uint8 codes of the
// signed map, or float32), absmax1 their block scales (2 * ceil(numel / 256): m1's, then m2's); state2 and
// absmax2 hold nu (unsigned map) as Adam's state2. absmax1/absmax2 are unused for state_bits 32.
struct pq_ademamix_tensor {
  void* param;
  const void* grad;
  void* state1;
  void* state2;
  float* absmax1;
  float* absmax2;
  int64_t numel;
  int32_t param_dtype, grad_dtype;  // enum pq_dtype (not float64)
  int32_t state_bits, reserved;     // 8 or 32; 0
  struct pq_ademamix_constants k;
};

// Rank-1 second moments (pq_adam4bit_tensor.rank1) are kept for tensors of 2 to this many dimensions.
#define PQ_RANK1_MAX_DIMS 8

// One tensor of a multi-tensor Adam step with 4-bit states (docs/numerics.md, "4-bit states"). state_bits 4:
// state1/state2 hold two codes a byte (ceil(numel / 2) bytes), absmax1 m's scales (ceil(numel / 128)), absmax2 v's:
// with rank1 = 1 the maxima of v over every dimension's slices (shape[0] + ... + shape[ndim - 1] floats, dimension 0
// first), else one per block of 128. state_bits 32: float32 m and v, absmax1/absmax2 unused. `k` is Adam's
// (step_size f32(-lr / c1) for 4-bit states, f32(-lr * c2 / c1) for float32 ones).
struct pq_adam4bit_tensor {
  void* param;
  const void* grad;
  void* state1;
  void* state2;
  float* absmax1;
  float* absmax2;
  int64_t numel;
  int32_t param_dtype, grad_dtype;  // enum pq_dtype (not float64)
  int32_t state_bits, rank1;        // 4 or 32; 1: rank-1 scales of v (state_bits 4, 2 <= ndim <= 8), else 0
  int32_t ndim, reserved;           // the shape's dimensions (rank1 only); 0
  int64_t shape[PQ_RANK1_MAX_DIMS];  // the parameter's shape (rank1 only; its product is numel)
  struct pq_adam_constants k;
};

// The CPU library's square root of a block of second moments: torch's CPU sqrt, which is not always IEEE
// sqrtf (torch 2.14.1 computes it with MKL's vsSqrt, up to 1 ulp away). NULL means IEEE sqrtf. The
// signature is MKL's Fortran-style vsSqrt(n, in, out); pyquant.backends.capi installs it after checking that it
// reproduces torch.sqrt bit for bit.
typedef void (*pq_vsqrt_fn)(const int32_t* n, const float* in, float* out);

// ---- both libraries ----

// PQ_ABI_VERSION of the sources the library was built from.
int32_t pq_abi_version(void);

// ---- the CPU library (csrc/capi.cpp, csrc/capi_gemm.cpp, csrc/capi_lowrank.cpp, csrc/capi_amp.cpp) ----

// The installed square root (see pq_vsqrt_fn); set with pq_set_cpu_sqrt.
extern pq_vsqrt_fn pq_cpu_sqrt;

// Installs the square root of Adam's denominator (NULL: IEEE sqrtf).
void pq_set_cpu_sqrt(pq_vsqrt_fn fn);

// The instruction set the kernels run with (enum pq_isa): the widest the CPU has unless pq_set_isa narrowed it.
int32_t pq_isa(void);

// Runs the kernels with min(isa, the widest the CPU has) (tests and benchmarks); returns the previous choice.
int32_t pq_set_isa(int32_t isa);

// Dequantised outputs of at least this many bytes are written with non-temporal stores: by default the last-level
// cache's size as the OS reports it (32 MiB where it reports none): an output that fits there is written faster
// with plain stores. pq_set_streaming_bytes sets it (tests and benchmarks; <= 0 restores the default) and returns
// the previous value.
int64_t pq_streaming_bytes(void);
int64_t pq_set_streaming_bytes(int64_t bytes);

// table[bin] = code index of each of the 65536 grid bins for a sorted 256-entry code (docs/numerics.md, 2).
void pq_build_code_table(const float* code, uint8_t* table);

// q, absmax = block-wise 8-bit codes of n values of x (dtype) with one absmax per block; 0 or PQ_INVALID_ARGUMENT.
int32_t pq_quantize_blockwise(const void* x, int32_t dtype, int64_t n, int64_t blocksize, const uint8_t* table,
                              uint8_t* q, float* absmax);

// out (dtype) = code[q] * absmax[block] for n codes; 0 or PQ_INVALID_ARGUMENT.
int32_t pq_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                int64_t blocksize, void* out, int32_t dtype);

// Writes one field of `count` records (`record_bytes` apart; the field `width` bytes wide, `offset` bytes into
// each): record i gets row row_of[i] of `rows` (rows `width` bytes apart). Without row_of, record i gets row i
// (row_count == count) or every record row 0 (row_count == 1). Python fills the step descriptors' gradient
// pointers, dtypes and constants with it, one call each instead of torch operations on views of the array.
// 0, or PQ_INVALID_ARGUMENT (nothing written) for a field outside the record, a missing pointer or a row index
// outside [0, row_count).
int32_t pq_write_field(void* records, int64_t count, int64_t record_bytes, int64_t offset, int64_t width,
                       const void* rows, int64_t row_count, const int32_t* row_of);

// One Adam step of `count` tensors (one call per parameter group); nonfinite 0 skips non-finite gradient
// elements, 1 propagates them. Returns the number of non-finite gradient elements seen, or -PQ_INVALID_ARGUMENT.
int64_t pq_adam_step(const struct pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                     const uint8_t* table1, const uint8_t* table2, int32_t nonfinite);

// One step of rule `rule` (enum pq_one_state_rule) over `count` tensors; nonfinite as for pq_adam_step.
// Returns the number of non-finite gradient elements seen, or -PQ_INVALID_ARGUMENT.
int64_t pq_one_state_step(const struct pq_one_state_tensor* tensors, int32_t count, const float* code1,
                          const uint8_t* table1, int32_t rule, int32_t nonfinite);

// One AdEMAMix step of `count` tensors (code1: m1 and m2's map, code2: nu's); nonfinite as for pq_adam_step.
// Returns the number of non-finite gradient elements seen, or -PQ_INVALID_ARGUMENT.
int64_t pq_ademamix_step(const struct pq_ademamix_tensor* tensors, int32_t count, const float* code1,
                         const float* code2, const uint8_t* table1, const uint8_t* table2, int32_t nonfinite);

// One Adam step with 4-bit states over `count` tensors (code1: m's 16 codes, the signed map; code2: v's, the
// linear map without zero); nonfinite as for pq_adam_step. Returns the number of non-finite gradient elements
// seen, -PQ_INVALID_ARGUMENT, or -1 when its buffers (rank-1 maxima) cannot be allocated.
int64_t pq_adam4bit_step(const struct pq_adam4bit_tensor* tensors, int32_t count, const float* code1,
                         const float* code2, int32_t nonfinite);
// The sums of squares of LAMB's trust ratio (docs/numerics.md, "LAMB and LARS") for `count` tensors, described as
// for pq_adam_step (k: the step's constants with inv_c1 and weight_decay): sums[2i] = sum of p^2, sums[2i + 1] = sum
// of r^2 over tensor i, r = m/c1 / (sqrt(v)/c2 + eps) + wd*p from the updated moments (0 for a skipped element).
// Nothing is written but `sums`. Each block's squares are summed pairwise in double, then the blocks' sums
// pairwise, so the sums do not depend on the thread count. Returns 0 or PQ_INVALID_ARGUMENT.
int32_t pq_lamb_norms(const struct pq_adam_tensor* tensors, int32_t count, const float* code1, const float* code2,
                      const uint8_t* table1, const uint8_t* table2, int32_t nonfinite, double* sums);

// pq_lamb_norms for LARS: sums[2i + 1] = sum of d^2, d = g + wd*p as the momentum rule forms it (its grad_decay).
// Reads the parameters and gradients only (state1 and absmax1 may be NULL).
int32_t pq_lars_norms(const struct pq_one_state_tensor* tensors, int32_t count, int32_t nonfinite, double* sums);

// C[batch] = A[batch] @ B[batch] (+ bias) with float32 accumulation and one rounding to C's dtype (capi_gemm.cpp).
void pq_matmul(int32_t nb, const int64_t* batch_shape, const void* a, int32_t a_dtype, const int64_t* a_strides,
               const void* b, int32_t b_dtype, const int64_t* b_strides, const void* bias, int32_t bias_dtype,
               int64_t bias_stride, int32_t bias_rows, void* c, int32_t c_dtype, const int64_t* c_strides,
               int64_t m, int64_t n, int64_t k, int32_t threads, int32_t flags);

// pq_matmul with one operand the im2col matrix of a channels-last convolution input, gathered while packing.
void pq_matmul_im2col(const void* x, int32_t x_dtype, const int64_t* x_shape, const int64_t* x_strides,
                      const int64_t* geometry, int32_t cols_side, const void* other, int32_t other_dtype,
                      const int64_t* other_strides, int64_t other_dim, const void* bias, int32_t bias_dtype,
                      int64_t bias_stride, int32_t bias_rows, void* c, int32_t c_dtype, const int64_t* c_strides,
                      int32_t threads, int32_t flags);

// 1 (default): bfloat16 low-rank convolutions use the AVX512_BF16 pair kernel where the CPU has it; 0: float32.
extern int32_t pq_lowrank_bf16_dot;

// Sets pq_lowrank_bf16_dot (on != 0); returns the previous setting.
int32_t pq_lowrank_set_bf16_dot(int32_t on);

// y = W2 . conv(x, W1) + bias, the fused low-rank convolution (capi_lowrank.cpp); 0, 1 out of memory, 2 invalid.
int32_t pq_lowrank_conv2d(const void* x, const void* w1, const void* w2, const void* bias, void* y, void* t,
                          int32_t dtype, const int64_t* dims, int32_t threads, float* packed, int32_t packed_valid);

// The size in floats of pq_lowrank_conv2d's `packed` buffer for these dims and dtype (-1: invalid dims).
int64_t pq_lowrank_packed_floats(int32_t dtype, const int64_t* dims);

// gw (float32) = the weight gradient of y = conv(x, W) for y's gradient g; returns as pq_lowrank_conv2d.
int32_t pq_lowrank_conv2d_wgrad(const void* x, const void* g, float* gw, int32_t dtype, const int64_t* dims,
                                int32_t threads);

// GradScaler's unscale_ of `count` gradients on the CPU (capi_amp.cpp); 0 or PQ_INVALID_ARGUMENT.
int32_t pq_unscale_(int32_t count, void* const* grads, const int64_t* numels, const int32_t* dtypes, float* found_inf,
                    const float* inv_scale, int32_t threads, int32_t vector);

// ---- the CUDA library (csrc/cuda): device pointers, `stream` a cudaStream_t; each returns a cudaError_t ----

// pq_quantize_blockwise on the device.
int32_t pq_cuda_quantize_blockwise(const void* x, int32_t dtype, int64_t n, int64_t blocksize, const uint8_t* table,
                                   uint8_t* q, float* absmax, void* stream);

// pq_dequantize_blockwise on the device.
int32_t pq_cuda_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                     int64_t blocksize, void* out, int32_t dtype, void* stream);

// pq_adam_step on the device, the descriptors and their first global blocks in device memory; adds the
// number of non-finite gradient elements to *device_bad_count.
int32_t pq_cuda_adam_step(const struct pq_adam_tensor* device_descriptors, const int64_t* device_first_block,
                          int32_t count, int64_t total_blocks, const float* code1, const float* code2,
                          const uint8_t* table1, const uint8_t* table2, int32_t nonfinite, int64_t* device_bad_count,
                          void* stream);

// pq_one_state_step on the device, with the conventions of pq_cuda_adam_step (descriptors and first global blocks
// in device memory; adds the number of non-finite gradient elements to *device_bad_count).
int32_t pq_cuda_one_state_step(const struct pq_one_state_tensor* device_descriptors, const int64_t* device_first_block,
                               int32_t count, int64_t total_blocks, const float* code1, const uint8_t* table1,
                               int32_t rule, int32_t nonfinite, int64_t* device_bad_count, void* stream);

// pq_ademamix_step on the device, with the conventions of pq_cuda_adam_step.
int32_t pq_cuda_ademamix_step(const struct pq_ademamix_tensor* device_descriptors, const int64_t* device_first_block,
                              int32_t count, int64_t total_blocks, const float* code1, const float* code2,
                              const uint8_t* table1, const uint8_t* table2, int32_t nonfinite,
                              int64_t* device_bad_count, void* stream);

// pq_adam4bit_step on the device, in two launches as the CPU driver's two passes, with the conventions of
// pq_cuda_adam_step but blocks of 128 elements: pass 1 folds the new v of the rank-1 tensors into new_maxima (tensor
// i's at device_maxima_offset[i], zeroed by the caller; atomic max, order-independent), pass 2 steps every tensor
// with them; the caller then copies each rank-1 tensor's new maxima into its absmax2.
int32_t pq_cuda_adam4bit_step(const struct pq_adam4bit_tensor* device_descriptors, const int64_t* device_first_block,
                              int32_t count, int64_t total_blocks, const float* code1, const float* code2,
                              float* new_maxima, const int64_t* device_maxima_offset, int32_t pass, int32_t nonfinite,
                              int64_t* device_bad_count, void* stream);
// pq_lamb_norms on the device, with the conventions of pq_cuda_adam_step, writing per global block (not per tensor)
// the two sums into device_block_sums (2 * total_blocks doubles); the caller sums each tensor's blocks.
int32_t pq_cuda_lamb_norms(const struct pq_adam_tensor* device_descriptors, const int64_t* device_first_block,
                           int32_t count, int64_t total_blocks, const float* code1, const float* code2,
                           int32_t nonfinite, double* device_block_sums, void* stream);

// pq_lars_norms on the device, as pq_cuda_lamb_norms (the descriptors' states are not read).
int32_t pq_cuda_lars_norms(const struct pq_one_state_tensor* device_descriptors, const int64_t* device_first_block,
                           int32_t count, int64_t total_blocks, int32_t nonfinite, double* device_block_sums,
                           void* stream);

// pq_unscale_ on the device, the gradients described by 4 x count int64 values in device memory.
int32_t pq_cuda_unscale_(const int64_t* device_meta, int32_t count, int64_t total_chunks, float* found_inf,
                         const float* inv_scale, void* stream);

// cudaGetErrorString of an error code returned above.
const char* pq_cuda_error_string(int32_t error);

#ifdef __cplusplus
}  // extern "C"
#endif
