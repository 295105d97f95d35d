// Picks the kernel table for the running CPU once, at first use.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "kernels.h"

namespace fastbn::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has(const char* simd) {
  if (std::strcmp(simd, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  if (std::strcmp(simd, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  return std::strcmp(simd, "baseline") == 0;
}
#else
bool cpu_has(const char* simd) { return std::strcmp(simd, "baseline") == 0; }
#endif

const KernelTable* table_named(const char* simd) {
  if (!cpu_has(simd)) return nullptr;
#if defined(__x86_64__) || defined(__i386__)
  if (std::strcmp(simd, "avx512") == 0) return &kernels_avx512();
  if (std::strcmp(simd, "avx2") == 0) return &kernels_avx2();
#endif
  return &kernels_baseline();
}

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

}  // namespace

const KernelTable& active_kernels() { return *current().load(std::memory_order_acquire); }

bool set_simd(const char* name) {
  const KernelTable* t = table_named(name);
  if (t) current().store(t, std::memory_order_release);
  return t != nullptr;
}

}  // namespace fastbn::cpu
