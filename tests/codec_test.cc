// The compressed-context codec: lossless round trips per dtype and form, and damaged or
// forged bytes that must fail with the right code and a message naming the problem, without
// a crash or an allocation the input cannot justify (this suite also runs under ASan+UBSan,
// tools/test.sh). Also CRC32C against its published vectors, and atomic context files.
#include "cache/codec.h"

#include <dirent.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "cache/crc32c.h"
#include "common/half.h"

// ---- Allocation probe ----------------------------------------------------------------------
// Replaces the global operator new so a test can assert the largest single allocation made
// while decoding forged input: "rejects huge counts" must mean "before allocating", which a
// status check alone cannot show (a 1 GB vector of empty heads would succeed, then fail).
namespace {
std::atomic<bool> g_probe_on{false};
std::atomic<size_t> g_probe_max{0};

void* ProbedAlloc(size_t n) {
  if (g_probe_on.load(std::memory_order_relaxed)) {
    size_t prev = g_probe_max.load(std::memory_order_relaxed);
    while (n > prev && !g_probe_max.compare_exchange_weak(prev, n)) {
    }
  }
  return std::malloc(n == 0 ? 1 : n);
}
}  // namespace

// GCC sees malloc'ed memory reach free() through inlined new/delete pairs and warns about a
// mismatch that this replacement makes correct by construction.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(size_t n) {
  if (void* p = ProbedAlloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) {
  if (void* p = ProbedAlloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new(size_t n, const std::nothrow_t&) noexcept { return ProbedAlloc(n); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return ProbedAlloc(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace ctxcache {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr char kFingerprint[] = "81ee8e0f5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";
constexpr char kOtherFingerprint[] =
    "1a2b3c4d5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";

float RoundFp16(float x) { return Fp16ToFp32(Fp32ToFp16(x)); }

// A KV context shaped like a per-head selection: every head keeps a different number of
// entries (head 1 of layer 0 keeps none), at increasing original positions. K/V are fp16, as
// the engine stores them.
CompressedContext MakeKvContext(int n_layers = 3, int n_kv_heads = 2, int head_dim = 5) {
  CompressedContext c;
  c.kind = ContextKind::kKv;
  c.model_fingerprint = kFingerprint;
  c.method = "snapkv";
  c.params = "budget=0.25;window=8";
  c.method_version = 3;
  c.source_tokens = 40;
  c.kv = KvCache(n_layers, n_kv_heads, head_dim);
  c.kv.next_position = 40;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int l = 0; l < n_layers; ++l) {
    for (int h = 0; h < n_kv_heads; ++h) {
      const int n = (l == 0 && h == 1) ? 0 : 1 + (l * 7 + h * 3) % 9;
      KvHead& kh = c.kv.head(l, h);
      for (int i = 0; i < n; ++i) kh.pos.push_back(i * 4 + h);
      for (int i = 0; i < n * head_dim; ++i) {
        const float k = dist(rng), v = dist(rng);
        kh.k.push_back(Fp32ToFp16(k));
        kh.v.push_back(Fp32ToFp16(v));
      }
    }
  }
  return c;
}

CompressedContext MakeDigestContext(int digest_tokens = 4, int d_model = 6) {
  CompressedContext c;
  c.kind = ContextKind::kDigest;
  c.model_fingerprint = kFingerprint;
  c.method = "icformer";
  c.params = "digest=4";
  c.source_tokens = 120;
  c.kv = KvCache(2, 1, 4);  // shape kept for the stats (FullKvBytes); no entries
  c.kv.next_position = digest_tokens;
  c.digest_tokens = digest_tokens;
  for (int i = 0; i < digest_tokens * d_model; ++i) c.digest.push_back(RoundFp16(0.37f * i - 3));
  return c;
}

template <typename T>
bool SameBits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::vector<float> ToFloats(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = Fp16ToFp32(h[i]);
  return f;
}

// Every field except the float payloads, which each test compares at its dtype's precision.
void ExpectSameShape(const CompressedContext& a, const CompressedContext& b) {
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.model_fingerprint, b.model_fingerprint);
  EXPECT_EQ(a.method, b.method);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.method_version, b.method_version);
  EXPECT_EQ(a.source_tokens, b.source_tokens);
  EXPECT_EQ(a.kv.n_layers(), b.kv.n_layers());
  EXPECT_EQ(a.kv.n_kv_heads(), b.kv.n_kv_heads());
  EXPECT_EQ(a.kv.head_dim(), b.kv.head_dim());
  EXPECT_EQ(a.kv.next_position, b.kv.next_position);
  EXPECT_EQ(a.digest_tokens, b.digest_tokens);
  ASSERT_EQ(a.digest.size(), b.digest.size());
  for (int l = 0; l < a.kv.n_layers(); ++l) {
    for (int h = 0; h < a.kv.n_kv_heads(); ++h) {
      EXPECT_EQ(a.kv.head(l, h).pos, b.kv.head(l, h).pos) << "layer " << l << " head " << h;
      EXPECT_EQ(a.kv.head(l, h).k.size(), b.kv.head(l, h).k.size());
      EXPECT_EQ(a.kv.head(l, h).v.size(), b.kv.head(l, h).v.size());
    }
  }
}

void ExpectBitExact(const CompressedContext& a, const CompressedContext& b) {
  ExpectSameShape(a, b);
  for (int l = 0; l < a.kv.n_layers(); ++l) {
    for (int h = 0; h < a.kv.n_kv_heads(); ++h) {
      EXPECT_TRUE(SameBits(a.kv.head(l, h).k, b.kv.head(l, h).k))
          << "K layer " << l << " head " << h;
      EXPECT_TRUE(SameBits(a.kv.head(l, h).v, b.kv.head(l, h).v))
          << "V layer " << l << " head " << h;
    }
  }
  EXPECT_TRUE(SameBits(a.digest, b.digest));
}

CompressedContext RoundTrip(const CompressedContext& c, BlobDtype dtype) {
  auto bytes = EncodeContext(c, dtype);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  if (!bytes.ok()) return {};
  auto back = DecodeContext(*bytes, kFingerprint);
  EXPECT_TRUE(back.ok()) << back.status();
  return back.ok() ? *std::move(back) : CompressedContext{};
}

// Applies `f` to every float payload pair (original, decoded); K/V (fp16) as fp32.
template <typename F>
void ForEachPayload(const CompressedContext& a, const CompressedContext& b, F f) {
  for (int l = 0; l < a.kv.n_layers(); ++l) {
    for (int h = 0; h < a.kv.n_kv_heads(); ++h) {
      f(ToFloats(a.kv.head(l, h).k), ToFloats(b.kv.head(l, h).k), a.kv.head_dim());
      f(ToFloats(a.kv.head(l, h).v), ToFloats(b.kv.head(l, h).v), a.kv.head_dim());
    }
  }
  if (a.digest_tokens > 0) {
    f(a.digest, b.digest, static_cast<int>(a.digest.size() / a.digest_tokens));
  }
}

// ---- CRC32C --------------------------------------------------------------------------------

TEST(Crc32cTest, MatchesPublishedVectors) {
  EXPECT_EQ(Crc32c("123456789"), 0xe3069283u);  // the CRC catalogue's check value
  // RFC 3720 B.4: 32 bytes of zeros, of 0xff, and ascending.
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8a9136aau);
  EXPECT_EQ(Crc32c(std::string(32, '\xff')), 0x62a8ab43u);
  std::string ascending(32, 0);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<char>(i);
  EXPECT_EQ(Crc32c(ascending), 0x46dd794eu);
  EXPECT_EQ(Crc32c(""), 0u);
}

TEST(Crc32cTest, HardwareAndPortablePathsAgreeAtEveryLengthAndAlignment) {
  std::mt19937 rng(1);
  std::string buf(300, 0);
  for (char& ch : buf) ch = static_cast<char>(rng());
  for (size_t start = 0; start < 9; ++start) {
    for (size_t n = 0; start + n <= buf.size(); n += 1 + n / 7) {
      ASSERT_EQ(Crc32c(buf.data() + start, n), Crc32cPortable(buf.data() + start, n))
          << "start " << start << " n " << n;
    }
  }
  // Chaining: the CRC of a then b equals the CRC of a + b.
  EXPECT_EQ(Crc32c(buf.data() + 100, 200, Crc32c(buf.data(), 100)), Crc32c(buf));
  EXPECT_EQ(Crc32cPortable(buf.data() + 13, 287, Crc32cPortable(buf.data(), 13)), Crc32c(buf));
}

// ---- Round trips ---------------------------------------------------------------------------

TEST(CodecTest, Fp16RoundTripIsBitExactOnEngineValues) {
  const CompressedContext c = MakeKvContext();
  ExpectBitExact(c, RoundTrip(c, BlobDtype::kF16));
}

TEST(CodecTest, Fp32RoundTripIsBitExactOnAnyValues) {
  // K/V can only hold fp16 values (the cache stores fp16), so "any value" is tested on the
  // digest, which stays fp32; K/V get fp16's special values.
  CompressedContext c = MakeKvContext();
  c.kv.head(2, 1).k[0] = Fp32ToFp16(std::numeric_limits<float>::infinity());
  c.kv.head(2, 1).k[1] = Fp32ToFp16(-0.0f);
  c.kv.head(2, 1).k[2] = Fp32ToFp16(3e-7f);  // fp16 subnormal
  c.digest_tokens = 2;
  c.digest = {std::numeric_limits<float>::infinity(), -0.0f, 1e-40f /* fp32 subnormal */,
              0.1f, 1e6f, -3.3333333f};
  ExpectBitExact(c, RoundTrip(c, BlobDtype::kF32));
}

TEST(CodecTest, Fp16KeepsSpecialValues) {
  CompressedContext c = MakeKvContext();
  std::vector<uint16_t>& k = c.kv.head(1, 0).k;
  k[0] = Fp32ToFp16(-0.0f);
  k[1] = Fp32ToFp16(std::numeric_limits<float>::infinity());
  k[2] = Fp32ToFp16(3e-7f);  // fp16 subnormal
  k[3] = Fp32ToFp16(65504.0f);  // fp16 max
  ExpectBitExact(c, RoundTrip(c, BlobDtype::kF16));
}

TEST(CodecTest, Bf16RoundTripEqualsBf16Rounding) {
  const CompressedContext c = MakeKvContext();
  const CompressedContext back = RoundTrip(c, BlobDtype::kBf16);
  ExpectSameShape(c, back);
  ForEachPayload(c, back, [](const std::vector<float>& a, const std::vector<float>& b, int) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(b[i], Bf16ToFp32(Fp32ToBf16(a[i]))) << i;
      // bf16 keeps 8 significant bits (7 stored): round to nearest errs by at most half an
      // ulp, 2^-8 relative to the value.
      ASSERT_LE(std::fabs(a[i] - b[i]), std::fabs(a[i]) * 0x1p-8f) << i;
    }
  });
}

TEST(CodecTest, Int8RoundTripErrsByAtMostHalfAStepPerRow) {
  const CompressedContext c = MakeKvContext();
  const CompressedContext back = RoundTrip(c, BlobDtype::kInt8);
  ExpectSameShape(c, back);
  ForEachPayload(c, back, [](const std::vector<float>& a, const std::vector<float>& b, int cols) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t r = 0; r * cols < a.size(); ++r) {
      float amax = 0;
      for (int j = 0; j < cols; ++j) amax = std::max(amax, std::fabs(a[r * cols + j]));
      // Step = amax / 127; rounding to nearest errs by half a step, plus fp32 rounding of the
      // scale and the product (a few ulps of amax), plus (new with the fp16 KV cache, which
      // the decoded K/V rows are rounded into) half an fp16 ulp: 2^-11 relative, <= amax.
      const float tol = amax / 127 * 0.5f + amax * 1e-6f + amax * 0x1p-11f;
      for (int j = 0; j < cols; ++j) {
        ASSERT_LE(std::fabs(a[r * cols + j] - b[r * cols + j]), tol) << "row " << r;
      }
    }
  });
}

TEST(CodecTest, DigestFormRoundTripsInEveryDtype) {
  const CompressedContext c = MakeDigestContext();
  ExpectBitExact(c, RoundTrip(c, BlobDtype::kF16));
  ExpectBitExact(c, RoundTrip(c, BlobDtype::kF32));
  ExpectSameShape(c, RoundTrip(c, BlobDtype::kBf16));
  ExpectSameShape(c, RoundTrip(c, BlobDtype::kInt8));
}

TEST(CodecTest, EmptyContextsRoundTrip) {
  CompressedContext empty_heads = MakeKvContext();
  for (int l = 0; l < empty_heads.kv.n_layers(); ++l) {
    for (int h = 0; h < empty_heads.kv.n_kv_heads(); ++h) empty_heads.kv.head(l, h) = KvHead{};
  }
  CompressedContext no_shape;
  no_shape.model_fingerprint = kFingerprint;
  for (BlobDtype dtype : {BlobDtype::kF16, BlobDtype::kBf16, BlobDtype::kF32, BlobDtype::kInt8}) {
    SCOPED_TRACE(BlobDtypeName(dtype));
    ExpectBitExact(empty_heads, RoundTrip(empty_heads, dtype));
    ExpectBitExact(no_shape, RoundTrip(no_shape, dtype));
  }
}

TEST(CodecTest, ModelSizedContextRoundTripsAndSizeMatchesTheFormat) {
  // SmolLM2-135M's shape (30 layers, 3 KV heads, head_dim 64), 1..9 entries per head.
  CompressedContext c = MakeKvContext(30, 3, 64);
  auto bytes = EncodeContext(c, BlobDtype::kF16);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const size_t expected = kContextHeaderBytes + 2 + c.method.size() + 4 + c.params.size() +
                          30 * 3 * 4 + c.kv.TotalEntries() * (4 + 2 * 64 * 2) + 4;
  EXPECT_EQ(bytes->size(), expected);
  auto back = DecodeContext(*bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectBitExact(c, *back);
}

TEST(CodecTest, HeaderLayoutIsVersionOne) {
  // Pins the documented layout (codec.h): changing it needs a new format version.
  auto bytes = EncodeContext(MakeKvContext(), BlobDtype::kBf16);
  ASSERT_TRUE(bytes.ok());
  const std::string& b = *bytes;
  EXPECT_EQ(b.substr(0, 4), "CTXC");
  EXPECT_EQ(b[4], 1);
  EXPECT_EQ(b[5], 0);
  EXPECT_EQ(b[6], 1);  // KV
  EXPECT_EQ(b[7], 2);  // bf16
  uint64_t total;
  std::memcpy(&total, b.data() + 8, 8);
  EXPECT_EQ(total, b.size());
  EXPECT_EQ(static_cast<uint8_t>(b[16]), 0x81);
  EXPECT_EQ(static_cast<uint8_t>(b[47]), 0xef);
  int32_t next_position;
  std::memcpy(&next_position, b.data() + 52, 4);
  EXPECT_EQ(next_position, 40);
  uint16_t method_len;
  std::memcpy(&method_len, b.data() + kContextHeaderBytes, 2);
  EXPECT_EQ(method_len, 6);
  EXPECT_EQ(b.substr(kContextHeaderBytes + 2, 6), "snapkv");
  uint32_t crc;
  std::memcpy(&crc, b.data() + b.size() - 4, 4);
  EXPECT_EQ(crc, Crc32c(b.data(), b.size() - 4));
}

// ---- Damaged input -------------------------------------------------------------------------

std::string ValidBlob(BlobDtype dtype = BlobDtype::kF16) {
  CompressedContext c = MakeKvContext(2, 2, 3);
  c.digest_tokens = 2;
  c.digest = {1, 2, 3, 4, 5, 6};
  auto bytes = EncodeContext(c, dtype);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *bytes : std::string();
}

absl::Status DecodeError(std::string_view bytes, std::string_view fingerprint = {}) {
  auto c = DecodeContext(bytes, fingerprint);
  return c.ok() ? absl::OkStatus() : c.status();
}

TEST(CodecTest, EveryTruncationFailsCleanly) {
  for (BlobDtype dtype : {BlobDtype::kF16, BlobDtype::kInt8}) {
    const std::string valid = ValidBlob(dtype);
    for (size_t cut = 0; cut < valid.size(); ++cut) {
      const absl::Status s = DecodeError(std::string_view(valid).substr(0, cut));
      ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "cut at " << cut << ": " << s;
      ASSERT_THAT(std::string(s.message()), HasSubstr("truncated")) << "cut at " << cut;
    }
  }
}

TEST(CodecTest, EveryFlippedByteIsCaughtByTheRightCheck) {
  const std::string valid = ValidBlob();
  for (size_t i = 0; i < valid.size(); ++i) {
    std::string bad = valid;
    bad[i] ^= 0x10;
    const absl::Status s = DecodeError(bad);
    if (i < 6 || (i >= 8 && i < 16)) {
      // Magic, version and total size are checked first, with their own messages.
      ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "byte " << i << ": " << s;
    } else {
      ASSERT_EQ(s.code(), absl::StatusCode::kDataLoss) << "byte " << i << ": " << s;
      ASSERT_THAT(std::string(s.message()), HasSubstr("checksum mismatch"));
    }
  }
}

TEST(CodecTest, EnvelopeErrorsSayWhatIsWrong) {
  const std::string valid = ValidBlob();
  std::string bad_magic = valid;
  bad_magic[0] = 'G';
  EXPECT_THAT(std::string(DecodeError(bad_magic).message()),
              AllOf(HasSubstr("bad magic"), HasSubstr("0x47545843")));
  EXPECT_THAT(std::string(DecodeError("GGUF").message()), HasSubstr("bad magic"));
  EXPECT_THAT(std::string(DecodeError("").message()), HasSubstr("truncated"));

  std::string newer = valid;
  newer[4] = 3;
  EXPECT_THAT(std::string(DecodeError(newer).message()),
              AllOf(HasSubstr("unsupported context format version 3"), HasSubstr("newer")));

  EXPECT_THAT(std::string(DecodeError(valid + "x").message()), HasSubstr("trailing bytes"));
  EXPECT_THAT(std::string(DecodeError(valid.substr(0, 100)).message()),
              AllOf(HasSubstr("truncated"), HasSubstr("100 bytes")));

  std::string damaged = valid;
  damaged[kContextHeaderBytes + 3] ^= 1;
  const absl::Status s = DecodeError(damaged);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("crc32c"));
}

TEST(CodecTest, FingerprintMismatchIsFailedPreconditionNamingBothModels) {
  const std::string valid = ValidBlob();
  const absl::Status s = DecodeError(valid, kOtherFingerprint);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("context was made by model 81ee8e0f..., this server runs 1a2b3c4d..."));
  EXPECT_TRUE(DecodeError(valid, kFingerprint).ok());
  EXPECT_TRUE(DecodeError(valid).ok());  // no expectation: any model
}

// Forged bytes: a field is changed and the size and checksum are recomputed, as a buggy
// writer would produce them. The decoder must still refuse them field by field.
template <typename T>
void Poke(std::string& b, size_t off, T v) {
  std::memcpy(b.data() + off, &v, sizeof v);
}
std::string Reseal(std::string b) {
  Poke<uint64_t>(b, 8, b.size());
  Poke<uint32_t>(b, b.size() - 4, Crc32c(b.data(), b.size() - 4));
  return b;
}

struct ForgedCase {
  std::string name;
  std::string bytes;
  std::string message;
};

std::vector<ForgedCase> ForgedCases() {
  const std::string v = ValidBlob();
  const size_t method_at = kContextHeaderBytes;  // u16 len + "snapkv"
  const size_t params_at = method_at + 2 + 6;    // u32 len + params
  const size_t heads_at = params_at + 4 + std::string("budget=0.25;window=8").size();
  auto with = [&v](auto f) {
    std::string b = v;
    f(b);
    return Reseal(b);
  };
  std::vector<ForgedCase> cases;
  cases.push_back({"kind", with([](std::string& b) { b[6] = 9; }), "unknown context kind 9"});
  cases.push_back({"dtype", with([](std::string& b) { b[7] = 0; }), "unknown KV dtype 0"});
  cases.push_back({"next_position", with([](std::string& b) { Poke<int32_t>(b, 52, -1); }),
                   "next_position -1"});
  cases.push_back({"position_past_next", with([](std::string& b) { Poke<int32_t>(b, 52, 2); }),
                   "outside [0, next_position = 2)"});
  cases.push_back({"source_tokens", with([](std::string& b) { Poke<int64_t>(b, 56, -5); }),
                   "source_tokens -5"});
  cases.push_back({"layers", with([](std::string& b) { Poke<uint32_t>(b, 64, 1u << 31); }),
                   "outside the limits"});
  cases.push_back(
      {"head_dim_zero", with([](std::string& b) { Poke<uint32_t>(b, 72, 0); }), "head_dim 0"});
  cases.push_back(
      {"digest_shape", with([](std::string& b) { Poke<uint32_t>(b, 76, 0); }), "digest shape"});
  cases.push_back({"method_length",
                   with([&](std::string& b) { Poke<uint16_t>(b, method_at, 300); }),
                   "method length 300"});
  cases.push_back({"params_length",
                   with([&](std::string& b) { Poke<uint32_t>(b, params_at, 1000); }),
                   "params at offset"});
  cases.push_back({"entry_count", with([&](std::string& b) { Poke<uint32_t>(b, heads_at, 1000); }),
                   "layer 0 head 0: 1000 entries"});
  cases.push_back({"int8_scale", "", ""});  // filled below
  cases.push_back(
      {"trailing", Reseal(v.substr(0, v.size() - 4) + "abcd" + "crc!"), "4 unparsed bytes"});
  // An int8 row whose scale is NaN: the first K row of layer 0 head 0 (after the count and
  // the positions of its entries).
  std::string i8 = ValidBlob(BlobDtype::kInt8);
  uint32_t n0;
  std::memcpy(&n0, i8.data() + heads_at, 4);
  Poke<float>(i8, heads_at + 4 + 4 * n0, std::nanf(""));
  cases[11] = {"int8_scale", Reseal(i8), "int8 row 0 has scale nan"};
  return cases;
}

TEST(CodecTest, ForgedFieldsFailWithClearErrors) {
  for (const ForgedCase& c : ForgedCases()) {
    SCOPED_TRACE(c.name);
    const absl::Status s = DecodeError(c.bytes);
    ASSERT_FALSE(s.ok()) << "decoded but should not have";
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message)) << s;
  }
}

// ---- Quantized contexts (kv_dtype int8 / int4: format version 2) ----------------------------

CompressedContext QuantizedContext(KvDtype dtype) {
  CompressedContext c = MakeKvContext(3, 2, 64);
  c.params += std::string(";kv_dtype=") + KvDtypeName(dtype);
  EXPECT_TRUE(c.kv.Freeze(dtype).ok());
  return c;
}

class QuantizedCodecTest : public ::testing::TestWithParam<KvDtype> {};

TEST_P(QuantizedCodecTest, RoundTripIsBitExactSegmentForSegment) {
  const CompressedContext c = QuantizedContext(GetParam());
  auto bytes = EncodeContext(c);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  uint16_t version;
  std::memcpy(&version, bytes->data() + 4, 2);
  EXPECT_EQ(version, 2);
  EXPECT_EQ(static_cast<uint8_t>((*bytes)[7]), GetParam() == KvDtype::kInt8 ? 5 : 6);
  auto back = DecodeContext(*bytes, kFingerprint);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameShape(c, *back);
  EXPECT_EQ(back->kv.StoredDtype(), GetParam());
  EXPECT_EQ(back->KvBytes(), c.KvBytes());
  for (int l = 0; l < 3; ++l) {
    for (int h = 0; h < 2; ++h) {
      const KvHead& a = c.kv.head(l, h);
      const KvHead& b = back->kv.head(l, h);
      ASSERT_EQ(a.segments.size(), b.segments.size());
      if (a.segments.empty()) continue;
      const KvSegment &x = *a.segments[0], &y = *b.segments[0];
      EXPECT_EQ(x.kq, y.kq);
      EXPECT_EQ(x.vq, y.vq);
      EXPECT_EQ(x.k_scale, y.k_scale);
      EXPECT_EQ(x.k_min, y.k_min);
      EXPECT_EQ(x.v_scale, y.v_scale);
      EXPECT_EQ(x.v_min, y.v_min);
    }
  }
  // The blob is the codes and scales (KvBytes) plus the header, strings, counts, positions
  // and checksum: nothing is expanded on the way.
  const int64_t entries = c.kv.TotalEntries();
  EXPECT_EQ(static_cast<int64_t>(bytes->size()),
            static_cast<int64_t>(kContextHeaderBytes + 2 + c.method.size() + 4 + c.params.size() +
                                 4 * 6 + 4 * entries + 4) + c.KvBytes());
}

TEST_P(QuantizedCodecTest, DamageAndForgeriesAreRefused) {
  const std::string v = *EncodeContext(QuantizedContext(GetParam()));
  // Every truncation and every flipped byte: refused, never a crash.
  for (size_t n = 0; n < v.size(); n += 7) EXPECT_FALSE(DecodeContext(v.substr(0, n)).ok()) << n;
  for (size_t i = 0; i < v.size(); i += 5) {
    std::string b = v;
    b[i] ^= 0x20;
    EXPECT_FALSE(DecodeContext(b).ok()) << i;
  }
  // A NaN scale behind a valid checksum: the last fp16 of the blob is a V minimum; the one
  // before the V minima block is a V scale. Poke the last value (a minimum) to NaN.
  std::string nan_min = v;
  Poke<uint16_t>(nan_min, v.size() - 4 - 2, 0x7E00);
  const absl::Status s = DecodeError(Reseal(nan_min));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("V minima: value nan"));
  // Segment dtypes exist only in version 2: a version-1 header with one is unknown.
  std::string v1 = v;
  Poke<uint16_t>(v1, 4, 1);
  EXPECT_THAT(std::string(DecodeError(Reseal(v1)).message()), HasSubstr("unknown KV dtype"));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, QuantizedCodecTest,
                         ::testing::Values(KvDtype::kInt8, KvDtype::kInt4),
                         [](const auto& info) { return std::string(KvDtypeName(info.param)); });

TEST(CodecTest, Fp16ContextsStayVersionOne) {
  // Older replicas read what this build writes, unless it is quantized.
  const std::string b = *EncodeContext(MakeKvContext());
  uint16_t version;
  std::memcpy(&version, b.data() + 4, 2);
  EXPECT_EQ(version, 1);
}

TEST(CodecTest, HugeCountsFailWithoutHugeAllocations) {
  const std::string v = ValidBlob();
  const size_t heads_at = kContextHeaderBytes + 2 + 6 + 4 + 20;
  std::vector<std::string> forged;
  auto forge = [&](auto f) {
    std::string b = v;
    f(b);
    forged.push_back(Reseal(b));
  };
  // Within the shape limits, but 4096 x 4096 heads would be 1.2 GB of empty KvHeads.
  forge([](std::string& b) {
    Poke<uint32_t>(b, 64, 4096);
    Poke<uint32_t>(b, 68, 4096);
  });
  forge([&](std::string& b) { Poke<uint32_t>(b, heads_at, 0xffffffffu); });
  forge([&](std::string& b) {
    Poke<uint32_t>(b, 72, 65536);
    Poke<uint32_t>(b, heads_at, 0x10000000u);
  });
  forge([](std::string& b) {
    Poke<int64_t>(b, 80, int64_t{1} << 62);
    Poke<uint32_t>(b, 76, 1u << 20);
  });
  forge([](std::string& b) { Poke<int64_t>(b, 80, std::numeric_limits<int64_t>::max()); });
  for (size_t i = 0; i < forged.size(); ++i) {
    g_probe_max = 0;
    g_probe_on = true;
    const absl::Status s = DecodeError(forged[i]);
    g_probe_on = false;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "case " << i << ": " << s;
    // Messages and a few small vectors; nothing sized by the forged counts.
    EXPECT_LT(g_probe_max.load(), 64u << 10) << "case " << i << ": " << s;
  }
}

// ---- Encoder refusals ----------------------------------------------------------------------

TEST(CodecTest, EncoderRefusesInconsistentContexts) {
  auto error = [](const CompressedContext& c, BlobDtype dtype = BlobDtype::kF16) {
    auto b = EncodeContext(c, dtype);
    return b.ok() ? absl::OkStatus() : b.status();
  };
  struct Case {
    std::string name;
    CompressedContext context;
    BlobDtype dtype;
    std::string message;
  };
  std::vector<Case> cases;
  auto add = [&](std::string name, auto mutate, std::string message,
                 BlobDtype dtype = BlobDtype::kF16) {
    CompressedContext c = MakeKvContext();
    mutate(c);
    cases.push_back({std::move(name), std::move(c), dtype, std::move(message)});
  };
  add(
      "short_fingerprint", [](CompressedContext& c) { c.model_fingerprint = "abc"; },
      "64 lowercase hex");
  add(
      "upper_fingerprint", [](CompressedContext& c) { c.model_fingerprint[5] = 'E'; },
      "found 'E' at 5");
  add(
      "k_size", [](CompressedContext& c) { c.kv.head(1, 1).k.pop_back(); },
      "layer 1 head 1: k holds");
  add(
      "position", [](CompressedContext& c) { c.kv.head(2, 0).pos[0] = 40; },
      "layer 2 head 0: entry 0 has position 40");
  add(
      "negative_position", [](CompressedContext& c) { c.kv.head(2, 0).pos[0] = -1; },
      "position -1");
  // K/V are fp16 already; the digest (fp32) is what can overflow fp16.
  add(
      "fp16_overflow",
      [](CompressedContext& c) {
        c.digest_tokens = 1;
        c.digest = {1.0f, 2.0f, 1e6f};
      },
      "digest: value 1e+06 at row 0 overflows fp16");
  add(
      "int8_nan",
      [](CompressedContext& c) { c.kv.head(1, 0).k[7] = Fp32ToFp16(std::nanf("")); },
      "layer 1 head 0 K: non-finite value at row 1", BlobDtype::kInt8);
  add(
      "digest_shape",
      [](CompressedContext& c) {
        c.digest_tokens = 3;
        c.digest.resize(10);
      },
      "digest holds 10 values");
  add(
      "digest_without_tokens", [](CompressedContext& c) { c.digest.resize(4); },
      "digest_tokens is 0");
  add(
      "dtype", [](CompressedContext&) {}, "unknown KV dtype 9", static_cast<BlobDtype>(9));
  add(
      "method", [](CompressedContext& c) { c.method = std::string(300, 'm'); },
      "method name is 300 bytes");
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const absl::Status s = error(c.context, c.dtype);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message)) << s;
  }
  // fp16 overflow is refused, but bf16 and fp32 store the same value.
  CompressedContext big = MakeKvContext();
  big.digest_tokens = 1;
  big.digest = {1.0f, 2.0f, 1e6f};
  EXPECT_TRUE(error(big, BlobDtype::kBf16).ok());
  EXPECT_TRUE(error(big, BlobDtype::kF32).ok());
}

// ---- Files ---------------------------------------------------------------------------------

class ContextFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/codec_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (const std::string& name : Entries()) std::remove((dir_ + "/" + name).c_str());
    rmdir(dir_.c_str());
  }
  std::vector<std::string> Entries() const {
    std::vector<std::string> names;
    if (DIR* d = opendir(dir_.c_str())) {
      while (dirent* e = readdir(d)) {
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
          names.push_back(e->d_name);
        }
      }
      closedir(d);
    }
    return names;
  }
  std::string dir_;
};

TEST_F(ContextFileTest, WritesReadsAndReplaces) {
  const std::string path = dir_ + "/doc.ctxc";
  const std::string first = ValidBlob(), second = ValidBlob(BlobDtype::kF32);
  ASSERT_TRUE(WriteContextFile(path, first).ok());
  auto read = ReadContextFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, first);
  ASSERT_TRUE(WriteContextFile(path, second).ok());
  EXPECT_EQ(*ReadContextFile(path), second);
  EXPECT_TRUE(DecodeContext(*ReadContextFile(path), kFingerprint).ok());
  EXPECT_EQ(Entries(), std::vector<std::string>{"doc.ctxc"}) << "a temporary file was left";
  struct stat st = {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(ContextFileTest, AFailedWriteLeavesTheOldFileAndNoTemporary) {
  const std::string path = dir_ + "/doc.ctxc";
  const std::string old = ValidBlob();
  ASSERT_TRUE(WriteContextFile(path, old).ok());
  // Make write() fail part-way: a file size limit below the new blob's size (EFBIG instead of
  // the default SIGXFSZ, which would kill the test).
  rlimit saved = {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto* prev_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 1000;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const absl::Status s = WriteContextFile(path, std::string(5000, 'x'));
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, prev_handler);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("cannot write"));
  EXPECT_EQ(*ReadContextFile(path), old);
  EXPECT_EQ(Entries(), std::vector<std::string>{"doc.ctxc"}) << "a temporary file was left";

  // A rename that fails (the target is a directory) also cleans up.
  const std::string sub = dir_ + "/sub";
  ASSERT_EQ(mkdir(sub.c_str(), 0700), 0);
  EXPECT_FALSE(WriteContextFile(sub, old).ok());
  rmdir(sub.c_str());
  EXPECT_EQ(Entries(), std::vector<std::string>{"doc.ctxc"});
}

TEST_F(ContextFileTest, MissingPathsAreNotFound) {
  EXPECT_EQ(ReadContextFile(dir_ + "/none.ctxc").status().code(), absl::StatusCode::kNotFound);
  const absl::Status s = WriteContextFile(dir_ + "/no/such/dir.ctxc", "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("no/such/dir.ctxc"));
  EXPECT_EQ(ReadContextFile(dir_).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ctxcache
