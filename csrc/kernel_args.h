// What every backend's kernels take: raw pointers, sizes and options, no torch headers. The glue
// (batch_norm_ops.h) checks arguments and lays tensors out; the kernels (cpu/, cuda/) only compute.
#pragma once

#include <cstdint>

#include "batch_norm_math.h"

namespace fastbn {

enum class Dtype : int { Float32, Float64, Float16, BFloat16 };

// The input seen as [outer][channels][inner] with contiguous strides. inner == 1 is the "rows"
// layout (N,C) or channels_last folded to (N*spatial, C); inner > 1 is the "planes" layout (NCHW...).
struct Geometry {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// What follows the affine map in the fused ops: y = act(affine(x) + residual). The default is
// plain BatchNorm.
struct Epilogue {
  const void* residual = nullptr;  // same shape, layout and dtype as the input, or null
  Activation activation = Activation::Identity;
  double param = 0;  // leaky_relu's negative slope, elu's alpha
};

// Per-channel pointers (weight, bias, mean, var, grads) point to the accumulation type:
// double for Float64 input, float otherwise. weight/bias may be null (1 and 0).
struct TrainForwardArgs {
  Dtype dtype;
  Geometry geometry;
  const void* input;
  void* output;  // null: statistics only (SyncBatchNorm normalizes once the global ones are known)
  const void* weight;
  const void* bias;
  void* mean;  // out: batch mean
  void* var;   // out: biased batch variance
  double eps;
  Epilogue epilogue{};
  int num_threads = 1;  // CPU: OpenMP threads (the backend sets torch's count); unused on CUDA
};

struct EvalForwardArgs {
  Dtype dtype;
  Geometry geometry;
  const void* input;
  void* output;
  const void* weight;
  const void* bias;
  const void* mean;  // running statistics
  const void* var;
  double eps;
  Epilogue epilogue{};
  int num_threads = 1;
};

struct BackwardArgs {
  Dtype dtype;
  Geometry geometry;
  const void* grad_output;
  const void* input;
  const void* weight;
  const void* mean;  // batch statistics when training, running statistics otherwise
  const void* var;
  double eps;
  bool training;
  // SyncBatchNorm: sum(dy) / count and sum(dy * x_hat) / count over the global batch, reduced across
  // processes. When given (training only), no reduction runs and only grad_input is computed.
  const void* mean_dy;
  const void* mean_dy_xhat;
  void* grad_input;   // each output may be null when not requested
  void* grad_weight;
  void* grad_bias;
  // The fused ops: grad_output is the gradient of act(affine(x) + residual). `bias` is needed to
  // recompute the pre-activation. With `output` set (and `input` null) x is recovered from the
  // forward's output (memory-efficient mode; identity and leaky_relu with slope > 0 only).
  Epilogue epilogue{};
  const void* bias = nullptr;
  const void* output = nullptr;
  void* grad_residual = nullptr;  // the gradient before the affine map, act'(z) * grad_output
  int num_threads = 1;
};

}  // namespace fastbn
