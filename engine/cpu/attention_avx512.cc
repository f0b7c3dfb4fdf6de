// AVX-512 kernels for the fp16 KV cache (see attention_internal.h): fp16 <-> fp32 rows with
// vcvtph2ps / vcvtps2ph, and the decode-attention chunk kernel. Every function is compiled
// for AVX-512 through a target attribute and only called after runtime detection
// (attention.cc).
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics build their "don't care" inputs with _mm512_undefined_*(), a
// self-initialized variable that -Wuninitialized reports once inlined into a function with a
// target("avx512f") attribute (not under -mavx512f). Those values are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/cpu/attention_internal.h"

#define CTX_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

namespace ctxcache::attention_internal {
namespace {

CTX_AVX512 void Fp16ToFp32Avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

CTX_AVX512 void Fp32ToFp16Avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(
        dst + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT));
  }
}

// exp(x) for x <= 0 (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial, about
// 1 ulp); below -87 it returns about 1e-38 rather than a denormal, which no weight notices.
CTX_AVX512 inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// out[j] = sum of the 16 lanes of a[j], for 16 vectors at once (a transpose-and-add tree:
// 45 instructions instead of 16 horizontal sums of ~8 each).
CTX_AVX512 inline __m512 Sum16(const __m512* a) {
  __m512 s[8], t[4], u[2];
  // s[i]: 256-bit partial sums of a[2i] (low half) and a[2i+1] (high half).
  for (int i = 0; i < 8; ++i) {
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
  }
  // t[m]: 128-bit lane i holds 4 partial sums of a[4m + i].
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0xdd));
  }
  // u[p], lane i: 2 partial sums of a[8p + i], then 2 of a[8p + 4 + i].
  for (int p = 0; p < 2; ++p) {
    u[p] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * p], t[2 * p + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * p], t[2 * p + 1], 0xee));
  }
  // Element 4i + e holds the sum of a[i + 4e]; permute to key order.
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88),
                                 _mm512_shuffle_ps(u[0], u[1], 0xdd));
  const __m512i order =
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, w);
}

// Tiles of 16 keys: K and V converted to fp32 once (into `tile`, L1) for all `group` query
// rows; per row, 16 scores at once (16 dot accumulators reduced by Sum16), the online-softmax
// update, and the weighted V sum.
CTX_AVX512 void DecodeChunkAvx512(const float* q, int group, const uint16_t* k,
                                  const uint16_t* v, int64_t n, int hd, float* tile, float* m,
                                  float* l, float* acc) {
  float* kf = tile;
  float* vf = tile + kTile * hd;
  const int nc = hd / 16;
  ResetState(group, hd, m, l, acc);
  alignas(64) float p[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int t = static_cast<int>(std::min<int64_t>(16, n - j0));
    Fp16ToFp32Avx512(k + j0 * hd, kf, int64_t{t} * hd);
    Fp16ToFp32Avx512(v + j0 * hd, vf, int64_t{t} * hd);
    if (t < 16) std::fill(kf + t * hd, kf + 16 * hd, 0.f);  // scores of absent keys: masked
    const __mmask16 valid = static_cast<__mmask16>((1u << t) - 1);
    for (int r = 0; r < group; ++r) {
      const float* qr = q + int64_t{r} * hd;
      __m512 dot[16];
      for (int j = 0; j < 16; ++j) dot[j] = _mm512_setzero_ps();
      for (int c = 0; c < nc; ++c) {
        const __m512 qc = _mm512_loadu_ps(qr + 16 * c);
        for (int j = 0; j < 16; ++j) {
          dot[j] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kf + j * hd + 16 * c), dot[j]);
        }
      }
      const __m512 s = _mm512_mask_mov_ps(
          _mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, Sum16(dot));
      const float corr = RaiseMax(m[r], l[r], _mm512_reduce_max_ps(s));
      const __m512 pv = _mm512_maskz_mov_ps(valid, Exp(_mm512_sub_ps(s, _mm512_set1_ps(m[r]))));
      _mm512_store_ps(p, pv);
      l[r] = l[r] * corr + _mm512_reduce_add_ps(pv);
      float* ar = acc + int64_t{r} * hd;
      const __m512 cv = _mm512_set1_ps(corr);
      for (int c = 0; c < nc; ++c) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * c), cv);
        for (int j = 0; j < t; ++j) {
          a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(vf + j * hd + 16 * c), a);
        }
        _mm512_storeu_ps(ar + 16 * c, a);
      }
    }
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  static constexpr KernelTable kTable = {"avx512", 16, DecodeChunkAvx512, Fp16ToFp32Avx512,
                                         Fp32ToFp16Avx512};
  return kTable;
}

}  // namespace ctxcache::attention_internal
