// Argument checks, layouts and the running-statistics update shared by every backend's glue.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastbn {

// Floating types the kernels take; everything else is refused in torch's words.
void check_input(const at::Tensor& input);

// weight / bias / running stats: C elements, on the input's device, of the input's dtype or
// float32 when the input is float16/bfloat16 (as under autocast).
void check_param(const std::optional<at::Tensor>& param, const char* name, const at::Tensor& input);

// float64 for float64 input, float32 otherwise.
at::ScalarType accumulate_type(at::ScalarType input_type);

// A per-channel parameter or statistic as a contiguous 1-D tensor of the accumulation type, the
// form the kernels take (undefined when absent).
at::Tensor param_as_acc(const std::optional<at::Tensor>& param, const at::Tensor& input);

// The memory format the kernels read and write: channels_last(_3d) when the input is stored so,
// contiguous for everything else (other strides are copied to contiguous first).
at::MemoryFormat kernel_memory_format(const at::Tensor& input);

int64_t values_per_channel(const at::Tensor& input);

// The op update_running_stats in two halves that every backend runs in turn. The first checks every
// argument and counts the batch in num_batches_tracked; it returns false when there is nothing to
// fold in (an empty batch). Nothing fails after it, so a failed call never leaves the statistics
// half updated.
bool begin_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                                const at::Tensor& var, std::optional<double> momentum, int64_t count);

// The second half for any device, with ATen ops: running <- lerp(running, batch, f) with the unbiased
// variance. f stays a tensor, so no value is read back to the host (CUDA graphs, no sync).
void fold_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                        const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                        const at::Tensor& var, std::optional<double> momentum, int64_t count);

}  // namespace fastbn
