// AVX2 + F16C kernels for the fp16 KV cache (see attention_internal.h), for x86-64 CPUs
// without AVX-512: the same algorithm as attention_avx512.cc on 8-wide registers (tiles of 8
// keys). Compiled through a target attribute, only called after runtime detection.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/half.h"
#include "engine/cpu/attention_internal.h"
#include "engine/cpu/avx2_internal.h"

#define CTX_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ctxcache::attention_internal {
namespace {

using avx2_internal::HMax;
using avx2_internal::HSum;

CTX_AVX2 void Fp16ToFp32Avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = Fp16ToFp32(src[i]);
}

CTX_AVX2 void Fp32ToFp16Avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = Fp32ToFp16(src[i]);
}

// exp(x) for x <= 0, as Exp in attention_avx512.cc (Cephes expf), with 2^n built in the
// exponent field (n >= -126 after the clamp, so it stays a normal float).
CTX_AVX2 inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[j] = sum of the 8 lanes of a[j], for 8 vectors at once (hadd tree).
CTX_AVX2 inline __m256 Sum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  // 128-bit lane 0 of u0: sums of the low halves of a[0..3]; lane 1: of the high halves.
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <class Load>
CTX_AVX2 inline void DecodeTiles(const float* q, int group, const Load& load, int64_t n, int hd,
                                 float* tile, float* m, float* l, float* acc, float* scores,
                                 int64_t score_stride) {
  float* kf = tile;
  float* vf = tile + kTile * hd;
  const int nc = hd / 8;
  ResetState(group, hd, m, l, acc);
  alignas(32) float p[8];
  alignas(32) static constexpr int32_t kLane[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i lane = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLane));
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int t = static_cast<int>(std::min<int64_t>(8, n - j0));
    load(j0, t, kf, vf);
    if (t < 8) std::fill(kf + t * hd, kf + 8 * hd, 0.f);  // scores of absent keys: masked
    const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(t), lane));
    for (int r = 0; r < group; ++r) {
      const float* qr = q + int64_t{r} * hd;
      __m256 dot[8];
      for (int j = 0; j < 8; ++j) dot[j] = _mm256_setzero_ps();
      for (int c = 0; c < nc; ++c) {
        const __m256 qc = _mm256_loadu_ps(qr + 8 * c);
        for (int j = 0; j < 8; ++j) {
          dot[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kf + j * hd + 8 * c), dot[j]);
        }
      }
      const __m256 s = _mm256_blendv_ps(
          _mm256_set1_ps(-std::numeric_limits<float>::infinity()), Sum8(dot), valid);
      if (scores != nullptr) {
        _mm256_maskstore_ps(scores + r * score_stride + j0, _mm256_castps_si256(valid), s);
      }
      const float corr = RaiseMax(m[r], l[r], HMax(s));
      const __m256 pv = _mm256_and_ps(valid, Exp(_mm256_sub_ps(s, _mm256_set1_ps(m[r]))));
      _mm256_store_ps(p, pv);
      l[r] = l[r] * corr + HSum(pv);
      float* ar = acc + int64_t{r} * hd;
      const __m256 cv = _mm256_set1_ps(corr);
      for (int c = 0; c < nc; ++c) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(ar + 8 * c), cv);
        for (int j = 0; j < t; ++j) {
          a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(vf + j * hd + 8 * c), a);
        }
        _mm256_storeu_ps(ar + 8 * c, a);
      }
    }
  }
}

struct Fp16Load {
  const uint16_t* k;
  const uint16_t* v;
  int hd;
  CTX_AVX2 void operator()(int64_t j0, int t, float* kf, float* vf) const {
    Fp16ToFp32Avx2(k + j0 * hd, kf, int64_t{t} * hd);
    Fp16ToFp32Avx2(v + j0 * hd, vf, int64_t{t} * hd);
  }
};

// int8 / int4 rows through the reference dequantization: CPUs without AVX-512 are not where
// quantized contexts are served fast, only correctly.
struct SegmentLoad {
  const KvSegment& seg;
  int64_t begin;
  void operator()(int64_t j0, int t, float* kf, float* vf) const {
    seg.LoadRows(begin + j0, begin + j0 + t, kf, vf);
  }
};

CTX_AVX2 void DecodeChunkAvx2(const float* q, int group, const uint16_t* k, const uint16_t* v,
                              int64_t n, int hd, float* tile, float* m, float* l, float* acc,
                              float* scores, int64_t score_stride) {
  DecodeTiles(q, group, Fp16Load{k, v, hd}, n, hd, tile, m, l, acc, scores, score_stride);
}

CTX_AVX2 void DecodeSegmentChunkAvx2(const float* q, int group, const KvSegment& seg,
                                     int64_t begin, int64_t n, int hd, float* tile, float* m,
                                     float* l, float* acc, float* scores, int64_t score_stride) {
  if (seg.dtype == KvDtype::kF16) {
    DecodeChunkAvx2(q, group, seg.k16.data() + begin * hd, seg.v16.data() + begin * hd, n, hd,
                    tile, m, l, acc, scores, score_stride);
  } else {
    DecodeTiles(q, group, SegmentLoad{seg, begin}, n, hd, tile, m, l, acc, scores, score_stride);
  }
}

}  // namespace

const KernelTable& Avx2Kernels() {
  static constexpr KernelTable kTable = {"avx2", 8, DecodeChunkAvx2, DecodeSegmentChunkAvx2,
                                         Fp16ToFp32Avx2, Fp32ToFp16Avx2};
  return kTable;
}

}  // namespace ctxcache::attention_internal
