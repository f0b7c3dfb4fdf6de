// The engine's cooperative stop (common/stop.h, Runner::set_stop): every compression method,
// a plain forward pass, generation and composition end with the stop's status once it fires,
// and a stop that never fires changes nothing. Caught (issue 14 item 1): no stage of the
// engine asked anything, so a cancelled or expired call's work always ran to the end.
#include <atomic>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/thread_pool.h"
#include "engine/compress/compress.h"
#include "engine/generate.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace ctxcache {
namespace {

using testing::FastModelTest;

// Fires (CANCELLED) on its `fire_at`-th call; counts every call.
struct CountingStop {
  std::atomic<int64_t> calls{0};
  int64_t fire_at = -1;  // never
  StopFn fn() {
    return [this]() -> absl::Status {
      const int64_t n = ++calls;
      if (fire_at > 0 && n >= fire_at) return absl::CancelledError("stopped by the test");
      return absl::OkStatus();
    };
  }
};

std::vector<int32_t> Document(const Model& model, int paragraphs) {
  std::string text;
  for (int i = 0; i < paragraphs; ++i) {
    absl::StrAppend(&text, "Paragraph ", i, ": the lighthouse keeper counted ", 3 * i + 7,
                    " ships passing the harbor before the storm, and wrote each name down.\n");
  }
  return model.tokenizer().Encode(text, true, false);
}

class EngineStopTest : public FastModelTest {};

TEST_F(EngineStopTest, EveryMethodEndsWithTheStopsStatus) {
  ThreadPool pool(1);
  Runner runner(model(), &pool);
  const std::vector<int32_t> doc = Document(model(), 8);
  ASSERT_GT(doc.size(), 200u);
  for (const char* method : CompressionMethods()) {
    SCOPED_TRACE(method);
    // The shared test model has no digest compressor; digest_method_test's
    // CompressionStopsWhenAsked and icformer_test's StopsWhenAsked stop that method.
    if (std::string_view(method) == "digest") continue;
    CompressionSpec spec;
    spec.method = method;
    if (spec.method != "none") spec.ratio = 4;
    spec.chunk = 64;  // finch and kvzip: several chunks
    // A stop that never fires: asked at least once per layer of a forward pass; same result.
    CountingStop quiet;
    absl::StatusOr<CompressedContext> plain = Compress(runner, doc, spec);
    ASSERT_TRUE(plain.ok()) << plain.status();
    absl::StatusOr<CompressedContext> asked;
    {
      Runner::ScopedStop scoped(runner, quiet.fn());
      asked = Compress(runner, doc, spec);
    }
    ASSERT_TRUE(asked.ok()) << asked.status();
    EXPECT_GE(quiet.calls.load(), model().config().n_layers);
    EXPECT_EQ(asked->kv.TotalEntries(), plain->kv.TotalEntries());
    EXPECT_EQ(asked->KvBytes(), plain->KvBytes());
    // Firing late in the work (the last quarter of the checks a full run makes) still ends it:
    // the checks reach the scoring passes and chunk loops, not only the first prefill.
    for (int64_t fire_at : {int64_t{1}, quiet.calls.load() * 3 / 4, quiet.calls.load()}) {
      CountingStop stop;
      stop.fire_at = std::max<int64_t>(1, fire_at);
      Runner::ScopedStop scoped(runner, stop.fn());
      absl::StatusOr<CompressedContext> stopped = Compress(runner, doc, spec);
      EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled)
          << "fire_at " << fire_at << ": " << stopped.status();
      EXPECT_EQ(stop.calls.load(), stop.fire_at) << "work went on after the stop fired";
    }
    // The scope restored the runner: no stop left behind for the next job.
    EXPECT_FALSE(runner.stop());
  }
}

TEST_F(EngineStopTest, GenerateStopsDuringThePromptPrefillAndDecode) {
  ThreadPool pool(1);
  Runner runner(model(), &pool);
  const std::vector<int32_t> prompt = Document(model(), 6);
  GenerateParams params;
  params.sampling = SamplingParams::Greedy();
  params.max_tokens = 8;
  params.ignore_eos = true;
  // Checks one forward pass makes (prefill and decode steps make the same number).
  int64_t per_forward = 0;
  {
    CountingStop quiet;
    Runner::ScopedStop scoped(runner, quiet.fn());
    KvCache cache = model().NewKvCache();
    std::vector<float> logits;
    ASSERT_TRUE(runner.Forward(prompt, cache, ForwardOptions{}, &logits).ok());
    per_forward = quiet.calls.load();
  }
  ASSERT_GE(per_forward, model().config().n_layers);
  // Mid-prefill (inside the prompt's single pass), then mid-decode (the third step's pass).
  for (int64_t fire_at : {per_forward / 2, per_forward * 3 + 2}) {
    CountingStop stop;
    stop.fire_at = fire_at;
    Runner::ScopedStop scoped(runner, stop.fn());
    KvCache cache = model().NewKvCache();
    absl::StatusOr<GenerateResult> r = Generate(runner, cache, prompt, params, nullptr);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << "fire_at " << fire_at;
    EXPECT_EQ(stop.calls.load(), fire_at);
  }
}

TEST_F(EngineStopTest, CompositionEndsWithTheStopsStatus) {
  ThreadPool pool(1);
  Runner runner(model(), &pool);
  CompressionSpec spec;
  spec.method = "none";
  absl::StatusOr<CompressedContext> c = Compress(runner, Document(model(), 2), spec);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<const CompressedContext*> parts = {&*c, &*c, &*c};
  CountingStop stop;
  stop.fire_at = 2;
  absl::StatusOr<KvCache> kv = ComposeContexts(parts, model(), stop.fn());
  EXPECT_EQ(kv.status().code(), absl::StatusCode::kCancelled);
  CountingStop quiet;
  EXPECT_TRUE(ComposeContexts(parts, model(), quiet.fn()).ok());
  EXPECT_EQ(quiet.calls.load(), 3);
}

}  // namespace
}  // namespace ctxcache
