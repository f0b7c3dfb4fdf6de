// AVX-512 kernels for MatVec/MatMul (see matmul_internal.h): int8 VNNI dot products of
// Q4_0/Q4_1/Q8_0 weights with int8-quantized activations, fp32 dots for F32/F16 weights, and
// vectorized dequantizers for GEMM panels. Every function is compiled for AVX-512 through a
// target attribute and only called after runtime detection (matmul.cc).
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics build their "don't care" inputs with _mm512_undefined_*(), a
// self-initialized variable that -Wuninitialized reports once inlined into a function with a
// target("avx512f") attribute (not under -mavx512f). Those values are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cstring>

#include "engine/cpu/matmul_internal.h"
#include "engine/cpu/quant_internal.h"

#define CTX_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace ctxcache::matmul_internal {
namespace {

using quant_internal::LoadU16;

enum class QKind { kQ4_0, kQ4_1, kQ8_0 };

template <QKind K>
constexpr size_t kBlockBytes = K == QKind::kQ4_0   ? 18
                               : K == QKind::kQ4_1 ? 20
                                                   : 34;
template <QKind K>
constexpr int kQsOffset = K == QKind::kQ4_1 ? 4 : 2;
// Weight of the per-block offset term (lanes 1/3 of the scale vector, see DotRow):
// Q4_0 stores q + 8, so it contributes -8 * d * sum(x); Q4_1 adds m * sum(x).
template <QKind K>
constexpr float kOffsetFactor = K == QKind::kQ4_0   ? -8.0f
                                : K == QKind::kQ4_1 ? 1.0f
                                                    : 0.0f;

CTX_AVX512 void QuantizeActs(const float* x, int64_t n, int8_t* qs, float* ds) {
  for (int64_t b = 0; b < n / kActBlock; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * kActBlock);
    const __m512 v1 = _mm512_loadu_ps(x + b * kActBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    // Round to nearest (even) via MXCSR; |x * id| <= 127 so the saturating pack is exact.
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + b * kActBlock), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + b * kActBlock + 16),
                     _mm512_cvtsepi32_epi8(i1));
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    ds[2 * b] = d;
    ds[2 * b + 1] = d * static_cast<float>(sum);
  }
}

// Four fp16 values {d0, o0, d1, o1}: the scales of two consecutive blocks and the factor of
// their offset term (Q4_0: d again, Q4_1: m, Q8_0: none).
template <QKind K>
CTX_AVX512 inline __m128i LoadScales(const uint8_t* p0, const uint8_t* p1) {
  uint64_t bits;
  if constexpr (K == QKind::kQ4_1) {
    uint32_t a, b;  // d and m are adjacent at the start of the block
    std::memcpy(&a, p0, 4);
    std::memcpy(&b, p1, 4);
    bits = a | static_cast<uint64_t>(b) << 32;
  } else if constexpr (K == QKind::kQ4_0) {
    bits = LoadU16(p0) * 0x00010001ull | static_cast<uint64_t>(LoadU16(p1)) * 0x0001000100000000ull;
  } else {
    bits = LoadU16(p0) | static_cast<uint64_t>(LoadU16(p1)) << 32;
  }
  return _mm_cvtsi64_si128(static_cast<int64_t>(bits));
}

// Integer dot of one weight block with 32 int8 activations (tail blocks only). noinline on
// purpose: inlined into a target("avx512vnni") caller, GCC 12 vectorizes the signed x signed
// int8 loop of Q8_0 with vpdpbusd (unsigned x signed) and gets wrong sums; compiled for the
// baseline it is correct (caught by matmul_test, Q8_0 n_in=288).
template <QKind K>
__attribute__((noinline)) int ScalarBlockDot(const uint8_t* p, const int8_t* xq) {
  int s = 0;
  if constexpr (K == QKind::kQ8_0) {
    for (int j = 0; j < 32; ++j) s += static_cast<int8_t>(p[2 + j]) * xq[j];
  } else {
    const uint8_t* q = p + kQsOffset<K>;
    for (int j = 0; j < 16; ++j) s += (q[j] & 0x0f) * xq[j] + (q[j] >> 4) * xq[j + 16];
  }
  return s;
}

// dot(row, x) for one weight row of nb blocks and one token's quantized activations.
// Two blocks per iteration: the 64 weight bytes as unsigned (Q4: nibbles 0..15; Q8: |w| with
// the sign moved onto x) go through one vpdpbusd; lanes 0-7 hold block 0's partial sums and
// lanes 8-15 block 1's, which are scaled by d_w * d_x per half before accumulating in fp32.
// Two blocks of one row: adds their scaled integer dots to *acc and, for Q4, the offset
// terms {_, o0 * sx0, _, o1 * sx1} to *acc_offset.
template <QKind K>
CTX_AVX512 inline void DotTwoBlocks(const uint8_t* p0, const int8_t* xq, const float* ds,
                                    __m512* acc, __m128* acc_offset) {
  constexpr size_t kB = kBlockBytes<K>;
  const uint8_t* p1 = p0 + kB;
  __m512i xv = _mm512_loadu_si512(xq);  // [2 blocks x 32] int8
  __m512i wv;                           // [2 blocks x 32] uint8
  if constexpr (K == QKind::kQ8_0) {
    const __m512i w = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + 2))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + 2)), 1);
    xv = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(w), _mm512_setzero_si512(), xv);
    wv = _mm512_abs_epi8(w);  // -128 becomes 0x80 = 128 unsigned: still exact
  } else {
    // Each 16-byte qs is placed twice, then the second copy shifted: lo nibbles are
    // elements 0-15, hi nibbles 16-31, matching the activations' order.
    const __m256i q0 = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + kQsOffset<K>)));
    const __m256i q1 = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + kQsOffset<K>)));
    wv = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    wv = _mm512_and_si512(_mm512_srlv_epi64(wv, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
                          _mm512_set1_epi8(0x0f));
  }
  const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
  // {d0 * dx0, o0 * sx0, d1 * dx1, o1 * sx1}
  const __m128 sc = _mm_mul_ps(_mm_cvtph_ps(LoadScales<K>(p0, p1)), _mm_loadu_ps(ds));
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                         _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(sc)), *acc);
  if constexpr (K != QKind::kQ8_0) *acc_offset = _mm_add_ps(*acc_offset, sc);
}

// dot(row, x) for one weight row of nb blocks and one token's quantized activations.
// Two blocks per step: the 64 weight bytes as unsigned (Q4: nibbles 0..15; Q8: |w| with the
// sign moved onto x) go through one vpdpbusd; lanes 0-7 hold block 0's partial sums and
// lanes 8-15 block 1's, scaled by d_w * d_x per half before accumulating in fp32. Two
// accumulators, because one FMA chain (4-cycle latency) was the limit in L2.
template <QKind K>
CTX_AVX512 float DotRow(const uint8_t* row, int64_t nb, const int8_t* xq, const float* ds) {
  constexpr size_t kB = kBlockBytes<K>;
  __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
  __m128 acc_offset = _mm_setzero_ps(), acc_offset2 = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    DotTwoBlocks<K>(row + b * kB, xq + b * kActBlock, ds + 2 * b, &acc, &acc_offset);
    DotTwoBlocks<K>(row + (b + 2) * kB, xq + (b + 2) * kActBlock, ds + 2 * (b + 2), &acc2,
                    &acc_offset2);
  }
  if (b + 2 <= nb) {
    DotTwoBlocks<K>(row + b * kB, xq + b * kActBlock, ds + 2 * b, &acc, &acc_offset);
    b += 2;
  }
  acc = _mm512_add_ps(acc, acc2);
  acc_offset = _mm_add_ps(acc_offset, acc_offset2);
  float total = _mm512_reduce_add_ps(acc);
  float offset = 0.0f;
  if constexpr (K != QKind::kQ8_0) {
    alignas(16) float o[4];
    _mm_store_ps(o, acc_offset);
    offset = o[1] + o[3];
  }
  if (b < nb) {  // odd block count (e.g. n_in = 288)
    const uint8_t* p = row + b * kB;
    const float d = _cvtsh_ss(LoadU16(p));
    total += d * ds[2 * b] * static_cast<float>(ScalarBlockDot<K>(p, xq + b * kActBlock));
    if constexpr (K == QKind::kQ4_0) offset += d * ds[2 * b + 1];
    if constexpr (K == QKind::kQ4_1) offset += _cvtsh_ss(LoadU16(p + 2)) * ds[2 * b + 1];
  }
  return total + kOffsetFactor<K> * offset;
}

constexpr int64_t kPrefetchRows = 4;

template <QKind K>
CTX_AVX512 void QuantDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                         const QuantizedActs* acts, int64_t n_tok, float* y, int64_t ldy) {
  const int64_t nb = n_in / kActBlock;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    // Prefetch a few rows ahead (~1.5 KB for 576-wide Q4_1): the DRAM latency per row is
    // longer than the kernel's time per row, and rows are too short for the hardware
    // prefetcher to ramp up within one.
    if (r + kPrefetchRows < r1) {
      const uint8_t* ahead = row + kPrefetchRows * row_bytes;
      for (size_t off = 0; off < row_bytes; off += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
      }
    }
    // With several tokens the row stays in L1 across them: one DRAM read per row.
    for (int64_t t = 0; t < n_tok; ++t) y[t * ldy + r] = DotRow<K>(row, nb, acts[t].qs, acts[t].ds);
  }
}

// a[n] fp32 (F32 weights) or fp16 bits (F16 weights), b[n] fp32.
template <bool kHalf>
CTX_AVX512 inline __m512 LoadW(const void* a, int64_t i) {
  if constexpr (kHalf) {
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a) + i)));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(a) + i);
  }
}
template <bool kHalf>
CTX_AVX512 inline __m512 MaskLoadW(const void* a, int64_t i, __mmask16 m) {
  if constexpr (kHalf) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a) + i));
  } else {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(a) + i);
  }
}

template <bool kHalf>
CTX_AVX512 float DotFloat(const void* a, const float* b, int64_t n) {
  // Four accumulators hide the FMA latency (4 cycles) behind independent chains.
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(LoadW<kHalf>(a, i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(LoadW<kHalf>(a, i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(LoadW<kHalf>(a, i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(LoadW<kHalf>(a, i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(LoadW<kHalf>(a, i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(MaskLoadW<kHalf>(a, i, m), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

CTX_AVX512 float DotF32(const float* a, const float* b, int64_t n) {
  return DotFloat<false>(a, b, n);
}

template <bool kHalf>
CTX_AVX512 void FloatDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                         const float* x, int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < n_tok; ++t) {
      y[t * ldy + r] = DotFloat<kHalf>(w + r * row_bytes, x + t * n_in, n_in);
    }
  }
}

// Panel dequantizers. They reproduce DequantizeRow bit for bit: the same integer offsets,
// conversions and separate multiply/add (no FMA) in the same order.
CTX_AVX512 void DequantQ4_0(const uint8_t* src, float* dst, int64_t n) {
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t b = 0; b < n / 32; ++b, src += 18, dst += 32) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(LoadU16(src)));
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2));
    const __m512i lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)), eight);
    const __m512i hi =
        _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)), eight);
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
  }
}

CTX_AVX512 void DequantQ4_1(const uint8_t* src, float* dst, int64_t n) {
  const __m128i low4 = _mm_set1_epi8(0x0f);
  for (int64_t b = 0; b < n / 32; ++b, src += 20, dst += 32) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(LoadU16(src)));
    const __m512 m = _mm512_set1_ps(_cvtsh_ss(LoadU16(src + 2)));
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 4));
    const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, low4));
    const __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4));
    _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m));
    _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m));
  }
}

CTX_AVX512 void DequantQ8_0(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, src += 34, dst += 32) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(LoadU16(src)));
    const __m512i q0 =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2)));
    const __m512i q1 =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 18)));
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
  }
}

// Hardware conversion: identical to Fp16ToFp32 except that signalling NaNs come out quiet.
CTX_AVX512 void DequantF16(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(
        dst + i,
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i))));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + 2 * i)));
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  static const KernelTable table = {
      "avx512-vnni",
      &QuantizeActs,
      &QuantDot<QKind::kQ4_0>,
      &QuantDot<QKind::kQ4_1>,
      &QuantDot<QKind::kQ8_0>,
      &FloatDot<false>,
      &FloatDot<true>,
      &DotF32,
      &DequantQ4_0,
      &DequantQ4_1,
      &DequantQ8_0,
      &DequantF16,
  };
  return table;
}

}  // namespace ctxcache::matmul_internal
