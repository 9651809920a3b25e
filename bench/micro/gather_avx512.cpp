// What a 16-lane 512-bit gather (vpgatherdd) costs on this CPU, from an L1-resident table of 32-bit entries at random
// indices: could a code index come from a table keyed by the float's exponent and top mantissa bits, read by a
// gather and corrected by one compare (issue 14's lead), instead of the avx512vbmi bin search? Eight independent
// gathers per loop iteration; the clock from a chain of dependent vpaddd (one cycle each). bench/NOTES.md,
// "Gathers, scalar lookups and the front end". Not part of the library or the tests; build and run (seconds):
//   g++ -O2 -mavx512f -o /tmp/gather_avx512 bench/micro/gather_avx512.cpp && /tmp/gather_avx512
#include <immintrin.h>
#include <stdint.h>

#include <chrono>
#include <cstdio>
#include <random>

constexpr long kIterations = 4000000;
alignas(64) static uint32_t table[4096];
alignas(64) static uint32_t indices[1 << 16];

template <class F>
double seconds(F body) {
  const auto start = std::chrono::steady_clock::now();
  for (long n = 0; n < kIterations; ++n) body(n);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int main() {
  const double clock = 8.0 * kIterations / seconds([](long) {
    asm volatile("vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\t"
                 "vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\t"
                 "vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0" ::: "xmm0");
  });
  std::printf("clock %.2f GHz (dependent vpaddd)\n", clock * 1e-9);
  for (int i = 0; i < 4096; ++i) table[i] = (uint32_t)i * 2654435761u;
  std::mt19937 random(1);
  for (const int entries : {16, 1152, 2304, 4096}) {  // 64 B to 16 KiB
    for (auto& i : indices) i = random() % entries;
    __m512i sum[8];
    for (auto& s : sum) s = _mm512_setzero_si512();
    const double s = seconds([&](long n) {
      const uint32_t* at = indices + ((n * 128) & 0xFFFF);
      for (int j = 0; j < 8; ++j)
        sum[j] = _mm512_xor_si512(sum[j], _mm512_i32gather_epi32(_mm512_load_si512(at + 16 * j), table, 4));
    });
    __m512i all = sum[0];
    for (int j = 1; j < 8; ++j) all = _mm512_xor_si512(all, sum[j]);
    std::printf("%5d entries (%5d bytes): %.1f cycles a gather of 16, %.2f a value  [%d]\n", entries, 4 * entries,
                s * clock / (8.0 * kIterations), s * clock / (128.0 * kIterations), _mm512_reduce_add_epi32(all));
  }
  return 0;
}
