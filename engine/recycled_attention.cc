#include "engine/recycled_attention.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"

namespace ctxcache {

absl::Status DecodePolicy::Validate() const {
  if (kind == Kind::kFull) return absl::OkStatus();
  if (stride < 1 || stride > kMaxRecycledStride) {
    return absl::InvalidArgumentError(absl::StrCat(
        "recycled attention stride ", stride, " is invalid; allowed: 1 to ", kMaxRecycledStride));
  }
  if (top_k < 0 || top_k > kMaxRecycledTopK) {
    return absl::InvalidArgumentError(absl::StrCat("recycled attention top_k ", top_k,
                                                   " is invalid; use 0 (1/8 of the keys) or 1 to ",
                                                   kMaxRecycledTopK));
  }
  if (pool_kernel < 1 || pool_kernel % 2 == 0 || pool_kernel > kMaxRecycledPoolKernel) {
    return absl::InvalidArgumentError("recycled attention pool_kernel must be odd, 1..63");
  }
  if (!(similarity_threshold >= -1.f && similarity_threshold <= 1.f)) {
    return absl::InvalidArgumentError("recycled attention similarity_threshold must be in [-1, 1]");
  }
  return absl::OkStatus();
}

RecycledAttentionState::RecycledAttentionState(const DecodePolicy& policy, int n_layers,
                                               int n_kv_heads, int n_heads, int head_dim)
    : policy_(policy), n_kv_heads_(n_kv_heads), n_heads_(n_heads), head_dim_(head_dim),
      layers_(n_layers) {
  for (Layer& l : layers_) {
    l.indices.resize(n_kv_heads);
    l.first_new.assign(n_kv_heads, 0);
    l.rows.resize(n_kv_heads);
  }
}

std::vector<float> RecycledAttentionState::MeanQuery(const float* q) const {
  std::vector<float> m(head_dim_, 0.f);
  for (int h = 0; h < n_heads_; ++h) {
    for (int i = 0; i < head_dim_; ++i) m[i] += q[h * head_dim_ + i];
  }
  for (float& x : m) x /= static_cast<float>(n_heads_);
  return m;
}

bool RecycledAttentionState::WantsFullStep(int layer, const float* q) const {
  const Layer& l = layers_[layer];
  if (!l.has_full || l.steps_since_full + 1 >= policy_.stride) return true;
  if (!policy_.dynamic) return false;
  const std::vector<float> m = MeanQuery(q);
  double dot = 0, a = 0, b = 0;
  for (int i = 0; i < head_dim_; ++i) {
    dot += double{m[i]} * l.q_mean[i];
    a += double{m[i]} * m[i];
    b += double{l.q_mean[i]} * l.q_mean[i];
  }
  const double cos = dot / std::max(1e-30, std::sqrt(a * b));
  return cos < policy_.similarity_threshold;
}

void RecycledAttentionState::RecordFullStep(int layer, const float* q, const float* probs,
                                            int64_t probs_stride,
                                            const std::vector<int64_t>& n_keys_per_kv_head) {
  Layer& l = layers_[layer];
  const int group = n_heads_ / n_kv_heads_;
  const int half = policy_.pool_kernel / 2;
  std::vector<float> agg, pooled, order;
  for (int g = 0; g < n_kv_heads_; ++g) {
    // The full step's own token (the last entry) is attended by every later step anyway, as
    // one of the tokens generated since; rank only the entries before it.
    const int64_t n_all = n_keys_per_kv_head[g];
    const int64_t n = n_all > 1 ? n_all - 1 : n_all;
    // GQA: max over the group's query heads (RefreshKV Table 8: max >= mean > first head).
    agg.assign(n, 0.f);
    for (int j = 0; j < group; ++j) {
      const float* p = probs + (static_cast<int64_t>(g) * group + j) * probs_stride;
      for (int64_t k = 0; k < n; ++k) agg[k] = std::max(agg[k], p[k]);
    }
    // Max-pooling over the window [k - half, k + half] (clipped), as the max of shifted
    // copies: plain loops the compiler vectorizes.
    pooled = agg;
    for (int64_t d = 1; d <= half; ++d) {
      for (int64_t k = 0; k + d < n; ++k) pooled[k] = std::max(pooled[k], agg[k + d]);
      for (int64_t k = d; k < n; ++k) pooled[k] = std::max(pooled[k], agg[k - d]);
    }
    const int64_t k_keep = std::min(n, policy_.top_k > 0 ? policy_.top_k : std::max<int64_t>(1, n / 8));
    // The k_keep largest, ties broken by the lower index so the selection is deterministic:
    // the k_keep-th largest value, then one pass in index order taking every entry above it
    // and the first entries equal to it (sorted indices without a sort; the plain
    // nth_element-over-indices reference is in attention_test.cc).
    std::vector<int64_t>& idx = l.indices[g];
    idx.clear();
    if (k_keep > 0) {
      order = pooled;
      std::nth_element(order.begin(), order.begin() + (k_keep - 1), order.end(),
                       std::greater<float>());
      const float threshold = order[k_keep - 1];
      int64_t above = 0;
      for (int64_t k = 0; k < n; ++k) above += pooled[k] > threshold;
      int64_t ties = k_keep - above;
      idx.reserve(k_keep);
      for (int64_t k = 0; k < n; ++k) {
        if (pooled[k] > threshold) {
          idx.push_back(k);
        } else if (pooled[k] == threshold && ties > 0) {
          idx.push_back(k);
          --ties;
        }
      }
    }
    l.first_new[g] = n;  // == n_all - 1: the full step's token onwards
  }
  l.q_mean = MeanQuery(q);
  l.has_full = true;
  l.steps_since_full = 0;
  ++full_steps_;
}

void RecycledAttentionState::RecordRecycledStep(int layer) {
  ++layers_[layer].steps_since_full;
  ++recycled_steps_;
}

}  // namespace ctxcache
