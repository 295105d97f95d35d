#include "batch_norm_common.h"

namespace fastbn {

void check_input(const at::Tensor& input) {
  const auto type = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
                              "\"batch_norm\" not implemented for '", c10::toString(type), "'");
  TORCH_CHECK(input.dim() >= 2, "batch_norm: expected input with at least 2 dimensions (N, C, ...), got ",
              input.dim(), "D input");
}

void check_param(const std::optional<at::Tensor>& param, const char* name, const at::Tensor& input) {
  if (!param.has_value() || !param->defined()) return;
  const at::Tensor& p = *param;
  const int64_t channels = input.size(1);
  TORCH_CHECK(p.numel() == channels, name, " should contain ", channels, " elements not ", p.numel());
  TORCH_CHECK(p.device() == input.device(), "batch_norm: ", name, " is on ", p.device(), " but input is on ",
              input.device());
  const auto pt = p.scalar_type(), xt = input.scalar_type();
  const bool reduced = xt == at::kHalf || xt == at::kBFloat16;
  TORCH_CHECK(pt == xt || (reduced && pt == at::kFloat), "mixed dtype (CPU): expect parameter to have scalar type of ",
              reduced ? "Float" : c10::toString(xt), " (batch_norm got ", name, " of ", c10::toString(pt),
              " for input of ", c10::toString(xt), ")");
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor param_as_acc(const std::optional<at::Tensor>& param, const at::Tensor& input) {
  if (!param.has_value() || !param->defined()) return at::Tensor();
  const at::Tensor& p = *param;
  // The usual case (a contiguous vector of the right type) needs no new tensor, nor any dispatch.
  if (p.dim() == 1 && p.scalar_type() == accumulate_type(input.scalar_type()) && p.is_contiguous()) return p;
  return p.reshape({-1}).to(accumulate_type(input.scalar_type())).contiguous();
}

at::MemoryFormat kernel_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

int64_t values_per_channel(const at::Tensor& input) {
  int64_t count = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) count *= input.size(d);
  return count;
}

bool begin_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                                const at::Tensor& var, std::optional<double> momentum, int64_t count) {
  const int64_t channels = mean.numel();
  TORCH_CHECK(running_mean.numel() == channels, "running_mean should contain ", channels, " elements not ",
              running_mean.numel());
  TORCH_CHECK(running_var.numel() == channels, "running_var should contain ", channels, " elements not ",
              running_var.numel());
  TORCH_CHECK(var.numel() == channels, "update_running_stats: mean and var differ in size");
  TORCH_CHECK(running_mean.is_floating_point() && running_var.is_floating_point(),
              "update_running_stats: running statistics must be floating point");
  const bool has_counter = num_batches_tracked.has_value() && num_batches_tracked->defined();
  TORCH_CHECK(momentum.has_value() || has_counter,
              "update_running_stats: momentum=None (cumulative average) needs num_batches_tracked");
  TORCH_CHECK(count != 1, "Expected more than 1 value per channel when training");
  TORCH_CHECK(count >= 0, "update_running_stats: count must be non-negative, got ", count);
  for (const at::Tensor* t : {&running_var, &mean, &var})
    TORCH_CHECK(t->device() == running_mean.device(), "update_running_stats: tensors on ", running_mean.device(),
                " and ", t->device());
  TORCH_CHECK(!has_counter || num_batches_tracked->device() == running_mean.device(),
              "update_running_stats: num_batches_tracked is on ", num_batches_tracked->device());

  if (has_counter) num_batches_tracked->add_(1);
  return count > 0;  // an empty batch has no statistics (torch leaves the running ones alone)
}

void fold_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                        const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                        const at::Tensor& var, std::optional<double> momentum, int64_t count) {
  const double bessel = double(count) / double(count - 1);
  at::Tensor factor = momentum.has_value()
                          ? at::scalar_tensor(*momentum, running_mean.options().dtype(at::kDouble))
                          : num_batches_tracked->to(at::kDouble).reciprocal();
  const auto as_double = [&](const at::Tensor& t) { return t.reshape(running_mean.sizes()).to(at::kDouble); };
  const at::Tensor unbiased = as_double(var) * bessel;
  running_mean.copy_(at::lerp(running_mean.to(at::kDouble), as_double(mean), factor));
  running_var.copy_(at::lerp(running_var.to(at::kDouble), unbiased, factor));
}

}  // namespace fastbn
