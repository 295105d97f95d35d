// How the width of the stores changes the rows' elementwise pass (y = (x - mean[c]) * scale[c] +
// bias[c] over an (M, C) float32 tensor, as in channels_last eval) when the tensors are not in cache
// and when they are. The same arithmetic in 16-, 32- and 64-byte vectors, stored as they are or as
// 16-byte halves/quarters. One thread; variants interleaved (order alternating), medians of 31;
// cold: a 128 MB buffer written before each timed call. The README's "How it works" quotes it
// (fastbn's rows passes store 32-byte vectors as two 16-byte halves: store32_halves).
//
//   gcc -O2 -ffp-contract=off bench/store_width.c -o /tmp/store_width
//   /tmp/store_width [M C]          (default 6272 256: channels_last 32x256x14x14)
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { kReps = 31 };
typedef void (*Pass)(const float*, float*, long, long, const float*, const float*, const float*);

#define PASS(name, isa)                                                                                     \
  __attribute__((noinline, target(isa))) static void name(const float* restrict x, float* restrict y, long M, \
                                                          long C, const float* restrict mean,              \
                                                          const float* restrict scale, const float* restrict bias)

PASS(sse_16, "sse2") {
  for (long m = 0; m < M; ++m)
    for (long c = 0; c < C; c += 4) {
      const __m128 v = _mm_loadu_ps(x + m * C + c);
      _mm_storeu_ps(y + m * C + c,
                    _mm_add_ps(_mm_mul_ps(_mm_sub_ps(v, _mm_loadu_ps(mean + c)), _mm_loadu_ps(scale + c)),
                               _mm_loadu_ps(bias + c)));
    }
}

#define AVX2_VALUE                                                                                          \
  _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + m * C + c), _mm256_loadu_ps(mean + c)), \
                              _mm256_loadu_ps(scale + c)),                                               \
                _mm256_loadu_ps(bias + c))

PASS(avx2_32, "avx2") {
  for (long m = 0; m < M; ++m)
    for (long c = 0; c < C; c += 8) _mm256_storeu_ps(y + m * C + c, AVX2_VALUE);
}

PASS(avx2_16, "avx2") {
  for (long m = 0; m < M; ++m)
    for (long c = 0; c < C; c += 8) {
      const __m256 v = AVX2_VALUE;
      _mm_storeu_ps(y + m * C + c, _mm256_castps256_ps128(v));
      _mm_storeu_ps(y + m * C + c + 4, _mm256_extractf128_ps(v, 1));
    }
}

#define AVX512_VALUE                                                                                        \
  _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + m * C + c), _mm512_loadu_ps(mean + c)), \
                              _mm512_loadu_ps(scale + c)),                                               \
                _mm512_loadu_ps(bias + c))

PASS(avx512_64, "avx512f") {
  for (long m = 0; m < M; ++m)
    for (long c = 0; c < C; c += 16) _mm512_storeu_ps(y + m * C + c, AVX512_VALUE);
}

PASS(avx512_16, "avx512f") {
  for (long m = 0; m < M; ++m)
    for (long c = 0; c < C; c += 16) {
      const __m512 v = AVX512_VALUE;
      _mm_storeu_ps(y + m * C + c, _mm512_castps512_ps128(v));
      _mm_storeu_ps(y + m * C + c + 4, _mm512_extractf32x4_ps(v, 1));
      _mm_storeu_ps(y + m * C + c + 8, _mm512_extractf32x4_ps(v, 2));
      _mm_storeu_ps(y + m * C + c + 12, _mm512_extractf32x4_ps(v, 3));
    }
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static int by_value(const void* a, const void* b) {
  const double d = *(const double*)a - *(const double*)b;
  return (d > 0) - (d < 0);
}

int main(int argc, char** argv) {
  const long M = argc > 2 ? atol(argv[1]) : 6272, C = argc > 2 ? atol(argv[2]) : 256;
  if (M <= 0 || C <= 0 || C % 16) {
    fprintf(stderr, "usage: %s [M C], C a multiple of 16\n", argv[0]);
    return 1;
  }
  const int avx512 = __builtin_cpu_supports("avx512f");
  const Pass passes[] = {sse_16, avx2_32, avx2_16, avx512_64, avx512_16};
  const char* names[] = {"16-byte vectors", "32-byte, stored whole", "32-byte, 16-byte halves",
                         "64-byte, stored whole", "64-byte, 16-byte quarters"};
  const int count = avx512 ? 5 : 3;
  const size_t bytes = (size_t)M * C * sizeof(float), flush_values = (128u << 20) / sizeof(float);
  float *x = aligned_alloc(64, bytes), *y = aligned_alloc(64, bytes), *flush = malloc(flush_values * 4);
  float *mean = aligned_alloc(64, C * 4), *scale = aligned_alloc(64, C * 4), *bias = aligned_alloc(64, C * 4);
  for (size_t i = 0; i < (size_t)M * C; ++i) x[i] = (float)(i % 7), y[i] = 0;
  for (long c = 0; c < C; ++c) mean[c] = 0.5f, scale[c] = 2.0f, bias[c] = 0.25f;
  printf("(%ld, %ld) float32, %.1f MB each way, one thread, medians of %d, ms (x the 16-byte vectors' time)\n", M,
         C, bytes / 1e6, kReps);
  for (int cold = 1; cold >= 0; --cold) {
    double t[5][kReps];
    for (int r = 0; r < kReps; ++r)
      for (int k = 0; k < count; ++k) {
        const int v = r % 2 ? k : count - 1 - k;
        if (cold)
          for (size_t i = 0; i < flush_values; ++i) flush[i] = 1.0f;
        const double t0 = now_ms();
        passes[v](x, y, M, C, mean, scale, bias);
        t[v][r] = now_ms() - t0;
      }
    printf("%s caches:\n", cold ? "cold" : "warm");
    for (int k = 0; k < count; ++k) qsort(t[k], kReps, sizeof(double), by_value);
    for (int k = 0; k < count; ++k)
      printf("  %-26s %.3f  (%.2fx)\n", names[k], t[k][kReps / 2], t[k][kReps / 2] / t[0][kReps / 2]);
  }
  return 0;
}
