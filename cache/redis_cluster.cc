// The Redis Cluster client (see redis_cluster.h).
#include "cache/redis_cluster.h"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace ctxcache {
namespace {

// This Debian's Abseil has its own string_view.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr std::string_view kClusterScheme = "redis-cluster://";

int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(RedisClock::now().time_since_epoch())
      .count();
}

std::string ReplyString(const redisReply& r) { return std::string(r.str, r.len); }

std::string Address(std::string_view host, int port) {
  // An IPv6 literal is written without brackets by MOVED/ASK and CLUSTER SLOTS; the last ':'
  // separates the port either way.
  return absl::StrCat(Av(host), ":", port);
}

// "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381": the slot and "host:port".
bool ParseRedirect(std::string_view text, std::string_view kind, int* slot,
                   std::string_view* address) {
  if (!text.starts_with(kind) || text.size() <= kind.size() || text[kind.size()] != ' ') {
    return false;
  }
  const std::vector<absl::string_view> f = absl::StrSplit(Av(text), ' ');
  if (f.size() != 3 || !absl::SimpleAtoi(f[1], slot) || *slot < 0 || *slot >= kRedisClusterSlots ||
      f[2].empty()) {
    return false;
  }
  *address = std::string_view(f[2].data(), f[2].size());
  return true;
}

bool SplitAddress(std::string_view address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  *host = std::string(address.substr(0, colon));
  return absl::SimpleAtoi(Av(address.substr(colon + 1)), port) && *port >= 1 && *port <= 65535;
}

}  // namespace

uint16_t Crc16Xmodem(std::string_view data) {
  uint16_t crc = 0;
  for (unsigned char byte : data) {
    crc ^= static_cast<uint16_t>(byte) << 8;
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 0x8000) != 0 ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                                : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

int RedisKeySlot(std::string_view key) {
  if (const size_t open = key.find('{'); open != std::string_view::npos) {
    if (const size_t close = key.find('}', open + 1);
        close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return Crc16Xmodem(key) & (kRedisClusterSlots - 1);
}

bool IsRedisClusterUrl(std::string_view url) { return url.starts_with(kClusterScheme); }

absl::StatusOr<RedisClusterUrl> ParseRedisClusterUrl(std::string_view url) {
  auto error = [](std::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad redis cluster URL: ", Av(what),
                     " (expected redis-cluster://[user:password@]host:port[,host:port...])"));
  };
  if (!IsRedisClusterUrl(url)) return error("it must start with redis-cluster://");
  std::string_view rest = url.substr(kClusterScheme.size());
  std::string_view userinfo;
  if (const size_t at = rest.rfind('@'); at != std::string_view::npos) {
    userinfo = rest.substr(0, at);
    rest = rest.substr(at + 1);
  }
  if (rest.empty()) return error("no seed node");
  if (rest.find('/') != std::string_view::npos) {
    return error("a cluster has database 0 only: no /db");
  }
  RedisClusterUrl out;
  for (absl::string_view seed_view : absl::StrSplit(Av(rest), ',')) {
    const std::string_view seed(seed_view.data(), seed_view.size());
    if (seed.empty()) return error("an empty seed in the list");
    // Each seed is parsed as the one-node URL it is, so hosts, ports and credentials follow
    // exactly the rules of redis:// (and its messages, which never show the password).
    std::string one = absl::StrCat("redis://", Av(userinfo), userinfo.empty() ? "" : "@", Av(seed));
    absl::StatusOr<RedisUrl> parsed = ParseRedisUrl(one);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("bad redis cluster URL, seed \"", Av(seed),
                                                     "\": ", parsed.status().message()));
    }
    out.seeds.push_back(*std::move(parsed));
  }
  if (out.seeds.size() > 64) return error("more than 64 seeds");
  return out;
}

absl::StatusOr<std::vector<RedisSlotRange>> ParseClusterSlots(const redisReply& reply,
                                                              std::string_view asked_host) {
  auto bad = [](std::string_view what) {
    return absl::DataLossError(absl::StrCat("unreadable CLUSTER SLOTS reply: ", Av(what)));
  };
  if (reply.type == REDIS_REPLY_ERROR) {
    return absl::UnavailableError(absl::StrCat("CLUSTER SLOTS refused: ", ReplyString(reply)));
  }
  if (reply.type != REDIS_REPLY_ARRAY) return bad("not an array");
  std::vector<RedisSlotRange> ranges;
  for (size_t i = 0; i < reply.elements; ++i) {
    const redisReply& e = *reply.element[i];
    if (e.type != REDIS_REPLY_ARRAY || e.elements < 3 ||
        e.element[0]->type != REDIS_REPLY_INTEGER || e.element[1]->type != REDIS_REPLY_INTEGER ||
        e.element[2]->type != REDIS_REPLY_ARRAY || e.element[2]->elements < 2) {
      return bad(absl::StrCat("range ", i, " is not [first, last, [host, port, ...], ...]"));
    }
    RedisSlotRange r;
    const long long first = e.element[0]->integer, last = e.element[1]->integer;
    if (first < 0 || last < first || last >= kRedisClusterSlots) {
      return bad(absl::StrCat("range ", i, " has slots ", first, "..", last));
    }
    r.first = static_cast<int>(first);
    r.last = static_cast<int>(last);
    const redisReply& node = *e.element[2];
    const redisReply& host = *node.element[0];
    const redisReply& port = *node.element[1];
    if (host.type != REDIS_REPLY_STRING || port.type != REDIS_REPLY_INTEGER || port.integer < 1 ||
        port.integer > 65535) {
      return bad(absl::StrCat("range ", i, " names no host and port"));
    }
    r.host = ReplyString(host);
    if (r.host.empty() || r.host == "?") r.host = std::string(asked_host);
    if (r.host.size() > 255 || r.host.find_first_of(" \r\n") != std::string::npos) {
      return bad(absl::StrCat("range ", i, " has a bad host"));
    }
    r.port = static_cast<int>(port.integer);
    ranges.push_back(std::move(r));
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const RedisSlotRange& a, const RedisSlotRange& b) { return a.first < b.first; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first <= ranges[i - 1].last) {
      return bad(absl::StrCat("slot ranges overlap at slot ", ranges[i].first));
    }
  }
  return ranges;
}

RedisCluster::RedisCluster(RedisClusterUrl url, const RedisClientOptions& client)
    : url_(std::move(url)), client_options_(client) {
  slot_node_.fill(-1);
}

absl::StatusOr<std::unique_ptr<RedisCluster>> RedisCluster::Create(
    RedisClusterUrl url, const RedisClientOptions& client) {
  if (url.seeds.empty()) return absl::InvalidArgumentError("redis cluster: no seed node");
  // Validates the client options once, for a clear error at start.
  RedisClientOptions probe = client;
  probe.url = url.seeds[0];
  RETURN_IF_ERROR(RedisClient::Create(probe).status());
  return std::unique_ptr<RedisCluster>(new RedisCluster(std::move(url), client));
}

RedisOperationDeadline RedisCluster::OperationDeadline(RedisDeadline deadline) const {
  const RedisDeadline by_timeout =
      RedisClock::now() + std::chrono::milliseconds(client_options_.command_timeout_ms);
  return deadline < by_timeout ? RedisOperationDeadline{deadline, false}
                               : RedisOperationDeadline{by_timeout, true};
}

RedisClient* RedisCluster::NodeLocked(const std::string& host, int port) {
  const std::string address = Address(host, port);
  if (auto it = node_index_.find(address); it != node_index_.end()) {
    return nodes_[it->second].get();
  }
  if (nodes_.size() >= 1000) return nullptr;  // a map naming more nodes than any cluster has
  RedisClientOptions options = client_options_;
  options.url = url_.seeds[0];  // the credentials
  options.url.host = host;
  options.url.port = port;
  options.url.db = 0;
  absl::StatusOr<std::unique_ptr<RedisClient>> client = RedisClient::Create(options);
  if (!client.ok()) return nullptr;
  node_index_[address] = static_cast<int>(nodes_.size());
  nodes_.push_back(*std::move(client));
  return nodes_.back().get();
}

RedisClient* RedisCluster::ForSlot(int slot) {
  absl::MutexLock lock(&mu_);
  const int node = slot_node_[slot];
  return node < 0 ? nullptr : nodes_[node].get();
}

absl::StatusOr<RedisClient*> RedisCluster::ForAddress(std::string_view address) {
  std::string host;
  int port = 0;
  if (!SplitAddress(address, &host, &port)) {
    return absl::UnavailableError(
        absl::StrCat("redis cluster: redirected to an unreadable address \"", Av(address), "\""));
  }
  absl::MutexLock lock(&mu_);
  RedisClient* client = NodeLocked(host, port);
  if (client == nullptr) return absl::UnavailableError("redis cluster: too many nodes");
  return client;
}

absl::Status RedisCluster::Refresh(RedisOperationDeadline op, bool force) {
  // Nodes to ask: those that answered last first, then the others, then the seeds.
  std::vector<std::pair<RedisClient*, std::string>> ask;
  {
    absl::MutexLock lock(&mu_);
    const int64_t now = SteadyMs();
    if (refreshing_ || (!force && now - last_refresh_ms_ < kRefreshIntervalMs)) {
      return absl::OkStatus();
    }
    refreshing_ = true;
    last_refresh_ms_ = now;
    for (const RedisUrl& seed : url_.seeds) NodeLocked(seed.host, seed.port);
    std::vector<std::pair<RedisClient*, std::string>> down;
    for (const auto& [address, index] : node_index_) {
      RedisClient* c = nodes_[index].get();
      const std::string host = address.substr(0, address.rfind(':'));
      (c->connected() ? ask : down).emplace_back(c, host);
    }
    ask.insert(ask.end(), down.begin(), down.end());
  }
  absl::Status status = absl::UnavailableError("redis cluster: no node to ask for the slot map");
  std::vector<RedisSlotRange> ranges;
  for (const auto& [client, host] : ask) {
    if (RedisClock::now() >= op.at) {
      status = absl::DeadlineExceededError(absl::StrCat(
          "redis cluster: no time left to read the slot map (last error: ", status.message(), ")"));
      break;
    }
    absl::StatusOr<RedisReply> reply = client->Command({"CLUSTER", "SLOTS"}, op);
    if (!reply.ok()) {
      status = reply.status();
      if (!CurrentRedisStop().ok()) break;
      continue;
    }
    absl::StatusOr<std::vector<RedisSlotRange>> parsed = ParseClusterSlots(**reply, host);
    if (!parsed.ok()) {
      status = absl::Status(parsed.status().code(), absl::StrCat("redis at ", client->endpoint(),
                                                                 ": ", parsed.status().message()));
      continue;
    }
    ranges = *std::move(parsed);
    status = absl::OkStatus();
    break;
  }
  absl::MutexLock lock(&mu_);
  refreshing_ = false;
  if (!status.ok()) {
    last_refresh_error_ = std::string(status.message());
    return status;
  }
  slot_node_.fill(-1);
  for (const RedisSlotRange& r : ranges) {
    RedisClient* c = NodeLocked(r.host, r.port);
    if (c == nullptr) continue;
    const int16_t index = static_cast<int16_t>(node_index_[Address(r.host, r.port)]);
    std::fill(slot_node_.begin() + r.first, slot_node_.begin() + r.last + 1, index);
  }
  have_map_ = true;
  stale_ = false;
  last_refresh_error_.clear();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<RedisReply>> RedisCluster::Pipeline(std::string_view slot_key,
                                                               absl::Span<const RedisArgs> commands,
                                                               RedisOperationDeadline op) {
  const int slot = RedisKeySlot(slot_key);
  bool stale = false;
  {
    absl::MutexLock lock(&mu_);
    stale = stale_;
  }
  // A node failed lately: its slots may have moved to a promoted replica (rate-limited).
  if (stale) Refresh(op, /*force=*/false).IgnoreError();
  RedisClient* node = ForSlot(slot);
  if (node == nullptr) {
    const absl::Status refreshed = Refresh(op, /*force=*/false);
    node = ForSlot(slot);
    if (node == nullptr) {
      absl::MutexLock lock(&mu_);
      return absl::UnavailableError(absl::StrCat(
          "redis cluster: hash slot ", slot, " is served by no node",
          !refreshed.ok()
              ? absl::StrCat(" (the slot map could not be read: ", refreshed.message(), ")")
          : have_map_ ? " (the cluster does not cover every slot)"
                      : ""));
    }
  }
  // Commands still to send, grouped by the node they go to and whether ASKING precedes them.
  struct Batch {
    RedisClient* node;
    bool asking;
    std::vector<size_t> commands;
  };
  std::vector<RedisReply> replies(commands.size());
  std::vector<Batch> batches = {{node, false, {}}};
  for (size_t i = 0; i < commands.size(); ++i) batches[0].commands.push_back(i);
  // MOVED and ASK hops are counted; TRYAGAIN rounds are bounded by the deadline alone.
  for (int redirects = 0; !batches.empty();) {
    if (redirects > kMaxRedirects) {
      {
        absl::MutexLock lock(&mu_);
        failing_ = true;
      }
      return absl::UnavailableError(
          absl::StrCat("redis cluster: hash slot ", slot, " still redirected after ", kMaxRedirects,
                       " hops (a redirect loop, or a slot migration that did not settle)"));
    }
    std::vector<Batch> next;
    bool try_again = false, moved = false, asked = false;
    auto add = [&next](RedisClient* to, bool asking, size_t i) {
      for (Batch& b : next) {
        if (b.node == to && b.asking == asking) {
          b.commands.push_back(i);
          return;
        }
      }
      next.push_back(Batch{to, asking, {i}});
    };
    for (const Batch& b : batches) {
      std::vector<RedisArgs> sent;
      sent.reserve(b.commands.size() * (b.asking ? 2 : 1));
      for (size_t i : b.commands) {
        if (b.asking) sent.push_back({"ASKING"});
        sent.push_back(commands[i]);
      }
      absl::StatusOr<std::vector<RedisReply>> got = b.node->Pipeline(sent, op);
      if (!got.ok()) {
        // The node may have failed over: the next calls re-read the map (rate-limited) until
        // a read succeeds.
        if (CurrentRedisStop().ok()) {
          absl::MutexLock lock(&mu_);
          stale_ = true;
        }
        return got.status();
      }
      size_t r = 0;
      for (size_t i : b.commands) {
        if (b.asking) ++r;  // ASKING's +OK
        RedisReply reply = std::move((*got)[r++]);
        if (reply->type != REDIS_REPLY_ERROR) {
          replies[i] = std::move(reply);
          continue;
        }
        const std::string text = ReplyString(*reply);
        int redirect_slot = 0;
        std::string_view address;
        if (ParseRedirect(text, "MOVED", &redirect_slot, &address)) {
          ASSIGN_OR_RETURN(RedisClient * to, ForAddress(address));
          {
            absl::MutexLock lock(&mu_);
            slot_node_[redirect_slot] = static_cast<int16_t>(node_index_[std::string(address)]);
          }
          moved = true;
          add(to, false, i);
        } else if (ParseRedirect(text, "ASK", &redirect_slot, &address)) {
          ASSIGN_OR_RETURN(RedisClient * to, ForAddress(address));
          asked = true;
          add(to, true, i);
        } else if (absl::StartsWith(text, "TRYAGAIN")) {
          try_again = true;
          add(b.node, b.asking, i);
        } else if (absl::StartsWith(text, "CLUSTERDOWN")) {
          {
            absl::MutexLock lock(&mu_);
            failing_ = true;
          }
          // "Hash slot not served" is news about the map: the next calls should know it.
          Refresh(op, /*force=*/false).IgnoreError();
          return absl::UnavailableError(
              absl::StrCat("redis cluster at ", b.node->endpoint(), " is down: ", text));
        } else {
          replies[i] = std::move(reply);  // the caller judges other error replies
        }
      }
    }
    if (moved || asked) ++redirects;
    if (moved) Refresh(op, /*force=*/false).IgnoreError();
    if (try_again) {
      // Another round needs its wait and a round trip before the deadline; one started with
      // too little time left would time out in the node's client, which would take the node
      // for slow (backoff) when only the migration is.
      const auto wake = RedisClock::now() + std::chrono::milliseconds(kTryAgainMs);
      if (wake + std::chrono::milliseconds(kTryAgainMs) >= op.at) {
        return absl::DeadlineExceededError(absl::StrCat(
            "redis cluster: hash slot ", slot,
            " is being migrated and its keys were still split between two nodes at the "
            "operation's deadline (TRYAGAIN)"));
      }
      std::this_thread::sleep_until(wake);
      RETURN_IF_ERROR(CurrentRedisStop());
    }
    batches = std::move(next);
  }
  {
    absl::MutexLock lock(&mu_);
    failing_ = false;
  }
  return replies;
}

absl::StatusOr<int64_t> RedisCluster::Publish(std::string_view channel, std::string_view message,
                                              RedisOperationDeadline op) {
  // The channel's slot's node first (any node would do: the cluster bus forwards the message
  // to every node), then any other, so that one node down does not silence announcements.
  std::vector<RedisClient*> order;
  if (RedisClient* first = ForSlot(RedisKeySlot(channel))) order.push_back(first);
  {
    absl::MutexLock lock(&mu_);
    for (const auto& n : nodes_) {
      if (std::find(order.begin(), order.end(), n.get()) == order.end()) order.push_back(n.get());
    }
  }
  absl::Status status = absl::UnavailableError("redis cluster: no node known to publish on");
  for (RedisClient* node : order) {
    absl::StatusOr<RedisReply> reply = node->Command({"PUBLISH", channel, message}, op);
    if (!reply.ok()) {
      status = reply.status();
      if (!CurrentRedisStop().ok() || RedisClock::now() >= op.at) break;
      continue;
    }
    if ((*reply)->type != REDIS_REPLY_INTEGER) {
      status = absl::InternalError(
          absl::StrCat("redis at ", node->endpoint(), ": unexpected reply to PUBLISH"));
      continue;
    }
    return static_cast<int64_t>((*reply)->integer);
  }
  return status;
}

absl::Status RedisCluster::Ping(RedisDeadline deadline) {
  const RedisOperationDeadline op = OperationDeadline(deadline);
  RETURN_IF_ERROR(Refresh(op, /*force=*/true));
  if (const int uncovered = UncoveredSlots(); uncovered > 0) {
    return absl::UnavailableError(
        absl::StrCat("redis cluster: ", uncovered, " of ", kRedisClusterSlots,
                     " hash slots are served by no node (cluster incomplete)"));
  }
  std::vector<RedisClient*> primaries;
  {
    absl::MutexLock lock(&mu_);
    std::set<int> seen(slot_node_.begin(), slot_node_.end());
    for (int n : seen) primaries.push_back(nodes_[n].get());
  }
  for (RedisClient* c : primaries) RETURN_IF_ERROR(c->Ping(deadline));
  return absl::OkStatus();
}

std::vector<RedisUrl> RedisCluster::SubscribeNodes() const {
  std::vector<RedisUrl> out;
  absl::MutexLock lock(&mu_);
  std::set<int> primaries(slot_node_.begin(), slot_node_.end());
  primaries.erase(-1);
  auto add = [&out](const RedisUrl& u) {
    for (const RedisUrl& o : out) {
      if (o.host == u.host && o.port == u.port) return;
    }
    out.push_back(u);
  };
  for (int n : primaries) {
    RedisUrl u = url_.seeds[0];
    const std::string address = [&] {
      for (const auto& [a, i] : node_index_) {
        if (i == n) return a;
      }
      return std::string();
    }();
    std::string host;
    int port = 0;
    if (!SplitAddress(address, &host, &port)) continue;
    u.host = host;
    u.port = port;
    u.db = 0;
    add(u);
  }
  for (const RedisUrl& seed : url_.seeds) add(seed);
  return out;
}

int RedisCluster::UncoveredSlots() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(std::count(slot_node_.begin(), slot_node_.end(), -1));
}

std::vector<std::string> RedisCluster::Primaries() const {
  absl::MutexLock lock(&mu_);
  std::set<int> seen(slot_node_.begin(), slot_node_.end());
  std::vector<std::string> out;
  for (const auto& [address, index] : node_index_) {
    if (seen.count(index) > 0) out.push_back(address);
  }
  return out;
}

bool RedisCluster::connected() const {
  absl::MutexLock lock(&mu_);
  if (!have_map_ || failing_) return false;
  std::set<int> seen(slot_node_.begin(), slot_node_.end());
  if (seen.count(-1) > 0) return false;
  for (int n : seen) {
    if (!nodes_[n]->connected()) return false;
  }
  return true;
}

std::string RedisCluster::endpoint() const {
  std::vector<std::string> seeds;
  for (const RedisUrl& s : url_.seeds) seeds.push_back(Address(s.host, s.port));
  const std::vector<std::string> primaries = Primaries();
  return absl::StrCat("redis cluster of ", primaries.size(), " primaries (seeds ",
                      absl::StrJoin(seeds, ","), ")");
}

}  // namespace ctxcache
