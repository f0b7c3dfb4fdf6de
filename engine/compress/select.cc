// The shared top-budget selector and the cache helpers around it (see select.h).
#include "engine/compress/select.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/cpu/attention.h"

namespace ctxcache {
namespace {

// Ordering key of one entry: forced tier first (2 sink, 1 recent, 0 scored), then score, then
// the later position (recency breaks ties, which makes every method deterministic).
struct Rank {
  int tier;
  float score;
  int32_t pos;
};

bool Better(const Rank& a, const Rank& b) {
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.score != b.score) return a.score > b.score;
  return a.pos > b.pos;
}

float Clean(float s) { return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s; }

// Indices (ascending) of the entries to keep among `ranks`.
std::vector<int64_t> TopBudget(const std::vector<Rank>& ranks, int64_t budget) {
  std::vector<int64_t> idx(ranks.size());
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = std::min<int64_t>(budget, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int64_t a, int64_t b) { return Better(ranks[a], ranks[b]); });
  idx.resize(k);
  // Unforced entries scored -inf are never kept: the method asked for fewer than the budget.
  std::erase_if(idx, [&](int64_t i) {
    return ranks[i].tier == 0 && ranks[i].score == -std::numeric_limits<float>::infinity();
  });
  std::sort(idx.begin(), idx.end());
  return idx;
}

// Re-rotates n_rows fp16 key rows by `delta` in place: through fp32, rounded back to fp16 as
// every key in the cache is.
void ShiftKeys(uint16_t* k, int64_t n_rows, int hd, int32_t delta, const RopeParams& rope,
               std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(n_rows) * hd);
  Fp16ToFp32Row(k, buf.data(), n_rows * hd);
  ShiftRope(buf.data(), n_rows, 1, delta, rope);
  Fp32ToFp16Row(buf.data(), k, n_rows * hd);
}

// The kept entries as fp16 rows; entries of a frozen segment (a stored context selected per
// query) are dequantized one row at a time.
void Gather(const KvHead& src, const std::vector<int64_t>& idx, int hd, KvHead& dst) {
  dst.k.resize(idx.size() * hd);
  dst.v.resize(idx.size() * hd);
  dst.pos.resize(idx.size());
  const int64_t frozen = src.n_frozen();
  std::vector<float> row(2 * hd);
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i] < frozen) {
      src.LoadRows(idx[i], idx[i] + 1, hd, row.data(), row.data() + hd);
      Fp32ToFp16Row(row.data(), dst.k.data() + i * hd, hd);
      Fp32ToFp16Row(row.data() + hd, dst.v.data() + i * hd, hd);
    } else {
      std::copy_n(src.k.data() + (idx[i] - frozen) * hd, hd, dst.k.data() + i * hd);
      std::copy_n(src.v.data() + (idx[i] - frozen) * hd, hd, dst.v.data() + i * hd);
    }
    dst.pos[i] = src.pos[idx[i]];
  }
}

}  // namespace

HeadScores ZeroScores(const KvCache& cache) {
  HeadScores s(static_cast<size_t>(cache.n_layers()) * cache.n_kv_heads());
  for (int l = 0; l < cache.n_layers(); ++l) {
    for (int h = 0; h < cache.n_kv_heads(); ++h) {
      s[l * cache.n_kv_heads() + h].assign(cache.head(l, h).n(), 0.f);
    }
  }
  return s;
}

absl::StatusOr<KvCache> Select(const KvCache& cache, const HeadScores& scores,
                               const SelectOptions& options) {
  const int n_kv = cache.n_kv_heads();
  if (scores.size() != static_cast<size_t>(cache.n_layers()) * n_kv) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scores cover ", scores.size(), " heads, the cache has ", cache.n_layers() * n_kv));
  }
  if (options.budget <= 0) return absl::InvalidArgumentError("selection budget must be > 0");
  auto tier = [&](int32_t pos) {
    return pos < options.n_sink ? 2 : (pos >= options.recent_from ? 1 : 0);
  };
  KvCache out(cache.n_layers(), n_kv, cache.head_dim());
  out.next_position = cache.next_position;
  for (int l = 0; l < cache.n_layers(); ++l) {
    if (options.per_layer) {
      const KvHead& first = cache.head(l, 0);
      std::vector<Rank> ranks(first.n());
      for (int64_t i = 0; i < first.n(); ++i) ranks[i] = {tier(first.pos[i]), 0.f, first.pos[i]};
      for (int h = 0; h < n_kv; ++h) {
        const KvHead& kh = cache.head(l, h);
        const std::vector<float>& s = scores[l * n_kv + h];
        if (kh.pos != first.pos || s.size() != first.pos.size()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "per-layer selection needs every head of layer ", l, " to hold the same tokens"));
        }
        for (int64_t i = 0; i < kh.n(); ++i) ranks[i].score += Clean(s[i]) / n_kv;
      }
      const std::vector<int64_t> idx = TopBudget(ranks, options.budget);
      for (int h = 0; h < n_kv; ++h)
        Gather(cache.head(l, h), idx, cache.head_dim(), out.head(l, h));
      continue;
    }
    for (int h = 0; h < n_kv; ++h) {
      const KvHead& kh = cache.head(l, h);
      const std::vector<float>& s = scores[l * n_kv + h];
      if (s.size() != kh.pos.size()) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " head ", h, " has ", kh.n(),
                                                       " entries but ", s.size(), " scores"));
      }
      std::vector<Rank> ranks(kh.n());
      for (int64_t i = 0; i < kh.n(); ++i) ranks[i] = {tier(kh.pos[i]), Clean(s[i]), kh.pos[i]};
      Gather(kh, TopBudget(ranks, options.budget), cache.head_dim(), out.head(l, h));
    }
  }
  return out;
}

std::vector<int64_t> HeadLengths(const KvCache& cache) {
  std::vector<int64_t> n;
  n.reserve(static_cast<size_t>(cache.n_layers()) * cache.n_kv_heads());
  for (int l = 0; l < cache.n_layers(); ++l) {
    for (int h = 0; h < cache.n_kv_heads(); ++h) n.push_back(cache.head(l, h).n());
  }
  return n;
}

void TruncateHeads(KvCache& cache, absl::Span<const int64_t> lengths) {
  const int hd = cache.head_dim();
  for (int l = 0; l < cache.n_layers(); ++l) {
    for (int h = 0; h < cache.n_kv_heads(); ++h) {
      KvHead& kh = cache.head(l, h);
      // Frozen entries stay (only appended rows are dropped).
      const int64_t frozen = kh.n_frozen();
      const int64_t n = std::max(frozen, std::min(kh.n(), lengths[l * cache.n_kv_heads() + h]));
      kh.pos.resize(n);
      kh.k.resize((n - frozen) * hd);
      kh.v.resize((n - frozen) * hd);
    }
  }
}

void CompactPositions(KvCache& cache, const RopeParams& rope) {
  cache.Thaw();
  const int hd = cache.head_dim();
  std::vector<float> buf;
  for (int l = 0; l < cache.n_layers(); ++l) {
    for (int h = 0; h < cache.n_kv_heads(); ++h) {
      KvHead& kh = cache.head(l, h);
      for (int64_t i = 0; i < kh.n(); ++i) {
        const int32_t delta = static_cast<int32_t>(i) - kh.pos[i];
        if (delta != 0) ShiftKeys(kh.k.data() + i * hd, 1, hd, delta, rope, buf);
        kh.pos[i] = static_cast<int32_t>(i);
      }
    }
  }
  cache.next_position = static_cast<int32_t>(cache.MaxEntries());
}

void ShiftPositions(KvCache& cache, int32_t delta, const RopeParams& rope) {
  if (delta == 0) return;
  cache.Thaw();
  std::vector<float> buf;
  for (int l = 0; l < cache.n_layers(); ++l) {
    for (int h = 0; h < cache.n_kv_heads(); ++h) {
      KvHead& kh = cache.head(l, h);
      ShiftKeys(kh.k.data(), kh.n(), cache.head_dim(), delta, rope, buf);
      for (int32_t& p : kh.pos) p += delta;
    }
  }
  cache.next_position += delta;
}

void Pool1d(std::vector<float>& scores, int kernel, bool max_pool) {
  if (kernel <= 1 || scores.empty()) return;
  const int64_t n = static_cast<int64_t>(scores.size()), half = kernel / 2;
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = std::max<int64_t>(0, i - half), hi = std::min(n - 1, i + half);
    float acc = max_pool ? -std::numeric_limits<float>::infinity() : 0.f;
    for (int64_t j = lo; j <= hi; ++j) acc = max_pool ? std::max(acc, scores[j]) : acc + scores[j];
    // Zero padding takes part in the max too (PyTorch max_pool1d pads with -inf; the scores
    // are probabilities >= 0, so the two agree).
    out[i] = max_pool ? acc : acc / static_cast<float>(kernel);
  }
  scores.swap(out);
}

void PoolByPosition(std::vector<float>& scores, absl::Span<const int32_t> pos, int kernel) {
  if (kernel <= 1 || scores.empty()) return;
  const int32_t half = kernel / 2;
  const size_t n = scores.size();
  std::vector<float> out(n);
  size_t lo = 0, hi = 0;  // entries [lo, hi) lie within `half` positions of entry i
  for (size_t i = 0; i < n; ++i) {
    while (pos[lo] < pos[i] - half) ++lo;
    while (hi < n && pos[hi] <= pos[i] + half) ++hi;
    float acc = 0.f;  // summed in Pool1d's order, so contiguous positions give its floats
    for (size_t j = lo; j < hi; ++j) acc += scores[j];
    out[i] = acc / static_cast<float>(kernel);
  }
  scores.swap(out);
}

void AccumulateGroupMean(const float* probs, int n_heads, int n_rows, int64_t max_keys,
                         absl::Span<const float> row_weight, absl::Span<const int64_t> n_keys,
                         std::vector<float>* out) {
  const int n_kv = static_cast<int>(n_keys.size());
  const int group = n_heads / n_kv;
  const float inv_group = 1.0f / static_cast<float>(group);
  for (int h = 0; h < n_heads; ++h) {
    std::vector<float>& dst = out[h / group];
    const int64_t nk = std::min<int64_t>(n_keys[h / group], max_keys);
    for (int r = 0; r < n_rows; ++r) {
      const float w = row_weight[r] * inv_group;
      const float* row = probs + (static_cast<int64_t>(h) * n_rows + r) * max_keys;
      for (int64_t j = 0; j < nk; ++j) dst[j] += w * row[j];
    }
  }
}

}  // namespace ctxcache
