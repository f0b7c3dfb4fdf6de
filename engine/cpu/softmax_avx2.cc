// AVX2 softmax (see softmax_internal.h).
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "engine/cpu/avx2_internal.h"
#include "engine/cpu/softmax_internal.h"

namespace ctxcache::softmax_internal {
namespace {

#define CTX_AVX2 __attribute__((target("avx2,fma,f16c")))  // as avx2_internal.h

CTX_AVX2 inline __m256 Exp(__m256 x) {
  // Constant first: a NaN score stays NaN (MAXPS/MINPS return the second operand on NaN).
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), x);
  x = _mm256_min_ps(_mm256_set1_ps(kExpMax), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kTaylor[7]);
  for (int k = 6; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kTaylor[k]));
  // 2^n by building the exponent field: n is in [-126, 127] after the clamp. (A NaN lane
  // gives garbage bits here, but p is NaN and NaN * anything is NaN.)
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Lane mask for the last n - full (< 8) elements.
CTX_AVX2 inline __m256i TailMask(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

}  // namespace

CTX_AVX2 void SoftmaxAvx2(float* x, int64_t n) {
  if (n <= 0) return;
  const int64_t full = n & ~int64_t{7};
  const int64_t rest = n - full;
  const __m256i mask = TailMask(rest);
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = neg_inf;
  for (int64_t i = 0; i < full; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  if (rest) {
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + full, mask),
                                                _mm256_castsi256_ps(mask)));
  }
  const __m256 mx = _mm256_set1_ps(avx2_internal::HMax(vmax));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < full; i += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), mx));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (rest) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_maskload_ps(x + full, mask), mx));
    _mm256_maskstore_ps(x + full, mask, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
  }
  const __m256 inv = _mm256_set1_ps(1.0f / avx2_internal::HSum(sum));
  for (int64_t i = 0; i < full; i += 8) {
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  }
  if (rest) {
    _mm256_maskstore_ps(x + full, mask, _mm256_mul_ps(_mm256_maskload_ps(x + full, mask), inv));
  }
}

}  // namespace ctxcache::softmax_internal
