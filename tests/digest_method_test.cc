// Method "digest" end to end in the engine, on the fast test model with a random compressor of
// its width and fingerprint (tests/digest_util.h): what Compress makes, that the codec keeps
// it exactly, that composition reads it with the model at the right positions and in any
// order with KV contexts, what it is charged and reports, and its refusals.
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "cache/codec.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/compress/compress.h"
#include "engine/generate.h"
#include "engine/icformer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/digest_util.h"
#include "tests/test_util.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;

constexpr int kChunk = 32, kDigests = 16;

class DigestMethodTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto path = ::ctxcache::testing::FindTestModel(::ctxcache::testing::kSmolLM2);
    const char* env = std::getenv("CTXCACHE_MODEL");
    if (env != nullptr && *env != '\0') path = std::string(env);
    if (!path.ok()) return;
    auto m = Model::Load(*path);
    if (!m.ok()) return;
    model_ = m->release();
    compressor_path_ = ::testing::TempDir() + "/digest_method_test.icformer.gguf";
    ::ctxcache::testing::RandomCompressorShape shape;
    shape.chunk_length = kChunk;
    shape.digest_count = kDigests;
    std::ofstream(compressor_path_, std::ios::binary)
        << ::ctxcache::testing::RandomCompressorGguf(model_->config().d_model,
                                                     model_->fingerprint(), 5, shape);
    auto f = IcFormer::Load(compressor_path_, *model_);
    ASSERT_TRUE(f.ok()) << f.status();
    sha_ = (*f)->file_sha256();
    model_->AttachDigestCompressor(*std::move(f));
  }
  void SetUp() override {
    ::ctxcache::testing::RequireModel(::ctxcache::testing::SharedFastModel(),
                                      "test model SmolLM2-135M");
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_NE(model_, nullptr);
    pool_ = std::make_unique<ThreadPool>(2);
    runner_ = std::make_unique<Runner>(*model_, pool_.get());
  }

  std::vector<int32_t> Doc(int n) const {
    std::vector<int32_t> ids = model_->tokenizer().Encode(
        "The lighthouse keeper wrote in his log every evening: the wind, the ships, the colour "
        "of the sea, and how many gulls sat on the rail. ",
        true, false);
    std::vector<int32_t> out;
    while (static_cast<int>(out.size()) < n) out.insert(out.end(), ids.begin(), ids.end());
    out.resize(n);
    return out;
  }
  static CompressionSpec DigestSpec(double ratio) {
    CompressionSpec s;
    s.method = "digest";
    s.ratio = ratio;
    return s;
  }

  static Model* model_;
  static std::string compressor_path_, sha_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<Runner> runner_;
};
Model* DigestMethodTest::model_ = nullptr;
std::string DigestMethodTest::compressor_path_;
std::string DigestMethodTest::sha_;

TEST_F(DigestMethodTest, CompressesEachChunkIntoItsShareOfDigests) {
  // 100 tokens: chunks of 25 (ceil(100 / 32) = 4 chunks), ceil(25 / 4) = 7 digests each.
  const std::vector<int32_t> doc = Doc(100);
  auto ctx = Compress(*runner_, doc, DigestSpec(4));
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  EXPECT_EQ(ctx->kind, ContextKind::kDigest);
  EXPECT_EQ(ctx->method, "digest");
  EXPECT_EQ(ctx->method_version, MethodVersion("digest"));
  EXPECT_EQ(ctx->source_tokens, 100);
  EXPECT_EQ(ctx->digest_tokens, 28);
  EXPECT_EQ(ctx->kv.next_position, 28);
  EXPECT_EQ(ctx->digest.size(), size_t{28} * model_->config().d_model);
  EXPECT_THAT(ctx->params, HasSubstr("compressor=" + sha_));
  EXPECT_EQ(ctx->kv.TotalEntries(), 0);
  // What it is charged: digest vectors at fp16 stored; at generation it occupies 28 entries
  // per (layer, KV head); the full document would have taken 100.
  const ModelConfig& c = model_->config();
  EXPECT_EQ(ctx->KvBytes(), int64_t{28} * c.d_model * 2);
  EXPECT_EQ(ctx->KeptEntries(), int64_t{28} * c.n_layers * c.n_kv_heads);
  EXPECT_EQ(ctx->FullEntries(), int64_t{100} * c.n_layers * c.n_kv_heads);
  EXPECT_EQ(ctx->AttendedKvBytes(), model_->KvBytesPerToken(2) * 28);
  EXPECT_EQ(ctx->FullKvBytes(), model_->KvBytesPerToken(2) * 100);
  // Stored values are fp16-exact (every tier returns the same digest) and finite.
  for (float v : ctx->digest) {
    ASSERT_TRUE(std::isfinite(v));
    ASSERT_EQ(v, Fp16ToFp32(Fp32ToFp16(v)));
  }
  // Deterministic, and the chunk's digests are the compressor's on its embeddings.
  auto again = Compress(*runner_, doc, DigestSpec(4));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->digest, ctx->digest);
  // A budget gives each chunk that many digests.
  CompressionSpec by_budget = DigestSpec(0);
  by_budget.budget = 3;
  auto b = Compress(*runner_, doc, by_budget);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->digest_tokens, 12);
  // The first 3 digests of each chunk at ratio 4 are the 3 of the budget (prefix property).
  const int64_t d = c.d_model;
  for (int chunk = 0; chunk < 4; ++chunk) {
    for (int i = 0; i < 3 * d; ++i) {
      ASSERT_EQ(b->digest[chunk * 3 * d + i], ctx->digest[chunk * 7 * d + i]) << chunk;
    }
  }
}

TEST_F(DigestMethodTest, CodecKeepsTheDigestExactly) {
  auto ctx = Compress(*runner_, Doc(70), DigestSpec(8));
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  auto bytes = EncodeContext(*ctx);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto back = DecodeContext(*bytes, model_->fingerprint());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->kind, ContextKind::kDigest);
  EXPECT_EQ(back->digest_tokens, ctx->digest_tokens);
  EXPECT_EQ(back->digest, ctx->digest);
  EXPECT_EQ(back->params, ctx->params);
  EXPECT_EQ(back->KeptEntries(), ctx->KeptEntries());
  EXPECT_EQ(back->kv.next_position, ctx->kv.next_position);
}

// [KV context, digest, KV context]: the digest is read by the model after the first context
// (attending to it), exactly as a forward pass of its vectors there, and the third context
// is re-rotated past both.
TEST_F(DigestMethodTest, ComposesWithKvContextsInAnyOrder) {
  const std::vector<int32_t> a_doc = Doc(40), b_doc = Doc(64), c_doc = Doc(30);
  CompressionSpec none;
  none.method = "none";
  auto a = Compress(*runner_, a_doc, none);
  auto b = Compress(*runner_, b_doc, DigestSpec(4));
  auto c = Compress(*runner_, c_doc, none);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  ASSERT_EQ(b->digest_tokens, 16);
  std::vector<const CompressedContext*> ptrs = {&*a, &*b, &*c};
  auto composed = ComposeContexts(ptrs, *runner_);
  ASSERT_TRUE(composed.ok()) << composed.status();
  EXPECT_EQ(composed->next_position, 40 + 16 + 30);
  EXPECT_EQ(composed->MaxEntries(), 40 + 16 + 30);

  // The reference: a's prefill, then the digest vectors through the model.
  KvCache ref = model_->NewKvCache();
  ASSERT_TRUE(runner_->Forward(a_doc, ref, ForwardOptions{}, nullptr).ok());
  ASSERT_TRUE(runner_->ForwardEmbeddings(b->digest.data(), 16, ref, ForwardOptions{}, nullptr).ok());
  const int hd = model_->config().head_dim;
  std::vector<float> k1(56 * hd), v1(56 * hd), k2(56 * hd), v2(56 * hd);
  for (int l = 0; l < model_->config().n_layers; l += 7) {
    const KvHead& got = composed->head(l, 0);
    const KvHead& want = ref.head(l, 0);
    got.LoadRows(0, 56, hd, k1.data(), v1.data());
    want.LoadRows(0, 56, hd, k2.data(), v2.data());
    EXPECT_EQ(k1, k2) << "layer " << l;
    EXPECT_EQ(v1, v2) << "layer " << l;
    for (int t = 0; t < 56; ++t) ASSERT_EQ(got.pos[t], t);
    EXPECT_EQ(got.pos[56], 56);  // c starts after the digest
  }
  // Digest first, then a KV context; and generation from the composed cache runs.
  std::vector<const CompressedContext*> order2 = {&*b, &*a};
  auto composed2 = ComposeContexts(order2, *runner_);
  ASSERT_TRUE(composed2.ok()) << composed2.status();
  EXPECT_EQ(composed2->next_position, 16 + 40);
  GenerateParams params;
  params.max_tokens = 4;
  params.sampling.temperature = 0;
  params.ignore_eos = true;
  const std::vector<int32_t> prompt = model_->tokenizer().Encode(" The keeper", false, false);
  auto r = Generate(*runner_, *composed2, prompt, params, [](std::string_view) { return true; });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens.size(), 4u);
}

TEST_F(DigestMethodTest, ComposingADigestNeedsTheRunner) {
  auto b = Compress(*runner_, Doc(40), DigestSpec(4));
  ASSERT_TRUE(b.ok());
  std::vector<const CompressedContext*> ptrs = {&*b};
  auto composed = ComposeContexts(ptrs, *model_);
  EXPECT_EQ(composed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(composed.status().message(), HasSubstr("digest context"));
  // A damaged digest (wrong size) is refused, not read out of bounds.
  CompressedContext bad = *b;
  bad.digest.resize(bad.digest.size() - 1);
  ptrs = {&bad};
  composed = ComposeContexts(ptrs, *runner_);
  EXPECT_EQ(composed.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DigestMethodTest, RefusesWhatItCannotDo) {
  // A budget above the compressor's digest queries.
  CompressionSpec s = DigestSpec(0);
  s.budget = kDigests + 1;
  auto r = Compress(*runner_, Doc(50), s);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("at most 16 per chunk"));
  // Knobs that mean nothing for a digest.
  s = DigestSpec(4);
  s.kv_dtype = "int4";
  EXPECT_THAT(s.Validate().message(), HasSubstr("leave kv_dtype at fp16"));
  s = DigestSpec(4);
  s.per_layer = true;
  EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);
  s = DigestSpec(4);
  s.head_budget = "adaptive";
  EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);
  // Another compressor's id.
  s = DigestSpec(4);
  s.compressor = std::string(64, 'f');
  r = Compress(*runner_, Doc(50), s);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  // A model with no compressor attached: FailedPrecondition naming the flag.
  Runner plain(**::ctxcache::testing::SharedFastModel(), pool_.get());
  r = Compress(plain, Doc(50), DigestSpec(4));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("--digest-compressor"));
}

TEST_F(DigestMethodTest, CompressionStopsWhenAsked) {
  int calls = 0;
  Runner::ScopedStop stop(*runner_, [&] {
    return ++calls > 2 ? absl::DeadlineExceededError("deadline") : absl::OkStatus();
  });
  auto r = Compress(*runner_, Doc(200), DigestSpec(4));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace ctxcache
