#include "engine/kv_cache.h"

#include <algorithm>

#include "engine/cpu/attention.h"

namespace ctxcache {

KvCache::KvCache(int n_layers, int n_kv_heads, int head_dim)
    : n_layers_(n_layers), n_kv_heads_(n_kv_heads), head_dim_(head_dim),
      heads_(static_cast<size_t>(n_layers) * n_kv_heads) {}

void KvCache::Append(int layer, const float* k, const float* v, const int32_t* positions,
                     int64_t n) {
  const int64_t row = static_cast<int64_t>(n_kv_heads_) * head_dim_;
  for (int h = 0; h < n_kv_heads_; ++h) {
    KvHead& kh = head(layer, h);
    const size_t base = kh.k.size();
    kh.k.resize(base + n * head_dim_);
    kh.v.resize(base + n * head_dim_);
    for (int64_t t = 0; t < n; ++t) {
      Fp32ToFp16Row(k + t * row + h * head_dim_, kh.k.data() + base + t * head_dim_, head_dim_);
      Fp32ToFp16Row(v + t * row + h * head_dim_, kh.v.data() + base + t * head_dim_, head_dim_);
    }
    kh.pos.insert(kh.pos.end(), positions, positions + n);
  }
}

void KvCache::Truncate(int64_t n) {
  for (KvHead& kh : heads_) {
    if (kh.n() <= n) continue;
    kh.pos.resize(n);
    kh.k.resize(n * head_dim_);
    kh.v.resize(n * head_dim_);
  }
}

void KvCache::Reserve(int64_t n_per_head) {
  for (KvHead& kh : heads_) {
    kh.pos.reserve(n_per_head);
    kh.k.reserve(n_per_head * head_dim_);
    kh.v.reserve(n_per_head * head_dim_);
  }
}

void KvCache::Clear() {
  for (KvHead& kh : heads_) {
    kh.pos.clear();
    kh.k.clear();
    kh.v.clear();
  }
  next_position = 0;
}

int64_t KvCache::TotalEntries() const {
  int64_t n = 0;
  for (const KvHead& kh : heads_) n += kh.n();
  return n;
}

int64_t KvCache::Bytes(int bytes_per_value) const {
  return TotalEntries() * 2 * head_dim_ * bytes_per_value;
}

int64_t KvCache::MaxEntries() const {
  int64_t n = 0;
  for (const KvHead& kh : heads_) n = std::max(n, kh.n());
  return n;
}

}  // namespace ctxcache
