// Sampling and stop-string handling: deterministic with a seed, each filter doing what it
// says, and bad parameters rejected with the field named.
#include "engine/sampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "engine/generate.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;

std::vector<float> Logits() { return {1.0f, 3.0f, 2.5f, -1.0f, 0.5f, 2.9f}; }

std::map<int32_t, int> Histogram(const SamplingParams& p, int draws) {
  Sampler s(p);
  std::map<int32_t, int> h;
  for (int i = 0; i < draws; ++i) {
    auto l = Logits();
    h[s.Sample(l, {})]++;
  }
  return h;
}

TEST(SamplerTest, GreedyTakesArgmax) {
  Sampler s(SamplingParams::Greedy());
  auto l = Logits();
  EXPECT_EQ(s.Sample(l, {}), 1);
}

TEST(SamplerTest, RepetitionPenaltyChangesGreedyChoice) {
  SamplingParams p = SamplingParams::Greedy();
  p.repetition_penalty = 1.5f;  // 3.0 / 1.5 = 2.0 < 2.9
  Sampler s(p);
  auto l = Logits();
  const std::vector<int32_t> history = {1};
  EXPECT_EQ(s.Sample(l, history), 5);
}

TEST(SamplerTest, PenaltyLooksOnlyAtRecentWindow) {
  SamplingParams p = SamplingParams::Greedy();
  p.repetition_penalty = 1.5f;
  p.repeat_last_n = 2;
  Sampler s(p);
  auto l = Logits();
  const std::vector<int32_t> history = {1, 0, 4};  // token 1 is outside the last 2
  EXPECT_EQ(s.Sample(l, history), 1);
}

TEST(SamplerTest, SameSeedSameDraws) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.f;
  p.seed = 42;
  Sampler a(p), b(p);
  std::vector<int32_t> da, db;
  for (int i = 0; i < 50; ++i) {
    auto l1 = Logits(), l2 = Logits();
    da.push_back(a.Sample(l1, {}));
    db.push_back(b.Sample(l2, {}));
  }
  EXPECT_EQ(da, db);
  EXPECT_GT(std::set<int32_t>(da.begin(), da.end()).size(), 2u) << "temperature 1 should vary";
}

TEST(SamplerTest, TopKRestrictsToKBest) {
  SamplingParams p;
  p.temperature = 5.0f;  // flatten, so every survivor is drawn
  p.top_k = 2;
  p.top_p = 1.0f;
  p.min_p = 0.f;
  const auto h = Histogram(p, 400);
  for (const auto& [id, n] : h) EXPECT_TRUE(id == 1 || id == 5) << "drew " << id;
  EXPECT_EQ(h.size(), 2u);
}

TEST(SamplerTest, TopPKeepsSmallestNucleus) {
  SamplingParams p;
  p.temperature = 5.0f;
  p.top_k = 0;
  p.top_p = 0.5f;  // softmax of Logits(): p(1) ~ 0.33, p(5) ~ 0.30 -> {1, 5} reach 0.5
  p.min_p = 0.f;
  const auto h = Histogram(p, 400);
  for (const auto& [id, n] : h) EXPECT_TRUE(id == 1 || id == 5) << "drew " << id;
}

TEST(SamplerTest, MinPDropsUnlikelyTokens) {
  SamplingParams p;
  p.temperature = 5.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.5f;  // keep p >= 0.5 * p_max: exp(l - 3) >= 0.5 -> l >= 2.31: ids 1, 2, 5
  const auto h = Histogram(p, 600);
  for (const auto& [id, n] : h) EXPECT_TRUE(id == 1 || id == 2 || id == 5) << "drew " << id;
  EXPECT_EQ(h.size(), 3u);
}

TEST(SamplerTest, InvalidParamsNameTheField) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_THAT(std::string(ValidateSamplingParams(p).message()), HasSubstr("temperature"));
  p = SamplingParams();
  p.top_p = 0;
  EXPECT_THAT(std::string(ValidateSamplingParams(p).message()), HasSubstr("top_p"));
  p = SamplingParams();
  p.min_p = 2;
  EXPECT_EQ(ValidateSamplingParams(p).code(), absl::StatusCode::kInvalidArgument);
  p = SamplingParams();
  p.top_k = -3;
  EXPECT_EQ(ValidateSamplingParams(p).code(), absl::StatusCode::kInvalidArgument);
  p = SamplingParams();
  p.repetition_penalty = 0;
  EXPECT_EQ(ValidateSamplingParams(p).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams()).ok());
  GenerateParams g;
  g.max_tokens = -1;
  EXPECT_THAT(std::string(ValidateGenerateParams(g).message()), HasSubstr("max_tokens"));
  g = GenerateParams();
  g.stop = {""};
  EXPECT_EQ(ValidateGenerateParams(g).code(), absl::StatusCode::kInvalidArgument);
}

// Issue 14: the stop list, top_k, repeat_last_n and recycled top_k had no upper bound (200k
// stop strings slowed decoding 2.4x). Each is refused past its bound, naming the field.
TEST(SamplerTest, ListsAndKnobsHaveUpperBounds) {
  GenerateParams g;
  g.stop.assign(kMaxStopStrings, "x");
  EXPECT_TRUE(ValidateGenerateParams(g).ok());
  g.stop.push_back("y");
  EXPECT_EQ(ValidateGenerateParams(g).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ValidateGenerateParams(g).message()),
              HasSubstr("stop has 65 strings; allowed at most 64"));
  g = GenerateParams();
  g.stop = {"ok", std::string(kMaxStopBytes + 1, 'z')};
  EXPECT_THAT(std::string(ValidateGenerateParams(g).message()),
              HasSubstr("stop[1] is 257 bytes; allowed at most 256"));
  g.stop[1].pop_back();
  EXPECT_TRUE(ValidateGenerateParams(g).ok());
  g = GenerateParams();
  g.max_tokens = kMaxGenerateTokens + 1;
  EXPECT_THAT(std::string(ValidateGenerateParams(g).message()), HasSubstr("1048576"));

  SamplingParams p;
  p.top_k = kMaxSamplingTopK + 1;
  EXPECT_THAT(std::string(ValidateSamplingParams(p).message()), HasSubstr("top_k"));
  p.top_k = kMaxSamplingTopK;
  EXPECT_TRUE(ValidateSamplingParams(p).ok());
  p = SamplingParams();
  p.repeat_last_n = kMaxRepeatLastN + 1;
  EXPECT_THAT(std::string(ValidateSamplingParams(p).message()), HasSubstr("repeat_last_n"));
  p.repeat_last_n = kMaxRepeatLastN;
  EXPECT_TRUE(ValidateSamplingParams(p).ok());

  DecodePolicy d;
  d.kind = DecodePolicy::Kind::kRecycled;
  d.top_k = kMaxRecycledTopK + 1;
  EXPECT_THAT(std::string(d.Validate().message()), HasSubstr("top_k"));
  d.top_k = kMaxRecycledTopK;
  EXPECT_TRUE(d.Validate().ok());
}

TEST(StopMatcherTest, HoldsBackPossiblePrefixAndCutsAtStop) {
  StopMatcher m({"\n\nUser:", "END"});
  bool stopped = false;
  EXPECT_EQ(m.Push("Hello", &stopped), "Hello");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m.Push(" world\n", &stopped), " world");  // "\n" may start "\n\nUser:"
  EXPECT_EQ(m.Push("\nUs", &stopped), "");
  EXPECT_EQ(m.Push("er: hi", &stopped), "");
  EXPECT_TRUE(stopped);
}

TEST(StopMatcherTest, FalseAlarmIsReleased) {
  StopMatcher m({"END"});
  bool stopped = false;
  EXPECT_EQ(m.Push("the EN", &stopped), "the ");
  EXPECT_EQ(m.Push("D", &stopped), "");
  EXPECT_TRUE(stopped);
  StopMatcher m2({"END"});
  EXPECT_EQ(m2.Push("the EN", &stopped), "the ");
  EXPECT_EQ(m2.Push("TRY", &stopped), "ENTRY");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m2.Push("E", &stopped), "");
  EXPECT_EQ(m2.Flush(), "E");
}

TEST(StopMatcherTest, EarliestStopWins) {
  StopMatcher m({"bb", "a"});
  bool stopped = false;
  EXPECT_EQ(m.Push("xxbbya", &stopped), "xx");
  EXPECT_TRUE(stopped);
}

}  // namespace
}  // namespace ctxcache
