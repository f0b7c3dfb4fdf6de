// Redis Cluster routing (cache/redis_cluster.h) and cross-replica invalidation
// (cache/invalidation.h):
//  * the pieces, without a server: hash slots against Redis's published values, cluster URLs,
//    CLUSTER SLOTS replies (fed through hiredis's reader, as from the network), invalidation
//    messages;
//  * the bad input the issue names, against a fake server: a redirect loop, CLUSTERDOWN,
//    unreachable seeds: Unavailable, fast, never a hang; the store computes instead;
//  * a real 3-primary cluster (tests/redis_cluster.h, redis-server from Debian): every context's
//    keys in one slot, contexts spread over every primary, MOVED after a slot migration, ASK and
//    TRYAGAIN in the middle of one, a killed primary failed over to its replica, a slot no node
//    serves;
//  * invalidation between two stores (two replicas) on one node and on the cluster: a delete
//    leaves the other's memory tier, a context deleted while another replica computes it is not
//    stored again, a resubscription clears the memory tier.
// The real-server tests skip without redis-server, or fail when CTXCACHE_REQUIRE_REDIS=1 (CI).
#include "cache/redis_cluster.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "cache/context_store.h"
#include "cache/invalidation.h"
#include "cache/redis_tier.h"
#include "common/half.h"
#include "tests/fake_redis.h"
#include "tests/redis_cluster.h"
#include "tests/redis_server.h"
#include "tests/redis_test_util.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

using testing::kFingerprint;

// A context whose first value tells versions apart.
CompressedContext MakeContext(float seed = 1.0f) { return testing::MakeContext(seed); }

float FirstValue(const CompressedContext& c) { return Fp16ToFp32(c.kv.head(0, 0).k[0]); }

// A reply as hiredis's reader builds it from RESP bytes (what the network would deliver).
RedisReply ParseResp(const std::string& resp) {
  redisReader* reader = redisReaderCreate();
  redisReaderFeed(reader, resp.data(), resp.size());
  void* reply = nullptr;
  const int rc = redisReaderGetReply(reader, &reply);
  redisReaderFree(reader);
  EXPECT_EQ(rc, REDIS_OK);
  EXPECT_NE(reply, nullptr) << "incomplete RESP in the test";
  return RedisReply(static_cast<redisReply*>(reply));
}

std::string Bulk(const std::string& s) { return absl::StrCat("$", s.size(), "\r\n", s, "\r\n"); }
std::string SlotRange(int first, int last, const std::string& host, int port) {
  return absl::StrCat("*3\r\n:", first, "\r\n:", last, "\r\n*3\r\n", Bulk(host), ":", port, "\r\n",
                      Bulk("0123456789abcdef0123456789abcdef01234567"));
}

// ---- the pieces ----------------------------------------------------------------------------

TEST(RedisClusterSlotTest, MatchesRedisPublishedValues) {
  // The cluster specification's CRC16 check value, and slots redis-cli's CLUSTER KEYSLOT gives.
  EXPECT_EQ(Crc16Xmodem("123456789"), 0x31C3);
  EXPECT_EQ(RedisKeySlot("123456789"), 0x31C3 & 16383);
  EXPECT_EQ(RedisKeySlot("foo"), 12182);
  EXPECT_EQ(RedisKeySlot("bar"), 5061);
  EXPECT_EQ(RedisKeySlot(""), 0);
  // Hash tags: the first {...} with something inside.
  EXPECT_EQ(RedisKeySlot("{user1000}.following"), RedisKeySlot("{user1000}.followers"));
  EXPECT_EQ(RedisKeySlot("{user1000}.following"), RedisKeySlot("user1000"));
  EXPECT_EQ(RedisKeySlot("foo{}{bar}"), Crc16Xmodem("foo{}{bar}") & 16383);  // empty: whole key
  EXPECT_EQ(RedisKeySlot("foo{{bar}}zap"), RedisKeySlot("{bar"));
  EXPECT_EQ(RedisKeySlot("foo{bar}{zap}"), RedisKeySlot("bar"));
  EXPECT_EQ(RedisKeySlot("foo{bar"), Crc16Xmodem("foo{bar") & 16383);  // unclosed: whole key
}

TEST(RedisClusterUrlTest, SeedsAndCredentials) {
  absl::StatusOr<RedisClusterUrl> u =
      ParseRedisClusterUrl("redis-cluster://app:s%40cret@10.0.0.1:7000,redis-b:7001,[::1]:7002");
  ASSERT_TRUE(u.ok()) << u.status();
  ASSERT_EQ(u->seeds.size(), 3u);
  EXPECT_EQ(u->seeds[0].host, "10.0.0.1");
  EXPECT_EQ(u->seeds[0].port, 7000);
  EXPECT_EQ(u->seeds[1].host, "redis-b");
  EXPECT_EQ(u->seeds[2].host, "::1");
  for (const RedisUrl& s : u->seeds) {
    EXPECT_EQ(s.user, "app");
    EXPECT_EQ(s.password, "s@cret");
    EXPECT_EQ(s.db, 0);
  }
  EXPECT_EQ(ParseRedisClusterUrl("redis-cluster://h")->seeds[0].port, 6379);
  EXPECT_TRUE(IsRedisClusterUrl("redis-cluster://h:1"));
  EXPECT_FALSE(IsRedisClusterUrl("redis://h:1"));
  for (const char* bad : {"redis-cluster://", "redis-cluster://h:1,,h:2", "redis-cluster://h:1/0",
                          "redis-cluster://h:99999", "redis://h:1", "redis-cluster://u:@h:1",
                          "redis-cluster://h:1,h 2:3"}) {
    absl::StatusOr<RedisClusterUrl> r = ParseRedisClusterUrl(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  // A bad seed is named; the password never is.
  absl::StatusOr<RedisClusterUrl> r = ParseRedisClusterUrl("redis-cluster://u:hunter2@h:1,h:x");
  EXPECT_THAT(r.status().message(), HasSubstr("\"h:x\""));
  EXPECT_THAT(r.status().message(), Not(HasSubstr("hunter2")));
  EXPECT_EQ(RedactRedisUrl("redis-cluster://u:hunter2@h:1,h:2"), "redis-cluster://u:***@h:1,h:2");
}

TEST(RedisClusterSlotsReplyTest, ParsesRangesAndRefusesMalformedOnes) {
  RedisReply ok = ParseResp(absl::StrCat("*2\r\n", SlotRange(8192, 16383, "", 7001),
                                         SlotRange(0, 8191, "10.0.0.1", 7000)));
  absl::StatusOr<std::vector<RedisSlotRange>> ranges = ParseClusterSlots(*ok, "asked-host");
  ASSERT_TRUE(ranges.ok()) << ranges.status();
  ASSERT_EQ(ranges->size(), 2u);
  EXPECT_EQ((*ranges)[0].first, 0);  // sorted
  EXPECT_EQ((*ranges)[0].host, "10.0.0.1");
  EXPECT_EQ((*ranges)[1].host, "asked-host");  // "": the node asked
  EXPECT_EQ((*ranges)[1].port, 7001);

  const std::vector<std::string> bad = {
      ":1\r\n",                                             // not an array
      absl::StrCat("*1\r\n", SlotRange(0, 16384, "h", 1)),  // slot out of range
      absl::StrCat("*1\r\n", SlotRange(10, 9, "h", 1)),     // last < first
      absl::StrCat("*2\r\n", SlotRange(0, 10, "h", 1), SlotRange(10, 20, "h", 2)),  // overlap
      absl::StrCat("*1\r\n", SlotRange(0, 10, "h", 0)),                             // port 0
      "*1\r\n*2\r\n:0\r\n:1\r\n",                                                   // no node
      "*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n:5\r\n:6\r\n",  // host not a string
  };
  for (const std::string& resp : bad) {
    RedisReply r = ParseResp(resp);
    EXPECT_EQ(ParseClusterSlots(*r, "h").status().code(), absl::StatusCode::kDataLoss) << resp;
  }
  RedisReply refused = ParseResp("-ERR This instance has cluster support disabled\r\n");
  EXPECT_EQ(ParseClusterSlots(*refused, "h").status().code(), absl::StatusCode::kUnavailable);
}

TEST(InvalidationMessageTest, RoundTripsAndRefusesAnythingElse) {
  const Invalidation del{Invalidation::Kind::kDeleted, "acme corp:1", "0123abcd", ""};
  EXPECT_EQ(FormatInvalidation(del), "ctxinv1 d acme%20corp%3A1 0123abcd -");
  const Invalidation stored{Invalidation::Kind::kStored, "", "k{}", std::string(32, 'a')};
  for (const Invalidation& v : {del, stored}) {
    absl::StatusOr<Invalidation> back = ParseInvalidation(FormatInvalidation(v));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->kind, v.kind);
    EXPECT_EQ(back->tenant, v.tenant);
    EXPECT_EQ(back->key, v.key);
    EXPECT_EQ(back->write_id, v.write_id);
  }
  for (const char* bad :
       {"", "ctxinv1", "ctxinv2 d t k -", "ctxinv1 x t k -", "ctxinv1 d t k", "ctxinv1 d t k - x",
        "ctxinv1 d t  -", "ctxinv1 d t k w", "ctxinv1 s t k -", "ctxinv1 s t k 0123",
        "ctxinv1 s t k AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "ctxinv1 d t%2 k -", "ctxinv1 d t%zz k -",
        "ctxinv1 d t%41 k -" /* an escaped plain byte: Escape never writes it */,
        "ctxinv1 d t%3a k -" /* lower-case hex */, "ctxinv1 d t:x k -"}) {
    EXPECT_EQ(ParseInvalidation(bad).status().code(), absl::StatusCode::kDataLoss) << bad;
  }
}

// ---- bad input from a (fake) cluster -------------------------------------------------------

RedisClientOptions FastClient() {
  RedisClientOptions o;
  o.pool_size = 2;
  o.connect_timeout_ms = 200;
  o.command_timeout_ms = 500;
  o.backoff_initial_ms = 10;
  o.backoff_max_ms = 50;
  return o;
}

std::unique_ptr<RedisCluster> NewCluster(const std::string& url,
                                         const RedisClientOptions& client = FastClient()) {
  absl::StatusOr<RedisClusterUrl> parsed = ParseRedisClusterUrl(url);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  absl::StatusOr<std::unique_ptr<RedisCluster>> c = RedisCluster::Create(*parsed, client);
  EXPECT_TRUE(c.ok()) << c.status();
  return *std::move(c);
}

TEST(RedisClusterFaultTest, ARedirectLoopIsUnavailableNotAHang) {
  testing::FakeRedis fake;
  fake.cluster = true;  // serves every slot, and answers everything with MOVED to itself
  auto cluster = NewCluster(absl::StrCat("redis-cluster://127.0.0.1:", fake.port()));
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<RedisReply> r =
      cluster->Command("k", {"GET", "k"}, cluster->OperationDeadline(kNoRedisDeadline));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("redirect"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
}

TEST(RedisClusterFaultTest, ClusterDownIsUnavailableAndNotConnected) {
  testing::FakeRedis fake;
  fake.error_reply = "CLUSTERDOWN The cluster is down";
  auto cluster = NewCluster(absl::StrCat("redis-cluster://127.0.0.1:", fake.port()));
  absl::StatusOr<RedisReply> r =
      cluster->Command("k", {"GET", "k"}, cluster->OperationDeadline(kNoRedisDeadline));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("CLUSTERDOWN"));
  EXPECT_FALSE(cluster->connected());
}

TEST(RedisClusterFaultTest, CrossSlotComesBackAsTheErrorReplyItIs) {
  testing::FakeRedis fake;
  fake.error_reply = "CROSSSLOT Keys in request don't hash to the same slot";
  auto cluster = NewCluster(absl::StrCat("redis-cluster://127.0.0.1:", fake.port()));
  absl::StatusOr<RedisReply> r =
      cluster->Command("k", {"MGET", "a", "b"}, cluster->OperationDeadline(kNoRedisDeadline));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->type, REDIS_REPLY_ERROR);
  EXPECT_THAT(std::string((*r)->str, (*r)->len), HasSubstr("CROSSSLOT"));
}

TEST(RedisClusterFaultTest, UnreachableSeedsFailFast) {
  const int a = testing::FreeLoopbackPort(), b = testing::FreeLoopbackPort();
  auto cluster = NewCluster(absl::StrCat("redis-cluster://127.0.0.1:", a, ",127.0.0.1:", b));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(cluster->Ping(kNoRedisDeadline).code(), absl::StatusCode::kUnavailable);
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<RedisReply> r =
        cluster->Command("k", {"GET", "k"}, cluster->OperationDeadline(kNoRedisDeadline));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_FALSE(cluster->connected());
}

// The store over a cluster that misbehaves degrades as over a dead Redis: computed, counted.
TEST(RedisClusterFaultTest, TheStoreComputesInstead) {
  for (const bool loop : {true, false}) {
    testing::FakeRedis fake;
    if (loop) {
      fake.cluster = true;
    } else {
      fake.error_reply = "CLUSTERDOWN The cluster is down";
    }
    ContextStoreOptions o;
    o.model_fingerprint = kFingerprint;
    o.redis.url = absl::StrCat("redis-cluster://127.0.0.1:", fake.port());
    o.redis.connect_timeout_ms = 200;
    o.redis.command_timeout_ms = 300;
    o.redis.invalidation = false;  // the fake has no pub/sub
    absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(o);
    ASSERT_TRUE(store.ok()) << store.status();
    int computes = 0;
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<StoreResult> r = (*store)->GetOrCompute(
          "t", absl::StrCat("k", i), [&]() -> absl::StatusOr<CompressedContext> {
            ++computes;
            return MakeContext();
          });
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->tier, CacheTier::kComputed);
    }
    EXPECT_EQ(computes, 3);
    (*store)->WaitForWrites(absl::Seconds(5));
    const ContextStoreStats s = (*store)->Stats();
    EXPECT_GE(s.redis_errors, 3) << (loop ? "redirect loop" : "CLUSTERDOWN");
    EXPECT_FALSE(s.redis_connected);
    // Lookup-only of an id is Unavailable (the entry may exist), not NotFound.
    EXPECT_EQ((*store)->Get("t", "other").status().code(), absl::StatusCode::kUnavailable);
  }
}

// ---- a real cluster -----------------------------------------------------------------------

// Polls `done` every 5 ms for up to `limit`; how long it took, or -1 when it never held.
template <typename Fn>
int64_t MillisUntil(Fn done, std::chrono::milliseconds limit = std::chrono::milliseconds(1000)) {
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < limit) {
    if (done()) {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::steady_clock::now() - start)
          .count();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return -1;
}

class RedisClusterTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    binary_ = testing::FindRedisServer();
    if (binary_.empty()) {
      if (testing::RequireRedis()) FAIL() << "redis-server not found and CTXCACHE_REQUIRE_REDIS=1";
      GTEST_SKIP() << "redis-server not found (tools/setup.sh installs it)";
    }
  }

  std::unique_ptr<testing::LocalRedisCluster> StartCluster(int replicas = 0,
                                                           bool full_coverage = true) {
    testing::LocalRedisClusterOptions o;
    o.primaries = 3;
    o.replicas_per_primary = replicas;
    o.node_timeout_ms = 1000;
    o.require_full_coverage = full_coverage;
    auto cluster = std::make_unique<testing::LocalRedisCluster>(binary_, o);
    const std::string error = cluster->Start();
    EXPECT_EQ(error, "");
    return error.empty() ? std::move(cluster) : nullptr;
  }

  static RedisOptions TierOptions(const std::string& url) {
    RedisOptions o;
    o.url = url;
    o.pool_size = 2;
    o.connect_timeout_ms = 300;
    o.command_timeout_ms = 1000;
    o.backoff_initial_ms = 10;
    o.backoff_max_ms = 100;
    o.max_part_bytes = 1000;  // several parts per context
    o.ttl_seconds = 3600;
    return o;
  }
  static std::unique_ptr<RedisTier> NewTier(const RedisOptions& o) {
    absl::StatusOr<std::unique_ptr<RedisTier>> tier = RedisTier::Create(o, kFingerprint);
    EXPECT_TRUE(tier.ok()) << tier.status();
    return tier.ok() ? *std::move(tier) : nullptr;
  }
  // A store as a replica runs it, on `url`.
  static std::unique_ptr<ContextStore> NewStore(const std::string& url) {
    ContextStoreOptions o;
    o.memory_bytes = 64 << 20;
    o.model_fingerprint = kFingerprint;
    o.redis = TierOptions(url);
    o.redis.circuit_cool_down_ms = 50;
    absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(o);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }
  // A cache key whose context lands in `slot` (tenant "t").
  static std::string KeyInSlot(const RedisTier& tier, int slot) {
    for (int i = 0;; ++i) {
      const std::string key = absl::StrCat("x", i);
      if (RedisKeySlot(tier.MetaKey("t", key)) == slot) return key;
    }
  }

  std::string binary_;
};

TEST_F(RedisClusterTierTest, ContextsSpreadOverEveryPrimaryAndRoundTrip) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  RedisOptions o = TierOptions(cluster->SeedUrl());
  o.tenant_quota_bytes = 10 << 20;  // the ledger lives in the tenant's slot, apart
  auto tier = NewTier(o);
  ASSERT_NE(tier, nullptr);
  ASSERT_TRUE(tier->router().Ping(kNoRedisDeadline).ok());
  EXPECT_TRUE(tier->connected());
  std::set<int> primaries;
  for (int i = 0; i < 30; ++i) {
    const std::string key = absl::StrCat("k", i);
    ASSERT_TRUE(tier->Put("t", key, MakeContext(1.0f + i)).ok()) << key;
    primaries.insert(cluster->PrimaryForSlot(RedisKeySlot(tier->MetaKey("t", key))));
  }
  EXPECT_EQ(primaries, (std::set<int>{0, 1, 2})) << "30 contexts should reach every primary";
  const int64_t used = *tier->TenantUsage("t");
  EXPECT_GT(used, 0);
  for (int i = 0; i < 30; ++i) {
    absl::StatusOr<CompressedContext> back = tier->Get("t", absl::StrCat("k", i));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(FirstValue(*back), 1.0f + i);
  }
  for (int i = 0; i < 30; i += 2) {
    EXPECT_EQ(*tier->Delete("t", absl::StrCat("k", i)), true);
    EXPECT_EQ(tier->Get("t", absl::StrCat("k", i)).status().code(), absl::StatusCode::kNotFound);
    EXPECT_TRUE(tier->Get("t", absl::StrCat("k", i + 1)).ok());
  }
  EXPECT_LT(*tier->TenantUsage("t"), used);  // deletes gave their bytes back
}

TEST_F(RedisClusterTierTest, FollowsASlotMigration) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  auto tier = NewTier(TierOptions(cluster->SeedUrl()));
  ASSERT_NE(tier, nullptr);
  // As the store does at start: every primary is reached once (a node never asked is not
  // known to be up, and connected() says so).
  ASSERT_TRUE(tier->router().Ping(kNoRedisDeadline).ok());
  ASSERT_TRUE(tier->Put("t", "moving", MakeContext(7.0f)).ok());
  const int slot = RedisKeySlot(tier->MetaKey("t", "moving"));
  const int from = cluster->PrimaryForSlot(slot);
  const int to = (from + 1) % 3;

  // Half migrated: the source has some of the context's keys, the target the others. A read
  // meets ASK or TRYAGAIN until the rest moves, which happens meanwhile on another thread.
  ASSERT_EQ(cluster->BeginMigration(slot, from, to), "");
  ASSERT_TRUE(tier->Get("t", "moving").ok());  // nothing moved yet
  int moved = 0;
  ASSERT_EQ(cluster->MigrateKeys(slot, from, to, /*max_keys=*/2, &moved), "");
  EXPECT_EQ(moved, 2);
  std::string rest_error;
  std::thread rest([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    rest_error = cluster->MigrateKeys(slot, from, to);
  });
  absl::StatusOr<CompressedContext> mid = tier->Get("t", "moving");
  rest.join();
  ASSERT_EQ(rest_error, "");
  ASSERT_TRUE(mid.ok()) << mid.status();
  EXPECT_EQ(FirstValue(*mid), 7.0f);
  // A new context cannot be published in a slot while it migrates: its parts go to the
  // importing node (ASK), but the publication is a script over two keys that exist on neither
  // side, which Redis answers with TRYAGAIN until the migration ends. The write fails at its
  // deadline (the store counts it and computes the context again later): never a wrong answer.
  const std::string fresh = KeyInSlot(*tier, slot);
  const absl::Status put_mid = tier->Put("t", fresh, MakeContext(8.0f));
  EXPECT_TRUE(absl::IsDeadlineExceeded(put_mid)) << put_mid;
  EXPECT_THAT(put_mid.message(), HasSubstr("TRYAGAIN"));
  EXPECT_EQ(tier->Get("t", fresh).status().code(), absl::StatusCode::kNotFound);

  // Finished: the old owner answers MOVED, which the client follows and remembers.
  ASSERT_EQ(cluster->FinishMigration(slot, from, to), "");
  EXPECT_EQ(cluster->PrimaryForSlot(slot), to);
  EXPECT_EQ(FirstValue(*tier->Get("t", "moving")), 7.0f);
  ASSERT_TRUE(tier->Put("t", fresh, MakeContext(8.0f)).ok());
  EXPECT_EQ(FirstValue(*tier->Get("t", fresh)), 8.0f);
  EXPECT_TRUE(*tier->Delete("t", "moving"));
  EXPECT_EQ(tier->Get("t", "moving").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(tier->connected());
}

TEST_F(RedisClusterTierTest, AKilledPrimaryFailsOverToItsReplica) {
  auto cluster = StartCluster(/*replicas=*/1);
  ASSERT_NE(cluster, nullptr);
  auto tier = NewTier(TierOptions(cluster->SeedUrl()));
  ASSERT_NE(tier, nullptr);
  std::map<int, std::string> key_on;  // a context on each primary
  for (int i = 0; key_on.size() < 3; ++i) {
    const std::string key = absl::StrCat("k", i);
    key_on.emplace(cluster->PrimaryForSlot(RedisKeySlot(tier->MetaKey("t", key))), key);
  }
  for (const auto& [node, key] : key_on) ASSERT_TRUE(tier->Put("t", key, MakeContext()).ok());
  // Let the replicas catch up before the primary dies (replication is asynchronous).
  for (int node = 0; node < 3; ++node) {
    EXPECT_EQ(cluster->Command(node, {"WAIT", "1", "2000"}), "(integer) 1");
  }
  ASSERT_TRUE(tier->router().Ping(kNoRedisDeadline).ok());

  cluster->Kill(0);
  // The others' contexts are served throughout; the dead one's fail (Unavailable, fast)...
  EXPECT_TRUE(tier->Get("t", key_on[1]).ok());
  EXPECT_TRUE(tier->Get("t", key_on[2]).ok());
  const absl::Status down = tier->Get("t", key_on[0]).status();
  EXPECT_TRUE(absl::IsUnavailable(down) || absl::IsDeadlineExceeded(down)) << down;
  // ...until its replica takes over; then they are found on it.
  ASSERT_EQ(cluster->WaitFailover(0, 15000), "");
  absl::Status served = absl::UnknownError("not asked");
  for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
       std::chrono::steady_clock::now() < until;
       std::this_thread::sleep_for(std::chrono::milliseconds(50))) {
    served = tier->Get("t", key_on[0]).status();
    if (served.ok()) break;
  }
  EXPECT_TRUE(served.ok()) << served;
  EXPECT_TRUE(tier->Put("t", "after", MakeContext()).ok());
  // The old primary comes back as a replica; everything still works.
  ASSERT_EQ(cluster->Restart(0), "");
  ASSERT_EQ(cluster->WaitHealthy(15000), "");
  for (const auto& [node, key] : key_on) EXPECT_TRUE(tier->Get("t", key).ok()) << key;
  ASSERT_TRUE(tier->router().Ping(kNoRedisDeadline).ok());
  EXPECT_TRUE(tier->connected());
}

TEST_F(RedisClusterTierTest, AnUnservedSlotIsUnavailableAndNotConnected) {
  auto cluster = StartCluster(/*replicas=*/0, /*full_coverage=*/false);
  ASSERT_NE(cluster, nullptr);
  auto tier = NewTier(TierOptions(cluster->SeedUrl()));
  ASSERT_NE(tier, nullptr);
  ASSERT_TRUE(tier->Put("t", "a", MakeContext()).ok());
  ASSERT_TRUE(tier->Put("t", "b", MakeContext()).ok());
  const int slot = RedisKeySlot(tier->MetaKey("t", "a"));
  ASSERT_NE(slot, RedisKeySlot(tier->MetaKey("t", "b")));
  ASSERT_EQ(cluster->DelSlot(slot), "");
  const absl::Status gone = tier->Get("t", "a").status();
  // The node's CLUSTERDOWN ("Hash slot not served"), which re-reads the map; from then on the
  // client knows by itself that no node serves it.
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable) << gone;
  EXPECT_THAT(gone.message(), HasSubstr("not served"));
  EXPECT_TRUE(tier->Get("t", "b").ok());
  absl::Status known;
  EXPECT_GE(MillisUntil([&] {
              known = tier->Get("t", "a").status();
              return absl::IsUnavailable(known) &&
                     absl::StrContains(known.message(), "served by no node");
            }),
            0)
      << known;
  EXPECT_TRUE(tier->Get("t", "b").ok());
  EXPECT_FALSE(tier->connected());
  EXPECT_EQ(tier->router().Ping(kNoRedisDeadline).code(), absl::StatusCode::kUnavailable);
}

// ---- invalidation between replicas ---------------------------------------------------------

// Two replicas both holding a context in memory: a delete on one leaves the other within 1 s;
// a new write of the context (as after a damaged entry) replaces the other's older copy.
void DeleteAndReplaceReachTheOtherReplica(ContextStore& a, ContextStore& b, RedisTier& writer) {
  int computes = 0;
  auto compute = [&]() -> absl::StatusOr<CompressedContext> {
    ++computes;
    return MakeContext(3.0f);
  };
  ASSERT_TRUE(a.GetOrCompute("t", "k", compute).ok());
  ASSERT_TRUE(a.WaitForWrites(absl::Seconds(10)));
  absl::StatusOr<StoreResult> on_b = b.GetOrCompute("t", "k", compute);
  ASSERT_TRUE(on_b.ok());
  EXPECT_EQ(on_b->tier, CacheTier::kRedis);
  EXPECT_EQ(b.Get("t", "k")->tier, CacheTier::kMemory);
  EXPECT_EQ(computes, 1);

  // Replaced in Redis by another writer: b's copy is of an older write and goes.
  ASSERT_TRUE(writer.Put("t", "k", MakeContext(4.0f)).ok());
  EXPECT_GE(MillisUntil([&] {
              absl::StatusOr<StoreResult> r = b.Get("t", "k");
              return r.ok() && r->tier == CacheTier::kRedis && FirstValue(*r->context) == 4.0f;
            }),
            0)
      << "b kept serving the replaced version";
  EXPECT_EQ(FirstValue(*a.Get("t", "k")->context), 4.0f);

  ASSERT_TRUE(a.Delete("t", "k").ok());
  const int64_t ms = MillisUntil([&] { return absl::IsNotFound(b.Get("t", "k").status()); });
  EXPECT_GE(ms, 0) << "the other replica still serves a deleted context after 1 s";
  std::printf("delete reached the other replica in %lld ms\n", static_cast<long long>(ms));
  EXPECT_GE(b.Stats().invalidations_received, 1);
  EXPECT_TRUE(b.Stats().invalidation_subscribed);
}

// A context deleted on one replica while another computes it is not stored again: neither in
// the computing replica's memory nor in Redis. With the subscription, the computing replica
// hears the delete; without it, Redis's delete counter still refuses the write.
void ADeleteDuringAComputeDoesNotBringItBack(ContextStore& deleter, ContextStore& computer,
                                             bool computer_subscribed) {
  absl::Notification started, release;
  absl::StatusOr<StoreResult> result;
  std::thread flight([&] {
    result = computer.GetOrCompute("t", "late", [&]() -> absl::StatusOr<CompressedContext> {
      started.Notify();
      release.WaitForNotification();
      return MakeContext(5.0f);
    });
  });
  started.WaitForNotification();
  const int64_t heard = computer.Stats().invalidations_received;
  EXPECT_EQ(deleter.Delete("t", "late").code(), absl::StatusCode::kNotFound);  // not there yet
  if (computer_subscribed) {
    EXPECT_GE(MillisUntil([&] { return computer.Stats().invalidations_received > heard; }), 0);
  }
  release.Notify();
  flight.join();
  ASSERT_TRUE(result.ok()) << result.status();  // the caller still gets its answer
  EXPECT_EQ(result->tier, CacheTier::kComputed);
  ASSERT_TRUE(computer.WaitForWrites(absl::Seconds(10)));
  EXPECT_EQ(deleter.Get("t", "late").status().code(), absl::StatusCode::kNotFound);
  if (computer_subscribed) {
    EXPECT_FALSE(result->in_memory);
    EXPECT_FALSE(result->in_redis);
    EXPECT_EQ(computer.Get("t", "late").status().code(), absl::StatusCode::kNotFound);
  }
  EXPECT_GE(computer.Stats().deleted_while_computing, 1);
}

TEST_F(RedisClusterTierTest, InvalidationReachesEveryReplicaOnOneNode) {
  testing::RedisServer server(binary_);
  ASSERT_EQ(server.Start(), "");
  auto a = NewStore(server.Url());
  auto b = NewStore(server.Url());
  auto writer = NewTier(TierOptions(server.Url()));
  ASSERT_TRUE(a && b && writer);
  DeleteAndReplaceReachTheOtherReplica(*a, *b, *writer);
  ADeleteDuringAComputeDoesNotBringItBack(*a, *b, /*computer_subscribed=*/true);
}

TEST_F(RedisClusterTierTest, InvalidationReachesEveryReplicaOnACluster) {
  auto cluster = StartCluster();
  ASSERT_NE(cluster, nullptr);
  auto a = NewStore(cluster->SeedUrl());
  auto b = NewStore(cluster->SeedUrl());
  auto writer = NewTier(TierOptions(cluster->SeedUrl()));
  ASSERT_TRUE(a && b && writer);
  DeleteAndReplaceReachTheOtherReplica(*a, *b, *writer);
  ADeleteDuringAComputeDoesNotBringItBack(*a, *b, /*computer_subscribed=*/true);
}

TEST_F(RedisClusterTierTest, WithoutTheSubscriptionRedisStillRefusesTheDeletedWrite) {
  testing::RedisServer server(binary_);
  ASSERT_EQ(server.Start(), "");
  auto a = NewStore(server.Url());
  ContextStoreOptions o;
  o.memory_bytes = 64 << 20;
  o.model_fingerprint = kFingerprint;
  o.redis = TierOptions(server.Url());
  o.redis.invalidation = false;
  auto deaf = ContextStore::Create(o);
  ASSERT_TRUE(a && deaf.ok());
  ADeleteDuringAComputeDoesNotBringItBack(*a, **deaf, /*computer_subscribed=*/false);
}

TEST_F(RedisClusterTierTest, AResubscriptionClearsTheMemoryTier) {
  testing::RedisServer server(binary_);
  ASSERT_EQ(server.Start(), "");
  auto store = NewStore(server.Url());
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->GetOrCompute("t", "k", [] { return MakeContext(); }).ok());
  ASSERT_EQ(store->Stats().memory_entries, 1);
  // Redis restarts: whatever was announced meanwhile is lost to this replica, so once it has
  // subscribed again it holds nothing it may have missed a delete of.
  server.Kill();
  ASSERT_EQ(server.Start(), "");
  EXPECT_GE(MillisUntil([&] { return store->Stats().invalidation_resubscriptions >= 1; },
                        std::chrono::milliseconds(10000)),
            0);
  EXPECT_EQ(store->Stats().memory_entries, 0);
  EXPECT_TRUE(store->Stats().invalidation_subscribed);
}

// A context computed across a resubscription is kept and written: only what was read from
// Redis before it is suspect (a delete may have been missed); Redis's delete counter guards
// the write of a computed one.
TEST_F(RedisClusterTierTest, AComputationAcrossAResubscriptionIsStillStored) {
  testing::RedisServer server(binary_);
  ASSERT_EQ(server.Start(), "");
  auto store = NewStore(server.Url());
  ASSERT_NE(store, nullptr);
  absl::Notification started, release;
  absl::StatusOr<StoreResult> result;
  std::thread flight([&] {
    result = store->GetOrCompute("t", "k", [&]() -> absl::StatusOr<CompressedContext> {
      started.Notify();
      release.WaitForNotification();
      return MakeContext(6.0f);
    });
  });
  started.WaitForNotification();
  server.Kill();
  ASSERT_EQ(server.Start(), "");
  EXPECT_GE(MillisUntil([&] { return store->Stats().invalidation_resubscriptions >= 1; },
                        std::chrono::milliseconds(10000)),
            0);
  // The store's pooled connections died with the server: wait until it reconnects (a write
  // on a dead connection fails and is not retried; that is the tier's failure mode).
  EXPECT_GE(MillisUntil([&] { return absl::IsNotFound(store->Get("t", "other").status()); },
                        std::chrono::milliseconds(10000)),
            0);
  release.Notify();
  flight.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->in_memory);
  EXPECT_TRUE(result->in_redis);
  ASSERT_TRUE(store->WaitForWrites(absl::Seconds(10)));
  EXPECT_EQ(store->Stats().redis_writes, 1);
  store->ClearMemory();
  absl::StatusOr<StoreResult> back = store->Get("t", "k");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tier, CacheTier::kRedis);
  EXPECT_EQ(FirstValue(*back->context), 6.0f);
}

}  // namespace
}  // namespace ctxcache
