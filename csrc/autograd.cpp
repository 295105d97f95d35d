// Autograd of the plain BatchNorm ops (batch_norm_train, batch_norm_eval), for every backend.
//
// In C++ rather than through torch.library.register_autograd in Python: that path measured 30 us
// per call on top of the kernel (a training forward of a tiny tensor: 52 us with inputs that
// require grad, 23 us without), more than a small layer's kernels take, on a GPU above all. The
// fused ops (batch_norm_act_*) keep their Python autograd in python/fastbn/_ops.py, where the
// memory-efficient mode's channel bookkeeping is easier to follow.
//
// torch.compile traces through these the way it traces any C++ autograd kernel: the forward
// redispatches to the op (the fake kernel under tracing) and the backward calls batch_norm_backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastbn {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;

// The ops below autograd, looked up once.
Tensors3 batch_norm_train(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                          double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm_train", "")
                             .typed<Tensors3(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, double)>();
  return op.call(input, weight, bias, eps);
}

Tensor batch_norm_eval(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                       const Tensor& running_mean, const Tensor& running_var, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm_eval", "")
                             .typed<Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                           const Tensor&, const Tensor&, double)>();
  return op.call(input, weight, bias, running_mean, running_var, eps);
}

Tensors3 batch_norm_backward(const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
                             const Tensor& mean, const Tensor& var, double eps, bool training,
                             std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastbn::batch_norm_backward", "")
          .typed<Tensors3(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, double,
                          bool, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, mean, var, eps, training, output_mask);
}

// What both forwards save besides tensors: eps and the parameters' dtypes (the kernels return
// parameter grads in the accumulation dtype; they go back in the parameters' own).
void save_scalars(AutogradContext* ctx, const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  auto dtype_of = [](const optional<Tensor>& t) {
    return t.has_value() && t->defined() ? int64_t(t->scalar_type()) : int64_t(-1);
  };
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["weight_dtype"] = dtype_of(weight);
  ctx->saved_data["bias_dtype"] = dtype_of(bias);
}

// Which of (input, weight, bias) need a grad. needs_input_grad counts the tensors the forward was
// given, an absent weight or bias not among them, rather than argument positions.
std::array<bool, 3> grads_needed(AutogradContext* ctx) {
  const bool has_weight = ctx->saved_data["weight_dtype"].toInt() >= 0;
  const bool has_bias = ctx->saved_data["bias_dtype"].toInt() >= 0;
  size_t tensor = 0;
  const bool input = ctx->needs_input_grad(tensor++);
  const bool weight = has_weight && ctx->needs_input_grad(tensor++);
  const bool bias = has_bias && ctx->needs_input_grad(tensor);
  return {input, weight, bias};
}

// Saved tensors: input, weight (undefined when absent), and the statistics normalized with.
variable_list backward_of(AutogradContext* ctx, const Tensor& grad_output, bool training, size_t num_inputs) {
  const variable_list saved = ctx->get_saved_variables();
  const std::array<bool, 3> mask = grads_needed(ctx);
  const optional<Tensor> weight = saved[1].defined() ? optional<Tensor>(saved[1]) : std::nullopt;
  // Without create_graph nothing records these grads: the call goes below autograd, past the
  // fallback that would check every argument for one that requires grad.
  optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  auto [grad_input, grad_weight, grad_bias] = batch_norm_backward(
      grad_output, saved[0], weight, saved[2], saved[3], ctx->saved_data["eps"].toDouble(), training, mask);
  auto in_dtype = [&](const Tensor& grad, const char* key) {
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
    return grad.scalar_type() == dtype ? grad : grad.to(dtype);
  };
  variable_list grads(num_inputs);  // undefined: no grad (statistics, eps)
  if (mask[0]) grads[0] = grad_input;
  if (mask[1]) grads[1] = in_dtype(grad_weight, "weight_dtype");
  if (mask[2]) grads[2] = in_dtype(grad_bias, "bias_dtype");
  return grads;
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, var] = batch_norm_train(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var});
    save_scalars(ctx, weight, bias, eps);
    // The statistics feed the running averages and the backward; they are not differentiated.
    ctx->mark_non_differentiable({mean, var});
    return {output, mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_of(ctx, grad_outputs[0], /*training=*/true, 4);
  }
};

class EvalFunction : public torch::autograd::Function<EvalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const Tensor& running_mean, const Tensor& running_var,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor output = batch_norm_eval(input, weight, bias, running_mean, running_var, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), running_mean, running_var});
    save_scalars(ctx, weight, bias, eps);
    return {output};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_of(ctx, grad_outputs[0], /*training=*/false, 6);
  }
};

// Whether a call must go through its Function to record a graph node. Function::apply builds the
// node, its context and the saved scalars even when nothing needs a grad. Skipping them saves a
// fixed cost per call, most with cold caches (a layer's first touch of this code in a step): the
// eval op on a tiny input after a 256 MB copy took 0.165 -> 0.130 ms (torch.batch_norm's 0.125). A
// forward-mode tangent still goes through apply, which reports that these Functions have no jvp.
template <typename... Tensors>
bool needs_graph(const Tensors&... tensors) {
  auto tracked = [](const Tensor& t) { return t.defined() && (t.requires_grad() || t._fw_grad(0).defined()); };
  return at::GradMode::is_enabled() && (tracked(tensors) || ...);
}

Tensors3 batch_norm_train_autograd(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                   double eps) {
  if (!needs_graph(input, weight.value_or(Tensor()), bias.value_or(Tensor()))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_train(input, weight, bias, eps);
  }
  const variable_list out = TrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor batch_norm_eval_autograd(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                const Tensor& running_mean, const Tensor& running_var, double eps) {
  if (!needs_graph(input, weight.value_or(Tensor()), bias.value_or(Tensor()), running_mean, running_var)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_eval(input, weight, bias, running_mean, running_var, eps);
  }
  return EvalFunction::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace fastbn
