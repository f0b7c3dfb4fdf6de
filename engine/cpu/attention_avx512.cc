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

// Tiles of 16 keys: K and V converted (or dequantized, by `load`) to fp32 once (into `tile`, L1) for all `group` query
// rows; per row, 16 scores at once (16 dot accumulators reduced by Sum16), the online-softmax
// update, and the weighted V sum.
template <class Load>
CTX_AVX512 inline void DecodeTiles(const float* q, int group, const Load& load, int64_t n, int hd,
                                   float* tile, float* m, float* l, float* acc, float* scores,
                                   int64_t score_stride) {
  float* kf = tile;
  float* vf = tile + kTile * hd;
  const int nc = hd / 16;
  ResetState(group, hd, m, l, acc);
  alignas(64) float p[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int t = static_cast<int>(std::min<int64_t>(16, n - j0));
    load(j0, t, kf, vf);
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
      if (scores != nullptr) _mm512_mask_storeu_ps(scores + r * score_stride + j0, valid, s);
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

// Loads of a tile of fp16 rows.
struct Fp16Load {
  const uint16_t* k;
  const uint16_t* v;
  int hd;
  CTX_AVX512 void operator()(int64_t j0, int t, float* kf, float* vf) const {
    Fp16ToFp32Avx512(k + j0 * hd, kf, int64_t{t} * hd);
    Fp16ToFp32Avx512(v + j0 * hd, vf, int64_t{t} * hd);
  }
};

// 16 codes of a row as fp32: int8 bytes at p, or the low (high) nibbles of the bytes at p.
CTX_AVX512 inline __m512 Codes8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
CTX_AVX512 inline __m512 Codes4(const uint8_t* p, bool high) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = high ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(0xF));
  return _mm512_cvtepi32_ps(b);
}
CTX_AVX512 inline __m512 Half16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Loads of a tile of an int8 / int4 segment's rows, dequantized (KvSegment::LoadRows is the
// reference): keys code * scale + min with per-channel vectors of the row's key group,
// values with the row's per-32-channel scalars.
struct SegmentLoad {
  const KvSegment& seg;
  int64_t begin;
  CTX_AVX512 void operator()(int64_t j0, int t, float* kf, float* vf) const {
    const int hd = seg.head_dim, half = hd / 2, vg = hd / kValueGroup;
    const int64_t rb = seg.RowCodeBytes();
    const bool int4 = seg.dtype == KvDtype::kInt4;
    for (int r = 0; r < t; ++r) {
      const int64_t j = begin + j0 + r;
      const uint8_t* kr = seg.kq.data() + j * rb;
      const uint8_t* vr = seg.vq.data() + j * rb;
      const uint16_t* ks = seg.k_scale.data() + (j / kKeyGroup) * hd;
      const uint16_t* km = seg.k_min.data() + (j / kKeyGroup) * hd;
      float* ko = kf + int64_t{r} * hd;
      float* vo = vf + int64_t{r} * hd;
      for (int c = 0; c < hd; c += 16) {
        // int4: channel c < half sits in the low nibbles of bytes c.., c >= half in the high
        // nibbles of bytes c - half..
        const __m512 kc = int4 ? Codes4(kr + (c < half ? c : c - half), c >= half) : Codes8(kr + c);
        const __m512 vc = int4 ? Codes4(vr + (c < half ? c : c - half), c >= half) : Codes8(vr + c);
        _mm512_storeu_ps(ko + c, _mm512_fmadd_ps(kc, Half16(ks + c), Half16(km + c)));
        const int g = c / kValueGroup;
        const __m512 vs = _mm512_set1_ps(_cvtsh_ss(seg.v_scale[j * vg + g]));
        const __m512 vm = _mm512_set1_ps(_cvtsh_ss(seg.v_min[j * vg + g]));
        _mm512_storeu_ps(vo + c, _mm512_fmadd_ps(vc, vs, vm));
      }
    }
  }
};

CTX_AVX512 void DecodeChunkAvx512(const float* q, int group, const uint16_t* k,
                                  const uint16_t* v, int64_t n, int hd, float* tile, float* m,
                                  float* l, float* acc, float* scores, int64_t score_stride) {
  DecodeTiles(q, group, Fp16Load{k, v, hd}, n, hd, tile, m, l, acc, scores, score_stride);
}

CTX_AVX512 void DecodeSegmentChunkAvx512(const float* q, int group, const KvSegment& seg,
                                         int64_t begin, int64_t n, int hd, float* tile, float* m,
                                         float* l, float* acc, float* scores,
                                         int64_t score_stride) {
  if (seg.dtype == KvDtype::kF16) {
    DecodeChunkAvx512(q, group, seg.k16.data() + begin * hd, seg.v16.data() + begin * hd, n, hd,
                      tile, m, l, acc, scores, score_stride);
  } else {
    DecodeTiles(q, group, SegmentLoad{seg, begin}, n, hd, tile, m, l, acc, scores, score_stride);
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  static constexpr KernelTable kTable = {"avx512", 16, DecodeChunkAvx512,
                                         DecodeSegmentChunkAvx512, Fp16ToFp32Avx512,
                                         Fp32ToFp16Avx512};
  return kTable;
}

}  // namespace ctxcache::attention_internal
