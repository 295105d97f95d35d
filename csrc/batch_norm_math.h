// The BatchNorm maths, written once and shared by the CPU kernels and the CUDA kernels:
// statistics, the input-gradient coefficients and the fused activations.
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
// full precision when |mean| >> std, where the folded form x * scale + shift cancels badly. (One
// exception, where the error stays below the output's rounding: the CPU's 16-bit rows pass,
// half_rows_folded in cpu/kernels_impl.h.)

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

// ---------------------------------------------------------------------------------------------
// The activations fused after BatchNorm (and the residual add): y = act(z), z = BN(x) + residual.
// Numbers are the op schemas' `activation` codes. param: leaky_relu's negative slope, elu's alpha.
enum class Activation : int { Identity = 0, ReLU = 1, LeakyReLU = 2, ELU = 3, SiLU = 4 };

// forward(z); grad(dy, z) = dy * act'(z); for the invertible ones (identity, leaky_relu with
// slope > 0) also inverse(y) = z and grad_from_output(dy, y) = dy * act'(z): what memory-efficient
// backward needs. Both sides of a choice are computed before it: a select with no arithmetic in its
// branches is what lets the compilers vectorize it (a guarded product or division might trap).
template <Activation A>
struct ActivationFn;

template <>
struct ActivationFn<Activation::Identity> {
  template <typename T> FASTBN_HOST_DEVICE static T forward(T z, T) { return z; }
  template <typename T> FASTBN_HOST_DEVICE static T grad(T dy, T, T) { return dy; }
  template <typename T> FASTBN_HOST_DEVICE static T inverse(T y, T) { return y; }
  template <typename T> FASTBN_HOST_DEVICE static T grad_from_output(T dy, T, T) { return dy; }
};

template <>
struct ActivationFn<Activation::ReLU> {
  template <typename T> FASTBN_HOST_DEVICE static T forward(T z, T) { return z > T(0) ? z : T(0); }
  template <typename T> FASTBN_HOST_DEVICE static T grad(T dy, T z, T) { return z > T(0) ? dy : T(0); }
};

template <>
struct ActivationFn<Activation::LeakyReLU> {
  template <typename T> FASTBN_HOST_DEVICE static T forward(T z, T slope) {
    const T negative = z * slope;
    return z > T(0) ? z : negative;
  }
  template <typename T> FASTBN_HOST_DEVICE static T grad(T dy, T z, T slope) {
    const T negative = dy * slope;
    return z > T(0) ? dy : negative;
  }
  template <typename T> FASTBN_HOST_DEVICE static T inverse(T y, T slope) {
    const T negative = y / slope;
    return y > T(0) ? y : negative;
  }
  template <typename T> FASTBN_HOST_DEVICE static T grad_from_output(T dy, T y, T slope) {
    return grad(dy, y, slope);  // y > 0 exactly where z > 0
  }
};

template <>
struct ActivationFn<Activation::ELU> {
  template <typename T> FASTBN_HOST_DEVICE static T forward(T z, T alpha) {
    return z > T(0) ? z : alpha * std::expm1(z);
  }
  template <typename T> FASTBN_HOST_DEVICE static T grad(T dy, T z, T alpha) {
    return z > T(0) ? dy : dy * alpha * std::exp(z);
  }
};

template <>
struct ActivationFn<Activation::SiLU> {
  template <typename T> FASTBN_HOST_DEVICE static T forward(T z, T) { return z / (T(1) + std::exp(-z)); }
  template <typename T> FASTBN_HOST_DEVICE static T grad(T dy, T z, T) {
    const T s = T(1) / (T(1) + std::exp(-z));
    return dy * (s * (T(1) + z * (T(1) - s)));
  }
};

}  // namespace fastbn
