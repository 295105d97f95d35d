// The CUDA backend: the shared op glue (batch_norm_ops.h) over the CUDA kernels, run on the input's
// device and its current stream, with scratch memory from torch's caching allocator.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <vector>

#include "../batch_norm_ops.h"
#include "kernels.h"

namespace fastbn {
namespace {

// Everything one op call needs to launch: the device set, its current stream, and scratch tensors
// that live until the call returns. Freeing them then is safe: the caching allocator hands their
// memory out again only to work queued after these kernels on the same stream.
class CudaCall {
 public:
  explicit CudaCall(const at::Tensor& like)
      : guard_(like.device()), scratch_options_(like.options().dtype(at::kByte)) {
    TORCH_CHECK(like.dim() < 2 || like.size(1) <= INT_MAX, "batch_norm: at most ", INT_MAX,
                " channels on CUDA, got ", like.size(1));
    int sm_count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, like.get_device()));
    launch_ = {c10::cuda::getCurrentCUDAStream(like.get_device()).stream(), sm_count, &CudaCall::allocate, this};
  }
  CudaCall(const CudaCall&) = delete;
  CudaCall& operator=(const CudaCall&) = delete;

  const cuda::Launch& launch() const { return launch_; }

 private:
  static void* allocate(void* self, size_t bytes) {
    auto* call = static_cast<CudaCall*>(self);
    call->scratch_.push_back(at::empty({int64_t(bytes)}, call->scratch_options_));
    return call->scratch_.back().data_ptr();
  }

  c10::cuda::CUDAGuard guard_;
  at::TensorOptions scratch_options_;
  std::vector<at::Tensor> scratch_;
  cuda::Launch launch_{};
};

Dtype stat_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::Float32;
    case at::kDouble: return Dtype::Float64;
    case at::kHalf: return Dtype::Float16;
    default: return Dtype::BFloat16;
  }
}

struct CudaBackend {
  static void train_forward(const at::Tensor& x, TrainForwardArgs args) {
    CudaCall call(x);
    cuda::train_forward(args, call.launch());
  }
  static void eval_forward(const at::Tensor& x, EvalForwardArgs args) {
    CudaCall call(x);
    cuda::eval_forward(args, call.launch());
  }
  static void backward(const at::Tensor& x, BackwardArgs args) {
    CudaCall call(x);
    cuda::backward(args, call.launch());
  }

  // One kernel instead of the dozen ATen ops of fold_running_stats; momentum=None reads
  // num_batches_tracked on the device, so nothing waits for the GPU.
  static void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
                                   const at::Tensor& var, std::optional<double> momentum, int64_t count) {
    if (!begin_running_stats_update(running_mean, running_var, num_batches_tracked, mean, var, momentum, count))
      return;
    const auto stat_type = running_mean.scalar_type(), batch_type = mean.scalar_type();
    const bool plain_type = stat_type == at::kFloat || stat_type == at::kDouble || stat_type == at::kHalf ||
                            stat_type == at::kBFloat16;
    const bool counter_ok = momentum.has_value() || (num_batches_tracked->scalar_type() == at::kLong &&
                                                     num_batches_tracked->is_cuda());
    if (!(running_mean.is_cuda() && plain_type && running_var.scalar_type() == stat_type &&
          running_mean.is_contiguous() && running_var.is_contiguous() && var.scalar_type() == batch_type &&
          (batch_type == at::kFloat || batch_type == at::kDouble) && mean.is_contiguous() && var.is_contiguous() &&
          counter_ok))
      return fold_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
    CudaCall call(running_mean);
    cuda::update_running_stats({stat_dtype(stat_type), running_mean.data_ptr(), running_var.data_ptr(),
                                batch_type == at::kDouble, mean.const_data_ptr(), var.const_data_ptr(), mean.numel(),
                                momentum.value_or(0.0),
                                momentum.has_value() ? nullptr : num_batches_tracked->const_data_ptr<int64_t>(),
                                double(count) / double(count - 1)},
                               call.launch());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) { register_batch_norm_ops<CudaBackend>(m); }

}  // namespace fastbn
