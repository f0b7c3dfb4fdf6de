// End-to-end numerics against an outside implementation, on two real models: the default
// model (SmolLM2-135M Q4_1, llama) on the prompts of tests/data/parity/logits_smollm2.bin, and
// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2: QKV biases, NEOX RoPE at freq_base 1e6, K-quants)
// on tests/data/parity/logits_qwen2.5-0.5b.bin, both written by tools/make_logit_fixture.py
// from llama.cpp. (The Qwen cases skip with the reason when its GGUF has not been fetched:
// tools/fetch_model.sh qwen2.5-0.5b.) The prompts are stored as token ids, so this test does
// not depend on our tokenizer. Checked at every position: the argmax (except at near-ties of
// llama.cpp's own logits), the logits of llama.cpp's top-16 ids and of 16 pseudo-random ids,
// and the log-sum-exp over the whole vocabulary. Each value is compared with two references:
// llama.cpp (statistically: it rounds activations to 8 bits) and an fp32 numpy forward pass
// (the same math as ours). The per-model tolerances are explained in test_util.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "common/thread_pool.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace ctxcache {
namespace {

using ::ctxcache::testing::Argmax;
using ::ctxcache::testing::ByteReader;
using ::ctxcache::testing::ParityTolerance;

constexpr int32_t kMagic = 20250611;
constexpr int32_t kVersion = 1;
constexpr int kHeaderInts = 64;
// The threads llama.cpp used for the fixture; the result must not depend on it anyway.
constexpr int kThreads = 2;

// A model the suite runs on, with its fixture and bounds.
struct ParityModel {
  const char* label;    // gtest parameter name
  const char* model;    // tools/fetch_model.sh name (test_util.h: SharedTestModel)
  const char* fixture;  // under tests/data
  ParityTolerance tol;
  size_t long_tokens;  // tokens of the fixture's "long" prompt
};
const ParityModel kModels[] = {
    {"smollm2", ::ctxcache::testing::kSmolLM2, "parity/logits_smollm2.bin",
     ::ctxcache::testing::kSmolLM2Tolerance, 1000},
    {"qwen2_5_0_5b", ::ctxcache::testing::kQwen25, "parity/logits_qwen2.5-0.5b.bin",
     ::ctxcache::testing::kQwenTolerance, 160},
};
// gtest prints the parameter in failure messages: the label, not the struct's bytes.
void PrintTo(const ParityModel& m, std::ostream* os) { *os << m.label; }
std::string ParamName(const ::testing::TestParamInfo<ParityModel>& info) {
  return info.param.label;
}

// llama.cpp's logits at one position, summarized (see tools/make_logit_fixture.py).
struct PositionRecord {
  int32_t argmax = 0;
  float gap = 0;                  // llama.cpp's top-1 minus top-2 logit
  float lse = 0;                  // llama.cpp's log-sum-exp over the whole vocabulary
  float lse_f32 = 0;              // the same from the fp32 reference
  std::vector<int32_t> ids;       // [n_top + n_rand]: llama.cpp's top ids, descending; random
  std::vector<float> logits;      // [n_top + n_rand] llama.cpp's
  std::vector<float> logits_f32;  // [n_top + n_rand] the fp32 reference's
};

struct PromptRecord {
  std::string name;
  std::vector<int32_t> tokens;            // [n_tokens]
  std::vector<PositionRecord> positions;  // [n_tokens]
};

struct LogitFixture {
  std::string source;
  std::string model_name;
  int32_t n_vocab = 0;
  int32_t n_top = 0;
  int32_t n_rand = 0;
  std::vector<PromptRecord> prompts;
};

absl::StatusOr<LogitFixture> ParseLogitFixture(std::string_view data) {
  ByteReader r(data);
  std::vector<int32_t> header = r.Array<int32_t>(kHeaderInts);
  if (!r.ok()) return absl::DataLossError("fixture shorter than its header");
  if (header[0] != kMagic) return absl::DataLossError(absl::StrCat("bad magic ", header[0]));
  if (header[1] != kVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("fixture version ", header[1], ", this reader knows ", kVersion,
                     ": regenerate with tools/make_logit_fixture.py"));
  }
  LogitFixture f;
  const int32_t n_prompts = header[2];
  f.n_vocab = header[3];
  f.n_top = header[4];
  f.n_rand = header[5];
  const int32_t total_positions = header[6];
  const int32_t name_bytes = header[7];
  const int32_t text_bytes = header[8];
  if (n_prompts <= 0 || n_prompts > 1000 || f.n_vocab <= 1 || f.n_top < 2 || f.n_top > f.n_vocab ||
      f.n_rand < 0 || f.n_rand > f.n_vocab || total_positions <= 0 || name_bytes <= 0 ||
      name_bytes > 4096 || text_bytes <= 0 || text_bytes > 4096) {
    return absl::DataLossError("implausible fixture header");
  }
  f.source = r.FixedString(text_bytes);
  f.model_name = r.FixedString(text_bytes);
  int64_t seen_positions = 0;
  const int32_t n_ids = f.n_top + f.n_rand;
  // Exact bytes per position record: argmax, gap, lse, lse_f32, then id, logit, logit_f32.
  const size_t record_bytes = 4 * 4 + static_cast<size_t>(n_ids) * 12;
  for (int32_t p = 0; p < n_prompts; ++p) {
    PromptRecord prompt;
    prompt.name = r.FixedString(name_bytes);
    const int32_t n_tokens = r.I32();
    if (!r.ok() || n_tokens <= 0 ||
        static_cast<size_t>(n_tokens) * (4 + record_bytes) > r.remaining()) {
      return absl::DataLossError(absl::StrCat("prompt ", p, ": bad token count or truncated"));
    }
    prompt.tokens = r.Array<int32_t>(n_tokens);
    for (int32_t t : prompt.tokens) {
      if (t < 0 || t >= f.n_vocab) return absl::DataLossError(absl::StrCat("token ", t));
    }
    prompt.positions.resize(n_tokens);
    for (PositionRecord& pos : prompt.positions) {
      pos.argmax = r.I32();
      pos.gap = r.F32();
      pos.lse = r.F32();
      pos.lse_f32 = r.F32();
      pos.ids = r.Array<int32_t>(n_ids);
      pos.logits = r.Array<float>(n_ids);
      pos.logits_f32 = r.Array<float>(n_ids);
      if (!r.ok()) return absl::DataLossError("truncated position record");
      for (int32_t id : pos.ids) {
        if (id < 0 || id >= f.n_vocab) return absl::DataLossError(absl::StrCat("id ", id));
      }
      if (pos.ids[0] != pos.argmax || !(pos.gap >= 0) || pos.logits.size() < 2 ||
          std::abs(pos.logits[0] - pos.logits[1] - pos.gap) > 1e-4f) {
        return absl::DataLossError("position record inconsistent (argmax/gap vs top ids)");
      }
    }
    seen_positions += n_tokens;
    f.prompts.push_back(std::move(prompt));
  }
  if (r.I32() != kMagic || !r.ok()) return absl::DataLossError("missing end marker");
  if (r.remaining() != 0) return absl::DataLossError("trailing bytes after the end marker");
  if (seen_positions != total_positions) {
    return absl::DataLossError("position count does not match the header");
  }
  return f;
}

absl::StatusOr<LogitFixture> LoadLogitFixture(const char* fixture) {
  absl::StatusOr<std::string> data =
      ::ctxcache::testing::ReadFileToString(::ctxcache::testing::TestDataPath(fixture));
  if (!data.ok()) return data.status();
  return ParseLogitFixture(*data);
}

// ---- The fixture reader itself -------------------------------------------------------------

class LogitFixtureTest : public ::testing::TestWithParam<ParityModel> {};

TEST_P(LogitFixtureTest, CheckedInFixtureParses) {
  absl::StatusOr<LogitFixture> f = LoadLogitFixture(GetParam().fixture);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_GE(f->prompts.size(), 5u);
  EXPECT_EQ(f->n_top, 16);
  EXPECT_EQ(f->n_rand, 16);
  size_t shortest = SIZE_MAX, longest = 0;
  bool has_long = false;
  for (const PromptRecord& p : f->prompts) {
    shortest = std::min(shortest, p.tokens.size());
    longest = std::max(longest, p.tokens.size());
    if (p.name == "long") {
      has_long = true;
      EXPECT_EQ(p.tokens.size(), GetParam().long_tokens);
    }
  }
  EXPECT_TRUE(has_long);
  EXPECT_GE(shortest, 16u);
  EXPECT_GE(longest, 160u);
}

TEST_P(LogitFixtureTest, RejectsCorruptFiles) {
  absl::StatusOr<std::string> data =
      ::ctxcache::testing::ReadFileToString(::ctxcache::testing::TestDataPath(GetParam().fixture));
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_TRUE(ParseLogitFixture(*data).ok());

  std::string bad_magic = *data;
  bad_magic[0] ^= 0x5a;
  EXPECT_EQ(ParseLogitFixture(bad_magic).status().code(), absl::StatusCode::kDataLoss);

  std::string bad_version = *data;
  bad_version[4] = 99;
  EXPECT_EQ(ParseLogitFixture(bad_version).status().code(), absl::StatusCode::kFailedPrecondition);

  for (size_t cut : {size_t{10}, size_t{300}, data->size() / 2, data->size() - 1}) {
    EXPECT_EQ(ParseLogitFixture(std::string_view(*data).substr(0, cut)).status().code(),
              absl::StatusCode::kDataLoss)
        << "truncated at " << cut;
  }
  EXPECT_FALSE(ParseLogitFixture(*data + "x").ok());

  std::string huge_prompts = *data;
  huge_prompts[8] = 0x7f;  // n_prompts low byte: far more prompts than the file holds
  EXPECT_FALSE(ParseLogitFixture(huge_prompts).ok());
}

INSTANTIATE_TEST_SUITE_P(Models, LogitFixtureTest, ::testing::ValuesIn(kModels), ParamName);

// ---- Parity ----------------------------------------------------------------------------------

// Agreement with one reference over a run of positions: the worst |Δ| and where, the sum for
// the mean, and violations (only the first few are reported in full).
struct Tally {
  static constexpr int kMaxReported = 5;
  const char* reference;
  float max_tol;   // bound on every |Δ|
  float mean_tol;  // bound on the mean |Δ| over the run
  float worst = 0;
  std::string worst_where;
  double sum = 0;
  int64_t count = 0;
  int violations = 0;

  void Add(float ref, float ours, const std::string& where) {
    const float d = std::abs(ours - ref);
    sum += d;
    ++count;
    if (!(d <= worst)) {  // NaN lands here too, and fails just below
      worst = d;
      worst_where = absl::StrFormat("%s (%s %.4f, ours %.4f)", where, reference, ref, ours);
    }
    if (!(d <= max_tol)) {
      Violation(absl::StrFormat("%s: %s %.4f, ours %.4f, |d| %.4f > %.3g", where, reference, ref,
                                ours, d, max_tol));
    }
  }
  void Violation(const std::string& message) {
    if (++violations <= kMaxReported) ADD_FAILURE() << message;
  }
  void Finish(const std::string& what) {
    const double mean = count > 0 ? sum / count : 0;
    std::printf("%-34s vs %-9s max|d| %.4f (tol %.3g) at %s; mean|d| %.4f (tol %.3g)\n",
                what.c_str(), reference, worst, max_tol, worst_where.c_str(), mean, mean_tol);
    if (violations > kMaxReported) {
      ADD_FAILURE() << what << " vs " << reference << ": " << violations - kMaxReported
                    << " more violations";
    }
    EXPECT_LE(mean, mean_tol) << what << ": mean |dlogit| vs " << reference;
  }
};

// The two references and the argmax check over a run of positions.
struct Comparison {
  explicit Comparison(const ParityTolerance& t)
      : tol(t), llama{"llama.cpp", t.max_abs, t.mean_abs}, f32{"fp32-ref", t.max_abs, t.mean_abs} {}
  ParityTolerance tol;
  Tally llama;
  Tally f32;
  int near_tie_flips = 0;

  void Finish(const std::string& what) {
    llama.Finish(what);
    f32.Finish(what);
    std::printf("%-34s argmax differs from llama.cpp at %d near-ties (gap < %.2f)\n", what.c_str(),
                near_tie_flips, tol.near_tie);
  }
};

double LogSumExp(absl::Span<const float> v) {
  float max_v = -std::numeric_limits<float>::infinity();
  for (float x : v) max_v = std::max(max_v, x);
  double sum = 0;
  for (float x : v) sum += std::exp(static_cast<double>(x - max_v));
  return max_v + std::log(sum);
}

// Compares our logits [n_vocab] at one position with both references' records.
void ComparePosition(const PositionRecord& ref, absl::Span<const float> ours,
                     const std::string& where, Comparison* c) {
  const int32_t our_argmax = Argmax(ours);
  if (our_argmax != ref.argmax) {
    if (ref.gap < c->tol.near_tie) {
      ++c->near_tie_flips;
    } else {
      c->llama.Violation(absl::StrFormat(
          "%s: argmax %d (logit %.4f), llama.cpp %d (logit %.4f, ours %.4f), llama.cpp top-2 "
          "gap %.4f >= near-tie %.2f",
          where, our_argmax, ours[our_argmax], ref.argmax, ref.logits[0], ours[ref.argmax], ref.gap,
          c->tol.near_tie));
    }
  }
  for (size_t i = 0; i < ref.ids.size(); ++i) {
    const std::string at = absl::StrCat(where, " id ", ref.ids[i]);
    c->llama.Add(ref.logits[i], ours[ref.ids[i]], at);
    c->f32.Add(ref.logits_f32[i], ours[ref.ids[i]], at);
  }
  // The normalizer sees every id, so a wrong logit anywhere in the vocabulary shows here.
  const float lse = static_cast<float>(LogSumExp(ours));
  c->llama.Add(ref.lse, lse, absl::StrCat(where, " log-sum-exp"));
  c->f32.Add(ref.lse_f32, lse, absl::StrCat(where, " log-sum-exp"));
}

// Each model's suite: the model loaded once per binary (test_util.h: SharedTestModel), skipped
// with the reason when it has not been fetched unless CTXCACHE_REQUIRE_MODEL=1.
class LogitParityTest : public ::testing::TestWithParam<ParityModel> {
 protected:
  void SetUp() override {
    const auto& shared = ::ctxcache::testing::SharedTestModel(GetParam().model);
    ::ctxcache::testing::RequireModel(shared, absl::StrCat("model ", GetParam().model));
    if (IsSkipped() || HasFatalFailure()) return;
    model_ = shared->get();
    absl::StatusOr<LogitFixture> f = LoadLogitFixture(GetParam().fixture);
    ASSERT_TRUE(f.ok()) << f.status();
    fixture_ = *std::move(f);
    if (fixture_.model_name != model().config().name ||
        fixture_.n_vocab != model().config().n_vocab) {
      GTEST_SKIP() << "the model is '" << model().config().name << "', the fixture was made from '"
                   << fixture_.model_name << "'";
    }
  }

  const Model& model() const { return *model_; }

  const PromptRecord& Prompt(const std::string& name) {
    for (const PromptRecord& p : fixture_.prompts) {
      if (p.name == name) return p;
    }
    ADD_FAILURE() << "no prompt " << name << " in the fixture";
    return fixture_.prompts.front();
  }

  const Model* model_ = nullptr;
  LogitFixture fixture_;
  ThreadPool pool_{kThreads};
};

TEST_P(LogitParityTest, BatchedForwardMatchesLlamaCpp) {
  Runner runner(model(), &pool_);
  const int64_t n_vocab = model().config().n_vocab;
  std::printf("reference: %s\n", fixture_.source.c_str());
  float worst_llama = 0, worst_f32 = 0;
  for (const PromptRecord& prompt : fixture_.prompts) {
    SCOPED_TRACE(prompt.name);
    KvCache cache = model().NewKvCache();
    std::vector<float> logits;
    ForwardOptions options;
    options.all_logits = true;
    const absl::Status status = runner.Forward(prompt.tokens, cache, options, &logits);
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_EQ(logits.size(), prompt.tokens.size() * n_vocab);
    Comparison c(GetParam().tol);
    for (size_t i = 0; i < prompt.tokens.size(); ++i) {
      ComparePosition(prompt.positions[i],
                      absl::MakeConstSpan(logits).subspan(i * n_vocab, n_vocab),
                      absl::StrCat(prompt.name, " pos ", i), &c);
    }
    c.Finish(absl::StrFormat("%s (%zu tokens, one batch)", prompt.name, prompt.tokens.size()));
    worst_llama = std::max(worst_llama, c.llama.worst);
    worst_f32 = std::max(worst_f32, c.f32.worst);
  }
  RecordProperty("max_abs_dlogit_llama", absl::StrFormat("%.5f", worst_llama));
  RecordProperty("max_abs_dlogit_f32", absl::StrFormat("%.5f", worst_f32));
}

// The decode path (one token at a time, MatVec kernels, growing cache) must agree as well:
// prefill the first half of the long prompt in one batch, then Decode the rest.
TEST_P(LogitParityTest, PrefillThenDecodeMatchesLlamaCpp) {
  const PromptRecord& prompt = Prompt("long");
  Runner runner(model(), &pool_);
  const int64_t n_vocab = model().config().n_vocab;
  const size_t n = prompt.tokens.size();
  const size_t half = n / 2;
  KvCache cache = model().NewKvCache();
  std::vector<float> logits;
  ForwardOptions options;
  options.all_logits = true;
  const absl::Status status =
      runner.Forward(absl::MakeConstSpan(prompt.tokens).first(half), cache, options, &logits);
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(logits.size(), half * n_vocab);
  Comparison c(GetParam().tol);
  for (size_t i = 0; i < half; ++i) {
    ComparePosition(prompt.positions[i], absl::MakeConstSpan(logits).subspan(i * n_vocab, n_vocab),
                    absl::StrCat("long prefill pos ", i), &c);
  }
  for (size_t i = half; i < n; ++i) {
    ASSERT_EQ(cache.next_position, static_cast<int32_t>(i));
    const absl::Status status = runner.Decode(prompt.tokens[i], cache, &logits);
    ASSERT_TRUE(status.ok()) << "decode pos " << i << ": " << status;
    ASSERT_EQ(logits.size(), static_cast<size_t>(n_vocab));
    ComparePosition(prompt.positions[i], logits, absl::StrCat("long decode pos ", i), &c);
  }
  EXPECT_EQ(cache.next_position, static_cast<int32_t>(n));
  c.Finish(absl::StrFormat("long (prefill %zu + decode %zu)", half, n - half));
}

INSTANTIATE_TEST_SUITE_P(Models, LogitParityTest, ::testing::ValuesIn(kModels), ParamName);

}  // namespace
}  // namespace ctxcache
