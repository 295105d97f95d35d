// What this machine's memory gives the passes fastbn's CPU kernels make, on a float32 tensor
// (default 9.6 MB, the size of 24x512x14x14): read only, streamed (non-temporal) write only, a
// streaming copy (reads and writes interleaved), a normal copy, and a read split over 4
// interleaved streams per thread. Cold caches (a 128 MB buffer written before each timed call),
// medians of 31; one contiguous share per thread. The README's "where the time goes" quotes it.
//
//   gcc -O2 -mavx2 -fopenmp bench/memory_bandwidth.c -o /tmp/memory_bandwidth
//   OMP_NUM_THREADS=2 /tmp/memory_bandwidth [values]
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

enum { kReps = 31, kPasses = 5 };
static size_t count;
static float *x, *y, *flush_buffer;
static const size_t kFlushValues = (128u << 20) / 4;
static volatile float sink;

static void flush(void) {
#pragma omp parallel for
  for (size_t i = 0; i < kFlushValues; ++i) flush_buffer[i] = 1.0f;
}

// This thread's share [*begin, *end), a multiple of 32 values.
static void share(size_t* begin, size_t* end) {
  const size_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  *begin = count * t / threads / 32 * 32;
  *end = count * (t + 1) / threads / 32 * 32;
}

static void read_only(int streams) {
#pragma omp parallel
  {
    size_t begin, end;
    share(&begin, &end);
    const size_t len = (end - begin) / streams / 32 * 32;
    __m256 s = _mm256_setzero_ps();
    for (size_t i = 0; i < len; i += 32)
      for (int k = 0; k < streams; ++k) {
        const float* p = x + begin + k * len + i;
        s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(_mm256_load_ps(p), _mm256_load_ps(p + 8)),
                                           _mm256_add_ps(_mm256_load_ps(p + 16), _mm256_load_ps(p + 24))));
      }
    float v[8];
    _mm256_storeu_ps(v, s);
    sink = v[0];
  }
}

static void write_only_streamed(void) {
#pragma omp parallel
  {
    size_t begin, end;
    share(&begin, &end);
    const __m256 v = _mm256_set1_ps(2.0f);
    for (size_t i = begin; i < end; i += 8) _mm256_stream_ps(y + i, v);
    _mm_sfence();
  }
}

static void copy(int streamed) {
#pragma omp parallel
  {
    size_t begin, end;
    share(&begin, &end);
    if (streamed)
      for (size_t i = begin; i < end; i += 8) _mm256_stream_ps(y + i, _mm256_load_ps(x + i));
    else
      for (size_t i = begin; i < end; i += 8) _mm256_store_ps(y + i, _mm256_load_ps(x + i));
    _mm_sfence();
  }
}

static int compare(const void* a, const void* b) {
  const double d = *(const double*)a - *(const double*)b;
  return (d > 0) - (d < 0);
}

int main(int argc, char** argv) {
  count = (argc > 1 ? strtoull(argv[1], NULL, 10) : 2408448) / 32 * 32;
  x = aligned_alloc(64, count * 4);
  y = aligned_alloc(64, count * 4);
  flush_buffer = aligned_alloc(64, kFlushValues * 4);
  for (size_t i = 0; i < count; ++i) x[i] = 1.0f, y[i] = 0.0f;
  static const char* names[kPasses] = {"read only", "read, 4 streams per thread", "streamed write only",
                                       "streaming copy", "normal copy"};
  double ms[kPasses][kReps];
  for (int r = 0; r < kReps; ++r)
    for (int k = 0; k < kPasses; ++k) {  // interleaved, so drift hits all alike
      flush();
      const double t0 = omp_get_wtime();
      switch (k) {
        case 0: read_only(1); break;
        case 1: read_only(4); break;
        case 2: write_only_streamed(); break;
        case 3: copy(1); break;
        default: copy(0); break;
      }
      ms[k][r] = (omp_get_wtime() - t0) * 1e3;
    }
  printf("%zu float32 values (%.1f MB), %d threads, cold caches, medians of %d\n", count, count * 4 / 1e6,
         omp_get_max_threads(), kReps);
  for (int k = 0; k < kPasses; ++k) {
    qsort(ms[k], kReps, sizeof(double), compare);
    printf("%-28s %.3f ms\n", names[k], ms[k][kReps / 2]);
  }
  return 0;
}
