// Checks the avx512 build's emulations of torch's CPU sqrt (csrc/cpu/cpu_sqrt.h) against MKL's vsSqrt from torch's
// libtorch_cpu.so on every non-negative float32 bit pattern (2^31, NaNs and +inf included) and the first 2^20
// negative ones, through the library's own sqrt_block, which hands the rare inputs to vsSqrt as the kernels do
// (every negative input but -0 is one of them, so the rest of the negative half tests only vsSqrt against itself,
// at a call per 16 values). Prints the mismatches per mode (0 for the kernel MKL runs on this CPU). Not part of
// the library or the tests; build and run (a few minutes on one core):
//   g++ -O2 -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -DPQ_ISA=avx512 -Icsrc/include \
//       -Icsrc/cpu -o /tmp/cpu_sqrt_exhaustive bench/micro/cpu_sqrt_exhaustive.cpp -ldl
//   /tmp/cpu_sqrt_exhaustive .venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so
#include <dlfcn.h>

#include <cstdio>
#include <vector>

#include "blockwise_avx512.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s PATH/libtorch_cpu.so\n", argv[0]);
    return 2;
  }
  void* torch = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  const auto vs_sqrt = torch ? (pq_vsqrt_fn)dlsym(torch, "VSSQRT_") : nullptr;
  if (!vs_sqrt) {
    fprintf(stderr, "no VSSQRT_ in %s: %s\n", argv[1], dlerror());
    return 2;
  }
  constexpr int64_t kChunk = 1 << 20;
  std::vector<uint32_t> x(kChunk);
  std::vector<float> expected(kChunk), got(kChunk);
  const int32_t n = (int32_t)kChunk;
  const int modes[2] = {pq_avx512::kSqrtMklSse, pq_avx512::kSqrtMklAvx512};
  const char* names[2] = {"kSqrtMklSse", "kSqrtMklAvx512"};
  uint64_t mismatches[2] = {0, 0};
  uint32_t first[2] = {0, 0};
  for (uint64_t base = 0; base <= (1ull << 31); base += kChunk) {
    for (int64_t i = 0; i < kChunk; ++i) x[i] = (uint32_t)(base + i);
    vs_sqrt(&n, (const float*)x.data(), expected.data());
    for (int m = 0; m < 2; ++m) {
      pq_avx512::vec::sqrt_block((const float*)x.data(), got.data(), kChunk, modes[m], vs_sqrt);
      for (int64_t i = 0; i < kChunk; ++i)
        if (memcmp(&got[i], &expected[i], 4) != 0 && mismatches[m]++ == 0) first[m] = x[i];
    }
  }
  for (int m = 0; m < 2; ++m)
    printf("%-15s %llu mismatches (first at 0x%08X)\n", names[m], (unsigned long long)mismatches[m], first[m]);
  return mismatches[0] != 0 && mismatches[1] != 0;
}
