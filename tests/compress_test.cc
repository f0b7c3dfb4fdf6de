// engine/compress: the shared selector on synthetic scores, spec validation, exact RoPE
// re-rotation, query recovery, and on both real models (the default SmolLM2, llama; and
// Qwen2.5-Coder-0.5B, qwen2: QKV biases, NEOX RoPE, GQA 7:1, skipped with the reason when not
// fetched): every method (budget, sinks, determinism, usable result), composition against a
// directly built cache and of two compressed contexts decoded with full and Recycled
// Attention, a `none` context answering exactly like a plain prefill, a needle that must
// survive ratio-8 compression, finch beyond its window, SelectForQuery, query recovery from
// observed attention; and on the default model only, the quality harness's shared prefill
// (model-independent bookkeeping) and a document 1.5x the model's window (disabled: minutes).
#include "engine/compress/compress.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/cpu_features.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/compress/scorer.h"
#include "engine/compress/select.h"
#include "engine/generate.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;

// ---- Selector on synthetic scores -------------------------------------------------------------

// The cache holds fp16 bits; the checks below read them as fp32.
std::vector<float> ToFloats(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = Fp16ToFp32(h[i]);
  return f;
}

// (layer, head, pos) as one number, exact in fp16 (an integer below 2048) for the shapes
// used here, since the cache stores fp16.
float Code(int l, int h, int t) { return static_cast<float>(l * 1000 + h * 100 + t); }

// A cache of n entries per head at positions 0..n-1 whose K/V rows encode (layer, head, pos).
KvCache SyntheticCache(int n_layers, int n_kv, int hd, int n) {
  KvCache cache(n_layers, n_kv, hd);
  for (int l = 0; l < n_layers; ++l) {
    std::vector<float> k(static_cast<size_t>(n) * n_kv * hd), v(k.size());
    std::vector<int32_t> pos(n);
    for (int t = 0; t < n; ++t) {
      pos[t] = t;
      for (int h = 0; h < n_kv; ++h) {
        for (int i = 0; i < hd; ++i) {
          k[(t * n_kv + h) * hd + i] = Code(l, h, t);
          v[(t * n_kv + h) * hd + i] = -Code(l, h, t);
        }
      }
    }
    cache.Append(l, k.data(), v.data(), pos.data(), n);
  }
  cache.next_position = n;
  return cache;
}

TEST(SelectTest, KeepsTopBudgetPerHeadWithSinksInPositionOrder) {
  KvCache cache = SyntheticCache(2, 2, 4, 10);
  HeadScores scores = ZeroScores(cache);
  // Head-specific favourites: head (l, h) prefers positions 9 - (l + h), 5, 2.
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      std::vector<float>& s = scores[l * 2 + h];
      s[9 - (l + h)] = 3.f;
      s[5] = 2.f;
      s[2] = 1.f;
      s[0] = -100.f;  // a sink: kept regardless of its score
    }
  }
  SelectOptions opt;
  opt.budget = 4;
  opt.n_sink = 1;
  absl::StatusOr<KvCache> out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->next_position, 10);
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      const KvHead& kh = out->head(l, h);
      std::vector<int32_t> want = {0, 2, 5, 9 - (l + h)};
      std::sort(want.begin(), want.end());
      EXPECT_EQ(kh.pos, want) << "layer " << l << " head " << h;
      for (int64_t i = 0; i < kh.n(); ++i) {  // rows moved with their positions
        EXPECT_EQ(Fp16ToFp32(kh.k[i * 4]), Code(l, h, kh.pos[i]));
        EXPECT_EQ(Fp16ToFp32(kh.v[i * 4 + 3]), -Code(l, h, kh.pos[i]));
      }
    }
  }
}

TEST(SelectTest, PerLayerKeepsOneSetForAllHeads) {
  KvCache cache = SyntheticCache(1, 3, 2, 8);
  HeadScores scores = ZeroScores(cache);
  scores[0][7] = 10.f;  // head 0 alone loves 7 ...
  scores[1][3] = 4.f;   // ... heads 1 and 2 agree on 3 and 4
  scores[2][3] = 4.f;
  scores[1][4] = 4.f;
  scores[2][4] = 4.f;
  SelectOptions opt;
  opt.budget = 3;
  opt.per_layer = true;
  absl::StatusOr<KvCache> out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok()) << out.status();
  // Means: 7 -> 3.33, 3 and 4 -> 2.67; everything else 0.
  for (int h = 0; h < 3; ++h) EXPECT_THAT(out->head(0, h).pos, ::testing::ElementsAre(3, 4, 7));
}

TEST(SelectTest, PerLayerRejectsHeadsWithDifferentTokens) {
  KvCache cache = SyntheticCache(1, 2, 2, 6);
  cache.head(0, 1).pos[5] = 9;
  SelectOptions opt;
  opt.budget = 2;
  opt.per_layer = true;
  EXPECT_EQ(Select(cache, ZeroScores(cache), opt).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SelectTest, ForcedEntriesAndNeverKeep) {
  KvCache cache = SyntheticCache(1, 1, 2, 10);
  HeadScores scores = ZeroScores(cache);
  for (float& s : scores[0]) s = -std::numeric_limits<float>::infinity();
  scores[0][4] = 1.f;
  SelectOptions opt;
  opt.budget = 6;
  opt.n_sink = 2;
  opt.recent_from = 8;
  // Sinks 0, 1 and window 8, 9 forced, 4 scored; -inf entries never fill the rest.
  absl::StatusOr<KvCache> out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok());
  EXPECT_THAT(out->head(0, 0).pos, ::testing::ElementsAre(0, 1, 4, 8, 9));
  // Forced entries over the budget: sinks first, then the most recent.
  opt.budget = 3;
  out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok());
  EXPECT_THAT(out->head(0, 0).pos, ::testing::ElementsAre(0, 1, 9));
}

TEST(SelectTest, BudgetAboveLengthKeepsAllAndBadInputsFail) {
  KvCache cache = SyntheticCache(1, 1, 2, 5);
  SelectOptions opt;
  opt.budget = 50;
  absl::StatusOr<KvCache> out = Select(cache, ZeroScores(cache), opt);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->head(0, 0).n(), 5);
  opt.budget = 0;
  EXPECT_EQ(Select(cache, ZeroScores(cache), opt).status().code(),
            absl::StatusCode::kInvalidArgument);
  opt.budget = 2;
  HeadScores wrong(1, std::vector<float>(4));
  EXPECT_EQ(Select(cache, wrong, opt).status().code(), absl::StatusCode::kInvalidArgument);
}

// Ada-KV: per layer the same total as uniform, shared by the heads' scores together.
SelectOptions Adaptive(int64_t budget, double alpha) {
  SelectOptions opt;
  opt.budget = budget;
  opt.adaptive = true;
  opt.alpha_safeguard = alpha;
  return opt;
}

TEST(SelectTest, AdaptiveMovesBudgetFromConcentratedToSpreadHeads) {
  KvCache cache = SyntheticCache(2, 2, 4, 20);
  HeadScores scores = ZeroScores(cache);
  // In layer 0 head 0 puts its mass on two entries and head 1 spreads it; layer 1 the reverse.
  for (int l = 0; l < 2; ++l) {
    std::vector<float>& peaked = scores[l * 2 + l];
    std::vector<float>& spread = scores[l * 2 + 1 - l];
    for (int t = 0; t < 20; ++t) {
      peaked[t] = 0.001f * static_cast<float>(t);  // all below every spread score
      spread[t] = 0.05f + 0.001f * static_cast<float>(t);
    }
    peaked[3] = 0.5f;
    peaked[11] = 0.4f;
  }
  // budget 6, alpha 0.5: each head is guaranteed its top 3; the other 6 of the layer's 12
  // go to the best remaining scores of both heads: all of the spread head's.
  absl::StatusOr<KvCache> out = Select(cache, scores, Adaptive(6, 0.5));
  ASSERT_TRUE(out.ok()) << out.status();
  for (int l = 0; l < 2; ++l) {
    const KvHead& peaked = out->head(l, l);
    const KvHead& spread = out->head(l, 1 - l);
    EXPECT_THAT(peaked.pos, ::testing::ElementsAre(3, 11, 19)) << "layer " << l;
    EXPECT_THAT(spread.pos, ::testing::ElementsAre(11, 12, 13, 14, 15, 16, 17, 18, 19))
        << "layer " << l;
    for (int h = 0; h < 2; ++h) {  // rows moved with their positions
      const KvHead& kh = out->head(l, h);
      for (int64_t i = 0; i < kh.n(); ++i) {
        EXPECT_EQ(Fp16ToFp32(kh.k[i * 4]), Code(l, h, kh.pos[i]));
        EXPECT_EQ(Fp16ToFp32(kh.v[i * 4 + 3]), -Code(l, h, kh.pos[i]));
      }
    }
  }
  EXPECT_EQ(out->TotalEntries(), 2 * 2 * 6);  // the uniform total
  EXPECT_EQ(out->next_position, 20);
}

TEST(SelectTest, AdaptiveSafeguardKeepsEveryHeadItsShare) {
  KvCache cache = SyntheticCache(1, 2, 2, 30);
  HeadScores scores = ZeroScores(cache);
  for (int t = 0; t < 30; ++t) {
    scores[0][t] = 1e-4f * static_cast<float>(t);  // head 0 loses every comparison
    scores[1][t] = 1.f + static_cast<float>(t);
  }
  // kvpress: at least max(1, floor(alpha * budget)) per head; the rest is the layer's total.
  for (const auto& [alpha, want0] :
       std::vector<std::pair<double, int64_t>>{{0.0, 0}, {0.01, 1}, {0.2, 2}, {0.55, 5}}) {
    absl::StatusOr<KvCache> out = Select(cache, scores, Adaptive(10, alpha));
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->head(0, 0).n(), want0) << "alpha " << alpha;
    EXPECT_EQ(out->head(0, 1).n(), 20 - want0) << "alpha " << alpha;
    if (want0 > 0) {
      EXPECT_EQ(out->head(0, 0).pos.back(), 29);  // its own best entries
    }
  }
  // alpha 1 guarantees every head its whole budget: exactly the uniform selection.
  SelectOptions uniform;
  uniform.budget = 10;
  absl::StatusOr<KvCache> a = Select(cache, scores, Adaptive(10, 1.0));
  absl::StatusOr<KvCache> u = Select(cache, scores, uniform);
  ASSERT_TRUE(a.ok() && u.ok());
  for (int h = 0; h < 2; ++h) EXPECT_EQ(a->head(0, h).pos, u->head(0, h).pos);
}

TEST(SelectTest, AdaptiveKeepsForcedEntriesAndCountsThem) {
  KvCache cache = SyntheticCache(1, 2, 2, 24);
  HeadScores scores = ZeroScores(cache);
  for (int t = 0; t < 24; ++t) {
    scores[0][t] = -1.f - static_cast<float>(t);  // head 0's scores lose, sinks' included
    scores[1][t] = static_cast<float>(t % 7);
  }
  SelectOptions opt = Adaptive(8, 0.2);
  opt.n_sink = 2;
  opt.recent_from = 22;
  // Forced: 0, 1, 22, 23 in both heads. Head 0: those plus max(1, floor(0.2 * 4)) = 1 of its
  // own (its best, position 2); head 1 the layer's other 16 - 5 - 4 = 7 by score.
  absl::StatusOr<KvCache> out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_THAT(out->head(0, 0).pos, ::testing::ElementsAre(0, 1, 2, 22, 23));
  // Head 1's best unforced: score 6 at 6, 13, 20; score 5 at 5, 12, 19; score 4 at 18.
  EXPECT_THAT(out->head(0, 1).pos, ::testing::ElementsAre(0, 1, 5, 6, 12, 13, 18, 19, 20, 22, 23));
  EXPECT_EQ(out->TotalEntries(), 16);
  // Forced entries over the budget: each head keeps what uniform keeps, nothing moves.
  opt.budget = 3;
  SelectOptions uniform = opt;
  uniform.adaptive = false;
  out = Select(cache, scores, opt);
  absl::StatusOr<KvCache> u = Select(cache, scores, uniform);
  ASSERT_TRUE(out.ok() && u.ok());
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(out->head(0, h).pos, u->head(0, h).pos);
    EXPECT_EQ(out->head(0, h).n(), 3);
  }
}

TEST(SelectTest, AdaptiveTotalsOverUnevenHeadsAndNeverKeptEntries) {
  KvCache cache = SyntheticCache(1, 3, 2, 20);
  TruncateHeads(cache, std::vector<int64_t>{20, 3, 20});
  HeadScores scores = ZeroScores(cache);
  for (int t = 0; t < 20; ++t) {
    scores[0][t] = -std::numeric_limits<float>::infinity();
    scores[2][t] = static_cast<float>(t);
  }
  scores[0][4] = 100.f;  // head 0 wants one entry only
  scores[0][5] = std::nanf("");
  // Total min(3 * 8, 20 + 3 + 20) = 24: head 0 its one finite entry, head 1 all 3, head 2 20.
  absl::StatusOr<KvCache> out = Select(cache, scores, Adaptive(8, 0.2));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_THAT(out->head(0, 0).pos, ::testing::ElementsAre(4));
  EXPECT_EQ(out->head(0, 1).n(), 3);
  EXPECT_EQ(out->head(0, 2).n(), 20);
}

TEST(SelectTest, AdaptiveRandomScoresKeepTheUniformTotalPerLayer) {
  std::mt19937 rng(5);
  std::exponential_distribution<float> ed(1.f);
  KvCache cache = SyntheticCache(3, 4, 2, 50);
  HeadScores scores = ZeroScores(cache);
  for (size_t i = 0; i < scores.size(); ++i) {
    const float scale = static_cast<float>(1 + i % 4);  // heads of different concentration
    for (float& x : scores[i]) x = std::pow(ed(rng), scale);
  }
  SelectOptions opt = Adaptive(12, 0.2);
  opt.n_sink = 4;
  opt.recent_from = 46;
  absl::StatusOr<KvCache> out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok()) << out.status();
  bool uneven = false;
  for (int l = 0; l < 3; ++l) {
    int64_t total = 0;
    for (int h = 0; h < 4; ++h) {
      const KvHead& kh = out->head(l, h);
      total += kh.n();
      uneven = uneven || kh.n() != 12;
      // Floor: 8 forced + max(1, floor(0.2 * 4)) = 9.
      EXPECT_GE(kh.n(), 9) << "layer " << l << " head " << h;
      ASSERT_TRUE(std::is_sorted(kh.pos.begin(), kh.pos.end()));
      ASSERT_TRUE(std::adjacent_find(kh.pos.begin(), kh.pos.end()) == kh.pos.end());
      for (int32_t p : {0, 1, 2, 3, 46, 47, 48, 49}) {
        EXPECT_TRUE(std::binary_search(kh.pos.begin(), kh.pos.end(), p)) << "forced " << p;
      }
    }
    EXPECT_EQ(total, 4 * 12) << "layer " << l;
  }
  EXPECT_TRUE(uneven) << "adaptive selection kept exactly the budget in every head";
}

TEST(SelectTest, AdaptiveRejectsPerLayerAndAlphaOutOfRange) {
  KvCache cache = SyntheticCache(1, 2, 2, 6);
  SelectOptions opt = Adaptive(2, 0.2);
  opt.per_layer = true;
  absl::Status st = Select(cache, ZeroScores(cache), opt).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("per_layer"));
  for (double alpha : {-0.1, 1.5, std::nan("")}) {
    st = Select(cache, ZeroScores(cache), Adaptive(2, alpha)).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << alpha;
    EXPECT_THAT(std::string(st.message()), HasSubstr("alpha_safeguard")) << alpha;
  }
}

// KVzip's one threshold: the same sharing over every head of every layer. Layer 1's scores all
// beat layer 0's, so layer 0's heads keep their floors and layer 1's take the rest; the model
// keeps the uniform total (which no single layer does any more).
TEST(SelectTest, GlobalMovesBudgetAcrossLayers) {
  KvCache cache = SyntheticCache(2, 2, 2, 20);
  HeadScores scores = ZeroScores(cache);
  for (int h = 0; h < 2; ++h) {
    for (int t = 0; t < 20; ++t) {
      scores[0 * 2 + h][t] = 0.001f * static_cast<float>(t + 1);
      scores[1 * 2 + h][t] = 0.1f + 0.001f * static_cast<float>(t + 20 * h);
    }
  }
  SelectOptions opt = Adaptive(6, 0.5);
  opt.global = true;
  absl::StatusOr<KvCache> out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok()) << out.status();
  // Floor 3 per head (alpha 0.5 of 6); the other 4 x 6 - 4 x 3 = 12 go to layer 1's heads,
  // which hold 17 unkept entries each: the best 12 of their 34, head 1's (higher) first.
  for (int h = 0; h < 2; ++h) {
    EXPECT_THAT(out->head(0, h).pos, ::testing::ElementsAre(17, 18, 19)) << "head " << h;
  }
  EXPECT_EQ(out->head(1, 1).n(), 15);
  EXPECT_EQ(out->head(1, 0).n(), 3);
  EXPECT_EQ(out->TotalEntries(), 2 * 2 * 6);
  for (int l = 0; l < 2; ++l) {  // rows moved with their positions
    for (int h = 0; h < 2; ++h) {
      const KvHead& kh = out->head(l, h);
      for (int64_t i = 0; i < kh.n(); ++i) EXPECT_EQ(Fp16ToFp32(kh.k[i * 2]), Code(l, h, kh.pos[i]));
    }
  }
  // The same scores per layer alone (adaptive): every layer keeps its own uniform total.
  opt.global = false;
  out = Select(cache, scores, opt);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->head(0, 0).n() + out->head(0, 1).n(), 12);
  // global is a kind of adaptive selection: alone it is refused.
  SelectOptions bare;
  bare.budget = 6;
  bare.global = true;
  EXPECT_EQ(Select(cache, scores, bare).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SelectTest, PoolingMatchesPyTorchZeroPadding) {
  std::vector<float> s = {0, 0, 5, 0, 0, 0, 1};
  std::vector<float> avg = s;
  Pool1d(avg, 3, /*max_pool=*/false);
  EXPECT_THAT(avg, ::testing::Pointwise(
                       ::testing::FloatEq(),
                       std::vector<float>{0, 5.f / 3, 5.f / 3, 5.f / 3, 0, 1.f / 3, 1.f / 3}));
  std::vector<float> mx = s;
  Pool1d(mx, 3, /*max_pool=*/true);
  EXPECT_THAT(mx, ::testing::ElementsAre(0, 5, 5, 5, 0, 1, 1));
}

// finch pools over positions: contiguous positions give Pool1d's floats exactly; a position the
// head does not hold counts as a zero, and entries beyond the kernel's reach add nothing.
TEST(SelectTest, PoolingByPositionTreatsMissingPositionsAsZeros) {
  const std::vector<float> s = {0, 0, 5, 0, 0, 0, 1};
  std::vector<float> by_pos = s, pooled = s;
  PoolByPosition(by_pos, std::vector<int32_t>{10, 11, 12, 13, 14, 15, 16}, 3);
  Pool1d(pooled, 3, /*max_pool=*/false);
  EXPECT_THAT(by_pos, ::testing::Pointwise(::testing::Eq(), pooled));
  // Survivors at 0, 2, 3 and a chunk at 9..10: 2 and 3 are neighbours, 0 and 9 are not.
  std::vector<float> sparse = {3, 6, 9, 1, 2};
  PoolByPosition(sparse, std::vector<int32_t>{0, 2, 3, 9, 10}, 3);
  EXPECT_THAT(sparse, ::testing::Pointwise(::testing::FloatEq(),
                                           std::vector<float>{1, 5, 5, 1, 1}));
}

// ---- Spec ---------------------------------------------------------------------------------------

TEST(SpecTest, ValidationCodesAndMessages) {
  CompressionSpec s;
  s.method = "snapkv";
  s.ratio = 4;
  EXPECT_TRUE(s.Validate().ok());
  auto code_of = [](CompressionSpec spec) { return spec.Validate(); };
  CompressionSpec bad = s;
  bad.method = "snap";
  EXPECT_EQ(code_of(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(code_of(bad).message()), HasSubstr("finch"));
  bad = s;
  bad.ratio = 1;
  EXPECT_THAT(std::string(code_of(bad).message()), HasSubstr("ratio must be > 1"));
  bad = s;
  bad.ratio = 0;
  EXPECT_THAT(std::string(code_of(bad).message()), HasSubstr("needs a ratio"));
  bad = s;
  bad.budget = 100;
  EXPECT_THAT(std::string(code_of(bad).message()), HasSubstr("not both"));
  bad = s;
  bad.kernel = 4;
  EXPECT_EQ(code_of(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = s;
  bad.pooling = "median";
  EXPECT_EQ(code_of(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = s;
  bad.method = "none";
  EXPECT_EQ(code_of(bad).code(), absl::StatusCode::kInvalidArgument);
  bad.ratio = 0;
  EXPECT_TRUE(code_of(bad).ok());
  bad = s;
  bad.ratio = std::nan("");
  EXPECT_EQ(code_of(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = s;
  bad.kv_dtype = "int2";
  EXPECT_EQ(code_of(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(code_of(bad).message()), HasSubstr("fp16, int8 or int4"));
}

// Issue 14: every integer knob had only a lower bound; n_future = 2^31-1 (~27 us per unit)
// held a worker for hours. Each knob is refused just past its bound, naming it and the bound,
// and accepted at the bound.
TEST(SpecTest, EveryKnobHasAnUpperBoundNamedInTheError) {
  CompressionSpec base;
  base.method = "snapkv";
  base.ratio = 4;
  struct Knob {
    const char* name;
    std::function<void(CompressionSpec&, int64_t)> set;
    int64_t max;
    const char* bound;  // how the message states the bound
  };
  const std::vector<Knob> knobs = {
      {"n_future", [](CompressionSpec& s, int64_t v) { s.n_future = static_cast<int>(v); },
       kMaxNFuture, "16384"},
      {"chunk", [](CompressionSpec& s, int64_t v) { s.chunk = static_cast<int>(v); }, kMaxChunk,
       "8192"},
      {"n_sink", [](CompressionSpec& s, int64_t v) { s.n_sink = static_cast<int>(v); }, kMaxNSink,
       "1048576"},
      {"window", [](CompressionSpec& s, int64_t v) { s.window = static_cast<int>(v); }, kMaxWindow,
       "1048576"},
      {"max_positions", [](CompressionSpec& s, int64_t v) { s.max_positions = v; }, kMaxPositions,
       "16777216"},
      // Odd only: the bound is odd, and bound + 2 is the next candidate.
      {"kernel", [](CompressionSpec& s, int64_t v) { s.kernel = static_cast<int>(v); }, kMaxKernel,
       "63"},
  };
  for (const Knob& k : knobs) {
    SCOPED_TRACE(k.name);
    CompressionSpec s = base;
    k.set(s, k.max);
    EXPECT_TRUE(s.Validate().ok()) << s.Validate();
    k.set(s, std::string(k.name) == "kernel" ? k.max + 2 : k.max + 1);
    EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.Validate().message()), HasSubstr(k.name));
    EXPECT_THAT(std::string(s.Validate().message()), HasSubstr(k.bound));
  }
  CompressionSpec s = base;
  s.ratio = 0;
  s.budget = kMaxCompressBudget + 1;
  EXPECT_THAT(std::string(s.Validate().message()), HasSubstr("16777216"));
  s.budget = kMaxCompressBudget;
  EXPECT_TRUE(s.Validate().ok());
  s = base;
  s.ratio = 2e6;
  EXPECT_THAT(std::string(s.Validate().message()), HasSubstr("ratio"));
  s = base;
  s.method = "anchor";
  s.separators = std::string(kMaxSeparatorsBytes + 1, '.');
  EXPECT_THAT(std::string(s.Validate().message()), HasSubstr("separators is 257 bytes"));
  s.separators = std::string(kMaxSeparatorsBytes, '.');
  EXPECT_TRUE(s.Validate().ok());
}

TEST(SpecTest, HeadBudgetValidation) {
  CompressionSpec s;
  s.method = "snapkv";
  s.ratio = 4;
  s.head_budget = "adaptive";
  for (const char* m : {"snapkv", "finch", "expected_attention", "kvzip"}) {
    s.method = m;
    EXPECT_TRUE(s.Validate().ok()) << m << ": " << s.Validate();
  }
  auto message = [](const CompressionSpec& spec) {
    const absl::Status st = spec.Validate();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    return std::string(st.message());
  };
  CompressionSpec bad = s;
  bad.head_budget = "ada";
  EXPECT_THAT(message(bad), HasSubstr("\"uniform\""));
  EXPECT_THAT(message(bad), HasSubstr("\"adaptive\""));
  EXPECT_THAT(message(bad), HasSubstr("\"ada\""));
  for (const char* m : {"streaming", "anchor"}) {
    bad = s;
    bad.method = m;
    EXPECT_THAT(message(bad), HasSubstr("by position")) << m;
  }
  bad = s;
  bad.method = "none";
  bad.ratio = 0;
  EXPECT_THAT(message(bad), HasSubstr("keeps everything"));
  bad = s;
  bad.per_layer = true;
  EXPECT_THAT(message(bad), HasSubstr("per_layer"));
  bad = s;
  bad.head_budget_alpha = 1.5;
  EXPECT_THAT(message(bad), HasSubstr("[0, 1]"));
  bad = s;
  bad.head_budget_alpha = 0;  // no safeguard: allowed
  EXPECT_TRUE(bad.Validate().ok());
  bad.head_budget = "uniform";  // an alpha that would do nothing is refused
  EXPECT_THAT(message(bad), HasSubstr("only with head_budget \"adaptive\""));
  // "global": KVzip's one threshold over the whole model; not finch (chunk by chunk).
  CompressionSpec g = s;
  g.head_budget = "global";
  for (const char* m : {"snapkv", "expected_attention", "kvzip"}) {
    g.method = m;
    EXPECT_TRUE(g.Validate().ok()) << m << ": " << g.Validate();
  }
  g.method = "finch";
  EXPECT_THAT(message(g), HasSubstr("chunk by chunk"));
  g.method = "streaming";
  EXPECT_THAT(message(g), HasSubstr("by position"));
  g.method = "kvzip";
  g.per_layer = true;
  EXPECT_THAT(message(g), HasSubstr("per_layer"));
  bad = s;
  bad.head_budget = "Global";
  EXPECT_THAT(message(bad), HasSubstr("\"global\""));
  // Unset: the method's default, global for kvzip (uniform with per_layer), else uniform.
  CompressionSpec d;
  d.ratio = 4;
  for (const char* m : {"snapkv", "finch", "expected_attention", "kvzip", "streaming"}) {
    d.method = m;
    d.per_layer = false;
    EXPECT_EQ(d.HeadBudget(), std::string(m) == "kvzip" ? "global" : "uniform") << m;
    EXPECT_TRUE(d.Validate().ok()) << m << ": " << d.Validate();
    d.per_layer = true;
    EXPECT_EQ(d.HeadBudget(), "uniform") << m;
    EXPECT_TRUE(d.Validate().ok()) << m << " per_layer: " << d.Validate();
  }
}

TEST(SpecTest, CanonicalParamsAreSortedAndMethodSpecific) {
  CompressionSpec s;
  s.method = "snapkv";
  s.ratio = 8;
  EXPECT_EQ(s.CanonicalParams(), "kernel=5;n_sink=4;per_layer=0;pooling=avg;ratio=8");
  s.question = "anything";  // hashed separately into the cache key
  EXPECT_EQ(s.CanonicalParams(), "kernel=5;n_sink=4;per_layer=0;pooling=avg;ratio=8");
  CompressionSpec a;
  a.method = "anchor";
  a.budget = 300;
  EXPECT_EQ(a.CanonicalParams(),
            "budget=300;n_sink=4;per_layer=0;separators=.,?!\\;:\\n;window=64");
  CompressionSpec none;
  none.method = "none";
  EXPECT_EQ(none.CanonicalParams(), "");
  // kv_dtype only when not the default, so fp16 contexts keep the keys they always had.
  none.kv_dtype = "int4";
  EXPECT_EQ(none.CanonicalParams(), "kv_dtype=int4");
  s.kv_dtype = "int8";
  EXPECT_EQ(s.CanonicalParams(), "kernel=5;kv_dtype=int8;n_sink=4;per_layer=0;pooling=avg;ratio=8");
  s.kv_dtype = "fp16";
  // head_budget only when not the default: every uniform key above stays what it was.
  s.head_budget = "adaptive";
  EXPECT_EQ(s.CanonicalParams(),
            "head_budget=adaptive;head_budget_alpha=0.2;kernel=5;n_sink=4;per_layer=0;pooling=avg;"
            "ratio=8");
  s.head_budget_alpha = 0.35;
  EXPECT_THAT(s.CanonicalParams(), HasSubstr("head_budget_alpha=0.35;"));
}

// Issue 14: float params printed with 6 significant digits, so ratio 3.999999 and 4 (different
// budgets) shared one canonical form and one cache key. Now every float param is the shortest
// decimal that reads back exactly: distinct doubles never share a form, short ones print as
// they always did (so their keys did not move).
TEST(SpecTest, CanonicalFloatParamsAreExact) {
  CompressionSpec s;
  s.method = "streaming";
  s.ratio = 4;
  EXPECT_EQ(s.CanonicalParams(), "n_sink=4;per_layer=0;ratio=4");
  s.ratio = 3.999999;
  EXPECT_EQ(s.CanonicalParams(), "n_sink=4;per_layer=0;ratio=3.999999");
  s.ratio = 2.5;
  EXPECT_EQ(s.CanonicalParams(), "n_sink=4;per_layer=0;ratio=2.5");
  std::mt19937_64 rng(14);
  std::uniform_real_distribution<double> dist(1.0, 64.0);
  for (int i = 0; i < 1000; ++i) {
    const double r = dist(rng);
    const double next = std::nextafter(r, 100.0);
    CompressionSpec a = s, b = s;
    a.ratio = r;
    b.ratio = next;
    ASSERT_NE(a.CanonicalParams(), b.CanonicalParams()) << r;
    // And it round-trips: the printed ratio is the ratio.
    const std::string params = a.CanonicalParams();
    const double back = std::stod(params.substr(params.find("ratio=") + 6));
    ASSERT_EQ(back, r);
  }
  CompressionSpec ada;
  ada.method = "snapkv";
  ada.ratio = 4;
  ada.head_budget = "adaptive";
  ada.head_budget_alpha = 0.2000001;
  EXPECT_THAT(ada.CanonicalParams(), HasSubstr("head_budget_alpha=0.2000001;"));
}

// ---- RoPE re-rotation and query recovery -------------------------------------------------------

RopeParams TestRope(bool neox) {
  RopeParams p;
  p.head_dim = 64;
  p.rope_dim = 64;
  p.freq_base = 10000.f;
  p.neox = neox;
  return p;
}

TEST(RerotationTest, ShiftThereAndBackRestoresKeys) {
  for (bool neox : {false, true}) {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 3.f);
    const int n = 50;
    std::vector<float> x(static_cast<size_t>(n) * 64);
    for (float& v : x) v = nd(rng);
    std::vector<float> y = x;
    for (int32_t d : {1, 37, 4096, 24000}) {
      ShiftRope(y.data(), n, 1, d, TestRope(neox));
      ShiftRope(y.data(), n, 1, -d, TestRope(neox));
      for (size_t i = 0; i < x.size(); ++i) {
        // Two rotations in fp32: a few ulps of the pair's norm (|x| <~ 15 here).
        ASSERT_NEAR(y[i], x[i], 1e-5f * 16) << "delta " << d << " neox " << neox;
      }
    }
  }
}

TEST(RerotationTest, ShiftEqualsRotatingAtTheShiftedPosition) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> raw(64);
  for (float& v : raw) v = nd(rng);
  std::vector<float> a = raw, b = raw;
  const int32_t p = 100, delta = 1234, shifted = p + delta;
  ApplyRope(a.data(), &p, 1, 1, TestRope(false));
  ShiftRope(a.data(), 1, 1, delta, TestRope(false));
  ApplyRope(b.data(), &shifted, 1, 1, TestRope(false));
  // The float angle recurrence of the two paths differs by ~1e-7 * angle (angles up to 1334).
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(a[i], b[i], 2e-3f);
}

TEST(QueryRecoveryTest, RecoversQueriesFromSoftmaxProbabilities) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int hd = 64, n = 300, rows = 3;
  std::vector<float> keys(static_cast<size_t>(n) * hd), q(static_cast<size_t>(rows) * hd);
  for (float& v : keys) v = nd(rng) * 2.f;
  for (float& v : q) v = nd(rng);
  const float scale = 1.0f / 8.0f;
  std::vector<std::vector<float>> probs(rows, std::vector<float>(n));
  std::vector<const float*> ptrs;
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < n; ++j) {
      float dot = 0;
      for (int i = 0; i < hd; ++i) dot += q[r * hd + i] * keys[j * hd + i];
      probs[r][j] = dot * scale;
    }
    Softmax(probs[r].data(), n);
    ptrs.push_back(probs[r].data());
  }
  std::vector<float> got(q.size());
  RecoverQueries(keys.data(), n, hd, ptrs, scale, got.data());
  for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(got[i], q[i], 1e-3f) << i;
}

// ---- Real models ------------------------------------------------------------------------------

// Runs on the real model named by the parameter (test_util.h: SharedTestModel; instantiated
// for both models at the end of the file). A model that has not been fetched skips with the
// reason unless CTXCACHE_REQUIRE_MODEL=1.
class CompressModelTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const auto& shared = testing::SharedTestModel(GetParam());
    testing::RequireModel(shared, absl::StrCat("model ", GetParam()));
    if (IsSkipped() || HasFatalFailure()) return;
    model_ = shared->get();
    pool_ = std::make_unique<ThreadPool>(ThreadPool::HardwareThreads());
    runner_ = std::make_unique<Runner>(model(), pool_.get());
  }
  const Model& model() const { return *model_; }
  // The model's llama.cpp parity bounds (test_util.h), for comparisons of logits.
  const testing::ParityTolerance& tol() const { return testing::ToleranceFor(GetParam()); }
  std::vector<int32_t> Tokens(const std::string& text, bool bos) {
    return model().tokenizer().Encode(text, bos, false);
  }
  // Greedy continuation of `prompt` on a copy of `cache`.
  std::string Answer(const KvCache& cache, const std::string& prompt, int max_tokens = 8) {
    KvCache work = cache;
    GenerateParams params;
    params.max_tokens = max_tokens;
    params.sampling = SamplingParams::Greedy();
    absl::StatusOr<GenerateResult> r =
        Generate(*runner_, work, Tokens(prompt, false), params, nullptr);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->text : "";
  }
  // Greedy generation on a copy of `cache`, with an optional decode policy.
  GenerateResult Greedy(const KvCache& cache, const std::string& prompt, int max_tokens,
                        const DecodePolicy& decode = {}) {
    KvCache work = cache;
    GenerateParams params;
    params.max_tokens = max_tokens;
    params.sampling = SamplingParams::Greedy();
    params.ignore_eos = true;  // a fixed number of tokens to compare
    params.decode = decode;
    absl::StatusOr<GenerateResult> r =
        Generate(*runner_, work, Tokens(prompt, false), params, nullptr);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *std::move(r) : GenerateResult{};
  }
  Runner& runner() { return *runner_; }

  const Model* model_ = nullptr;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<Runner> runner_;
};

// Tests of engine bookkeeping that does not depend on the model, or too long to be worth a
// second model: the default model only.
class DefaultCompressModelTest : public CompressModelTest {};

// Every logit finite: what a wrong mask, an empty head or a NaN from a pruned cache breaks.
void ExpectFinite(const std::vector<float>& logits, const std::string& what) {
  ASSERT_FALSE(logits.empty()) << what;
  for (size_t i = 0; i < logits.size(); ++i) {
    ASSERT_TRUE(std::isfinite(logits[i])) << what << ": logit " << i << " = " << logits[i];
  }
}

std::string Filler(int sentences) {
  static const char* const kLines[] = {"The grass is green.",
                                       "The sky is blue.",
                                       "The sun is yellow.",
                                       "Here we go.",
                                       "There and back again.",
                                       "Birds sing in the morning, and the river runs slowly.",
                                       "A farmer walked to the market; he sold apples and pears."};
  std::string out;
  for (int i = 0; i < sentences; ++i) out += absl::StrCat(kLines[i % 7], i % 5 == 4 ? "\n" : " ");
  return out;
}

void ExpectWellFormed(const CompressedContext& ctx, int64_t budget, bool exact, int n_sink,
                      const std::string& what) {
  for (int l = 0; l < ctx.kv.n_layers(); ++l) {
    for (int h = 0; h < ctx.kv.n_kv_heads(); ++h) {
      const KvHead& kh = ctx.kv.head(l, h);
      if (exact) {
        ASSERT_EQ(kh.n(), budget) << what << " layer " << l << " head " << h;
      } else {
        ASSERT_LE(kh.n(), budget) << what;
      }
      ASSERT_TRUE(std::is_sorted(kh.pos.begin(), kh.pos.end())) << what;
      ASSERT_TRUE(std::adjacent_find(kh.pos.begin(), kh.pos.end()) == kh.pos.end()) << what;
      for (int s = 0; s < n_sink; ++s) ASSERT_EQ(kh.pos[s], s) << what << ": sink " << s;
    }
  }
}

TEST_P(CompressModelTest, EveryMethodKeepsTheBudgetAndSinksDeterministically) {
  const std::vector<int32_t> doc = Tokens(Filler(40), true);
  const int64_t n = static_cast<int64_t>(doc.size());
  for (const char* method :
       {"streaming", "snapkv", "finch", "expected_attention", "kvzip", "anchor"}) {
    CompressionSpec spec;
    spec.method = method;
    spec.ratio = 4;
    spec.chunk = 128;  // several finch / kvzip chunks
    spec.window = 16;
    spec.question = "What does the farmer sell?";
    // Every head keeps exactly the budget (kvzip's default, "global", is checked by
    // GlobalHeadBudgetKeepsTheModelsTotalAcrossLayers).
    spec.head_budget = "uniform";
    const int64_t budget = (n + 3) / 4;
    absl::StatusOr<CompressedContext> a = Compress(runner(), doc, spec);
    ASSERT_TRUE(a.ok()) << method << ": " << a.status();
    EXPECT_EQ(a->method, method);
    EXPECT_EQ(a->source_tokens, n);
    EXPECT_EQ(a->model_fingerprint, model().fingerprint());
    EXPECT_EQ(a->params, spec.CanonicalParams());
    EXPECT_EQ(a->kv.next_position, n) << method;
    ExpectWellFormed(*a, budget, std::string(method) != "anchor", spec.n_sink, method);
    if (std::string(method) == "streaming") {
      EXPECT_EQ(a->kv.head(3, 1).pos.back(), n - 1);
      EXPECT_EQ(a->kv.head(3, 1).pos[4], n - (budget - 4));
    }
    {  // usable: a question prefilled on the compressed context gives finite logits
      KvCache work = a->kv;
      std::vector<float> logits;
      ASSERT_TRUE(runner().Forward(Tokens("\nAnswer:", false), work, {}, &logits).ok()) << method;
      ExpectFinite(logits, method);
    }
    absl::StatusOr<CompressedContext> b = Compress(runner(), doc, spec);
    ASSERT_TRUE(b.ok());
    for (int l = 0; l < model().config().n_layers; ++l) {
      for (int h = 0; h < model().config().n_kv_heads; ++h) {
        ASSERT_EQ(a->kv.head(l, h).pos, b->kv.head(l, h).pos) << method << " not deterministic";
        ASSERT_EQ(a->kv.head(l, h).k, b->kv.head(l, h).k) << method;
      }
    }
    if (std::string(method) == "snapkv") {  // per-layer: one token set shared by the heads
      spec.per_layer = true;
      absl::StatusOr<CompressedContext> p = Compress(runner(), doc, spec);
      ASSERT_TRUE(p.ok()) << p.status();
      ExpectWellFormed(*p, budget, true, spec.n_sink, "snapkv per_layer");
      EXPECT_EQ(p->kv.head(7, 0).pos, p->kv.head(7, model().config().n_kv_heads - 1).pos);
    }
  }
}

// head_budget "adaptive" on every method that takes it: each layer keeps exactly the uniform
// total, every head at least its sinks plus the safeguard, the heads differ, the params say
// so, and the result is usable; finch also beyond its window (compact positions).
TEST_P(DefaultCompressModelTest, AdaptiveHeadBudgetKeepsTheUniformTotalForEveryScoringMethod) {
  const std::vector<int32_t> doc = Tokens(Filler(40), true);
  const int64_t n = static_cast<int64_t>(doc.size());
  const ModelConfig& c = model().config();
  for (const char* method : {"snapkv", "finch", "expected_attention", "kvzip"}) {
    CompressionSpec spec;
    spec.method = method;
    spec.ratio = 4;
    spec.chunk = 128;
    spec.question = "What does the farmer sell?";
    const int64_t budget = (n + 3) / 4;
    spec.head_budget = "uniform";
    absl::StatusOr<CompressedContext> uniform = Compress(runner(), doc, spec);
    spec.head_budget = "adaptive";
    absl::StatusOr<CompressedContext> a = Compress(runner(), doc, spec);
    ASSERT_TRUE(uniform.ok() && a.ok()) << method << ": " << a.status();
    EXPECT_THAT(a->params, HasSubstr("head_budget=adaptive;head_budget_alpha=0.2;")) << method;
    EXPECT_EQ(a->kv.next_position, n) << method;
    EXPECT_EQ(a->kv.TotalEntries(), uniform->kv.TotalEntries()) << method;
    const int64_t floor = spec.n_sink + static_cast<int64_t>(0.2 * (budget - spec.n_sink));
    int uneven = 0;
    for (int l = 0; l < c.n_layers; ++l) {
      int64_t total = 0;
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const KvHead& kh = a->kv.head(l, h);
        total += kh.n();
        uneven += kh.n() != budget;
        ASSERT_GE(kh.n(), floor) << method << " layer " << l << " head " << h;
        ASSERT_TRUE(std::is_sorted(kh.pos.begin(), kh.pos.end())) << method;
        ASSERT_TRUE(std::adjacent_find(kh.pos.begin(), kh.pos.end()) == kh.pos.end()) << method;
        for (int s = 0; s < spec.n_sink; ++s) ASSERT_EQ(kh.pos[s], s) << method << " sink " << s;
      }
      ASSERT_EQ(total, budget * c.n_kv_heads) << method << " layer " << l;
    }
    EXPECT_GT(uneven, 0) << method << ": every head kept exactly the uniform budget";
    std::printf("%s adaptive: %d of %d heads differ from the uniform %lld\n", method, uneven,
                c.n_layers * c.n_kv_heads, static_cast<long long>(budget));
    KvCache work = a->kv;
    std::vector<float> logits;
    ASSERT_TRUE(runner().Forward(Tokens("\nAnswer:", false), work, {}, &logits).ok()) << method;
    ExpectFinite(logits, method);
  }
  // Finch beyond a 768-position window: heads of different lengths at compact positions.
  std::vector<int32_t> long_doc = Tokens(Filler(300), true);
  ASSERT_GT(long_doc.size(), 2000u);
  long_doc.resize(2000);
  CompressionSpec finch;
  finch.method = "finch";
  finch.ratio = 16;
  finch.chunk = 256;
  finch.max_positions = 768;
  finch.head_budget = "adaptive";
  finch.question = "\nWhat does the farmer sell?";
  absl::StatusOr<CompressedContext> f = Compress(runner(), long_doc, finch);
  ASSERT_TRUE(f.ok()) << f.status();
  for (int l = 0; l < c.n_layers; ++l) {
    int64_t total = 0;
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const KvHead& kh = f->kv.head(l, h);
      total += kh.n();
      for (int64_t i = 0; i < kh.n(); ++i) ASSERT_EQ(kh.pos[i], i) << "layer " << l;
    }
    ASSERT_EQ(total, 125 * c.n_kv_heads) << "layer " << l;
  }
  EXPECT_EQ(f->kv.next_position, f->kv.MaxEntries());
  KvCache work = f->kv;
  std::vector<float> logits;
  ASSERT_TRUE(runner().Forward(Tokens("\nAnswer:", false), work, {}, &logits).ok());
  ExpectFinite(logits, "finch adaptive beyond its window");
  finch.ratio = 4;  // 500 x 3 heads + chunk + question > 768: refused up front
  absl::Status st = Compress(runner(), long_doc, finch).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(st.message()), HasSubstr("budget x KV heads"));
}

// head_budget "global" (KVzip's one threshold): the model keeps the uniform total, every head
// at least its sinks plus the safeguard, the layers' totals differ, and the result is usable.
TEST_P(DefaultCompressModelTest, GlobalHeadBudgetKeepsTheModelsTotalAcrossLayers) {
  const std::vector<int32_t> doc = Tokens(Filler(40), true);
  const int64_t n = static_cast<int64_t>(doc.size());
  const ModelConfig& c = model().config();
  for (const char* method : {"snapkv", "expected_attention", "kvzip"}) {
    CompressionSpec spec;
    spec.method = method;
    spec.ratio = 4;
    spec.chunk = 128;
    spec.question = "What does the farmer sell?";
    const int64_t budget = (n + 3) / 4;
    spec.head_budget = "uniform";
    absl::StatusOr<CompressedContext> uniform = Compress(runner(), doc, spec);
    spec.head_budget = "global";
    absl::StatusOr<CompressedContext> g = Compress(runner(), doc, spec);
    ASSERT_TRUE(uniform.ok() && g.ok()) << method << ": " << g.status();
    EXPECT_THAT(g->params, HasSubstr("head_budget=global;head_budget_alpha=0.2;")) << method;
    EXPECT_EQ(g->kv.TotalEntries(), uniform->kv.TotalEntries()) << method;
    const int64_t floor = spec.n_sink + static_cast<int64_t>(0.2 * (budget - spec.n_sink));
    int uneven_layers = 0;
    for (int l = 0; l < c.n_layers; ++l) {
      int64_t total = 0;
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const KvHead& kh = g->kv.head(l, h);
        total += kh.n();
        ASSERT_GE(kh.n(), floor) << method << " layer " << l << " head " << h;
        ASSERT_TRUE(std::is_sorted(kh.pos.begin(), kh.pos.end())) << method;
        for (int s = 0; s < spec.n_sink; ++s) ASSERT_EQ(kh.pos[s], s) << method << " sink " << s;
      }
      uneven_layers += total != budget * c.n_kv_heads;
    }
    EXPECT_GT(uneven_layers, 0) << method << ": every layer kept exactly its uniform total";
    std::printf("%s global: %d of %d layers differ from the uniform total\n", method,
                uneven_layers, c.n_layers);
    KvCache work = g->kv;
    std::vector<float> logits;
    ASSERT_TRUE(runner().Forward(Tokens("\nAnswer:", false), work, {}, &logits).ok()) << method;
    ExpectFinite(logits, method);
  }
}

// The quality harness prefills a document once and scores it once per method, then selects
// at every ratio: that must give exactly what Compress gives for each (method, ratio), and
// leave the shared prefill as it was for the next method.
TEST_P(DefaultCompressModelTest, SharedPrefillScoresSelectLikeCompress) {
  const std::vector<int32_t> doc = Tokens(Filler(30), true);
  absl::StatusOr<KvCache> prefill = PrefillDocument(runner(), doc);
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  const KvCache pristine = *prefill;
  for (const char* method : {"streaming", "snapkv", "expected_attention", "kvzip", "anchor"}) {
    CompressionSpec spec;
    spec.method = method;
    spec.ratio = 2;
    spec.chunk = 96;
    spec.window = 16;
    spec.question = "What does the farmer sell?";
    absl::StatusOr<DocumentScores> scores = ScoreDocument(runner(), doc, *prefill, spec);
    ASSERT_TRUE(scores.ok()) << method << ": " << scores.status();
    for (int l = 0; l < model().config().n_layers; ++l) {
      for (int h = 0; h < model().config().n_kv_heads; ++h) {
        ASSERT_EQ(prefill->head(l, h).pos, pristine.head(l, h).pos) << method;
        ASSERT_EQ(prefill->head(l, h).k, pristine.head(l, h).k) << method << " changed keys";
        ASSERT_EQ(prefill->head(l, h).v, pristine.head(l, h).v) << method << " changed values";
      }
    }
    ASSERT_EQ(prefill->next_position, pristine.next_position) << method;
    for (double ratio : {2.0, 8.0}) {
      spec.ratio = ratio;
      absl::StatusOr<CompressedContext> shared = SelectScored(model(), *prefill, *scores, spec);
      absl::StatusOr<CompressedContext> direct = Compress(runner(), doc, spec);
      ASSERT_TRUE(shared.ok() && direct.ok()) << method;
      EXPECT_EQ(shared->params, direct->params);
      EXPECT_EQ(shared->kv.next_position, direct->kv.next_position);
      for (int l = 0; l < model().config().n_layers; ++l) {
        for (int h = 0; h < model().config().n_kv_heads; ++h) {
          ASSERT_EQ(shared->kv.head(l, h).pos, direct->kv.head(l, h).pos)
              << method << " ratio " << ratio << " layer " << l << " head " << h;
          ASSERT_EQ(shared->kv.head(l, h).k, direct->kv.head(l, h).k) << method;
        }
      }
    }
  }
  CompressionSpec finch;
  finch.method = "finch";
  finch.ratio = 2;
  absl::StatusOr<DocumentScores> no = ScoreDocument(runner(), doc, *prefill, finch);
  EXPECT_EQ(no.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no.status().message()), HasSubstr("selects while it prefills"));
}

TEST_P(CompressModelTest, ErrorsAreClear) {
  CompressionSpec spec;
  spec.method = "snapkv";
  spec.ratio = 4;
  EXPECT_EQ(Compress(runner(), {}, spec).status().code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> doc = Tokens("A short document.", true);
  CompressionSpec long_q = spec;
  std::string q;  // the limit is a quarter of the model's window (SmolLM2 2048, Qwen 8192)
  for (int i = 0; i < model().config().n_ctx_train / 4 + 50; ++i) q += " why";
  long_q.question = q;
  absl::Status st = Compress(runner(), doc, long_q).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("too long"));
  CompressionSpec bad = spec;
  bad.method = "h2o";
  EXPECT_EQ(Compress(runner(), doc, bad).status().code(), absl::StatusCode::kInvalidArgument);
  // Too long for a single-window method: OutOfRange pointing at finch.
  const std::vector<int32_t> huge(model().config().n_ctx_train + 10, doc[1]);
  st = Compress(runner(), huge, spec).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(st.message()), HasSubstr("finch"));
}

// Composition places context 2 right after context 1 by an exact RoPE shift. Reference: the
// same two independent prefills, the second run directly at positions len1.. (what composition
// must reproduce; a joint prefill of doc1+doc2 differs by design, since doc2 never attended
// to doc1).
TEST_P(CompressModelTest, ComposedContextsMatchDirectlyPositionedPrefills) {
  const std::vector<int32_t> d1 = Tokens("Alice keeps a red notebook in her desk. ", true);
  const std::vector<int32_t> d2 = Tokens("Bob has a green bicycle in his garage.", false);
  CompressionSpec none;
  none.method = "none";
  absl::StatusOr<CompressedContext> c1 = Compress(runner(), d1, none);
  absl::StatusOr<CompressedContext> c2 = Compress(runner(), d2, none);
  ASSERT_TRUE(c1.ok() && c2.ok());
  const CompressedContext* parts[] = {&*c1, &*c2};
  absl::StatusOr<KvCache> composed = ComposeContexts(parts, model());
  ASSERT_TRUE(composed.ok()) << composed.status();
  const int32_t n1 = static_cast<int32_t>(d1.size()), n2 = static_cast<int32_t>(d2.size());
  EXPECT_EQ(composed->next_position, n1 + n2);

  KvCache direct = model().NewKvCache();
  ASSERT_TRUE(runner().Forward(d1, direct, {}, nullptr).ok());
  KvCache second = model().NewKvCache();
  second.next_position = n1;
  ASSERT_TRUE(runner().Forward(d2, second, {}, nullptr).ok());
  for (int l = 0; l < model().config().n_layers; ++l) {
    for (int h = 0; h < model().config().n_kv_heads; ++h) {
      KvHead& dst = direct.head(l, h);
      const KvHead& src = second.head(l, h);
      dst.k.insert(dst.k.end(), src.k.begin(), src.k.end());
      dst.v.insert(dst.v.end(), src.v.begin(), src.v.end());
      dst.pos.insert(dst.pos.end(), src.pos.begin(), src.pos.end());
      ASSERT_EQ(composed->head(l, h).pos, dst.pos);
    }
  }
  direct.next_position = n1 + n2;
  const std::vector<int32_t> prompt = Tokens(" Question: what colour is the bicycle?", false);
  std::vector<float> want, got;
  ASSERT_TRUE(runner().Forward(prompt, direct, {}, &want).ok());
  ASSERT_TRUE(runner().Forward(prompt, *composed, {}, &got).ok());
  auto diffs = [&](const std::vector<float>& a, const std::vector<float>& b) {
    float mx = 0;
    double sum = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      mx = std::max(mx, std::abs(a[i] - b[i]));
      sum += std::abs(a[i] - b[i]);
    }
    return std::make_pair(mx, static_cast<float>(sum / a.size()));
  };
  const auto [max_diff, mean_diff] = diffs(want, got);
  // Control: the same composition shifted one position too far.
  const int64_t hd = model().config().head_dim;
  KvCache off_by_one = *composed;
  for (int l = 0; l < model().config().n_layers; ++l) {
    for (int h = 0; h < model().config().n_kv_heads; ++h) {
      KvHead& kh = off_by_one.head(l, h);
      std::vector<float> k = ToFloats(kh.k);
      ShiftRope(k.data() + n1 * hd, n2, 1, 1, RopeParamsFor(model().config()));
      for (size_t i = n1 * hd; i < k.size(); ++i) kh.k[i] = Fp32ToFp16(k[i]);
    }
  }
  std::vector<float> wrong;
  ASSERT_TRUE(runner().Forward(prompt, off_by_one, {}, &wrong).ok());
  const auto [wrong_max, wrong_mean] = diffs(want, wrong);
  std::printf("composition vs direct: max %.4f mean %.4f; off-by-one shift: max %.4f mean %.4f\n",
              max_diff, mean_diff, wrong_max, wrong_mean);
  // Layer 0 keys see only the token embeddings, so there the shift is the only difference:
  // shifted keys must equal keys rotated at the shifted position within fp16 rounding.
  for (int h = 0; h < model().config().n_kv_heads; ++h) {
    const std::vector<float> a = ToFloats(composed->head(0, h).k);
    const std::vector<float> b = ToFloats(direct.head(0, h).k);
    for (size_t i = n1 * hd; i < a.size(); ++i) {
      ASSERT_NEAR(a[i], b[i], 2e-3f * std::max(1.0f, std::abs(b[i]))) << "head " << h;
    }
  }
  // Deeper layers run doc2 at other absolute positions, whose rounding SmolLM2 amplifies to
  // logit noise of mean ~0.2 (see test_util.h): the model's parity bounds apply, and the
  // off-by-one control must sit far above them. Measured: SmolLM2 off-by-one mean ~1.5;
  // Qwen2.5 composition mean 0.044, max 0.25, off-by-one mean 0.59 (its freq_base 1e6 turns
  // most dimensions slowly, so one position moves less).
  EXPECT_LT(mean_diff, tol().mean_abs);
  EXPECT_LT(max_diff, tol().max_abs);
  EXPECT_GT(wrong_mean, 3 * mean_diff);

  CompressedContext foreign = *c1;
  foreign.model_fingerprint = "0123abcd";
  const CompressedContext* bad[] = {&foreign};
  absl::Status st = ComposeContexts(bad, model()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()), HasSubstr("0123abcd"));
  EXPECT_THAT(std::string(st.message()), HasSubstr(model().fingerprint()));
  CompressedContext wrong_shape = *c1;
  wrong_shape.kv = KvCache(2, 3, static_cast<int>(hd));
  const CompressedContext* bad2[] = {&wrong_shape};
  EXPECT_EQ(ComposeContexts(bad2, model()).status().code(), absl::StatusCode::kInvalidArgument);
}

// A needle in ~1500 tokens of filler must survive ratio-8 compression by the prompt-guided
// methods and by SelectForQuery.
TEST_P(CompressModelTest, NeedleSurvivesPromptGuidedCompression) {
  const std::string text = Filler(100) + "The secret code is 4729. " + Filler(100);
  const std::vector<int32_t> doc = Tokens(text, true);
  ASSERT_GT(doc.size(), 1200u);
  const std::string question = "\nQuestion: What is the secret code?";
  const std::string prompt = question + "\nAnswer: The secret code is";
  CompressionSpec none;
  none.method = "none";
  absl::StatusOr<CompressedContext> full = Compress(runner(), doc, none);
  ASSERT_TRUE(full.ok());
  ASSERT_THAT(Answer(full->kv, prompt), HasSubstr("4729")) << "full context cannot answer";
  for (const char* method : {"finch", "snapkv"}) {
    CompressionSpec spec;
    spec.method = method;
    spec.ratio = 8;
    spec.question = question;
    absl::StatusOr<CompressedContext> c = Compress(runner(), doc, spec);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_THAT(Answer(c->kv, prompt), HasSubstr("4729")) << method;
  }
  const int64_t budget = static_cast<int64_t>(doc.size()) / 8;
  absl::StatusOr<KvCache> selected =
      SelectForQuery(runner(), full->kv, Tokens(question, false), budget);
  ASSERT_TRUE(selected.ok()) << selected.status();
  EXPECT_EQ(selected->MaxEntries(), budget);
  EXPECT_EQ(selected->next_position, full->kv.next_position);
  EXPECT_THAT(Answer(*selected, prompt), HasSubstr("4729")) << "SelectForQuery";
}

// The same needle in finch's first chunk of four. Finch used to keep only ceil(budget * e / n)
// entries after the chunk ending at e, so the first chunk had a quarter of the budget, and
// much of it went to the chunk's last tokens (the question rows' recency) and to the sinks:
// the needle was dropped at its own chunk (finch.cc's header). Measured here before the fix:
// SmolLM2 kept the code's tokens in 14% of the heads (snapkv 44%) and answered without it;
// Qwen kept them in 54% (snapkv 74%). finch must keep the code about as well as snapkv.
TEST_P(CompressModelTest, FinchKeepsANeedleFromItsFirstChunk) {
  const std::string text = Filler(6) + "The secret code is 4729. " + Filler(260);
  const std::vector<int32_t> doc = Tokens(text, true);
  ASSERT_GT(doc.size(), 3u * 512u) << "the needle must be followed by three more chunks";
  const std::string question = "\nQuestion: What is the secret code?";
  const std::string prompt = question + "\nAnswer: The secret code is";
  // Where the code's tokens are: the tokens that change when the code does.
  const std::vector<int32_t> other =
      Tokens(Filler(6) + "The secret code is 8153. " + Filler(260), true);
  ASSERT_EQ(other.size(), doc.size());
  std::vector<int32_t> needle;
  for (size_t i = 0; i < doc.size(); ++i) {
    if (doc[i] != other[i]) needle.push_back(static_cast<int32_t>(i));
  }
  ASSERT_FALSE(needle.empty());
  ASSERT_LT(needle.back(), 512) << "the needle must be in the first chunk";
  // Share of (layer, KV head) pairs that keep each of the code's tokens, averaged.
  auto kept_share = [&](const KvCache& kv) {
    double share = 0;
    for (int32_t p : needle) {
      int64_t keep = 0;
      for (int l = 0; l < kv.n_layers(); ++l) {
        for (int h = 0; h < kv.n_kv_heads(); ++h) {
          const std::vector<int32_t>& pos = kv.head(l, h).pos;
          keep += std::binary_search(pos.begin(), pos.end(), p);
        }
      }
      share += static_cast<double>(keep) / (kv.n_layers() * kv.n_kv_heads()) / needle.size();
    }
    return share;
  };
  double shares[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    CompressionSpec spec;
    spec.method = i == 0 ? "snapkv" : "finch";
    spec.ratio = 8;
    spec.question = question;
    absl::StatusOr<CompressedContext> c = Compress(runner(), doc, spec);
    ASSERT_TRUE(c.ok()) << c.status();
    shares[i] = kept_share(c->kv);
    EXPECT_THAT(Answer(c->kv, prompt), HasSubstr("4729")) << spec.method;
  }
  std::printf("code tokens kept by snapkv in %.0f%% of the heads, by finch in %.0f%%\n",
              100 * shares[0], 100 * shares[1]);
  EXPECT_GT(shares[1], 0.75 * shares[0]) << "finch keeps the code in far fewer heads than snapkv";
}

// expected_attention recovers the queries it needs from observed probabilities: on the real
// model, the recovered queries must reproduce the observed attention rows.
TEST_P(CompressModelTest, RecoveredQueriesReproduceObservedAttention) {
  const std::vector<int32_t> doc = Tokens(Filler(30), true);
  const int n = static_cast<int>(doc.size());
  const ModelConfig& c = model().config();
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int fit_end = n - 2;
  KvCache cache = model().NewKvCache();
  ForwardOptions options;
  options.observe_rows = {n - 2, n - 1};
  double worst = 0;
  options.observer = [&](int layer, const float* probs, int n_rows, int64_t max_keys) {
    for (int h = 0; h < c.n_heads; ++h) {
      const std::vector<float> k = ToFloats(cache.head(layer, h / group).k);
      for (int r = 0; r < n_rows; ++r) {
        const float* row = probs + (static_cast<int64_t>(h) * n_rows + r) * max_keys;
        std::vector<float> q(hd);
        const float* ptr = row;
        RecoverQueries(k.data(), fit_end, hd, absl::MakeConstSpan(&ptr, 1),
                       1.0f / std::sqrt(static_cast<float>(hd)), q.data());
        // Re-predict the whole row (all visible keys, including ones not used in the fit).
        const int vis = n - 2 + r + 1;
        std::vector<float> pred(vis);
        for (int j = 0; j < vis; ++j) {
          float dot = 0;
          for (int i = 0; i < hd; ++i) dot += q[i] * k[j * hd + i];
          pred[j] = dot / std::sqrt(static_cast<float>(hd));
        }
        Softmax(pred.data(), vis);
        for (int j = 0; j < vis; ++j) worst = std::max(worst, std::abs(double{pred[j]} - row[j]));
      }
    }
  };
  ASSERT_TRUE(runner().Forward(doc, cache, options, nullptr).ok());
  std::printf("recovered-query attention: worst |p - p_observed| = %.2e\n", worst);
  EXPECT_LT(worst, 1e-3) << "RecoverQueries (engine/compress/expected_attention.cc) does not "
                            "reproduce the attention it was fitted on";
}

// Not a check: prints, per method at ratio 8 on the needle document, the compression time
// and whether the greedy answer still holds the code (query-agnostic methods included).
// Run with --gtest_also_run_disabled_tests --gtest_filter='*NeedleReport*'.
TEST_P(CompressModelTest, DISABLED_NeedleReport) {
  const std::vector<int32_t> doc =
      Tokens(Filler(100) + "The secret code is 4729. " + Filler(100), true);
  const std::string question = "\nQuestion: What is the secret code?";
  for (const char* method :
       {"none", "streaming", "snapkv", "finch", "expected_attention", "kvzip", "anchor"}) {
    CompressionSpec spec;
    spec.method = method;
    if (std::string(method) != "none") spec.ratio = 8;
    spec.question = question;
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<CompressedContext> c = Compress(runner(), doc, spec);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(c.ok()) << c.status();
    const std::string answer = Answer(c->kv, question + "\nAnswer: The secret code is");
    std::printf("%-18s n=%zu kept/head<=%lld  %.1f s  bytes %lld/%lld  answer=\"%s\"\n", method,
                doc.size(), static_cast<long long>(c->kv.MaxEntries()), secs,
                static_cast<long long>(c->KvBytes()), static_cast<long long>(c->FullKvBytes()),
                answer.c_str());
  }
}

// Finch on a document longer than its window: survivors are re-rotated to compact positions
// after every chunk, so the context ends up at positions 0..budget-1. The window here is
// capped at 768 positions (max_positions) to keep the test fast; the model-window version
// below runs the same path on 12K tokens (~2.5 min on 2 cores).
void CheckFinchBeyondWindow(CompressModelTest& t, Runner& runner, const Model& model,
                            int64_t doc_tokens, int64_t max_positions, int chunk) {
  std::vector<int32_t> doc = model.tokenizer().Encode(Filler(60), true, false);
  const std::vector<int32_t> more = model.tokenizer().Encode(Filler(60), false, false);
  while (static_cast<int64_t>(doc.size()) < doc_tokens) {
    doc.insert(doc.end(), more.begin(), more.end());
  }
  doc.resize(doc_tokens);
  CompressionSpec spec;
  spec.method = "finch";
  spec.ratio = 8;
  spec.chunk = chunk;
  spec.max_positions = max_positions;
  spec.question = "\nWhat does the farmer sell?";
  absl::StatusOr<CompressedContext> c = Compress(runner, doc, spec);
  ASSERT_TRUE(c.ok()) << c.status();
  const int64_t budget = (doc_tokens + 7) / 8;
  ExpectWellFormed(*c, budget, true, spec.n_sink, "finch long");
  EXPECT_EQ(c->kv.next_position, budget);
  EXPECT_EQ(c->kv.head(5, model.config().n_kv_heads - 1).pos.back(), budget - 1);
  EXPECT_EQ(c->source_tokens, doc_tokens);
  // The compressed context is usable: a question prefilled on it decodes.
  KvCache work = c->kv;
  std::vector<float> logits;
  ASSERT_TRUE(
      runner.Forward(model.tokenizer().Encode("\nAnswer:", false, false), work, {}, &logits).ok());
  // Too small a ratio for the window: a clear OutOfRange.
  spec.ratio = 1.5;
  EXPECT_EQ(Compress(runner, doc, spec).status().code(), absl::StatusCode::kOutOfRange);
  (void)t;
}

TEST_P(CompressModelTest, FinchCompressesADocumentLongerThanItsWindow) {
  CheckFinchBeyondWindow(*this, runner(), model(), 2000, 768, 256);
}

// 1.5x the model's own 8K window, 2K chunks (the brief's 12K case). Run with
// --gtest_also_run_disabled_tests; measured 161 s on 2 shared cores.
TEST_P(DefaultCompressModelTest, DISABLED_FinchCompressesADocumentLongerThanTheModelWindow) {
  const int n_ctx = model().config().n_ctx_train;
  CheckFinchBeyondWindow(*this, runner(), model(), n_ctx + n_ctx / 2, 0, 2048);
}

// A `none` context is the full prefill, stored and composed: greedy answers from it, alone or
// composed (a shift by 0), must be token for token those of a plain prefill of the document.
TEST_P(CompressModelTest, NoneContextAnswersExactlyLikeAPlainPrefill) {
  const std::vector<int32_t> doc =
      Tokens(Filler(12) + "Alice keeps a red notebook in her desk. " + Filler(6), true);
  const std::string prompt = "\nQuestion: What does Alice keep in her desk?\nAnswer:";
  KvCache plain = model().NewKvCache();
  ASSERT_TRUE(runner().Forward(doc, plain, {}, nullptr).ok());
  const GenerateResult want = Greedy(plain, prompt, 12);
  ASSERT_EQ(want.tokens.size(), 12u);
  CompressionSpec none;
  none.method = "none";
  absl::StatusOr<CompressedContext> c = Compress(runner(), doc, none);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->kv.MaxEntries(), static_cast<int64_t>(doc.size()));
  EXPECT_EQ(Greedy(c->kv, prompt, 12).tokens, want.tokens) << "full: " << want.text;
  const CompressedContext* parts[] = {&*c};
  absl::StatusOr<KvCache> composed = ComposeContexts(parts, model());
  ASSERT_TRUE(composed.ok()) << composed.status();
  EXPECT_EQ(Greedy(*composed, prompt, 12).tokens, want.tokens) << "full: " << want.text;
  std::printf("%s: none context and plain prefill both answer \"%s\"\n", GetParam(),
              absl::CEscape(want.text).c_str());
}

// Two documents compressed 4x by different methods (snapkv with a question, finch), composed
// one after the other, then decoded with full attention and with Recycled Attention: kept
// counts and positions add up, every logit is finite, and a recycled decode whose top-K covers
// every kept entry gives exactly the full decode's tokens over this pruned, shifted cache.
TEST_P(CompressModelTest, CompressedContextsComposeAndDecode) {
  const std::vector<int32_t> d1 =
      Tokens(Filler(10) + "Alice keeps a red notebook in her desk. " + Filler(10), true);
  const std::vector<int32_t> d2 =
      Tokens(Filler(8) + "Bob has a green bicycle in his garage. " + Filler(12), false);
  const int64_t n1 = static_cast<int64_t>(d1.size()), n2 = static_cast<int64_t>(d2.size());
  CompressionSpec snapkv;
  snapkv.method = "snapkv";
  snapkv.ratio = 4;
  snapkv.question = "\nWhat does Alice keep in her desk?";
  CompressionSpec finch = snapkv;
  finch.method = "finch";
  finch.chunk = 64;  // several chunks
  finch.question = "\nWhat does Bob have in his garage?";
  absl::StatusOr<CompressedContext> c1 = Compress(runner(), d1, snapkv);
  absl::StatusOr<CompressedContext> c2 = Compress(runner(), d2, finch);
  ASSERT_TRUE(c1.ok()) << c1.status();
  ASSERT_TRUE(c2.ok()) << c2.status();
  const int64_t b1 = (n1 + 3) / 4, b2 = (n2 + 3) / 4;
  ExpectWellFormed(*c1, b1, true, snapkv.n_sink, "snapkv");
  ExpectWellFormed(*c2, b2, true, finch.n_sink, "finch");
  ASSERT_EQ(c1->kv.next_position, n1);
  ASSERT_EQ(c2->kv.next_position, n2);  // fits the window: original positions
  const CompressedContext* parts[] = {&*c1, &*c2};
  absl::StatusOr<KvCache> composed = ComposeContexts(parts, model());
  ASSERT_TRUE(composed.ok()) << composed.status();
  EXPECT_EQ(composed->next_position, n1 + n2);
  const ModelConfig& c = model().config();
  for (int l = 0; l < c.n_layers; ++l) {
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const KvHead& kh = composed->head(l, h);
      ASSERT_EQ(kh.n(), b1 + b2) << "layer " << l << " head " << h;
      std::vector<int32_t> want = c1->kv.head(l, h).pos;
      for (int32_t p : c2->kv.head(l, h).pos) want.push_back(static_cast<int32_t>(n1 + p));
      ASSERT_EQ(kh.pos, want) << "layer " << l << " head " << h;
    }
  }
  const std::string prompt = "\nQuestion: What colour is Bob's bicycle?\nAnswer:";
  KvCache work = *composed;
  std::vector<float> logits;
  ForwardOptions all;
  all.all_logits = true;
  const std::vector<int32_t> question = Tokens(prompt, false);
  ASSERT_TRUE(runner().Forward(question, work, all, &logits).ok());
  ASSERT_EQ(logits.size(), question.size() * c.n_vocab);
  ExpectFinite(logits, "question on the composed context");

  const int n_gen = 16;
  const GenerateResult full = Greedy(*composed, prompt, n_gen);
  ASSERT_EQ(full.tokens.size(), static_cast<size_t>(n_gen));
  DecodePolicy every_key;
  every_key.kind = DecodePolicy::Kind::kRecycled;
  every_key.stride = 5;
  every_key.top_k = 100000;  // at least every kept entry: same keys as full attention
  const GenerateResult recycled_all = Greedy(*composed, prompt, n_gen, every_key);
  // The same keys as full attention, summed by another kernel (a gather of the kept rows):
  // the logits agree to rounding, so the texts agree up to a step where full attention's top
  // two tokens are near-tied (then either is a right answer, and the texts part there).
  // Measured on an Intel AMX machine: the texts part at step 4, where full attention's
  // top-2 logits are 0.09 apart as replayed below (the CPU's GEMM kernels decide which near
  // ties come up; where earlier runs of this test passed, none did). The replay prefills the
  // steps in one batch, whose bf16 GEMM moves logits by a few hundredths, so a tie reads as
  // up to ~0.1 there: 0.25 is the bound, far below what wrong keys do to a logit.
  size_t same = 0;
  while (same < full.tokens.size() && same < recycled_all.tokens.size() &&
         full.tokens[same] == recycled_all.tokens[same]) {
    ++same;
  }
  if (same < full.tokens.size()) {
    ASSERT_LT(same, recycled_all.tokens.size());
    // Full attention's logits at the first differing step.
    KvCache replay = *composed;
    std::vector<int32_t> upto = question;
    upto.insert(upto.end(), full.tokens.begin(), full.tokens.begin() + same);
    std::vector<float> last;
    ASSERT_TRUE(runner().Forward(upto, replay, ForwardOptions{}, &last).ok());
    const float gap = last[full.tokens[same]] - last[recycled_all.tokens[same]];
    std::printf("recycled (every key) parts from full attention at step %zu: logit gap %.4f\n",
                same, gap);
    EXPECT_LT(gap, 0.25f)
        << "full: \"" << full.text << "\", recycled: \"" << recycled_all.text << "\"";
  }
  // The first generated token comes from the prompt's prefill; the n_gen - 1 decode steps are
  // full at steps 0, 5 and 10 (per layer), recycled otherwise.
  EXPECT_EQ(recycled_all.full_attention_steps, 3 * c.n_layers);
  EXPECT_EQ(recycled_all.recycled_attention_steps, (n_gen - 1 - 3) * c.n_layers);
  DecodePolicy small = every_key;
  small.top_k = 8;  // far fewer keys than the context: still a sane, finite decode
  const GenerateResult recycled_small = Greedy(*composed, prompt, n_gen, small);
  EXPECT_EQ(recycled_small.tokens.size(), static_cast<size_t>(n_gen));
  EXPECT_GT(recycled_small.recycled_attention_steps, 0);
  std::printf("%s: composed %lld+%lld -> %lld+%lld kept; full \"%s\"; recycled(top 8) \"%s\"\n",
              GetParam(), static_cast<long long>(n1), static_cast<long long>(n2),
              static_cast<long long>(b1), static_cast<long long>(b2),
              absl::CEscape(full.text).c_str(), absl::CEscape(recycled_small.text).c_str());
}

// KL(p || q) of two logit rows' softmax distributions.
double KlOfLogits(const float* p_logits, const float* q_logits, int64_t n) {
  const float mp = *std::max_element(p_logits, p_logits + n);
  const float mq = *std::max_element(q_logits, q_logits + n);
  double zp = 0, zq = 0;
  for (int64_t i = 0; i < n; ++i) zp += std::exp(double{p_logits[i]} - mp), zq += std::exp(double{q_logits[i]} - mq);
  double kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double lp = p_logits[i] - mp - std::log(zp), lq = q_logits[i] - mq - std::log(zq);
    kl += std::exp(lp) * (lp - lq);
  }
  return kl;
}

// kv_dtype int8 / int4: the same kept entries in fewer bytes, next-token distributions close
// to the fp16 context's, and composition that reads the first context's segments in place
// (shared, not copied) and requantizes a shifted second one; Recycled Attention's row gather
// over quantized entries matches full attention when its top-K covers every key.
TEST_P(CompressModelTest, QuantizedContextsStayCloseAndComposeInPlace) {
  const std::vector<int32_t> doc =
      Tokens(Filler(14) + "Alice keeps a red notebook in her desk. " + Filler(14), true);
  const std::vector<int32_t> doc2 =
      Tokens(Filler(9) + "Bob has a green bicycle in his garage. " + Filler(9), false);
  const std::string prompt = "\nQuestion: What does Alice keep in her desk?\nAnswer:";
  const std::vector<int32_t> question = Tokens(prompt, false);
  CompressionSpec spec;
  spec.method = "snapkv";
  spec.ratio = 2;
  spec.question = "\nWhat does Alice keep in her desk?";
  const int64_t n_vocab = model().config().n_vocab;
  auto last_logits = [&](const KvCache& cache) {
    KvCache work = cache;
    std::vector<float> logits;
    EXPECT_TRUE(runner().Forward(question, work, {}, &logits).ok());
    return logits;
  };
  absl::StatusOr<CompressedContext> fp16 = Compress(runner(), doc, spec);
  ASSERT_TRUE(fp16.ok()) << fp16.status();
  const std::vector<float> want = last_logits(fp16->kv);
  for (const char* dtype : {"int8", "int4"}) {
    SCOPED_TRACE(dtype);
    CompressionSpec q = spec;
    q.kv_dtype = dtype;
    absl::StatusOr<CompressedContext> c = Compress(runner(), doc, q);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(KvDtypeName(c->kv.StoredDtype()), std::string(dtype));
    EXPECT_EQ(c->KeptEntries(), fp16->KeptEntries());
    for (int l = 0; l < c->kv.n_layers(); ++l) {
      EXPECT_EQ(c->kv.head(l, 1).pos, fp16->kv.head(l, 1).pos) << "layer " << l;
    }
    // Bytes per entry at head_dim 64: fp16 256; int8 128 + 16 of scales (+ key groups);
    // int4 64 + 16.
    const double bytes = static_cast<double>(c->KvBytes()) / fp16->KvBytes();
    EXPECT_LT(bytes, std::string(dtype) == "int8" ? 0.6 : 0.35);
    EXPECT_NEAR(c->BytesRatio(), 2.0 / bytes, 0.1);
    const std::vector<float> got = last_logits(c->kv);
    ExpectFinite(got, dtype);
    const double kl = KlOfLogits(want.data(), got.data(), n_vocab);
    // The same on the plain reference kernels (CpuLevel scalar: fp32 activations throughout):
    // what the quantization alone costs.
    const CpuLevel saved = SetCpuLevelForTesting(CpuLevel::kScalar);
    const std::vector<float> want_ref = last_logits(fp16->kv), got_ref = last_logits(c->kv);
    SetCpuLevelForTesting(saved);
    const double kl_ref = KlOfLogits(want_ref.data(), got_ref.data(), n_vocab);
    std::printf(
        "%s %s: %.3f of the fp16 bytes, KL(fp16 || %s) of the next token %.5f "
        "(reference kernels %.5f)\n",
        GetParam(), dtype, bytes, dtype, kl, kl_ref);
    // Reference kernels, measured (SmolLM2 / Qwen): int8 6e-5 / 2e-5, int4 1.3e-2 / 2.7e-3: a
    // wrong dequantization gives KL > 1.
    EXPECT_LT(kl_ref, std::string(dtype) == "int8" ? 1e-3 : 0.05);
    // The fast kernels add their own noise on both sides (the quantized weights' dot products
    // read the activations as 8-bit blocks, as llama.cpp's do; prompt rows go through bf16
    // GEMMs), uncorrelated between the two contexts. On SmolLM2 that noise alone is ~0.01:
    // the fp16 context's logits on the fast kernels vs the reference, KL 0.017 on an Intel
    // Xeon with AMX + AVX512-FP16 (2026-12-07), where fast int8 measured 0.0101 and fast int4
    // 0.0056 (an earlier machine: int8 1.2e-3, int4 1.3e-2). So the int8 bound was raised
    // from 0.01 (that noise floor) to 0.03; the reference bound above is the tight one.
    EXPECT_LT(kl, std::string(dtype) == "int8" ? 0.03 : 0.2);
  }
  // Prefill once at int4, select per query: the selection reads the quantized entries.
  CompressionSpec whole;
  whole.method = "none";
  whole.kv_dtype = "int4";
  absl::StatusOr<CompressedContext> full4 = Compress(runner(), doc, whole);
  ASSERT_TRUE(full4.ok()) << full4.status();
  const int64_t budget = static_cast<int64_t>(doc.size()) / 4;
  absl::StatusOr<KvCache> selected = SelectForQuery(runner(), full4->kv, question, budget);
  ASSERT_TRUE(selected.ok()) << selected.status();
  EXPECT_EQ(selected->MaxEntries(), budget);
  ExpectFinite(last_logits(*selected), "selected from int4");
  CompressionSpec s4 = spec, s8 = spec;
  s4.kv_dtype = "int4";
  s8.kv_dtype = "int8";
  s8.question = "\nWhat does Bob have in his garage?";
  absl::StatusOr<CompressedContext> c1 = Compress(runner(), doc, s4);
  absl::StatusOr<CompressedContext> c2 = Compress(runner(), doc2, s8);
  ASSERT_TRUE(c1.ok() && c2.ok());
  const CompressedContext* parts[] = {&*c1, &*c2};
  absl::StatusOr<KvCache> composed = ComposeContexts(parts, model());
  ASSERT_TRUE(composed.ok()) << composed.status();
  const int64_t n1 = static_cast<int64_t>(doc.size());
  EXPECT_EQ(composed->next_position, n1 + static_cast<int64_t>(doc2.size()));
  const KvHead& h = composed->head(2, 0);
  ASSERT_EQ(h.segments.size(), 2u);
  EXPECT_EQ(h.segments[0].get(), c1->kv.head(2, 0).segments[0].get()) << "not read in place";
  EXPECT_EQ(h.segments[1]->dtype, KvDtype::kInt8);
  EXPECT_EQ(h.pos.back(), n1 + c2->kv.head(2, 0).pos.back());
  const std::string bob = "\nQuestion: What colour is Bob's bicycle?\nAnswer:";
  const GenerateResult full = Greedy(*composed, bob, 10);
  DecodePolicy every_key;
  every_key.kind = DecodePolicy::Kind::kRecycled;
  every_key.stride = 4;
  every_key.top_k = 100000;
  EXPECT_EQ(Greedy(*composed, bob, 10, every_key).tokens, full.tokens) << full.text;
  std::printf("%s: int4 + int8 composed: \"%s\"\n", GetParam(), absl::CEscape(full.text).c_str());
}

// A finished context holds what a cache is charged for it (StoredBytes plus its positions):
// no spare capacity from the prefill's growing rows, no fp16 copy beside int8 / int4 codes.
// Before StoreAs released them, the memory soak's idle RSS carried ~200 MiB (varying with
// the memory tier's mix of contexts) that the tier's byte count did not.
TEST_P(CompressModelTest, StoredContextsHoldWhatTheyAreCharged) {
  const std::vector<int32_t> doc =
      Tokens(Filler(12) + "Alice keeps a red notebook in her desk. " + Filler(12), true);
  for (const char* method : {"none", "snapkv", "streaming", "finch"}) {
    for (const char* dtype : {"fp16", "int8", "int4"}) {
      SCOPED_TRACE(absl::StrCat(method, " ", dtype));
      CompressionSpec spec;
      spec.method = method;
      if (std::string(method) != "none") spec.ratio = 3;
      spec.kv_dtype = dtype;
      if (std::string(method) == "snapkv" || std::string(method) == "finch") {
        spec.question = "\nWhat does Alice keep in her desk?";
      }
      absl::StatusOr<CompressedContext> c = Compress(runner(), doc, spec);
      ASSERT_TRUE(c.ok()) << c.status();
      EXPECT_EQ(c->kv.ResidentBytes(),
                c->kv.StoredBytes() + c->kv.TotalEntries() * int64_t{sizeof(int32_t)});
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CompressModelTest, testing::TestModelNames(),
                         testing::TestModelLabel);
INSTANTIATE_TEST_SUITE_P(DefaultModel, DefaultCompressModelTest,
                         ::testing::Values(testing::kSmolLM2), testing::TestModelLabel);

}  // namespace
}  // namespace ctxcache
