// The fastbn operator schemas, declared once. Implementations are registered per backend
// (cpu/batch_norm_cpu.cpp, cuda/batch_norm_cuda.cpp); autograd of the plain ops in autograd.cpp;
// fake kernels in python/fastbn/_ops.py.
//
// The ops are functional so that autograd and torch.compile handle them: the training
// forward returns the batch statistics and a separate mutating op folds them into the running
// statistics. mean/var are in the accumulation dtype (float32, or float64 for float64 input).
#include <torch/library.h>

TORCH_LIBRARY(fastbn, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor mean, Tensor var)",
      tags);
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, float eps) -> Tensor",
      tags);
  // training=False differentiates the eval forward (statistics are constants there).
  // Grads not asked for by output_mask come back as empty tensors.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var,"
      " float eps, bool training, bool[3] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);
  // BatchNorm fused with a residual add and an activation: output = act(BN(input) + residual).
  // activation: 0 identity, 1 relu, 2 leaky_relu, 3 elu, 4 silu; activation_param: leaky_relu's
  // slope, elu's alpha. memory_efficient tells autograd to save the output instead of the input.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps,"
      " int activation, float activation_param, bool memory_efficient)"
      " -> (Tensor output, Tensor mean, Tensor var)",
      tags);
  m.def(
      "batch_norm_act_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor running_mean,"
      " Tensor running_var, float eps, int activation, float activation_param, bool memory_efficient) -> Tensor",
      tags);
  // saved is the input, or the forward's output when saved_is_output (identity and leaky_relu only).
  // grad_residual is the gradient at the pre-activation, which is also the residual's.
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor saved, bool saved_is_output, Tensor? weight,"
      " Tensor? bias, Tensor? residual, Tensor mean, Tensor var, float eps, bool training, int activation,"
      " float activation_param, bool[4] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)",
      tags);
  // SyncBatchNorm's pieces. The statistics of this process's batch (mean and biased variance);
  // then, once the global ones are reduced across processes, batch_norm_eval normalizes with them.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)", tags);
  // The training input gradient from global means of dy and dy * x_hat (reduced across processes):
  // dx = weight * invstd * (dy - mean_dy - x_hat * mean_dy_xhat), x_hat = (x - mean) * invstd.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var,"
      " float eps, Tensor mean_dy, Tensor mean_dy_xhat) -> Tensor",
      tags);
  // running <- (1 - f) * running + f * batch, with the unbiased variance, f = momentum or, when
  // momentum is None, 1 / num_batches_tracked (a cumulative average). num_batches_tracked, when
  // given, is incremented. Every argument is checked before anything is written.
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var,"
      " Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, float? momentum, SymInt count) -> ()",
      tags);
}
