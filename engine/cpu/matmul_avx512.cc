// AVX-512 kernels for MatVec/MatMul (see matmul_internal.h): int8 VNNI dot products of every
// quantized weight type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in blocks of 32; Q4_K, Q5_K, Q6_K in
// super-blocks of 256) with int8-quantized activations, for one token or a tile of a few
// (see "Token tiles"), fp32 dots for F32/F16/BF16 weights, and exact vectorized dequantizers
// for GEMM panels. Every function is compiled for AVX-512 through a target attribute and only
// called after runtime detection (matmul.cc).
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics build their "don't care" inputs with _mm512_undefined_*(), a
// self-initialized variable that -Wuninitialized reports once inlined into a function with a
// target("avx512f") attribute (not under -mavx512f). Those values are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>
#include <vector>

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
// Weight of the per-block offset term (lanes 1/3 of the scale vector, see DotTwoBlocks):
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

// ---- Token tiles ----------------------------------------------------------------------
// MatVec is one token; MatMul with a few (a batched decode step) runs the same kernels on
// tiles of up to kTile tokens: a row's weights are unpacked (nibbles, fifth bits, fp16
// scales) once, per tile or per row for all tiles (QuantDot), and applied to each token of
// the tile, whose accumulators stay in registers (with 4 tokens, 8-12 of the 32 zmm, beside
// the unpacked weights and constants). Each token goes through exactly the operations, in
// the order, of a tile of one token, so batching changes no result bit (matmul_test:
// BatchedDotMatchesMatVecExactly); only the weight-side work is shared.
constexpr int kTile = 4;

// r[t] = _mm512_reduce_add_ps(v[t]) for T <= 4 vectors, bit for bit: the same pairwise sums
// (lane i with i + 8, then i + 4, i + 2, i + 1), four vectors per step instead of one.
template <int T>
CTX_AVX512 inline void ReduceAdd(const __m512* v, float* r) {
  if constexpr (T == 1) {
    r[0] = _mm512_reduce_add_ps(v[0]);
  } else {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 c = T > 2 ? v[2] : zero, d = T > 3 ? v[3] : zero;
    // 256-bit halves of each pair of vectors: [v0 lanes 0-7 + 8-15, v1 ...], [v2 ..., v3 ...].
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2)),
                                    _mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)));
    // Then 128-bit halves: 128-bit lane t holds vector t's four partial sums.
    const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)),
                                   _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)));
    const __m512 h = _mm512_add_ps(q, _mm512_permute_ps(q, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512 s = _mm512_add_ps(h, _mm512_permute_ps(h, _MM_SHUFFLE(2, 3, 0, 1)));
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, s);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) r[t] = lanes[4 * t];
  }
}

// The activations of consecutive tokens as the tile kernels read them (PrepareTiles).
struct Tile {
  const QuantizedActs* acts;  // per token
  // Per tile of kTile tokens (the last one maybe shorter), their {d, d * sum} of each pair of
  // blocks side by side, [nb / 2][T][4]; for one token, just its ds. See DotTwoBlocks.
  const float* pair_ds;
  // Q8_0 with several tokens: per token, x + 128 as unsigned bytes (see TwoBlocks), made
  // once per call rather than per token on every row.
  const uint8_t* const* xu;
  int64_t pair_floats;  // one token's share of pair_ds

  // The tokens from t0 on (t0 a multiple of kTile).
  Tile From(int64_t t0) const {
    return {acts + t0, pair_ds + t0 * pair_floats, xu ? xu + t0 : nullptr, pair_floats};
  }
};

// Two consecutive blocks of one row, unpacked for vpdpbusd: the 64 weights as bytes (Q4:
// unsigned nibbles 0..15, plus 16 for a Q5 fifth bit; Q8: signed, the activations being the
// unsigned side as x + 128, with bias = -128 * sum(w) per 4 bytes starting each dot so that
// it comes out as sum(w * x), exactly; zero for Q4/Q5), and the fp32 {d0, o0, d1, o1} (see
// LoadScales). alignas: outside a target("avx512f") function GCC aligns __m512i to 16 only,
// and QuantDot keeps rows of these in a std::vector, whose aligned stores need 64.
struct alignas(64) TwoBlocks {
  __m512i w;
  __m512i bias;
  __m128 scales;
};

template <QKind K>
CTX_AVX512 inline TwoBlocks UnpackTwoBlocks(const uint8_t* p0) {
  const uint8_t* p1 = p0 + kBlockBytes<K>;
  TwoBlocks wb;
  if constexpr (K == QKind::kQ8_0) {
    wb.w = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + 2))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + 2)), 1);
    wb.bias = _mm512_sub_epi32(
        _mm512_setzero_si512(),
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), wb.w));
  } else {
    // Each 16-byte qs is placed twice, then the second copy shifted: lo nibbles are
    // elements 0-15, hi nibbles 16-31, matching the activations' order.
    const __m256i q0 = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + kQsOffset<K>)));
    const __m256i q1 = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + kQsOffset<K>)));
    wb.w = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    wb.w = _mm512_and_si512(_mm512_srlv_epi64(wb.w, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
                            _mm512_set1_epi8(0x0f));
    if constexpr (kHasFifthBit<K>) {
      // Byte j of w is element j of its block: the two qh words, side by side, are the
      // mask of the bytes that get their fifth bit (+16).
      uint32_t h0, h1;
      std::memcpy(&h0, p0 + kQhOffset<K>, 4);
      std::memcpy(&h1, p1 + kQhOffset<K>, 4);
      wb.w = _mm512_mask_add_epi8(wb.w, _cvtu64_mask64(h0 | static_cast<uint64_t>(h1) << 32),
                                  wb.w, _mm512_set1_epi8(16));
    }
    wb.bias = _mm512_setzero_si512();
  }
  wb.scales = _mm_cvtph_ps(LoadScales<K>(p0, p1));
  return wb;
}

// The sums of a tile's {d0 * dx0, o0 * sx0, d1 * dx1, o1 * sx1} (see DotTwoBlocks): one
// token's fit an __m128, whose adds the lone-token kernel (MatVec) keeps.
template <int T>
struct OffsetSumsOf {
  using Type = __m512;
};
template <>
struct OffsetSumsOf<1> {
  using Type = __m128;
};
template <int T>
using OffsetSums = typename OffsetSumsOf<T>::Type;

// Blocks b and b + 1 of one row against the T tokens of a tile. The 64 weight bytes and each
// token's 64 int8 activations go through one vpdpbusd: lanes 0-7 hold block b's partial sums,
// lanes 8-15 block b + 1's, scaled by d_w * d_x per half before accumulating in fp32 into
// acc[t]. One multiply of the tile's pair_ds (token t in lanes 4t..4t+3) gives every token's
// {d0 * dx0, o0 * sx0, d1 * dx1, o1 * sx1}; *acc_offset sums them (lanes 4t + 1 and 4t + 3
// are token t's offset terms).
template <QKind K, int T>
CTX_AVX512 inline void DotTwoBlocks(const TwoBlocks& wb, int64_t b, const Tile& tile,
                                    __m512* acc, OffsetSums<T>* acc_offset) {
  __m512 sc;
  if constexpr (T == 1) {
    const __m128 sc1 = _mm_mul_ps(wb.scales, _mm_loadu_ps(tile.pair_ds + 2 * b));
    sc = _mm512_castps128_ps512(sc1);  // lanes 4-15 are never read
    if constexpr (K != QKind::kQ8_0) *acc_offset = _mm_add_ps(*acc_offset, sc1);
  } else {
    sc = _mm512_mul_ps(_mm512_broadcast_f32x4(wb.scales),
                       _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << 4 * T) - 1),
                                             tile.pair_ds + 2 * T * b));
    if constexpr (K != QKind::kQ8_0) *acc_offset = _mm512_add_ps(*acc_offset, sc);
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    __m512i dot;
    if constexpr (K == QKind::kQ8_0) {
      // A lone token adds its 128 here, a tile's were added once (Tile::xu).
      const __m512i xu =
          T == 1 ? _mm512_xor_si512(_mm512_loadu_si512(tile.acts[0].qs + b * kActBlock),
                                    _mm512_set1_epi8(-128))
                 : _mm512_loadu_si512(tile.xu[t] + b * kActBlock);
      dot = _mm512_dpbusd_epi32(wb.bias, xu, wb.w);
    } else {
      dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wb.w,
                                _mm512_loadu_si512(tile.acts[t].qs + b * kActBlock));
    }
    const int lo = 4 * t, hi = 4 * t + 2;
    const __m512i halves =
        _mm512_setr_epi32(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi);
    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(halves, sc), acc[t]);
  }
}

// out[t] = dot(row, x_t) for one weight row of nb blocks and the T tokens of tile. Two
// blocks per step (DotTwoBlocks), with two accumulators per token because one FMA chain
// (4-cycle latency) was the limit in L2 for a single token. kUnpacked: read the row's pairs
// of blocks from unpacked (BlockTile::Unpack) instead of unpacking them here.
template <QKind K, int T, bool kUnpacked>
CTX_AVX512 void DotRows(const uint8_t* row, int64_t nb, const TwoBlocks* unpacked,
                        const Tile& tile, float* out) {
  __m512 acc[T], acc2[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
  OffsetSums<T> acc_offset{}, acc_offset2{};
  int64_t b = 0;
  auto pair = [&](int64_t blk) CTX_AVX512 {
    if constexpr (kUnpacked) return unpacked[blk / 2];
    return UnpackTwoBlocks<K>(row + blk * kBlockBytes<K>);
  };
  for (; b + 4 <= nb; b += 4) {
    DotTwoBlocks<K, T>(pair(b), b, tile, acc, &acc_offset);
    DotTwoBlocks<K, T>(pair(b + 2), b + 2, tile, acc2, &acc_offset2);
  }
  if (b + 2 <= nb) {
    DotTwoBlocks<K, T>(pair(b), b, tile, acc, &acc_offset);
    b += 2;
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc[t] = _mm512_add_ps(acc[t], acc2[t]);
  float totals[T];
  ReduceAdd<T>(acc, totals);
  alignas(64) float o[16];
  if constexpr (T == 1) {
    _mm_store_ps(o, _mm_add_ps(acc_offset, acc_offset2));
  } else {
    _mm512_store_ps(o, _mm512_add_ps(acc_offset, acc_offset2));
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    const float* ds = tile.acts[t].ds;
    float total = totals[t];
    float offset = 0.0f;
    if constexpr (K != QKind::kQ8_0) offset = o[4 * t + 1] + o[4 * t + 3];
    if (b < nb) {  // odd block count (e.g. n_in = 288)
      const uint8_t* p = row + b * kBlockBytes<K>;
      const float d = _cvtsh_ss(LoadU16(p));
      const int8_t* xq = tile.acts[t].qs + b * kActBlock;
      total += d * ds[2 * b] * static_cast<float>(ScalarBlockDot<K>(p, xq));
      if constexpr (kHasMin<K>) {
        offset += _cvtsh_ss(LoadU16(p + 2)) * ds[2 * b + 1];
      } else if constexpr (K != QKind::kQ8_0) {
        offset += d * ds[2 * b + 1];
      }
    }
    out[t] = total + kOffsetFactor<K> * offset;
  }
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
// fifth bit of sub-block s is bit s of qh[l] for element l. Unpacked: the codes of sub-blocks
// 2j and 2j + 1 as the 64 bytes w[j], and coef (lane 2s: d * sc_s; lane 2s + 1: -dmin * m_s).
// alignas: see TwoBlocks.
struct alignas(64) SuperBlockQ45K {
  __m512i w[4];
  __m512 coef;
};

template <bool kQ5>
CTX_AVX512 inline SuperBlockQ45K UnpackQ45K(const uint8_t* p) {
  constexpr int kQs = kQ5 ? 48 : 16;
  SuperBlockQ45K u;
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(LoadU16(p)));
  const __m512 neg_dmin = _mm512_set1_ps(-_cvtsh_ss(LoadU16(p + 2)));
  u.coef = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(ScalesMinsK4(p + 4))),
                         _mm512_mask_blend_ps(0xAAAA, d, neg_dmin));
  __m256i qh = _mm256_setzero_si256();
  if constexpr (kQ5) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  for (int j = 0; j < 4; ++j) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kQs + 32 * j));
    u.w[j] = _mm512_and_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1),
        _mm512_set1_epi8(0x0f));
    if constexpr (kQ5) {
      const __mmask32 h_lo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << (2 * j)));
      const __mmask32 h_hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << (2 * j + 1)));
      u.w[j] = _mm512_mask_add_epi8(u.w[j], _cvtu64_mask64(h_lo | uint64_t{h_hi} << 32), u.w[j],
                                    _mm512_set1_epi8(16));
    }
  }
  return u;
}

// out[t] = dot(row, x_t) for the T tokens of acts (nb counts activation blocks of 32), each
// super-block unpacked once for all of them, here or, with kUnpacked, beforehand (unpacked).
template <bool kQ5, int T, bool kUnpacked>
CTX_AVX512 void DotRowsQ45K(const uint8_t* row, int64_t nb, const SuperBlockQ45K* unpacked,
                            const QuantizedActs* acts, float* out) {
  constexpr size_t kB = kQ5 ? 176 : 144;
  // Lanes 0-7 take sub-block 2j's scale (lane 4j of `prod` below), lanes 8-15 sub-block 2j+1's.
  const __m512i pick[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
      _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
      _mm512_setr_epi32(8, 8, 8, 8, 8, 8, 8, 8, 10, 10, 10, 10, 10, 10, 10, 10),
      _mm512_setr_epi32(12, 12, 12, 12, 12, 12, 12, 12, 14, 14, 14, 14, 14, 14, 14, 14)};
  __m512 acc0[T], acc1[T], acc_min[T], prod[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = acc_min[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const SuperBlockQ45K u = kUnpacked ? unpacked[sb] : UnpackQ45K<kQ5>(row + sb * kB);
    // Lane 2s: d * sc_s * d_x(s); lane 2s + 1: -dmin * m_s * d_x(s) * sum(x of s).
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      prod[t] = _mm512_mul_ps(u.coef, _mm512_loadu_ps(acts[t].ds + 16 * sb));
      acc_min[t] = _mm512_mask_add_ps(acc_min[t], 0xAAAA, acc_min[t], prod[t]);
    }
    for (int j = 0; j < 4; ++j) {
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const __m512i dot = _mm512_dpbusd_epi32(
            _mm512_setzero_si512(), u.w[j], _mm512_loadu_si512(acts[t].qs + sb * 256 + 64 * j));
        __m512& acc = (j & 1) ? acc1[t] : acc0[t];
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), Spread(prod[t], pick[j]), acc);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc0[t] = _mm512_add_ps(_mm512_add_ps(acc0[t], acc1[t]), acc_min[t]);
  ReduceAdd<T>(acc0, out);
}

// Q6_K (210-byte super-blocks): x = d * sc_c * (q - 32) per chunk c of 16, q in 0..63 from
// four low bits (ql) and two high bits (qh). Each half of 128 elements uses 64 bytes of ql
// and 32 of qh: elements 0-31 are ql[0..31] & 15 with qh bits 0-1, 32-63 ql[32..63] & 15
// with bits 2-3, 64-95 ql[0..31] >> 4 with bits 4-5, 96-127 ql[32..63] >> 4 with bits 6-7.
// Unpacked: q of elements 64g..64g + 63 as the bytes g[g], the 16 chunk scales sc as fp32,
// and d in every lane. alignas: see TwoBlocks.
struct alignas(64) SuperBlockQ6K {
  __m512i g[4];
  __m512 sc;
  __m512 d;
};

CTX_AVX512 inline SuperBlockQ6K UnpackQ6K(const uint8_t* p) {
  const __m512i low4 = _mm512_set1_epi8(0x0f), low2 = _mm512_set1_epi8(0x03);
  const __m512i shift_lo = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
  const __m512i shift_hi = _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6);
  SuperBlockQ6K u;
  u.d = _mm512_set1_ps(_cvtsh_ss(LoadU16(p + 208)));
  u.sc = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192))));
  for (int h = 0; h < 2; ++h) {
    const __m512i ql = _mm512_loadu_si512(p + 64 * h);
    const __m512i qh = _mm512_broadcast_i64x4(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h)));
    // The two high bits of each group, moved to bits 4-5.
    const __m512i h_lo = _mm512_and_si512(_mm512_srlv_epi64(qh, shift_lo), low2);
    const __m512i h_hi = _mm512_and_si512(_mm512_srlv_epi64(qh, shift_hi), low2);
    u.g[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_slli_epi16(h_lo, 4));
    u.g[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                                     _mm512_slli_epi16(h_hi, 4));
  }
  return u;
}

// out[t] = dot(row, x_t) for the T tokens of acts, each super-block unpacked once for all of
// them, here or, with kUnpacked, beforehand (unpacked). The -32 is taken out of the integer
// dot as 32 * sum(x), from a second vpdpbusd.
template <int T, bool kUnpacked>
CTX_AVX512 void DotRowsQ6K(const uint8_t* row, int64_t nb, const SuperBlockQ6K* unpacked,
                           const QuantizedActs* acts, float* out) {
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
  __m512 acc0[T], acc1[T], chunk_scale[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const SuperBlockQ6K u = kUnpacked ? unpacked[sb] : UnpackQ6K(row + sb * 210);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m512 dx = Spread(_mm512_loadu_ps(acts[t].ds + 16 * sb), block_of_chunk);
      chunk_scale[t] = _mm512_mul_ps(_mm512_mul_ps(u.sc, dx), u.d);
    }
    for (int grp = 0; grp < 4; ++grp) {
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(acts[t].qs + sb * 256 + 64 * grp);
        const __m512i dot =
            _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u.g[grp], xv),
                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, xv));
        __m512& acc = (grp & 1) ? acc1[t] : acc0[t];
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), Spread(chunk_scale[t], pick[grp]), acc);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc0[t] = _mm512_add_ps(acc0[t], acc1[t]);
  ReduceAdd<T>(acc0, out);
}

// The tile kernels, by format, as QuantDot takes them. Dot<T, kUnpacked>(row, nb, unpacked,
// tile, out) sets out[t] = dot(row, x_t) for the first T tokens of tile. A format that can
// unpack a row once for all its tiles has Unpack(row, nb, buffer), filling UnpackedCount(nb)
// Unpacked items that Dot<T, true> reads instead of the row. kBiased: Dot reads tile.xu.
template <QKind K>
struct BlockTile {
  using Unpacked = TwoBlocks;
  static constexpr bool kBiased = K == QKind::kQ8_0;
  static int64_t UnpackedCount(int64_t nb) { return nb / 2; }
  CTX_AVX512 static void Unpack(const uint8_t* row, int64_t nb, TwoBlocks* out) {
    for (int64_t pair = 0; pair < nb / 2; ++pair) {
      out[pair] = UnpackTwoBlocks<K>(row + 2 * pair * kBlockBytes<K>);
    }
  }
  template <int T, bool kUnpacked>
  CTX_AVX512 static void Dot(const uint8_t* row, int64_t nb, const TwoBlocks* unpacked,
                             const Tile& tile, float* out) {
    DotRows<K, T, kUnpacked>(row, nb, unpacked, tile, out);
  }
};
template <bool kQ5>
struct Q45KTile {
  static constexpr size_t kB = kQ5 ? 176 : 144;
  using Unpacked = SuperBlockQ45K;
  static constexpr bool kBiased = false;
  static int64_t UnpackedCount(int64_t nb) { return nb / 8; }
  CTX_AVX512 static void Unpack(const uint8_t* row, int64_t nb, SuperBlockQ45K* out) {
    for (int64_t sb = 0; sb < nb / 8; ++sb) out[sb] = UnpackQ45K<kQ5>(row + sb * kB);
  }
  template <int T, bool kUnpacked>
  CTX_AVX512 static void Dot(const uint8_t* row, int64_t nb, const SuperBlockQ45K* unpacked,
                             const Tile& tile, float* out) {
    DotRowsQ45K<kQ5, T, kUnpacked>(row, nb, unpacked, tile.acts, out);
  }
};
struct Q6KTile {
  using Unpacked = SuperBlockQ6K;
  static constexpr bool kBiased = false;
  static int64_t UnpackedCount(int64_t nb) { return nb / 8; }
  CTX_AVX512 static void Unpack(const uint8_t* row, int64_t nb, SuperBlockQ6K* out) {
    for (int64_t sb = 0; sb < nb / 8; ++sb) out[sb] = UnpackQ6K(row + sb * 210);
  }
  template <int T, bool kUnpacked>
  CTX_AVX512 static void Dot(const uint8_t* row, int64_t nb, const SuperBlockQ6K* unpacked,
                             const Tile& tile, float* out) {
    DotRowsQ6K<T, kUnpacked>(row, nb, unpacked, tile.acts, out);
  }
};

// A cache line; a std::vector of them is 64-byte aligned scratch.
struct alignas(64) Line {
  char bytes[64];
};

// Per-thread scratch for PrepareTiles.
struct TileScratch {
  std::vector<Line> lines;  // all grow, never shrink: no per-call allocation
  std::vector<QuantizedActs> acts;
  std::vector<const uint8_t*> xu;
};

// The activations of n_tok > 1 tokens laid out for the tile kernels (see Tile), in 64-byte
// aligned scratch: each token's qs and ds copied (MatMulBatchedDot's buffers come from malloc,
// 16-byte aligned, so every 64-byte vpdpbusd operand would straddle two cache lines), the
// pair scales regrouped by tile, and with biased, x + 128 (Tile::xu).
CTX_AVX512 Tile PrepareTiles(const QuantizedActs* acts, int64_t n_tok, int64_t n_in, bool biased,
                             TileScratch* s) {
  const int64_t nb = n_in / kActBlock, pair_floats = nb / 2 * 4;
  const int64_t qs_lines = (n_in + 63) / 64, ds_lines = (nb * 2 + 15) / 16;
  const int64_t per_token = (biased ? 2 : 1) * qs_lines + ds_lines;
  const int64_t need = n_tok * per_token + (n_tok * pair_floats + 15) / 16;
  if (static_cast<int64_t>(s->lines.size()) < need) s->lines.resize(need);
  if (static_cast<int64_t>(s->acts.size()) < n_tok) s->acts.resize(n_tok);
  if (static_cast<int64_t>(s->xu.size()) < n_tok) s->xu.resize(n_tok);
  Line* line = s->lines.data();
  for (int64_t t = 0; t < n_tok; ++t, line += per_token) {
    auto* qs = reinterpret_cast<int8_t*>(line);
    auto* ds = reinterpret_cast<float*>(line + qs_lines);
    std::memcpy(qs, acts[t].qs, n_in);
    std::memcpy(ds, acts[t].ds, nb * 2 * sizeof(float));
    s->acts[t] = QuantizedActs{qs, ds};
    if (biased) {
      auto* xu = reinterpret_cast<uint8_t*>(line + qs_lines + ds_lines);
      for (int64_t i = 0; i < n_in; i += kActBlock) {
        const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(qs + i));
        _mm256_store_si256(reinterpret_cast<__m256i*>(xu + i),
                           _mm256_xor_si256(x, _mm256_set1_epi8(-128)));
      }
      s->xu[t] = xu;
    }
  }
  auto* pair_ds = reinterpret_cast<float*>(line);
  for (int64_t t0 = 0; t0 < n_tok; t0 += kTile) {
    const int64_t T = std::min<int64_t>(kTile, n_tok - t0);
    float* dst = pair_ds + t0 * pair_floats;
    for (int64_t pair = 0; pair < nb / 2; ++pair) {
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(dst + (pair * T + t) * 4, acts[t0 + t].ds + 4 * pair, 4 * sizeof(float));
      }
    }
  }
  return Tile{s->acts.data(), pair_ds, biased ? s->xu.data() : nullptr, pair_floats};
}

// Row r against the first T tokens of tile, which are tokens t0.. of the call.
template <class Kernel, int T, bool kUnpacked>
CTX_AVX512 inline void RowTile(const uint8_t* row, int64_t nb,
                               const typename Kernel::Unpacked* unpacked, const Tile& tile,
                               int64_t t0, float* y, int64_t ldy, int64_t r) {
  float out[T];
  Kernel::template Dot<T, kUnpacked>(row, nb, unpacked, tile, out);
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r] = out[t];
}

constexpr int64_t kPrefetchRows = 4;

// Prefetches row r + kPrefetchRows (~1.5 KB for 576-wide Q4_1): the DRAM latency per row is
// longer than the kernel's time per row, and rows are too short for the hardware prefetcher
// to ramp up within one.
CTX_AVX512 inline void PrefetchAhead(const uint8_t* w, size_t row_bytes, int64_t r, int64_t r1) {
  if (r + kPrefetchRows < r1) {
    const uint8_t* ahead = w + (r + kPrefetchRows) * row_bytes;
    for (size_t off = 0; off < row_bytes; off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
    }
  }
}

// Rows [r0, r1) against all n_tok = T <= kTile tokens: one tile, each row unpacked as it goes.
template <class Kernel, int T>
CTX_AVX512 void OneTile(const uint8_t* w, size_t row_bytes, int64_t nb, int64_t r0, int64_t r1,
                        const Tile& tile, float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    PrefetchAhead(w, row_bytes, r, r1);
    RowTile<Kernel, T, false>(w + r * row_bytes, nb, nullptr, tile, 0, y, ldy, r);
  }
}

template <class Kernel>
CTX_AVX512 void QuantDot(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0, int64_t r1,
                         const QuantizedActs* acts, int64_t n_tok, float* y, int64_t ldy) {
  const int64_t nb = n_in / kActBlock;
  // A lone token (MatVec) reads its activations in place: its ds is already in the pair
  // layout, and the weights' DRAM reads, not split loads, bound its time.
  Tile tile{acts, acts[0].ds, nullptr, 0};
  if (n_tok > 1) {
    thread_local TileScratch scratch;
    tile = PrepareTiles(acts, n_tok, n_in, Kernel::kBiased, &scratch);
  }
  // One tile: the row loop inside the dispatch, not the other way round.
  switch (n_tok) {
    case 1: return OneTile<Kernel, 1>(w, row_bytes, nb, r0, r1, tile, y, ldy);
    case 2: return OneTile<Kernel, 2>(w, row_bytes, nb, r0, r1, tile, y, ldy);
    case 3: return OneTile<Kernel, 3>(w, row_bytes, nb, r0, r1, tile, y, ldy);
    case 4: return OneTile<Kernel, 4>(w, row_bytes, nb, r0, r1, tile, y, ldy);
    default: break;
  }
  // Several tiles: each row is unpacked once, into L1, for all of them (at 32 tokens 10-15%
  // faster than once per tile for Q4_1 576x1536, 20-40% for Q4_K/Q5_K 4864x896), and stays
  // there: one DRAM read per row.
  thread_local std::vector<typename Kernel::Unpacked> unpacked;
  if (static_cast<int64_t>(unpacked.size()) < Kernel::UnpackedCount(nb)) {
    unpacked.resize(Kernel::UnpackedCount(nb));
  }
  const typename Kernel::Unpacked* u = unpacked.data();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    PrefetchAhead(w, row_bytes, r, r1);
    Kernel::Unpack(row, nb, unpacked.data());
    int64_t t0 = 0;
    for (; t0 + kTile <= n_tok; t0 += kTile) {
      RowTile<Kernel, kTile, true>(row, nb, u, tile.From(t0), t0, y, ldy, r);
    }
    switch (n_tok - t0) {
      case 3: RowTile<Kernel, 3, true>(row, nb, u, tile.From(t0), t0, y, ldy, r); break;
      case 2: RowTile<Kernel, 2, true>(row, nb, u, tile.From(t0), t0, y, ldy, r); break;
      case 1: RowTile<Kernel, 1, true>(row, nb, u, tile.From(t0), t0, y, ldy, r); break;
      default: break;
    }
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
