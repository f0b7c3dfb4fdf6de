// One-node routing and the router factory (see redis_router.h).
#include "cache/redis_router.h"

#include <hiredis/hiredis.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "cache/redis_cluster.h"

namespace ctxcache {
namespace {

class SingleNodeRouter final : public RedisRouter {
 public:
  SingleNodeRouter(std::unique_ptr<RedisClient> client, RedisUrl url)
      : client_(std::move(client)), url_(std::move(url)) {}

  RedisOperationDeadline OperationDeadline(RedisDeadline deadline) const override {
    return client_->OperationDeadline(deadline);
  }
  absl::StatusOr<std::vector<RedisReply>> Pipeline(std::string_view /*slot_key*/,
                                                   absl::Span<const RedisArgs> commands,
                                                   RedisOperationDeadline op) override {
    return client_->Pipeline(commands, op);
  }
  absl::StatusOr<int64_t> Publish(std::string_view channel, std::string_view message,
                                  RedisOperationDeadline op) override {
    ASSIGN_OR_RETURN(RedisReply reply, client_->Command({"PUBLISH", channel, message}, op));
    if (reply->type != REDIS_REPLY_INTEGER) {
      return absl::InternalError(
          absl::StrCat("redis at ", client_->endpoint(), ": unexpected reply to PUBLISH"));
    }
    return static_cast<int64_t>(reply->integer);
  }
  absl::Status Ping(RedisDeadline deadline) override { return client_->Ping(deadline); }
  std::vector<RedisUrl> SubscribeNodes() const override { return {url_}; }
  bool connected() const override { return client_->connected(); }
  std::string endpoint() const override { return client_->endpoint(); }

 private:
  std::unique_ptr<RedisClient> client_;
  const RedisUrl url_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RedisRouter>> CreateRedisRouter(std::string_view url,
                                                               const RedisClientOptions& client) {
  if (IsRedisClusterUrl(url)) {
    ASSIGN_OR_RETURN(RedisClusterUrl cluster, ParseRedisClusterUrl(url));
    ASSIGN_OR_RETURN(std::unique_ptr<RedisCluster> router,
                     RedisCluster::Create(std::move(cluster), client));
    return std::unique_ptr<RedisRouter>(std::move(router));
  }
  ASSIGN_OR_RETURN(RedisUrl parsed, ParseRedisUrl(url));
  RedisClientOptions options = client;
  options.url = parsed;
  ASSIGN_OR_RETURN(std::unique_ptr<RedisClient> c, RedisClient::Create(options));
  return std::unique_ptr<RedisRouter>(new SingleNodeRouter(std::move(c), std::move(parsed)));
}

}  // namespace ctxcache
