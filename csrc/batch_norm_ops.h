// The fastbn ops for any backend: argument checks in torch's words, layout and dtype, outputs, then
// the backend's kernels. Each backend file registers them with its TORCH_LIBRARY_IMPL block through
// register_batch_norm_ops<Backend>, where Backend provides
//   static void train_forward(const at::Tensor& x, TrainForwardArgs args);
//   static void eval_forward(const at::Tensor& x, EvalForwardArgs args);
//   static void backward(const at::Tensor& x, BackwardArgs args);
// (x: the input as the kernels read it, for the device) and update_running_stats.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "batch_norm_common.h"
#include "kernel_args.h"

namespace fastbn {
namespace glue {

using at::Tensor;
using std::optional;

inline Dtype kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return Dtype::Float32;
    case at::kDouble:
      return Dtype::Float64;
    case at::kHalf:
      return Dtype::Float16;
    case at::kBFloat16:
      return Dtype::BFloat16;
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "\"batch_norm\" not implemented for '", c10::toString(type), "'");
  }
}

// The input seen by the kernels: [N][C][spatial], or [N*spatial][C] for channels_last.
inline Geometry kernel_geometry(const Tensor& input, at::MemoryFormat format) {
  const int64_t channels = input.size(1);
  const int64_t spatial = input.size(0) == 0 ? 0 : values_per_channel(input) / input.size(0);
  if (format == at::MemoryFormat::Contiguous) return {input.size(0), channels, spatial};
  return {input.size(0) * spatial, channels, 1};
}

inline const void* data_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

inline Activation checked_activation(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= int64_t(Activation::SiLU), "batch_norm_act: unknown activation code ", code,
              " (0 identity, 1 relu, 2 leaky_relu, 3 elu, 4 silu)");
  return static_cast<Activation>(code);
}

// The input as the kernels read it (laid out in its kernel memory format), and how they see it.
struct KernelInput {
  at::MemoryFormat format;
  Tensor x;
  Dtype dtype;
  Geometry geometry;

  explicit KernelInput(const Tensor& input)
      : format(kernel_memory_format(input)),
        x(input.contiguous(format)),
        dtype(kernel_dtype(x.scalar_type())),
        geometry(kernel_geometry(x, format)) {}

  Tensor new_output() const { return at::empty(x.sizes(), x.options().memory_format(format)); }
  Tensor new_channel_stat(int64_t size) const {
    return at::empty({size}, x.options().dtype(accumulate_type(x.scalar_type())));
  }
};

// The residual laid out as the input (the kernels walk both in the same order), checked.
inline Tensor residual_like(const optional<Tensor>& residual, const KernelInput& in, const Tensor& input) {
  if (!residual.has_value() || !residual->defined()) return Tensor();
  TORCH_CHECK(residual->sizes() == input.sizes(), "batch_norm_act: residual has shape ", residual->sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "batch_norm_act: residual has dtype ",
              residual->scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(residual->device() == input.device(), "batch_norm_act: residual is on ", residual->device(),
              " but input is on ", input.device());
  return residual->contiguous(in.format);
}

inline Epilogue make_epilogue(const Tensor& residual, int64_t activation, double param) {
  return {data_or_null(residual), checked_activation(activation), param};
}

// The checks shared by both backward ops; returns grad_output laid out as the input.
inline Tensor check_backward_args(const Tensor& grad_output, const KernelInput& in, const Tensor& input,
                                  const optional<Tensor>& weight, const Tensor& mean, const Tensor& var) {
  check_param(weight, "weight", input);
  check_param(mean, "mean", input);
  check_param(var, "var", input);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "batch_norm_backward: grad_output has shape ", grad_output.sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "batch_norm_backward: grad_output has dtype ",
              grad_output.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "batch_norm_backward: grad_output is on ",
              grad_output.device(), " but input is on ", input.device());
  return grad_output.contiguous(in.format);  // the kernels walk both in the same order
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> train_forward(const Tensor& input, const optional<Tensor>& weight,
                                                 const optional<Tensor>& bias, const optional<Tensor>& residual,
                                                 double eps, int64_t activation, double param) {
  check_input(input);
  check_param(weight, "weight", input);
  check_param(bias, "bias", input);
  const KernelInput in(input);
  const Tensor r = residual_like(residual, in, input);
  Tensor output = in.new_output();
  Tensor mean = in.new_channel_stat(in.geometry.channels), var = in.new_channel_stat(in.geometry.channels);
  const Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  Backend::train_forward(
      in.x, {in.dtype, in.geometry, in.x.const_data_ptr(), output.data_ptr(), data_or_null(w), data_or_null(b),
             mean.data_ptr(), var.data_ptr(), eps, make_epilogue(r, activation, param)});
  return {output, mean, var};
}

template <class Backend>
Tensor eval_forward(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const optional<Tensor>& residual, const Tensor& running_mean, const Tensor& running_var, double eps,
                    int64_t activation, double param) {
  check_input(input);
  check_param(weight, "weight", input);
  check_param(bias, "bias", input);
  check_param(running_mean, "running_mean", input);
  check_param(running_var, "running_var", input);
  const KernelInput in(input);
  const Tensor r = residual_like(residual, in, input);
  Tensor output = in.new_output();
  const Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  const Tensor mean = param_as_acc(running_mean, in.x), var = param_as_acc(running_var, in.x);
  Backend::eval_forward(
      in.x, {in.dtype, in.geometry, in.x.const_data_ptr(), output.data_ptr(), data_or_null(w), data_or_null(b),
             mean.const_data_ptr(), var.const_data_ptr(), eps, make_epilogue(r, activation, param)});
  return output;
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, double eps) {
  return train_forward<Backend>(input, weight, bias, std::nullopt, eps, 0, 0.0);
}

template <class Backend>
Tensor batch_norm_eval(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                       const Tensor& running_mean, const Tensor& running_var, double eps) {
  return eval_forward<Backend>(input, weight, bias, std::nullopt, running_mean, running_var, eps, 0, 0.0);
}

// memory_efficient only tells autograd what to save (see python/fastbn/_ops.py); the forward is the same.
template <class Backend>
std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train(const Tensor& input, const optional<Tensor>& weight,
                                                        const optional<Tensor>& bias, const optional<Tensor>& residual,
                                                        double eps, int64_t activation, double param, bool) {
  return train_forward<Backend>(input, weight, bias, residual, eps, activation, param);
}

template <class Backend>
Tensor batch_norm_act_eval(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                           const optional<Tensor>& residual, const Tensor& running_mean, const Tensor& running_var,
                           double eps, int64_t activation, double param, bool) {
  return eval_forward<Backend>(input, weight, bias, residual, running_mean, running_var, eps, activation, param);
}

template <class Backend>
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_input(input);
  const KernelInput in(input);
  Tensor mean = in.new_channel_stat(in.geometry.channels), var = in.new_channel_stat(in.geometry.channels);
  Backend::train_forward(in.x, {in.dtype, in.geometry, in.x.const_data_ptr(), nullptr, nullptr, nullptr,
                                mean.data_ptr(), var.data_ptr(), 0.0});
  return {mean, var};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& saved,
                                                    bool saved_is_output, const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, const optional<Tensor>& residual,
                                                    const Tensor& mean, const Tensor& var, double eps, bool training,
                                                    int64_t activation, double param, std::array<bool, 4> output_mask,
                                                    const optional<Tensor>& mean_dy = std::nullopt,
                                                    const optional<Tensor>& mean_dy_xhat = std::nullopt) {
  check_input(saved);
  const KernelInput in(saved);
  const Tensor dy = check_backward_args(grad_output, in, saved, weight, mean, var);
  check_param(bias, "bias", saved);
  check_param(mean_dy, "mean_dy", saved);
  check_param(mean_dy_xhat, "mean_dy_xhat", saved);
  const Tensor r = residual_like(residual, in, saved);
  const Epilogue epilogue = make_epilogue(r, activation, param);
  TORCH_CHECK(!saved_is_output || epilogue.activation == Activation::Identity ||
                  (epilogue.activation == Activation::LeakyReLU && param > 0),
              "batch_norm_act_backward: the input can be recovered from the output only for identity and "
              "leaky_relu with a positive slope");
  const int64_t channels = in.geometry.channels;
  Tensor grad_input = output_mask[0] ? in.new_output() : at::empty({0}, in.x.options());
  Tensor grad_weight = in.new_channel_stat(output_mask[1] ? channels : 0);
  Tensor grad_bias = in.new_channel_stat(output_mask[2] ? channels : 0);
  Tensor grad_residual = output_mask[3] ? in.new_output() : Tensor();  // only batch_norm_act_backward returns it
  const Tensor w = param_as_acc(weight, in.x), b = param_as_acc(bias, in.x);
  const Tensor m = param_as_acc(mean, in.x), v = param_as_acc(var, in.x);
  const Tensor gm = param_as_acc(mean_dy, in.x), gx = param_as_acc(mean_dy_xhat, in.x);
  BackwardArgs args{in.dtype,
                    in.geometry,
                    dy.const_data_ptr(),
                    saved_is_output ? nullptr : in.x.const_data_ptr(),
                    data_or_null(w),
                    m.const_data_ptr(),
                    v.const_data_ptr(),
                    eps,
                    training,
                    data_or_null(gm),
                    data_or_null(gx),
                    output_mask[0] ? grad_input.data_ptr() : nullptr,
                    output_mask[1] ? grad_weight.data_ptr() : nullptr,
                    output_mask[2] ? grad_bias.data_ptr() : nullptr};
  args.epilogue = epilogue;
  args.bias = data_or_null(b);
  args.output = saved_is_output ? in.x.const_data_ptr() : nullptr;
  args.grad_residual = output_mask[3] ? grad_residual.data_ptr() : nullptr;
  Backend::backward(in.x, args);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_output, const Tensor& input,
                                                       const optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& var, double eps, bool training,
                                                       std::array<bool, 3> output_mask) {
  auto [gi, gw, gb, gr] =
      backward<Backend>(grad_output, input, false, weight, std::nullopt, std::nullopt, mean, var, eps, training, 0, 0.0,
                        {output_mask[0], output_mask[1], output_mask[2], false});
  return {gi, gw, gb};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward(
    const Tensor& grad_output, const Tensor& saved, bool saved_is_output, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps,
    bool training, int64_t activation, double param, std::array<bool, 4> output_mask) {
  auto grads = backward<Backend>(grad_output, saved, saved_is_output, weight, bias, residual, mean, var, eps, training,
                                 activation, param, output_mask);
  if (!output_mask[3]) std::get<3>(grads) = at::empty({0}, saved.options());
  return grads;
}

// SyncBatchNorm's input gradient: the training backward fed the global means of dy and dy * x_hat.
template <class Backend>
Tensor batch_norm_backward_elemt(const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& var, double eps, const Tensor& mean_dy,
                                 const Tensor& mean_dy_xhat) {
  return std::get<0>(backward<Backend>(grad_output, input, false, weight, std::nullopt, std::nullopt, mean, var, eps,
                                       true, 0, 0.0, {true, false, false, false}, mean_dy, mean_dy_xhat));
}

}  // namespace glue

template <class Backend>
void register_batch_norm_ops(torch::Library& m) {
  m.impl("batch_norm_train", &glue::batch_norm_train<Backend>);
  m.impl("batch_norm_eval", &glue::batch_norm_eval<Backend>);
  m.impl("batch_norm_backward", &glue::batch_norm_backward<Backend>);
  m.impl("batch_norm_act_train", &glue::batch_norm_act_train<Backend>);
  m.impl("batch_norm_act_eval", &glue::batch_norm_act_eval<Backend>);
  m.impl("batch_norm_act_backward", &glue::batch_norm_act_backward<Backend>);
  m.impl("batch_norm_stats", &glue::batch_norm_stats<Backend>);
  m.impl("batch_norm_backward_elemt", &glue::batch_norm_backward_elemt<Backend>);
  m.impl("update_running_stats", &Backend::update_running_stats);
}

}  // namespace fastbn
