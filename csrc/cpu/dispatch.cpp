// Picks the kernel table for the running CPU once, at first use, and sizes the cache-resident
// planes passes from the CPU's L2.
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

// Whether this is an AMD CPU, where two measured choices differ (the table order below, and
// min_group_plane_bytes).
bool amd_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

// The CPU's family as CPUID reports it (base plus extended family; 0x19 is AMD's Zen 3 and 4,
// 0x1A Zen 5), 0 where unknown.
unsigned cpu_family() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const unsigned base = (eax >> 8) & 0xf;
  return base == 0xf ? base + ((eax >> 20) & 0xff) : base;
#else
  return 0;
#endif
}

// The kernels are memory-bound, so wider vectors buy little once a core saturates its bandwidth.
// AMD's Zen 4 runs AVX-512 as two 256-bit halves, and on it the AVX2 kernels measured equal or up to
// 5-10% faster (fewer cache-line-splitting accesses on unaligned planes), so AMD before Zen 5 gets
// AVX2 first. Zen 5 (server and desktop parts) runs AVX-512 at full width: on an EPYC the AVX-512
// table measured 3-4% faster in training (geometric means over 28 cases, two runs) and 0-2% slower
// in eval. Zen 5 mobile parts split AVX-512 as Zen 4 does; not measured there.
const KernelTable* best_table() {
  if (const char* forced = std::getenv("FASTBN_SIMD"))
    if (const KernelTable* t = table_named(forced)) return t;
  static const char* const avx2_first[] = {"avx2", "avx512", "baseline"};
  static const char* const default_order[] = {"avx512", "avx2", "baseline"};
  for (const char* simd : amd_cpu() && cpu_family() < 0x1A ? avx2_first : default_order)
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
