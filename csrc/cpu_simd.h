// CPU vector helpers shared by the C++ kernels: AVX2 function clones and float16 <-> float32 conversion.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

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

}  // namespace simd
}  // namespace fastbb
