// AVX-512 kernels for MatVec/MatMul (see matmul_internal.h): int8 VNNI dot products of every
// quantized weight type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in blocks of 32; Q4_K, Q5_K, Q6_K in
// super-blocks of 256) with int8-quantized activations, fp32 dots for F32/F16/BF16 weights,
// and exact vectorized dequantizers for GEMM panels. Every function is compiled for AVX-512
// through a target attribute and only called after runtime detection (matmul.cc).
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

// The 32-element block formats. Q4_0/Q5_0 store q + 8 / q + 16 (x = d * q), Q4_1/Q5_1 an
// unsigned q with a minimum (x = d * q + m), Q8_0 a signed byte (x = d * q).
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
// The fifth bits of Q5 (a little-endian u32, bit j = element j) follow the fp16 fields.
template <QKind K>
constexpr int kQhOffset = kHasMin<K> ? 4 : 2;
template <QKind K>
constexpr int kQsOffset = (kHasMin<K> ? 4 : 2) + (kHasFifthBit<K> ? 4 : 0);
// Weight of the per-block offset term (lanes 1/3 of the scale vector, see DotRow):
// Q4_0 stores q + 8, so it contributes -8 * d * sum(x), Q5_0 -16 * d * sum(x); Q4_1/Q5_1
// add m * sum(x).
template <QKind K>
constexpr float kOffsetFactor = K == QKind::kQ4_0   ? -8.0f
                                : K == QKind::kQ5_0 ? -16.0f
                                : kHasMin<K>        ? 1.0f
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
// their offset term (Q4_0/Q5_0: d again, Q4_1/Q5_1: m, Q8_0: none).
template <QKind K>
CTX_AVX512 inline __m128i LoadScales(const uint8_t* p0, const uint8_t* p1) {
  uint64_t bits;
  if constexpr (kHasMin<K>) {
    uint32_t a, b;  // d and m are adjacent at the start of the block
    std::memcpy(&a, p0, 4);
    std::memcpy(&b, p1, 4);
    bits = a | static_cast<uint64_t>(b) << 32;
  } else if constexpr (K != QKind::kQ8_0) {
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
    uint32_t qh = 0;
    if constexpr (kHasFifthBit<K>) std::memcpy(&qh, p + kQhOffset<K>, 4);
    for (int j = 0; j < 16; ++j) {
      const int lo = (q[j] & 0x0f) | ((qh >> j) & 1) << 4;
      const int hi = (q[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
      s += lo * xq[j] + hi * xq[j + 16];
    }
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
    if constexpr (kHasFifthBit<K>) {
      // Byte j of wv is element j of its block: the two qh words, side by side, are the
      // mask of the bytes that get their fifth bit (+16).
      uint32_t h0, h1;
      std::memcpy(&h0, p0 + kQhOffset<K>, 4);
      std::memcpy(&h1, p1 + kQhOffset<K>, 4);
      wv = _mm512_mask_add_epi8(wv, _cvtu64_mask64(h0 | static_cast<uint64_t>(h1) << 32), wv,
                                _mm512_set1_epi8(16));
    }
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
    if constexpr (kHasMin<K>) {
      offset += _cvtsh_ss(LoadU16(p + 2)) * ds[2 * b + 1];
    } else if constexpr (K != QKind::kQ8_0) {
      offset += d * ds[2 * b + 1];
    }
  }
  return total + kOffsetFactor<K> * offset;
}

// ---- K formats: super-blocks of 256 elements -------------------------------------------
// The activations keep their blocks of 32 (one d_x and d_x * sum per block), which line up
// with the K formats' sub-blocks: a Q4_K/Q5_K sub-block of 32 is one activation block, a
// Q6_K sub-block of 16 is half of one. So every scale is applied per sub-block in fp32, as
// for the legacy formats, with the integer dots from vpdpbusd (unsigned weights x int8).

// Lane i of a 16-lane vector picks lane idx[i] of src.
CTX_AVX512 inline __m512 Spread(__m512 src, __m512i idx) { return _mm512_permutexvar_ps(idx, src); }

// The 6-bit scales and mins of a Q4_K/Q5_K super-block (quant.cc: ScaleMinK4), all eight at
// once: bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the
// same for mins, bytes 8-11 the low nibbles of scales 4-7 and mins 4-7. Returns the 16 bytes
// {sc0, m0, sc1, m1, ..., sc7, m7}.
CTX_AVX512 inline __m128i ScalesMinsK4(const uint8_t* scales) {
  uint32_t u[3];
  std::memcpy(u, scales, 12);
  const uint32_t sc_lo = u[0] & 0x3f3f3f3f, m_lo = u[1] & 0x3f3f3f3f;
  const uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | ((u[0] >> 6) & 0x03030303) << 4;
  const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 6) & 0x03030303) << 4;
  const __m128i sc = _mm_cvtsi64_si128(static_cast<int64_t>(sc_lo | uint64_t{sc_hi} << 32));
  const __m128i m = _mm_cvtsi64_si128(static_cast<int64_t>(m_lo | uint64_t{m_hi} << 32));
  return _mm_unpacklo_epi8(sc, m);
}

// Q4_K (144-byte super-blocks) and Q5_K (176): x = d * sc_s * q - dmin * m_s per sub-block s
// of 32. Each 32 bytes of qs hold sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles); Q5_K's
// fifth bit of sub-block s is bit s of qh[l] for element l. nb counts activation blocks (32).
template <bool kQ5>
CTX_AVX512 float DotRowQ45K(const uint8_t* row, int64_t nb, const int8_t* xq, const float* ds) {
  constexpr size_t kB = kQ5 ? 176 : 144;
  constexpr int kQs = kQ5 ? 48 : 16;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  // Lanes 0-7 take sub-block 2j's scale (lane 4j of `prod` below), lanes 8-15 sub-block 2j+1's.
  const __m512i pick[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
      _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
      _mm512_setr_epi32(8, 8, 8, 8, 8, 8, 8, 8, 10, 10, 10, 10, 10, 10, 10, 10),
      _mm512_setr_epi32(12, 12, 12, 12, 12, 12, 12, 12, 14, 14, 14, 14, 14, 14, 14, 14)};
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc_min = acc0;
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* p = row + sb * kB;
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(LoadU16(p)));
    const __m512 neg_dmin = _mm512_set1_ps(-_cvtsh_ss(LoadU16(p + 2)));
    // Lane 2s: d * sc_s * d_x(s); lane 2s + 1: -dmin * m_s * d_x(s) * sum(x of s).
    const __m512 coef = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(ScalesMinsK4(p + 4))),
                                      _mm512_mask_blend_ps(0xAAAA, d, neg_dmin));
    const __m512 prod = _mm512_mul_ps(coef, _mm512_loadu_ps(ds + 16 * sb));
    acc_min = _mm512_mask_add_ps(acc_min, 0xAAAA, acc_min, prod);
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kQ5) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    const int8_t* x = xq + sb * 256;
    for (int j = 0; j < 4; ++j) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kQs + 32 * j));
      __m512i wv = _mm512_and_si512(
          _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1), low4);
      if constexpr (kQ5) {
        const __mmask32 h_lo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << (2 * j)));
        const __mmask32 h_hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << (2 * j + 1)));
        wv = _mm512_mask_add_epi8(wv, _cvtu64_mask64(h_lo | uint64_t{h_hi} << 32), wv,
                                  _mm512_set1_epi8(16));
      }
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,
                                              _mm512_loadu_si512(x + 64 * j));
      __m512& acc = (j & 1) ? acc1 : acc0;
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), Spread(prod, pick[j]), acc);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), acc_min));
}

// Q6_K (210-byte super-blocks): x = d * sc_c * (q - 32) per chunk c of 16, q in 0..63 from
// four low bits (ql) and two high bits (qh). Each half of 128 elements uses 64 bytes of ql
// and 32 of qh: elements 0-31 are ql[0..31] & 15 with qh bits 0-1, 32-63 ql[32..63] & 15
// with bits 2-3, 64-95 ql[0..31] >> 4 with bits 4-5, 96-127 ql[32..63] >> 4 with bits 6-7.
// The -32 is taken out of the integer dot as 32 * sum(x), from a second vpdpbusd.
CTX_AVX512 float DotRowQ6K(const uint8_t* row, int64_t nb, const int8_t* xq, const float* ds) {
  const __m512i low4 = _mm512_set1_epi8(0x0f), low2 = _mm512_set1_epi8(0x03);
  const __m512i c32 = _mm512_set1_epi8(32);
  // d_x of the activation block under each chunk: chunk c is in block c / 2.
  const __m512i block_of_chunk =
      _mm512_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
  // Lanes 4i..4i+3 of a 64-element group's dot are chunk 4g + i.
  const __m512i pick[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
      _mm512_setr_epi32(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11),
      _mm512_setr_epi32(12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
  const __m512i shift_lo = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
  const __m512i shift_hi = _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* p = row + sb * 210;
    const float d = _cvtsh_ss(LoadU16(p + 208));
    const __m512 sc = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192))));
    const __m512 dx = Spread(_mm512_loadu_ps(ds + 16 * sb), block_of_chunk);
    const __m512 chunk_scale = _mm512_mul_ps(_mm512_mul_ps(sc, dx), _mm512_set1_ps(d));
    const int8_t* x = xq + sb * 256;
    for (int h = 0; h < 2; ++h) {
      const __m512i ql = _mm512_loadu_si512(p + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h)));
      // The two high bits of each group, moved to bits 4-5.
      const __m512i h_lo = _mm512_and_si512(_mm512_srlv_epi64(qh, shift_lo), low2);
      const __m512i h_hi = _mm512_and_si512(_mm512_srlv_epi64(qh, shift_hi), low2);
      const __m512i g[2] = {
          _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_slli_epi16(h_lo, 4)),
          _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                          _mm512_slli_epi16(h_hi, 4))};
      for (int k = 0; k < 2; ++k) {
        const int grp = 2 * h + k;
        const __m512i xv = _mm512_loadu_si512(x + 64 * grp);
        const __m512i dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), g[k], xv),
                                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, xv));
        __m512& acc = k ? acc1 : acc0;
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), Spread(chunk_scale, pick[grp]), acc);
      }
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

using RowDotFn = float (*)(const uint8_t* row, int64_t nb, const int8_t* xq, const float* ds);

constexpr int64_t kPrefetchRows = 4;

template <RowDotFn Dot>
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
    for (int64_t t = 0; t < n_tok; ++t) y[t * ldy + r] = Dot(row, nb, acts[t].qs, acts[t].ds);
  }
}

// Element formats of unquantized weights: fp32, fp16 bits, bf16 bits.
enum class FKind { kF32, kF16, kBF16 };

// 16 weights from element i of a[] as fp32 (exact for all three formats), all or the m ones.
template <FKind F>
CTX_AVX512 inline __m512 LoadW(const void* a, int64_t i, __mmask16 m = 0xffff) {
  if constexpr (F == FKind::kF32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(a) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a) + i);
    if constexpr (F == FKind::kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <FKind F>
CTX_AVX512 float DotFloat(const void* a, const float* b, int64_t n) {
  // Four accumulators hide the FMA latency (4 cycles) behind independent chains.
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(LoadW<F>(a, i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(LoadW<F>(a, i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(LoadW<F>(a, i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(LoadW<F>(a, i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(LoadW<F>(a, i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(LoadW<F>(a, i, m), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

CTX_AVX512 float DotF32(const float* a, const float* b, int64_t n) {
  return DotFloat<FKind::kF32>(a, b, n);
}

template <FKind F>
CTX_AVX512 void FloatDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                         const float* x, int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < n_tok; ++t) {
      y[t * ldy + r] = DotFloat<F>(w + r * row_bytes, x + t * n_in, n_in);
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

// Q5_0 / Q5_1: the fifth bit of element j is bit j of qh (elements 0-15 in the low half).
template <bool kMin>
CTX_AVX512 void DequantQ5(const uint8_t* src, float* dst, int64_t n) {
  constexpr int kB = kMin ? 24 : 22, kQh = kMin ? 4 : 2;
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (int64_t b = 0; b < n / 32; ++b, src += kB, dst += 32) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(LoadU16(src)));
    uint32_t qh;
    std::memcpy(&qh, src + kQh, 4);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kQh + 4));
    __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, low4));
    __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4));
    lo = _mm512_mask_add_epi32(lo, static_cast<__mmask16>(qh), lo, sixteen);
    hi = _mm512_mask_add_epi32(hi, static_cast<__mmask16>(qh >> 16), hi, sixteen);
    if constexpr (kMin) {
      const __m512 m = _mm512_set1_ps(_cvtsh_ss(LoadU16(src + 2)));
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m));
      _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m));
    } else {
      _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, sixteen)), d));
      _mm512_storeu_ps(dst + 16,
                       _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, sixteen)), d));
    }
  }
}

// Q4_K / Q5_K: y = (d * sc) * q - dmin * m per sub-block of 32, as DequantizeQ4_K/Q5_K.
template <bool kQ5>
CTX_AVX512 void DequantQ45K(const uint8_t* src, float* dst, int64_t n) {
  constexpr int kB = kQ5 ? 176 : 144, kQs = kQ5 ? 48 : 16;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (int64_t sb = 0; sb < n / 256; ++sb, src += kB) {
    const float d = _cvtsh_ss(LoadU16(src)), dmin = _cvtsh_ss(LoadU16(src + 2));
    alignas(16) uint8_t scm[16];  // {sc0, m0, ..., sc7, m7}
    _mm_store_si128(reinterpret_cast<__m128i*>(scm), ScalesMinsK4(src + 4));
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kQ5) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16));
    for (int s = 0; s < 8; ++s, dst += 32) {
      const __m256i q =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + kQs + 32 * (s / 2)));
      __m256i v = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(q, 4) : q, low4);
      if constexpr (kQ5) {
        v = _mm256_mask_add_epi8(v, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << s)), v,
                                 _mm256_set1_epi8(16));
      }
      const __m512 ds = _mm512_set1_ps(d * static_cast<float>(scm[2 * s]));
      const __m512 ms = _mm512_set1_ps(dmin * static_cast<float>(scm[2 * s + 1]));
      const __m512 v0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v)));
      const __m512 v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1)));
      _mm512_storeu_ps(dst, _mm512_sub_ps(_mm512_mul_ps(ds, v0), ms));
      _mm512_storeu_ps(dst + 16, _mm512_sub_ps(_mm512_mul_ps(ds, v1), ms));
    }
  }
}

// Q6_K: y = (d * sc) * (q - 32) per chunk of 16, as DequantizeQ6_K.
CTX_AVX512 void DequantQ6K(const uint8_t* src, float* dst, int64_t n) {
  const __m128i low4 = _mm_set1_epi8(0x0f), low2 = _mm_set1_epi8(0x03);
  const __m512i c32 = _mm512_set1_epi32(32);
  for (int64_t sb = 0; sb < n / 256; ++sb, src += 210) {
    const float d = _cvtsh_ss(LoadU16(src + 208));
    const auto* sc = reinterpret_cast<const int8_t*>(src + 192);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = src + 64 * h;
      const uint8_t* qh = src + 128 + 32 * h;
      // Chunk c (16 elements) of the half: quarter c / 2 (elements 32 * (c / 2) ...), bytes
      // 16 * (c % 2) of ql / qh within that quarter's 32.
      for (int c = 0; c < 8; ++c, dst += 16) {
        const int quarter = c / 2, off = 16 * (c % 2);
        const __m128i l = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(ql + off + (quarter & 1 ? 32 : 0)));
        const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + off));
        const __m128i lo = quarter < 2 ? _mm_and_si128(l, low4)
                                       : _mm_and_si128(_mm_srli_epi16(l, 4), low4);
        const __m128i hi = _mm_and_si128(_mm_srl_epi16(hb, _mm_cvtsi32_si128(2 * quarter)), low2);
        const __m512i q = _mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_or_si128(lo, _mm_slli_epi16(hi, 4))), c32);
        const __m512 scale = _mm512_set1_ps(d * static_cast<float>(sc[8 * h + c]));
        _mm512_storeu_ps(dst, _mm512_mul_ps(scale, _mm512_cvtepi32_ps(q)));
      }
    }
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

// Exact: bf16 is the top half of an fp32.
CTX_AVX512 void DequantBF16(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, LoadW<FKind::kBF16>(src, i, m));
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  static const KernelTable table = {
      .name = "avx512-vnni",
      .quantize_acts = &QuantizeActs,
      .q4_0 = &QuantDot<&DotRow<QKind::kQ4_0>>,
      .q4_1 = &QuantDot<&DotRow<QKind::kQ4_1>>,
      .q5_0 = &QuantDot<&DotRow<QKind::kQ5_0>>,
      .q5_1 = &QuantDot<&DotRow<QKind::kQ5_1>>,
      .q8_0 = &QuantDot<&DotRow<QKind::kQ8_0>>,
      .q4_k = &QuantDot<&DotRowQ45K<false>>,
      .q5_k = &QuantDot<&DotRowQ45K<true>>,
      .q6_k = &QuantDot<&DotRowQ6K>,
      .f32 = &FloatDot<FKind::kF32>,
      .f16 = &FloatDot<FKind::kF16>,
      .bf16 = &FloatDot<FKind::kBF16>,
      .dot_f32 = &DotF32,
      .dequant_q4_0 = &DequantQ4_0,
      .dequant_q4_1 = &DequantQ4_1,
      .dequant_q5_0 = &DequantQ5<false>,
      .dequant_q5_1 = &DequantQ5<true>,
      .dequant_q8_0 = &DequantQ8_0,
      .dequant_q4_k = &DequantQ45K<false>,
      .dequant_q5_k = &DequantQ45K<true>,
      .dequant_q6_k = &DequantQ6K,
      .dequant_f16 = &DequantF16,
      .dequant_bf16 = &DequantBF16,
  };
  return table;
}

}  // namespace ctxcache::matmul_internal
