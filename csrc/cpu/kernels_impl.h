// CPU BatchNorm kernels, written once and compiled once per instruction set: each
// kernels_<isa>.cpp names FASTBN_ISA (a namespace) and FASTBN_ISA_TARGET (a GCC target string)
// and includes this file, so the loops below auto-vectorize to that ISA; dispatch.cpp picks the
// best table the CPU supports at run time. The build itself targets baseline x86-64.
//
// Determinism: every reduction runs over a fixed decomposition into blocks (it depends on the
// shape only, never on the thread count), each block reduced by one thread, and block results
// merged per channel in block order. Results are therefore bit-identical for any thread count.
//
// Numerics: blocks are small enough to stay in L1/L2, so each block takes its mean first and then
// sum((x - mean)^2) in a second pass over cached data (exact two-pass variance), except float32
// planes, whose blocks take exact double sums about one of their values in a single pass (see
// kExactShiftedSums); blocks are merged in double with Chan's formula. The statistics accumulate in
// double for float32 and float64 input, in float for float16/bfloat16; the backward's sums within a
// block in the elementwise type (float for float32 too: no cancellation there), merged in double.
#ifndef FASTBN_ISA
#error "define FASTBN_ISA (the namespace of this instruction set) before including kernels_impl.h"
#endif
#ifndef FASTBN_VECTOR_BYTES  // the instruction set's vector register size
#define FASTBN_VECTOR_BYTES 16
#endif

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include <emmintrin.h>

#ifdef FASTBN_HAS_F16C
// GCC 12 reports the AVX-512 intrinsics' deliberately undefined operands as maybe uninitialized
// (GCC bug 105593), once per inlined use; warnings are placed at the header's lines.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "../batch_norm_math.h"
#include "convert.h"
#include "kernels.h"

// Everything below is compiled for FASTBN_ISA_TARGET (the inline helpers above are compiled for
// the baseline and inlined into it, which GCC allows since the target is a superset).
#define FASTBN_DO_PRAGMA(x) _Pragma(#x)
#define FASTBN_PRAGMA_TARGET(isa) FASTBN_DO_PRAGMA(GCC target(isa))
#pragma GCC push_options
#ifdef FASTBN_ISA_TARGET
FASTBN_PRAGMA_TARGET(FASTBN_ISA_TARGET)
#endif

namespace fastbn::cpu::FASTBN_ISA {
namespace {

template <Dtype D>
struct Traits;
// storage: how values are stored; acc: per-channel parameters, elementwise maths and the sums
// within a rows block and a backward planes block; reduce: the statistics' sums within a planes
// block (double for float32: exact shifted sums, and no slower there).
template <>
struct Traits<Dtype::Float32> {
  using storage = float;
  using acc = float;
  using reduce = double;
  static acc load(storage v) { return v; }
  static storage store(acc v) { return v; }
};
template <>
struct Traits<Dtype::Float64> {
  using storage = double;
  using acc = double;
  using reduce = double;
  static acc load(storage v) { return v; }
  static storage store(acc v) { return v; }
};
template <>
struct Traits<Dtype::Float16> {
  using storage = uint16_t;
  using acc = float;
  using reduce = float;
  static acc load(storage v) { return half_to_float(v); }
  static storage store(acc v) { return float_to_half(v); }
};
template <>
struct Traits<Dtype::BFloat16> {
  using storage = uint16_t;
  using acc = float;
  using reduce = float;
  static acc load(storage v) { return bfloat16_to_float(v); }
  static storage store(acc v) { return float_to_bfloat16(v); }
};

// float16 and bfloat16: the integer conversions of convert.h vectorize on every ISA but cost 3-9x
// a float32 pass, while F16C (on every AVX2 CPU) converts 8 halves per instruction and bfloat16 is
// shifts. Plain BatchNorm's hot loops convert in registers (the *_in_registers functions); the
// other float16 loops convert a chunk into a float buffer in L1 and run the float loop over it
// (staging); the other bfloat16 loops convert in the loop, where the shifts cost less than a stage.
// F16C's rounding is convert.h's (to nearest even; NaN stays NaN, its payload may differ).
template <Dtype D>
constexpr bool kStaged = std::is_same_v<typename Traits<D>::storage, uint16_t>;
constexpr int64_t kStageElems = 1024;

#ifndef FASTBN_HAS_F16C
constexpr bool kHasF16C = false;
#else
constexpr bool kHasF16C = true;
constexpr int kHalfRounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // F16C: to nearest even

// The float vector of the in-register half loops, the instruction set's widest: 16 floats in the
// AVX-512 table, 8 in AVX2's. The half passes spend much of their time converting, so 512-bit
// lanes, half the instructions per value, pay: bfloat16 channels_last training forward and backward
// 6-22% faster than the AVX2 table with cold caches, up to 29% with warm ones, where the AVX-512
// table's 256-bit loops had been as fast as AVX2's (same process, tables alternating).
#if FASTBN_VECTOR_BYTES == 64
using Lanes = __m512;
inline Lanes load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline void store_lanes(float* p, Lanes v) { _mm512_storeu_ps(p, v); }
inline Lanes broadcast_lanes(float v) { return _mm512_set1_ps(v); }
inline Lanes fmadd(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
#else
using Lanes = __m256;
inline Lanes load_lanes(const float* p) { return _mm256_loadu_ps(p); }
inline void store_lanes(float* p, Lanes v) { _mm256_storeu_ps(p, v); }
inline Lanes broadcast_lanes(float v) { return _mm256_set1_ps(v); }
inline Lanes fmadd(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
#endif
constexpr int64_t kLanes = sizeof(Lanes) / sizeof(float);

// kLanes half values as floats, in memory order.
template <Dtype D>
Lanes load_half_lanes(const uint16_t* p) {
#if FASTBN_VECTOR_BYTES == 64
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (D == Dtype::Float16) return _mm512_cvtph_ps(h);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (D == Dtype::Float16) return _mm256_cvtph_ps(h);
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#endif
}

// A group of 16 half values as floats: one vector (AVX-512), or two (AVX2). In AVX2, bfloat16
// widens by interleaving with zeros, which leaves the values in the order [0-3, 8-11] and
// [4-7, 12-15]; store16's pack restores it (load16_in_order keeps memory order, for per-value
// parameters). AVX-512 keeps memory order throughout.
struct Vec16 {
#if FASTBN_VECTOR_BYTES == 64
  Lanes v;
#else
  Lanes lo, hi;
#endif
};

// f applied lane-vector by lane-vector: Vec16{f(a.v, b.v, ...)}, or {f(a.lo, ...), f(a.hi, ...)}.
template <typename F, typename... V>
Vec16 lanewise(F f, const V&... v) {
#if FASTBN_VECTOR_BYTES == 64
  return {f(v.v...)};
#else
  return {f(v.lo...), f(v.hi...)};
#endif
}

inline Vec16 broadcast16(float v) {
#if FASTBN_VECTOR_BYTES == 64
  return {broadcast_lanes(v)};
#else
  return {broadcast_lanes(v), broadcast_lanes(v)};
#endif
}

// 16 float values, for per-value parameters next to load16_in_order's values.
inline Vec16 load16_floats(const float* p) {
#if FASTBN_VECTOR_BYTES == 64
  return {load_lanes(p)};
#else
  return {load_lanes(p), load_lanes(p + 8)};
#endif
}

// The sum of a vector's lanes, added in lane order.
inline float horizontal_sum(Lanes v) {
  alignas(64) float lanes[kLanes];
  store_lanes(lanes, v);
  float sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

#if FASTBN_VECTOR_BYTES == 64
template <Dtype D>
Vec16 load16(const uint16_t* p) {
  return {load_half_lanes<D>(p)};
}

template <Dtype D>
Vec16 load16_in_order(const uint16_t* p) {
  return load16<D>(p);
}

// float_to_bfloat16 on 16 values, packed: rounded in place, then each value's high half gathered.
inline __m256i round_to_bfloat16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (__builtin_expect(nan != 0, 0)) rounded = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
  const __m512i high_halves = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  // unused
                                               31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi16(high_halves, rounded));
}

// kLanes values stored as half values; stream: non-temporal stores (p 32-byte aligned; see
// streams_output).
template <Dtype D>
void store_half_lanes(uint16_t* p, Lanes v, bool stream = false) {
  __m256i packed;
  if constexpr (D == Dtype::Float16) packed = _mm512_cvtps_ph(v, kHalfRounding);
  else packed = round_to_bfloat16(v);
  auto* q = reinterpret_cast<__m256i*>(p);
  if (stream) _mm256_stream_si256(q, packed);
  else _mm256_storeu_si256(q, packed);
}

template <Dtype D>
void store16(uint16_t* p, const Vec16& v, bool stream = false) {
  store_half_lanes<D>(p, v.v, stream);
}

template <Dtype D>
void store16_in_order(uint16_t* p, const Vec16& v, bool stream = false) {
  store16<D>(p, v, stream);
}

// Which lanes of a group hold values below index `cut`, and a blend by them.
using Lanes16Mask = __mmask16;
template <Dtype D>
Lanes16Mask lanes_below(int64_t cut) {
  return __mmask16((1u << cut) - 1u);
}
inline Vec16 blend16(Lanes16Mask take_first, const Vec16& first, const Vec16& other) {
  return {_mm512_mask_blend_ps(take_first, other.v, first.v)};
}
#else
template <Dtype D>
Vec16 load16(const uint16_t* p) {
  if constexpr (D == Dtype::Float16) {
    return {load_half_lanes<D>(p), load_half_lanes<D>(p + 8)};
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), zero = _mm256_setzero_si256();
    return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v))};
  }
}

// load16 with the values in memory order, for loops whose parameters vary per value: those then
// load as they lie (load16_floats). For float16 nothing changes; for bfloat16 the widening takes
// two 8-value loads and the pack (store16_in_order) a permute, where matching load16's interleave
// cost three permutes per parameter (bfloat16 channels_last eval, cold: 0.92 -> 0.80 ms on 16x64x56x56).
template <Dtype D>
Vec16 load16_in_order(const uint16_t* p) {
  return {load_half_lanes<D>(p), load_half_lanes<D>(p + 8)};
}

// float_to_bfloat16 on 8 values (as 32-bit integers, the high half zero).
inline __m256i round_to_bfloat16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  if (__builtin_expect(_mm256_movemask_ps(nan) == 0, 1)) return rounded;
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(nan));
}

template <Dtype D>
void store_half_lanes(uint16_t* p, Lanes v, bool stream = false) {
  __m128i h;
  if constexpr (D == Dtype::Float16) {
    h = _mm256_cvtps_ph(v, kHalfRounding);
  } else {  // 32 -> 16 bits: packus works per 128-bit lane, so the halves are gathered after it
    const __m256i out = round_to_bfloat16(v);
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0x08));
  }
  auto* q = reinterpret_cast<__m128i*>(p);
  if (stream) _mm_stream_si128(q, h);
  else _mm_storeu_si128(q, h);
}

// stream: non-temporal stores (p 32-byte aligned; see streams_output).
template <Dtype D>
void store16(uint16_t* p, const Vec16& v, bool stream = false) {
  if constexpr (D == Dtype::Float16) {
    const __m128i lo = _mm256_cvtps_ph(v.lo, kHalfRounding), hi = _mm256_cvtps_ph(v.hi, kHalfRounding);
    auto* q = reinterpret_cast<__m128i*>(p);
    if (stream) _mm_stream_si128(q, lo), _mm_stream_si128(q + 1, hi);
    else _mm_storeu_si128(q, lo), _mm_storeu_si128(q + 1, hi);
  } else {  // packus works per 128-bit lane, which undoes load16's interleave
    const __m256i packed = _mm256_packus_epi32(round_to_bfloat16(v.lo), round_to_bfloat16(v.hi));
    auto* q = reinterpret_cast<__m256i*>(p);
    if (stream) _mm256_stream_si256(q, packed);
    else _mm256_storeu_si256(q, packed);
  }
}

template <Dtype D>
void store16_in_order(uint16_t* p, const Vec16& v, bool stream = false) {
  if constexpr (D == Dtype::Float16) {
    store16<D>(p, v, stream);
  } else {  // packus gives [0-3, 8-11, 4-7, 12-15]; the permute puts the quarters back in order
    const __m256i packed =
        _mm256_permute4x64_epi64(_mm256_packus_epi32(round_to_bfloat16(v.lo), round_to_bfloat16(v.hi)), 0xD8);
    auto* q = reinterpret_cast<__m256i*>(p);
    if (stream) _mm256_stream_si256(q, packed);
    else _mm256_storeu_si256(q, packed);
  }
}

// Which lanes of a group (in load16's order) hold values below index `cut`, as masks, and a blend
// by them.
using Lanes16Mask = Vec16;
template <Dtype D>
Lanes16Mask lanes_below(int64_t cut) {
  const __m256 at = _mm256_set1_ps(float(cut));
  const bool half = D == Dtype::Float16;
  const __m256 lo = half ? _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7) : _mm256_setr_ps(0, 1, 2, 3, 8, 9, 10, 11);
  const __m256 hi = half ? _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15) : _mm256_setr_ps(4, 5, 6, 7, 12, 13, 14, 15);
  return {_mm256_cmp_ps(lo, at, _CMP_LT_OQ), _mm256_cmp_ps(hi, at, _CMP_LT_OQ)};
}
inline Vec16 blend16(const Lanes16Mask& take_first, const Vec16& first, const Vec16& other) {
  return lanewise([](auto mask, auto a, auto b) { return _mm256_blendv_ps(b, a, mask); }, take_first, first, other);
}
#endif

// float32 and float64 values in 32-byte vectors (GCC vector arithmetic, which also takes a scalar
// operand), for the streaming forms of the plain elementwise passes.
template <typename T>
struct Vec32Of;
template <>
struct Vec32Of<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t lane_index;
  typedef int32_t lanes __attribute__((vector_size(32)));
};
template <>
struct Vec32Of<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t lane_index;
  typedef int64_t lanes __attribute__((vector_size(32)));
};
template <typename T>
using Vec32 = typename Vec32Of<T>::type;

template <typename T>
Vec32<T> load32(const T* p) {
  Vec32<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
void stream32(T* p, Vec32<T> v) {  // p 32-byte aligned
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
  else _mm256_stream_pd(p, v);
}

// 32 bytes as two 16-byte stores. Storing the rows' float32 results 32 or 64 bytes at a time (these
// loops, or `omp simd` in the AVX-512 table) into lines that are not in cache took 1.15-1.5x the time
// of the same loop with 16-byte stores on the Zen 4 VM (channels_last eval, cold: torch's loop, which
// is slower in cache, was faster there; bench/store_width.c); in cache the two take the same time.
// The vectors and the arithmetic stay 32 bytes wide.
template <typename T>
void store32_halves(T* p, Vec32<T> v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm_storeu_ps(p, _mm256_castps256_ps128(v));
    _mm_storeu_ps(p + 4, _mm256_extractf128_ps(v, 1));
  } else {
    _mm_storeu_pd(p, _mm256_castpd256_pd128(v));
    _mm_storeu_pd(p + 2, _mm256_extractf128_pd(v, 1));
  }
}
#endif

template <Dtype D>
void to_float(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
#ifdef FASTBN_HAS_F16C
  for (; i + kLanes <= n; i += kLanes) store_lanes(dst + i, load_half_lanes<D>(src + i));
#endif
  for (; i < n; ++i) dst[i] = Traits<D>::load(src[i]);
}

template <Dtype D>
void from_float(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  int64_t i = 0;
#ifdef FASTBN_HAS_F16C
  for (; i + kLanes <= n; i += kLanes) store_half_lanes<D>(dst + i, load_lanes(src + i));
#endif
  for (; i < n; ++i) dst[i] = Traits<D>::store(src[i]);
}

#ifdef FASTBN_HAS_F16C
// Plain BatchNorm's two elementwise formulas on half values, in 16 lanes: y = (x - mean) * scale +
// bias and dx = dy * dy_scale + (x - mean) * xmu_scale + shift, each multiply-add fused.
inline Vec16 affine16(const Vec16& x, const Vec16& mean, const Vec16& scale, const Vec16& bias) {
  return lanewise([](auto x, auto mean, auto scale, auto bias) { return fmadd(x - mean, scale, bias); }, x, mean,
                  scale, bias);
}

inline Vec16 grad_input16(const Vec16& dy, const Vec16& x, const Vec16& mean, const Vec16& dy_scale,
                          const Vec16& xmu_scale, const Vec16& shift) {
  return lanewise([](auto dy, auto x, auto mean, auto dy_scale, auto xmu_scale,
                      auto shift) { return fmadd(dy, dy_scale, fmadd(x - mean, xmu_scale, shift)); },
                  dy, x, mean, dy_scale, xmu_scale, shift);
}
#endif

// Plain BatchNorm's elementwise pass on half values of one channel, y = (x - mean) * scale + bias,
// in registers (no staging): the values of x [0, n) in whole groups of 16. Returns how many it did
// (0 without F16C).
template <Dtype D>
int64_t affine_in_registers(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t n, float mean,
                            float scale, float bias, bool stream = false) {
  int64_t i = 0;
#ifdef FASTBN_HAS_F16C
  const Vec16 m = broadcast16(mean), s = broadcast16(scale), b = broadcast16(bias);
  for (; i + 16 <= n; i += 16) store16<D>(y + i, affine16(load16<D>(x + i), m, s, b), stream);
#endif
  return i;
}

// y = x * scale + shift on half values with the parameters per value, in registers: the values of x
// [0, n) in whole groups of 16. Returns how many it did (0 without F16C). (See half_rows_folded.)
template <Dtype D>
int64_t scale_shift_in_registers(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t n,
                                 const float* scale, const float* shift, bool stream) {
  int64_t i = 0;
#ifdef FASTBN_HAS_F16C
  for (; i + 16 <= n; i += 16)
    store16_in_order<D>(y + i,
                        lanewise([](auto x, auto scale, auto shift) { return fmadd(x, scale, shift); },
                                 load16_in_order<D>(x + i), load16_floats(scale + i), load16_floats(shift + i)),
                        stream);
#endif
  return i;
}

#ifdef FASTBN_HAS_F16C
// A sum of half values in float lanes over any number of runs: each run's whole groups of 16 in
// kSumChains accumulators taken in turn (independent chains of adds), its last n % 16 values one by
// one, and one horizontal sum at the end. One accumulator left the loop waiting on its add's
// latency (AVX-512: 16 values per 4 cycles): bfloat16 (16,64,28,28) statistics, 1 thread, warm,
// 0.157 -> 0.118 ms (cold, where memory bounds the pass, no change). AVX2's Vec16 is already two
// vectors, so two accumulators there make four chains. A horizontal sum per run (eight serial
// adds) cost a 7x7 run, three groups and a value, a good part of its time: bfloat16 (16,2048,7,7)
// statistics with warm caches 0.30 -> 0.25 ms.
constexpr int kSumChains = FASTBN_VECTOR_BYTES == 64 ? 4 : 2;

struct HalfSum {
  Vec16 lanes[kSumChains];
  float tail = 0;
  // Written out: GCC compiles an implicit constructor without the file's target (AVX) options.
  HalfSum() {
    for (Vec16& l : lanes) l = broadcast16(0.0f);
  }
  float total() const {
    Vec16 t = lanes[0];
    for (int k = 1; k < kSumChains; ++k) t = lanewise([](auto a, auto b) { return a + b; }, t, lanes[k]);
#if FASTBN_VECTOR_BYTES == 64
    return horizontal_sum(t.v) + tail;
#else
    return horizontal_sum(t.lo + t.hi) + tail;
#endif
  }
};

// Runs group(k, i) over the whole groups of 16 in [i, n), group k % kSumChains going to
// accumulator k; returns where the groups end. The accumulators are named by constants only (the
// remainder unrolled), so GCC keeps them in registers.
template <typename Group>
int64_t for_groups_in_chains(int64_t i, int64_t n, Group group) {
  for (; i + 16 * kSumChains <= n; i += 16 * kSumChains)
    for (int k = 0; k < kSumChains; ++k) group(k, i + 16 * k);
  if (i + 16 <= n) group(0, i), i += 16;
  if constexpr (kSumChains > 2)
    if (i + 16 <= n) group(1, i), i += 16;
  if constexpr (kSumChains > 3)
    if (i + 16 <= n) group(2, i), i += 16;
  return i;
}

// Adds f(v) over the n half values at p; f takes a Lanes vector (GCC vector arithmetic) and, for
// the last n % 16 values, a float.
template <Dtype D, typename F>
void add_in_registers(HalfSum& sum, const uint16_t* __restrict__ p, int64_t n, F f) {
  HalfSum s = sum;  // in registers while the loop runs, whether or not this is inlined
  int64_t i = for_groups_in_chains(0, n, [&](int k, int64_t j) {
    s.lanes[k] = lanewise([&f](auto sum, auto v) { return sum + f(v); }, s.lanes[k], load16<D>(p + j));
  });
  for (; i < n; ++i) s.tail += f(Traits<D>::load(p[i]));
  sum = s;
}

// Plain BatchNorm's backward sums over n half values, added to sum(dy) and sum(dy * (x - mean)).
template <Dtype D>
void add_grad_sums_in_registers(HalfSum& sum_dy, HalfSum& sum_dy_xmu, const uint16_t* __restrict__ dy,
                                const uint16_t* __restrict__ x, int64_t n, float mean) {
  const Vec16 m = broadcast16(mean);
  HalfSum g_sum = sum_dy, gx_sum = sum_dy_xmu;  // in registers, as in add_in_registers
  int64_t i = for_groups_in_chains(0, n, [&](int k, int64_t j) {
    const Vec16 g = load16<D>(dy + j), v = load16<D>(x + j);
    g_sum.lanes[k] = lanewise([](auto sum, auto g) { return sum + g; }, g_sum.lanes[k], g);
    gx_sum.lanes[k] =
        lanewise([](auto sum, auto g, auto v, auto m) { return fmadd(g, v - m, sum); }, gx_sum.lanes[k], g, v, m);
  });
  for (; i < n; ++i) {
    const float g = Traits<D>::load(dy[i]);
    g_sum.tail += g;
    gx_sum.tail += g * (Traits<D>::load(x[i]) - mean);
  }
  sum_dy = g_sum;
  sum_dy_xmu = gx_sum;
}
#endif

// Plain BatchNorm's input gradient on half values, dx = dy * dy_scale + (x - mean) * xmu_scale +
// shift, in registers, over whole groups of 16 of [0, n), the parameters per value (PerValue) or
// one for all. Returns how many values it did (0 without F16C).
template <Dtype D, bool PerValue>
int64_t grad_input_in_registers(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ x,
                                uint16_t* __restrict__ dx, int64_t n, const float* mean, const float* dy_scale,
                                const float* xmu_scale, const float* shift, bool stream = false) {
  int64_t i = 0;
#ifdef FASTBN_HAS_F16C
  if constexpr (PerValue) {
    for (; i + 16 <= n; i += 16)
      store16_in_order<D>(dx + i,
                          grad_input16(load16_in_order<D>(dy + i), load16_in_order<D>(x + i), load16_floats(mean + i),
                                       load16_floats(dy_scale + i), load16_floats(xmu_scale + i),
                                       load16_floats(shift + i)),
                          stream);
  } else {
    const Vec16 m = broadcast16(mean[0]), a = broadcast16(dy_scale[0]), b = broadcast16(xmu_scale[0]),
                c = broadcast16(shift[0]);
    for (; i + 16 <= n; i += 16)
      store16<D>(dx + i, grad_input16(load16<D>(dy + i), load16<D>(x + i), m, a, b, c), stream);
  }
#endif
  return i;
}

#ifdef FASTBN_HAS_F16C
// Plain BatchNorm's passes on half values over whole planes back to back, in registers: n values
// from the start of a plane of channel c0, planes of S >= 16 values, channels cycling through C.
// One run of 16-value groups rather than one per plane: a 7x7 plane is three groups and a value,
// and plane by plane its end and setup cost more than its groups (bfloat16 (16,2048,7,7) eval
// 2.6x a copy; one run: 1.02-1.07 -> 0.49-0.62 ms). A group that straddles two planes gives each
// lane its own channel's parameters. group(i, const Vec16 (&p)[P]) does values [i, i + 16),
// one(i, const float (&p)[P]) value i: the same arithmetic (FMA in both), so no value's bits
// depend on where its run starts. (store_planes walks float planes the same way, by 64-byte lines
// of GCC vectors; these groups are lane-ordered Vec16 pairs, mixed by blends.)
template <Dtype D, int P, typename Group, typename One>
void half_planes_in_registers(int64_t n, int64_t c0, int64_t S, int64_t C, const float* const (&params)[P],
                              Group group, One one) {
  Vec16 p[P];
  int64_t i = 0, c = c0, next = S;  // next: where the plane after channel c's starts
  while (i + 16 <= n) {
    for (int k = 0; k < P; ++k) p[k] = broadcast16(params[k][c]);
    for (const int64_t end = std::min(next, n); i + 16 <= end; i += 16) group(i, p);
    c = c + 1 == C ? 0 : c + 1;
    if (i < next && i + 16 <= n) {  // [i, i + 16) holds the plane's end and the next one's start
      const Lanes16Mask first = lanes_below<D>(next - i);
      Vec16 mixed[P];
      for (int k = 0; k < P; ++k) {
        const Vec16 q = broadcast16(params[k][c]);
        mixed[k] = blend16(first, p[k], q);
      }
      group(i, mixed);
      i += 16;
    }
    next += S;
  }
  for (; i < n; ++i) {
    const int64_t channel = (c0 + i / S) % C;
    float q[P];
    for (int k = 0; k < P; ++k) q[k] = params[k][channel];
    one(i, q);
  }
}
#endif

// Plain BatchNorm's two elementwise passes on half values over whole planes back to back (see
// half_planes_in_registers), with normal stores. Return n, or 0 in the baseline table.
template <Dtype D>
__attribute__((noinline)) int64_t affine_half_planes(const uint16_t* __restrict__ x, uint16_t* __restrict__ y,
                                                     int64_t n, int64_t c0, int64_t S, int64_t C, const float* mean,
                                                     const float* scale, const float* bias) {
#ifdef FASTBN_HAS_F16C
  using K = Traits<D>;
  const float* const params[3] = {mean, scale, bias};
  half_planes_in_registers<D, 3>(
      n, c0, S, C, params,
      [&](int64_t i, const Vec16(&p)[3]) { store16<D>(y + i, affine16(load16<D>(x + i), p[0], p[1], p[2])); },
      [&](int64_t i, const float(&p)[3]) { y[i] = K::store(std::fma(K::load(x[i]) - p[0], p[1], p[2])); });
  return n;
#else
  return 0;
#endif
}

template <Dtype D>
__attribute__((noinline)) int64_t grad_input_half_planes(const uint16_t* __restrict__ dy,
                                                         const uint16_t* __restrict__ x, uint16_t* __restrict__ dx,
                                                         int64_t n, int64_t c0, int64_t S, int64_t C, const float* mean,
                                                         const float* dy_scale, const float* xmu_scale,
                                                         const float* shift) {
#ifdef FASTBN_HAS_F16C
  using K = Traits<D>;
  const float* const params[4] = {mean, dy_scale, xmu_scale, shift};
  half_planes_in_registers<D, 4>(
      n, c0, S, C, params,
      [&](int64_t i, const Vec16(&p)[4]) {
        store16<D>(dx + i, grad_input16(load16<D>(dy + i), load16<D>(x + i), p[0], p[1], p[2], p[3]));
      },
      [&](int64_t i, const float(&p)[4]) {
        dx[i] = K::store(std::fma(K::load(dy[i]), p[1], std::fma(K::load(x[i]) - p[0], p[2], p[3])));
      });
  return n;
#else
  return 0;
#endif
}

#ifdef FASTBN_HAS_F16C
// The partial 64-byte lines at the ends of streamed runs: a run's values for such a line wait here
// until the next run continues the line; a line filled this way is streamed, any other is written
// with normal stores (flush, also at the end of a thread's work: finish_streamed_stores). Rows
// that are not whole lines thus stream every line but those at a thread's or a block's ends.
struct PendingLine {
  char* line = nullptr;    // the line's address, or nullptr when none is pending
  int begin = 0, end = 0;  // the line's bytes [begin, end) are in buf
  alignas(64) char buf[64];

  void flush() {
    if (line) std::memcpy(line + begin, buf + begin, end - begin);
    line = nullptr;
  }
  // The n bytes at `to` (within one line) are `bytes`.
  void append(void* to, const void* bytes, int64_t n) {
    char* p = static_cast<char*>(to);
    char* l = p - reinterpret_cast<uintptr_t>(p) % 64;
    const int off = int(p - l);
    if (l != line || off != end) {
      flush();
      line = l, begin = end = off;
    }
    std::memcpy(buf + off, bytes, n);
    end = off + int(n);
    if (begin == 0 && end == 64) {
      for (int half = 0; half < 64; half += 32)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(l + half),
                            _mm256_load_si256(reinterpret_cast<const __m256i*>(buf + half)));
      line = nullptr;
    }
  }
};

inline PendingLine& pending_line() {
  thread_local PendingLine pending;
  return pending;
}

// y[i] = scalar(i) for i in [i0, i1), values within one line, through the pending line.
template <typename T, typename Scalar>
void through_pending_line(T* __restrict__ y, int64_t i0, int64_t i1, Scalar scalar) {
  T values[64 / sizeof(T)];
  for (int64_t i = i0; i < i1; ++i) values[i - i0] = scalar(i);
  if (i1 > i0) pending_line().append(y + i0, values, (i1 - i0) * sizeof(T));
}

// How many of the n values from y come before its first line boundary.
template <typename T>
int64_t values_before_line(const T* y, int64_t n) {
  return std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(y) % 64) % 64 / sizeof(T));
}

// y[i] for i in [0, n), vector(i) giving values i to i + 32 bytes, scalar(i) value i. Streamed:
// whole lines with non-temporal stores, the partial lines at either end through the pending line.
// Otherwise each vector as two 16-byte stores (store32_halves), the last values from scalar(i).
template <typename T, typename Vector, typename Scalar>
void store_run(T* __restrict__ y, int64_t n, bool stream, Vector vector, Scalar scalar) {
  constexpr int64_t kWidth = 32 / sizeof(T), kLine = 64 / sizeof(T);
  if (!stream) {
    int64_t i = 0;
    for (; i + kWidth <= n; i += kWidth) store32_halves(y + i, vector(i));
    for (; i < n; ++i) y[i] = scalar(i);
    return;
  }
  const int64_t head = values_before_line(y, n);
  through_pending_line(y, 0, head, scalar);
  int64_t i = head;
  for (; i + kLine <= n; i += kLine) {
    stream32(y + i, vector(i));
    stream32(y + i + kWidth, vector(i + kWidth));
  }
  through_pending_line(y, i, n, scalar);
}

// y[i] for i in [0, n) over whole planes that lie back to back (S >= 64 bytes each, the first of
// channel c0, channels cycling through C), as one run instead of one per plane. Streamed (Stream),
// only the run's two ends go through the pending line (a 14x14 plane is 12.25 lines; plane by
// plane, its partial lines made the passes 7-18% slower); with normal stores, each plane's loop
// setup and scalar end are saved (float32 (16,2048,7,7) eval 0.80-1.04 -> 0.63-0.76 ms). Each
// value takes its channel's P parameters (params[k][c]); the vectors of a line that straddles two
// planes take each lane's own, so every value gets the same operations as in the per-plane loops.
// vector(i, Vec32<T> (&p)[P]) computes values i to i + 32 bytes, scalar(i, T (&p)[P]) value i.
template <bool Stream, typename T, int P, typename Vector, typename Scalar>
void store_planes(T* __restrict__ y, int64_t n, int64_t c0, int64_t S, int64_t C, const T* const (&params)[P],
                  Vector vector, Scalar scalar) {
  using V = Vec32<T>;
  using Lanes = typename Vec32Of<T>::lanes;
  using LaneIndex = typename Vec32Of<T>::lane_index;
  constexpr int64_t kWidth = 32 / sizeof(T), kLine = 64 / sizeof(T);
  auto broadcast = [&](V(&v)[P], int64_t channel) {
    for (int k = 0; k < P; ++k) v[k] = V{} + params[k][channel];
  };
  auto scalar_of_channel = [&](int64_t i) {  // the ends: value i with its channel's parameters
    const int64_t channel = (c0 + i / S) % C;
    T p[P];
    for (int k = 0; k < P; ++k) p[k] = params[k][channel];
    return scalar(i, p);
  };
  auto store = [y](int64_t i, V v) {
    if constexpr (Stream) stream32(y + i, v);
    else std::memcpy(y + i, &v, sizeof v);
  };
  auto ends = [&](int64_t i0, int64_t i1) {  // values [i0, i1), within one line
    if constexpr (Stream) through_pending_line(y, i0, i1, scalar_of_channel);
    else for (int64_t i = i0; i < i1; ++i) y[i] = scalar_of_channel(i);
  };
  const int64_t head = Stream ? values_before_line(y, n) : 0;
  const int64_t lines_end = head + (n - head) / kLine * kLine;
  ends(0, head);
  int64_t i = head, c = (c0 + i / S) % C, next = (i / S + 1) * S;  // next: where the next plane starts
  while (i < lines_end) {
    V p[P];
    broadcast(p, c);
    for (const int64_t end = std::min(lines_end, i + (next - i) / kLine * kLine); i < end; i += kLine) {
      store(i, vector(i, p));
      store(i + kWidth, vector(i + kWidth, p));
    }
    if (i < lines_end && i < next) {  // the line [i, i + kLine) holds the plane's end and the next one's start
      V q[P], mixed[P];
      broadcast(q, c + 1 == C ? 0 : c + 1);
      Lanes lane{};
      for (int64_t l = 0; l < kWidth; ++l) lane[l] = LaneIndex(l);
      for (int64_t j = i; j < i + kLine; j += kWidth) {
        const Lanes first = lane < Lanes{} + LaneIndex(next - j);  // the lanes still in channel c
        for (int k = 0; k < P; ++k) mixed[k] = first ? p[k] : q[k];
        store(j, vector(j, mixed));
      }
      i += kLine;
    }
    c = c + 1 == C ? 0 : c + 1;
    next += S;
  }
  ends(lines_end, n);
}
#endif

// Plain BatchNorm's two elementwise passes on float32 and float64 values over one run [0, n) (a
// row, or a chunk of a plane longer than a block), through store_run; returns how many values it
// wrote (n, or 0 in the baseline table). The arithmetic is the plain loops' (no FMA: the build
// contracts nothing), in vectors and in the scalar ends alike, so every path gives the same bits.
template <typename T, bool PerValue>
int64_t affine_run(const T* __restrict__ x, T* __restrict__ y, int64_t n, const T* mean, const T* scale,
                   const T* bias, bool stream) {
#ifdef FASTBN_HAS_F16C
  store_run(
      y, n, stream,
      [&](int64_t i) {
        if constexpr (PerValue) return (load32(x + i) - load32(mean + i)) * load32(scale + i) + load32(bias + i);
        else return (load32(x + i) - *mean) * *scale + *bias;
      },
      [&](int64_t i) {
        const int64_t p = PerValue ? i : 0;
        return (x[i] - mean[p]) * scale[p] + bias[p];
      });
  return n;
#else
  return 0;
#endif
}

template <typename T, bool PerValue>
int64_t grad_input_run(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t n,
                       const T* mean, const T* dy_scale, const T* xmu_scale, const T* shift, bool stream) {
#ifdef FASTBN_HAS_F16C
  store_run(
      dx, n, stream,
      [&](int64_t i) {
        if constexpr (PerValue)
          return load32(dy + i) * load32(dy_scale + i) + (load32(x + i) - load32(mean + i)) * load32(xmu_scale + i) +
                 load32(shift + i);
        else return load32(dy + i) * *dy_scale + (load32(x + i) - *mean) * *xmu_scale + *shift;
      },
      [&](int64_t i) {
        const int64_t p = PerValue ? i : 0;
        return dy[i] * dy_scale[p] + (x[i] - mean[p]) * xmu_scale[p] + shift[p];
      });
  return n;
#else
  return 0;
#endif
}

// The same two passes over whole planes back to back (see store_planes), streamed or not: n
// values, the first at the start of a plane of channel c0, the parameters per channel. Returns n,
// or 0 in the baseline table. Not inlined (called once per stretch): inlined into the drivers,
// they made the backward large enough that GCC's inlining limits left other `omp simd` loops scalar.
template <typename T>
__attribute__((noinline)) int64_t affine_planes(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t c0,
                                                int64_t S, int64_t C, const T* mean, const T* scale, const T* bias,
                                                bool stream) {
#ifdef FASTBN_HAS_F16C
  const T* const params[3] = {mean, scale, bias};
  auto vector = [&](int64_t i, const Vec32<T>(&p)[3]) { return (load32(x + i) - p[0]) * p[1] + p[2]; };
  auto scalar = [&](int64_t i, const T(&p)[3]) { return (x[i] - p[0]) * p[1] + p[2]; };
  if (stream) store_planes<true>(y, n, c0, S, C, params, vector, scalar);
  else store_planes<false>(y, n, c0, S, C, params, vector, scalar);
  return n;
#else
  return 0;
#endif
}

template <typename T>
__attribute__((noinline)) int64_t grad_input_planes(const T* __restrict__ dy, const T* __restrict__ x,
                                                    T* __restrict__ dx, int64_t n, int64_t c0, int64_t S, int64_t C,
                                                    const T* mean, const T* dy_scale, const T* xmu_scale,
                                                    const T* shift, bool stream) {
#ifdef FASTBN_HAS_F16C
  const T* const params[4] = {mean, dy_scale, xmu_scale, shift};
  auto vector = [&](int64_t i, const Vec32<T>(&p)[4]) {
    return load32(dy + i) * p[1] + (load32(x + i) - p[0]) * p[2] + p[3];
  };
  auto scalar = [&](int64_t i, const T(&p)[4]) { return dy[i] * p[1] + (x[i] - p[0]) * p[2] + p[3]; };
  if (stream) store_planes<true>(dx, n, c0, S, C, params, vector, scalar);
  else store_planes<false>(dx, n, c0, S, C, params, vector, scalar);
  return n;
#else
  return 0;
#endif
}

// y[i] = op(x[i], i [, residual[i]]) over n half values, staged through float buffers; op is
// called with the residual's value only when there is a residual.
template <Dtype D, typename Op>
void staged_map(const uint16_t* x, const uint16_t* residual, uint16_t* y, int64_t n, Op op) {
  alignas(64) float xs[kStageElems], rs[kStageElems];
  for (int64_t i0 = 0; i0 < n; i0 += kStageElems) {
    const int64_t len = std::min(kStageElems, n - i0);
    to_float<D>(x + i0, xs, len);
    if (residual) {
      to_float<D>(residual + i0, rs, len);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) xs[i] = op(xs[i], i0 + i, rs[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) xs[i] = op(xs[i], i0 + i);
    }
    from_float<D>(xs, y + i0, len);
  }
}

// One stage of the fused backward's loops on float16 values (backward_impl's kStageLoops): inputs
// converted to float in registers with F16C, the float loops run over them, and outputs written
// here and converted back. Fused float16 backward ops 10-30% faster than with the loops converting
// value by value with integer code (BN + ReLU, BN + add + ReLU, memory-efficient leaky ReLU;
// 16x256x28x28 and 32x256x14x14, both layouts, cold).
template <Dtype D>
struct StagedRun {
  alignas(64) float dy[kStageElems], saved[kStageElems], residual[kStageElems], grad[kStageElems], dx[kStageElems];
  static void load(float* dst, const uint16_t* src, int64_t n) { to_float<D>(src, dst, n); }
  static void store(uint16_t* dst, const float* src, int64_t n) { from_float<D>(src, dst, n); }
};

// At most 4096 values per planes block (16 KB of fp32), so a block's second pass reads L1.
constexpr int64_t kBlockElems = 4096;
// Rows blocks are wider (the channel vector is the SIMD axis) and sit in L2.
constexpr int64_t kRowBlockElems = 32768;
constexpr int64_t kMaxRowsPerBlock = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether a plain elementwise pass writes its output (a tensor of geometry g) with non-temporal
// stores. A normal store first reads the line it writes (for ownership), so a pass that reads one
// tensor and writes another moves three tensors' bytes where streaming moves two: on this VM a
// 12.8 MB copy takes 0.85 ms instead of 1.0.
// - Runs (planes or rows) of whole 64-byte lines stream in every dtype, but float32 and float64
//   rows from 128 bytes only: streamed row by row, channels_last float32 with 16 channels (64x16x
//   56x56) took 1.0-1.6x the time of normal stores in eval and 1.0-1.4x in training forward; with
//   32 channels the two were level, with 64 streaming was 15-20% faster (Zen 4 VM, 2 threads,
//   cold, builds alternating with torch as the yardstick).
// - float32 and float64 planes of 64 bytes and up stream as stretches of consecutive planes
//   (store_planes; against plane by plane through the pending line, 14x14 passes 7-18% faster;
//   7x7 ones, which that way were 20-45% slower than normal stores, 10-20% faster than those).
//   Rows of 512 bytes and up that share lines complete them through the pending line.
// - 16-bit vectors of 16 must start where the normal path's do (the same bits either way), so
//   16-bit runs stream only when whole lines: runs ending in normal stores among streamed ones
//   made the passes 15-20% slower.
// - Streamed lines leave the cache, so outputs the next layer could read from it are written
//   normally: below streaming_store_bytes (a quarter of L3; for 6.4 MB outputs a following ReLU
//   lost what BatchNorm gained, at 12.8 MB and up the pair was 5-10% faster).
// Needs AVX2 (the streaming loops are written in registers).
bool streams_output(const void* out, const Geometry& g, int64_t value_bytes) {
#ifdef FASTBN_HAS_F16C
  const bool rows = g.inner == 1;
  const int64_t run = (rows ? g.channels : g.inner) * value_bytes;
  const bool streamable = value_bytes == 2 ? run % 64 == 0
                          : rows           ? run >= 512 || (run >= 128 && run % 64 == 0)
                                           : run >= 64;
  return streamable && fastbn::cpu::streams_output(out, g.outer * g.channels * g.inner * value_bytes);
#else
  return false;
#endif
}

// Streamed stores are weakly ordered: each thread writes its pending line and fences its stores
// before its work is handed on.
inline void finish_streamed_stores() {
#ifdef FASTBN_HAS_F16C
  pending_line().flush();
#endif
  _mm_sfence();
}

// Two sums accumulated in four vector registers each (four independent add chains), added up
// once at the end in a fixed order. Blocks are made of many short runs (one plane each, often 49
// or 196 values): a plain `omp simd reduction` would pay a horizontal sum per run and serialize
// its adds on one register. Values are produced by a vectorized loop into a small aligned array
// (GCC keeps it in registers) and added as GCC vector-extension types, which never spill.
template <typename R>
struct LaneSums {
  typedef R Vector __attribute__((vector_size(FASTBN_VECTOR_BYTES)));
  static constexpr int kWidth = FASTBN_VECTOR_BYTES / sizeof(R);
  static constexpr int kStep = 4 * kWidth;
  Vector a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  alignas(FASTBN_VECTOR_BYTES) R a_short[kWidth] = {}, b_short[kWidth] = {};
  R a_tail = 0, b_tail = 0;

  static Vector load(const R* p) {
    Vector v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  // Adds f(i) to the first sum for i in [0, n).
  template <typename F>
  void add(int64_t n, F f) {
    add(n, f, nullptr);
  }

  // Adds f(i) to the first sum and g(i) to the second for i in [0, n) (no second sum when g is nullptr).
  template <typename F, typename G>
  void add(int64_t n, F f, G g) {
    constexpr bool kTwo = !std::is_null_pointer_v<G>;
    int64_t i = 0;
    for (; i + kStep <= n; i += kStep) {
      alignas(FASTBN_VECTOR_BYTES) R v[kStep], w[kStep];
#pragma omp simd
      for (int j = 0; j < kStep; ++j) {
        v[j] = f(i + j);
        if constexpr (kTwo) w[j] = g(i + j);
      }
      a0 += load(v);
      a1 += load(v + kWidth);
      a2 += load(v + 2 * kWidth);
      a3 += load(v + 3 * kWidth);
      if constexpr (kTwo) {
        b0 += load(w);
        b1 += load(w + kWidth);
        b2 += load(w + 2 * kWidth);
        b3 += load(w + 3 * kWidth);
      }
    }
    // Short planes leave up to kStep - 1 values (17 of 49 on 7x7 with AVX2 floats): whole vectors
    // first (where a vector holds more than two), the last few one by one. Those vectors add into
    // arrays of their own, in the loop that computes them: GCC picks the loop's vector width, and
    // where values went through memory and came back as Vectors it stored the AVX-512 table's 8
    // doubles as two 32-byte halves, so every reload as one 64-byte vector waited for both stores
    // (a failed store forward): float32 7x7 statistics spent three quarters of their time there.
    if constexpr (kWidth > 2) {
      for (; i + kWidth <= n; i += kWidth) {
#pragma omp simd
        for (int j = 0; j < kWidth; ++j) {
          a_short[j] += f(i + j);
          if constexpr (kTwo) b_short[j] += g(i + j);
        }
      }
    }
    for (; i < n; ++i) {
      a_tail += f(i);
      if constexpr (kTwo) b_tail += g(i);
    }
  }

  static R horizontal(const Vector& v0, const Vector& v1, const Vector& v2, const Vector& v3, const R* short_sums,
                      R tail) {
    const Vector v = ((v0 + v1) + (v2 + v3)) + load(short_sums);
    R sum = 0;
    for (int j = 0; j < kWidth; ++j) sum += v[j];
    return sum + tail;
  }
  R first() const { return horizontal(a0, a1, a2, a3, a_short, a_tail); }
  R second() const { return horizontal(b0, b1, b2, b3, b_short, b_tail); }
};

// ---------------------------------------------------------------------------------------------
// Planes layout [N][C][S], S > 1: one channel is N runs of S contiguous values, C runs apart. A
// block is a rectangle of `rows` runs by `cols` values of one channel; the blocks tile a channel.
//
// Every pass walks memory in order. The reduction visits blocks row-block by row-block and, within
// one, channel by channel: the `rows` runs of consecutive channels are adjacent, so the hardware
// prefetchers see `rows` sequential streams (hence rows is small), while each block is small
// enough to be revisited from L1 by its second pass. The elementwise pass then streams planes.
struct PlaneBlocks {
  int64_t N, C, S;
  int64_t rows, cols;  // block extent along N and along S
  int64_t row_blocks, col_blocks;
  int64_t count() const { return row_blocks * col_blocks; }
};

// Rows per block: 2, unless the runs are so short that a block would have fewer than
// min_block_elems values. Every row is one more concurrent stream for the prefetchers, times the
// tensors a pass reads: the forward's reduction (one tensor) is fastest with blocks of >= 256 values.
// The backward's (two tensors, three with a residual, plus the residual's gradient written) was
// fastest in two passes with 2 rows whatever the plane size (AMD EPYC, 7x7 and 4x4 planes: 1.2-1.6x
// faster than 256 values). Where small planes go through the one-read groups instead (all but AMD
// CPUs, min_group_plane_bytes), memory streams are the groups' and a block's fixed costs (its sums
// zeroed, added across lanes and merged) weigh on 98-value blocks: on the Xeon VM 256 values made
// float32 (16,512,7,7)'s backward 0.42 -> 0.33 ms (1 thread, warm; torch's 0.29-0.32) and, cold on
// 2 threads, 3-23% faster over (16|32, 512|2048, 7, 7) in float32 and bfloat16.
constexpr int64_t kMaxStreams = 2;
// Planes under 64 values (7x7 and smaller) take blocks of at least 2048 values instead, in the
// forward and in the float32/float64 backward: there a block's fixed costs (its sums' set-up and
// horizontal adds, the merge) outweighed its streams. On the EPYC Zen 5 VM, cold, builds in
// alternating processes (the order alternated too: the second of a pair ran faster), medians,
// time against the minimums above over (16|32, 512|2048, 7, 7): training forward 0.51-0.94x
// (float32) and 0.67-0.79x (bfloat16); float32 backward 0.71-0.95x. bfloat16's backward, whose
// sums convert in registers plane by plane, took 1.22-1.29x and keeps its blocks. Not measured
// on an Intel CPU.
constexpr int64_t kSmallPlaneElems = 64, kSmallPlaneMinBlockElems = 2048;
int64_t forward_min_block_elems(int64_t plane_elems) {
  return plane_elems < kSmallPlaneElems ? kSmallPlaneMinBlockElems : 256;
}
int64_t backward_min_block_elems(int64_t plane_elems, int64_t value_bytes) {
  if (plane_elems < kSmallPlaneElems && value_bytes >= 4) return kSmallPlaneMinBlockElems;
  return min_group_plane_bytes() > 0 ? 0 : 256;
}

PlaneBlocks plane_blocks(const Geometry& g, int64_t min_block_elems) {
  PlaneBlocks pb{g.outer, g.channels, g.inner, 1, g.inner, 1, 1};
  if (g.inner >= kBlockElems) {
    pb.col_blocks = ceil_div(g.inner, kBlockElems);
    pb.cols = ceil_div(g.inner, pb.col_blocks);
  } else {
    pb.rows = std::min(kBlockElems / g.inner, std::max(kMaxStreams, ceil_div(min_block_elems, g.inner)));
  }
  pb.row_blocks = std::max<int64_t>(1, ceil_div(g.outer, pb.rows));
  return pb;
}

struct BlockRange {
  int64_t n0, n1, s0, s1;
  int64_t size() const { return (n1 - n0) * (s1 - s0); }
};

BlockRange block_range(const PlaneBlocks& pb, int64_t b) {
  const int64_t rb = b / pb.col_blocks, cb = b % pb.col_blocks;
  return {rb * pb.rows, std::min(pb.N, (rb + 1) * pb.rows), cb * pb.cols, std::min(pb.S, (cb + 1) * pb.cols)};
}

// The total of one channel's block results, merged in block order.
template <typename Part, typename Merge>
Part merge_blocks(const Part* parts, int64_t count, Merge merge) {
  Part total = parts[0];
  for (int64_t b = 1; b < count; ++b) total = merge(total, parts[b]);
  return total;
}

// Runs reduce(c, b) over every block of every channel (in memory order, spread over threads),
// then per channel merges the block results in block order and hands the total to finish(c, t).
template <typename Part, typename Reduce, typename Merge, typename Finish>
void reduce_planes(const PlaneBlocks& pb, int num_threads, Reduce reduce, Merge merge, Finish finish) {
  const int64_t C = pb.C, nb = pb.count(), cbs = pb.col_blocks;
  std::vector<Part> parts(C * nb);
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pb.row_blocks * C * cbs; ++t) {
      const int64_t c = t / cbs % C, b = t / (C * cbs) * cbs + t % cbs;
      parts[c * nb + b] = reduce(c, b);
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) finish(c, merge_blocks(parts.data() + c * nb, nb, merge));
  }
}

// The elementwise passes visit planes in chunks of at most kBlockElems values.
BlockRange plane_chunk(int64_t n, int64_t chunk, int64_t S) {
  return BlockRange{n, n + 1, chunk * kBlockElems, std::min(S, (chunk + 1) * kBlockElems)};
}

// Runs fn(c, range) over every plane (long planes in chunks) in memory order, one contiguous share
// per thread. Planes of one chunk go to stretch(p0, p1) first (the share's planes p = n * C + c),
// which returns whether it did them.
template <typename Fn, typename Stretch>
void for_planes_in_memory_order(const Geometry& g, int num_threads, Fn fn, Stretch stretch) {
  const int64_t S = g.inner, C = g.channels, chunks = ceil_div(S, kBlockElems), items = g.outer * C * chunks;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static) nowait
    for (int64_t part = 0; part < num_threads; ++part) {
      const int64_t i0 = items * part / num_threads, i1 = items * (part + 1) / num_threads;
      if (i1 == i0 || (chunks == 1 && stretch(i0, i1))) continue;
      for (int64_t i = i0; i < i1; ++i) fn(i / chunks % C, plane_chunk(i / chunks / C, i % chunks, S));
    }
    finish_streamed_stores();
  }
}

// Planes passes that read DRAM once: a thread takes a group of consecutive channels whose slices
// (of every tensor the pass reads) fit in its share of the cache, reduces them, finishes them, and
// runs the elementwise pass over the same slices while they are still cached. Consecutive channels
// make each of the N runs one stretch of group * S contiguous values, which the hardware
// prefetchers follow (one channel at a time is N runs of S values, C * S apart: it measured no
// faster than two passes). Returns the channels per group, or 0 for the two passes over memory
// (reduce_planes, then for_planes_in_memory_order, which spread every channel over the threads):
// where a slice is too big, where there are fewer channels than threads, and for planes under
// min_group_plane_bytes(). Planes under 256 bytes (7x7 float32 and smaller) are bound by their
// per-run work more than by memory: on an AMD EPYC (512 KB L2) groups measured no faster there
// (16-bit: 5-15% slower); on an Intel Xeon (Sapphire Rapids, 2 MB L2), where the second pass
// otherwise reads L3 or DRAM, they were faster at every size tried, 2 threads, cold, medians of 4-6
// alternating runs: backward 10% (float32 (16,512,7,7)) to 34% (bfloat16 (32,2048,7,7)), training
// forward 3-19%; (64,512,4,4) and (16,256,5,5) 4-16%.
int64_t channels_per_group(const Geometry& g, int64_t value_bytes, int64_t tensors_read, int num_threads) {
  const int64_t budget = channel_group_bytes(), slice = g.outer * g.inner * value_bytes * tensors_read;
  if (g.inner * value_bytes < min_group_plane_bytes() || slice == 0 || slice > budget || g.channels < num_threads)
    return 0;
  return std::min(budget / slice, ceil_div(g.channels, num_threads));
}

// The one-read path: the same blocks, merge order and elementwise chunks as reduce_planes and
// for_planes_in_memory_order, so its results are bit-identical to theirs. (Software prefetch of
// the next group during the elementwise pass measured no faster; pipelining that pass with the
// next group's reduction, row block by row block, 5-15% slower.)
template <typename Part, typename Reduce, typename Merge, typename Finish, typename Apply, typename Stretch>
void reduce_apply_channel_groups(const PlaneBlocks& pb, int64_t group, int num_threads, Reduce reduce, Merge merge,
                                 Finish finish, Apply apply, Stretch stretch) {
  const int64_t nb = pb.count(), cbs = pb.col_blocks, chunks = ceil_div(pb.S, kBlockElems);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Part> parts(group * nb);
    // Each thread takes an equal share of the channels, in groups of equal size: groups dealt out
    // whole left one thread a group more (64 channels in groups of 10: 40 against 24) and the
    // other waiting for it.
#pragma omp for schedule(static) nowait
    for (int64_t part = 0; part < num_threads; ++part) {
      const int64_t begin = pb.C * part / num_threads, end = pb.C * (part + 1) / num_threads;
      const int64_t groups = ceil_div(end - begin, group);
      for (int64_t j = 0; j < groups; ++j) {
        const int64_t c0 = begin + (end - begin) * j / groups, c1 = begin + (end - begin) * (j + 1) / groups;
        for (int64_t rb = 0; rb < pb.row_blocks; ++rb)
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t b = rb * cbs; b < (rb + 1) * cbs; ++b) parts[(c - c0) * nb + b] = reduce(c, b);
        for (int64_t c = c0; c < c1; ++c) finish(c, merge_blocks(parts.data() + (c - c0) * nb, nb, merge));
        for (int64_t n = 0; n < pb.N; ++n) {
          if (chunks == 1 && stretch(n * pb.C + c0, n * pb.C + c1)) continue;
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t k = 0; k < chunks; ++k) apply(c, plane_chunk(n, k, pb.S));
        }
      }
    }
    finish_streamed_stores();
  }
}

// ---------------------------------------------------------------------------------------------
// Rows layout [M][C] (inner == 1): the channel index is the contiguous, vectorized axis. A block is
// a run of whole rows; each block writes two per-channel partials, merged per channel in order.
struct RowBlocks {
  int64_t M, C, rows, count;
  int64_t begin(int64_t b) const { return b * rows; }
  int64_t end(int64_t b) const { return std::min(M, (b + 1) * rows); }
};

RowBlocks row_blocks(const Geometry& g) {
  // Each channel's sum within a block is a chain of `rows` adds, so rows is capped for accuracy.
  const int64_t rows = std::clamp<int64_t>(kRowBlockElems / std::max<int64_t>(1, g.channels), 1, kMaxRowsPerBlock);
  return {g.outer, g.channels, rows, std::max<int64_t>(1, ceil_div(g.outer, rows))};
}

// Fetches the 64-byte line holding address `at` into every cache level. In asm: GCC takes
// __builtin_prefetch to have no side effects, so a function whose only work is prefetching counts
// as const and calls to it are deleted as dead code.
inline void prefetch_line(uintptr_t at) { asm volatile("prefetcht0 (%0)" : : "r"(at)); }

// Software prefetch for the forward's rows statistics, which read each block twice (the second
// time from L2): while a thread works through block b it fetches block b + 1 (a thread's blocks
// are consecutive), spread evenly over both passes, so memory streams the whole time. Left to the
// hardware prefetchers, memory idled during every second pass. When pass p of `passes` over block b
// (n rows from m0) has added the rows before place m of its order and is about to add k more, it
// fetches block b + 1's rows from (p * n + m - m0) / passes to (p * n + m + k - m0) / passes.
// Measured on channels_last float32 (16,256,28x28), (32,256,14x14), (16,64,112x112), 2 threads,
// cold, when a trip's four rows were consecutive: 14-24% faster; bfloat16 (then converted into L2
// block by block, compute-bound) and the backward's single pass gained nothing. With the rows
// taken from the block's quarters, dropping it was 0-8% faster on some shapes and 6-12% slower on
// others (channels_last (16,256,28,28), (32,256,14,14)).
class NextRowsBlock {
 public:
  NextRowsBlock(const RowBlocks& rb, int64_t b, const void* x, int64_t value_bytes)
      : data_(reinterpret_cast<uintptr_t>(x)), row_bytes_(rb.C * value_bytes), m0_(rb.begin(b)), m1_(rb.end(b)),
        M_(rb.M) {}
  // The fetch for pass p of `passes`, to hand to add_rows: ahead(m, k) before it adds rows [m, m + k).
  auto pass(int64_t p, int64_t passes) const {
    return [this, p, passes](int64_t m, int64_t k) {
      if (row_bytes_ < 64) return;  // rows under a line: a block is at most 16 KB, a trip a few values
      const int64_t n = m1_ - m0_;
      const int64_t r0 = m1_ + (p * n + m - m0_) / passes;
      const int64_t r1 = std::min(M_, m1_ + (p * n + m + k - m0_) / passes);
      for (uintptr_t at = (data_ + r0 * row_bytes_) & ~uintptr_t(63); at < data_ + r1 * row_bytes_; at += 64)
        prefetch_line(at);
    };
  }

 private:
  uintptr_t data_;
  int64_t row_bytes_, m0_, m1_, M_;
};

// Per-channel sums over rows [m0, m1): acc[c] += f(m, c) (and acc2[c] += g(m, c)). Four rows are
// added per trip, so the accumulators are loaded and stored a quarter as often; the four values are
// added in f's own type (float for plain float32 loads: three roundings of a 4-term sum, then
// accumulated in R, which keeps float32 sums as exact as torch's while halving the conversions).
// A trip's four rows come from the four quarters of [m0, m1) (RowQuarters), so memory sees four
// sequential streams per tensor instead of one: channels_last float32 (16,256,28,28), 2 threads,
// cold, toggled in one process: statistics 16-17% faster, the backward's sums 29-37% (bfloat16
// 38%), (2048,768) 0-10%; a C model of the loop alone gave 20-30%. Before trip t, ahead(m, 4) is
// called with m = m0 + 4t, the trip's place in the rows' order (a NextRowsBlock pass, or nothing).
struct RowQuarters {
  int64_t m0, trips, quarter;
  RowQuarters(int64_t m0, int64_t m1) : m0(m0), trips((m1 - m0) / 4), quarter(trips) {}
  int64_t first(int64_t t) const { return m0 + t; }          // the trip's rows: first + k * quarter
  int64_t rest() const { return m0 + 4 * trips; }             // rows [rest(), m1) go one by one
};

template <typename R, typename F, typename Ahead>
void add_rows(R* __restrict__ acc, int64_t m0, int64_t m1, int64_t C, F f, Ahead ahead) {
  const RowQuarters rq(m0, m1);
  const int64_t q = rq.quarter;
  for (int64_t t = 0; t < rq.trips; ++t) {
    const int64_t m = rq.first(t);
    ahead(m0 + 4 * t, 4);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += R((f(m, c) + f(m + q, c)) + (f(m + 2 * q, c) + f(m + 3 * q, c)));
  }
  for (int64_t m = rq.rest(); m < m1; ++m) {
    ahead(m, 1);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += f(m, c);
  }
}

template <typename R, typename F, typename G, typename Ahead>
void add_rows(R* __restrict__ acc, R* __restrict__ acc2, int64_t m0, int64_t m1, int64_t C, F f, G g, Ahead ahead) {
  const RowQuarters rq(m0, m1);
  const int64_t q = rq.quarter;
  for (int64_t t = 0; t < rq.trips; ++t) {
    const int64_t m = rq.first(t);
    ahead(m0 + 4 * t, 4);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      acc[c] += R((f(m, c) + f(m + q, c)) + (f(m + 2 * q, c) + f(m + 3 * q, c)));
      acc2[c] += R((g(m, c) + g(m + q, c)) + (g(m + 2 * q, c) + g(m + 3 * q, c)));
    }
  }
  for (int64_t m = rq.rest(); m < m1; ++m) {
    ahead(m, 1);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      acc[c] += f(m, c);
      acc2[c] += g(m, c);
    }
  }
}

#ifdef FASTBN_HAS_F16C
// One sum of add_rows over half values, converted in registers: acc[c] += f(m, c), with
// vector(m, c) giving f for channels [c, c + kLanes) as Lanes and value(m, c) for one channel.
template <typename Vector, typename Value>
struct HalfRowSum {
  float* __restrict__ acc;
  Vector vector;
  Value value;
};
template <typename Vector, typename Value>
HalfRowSum(float*, Vector, Value) -> HalfRowSum<Vector, Value>;

// add_rows over half values for one or more sums at once, with add_rows' adds in add_rows' order,
// so the bits are those of a float loop over the values as float; such loops converted value by
// value with integer code, or through a converted copy whose stores and reloads cost more than the
// conversions.
template <typename Ahead, typename... Sums>
void add_half_row_sums(int64_t m0, int64_t m1, int64_t C, Ahead ahead, Sums... sums) {
  auto add = [](float* acc, Lanes v) { store_lanes(acc, load_lanes(acc) + v); };
  const RowQuarters rq(m0, m1);
  const int64_t q = rq.quarter;
  for (int64_t t = 0; t < rq.trips; ++t) {
    const int64_t m = rq.first(t);
    ahead(m0 + 4 * t, 4);
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      (add(sums.acc + c, (sums.vector(m, c) + sums.vector(m + q, c)) +
                             (sums.vector(m + 2 * q, c) + sums.vector(m + 3 * q, c))),
       ...);
    }
    for (; c < C; ++c) {
      ((sums.acc[c] +=
        (sums.value(m, c) + sums.value(m + q, c)) + (sums.value(m + 2 * q, c) + sums.value(m + 3 * q, c))),
       ...);
    }
  }
  for (int64_t m = rq.rest(); m < m1; ++m) {
    ahead(m, 1);
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) (add(sums.acc + c, sums.vector(m, c)), ...);
    for (; c < C; ++c) ((sums.acc[c] += sums.value(m, c)), ...);
  }
}

// The statistics' sums over half rows: acc[c] += x[m][c], or, with Squares, (x[m][c] - center[c])^2.
// Against the float loop over a converted copy: bfloat16 statistics (2048,768) 0.57 -> 0.46 ms,
// channels_last (16,256,28,28) 0.86 -> 0.61 ms; float16 channels_last (32,256,14,14) 0.52 -> 0.37 ms.
template <Dtype D, bool Squares, typename Ahead>
void add_half_rows(float* __restrict__ acc, const uint16_t* __restrict__ x, int64_t m0, int64_t m1, int64_t C,
                   const float* __restrict__ center, Ahead ahead) {
  auto value = [&](int64_t m, int64_t c) {
    const float v = Traits<D>::load(x[m * C + c]);
    if constexpr (!Squares) return v;
    const float d = v - center[c];
    return d * d;
  };
  auto vector = [&](int64_t m, int64_t c) {
    const Lanes v = load_half_lanes<D>(x + m * C + c);
    if constexpr (!Squares) return v;
    const Lanes d = v - load_lanes(center + c);
    return d * d;
  };
  add_half_row_sums(m0, m1, C, ahead, HalfRowSum{acc, vector, value});
}

// Plain BatchNorm's backward sums over half rows: sum_g[c] += dy[m][c] and sum_g_xmu[c] +=
// dy[m][c] * (x[m][c] - mean[c]), the two-sum add_rows' adds. Against its loop, which converted
// value by value with integer code: float16 channels_last (16,256,28,28), cold, build against
// build: the sums 1.07-1.13 -> 0.62-0.73 ms, the whole backward 1.64-1.72 -> 1.21-1.41; bfloat16,
// whose integer conversion is a shift that GCC vectorizes as well, within the noise.
template <Dtype D>
void add_half_grad_rows(float* __restrict__ sum_g, float* __restrict__ sum_g_xmu, const uint16_t* __restrict__ dy,
                        const uint16_t* __restrict__ x, int64_t m0, int64_t m1, int64_t C,
                        const float* __restrict__ mean) {
  auto g = [&](int64_t m, int64_t c) { return Traits<D>::load(dy[m * C + c]); };
  auto gx = [&](int64_t m, int64_t c) { return g(m, c) * (Traits<D>::load(x[m * C + c]) - mean[c]); };
  auto g_vector = [&](int64_t m, int64_t c) { return load_half_lanes<D>(dy + m * C + c); };
  auto gx_vector = [&](int64_t m, int64_t c) {
    return g_vector(m, c) * (load_half_lanes<D>(x + m * C + c) - load_lanes(mean + c));
  };
  add_half_row_sums(m0, m1, C, [](int64_t, int64_t) {}, HalfRowSum{sum_g, g_vector, g},
                    HalfRowSum{sum_g_xmu, gx_vector, gx});
}
#endif

// Two per-channel partials of each rows block, every block's C values starting on a 64-byte line:
// with glibc's 16-byte aligned rows, a quarter of the reduction's loads and stores (the
// accumulators') split across lines, and the statistics pass ran ~20% slower.
template <typename Part>
class BlockPartials {
 public:
  BlockPartials(int64_t blocks, int64_t C)
      : stride_(ceil_div(C, kLine) * kLine),
        data_(static_cast<Part*>(::operator new[](sizeof(Part) * 2 * blocks * stride_, std::align_val_t(64)))) {}
  ~BlockPartials() { ::operator delete[](data_, std::align_val_t(64)); }
  BlockPartials(const BlockPartials&) = delete;
  BlockPartials& operator=(const BlockPartials&) = delete;
  Part* first(int64_t b) const { return data_ + 2 * b * stride_; }
  Part* second(int64_t b) const { return data_ + (2 * b + 1) * stride_; }

 private:
  static constexpr int64_t kLine = 64 / sizeof(Part);
  int64_t stride_;
  Part* data_;
};

// Channels per task of the rows merge. A task adds up its channels' block partials block by block,
// each block's channels in one loop that GCC vectorizes at -O3 (no `omp simd`: GCC then reports its
// scalar remainder loop as not vectorized). Every channel still sums its blocks in block order, so
// the bits are those of one channel at a time, which strided through the blocks and took 10% of
// the statistics pass.
constexpr int64_t kMergeChannels = 64;

// Inside a parallel region: fn(m0, m1) over the rows [0, M) split evenly between the threads, one
// run each. The elementwise passes over rows need no blocks (each value's result is its own); over
// blocks, a count that was not a multiple of the threads gave one thread a block more: (2048,768)'s
// 49 blocks went 25 and 24, 4% more rows for one of two threads. (Side by side on the Zen 4 VM the
// change was within the noise: (2048,768) and channels_last (32,256,14,14), float32 and bfloat16.)
template <typename Fn>
void for_row_shares(int64_t M, int num_threads, Fn fn) {
#pragma omp for schedule(static) nowait
  for (int t = 0; t < num_threads; ++t) fn(M * t / num_threads, M * (t + 1) / num_threads);
}

// Reduces every block (reduce(b, first, second) fills the block's two partials), then merges per
// range of channels (merge(c0, c1, partials)), then runs apply(m0, m1) over the rows (for_row_shares).
template <typename Part, typename Reduce, typename Merge, typename Apply>
void for_rows(const RowBlocks& rb, int num_threads, bool has_reduce, bool has_apply, Reduce reduce, Merge merge,
              Apply apply) {
  const int64_t C = rb.C, nb = rb.count;
  if (has_reduce) {
    const BlockPartials<Part> partials(nb, C);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < nb; ++b) reduce(b, partials.first(b), partials.second(b));
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += kMergeChannels) merge(c0, std::min(C, c0 + kMergeChannels), partials);
  }
  if (!has_apply) return;
#pragma omp parallel num_threads(num_threads)
  {
    for_row_shares(rb.M, num_threads, apply);
    finish_streamed_stores();
  }
}

// Per-channel parameters in the accumulation type: weight (1 when absent), bias (0 when absent).
template <typename Acc>
Acc param_or(const void* p, int64_t c, Acc fallback) {
  return p ? static_cast<const Acc*>(p)[c] : fallback;
}

// Calls fn(tag) with the activation as a compile-time constant (tag's ::value), so that every
// elementwise loop is compiled, and vectorized, for its activation.
template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// ELU and SiLU call exp(), which GCC vectorizes only under -ffast-math: their loops stay scalar
// (tools/check_vectorization.py builds with FASTBN_VECTORIZATION_CHECK to check all the others).
template <typename Fn>
void with_activation(Activation a, Fn fn) {
  switch (a) {
    case Activation::Identity: return fn(ActivationTag<Activation::Identity>{});
    case Activation::ReLU: return fn(ActivationTag<Activation::ReLU>{});
    case Activation::LeakyReLU: return fn(ActivationTag<Activation::LeakyReLU>{});
#ifndef FASTBN_VECTORIZATION_CHECK
    case Activation::ELU: return fn(ActivationTag<Activation::ELU>{});
    case Activation::SiLU: return fn(ActivationTag<Activation::SiLU>{});
#else
    default: return;
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// y = act((x - mean) * scale + bias [+ residual]) over one block, shared by training and eval
// forward. Plain BatchNorm is the identity without residual; its runs are streamed when `stream`
// (streams_output).
template <Dtype D, Activation A, typename Acc = typename Traits<D>::acc>
void normalize_plane_block(const typename Traits<D>::storage* __restrict__ x,
                           const typename Traits<D>::storage* __restrict__ residual,
                           typename Traits<D>::storage* __restrict__ y, const PlaneBlocks& pb,
                           const BlockRange& r, int64_t c, Acc mean, Acc scale, Acc bias, Acc param, bool stream) {
  using K = Traits<D>;
  using F = ActivationFn<A>;
  const bool plain = A == Activation::Identity && !residual;
  if constexpr (kStaged<D>) {
    // bfloat16's fused loops convert with integer shifts in the loop: staged, BN + ReLU and BN + add
    // + ReLU training forward took 1.01-1.27x as long (builds alternating, order alternated).
    if (plain || D == Dtype::Float16) {
      for (int64_t n = r.n0; n < r.n1; ++n) {
        int64_t off = (n * pb.C + c) * pb.S + r.s0, len = r.s1 - r.s0;
        if (plain) {
          const int64_t done = affine_in_registers<D>(x + off, y + off, len, mean, scale, bias, stream);
          off += done, len -= done;
        }
        staged_map<D>(x + off, residual ? residual + off : nullptr, y + off, len,
                      [=](Acc v, int64_t, auto... res) {
                        return F::forward((((v - mean) * scale + bias) + ... + res), param);
                      });
      }
      return;
    }
  }
  for (int64_t n = r.n0; n < r.n1; ++n) {
    const int64_t off = (n * pb.C + c) * pb.S;
    int64_t s0 = r.s0;
    if constexpr (!kStaged<D>)
      if (plain && stream)
        s0 += affine_run<Acc, false>(x + off + s0, y + off + s0, r.s1 - s0, &mean, &scale, &bias, true);
    if (residual) {
#pragma omp simd
      for (int64_t s = r.s0; s < r.s1; ++s)
        y[off + s] =
            K::store(F::forward((K::load(x[off + s]) - mean) * scale + bias + K::load(residual[off + s]), param));
    } else {
#pragma omp simd
      for (int64_t s = s0; s < r.s1; ++s)
        y[off + s] = K::store(F::forward((K::load(x[off + s]) - mean) * scale + bias, param));
    }
  }
}

template <Dtype D, Activation A, typename Acc = typename Traits<D>::acc>
void normalize_rows(const typename Traits<D>::storage* __restrict__ x,
                    const typename Traits<D>::storage* __restrict__ residual,
                    typename Traits<D>::storage* __restrict__ y, int64_t C, int64_t m0, int64_t m1,
                    const Acc* __restrict__ mean, const Acc* __restrict__ scale, const Acc* __restrict__ bias,
                    Acc param, bool stream) {
  using K = Traits<D>;
  using F = ActivationFn<A>;
  const bool plain = A == Activation::Identity && !residual;  // 16-bit plain rows: half_rows_folded
  // float16's fused loops run over float stages (F16C converts them); bfloat16's convert in the
  // loop below (a shift), as in normalize_plane_block.
  if constexpr (D == Dtype::Float16) {
    for (int64_t m = m0; m < m1; ++m)
      staged_map<D>(x + m * C, residual ? residual + m * C : nullptr, y + m * C, C,
                    [=](Acc v, int64_t c, auto... res) {
                      return F::forward((((v - mean[c]) * scale[c] + bias[c]) + ... + res), param);
                    });
    return;
  }
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t off = m * C;
    int64_t done = 0;
    if constexpr (!kStaged<D>)
      if (plain) done = affine_run<Acc, true>(x + off, y + off, C, mean, scale, bias, stream);
    if (residual) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        y[off + c] = K::store(
            F::forward((K::load(x[off + c]) - mean[c]) * scale[c] + bias[c] + K::load(residual[off + c]), param));
    } else {
#pragma omp simd
      for (int64_t c = done; c < C; ++c)
        y[off + c] = K::store(F::forward((K::load(x[off + c]) - mean[c]) * scale[c] + bias[c], param));
    }
  }
}

// Per-channel (mean, scale, bias) for y = act((x - mean) * scale + bias [+ residual]).
template <typename Acc>
struct AffineTable {
  std::vector<Acc> mean, scale, bias;
  explicit AffineTable(int64_t C) : mean(C), scale(C), bias(C) {}
  void set(int64_t c, Acc m, Acc invstd, const void* weight, const void* bias_p) {
    mean[c] = m;
    scale[c] = param_or<Acc>(weight, c, Acc(1)) * invstd;
    bias[c] = param_or<Acc>(bias_p, c, Acc(0));
  }
};

// Plain BatchNorm on the 16-bit rows [m0, m1) as y = x * scale + shift, with shift = bias - mean *
// scale taken in double (by normalize, once per call). In the rows layout every value reads its
// channel's parameters from three float arrays (12 bytes against its own 4 in and out), and a
// third array cost ~10%: channels_last bfloat16 eval (32,2048,7,7), (64,1024,7,7), (16,4096,7,7),
// (2048,768), Zen 4, cold, in one process: 0.84-0.93x the time, level with torch (which folds too).
// Folding costs float precision where |mean| >> std (the reason the other paths subtract the mean
// first): an absolute error of about 2^-24 |mean| / std * |weight|, where the 16-bit output rounds
// to 2^-9 (bfloat16) or 2^-12 (float16) of |y| at best. For |y| ~ |weight| that stays under a
// tenth of the output's rounding for |mean| / std below ~3000 (bfloat16) and ~400 (float16); at 10
// it may move the rounding of a float16 value in a thousand by one unit (tested at 300 against the
// exact values).
template <Dtype D>
void half_rows_folded(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t C, int64_t m0, int64_t m1,
                      const float* scale, const float* shift, bool stream) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* xm = x + m * C;
    uint16_t* ym = y + m * C;
    for (int64_t c = scale_shift_in_registers<D>(xm, ym, C, scale, shift, stream); c < C; ++c)
      ym[c] = Traits<D>::store(Traits<D>::load(xm[c]) * scale[c] + shift[c]);
  }
}

// Plain BatchNorm (A identity, no residual) over the consecutive planes [p0, p1) as one run, where
// that pays; returns whether it wrote them. float32 and float64 planes of 64 bytes and up
// (store_planes); half values of 16 and up when not streamed (16-bit outputs stream only when
// their planes are whole lines, which leaves no plane ends to save).
template <Dtype D, Activation A, typename Acc>
bool normalize_planes_stretch(const typename Traits<D>::storage* x, const void* residual,
                              typename Traits<D>::storage* y, const Geometry& g, const AffineTable<Acc>& affine,
                              bool stream, int64_t p0, int64_t p1) {
  const int64_t S = g.inner, C = g.channels, n = (p1 - p0) * S;
  if (A != Activation::Identity || residual) return false;
  if constexpr (kStaged<D>) {
    return !stream && S >= 16 &&
           affine_half_planes<D>(x + p0 * S, y + p0 * S, n, p0 % C, S, C, affine.mean.data(), affine.scale.data(),
                                 affine.bias.data()) > 0;
  } else {
    return S * int64_t(sizeof(Acc)) >= 64 && affine_planes<Acc>(x + p0 * S, y + p0 * S, n, p0 % C, S, C,
                                                                affine.mean.data(), affine.scale.data(),
                                                                affine.bias.data(), stream) > 0;
  }
}

// The elementwise pass of both forwards, over the whole tensor.
template <Dtype D, typename Acc>
void normalize(const typename Traits<D>::storage* x, typename Traits<D>::storage* y, const Geometry& g,
               const AffineTable<Acc>& affine, const Epilogue& epilogue, int num_threads) {
  const auto* residual = static_cast<const typename Traits<D>::storage*>(epilogue.residual);
  const Acc param = Acc(epilogue.param);
  const bool stream = streams_output(y, g, sizeof(*y));
  with_activation(epilogue.activation, [&](auto act) {
    constexpr Activation A = decltype(act)::value;
    if (g.inner > 1) {
      const PlaneBlocks pb = plane_blocks(g, forward_min_block_elems(g.inner));
      for_planes_in_memory_order(
          g, num_threads,
          [&](int64_t c, const BlockRange& r) {
            normalize_plane_block<D, A>(x, residual, y, pb, r, c, affine.mean[c], affine.scale[c], affine.bias[c],
                                        param, stream);
          },
          [&](int64_t p0, int64_t p1) {
            return normalize_planes_stretch<D, A>(x, residual, y, g, affine, stream, p0, p1);
          });
      return;
    }
    const int64_t C = g.channels;
    constexpr bool kFoldable = kStaged<D> && A == Activation::Identity;
    std::vector<float> shift;  // half_rows_folded's: bias - mean * scale, in double
    if (kFoldable && !residual) {
      shift.resize(C);
      for (int64_t c = 0; c < C; ++c)
        shift[c] = float(double(affine.bias[c]) - double(affine.mean[c]) * double(affine.scale[c]));
    }
#pragma omp parallel num_threads(num_threads)
    {
      for_row_shares(g.outer, num_threads, [&](int64_t m0, int64_t m1) {
        if constexpr (kFoldable) {
          if (!residual) return half_rows_folded<D>(x, y, C, m0, m1, affine.scale.data(), shift.data(), stream);
        }
        normalize_rows<D, A>(x, residual, y, C, m0, m1, affine.mean.data(), affine.scale.data(), affine.bias.data(),
                             param, stream);
      });
      finish_streamed_stores();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Training forward: a blocked pass for the batch statistics, then one normalize-and-affine pass.

// Whether a planes block's moments come from one pass of sums shifted by a value of the block
// (exact terms: float32 values summed in double) rather than two exact passes.
template <Dtype D>
constexpr bool kExactShiftedSums =
    std::is_same_v<typename Traits<D>::storage, float> && std::is_same_v<typename Traits<D>::reduce, double>;

template <Dtype D>
void train_forward_impl(const TrainForwardArgs& a) {
  using K = Traits<D>;
  using Acc = typename K::acc;
  using R = typename K::reduce;
  using Stats = Moments<double>;
  const auto* x = static_cast<const typename K::storage*>(a.input);
  auto* y = static_cast<typename K::storage*>(a.output);
  auto* mean_out = static_cast<Acc*>(a.mean);
  auto* var_out = static_cast<Acc*>(a.var);
  const Geometry& g = a.geometry;
  const int64_t C = g.channels;
  AffineTable<Acc> affine(C);
  const bool has_values = g.outer * g.inner > 0;

  auto finish = [&](int64_t c, const Stats& s) {
    const double var = biased_variance(s);
    mean_out[c] = Acc(s.mean);
    var_out[c] = Acc(var);
    affine.set(c, Acc(s.mean), Acc(inverse_std(var, a.eps)), a.weight, a.bias);
  };
  if (!has_values) {  // empty batch: no statistics, nothing to write
    for (int64_t c = 0; c < C; ++c) mean_out[c] = var_out[c] = Acc(0);
    return;
  }

  if (g.inner > 1) {
    const PlaneBlocks pb = plane_blocks(g, forward_min_block_elems(g.inner));
    auto reduce = [&](int64_t c, int64_t b) -> Stats {
      const BlockRange r = block_range(pb, b);
      const int64_t len = r.s1 - r.s0;
      if constexpr (kExactShiftedSums<D>) {
        // One pass: sums of d = x - k and d^2 about k, the block's first value. Both are exact in
        // double, and as k is one of the block's n values, n (mean - k)^2 <= n * M2, so the
        // cancellation in M2 = S2 - S1^2 / n costs at most a factor n (<= 4096) of double's
        // rounding: relative error below 1e-9, far under float32's. No second pass: the memory
        // stream never waits for a re-read of the block.
        const R k = R(x[(r.n0 * C + c) * pb.S + r.s0]);
        LaneSums<R> sums;
        for (int64_t n = r.n0; n < r.n1; ++n) {
          const auto* p = x + (n * C + c) * pb.S + r.s0;
          sums.add(
              len, [p, k](int64_t i) { return R(p[i]) - k; },
              [p, k](int64_t i) {
                const R d = R(p[i]) - k;
                return d * d;
              });
        }
        const double count = double(r.size()), s1 = double(sums.first());
        const double m2 = double(sums.second()) - s1 * (s1 / count);
        return {count, double(k) + s1 / count, m2 < 0 ? 0.0 : m2};  // rounding may dip below 0; NaN stays
      }
#ifdef FASTBN_HAS_F16C
      if constexpr (kStaged<D>) {  // two passes over the block, converting in registers (the second from L1)
        HalfSum sum;
        for (int64_t n = r.n0; n < r.n1; ++n)
          add_in_registers<D>(sum, x + (n * C + c) * pb.S + r.s0, len, [](auto v) { return v; });
        const R mean = sum.total() / R(r.size());
        HalfSum m2;
        for (int64_t n = r.n0; n < r.n1; ++n)
          add_in_registers<D>(m2, x + (n * C + c) * pb.S + r.s0, len, [mean](auto v) {
            const auto d = v - mean;
            return d * d;
          });
        return {double(r.size()), double(mean), double(m2.total())};
      }
#endif
      LaneSums<R> sum;
      for (int64_t n = r.n0; n < r.n1; ++n) {
        const auto* p = x + (n * C + c) * pb.S + r.s0;
        sum.add(len, [p](int64_t i) { return R(K::load(p[i])); });
      }
      const R mean = sum.first() / R(r.size());
      LaneSums<R> m2;  // second pass over the block, now in L1
      for (int64_t n = r.n0; n < r.n1; ++n) {
        const auto* p = x + (n * C + c) * pb.S + r.s0;
        m2.add(len, [p, mean](int64_t i) {
          const R d = R(K::load(p[i])) - mean;
          return d * d;
        });
      }
      const R m2_total = m2.first();
      return {double(r.size()), double(mean), double(m2_total)};
    };
    const auto* residual = static_cast<const typename K::storage*>(a.epilogue.residual);
    const int64_t tensors_read = residual ? 2 : 1;
    if (const int64_t group = y ? channels_per_group(g, sizeof(*x), tensors_read, a.num_threads) : 0) {
      const bool stream = streams_output(y, g, sizeof(*y));
      with_activation(a.epilogue.activation, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        const Acc param = Acc(a.epilogue.param);
        reduce_apply_channel_groups<Stats>(
            pb, group, a.num_threads, reduce, merge_moments<double>, finish,
            [&](int64_t c, const BlockRange& r) {
              normalize_plane_block<D, A>(x, residual, y, pb, r, c, affine.mean[c], affine.scale[c], affine.bias[c],
                                          param, stream);
            },
            [&](int64_t p0, int64_t p1) {
              return normalize_planes_stretch<D, A>(x, residual, y, g, affine, stream, p0, p1);
            });
      });
      return;
    }
    reduce_planes<Stats>(pb, a.num_threads, reduce, merge_moments<double>, finish);
    if (y) normalize<D>(x, y, g, affine, a.epilogue, a.num_threads);
    return;
  }

  const RowBlocks rb = row_blocks(g);
  // Within a block (at most 256 rows) sums run in Acc, float for float32: each channel's sum is a
  // chain of at most 64 adds of pairwise 4-row sums, then blocks are merged in double.
  auto reduce = [&](int64_t b, Acc* __restrict__ mean, Acc* __restrict__ m2) {
    const int64_t m0 = rb.begin(b), m1 = rb.end(b);
    std::fill(mean, mean + C, Acc(0));
    std::fill(m2, m2 + C, Acc(0));
    const NextRowsBlock next(rb, b, x, sizeof(*x));
    // acc[c] += x[m][c] (Squares false) or (x[m][c] - center[c])^2 over the block's rows.
    auto add_block = [&](auto squares, Acc* acc, const Acc* center, auto ahead) {
      constexpr bool Squares = decltype(squares)::value;
#ifdef FASTBN_HAS_F16C
      if constexpr (kStaged<D>) return add_half_rows<D, Squares>(acc, x, m0, m1, C, center, ahead);
#endif
      add_rows(
          acc, m0, m1, C,
          [x, C, center](int64_t m, int64_t c) {
            const Acc v = K::load(x[m * C + c]);
            if constexpr (!Squares) return v;
            const Acc d = v - center[c];
            return d * d;
          },
          ahead);
    };
    add_block(std::false_type{}, mean, nullptr, next.pass(0, 2));
    const Acc count = Acc(m1 - m0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mean[c] /= count;
    add_block(std::true_type{}, m2, mean, next.pass(1, 2));
  };
  auto merge = [&](int64_t c0, int64_t c1, const BlockPartials<Acc>& partials) {
    // All blocks at once rather than Chan's pairwise merge (a division per block and channel, a
    // visible cost with many blocks): the exact mean first, then M2 = sum(M2_b + n_b (mean_b - mean)^2).
    const int64_t n = c1 - c0;
    double weighted[kMergeChannels] = {}, total_m2[kMergeChannels] = {};
    for (int64_t b = 0; b < rb.count; ++b) {
      const double rows = double(rb.end(b) - rb.begin(b));
      const Acc* mean = partials.first(b) + c0;
      for (int64_t i = 0; i < n; ++i) weighted[i] += rows * double(mean[i]);
    }
    for (int64_t i = 0; i < n; ++i) weighted[i] /= double(rb.M);  // now the total mean
    for (int64_t b = 0; b < rb.count; ++b) {
      const double rows = double(rb.end(b) - rb.begin(b));
      const Acc* mean = partials.first(b) + c0;
      const Acc* m2 = partials.second(b) + c0;
      for (int64_t i = 0; i < n; ++i) {
        const double offset = double(mean[i]) - weighted[i];
        total_m2[i] += double(m2[i]) + rows * offset * offset;
      }
    }
    for (int64_t i = 0; i < n; ++i) finish(c0 + i, Stats{double(rb.M), weighted[i], total_m2[i]});
  };
  for_rows<Acc>(rb, a.num_threads, true, false, reduce, merge, [](int64_t, int64_t) {});
  if (y) normalize<D>(x, y, g, affine, a.epilogue, a.num_threads);
}

// ---------------------------------------------------------------------------------------------
// Eval forward: a single y = (x - running_mean) * scale + bias pass.
template <Dtype D>
void eval_forward_impl(const EvalForwardArgs& a) {
  using K = Traits<D>;
  using Acc = typename K::acc;
  const auto* x = static_cast<const typename K::storage*>(a.input);
  auto* y = static_cast<typename K::storage*>(a.output);
  const Geometry& g = a.geometry;
  const int64_t C = g.channels;
  if (g.outer * g.inner == 0) return;
  AffineTable<Acc> affine(C);
  const auto* mean = static_cast<const Acc*>(a.mean);
  const auto* var = static_cast<const Acc*>(a.var);
  for (int64_t c = 0; c < C; ++c) affine.set(c, mean[c], Acc(inverse_std(double(var[c]), a.eps)), a.weight, a.bias);
  normalize<D>(x, y, g, affine, a.epilogue, a.num_threads);
}

// ---------------------------------------------------------------------------------------------
// Backward: per channel sum(g) and sum(g * (x - mean)) in one blocked pass, then
// dx = g * dy_scale + (x - mean) * xmu_scale + shift in a second, elementwise pass. g is the
// gradient at the pre-activation z = (x - mean) * scale + bias [+ residual]: act'(z) * grad_output
// (grad_output itself for plain BatchNorm). In memory-efficient mode (FromOutput) the forward's
// output y stands in for x: z = act^-1(y) and x - mean = (z - bias - residual) / scale.
template <typename Acc>
struct GradCoefficients {
  std::vector<Acc> dy_scale, xmu_scale, shift;
  explicit GradCoefficients(int64_t C) : dy_scale(C), xmu_scale(C), shift(C) {}
};

// One element's x - mean and g, from the saved value (x, or y when FromOutput), the residual (0
// when there is none) and its channel's parameters. inv_scale is 1 / scale (0 where scale is 0).
template <Dtype D, Activation A, bool FromOutput>
struct ElementGrad {
  using K = Traits<D>;
  using F = ActivationFn<A>;
  using T = typename K::storage;
  template <typename R>
  static R xmu(T saved, R res, R mean, R bias, R inv_scale, R param) {
    if constexpr (FromOutput) return (F::inverse(R(K::load(saved)), param) - bias - res) * inv_scale;
    else return R(K::load(saved)) - mean;
  }
  template <typename R>
  static R grad(R dy, T saved, R xmu, R res, R scale, R bias, R param) {
    if constexpr (A == Activation::Identity) return dy;
    else if constexpr (FromOutput) return F::grad_from_output(dy, R(K::load(saved)), param);
    else return F::grad(dy, xmu * scale + bias + res, param);
  }
};

// HasResidual: the pre-activation includes a residual. StoreGrad (with a residual whose gradient is
// asked for): the reduction writes g, the residual's gradient, as it computes it, and the second
// pass reads it back instead of reading grad_output and the residual again.
template <Dtype D, Activation A, bool FromOutput, bool HasResidual, bool StoreGrad>
void backward_impl(const BackwardArgs& a) {
  using K = Traits<D>;
  using Acc = typename K::acc;
  // float32 planes sum in float lanes within a block (at most 4096 values), blocks merged in double
  // as always: these sums have no cancellation to guard against (the forward's variance does), and
  // double lanes made the one-read backward 5-7% slower (dx and grads agreed to 3e-7).
  using R = Acc;
  using T = typename K::storage;
  using E = ElementGrad<D, A, FromOutput>;
  // Plain BatchNorm on half values converts in registers where it can (see grad_input_in_registers).
  constexpr bool kPlain = A == Activation::Identity && !FromOutput && !HasResidual;
  [[maybe_unused]] constexpr bool kPlainHalf = kStaged<D> && kPlain;  // unused in the baseline table
  // The fused loops (activation, residual, memory-efficient) on float16 values run over float copies
  // of their inputs, a stage at a time, converted in registers, and write outputs through a float
  // stage: the same float values in the same order as the integer conversions value by value, so the
  // same bits. float16's integer conversions cost more than the stage's stores and reloads; bfloat16's
  // are shifts, and staged they measured 1.4-1.75x slower (see StagedRun).
  constexpr bool kStageLoops = kHasF16C && D == Dtype::Float16 && !kPlain;
  using StagedE = ElementGrad<Dtype::Float32, A, FromOutput>;  // the element maths on staged floats
  const auto* dy = static_cast<const T*>(a.grad_output);
  const auto* saved = static_cast<const T*>(FromOutput ? a.output : a.input);
  const auto* res = static_cast<const T*>(a.epilogue.residual);
  auto* dx = static_cast<T*>(a.grad_input);
  auto* grad_res = static_cast<T*>(a.grad_residual);
  const auto* mean_in = static_cast<const Acc*>(a.mean);
  const auto* var_in = static_cast<const Acc*>(a.var);
  auto* grad_weight = static_cast<Acc*>(a.grad_weight);
  auto* grad_bias = static_cast<Acc*>(a.grad_bias);
  const Geometry& g = a.geometry;
  const int64_t C = g.channels;
  const int64_t count = g.outer * g.inner;
  const Acc param = Acc(a.epilogue.param);
  // The affine map of the forward, to recompute z (or recover x), and its inverse scale.
  AffineTable<Acc> affine(C);
  std::vector<Acc> inv_scale(C);
  for (int64_t c = 0; c < C; ++c) {
    affine.set(c, mean_in[c], Acc(inverse_std(double(var_in[c]), a.eps)), a.weight, a.bias);
    inv_scale[c] = affine.scale[c] != Acc(0) ? Acc(1) / affine.scale[c] : Acc(0);
  }
  GradCoefficients<Acc> coef(C);
  const auto* mean_dy = static_cast<const Acc*>(a.mean_dy);
  const auto* mean_dy_xhat = static_cast<const Acc*>(a.mean_dy_xhat);
  // The sums are needed for the parameter grads, and for dx only when training on this process's
  // batch alone (SyncBatchNorm hands in the global ones).
  const bool has_reduce = !mean_dy && (grad_weight || grad_bias || (dx && a.training));
  const bool has_output_grads = (dx || grad_res) && count > 0;

  struct Sums {
    double dy, dy_xmu;
  };
  // Per-channel maths in double: C values, free, and it keeps float32 grads as exact as torch's.
  auto set_coefficients = [&](int64_t c, double invstd, double sum_dy, double sum_dy_xmu, double n, bool training) {
    const auto k =
        input_grad_coefficients(invstd, double(param_or<Acc>(a.weight, c, Acc(1))), sum_dy, sum_dy_xmu, n, training);
    coef.dy_scale[c] = k.dy_scale;
    coef.xmu_scale[c] = k.xmu_scale;
    coef.shift[c] = k.shift;
  };
  auto finish = [&](int64_t c, const Sums& s) {
    const double invstd = inverse_std(double(var_in[c]), a.eps);
    if (grad_weight) grad_weight[c] = Acc(s.dy_xmu * invstd);
    if (grad_bias) grad_bias[c] = Acc(s.dy);
    set_coefficients(c, invstd, s.dy, s.dy_xmu, double(count), a.training);
  };
  if (mean_dy) {
    // Global means are the sums over a batch of one: dx = w * invstd * (dy - mean_dy - x_hat * mean_dy_xhat).
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = inverse_std(double(var_in[c]), a.eps);
      set_coefficients(c, invstd, double(mean_dy[c]), double(mean_dy_xhat[c]) / invstd, 1.0, true);
    }
  } else if (!has_reduce || count == 0) {
    for (int64_t c = 0; c < C; ++c) finish(c, Sums{0, 0});
  }
  const bool grad_stored = StoreGrad && has_reduce;
  const bool stream = dx && streams_output(dx, g, sizeof(T));
  // When the reduction writes the residual's gradient and dx is not asked for, it is the only pass.
  const bool has_apply = has_output_grads && !(grad_stored && !dx);
  if (count == 0 || (!has_reduce && !has_apply)) return;

  // Writes dx and/or the residual's grad (g) over elements [0, n) of one run from its values (gy:
  // grad_output, ps: the saved tensor, pr: the residual, all read through EG's Traits), whose channel
  // parameters are read through at(i) (a scalar for planes, the channel vector for rows).
  auto apply_values = [&](auto eg, int64_t n, auto at, const auto* __restrict__ gy, const auto* __restrict__ ps,
                          const auto* __restrict__ pr, auto* __restrict__ pdx, auto* __restrict__ pgr) {
    using EG = decltype(eg);
    using L = typename EG::K;
    // Always inlined: apply_values is inlined into two planes drivers and the rows one, and past some
    // size GCC stops inlining this, leaving a call that keeps the loops below from vectorizing.
    auto element = [&](int64_t i, Acc& xm) __attribute__((always_inline)) {
      Acc rv = Acc(0);
      if constexpr (HasResidual) rv = L::load(pr[i]);
      xm = EG::xmu(ps[i], rv, at(affine.mean, i), at(affine.bias, i), at(inv_scale, i), param);
      return EG::grad(L::load(gy[i]), ps[i], xm, rv, at(affine.scale, i), at(affine.bias, i), param);
    };
    if (StoreGrad && grad_stored) {  // g from the reduction's pass; the residual is needed only to recover x
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        Acc rv = Acc(0);
        if constexpr (FromOutput) rv = L::load(pr[i]);
        const Acc xm = EG::xmu(ps[i], rv, at(affine.mean, i), at(affine.bias, i), at(inv_scale, i), param);
        pdx[i] = L::store(L::load(pgr[i]) * at(coef.dy_scale, i) + xm * at(coef.xmu_scale, i) + at(coef.shift, i));
      }
    } else if (pdx && pgr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        Acc xm;
        const Acc gv = element(i, xm);
        pdx[i] = L::store(gv * at(coef.dy_scale, i) + xm * at(coef.xmu_scale, i) + at(coef.shift, i));
        pgr[i] = L::store(gv);
      }
    } else if (pdx) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        Acc xm;
        const Acc gv = element(i, xm);
        pdx[i] = L::store(gv * at(coef.dy_scale, i) + xm * at(coef.xmu_scale, i) + at(coef.shift, i));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        Acc xm;
        pgr[i] = L::store(element(i, xm));
      }
    }
  };
  // The same over elements [off, off + n) of the tensors, staged where kStageLoops.
  auto apply_run = [&](int64_t off, int64_t n, auto at) {
    T* pdx = dx ? dx + off : nullptr;
    T* pgr = grad_res ? grad_res + off : nullptr;
    const T* pr = HasResidual ? res + off : nullptr;
    if constexpr (kStageLoops) {
      const bool reads_grad = StoreGrad && grad_stored;  // g instead of grad_output (and the residual)
      StagedRun<D> run;
      for (int64_t i0 = 0; i0 < n; i0 += kStageElems) {
        const int64_t len = std::min(kStageElems, n - i0);
        run.load(run.saved, saved + off + i0, len);
        if (reads_grad) run.load(run.grad, pgr + i0, len);
        else run.load(run.dy, dy + off + i0, len);
        if (HasResidual && (FromOutput || !reads_grad)) run.load(run.residual, pr + i0, len);
        apply_values(StagedE{}, len, [&](const std::vector<Acc>& v, int64_t i) { return at(v, i0 + i); }, run.dy,
                     run.saved, run.residual, pdx ? run.dx : nullptr, pgr ? run.grad : nullptr);
        if (pdx) run.store(pdx + i0, run.dx, len);
        if (pgr && !reads_grad) run.store(pgr + i0, run.grad, len);
      }
    } else {
      apply_values(E{}, n, at, dy + off, saved + off, pr, pdx, pgr);
    }
  };

  // Plain BatchNorm's dx over [off, off + n) in registers where it can: half values converted there,
  // float32/float64 when streamed or in rows (store_run). Returns how many values it wrote
  // (apply_run does the rest). The parameters are channel p's (PerValue false) or one per value
  // from channel p on (rows).
  auto plain_grad_input = [&](auto per_value, int64_t off, int64_t n, int64_t p) -> int64_t {
    constexpr bool PerValue = decltype(per_value)::value;
    if constexpr (kPlain) {
      if (!dx) return 0;
      const Acc *mean = &affine.mean[p], *dy_scale = &coef.dy_scale[p], *xmu_scale = &coef.xmu_scale[p],
                *shift = &coef.shift[p];
      if constexpr (kStaged<D>)
        return grad_input_in_registers<D, PerValue>(dy + off, saved + off, dx + off, n, mean, dy_scale, xmu_scale,
                                                    shift, stream);
      else if (stream || PerValue)
        return grad_input_run<T, PerValue>(dy + off, saved + off, dx + off, n, mean, dy_scale, xmu_scale, shift,
                                           stream);
    }
    return 0;
  };

  if (g.inner > 1) {
    const PlaneBlocks pb = plane_blocks(g, backward_min_block_elems(g.inner, sizeof(T)));
    auto reduce = [&](int64_t c, int64_t b) -> Sums {
      const BlockRange r = block_range(pb, b);
      const R mean = affine.mean[c], scale = affine.scale[c], bias = affine.bias[c], inv = inv_scale[c], p = param;
      const int64_t len = r.s1 - r.s0;
#ifdef FASTBN_HAS_F16C
      if constexpr (kPlainHalf) {
        HalfSum sum_dy, sum_dy_xmu;
        for (int64_t n = r.n0; n < r.n1; ++n) {
          const int64_t off = (n * C + c) * pb.S + r.s0;
          add_grad_sums_in_registers<D>(sum_dy, sum_dy_xmu, dy + off, saved + off, len, mean);
        }
        return {double(sum_dy.total()), double(sum_dy_xmu.total())};
      }
#endif
      LaneSums<R> sums;  // first: sum(g), second: sum(g * (x - mean))
      // Adds one run's n values (read through EG's Traits), writing g to pg with StoreGrad.
      auto add_run = [&](auto eg, int64_t n, const auto* __restrict__ gy, const auto* __restrict__ ps,
                         const auto* __restrict__ pr, auto* __restrict__ pg) {
        using EG = decltype(eg);
        using L = typename EG::K;
        auto residual = [pr](int64_t i) {
          if constexpr (HasResidual) return R(L::load(pr[i]));
          else return R(0);
        };
        sums.add(
            n,
            [=](int64_t i) {
              const R xm = EG::xmu(ps[i], residual(i), mean, bias, inv, p);
              const R gv = EG::grad(R(L::load(gy[i])), ps[i], xm, residual(i), scale, bias, p);
              if constexpr (StoreGrad) pg[i] = L::store(Acc(gv));
              return gv;
            },
            [=](int64_t i) {
              const R xm = EG::xmu(ps[i], residual(i), mean, bias, inv, p);
              return EG::grad(R(L::load(gy[i])), ps[i], xm, residual(i), scale, bias, p) * xm;
            });
      };
      for (int64_t n = r.n0; n < r.n1; ++n) {
        const int64_t off = (n * C + c) * pb.S + r.s0;
        const T* pr = HasResidual ? res + off : nullptr;
        T* pg = StoreGrad ? grad_res + off : nullptr;
        if constexpr (kStageLoops) {  // stages of a multiple of LaneSums' step: the same lanes as unstaged
          static_assert(kStageElems % LaneSums<R>::kStep == 0);
          StagedRun<D> run;
          for (int64_t i0 = 0; i0 < len; i0 += kStageElems) {
            const int64_t m = std::min(kStageElems, len - i0);
            run.load(run.dy, dy + off + i0, m);
            run.load(run.saved, saved + off + i0, m);
            if (HasResidual) run.load(run.residual, pr + i0, m);
            add_run(StagedE{}, m, run.dy, run.saved, run.residual, run.grad);
            if (StoreGrad) run.store(pg + i0, run.grad, m);
          }
        } else {
          add_run(E{}, len, dy + off, saved + off, pr, pg);
        }
      }
      return {double(sums.first()), double(sums.second())};
    };
    auto merge = [](const Sums& l, const Sums& r) { return Sums{l.dy + r.dy, l.dy_xmu + r.dy_xmu}; };
    auto apply = [&](int64_t c, const BlockRange& r) {
      const int64_t off = (r.n0 * C + c) * pb.S + r.s0, len = r.s1 - r.s0;
      const int64_t done = plain_grad_input(std::false_type{}, off, len, c);
      apply_run(off + done, len - done, [c](const std::vector<Acc>& v, int64_t) { return v[c]; });
    };
    // Plain dx over the consecutive planes [p0, p1) as one run, as normalize_planes_stretch does.
    auto stretch = [&](int64_t p0, int64_t p1) {
      if constexpr (kPlain) {
        const int64_t S = pb.S, off = p0 * S, n = (p1 - p0) * S;
        const Acc *mean = affine.mean.data(), *dy_scale = coef.dy_scale.data(), *xmu_scale = coef.xmu_scale.data(),
                  *shift = coef.shift.data();
        if constexpr (kStaged<D>) {
          if (dx && !stream && S >= 16)
            return grad_input_half_planes<D>(dy + off, saved + off, dx + off, n, p0 % C, S, C, mean, dy_scale,
                                             xmu_scale, shift) > 0;
        } else if (dx && S * int64_t(sizeof(T)) >= 64) {
          return grad_input_planes<T>(dy + off, saved + off, dx + off, n, p0 % C, S, C, mean, dy_scale, xmu_scale,
                                      shift, stream) > 0;
        }
      }
      return false;
    };
    // Read by both passes: grad_output, the saved tensor, the residual, the stored gradient.
    const int64_t tensors_read = 2 + HasResidual + StoreGrad;
    if (const int64_t group =
            has_reduce && has_apply ? channels_per_group(g, sizeof(T), tensors_read, a.num_threads) : 0) {
      reduce_apply_channel_groups<Sums>(pb, group, a.num_threads, reduce, merge, finish, apply, stretch);
      return;
    }
    if (has_reduce) reduce_planes<Sums>(pb, a.num_threads, reduce, merge, finish);
    if (has_apply) for_planes_in_memory_order(g, a.num_threads, apply, stretch);
    return;
  }

  const RowBlocks rb = row_blocks(g);
  const Acc* __restrict__ mean = affine.mean.data();
  const Acc* __restrict__ scale = affine.scale.data();
  const Acc* __restrict__ bias = affine.bias.data();
  const Acc* __restrict__ inv = inv_scale.data();
  auto reduce = [&](int64_t b, Acc* __restrict__ sum_g, Acc* __restrict__ sum_g_xmu) {  // in Acc, as above
    std::fill(sum_g, sum_g + C, Acc(0));
    std::fill(sum_g_xmu, sum_g_xmu + C, Acc(0));
#ifdef FASTBN_HAS_F16C
    if constexpr (kPlainHalf) {
      add_half_grad_rows<D>(sum_g, sum_g_xmu, dy, saved, rb.begin(b), rb.end(b), C, mean);
      return;
    }
#endif
    // Adds rows [m0, m1) of the values (read through EG's Traits), writing g to pg with StoreGrad.
    auto add_block = [&](auto eg, int64_t m0, int64_t m1, const auto* __restrict__ gy, const auto* __restrict__ ps,
                         const auto* __restrict__ pr, auto* __restrict__ pg) {
      using EG = decltype(eg);
      using L = typename EG::K;
      // In Acc: mean is already rounded to Acc, so x - mean rounds once, as torch's does.
      auto residual = [&](int64_t m, int64_t c) {
        if constexpr (HasResidual) return L::load(pr[m * C + c]);
        else return Acc(0);
      };
      auto xmu = [&](int64_t m, int64_t c) {
        return EG::xmu(ps[m * C + c], residual(m, c), mean[c], bias[c], inv[c], param);
      };
      auto grad = [&](int64_t m, int64_t c, Acc xm) {
        return EG::grad(L::load(gy[m * C + c]), ps[m * C + c], xm, residual(m, c), scale[c], bias[c], param);
      };
      add_rows(
          sum_g, sum_g_xmu, m0, m1, C,
          [&](int64_t m, int64_t c) {
            const Acc gv = grad(m, c, xmu(m, c));
            if constexpr (StoreGrad) pg[m * C + c] = L::store(gv);
            return gv;
          },
          [&](int64_t m, int64_t c) {
            const Acc xm = xmu(m, c);
            return grad(m, c, xm) * xm;
          },
          [](int64_t, int64_t) {});  // one pass: no NextRowsBlock (it measured 0-13% slower here)
    };
    const int64_t m0 = rb.begin(b), m1 = rb.end(b);
    if constexpr (kStageLoops) {
      // The block's rows as float (at most kRowBlockElems values, or one row, a tensor; in L2), added
      // as rows [0, m1 - m0): add_rows' order depends on the count only, so the same adds as unstaged.
      // The buffer stays with the thread between calls: 512 KB, or 16 bytes a channel past 32768.
      const int64_t n = (m1 - m0) * C, off = m0 * C;
      thread_local std::vector<float> stage;
      stage.resize(4 * n);
      float *s_dy = stage.data(), *s_saved = s_dy + n, *s_res = s_saved + n, *s_grad = s_res + n;
      to_float<D>(dy + off, s_dy, n);
      to_float<D>(saved + off, s_saved, n);
      if (HasResidual) to_float<D>(res + off, s_res, n);
      add_block(StagedE{}, 0, m1 - m0, s_dy, s_saved, s_res, s_grad);
      if (StoreGrad) from_float<D>(s_grad, grad_res + off, n);
    } else {
      add_block(E{}, m0, m1, dy, saved, res, grad_res);
    }
  };
  auto merge = [&](int64_t c0, int64_t c1, const BlockPartials<Acc>& partials) {
    const int64_t n = c1 - c0;
    double dy_sum[kMergeChannels] = {}, dy_xmu_sum[kMergeChannels] = {};
    for (int64_t b = 0; b < rb.count; ++b) {
      const Acc* sum_g = partials.first(b) + c0;
      const Acc* sum_g_xmu = partials.second(b) + c0;
      for (int64_t i = 0; i < n; ++i) {
        dy_sum[i] += double(sum_g[i]);
        dy_xmu_sum[i] += double(sum_g_xmu[i]);
      }
    }
    for (int64_t i = 0; i < n; ++i) finish(c0 + i, Sums{dy_sum[i], dy_xmu_sum[i]});
  };
  auto apply = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t done = plain_grad_input(std::true_type{}, m * C, C, 0);
      apply_run(m * C + done, C - done, [done](const std::vector<Acc>& v, int64_t c) { return v[c + done]; });
    }
  };
  for_rows<Acc>(rb, a.num_threads, has_reduce, has_apply, reduce, merge, apply);
}

template <template <Dtype> class Fn, typename Args>
void dispatch_dtype(const Args& a) {
  switch (a.dtype) {
    case Dtype::Float32: return Fn<Dtype::Float32>::run(a);
    case Dtype::Float64: return Fn<Dtype::Float64>::run(a);
    case Dtype::Float16: return Fn<Dtype::Float16>::run(a);
    case Dtype::BFloat16: return Fn<Dtype::BFloat16>::run(a);
  }
}

template <Dtype D>
struct TrainForward {
  static void run(const TrainForwardArgs& a) { train_forward_impl<D>(a); }
};
template <Dtype D>
struct EvalForward {
  static void run(const EvalForwardArgs& a) { eval_forward_impl<D>(a); }
};
template <Dtype D, bool HasResidual, bool StoreGrad>
void backward_with_residual(const BackwardArgs& a) {
  if (a.output) {  // memory-efficient: the glue allows only the invertible activations
    if (a.epilogue.activation == Activation::LeakyReLU)
      return backward_impl<D, Activation::LeakyReLU, true, HasResidual, StoreGrad>(a);
    return backward_impl<D, Activation::Identity, true, HasResidual, StoreGrad>(a);
  }
  with_activation(a.epilogue.activation,
                  [&](auto act) { backward_impl<D, decltype(act)::value, false, HasResidual, StoreGrad>(a); });
}

template <Dtype D>
struct Backward {
  static void run(const BackwardArgs& a) {
    // The residual is a compile-time choice: a test inside the loops would keep them scalar.
    if (!a.epilogue.residual) return backward_with_residual<D, false, false>(a);
    if (a.grad_residual) return backward_with_residual<D, true, true>(a);
    backward_with_residual<D, true, false>(a);
  }
};

void train_forward(const TrainForwardArgs& a) { dispatch_dtype<TrainForward>(a); }
void eval_forward(const EvalForwardArgs& a) { dispatch_dtype<EvalForward>(a); }
void backward(const BackwardArgs& a) { dispatch_dtype<Backward>(a); }

}  // namespace

const KernelTable& table(const char* simd) {
  static const KernelTable kernels{simd, train_forward, eval_forward, backward};
  return kernels;
}

}  // namespace fastbn::cpu::FASTBN_ISA

#pragma GCC pop_options
