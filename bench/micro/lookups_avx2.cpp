// The 8-bit kernels' table lookups on an AVX2 CPU, each form alone over one L1-resident block of 256 elements
// (bench/NOTES.md, "The AVX2 8-bit step without gathers"): ns per element for
//   codes (256 floats) by index byte: a gather; scalar loads into a float buffer; scalar loads put into vectors;
//   a 65536-entry byte table by 16-bit bin: a gather of 32-bit words; scalar loads assembled in a general
//   register; scalar loads put into a vector with byte inserts.
// Build and run (not part of the library or the tests):
//   g++ -O3 -mavx2 -mfma -mf16c -o /tmp/lookups_avx2 bench/micro/lookups_avx2.cpp && /tmp/lookups_avx2
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <chrono>
#include <cstdio>
#include <utility>
#include <vector>

constexpr int kBlock = 256;

__attribute__((noinline)) void codes_gather(const uint8_t* q, const float* code, float* out) {
  for (int i = 0; i < kBlock; i += 8)
    _mm256_store_ps(out + i, _mm256_i32gather_ps(code, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + i))), 4));
}

__attribute__((noinline)) void codes_scalar(const uint8_t* q, const float* code, float* out) {
  for (int i = 0; i < kBlock; i += 8) {
    uint64_t w;
    memcpy(&w, q + i, 8);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) out[i + k] = code[(w >> (8 * k)) & 0xFF];
  }
}

__attribute__((noinline)) void codes_inserted(const uint8_t* q, const float* c, float* out) {
  for (int i = 0; i < kBlock; i += 8, q += 8)
    _mm256_store_ps(out + i, _mm256_setr_ps(c[q[0]], c[q[1]], c[q[2]], c[q[3]], c[q[4]], c[q[5]], c[q[6]], c[q[7]]));
}

__attribute__((noinline)) void bins_gather(const uint32_t* bins, const uint8_t* table, uint8_t* out) {
  for (int i = 0; i < kBlock; i += 8) {
    const __m256i b = _mm256_load_si256((const __m256i*)(bins + i));
    const __m256i at = _mm256_min_epu32(b, _mm256_set1_epi32(65532));
    __m256i w = _mm256_i32gather_epi32((const int*)table, at, 1);
    w = _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_slli_epi32(_mm256_sub_epi32(b, at), 3)), _mm256_set1_epi32(0xFF));
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64((__m128i*)(out + i), _mm_packus_epi16(w16, w16));
  }
}

__attribute__((noinline)) void bins_register(const uint16_t* bins, const uint8_t* table, uint8_t* out) {
  for (int i = 0; i < kBlock; i += 8) {
    uint64_t lo, hi, r = 0;
    memcpy(&lo, bins + i, 8);
    memcpy(&hi, bins + i + 4, 8);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) r |= (uint64_t)table[(lo >> (16 * k)) & 0xFFFF] << (8 * k);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) r |= (uint64_t)table[(hi >> (16 * k)) & 0xFFFF] << (8 * k + 32);
    memcpy(out + i, &r, 8);
  }
}

template <size_t... K>
static inline __m128i inserted16(const uint8_t* table, const uint16_t* bins, std::index_sequence<K...>) {
  __m128i r = _mm_setzero_si128();
  ((r = _mm_insert_epi8(r, table[bins[K]], K)), ...);
  return r;
}

__attribute__((noinline)) void bins_inserted(const uint16_t* bins, const uint8_t* table, uint8_t* out) {
  for (int i = 0; i < kBlock; i += 16)
    _mm_storeu_si128((__m128i*)(out + i), inserted16(table, bins + i, std::make_index_sequence<16>()));
}

template <class F>
static double ns_per_element(F&& f, void* out) {
  const int rounds = 400000;
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t = std::chrono::steady_clock::now();
    for (int r = 0; r < rounds; ++r) {
      f();
      __asm__ volatile("" ::"r"(out) : "memory");  // keeps every round's stores
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    best = s < best ? s : best;
  }
  return best / rounds / kBlock * 1e9;
}

int main() {
  alignas(64) uint8_t q[kBlock], qout[kBlock];
  alignas(64) float code[256], out[kBlock];
  alignas(64) uint32_t bins32[kBlock];
  alignas(64) uint16_t bins16[kBlock];
  std::vector<uint8_t> table(65536);
  for (int i = 0; i < 65536; ++i) table[i] = (uint8_t)(i >> 8);
  for (int i = 0; i < 256; ++i) code[i] = (float)i * 0.01f;
  for (int i = 0; i < kBlock; ++i) {  // spread pseudo-random indices and bins
    q[i] = (uint8_t)(((uint32_t)i * 2654435761u) >> 24);
    bins16[i] = (uint16_t)(((uint32_t)i * 2654435761u) >> 16);
    bins32[i] = bins16[i];
  }
  printf("codes: gather %.3f, scalar into a buffer %.3f, scalar into vectors %.3f ns/element\n",
         ns_per_element([&] { codes_gather(q, code, out); }, out), ns_per_element([&] { codes_scalar(q, code, out); }, out),
         ns_per_element([&] { codes_inserted(q, code, out); }, out));
  printf("bins:  gather %.3f, scalar in a register %.3f, scalar with byte inserts %.3f ns/element\n",
         ns_per_element([&] { bins_gather(bins32, table.data(), qout); }, qout),
         ns_per_element([&] { bins_register(bins16, table.data(), qout); }, qout),
         ns_per_element([&] { bins_inserted(bins16, table.data(), qout); }, qout));
  return 0;
}
