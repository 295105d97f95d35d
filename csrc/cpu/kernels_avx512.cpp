#if defined(__x86_64__) || defined(__i386__)  // other architectures use the baseline table only
#define FASTBN_ISA avx512
#define FASTBN_VECTOR_BYTES 64
#define FASTBN_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c"
#define FASTBN_HAS_F16C 1
#include "kernels_impl.h"

namespace fastbn::cpu {
const KernelTable& kernels_avx512() { return avx512::table("avx512"); }
}  // namespace fastbn::cpu
#endif
