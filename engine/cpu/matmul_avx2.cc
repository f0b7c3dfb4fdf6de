// AVX2 kernels for MatVec/MatMul (see matmul_internal.h), for x86-64 CPUs without AVX-512:
// int8 dot products of every quantized weight type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
// Q6_K) with quantized activations (vpmaddubsw, one 32-element block per step; one token or a
// tile of a few, see kTile) and fp32 dots for F32/F16/BF16 weights, and exact dequantizers
// for the GEMM's fp32 panels.
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

// The 32-element block formats (see matmul_avx512.cc for their encodings).
enum class QKind { kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0 };

template <QKind K>
constexpr size_t kBlockBytes = K == QKind::kQ4_0   ? 18
                               : K == QKind::kQ4_1 ? 20
                               : K == QKind::kQ5_0 ? 22
                               : K == QKind::kQ5_1 ? 24
                                                   : 34;
template <QKind K>
constexpr bool kHasMin = K == QKind::kQ4_1 || K == QKind::kQ5_1;
template <QKind K>
constexpr bool kHasFifthBit = K == QKind::kQ5_0 || K == QKind::kQ5_1;
template <QKind K>
constexpr int kQhOffset = kHasMin<K> ? 4 : 2;
template <QKind K>
constexpr int kQsOffset = (kHasMin<K> ? 4 : 2) + (kHasFifthBit<K> ? 4 : 0);
// The stored offset of the unsigned codes: x = d * (q - offset) (0 with a min or for Q8_0).
template <QKind K>
constexpr float kCodeOffset = K == QKind::kQ4_0 ? 8.0f : K == QKind::kQ5_0 ? 16.0f : 0.0f;

// 32 bytes, 0x10 where bit j of bits is set (byte j): the fifth bits of a Q5 block.
CTX_AVX2 inline __m256i FifthBits(uint32_t bits) {
  // Byte j gets byte j / 8 of bits, then tests its own bit j % 8.
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}

// Sum over pairs of u8 x s8 products, widened to 8 int32 lanes (lane i: elements 4i..4i+3).
// Pair sums stay within int16 for unsigned codes up to 128 and |x| <= 127: 128*127*2 = 32512.
CTX_AVX2 inline __m256i DotU8S8(__m256i u, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}

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

// MatVec is one token; MatMul with a few (a batched decode step) runs the kernels below on
// tiles of up to kTile tokens: each block's weights are unpacked once per tile and applied to
// every token of it, with per-token accumulators in registers (with 4 tokens, 4-8 of the 16
// ymm). Each token goes through exactly the operations, in the order, of a tile of one token,
// so batching changes no result bit (matmul_test: BatchedDotMatchesMatVecExactly).
constexpr int kTile = 4;

// out[t] = dot(row, x_t) for the T tokens of acts, one block per iteration: vpmaddubsw of
// unsigned weights (Q4/Q5 codes, or |w| with w's sign moved onto x for Q8_0) and int8
// activations, summed to int32 by vpmaddwd.
template <QKind K, int T>
CTX_AVX2 void DotRows(const uint8_t* row, int64_t nb, const QuantizedActs* acts, float* out) {
  constexpr size_t kB = kBlockBytes<K>;
  const __m256i shifts = _mm256_setr_epi64x(0, 0, 4, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[T];
  float offset[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    acc[t] = _mm256_setzero_ps();
    offset[t] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + b * kB;
    __m256i w, wv;
    if constexpr (K == QKind::kQ8_0) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      wv = _mm256_abs_epi8(w);
    } else {
      const __m256i q = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kQsOffset<K>)));
      wv = _mm256_and_si256(_mm256_srlv_epi64(q, shifts), low4);
      if constexpr (kHasFifthBit<K>) {
        uint32_t qh;
        std::memcpy(&qh, p + kQhOffset<K>, 4);
        wv = _mm256_or_si256(wv, FifthBits(qh));
      }
    }
    const float d = _cvtsh_ss(LoadU16(p));
    float m = 0.0f;
    if constexpr (kHasMin<K>) m = _cvtsh_ss(LoadU16(p + 2));
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const float* ds = acts[t].ds;
      __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts[t].qs + b * kActBlock));
      if constexpr (K == QKind::kQ8_0) xv = _mm256_sign_epi8(xv, w);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DotU8S8(wv, xv)),
                               _mm256_set1_ps(d * ds[2 * b]), acc[t]);
      if constexpr (kHasMin<K>) {
        offset[t] += m * ds[2 * b + 1];
      } else if constexpr (K != QKind::kQ8_0) {
        offset[t] += d * ds[2 * b + 1];
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    // Q4_0/Q5_0 store q + 8 / q + 16: subtract 8 (16) * d * sum(x).
    if constexpr (kCodeOffset<K> != 0.0f) offset[t] *= -kCodeOffset<K>;
    out[t] = HSum(acc[t]) + offset[t];
  }
}

// The 32 codes (0..31) of sub-block s of a Q4_K/Q5_K super-block at p: nibbles of qs (low
// for even s, high for odd), plus, for Q5_K, bit s of each qh byte as 16 (qh preloaded).
template <bool kQ5>
CTX_AVX2 inline __m256i CodesQ45K(const uint8_t* p, int s, __m256i qh) {
  constexpr int kQs = kQ5 ? 48 : 16;
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kQs + 32 * (s / 2)));
  __m256i codes = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(0x0f));
  if constexpr (kQ5) {
    const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, s), _mm256_set1_epi8(1));
    codes = _mm256_or_si256(codes, _mm256_slli_epi16(bit, 4));
  }
  return codes;
}

// Q4_K / Q5_K (see matmul_avx512.cc: UnpackQ45K): one sub-block of 32 (= one activation
// block) per step, its scale d * sc * d_x and its min term -dmin * m * d_x * sum(x);
// out[t] = dot(row, x_t) for the T tokens of acts.
template <bool kQ5, int T>
CTX_AVX2 void DotRowsQ45K(const uint8_t* row, int64_t nb, const QuantizedActs* acts,
                          float* out) {
  constexpr size_t kB = kQ5 ? 176 : 144;
  __m256 acc[T];
  float min_term[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    acc[t] = _mm256_setzero_ps();
    min_term[t] = 0.0f;
  }
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* p = row + sb * kB;
    const float d = _cvtsh_ss(LoadU16(p)), dmin = _cvtsh_ss(LoadU16(p + 2));
    uint8_t sc[8], m[8];
    for (int s = 0; s < 8; ++s) quant_internal::ScaleMinK4(s, p + 4, &sc[s], &m[s]);
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kQ5) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    float mins[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) mins[t] = 0.0f;
    for (int s = 0; s < 8; ++s) {
      const __m256i codes = CodesQ45K<kQ5>(p, s, qh);
      const float d_sc = d * static_cast<float>(sc[s]);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const float* dsb = acts[t].ds + 16 * sb;
        const __m256i dot = DotU8S8(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                               acts[t].qs + sb * 256 + 32 * s)));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d_sc * dsb[2 * s]),
                                 acc[t]);
        mins[t] += static_cast<float>(m[s]) * dsb[2 * s + 1];
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) min_term[t] += dmin * mins[t];
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) out[t] = HSum(acc[t]) - min_term[t];
}

// Q6_K (see matmul_avx512.cc: UnpackQ6K): one quarter of a half (32 elements = one
// activation block, two chunks of 16 with their own scales) per step; q - 32 is signed, so its
// sign moves onto x and |q - 32| <= 32 goes through vpmaddubsw as for Q8_0. out[t] =
// dot(row, x_t) for the T tokens of acts.
template <int T>
CTX_AVX2 void DotRowsQ6K(const uint8_t* row, int64_t nb, const QuantizedActs* acts, float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(0x03);
  const __m256i c32 = _mm256_set1_epi8(32);
  __m256 acc0[T], acc1[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* p = row + sb * 210;
    const float d = _cvtsh_ss(LoadU16(p + 208));
    const auto* sc = reinterpret_cast<const int8_t*>(p + 192);
    for (int h = 0; h < 2; ++h) {
      const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h));
      const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
      const __m256i quarter[4] = {
          _mm256_or_si256(_mm256_and_si256(ql0, low4),
                          _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4)),
          _mm256_or_si256(_mm256_and_si256(ql1, low4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), low2), 4)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), low2), 4))};
      for (int k = 0; k < 4; ++k) {
        const int blk = 4 * h + k;  // activation block within the super-block
        const __m256i w = _mm256_sub_epi8(quarter[k], c32);
        const __m256i aw = _mm256_abs_epi8(w);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(acts[t].qs + sb * 256 + 32 * blk));
          const __m256i dot = DotU8S8(aw, _mm256_sign_epi8(xv, w));
          const float dx = d * acts[t].ds[16 * sb + 2 * blk];
          // Lanes 0-3 are chunk 2 * blk, lanes 4-7 chunk 2 * blk + 1.
          const __m256 scale =
              _mm256_set_m128(_mm_set1_ps(dx * static_cast<float>(sc[2 * blk + 1])),
                              _mm_set1_ps(dx * static_cast<float>(sc[2 * blk])));
          __m256& acc = (k & 1) ? acc1[t] : acc0[t];
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) out[t] = HSum(_mm256_add_ps(acc0[t], acc1[t]));
}

// The tile kernels, by format, as QuantDot takes them: Dot<T>(row, nb, acts, out) sets
// out[t] = dot(row, x_t) for the first T tokens of acts.
template <QKind K>
struct BlockTile {
  template <int T>
  CTX_AVX2 static void Dot(const uint8_t* row, int64_t nb, const QuantizedActs* acts,
                           float* out) {
    DotRows<K, T>(row, nb, acts, out);
  }
};
template <bool kQ5>
struct Q45KTile {
  template <int T>
  CTX_AVX2 static void Dot(const uint8_t* row, int64_t nb, const QuantizedActs* acts,
                           float* out) {
    DotRowsQ45K<kQ5, T>(row, nb, acts, out);
  }
};
struct Q6KTile {
  template <int T>
  CTX_AVX2 static void Dot(const uint8_t* row, int64_t nb, const QuantizedActs* acts,
                           float* out) {
    DotRowsQ6K<T>(row, nb, acts, out);
  }
};

// Row r against tokens [t0, t0 + T).
template <class Kernel, int T>
CTX_AVX2 inline void RowTile(const uint8_t* row, int64_t nb, const QuantizedActs* acts,
                             int64_t t0, float* y, int64_t ldy, int64_t r) {
  float out[T];
  Kernel::template Dot<T>(row, nb, acts + t0, out);
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r] = out[t];
}

template <class Kernel>
CTX_AVX2 void QuantDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                       const QuantizedActs* acts, int64_t n_tok, float* y, int64_t ldy) {
  const int64_t nb = n_in / kActBlock;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    // The row stays in L1 across the tiles: one DRAM read per row.
    int64_t t0 = 0;
    for (; t0 + kTile <= n_tok; t0 += kTile) RowTile<Kernel, kTile>(row, nb, acts, t0, y, ldy, r);
    switch (n_tok - t0) {
      case 3: RowTile<Kernel, 3>(row, nb, acts, t0, y, ldy, r); break;
      case 2: RowTile<Kernel, 2>(row, nb, acts, t0, y, ldy, r); break;
      case 1: RowTile<Kernel, 1>(row, nb, acts, t0, y, ldy, r); break;
      default: break;
    }
  }
}

// Element formats of unquantized weights: fp32, fp16 bits, bf16 bits.
enum class FKind { kF32, kF16, kBF16 };

// 8 weights from element i of a[] as fp32 (exact for all three formats).
template <FKind F>
CTX_AVX2 inline __m256 LoadW(const void* a, int64_t i) {
  if constexpr (F == FKind::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(a) + i);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a) + i));
    if constexpr (F == FKind::kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <FKind F>
CTX_AVX2 inline float LoadW1(const void* a, int64_t i) {
  const auto* bytes = static_cast<const uint8_t*>(a);
  if constexpr (F == FKind::kF32) {
    float v;
    std::memcpy(&v, bytes + 4 * i, 4);
    return v;
  } else if constexpr (F == FKind::kF16) {
    return _cvtsh_ss(LoadU16(bytes + 2 * i));
  } else {
    const uint32_t bits = static_cast<uint32_t>(LoadU16(bytes + 2 * i)) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  }
}

template <FKind F>
CTX_AVX2 float DotFloat(const void* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(LoadW<F>(a, i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(LoadW<F>(a, i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(LoadW<F>(a, i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(LoadW<F>(a, i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(LoadW<F>(a, i), _mm256_loadu_ps(b + i), s0);
  float s = HSum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) s += LoadW1<F>(a, i) * b[i];
  return s;
}

CTX_AVX2 float DotF32(const float* a, const float* b, int64_t n) {
  return DotFloat<FKind::kF32>(a, b, n);
}

template <FKind F>
CTX_AVX2 void FloatDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                       const float* x, int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < n_tok; ++t) {
      y[t * ldy + r] = DotFloat<F>(w + r * row_bytes, x + t * n_in, n_in);
    }
  }
}

// ---- Panel dequantizers (GEMM at this level: sgemm on fp32 panels) ------------------------
// They reproduce DequantizeRow bit for bit: the same integer codes, conversions and separate
// multiply and add in the reference's order. Every format's codes fit int8, so one helper
// widens 32 codes and applies the block's affine map.
enum class Affine { kScale, kScaleAddMin, kScaleSubMin };  // q*d, q*d + m, d*q - m

template <Affine A>
CTX_AVX2 inline void Emit32(__m256i codes, float d, float m, float* dst) {
  const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
  const __m128i halves[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
  for (int i = 0; i < 4; ++i) {
    const __m128i eight = i % 2 == 0 ? halves[i / 2] : _mm_srli_si128(halves[i / 2], 8);
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
    __m256 y;
    if constexpr (A == Affine::kScale) y = _mm256_mul_ps(q, dv);
    if constexpr (A == Affine::kScaleAddMin) y = _mm256_add_ps(_mm256_mul_ps(q, dv), mv);
    if constexpr (A == Affine::kScaleSubMin) y = _mm256_sub_ps(_mm256_mul_ps(dv, q), mv);
    _mm256_storeu_ps(dst + 8 * i, y);
  }
}

// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one block of 32 per step.
template <QKind K>
CTX_AVX2 void DequantLegacy(const uint8_t* src, float* dst, int64_t n) {
  constexpr size_t kB = kBlockBytes<K>;
  for (int64_t b = 0; b < n / 32; ++b, src += kB, dst += 32) {
    const float d = _cvtsh_ss(LoadU16(src));
    __m256i codes;
    if constexpr (K == QKind::kQ8_0) {
      codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2));
    } else {
      const __m256i q = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kQsOffset<K>)));
      codes = _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)),
                               _mm256_set1_epi8(0x0f));
      if constexpr (kHasFifthBit<K>) {
        uint32_t qh;
        std::memcpy(&qh, src + kQhOffset<K>, 4);
        codes = _mm256_or_si256(codes, FifthBits(qh));
      }
      codes = _mm256_sub_epi8(codes, _mm256_set1_epi8(static_cast<char>(kCodeOffset<K>)));
    }
    if constexpr (kHasMin<K>) {
      Emit32<Affine::kScaleAddMin>(codes, d, _cvtsh_ss(LoadU16(src + 2)), dst);
    } else {
      Emit32<Affine::kScale>(codes, d, 0.0f, dst);
    }
  }
}

// Q4_K / Q5_K: y = (d * sc) * q - dmin * m per sub-block of 32.
template <bool kQ5>
CTX_AVX2 void DequantQ45K(const uint8_t* src, float* dst, int64_t n) {
  constexpr int kB = kQ5 ? 176 : 144;
  for (int64_t sb = 0; sb < n / 256; ++sb, src += kB) {
    const float d = _cvtsh_ss(LoadU16(src)), dmin = _cvtsh_ss(LoadU16(src + 2));
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kQ5) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16));
    for (int s = 0; s < 8; ++s, dst += 32) {
      uint8_t sc, m;
      quant_internal::ScaleMinK4(s, src + 4, &sc, &m);
      Emit32<Affine::kScaleSubMin>(CodesQ45K<kQ5>(src, s, qh), d * static_cast<float>(sc),
                                   dmin * static_cast<float>(m), dst);
    }
  }
}

// Q6_K: y = (d * sc) * (q - 32) per chunk of 16; one quarter (32 elements) per step.
CTX_AVX2 void DequantQ6K(const uint8_t* src, float* dst, int64_t n) {
  const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(0x03);
  for (int64_t sb = 0; sb < n / 256; ++sb, src += 210) {
    const float d = _cvtsh_ss(LoadU16(src + 208));
    const auto* sc = reinterpret_cast<const int8_t*>(src + 192);
    for (int h = 0; h < 2; ++h) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 128 + 32 * h));
      for (int quarter = 0; quarter < 4; ++quarter, dst += 32) {
        const __m256i l = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(src + 64 * h + (quarter & 1 ? 32 : 0)));
        const __m256i lo = _mm256_and_si256(quarter < 2 ? l : _mm256_srli_epi16(l, 4), low4);
        const __m256i hi = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * quarter)), low2);
        const __m256i codes = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)),
                                              _mm256_set1_epi8(32));
        // Two chunks of 16 with their own scales: Emit32 on each half's 16 codes.
        alignas(32) float tmp[32];
        const int c = 8 * h + 2 * quarter;
        Emit32<Affine::kScale>(codes, d * static_cast<float>(sc[c]), 0.0f, tmp);
        std::memcpy(dst, tmp, 16 * sizeof(float));
        Emit32<Affine::kScale>(codes, d * static_cast<float>(sc[c + 1]), 0.0f, tmp);
        std::memcpy(dst + 16, tmp + 16, 16 * sizeof(float));
      }
    }
  }
}

template <FKind F>
CTX_AVX2 void DequantHalf(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LoadW<F>(src, i));
  for (; i < n; ++i) dst[i] = LoadW1<F>(src, i);
}

}  // namespace

const KernelTable& Avx2Kernels() {
  static const KernelTable table = {
      .name = "avx2",
      .quantize_acts = &QuantizeActs,
      .q4_0 = &QuantDot<BlockTile<QKind::kQ4_0>>,
      .q4_1 = &QuantDot<BlockTile<QKind::kQ4_1>>,
      .q5_0 = &QuantDot<BlockTile<QKind::kQ5_0>>,
      .q5_1 = &QuantDot<BlockTile<QKind::kQ5_1>>,
      .q8_0 = &QuantDot<BlockTile<QKind::kQ8_0>>,
      .q4_k = &QuantDot<Q45KTile<false>>,
      .q5_k = &QuantDot<Q45KTile<true>>,
      .q6_k = &QuantDot<Q6KTile>,
      .f32 = &FloatDot<FKind::kF32>,
      .f16 = &FloatDot<FKind::kF16>,
      .bf16 = &FloatDot<FKind::kBF16>,
      .dot_f32 = &DotF32,
      .dequant_q4_0 = &DequantLegacy<QKind::kQ4_0>,
      .dequant_q4_1 = &DequantLegacy<QKind::kQ4_1>,
      .dequant_q5_0 = &DequantLegacy<QKind::kQ5_0>,
      .dequant_q5_1 = &DequantLegacy<QKind::kQ5_1>,
      .dequant_q8_0 = &DequantLegacy<QKind::kQ8_0>,
      .dequant_q4_k = &DequantQ45K<false>,
      .dequant_q5_k = &DequantQ45K<true>,
      .dequant_q6_k = &DequantQ6K,
      .dequant_f16 = &DequantHalf<FKind::kF16>,
      .dequant_bf16 = &DequantHalf<FKind::kBF16>,
  };
  return table;
}

}  // namespace ctxcache::matmul_internal
