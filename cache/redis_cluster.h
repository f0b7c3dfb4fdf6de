// A Redis Cluster client over hiredis, as small as the Redis tier needs: hash slots, the slot
// map read with CLUSTER SLOTS, MOVED / ASK / TRYAGAIN redirections, and a pooled RedisClient
// per node (its deadlines, backoff and cancellation: redis_client.h).
//
// Routing. A pipeline names a key; every key of its commands must share that key's hash slot
// (the tier's layout uses hash tags, so one context's parts and metadata, or one tenant's
// quota ledger, sit in one slot and a multi-key MGET or EVAL is one round trip). The pipeline
// goes to the primary serving the slot. A reply that redirects is followed for that command
// alone (the others ran): MOVED updates the map's slot and asks for a re-read of the whole
// map; ASK resends the command to the importing node behind ASKING; TRYAGAIN (a multi-key
// command over a slot whose keys are half migrated) waits kTryAgainMs and resends. A command
// still redirected after kMaxRedirects hops fails the pipeline (Unavailable: a redirect loop,
// or a migration that does not finish within the deadline).
//
// The slot map is re-read (from any known node, then the seeds) when the first call finds none,
// after a MOVED, after a node fails (its slots may have moved to a promoted replica) and when
// a slot has no node; at most once per kRefreshIntervalMs, by one caller at a time (the others
// use the map they have).
//
// Failure: the tier degrades exactly as for a dead single node. A slot no node serves, a
// CLUSTERDOWN reply, an unreachable node and a redirect loop are Unavailable (counted as Redis
// errors by the store, which computes instead); connected() is false while any slot is
// unserved, any primary's last command failed, or the last pipeline met CLUSTERDOWN or a
// redirect loop (ctxcache_redis_up 0). CROSSSLOT would be a
// bug in the tier's layout: it comes back as the error reply it is.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cache/redis_router.h"

namespace ctxcache {

inline constexpr int kRedisClusterSlots = 16384;

// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the cluster's key hash.
uint16_t Crc16Xmodem(std::string_view data);
// The key's hash slot: crc16 of the part between the first '{' and the next '}' when that part
// is not empty, else of the whole key; modulo 16384.
int RedisKeySlot(std::string_view key);

// redis-cluster://[user:password@]host:port[,host:port...]: the seed nodes (any subset of the
// cluster; the rest is discovered). Credentials as in redis:// (ParseRedisUrl); no /db (a
// cluster has database 0 only). InvalidArgument naming what is wrong, never the password.
struct RedisClusterUrl {
  std::vector<RedisUrl> seeds;  // each with the credentials, db 0
};
absl::StatusOr<RedisClusterUrl> ParseRedisClusterUrl(std::string_view url);
bool IsRedisClusterUrl(std::string_view url);

// One range of CLUSTER SLOTS: slots [first, last] served by the primary at host:port.
struct RedisSlotRange {
  int first = 0, last = 0;
  std::string host;
  int port = 0;
};
// Parses a CLUSTER SLOTS reply (array of [first, last, [host, port, id, ...], replicas...]).
// An empty host ("" or "?", a node that does not know its address) means the node asked,
// `asked_host`. DataLoss for anything malformed: slots out of range or overlapping, a bad
// port, a missing field. The reply comes from the network and is checked as such (fuzzed).
absl::StatusOr<std::vector<RedisSlotRange>> ParseClusterSlots(const redisReply& reply,
                                                              std::string_view asked_host);

class RedisCluster final : public RedisRouter {
 public:
  static constexpr int kMaxRedirects = 5;
  static constexpr int kTryAgainMs = 20;
  static constexpr int kRefreshIntervalMs = 100;

  // `client` carries pool size, timeouts and backoff for every node's client. No I/O.
  static absl::StatusOr<std::unique_ptr<RedisCluster>> Create(RedisClusterUrl url,
                                                              const RedisClientOptions& client);

  RedisOperationDeadline OperationDeadline(RedisDeadline deadline) const override;
  absl::StatusOr<std::vector<RedisReply>> Pipeline(std::string_view slot_key,
                                                   absl::Span<const RedisArgs> commands,
                                                   RedisOperationDeadline op) override;
  absl::StatusOr<int64_t> Publish(std::string_view channel, std::string_view message,
                                  RedisOperationDeadline op) override;
  absl::Status Ping(RedisDeadline deadline) override;
  std::vector<RedisUrl> SubscribeNodes() const override;
  bool connected() const override;
  std::string endpoint() const override;

  // For tests and operators: slots with no node in the current map, and the primaries in it.
  int UncoveredSlots() const;
  std::vector<std::string> Primaries() const;  // "host:port"

 private:
  RedisCluster(RedisClusterUrl url, const RedisClientOptions& client);

  // The node's client, made on first use (under mu_).
  RedisClient* NodeLocked(const std::string& host, int port) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The client serving `slot` now, or null when no node does.
  RedisClient* ForSlot(int slot);
  // Re-reads the slot map unless another caller is at it or one was read within
  // kRefreshIntervalMs (force: ignore the interval). OK when the map was read.
  absl::Status Refresh(RedisOperationDeadline op, bool force);
  // The client at "host:port" as a MOVED/ASK reply names it (made if new).
  absl::StatusOr<RedisClient*> ForAddress(std::string_view address);

  const RedisClusterUrl url_;
  const RedisClientOptions client_options_;

  mutable absl::Mutex mu_;
  // Node index per slot (-1: unserved); nodes_ only grows (a handful of nodes).
  std::array<int16_t, kRedisClusterSlots> slot_node_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<RedisClient>> nodes_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> node_index_ ABSL_GUARDED_BY(mu_);  // "host:port" -> nodes_
  bool have_map_ ABSL_GUARDED_BY(mu_) = false;
  bool refreshing_ ABSL_GUARDED_BY(mu_) = false;
  // A CLUSTERDOWN or a redirect loop since the last pipeline that completed.
  bool failing_ ABSL_GUARDED_BY(mu_) = false;
  // A node failed since the last map read: the next calls re-read it (rate-limited).
  bool stale_ ABSL_GUARDED_BY(mu_) = false;
  int64_t last_refresh_ms_ ABSL_GUARDED_BY(mu_) = -1000000;
  std::string last_refresh_error_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ctxcache
