// The CPU backend: the shared op glue (batch_norm_ops.h) over the SIMD kernel table in use, run
// with torch's thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../batch_norm_ops.h"
#include "kernels.h"

namespace fastbn {
namespace {

struct CpuBackend {
  // Raw OpenMP regions in a fresh Python thread would ignore torch.set_num_threads: pass torch's count.
  static void train_forward(const at::Tensor&, TrainForwardArgs args) {
    args.num_threads = at::get_num_threads();
    cpu::active_kernels().train_forward(args);
  }
  static void eval_forward(const at::Tensor&, EvalForwardArgs args) {
    args.num_threads = at::get_num_threads();
    cpu::active_kernels().eval_forward(args);
  }
  static void backward(const at::Tensor&, BackwardArgs args) {
    args.num_threads = at::get_num_threads();
    cpu::active_kernels().backward(args);
  }

  static void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                                   const at::Tensor& var, std::optional<double> momentum, int64_t count) {
    if (!begin_running_stats_update(running_mean, running_var, num_batches_tracked, mean, var, momentum, count))
      return;
    const auto stat_type = running_mean.scalar_type(), batch_type = mean.scalar_type();
    const bool plain_type = stat_type == at::kFloat || stat_type == at::kDouble || stat_type == at::kHalf ||
                            stat_type == at::kBFloat16;
    if (!(running_mean.is_cpu() && plain_type && running_var.scalar_type() == stat_type &&
          running_mean.is_contiguous() && running_var.is_contiguous() && var.scalar_type() == batch_type &&
          (batch_type == at::kFloat || batch_type == at::kDouble) && mean.is_contiguous() && var.is_contiguous()))
      return fold_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
    // A plain loop over the batch statistics as the kernels return them (float or double): a dozen
    // small ATen ops would cost ~10 us per layer and step, far more with cold caches.
    const double bessel = double(count) / double(count - 1);
    const double f = momentum.has_value() ? *momentum : 1.0 / double(num_batches_tracked->item<int64_t>());
    const int64_t channels = mean.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, stat_type, "update_running_stats", [&] {
      scalar_t* rm = running_mean.data_ptr<scalar_t>();
      scalar_t* rv = running_var.data_ptr<scalar_t>();
      auto update = [&](const auto* pm, const auto* pv) {
        for (int64_t c = 0; c < channels; ++c) {
          rm[c] = scalar_t((1.0 - f) * double(rm[c]) + f * double(pm[c]));
          rv[c] = scalar_t((1.0 - f) * double(rv[c]) + f * double(pv[c]) * bessel);
        }
      };
      if (batch_type == at::kDouble)
        update(mean.const_data_ptr<double>(), var.const_data_ptr<double>());
      else
        update(mean.const_data_ptr<float>(), var.const_data_ptr<float>());
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CPU, m) { register_batch_norm_ops<CpuBackend>(m); }

}  // namespace fastbn
