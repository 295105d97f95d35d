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
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

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

// Merges a warp's states in a fixed tree; the result is valid in lane 0.
template <typename State>
__device__ __forceinline__ State warp_merge(State s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s = merge(s, shuffle_down(s, offset));
  return s;
}

// Merges a 1-D block's states (of at most kMaxThreads threads) in a fixed tree; the result is valid in
// thread 0. A block that merges again must __syncthreads() first (warp_states is reused).
template <int kMaxThreads = kThreads, typename State>
__device__ State block_merge(State s) {
  __shared__ State warp_states[kMaxThreads / kWarp];
  s = warp_merge(s);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    s = warp_merge(lane < warps ? warp_states[lane] : State{});
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

// Calls fn(u - u0, index) for the units u of channel c in [u0, u1) that fall to thread `rank` of a
// team of `size` threads (the block, or a warp), in strides of size; a unit is counted over the
// channel's outer * inner_units packs, `index` is its place in the whole tensor.
template <typename Index, class Fn>
__device__ __forceinline__ void for_channel_slots(int c, int channels, Index inner_units, Index u0, Index u1,
                                                  int rank, int size, Fn&& fn) {
  Index u = u0 + rank;
  if (u >= u1) return;
  // (plane n, offset j) of unit u, advanced without a division per step.
  Index n = u / inner_units, j = u - n * inner_units;
  const Index step_n = Index(size) / inner_units, step_j = Index(size) - step_n * inner_units;
  const Index plane_stride = Index(channels) * inner_units, channel_offset = Index(c) * inner_units;
  for (; u < u1; u += size) {
    fn(int(u - u0), n * plane_stride + channel_offset + j);
    n += step_n;
    j += step_j;
    if (j >= inner_units) {
      j -= inner_units;
      ++n;
    }
  }
}

// for_channel_slots over the block, for fn(index).
template <typename Index, class Fn>
__device__ __forceinline__ void for_channel_units(int c, int channels, Index inner_units, Index u0, Index u1,
                                                  Fn&& fn) {
  for_channel_slots(c, channels, inner_units, u0, u1, int(threadIdx.x), int(blockDim.x),
                    [&](int, Index unit) { fn(unit); });
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
    // Unrolled so that each thread has several rows' loads in flight: one at a time, the statistics
    // of fp16 32x64x56x56 channels_last read 12.8 MB in 16.5 us on an H200, under 1 TB/s. The
    // adds keep their order. Packs of 8 (16-bit values) unroll twice: four times, the backward's
    // sums spilled registers.
#pragma unroll(N >= 8 ? 2 : 4)
    for (Index r = r0 + threadIdx.y; r < r1; r += blockDim.y) op.add_channels(s, r * packs + pack);
  }
  // The block's rows of a pack are merged in a fixed tree over threadIdx.y (blockDim.y is a power of
  // two): a row of threads walking all of them in turn, a division per merge, left the rest idle.
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * N;
#pragma unroll
  for (int k = 0; k < N; ++k) shared[slot + k] = s[k];
  __syncthreads();
  for (int stride = int(blockDim.y) / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.y) < stride) {
      const int other = slot + stride * int(blockDim.x) * N;
#pragma unroll
      for (int k = 0; k < N; ++k) shared[slot + k] = merge(shared[slot + k], shared[other + k]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && pack < packs) {
#pragma unroll
    for (int k = 0; k < N; ++k) partials[int64_t(blockIdx.y) * channels + pack * N + k] = shared[slot + k];
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
template <int kMaxThreads, typename State, class Finish>
__device__ __forceinline__ void finish_channel(const State* partials, int splits, int channels, int c,
                                               const Finish& finish) {
  decltype(in_double(State{})) s{};
  for (int i = threadIdx.x; i < splits; i += blockDim.x) s = merge(s, in_double(partials[int64_t(i) * channels + c]));
  s = block_merge<kMaxThreads>(s);
  if (threadIdx.x == 0) finish.channel(c, s);
}

template <typename State, class Finish>
__global__ void finish_kernel(const State* partials, int splits, int channels, Finish finish) {
  finish_channel<kThreads>(partials, splits, channels, int(blockIdx.x), finish);
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

// y = act((x - mean) * scale + bias + residual) over pack u, x read at pack xu (u, or a place in
// shared memory).
template <typename T, int N, typename Index, typename Acc>
__device__ __forceinline__ void normalize_pack(const T* x, Index xu, const T* residual, T* y, Index u,
                                               const PackParams<Acc, N>& p, Activation activation, Acc param) {
  const Pack<T, N> xv = load_pack<N>(x, xu);
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
// The inputs are read at pack iu (u, or a place in shared memory).
template <typename T, int N, typename Index, typename Acc>
__device__ __forceinline__ void grad_input_pack(const GradInputs<T>& in, Index iu, T* grad_input, T* grad_residual,
                                                Index u, const PackParams<Acc, N>& p) {
  const Pack<T, N> dy = load_pack<N>(in.dy, iu), sv = load_pack<N>(in.saved, iu);
  Pack<T, N> r, dx, gr;
  if (in.residual) r = load_pack<N>(in.residual, iu);
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
    normalize_pack<T, N>(x, u, residual, y, u, table_values<Acc, N>(table, map.first(u), kRows, false), activation,
                         Acc(param));
}

template <typename T, int N, typename Index, bool kRows>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(GradInputs<T> in, T* grad_input, T* grad_residual, Index units, PackChannels<Index, kRows> map,
                      ChannelTable<typename GradInputs<T>::Acc> table) {
  using Acc = typename GradInputs<T>::Acc;
  for (Index u = Index(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += Index(gridDim.x) * blockDim.x)
    grad_input_pack<T, N>(in, u, grad_input, grad_residual, u, table_values<Acc, N>(table, map.first(u), kRows, true));
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
                    [&](Index unit) { normalize_pack<T, N>(x, unit, residual, y, unit, p, activation, Acc(param)); });
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
                    [&](Index unit) { grad_input_pack<T, N>(op.in, unit, grad_input, grad_residual, unit, p); });
}

// ---------------------------------------------------------------------------------------------
// Persistent training passes: one cooperative launch that reads its inputs from memory once. Every
// block copies its share of the tensor into shared memory and reduces it there; the grid waits
// (grid.sync) for every block's partials; blocks finish channels in turn and the grid waits again
// for the per-channel table; then every block writes its outputs from the copy it holds. The grid
// is one block per SM, so this takes tensors that fit in the SMs' shared memory (about 29 MB of
// input on an H100 or H200, half that for the backward, which holds dy and x); larger ones take the
// two-pass path.
//
// The tensor is cut into segments. Planes: (channel c, split s), a run of per_split of channel c's
// outer * inner_units packs. Rows: (group, split s), per_split rows of a group of group_packs
// adjacent channel packs. Block b holds segments [b * per_block, (b + 1) * per_block), each in
// `slots` packs of shared memory per input; split s's partials go to row s of partials[splits][C],
// as in the two-pass path.
constexpr int kPersistentThreads = 512;

template <typename Index>
struct Segments {
  Index outer;        // planes: outer; rows: rows
  int channels;
  Index inner_units;  // planes: packs per plane; rows: 1
  int splits;         // segments per channel (planes) or per group (rows)
  Index per_split;    // planes: a channel's packs per segment; rows: rows per segment
  int group_packs;    // rows: channel packs per group, a power of two <= kWarp; planes: 1
  int count;          // segments in all
  int per_block;      // segments per block
  int slots;          // shared-memory packs per segment and input: per_split * group_packs
  bool warp_teams;    // planes with many segments per block: each warp takes whole segments
};

// Calls fn(q, rank, size) for the block's segments [q0, q1) and this thread's team: the block for
// each segment, or with warp_teams its warp for every (warps)-th one.
template <typename Index, class Fn>
__device__ __forceinline__ void for_team_segments(const Segments<Index>& sg, int q0, int q1, Fn&& fn) {
  if (sg.warp_teams) {
    const int warps = int(blockDim.x) / kWarp;
    for (int q = q0 + int(threadIdx.x) / kWarp; q < q1; q += warps) fn(q, int(threadIdx.x) % kWarp, kWarp);
  } else {
    for (int q = q0; q < q1; ++q) fn(q, int(threadIdx.x), int(blockDim.x));
  }
}

// The first channel of team member `rank`'s packs in segment q: planes, the segment's channel;
// rows, the first of the member's pack of N channels (>= channels for a lane past the last pack).
template <bool kRows, int N, typename Index>
__device__ __forceinline__ int segment_channel(const Segments<Index>& sg, int q, int rank) {
  const int group = q / sg.splits;
  return kRows ? (group * sg.group_packs + rank % sg.group_packs) * N : group;
}

// Calls fn(slot, index) for team member `rank`'s packs of segment q (a team of `size` threads, a
// multiple of group_packs): `slot` is the pack's place among the segment's slots, `index` its place
// in the tensor.
template <bool kRows, int N, typename Index, class Fn>
__device__ __forceinline__ void for_segment(const Segments<Index>& sg, int q, int rank, int size, Fn&& fn) {
  const int split = q % sg.splits;
  if constexpr (kRows) {
    const int packs = sg.channels / N, lane = rank % sg.group_packs;
    const int pack = (q / sg.splits) * sg.group_packs + lane;
    if (pack >= packs) return;
    const Index r0 = Index(split) * sg.per_split;
    const Index r1 = r0 + sg.per_split < sg.outer ? r0 + sg.per_split : sg.outer;
    const Index step = Index(size / sg.group_packs);
    for (Index r = r0 + Index(rank / sg.group_packs); r < r1; r += step)
      fn(int(r - r0) * sg.group_packs + lane, r * packs + pack);
  } else {
    const Index units = sg.outer * sg.inner_units, u0 = Index(split) * sg.per_split;
    const Index u1 = u0 + sg.per_split < units ? u0 + sg.per_split : units;
    for_channel_slots(q / sg.splits, sg.channels, sg.inner_units, u0, u1, rank, size, fn);
  }
}

// The inputs a persistent kernel keeps: each source's packs copied to `copy` (shared memory).
template <typename T, int N>
struct Tiles {
  static constexpr int kMax = 3;  // dy, x (or y), residual
  const T* source[kMax];
  Pack<T, N>* copy[kMax];
  int count;
};

// Copies the block's segments [q0, q1) of every input into its tiles, asynchronously where a pack
// is 4, 8 or 16 bytes (cp.async from sm_80 on: the whole share is in flight at once), and waits.
template <bool kRows, int N, typename T, typename Index>
__device__ void copy_segments(const Segments<Index>& sg, int q0, int q1, const Tiles<T, N>& tiles) {
  for_team_segments(sg, q0, q1, [&](int q, int rank, int size) {
    const int base = (q - q0) * sg.slots;
    for_segment<kRows, N>(sg, q, rank, size, [&](int slot, Index unit) {
#pragma unroll
      for (int a = 0; a < Tiles<T, N>::kMax; ++a) {
        if (a == tiles.count) break;
        Pack<T, N>* to = tiles.copy[a] + base + slot;
        const Pack<T, N>* from = reinterpret_cast<const Pack<T, N>*>(tiles.source[a]) + unit;
        if constexpr (sizeof(Pack<T, N>) % 4 == 0) __pipeline_memcpy_async(to, from, sizeof(Pack<T, N>));
        else *to = *from;
      }
    });
  });
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
}

// Reduces the block's segments [q0, q1) with `op` (whose pointers are the tiles, indexed by slot)
// into partials[split][C].
template <bool kRows, int N, class Op, typename Index>
__device__ void reduce_segments(Op op, const Segments<Index>& sg, int q0, int q1, typename Op::State* partials) {
  using State = typename Op::State;
  if constexpr (!kRows) {
    if (sg.warp_teams) {  // a warp per segment: no block-wide waits
      for_team_segments(sg, q0, q1, [&](int q, int lane, int size) {
        const int base = (q - q0) * sg.slots, c = segment_channel<kRows, N>(sg, q, lane);
        op.begin(c, 1);
        State s{};
        for_segment<kRows, N>(sg, q, lane, size, [&](int slot, Index) { op.add_same_channel(s, base + slot); });
        s = warp_merge(s);
        if (lane == 0) partials[int64_t(q % sg.splits) * sg.channels + c] = s;
      });
      return;
    }
  }
  for (int q = q0; q < q1; ++q) {
    const int base = (q - q0) * sg.slots, c0 = segment_channel<kRows, N>(sg, q, int(threadIdx.x));
    const int64_t row = int64_t(q % sg.splits) * sg.channels;
    if constexpr (kRows) {
      // Each thread sums its pack's N channels over its rows; the block's rows of a channel are then
      // merged in a fixed tree over the threads of one lane.
      __shared__ State column[kPersistentThreads];
      State s[N];
#pragma unroll
      for (int k = 0; k < N; ++k) s[k] = State{};
      if (c0 < sg.channels) op.begin(c0, N);
      for_segment<kRows, N>(sg, q, int(threadIdx.x), int(blockDim.x),
                            [&](int slot, Index) { op.add_channels(s, base + slot); });
      const int lane_rows = int(blockDim.x) / sg.group_packs, row_in_block = int(threadIdx.x) / sg.group_packs;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        column[threadIdx.x] = s[k];
        __syncthreads();
        for (int stride = lane_rows / 2; stride > 0; stride /= 2) {
          if (row_in_block < stride)
            column[threadIdx.x] = merge(column[threadIdx.x], column[threadIdx.x + stride * sg.group_packs]);
          __syncthreads();
        }
        if (row_in_block == 0 && c0 < sg.channels) partials[row + c0 + k] = column[threadIdx.x];
        __syncthreads();
      }
    } else {
      op.begin(c0, 1);
      State s{};
      for_segment<kRows, N>(sg, q, int(threadIdx.x), int(blockDim.x),
                            [&](int slot, Index) { op.add_same_channel(s, base + slot); });
      s = block_merge<kPersistentThreads>(s);
      if (threadIdx.x == 0) partials[row + c0] = s;
      __syncthreads();
    }
  }
}

// Between the reduction and the outputs: the grid waits for every partial, blocks finish channels
// in turn (the table, the mean and variance or the parameter grads), and the grid waits again.
template <class Finish, typename State, typename Index>
__device__ void finish_segments(const Segments<Index>& sg, const State* partials, const Finish& finish) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  grid.sync();
  for (int c = blockIdx.x; c < sg.channels; c += gridDim.x) {
    finish_channel<kPersistentThreads>(partials, sg.splits, sg.channels, c, finish);
    __syncthreads();
  }
  grid.sync();
}

// After the grid's second wait: fn(params, slot, index) for each of this thread's packs of the
// block's segments [q0, q1), with the table values of the pack's channels (the backward's too where
// `backward`); `slot` is the pack's place in the tiles, `index` in the tensor.
template <bool kRows, int N, typename Acc, typename Index, class Fn>
__device__ void for_tile_outputs(const Segments<Index>& sg, int q0, int q1, const ChannelTable<Acc>& table,
                                 bool backward, Fn&& fn) {
  for_team_segments(sg, q0, q1, [&](int q, int rank, int size) {
    const int base = (q - q0) * sg.slots, c0 = segment_channel<kRows, N>(sg, q, rank);
    if (c0 >= sg.channels) return;
    const PackParams<Acc, N> p = table_values<Acc, N>(table, c0, kRows, backward);
    for_segment<kRows, N>(sg, q, rank, size, [&](int slot, Index unit) { fn(p, Index(base + slot), unit); });
  });
}

template <typename T, int N, typename Index, bool kRows>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_train_forward_kernel(Segments<Index> sg, Moments<typename GradInputs<T>::Acc>* partials, const T* x,
                                    const T* residual, T* y, MomentsFinish<typename GradInputs<T>::Acc> finish,
                                    Activation activation, double param) {
  using Acc = typename GradInputs<T>::Acc;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto* tile = reinterpret_cast<Pack<T, N>*>(shared_bytes);
  const int q0 = min(int(blockIdx.x) * sg.per_block, sg.count), q1 = min(q0 + sg.per_block, sg.count);
  copy_segments<kRows, N>(sg, q0, q1, Tiles<T, N>{{x}, {tile}, 1});
  reduce_segments<kRows, N>(MomentsOp<T, N>{reinterpret_cast<const T*>(tile)}, sg, q0, q1, partials);
  finish_segments(sg, partials, finish);
  for_tile_outputs<kRows, N>(sg, q0, q1, finish.table, false, [&](const PackParams<Acc, N>& p, Index slot, Index unit) {
    normalize_pack<T, N>(reinterpret_cast<const T*>(tile), slot, residual, y, unit, p, activation, Acc(param));
  });
}

template <typename T, int N, typename Index, bool kRows>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_backward_kernel(Segments<Index> sg, GradSums<typename GradInputs<T>::Acc>* partials,
                               GradSumsOp<T, N> op, T* grad_input, T* grad_residual,
                               GradFinish<typename GradInputs<T>::Acc> finish) {
  using Acc = typename GradInputs<T>::Acc;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int q0 = min(int(blockIdx.x) * sg.per_block, sg.count), q1 = min(q0 + sg.per_block, sg.count);
  const int64_t tile_packs = int64_t(sg.per_block) * sg.slots;
  Tiles<T, N> tiles{{op.in.dy, op.in.saved, op.in.residual}, {}, op.in.residual ? 3 : 2};
#pragma unroll
  for (int a = 0; a < Tiles<T, N>::kMax; ++a)
    tiles.copy[a] = reinterpret_cast<Pack<T, N>*>(shared_bytes) + a * tile_packs;
  copy_segments<kRows, N>(sg, q0, q1, tiles);
  // From here on the op reads the tiles, by slot.
  op.in.dy = reinterpret_cast<const T*>(tiles.copy[0]);
  op.in.saved = reinterpret_cast<const T*>(tiles.copy[1]);
  if (op.in.residual) op.in.residual = reinterpret_cast<const T*>(tiles.copy[2]);
  reduce_segments<kRows, N>(op, sg, q0, q1, partials);
  finish_segments(sg, partials, finish);
  for_tile_outputs<kRows, N>(sg, q0, q1, finish.table, true, [&](const PackParams<Acc, N>& p, Index slot, Index unit) {
    grad_input_pack<T, N>(op.in, slot, grad_input, grad_residual, unit, p);
  });
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

// Pack widths: 16 bytes; for 16-bit types also 8 bytes, which 14x14 planes (196 values) allow where
// 16-byte packs do not (single 2-byte loads made those layers 2x slower than in float32 on an H200).
template <typename T>
constexpr int kVectorOf = 16 / sizeof(T);
template <typename T>
constexpr int kNarrowVectorOf = sizeof(T) == 2 ? 4 : 0;

// The widest pack the layout and every pointer allow, else single values.
template <typename T>
int pack_width(const Geometry& g, std::initializer_list<const void*> pointers) {
  for (const int n : {kVectorOf<T>, kNarrowVectorOf<T>}) {
    const bool fits = n > 1 && (g.inner > 1 ? g.inner % n == 0 : g.channels % n == 0);
    if (fits && std::all_of(pointers.begin(), pointers.end(), [n](const void* p) { return aligned<T>(p, n); }))
      return n;
  }
  return 1;
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

// Whether a training pass takes the persistent path (see its kernels) where its tensors fit.
// FASTBN_CUDA_PERSISTENT=1 takes it wherever they fit, =0 never (read on every call). Otherwise it
// is taken where an H200 measured it faster than the two-pass path on the ResNet-50 shapes (two runs
// of bench/gpu_check.sh, 2026-11-30):
// - rows (channels_last, (N, C)) of at most 512 channels and 8192 rows or more: the forward took
//   0.59-1.02 of the two-pass time, the backward 0.76-0.92 (16-bit tensors of 6 MB or less: 1.0-1.06);
// - the forward of planes of at most 128 channels of 25088 values or more: 0.91-1.0. Their backward
//   took 1.1-1.36x as long in 16-bit types (and as long in float32), so it stays two-pass.
// Elsewhere the forward took 0.93-2.5x as long (1024-2048 channels of 7x7 2-2.5x).
bool persistent_wanted(const Geometry& g, bool backward) {
  if (const char* value = std::getenv("FASTBN_CUDA_PERSISTENT")) {
    if (std::string_view(value) == "1") return true;
    if (std::string_view(value) == "0") return false;
  }
  if (g.inner == 1) return g.channels <= 512 && g.outer >= 8192;
  return !backward && g.channels <= 128 && g.outer * g.inner >= 25088;
}

// What a persistent kernel may use on the current device: the shared memory a block can have (the
// opt-in maximum less the kernel's static shared memory), or 0 where the device cannot launch
// cooperatively or a block of the kernel cannot be resident with all of it. Queried once per
// device and kernel, which also sets the kernel's dynamic shared memory limit to that budget (the
// same on every call, so that threads launching at once cannot lower it under each other's plans):
// these queries and that setting cost host time on every training pass when repeated.
int64_t persistent_shared_budget(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> budgets;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto known = budgets.find({device, kernel});
  if (known != budgets.end()) return known->second;
  int cooperative = 0, shared_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int64_t budget = 0;
  if (cooperative) {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    budget = int64_t(shared_optin) - int64_t(attributes.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(budget)));
    // A block resident with the whole budget is resident with any plan's share of it.
    int resident = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kPersistentThreads, size_t(budget)));
    if (resident < 1) budget = 0;
  }
  budgets[{device, kernel}] = budget;
  return budget;
}

// Plans a persistent launch of `kernel` over g (numel > 0) keeping `inputs` tensors of packs of n
// values: among the split counts whose fullest block fits in shared memory, the one that leaves it
// the least to do. Each segment counts as more bytes to copy, what its merge takes about as long as:
// 16 KB where the block merges it, 1 KB with warp_teams (sixteen warps merge side by side). False
// where the device cannot launch cooperatively or no split count fits.
template <typename Index>
bool plan_persistent(const void* kernel, const Geometry& g, int n, int inputs, size_t pack_bytes,
                     const Launch& launch, Segments<Index>* plan, size_t* shared_bytes) {
  const int64_t budget = persistent_shared_budget(kernel);
  if (budget <= 0) return false;
  const int64_t blocks = launch.sm_count;
  const bool rows = g.inner == 1;
  int64_t group_packs = 1, groups = g.channels, length = g.outer * (g.inner / n);
  if (rows) {
    const int64_t packs = g.channels / n;
    while (group_packs < std::min<int64_t>(packs, kWarp)) group_packs *= 2;
    groups = ceil_div(packs, group_packs);
    length = g.outer;
  }
  constexpr int64_t kWarpTeamSegments = 8, kBlockMergeBytes = 16 << 10, kWarpMergeBytes = 1 << 10;
  int64_t best_cost = std::numeric_limits<int64_t>::max(), bytes = 0, best_per_split = 0, best_splits = 0,
          best_per_block = 0;
  for (int64_t splits = 1; splits <= std::min<int64_t>(length, 2 * blocks); ++splits) {
    const int64_t per_split = ceil_div(length, splits), used = ceil_div(length, per_split);
    const int64_t per_block = ceil_div(groups * used, blocks);
    const int64_t share = per_block * per_split * group_packs * int64_t(pack_bytes) * inputs;
    const bool warp_teams = !rows && per_block >= kWarpTeamSegments;
    const int64_t cost = share + per_block * (warp_teams ? kWarpMergeBytes : kBlockMergeBytes);
    if (share <= budget && groups * used <= std::numeric_limits<int>::max() && cost < best_cost) {
      best_cost = cost;
      bytes = share;
      best_per_split = per_split;
      best_splits = used;
      best_per_block = per_block;
    }
  }
  if (bytes == 0) return false;
  *plan = {Index(g.outer),
           int(g.channels),
           Index(rows ? 1 : g.inner / n),
           int(best_splits),
           Index(best_per_split),
           int(group_packs),
           int(groups * best_splits),
           int(best_per_block),
           int(best_per_split * group_packs),
           !rows && best_per_block >= kWarpTeamSegments};
  *shared_bytes = size_t(bytes);
  return true;
}

// Launches kernel(args...) cooperatively, a block per SM; args are converted to the kernel's
// parameter types first, so that the pointers handed to CUDA point at values of exactly those types.
template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), size_t shared_bytes, const Launch& launch, Args&&... args) {
  std::tuple<std::decay_t<Params>...> values{std::forward<Args>(args)...};
  void* pointers[sizeof...(Params)];
  std::apply([&](auto&... value) {
    int i = 0;
    ((pointers[i++] = static_cast<void*>(&value)), ...);
  }, values);
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(launch.sm_count),
                                             dim3(kPersistentThreads), pointers, shared_bytes, launch.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Plans and launches the persistent kernel that kernel_of(map) gives for g's layout, keeping `inputs`
// tensors on chip; the kernel takes the plan and its partials (of State) first, then args. False
// where the tensors do not fit.
template <typename T, int N, typename Index, typename State, class KernelOf, class... Args>
bool launch_persistent(const Geometry& g, int inputs, const Launch& launch, KernelOf&& kernel_of,
                       const Args&... args) {
  bool launched = false;
  with_pack_channels<Index>(g, N, [&](auto map) {
    auto* kernel = kernel_of(map);
    Segments<Index> plan{};
    size_t shared_bytes = 0;
    if (!plan_persistent(reinterpret_cast<const void*>(kernel), g, N, inputs, sizeof(Pack<T, N>), launch, &plan,
                         &shared_bytes))
      return;
    State* partials = Scratch<State>{launch}.get(int64_t(plan.splits) * g.channels);
    launch_cooperative(kernel, shared_bytes, launch, plan, partials, args...);
    launched = true;
  });
  return launched;
}

template <int N>
using PackSize = std::integral_constant<int, N>;

// Calls fn(PackSize<N>, Index) for the pack width n (of pack_width<T>) and the narrowest index type
// that is safe: 32-bit up to 2^30 elements (headroom for the strided loops), 64-bit beyond. Beyond,
// 8-byte packs give way to single values, which serve any layout (one instantiation less).
template <typename T, class Fn>
void with_pack_and_index(int n, int64_t numel, Fn&& fn) {
  constexpr int kVector = kVectorOf<T>, kNarrowVector = kNarrowVectorOf<T>;
  const bool narrow = numel <= (int64_t(1) << 30);
  if (n == kVector) {
    if (narrow) fn(PackSize<kVector>{}, int32_t{});
    else fn(PackSize<kVector>{}, int64_t{});
  } else if (n == kNarrowVector && narrow) {  // never for 4- and 8-byte types (kNarrowVector 0)
    if constexpr (kNarrowVector > 1) fn(PackSize<kNarrowVector>{}, int32_t{});
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
  with_pack_and_index<T>(n, numel, [&](auto pack, auto index) {
    constexpr int N = decltype(pack)::value;
    using Index = decltype(index);
    if constexpr (std::is_same_v<Index, int32_t>) {  // what fits on chip is far below 2^30 elements
      auto kernel_of = [](auto map) { return &persistent_train_forward_kernel<T, N, Index, decltype(map)::rows>; };
      if (y && numel > 0 && persistent_wanted(g, false) &&
          launch_persistent<T, N, Index, Moments<Acc>>(g, 1, launch, kernel_of, x, residual, y, finish,
                                                       a.epilogue.activation, a.epilogue.param))
        return;
    }
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
  with_pack_and_index<T>(n, numel, [&](auto pack, auto index) {
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
  with_pack_and_index<T>(n, numel, [&](auto pack, auto index) {
    constexpr int N = decltype(pack)::value;
    using Index = decltype(index);
    const GradSumsOp<T, N> op{in, mean, var, weight, bias, a.eps, {}};
    if constexpr (std::is_same_v<Index, int32_t>) {
      auto kernel_of = [](auto map) { return &persistent_backward_kernel<T, N, Index, decltype(map)::rows>; };
      if (has_reduce && has_apply && persistent_wanted(g, true) &&
          launch_persistent<T, N, Index, GradSums<Acc>>(g, in.residual ? 3 : 2, launch, kernel_of, op, grad_input,
                                                        grad_residual, finish))
        return;
    }
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
