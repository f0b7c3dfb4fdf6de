// Where the Redis tier's commands go: one Redis node (redis://, a RedisClient), or a Redis
// Cluster (redis-cluster://, cache/redis_cluster.h) whose nodes each serve some of the 16384
// hash slots. The tier names, with every pipeline, a key whose hash slot all the pipeline's
// keys share (its layout puts each context's keys under one hash tag); a single node ignores
// it, a cluster sends the pipeline to the node serving that slot and follows redirections.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cache/redis_client.h"
#include "common/status.h"

namespace ctxcache {

class RedisRouter {
 public:
  virtual ~RedisRouter() = default;

  // min(deadline, now + command_timeout_ms) (RedisClient::OperationDeadline).
  virtual RedisOperationDeadline OperationDeadline(RedisDeadline deadline) const = 0;
  // `commands`, all of whose keys hash to the slot of `slot_key`, pipelined to the node that
  // serves it; replies in order. Transport errors as RedisClient::Pipeline; a cluster adds
  // Unavailable for a slot no node serves, CLUSTERDOWN, and redirections that do not settle.
  virtual absl::StatusOr<std::vector<RedisReply>> Pipeline(std::string_view slot_key,
                                                           absl::Span<const RedisArgs> commands,
                                                           RedisOperationDeadline op) = 0;
  absl::StatusOr<RedisReply> Command(std::string_view slot_key, const RedisArgs& args,
                                     RedisOperationDeadline op) {
    ASSIGN_OR_RETURN(std::vector<RedisReply> replies,
                     Pipeline(slot_key, absl::MakeConstSpan(&args, 1), op));
    return std::move(replies[0]);
  }
  // PUBLISH on any node that answers (a cluster forwards a message to every node).
  // The number of subscribers that received it, on that node.
  virtual absl::StatusOr<int64_t> Publish(std::string_view channel, std::string_view message,
                                          RedisOperationDeadline op) = 0;
  // Connects (a cluster: reads the slot map and reaches every primary). For a start-up log.
  virtual absl::Status Ping(RedisDeadline deadline) = 0;
  // The nodes to subscribe on, the preferred first (a cluster: the primaries it knows, then
  // its seeds). Each carries the credentials.
  virtual std::vector<RedisUrl> SubscribeNodes() const = 0;
  // Single node: its last command or connect succeeded. Cluster: every hash slot is served
  // and every primary's last command or connect succeeded.
  virtual bool connected() const = 0;
  // For messages: "host:port/db", or "cluster of N primaries (seeds ...)".
  virtual std::string endpoint() const = 0;
};

// redis:// (one node) or redis-cluster://host:port[,host:port...] (a cluster; see
// ParseRedisClusterUrl). `client` carries pool size, timeouts and backoff (its url is
// ignored). InvalidArgument for a URL neither parser accepts.
absl::StatusOr<std::unique_ptr<RedisRouter>> CreateRedisRouter(std::string_view url,
                                                               const RedisClientOptions& client);

}  // namespace ctxcache
