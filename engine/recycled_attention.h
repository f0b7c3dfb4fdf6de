// Recycled Attention (Xu, Goyal, Choi 2024; revised as RefreshKV, ACL 2025) as a decode
// policy: every `stride` steps a layer attends over its whole KV cache (a full step) and
// remembers, per KV head, the top-K keys that step attended to most (max over the group's
// query heads, max-pooled with kernel 7, as the paper does); the steps in between attend only
// to those K keys plus the tokens generated since. In dynamic mode a layer also takes a full
// step early when its query drifts: cosine similarity of the head-averaged query to the one
// of its last full step below a threshold, checked every step.
//
// Deviation from RefreshKV (documented): the first decode step is a full step, rather than
// reusing the prefill's last-row attention, so that a cached context prefilled elsewhere
// works the same way.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/kv_cache.h"

namespace ctxcache {

inline constexpr int kMaxRecycledStride = 10000;
inline constexpr int64_t kMaxRecycledTopK = int64_t{1} << 24;  // keys per KV head
inline constexpr int kMaxRecycledPoolKernel = 63;

struct DecodePolicy {
  enum class Kind { kFull, kRecycled };
  Kind kind = Kind::kFull;
  int stride = 10;                    // full step every `stride` decode steps (v1: fixed)
  int64_t top_k = 0;                  // recycled keys per KV head; 0 = 1/8 of the keys
  int pool_kernel = 7;                // max-pooling of the attention scores (SnapKV-style)
  bool dynamic = false;               // also refresh when the query drifts
  float similarity_threshold = 0.85f;  // RefreshKV's s for Llama-3.1-8B

  absl::Status Validate() const;
};

// Per-generation state of the policy; one per sequence, owned by the caller of Decode.
class RecycledAttentionState {
 public:
  RecycledAttentionState(const DecodePolicy& policy, int n_layers, int n_kv_heads, int n_heads,
                         int head_dim);

  const DecodePolicy& policy() const { return policy_; }
  // Statistics: attention steps (per layer) that were full / recycled.
  int64_t full_steps() const { return full_steps_; }
  int64_t recycled_steps() const { return recycled_steps_; }

  // Engine side (runner.cc): should this layer run a full step for this query?
  bool WantsFullStep(int layer, const float* q /*[n_heads*head_dim]*/) const;
  // After a full step: probs [n_heads, n_keys_per_head[g]] (row h at h * probs_stride).
  void RecordFullStep(int layer, const float* q, const float* probs, int64_t probs_stride,
                      const std::vector<int64_t>& n_keys_per_kv_head);
  void RecordRecycledStep(int layer);
  // Keys of (layer, kv head) that a recycled step attends to: the recycled indices (sorted),
  // then every entry from first_new onwards.
  const std::vector<int64_t>& recycled(int layer, int kv_head) const {
    return layers_[layer].indices[kv_head];
  }
  int64_t first_new(int layer, int kv_head) const { return layers_[layer].first_new[kv_head]; }
  // The recycled keys' K/V rows as one fp16 segment, gathered once at the full step (runner.cc)
  // so that each recycled step reads them with the fused decode kernel, once per KV head.
  const std::shared_ptr<const KvSegment>& recycled_rows(int layer, int kv_head) const {
    return layers_[layer].rows[kv_head];
  }
  void set_recycled_rows(int layer, int kv_head, std::shared_ptr<const KvSegment> rows) {
    layers_[layer].rows[kv_head] = std::move(rows);
  }

 private:
  struct Layer {
    bool has_full = false;
    int steps_since_full = 0;
    std::vector<float> q_mean;                 // [head_dim] head-averaged query of the full step
    std::vector<std::vector<int64_t>> indices;  // [n_kv_heads][K]
    std::vector<int64_t> first_new;            // [n_kv_heads] cache size at the full step
    std::vector<std::shared_ptr<const KvSegment>> rows;  // [n_kv_heads] recycled K/V rows
  };
  std::vector<float> MeanQuery(const float* q) const;

  DecodePolicy policy_;
  int n_kv_heads_, n_heads_, head_dim_;
  std::vector<Layer> layers_;
  int64_t full_steps_ = 0, recycled_steps_ = 0;
};

}  // namespace ctxcache
