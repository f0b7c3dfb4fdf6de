// Horizontal reductions of AVX2 registers, shared by the AVX2 kernel files (matmul_avx2.cc,
// attention_avx2.cc). Compiled for AVX2 through a target attribute like their callers, so
// they inline there; only called after runtime detection. Not a public interface.
#pragma once

#include <immintrin.h>

namespace ctxcache::avx2_internal {

__attribute__((target("avx2,fma,f16c"))) inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) inline float HMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace ctxcache::avx2_internal
