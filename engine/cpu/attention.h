// Kernels over the KV cache (engine/kv_cache.h): fp16 <-> fp32 row conversion, and the fused
// attention of a decode step, which reads frozen int8 / int4 segments in place.
//
// Decode at long contexts is bound by reading the KV cache, so DecodeAttention reads each K/V
// row once per KV head: the `group` query heads that share it are scored together. Keys are
// split into chunks over the thread pool (so 2 threads stay balanced whatever the head
// count), each chunk keeps an online softmax (running max, sum and weighted V sum), and the
// chunks are merged with a log-sum-exp. Runtime dispatch as in matmul.h: AVX-512, AVX2 + F16C,
// or a scalar reference (CTXCACHE_CPU=avx2|scalar caps the level, cpu_features.h).
#pragma once

#include <cstdint>
#include <vector>

#include "common/thread_pool.h"
#include "engine/kv_cache.h"

namespace ctxcache {

// dst[i] = fp32 of the fp16 bits src[i] (exact).
void Fp16ToFp32Row(const uint16_t* src, float* dst, int64_t n);
// dst[i] = src[i] rounded to the nearest fp16, ties to even (as Fp32ToFp16 in common/half.h).
void Fp32ToFp16Row(const float* src, uint16_t* dst, int64_t n);

// Attention of one query token over a layer of the cache; owns its scratch, which grows to
// the largest call and is reused (nothing is allocated once it has), so keep one per Runner.
class DecodeAttention {
 public:
  // For every query head h in [0, n_heads): out[h * hd, +hd) = sum_j p_j v_j with
  // p = softmax_j(scale * q_h . k_j), over the entries j of KV head h / (n_heads / n_kv_heads)
  // of `layer` whose position is <= query_pos (causal by position, as in prefill). A head
  // that sees no entry gets zeros. q and out are [n_heads * head_dim].
  // When probs is not null, it also gets every head's attention probabilities: row h (at
  // h * probs_stride) holds p_j for the visible entries j (Recycled Attention's full step).
  void Run(const KvCache& cache, int layer, int n_heads, int32_t query_pos, const float* q,
           float scale, float* out, ThreadPool* pool, float* probs = nullptr,
           int64_t probs_stride = 0);

 private:
  struct Chunk {
    int kv_head;
    const KvSegment* segment;  // the frozen segment read, or nullptr: the fp16 rows after them
    int64_t begin, end;        // rows of that segment (or of the fp16 rows)
    int64_t first;             // the entry index (in the head) of row `begin`
  };
  std::vector<Chunk> chunks_;
  std::vector<int> first_chunk_;  // [n_kv_heads + 1]: the head's chunks in chunks_
  std::vector<int64_t> visible_;  // [n_kv_heads]: entries at positions <= query_pos
  std::vector<float> q_;          // [n_heads * hd], scaled
  std::vector<float> state_;      // per chunk: m[group], l[group], acc[group * hd]
  std::vector<std::vector<float>> tile_;  // per pool thread: the kernel's tile scratch
};

}  // namespace ctxcache
