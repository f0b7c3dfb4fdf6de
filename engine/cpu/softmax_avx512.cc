// AVX-512 softmax (see softmax_internal.h).
#include <immintrin.h>

// GCC 12's _mm512_undefined_*() "don't care" inputs trip -Wuninitialized under a target
// attribute; never read (see matmul_avx512.cc).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cmath>
#include <limits>

#include "engine/cpu/softmax_internal.h"

namespace ctxcache::softmax_internal {
namespace {

#define CTX_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

CTX_AVX512 inline __m512 Exp(__m512 x) {
  // Constant first: MAXPS/MINPS return the second operand when either is NaN, so a NaN score
  // stays NaN (as with std::exp) instead of being clamped to a number.
  x = _mm512_max_ps(_mm512_set1_ps(kExpMin), x);
  x = _mm512_min_ps(_mm512_set1_ps(kExpMax), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kTaylor[7]);
  for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kTaylor[k]));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

CTX_AVX512 void SoftmaxAvx512(float* x, int64_t n) {
  if (n <= 0) return;
  const int64_t full = n & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  for (int64_t i = 0; i < full; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + i));
  if (tail) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, tail, x + full));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), mx));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + full), mx));
    _mm512_mask_storeu_ps(x + full, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int64_t i = 0; i < full; i += 16) {
    _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
  }
  if (tail) {
    _mm512_mask_storeu_ps(x + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + full), inv));
  }
}

}  // namespace ctxcache::softmax_internal
