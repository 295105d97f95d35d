// CUDA BatchNorm kernels over raw pointers (no torch headers: this file compiles in seconds).
//
// Every op is a per-channel reduction followed by an elementwise pass:
//   training forward: Welford moments of x            -> mean, var -> y = act((x - mean) * scale + bias + r)
//   backward:         sums of g and g * (x - mean)    -> grads     -> dx = g * dy_scale + (x - mean) * xmu_scale + shift
// where g = act'(z) * dy is the gradient at the pre-activation (dy itself for plain BatchNorm).
//
// Reductions: the tensor is seen as [outer][C][inner] ("planes", NCHW-like) or [rows][C] ("rows":
// (N, C) and channels_last). Planes: one block per (channel, split) walks its slice in 16-byte
// packs; rows: a block's threads own packs of adjacent channels and walk rows, so every warp reads
// contiguous memory. Channels are split across blocks until the grid fills the GPU (torch uses one
// block per channel and leaves SMs idle when C is small). Each thread accumulates in float (double
// for double) with Welford updates, warps merge with shuffles (Chan's formula, batch_norm_math.h),
// blocks write partials, and one thread per channel merges the partials in split order, in double.
// The decomposition depends on the shape and the device only, so results are deterministic.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../batch_norm_math.h"
#include "kernels.h"

namespace fastbn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Blocks per SM the reductions aim for (8 x 256 threads fill an SM's 2048 thread slots).
constexpr int kBlocksPerSm = 8;

template <Dtype D>
struct Types;
template <>
struct Types<Dtype::Float32> {
  using T = float;
  using Acc = float;
};
template <>
struct Types<Dtype::Float64> {
  using T = double;
  using Acc = double;
};
template <>
struct Types<Dtype::Float16> {
  using T = __half;
  using Acc = float;
};
template <>
struct Types<Dtype::BFloat16> {
  using T = __nv_bfloat16;
  using Acc = float;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// (torch builds with __CUDA_NO_HALF_CONVERSIONS__: half types convert through these only)
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}

// N values loaded or stored as one access (16 bytes when N is the vector width).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T, typename Index>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, Index unit) {
  return reinterpret_cast<const Pack<T, N>*>(p)[unit];
}
template <int N, typename T, typename Index>
__device__ __forceinline__ void store_pack(T* p, Index unit, const Pack<T, N>& v) {
  reinterpret_cast<Pack<T, N>*>(p)[unit] = v;
}

// ---------------------------------------------------------------------------------------------
// Activations chosen at run time: the choice is uniform across the grid, so the branch costs
// nothing next to the memory traffic, and each kernel is compiled once instead of once per activation.
template <typename A>
__device__ __forceinline__ A activate(Activation act, A z, A p) {
  switch (act) {
    case Activation::ReLU: return ActivationFn<Activation::ReLU>::forward(z, p);
    case Activation::LeakyReLU: return ActivationFn<Activation::LeakyReLU>::forward(z, p);
    case Activation::ELU: return ActivationFn<Activation::ELU>::forward(z, p);
    case Activation::SiLU: return ActivationFn<Activation::SiLU>::forward(z, p);
    default: return z;
  }
}

template <typename A>
__device__ __forceinline__ A activation_grad(Activation act, A dy, A z, A p) {
  switch (act) {
    case Activation::ReLU: return ActivationFn<Activation::ReLU>::grad(dy, z, p);
    case Activation::LeakyReLU: return ActivationFn<Activation::LeakyReLU>::grad(dy, z, p);
    case Activation::ELU: return ActivationFn<Activation::ELU>::grad(dy, z, p);
    case Activation::SiLU: return ActivationFn<Activation::SiLU>::grad(dy, z, p);
    default: return dy;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel parameters, computed once per channel in double (as the CPU kernels do).
template <typename Acc>
struct ChannelParams {
  Acc mean, scale, bias, inv_scale;  // scale = weight * invstd; inv_scale = 1 / scale (0 where scale is 0)
};

template <typename Acc>
__device__ __forceinline__ ChannelParams<Acc> channel_params(int c, double mean, double var, const Acc* weight,
                                                             const Acc* bias, double eps) {
  const double scale = (weight ? double(weight[c]) : 1.0) * inverse_std(var, eps);
  return {Acc(mean), Acc(scale), bias ? bias[c] : Acc(0), scale != 0.0 ? Acc(1.0 / scale) : Acc(0)};
}

// Per-channel tables the elementwise passes read (one allocation of `kFields` x C values).
template <typename Acc>
struct ChannelTable {
  static constexpr int kFields = 7;
  Acc *mean, *scale, *bias, *inv_scale;  // the forward's affine map
  Acc *dy_scale, *xmu_scale, *shift;     // backward: dx = g * dy_scale + (x - mean) * xmu_scale + shift

  static ChannelTable over(Acc* memory, int64_t C) {
    return {memory, memory + C, memory + 2 * C, memory + 3 * C, memory + 4 * C, memory + 5 * C, memory + 6 * C};
  }
  __device__ void set_affine(int c, const ChannelParams<Acc>& p) const {
    mean[c] = p.mean;
    scale[c] = p.scale;
    bias[c] = p.bias;
    inv_scale[c] = p.inv_scale;
  }
};

// ---------------------------------------------------------------------------------------------
// Reduction states and their merges: Welford moments (forward) and gradient sums (backward).
template <typename Acc>
struct GradSums {
  Acc g, g_xmu;  // sum(g), sum(g * (x - mean))
};

template <typename Acc>
__device__ __forceinline__ Moments<Acc> merge(const Moments<Acc>& a, const Moments<Acc>& b) {
  return merge_moments(a, b);
}
template <typename Acc>
__device__ __forceinline__ GradSums<Acc> merge(const GradSums<Acc>& a, const GradSums<Acc>& b) {
  return {a.g + b.g, a.g_xmu + b.g_xmu};
}

template <typename Acc>
__device__ __forceinline__ Moments<Acc> shuffle_down(const Moments<Acc>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.count, offset), __shfl_down_sync(0xffffffffu, s.mean, offset),
          __shfl_down_sync(0xffffffffu, s.m2, offset)};
}
template <typename Acc>
__device__ __forceinline__ GradSums<Acc> shuffle_down(const GradSums<Acc>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.g, offset), __shfl_down_sync(0xffffffffu, s.g_xmu, offset)};
}

// Merges a 1-D block's states in a fixed tree; the result is valid in thread 0.
template <typename State>
__device__ State block_merge(State s) {
  __shared__ State warp_states[kThreads / kWarp];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s = merge(s, shuffle_down(s, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    s = lane < warps ? warp_states[lane] : State{};
    for (int offset = kWarp / 2; offset > 0; offset /= 2) s = merge(s, shuffle_down(s, offset));
  }
  return s;
}

// Forward statistics. add_same_channel: N values of one channel (planes); add_channels: one value
// each of N adjacent channels (rows).
template <typename T, int N>
struct MomentsOp {
  using Acc = typename std::conditional_t<std::is_same_v<T, double>, double, float>;
  using State = Moments<Acc>;
  const T* x;

  __device__ void begin(int, int) {}
  template <typename Index>
  __device__ void add_same_channel(State& s, Index unit) const {
    const Pack<T, N> p = load_pack<N>(x, unit);
    Acc v[N], mean = 0, m2 = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) mean += (v[k] = to_acc(p.v[k]));
    mean *= Acc(1) / Acc(N);
#pragma unroll
    for (int k = 0; k < N; ++k) m2 += (v[k] - mean) * (v[k] - mean);
    s = merge_moments(s, State{Acc(N), mean, m2});
  }
  template <typename Index>
  __device__ void add_channels(State* s, Index unit) const {
    const Pack<T, N> p = load_pack<N>(x, unit);
    // Welford's update; the pack's channels have seen the same rows, so one reciprocal serves all N
    const Acc count = s[0].count + Acc(1), inv_count = Acc(1) / count;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc v = to_acc(p.v[k]);
      s[k].count = count;
      const Acc delta = v - s[k].mean;
      s[k].mean += delta * inv_count;
      s[k].m2 += delta * (v - s[k].mean);
    }
  }
};

// What the backward passes read of one element, and how they get g and x - mean from it.
template <typename T>
struct GradInputs {
  using Acc = typename std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* dy;
  const T* saved;     // x, or the forward's output y when from_output
  const T* residual;  // or null
  bool from_output;
  Activation activation;
  Acc param;

  __device__ __forceinline__ void element(Acc dyv, Acc sv, Acc rv, const ChannelParams<Acc>& p, Acc& g,
                                          Acc& xmu) const {
    if (from_output) {  // identity or leaky_relu with a positive slope: y > 0 exactly where z > 0
      const Acc z = activation == Activation::LeakyReLU ? ActivationFn<Activation::LeakyReLU>::inverse(sv, param) : sv;
      xmu = (z - p.bias - rv) * p.inv_scale;
      g = activation == Activation::LeakyReLU ? ActivationFn<Activation::LeakyReLU>::grad_from_output(dyv, sv, param)
                                              : dyv;
    } else {
      xmu = sv - p.mean;
      g = activation == Activation::Identity ? dyv : activation_grad(activation, dyv, xmu * p.scale + p.bias + rv, param);
    }
  }
};

// Backward sums. Channel parameters are computed per thread when its channel(s) are known.
template <typename T, int N>
struct GradSumsOp {
  using Acc = typename GradInputs<T>::Acc;
  using State = GradSums<Acc>;
  GradInputs<T> in;
  const Acc *mean, *var, *weight, *bias;
  double eps;
  ChannelParams<Acc> params[N];

  // The parameters of channels [c0, c0 + count): one (planes) or the pack's N (rows).
  __device__ void begin(int c0, int count) {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < count) params[k] = channel_params(c0 + k, double(mean[c0 + k]), double(var[c0 + k]), weight, bias, eps);
  }
  template <typename Index>
  __device__ void add_same_channel(State& s, Index unit) const {
    const Pack<T, N> dy = load_pack<N>(in.dy, unit), sv = load_pack<N>(in.saved, unit);
    Pack<T, N> r;
    if (in.residual) r = load_pack<N>(in.residual, unit);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      Acc g, xmu;
      in.element(to_acc(dy.v[k]), to_acc(sv.v[k]), in.residual ? to_acc(r.v[k]) : Acc(0), params[0], g, xmu);
      s.g += g;
      s.g_xmu += g * xmu;
    }
  }
  template <typename Index>
  __device__ void add_channels(State* s, Index unit) const {
    const Pack<T, N> dy = load_pack<N>(in.dy, unit), sv = load_pack<N>(in.saved, unit);
    Pack<T, N> r;
    if (in.residual) r = load_pack<N>(in.residual, unit);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      Acc g, xmu;
      in.element(to_acc(dy.v[k]), to_acc(sv.v[k]), in.residual ? to_acc(r.v[k]) : Acc(0), params[k], g, xmu);
      s[k].g += g;
      s[k].g_xmu += g * xmu;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The reduction kernels. Planes: block (c, split) covers units [split * per_split, ...) of channel
// c's outer * inner_units packs. Rows: block (group, split) covers rows [split * per_split, ...) of
// blockDim.x packs of channels; threadIdx.y strides over rows.

// Calls fn(unit) for this thread's units of channel c in [u0, u1), in strides of blockDim.x; a unit
// is counted over the channel's outer * inner_units packs, fn gets its index in the whole tensor.
template <typename Index, class Fn>
__device__ __forceinline__ void for_channel_units(int c, int channels, Index inner_units, Index u0, Index u1,
                                                  Fn&& fn) {
  Index u = u0 + threadIdx.x;
  if (u >= u1) return;
  // (plane n, offset j) of unit u, advanced without a division per step.
  Index n = u / inner_units, j = u - n * inner_units;
  const Index step_n = Index(blockDim.x) / inner_units, step_j = Index(blockDim.x) - step_n * inner_units;
  const Index plane_stride = Index(channels) * inner_units, channel_offset = Index(c) * inner_units;
  for (; u < u1; u += blockDim.x) {
    fn(n * plane_stride + channel_offset + j);
    n += step_n;
    j += step_j;
    if (j >= inner_units) {
      j -= inner_units;
      ++n;
    }
  }
}

template <class Op, int N, typename Index>
__global__ void __launch_bounds__(kThreads)
    reduce_planes_kernel(Op op, Index outer, int channels, Index inner_units, Index per_split,
                         typename Op::State* partials) {
  using State = typename Op::State;
  const int c = blockIdx.x;
  const Index units = outer * inner_units;
  const Index u0 = Index(blockIdx.y) * per_split;
  const Index u1 = u0 + per_split < units ? u0 + per_split : units;
  op.begin(c, 1);
  State s{};
  for_channel_units(c, channels, inner_units, u0, u1, [&](Index unit) { op.add_same_channel(s, unit); });
  s = block_merge(s);
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * channels + c] = s;
}

template <class Op, int N, typename Index>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(Op op, Index rows, int channels, Index per_split, typename Op::State* partials) {
  using State = typename Op::State;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  State* shared = reinterpret_cast<State*>(shared_bytes);
  const int packs = channels / N;  // channel packs per row
  const int pack = blockIdx.x * blockDim.x + threadIdx.x;
  const Index r0 = Index(blockIdx.y) * per_split;
  const Index r1 = r0 + per_split < rows ? r0 + per_split : rows;
  State s[N];
#pragma unroll
  for (int k = 0; k < N; ++k) s[k] = State{};
  if (pack < packs) {
    op.begin(pack * N, N);
    for (Index r = r0 + threadIdx.y; r < r1; r += blockDim.y) op.add_channels(s, r * packs + pack);
  }
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * N;
#pragma unroll
  for (int k = 0; k < N; ++k) shared[slot + k] = s[k];
  __syncthreads();
  if (threadIdx.y == 0 && pack < packs) {
    for (int y = 1; y < int(blockDim.y); ++y) {
#pragma unroll
      for (int k = 0; k < N; ++k) s[k] = merge(s[k], shared[(y * blockDim.x + threadIdx.x) * N + k]);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) partials[int64_t(blockIdx.y) * channels + pack * N + k] = s[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Finishing a channel: from its merged sums (in double) to the outputs and the per-channel table.

// Training forward: mean, biased variance and the affine map of the normalize pass.
template <typename Acc>
struct MomentsFinish {
  Acc *mean, *var;
  const Acc *weight, *bias;
  double eps;
  ChannelTable<Acc> table;

  __device__ ChannelParams<Acc> channel(int c, const Moments<double>& s) const {
    const double variance = biased_variance(s);
    mean[c] = Acc(s.mean);
    var[c] = Acc(variance);
    const ChannelParams<Acc> p = channel_params(c, double(Acc(s.mean)), variance, weight, bias, eps);
    table.set_affine(c, p);
    return p;
  }
};

// Backward: parameter grads and the input-gradient coefficients, from this batch's sums or, for
// SyncBatchNorm, from the global means of g and g * x_hat.
template <typename Acc>
struct GradFinish {
  double count;
  bool training;
  const Acc *mean, *var, *weight, *bias;
  double eps;
  const Acc *mean_dy, *mean_dy_xhat;  // SyncBatchNorm's global means, or null
  Acc *grad_weight, *grad_bias;       // or null
  ChannelTable<Acc> table;

  __device__ InputGradCoefficients<Acc> channel(int c, const GradSums<double>& sums) const {
    const double invstd = inverse_std(double(var[c]), eps);
    const double w = weight ? double(weight[c]) : 1.0;
    table.set_affine(c, channel_params(c, double(mean[c]), double(var[c]), weight, bias, eps));
    InputGradCoefficients<double> k;
    if (mean_dy) {  // global means are the sums over a batch of one
      k = input_grad_coefficients(invstd, w, double(mean_dy[c]), double(mean_dy_xhat[c]) / invstd, 1.0, true);
    } else {
      if (grad_weight) grad_weight[c] = Acc(sums.g_xmu * invstd);
      if (grad_bias) grad_bias[c] = Acc(sums.g);
      k = input_grad_coefficients(invstd, w, sums.g, sums.g_xmu, count, training);
    }
    table.dy_scale[c] = Acc(k.dy_scale);
    table.xmu_scale[c] = Acc(k.xmu_scale);
    table.shift[c] = Acc(k.shift);
    return {Acc(k.dy_scale), Acc(k.xmu_scale), Acc(k.shift)};
  }
};

template <typename Acc>
__device__ __forceinline__ Moments<double> in_double(const Moments<Acc>& s) {
  return {double(s.count), double(s.mean), double(s.m2)};
}
template <typename Acc>
__device__ __forceinline__ GradSums<double> in_double(const GradSums<Acc>& s) {
  return {double(s.g), double(s.g_xmu)};
}

// Merges the partials of the reductions: a block per channel, its threads taking the partials in
// strides and merging in a fixed tree, in double (a thread per channel walking a thousand partials
// in a row took 0.3 ms when C is small and the splits many).
template <typename State, class Finish>
__global__ void finish_kernel(const State* partials, int splits, int channels, Finish finish) {
  const int c = blockIdx.x;
  decltype(in_double(State{})) s{};
  for (int i = threadIdx.x; i < splits; i += blockDim.x) s = merge(s, in_double(partials[int64_t(i) * channels + c]));
  s = block_merge(s);
  if (threadIdx.x == 0) finish.channel(c, s);
}

// Eval forward: the affine table from the running statistics.
template <typename Acc>
__global__ void eval_params_kernel(int channels, const Acc* mean, const Acc* var, const Acc* weight, const Acc* bias,
                                   double eps, ChannelTable<Acc> table) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < channels) table.set_affine(c, channel_params(c, double(mean[c]), double(var[c]), weight, bias, eps));
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes over packs of N values: planes packs hold one channel, (inner / N) packs per
// plane; rows packs hold N adjacent channels, (C / N) packs per row. The two are separate kernels
// (kRows) so that a planes kernel does not reserve registers for a rows pack's N channels'
// parameters: ptxas gives the 16-bit backward pass 93 registers with them against 62 without,
// which would halve a planes kernel's occupancy.
template <typename Index, bool kRows>
struct PackChannels {
  static constexpr bool rows = kRows;
  Index inner_units;  // planes: packs per plane
  int channels;
  int pack_size;
  // The channel of a planes pack, or the first channel of a rows pack.
  __device__ __forceinline__ int first(Index unit) const {
    if constexpr (kRows) return int(unit % Index(channels / pack_size)) * pack_size;
    else return int((unit / inner_units) % Index(channels));
  }
};

template <int N, typename Acc>
__device__ __forceinline__ Pack<Acc, N> broadcast(Acc v) {
  Pack<Acc, N> out;
#pragma unroll
  for (int k = 0; k < N; ++k) out.v[k] = v;
  return out;
}

// A table field's values for a pack's channels: the N adjacent channels of a rows pack in one vector
// load (c0 is a multiple of N; per-value loads made a warp touch 8x more L1 lines where C >= 256),
// the one channel of a planes pack broadcast.
template <int N, typename Acc>
__device__ __forceinline__ Pack<Acc, N> channel_values(const Acc* field, int c0, bool rows) {
  return rows ? load_pack<N>(field, c0 / N) : broadcast<N>(field[c0]);
}

// The affine map (forward) and the input-gradient coefficients (backward) of a pack's channels.
template <typename Acc, int N>
struct PackParams {
  Pack<Acc, N> mean, scale, bias, inv_scale;
  Pack<Acc, N> dy_scale, xmu_scale, shift;  // backward only

  __device__ __forceinline__ ChannelParams<Acc> affine(int k) const {
    return {mean.v[k], scale.v[k], bias.v[k], inv_scale.v[k]};
  }
};

template <typename Acc, int N>
__device__ __forceinline__ PackParams<Acc, N> table_values(const ChannelTable<Acc>& t, int c0, bool rows,
                                                           bool backward) {
  PackParams<Acc, N> p;
  p.mean = channel_values<N>(t.mean, c0, rows);
  p.scale = channel_values<N>(t.scale, c0, rows);
  p.bias = channel_values<N>(t.bias, c0, rows);
  if (!backward) return p;
  p.inv_scale = channel_values<N>(t.inv_scale, c0, rows);
  p.dy_scale = channel_values<N>(t.dy_scale, c0, rows);
  p.xmu_scale = channel_values<N>(t.xmu_scale, c0, rows);
  p.shift = channel_values<N>(t.shift, c0, rows);
  return p;
}

// y = act((x - mean) * scale + bias + residual) over pack u.
template <typename T, int N, typename Index, typename Acc>
__device__ __forceinline__ void normalize_pack(const T* x, const T* residual, T* y, Index u,
                                               const PackParams<Acc, N>& p, Activation activation, Acc param) {
  const Pack<T, N> xv = load_pack<N>(x, u);
  Pack<T, N> r, out;
  if (residual) r = load_pack<N>(residual, u);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    Acc z = (to_acc(xv.v[k]) - p.mean.v[k]) * p.scale.v[k] + p.bias.v[k];
    if (residual) z += to_acc(r.v[k]);
    out.v[k] = from_acc<T>(activate(activation, z, param));
  }
  store_pack<N>(y, u, out);
}

// dx = g * dy_scale + (x - mean) * xmu_scale + shift over pack u; the residual's grad is g itself.
template <typename T, int N, typename Index, typename Acc>
__device__ __forceinline__ void grad_input_pack(const GradInputs<T>& in, T* grad_input, T* grad_residual, Index u,
                                                const PackParams<Acc, N>& p) {
  const Pack<T, N> dy = load_pack<N>(in.dy, u), sv = load_pack<N>(in.saved, u);
  Pack<T, N> r, dx, gr;
  if (in.residual) r = load_pack<N>(in.residual, u);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    Acc g, xmu;
    in.element(to_acc(dy.v[k]), to_acc(sv.v[k]), in.residual ? to_acc(r.v[k]) : Acc(0), p.affine(k), g, xmu);
    dx.v[k] = from_acc<T>(g * p.dy_scale.v[k] + xmu * p.xmu_scale.v[k] + p.shift.v[k]);
    gr.v[k] = from_acc<T>(g);
  }
  if (grad_input) store_pack<N>(grad_input, u, dx);
  if (grad_residual) store_pack<N>(grad_residual, u, gr);
}

template <typename T, int N, typename Index, bool kRows>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const T* x, const T* residual, T* y, Index units, PackChannels<Index, kRows> map,
                     ChannelTable<typename GradInputs<T>::Acc> table, Activation activation, double param) {
  using Acc = typename GradInputs<T>::Acc;
  for (Index u = Index(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += Index(gridDim.x) * blockDim.x)
    normalize_pack<T, N>(x, residual, y, u, table_values<Acc, N>(table, map.first(u), kRows, false), activation,
                         Acc(param));
}

template <typename T, int N, typename Index, bool kRows>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(GradInputs<T> in, T* grad_input, T* grad_residual, Index units, PackChannels<Index, kRows> map,
                      ChannelTable<typename GradInputs<T>::Acc> table) {
  using Acc = typename GradInputs<T>::Acc;
  for (Index u = Index(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += Index(gridDim.x) * blockDim.x)
    grad_input_pack<T, N>(in, grad_input, grad_residual, u, table_values<Acc, N>(table, map.first(u), kRows, true));
}

// ---------------------------------------------------------------------------------------------
// One launch instead of three when a block holds a whole channel (planes, one split: channels of
// under 2048 packs, or so many channels that they fill the GPU alone): the block reduces its
// channel, finishes it, and makes its second pass over the slice it has just read, mostly from
// cache. Small layers (14x14, 7x7) are launch-bound on a GPU.

template <typename T, int N, typename Index>
__global__ void __launch_bounds__(kThreads)
    train_forward_planes_kernel(const T* x, const T* residual, T* y, Index outer, int channels, Index inner_units,
                                MomentsFinish<typename GradInputs<T>::Acc> finish, Activation activation,
                                double param) {
  using Acc = typename GradInputs<T>::Acc;
  const int c = blockIdx.x;
  const Index units = outer * inner_units;
  const MomentsOp<T, N> op{x};
  Moments<Acc> s{};
  for_channel_units(c, channels, inner_units, Index(0), units, [&](Index unit) { op.add_same_channel(s, unit); });
  s = block_merge(s);
  __shared__ ChannelParams<Acc> shared;
  if (threadIdx.x == 0) shared = finish.channel(c, in_double(s));
  __syncthreads();
  PackParams<Acc, N> p;
  p.mean = broadcast<N>(shared.mean);
  p.scale = broadcast<N>(shared.scale);
  p.bias = broadcast<N>(shared.bias);
  for_channel_units(c, channels, inner_units, Index(0), units,
                    [&](Index unit) { normalize_pack<T, N>(x, residual, y, unit, p, activation, Acc(param)); });
}

template <typename T, int N, typename Index>
__global__ void __launch_bounds__(kThreads)
    backward_planes_kernel(GradSumsOp<T, N> op, T* grad_input, T* grad_residual, Index outer, int channels,
                           Index inner_units, GradFinish<typename GradInputs<T>::Acc> finish) {
  using Acc = typename GradInputs<T>::Acc;
  const int c = blockIdx.x;
  const Index units = outer * inner_units;
  op.begin(c, 1);
  GradSums<Acc> s{};
  for_channel_units(c, channels, inner_units, Index(0), units, [&](Index unit) { op.add_same_channel(s, unit); });
  s = block_merge(s);
  __shared__ InputGradCoefficients<Acc> shared;
  if (threadIdx.x == 0) shared = finish.channel(c, in_double(s));
  __syncthreads();
  const ChannelParams<Acc>& affine = op.params[0];  // what finish.channel put in the table
  const PackParams<Acc, N> p{broadcast<N>(affine.mean),      broadcast<N>(affine.scale),
                             broadcast<N>(affine.bias),      broadcast<N>(affine.inv_scale),
                             broadcast<N>(shared.dy_scale), broadcast<N>(shared.xmu_scale),
                             broadcast<N>(shared.shift)};
  for_channel_units(c, channels, inner_units, Index(0), units,
                    [&](Index unit) { grad_input_pack<T, N>(op.in, grad_input, grad_residual, unit, p); });
}

template <typename R, typename B>
__global__ void update_running_stats_kernel(R* running_mean, R* running_var, const B* mean, const B* var,
                                            int64_t channels, double momentum, const int64_t* num_batches_tracked,
                                            double bessel) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const double f = num_batches_tracked ? 1.0 / double(*num_batches_tracked) : momentum;
  running_mean[c] = from_acc<R>((1.0 - f) * double(to_acc(running_mean[c])) + f * double(mean[c]));
  running_var[c] = from_acc<R>((1.0 - f) * double(to_acc(running_var[c])) + f * double(var[c]) * bessel);
}

// ---------------------------------------------------------------------------------------------
// Host side: launch geometry, pack width, workspace.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int blocks_for(int64_t items, int per_block = kThreads) { return int(std::max<int64_t>(1, ceil_div(items, per_block))); }

// Threads of a finishing block: a warp, doubled while there are more partials to merge, up to kThreads.
int finish_threads(int splits) {
  int threads = kWarp;
  while (threads < splits && threads < kThreads) threads *= 2;
  return threads;
}

template <typename T>
bool aligned(const void* p, int n) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * n) == 0;
}

// 16-byte packs when the layout and every pointer allow them, else single values.
template <typename T>
int pack_width(const Geometry& g, std::initializer_list<const void*> pointers) {
  constexpr int kVector = 16 / sizeof(T);
  const bool fits = g.inner > 1 ? g.inner % kVector == 0 : g.channels % kVector == 0;
  if (!fits) return 1;
  for (const void* p : pointers)
    if (!aligned<T>(p, kVector)) return 1;
  return kVector;
}

template <typename T>
struct Scratch {
  const Launch& launch;
  T* get(int64_t count) const {
    return static_cast<T*>(launch.allocate(launch.allocate_context, size_t(std::max<int64_t>(count, 1)) * sizeof(T)));
  }
};

// How a planes reduction splits each channel's units (numel > 0): `per_split` units per block, in
// `used` blocks. Channels are split until the grid fills the GPU, keeping >= 4 packs per thread.
struct PlanesSplit {
  int64_t per_split;
  int used;
};
PlanesSplit planes_split(const Geometry& g, int n, const Launch& launch) {
  const int64_t units = g.outer * (g.inner / n);
  const int64_t target = int64_t(launch.sm_count) * kBlocksPerSm;
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(target, g.channels), 1, std::max<int64_t>(1, units / (kThreads * 4)));
  const int64_t per_split = ceil_div(units, splits);
  return {per_split, int(ceil_div(units, per_split))};
}

// Runs a reduction over the whole tensor (numel > 0) into partials[splits][C]; returns the number
// of splits.
template <class Op, int N, typename Index>
int reduce(const Op& op, const Geometry& g, const Launch& launch, typename Op::State** partials_out) {
  using State = typename Op::State;
  const int C = int(g.channels);
  const int64_t target = int64_t(launch.sm_count) * kBlocksPerSm;
  if (g.inner > 1) {
    const auto [per_split, used] = planes_split(g, N, launch);
    State* partials = Scratch<State>{launch}.get(int64_t(used) * C);
    reduce_planes_kernel<Op, N, Index><<<dim3(C, used), kThreads, 0, launch.stream>>>(
        op, Index(g.outer), C, Index(g.inner / N), Index(per_split), partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    *partials_out = partials;
    return used;
  }
  const int packs = C / N;
  int tx = 1;
  while (tx < packs && tx < kWarp) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t groups = ceil_div(packs, tx);
  const int64_t splits = std::clamp<int64_t>(ceil_div(target, groups), 1, std::max<int64_t>(1, g.outer / (ty * 4)));
  const int64_t per_split = ceil_div(g.outer, splits);
  const int used = int(ceil_div(g.outer, per_split));
  State* partials = Scratch<State>{launch}.get(int64_t(used) * C);
  const size_t shared = size_t(kThreads) * N * sizeof(State);
  reduce_rows_kernel<Op, N, Index><<<dim3(unsigned(groups), used), dim3(tx, ty), shared, launch.stream>>>(
      op, Index(g.outer), C, Index(per_split), partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  *partials_out = partials;
  return used;
}

// Calls fn(map) with the elementwise map of g's packs of n values: rows or planes.
template <typename Index, class Fn>
void with_pack_channels(const Geometry& g, int n, Fn&& fn) {
  if (g.inner == 1) fn(PackChannels<Index, true>{Index(1), int(g.channels), n});
  else fn(PackChannels<Index, false>{Index(g.inner / n), int(g.channels), n});
}

int elementwise_blocks(int64_t units, const Launch& launch) {
  return int(std::min<int64_t>(blocks_for(units), int64_t(launch.sm_count) * 32));
}

// y = act((x - mean) * scale + bias [+ residual]) over the whole tensor, from a filled channel
// table: the elementwise pass of both forwards.
template <typename T, int N, typename Index>
void launch_normalize(const Geometry& g, const T* x, const T* residual, T* y,
                      ChannelTable<typename GradInputs<T>::Acc> table, const Epilogue& epilogue,
                      const Launch& launch) {
  const int64_t units = g.outer * g.channels * g.inner / N;
  with_pack_channels<Index>(g, N, [&](auto map) {
    normalize_kernel<T, N, Index, decltype(map)::rows><<<elementwise_blocks(units, launch), kThreads, 0,
                                                         launch.stream>>>(
        x, residual, y, Index(units), map, table, epilogue.activation, epilogue.param);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <int N>
using PackSize = std::integral_constant<int, N>;

// Calls fn(PackSize<N>, Index) for the pack width n (1 or kVector) and the narrowest index type
// that is safe: 32-bit up to 2^30 elements (headroom for the strided loops), 64-bit beyond.
template <int kVector, class Fn>
void with_pack_and_index(int n, int64_t numel, Fn&& fn) {
  const bool narrow = numel <= (int64_t(1) << 30);
  if (n == kVector) {
    if (narrow) fn(PackSize<kVector>{}, int32_t{});
    else fn(PackSize<kVector>{}, int64_t{});
  } else {
    if (narrow) fn(PackSize<1>{}, int32_t{});
    else fn(PackSize<1>{}, int64_t{});
  }
}

template <Dtype D>
using DtypeTag = std::integral_constant<Dtype, D>;

template <class Fn>
void with_dtype(Dtype d, Fn&& fn) {
  switch (d) {
    case Dtype::Float32: return fn(DtypeTag<Dtype::Float32>{});
    case Dtype::Float64: return fn(DtypeTag<Dtype::Float64>{});
    case Dtype::Float16: return fn(DtypeTag<Dtype::Float16>{});
    case Dtype::BFloat16: return fn(DtypeTag<Dtype::BFloat16>{});
  }
}

template <Dtype D>
void train_forward_impl(const TrainForwardArgs& a, const Launch& launch) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const Geometry& g = a.geometry;
  const int C = int(g.channels);
  if (C == 0) return;
  const int64_t numel = g.outer * g.channels * g.inner;
  const int n = pack_width<T>(g, {a.input, a.output, a.epilogue.residual});
  const auto table = ChannelTable<Acc>::over(Scratch<Acc>{launch}.get(ChannelTable<Acc>::kFields * C), C);
  const MomentsFinish<Acc> finish{static_cast<Acc*>(a.mean), static_cast<Acc*>(a.var), static_cast<const Acc*>(a.weight),
                                  static_cast<const Acc*>(a.bias), a.eps, table};
  const auto* x = static_cast<const T*>(a.input);
  const auto* residual = static_cast<const T*>(a.epilogue.residual);
  auto* y = static_cast<T*>(a.output);
  with_pack_and_index<16 / sizeof(T)>(n, numel, [&](auto pack, auto index) {
    constexpr int N = decltype(pack)::value;
    using Index = decltype(index);
    if (y && numel > 0 && g.inner > 1 && planes_split(g, N, launch).used == 1) {
      train_forward_planes_kernel<T, N, Index><<<C, kThreads, 0, launch.stream>>>(
          x, residual, y, Index(g.outer), C, Index(g.inner / N), finish, a.epilogue.activation, a.epilogue.param);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    Moments<Acc>* partials = nullptr;
    int splits = 0;
    if (numel > 0) splits = reduce<MomentsOp<T, N>, N, Index>(MomentsOp<T, N>{x}, g, launch, &partials);
    finish_kernel<<<C, finish_threads(splits), 0, launch.stream>>>(partials, splits, C, finish);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!y || numel == 0) return;
    launch_normalize<T, N, Index>(g, x, residual, y, table, a.epilogue, launch);
  });
}

template <Dtype D>
void eval_forward_impl(const EvalForwardArgs& a, const Launch& launch) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const Geometry& g = a.geometry;
  const int C = int(g.channels);
  const int64_t numel = g.outer * g.channels * g.inner;
  if (numel == 0) return;
  const int n = pack_width<T>(g, {a.input, a.output, a.epilogue.residual});
  const auto table = ChannelTable<Acc>::over(Scratch<Acc>{launch}.get(ChannelTable<Acc>::kFields * C), C);
  eval_params_kernel<Acc><<<blocks_for(C), kThreads, 0, launch.stream>>>(
      C, static_cast<const Acc*>(a.mean), static_cast<const Acc*>(a.var), static_cast<const Acc*>(a.weight),
      static_cast<const Acc*>(a.bias), a.eps, table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  with_pack_and_index<16 / sizeof(T)>(n, numel, [&](auto pack, auto index) {
    constexpr int N = decltype(pack)::value;
    launch_normalize<T, N, decltype(index)>(g, static_cast<const T*>(a.input),
                                            static_cast<const T*>(a.epilogue.residual), static_cast<T*>(a.output),
                                            table, a.epilogue, launch);
  });
}

template <Dtype D>
void backward_impl(const BackwardArgs& a, const Launch& launch) {
  using T = typename Types<D>::T;
  using Acc = typename Types<D>::Acc;
  const Geometry& g = a.geometry;
  const int C = int(g.channels);
  if (C == 0) return;
  const int64_t numel = g.outer * g.channels * g.inner;
  const int64_t count = g.outer * g.inner;
  const bool from_output = a.output != nullptr;
  const GradInputs<T> in{static_cast<const T*>(a.grad_output),
                         static_cast<const T*>(from_output ? a.output : a.input),
                         static_cast<const T*>(a.epilogue.residual),
                         from_output,
                         a.epilogue.activation,
                         Acc(a.epilogue.param)};
  // The sums are needed for the parameter grads, and for dx only when training on this process's
  // batch alone (SyncBatchNorm hands in the global ones).
  const bool has_reduce = !a.mean_dy && (a.grad_weight || a.grad_bias || (a.grad_input && a.training));
  const bool has_apply = (a.grad_input || a.grad_residual) && numel > 0;
  const int n = pack_width<T>(g, {in.dy, in.saved, in.residual, a.grad_input, a.grad_residual});
  const auto table = ChannelTable<Acc>::over(Scratch<Acc>{launch}.get(ChannelTable<Acc>::kFields * C), C);
  const auto* mean = static_cast<const Acc*>(a.mean);
  const auto* var = static_cast<const Acc*>(a.var);
  const auto* weight = static_cast<const Acc*>(a.weight);
  const auto* bias = static_cast<const Acc*>(a.bias);
  const GradFinish<Acc> finish{double(count),
                               a.training,
                               mean,
                               var,
                               weight,
                               bias,
                               a.eps,
                               static_cast<const Acc*>(a.mean_dy),
                               static_cast<const Acc*>(a.mean_dy_xhat),
                               static_cast<Acc*>(a.grad_weight),
                               static_cast<Acc*>(a.grad_bias),
                               table};
  auto* grad_input = static_cast<T*>(a.grad_input);
  auto* grad_residual = static_cast<T*>(a.grad_residual);
  with_pack_and_index<16 / sizeof(T)>(n, numel, [&](auto pack, auto index) {
    constexpr int N = decltype(pack)::value;
    using Index = decltype(index);
    const GradSumsOp<T, N> op{in, mean, var, weight, bias, a.eps, {}};
    if (has_reduce && has_apply && g.inner > 1 && planes_split(g, N, launch).used == 1) {
      backward_planes_kernel<T, N, Index><<<C, kThreads, 0, launch.stream>>>(
          op, grad_input, grad_residual, Index(g.outer), C, Index(g.inner / N), finish);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    GradSums<Acc>* partials = nullptr;
    int splits = 0;
    if (has_reduce && numel > 0) splits = reduce<GradSumsOp<T, N>, N, Index>(op, g, launch, &partials);
    finish_kernel<<<C, finish_threads(splits), 0, launch.stream>>>(partials, splits, C, finish);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!has_apply) return;
    const int64_t units = numel / N;
    with_pack_channels<Index>(g, N, [&](auto map) {
      grad_input_kernel<T, N, Index, decltype(map)::rows><<<elementwise_blocks(units, launch), kThreads, 0,
                                                            launch.stream>>>(in, grad_input, grad_residual,
                                                                             Index(units), map, table);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

void train_forward(const TrainForwardArgs& args, const Launch& launch) {
  with_dtype(args.dtype, [&](auto dtype) { train_forward_impl<decltype(dtype)::value>(args, launch); });
}

void eval_forward(const EvalForwardArgs& args, const Launch& launch) {
  with_dtype(args.dtype, [&](auto dtype) { eval_forward_impl<decltype(dtype)::value>(args, launch); });
}

void backward(const BackwardArgs& args, const Launch& launch) {
  with_dtype(args.dtype, [&](auto dtype) { backward_impl<decltype(dtype)::value>(args, launch); });
}

void update_running_stats(const RunningStatsArgs& a, const Launch& launch) {
  if (a.channels == 0) return;
  with_dtype(a.running_type, [&](auto dtype) {
    using R = typename Types<decltype(dtype)::value>::T;
    auto run = [&](const auto* mean, const auto* var) {
      using B = std::remove_cv_t<std::remove_pointer_t<decltype(mean)>>;
      update_running_stats_kernel<R, B><<<blocks_for(a.channels), kThreads, 0, launch.stream>>>(
          static_cast<R*>(a.running_mean), static_cast<R*>(a.running_var), mean, var, a.channels, a.momentum,
          a.num_batches_tracked, a.bessel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.batch_is_double) run(static_cast<const double*>(a.mean), static_cast<const double*>(a.var));
    else run(static_cast<const float*>(a.mean), static_cast<const float*>(a.var));
  });
}

}  // namespace fastbn::cuda
