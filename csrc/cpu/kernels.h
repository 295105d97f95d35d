// The CPU kernel tables, one per instruction set. No torch headers.
#pragma once

#include <cstdint>

#include "../kernel_args.h"

namespace fastbn::cpu {

struct KernelTable {
  const char* simd;  // name of the instruction set the table was compiled for
  void (*train_forward)(const TrainForwardArgs&);
  void (*eval_forward)(const EvalForwardArgs&);
  void (*backward)(const BackwardArgs&);
};

// One table per instruction set, each compiled in its own translation unit.
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx2();
const KernelTable& kernels_baseline();

// The table in use: the best the CPU supports, or FASTBN_SIMD=avx512|avx2|baseline when set.
const KernelTable& active_kernels();
// Forces a table by name (tests and benchmarks compare paths); returns false if the CPU lacks it.
bool set_simd(const char* name);

// Bytes of one core's cache that a planes training pass may fill with a group of channels' slices,
// so that it reads them from DRAM once (kernels_impl.h, channels_per_group). Default: half the
// core's L2 (256 KB where the size is unknown), or FASTBN_CPU_GROUP_BYTES; 0 turns the path off.
int64_t channel_group_bytes();
// Sets it (tests compare the one-read and two-pass paths); returns the previous value.
int64_t set_channel_group_bytes(int64_t bytes);
// Planes (one channel's run of H x W values) shorter than this many bytes take the two passes even
// where a group fits: 256 (7x7 float32 and smaller) on AMD CPUs, 0 elsewhere (channels_per_group).
int64_t min_group_plane_bytes();

// Outputs of at least this many bytes are written with non-temporal (streaming) stores by the
// plain BatchNorm passes of the AVX2 and AVX-512 tables. Default: a quarter of the last-level cache
// (sysfs; 8 MB where unknown), or FASTBN_CPU_STREAM_BYTES; a negative value turns them off.
int64_t streaming_store_bytes();
// Sets it (tests compare both kinds of store); returns the previous value.
int64_t set_streaming_store_bytes(int64_t bytes);
// Whether an output of `total` bytes at `out` may be streamed: at least streaming_store_bytes(),
// 64-byte aligned (the kernels add a condition for 16-bit values).
bool streams_output(const void* out, int64_t total);

}  // namespace fastbn::cpu
