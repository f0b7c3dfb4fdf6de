// The Redis tier and the two-tier store against a real redis-server (tests/redis_server.h)
// on a free loopback port: multi-part round trips, metadata written last, TTLs, AUTH with a
// password and with an ACL user, SELECT, tenant quotas and isolation, Redis killed, paused
// and restarted under a running store, and damaged or foreign entries being detected,
// recomputed and replaced.
//
// Without redis-server these tests skip, or fail when CTXCACHE_REQUIRE_REDIS=1 (CI).
#include "cache/redis_tier.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "cache/codec.h"
#include "cache/context_store.h"
#include "cache/crc32c.h"
#include "common/half.h"
#include "tests/redis_server.h"
#include "tests/redis_test_util.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;
using testing::RedisServer;

using testing::ExpectSameContext;
using testing::kFingerprint;
using testing::kOtherFingerprint;
using testing::MakeContext;

int64_t BlobBytes(const CompressedContext& c) { return EncodeContext(c, BlobDtype::kF16)->size(); }

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

// Raw commands against the test server, for looking at and damaging what the tier wrote.
class Raw {
 public:
  explicit Raw(redisContext* c) : c_(c) {}
  ~Raw() {
    if (c_ != nullptr) redisFree(c_);
  }
  bool ok() const { return c_ != nullptr; }
  Reply Run(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const std::string& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    return Reply(static_cast<redisReply*>(
        redisCommandArgv(c_, static_cast<int>(argv.size()), argv.data(), lens.data())));
  }
  std::vector<std::string> Keys(const std::string& pattern) {
    std::vector<std::string> keys;
    Reply r = Run({"KEYS", pattern});
    if (r != nullptr && r->type == REDIS_REPLY_ARRAY) {
      for (size_t i = 0; i < r->elements; ++i)
        keys.emplace_back(r->element[i]->str, r->element[i]->len);
    }
    std::sort(keys.begin(), keys.end());
    return keys;
  }
  std::string Get(const std::string& key) {
    Reply r = Run({"GET", key});
    return r != nullptr && r->type == REDIS_REPLY_STRING ? std::string(r->str, r->len) : "";
  }
  int64_t Integer(const std::vector<std::string>& args) {
    Reply r = Run(args);
    return r != nullptr && r->type == REDIS_REPLY_INTEGER ? r->integer : INT64_MIN;
  }
  redisContext* context() { return c_; }

 private:
  redisContext* c_;
};

class RedisTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    binary_ = testing::FindRedisServer();
    if (binary_.empty()) {
      if (testing::RequireRedis()) {
        FAIL() << "redis-server not found (PATH, /usr/bin, CTXCACHE_REDIS_SERVER) but "
                  "CTXCACHE_REQUIRE_REDIS=1: install it (tools/setup.sh installs redis-server)";
      }
      GTEST_SKIP() << "redis-server not found on PATH or in /usr/bin; install redis-server "
                      "(tools/setup.sh) or set CTXCACHE_REQUIRE_REDIS=1 to make this a failure";
    }
    server_ = std::make_unique<RedisServer>(binary_);
    const std::string error = server_->Start();
    ASSERT_EQ(error, "");
  }

  // Options for a store on server_ (or `url`): small parts so that every entry has several,
  // short timeouts and backoff so that outages play out in milliseconds.
  ContextStoreOptions Options(const std::string& url = "") const {
    ContextStoreOptions o;
    o.memory_bytes = 64 << 20;
    o.model_fingerprint = kFingerprint;
    o.redis.url = url.empty() ? server_->Url() : url;
    o.redis.pool_size = 2;
    o.redis.connect_timeout_ms = 500;
    o.redis.command_timeout_ms = 500;
    o.redis.backoff_initial_ms = 10;
    o.redis.backoff_max_ms = 100;
    // The circuit breaker opens after 5 failures in a row (an outage here makes several):
    // a short cool-down, so that it does not outlast the outages these tests play out.
    o.redis.circuit_cool_down_ms = 50;
    o.redis.ttl_seconds = 3600;
    o.redis.max_part_bytes = 1000;
    return o;
  }
  std::unique_ptr<ContextStore> NewStore(const ContextStoreOptions& o) {
    absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(o);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }
  std::unique_ptr<RedisTier> NewTier(const RedisOptions& o,
                                     const std::string& fingerprint = kFingerprint) {
    absl::StatusOr<std::unique_ptr<RedisTier>> tier = RedisTier::Create(o, fingerprint);
    EXPECT_TRUE(tier.ok()) << tier.status();
    return tier.ok() ? *std::move(tier) : nullptr;
  }
  Raw RawConnection(const std::vector<std::string>& auth = {}) {
    return Raw(server_->Connect(auth));
  }

  // GetOrCompute, then waits for the background writer to store the result: these tests
  // check what lands in Redis, which the store writes after GetOrCompute has returned.
  static absl::StatusOr<StoreResult> Stored(ContextStore* store, const std::string& tenant,
                                            const std::string& key,
                                            const ContextStore::ComputeFn& compute) {
    absl::StatusOr<StoreResult> r = store->GetOrCompute(tenant, key, compute);
    EXPECT_TRUE(store->WaitForWrites(absl::Seconds(30))) << "a Redis write did not finish";
    return r;
  }

  // A compute function that counts its calls.
  ContextStore::ComputeFn Counting(int* computes, float seed = 1.0f) {
    return [computes, seed]() -> absl::StatusOr<CompressedContext> {
      ++*computes;
      return MakeContext(seed);
    };
  }

  std::string binary_;
  std::unique_ptr<RedisServer> server_;
};

TEST_F(RedisTierTest, MultiPartRoundTrip) {
  ContextStoreOptions o = Options();
  std::unique_ptr<RedisTier> tier = NewTier(o.redis);
  ASSERT_NE(tier, nullptr);
  const CompressedContext c = MakeContext(3.0f);
  const int64_t bytes = BlobBytes(c);
  ASSERT_GT(bytes, 3 * o.redis.max_part_bytes);
  ASSERT_TRUE(tier->Put("acme", "k1", c).ok());

  Raw raw = RawConnection();
  ASSERT_TRUE(raw.ok());
  const std::vector<std::string> parts = raw.Keys("ctxcache:{acme:k1}:p:*");
  EXPECT_EQ(static_cast<int64_t>(parts.size()),
            (bytes + o.redis.max_part_bytes - 1) / o.redis.max_part_bytes);
  for (const std::string& p : parts) {
    EXPECT_LE(static_cast<int64_t>(raw.Get(p).size()), o.redis.max_part_bytes) << p;
  }
  EXPECT_THAT(raw.Get("ctxcache:{acme:k1}:m"), HasSubstr("ctxm1 "));

  absl::StatusOr<CompressedContext> back = tier->Get("acme", "k1");
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameContext(*back, c);
  EXPECT_EQ(tier->Get("acme", "k2").status().code(), absl::StatusCode::kNotFound);

  // A value that fits one part has one part.
  o.redis.max_part_bytes = 1 << 20;
  std::unique_ptr<RedisTier> big_parts = NewTier(o.redis);
  ASSERT_TRUE(big_parts->Put("acme", "k3", c).ok());
  EXPECT_EQ(raw.Keys("ctxcache:{acme:k3}:p:*").size(), 1u);
  back = tier->Get("acme", "k3");  // readers need not share the writer's part size
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameContext(*back, c);
}

// A quantized context travels as its codes and scales (codec format 2) and comes back as the
// same segments: what one replica stored at int4 another reads at int4, in place.
TEST_F(RedisTierTest, QuantizedContextRoundTripsAsStored) {
  std::unique_ptr<RedisTier> tier = NewTier(Options().redis);
  ASSERT_NE(tier, nullptr);
  CompressedContext c = MakeContext(2.0f, kFingerprint, 70);
  c.kv = KvCache(2, 2, 32);
  c.kv.next_position = 8 * 70;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      KvHead& kh = c.kv.head(l, h);
      for (int i = 0; i < 70; ++i) kh.pos.push_back(8 * i + h);
      for (int i = 0; i < 70 * 32; ++i) {
        kh.k.push_back(Fp32ToFp16(0.01f * static_cast<float>(i % 97) - l));
        kh.v.push_back(Fp32ToFp16(0.02f * static_cast<float>(i % 53) + h));
      }
    }
  }
  ASSERT_TRUE(c.kv.Freeze(KvDtype::kInt4).ok());
  const absl::Status put = tier->Put("acme", "q1", c);
  ASSERT_TRUE(put.ok()) << put;
  absl::StatusOr<CompressedContext> back = tier->Get("acme", "q1");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->kv.StoredDtype(), KvDtype::kInt4);
  EXPECT_EQ(back->KvBytes(), c.KvBytes());
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      const KvSegment& a = *c.kv.head(l, h).segments.at(0);
      const KvSegment& b = *back->kv.head(l, h).segments.at(0);
      EXPECT_EQ(a.kq, b.kq);
      EXPECT_EQ(a.v_scale, b.v_scale);
      EXPECT_EQ(c.kv.head(l, h).pos, back->kv.head(l, h).pos);
    }
  }
}

// A digest context (method "digest": vectors the model reads as input embeddings, no kept
// entries) travels through Redis like any other and comes back exactly (its values are
// fp16-exact, as the engine makes them).
TEST_F(RedisTierTest, DigestContextRoundTrips) {
  std::unique_ptr<RedisTier> tier = NewTier(Options().redis);
  ASSERT_NE(tier, nullptr);
  CompressedContext c;
  c.kind = ContextKind::kDigest;
  c.model_fingerprint = kFingerprint;
  c.method = "digest";
  c.params = "compressor=" + std::string(64, 'c') + ";ratio=4";
  c.source_tokens = 160;
  c.kv = KvCache(2, 2, 8);  // no entries; the model's shape
  c.kv.next_position = 40;
  c.digest_tokens = 40;
  for (int i = 0; i < 40 * 24; ++i) {
    c.digest.push_back(Fp16ToFp32(Fp32ToFp16(0.01f * static_cast<float>(i % 89) - 0.4f)));
  }
  ASSERT_TRUE(tier->Put("acme", "d1", c).ok());
  absl::StatusOr<CompressedContext> back = tier->Get("acme", "d1");
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameContext(*back, c);
  EXPECT_EQ(back->kind, ContextKind::kDigest);
  EXPECT_EQ(back->digest, c.digest);
  EXPECT_EQ(back->KeptEntries(), 40 * 2 * 2);
  EXPECT_EQ(back->KvBytes(), 40 * 24 * 2);
}

TEST_F(RedisTierTest, MetadataIsWrittenLastAndAHalfWrittenEntryIsAMiss) {
  ContextStoreOptions o = Options();
  std::unique_ptr<RedisTier> tier = NewTier(o.redis);
  ASSERT_NE(tier, nullptr);

  // Watch the server's command stream while the tier writes: every part before the metadata.
  Raw monitor = RawConnection();
  ASSERT_TRUE(monitor.ok());
  Reply ok = monitor.Run({"MONITOR"});
  ASSERT_NE(ok, nullptr);
  ASSERT_TRUE(tier->Put("acme", "k1", MakeContext()).ok());
  int part_sets = 0;
  bool meta_seen = false;
  // Bounded: the connection's 2 s timeout ends a stream that stops, this ends one that
  // goes on without the line we wait for.
  for (int lines = 0; !meta_seen; ++lines) {
    ASSERT_LT(lines, 1000) << "no SET of the metadata in the MONITOR stream";
    void* line = nullptr;
    ASSERT_EQ(redisGetReply(monitor.context(), &line), REDIS_OK) << "MONITOR stream ended";
    Reply r(static_cast<redisReply*>(line));
    const std::string text(r->str, r->len);
    if (text.find("\"SET\" \"ctxcache:{acme:k1}:p:") != std::string::npos) ++part_sets;
    if (text.find("\"SET\" \"ctxcache:{acme:k1}:m\"") != std::string::npos) meta_seen = true;
  }
  EXPECT_EQ(part_sets, (BlobBytes(MakeContext()) + 999) / 1000);

  // A writer that died after its parts: parts under a write id, no metadata.
  Raw raw = RawConnection();
  const std::string wid(32, 'a');
  for (int i = 0; i < 3; ++i) {
    raw.Run({"SET", tier->PartKey("acme", "dead", wid, i), std::string(1000, 'x')});
  }
  EXPECT_EQ(tier->Get("acme", "dead").status().code(), absl::StatusCode::kNotFound);

  // Metadata naming a part that is gone (replaced or expired under the reader): a miss too.
  const std::vector<std::string> parts = raw.Keys("ctxcache:{acme:k1}:p:*");
  ASSERT_GE(parts.size(), 2u);
  raw.Run({"DEL", parts[1]});
  const absl::Status torn = tier->Get("acme", "k1").status();
  EXPECT_EQ(torn.code(), absl::StatusCode::kNotFound) << torn;
  EXPECT_THAT(std::string(torn.message()), HasSubstr("incomplete"));

  // Through the store: counted as a miss (not damage), recomputed, and readable again.
  std::unique_ptr<ContextStore> store = NewStore(o);
  int computes = 0;
  absl::StatusOr<StoreResult> r = Stored(store.get(), "acme", "k1", Counting(&computes));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_EQ(store->Stats().redis_misses, 1);
  EXPECT_EQ(store->Stats().redis_corrupt, 0);
  store->ClearMemory();
  EXPECT_EQ(store->Get("acme", "k1")->tier, CacheTier::kRedis);
}

TEST_F(RedisTierTest, EveryKeyHasTheTtl) {
  ContextStoreOptions o = Options();
  o.redis.ttl_seconds = 120;
  o.redis.tenant_quota_bytes = 1 << 20;  // so the quota ledger exists too
  std::unique_ptr<RedisTier> tier = NewTier(o.redis);
  ASSERT_TRUE(tier->Put("acme", "k1", MakeContext()).ok());
  Raw raw = RawConnection();
  const std::vector<std::string> keys = raw.Keys("ctxcache:*");
  ASSERT_GE(keys.size(), 6u);  // metadata, parts, ledger and total
  for (const std::string& k : keys) {
    const int64_t ttl = raw.Integer({"TTL", k});
    EXPECT_GT(ttl, 0) << k;
    EXPECT_LE(ttl, 120 + 60) << k;  // the ledger outlives its entries by a minute
  }
  EXPECT_GT(raw.Integer({"TTL", "ctxcache:{acme:k1}:m"}), 100);

  o.redis.ttl_seconds = 0;  // no expiry
  std::unique_ptr<RedisTier> forever = NewTier(o.redis);
  ASSERT_TRUE(forever->Put("acme", "k2", MakeContext()).ok());
  EXPECT_EQ(raw.Integer({"TTL", "ctxcache:{acme:k2}:m"}), -1);
  for (const std::string& k : raw.Keys("ctxcache:{acme:k2}:p:*")) {
    EXPECT_EQ(raw.Integer({"TTL", k}), -1) << k;
  }
}

TEST_F(RedisTierTest, AuthenticatesWithAPassword) {
  server_ =
      std::make_unique<RedisServer>(binary_, std::vector<std::string>{"--requirepass", "s3cret"});
  ASSERT_EQ(server_->Start(), "");
  std::unique_ptr<ContextStore> store = NewStore(Options(server_->Url(":s3cret")));
  int computes = 0;
  ASSERT_TRUE(Stored(store.get(), "t", "k", Counting(&computes)).ok());
  store->ClearMemory();
  absl::StatusOr<StoreResult> r = store->Get("t", "k");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kRedis);
  EXPECT_TRUE(store->Stats().redis_connected);
  EXPECT_EQ(store->Stats().redis_errors, 0);

  // Wrong password and none at all: served by computing, errors counted, never connected.
  for (const std::string& userinfo : {std::string(":wrong"), std::string()}) {
    std::unique_ptr<ContextStore> bad = NewStore(Options(server_->Url(userinfo)));
    computes = 0;
    r = Stored(bad.get(), "t", "k", Counting(&computes));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tier, CacheTier::kComputed) << userinfo;
    EXPECT_EQ(computes, 1);
    EXPECT_GE(bad->Stats().redis_errors, 1) << userinfo;
    EXPECT_EQ(bad->Stats().redis_hits, 0);
  }
}

TEST_F(RedisTierTest, AuthenticatesAsAnAclUserAndSelectsTheDatabase) {
  server_ = std::make_unique<RedisServer>(
      binary_, std::vector<std::string>{"--user", "alice", "on", ">alicepw", "~*", "&*", "+@all",
                                        "--user", "default", "off"});
  ASSERT_EQ(server_->Start(), "");
  std::unique_ptr<ContextStore> store = NewStore(Options(server_->Url("alice:alicepw", 3)));
  int computes = 0;
  ASSERT_TRUE(Stored(store.get(), "t", "k", Counting(&computes)).ok());
  store->ClearMemory();
  absl::StatusOr<StoreResult> r = store->Get("t", "k");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kRedis);
  EXPECT_EQ(store->Stats().redis_errors, 0);

  Raw raw = RawConnection({"alice", "alicepw"});
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(raw.Integer({"DBSIZE"}), 0);  // db 0 is empty; the entry went to db 3
  raw.Run({"SELECT", "3"});
  EXPECT_GT(raw.Integer({"DBSIZE"}), 0);

  // The right password for the wrong user is refused.
  std::unique_ptr<ContextStore> bad = NewStore(Options(server_->Url("bob:alicepw")));
  computes = 0;
  ASSERT_TRUE(Stored(bad.get(), "t", "k", Counting(&computes)).ok());
  EXPECT_EQ(computes, 1);
  EXPECT_GE(bad->Stats().redis_errors, 1);
  EXPECT_FALSE(bad->Stats().redis_connected);
}

TEST_F(RedisTierTest, TenantQuotaSkipsWritesButNeverFailsRequests) {
  const int64_t blob = BlobBytes(MakeContext());
  ContextStoreOptions o = Options();
  o.redis.tenant_quota_bytes = 2 * blob + blob / 2;  // room for two entries
  std::unique_ptr<ContextStore> store = NewStore(o);
  std::unique_ptr<RedisTier> tier = NewTier(o.redis);
  int computes = 0;
  for (const char* key : {"k1", "k2", "k3"}) {
    absl::StatusOr<StoreResult> r = Stored(store.get(), "alice", key, Counting(&computes));
    ASSERT_TRUE(r.ok()) << key << ": " << r.status();
    EXPECT_EQ(r->tier, CacheTier::kComputed);
  }
  ContextStoreStats s = store->Stats();
  EXPECT_EQ(s.redis_writes, 2);
  EXPECT_EQ(s.redis_quota_skips, 1);
  EXPECT_EQ(s.redis_errors, 0);
  EXPECT_EQ(*tier->TenantUsage("alice"), 2 * blob);
  Raw raw = RawConnection();
  EXPECT_TRUE(raw.Keys("ctxcache:alice:*k3*").empty());  // nothing of the skipped entry

  // Another tenant has its own quota.
  ASSERT_TRUE(Stored(store.get(), "bob", "k1", Counting(&computes)).ok());
  EXPECT_EQ(store->Stats().redis_writes, 3);
  EXPECT_EQ(*tier->TenantUsage("bob"), blob);

  // Replacing an entry releases the old one's bytes; deleting one frees room.
  ASSERT_TRUE(tier->Put("alice", "k2", MakeContext(5.0f)).ok());
  EXPECT_EQ(*tier->TenantUsage("alice"), 2 * blob);
  ASSERT_TRUE(store->Delete("alice", "k1").ok());
  EXPECT_EQ(*tier->TenantUsage("alice"), blob);
  store->ClearMemory();
  ASSERT_TRUE(Stored(store.get(), "alice", "k3", Counting(&computes)).ok());
  EXPECT_EQ(store->Stats().redis_writes, 4);
  EXPECT_EQ(*tier->TenantUsage("alice"), 2 * blob);
}

TEST_F(RedisTierTest, ExpiredEntriesGiveTheirQuotaBack) {
  const int64_t blob = BlobBytes(MakeContext());
  ContextStoreOptions o = Options();
  o.redis.ttl_seconds = 1;
  o.redis.tenant_quota_bytes = blob + blob / 2;  // room for one entry
  std::unique_ptr<RedisTier> tier = NewTier(o.redis);
  ASSERT_TRUE(tier->Put("alice", "k1", MakeContext()).ok());
  EXPECT_EQ(tier->Put("alice", "k2", MakeContext()).code(), absl::StatusCode::kResourceExhausted);
  // Poll until k1 has expired (1 s) and its bytes are released.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  absl::Status put = absl::UnknownError("not tried");
  while (std::chrono::steady_clock::now() < deadline) {
    put = tier->Put("alice", "k2", MakeContext());
    if (put.ok()) break;
    ASSERT_EQ(put.code(), absl::StatusCode::kResourceExhausted) << put;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(put.ok()) << put;
  EXPECT_EQ(*tier->TenantUsage("alice"), blob);
  EXPECT_EQ(tier->Get("alice", "k1").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(RedisTierTest, TenantsAreIsolated) {
  std::unique_ptr<ContextStore> store = NewStore(Options());
  int computes = 0;
  ASSERT_TRUE(Stored(store.get(), "alice", "k", Counting(&computes, 1.0f)).ok());
  store->ClearMemory();
  EXPECT_EQ(store->Get("bob", "k").status().code(), absl::StatusCode::kNotFound);
  // A tenant whose name spells alice's key namespace gets its own, escaped one.
  EXPECT_EQ(store->Get("alice:m", "k").status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<StoreResult> r = Stored(store.get(), "alice:m", "k", Counting(&computes, 2.0f));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_EQ(computes, 2);
  store->ClearMemory();
  EXPECT_EQ(Fp16ToFp32(store->Get("alice", "k")->context->kv.head(0, 0).k[0]), 1.0f);
  EXPECT_EQ(Fp16ToFp32(store->Get("alice:m", "k")->context->kv.head(0, 0).k[0]), 2.0f);
  Raw raw = RawConnection();
  EXPECT_EQ(raw.Keys("ctxcache:{alice%3Am:*}:m").size(), 1u);
  EXPECT_EQ(raw.Keys("ctxcache:{alice:*}:m").size(), 1u);
  // Deleting one tenant's entry leaves the other's.
  ASSERT_TRUE(store->Delete("alice:m", "k").ok());
  store->ClearMemory();
  EXPECT_EQ(store->Get("alice", "k")->tier, CacheTier::kRedis);
  EXPECT_EQ(store->Delete("bob", "k").code(), absl::StatusCode::kNotFound);
}

TEST_F(RedisTierTest, ClearMemoryThenGetServesFromRedis) {
  std::unique_ptr<ContextStore> store = NewStore(Options());
  int computes = 0;
  absl::StatusOr<StoreResult> first = Stored(store.get(), "t", "k", Counting(&computes, 4.0f));
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->tier, CacheTier::kComputed);
  EXPECT_EQ(Stored(store.get(), "t", "k", Counting(&computes))->tier, CacheTier::kMemory);
  store->ClearMemory();
  EXPECT_EQ(store->Stats().memory_entries, 0);
  absl::StatusOr<StoreResult> r = store->Get("t", "k");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kRedis);
  ExpectSameContext(*r->context, *first->context);
  // The hit was promoted to memory.
  EXPECT_EQ(Stored(store.get(), "t", "k", Counting(&computes))->tier, CacheTier::kMemory);
  EXPECT_EQ(computes, 1);
  // A second process sharing the Redis (here: a second store) hits it too.
  std::unique_ptr<ContextStore> replica = NewStore(Options());
  EXPECT_EQ(Stored(replica.get(), "t", "k", Counting(&computes))->tier, CacheTier::kRedis);
  EXPECT_EQ(computes, 1);
  const ContextStoreStats s = store->Stats();
  EXPECT_EQ(s.redis_hits, 1);
  EXPECT_EQ(s.redis_misses, 1);
  EXPECT_EQ(s.redis_writes, 1);
}

TEST_F(RedisTierTest, DeleteRemovesFromBothTiers) {
  std::unique_ptr<ContextStore> store = NewStore(Options());
  int computes = 0;
  ASSERT_TRUE(Stored(store.get(), "t", "k", Counting(&computes)).ok());
  ASSERT_TRUE(store->Delete("t", "k").ok());
  EXPECT_EQ(store->Get("t", "k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->Delete("t", "k").code(), absl::StatusCode::kNotFound);
  Raw raw = RawConnection();
  EXPECT_TRUE(raw.Keys("ctxcache:t:*").empty());  // metadata and parts
}

TEST_F(RedisTierTest, ConcurrentRequestsShareOneLookupAndCompute) {
  std::unique_ptr<ContextStore> store = NewStore(Options());
  std::atomic<int> computes{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      absl::StatusOr<StoreResult> r =
          Stored(store.get(), "t", "k", [&]() -> absl::StatusOr<CompressedContext> {
            ++computes;
            return MakeContext();
          });
      EXPECT_TRUE(r.ok()) << r.status();
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(computes.load(), 1);
  EXPECT_EQ(store->Stats().redis_writes, 1);
}

TEST_F(RedisTierTest, RedisKilledThenRestarted) {
  std::unique_ptr<ContextStore> store = NewStore(Options());
  int computes = 0;
  ASSERT_TRUE(Stored(store.get(), "t", "k", Counting(&computes)).ok());
  EXPECT_TRUE(store->Stats().redis_connected);

  server_->Kill();
  store->ClearMemory();
  const auto start = std::chrono::steady_clock::now();
  for (const char* key : {"k", "k2", "k3"}) {
    absl::StatusOr<StoreResult> r = Stored(store.get(), "t", key, Counting(&computes));
    ASSERT_TRUE(r.ok()) << key << ": " << r.status();
    EXPECT_EQ(r->tier, CacheTier::kComputed);
  }
  // Connection refused is immediate: no request waited for a timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_EQ(computes, 4);
  ContextStoreStats s = store->Stats();
  EXPECT_GE(s.redis_errors, 3);
  EXPECT_FALSE(s.redis_connected);

  // Restarted (empty: no persistence). The store reconnects after its backoff and stores and
  // serves entries again. Poll: the backoff decides when the next attempt is made.
  ASSERT_EQ(server_->Start(), "");
  const int64_t writes = s.redis_writes;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (store->Stats().redis_writes == writes && std::chrono::steady_clock::now() < deadline) {
    store->ClearMemory();
    ASSERT_TRUE(Stored(store.get(), "t", "after", Counting(&computes)).ok());
    if (store->Stats().redis_writes == writes) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ASSERT_GT(store->Stats().redis_writes, writes) << "the store never wrote to Redis again";
  store->ClearMemory();
  absl::StatusOr<StoreResult> r = store->Get("t", "after");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kRedis);
  EXPECT_TRUE(store->Stats().redis_connected);
}

TEST_F(RedisTierTest, StalledRedisCostsOneTimeoutThenFailsFast) {
  ContextStoreOptions o = Options();
  o.redis.command_timeout_ms = 300;
  o.redis.backoff_initial_ms = 30000;  // stay in backoff for the rest of the test
  o.redis.backoff_max_ms = 30000;
  std::unique_ptr<ContextStore> store = NewStore(o);
  int computes = 0;
  ASSERT_TRUE(Stored(store.get(), "t", "k", Counting(&computes)).ok());
  store->ClearMemory();

  server_->Pause();  // accepts connections, never answers
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<StoreResult> r = Stored(store.get(), "t", "k", Counting(&computes));
  const auto first = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_GE(first, std::chrono::milliseconds(250));  // it did wait for the timeout once
  EXPECT_LT(first, std::chrono::seconds(3));

  start = std::chrono::steady_clock::now();
  r = Stored(store.get(), "t", "k2", Counting(&computes));
  ASSERT_TRUE(r.ok()) << r.status();
  // In backoff: no second timeout (read and write both fail at once).
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(250));
  EXPECT_EQ(computes, 3);
  const ContextStoreStats s = store->Stats();
  EXPECT_GE(s.redis_errors, 3);
  EXPECT_FALSE(s.redis_connected);
  server_->Resume();
}

// Damages an entry written by the store, then checks that it reads as a miss, is counted,
// recomputed, and replaced by a good entry.
class CorruptionTest : public RedisTierTest {
 protected:
  // old_parts_named: whether the damaged entry's metadata still names its parts (so the
  // replacing writer can delete them; otherwise they are left to expire).
  void ExpectDetectedAndReplaced(const std::function<void(Raw&)>& damage,
                                 bool old_parts_named = true) {
    std::unique_ptr<ContextStore> store = NewStore(Options());
    std::unique_ptr<RedisTier> tier = NewTier(Options().redis);
    int computes = 0;
    ASSERT_TRUE(Stored(store.get(), "t", "k", Counting(&computes)).ok());
    Raw raw = RawConnection();
    damage(raw);
    const std::vector<std::string> damaged_parts = raw.Keys("ctxcache:{t:*}:p:*");
    EXPECT_EQ(tier->Get("t", "k").status().code(), absl::StatusCode::kDataLoss);

    store->ClearMemory();
    absl::StatusOr<StoreResult> r = Stored(store.get(), "t", "k", Counting(&computes));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tier, CacheTier::kComputed);
    EXPECT_EQ(computes, 2);
    ContextStoreStats s = store->Stats();
    EXPECT_EQ(s.redis_corrupt, 1);
    EXPECT_EQ(s.redis_misses, 2);  // the first cold lookup and the damaged one
    EXPECT_EQ(s.redis_writes, 2);

    // Replaced: a good entry, and the damaged parts are gone.
    absl::StatusOr<CompressedContext> back = tier->Get("t", "k");
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectSameContext(*back, MakeContext());
    if (old_parts_named) {
      for (const std::string& p : damaged_parts) EXPECT_EQ(raw.Integer({"EXISTS", p}), 0) << p;
    }
    store->ClearMemory();
    EXPECT_EQ(store->Get("t", "k")->tier, CacheTier::kRedis);
    EXPECT_EQ(store->Stats().redis_corrupt, 1);
  }
};

TEST_F(CorruptionTest, FlippedByteInAPart) {
  ExpectDetectedAndReplaced([](Raw& raw) {
    const std::vector<std::string> parts = raw.Keys("ctxcache:{t:k}:p:*");
    ASSERT_GE(parts.size(), 2u);
    std::string part = raw.Get(parts[1]);
    part[17] ^= 0x40;
    raw.Run({"SET", parts[1], part, "KEEPTTL"});
  });
}

TEST_F(CorruptionTest, DamageThatTheMetadataChecksumAgreesWith) {
  // The metadata is rewritten to match the damaged bytes: the codec's own CRC catches it.
  ExpectDetectedAndReplaced([](Raw& raw) {
    const std::vector<std::string> parts = raw.Keys("ctxcache:{t:k}:p:*");
    ASSERT_GE(parts.size(), 2u);
    std::string part = raw.Get(parts[0]);
    part[100] ^= 0x01;
    raw.Run({"SET", parts[0], part, "KEEPTTL"});
    std::string blob;
    // Part keys sort as text; rebuild in numeric order from the metadata's part count.
    std::vector<std::string> ordered(parts.size());
    for (const std::string& p : parts) {
      ordered[std::stoi(p.substr(p.rfind(':') + 1))] = p;
    }
    for (const std::string& p : ordered) blob += raw.Get(p);
    std::string meta = raw.Get("ctxcache:{t:k}:m");
    meta = meta.substr(0, meta.rfind(' ') + 1) + absl::StrFormat("%08x", Crc32c(blob));
    raw.Run({"SET", "ctxcache:{t:k}:m", meta, "KEEPTTL"});
  });
}

TEST_F(CorruptionTest, UnreadableMetadata) {
  ExpectDetectedAndReplaced(
      [](Raw& raw) {
        raw.Run({"SET", "ctxcache:{t:k}:m", "ctxm1 not-a-write-id 99999999999 -1 zz", "KEEPTTL"});
      },
      /*old_parts_named=*/false);
}

TEST_F(RedisTierTest, EntryFromAnotherModelIsAMissAndIsReplaced) {
  ContextStoreOptions o = Options();
  std::unique_ptr<RedisTier> other = NewTier(o.redis, kOtherFingerprint);
  ASSERT_TRUE(other->Put("t", "k", MakeContext(7.0f, kOtherFingerprint)).ok());
  ASSERT_TRUE(other->Get("t", "k").ok());  // fine for the model that made it

  std::unique_ptr<ContextStore> store = NewStore(o);
  int computes = 0;
  absl::StatusOr<StoreResult> r = Stored(store.get(), "t", "k", Counting(&computes));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_EQ(r->context->model_fingerprint, kFingerprint);
  ContextStoreStats s = store->Stats();
  EXPECT_EQ(s.redis_wrong_model, 1);
  EXPECT_EQ(s.redis_corrupt, 0);
  EXPECT_EQ(s.redis_writes, 1);
  store->ClearMemory();
  r = store->Get("t", "k");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kRedis);
  EXPECT_EQ(r->context->model_fingerprint, kFingerprint);
  EXPECT_EQ(other->Get("t", "k").status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace ctxcache
