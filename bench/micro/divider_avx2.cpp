// Throughput of the AVX2 operations on the Adam parameter update's chain, eight independent chains each, one thread
// (bench/NOTES.md, "The AVX2 8-bit Adam block, second pass"): ns and cycles (at 2.95 GHz) per ymm instruction of
// vdivps, vsqrtps and vfmadd. Build and run (not part of the library or the tests):
//   g++ -O2 -mavx2 -mfma -o /tmp/divider_avx2 bench/micro/divider_avx2.cpp && /tmp/divider_avx2
#include <immintrin.h>

#include <chrono>
#include <cstdio>

constexpr long kInstructions = 100000000;
constexpr double kGhz = 2.95;

template <class Op>
static void report(const char* name, Op op) {
  __m256 x[8];
  for (int i = 0; i < 8; ++i) x[i] = _mm256_set1_ps(1.0f + 0.1f * (float)i);
  const auto t = std::chrono::steady_clock::now();
  for (long r = 0; r < kInstructions / 8; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) x[i] = op(x[i]);
    __asm__ volatile("" ::"x"(x[0]), "x"(x[1]), "x"(x[2]), "x"(x[3]), "x"(x[4]), "x"(x[5]), "x"(x[6]), "x"(x[7]));
  }
  const double ns = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / kInstructions * 1e9;
  printf("%-8s %.2f ns, %.2f cycles an instruction\n", name, ns, ns * kGhz);
}

int main() {
  const __m256 c = _mm256_set1_ps(1.0000001f);
  report("vdivps", [&](__m256 a) { return _mm256_div_ps(c, a); });
  report("vsqrtps", [](__m256 a) { return _mm256_sqrt_ps(a); });
  report("vfmadd", [&](__m256 a) { return _mm256_fmadd_ps(c, a, c); });
  return 0;
}
