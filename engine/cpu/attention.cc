// fp16 row conversion and fused decode attention (attention.h): the scalar reference kernels,
// dispatch to the kernel table of the CPU level (attention_avx512.cc, attention_avx2.cc), and
// the split of a decode step into key chunks over the pool with a log-sum-exp merge.
#include "engine/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/cpu_features.h"
#include "common/half.h"
#include "engine/cpu/attention_internal.h"
#include "engine/cpu/ops.h"

namespace ctxcache {
namespace attention_internal {
namespace {

// Per key: s = q . k, then the online-softmax update (rescale what is accumulated when the
// running max grows). Readable rather than fast: the reference the SIMD kernels are tested
// against, and the path of CPUs without AVX2. load(j, kf, vf) puts key j's K and V in fp32.
template <class Load>
void ScalarDecode(const float* q, int group, const Load& load, int64_t n, int hd, float* tile,
                  float* m, float* l, float* acc, float* scores, int64_t score_stride) {
  float* kf = tile;
  float* vf = tile + hd;
  ResetState(group, hd, m, l, acc);
  for (int64_t j = 0; j < n; ++j) {
    load(j, kf, vf);
    for (int r = 0; r < group; ++r) {
      float s = 0.f;
      for (int i = 0; i < hd; ++i) s += q[r * hd + i] * kf[i];
      if (scores != nullptr) scores[r * score_stride + j] = s;
      float* a = acc + int64_t{r} * hd;
      if (s > m[r]) {
        const float corr = l[r] > 0.f ? std::exp(m[r] - s) : 0.f;
        for (int i = 0; i < hd; ++i) a[i] = a[i] * corr + vf[i];
        l[r] = l[r] * corr + 1.f;
        m[r] = s;
      } else {
        const float p = std::exp(s - m[r]);
        for (int i = 0; i < hd; ++i) a[i] += p * vf[i];
        l[r] += p;
      }
    }
  }
}

void ScalarDecodeChunk(const float* q, int group, const uint16_t* k, const uint16_t* v,
                       int64_t n, int hd, float* tile, float* m, float* l, float* acc,
                       float* scores, int64_t score_stride) {
  auto load = [&](int64_t j, float* kf, float* vf) {
    for (int i = 0; i < hd; ++i) {
      kf[i] = Fp16ToFp32(k[j * hd + i]);
      vf[i] = Fp16ToFp32(v[j * hd + i]);
    }
  };
  ScalarDecode(q, group, load, n, hd, tile, m, l, acc, scores, score_stride);
}

void ScalarDecodeSegmentChunk(const float* q, int group, const KvSegment& seg, int64_t begin,
                              int64_t n, int hd, float* tile, float* m, float* l, float* acc,
                              float* scores, int64_t score_stride) {
  auto load = [&](int64_t j, float* kf, float* vf) {
    seg.LoadRows(begin + j, begin + j + 1, kf, vf);
  };
  ScalarDecode(q, group, load, n, hd, tile, m, l, acc, scores, score_stride);
}

void ScalarFp16ToFp32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Fp16ToFp32(src[i]);
}

void ScalarFp32ToFp16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Fp32ToFp16(src[i]);
}

}  // namespace

const KernelTable& ScalarKernels() {
  static constexpr KernelTable kTable = {"scalar", 1, ScalarDecodeChunk,
                                         ScalarDecodeSegmentChunk, ScalarFp16ToFp32,
                                         ScalarFp32ToFp16};
  return kTable;
}

const KernelTable& ActiveKernels() {
  const CpuFeatures& f = GetCpuFeatures();
  if (f.level == CpuLevel::kAvx512 && f.avx2) return Avx512Kernels();
  if (f.level >= CpuLevel::kAvx2 && f.avx2) return Avx2Kernels();
  return ScalarKernels();
}

}  // namespace attention_internal

using attention_internal::ActiveKernels;
using attention_internal::KernelTable;

namespace {

// Keys per chunk: enough chunks that the pool's static split stays balanced (about 8 per
// thread, so the last, shorter chunk of each head matters little), at least kMinChunk keys so
// that per-chunk overhead (state, merge) stays small, at most kMaxChunk so a chunk's K/V
// (kMaxChunk * 64 * 2 * 2 bytes = 256 KiB at head_dim 64) stays in L2.
constexpr int64_t kMinChunk = 64;
constexpr int64_t kMaxChunk = 1024;
constexpr int64_t kChunksPerThread = 8;

}  // namespace

void Fp16ToFp32Row(const uint16_t* src, float* dst, int64_t n) {
  ActiveKernels().fp16_to_fp32(src, dst, n);
}

void Fp32ToFp16Row(const float* src, uint16_t* dst, int64_t n) {
  ActiveKernels().fp32_to_fp16(src, dst, n);
}

void DecodeAttention::Run(const KvCache& cache, int layer, int n_heads, int32_t query_pos,
                          const float* q, float scale, float* out, ThreadPool* pool,
                          float* probs, int64_t probs_stride) {
  const int n_kv = cache.n_kv_heads(), hd = cache.head_dim();
  const int group = n_heads / n_kv;
  const KernelTable* kt = &ActiveKernels();
  if (hd % kt->hd_multiple != 0) kt = &attention_internal::ScalarKernels();

  // Visible entries per KV head (sorted positions: a prefix), then equal chunks over them.
  int64_t total = 0;
  first_chunk_.resize(n_kv + 1);
  std::vector<int64_t>& vis = visible_;
  vis.resize(n_kv);
  for (int g = 0; g < n_kv; ++g) {
    const KvHead& kv = cache.head(layer, g);
    vis[g] = std::upper_bound(kv.pos.begin(), kv.pos.end(), query_pos) - kv.pos.begin();
    total += vis[g];
  }
  const int64_t target = kChunksPerThread * pool->n_threads();
  const int64_t chunk =
      std::clamp((total + target - 1) / target, kMinChunk, kMaxChunk);
  chunks_.clear();
  for (int g = 0; g < n_kv; ++g) {
    first_chunk_[g] = static_cast<int>(chunks_.size());
    // Chunks never straddle a frozen segment's end: each run (segment, then the fp16 rows)
    // is read by its own kernel.
    const KvHead& kv = cache.head(layer, g);
    int64_t base = 0;
    for (const auto& seg : kv.segments) {
      const int64_t run = std::min(seg->n, vis[g] - base);
      for (int64_t b = 0; b < run; b += chunk) {
        chunks_.push_back({g, seg.get(), b, std::min(run, b + chunk), base + b});
      }
      base += seg->n;
    }
    for (int64_t b = 0; b < vis[g] - base; b += chunk) {
      chunks_.push_back({g, nullptr, b, std::min(vis[g] - base, b + chunk), base + b});
    }
  }
  first_chunk_[n_kv] = static_cast<int>(chunks_.size());

  const int64_t dq = int64_t{n_heads} * hd;
  q_.resize(dq);
  for (int64_t i = 0; i < dq; ++i) q_[i] = q[i] * scale;
  const int64_t state_size = int64_t{group} * (2 + hd);
  state_.resize(chunks_.size() * state_size);
  if (tile_.size() < static_cast<size_t>(pool->n_threads())) tile_.resize(pool->n_threads());
  for (std::vector<float>& t : tile_) t.resize(2 * attention_internal::kTile * hd);

  pool->ParallelFor(static_cast<int64_t>(chunks_.size()), [&](int64_t begin, int64_t end,
                                                              int tid) {
    float* tile = tile_[tid].data();
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks_[c];
      const KvHead& kv = cache.head(layer, ch.kv_head);
      float* st = state_.data() + c * state_size;
      const float* qh = q_.data() + int64_t{ch.kv_head} * group * hd;
      // The scores of the group's query heads for this chunk's entries (first: the chunk's
      // first entry in the head).
      float* sc = probs == nullptr
                      ? nullptr
                      : probs + int64_t{ch.kv_head} * group * probs_stride + ch.first;
      if (ch.segment != nullptr) {
        kt->decode_segment_chunk(qh, group, *ch.segment, ch.begin, ch.end - ch.begin, hd, tile,
                                 st, st + group, st + 2 * group, sc, probs_stride);
      } else {
        kt->decode_chunk(qh, group, kv.k.data() + ch.begin * hd, kv.v.data() + ch.begin * hd,
                         ch.end - ch.begin, hd, tile, st, st + group, st + 2 * group, sc,
                         probs_stride);
      }
    }
  });

  // Merge: out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c, M = max_c m_c.
  for (int h = 0; h < n_heads; ++h) {
    const int g = h / group, r = h % group;
    float* o = out + int64_t{h} * hd;
    std::fill(o, o + hd, 0.f);
    float mx = -std::numeric_limits<float>::infinity();
    for (int c = first_chunk_[g]; c < first_chunk_[g + 1]; ++c) {
      mx = std::max(mx, state_[c * state_size + r]);
    }
    if (first_chunk_[g] == first_chunk_[g + 1]) continue;  // nothing visible
    float sum = 0.f;
    for (int c = first_chunk_[g]; c < first_chunk_[g + 1]; ++c) {
      const float* st = state_.data() + c * state_size;
      const float w = std::exp(st[r] - mx);
      sum += w * st[group + r];
      const float* acc = st + 2 * group + int64_t{r} * hd;
      for (int i = 0; i < hd; ++i) o[i] += w * acc[i];
    }
    const float inv = 1.f / sum;
    for (int i = 0; i < hd; ++i) o[i] *= inv;
    if (probs != nullptr) {
      // Scores to probabilities, without a second pass over K: the vectorized softmax over
      // the row's scores (its max and sum are the merged mx and sum above, recomputed from
      // the same scores; a scalar exp per entry cost a Recycled full step ~4 ms at 8K).
      Softmax(probs + int64_t{h} * probs_stride, vis[g]);
    }
  }
}

}  // namespace ctxcache
