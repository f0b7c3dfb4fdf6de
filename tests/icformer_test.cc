// The digest compressor (engine/icformer.h): parity with the PyTorch reference
// (train/icformer.py) on a tiny random compressor written by tools/make_digest_fixture.py,
// the fast path against the plain reference, the prefix property, chunking, and every
// refusal a bad compressor file gets.
#include "engine/icformer.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "engine/cpu/matmul_internal.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace ctxcache {
namespace {

using ::ctxcache::testing::ByteReader;
using ::ctxcache::testing::ReadFileToString;
using ::ctxcache::testing::TestDataPath;

// The fixture's "base model" (tools/make_digest_fixture.py FINGERPRINT) and width.
const std::string kFingerprint = std::string(63, '0') + "1";
constexpr int kWidth = 64;

struct Case {
  int lc = 0, n = 0;
  std::vector<float> embeddings, digests;
};

std::vector<Case> ReadCases() {
  auto bytes = ReadFileToString(TestDataPath("digest/tiny_icformer.bin"));
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  if (!bytes.ok()) return {};
  ByteReader r(*bytes);
  EXPECT_EQ(r.FixedString(4), "DGFX");
  EXPECT_EQ(r.I32(), 1);
  EXPECT_EQ(r.I32(), kWidth);
  const int n_cases = r.I32();
  std::vector<Case> cases(n_cases);
  for (Case& c : cases) {
    c.lc = r.I32();
    c.n = r.I32();
    c.embeddings = r.Array<float>(int64_t{c.lc} * kWidth);
    c.digests = r.Array<float>(int64_t{c.n} * kWidth);
  }
  EXPECT_TRUE(r.ok() && r.remaining() == 0) << "fixture is damaged";
  return cases;
}

std::unique_ptr<IcFormer> LoadTiny() {
  auto f = IcFormer::Load(TestDataPath("digest/tiny_icformer.gguf"), kWidth, kFingerprint);
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? *std::move(f) : nullptr;
}

float MaxAbsDiff(const std::vector<float>& a, const float* b) {
  float m = 0.f;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

TEST(IcFormerTest, LoadsTheFixtureConfig) {
  auto f = LoadTiny();
  ASSERT_NE(f, nullptr);
  const IcFormerConfig& c = f->config();
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.d_ff, 96);
  EXPECT_EQ(c.digest_count, 8);
  EXPECT_EQ(c.chunk_length, 16);
  EXPECT_EQ(c.base_fingerprint, kFingerprint);
  EXPECT_EQ(f->file_sha256().size(), 64u);
}

float MeanAbsDiff(const std::vector<float>& a, const float* b) {
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += std::fabs(a[i] - b[i]);
  return static_cast<float>(sum / static_cast<double>(a.size()));
}

// The digests PyTorch computed, from the same fp16 weights. The plain reference (fp32
// products) agrees with them to float rounding: the values are of order 1, and the two RoPE
// angle computations and summation orders differ in the last bits. The fast path agrees as
// closely where its products are fp32; where the CPU runs the GEMM in bf16 (AMX or
// AVX512-BF16, matmul_internal.h), each product's inputs are rounded to 8 significant bits
// (2^-8 relative), which through two layers and the final RMSNorm moves outputs of order 1 by
// a few hundredths (seen: at most 0.048 on this fixture): the bounds below are for that
// rounding, and a real error (a wrong head, mask or position) moves them by order 1.
TEST(IcFormerTest, MatchesThePyTorchReference) {
  auto f = LoadTiny();
  ASSERT_NE(f, nullptr);
  const std::vector<Case> cases = ReadCases();
  ASSERT_EQ(cases.size(), 4u);
  const bool bf16 = matmul_internal::GemmUsesBf16(kWidth);
  const float max_tol = bf16 ? 0.1f : 1e-4f, mean_tol = bf16 ? 0.01f : 1e-5f;
  ThreadPool pool(2);
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "chunk " << c.lc << " tokens, " << c.n << " digests");
    std::vector<float> fast(c.digests.size()), ref(c.digests.size());
    ASSERT_TRUE(f->CompressChunk(c.embeddings.data(), c.lc, c.n, fast.data(), &pool).ok());
    ASSERT_TRUE(f->CompressChunkReference(c.embeddings.data(), c.lc, c.n, ref.data()).ok());
    EXPECT_LT(MaxAbsDiff(c.digests, ref.data()), 1e-4f);
    EXPECT_LT(MeanAbsDiff(c.digests, ref.data()), 1e-5f);
    EXPECT_LT(MaxAbsDiff(c.digests, fast.data()), max_tol) << "bf16 GEMM: " << bf16;
    EXPECT_LT(MeanAbsDiff(c.digests, fast.data()), mean_tol) << "bf16 GEMM: " << bf16;
  }
}

// Digest i reads the chunk and the initial digests 0..i only: the first m of n digests are
// the m digests, whatever n (one compressor serves every ratio). Through the reference path:
// this is the architecture's property; the fast path may round 19 rows (3 digests) and 24
// rows (8) through different kernels (MatMul's dot kernels up to MatMulDotMaxTokens() rows, a
// bf16 GEMM above), and is compared with the reference on its own above.
TEST(IcFormerTest, FewerDigestsAreAPrefixOfMore) {
  auto f = LoadTiny();
  ASSERT_NE(f, nullptr);
  const std::vector<Case> cases = ReadCases();
  ASSERT_GE(cases.size(), 1u);
  const Case& c = cases[0];  // 16 tokens, 8 digests
  std::vector<float> all(8 * kWidth), some(3 * kWidth);
  ASSERT_TRUE(f->CompressChunkReference(c.embeddings.data(), c.lc, 8, all.data()).ok());
  ASSERT_TRUE(f->CompressChunkReference(c.embeddings.data(), c.lc, 3, some.data()).ok());
  EXPECT_LT(MaxAbsDiff(some, all.data()), 1e-5f);
  // ...and they depend on the chunk: another chunk gives other digests.
  std::vector<float> other_emb(c.embeddings);
  other_emb[5] += 1.0f;
  std::vector<float> other(3 * kWidth);
  ASSERT_TRUE(f->CompressChunkReference(other_emb.data(), c.lc, 3, other.data()).ok());
  EXPECT_GT(MaxAbsDiff(some, other.data()), 1e-3f);
}

TEST(IcFormerTest, RefusesChunksAndCountsOutsideItsRange) {
  auto f = LoadTiny();
  ASSERT_NE(f, nullptr);
  std::vector<float> emb(17 * kWidth, 0.1f), out(9 * kWidth);
  for (auto [lc, n] : {std::pair{0, 1}, {17, 1}, {4, 0}, {4, 9}}) {
    absl::Status s = f->CompressChunk(emb.data(), lc, n, out.data(), nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << lc << " " << n;
    EXPECT_NE(s.message().find("this compressor takes 1..16 tokens and 1..8 digests"),
              std::string::npos)
        << s;
  }
}

TEST(IcFormerTest, StopsWhenAsked) {
  auto f = LoadTiny();
  ASSERT_NE(f, nullptr);
  std::vector<float> emb(16 * kWidth, 0.1f), out(8 * kWidth);
  int calls = 0;
  absl::Status s = f->CompressChunk(emb.data(), 16, 8, out.data(), nullptr, [&] {
    return ++calls >= 3 ? absl::CancelledError("client gave up") : absl::OkStatus();
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 3);
}

// The IC-Former code's divide and conquer (train/icformer.py split_chunks).
TEST(IcFormerTest, ChunksAreNearEqualAndCoverTheDocument) {
  using Chunks = std::vector<std::pair<int64_t, int64_t>>;
  EXPECT_EQ(DigestChunks(0, 256), Chunks{});
  EXPECT_EQ(DigestChunks(100, 256), (Chunks{{0, 100}}));
  EXPECT_EQ(DigestChunks(256, 256), (Chunks{{0, 256}}));
  EXPECT_EQ(DigestChunks(257, 256), (Chunks{{0, 129}, {129, 257}}));
  EXPECT_EQ(DigestChunks(1000, 256), (Chunks{{0, 250}, {250, 500}, {500, 750}, {750, 1000}}));
  EXPECT_EQ(DigestsFor(256, 4.0, 128), 64);
  EXPECT_EQ(DigestsFor(250, 8.0, 128), 32);  // ceil(31.25)
  EXPECT_EQ(DigestsFor(3, 8.0, 128), 1);
  EXPECT_EQ(DigestsFor(256, 1.0, 128), 128);  // capped at the learned queries
}

// ---- Refusals: every one is FailedPrecondition naming the file and the problem ----------

void ExpectRefused(const absl::StatusOr<std::unique_ptr<IcFormer>>& f, const std::string& text) {
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kFailedPrecondition) << f.status();
  EXPECT_NE(f.status().message().find("digest compressor "), std::string::npos) << f.status();
  EXPECT_NE(f.status().message().find(text), std::string::npos) << f.status();
}

std::string WriteTemp(const std::string& name, const std::string& bytes) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

TEST(IcFormerTest, RefusesACompressorForAnotherModel) {
  const std::string path = TestDataPath("digest/tiny_icformer.gguf");
  ExpectRefused(IcFormer::Load(path, kWidth, std::string(64, 'a')),
                "trained against the model with fingerprint " + kFingerprint);
  ExpectRefused(IcFormer::Load(path, 896, kFingerprint),
                "its width is 64 but the served model's embeddings are 896 wide");
}

TEST(IcFormerTest, RefusesTruncatedMissingAndForeignFiles) {
  auto bytes = ReadFileToString(TestDataPath("digest/tiny_icformer.gguf"));
  ASSERT_TRUE(bytes.ok());
  for (size_t keep : {size_t{0}, size_t{20}, bytes->size() / 2, bytes->size() - 1}) {
    SCOPED_TRACE(keep);
    const std::string path = WriteTemp("icformer_truncated.gguf", bytes->substr(0, keep));
    ExpectRefused(IcFormer::Load(path, kWidth, kFingerprint), path);
  }
  ExpectRefused(IcFormer::Load("/nonexistent/compressor.gguf", kWidth, kFingerprint),
                "/nonexistent/compressor.gguf");
  // A model file is not a compressor.
  ExpectRefused(IcFormer::Load(TestDataPath("tiny/llama_mha.gguf"), kWidth, kFingerprint),
                "architecture 'llama' is not a digest compressor");
}

// A tensor of the wrong shape: blk.0.wq.weight's first dimension patched from 64 to 32 in
// the header (the data then describes a smaller, still readable tensor).
TEST(IcFormerTest, RefusesATensorOfTheWrongShape) {
  auto bytes = ReadFileToString(TestDataPath("digest/tiny_icformer.gguf"));
  ASSERT_TRUE(bytes.ok());
  std::string b = *bytes;
  const std::string name = "blk.0.wq.weight";
  const size_t at = b.find(name);
  ASSERT_NE(at, std::string::npos);
  // name, then u32 n_dims, then u64 dims.
  size_t dims = at + name.size();
  uint32_t n_dims = 0;
  std::memcpy(&n_dims, b.data() + dims, 4);
  ASSERT_EQ(n_dims, 2u);
  uint64_t d0 = 0;
  std::memcpy(&d0, b.data() + dims + 4, 8);
  ASSERT_EQ(d0, 64u);
  d0 = 32;
  std::memcpy(b.data() + dims + 4, &d0, 8);
  const std::string path = WriteTemp("icformer_shape.gguf", b);
  ExpectRefused(IcFormer::Load(path, kWidth, kFingerprint),
                "tensor 'blk.0.wq.weight' has shape [32, 64], expected [64, 64]");
}

}  // namespace
}  // namespace ctxcache
