// The Redis Cluster test harness (tests/redis_cluster.h) against a real redis-server: the
// cluster forms, keys live on their slot's primary and other nodes answer MOVED, a slot
// moved half way makes the source answer ASK and the target serve the key only after
// ASKING, a finished move makes every node answer MOVED to the new owner, an unassigned slot
// answers CLUSTERDOWN, a killed primary's replica takes over, and the killed node rejoins.
//
// Without redis-server these tests skip, or fail when CTXCACHE_REQUIRE_REDIS=1 (CI).
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "tests/redis_cluster.h"

namespace ctxcache {
namespace {

using testing::HashTagForSlotForTest;
using testing::KeySlotForTest;
using testing::LocalRedisCluster;
using testing::LocalRedisClusterOptions;

std::string Moved(int slot, int port) {
  return "(error) MOVED " + std::to_string(slot) + " 127.0.0.1:" + std::to_string(port);
}
std::string Ask(int slot, int port) {
  return "(error) ASK " + std::to_string(slot) + " 127.0.0.1:" + std::to_string(port);
}

long long MsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t)
      .count();
}

// Commands on one connection (for ASKING / READONLY, which last one command / the
// connection), each reply formatted as LocalRedisCluster::Command does.
std::vector<std::string> OnOneConnection(LocalRedisCluster& cluster, int node,
                                         const std::vector<std::vector<std::string>>& commands) {
  std::vector<std::string> out;
  std::unique_ptr<redisContext, void (*)(redisContext*)> c(cluster.Connect(node), redisFree);
  if (c == nullptr) return {"(cannot connect to node " + std::to_string(node) + ")"};
  for (const auto& args : commands) {
    std::string error;
    const testing::cluster_detail::Reply r =
        testing::cluster_detail::RunArgv(c.get(), args, &error);
    out.push_back(r == nullptr ? "(I/O error) " + error
                               : testing::cluster_detail::FormatReply(r.get()));
  }
  return out;
}

TEST(KeySlotForTest, MatchesRedisCluster) {
  EXPECT_EQ(testing::Crc16XmodemForTest("123456789"), 0x31C3);
  EXPECT_EQ(KeySlotForTest("foo"), 12182);
  EXPECT_EQ(KeySlotForTest("123456789"), 0x31C3 & 16383);
  EXPECT_EQ(KeySlotForTest("{user1000}.following"), KeySlotForTest("{user1000}.followers"));
  EXPECT_EQ(KeySlotForTest("{user1000}.following"), KeySlotForTest("user1000"));
  // An empty tag counts as none; only the first '{' and the next '}' count.
  EXPECT_EQ(KeySlotForTest("foo{}{bar}"), testing::Crc16XmodemForTest("foo{}{bar}") & 16383);
  EXPECT_EQ(KeySlotForTest("foo{{bar}}zap"), KeySlotForTest("{bar"));
  EXPECT_EQ(KeySlotForTest("foo{bar}{zap}"), KeySlotForTest("bar"));
  EXPECT_EQ(KeySlotForTest("{"), testing::Crc16XmodemForTest("{") & 16383);
  EXPECT_EQ(KeySlotForTest(""), 0);
  for (const int slot : {0, 1, 5460, 5461, 12182, 16383}) {
    const std::string tag = HashTagForSlotForTest(slot);
    ASSERT_FALSE(tag.empty()) << slot;
    EXPECT_EQ(KeySlotForTest("{" + tag + "}x"), slot);
  }
  EXPECT_EQ(HashTagForSlotForTest(16384), "");
}

TEST(RedisClusterHarness, ThreePrimariesMovedAskAndMigration) {
  CTXCACHE_REDIS_SERVER_OR_SKIP(redis_server);
  LocalRedisCluster cluster(redis_server, 3);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.Start(), "");
  std::printf("3 primaries: started and healthy in %lld ms\n", MsSince(t0));

  ASSERT_EQ(cluster.nodes(), 3);
  EXPECT_EQ(cluster.SeedUrl(), "redis-cluster://127.0.0.1:" + std::to_string(cluster.port(0)) +
                                   ",127.0.0.1:" + std::to_string(cluster.port(1)) +
                                   ",127.0.0.1:" + std::to_string(cluster.port(2)));
  std::set<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(cluster.node_id(i).size(), 40u);
    EXPECT_EQ(cluster.Command(i, {"CLUSTER", "MYID"}), cluster.node_id(i));
    ids.insert(cluster.node_id(i));
  }
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_EQ(cluster.PrimaryForSlot(0), 0);
  EXPECT_EQ(cluster.PrimaryForSlot(5460), 0);
  EXPECT_EQ(cluster.PrimaryForSlot(5461), 1);
  EXPECT_EQ(cluster.PrimaryForSlot(10922), 2);
  EXPECT_EQ(cluster.PrimaryForSlot(16383), 2);
  EXPECT_EQ(cluster.SlotRangesOf(1), (std::vector<std::pair<int, int>>{{5461, 10921}}));

  // Our slot function agrees with Redis's.
  for (const std::string key : {"foo", "bar", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap",
                                "a{b}c{d}", "", "{}", "x{"}) {
    EXPECT_EQ(cluster.Command(1, {"CLUSTER", "KEYSLOT", key}),
              "(integer) " + std::to_string(KeySlotForTest(key)))
        << "key '" << key << "'";
  }

  // Keys live on their slot's primary; the others answer MOVED with host 127.0.0.1.
  for (int k = 0; k < 12; ++k) {
    const std::string key = "key:" + std::to_string(k);
    const int slot = KeySlotForTest(key);
    const int owner = cluster.PrimaryForSlot(slot);
    ASSERT_GE(owner, 0) << key;
    EXPECT_EQ(cluster.Command(owner, {"SET", key, "v" + std::to_string(k)}), "OK");
    EXPECT_EQ(cluster.Command(owner, {"GET", key}), "v" + std::to_string(k));
    const int other = (owner + 1) % 3;
    EXPECT_EQ(cluster.Command(other, {"GET", key}), Moved(slot, cluster.port(owner)));
  }

  // Move slot 100 (node 0's) to node 1, one key first.
  const int slot = 100;
  const std::string tag = "{" + HashTagForSlotForTest(slot) + "}";
  const std::vector<std::string> keys = {tag + "a", tag + "b", tag + "c"};
  for (const std::string& key : keys) {
    ASSERT_EQ(cluster.Command(0, {"SET", key, "value-" + key}), "OK");
  }
  ASSERT_EQ(cluster.BeginMigration(slot, 0, 1), "");
  int moved = -1;
  ASSERT_EQ(cluster.MigrateKeys(slot, 0, 1, 1, &moved), "");
  EXPECT_EQ(moved, 1);
  EXPECT_EQ(cluster.Command(0, {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(slot)}),
            "(integer) 2");
  const std::string on_target =
      cluster.Command(1, {"CLUSTER", "GETKEYSINSLOT", std::to_string(slot), "10"});
  ASSERT_EQ(on_target.front(), '[') << on_target;
  const std::string moved_key = on_target.substr(1, on_target.size() - 2);
  ASSERT_NE(std::find(keys.begin(), keys.end(), moved_key), keys.end()) << on_target;
  const std::string kept_key = moved_key == keys[0] ? keys[1] : keys[0];
  // The source serves what it still has and sends the rest to the target with ASK.
  EXPECT_EQ(cluster.Command(0, {"GET", moved_key}), Ask(slot, cluster.port(1)));
  EXPECT_EQ(cluster.Command(0, {"GET", kept_key}), "value-" + kept_key);
  EXPECT_EQ(cluster.Command(0, {"GET", tag + "new"}), Ask(slot, cluster.port(1)));
  // The target still sends plain requests to the owner; after ASKING it serves the key.
  EXPECT_EQ(cluster.Command(1, {"GET", moved_key}), Moved(slot, cluster.port(0)));
  EXPECT_EQ(OnOneConnection(cluster, 1, {{"ASKING"}, {"GET", moved_key}, {"GET", moved_key}}),
            (std::vector<std::string>{"OK", "value-" + moved_key, Moved(slot, cluster.port(0))}));
  EXPECT_EQ(cluster.Command(2, {"GET", moved_key}), Moved(slot, cluster.port(0)));

  // Not finished while keys are left.
  const std::string early = cluster.FinishMigration(slot, 0, 1);
  EXPECT_NE(early.find("still holds keys"), std::string::npos) << early;

  ASSERT_EQ(cluster.MigrateKeys(slot, 0, 1, -1, &moved), "");
  EXPECT_EQ(moved, 2);
  const auto t1 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.FinishMigration(slot, 0, 1), "");
  std::printf("FinishMigration (SETSLOT NODE and every node agreeing): %lld ms\n", MsSince(t1));
  EXPECT_EQ(cluster.PrimaryForSlot(slot), 1);
  for (const std::string& key : keys) {
    EXPECT_EQ(cluster.Command(1, {"GET", key}), "value-" + key);
    EXPECT_EQ(cluster.Command(0, {"GET", key}), Moved(slot, cluster.port(1)));
    EXPECT_EQ(cluster.Command(2, {"GET", key}), Moved(slot, cluster.port(1)));
  }
  EXPECT_EQ(cluster.PrimaryForSlot(slot - 1), 0);
  EXPECT_EQ(cluster.PrimaryForSlot(slot + 1), 0);
  EXPECT_EQ(cluster.SlotRangesOf(0),
            (std::vector<std::pair<int, int>>{{0, slot - 1}, {slot + 1, 5460}}));
  EXPECT_EQ(cluster.WaitHealthy(5000), "");

  // And back in one call (an empty slot moves too).
  ASSERT_EQ(cluster.MigrateSlot(slot, 1, 0), "");
  EXPECT_EQ(cluster.PrimaryForSlot(slot), 0);
  EXPECT_EQ(cluster.Command(0, {"GET", keys[2]}), "value-" + keys[2]);
  ASSERT_EQ(cluster.MigrateSlot(slot + 1, 0, 2), "");
  EXPECT_EQ(cluster.PrimaryForSlot(slot + 1), 2);
  EXPECT_EQ(cluster.WaitHealthy(5000), "");

  // Errors say what went wrong.
  EXPECT_NE(cluster.Start().find("already started"), std::string::npos);
  const std::string not_owner = cluster.BeginMigration(slot, 1, 2);
  EXPECT_NE(not_owner.find("BeginMigration(slot 100, node 1 -> node 2)"), std::string::npos)
      << not_owner;
  EXPECT_NE(not_owner.find("(error) ERR"), std::string::npos) << not_owner;
  const std::string no_failover = cluster.WaitFailover(1, 100);
  EXPECT_NE(no_failover.find("Kill() it first"), std::string::npos) << no_failover;
  EXPECT_EQ(cluster.Command(7, {"PING"}), "(no node 7)");
}

TEST(RedisClusterHarness, DelSlotWithoutFullCoverage) {
  CTXCACHE_REDIS_SERVER_OR_SKIP(redis_server);
  LocalRedisClusterOptions options;
  options.primaries = 3;
  options.require_full_coverage = false;
  LocalRedisCluster cluster(redis_server, options);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.Start(), "");
  std::printf("3 primaries, full coverage not required: started in %lld ms\n", MsSince(t0));
  const int slot = KeySlotForTest("foo");  // 12182, node 2's
  ASSERT_EQ(cluster.PrimaryForSlot(slot), 2);
  ASSERT_EQ(cluster.Command(2, {"SET", "bar", "1"}), Moved(KeySlotForTest("bar"), cluster.port(0)));
  const auto t1 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.DelSlot(slot), "");
  std::printf("DelSlot: %lld ms\n", MsSince(t1));
  EXPECT_EQ(cluster.PrimaryForSlot(slot), -1);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(cluster.Command(i, {"GET", "foo"}), "(error) CLUSTERDOWN Hash slot not served")
        << "node " << i;
  }
  // The rest keeps working.
  EXPECT_EQ(cluster.Command(0, {"SET", "bar", "1"}), "OK");
  EXPECT_EQ(cluster.Command(0, {"CLUSTER", "INFO"}).find("cluster_state:ok") != std::string::npos,
            true);
  EXPECT_EQ(cluster.WaitHealthy(2000), "");
  EXPECT_NE(cluster.DelSlot(slot).find("not assigned"), std::string::npos);
}

TEST(RedisClusterHarness, FailoverToReplicaAndRejoin) {
  CTXCACHE_REDIS_SERVER_OR_SKIP(redis_server);
  LocalRedisCluster cluster(redis_server, 3, 1, 1000);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.Start(), "");
  std::printf("3+3: started and healthy in %lld ms\n", MsSince(t0));
  ASSERT_EQ(cluster.nodes(), 6);
  ASSERT_EQ(cluster.InitialReplicasOf(0), std::vector<int>{3});
  ASSERT_EQ(cluster.InitialPrimaryOf(5), 2);
  for (int r = 3; r < 6; ++r) {
    const int p = r - 3;
    EXPECT_EQ(cluster.Command(r, {"ROLE"})
                  .rfind("[slave, 127.0.0.1, (integer) " + std::to_string(cluster.port(p)) +
                             ", connected",
                         0),
              0u)
        << cluster.Command(r, {"ROLE"});
  }

  const std::string key = "{" + HashTagForSlotForTest(42) + "}k";
  ASSERT_EQ(cluster.Command(0, {"SET", key, "before-failover"}), "OK");
  ASSERT_EQ(cluster.Command(0, {"WAIT", "1", "2000"}), "(integer) 1");
  // A replica redirects to its primary, unless the connection is READONLY.
  EXPECT_EQ(cluster.Command(3, {"GET", key}), Moved(42, cluster.port(0)));
  EXPECT_EQ(OnOneConnection(cluster, 3, {{"READONLY"}, {"GET", key}}),
            (std::vector<std::string>{"OK", "before-failover"}));

  // Asked of a running node: said at once.
  const std::string e = cluster.WaitFailover(1, 100);
  EXPECT_NE(e.find("is running"), std::string::npos) << e;

  const std::string old_id = cluster.node_id(0);
  cluster.Kill(0);
  EXPECT_FALSE(cluster.running(0));
  EXPECT_EQ(cluster.Command(0, {"PING"}), "(node 0 is not running)");
  const auto t1 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.WaitFailover(0, 15000), "");
  std::printf("failover (node timeout 1000 ms): %lld ms from SIGKILL to a healthy cluster\n",
              MsSince(t1));
  EXPECT_EQ(cluster.PrimaryForSlot(42), 3);
  EXPECT_EQ(cluster.SlotRangesOf(3), (std::vector<std::pair<int, int>>{{0, 5460}}));
  EXPECT_EQ(cluster.Command(3, {"GET", key}), "before-failover");
  EXPECT_EQ(cluster.Command(1, {"GET", key}), Moved(42, cluster.port(3)));
  EXPECT_EQ(cluster.Command(3, {"SET", key, "after-failover"}), "OK");

  const auto t2 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster.Restart(0), "");
  ASSERT_EQ(cluster.WaitHealthy(15000), "");
  std::printf("restarted node rejoined as a synced replica in %lld ms\n", MsSince(t2));
  EXPECT_EQ(cluster.node_id(0), old_id);
  EXPECT_EQ(cluster.Command(0, {"CLUSTER", "MYID"}), old_id);
  EXPECT_EQ(
      cluster.Command(0, {"ROLE"})
          .rfind("[slave, 127.0.0.1, (integer) " + std::to_string(cluster.port(3)) + ", connected",
                 0),
      0u)
      << cluster.Command(0, {"ROLE"});
  EXPECT_EQ(cluster.Command(0, {"GET", key}), Moved(42, cluster.port(3)));
  EXPECT_EQ(OnOneConnection(cluster, 0, {{"READONLY"}, {"GET", key}}),
            (std::vector<std::string>{"OK", "after-failover"}));
  EXPECT_EQ(cluster.PrimaryForSlot(42), 3);
}

}  // namespace
}  // namespace ctxcache
