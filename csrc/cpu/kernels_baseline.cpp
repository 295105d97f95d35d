// The build's own target (SSE2 on x86-64, whatever the compiler defaults to elsewhere).
#define FASTBN_ISA baseline
#include "kernels_impl.h"

namespace fastbn::cpu {
const KernelTable& kernels_baseline() { return baseline::table("baseline"); }
}  // namespace fastbn::cpu
