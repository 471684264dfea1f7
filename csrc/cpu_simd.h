// CPU vector helpers shared by the C++ kernels: AVX2 function clones, and the conversions between the 16-bit
// dtypes and float32 (float32 and float64 kernels use their data in place).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTBB_X86 1
#endif

// Element loops are also compiled for AVX2, chosen at load time where the CPU has it (plain x86-64 lacks
// the 32-to-16-bit packs that bfloat16 rounding needs). FMA is left out on purpose: both versions then
// round every operation alike and give the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 9
#define FASTBB_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTBB_AVX2_CLONES
#endif

namespace fastbb {
namespace simd {

#ifdef FASTBB_X86
// F16C converts eight halves per instruction; c10::Half's scalar conversion is a bit-twiddling loop.
inline bool cpu_has_f16c() {
  static const bool has_f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has_f16c;
}

__attribute__((target("avx,f16c"))) inline void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

__attribute__((target("avx,f16c"))) inline void narrow_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), halves);
  }
  for (; i < n; ++i) dst[i].x = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// float16 <-> float32 of n values: F16C where the CPU has it, c10::Half's scalar conversion otherwise.
inline void widen_half(const c10::Half* src, float* dst, int64_t n) {
#ifdef FASTBB_X86
  if (cpu_has_f16c()) return widen_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void narrow_half(const float* src, c10::Half* dst, int64_t n) {
#ifdef FASTBB_X86
  if (cpu_has_f16c()) return narrow_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// bfloat16 is the top half of a float32; its rounding is c10's (to nearest even, NaN to 0x7FC0), written
// with integer operations so that the loops vectorize.
inline float bf16_to_float(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

inline c10::BFloat16 float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = static_cast<int32_t>(bits & 0x7fffffffu) > 0x7f800000;
  return c10::BFloat16(static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// n 16-bit values to float32 (widen) and back, rounded once (narrow).
FASTBB_AVX2_CLONES inline void widen(const c10::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

FASTBB_AVX2_CLONES inline void narrow(const float* __restrict__ src, c10::BFloat16* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

inline void widen(const c10::Half* src, float* dst, int64_t n) { widen_half(src, dst, n); }

inline void narrow(const float* src, c10::Half* dst, int64_t n) { narrow_half(src, dst, n); }

// The values of src as acc_t: src itself when it already is acc_t (float32, float64), else widened into buffer.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, acc_t* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    widen(src, buffer, n);
    return buffer;
  }
}

}  // namespace simd
}  // namespace fastbb
