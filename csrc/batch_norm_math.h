// The BatchNorm maths, written once and shared by the CPU kernels and (later) the CUDA kernels.
// Plain C++ with no torch headers, so that kernel translation units stay cheap to compile.
//
//   mean = sum(x) / m,  var = sum((x - mean)^2) / m  (biased; used to normalize)
//   y    = (x - mean) * (weight * invstd) + bias,     invstd = 1 / sqrt(var + eps)
//   backward (training): dx = weight * invstd * (dy - sum(dy)/m - (x - mean) * invstd^2 * sum(dy*(x-mean))/m)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTBN_HOST_DEVICE inline
#endif

namespace fastbn {

// Running (count, mean, M2) summary of a set of values; M2 = sum((x - mean)^2).
template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

// Chan et al.'s pairwise merge: exact in exact arithmetic and stable in floating point, unlike
// E[x^2] - E[x]^2. Merging in a fixed order makes the result independent of how work was split.
template <typename T>
FASTBN_HOST_DEVICE Moments<T> merge_moments(const Moments<T>& a, const Moments<T>& b) {
  if (b.count == T(0)) return a;
  if (a.count == T(0)) return b;
  const T count = a.count + b.count;
  const T delta = b.mean - a.mean;
  const T b_share = b.count / count;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

template <typename T>
FASTBN_HOST_DEVICE T biased_variance(const Moments<T>& s) {
  return s.count > T(0) ? s.m2 / s.count : T(0);
}

template <typename T>
FASTBN_HOST_DEVICE T inverse_std(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}

// Kernels apply y = (x - mean) * (weight * invstd) + bias. Subtracting the mean before scaling keeps
// full precision when |mean| >> std, where the folded form x * scale + shift cancels badly.

// Coefficients of the input gradient dx = dy * dy_scale + (x - mean) * xmu_scale + shift.
// In eval mode the statistics are constants, so only the dy term remains.
template <typename T>
struct InputGradCoefficients {
  T dy_scale;
  T xmu_scale;
  T shift;
};

template <typename T>
FASTBN_HOST_DEVICE InputGradCoefficients<T> input_grad_coefficients(
    T invstd, T weight, T sum_dy, T sum_dy_xmu, T count, bool training) {
  const T dy_scale = weight * invstd;
  if (!training || count == T(0)) return {dy_scale, T(0), T(0)};
  return {dy_scale, -dy_scale * invstd * invstd * sum_dy_xmu / count, -dy_scale * sum_dy / count};
}

}  // namespace fastbn
