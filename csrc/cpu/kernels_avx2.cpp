#if defined(__x86_64__) || defined(__i386__)  // other architectures use the baseline table only
#define FASTBN_ISA avx2
#define FASTBN_VECTOR_BYTES 32
#define FASTBN_ISA_TARGET "avx2,fma,bmi,bmi2,f16c"
#define FASTBN_HAS_F16C 1
#include "kernels_impl.h"

namespace fastbn::cpu {
const KernelTable& kernels_avx2() { return avx2::table("avx2"); }
}  // namespace fastbn::cpu
#endif
