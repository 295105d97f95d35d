// The CUDA kernels' launchers: raw pointers and sizes (kernel_args.h), no torch headers, so the
// .cu files compile in seconds. The glue (batch_norm_cuda.cpp) checks arguments, sets the device,
// and hands in the current stream and scratch memory from torch's caching allocator.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../kernel_args.h"

namespace fastbn::cuda {

struct Launch {
  cudaStream_t stream;
  int sm_count;  // multiprocessors of the device: how many blocks it takes to fill it
  // Scratch memory, valid until the stream has run this call's kernels (stream-ordered reuse).
  void* (*allocate)(void* context, size_t bytes);
  void* allocate_context;
};

void train_forward(const TrainForwardArgs& args, const Launch& launch);
void eval_forward(const EvalForwardArgs& args, const Launch& launch);
void backward(const BackwardArgs& args, const Launch& launch);

// running <- (1 - f) * running + f * batch (variance made unbiased with `bessel`), in double; f is
// `momentum`, or 1 / *num_batches_tracked when `num_batches_tracked` is given (read on the device).
struct RunningStatsArgs {
  Dtype running_type;  // running_mean and running_var
  void* running_mean;
  void* running_var;
  bool batch_is_double;  // batch mean/var: double, or float
  const void* mean;
  const void* var;
  int64_t channels;
  double momentum;
  const int64_t* num_batches_tracked;  // null: use momentum
  double bessel;
};
void update_running_stats(const RunningStatsArgs& args, const Launch& launch);

}  // namespace fastbn::cuda
