// Autograd of the fastbn ops (batch_norm_train, batch_norm_eval and their fused forms
// batch_norm_act_*), for every backend.
//
// In C++ rather than through torch.library.register_autograd in Python: that path measured 30 us
// per call on top of the kernel (a training forward of a tiny tensor: 52 us with inputs that
// require grad, 23 us without), more than a small layer's kernels take, on a GPU above all.
//
// torch.compile traces through these the way it traces any C++ autograd kernel: the forward
// redispatches to the op (the fake kernel under tracing) and the backward calls the backward op.
// With create_graph the backward differentiates a recomputed composite instead (recorded_grads);
// the backward ops themselves, and SyncBatchNorm's pieces, refuse to be differentiated.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "batch_norm_math.h"

namespace fastbn {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The ops below autograd, looked up once.
Tensors3 batch_norm_train(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                          double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
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

Tensors3 batch_norm_act_train(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                              const optional<Tensor>& residual, double eps, int64_t activation, double param,
                              bool memory_efficient) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::batch_norm_act_train", "")
                             .typed<Tensors3(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                             const optional<Tensor>&, double, int64_t, double, bool)>();
  return op.call(input, weight, bias, residual, eps, activation, param, memory_efficient);
}

Tensor batch_norm_act_eval(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                           const optional<Tensor>& residual, const Tensor& running_mean, const Tensor& running_var,
                           double eps, int64_t activation, double param, bool memory_efficient) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastbn::batch_norm_act_eval", "")
          .typed<Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                        const Tensor&, const Tensor&, double, int64_t, double, bool)>();
  return op.call(input, weight, bias, residual, running_mean, running_var, eps, activation, param, memory_efficient);
}

Tensors4 batch_norm_act_backward(const Tensor& grad_output, const Tensor& saved, bool saved_is_output,
                                 const optional<Tensor>& weight, const optional<Tensor>& bias,
                                 const optional<Tensor>& residual, const Tensor& mean, const Tensor& var, double eps,
                                 bool training, int64_t activation, double param, std::array<bool, 4> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastbn::batch_norm_act_backward", "")
          .typed<Tensors4(const Tensor&, const Tensor&, bool, const optional<Tensor>&, const optional<Tensor>&,
                          const optional<Tensor>&, const Tensor&, const Tensor&, double, bool, int64_t, double,
                          std::array<bool, 4>)>();
  return op.call(grad_output, saved, saved_is_output, weight, bias, residual, mean, var, eps, training, activation,
                 param, output_mask);
}

bool given(const optional<Tensor>& t) { return t.has_value() && t->defined(); }
Tensor or_undefined(const optional<Tensor>& t) { return given(t) ? *t : Tensor(); }
optional<Tensor> or_nullopt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// What every forward saves besides tensors: eps and the parameters' dtypes (the kernels return
// parameter grads in the accumulation dtype; they go back in the parameters' own).
void save_scalars(AutogradContext* ctx, const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  auto dtype_of = [](const optional<Tensor>& t) { return given(t) ? int64_t(t->scalar_type()) : int64_t(-1); };
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["weight_dtype"] = dtype_of(weight);
  ctx->saved_data["bias_dtype"] = dtype_of(bias);
}

// Which of the differentiable arguments (input, weight, bias[, residual]) need a grad, of those
// `present`. needs_input_grad counts the tensors the forward was given, an absent optional not
// among them, rather than argument positions.
template <size_t K>
std::array<bool, K> grads_needed(AutogradContext* ctx, const std::array<bool, K>& present) {
  std::array<bool, K> needed{};
  size_t tensor = 0;
  for (size_t i = 0; i < K; ++i) needed[i] = present[i] && ctx->needs_input_grad(tensor++);
  return needed;
}

std::array<bool, 3> params_present(AutogradContext* ctx) {
  return {true, ctx->saved_data["weight_dtype"].toInt() >= 0, ctx->saved_data["bias_dtype"].toInt() >= 0};
}

// The grads in the forward's argument positions (num_inputs of them), those not needed undefined,
// the parameters' (positions 1 and 2) in the parameters' own dtypes.
template <size_t K>
variable_list grads_by_position(AutogradContext* ctx, size_t num_inputs, const std::array<bool, K>& needed,
                                const std::array<Tensor, K>& grads) {
  auto in_dtype = [&](const Tensor& grad, const char* key) {
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
    return grad.scalar_type() == dtype ? grad : grad.to(dtype);
  };
  variable_list out(num_inputs);  // undefined: no grad (statistics, scalars)
  for (size_t i = 0; i < K; ++i)
    if (needed[i]) out[i] = i == 1 ? in_dtype(grads[i], "weight_dtype")
                          : i == 2 ? in_dtype(grads[i], "bias_dtype")
                                   : grads[i];
  return out;
}

// ---- grads of grads -----------------------------------------------------------------------------
//
// With create_graph the grads must be differentiable themselves, which the kernels' are not. The
// backward then recomputes the forward from the saved tensors with differentiable ATen ops (the
// composite BatchNorm, in the accumulation dtype, statistics taken from the input in training)
// and differentiates that: grads of grads follow torch's own formulas. Only that call pays for
// the recomputation.
struct Forward {
  Tensor input, weight, bias, residual;  // undefined when absent
  Tensor running_mean, running_var;      // eval only
  double eps;
  bool training;
  Activation activation = Activation::Identity;
  double param = 0;
};

// The kernels' accumulation dtype: float64 for float64, float32 otherwise.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Every dimension but the channels' (1): what the statistics and the parameter grads sum over.
std::vector<int64_t> non_channel_dims(int64_t dim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  return dims;
}

Tensor composite_forward(const Forward& f) {
  const auto acc = acc_type(f.input.scalar_type());
  const Tensor x = f.input.to(acc);
  const std::vector<int64_t> dims = non_channel_dims(x.dim());
  std::vector<int64_t> channel_shape(x.dim(), 1);
  channel_shape[1] = x.size(1);
  auto per_channel = [&](const Tensor& t) { return t.to(acc).view(channel_shape); };
  Tensor mean, var;
  if (f.training)
    std::tie(var, mean) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/true);
  else  // constants, as in the first backward
    mean = per_channel(f.running_mean.detach()), var = per_channel(f.running_var.detach());
  Tensor y = (x - mean) * (var + f.eps).rsqrt();
  if (f.weight.defined()) y = y * per_channel(f.weight);
  if (f.bias.defined()) y = y + per_channel(f.bias);
  if (f.residual.defined()) y = y + f.residual.to(acc);
  switch (f.activation) {
    case Activation::Identity: break;
    case Activation::ReLU: y = at::relu(y); break;
    case Activation::LeakyReLU: y = at::leaky_relu(y, f.param); break;
    case Activation::ELU: y = at::elu(y, f.param); break;
    case Activation::SiLU: y = at::silu(y); break;
  }
  return y.to(f.input.scalar_type());
}

// The grads of (input, weight, bias, residual) asked for, by differentiating composite_forward.
variable_list recorded_grads(const Forward& f, const Tensor& grad_output, const std::array<bool, 4>& needed,
                             size_t num_inputs) {
  const std::array<Tensor, 4> inputs{f.input, f.weight, f.bias, f.residual};
  variable_list wrt;
  for (size_t i = 0; i < 4; ++i)
    if (needed[i]) wrt.push_back(inputs[i]);
  const variable_list grads = torch::autograd::grad({composite_forward(f)}, wrt, {grad_output},
                                                    /*retain_graph=*/true, /*create_graph=*/true,
                                                    /*allow_unused=*/true);
  variable_list out(num_inputs);
  for (size_t i = 0, k = 0; i < 4; ++i)
    if (needed[i]) out[i] = grads[k++];
  return out;
}

// Plain BatchNorm. Saved tensors: input, weight (undefined when absent), and the statistics
// normalized with.
variable_list backward_of(AutogradContext* ctx, const Tensor& grad_output, bool training, size_t num_inputs) {
  const variable_list saved = ctx->get_saved_variables();
  const std::array<bool, 3> needed = grads_needed(ctx, params_present(ctx));
  const double eps = ctx->saved_data["eps"].toDouble();
  if (at::GradMode::is_enabled()) {  // create_graph
    // The bias is not saved: its grad is the sum of dy over all but the channel dimension.
    const Forward f{saved[0], saved[1], Tensor(), Tensor(), saved[2], saved[3], eps, training};
    variable_list grads = recorded_grads(f, grad_output, {needed[0], needed[1], false, false}, num_inputs);
    if (needed[2]) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      grads[2] = grad_output.to(acc_type(dtype)).sum(non_channel_dims(grad_output.dim())).to(dtype);
    }
    return grads;
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing records these grads
  auto [grad_input, grad_weight, grad_bias] =
      batch_norm_backward(grad_output, saved[0], or_nullopt(saved[1]), saved[2], saved[3], eps, training, needed);
  return grads_by_position<3>(ctx, num_inputs, needed, {grad_input, grad_weight, grad_bias});
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, var] = batch_norm_train(input, weight, bias, eps);
    ctx->save_for_backward({input, or_undefined(weight), mean, var});
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
    ctx->save_for_backward({input, or_undefined(weight), running_mean, running_var});
    save_scalars(ctx, weight, bias, eps);
    return {output};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_of(ctx, grad_outputs[0], /*training=*/false, 6);
  }
};

// ---- the fused ops: act(BN(input) + residual) ------------------------------------------------
//
// Standard mode saves the input (and the residual, to recompute the pre-activation). Memory-
// efficient mode saves the output instead, from which the backward recovers x = (act^-1(y) - bias
// - residual) / scale + mean. Where |weight| is 0, or small next to |bias| (the recovery would
// lose more than 4 bits), that channel's input is kept as well and its grads are computed from it.
constexpr double kRecoveryMargin = 16.0;

// The channels whose input memory-efficient mode keeps (undefined when none).
Tensor kept_channels(const optional<Tensor>& weight, const optional<Tensor>& bias) {
  if (!given(weight)) return Tensor();  // the scale is invstd, never 0
  Tensor small = weight->eq(0);
  if (given(bias)) small = small.logical_or(bias->abs().gt(weight->abs().mul(kRecoveryMargin)));
  Tensor kept = small.nonzero().flatten();
  return kept.numel() > 0 ? kept : Tensor();
}

// Which channels keep their input depends on the weight's values, which a traced graph cannot
// size: under torch.compile (fake or functional tensors, both Python-dispatched) and on the meta
// device memory-efficient mode saves the input, as standard mode does.
bool traced(const Tensor& t) { return t.is_meta() || t.key_set().has(c10::DispatchKey::Python); }

// Saved tensors: the input or the output, weight, bias, residual (undefined when absent), the
// statistics normalized with, the kept channels and their input (undefined when none).
void save_fused(AutogradContext* ctx, const Tensor& input, const Tensor& output, const optional<Tensor>& weight,
                const optional<Tensor>& bias, const optional<Tensor>& residual, const Tensor& mean, const Tensor& var,
                double eps, int64_t activation, double param, bool memory_efficient) {
  const bool recover = memory_efficient && !traced(input);
  const Tensor kept = recover ? kept_channels(weight, bias) : Tensor();
  ctx->save_for_backward({recover ? output : input, or_undefined(weight), or_undefined(bias), or_undefined(residual),
                          mean, var, kept, kept.defined() ? input.index_select(1, kept) : Tensor()});
  save_scalars(ctx, weight, bias, eps);
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["param"] = param;
  ctx->saved_data["recover"] = recover;
  ctx->saved_data["has_residual"] = given(residual);
}

variable_list fused_backward_of(AutogradContext* ctx, const Tensor& grad_output, bool training, size_t num_inputs) {
  const variable_list saved = ctx->get_saved_variables();
  const auto [_, has_weight, has_bias] = params_present(ctx);
  const std::array<bool, 4> needed =
      grads_needed<4>(ctx, {true, has_weight, has_bias, ctx->saved_data["has_residual"].toBool()});
  const double eps = ctx->saved_data["eps"].toDouble(), param = ctx->saved_data["param"].toDouble();
  const int64_t activation = ctx->saved_data["activation"].toInt();
  const Tensor &weight = saved[1], &bias = saved[2], &residual = saved[3], &mean = saved[4], &var = saved[5];
  const Tensor &kept = saved[6], &kept_input = saved[7];
  const bool recover = ctx->saved_data["recover"].toBool();
  if (at::GradMode::is_enabled()) {  // create_graph
    TORCH_CHECK(!recover, "batch_norm_act: grads of grads (create_graph=True) need the input, which "
                "memory_efficient=True does not keep; use memory_efficient=False");
    const Forward f{saved[0], weight, bias, residual, mean, var, eps, training, Activation(activation), param};
    return recorded_grads(f, grad_output, needed, num_inputs);
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing records these grads
  auto [grad_input, grad_weight, grad_bias, grad_residual] =
      batch_norm_act_backward(grad_output, saved[0], recover, or_nullopt(weight), or_nullopt(bias),
                              or_nullopt(residual), mean, var, eps, training, activation, param, needed);
  std::array<Tensor, 4> grads{grad_input, grad_weight, grad_bias, grad_residual};
  if (kept.defined()) {  // those channels again, from their input
    auto pick = [&](const Tensor& t, int64_t dim) { return or_nullopt(t.defined() ? t.index_select(dim, kept) : t); };
    auto [gi, gw, gb, gr] = batch_norm_act_backward(
        grad_output.index_select(1, kept), kept_input, false, pick(weight, 0), pick(bias, 0), pick(residual, 1),
        mean.index_select(0, kept), var.index_select(0, kept), eps, training, activation, param, needed);
    const std::array<Tensor, 4> part{gi, gw, gb, gr};
    for (size_t k = 0; k < 4; ++k)
      if (needed[k]) grads[k] = grads[k].index_copy(grads[k].dim() == 1 ? 0 : 1, kept, part[k]);
  }
  return grads_by_position<4>(ctx, num_inputs, needed, grads);
}

class FusedTrainFunction : public torch::autograd::Function<FusedTrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& residual, double eps,
                               int64_t activation, double param, bool memory_efficient) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, var] =
        batch_norm_act_train(input, weight, bias, residual, eps, activation, param, memory_efficient);
    save_fused(ctx, input, output, weight, bias, residual, mean, var, eps, activation, param, memory_efficient);
    ctx->mark_non_differentiable({mean, var});
    return {output, mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return fused_backward_of(ctx, grad_outputs[0], /*training=*/true, 8);
  }
};

class FusedEvalFunction : public torch::autograd::Function<FusedEvalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& residual,
                               const Tensor& running_mean, const Tensor& running_var, double eps, int64_t activation,
                               double param, bool memory_efficient) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor output = batch_norm_act_eval(input, weight, bias, residual, running_mean, running_var, eps, activation,
                                        param, memory_efficient);
    save_fused(ctx, input, output, weight, bias, residual, running_mean, running_var, eps, activation, param,
               memory_efficient);
    return {output};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return fused_backward_of(ctx, grad_outputs[0], /*training=*/false, 10);
  }
};

// ---- the autograd kernels ----------------------------------------------------------------------

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
  if (!needs_graph(input, or_undefined(weight), or_undefined(bias))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_train(input, weight, bias, eps);
  }
  const variable_list out = TrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor batch_norm_eval_autograd(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                const Tensor& running_mean, const Tensor& running_var, double eps) {
  if (!needs_graph(input, or_undefined(weight), or_undefined(bias), running_mean, running_var)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_eval(input, weight, bias, running_mean, running_var, eps);
  }
  return EvalFunction::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

Tensors3 batch_norm_act_train_autograd(const Tensor& input, const optional<Tensor>& weight,
                                       const optional<Tensor>& bias, const optional<Tensor>& residual, double eps,
                                       int64_t activation, double param, bool memory_efficient) {
  if (!needs_graph(input, or_undefined(weight), or_undefined(bias), or_undefined(residual))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_act_train(input, weight, bias, residual, eps, activation, param, memory_efficient);
  }
  const variable_list out =
      FusedTrainFunction::apply(input, weight, bias, residual, eps, activation, param, memory_efficient);
  return {out[0], out[1], out[2]};
}

Tensor batch_norm_act_eval_autograd(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                    const optional<Tensor>& residual, const Tensor& running_mean,
                                    const Tensor& running_var, double eps, int64_t activation, double param,
                                    bool memory_efficient) {
  if (!needs_graph(input, or_undefined(weight), or_undefined(bias), or_undefined(residual), running_mean,
                   running_var)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_act_eval(input, weight, bias, residual, running_mean, running_var, eps, activation, param,
                               memory_efficient);
  }
  return FusedEvalFunction::apply(input, weight, bias, residual, running_mean, running_var, eps, activation, param,
                                  memory_efficient)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
  m.impl("batch_norm_act_train", &batch_norm_act_train_autograd);
  m.impl("batch_norm_act_eval", &batch_norm_act_eval_autograd);
  // The pieces have no derivatives (grads of grads recompute, see recorded_grads): differentiating
  // their outputs raises "derivative for ... is not implemented", where custom ops' default
  // fallback only warns and returns wrong grads.
  for (const char* op : {"batch_norm_backward", "batch_norm_act_backward", "batch_norm_stats",
                         "batch_norm_backward_elemt"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastbn
