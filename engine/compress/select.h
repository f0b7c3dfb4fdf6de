// The one selector every KV-form method shares, and the small cache surgery around it:
// per-(layer, head) scores -> top-budget entries (always keeping sinks and an optional recent
// window), per head or per layer; pooling and GQA reduction of observed attention; per-head
// truncation; exact RoPE re-rotation of kept keys.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/cpu/ops.h"
#include "engine/kv_cache.h"
#include "engine/model.h"

namespace ctxcache {

// One score per cache entry, indexed like the cache's heads: [n_layers * n_kv_heads][n(l,h)].
// Higher is more important; -infinity means "never keep unless forced" (anchor uses it to
// keep fewer than the budget). NaN counts as -infinity.
using HeadScores = std::vector<std::vector<float>>;

HeadScores ZeroScores(const KvCache& cache);

struct SelectOptions {
  int64_t budget = 0;      // entries kept per head (all when a head has fewer)
  bool per_layer = false;  // one set per layer: heads' scores averaged, heads must agree
  // Ada-KV (Feng et al., arXiv 2407.11550; kvpress AdaKVPress): a layer keeps
  // min(budget * n_kv_heads, its entries) in all, shared unevenly by its heads. Each head first
  // gets its forced entries (at most budget) plus its top alpha_safeguard of the rest of its
  // budget (at least one entry when alpha > 0); the layer's remaining total then goes to the
  // best-scored entries of all heads together, so heads whose scores concentrate on few
  // entries give budget to heads whose scores are spread. Raw scores are compared across the
  // heads of a layer, so they must be in common units (compress.h head_budget). Not with
  // per_layer (one shared set cannot differ per head).
  bool adaptive = false;
  // KVzip's one threshold (Kim et al., arXiv 2505.23416, section 3.3): Ada-KV's sharing over
  // every (layer, KV head) of the model at once instead of within each layer: the whole model
  // keeps min(budget * n_layers * n_kv_heads, its entries), each head guaranteed the same
  // floor as with adaptive. Needs scores in common units across layers too. With adaptive.
  bool global = false;
  double alpha_safeguard = 0.2;  // kvpress AdaKVPress default; AdaKV's floor_alpha
  int32_t n_sink = 0;      // entries at positions < n_sink are always kept ...
  // ... and so are entries at positions >= recent_from. Forced entries count against the
  // budget; when they alone exceed it, sinks win, then the most recent.
  int32_t recent_from = std::numeric_limits<int32_t>::max();
};

// The kept entries of `cache`, in their original (position) order; next_position unchanged.
// InvalidArgument when scores do not match the cache, per_layer heads hold different
// positions, or adaptive is combined with per_layer or an alpha outside [0, 1].
absl::StatusOr<KvCache> Select(const KvCache& cache, const HeadScores& scores,
                               const SelectOptions& options);

// Drops each head's entries past lengths[layer * n_kv_heads + head] (never frozen ones).
void TruncateHeads(KvCache& cache, absl::Span<const int64_t> lengths);
std::vector<int64_t> HeadLengths(const KvCache& cache);

// Both re-rotations round the keys back to fp16 like the Runner's cache writes, so a context
// stays fp16-representable (the codec stores it losslessly). Frozen (possibly quantized)
// entries are thawed to fp16 first: the result holds fp16 rows only.
// Re-rotates every head's entry i from its position to position i (Finch's compact layout,
// kvpress KeyRerotationPress) and sets next_position to the longest head's length.
void CompactPositions(KvCache& cache, const RopeParams& rope);

// Shifts all keys by `delta` positions (exact rotation) and their positions with them.
void ShiftPositions(KvCache& cache, int32_t delta, const RopeParams& rope);

// 1-D pooling over one head's scores, zero-padded by kernel/2 on both sides; "avg" divides by
// the kernel as PyTorch's avg_pool1d(count_include_pad=True) that SnapKV and kvpress use.
void Pool1d(std::vector<float>& scores, int kernel, bool max_pool);

// The same average pooling over one head's entries by their positions: entry i's score becomes
// the sum of the scores of the entries within kernel/2 positions of pos[i], divided by the
// kernel. Positions the head does not hold count as zeros, like Pool1d's padding, so on
// contiguous positions the two agree. `pos` is ascending (a KvHead's pos). Used by finch, whose
// candidates are the sparse survivors of earlier chunks plus a contiguous new chunk.
void PoolByPosition(std::vector<float>& scores, absl::Span<const int32_t> pos, int kernel);

// Adds observed attention to per-KV-head scores: for each query head h (KV head h / group),
// row r and key j < n_keys(head): out[h / group][j] += row_weight[r] * probs[h, r, j] / group
// (a GQA mean when row weights sum to 1). probs is the observer's [n_heads, n_rows, max_keys].
void AccumulateGroupMean(const float* probs, int n_heads, int n_rows, int64_t max_keys,
                         absl::Span<const float> row_weight, absl::Span<const int64_t> n_keys,
                         std::vector<float>* out);

}  // namespace ctxcache
