// AMX-BF16 GEMM for MatMul's prefill path (see matmul_internal.h): activations and dequantized
// weights are rounded to bf16 and multiplied on the AMX tile unit with fp32 accumulation.
// Measured on this machine's one-thread OpenBLAS sgemm ceiling (~100 GFLOP/s per core), the
// tile unit is several times faster; the price is bf16 rounding of both operands (relative
// 2^-9 each), the same order as the int8 activation rounding of the decode path.
//
// Blocking: 32 weight rows (two B tiles) are dequantized, rounded and packed once, then swept
// against all tokens 32 at a time (two A tiles, four C tiles). x in bf16 (~0.6 MB for 512
// tokens of 576, pre-tiled) stays in L2 across the sweeps.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/cpu/matmul_internal.h"

#pragma GCC diagnostic ignored "-Wuninitialized"  // see matmul_avx512.cc
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define CTX_AMX                                                                 \
  __attribute__((                                                               \
      target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16," \
             "avx2,fma,f16c")))

namespace ctxcache::matmul_internal {
namespace {

// LDTILECFG's 64-byte operand: palette 1, bytes per row and rows of each of 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

// tmm0-3: C (16 tokens x 16 rows fp32); tmm4-5: A (16 tokens x 32 bf16 of K);
// tmm6-7: B (16 K-pairs x 16 rows x 2 bf16, the VNNI layout TDPBF16PS expects).
TileConfig MakeConfig() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  return c;
}

}  // namespace

CTX_AMX void ConvertActsToBf16(const float* x, int64_t n_tok, int64_t n_in, uint16_t* xb,
                               int64_t m_pad) {
  // Tiled so each A tile is 1 KiB contiguous (stride 64): measured here, 4 TDPBF16PS with
  // their tile loads take 145 ns from contiguous tiles and 231 ns with a 1152-byte row stride.
  const int64_t kc_n = n_in / 32;
  for (int64_t t = 0; t < m_pad; ++t) {
    for (int64_t kc = 0; kc < kc_n; ++kc) {
      uint16_t* dst = xb + ((t / 16) * kc_n + kc) * 512 + (t % 16) * 32;
      if (t < n_tok) {
        ToBf16(x + t * n_in + kc * 32, dst, 32);
      } else {
        std::memset(dst, 0, 32 * sizeof(uint16_t));
      }
    }
  }
}

CTX_AMX void AmxGemmRows(const WeightMatrix& w, const uint16_t* xb, int64_t n_tok, int64_t m_pad,
                         float* y, int64_t r0, int64_t r1, DequantFn dequant) {
  const int64_t kc_n = w.n_in / 32;
  thread_local std::vector<float> wf;     // [32][n_in] fp32 weight rows
  thread_local std::vector<uint32_t> bp;  // [n_in/32][2][16 pairs][16 rows] packed B tiles
  alignas(64) float cbuf[32][32];  // [tokens][rows] of one 32x32 output block

  // Static on purpose: GCC's _tile_loadconfig tells the compiler it reads only the first
  // 8 bytes, so the stores filling a stack copy may be dropped (seen: SIGILL on TILEZERO).
  static const TileConfig config = MakeConfig();
  _tile_loadconfig(&config);
  for (int64_t n0 = r0; n0 < r1; n0 += 32) {
    const int64_t nr = std::min<int64_t>(32, r1 - n0);
    PackBPanel(w, n0, nr, dequant, &wf, &bp);
    // GCC's _tile_loadd is an asm with no memory operand or clobber, so nothing stops the
    // compiler from sinking the packing stores past the tile loads that read them.
    __asm__ volatile("" ::: "memory");
    for (int64_t m0 = 0; m0 < m_pad; m0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* a0 = xb + (m0 / 16) * kc_n * 512;  // tokens m0..m0+15
      const uint16_t* a1 = a0 + kc_n * 512;              // tokens m0+16..m0+31
      for (int64_t kc = 0; kc < kc_n; ++kc) {
        _tile_loadd(4, a0 + kc * 512, 64);
        _tile_loadd(5, a1 + kc * 512, 64);
        _tile_loadd(6, bp.data() + (kc * 2) * 256, 64);
        _tile_loadd(7, bp.data() + (kc * 2 + 1) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, &cbuf[0][0], 128);
      _tile_stored(1, &cbuf[0][16], 128);
      _tile_stored(2, &cbuf[16][0], 128);
      _tile_stored(3, &cbuf[16][16], 128);
      const int64_t mr = std::min<int64_t>(32, n_tok - m0);
      for (int64_t m = 0; m < mr; ++m) {
        std::memcpy(y + (m0 + m) * w.n_out + n0, cbuf[m], nr * sizeof(float));
      }
    }
  }
  _tile_release();
}

}  // namespace ctxcache::matmul_internal
