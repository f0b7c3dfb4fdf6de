// The KV cache, laid out the way compression prunes it: per layer, per KV head, a compact
// list of entries (K row, V row, original position). Heads may keep different tokens after
// per-head selection, so every (layer, head) has its own length. Keys are stored after RoPE,
// at their original positions; next_position says where the next token goes (after
// compression it stays at the original document length unless the context was re-rotated).
//
// K and V are stored as fp16 bits, like llama.cpp's default f16 cache: decode at long contexts
// is bound by reading this cache, and half the bytes of fp32 is half the time. Values enter
// through Append rounded to nearest fp16 (the forward pass and re-rotation round to fp16
// anyway, so this loses nothing and a context serialises to fp16 by a plain copy); readers
// convert with Fp16ToFp32Row (engine/cpu/attention.h) or Fp16ToFp32 (common/half.h).
#pragma once

#include <cstdint>
#include <vector>

namespace ctxcache {

struct KvHead {
  std::vector<uint16_t> k;       // [n, head_dim] fp16 bits, post-RoPE
  std::vector<uint16_t> v;       // [n, head_dim] fp16 bits
  std::vector<int32_t> pos;      // [n] original positions
  int64_t n() const { return static_cast<int64_t>(pos.size()); }
};

class KvCache {
 public:
  KvCache() = default;
  KvCache(int n_layers, int n_kv_heads, int head_dim);

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }

  KvHead& head(int layer, int kv_head) { return heads_[layer * n_kv_heads_ + kv_head]; }
  const KvHead& head(int layer, int kv_head) const { return heads_[layer * n_kv_heads_ + kv_head]; }

  // Position the next appended token gets.
  int32_t next_position = 0;

  // Appends n tokens' K and V for one layer: k, v are [n, n_kv_heads * head_dim] (row-major,
  // head-major within a row), positions [n]. Values are rounded to nearest fp16.
  void Append(int layer, const float* k, const float* v, const int32_t* positions, int64_t n);
  // Drops everything past the first n entries of every head (undo a speculative append).
  void Truncate(int64_t n);
  void Reserve(int64_t n_per_head);
  void Clear();

  // Entries summed over all (layer, head) pairs, and the bytes they take at `bytes_per_value`
  // (2, what this cache holds; 4 for an fp32 store): K and V rows; positions are not counted.
  int64_t TotalEntries() const;
  int64_t Bytes(int bytes_per_value = 2) const;
  // The most entries any head holds (the attention span).
  int64_t MaxEntries() const;

 private:
  int n_layers_ = 0, n_kv_heads_ = 0, head_dim_ = 0;
  std::vector<KvHead> heads_;  // [n_layers * n_kv_heads]
};

}  // namespace ctxcache
