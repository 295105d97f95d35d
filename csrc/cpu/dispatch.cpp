// Picks the kernel table for the running CPU once, at first use, and sizes the cache-resident
// planes passes from the CPU's L2.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace fastbn::cpu {
namespace {

// The table compiled for `simd` (avx512, avx2, baseline), or null if this CPU cannot run it.
const KernelTable* table_named(const char* simd) {
#if defined(__x86_64__) || defined(__i386__)
  if (std::strcmp(simd, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c")
               ? &kernels_avx512()
               : nullptr;
  if (std::strcmp(simd, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
                   __builtin_cpu_supports("f16c")
               ? &kernels_avx2()
               : nullptr;
#endif
  return std::strcmp(simd, "baseline") == 0 ? &kernels_baseline() : nullptr;
}

// Whether this is an AMD CPU, where min_group_plane_bytes' measured choice differs.
bool amd_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

// The widest table this CPU runs. The kernels are memory-bound, so wider vectors buy less than
// their width, but the 16-bit loops spend much of their time converting and the 512-bit tables do
// that in half the instructions. Alternating the two tables in one process (geometric means over
// 3 dtypes, both layouts, 5-6 shapes; AVX-512 time / AVX2 time): on a Zen 5 EPYC, full-width
// AVX-512, training forward 0.96, forward+backward 0.97-0.98, eval 1.00-1.02; on a Zen 4 EPYC,
// which splits AVX-512 into two 256-bit halves, training forward 0.95-0.97, forward+backward
// 0.96-0.99 (bfloat16 0.91-0.96, float32 0.94), eval 1.01-1.03. (Zen 4 took AVX2 first until the
// 16-bit loops used 512-bit lanes; it measured 5-10% faster then.) FASTBN_SIMD forces a table.
const KernelTable* best_table() {
  if (const char* forced = std::getenv("FASTBN_SIMD"))
    if (const KernelTable* t = table_named(forced)) return t;
  for (const char* simd : {"avx512", "avx2", "baseline"})
    if (const KernelTable* t = table_named(simd)) return t;
  return &kernels_baseline();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{best_table()};
  return table;
}

int64_t default_channel_group_bytes() {
  if (const char* forced = std::getenv("FASTBN_CPU_GROUP_BYTES")) return std::max<int64_t>(0, std::atoll(forced));
  int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
  l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // per core on x86 glibc; 0 or -1 when unknown
#endif
  return (l2 > 0 ? l2 : int64_t(512) << 10) / 2;
}

std::atomic<int64_t>& group_bytes() {
  static std::atomic<int64_t> bytes{default_channel_group_bytes()};
  return bytes;
}

int64_t default_streaming_store_bytes() {
  if (const char* forced = std::getenv("FASTBN_CPU_STREAM_BYTES")) return std::atoll(forced);
  // sysfs, as glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) can report the whole package's (256 MB on
  // the EPYC VMs here, whose core complex has 32 MB).
  int64_t llc = 0;
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    char unit = 0;
    long long size = 0;
    if (std::fscanf(f, "%lld%c", &size, &unit) >= 1) llc = unit == 'M' ? size << 20 : unit == 'K' ? size << 10 : size;
    std::fclose(f);
  }
  return llc > 0 ? llc / 4 : int64_t(8) << 20;
}

std::atomic<int64_t>& stream_bytes() {
  static std::atomic<int64_t> bytes{default_streaming_store_bytes()};
  return bytes;
}

}  // namespace

int64_t streaming_store_bytes() { return stream_bytes().load(std::memory_order_relaxed); }

int64_t set_streaming_store_bytes(int64_t bytes) { return stream_bytes().exchange(bytes); }

bool streams_output(const void* out, int64_t total) {
  const int64_t threshold = streaming_store_bytes();
  return threshold >= 0 && total >= threshold && reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

int64_t channel_group_bytes() { return group_bytes().load(std::memory_order_relaxed); }

int64_t set_channel_group_bytes(int64_t bytes) { return group_bytes().exchange(std::max<int64_t>(0, bytes)); }

int64_t min_group_plane_bytes() {
  static const int64_t bytes = amd_cpu() ? 256 : 0;
  return bytes;
}

const KernelTable& active_kernels() { return *current().load(std::memory_order_acquire); }

bool set_simd(const char* name) {
  const KernelTable* t = table_named(name);
  if (t) current().store(t, std::memory_order_release);
  return t != nullptr;
}

}  // namespace fastbn::cpu
