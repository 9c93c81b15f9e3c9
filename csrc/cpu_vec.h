// Vector helpers shared by the C++ CPU kernels: a polynomial exp that vectorises, its AVX-512 form, and the run-time
// switch between AVX-512 and portable loops.
//
// Why not at::vec: this extension is built for the baseline x86-64 (one wheel for every CPU), where at::vec's exp
// is scalar; ATen's own kernels get their AVX2/AVX-512 builds from torch's per-CPU dispatch, which an extension
// does not have. So the hot loops here come in two builds, picked at run time: an AVX-512 one written with
// intrinsics (use_avx512()), and a portable one that GCC clones for AVX-512 / AVX2 / baseline (MIRAI_CLONES).
// MIRAI_CPU_NO_AVX512=1 forces the portable loops (tests run both).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MIRAI_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MIRAI_CLONES
#endif

namespace mirai {
namespace cpu_vec {

// exp on [-87, 88] to ~2 ulp (Cody-Waite reduction + degree-6 polynomial), written so loops over it vectorise.
// Inputs are clamped to that range: below -87 it gives ~1e-38 instead of 0 (no softmax sum or sigmoid can tell
// them apart), above 88 it gives ~1.65e38 instead of inf.
static inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer without a libm call
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace cpu_vec
}  // namespace mirai

#if defined(__x86_64__) && defined(__GNUC__)
#define MIRAI_HAVE_AVX512_PATH 1
#include <immintrin.h>
#define MIRAI_AVX512 __attribute__((target("avx512f")))
// GCC 12 flags its own masked-load intrinsics (_mm512_undefined_ps inside) as "used uninitialized": false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace mirai {
namespace cpu_vec {

MIRAI_AVX512 static inline __mmask16 tail_mask(int rem) { return (__mmask16)((1u << rem) - 1u); }

// Mask of the 16 lanes starting at j of a row of n (all ones inside the row, the tail's lanes at its end).
MIRAI_AVX512 static inline __mmask16 lanes_from(int64_t j, int64_t n) {
  return n - j >= 16 ? (__mmask16)0xffff : tail_mask((int)(n - j));
}

// exp_approx on 16 lanes: same clamp, reduction and polynomial; 2^n applied with scalef. max/min take the input
// as their second operand so a NaN lane stays NaN (VMAXPS/VMINPS return the second operand when unordered).
MIRAI_AVX512 static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// True when this CPU has AVX-512F and MIRAI_CPU_NO_AVX512 is unset (or "0"); read once per process.
static inline bool use_avx512() {
  static const bool on = [] {
    const char* off = std::getenv("MIRAI_CPU_NO_AVX512");
    return __builtin_cpu_supports("avx512f") && !(off != nullptr && off[0] != '\0' && off[0] != '0');
  }();
  return on;
}

}  // namespace cpu_vec
}  // namespace mirai

#pragma GCC diagnostic pop
#else
namespace mirai {
namespace cpu_vec {
static inline bool use_avx512() { return false; }
}  // namespace cpu_vec
}  // namespace mirai
#endif
