// Reciprocal throughput of the 512-bit operations the AVX-512 8-bit codecs are built from, alone and in pairs: an
// operation that takes one cycle alone and two in a pair with another shares that one's port. Eight independent
// operations per loop iteration (no dependency between them), timed with the clock; the clock rate comes from a
// chain of dependent vpaddd (one cycle each). Not part of the library or the tests; build and run (seconds):
//   g++ -O2 -mavx512f -mavx512bw -mavx512vbmi -mgfni -o /tmp/port_costs bench/micro/avx512_port_costs.cpp
//   /tmp/port_costs
#include <chrono>
#include <cstdio>

constexpr long kIterations = 50000000;

template <class F>
double seconds(F body) {
  const auto start = std::chrono::steady_clock::now();
  for (long n = 0; n < kIterations; ++n) body();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Eight operations, A and B alternating, each writing its own register from two inputs.
#define EIGHT(A, B)                                                                                           \
  asm volatile(A " %%zmm1, %%zmm2, %%zmm10\n\t" B " %%zmm1, %%zmm3, %%zmm11\n\t" A " %%zmm1, %%zmm4, %%zmm12\n\t" \
               B " %%zmm1, %%zmm5, %%zmm13\n\t" A " %%zmm1, %%zmm6, %%zmm14\n\t" B " %%zmm1, %%zmm7, %%zmm15\n\t"  \
               A " %%zmm1, %%zmm8, %%zmm16\n\t" B " %%zmm1, %%zmm9, %%zmm17" ::                                 \
                   : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17")

int main() {
  const double clock = 8.0 * kIterations / seconds([] {
    asm volatile("vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\t"
                 "vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0\n\t"
                 "vpaddd %%zmm1, %%zmm0, %%zmm0\n\tvpaddd %%zmm1, %%zmm0, %%zmm0" ::: "xmm0");
  });
  std::printf("clock %.2f GHz (dependent vpaddd)\n", clock * 1e-9);
  // Cycles per operation (alone) or per pair (A with B).
  const auto alone = [&](const char* name, double s) { std::printf("%-26s %.2f cycles each\n", name, s * clock / (8.0 * kIterations)); };
  const auto pair = [&](const char* name, double s) { std::printf("%-26s %.2f cycles a pair\n", name, s * clock / (4.0 * kIterations)); };
  alone("vpaddw", seconds([] { EIGHT("vpaddw", "vpaddw"); }));
  alone("vpavgw", seconds([] { EIGHT("vpavgw", "vpavgw"); }));
  alone("vpshldw", seconds([] { EIGHT("vpshldw $1,", "vpshldw $1,"); }));
  alone("vpminub", seconds([] { EIGHT("vpminub", "vpminub"); }));
  alone("vpermb", seconds([] { EIGHT("vpermb", "vpermb"); }));
  alone("vpermw", seconds([] { EIGHT("vpermw", "vpermw"); }));
  alone("vpermt2b", seconds([] { EIGHT("vpermt2b", "vpermt2b"); }));
  alone("vpermt2w", seconds([] { EIGHT("vpermt2w", "vpermt2w"); }));
  alone("vpermt2d", seconds([] { EIGHT("vpermt2d", "vpermt2d"); }));
  alone("vpackusdw", seconds([] { EIGHT("vpackusdw", "vpackusdw"); }));
  alone("vgf2p8affineqb", seconds([] { EIGHT("vgf2p8affineqb $0,", "vgf2p8affineqb $0,"); }));
  pair("vpavgw + vpshldw", seconds([] { EIGHT("vpavgw", "vpshldw $1,"); }));
  pair("vpavgw + vpermw", seconds([] { EIGHT("vpavgw", "vpermw"); }));
  pair("vpavgw + vpermb", seconds([] { EIGHT("vpavgw", "vpermb"); }));
  pair("vpavgw + vpackusdw", seconds([] { EIGHT("vpavgw", "vpackusdw"); }));
  pair("vpermt2b + vpermb", seconds([] { EIGHT("vpermt2b", "vpermb"); }));
  pair("vpermt2b + vpavgw", seconds([] { EIGHT("vpermt2b", "vpavgw"); }));
  pair("vpermt2b + vpaddw", seconds([] { EIGHT("vpermt2b", "vpaddw"); }));
  return 0;
}
