// Kernel tables behind engine/cpu/attention.h. One table per instruction-set level, each
// defined in its own file (attention_avx512.cc, attention_avx2.cc) whose functions carry
// __attribute__((target)), so the portable baseline build still contains them and
// attention.cc picks one at run time from GetCpuFeatures().level (as matmul_internal.h does).
// Not a public interface.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "engine/kv_cache.h"

namespace ctxcache::attention_internal {

// Most keys a kernel converts to fp32 at once (the tile scratch below): AVX-512 scores 16 keys
// per step (one register of scores), AVX2 8.
constexpr int kTile = 16;

// Decode attention over keys [0, n) of one KV head (n >= 1): rows of hd fp16 values at k and
// v (hd a multiple of the table's hd_multiple), attended by `group` query rows q[r * hd],
// already multiplied by the softmax scale. Per query row r, writes the chunk's online-softmax
// state: m[r] = max_j s_rj, l[r] = sum_j exp(s_rj - m[r]) and acc[r * hd + i] =
// sum_j exp(s_rj - m[r]) v_ji, with s_rj = q_r . k_j. tile: scratch of 2 * kTile * hd floats.
// When scores is not null it also gets s_rj at scores[r * score_stride + j] (Recycled
// Attention's full step ranks keys by them).
using DecodeChunkFn = void (*)(const float* q, int group, const uint16_t* k, const uint16_t* v,
                               int64_t n, int hd, float* tile, float* m, float* l, float* acc,
                               float* scores, int64_t score_stride);
// The same over rows [begin, begin + n) of a frozen segment of any dtype (int8 / int4 are
// dequantized a tile at a time, in L1; the segment is never expanded whole).
using DecodeSegmentChunkFn = void (*)(const float* q, int group, const KvSegment& seg,
                                      int64_t begin, int64_t n, int hd, float* tile, float* m,
                                      float* l, float* acc, float* scores,
                                      int64_t score_stride);
// fp16 <-> fp32 rows (round to nearest even, as Fp32ToFp16).
using Fp16ToFp32Fn = void (*)(const uint16_t* src, float* dst, int64_t n);
using Fp32ToFp16Fn = void (*)(const float* src, uint16_t* dst, int64_t n);

struct KernelTable {
  const char* name;
  int hd_multiple;  // decode_chunk needs head_dim % hd_multiple == 0
  DecodeChunkFn decode_chunk;
  DecodeSegmentChunkFn decode_segment_chunk;
  Fp16ToFp32Fn fp16_to_fp32;
  Fp32ToFp16Fn fp32_to_fp16;
};

// Online-softmax bookkeeping shared by the kernels. ResetState empties the state of `group`
// query rows; RaiseMax moves a row's running max m to cover a tile whose scores peak at
// tile_max and returns the factor that rescales what the row has accumulated (l and acc):
// exp(old m - new m), or 0 before the row's first key.
inline void ResetState(int group, int hd, float* m, float* l, float* acc) {
  std::fill(m, m + group, -std::numeric_limits<float>::infinity());
  std::fill(l, l + group, 0.f);
  std::fill(acc, acc + int64_t{group} * hd, 0.f);
}
inline float RaiseMax(float& m, float l, float tile_max) {
  const float m_new = std::max(m, tile_max);
  const float corr = l > 0.f ? std::exp(m - m_new) : 0.f;
  m = m_new;
  return corr;
}

// The table for the current GetCpuFeatures() level (the scalar reference at kScalar).
const KernelTable& ActiveKernels();
const KernelTable& ScalarKernels();
const KernelTable& Avx512Kernels();  // needs AVX-512 F/BW/DQ/VL + F16C + FMA
const KernelTable& Avx2Kernels();    // needs AVX2 + FMA + F16C

}  // namespace ctxcache::attention_internal
