// Cache tiers without a Redis server: the memory tier's byte bound, LRU order, eviction
// counts and tenant separation; single flight (one computation, shared value or error);
// Redis URL parsing and key layout; the store's memory-only path, option validation, and
// its behaviour when the configured Redis is not there at all.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cache/context_store.h"
#include "cache/memory_tier.h"
#include "cache/redis_client.h"
#include "cache/redis_cluster.h"
#include "cache/redis_tier.h"
#include "cache/single_flight.h"
#include "common/half.h"
#include "tests/redis_server.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kFingerprint[] = "81ee8e0f5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";

// A KV context with `n` entries per head: KvBytes() = layers * heads * n * head_dim * 2 * 2.
CompressedContext MakeContext(int n, float seed = 1.0f, int n_layers = 2, int n_kv_heads = 2,
                              int head_dim = 4) {
  CompressedContext c;
  c.model_fingerprint = kFingerprint;
  c.method = "streaming";
  c.params = "ratio=4";
  c.source_tokens = 4 * n;
  c.kv = KvCache(n_layers, n_kv_heads, head_dim);
  c.kv.next_position = 4 * n;
  for (int l = 0; l < n_layers; ++l) {
    for (int h = 0; h < n_kv_heads; ++h) {
      KvHead& kh = c.kv.head(l, h);
      for (int i = 0; i < n; ++i) kh.pos.push_back(4 * i);
      for (int i = 0; i < n * head_dim; ++i) {
        kh.k.push_back(Fp32ToFp16(seed + 0.25f * i));
        kh.v.push_back(Fp32ToFp16(seed - 0.5f * i));
      }
    }
  }
  return c;
}

std::shared_ptr<const CompressedContext> Shared(CompressedContext c) {
  return std::make_shared<const CompressedContext>(std::move(c));
}

// ---- memory tier ---------------------------------------------------------------------------

TEST(MemoryTierTest, ChargesKvDigestAndKeyBytes) {
  CompressedContext c = MakeContext(3);
  EXPECT_EQ(c.KvBytes(), 2 * 2 * 3 * 4 * 2 * 2);
  // Resident: K and V at fp16 (the KV bytes), an int32 position per entry (2 layers x
  // 2 heads x 3 entries), the key strings.
  const int64_t resident = c.KvBytes() + 2 * 2 * 3 * 4;
  EXPECT_EQ(MemoryTier::EntryBytes("t", "key", c), resident + 4);
  c.digest.assign(10, 0.5f);
  EXPECT_EQ(MemoryTier::EntryBytes("t", "key", c), resident + 40 + 4);
}

TEST(MemoryTierTest, ChargesAQuantizedContextItsStoredBytes) {
  CompressedContext c = MakeContext(40, 1.0f, 2, 2, 64);
  const int64_t fp16 = MemoryTier::EntryBytes("t", "key", c);
  ASSERT_TRUE(c.kv.Freeze(KvDtype::kInt4).ok());
  // Per head: 40 x 32 bytes of codes for K and for V; fp16 scale and minimum per key group
  // (2 groups of 32 tokens) x 64 channels, and per token x 2 value groups.
  const int64_t per_head = 2 * 40 * 32 + 2 * 2 * 2 * 64 + 2 * 2 * 40 * 2;
  EXPECT_EQ(c.KvBytes(), 4 * per_head);
  EXPECT_EQ(MemoryTier::EntryBytes("t", "key", c), c.KvBytes() + 4 * 40 * 4 + 4);
  EXPECT_LT(MemoryTier::EntryBytes("t", "key", c), fp16 * 0.35);  // positions stay 4 bytes
}

TEST(MemoryTierTest, EvictsLeastRecentlyUsedWithinByteBound) {
  const int64_t entry = MemoryTier::EntryBytes("t", "a", MakeContext(4));
  MemoryTier tier(3 * entry);
  ASSERT_TRUE(tier.Put("t", "a", Shared(MakeContext(4))));
  ASSERT_TRUE(tier.Put("t", "b", Shared(MakeContext(4))));
  ASSERT_TRUE(tier.Put("t", "c", Shared(MakeContext(4))));
  EXPECT_EQ(tier.GetStats().bytes, 3 * entry);
  ASSERT_NE(tier.Get("t", "a"), nullptr);  // a is now the most recent; b the least

  ASSERT_TRUE(tier.Put("t", "d", Shared(MakeContext(4))));
  EXPECT_EQ(tier.Get("t", "b"), nullptr);
  EXPECT_NE(tier.Get("t", "a"), nullptr);
  EXPECT_NE(tier.Get("t", "c"), nullptr);
  EXPECT_NE(tier.Get("t", "d"), nullptr);
  MemoryTier::Stats s = tier.GetStats();
  EXPECT_EQ(s.evictions, 1);
  EXPECT_EQ(s.entries, 3);
  EXPECT_EQ(s.bytes, 3 * entry);
  EXPECT_LE(s.bytes, tier.capacity_bytes());

  // An entry twice the size evicts the two least recently used (a, then c).
  ASSERT_NE(tier.Get("t", "d"), nullptr);
  ASSERT_TRUE(tier.Put("t", "e", Shared(MakeContext(8))));
  s = tier.GetStats();
  EXPECT_EQ(s.evictions, 3);
  EXPECT_EQ(tier.Get("t", "a"), nullptr);
  EXPECT_EQ(tier.Get("t", "c"), nullptr);
  EXPECT_NE(tier.Get("t", "d"), nullptr);
  EXPECT_NE(tier.Get("t", "e"), nullptr);
  EXPECT_LE(tier.GetStats().bytes, tier.capacity_bytes());
}

TEST(MemoryTierTest, ReplaceEraseAndClearAreNotEvictions) {
  const int64_t small = MemoryTier::EntryBytes("t", "a", MakeContext(2));
  const int64_t big = MemoryTier::EntryBytes("t", "a", MakeContext(5));
  MemoryTier tier(10 * big);
  ASSERT_TRUE(tier.Put("t", "a", Shared(MakeContext(2))));
  ASSERT_TRUE(tier.Put("t", "a", Shared(MakeContext(5))));  // replaces
  EXPECT_EQ(tier.GetStats().bytes, big);
  EXPECT_EQ(tier.GetStats().entries, 1);
  EXPECT_EQ(tier.Get("t", "a")->kv.head(0, 0).n(), 5);
  ASSERT_TRUE(tier.Put("t", "b", Shared(MakeContext(2))));
  EXPECT_TRUE(tier.Erase("t", "a"));
  EXPECT_FALSE(tier.Erase("t", "a"));
  EXPECT_EQ(tier.GetStats().bytes, small);
  tier.Clear();
  const MemoryTier::Stats s = tier.GetStats();
  EXPECT_EQ(s.bytes, 0);
  EXPECT_EQ(s.entries, 0);
  EXPECT_EQ(s.evictions, 0);
  EXPECT_EQ(tier.Get("t", "b"), nullptr);
}

TEST(MemoryTierTest, RefusesAnEntryLargerThanTheBudget) {
  const int64_t entry = MemoryTier::EntryBytes("t", "a", MakeContext(4));
  MemoryTier tier(entry);
  ASSERT_TRUE(tier.Put("t", "a", Shared(MakeContext(4))));
  EXPECT_FALSE(tier.Put("t", "huge", Shared(MakeContext(40))));
  EXPECT_NE(tier.Get("t", "a"), nullptr);  // nothing was evicted for it
  EXPECT_EQ(tier.GetStats().oversize, 1);
  EXPECT_EQ(tier.GetStats().evictions, 0);

  MemoryTier disabled(0);
  EXPECT_FALSE(disabled.Put("t", "a", Shared(MakeContext(1))));
  EXPECT_EQ(disabled.Get("t", "a"), nullptr);
}

TEST(MemoryTierTest, TenantsAreSeparate) {
  MemoryTier tier(1 << 20);
  ASSERT_TRUE(tier.Put("alice", "k", Shared(MakeContext(2, 1.0f))));
  EXPECT_EQ(tier.Get("bob", "k"), nullptr);
  ASSERT_TRUE(tier.Put("bob", "k", Shared(MakeContext(2, 9.0f))));
  EXPECT_EQ(Fp16ToFp32(tier.Get("alice", "k")->kv.head(0, 0).k[0]), 1.0f);
  EXPECT_EQ(Fp16ToFp32(tier.Get("bob", "k")->kv.head(0, 0).k[0]), 9.0f);
  // Pairs, not concatenations: ("a", "bk") and ("ab", "k") are different entries.
  ASSERT_TRUE(tier.Put("a", "bk", Shared(MakeContext(2))));
  EXPECT_EQ(tier.Get("ab", "k"), nullptr);
  EXPECT_TRUE(tier.Erase("alice", "k"));
  EXPECT_NE(tier.Get("bob", "k"), nullptr);
  const MemoryTier::Stats s = tier.GetStats();
  EXPECT_EQ(s.hits, 3);
  EXPECT_EQ(s.misses, 2);
}

// A tenant with a share evicts its own least-recently-used contexts, never another
// tenant's, however much it stores. Without the share (the default) the same traffic evicts
// the other tenant's context: the behaviour the share exists to prevent.
TEST(MemoryTierTest, ATenantFillingItsShareEvictsOnlyItsOwnContexts) {
  // Tenants and keys of one length, so that every entry is charged the same.
  auto key = [](int i) { return std::string(i < 10 ? "k0" : "k") + std::to_string(i); };
  const int64_t entry = MemoryTier::EntryBytes("bob", key(0), MakeContext(4));
  for (const bool shares : {false, true}) {
    SCOPED_TRACE(shares ? "with a share of 3 entries" : "without shares");
    MemoryTier tier(6 * entry, shares ? 3 * entry : 0);
    ASSERT_TRUE(tier.Put("ann", "a00", Shared(MakeContext(4))));
    ASSERT_TRUE(tier.Put("ann", "a01", Shared(MakeContext(4))));
    for (int i = 0; i < 20; ++i) {
      ASSERT_TRUE(tier.Put("bob", key(i), Shared(MakeContext(4))));
    }
    if (!shares) {
      EXPECT_EQ(tier.Get("ann", "a00"), nullptr);  // global LRU: bob pushed ann out
      continue;
    }
    EXPECT_NE(tier.Get("ann", "a00"), nullptr);
    EXPECT_NE(tier.Get("ann", "a01"), nullptr);
    // Bob keeps his three most recent, LRU within his share.
    EXPECT_EQ(tier.Get("bob", "k16"), nullptr);
    EXPECT_NE(tier.Get("bob", "k17"), nullptr);
    EXPECT_NE(tier.Get("bob", "k19"), nullptr);
    const MemoryTier::Stats s = tier.GetStats();
    EXPECT_EQ(s.evictions, 17);
    EXPECT_EQ(s.tenant_evictions, 17);
    EXPECT_EQ(s.entries, 5);
    const std::map<std::string, int64_t> held = tier.TenantBytes();
    EXPECT_EQ(held.at("ann"), 2 * entry);
    EXPECT_EQ(held.at("bob"), 3 * entry);
    // Bob's share is his own to use: a recent Get protects k17 from his next Put.
    ASSERT_NE(tier.Get("bob", "k17"), nullptr);
    ASSERT_TRUE(tier.Put("bob", "k20", Shared(MakeContext(4))));
    EXPECT_NE(tier.Get("bob", "k17"), nullptr);
    EXPECT_EQ(tier.Get("bob", "k18"), nullptr);
    // Gone entries leave the tenant's figure at zero (a gauge must fall back).
    tier.Clear();
    EXPECT_EQ(tier.TenantBytes().at("bob"), 0);
  }
}

// Shares that add up to more than the tier (4 of 6 entries each, three tenants): when the
// whole budget is full, the entry evicted belongs to a tenant above an even split (2 entries
// each here), so bob's traffic never evicts ann's or cat's two contexts; plain LRU would.
TEST(MemoryTierTest, OvercommittedSharesEvictFromTheTenantAboveAnEvenSplit) {
  auto key = [](int i) { return std::string(i < 10 ? "k0" : "k") + std::to_string(i); };
  const int64_t entry = MemoryTier::EntryBytes("bob", key(0), MakeContext(4));
  MemoryTier tier(6 * entry, 4 * entry);
  // Alone, bob may use his whole share.
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(tier.Put("bob", key(i), Shared(MakeContext(4))));
  EXPECT_EQ(tier.TenantBytes().at("bob"), 4 * entry);
  for (const char* t : {"ann", "cat"}) {
    ASSERT_TRUE(tier.Put(t, "a00", Shared(MakeContext(4))));
    ASSERT_TRUE(tier.Put(t, "a01", Shared(MakeContext(4))));
  }
  for (int i = 4; i < 30; ++i) ASSERT_TRUE(tier.Put("bob", key(i), Shared(MakeContext(4))));
  for (const char* t : {"ann", "cat"}) {
    EXPECT_NE(tier.Get(t, "a00"), nullptr) << t;
    EXPECT_NE(tier.Get(t, "a01"), nullptr) << t;
  }
  EXPECT_EQ(tier.TenantBytes().at("bob"), 2 * entry);
  EXPECT_NE(tier.Get("bob", key(29)), nullptr);
  EXPECT_NE(tier.Get("bob", key(28)), nullptr);
  EXPECT_LE(tier.GetStats().bytes, tier.capacity_bytes());
  // A newcomer takes its room from the tenants above the new even split (1.5 entries each;
  // everyone holds 2): dan's entry is stored.
  ASSERT_TRUE(tier.Put("dan", "a00", Shared(MakeContext(4))));
  EXPECT_NE(tier.Get("dan", "a00"), nullptr);
  EXPECT_LE(tier.GetStats().bytes, tier.capacity_bytes());
}

TEST(MemoryTierTest, AContextLargerThanTheTenantShareIsNotKept) {
  const int64_t entry = MemoryTier::EntryBytes("t", "a", MakeContext(4));
  MemoryTier tier(100 * entry, 2 * entry);
  ASSERT_TRUE(tier.Put("t", "a", Shared(MakeContext(4))));
  EXPECT_FALSE(tier.Put("t", "big", Shared(MakeContext(12))));  // 3 entries' worth
  EXPECT_NE(tier.Get("t", "a"), nullptr);  // nothing was evicted for it
  EXPECT_EQ(tier.Get("t", "big"), nullptr);
  EXPECT_EQ(tier.GetStats().oversize, 1);
  EXPECT_EQ(tier.GetStats().evictions, 0);
  // Through the store: not in memory, and said so (a Redis tier could still keep it).
  ContextStoreOptions o;
  o.memory_bytes = 100 * entry;
  o.memory_tenant_bytes = 2 * entry;
  absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(o);
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<StoreResult> r = (*store)->GetOrCompute(
      "t", "big", []() -> absl::StatusOr<CompressedContext> { return MakeContext(12); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->in_memory);
  EXPECT_EQ((*store)->Stats().memory_tenant_bytes.count("t"), 0u);
  r = (*store)->GetOrCompute(
      "t", "small", []() -> absl::StatusOr<CompressedContext> { return MakeContext(4); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->in_memory);
  EXPECT_EQ((*store)->Stats().memory_tenant_bytes.at("t"),
            MemoryTier::EntryBytes("t", "small", MakeContext(4)));
}

// ---- single flight -------------------------------------------------------------------------

// Waits (polling) until `n` callers wait on `key`; false after 10 s.
bool AwaitWaiters(const SingleFlight<int>& flight, const std::string& key, int64_t n) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (flight.Waiters(key) < n) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(SingleFlightTest, ConcurrentCallersShareOneComputation) {
  constexpr int kThreads = 8;
  SingleFlight<int> flight;
  std::atomic<int> computes{0}, leaders{0};
  std::vector<absl::StatusOr<int>> results(kThreads, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      bool leader = false;
      results[i] = flight.Do(
          "k",
          [&]() -> absl::StatusOr<int> {
            ++computes;
            // Finish only once every other thread has joined, so that sharing is certain.
            if (!AwaitWaiters(flight, "k", kThreads - 1)) return absl::DeadlineExceededError("");
            return 42;
          },
          &leader);
      if (leader) ++leaders;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(computes.load(), 1);
  EXPECT_EQ(leaders.load(), 1);
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(*r, 42);
  }
  EXPECT_EQ(flight.Waiters("k"), 0);
}

TEST(SingleFlightTest, WaitersGetTheSameErrorAndErrorsAreNotKept) {
  constexpr int kThreads = 6;
  SingleFlight<int> flight;
  std::atomic<int> computes{0};
  std::vector<absl::StatusOr<int>> results(kThreads, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      results[i] = flight.Do("k", [&]() -> absl::StatusOr<int> {
        ++computes;
        if (!AwaitWaiters(flight, "k", kThreads - 1)) return absl::DeadlineExceededError("");
        return absl::ResourceExhaustedError("out of workers");
      });
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(computes.load(), 1);
  for (const auto& r : results) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(r.status().message(), "out of workers");
  }
  // The next call computes again.
  absl::StatusOr<int> again = flight.Do("k", [&]() -> absl::StatusOr<int> {
    ++computes;
    return 7;
  });
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 7);
  EXPECT_EQ(computes.load(), 2);
}

TEST(SingleFlightTest, DifferentKeysDoNotWaitForEachOther) {
  SingleFlight<int> flight;
  std::atomic<bool> b_done{false};
  // a's computation finishes only after b's has: if b waited on a, this would never end.
  std::thread a([&] {
    absl::StatusOr<int> r = flight.Do("a", [&]() -> absl::StatusOr<int> {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!b_done.load() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
      return b_done.load() ? 1 : -1;
    });
    EXPECT_EQ(*r, 1);
  });
  absl::StatusOr<int> b = flight.Do("b", [&]() -> absl::StatusOr<int> { return 2; });
  b_done = true;
  a.join();
  EXPECT_EQ(*b, 2);
}

// Per-caller stops (issue 14 item 2). A stop that fires once `flag` is set.
StopFn StopWhen(const std::atomic<bool>& flag, absl::Status status) {
  return [&flag, status]() { return flag.load() ? status : absl::OkStatus(); };
}

// Caught: a waiter blocked until the leader finished, however long after its own caller had
// given up (no deadline of its own).
TEST(SingleFlightTest, AWaitersOwnStopEndsOnlyThatWaiter) {
  SingleFlight<int> flight;
  std::atomic<bool> release{false}, give_up{false}, computing{false};
  std::thread leader([&] {
    absl::StatusOr<int> r = flight.Do("k", [&](const StopFn&) -> absl::StatusOr<int> {
      computing = true;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (!release.load() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      return 42;
    });
    EXPECT_EQ(r.value_or(-1), 42);
  });
  while (!computing.load()) std::this_thread::yield();  // the leader is the leader
  absl::StatusOr<int> patient = absl::UnknownError("not run");
  std::thread patient_waiter(
      [&] { patient = flight.Do("k", [] { return absl::StatusOr<int>(-2); }); });
  ASSERT_TRUE(AwaitWaiters(flight, "k", 1));
  absl::StatusOr<int> impatient = absl::UnknownError("not run");
  std::thread impatient_waiter([&] {
    impatient = flight.Do("k", [] { return absl::StatusOr<int>(-3); },
                          StopWhen(give_up, absl::DeadlineExceededError("mine")));
  });
  ASSERT_TRUE(AwaitWaiters(flight, "k", 2));
  give_up = true;
  const auto t0 = std::chrono::steady_clock::now();
  impatient_waiter.join();  // while the leader still computes
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_FALSE(release.load());
  EXPECT_EQ(impatient.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(impatient.status().message(), "mine");
  EXPECT_EQ(flight.Waiters("k"), 1);  // the impatient one took itself off
  release = true;
  leader.join();
  patient_waiter.join();
  EXPECT_EQ(patient.value_or(-1), 42);
}

// Caught: the leader's caller leaving failed the computation and every waiter with it.
TEST(SingleFlightTest, TheLeaderLeavingDoesNotFailTheWaiters) {
  SingleFlight<int> flight;
  std::atomic<bool> leader_gone{false};
  std::atomic<bool> stopped_while_waited{false}, computing{false};
  absl::StatusOr<int> led = absl::UnknownError("not run"), waited = absl::UnknownError("not run");
  std::thread leader([&] {
    led = flight.Do(
        "k",
        [&](const StopFn& flight_stop) -> absl::StatusOr<int> {
          computing = true;
          if (!AwaitWaiters(flight, "k", 1)) return absl::DeadlineExceededError("no waiter");
          leader_gone = true;
          // Someone still waits: the computation must go on.
          if (!CheckStop(flight_stop).ok()) stopped_while_waited = true;
          return 42;
        },
        StopWhen(leader_gone, absl::CancelledError("leader left")));
  });
  while (!computing.load()) std::this_thread::yield();
  std::thread waiter([&] { waited = flight.Do("k", [] { return absl::StatusOr<int>(-1); }); });
  leader.join();
  waiter.join();
  EXPECT_FALSE(stopped_while_waited.load());
  EXPECT_EQ(waited.value_or(-1), 42);
  // The leader's own call ends with its own status.
  EXPECT_EQ(led.status().code(), absl::StatusCode::kCancelled);
}

// The computation stops once nobody wants it: leader gone and the last waiter gone.
TEST(SingleFlightTest, TheFlightStopsWhenEveryCallerHasLeft) {
  SingleFlight<int> flight;
  std::atomic<bool> leader_gone{false}, waiter_gone{false}, saw_stop{false}, computing{false};
  absl::StatusOr<int> led = absl::UnknownError("not run"), waited = absl::UnknownError("not run");
  std::thread leader([&] {
    led = flight.Do(
        "k",
        [&](const StopFn& flight_stop) -> absl::StatusOr<int> {
          computing = true;
          if (!AwaitWaiters(flight, "k", 1)) return absl::DeadlineExceededError("no waiter");
          leader_gone = true;
          EXPECT_TRUE(CheckStop(flight_stop).ok());  // the waiter still waits
          waiter_gone = true;
          const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
          while (std::chrono::steady_clock::now() < deadline) {
            if (absl::Status s = CheckStop(flight_stop); !s.ok()) {
              saw_stop = true;
              return s;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
          }
          return 42;
        },
        StopWhen(leader_gone, absl::CancelledError("leader left")));
  });
  while (!computing.load()) std::this_thread::yield();
  std::thread waiter([&] {
    waited = flight.Do("k", [] { return absl::StatusOr<int>(-1); },
                       StopWhen(waiter_gone, absl::DeadlineExceededError("waiter's deadline")));
  });
  leader.join();
  waiter.join();
  EXPECT_TRUE(saw_stop.load());
  EXPECT_EQ(led.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(flight.Waiters("k"), 0);
}

// ---- Redis URL and keys --------------------------------------------------------------------

TEST(RedisUrlTest, ParsesGoodUrls) {
  absl::StatusOr<RedisUrl> u = ParseRedisUrl("redis://localhost");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->host, "localhost");
  EXPECT_EQ(u->port, 6379);
  EXPECT_EQ(u->db, 0);
  EXPECT_TRUE(u->user.empty());
  EXPECT_TRUE(u->password.empty());

  u = ParseRedisUrl("redis://10.0.0.7:6380/3");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->host, "10.0.0.7");
  EXPECT_EQ(u->port, 6380);
  EXPECT_EQ(u->db, 3);

  u = ParseRedisUrl("redis://:s%40cr%3At@redis.internal:7000");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->user, "");
  EXPECT_EQ(u->password, "s@cr:t");
  EXPECT_EQ(u->host, "redis.internal");

  u = ParseRedisUrl("redis://alice:pw@cache-0.cache:6379/0");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->user, "alice");
  EXPECT_EQ(u->password, "pw");
  EXPECT_EQ(u->host, "cache-0.cache");

  u = ParseRedisUrl("redis://[::1]:6390/2");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->port, 6390);
  EXPECT_EQ(u->db, 2);

  u = ParseRedisUrl("redis://h/");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->db, 0);
}

TEST(RedisUrlTest, RejectsBadUrlsWithAMessageAndNoPassword) {
  const struct {
    const char* url;
    const char* says;
  } kCases[] = {
      {"", "must start with redis://"},
      {"localhost:6379", "must start with redis://"},
      {"http://hunter2@h", "must start with redis://"},
      {"rediss://h:6379", "TLS"},
      {"redis://", "host is missing"},
      {"redis://:6379", "host is missing"},
      {"redis://h:0", "port must be a number in 1..65535"},
      {"redis://h:65536", "port must be a number in 1..65535"},
      {"redis://h:63x9", "port must be a number"},
      {"redis://h:", "port after ':' is empty"},
      {"redis://h:-1", "port must be a number"},
      {"redis://h/x", "database must be a number"},
      {"redis://h/-1", "database must be a number"},
      {"redis://h?db=1", "query parameters"},
      {"redis://alice@h", "a user needs a password"},
      {"redis://alice:@h", "password is empty"},
      {"redis://:hunter%2@h", "bad percent-escape in the password"},
      {"redis://::1:6379", "IPv6 host goes in brackets"},
      {"redis://[::1:6379", "unterminated ["},
      {"redis://h st:1", "bad host"},
      {"redis://alice:hunter2@h:bad", "port must be a number"},
  };
  for (const auto& c : kCases) {
    absl::StatusOr<RedisUrl> u = ParseRedisUrl(c.url);
    ASSERT_FALSE(u.ok()) << c.url;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << c.url;
    EXPECT_THAT(std::string(u.status().message()), HasSubstr(c.says)) << c.url;
    EXPECT_THAT(std::string(u.status().message()), HasSubstr("redis://[user:password@]host"));
    EXPECT_THAT(std::string(u.status().message()), Not(HasSubstr("hunter"))) << c.url;
  }
}

TEST(RedisUrlTest, RedactsThePassword) {
  EXPECT_EQ(RedactRedisUrl("redis://alice:hunter2@h:1/2"), "redis://alice:***@h:1/2");
  EXPECT_EQ(RedactRedisUrl("redis://:hunter2@h"), "redis://:***@h");
  EXPECT_EQ(RedactRedisUrl("redis://h:1"), "redis://h:1");
}

// The metadata record is read back from a shared Redis: only FormatMeta's exact spelling is
// an entry (found by tests/fuzz/redis_meta_fuzz.cc: a 9-digit crc, leading zeros, a sign or
// whitespace were accepted, and the quota script's Lua pattern reads those differently).
TEST(RedisMetaTest, ParsesOnlyTheCanonicalRecord) {
  RedisTier::Meta m;
  m.write_id = "0123456789abcdef0123456789abcdef";
  m.parts = 3;
  m.bytes = 1048576;
  m.crc = 0x0a1b2c3d;
  const std::string text = RedisTier::FormatMeta(m);
  EXPECT_EQ(text, "ctxm1 0123456789abcdef0123456789abcdef 3 1048576 0a1b2c3d");
  absl::StatusOr<RedisTier::Meta> back = RedisTier::ParseMeta(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->write_id, m.write_id);
  EXPECT_EQ(back->parts, 3);
  EXPECT_EQ(back->bytes, 1048576);
  EXPECT_EQ(back->crc, 0x0a1b2c3du);
  const std::string id = "ffffffffffffffffffffffffffffffff";
  for (const std::string& bad : {
           "ctxm1 " + id + " 1 1 000000000",   // crc of 9 digits
           "ctxm1 " + id + " 1 1 abc",         // crc of 3
           "ctxm1 " + id + " 1 1 0000000A",    // upper case
           "ctxm1 " + id + " 01 1 00000000",   // leading zero
           "ctxm1 " + id + " +1 1 00000000",   // sign
           "ctxm1 " + id + " 1\t 1 00000000",  // whitespace inside a field
           "ctxm1 " + id + " 1 1 0x000000",    // hex prefix
           "ctxm1 " + id + " 0 1 00000000",    // no parts
           "ctxm1 " + id + " 2 1 00000000",    // fewer bytes than parts
           "ctxm1 " + id.substr(1) + "F 1 1 00000000",
       }) {
    absl::StatusOr<RedisTier::Meta> meta = RedisTier::ParseMeta(bad);
    EXPECT_EQ(meta.status().code(), absl::StatusCode::kDataLoss) << bad;
  }
}

TEST(RedisKeyTest, EscapesTenantsSoThatNoneCanForgeAnothersPrefix) {
  EXPECT_EQ(RedisTier::Escape("acme-prod_1.eu"), "acme-prod_1.eu");
  EXPECT_EQ(RedisTier::Escape("a:b"), "a%3Ab");
  EXPECT_EQ(RedisTier::Escape("%"), "%25");
  EXPECT_EQ(RedisTier::Escape("a b*\n"), "a%20b%2A%0A");
  EXPECT_EQ(RedisTier::Escape(std::string("\0\xff", 2)), "%00%FF");
  // Injective on the tricky cases: an escaped form is not another tenant's raw name.
  EXPECT_NE(RedisTier::Escape("a:b"), RedisTier::Escape("a%3Ab"));

  RedisOptions options;
  options.url = "redis://127.0.0.1:1";  // Create does not connect
  absl::StatusOr<std::unique_ptr<RedisTier>> tier = RedisTier::Create(options, kFingerprint);
  ASSERT_TRUE(tier.ok()) << tier.status();
  RedisTier& t = **tier;
  EXPECT_EQ(t.TenantPrefix("acme"), "ctxcache:{acme}");
  EXPECT_EQ(t.ContextPrefix("acme", "0123abcd"), "ctxcache:{acme:0123abcd}");
  EXPECT_EQ(t.MetaKey("acme", "0123abcd"), "ctxcache:{acme:0123abcd}:m");
  EXPECT_EQ(t.PartKey("acme", "0123abcd", "00ff", 2), "ctxcache:{acme:0123abcd}:p:00ff:2");
  EXPECT_EQ(t.DeleteCounterKey("acme", "0123abcd"), "ctxcache:{acme:0123abcd}:d");
  EXPECT_EQ(t.MetaKey("acme", "a:b"), "ctxcache:{acme:a%3Ab}:m");
  // Tenant "acme:x" would share acme's context namespace if not escaped, and a brace in a
  // tenant or key would move the hash tag.
  const std::string forged = t.MetaKey("acme:x", "k");
  EXPECT_EQ(forged, "ctxcache:{acme%3Ax:k}:m");
  EXPECT_FALSE(forged.starts_with("ctxcache:{acme:"));
  EXPECT_EQ(t.MetaKey("a}b{", "k"), "ctxcache:{a%7Db%7B:k}:m");
  // Every key of one context shares one hash slot; the tenant's ledger has its own.
  const int slot = RedisKeySlot(t.MetaKey("acme", "k"));
  EXPECT_EQ(RedisKeySlot(t.PartKey("acme", "k", std::string(32, 'f'), 7)), slot);
  EXPECT_EQ(RedisKeySlot(t.DeleteCounterKey("acme", "k")), slot);
  EXPECT_EQ(RedisKeySlot(t.TenantPrefix("acme") + ":q:z"),
            RedisKeySlot(t.TenantPrefix("acme") + ":q:n"));
  EXPECT_NE(t.MetaKey("acme", "x:m:k"), t.MetaKey("acme:m:x", "k"));
}

// ---- the store without Redis ---------------------------------------------------------------

ContextStoreOptions MemoryOnly(int64_t bytes = 1 << 20) {
  ContextStoreOptions o;
  o.memory_bytes = bytes;
  o.model_fingerprint = kFingerprint;
  return o;
}

TEST(ContextStoreTest, ComputesOnceThenServesFromMemory) {
  absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(MemoryOnly());
  ASSERT_TRUE(store.ok()) << store.status();
  int computes = 0;
  auto compute = [&]() -> absl::StatusOr<CompressedContext> {
    ++computes;
    return MakeContext(3);
  };
  absl::StatusOr<StoreResult> r = (*store)->GetOrCompute("t", "k", compute);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_GT(r->compute_seconds, 0.0);
  r = (*store)->GetOrCompute("t", "k", compute);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tier, CacheTier::kMemory);
  EXPECT_EQ(r->compute_seconds, 0.0);
  EXPECT_EQ(computes, 1);
  EXPECT_EQ((*store)->Get("t", "k")->tier, CacheTier::kMemory);
  EXPECT_EQ((*store)->Get("other", "k").status().code(), absl::StatusCode::kNotFound);

  ContextStoreStats s = (*store)->Stats();
  EXPECT_EQ(s.memory_entries, 1);
  EXPECT_EQ(s.memory_bytes, MemoryTier::EntryBytes("t", "k", MakeContext(3)));
  EXPECT_EQ(s.memory_hits, 2);
  EXPECT_FALSE(s.redis_connected);

  (*store)->ClearMemory();
  EXPECT_EQ((*store)->Get("t", "k").status().code(), absl::StatusCode::kNotFound);
  r = (*store)->GetOrCompute("t", "k", compute);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_TRUE((*store)->Delete("t", "k").ok());
  EXPECT_EQ((*store)->Delete("t", "k").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->Get("t", "k").status().code(), absl::StatusCode::kNotFound);
}

TEST(ContextStoreTest, ComputeErrorsPropagateAndAreNotCached) {
  absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(MemoryOnly());
  ASSERT_TRUE(store.ok());
  absl::StatusOr<StoreResult> r =
      (*store)->GetOrCompute("t", "k", []() -> absl::StatusOr<CompressedContext> {
        return absl::InvalidArgumentError("document is empty");
      });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "document is empty");
  r = (*store)->GetOrCompute("t", "k",
                             []() -> absl::StatusOr<CompressedContext> { return MakeContext(1); });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tier, CacheTier::kComputed);
  EXPECT_EQ((*store)->GetOrCompute("t", "k2", nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ContextStoreTest, ConcurrentRequestsForOneKeyComputeOnce) {
  absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(MemoryOnly());
  ASSERT_TRUE(store.ok());
  constexpr int kThreads = 8;
  std::atomic<int> computes{0}, started{0};
  std::vector<std::shared_ptr<const CompressedContext>> got(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      ++started;
      absl::StatusOr<StoreResult> r =
          (*store)->GetOrCompute("t", "k", [&]() -> absl::StatusOr<CompressedContext> {
            ++computes;
            // Give the others a chance to pile up; correctness does not depend on it (a late
            // caller finds the memory tier filled instead).
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
            while (started.load() < kThreads && std::chrono::steady_clock::now() < deadline) {
              std::this_thread::yield();
            }
            return MakeContext(2);
          });
      ASSERT_TRUE(r.ok()) << r.status();
      got[i] = r->context;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(computes.load(), 1);
  for (const auto& c : got) EXPECT_EQ(c.get(), got[0].get());  // one shared object
}

TEST(ContextStoreTest, RejectsBadOptions) {
  ContextStoreOptions o = MemoryOnly();
  o.memory_bytes = -1;
  EXPECT_EQ(ContextStore::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = MemoryOnly();
  o.memory_tenant_bytes = -1;
  EXPECT_THAT(std::string(ContextStore::Create(o).status().message()),
              HasSubstr("memory_tenant_bytes"));
  o = MemoryOnly();
  o.model_fingerprint = "81EE";
  EXPECT_EQ(ContextStore::Create(o).status().code(), absl::StatusCode::kInvalidArgument);

  const auto redis_error = [](void (*edit)(RedisOptions&)) {
    ContextStoreOptions o = MemoryOnly();
    o.redis.url = "redis://127.0.0.1:1";
    edit(o.redis);
    return ContextStore::Create(o).status();
  };
  EXPECT_THAT(std::string(redis_error([](RedisOptions& r) { r.url = "redis://h:x"; }).message()),
              HasSubstr("port"));
  EXPECT_EQ(redis_error([](RedisOptions& r) { r.ttl_seconds = -1; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(redis_error([](RedisOptions& r) { r.tenant_quota_bytes = -5; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(redis_error([](RedisOptions& r) { r.max_part_bytes = 0; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(redis_error([](RedisOptions& r) { r.pool_size = 0; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(redis_error([](RedisOptions& r) { r.command_timeout_ms = 0; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(redis_error([](RedisOptions& r) { r.backoff_max_ms = 1; }).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ContextStoreTest, UnreachableRedisDegradesToComputeAndFailsFast) {
  ContextStoreOptions o = MemoryOnly();
  const int port = testing::FreeLoopbackPort();  // nothing listens there
  ASSERT_GT(port, 0);
  o.redis.url = "redis://127.0.0.1:" + std::to_string(port);
  o.redis.backoff_initial_ms = 60000;  // one attempt, then fail fast for the whole test
  o.redis.backoff_max_ms = 60000;
  o.redis.circuit_failures = 0;  // this test is about the client's backoff, not the breaker
  absl::StatusOr<std::unique_ptr<ContextStore>> store = ContextStore::Create(o);
  ASSERT_TRUE(store.ok()) << store.status();  // not an error at start
  EXPECT_FALSE((*store)->Stats().redis_connected);
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<StoreResult> r = (*store)->GetOrCompute(
        "t", "k" + std::to_string(i),
        []() -> absl::StatusOr<CompressedContext> { return MakeContext(1); });
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tier, CacheTier::kComputed);
  }
  EXPECT_TRUE((*store)->WaitForWrites(absl::Seconds(30)));  // writes run in the background
  const ContextStoreStats s = (*store)->Stats();
  EXPECT_EQ(s.redis_errors, 40);  // a read and a write per request
  EXPECT_EQ(s.redis_hits + s.redis_misses + s.redis_writes, 0);
  EXPECT_FALSE(s.redis_connected);
  // Lookup only: "unavailable" (the entry may exist there), not "not found".
  (*store)->ClearMemory();
  const absl::Status get = (*store)->Get("t", "k0").status();
  EXPECT_EQ(get.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(get.message()), HasSubstr("next attempt in"));
  EXPECT_EQ((*store)->Delete("t", "k0").code(), absl::StatusCode::kUnavailable);
}

TEST(ContextStoreTest, TierNames) {
  EXPECT_STREQ(CacheTierName(CacheTier::kComputed), "computed");
  EXPECT_STREQ(CacheTierName(CacheTier::kMemory), "memory");
  EXPECT_STREQ(CacheTierName(CacheTier::kRedis), "redis");
}

}  // namespace
}  // namespace ctxcache
