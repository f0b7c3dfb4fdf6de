// AVX2 kernels for MatVec/MatMul (see matmul_internal.h), for x86-64 CPUs without AVX-512:
// int8 dot products of Q4_0/Q4_1/Q8_0 weights with quantized activations (vpmaddubsw, one
// 32-element block per iteration) and fp32 dots for F32/F16 weights. GEMM panels use the
// reference dequantizer at this level.
#include <immintrin.h>

#include <cstring>

#include "engine/cpu/avx2_internal.h"
#include "engine/cpu/matmul_internal.h"
#include "engine/cpu/quant_internal.h"

#define CTX_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ctxcache::matmul_internal {
namespace {

using avx2_internal::HSum;
using quant_internal::LoadU16;

enum class QKind { kQ4_0, kQ4_1, kQ8_0 };

template <QKind K>
constexpr size_t kBlockBytes = K == QKind::kQ4_0   ? 18
                               : K == QKind::kQ4_1 ? 20
                                                   : 34;
template <QKind K>
constexpr int kQsOffset = K == QKind::kQ4_1 ? 4 : 2;

CTX_AVX2 inline int HSumI(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

CTX_AVX2 inline float HMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

CTX_AVX2 void QuantizeActs(const float* x, int64_t n, int8_t* qs, float* ds) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < n / kActBlock; ++b) {
    const float* xb = x + b * kActBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(xb + 8 * k);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], abs_mask));
    }
    const float m = HMax(amax);
    const float d = m / 127.0f;
    const __m256 id = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i i[4];
    for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id));
    const int sum =
        HSumI(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
    // packs interleave 128-bit lanes; the permute restores element order.
    const __m256i p16a = _mm256_packs_epi32(i[0], i[1]);
    const __m256i p16b = _mm256_packs_epi32(i[2], i[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + b * kActBlock), p8);
    ds[2 * b] = d;
    ds[2 * b + 1] = d * static_cast<float>(sum);
  }
}

// dot(row, x), one block per iteration: vpmaddubsw of unsigned weights (Q4 nibbles, or |w|
// with w's sign moved onto x for Q8_0) and int8 activations, summed to int32 by vpmaddwd.
// Pair sums stay within int16: Q4 15*127*2, Q8 128*127*2 = 32512.
template <QKind K>
CTX_AVX2 float DotRow(const uint8_t* row, int64_t nb, const int8_t* xq, const float* ds) {
  constexpr size_t kB = kBlockBytes<K>;
  const __m256i shifts = _mm256_setr_epi64x(0, 0, 4, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + b * kB;
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kActBlock));
    __m256i wv;
    if constexpr (K == QKind::kQ8_0) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      xv = _mm256_sign_epi8(xv, w);
      wv = _mm256_abs_epi8(w);
    } else {
      const __m256i q = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kQsOffset<K>)));
      wv = _mm256_and_si256(_mm256_srlv_epi64(q, shifts), low4);
    }
    const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
    const float d = _cvtsh_ss(LoadU16(p));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * ds[2 * b]), acc);
    if constexpr (K == QKind::kQ4_0) offset += d * ds[2 * b + 1];
    if constexpr (K == QKind::kQ4_1) offset += _cvtsh_ss(LoadU16(p + 2)) * ds[2 * b + 1];
  }
  // Q4_0 stores q + 8: subtract 8 * d * sum(x).
  if constexpr (K == QKind::kQ4_0) offset *= -8.0f;
  return HSum(acc) + offset;
}

template <QKind K>
CTX_AVX2 void QuantDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                       const QuantizedActs* acts, int64_t n_tok, float* y, int64_t ldy) {
  const int64_t nb = n_in / kActBlock;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t t = 0; t < n_tok; ++t) y[t * ldy + r] = DotRow<K>(row, nb, acts[t].qs, acts[t].ds);
  }
}

template <bool kHalf>
CTX_AVX2 inline __m256 LoadW(const void* a, int64_t i) {
  if constexpr (kHalf) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a) + i)));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(a) + i);
  }
}

template <bool kHalf>
CTX_AVX2 float DotFloat(const void* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(LoadW<kHalf>(a, i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(LoadW<kHalf>(a, i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(LoadW<kHalf>(a, i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(LoadW<kHalf>(a, i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(LoadW<kHalf>(a, i), _mm256_loadu_ps(b + i), s0);
  float s = HSum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) {
    float wi;
    if constexpr (kHalf) {
      wi = _cvtsh_ss(LoadU16(static_cast<const uint8_t*>(a) + 2 * i));
    } else {
      std::memcpy(&wi, static_cast<const uint8_t*>(a) + 4 * i, 4);
    }
    s += wi * b[i];
  }
  return s;
}

CTX_AVX2 float DotF32(const float* a, const float* b, int64_t n) {
  return DotFloat<false>(a, b, n);
}

template <bool kHalf>
CTX_AVX2 void FloatDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                       const float* x, int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < n_tok; ++t) {
      y[t * ldy + r] = DotFloat<kHalf>(w + r * row_bytes, x + t * n_in, n_in);
    }
  }
}

}  // namespace

const KernelTable& Avx2Kernels() {
  static const KernelTable table = {
      "avx2",
      &QuantizeActs,
      &QuantDot<QKind::kQ4_0>,
      &QuantDot<QKind::kQ4_1>,
      &QuantDot<QKind::kQ8_0>,
      &FloatDot<false>,
      &FloatDot<true>,
      &DotF32,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  return table;
}

}  // namespace ctxcache::matmul_internal
