// The shared top-budget selector and the cache helpers around it (see select.h).
#include "engine/compress/select.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"
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

// Unforced entries scored -inf are never kept: the method asked for fewer than the budget.
bool NeverKept(const Rank& r) {
  return r.tier == 0 && r.score == -std::numeric_limits<float>::infinity();
}

// Indices (ascending) of the entries to keep among `ranks`.
std::vector<int64_t> TopBudget(const std::vector<Rank>& ranks, int64_t budget) {
  std::vector<int64_t> idx(ranks.size());
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = std::min<int64_t>(budget, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int64_t a, int64_t b) { return Better(ranks[a], ranks[b]); });
  idx.resize(k);
  std::erase_if(idx, [&](int64_t i) { return NeverKept(ranks[i]); });
  std::sort(idx.begin(), idx.end());
  return idx;
}

// Ada-KV over one layer's heads (select.h, SelectOptions::adaptive): the indices (ascending)
// each head keeps.
std::vector<std::vector<int64_t>> AdaptiveTopBudget(const std::vector<std::vector<Rank>>& ranks,
                                                    int64_t budget, double alpha) {
  int64_t total = 0;
  for (const std::vector<Rank>& r : ranks) total += static_cast<int64_t>(r.size());
  total = std::min(total, budget * static_cast<int64_t>(ranks.size()));
  struct Candidate {
    int head;
    int64_t i;
  };
  std::vector<Candidate> pool;
  std::vector<std::vector<int64_t>> kept(ranks.size());
  for (size_t h = 0; h < ranks.size(); ++h) {
    const std::vector<Rank>& r = ranks[h];
    std::vector<int64_t> order(r.size());
    std::iota(order.begin(), order.end(), 0);
    std::erase_if(order, [&](int64_t i) { return NeverKept(r[i]); });
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return Better(r[a], r[b]); });
    // The head's floor: its forced entries (the best `budget` of them, as uniform keeps) and
    // the safeguard share of what the budget leaves, like AdaKV's floor_alpha on the capacity
    // after its window; kvpress (no forced entries) rounds down to at least 1.
    const int64_t forced = std::min<int64_t>(
        budget, std::count_if(r.begin(), r.end(), [](const Rank& x) { return x.tier > 0; }));
    const int64_t rest = budget - forced;
    const int64_t safe =
        alpha > 0 && rest > 0 ? std::max<int64_t>(1, static_cast<int64_t>(alpha * rest)) : 0;
    const int64_t floor = std::min<int64_t>(static_cast<int64_t>(order.size()), forced + safe);
    kept[h].assign(order.begin(), order.begin() + floor);
    total -= floor;  // floor <= min(budget, entries): never below 0
    for (size_t j = floor; j < order.size(); ++j) pool.push_back({static_cast<int>(h), order[j]});
  }
  // The rest of the layer's total: the best of all heads' remaining entries together (ties to
  // the lower head, so the result is deterministic).
  const int64_t k = std::min<int64_t>(total, static_cast<int64_t>(pool.size()));
  std::nth_element(pool.begin(), pool.begin() + k, pool.end(),
                   [&](const Candidate& a, const Candidate& b) {
                     const Rank& x = ranks[a.head][a.i];
                     const Rank& y = ranks[b.head][b.i];
                     if (Better(x, y) || Better(y, x)) return Better(x, y);
                     return a.head < b.head;
                   });
  for (int64_t j = 0; j < k; ++j) kept[pool[j].head].push_back(pool[j].i);
  for (std::vector<int64_t>& idx : kept) std::sort(idx.begin(), idx.end());
  return kept;
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
  if (options.adaptive && options.per_layer) {
    return absl::InvalidArgumentError(
        "adaptive head budgets give each KV head its own share of the layer's budget, "
        "per_layer keeps one set shared by the heads: use one or the other");
  }
  if (options.adaptive && !(options.alpha_safeguard >= 0 && options.alpha_safeguard <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("alpha_safeguard must be in [0, 1], got ", options.alpha_safeguard));
  }
  auto tier = [&](int32_t pos) {
    return pos < options.n_sink ? 2 : (pos >= options.recent_from ? 1 : 0);
  };
  if (options.global && !options.adaptive) {
    return absl::InvalidArgumentError("global head budgets are adaptive ones over the whole model");
  }
  KvCache out(cache.n_layers(), n_kv, cache.head_dim());
  out.next_position = cache.next_position;
  auto head_ranks = [&](int l, int h) -> absl::StatusOr<std::vector<Rank>> {
    const KvHead& kh = cache.head(l, h);
    const std::vector<float>& s = scores[l * n_kv + h];
    if (s.size() != kh.pos.size()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, " head ", h, " has ", kh.n(),
                                                     " entries but ", s.size(), " scores"));
    }
    std::vector<Rank> r(kh.n());
    for (int64_t i = 0; i < kh.n(); ++i) r[i] = {tier(kh.pos[i]), Clean(s[i]), kh.pos[i]};
    return r;
  };
  if (options.global) {
    std::vector<std::vector<Rank>> ranks;
    for (int l = 0; l < cache.n_layers(); ++l) {
      for (int h = 0; h < n_kv; ++h) {
        ASSIGN_OR_RETURN(ranks.emplace_back(), head_ranks(l, h));
      }
    }
    const std::vector<std::vector<int64_t>> kept =
        AdaptiveTopBudget(ranks, options.budget, options.alpha_safeguard);
    for (int l = 0; l < cache.n_layers(); ++l) {
      for (int h = 0; h < n_kv; ++h) {
        Gather(cache.head(l, h), kept[l * n_kv + h], cache.head_dim(), out.head(l, h));
      }
    }
    return out;
  }
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
    std::vector<std::vector<Rank>> ranks(n_kv);
    for (int h = 0; h < n_kv; ++h) {
      ASSIGN_OR_RETURN(ranks[h], head_ranks(l, h));
    }
    if (options.adaptive) {
      const std::vector<std::vector<int64_t>> kept =
          AdaptiveTopBudget(ranks, options.budget, options.alpha_safeguard);
      for (int h = 0; h < n_kv; ++h) {
        Gather(cache.head(l, h), kept[h], cache.head_dim(), out.head(l, h));
      }
      continue;
    }
    for (int h = 0; h < n_kv; ++h) {
      Gather(cache.head(l, h), TopBudget(ranks[h], options.budget), cache.head_dim(),
             out.head(l, h));
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
