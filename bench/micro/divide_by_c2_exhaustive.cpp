// Checks divide_by_c2 of csrc/cpu/blockwise_avx512.h (the 8-bit Adam update's root / c2 from q = RN(root * RN(1/c2))
// and two corrections q = RN(q + RN(root - q c2) RN(1/c2)), the remainders exact by FMA) against the division for
// every float32 root in [2^-38, 2^64) (the roots of the emulated sqrt's common path, where the kernel uses it) and
// a list of c2 in [2^-60, 1] (AdamVectors::divides_by_c2): edge values, then random ones, half of them below 2^-6.
// Prints each c2 with a mismatch and the totals; it also counts the mismatches of the first correction alone (the
// second is the one Markstein's theorem proves exact: the first leaves q within an ulp). Not part of the library or
// the tests; build and run (about 0.1 s a c2 on two cores):
//   g++ -O2 -fopenmp -mavx512f -mfma -ffp-contract=off -o /tmp/divide_by_c2 bench/micro/divide_by_c2_exhaustive.cpp
//   /tmp/divide_by_c2 [RANDOM_C2_COUNT]
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

static float from_bits(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}

int main(int argc, char** argv) {
  std::vector<float> cs = {1.0f, from_bits(0x3F7FFFFF), 0.5f, from_bits(0x3F000001), from_bits(0x3EFFFFFF),
                           0.0316227766f, 0.0999999f, 0.7f, 0.3f, from_bits(0x3F3504F3), from_bits(0x2F800000),
                           from_bits(0x21800000) /* 2^-60 */, from_bits(0x21FFFFFF)};
  std::mt19937 rng(12345);
  const int random_count = argc > 1 ? atoi(argv[1]) : 3000;
  for (int i = 0; i < random_count; ++i) {
    const uint32_t exponent = 127 - 1 - (i % 2 ? rng() % 6 : rng() % 60);
    cs.push_back(from_bits((exponent << 23) | (rng() & 0x7FFFFF)));
  }
  const uint32_t lo = (127 - 38) << 23, hi = (127 + 64) << 23;
  long long first_total = 0, second_total = 0;
  for (float c2 : cs) {
    const float inv = 1.0f / c2;
    long long first = 0, second = 0;
#pragma omp parallel for reduction(+ : first, second) schedule(static)
    for (int64_t b = lo; b < (int64_t)hi; b += 16) {
      const __m512i bits = _mm512_add_epi32(_mm512_set1_epi32((int)b),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      const __m512 root = _mm512_castsi512_ps(bits), c = _mm512_set1_ps(c2), r = _mm512_set1_ps(inv);
      const __m512i expected = _mm512_castps_si512(_mm512_div_ps(root, c));
      __m512 q = _mm512_mul_ps(root, r);
      q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, c, root), r, q);
      first += __builtin_popcount(_mm512_cmpneq_epi32_mask(_mm512_castps_si512(q), expected));
      q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, c, root), r, q);
      second += __builtin_popcount(_mm512_cmpneq_epi32_mask(_mm512_castps_si512(q), expected));
    }
    if (first || second) printf("c2 %a: %lld after the first correction, %lld after the second\n", c2, first, second);
    first_total += first;
    second_total += second;
  }
  printf("%zu c2 x %u roots: %lld mismatches after the first correction, %lld after the second\n", cs.size(), hi - lo,
         first_total, second_total);
  return second_total != 0;
}
