// AVX512-BF16 GEMM for MatMul's prefill path on CPUs without AMX (see matmul_internal.h), and
// the bf16 conversion and B-packing it shares with the AMX GEMM (matmul_amx.cc).
//
// VDPBF16PS multiplies 32 bf16 pairs and accumulates 16 fp32 sums per instruction: twice the
// multiply-adds of an fp32 FMA per instruction, and what OpenBLAS sgemm cannot use (Debian's
// OpenBLAS has no bf16 GEMM and runs its Haswell AVX2 kernels on AMD Zen). The price is the
// AMX path's: both operands rounded to bf16 (relative 2^-9 each), fp32 accumulation.
//
// Blocking: 32 weight rows are dequantized, rounded and packed once (the AMX B-tile layout:
// per K-pair, the bf16 pair of each of 16 rows as one 512-bit vector), then swept against all
// tokens kMr at a time. The micro-kernel holds kMr x 32 outputs in 2 * kMr zmm accumulators;
// per K-pair it loads two B vectors and broadcasts one bf16 pair per token.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/cpu/matmul_internal.h"
#include "engine/cpu/quant.h"

#pragma GCC diagnostic ignored "-Wuninitialized"  // see matmul_avx512.cc
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define CTX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))

namespace ctxcache::matmul_internal {
namespace {

// Tokens per micro-kernel call: 2 * 12 accumulators + 2 B vectors + a broadcast fit the 32
// zmm registers; fewer tokens would reload B more often per multiply-add.
constexpr int kMr = 12;

CTX_BF16 inline __m512bh AsBh(__m512i v) { return reinterpret_cast<const __m512bh&>(v); }

// c[m][0..31] = sum over K of a[m] * (32 packed weight rows), m < kMr. a: bf16 rows with
// stride lda (elements); b: kc_n blocks of [2 halves][16 pairs][16 rows] u32.
CTX_BF16 void MicroKernel(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t kc_n, float* c,
                          int64_t ldc, int64_t nr) {
  __m512 acc[kMr][2];
#pragma GCC unroll 12
  for (int m = 0; m < kMr; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t kc = 0; kc < kc_n; ++kc, b += 512) {
    const uint16_t* ak = a + kc * 32;
    for (int p = 0; p < 16; ++p) {
      const __m512bh b0 = AsBh(_mm512_loadu_si512(b + p * 16));
      const __m512bh b1 = AsBh(_mm512_loadu_si512(b + 256 + p * 16));
#pragma GCC unroll 12
      for (int m = 0; m < kMr; ++m) {
        uint32_t pair;
        std::memcpy(&pair, ak + m * lda + 2 * p, 4);
        const __m512bh av = AsBh(_mm512_set1_epi32(static_cast<int>(pair)));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], av, b0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], av, b1);
      }
    }
  }
  const __mmask16 lo = nr >= 16 ? 0xffff : static_cast<__mmask16>((1u << nr) - 1);
  const __mmask16 hi = nr >= 32   ? 0xffff
                       : nr <= 16 ? 0
                                  : static_cast<__mmask16>((1u << (nr - 16)) - 1);
#pragma GCC unroll 12
  for (int m = 0; m < kMr; ++m) {
    _mm512_mask_storeu_ps(c + m * ldc, lo, acc[m][0]);
    _mm512_mask_storeu_ps(c + m * ldc + 16, hi, acc[m][1]);
  }
}

// One B tile from 16 fp32 rows (w[n * k + i], n < 16, i < 32): tile row p holds, for each
// row n, the bf16 pair (2p, 2p + 1) as a u32. Each row's 16 pairs as a u32 vector, then a 16x16
// transpose of u32 in registers (the scalar transpose was ~40% of the packing time).
CTX_BF16 void PackBTile(const float* w, int64_t k, uint32_t* tile) {
  __m512i r[16], t[16];
  for (int n = 0; n < 16; ++n) {
    const __m512bh v =
        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(w + n * k + 16), _mm512_loadu_ps(w + n * k));
    r[n] = reinterpret_cast<const __m512i&>(v);
  }
  // After these two stages r[4g + c], 128-bit lane L, holds rows 4g..4g+3 of column 4L + c.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Gather lane L of r[c], r[4 + c], r[8 + c], r[12 + c] into column 4L + c.
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);      // lanes 0, 2
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);  // lanes 1, 3
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);            // column c
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);   // column 4 + c
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);        // column 8 + c
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);  // column 12 + c
  }
  for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * 16, r[p]);
}

}  // namespace

CTX_BF16 void ToBf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, reinterpret_cast<const __m512i&>(v));
  }
}

void PackBPanel(const WeightMatrix& w, int64_t n0, int64_t nr, DequantFn dequant,
                std::vector<float>* wf, std::vector<uint32_t>* bp) {
  const int64_t k = w.n_in, kc_n = w.n_in / 32;
  if (static_cast<int64_t>(wf->size()) < 32 * k) wf->resize(32 * k);
  if (static_cast<int64_t>(bp->size()) < 16 * k) bp->resize(16 * k);
  for (int64_t n = 0; n < 32; ++n) {
    float* dst = wf->data() + n * k;
    if (n >= nr) {
      std::fill(dst, dst + k, 0.0f);  // rows past the end contribute zeros
    } else if (dequant) {
      dequant(w.data + (n0 + n) * w.row_bytes, dst, k);
    } else {
      DequantizeRow(w.type, w.data + (n0 + n) * w.row_bytes, dst, k).IgnoreError();
    }
  }
  for (int64_t kc = 0; kc < kc_n; ++kc) {
    for (int half = 0; half < 2; ++half) {
      PackBTile(wf->data() + half * 16 * k + kc * 32, k, bp->data() + (kc * 2 + half) * 256);
    }
  }
}

int64_t Bf16PaddedRows(int64_t n_rows) { return (n_rows + kMr - 1) / kMr * kMr; }

CTX_BF16 void ConvertActsToBf16Rows(const float* x, int64_t n_tok, int64_t n_in, uint16_t* xb,
                                    int64_t m_pad) {
  for (int64_t t = 0; t < n_tok; ++t) ToBf16(x + t * n_in, xb + t * n_in, n_in);
  std::memset(xb + n_tok * n_in, 0, (m_pad - n_tok) * n_in * sizeof(uint16_t));
}

CTX_BF16 void Bf16PanelProduct(const uint16_t* a, int64_t lda, int64_t n_rows, const uint32_t* b,
                               int64_t kc_n, float* c, int64_t ldc, int64_t nr) {
  alignas(64) float cbuf[kMr][32];  // the last, partial group of rows
  for (int64_t m0 = 0; m0 < n_rows; m0 += kMr) {
    if (m0 + kMr <= n_rows) {
      MicroKernel(a + m0 * lda, lda, b, kc_n, c + m0 * ldc, ldc, nr);
    } else {
      MicroKernel(a + m0 * lda, lda, b, kc_n, &cbuf[0][0], 32, nr);
      for (int64_t m = 0; m < n_rows - m0; ++m) {
        std::memcpy(c + (m0 + m) * ldc, cbuf[m], nr * sizeof(float));
      }
    }
  }
}

void Bf16GemmRows(const WeightMatrix& w, const uint16_t* xb, int64_t n_tok, float* y, int64_t r0,
                  int64_t r1, DequantFn dequant) {
  thread_local std::vector<float> wf;     // [32][n_in] fp32 weight rows
  thread_local std::vector<uint32_t> bp;  // [n_in/32][2][16 pairs][16 rows] packed
  for (int64_t n0 = r0; n0 < r1; n0 += 32) {
    const int64_t nr = std::min<int64_t>(32, r1 - n0);
    PackBPanel(w, n0, nr, dequant, &wf, &bp);
    Bf16PanelProduct(xb, w.n_in, n_tok, bp.data(), w.n_in / 32, y + n0, w.n_out, nr);
  }
}

}  // namespace ctxcache::matmul_internal
