// Checks that the grid bin of the contract (csrc/include/pyquant/blockwise.h, grid_bin: s = RN(RN(t * 65535) + 0.5)
// with t = (y + 1) * 0.5, truncated) equals the truncation of one fused multiply-add, RN(t * 65535 + 0.5), for every
// float32 y in [-1, 1] (each of the 2 * (0x3F800000 + 1) bit patterns, both zeros included), which is every value the
// vector kernels' grid bins see (their y is clamped to [-1, 1] or NaN, and NaN is the same either way). Prints the
// number of y whose bins differ, 0 if the fused form may replace the contract's two roundings. Not part of the
// library or the tests; build and run (seconds):
//   g++ -O2 -fopenmp -mfma -ffp-contract=off -Icsrc/include -o /tmp/grid_fma bench/micro/grid_fma_exhaustive.cpp
//   /tmp/grid_fma
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

int main() {
  constexpr uint32_t kOne = 0x3F800000u;  // the bit pattern of 1.0f
  int64_t differ = 0;
#pragma omp parallel for reduction(+ : differ) schedule(static)
  for (int64_t i = 0; i < 2 * ((int64_t)kOne + 1); ++i) {
    const uint32_t bits = (uint32_t)(i % (kOne + 1)) | (i > kOne ? 0x80000000u : 0u);
    float y;
    memcpy(&y, &bits, sizeof y);
    const float t = (y + 1.0f) * 0.5f;
    const float contract = t * 65535.0f + 0.5f;  // two roundings (-ffp-contract=off keeps them apart)
    const float fused = std::fma(t, 65535.0f, 0.5f);
    differ += (uint32_t)contract != (uint32_t)fused;
  }
  printf("%lld of %lld values in [-1, 1] get another bin from the fused multiply-add\n", (long long)differ,
         2 * ((long long)kOne + 1));
  return differ != 0;
}
