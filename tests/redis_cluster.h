// A real Redis Cluster on loopback for integration tests, built from tests/redis_server.h:
// every node is a RedisServer (fork/exec, dies with the test, no persistence) started in
// cluster mode, and the cluster is formed with plain commands over hiredis (CLUSTER
// SET-CONFIG-EPOCH, ADDSLOTSRANGE, MEET, REPLICATE), not with redis-cli. Tests can kill and
// restart nodes (a restarted node keeps its identity through its nodes.conf and rejoins),
// wait for a replica's failover, move a slot with the real protocol step by step (to act
// while it is half moved, when the source answers ASK), and unassign a slot.
//
// Layout: nodes 0..primaries-1 are the primaries, with the hash slots split evenly in
// order (node 0 has 0..5460 of 3); then the replicas, primary p's being nodes
// primaries + p * replicas_per_primary + r.
//
// Each node has its own cluster bus port (--cluster-port, picked free), so client ports
// are not limited to 55535 by the port + 10000 rule, and its own directory under the
// cluster's temporary directory (--dir, which overrides RedisServer's, so nodes.conf and
// any replication files outlive Kill() and are removed with the cluster; RedisServer's own
// directory keeps only the log).
//
// Every wait is bounded and polls; every failure is a sentence for a test failure message.
//
// Named LocalRedisCluster because ctxcache::RedisCluster is the client under test
// (cache/redis_cluster.h); KeySlotForTest is written independently of its slot function so
// that tests can check one against the other.
//
// Redis 7.0 behaviour worth knowing when writing tests:
//  - A primary reports cluster_state:ok no sooner than 2 s after it started (a fixed
//    CLUSTER_WRITABLE_DELAY), so Start() takes about 2 s whatever the size.
//  - CLUSTER SLOTS and MOVED give the IP a node learned from a MEET it received: 127.0.0.1
//    here, but "" from a lone node (primaries = 1, no replicas) for itself; clients should
//    then use the address they asked.
//  - CLUSTER SLOTS (and CLUSTER SHARDS, as health "loading") hide a replica whose replication
//    offset is still 0; nodes here PING their replicas every second so that does not last.
//  - Failover after a SIGKILL takes node_timeout (suspicion) + ~0.5-1 s (election delay):
//    about 2.5 s with node_timeout_ms 1000, 1.7 s with 500.
#pragma once

#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "tests/redis_server.h"

namespace ctxcache::testing {

inline constexpr int kClusterSlots = 16384;

// CRC16-CCITT (XMODEM): poly 0x1021, init 0, no reflection, no final xor.
inline uint16_t Crc16XmodemForTest(std::string_view data) {
  uint16_t crc = 0;
  for (const char ch : data) {
    crc ^= static_cast<uint16_t>(static_cast<uint8_t>(ch)) << 8;
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 0x8000) != 0 ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                                : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

// The hash slot of a key: crc16 of the hash tag (what lies between the first '{' and the
// next '}', when that is not empty), else of the whole key, mod 16384.
inline int KeySlotForTest(std::string_view key) {
  const size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return Crc16XmodemForTest(key) & (kClusterSlots - 1);
}

// A hash tag whose keys ("{tag}anything") all hash to `slot`: "t<n>" for the first n that
// fits. "" for a slot out of range.
inline std::string HashTagForSlotForTest(int slot) {
  if (slot < 0 || slot >= kClusterSlots) return "";
  for (int n = 0; n < (1 << 24); ++n) {
    // snprintf, not "t" + std::to_string(n): GCC 12 at -O3 warns (-Werror=restrict) on that.
    char tag[16];
    std::snprintf(tag, sizeof(tag), "t%d", n);
    if (KeySlotForTest(tag) == slot) return tag;
  }
  return "";
}

namespace cluster_detail {

using Clock = std::chrono::steady_clock;

struct ReplyFree {
  void operator()(redisReply* r) const {
    if (r != nullptr) freeReplyObject(r);
  }
};
using Reply = std::unique_ptr<redisReply, ReplyFree>;
struct ContextFree {
  void operator()(redisContext* c) const {
    if (c != nullptr) redisFree(c);
  }
};
using Context = std::unique_ptr<redisContext, ContextFree>;

inline std::string Join(const std::vector<std::string>& args) {
  std::string out;
  for (const std::string& a : args) {
    if (!out.empty()) out += ' ';
    out += a.empty() ? "\"\"" : a;
  }
  return out;
}

inline long long ElapsedMs(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count();
}

inline Context ConnectLoopback(int port, int timeout_ms, std::string* error) {
  const timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  Context c(redisConnectWithTimeout("127.0.0.1", port, tv));
  if (c == nullptr) {
    *error = "cannot allocate a hiredis context";
    return nullptr;
  }
  if (c->err != 0) {
    *error = "connect to 127.0.0.1:" + std::to_string(port) + ": " + c->errstr;
    return nullptr;
  }
  redisSetTimeout(c.get(), tv);
  return c;
}

// Sends one command; nullptr (and *error) on an I/O error or timeout, else the reply, which
// may be an error reply.
inline Reply RunArgv(redisContext* c, const std::vector<std::string>& args, std::string* error) {
  std::vector<const char*> argv;
  std::vector<size_t> lens;
  for (const std::string& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  Reply r(static_cast<redisReply*>(
      redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data())));
  if (r == nullptr) {
    *error = std::string("I/O error: ") + (c->errstr[0] != '\0' ? c->errstr : "no reply");
  }
  return r;
}

// redis-cli's style: strings as they are, "(error) ...", "(integer) n", "(nil)", "[a, b]".
inline std::string FormatReply(const redisReply* r) {
  if (r == nullptr) return "(no reply)";
  switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
      return std::string(r->str, r->len);
    case REDIS_REPLY_ERROR:
      return "(error) " + std::string(r->str, r->len);
    case REDIS_REPLY_INTEGER:
      return "(integer) " + std::to_string(r->integer);
    case REDIS_REPLY_NIL:
      return "(nil)";
    case REDIS_REPLY_ARRAY: {
      std::string out = "[";
      for (size_t i = 0; i < r->elements; ++i) {
        if (i > 0) out += ", ";
        out += FormatReply(r->element[i]);
      }
      return out + "]";
    }
    default:
      return "(reply type " + std::to_string(r->type) + ")";
  }
}

// "field:value" out of an INFO or CLUSTER INFO text; "" when absent.
inline std::string InfoField(const std::string& text, const std::string& field) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.size() > field.size() && line.compare(0, field.size(), field) == 0 &&
        line[field.size()] == ':') {
      return line.substr(field.size() + 1);
    }
  }
  return "";
}

// One range of CLUSTER SLOTS: [start, end, [host, port, id, ...] (primary), replicas...].
struct SlotRange {
  int start = 0;
  int end = 0;
  std::string primary_host;
  int primary_port = -1;
  std::string primary_id;
  std::vector<std::string> replicas;  // "host:port", sorted
};

inline bool ParseSlots(const redisReply* r, std::vector<SlotRange>* out, std::string* error) {
  out->clear();
  if (r == nullptr || r->type != REDIS_REPLY_ARRAY) {
    *error = "CLUSTER SLOTS: not an array: " + FormatReply(r);
    return false;
  }
  for (size_t i = 0; i < r->elements; ++i) {
    const redisReply* e = r->element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
        e->element[0]->type != REDIS_REPLY_INTEGER || e->element[1]->type != REDIS_REPLY_INTEGER) {
      *error = "CLUSTER SLOTS: unexpected entry " + FormatReply(e);
      return false;
    }
    SlotRange range;
    range.start = static_cast<int>(e->element[0]->integer);
    range.end = static_cast<int>(e->element[1]->integer);
    for (size_t n = 2; n < e->elements; ++n) {
      const redisReply* node = e->element[n];
      if (node->type != REDIS_REPLY_ARRAY || node->elements < 2 ||
          node->element[0]->type != REDIS_REPLY_STRING ||
          node->element[1]->type != REDIS_REPLY_INTEGER) {
        *error = "CLUSTER SLOTS: unexpected node " + FormatReply(node);
        return false;
      }
      const std::string host(node->element[0]->str, node->element[0]->len);
      const int port = static_cast<int>(node->element[1]->integer);
      if (n == 2) {
        range.primary_host = host;
        range.primary_port = port;
        if (node->elements >= 3 && node->element[2]->type == REDIS_REPLY_STRING) {
          range.primary_id.assign(node->element[2]->str, node->element[2]->len);
        }
      } else {
        range.replicas.push_back(host + ":" + std::to_string(port));
      }
    }
    std::sort(range.replicas.begin(), range.replicas.end());
    out->push_back(std::move(range));
  }
  std::sort(out->begin(), out->end(),
            [](const SlotRange& a, const SlotRange& b) { return a.start < b.start; });
  return true;
}

// "0-5460 127.0.0.1:7000 (replicas 127.0.0.1:7003); ..." independent of the reply's order.
inline std::string CanonicalSlots(const std::vector<SlotRange>& slots) {
  std::string out;
  for (const SlotRange& s : slots) {
    if (!out.empty()) out += "; ";
    out += std::to_string(s.start) + "-" + std::to_string(s.end) + " " + s.primary_host + ":" +
           std::to_string(s.primary_port);
    if (!s.replicas.empty()) {
      out += " (replicas";
      for (const std::string& r : s.replicas) out += " " + r;
      out += ")";
    }
  }
  return out.empty() ? "(no slots assigned)" : out;
}

// One line of CLUSTER NODES: id addr flags master ping pong epoch link slots...
struct NodeEntry {
  std::string id;
  std::string addr;  // ip:port@cport[,hostname]
  std::string flags;
  std::string master;  // "-" for a primary
  std::string link;    // connected / disconnected
  bool Has(std::string_view flag) const {
    std::istringstream in(flags);
    for (std::string f; std::getline(in, f, ',');) {
      if (f == flag) return true;
    }
    return false;
  }
};

inline std::vector<NodeEntry> ParseNodes(const std::string& text) {
  std::vector<NodeEntry> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    NodeEntry e;
    std::string ping, pong, epoch;
    if (fields >> e.id >> e.addr >> e.flags >> e.master >> ping >> pong >> epoch >> e.link) {
      out.push_back(std::move(e));
    }
  }
  return out;
}

}  // namespace cluster_detail

struct LocalRedisClusterOptions {
  int primaries = 3;
  int replicas_per_primary = 0;
  // cluster-node-timeout: a node unreachable this long is suspected (PFAIL), and a failover
  // follows about a second later. Small values make failover tests fast.
  int node_timeout_ms = 1000;
  // cluster-require-full-coverage: with false, a cluster with an unassigned slot (DelSlot)
  // keeps serving the others instead of answering CLUSTERDOWN everywhere.
  bool require_full_coverage = true;
  // More redis-server options for every node.
  std::vector<std::string> extra_args;
  // Bound on Start()'s wait for the formed cluster to be healthy.
  int start_timeout_ms = 20000;
};

// Nodes are RedisServer processes, which die with the thread that started them
// (PR_SET_PDEATHSIG): call Start() and Restart() from a thread that outlives the nodes.
class LocalRedisCluster {
 public:
  LocalRedisCluster(std::string redis_server_binary, int primaries, int replicas_per_primary = 0,
                    int node_timeout_ms = 1000)
      : LocalRedisCluster(std::move(redis_server_binary), [&] {
          LocalRedisClusterOptions o;
          o.primaries = primaries;
          o.replicas_per_primary = replicas_per_primary;
          o.node_timeout_ms = node_timeout_ms;
          return o;
        }()) {}
  LocalRedisCluster(std::string redis_server_binary, LocalRedisClusterOptions options)
      : binary_(std::move(redis_server_binary)), options_(std::move(options)) {}
  ~LocalRedisCluster() {
    nodes_.clear();  // each RedisServer kills (and reaps) its process
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }
  LocalRedisCluster(const LocalRedisCluster&) = delete;
  LocalRedisCluster& operator=(const LocalRedisCluster&) = delete;

  // Starts every node, forms the cluster (slots split evenly among the primaries, replicas
  // attached) and waits until it is healthy (WaitHealthy). "" on success, else why not,
  // with the tails of the nodes' logs.
  std::string Start() {
    if (!nodes_.empty()) return "LocalRedisCluster::Start: already started";
    const int primaries = options_.primaries;
    const int replicas = options_.replicas_per_primary;
    if (primaries < 1 || replicas < 0 || options_.node_timeout_ms < 1) {
      return "LocalRedisCluster::Start: bad options: primaries " + std::to_string(primaries) +
             ", replicas_per_primary " + std::to_string(replicas) + ", node_timeout_ms " +
             std::to_string(options_.node_timeout_ms);
    }
    char tmpl[] = "/tmp/ctxcache-rcluster-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      return std::string("LocalRedisCluster::Start: mkdtemp: ") + std::strerror(errno);
    }
    dir_ = tmpl;
    const int n = primaries * (1 + replicas);
    nodes_.resize(n);
    bus_ports_.assign(n, -1);
    ids_.assign(n, "");
    killed_slots_.assign(n, {});
    killed_replicas_.assign(n, {});
    for (int i = 0; i < n; ++i) {
      if (std::string e = StartNewNode(i); !e.empty()) return e + FailureContext();
    }
    // Identities, distinct config epochs (as redis-cli does, so that no epoch collision has
    // to be resolved), and the slots, all before the nodes know each other.
    for (int i = 0; i < n; ++i) {
      const std::string id = Command(i, {"CLUSTER", "MYID"});
      if (id.size() != 40) {
        return "LocalRedisCluster::Start: CLUSTER MYID on node " + std::to_string(i) +
               " answered " + id + FailureContext();
      }
      ids_[i] = id;
      if (std::string e = CommandOk(i, {"CLUSTER", "SET-CONFIG-EPOCH", std::to_string(i + 1)});
          !e.empty()) {
        return "LocalRedisCluster::Start: " + e + FailureContext();
      }
    }
    for (int p = 0; p < primaries; ++p) {
      const int first = static_cast<int>(static_cast<long long>(p) * kClusterSlots / primaries);
      const int last =
          static_cast<int>(static_cast<long long>(p + 1) * kClusterSlots / primaries) - 1;
      if (std::string e = CommandOk(
              p, {"CLUSTER", "ADDSLOTSRANGE", std::to_string(first), std::to_string(last)});
          !e.empty()) {
        return "LocalRedisCluster::Start: " + e + FailureContext();
      }
    }
    // Node 0 meets everyone; node 1 also meets node 0, so that node 0 too surely receives a
    // MEET, which is how a node learns its own IP.
    for (int i = 1; i < n; ++i) {
      if (std::string e = Meet(0, i); !e.empty()) return "LocalRedisCluster::Start: " + e;
    }
    if (n > 1) {
      if (std::string e = Meet(1, 0); !e.empty()) return "LocalRedisCluster::Start: " + e;
    }
    const auto deadline =
        cluster_detail::Clock::now() + std::chrono::milliseconds(options_.start_timeout_ms);
    if (std::string e = WaitUntil("every node to know every other (after CLUSTER MEET)", deadline,
                                  [&] { return CheckAllKnown(); });
        !e.empty()) {
      return "LocalRedisCluster::Start: " + e + FailureContext();
    }
    for (int p = 0; p < primaries; ++p) {
      for (int r = 0; r < replicas; ++r) {
        const int replica = primaries + p * replicas + r;
        // Retried: a node can briefly not know the primary as a primary yet.
        std::string last;
        const std::string e =
            WaitUntil("CLUSTER REPLICATE on node " + std::to_string(replica), deadline, [&] {
              last = CommandOk(replica, {"CLUSTER", "REPLICATE", ids_[p]});
              return last;
            });
        if (!e.empty()) return "LocalRedisCluster::Start: " + e + FailureContext();
      }
    }
    if (std::string e = WaitHealthyUntil(deadline); !e.empty()) {
      return "LocalRedisCluster::Start: " + e + FailureContext();
    }
    return "";
  }

  // "redis-cluster://127.0.0.1:p0,127.0.0.1:p1,..." with every node, in node order.
  std::string SeedUrl() const {
    std::string url = "redis-cluster://";
    for (int i = 0; i < nodes(); ++i) {
      if (i > 0) url += ",";
      url += "127.0.0.1:" + std::to_string(port(i));
    }
    return url;
  }

  int nodes() const { return static_cast<int>(nodes_.size()); }
  int primaries() const { return options_.primaries; }
  int port(int i) const { return Valid(i) ? nodes_[i]->port() : -1; }
  int bus_port(int i) const { return Valid(i) ? bus_ports_[i] : -1; }
  // The node's 40-hex id; it survives Restart().
  std::string node_id(int i) const { return Valid(i) ? ids_[i] : ""; }
  bool running(int i) const { return Valid(i) && nodes_[i]->running(); }
  RedisServer& server(int i) { return *nodes_.at(i); }
  // The node index listening on `port`, or -1.
  int NodeForPort(int port) const {
    for (int i = 0; i < nodes(); ++i) {
      if (this->port(i) == port) return i;
    }
    return -1;
  }
  int NodeForId(const std::string& id) const {
    for (int i = 0; i < nodes(); ++i) {
      if (ids_[i] == id) return i;
    }
    return -1;
  }
  // The layout Start() built: the replicas of primary p, and the primary of replica i (-1 for
  // a primary). Failovers and restarts change roles; these do not.
  std::vector<int> InitialReplicasOf(int p) const {
    std::vector<int> out;
    if (p < 0 || p >= options_.primaries) return out;
    for (int r = 0; r < options_.replicas_per_primary; ++r) {
      out.push_back(options_.primaries + p * options_.replicas_per_primary + r);
    }
    return out;
  }
  int InitialPrimaryOf(int i) const {
    if (i < options_.primaries || i >= nodes() || options_.replicas_per_primary == 0) return -1;
    return (i - options_.primaries) / options_.replicas_per_primary;
  }

  // The node serving `slot` now, by the CLUSTER SLOTS of the first live node that answers;
  // -1 when the slot is unassigned, its owner is not one of ours, or no node answers.
  int PrimaryForSlot(int slot) const {
    for (int i = 0; i < nodes(); ++i) {
      if (!running(i)) continue;
      std::vector<cluster_detail::SlotRange> slots;
      std::string error;
      if (!ReadSlots(i, &slots, &error)) continue;
      for (const auto& r : slots) {
        if (slot >= r.start && slot <= r.end) return NodeForPort(r.primary_port);
      }
      return -1;
    }
    return -1;
  }
  // The slot ranges node i serves as a primary, by the first live node's view.
  std::vector<std::pair<int, int>> SlotRangesOf(int i) const {
    std::vector<std::pair<int, int>> out;
    for (int j = 0; j < nodes(); ++j) {
      if (!running(j)) continue;
      std::vector<cluster_detail::SlotRange> slots;
      std::string error;
      if (!ReadSlots(j, &slots, &error)) continue;
      for (const auto& r : slots) {
        if (r.primary_port == port(i)) out.emplace_back(r.start, r.end);
      }
      break;
    }
    return out;
  }

  // SIGKILL node i (no goodbye to clients or the cluster). It first records which slots the
  // node served and which nodes replicated it, for WaitFailover. Idempotent.
  void Kill(int i) {
    if (!running(i)) return;
    std::vector<cluster_detail::SlotRange> slots;
    std::string error;
    killed_slots_[i].clear();
    killed_replicas_[i].clear();
    if (ReadSlots(i, &slots, &error)) {
      for (const auto& r : slots) {
        if (r.primary_port == port(i)) killed_slots_[i].emplace_back(r.start, r.end);
      }
    }
    std::string nodes_text;
    if (ReadText(i, {"CLUSTER", "NODES"}, &nodes_text, &error)) {
      for (const auto& e : cluster_detail::ParseNodes(nodes_text)) {
        if (e.master == ids_[i]) killed_replicas_[i].push_back(NodeForId(e.id));
      }
    }
    nodes_[i]->Kill();
  }
  // Starts a killed node again on the same ports and nodes.conf: it rejoins with its old
  // identity (a failed-over primary comes back as a replica of its successor). Returns once
  // it answers PING; WaitHealthy waits for the cluster to settle.
  std::string Restart(int i) {
    if (!Valid(i)) return "LocalRedisCluster::Restart: no node " + std::to_string(i);
    if (running(i)) return "LocalRedisCluster::Restart: node " + std::to_string(i) + " is running";
    if (std::string e = nodes_[i]->Start(); !e.empty()) {
      return "LocalRedisCluster::Restart: node " + std::to_string(i) + ": " + e;
    }
    return "";
  }
  // SIGSTOP / SIGCONT node i: it accepts connections and never answers (commands to it time
  // out after 1 s, so prefer Kill for failover tests).
  void Pause(int i) {
    if (Valid(i)) nodes_[i]->Pause();
  }
  void Resume(int i) {
    if (Valid(i)) nodes_[i]->Resume();
  }

  // Waits until every live node reports cluster_state:ok, all give the same CLUSTER SLOTS,
  // every slot's primary is a live node, every live node sees the other live ones connected
  // and not failing, and every live replica's link to its primary is up and it is listed in
  // CLUSTER SLOTS under its primary. "" or why not.
  std::string WaitHealthy(int timeout_ms) {
    return WaitHealthyUntil(cluster_detail::Clock::now() + std::chrono::milliseconds(timeout_ms));
  }

  // After Kill(killed) of a primary: waits until the slots it served are served by one of
  // its replicas, and the cluster is healthy without it (as WaitHealthy).
  std::string WaitFailover(int killed, int timeout_ms) {
    const std::string what = "WaitFailover(node " + std::to_string(killed) + ")";
    if (!Valid(killed)) return what + ": no such node";
    if (running(killed)) return what + ": the node is running; Kill() it first";
    if (killed_slots_[killed].empty()) {
      return what + ": the node served no slots when it was killed (a replica?)";
    }
    if (killed_replicas_[killed].empty()) {
      return what + ": the node had no replica when it was killed, so nothing can fail over";
    }
    const auto deadline = cluster_detail::Clock::now() + std::chrono::milliseconds(timeout_ms);
    return WaitUntil(
        "a replica of node " + std::to_string(killed) + " to serve its slots", deadline,
        [&]() -> std::string {
          std::vector<cluster_detail::SlotRange> agreed;
          if (std::string e = CheckHealthy(&agreed); !e.empty()) return e;
          for (const auto& [first, last] : killed_slots_[killed]) {
            for (const auto& r : agreed) {
              if (r.end < first || r.start > last) continue;
              const int owner = NodeForPort(r.primary_port);
              if (std::find(killed_replicas_[killed].begin(), killed_replicas_[killed].end(),
                            owner) == killed_replicas_[killed].end()) {
                return "slots " + std::to_string(r.start) + "-" + std::to_string(r.end) +
                       " are served by node " + std::to_string(owner) + ", not a replica of node " +
                       std::to_string(killed);
              }
            }
          }
          return "";
        });
  }

  // Slot migration, the protocol redis-cli uses, in steps so that a test can act while a
  // slot is half moved. 1: the target imports, the source migrates (the source now answers
  // ASK for keys of the slot it no longer has).
  std::string BeginMigration(int slot, int from, int to) {
    const std::string what = MigrationName("BeginMigration", slot, from, to);
    if (std::string e = CheckMigrationArgs(slot, from, to); !e.empty()) return what + ": " + e;
    if (std::string e =
            CommandOk(to, {"CLUSTER", "SETSLOT", std::to_string(slot), "IMPORTING", ids_[from]});
        !e.empty()) {
      return what + ": " + e;
    }
    if (std::string e =
            CommandOk(from, {"CLUSTER", "SETSLOT", std::to_string(slot), "MIGRATING", ids_[to]});
        !e.empty()) {
      return what + ": " + e;
    }
    return "";
  }
  // 2: moves up to max_keys keys of the slot (-1: all) with MIGRATE, in batches of 100.
  // *moved (if given) counts the keys moved.
  std::string MigrateKeys(int slot, int from, int to, int max_keys = -1, int* moved = nullptr) {
    const std::string what = MigrationName("MigrateKeys", slot, from, to);
    if (moved != nullptr) *moved = 0;
    if (std::string e = CheckMigrationArgs(slot, from, to); !e.empty()) return what + ": " + e;
    int done = 0;
    for (int round = 0; max_keys < 0 || done < max_keys; ++round) {
      if (round > 100000) return what + ": keys keep appearing in the slot";
      const int batch = max_keys < 0 ? 100 : std::min(100, max_keys - done);
      std::string error;
      const cluster_detail::Reply keys = Call(
          from, {"CLUSTER", "GETKEYSINSLOT", std::to_string(slot), std::to_string(batch)}, &error);
      if (keys == nullptr || keys->type != REDIS_REPLY_ARRAY) {
        return what + ": CLUSTER GETKEYSINSLOT on node " + std::to_string(from) + ": " +
               (keys == nullptr ? error : cluster_detail::FormatReply(keys.get()));
      }
      if (keys->elements == 0) break;
      std::vector<std::string> args = {"MIGRATE", "127.0.0.1", std::to_string(port(to)), "", "0",
                                       "5000",    "KEYS"};
      for (size_t k = 0; k < keys->elements; ++k) {
        args.emplace_back(keys->element[k]->str, keys->element[k]->len);
      }
      const cluster_detail::Reply r = Call(from, args, &error);
      if (r == nullptr || r->type == REDIS_REPLY_ERROR) {
        return what + ": MIGRATE of " + std::to_string(keys->elements) + " keys on node " +
               std::to_string(from) + ": " +
               (r == nullptr ? error : cluster_detail::FormatReply(r.get()));
      }
      done += static_cast<int>(keys->elements);
      if (moved != nullptr) *moved = done;
    }
    return "";
  }
  // 3: once the source holds no key of the slot, gives the slot to the target (on the
  // target first, then the source, then every other live primary) and waits until every
  // live node's CLUSTER SLOTS agrees.
  std::string FinishMigration(int slot, int from, int to) {
    const std::string what = MigrationName("FinishMigration", slot, from, to);
    if (std::string e = CheckMigrationArgs(slot, from, to); !e.empty()) return what + ": " + e;
    const std::string left = Command(from, {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(slot)});
    if (left != "(integer) 0") {
      return what + ": node " + std::to_string(from) + " still holds keys of the slot (" + left +
             "); MigrateKeys first";
    }
    std::vector<int> order = {to, from};
    std::string nodes_text, error;
    if (!ReadText(to, {"CLUSTER", "NODES"}, &nodes_text, &error)) return what + ": " + error;
    for (const auto& e : cluster_detail::ParseNodes(nodes_text)) {
      const int i = NodeForId(e.id);
      if (i >= 0 && i != to && i != from && running(i) && e.Has("master") && !e.Has("fail")) {
        order.push_back(i);
      }
    }
    for (const int i : order) {
      if (std::string e =
              CommandOk(i, {"CLUSTER", "SETSLOT", std::to_string(slot), "NODE", ids_[to]});
          !e.empty()) {
        return what + ": " + e;
      }
    }
    const auto deadline = cluster_detail::Clock::now() + std::chrono::milliseconds(ConvergeMs());
    return WaitUntil(what + ": every live node to see slot " + std::to_string(slot) + " on node " +
                         std::to_string(to),
                     deadline, [&] { return CheckSlotOwner(slot, port(to)); });
  }
  std::string MigrateSlot(int slot, int from, int to) {
    if (std::string e = BeginMigration(slot, from, to); !e.empty()) return e;
    if (std::string e = MigrateKeys(slot, from, to); !e.empty()) return e;
    return FinishMigration(slot, from, to);
  }

  // Unassigns a slot: CLUSTER DELSLOTS on every live node (a node only forgets a slot when
  // told itself), then waits until none lists it. With require_full_coverage (the default)
  // the whole cluster then answers CLUSTERDOWN; without, the other slots keep working.
  std::string DelSlot(int slot) {
    const std::string what = "DelSlot(" + std::to_string(slot) + ")";
    if (slot < 0 || slot >= kClusterSlots) return what + ": no such slot";
    if (PrimaryForSlot(slot) < 0) return what + ": the slot is not assigned (or no node answers)";
    for (int i = 0; i < nodes(); ++i) {
      if (!running(i)) continue;
      const std::string r = Command(i, {"CLUSTER", "DELSLOTS", std::to_string(slot)});
      if (r != "OK" && r.find("already unassigned") == std::string::npos) {
        return what + ": CLUSTER DELSLOTS on node " + std::to_string(i) + ": " + r;
      }
    }
    const auto deadline = cluster_detail::Clock::now() + std::chrono::milliseconds(ConvergeMs());
    return WaitUntil(what + ": every live node to drop the slot", deadline,
                     [&] { return CheckSlotOwner(slot, -1); });
  }

  // Runs one command on node i; the reply in redis-cli's style ("OK", "(error) MOVED 3999
  // 127.0.0.1:7001", "(integer) 1", "(nil)", "[a, b]"), or "(node 2 is not running)", or
  // "(connection error) ..." / "(I/O error) ...".
  std::string Command(int i, const std::vector<std::string>& args) const {
    if (!Valid(i)) return "(no node " + std::to_string(i) + ")";
    if (!running(i)) return "(node " + std::to_string(i) + " is not running)";
    std::string error;
    cluster_detail::Context c = cluster_detail::ConnectLoopback(port(i), 1000, &error);
    if (c == nullptr) return "(connection error) " + error;
    const cluster_detail::Reply r = cluster_detail::RunArgv(c.get(), args, &error);
    if (r == nullptr) return "(I/O error) " + error;
    return cluster_detail::FormatReply(r.get());
  }
  // A raw connection to node i (caller frees with redisFree; 2 s timeouts), or nullptr.
  redisContext* Connect(int i) const { return running(i) ? nodes_[i]->Connect() : nullptr; }

  // One line per node: its port, id and view (state, role, slots), for failure messages.
  std::string Describe() const {
    std::string out;
    for (int i = 0; i < nodes(); ++i) {
      if (nodes_[i] == nullptr) {
        out += "  node " + std::to_string(i) + ": not started\n";
        continue;
      }
      out += "  node " + std::to_string(i) + " port " + std::to_string(port(i)) + " id " +
             ids_[i].substr(0, 8) + ": ";
      if (!running(i)) {
        out += "not running\n";
        continue;
      }
      std::string info, nodes_text, error;
      std::vector<cluster_detail::SlotRange> slots;
      if (!ReadText(i, {"CLUSTER", "INFO"}, &info, &error) ||
          !ReadText(i, {"CLUSTER", "NODES"}, &nodes_text, &error) ||
          !ReadSlots(i, &slots, &error)) {
        out += error + "\n";
        continue;
      }
      std::string flags;
      for (const auto& e : cluster_detail::ParseNodes(nodes_text)) {
        if (e.Has("myself")) flags = e.flags;
      }
      out += "cluster_state:" + cluster_detail::InfoField(info, "cluster_state") + " " + flags +
             "; slots: " + cluster_detail::CanonicalSlots(slots) + "\n";
    }
    return out;
  }
  // The last `lines` lines of every node's log.
  std::string LogTails(int lines = 8) const {
    std::string out;
    for (int i = 0; i < nodes(); ++i) {
      if (nodes_[i] == nullptr) continue;
      const std::string tail = nodes_[i]->LogTail();
      size_t pos = tail.size();
      for (int n = 0; n <= lines && pos != std::string::npos && pos > 0; ++n) {
        pos = tail.rfind('\n', pos - 1);
      }
      out += "  --- node " + std::to_string(i) + " log (port " + std::to_string(port(i)) +
             ") ---\n" + (pos == std::string::npos ? tail : tail.substr(pos + 1));
    }
    return out;
  }

 private:
  bool Valid(int i) const { return i >= 0 && i < nodes() && nodes_[i] != nullptr; }
  int ConvergeMs() const { return std::max(5000, 5 * options_.node_timeout_ms); }

  std::string FailureContext() const { return "\ncluster:\n" + Describe() + LogTails(); }

  // Node i on a fresh bus port; a new RedisServer (and port) per try, as a port picked free
  // can be taken before redis-server binds it.
  std::string StartNewNode(int i) {
    const std::string node_dir = dir_ + "/node-" + std::to_string(i);
    if (mkdir(node_dir.c_str(), 0700) != 0) {
      return "LocalRedisCluster::Start: mkdir " + node_dir + ": " + std::strerror(errno);
    }
    std::string error;
    for (int attempt = 0; attempt < 5; ++attempt) {
      const int bus = FreeLoopbackPort();
      std::vector<std::string> args = {
          "--cluster-enabled", "yes", "--cluster-config-file", node_dir + "/nodes.conf",
          "--cluster-node-timeout", std::to_string(options_.node_timeout_ms), "--cluster-port",
          std::to_string(bus), "--cluster-require-full-coverage",
          options_.require_full_coverage ? "yes" : "no",
          // Overrides RedisServer's --dir: replication files land here, removed with us.
          "--dir", node_dir,
          // A replica's full sync starts at once (the default waits 5 s for more replicas).
          "--repl-diskless-sync-delay", "0",
          // Primaries PING replicas every second (default 10), so that a replica's offset
          // moves and CLUSTER SLOTS lists it soon, even with no writes.
          "--repl-ping-replica-period", "1"};
      args.insert(args.end(), options_.extra_args.begin(), options_.extra_args.end());
      auto server = std::make_unique<RedisServer>(binary_, std::move(args));
      error = server->Start();
      if (error.empty()) {
        nodes_[i] = std::move(server);
        bus_ports_[i] = bus;
        return "";
      }
      std::remove((node_dir + "/nodes.conf").c_str());
    }
    return "LocalRedisCluster::Start: node " + std::to_string(i) + ": " + error;
  }

  std::string Meet(int from, int to) {
    return CommandOk(from, {"CLUSTER", "MEET", "127.0.0.1", std::to_string(port(to)),
                            std::to_string(bus_ports_[to])});
  }

  cluster_detail::Reply Call(int i, const std::vector<std::string>& args,
                             std::string* error) const {
    if (!running(i)) {
      *error = "node " + std::to_string(i) + " is not running";
      return nullptr;
    }
    cluster_detail::Context c = cluster_detail::ConnectLoopback(port(i), 1000, error);
    if (c == nullptr) return nullptr;
    return cluster_detail::RunArgv(c.get(), args, error);
  }
  // "" when node i answered anything but an error, else "node i (port p) CMD: why".
  std::string CommandOk(int i, const std::vector<std::string>& args) const {
    std::string error;
    const cluster_detail::Reply r = Call(i, args, &error);
    if (r != nullptr && r->type != REDIS_REPLY_ERROR) return "";
    return "node " + std::to_string(i) + " (port " + std::to_string(port(i)) + ") " +
           cluster_detail::Join(args) + ": " +
           (r == nullptr ? error : cluster_detail::FormatReply(r.get()));
  }
  bool ReadText(int i, const std::vector<std::string>& args, std::string* text,
                std::string* error) const {
    const cluster_detail::Reply r = Call(i, args, error);
    if (r != nullptr && r->type == REDIS_REPLY_STRING) {
      text->assign(r->str, r->len);
      return true;
    }
    *error = "node " + std::to_string(i) + " " + cluster_detail::Join(args) + ": " +
             (r == nullptr ? *error : cluster_detail::FormatReply(r.get()));
    return false;
  }
  bool ReadSlots(int i, std::vector<cluster_detail::SlotRange>* slots, std::string* error) const {
    const cluster_detail::Reply r = Call(i, {"CLUSTER", "SLOTS"}, error);
    if (r == nullptr) {
      *error = "node " + std::to_string(i) + " CLUSTER SLOTS: " + *error;
      return false;
    }
    if (!cluster_detail::ParseSlots(r.get(), slots, error)) {
      *error = "node " + std::to_string(i) + " " + *error;
      return false;
    }
    return true;
  }

  // Polls `check` ("" when done, else the reason) every 20 ms until `deadline`.
  std::string WaitUntil(const std::string& what, cluster_detail::Clock::time_point deadline,
                        const std::function<std::string()>& check) const {
    const auto start = cluster_detail::Clock::now();
    std::string reason;
    while (true) {
      reason = check();
      if (reason.empty()) return "";
      if (cluster_detail::Clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return "timed out after " + std::to_string(cluster_detail::ElapsedMs(start)) +
           " ms waiting for " + what + "; last: " + reason;
  }

  std::string WaitHealthyUntil(cluster_detail::Clock::time_point deadline) {
    const std::string e = WaitUntil("a healthy cluster", deadline, [&] {
      std::vector<cluster_detail::SlotRange> agreed;
      return CheckHealthy(&agreed);
    });
    return e.empty() ? "" : e + "\ncluster:\n" + Describe();
  }

  // Every node lists every node, none in handshake, all links up.
  std::string CheckAllKnown() const {
    for (int i = 0; i < nodes(); ++i) {
      std::string text, error;
      if (!ReadText(i, {"CLUSTER", "NODES"}, &text, &error)) return error;
      const auto entries = cluster_detail::ParseNodes(text);
      if (static_cast<int>(entries.size()) != nodes()) {
        return "node " + std::to_string(i) + " knows " + std::to_string(entries.size()) +
               " nodes of " + std::to_string(nodes());
      }
      for (const auto& e : entries) {
        if (NodeForId(e.id) < 0 || e.Has("handshake") || e.Has("noaddr") || e.link != "connected") {
          return "node " + std::to_string(i) + " sees " + e.id.substr(0, 8) + " " + e.addr +
                 " as " + e.flags + " " + e.link;
        }
      }
    }
    return "";
  }

  // "" when healthy (see WaitHealthy), *agreed then holding the common slot map.
  std::string CheckHealthy(std::vector<cluster_detail::SlotRange>* agreed) const {
    std::string reference;
    int reference_node = -1;
    std::vector<std::pair<int, int>> replicas;  // (live replica, its primary)
    for (int i = 0; i < nodes(); ++i) {
      if (!running(i)) continue;
      const std::string who =
          "node " + std::to_string(i) + " (port " + std::to_string(port(i)) + ")";
      std::string info, nodes_text, error;
      if (!ReadText(i, {"CLUSTER", "INFO"}, &info, &error)) return error;
      const std::string state = cluster_detail::InfoField(info, "cluster_state");
      if (state != "ok") return who + " reports cluster_state:" + state;
      std::vector<cluster_detail::SlotRange> slots;
      if (!ReadSlots(i, &slots, &error)) return error;
      const std::string canonical = cluster_detail::CanonicalSlots(slots);
      if (reference_node < 0) {
        reference = canonical;
        reference_node = i;
        *agreed = slots;
        for (const auto& r : slots) {
          const int owner = NodeForPort(r.primary_port);
          if (owner < 0 || !running(owner)) {
            return "slots " + std::to_string(r.start) + "-" + std::to_string(r.end) +
                   " are served by " + r.primary_host + ":" + std::to_string(r.primary_port) +
                   (owner < 0 ? ", not a node of this cluster"
                              : " (node " + std::to_string(owner) + "), which is not running");
          }
        }
      } else if (canonical != reference) {
        return who + " disagrees on CLUSTER SLOTS with node " + std::to_string(reference_node) +
               ": " + canonical + " vs " + reference;
      }
      if (!ReadText(i, {"CLUSTER", "NODES"}, &nodes_text, &error)) return error;
      const auto entries = cluster_detail::ParseNodes(nodes_text);
      bool replica = false;
      for (int j = 0; j < nodes(); ++j) {
        const auto it = std::find_if(entries.begin(), entries.end(),
                                     [&](const auto& e) { return e.id == ids_[j]; });
        if (it == entries.end()) return who + " does not know node " + std::to_string(j);
        if (j == i && it->Has("slave")) {
          replica = true;
          replicas.emplace_back(i, NodeForId(it->master));
        }
        if (!running(j)) continue;
        if (it->Has("fail") || it->Has("fail?") || it->Has("handshake") || it->Has("noaddr") ||
            it->link != "connected") {
          return who + " sees node " + std::to_string(j) + " as " + it->flags + " " + it->link;
        }
      }
      if (static_cast<int>(entries.size()) != nodes()) {
        return who + " knows " + std::to_string(entries.size()) + " nodes, not " +
               std::to_string(nodes());
      }
      if (replica) {
        std::string repl;
        if (!ReadText(i, {"INFO", "replication"}, &repl, &error)) return error;
        const std::string link = cluster_detail::InfoField(repl, "master_link_status");
        if (link != "up") return who + ", a replica, has master_link_status:" + link;
      }
    }
    if (reference_node < 0) return "no node is running";
    // CLUSTER SLOTS lists a replica only once its replication offset is not 0, i.e. after
    // its primary's first write or replication PING (--repl-ping-replica-period 1).
    for (const auto& [replica, primary] : replicas) {
      for (const auto& r : *agreed) {
        if (primary < 0 || r.primary_port != port(primary)) continue;
        const std::string suffix = ":" + std::to_string(port(replica));
        if (std::none_of(r.replicas.begin(), r.replicas.end(), [&](const std::string& a) {
              return a.size() > suffix.size() &&
                     a.compare(a.size() - suffix.size(), suffix.size(), suffix) == 0;
            })) {
          return "node " + std::to_string(replica) + ", a replica of node " +
                 std::to_string(primary) + ", is not listed in CLUSTER SLOTS for slots " +
                 std::to_string(r.start) + "-" + std::to_string(r.end) + " yet";
        }
      }
    }
    return "";
  }

  // "" when every live node maps `slot` to the node on `owner_port` (-1: to nobody).
  std::string CheckSlotOwner(int slot, int owner_port) const {
    for (int i = 0; i < nodes(); ++i) {
      if (!running(i)) continue;
      std::vector<cluster_detail::SlotRange> slots;
      std::string error;
      if (!ReadSlots(i, &slots, &error)) return error;
      int seen = -1;
      for (const auto& r : slots) {
        if (slot >= r.start && slot <= r.end) seen = r.primary_port;
      }
      if (seen != owner_port) {
        return "node " + std::to_string(i) + " maps slot " + std::to_string(slot) + " to " +
               (seen < 0 ? std::string("nobody") : "port " + std::to_string(seen));
      }
    }
    return "";
  }

  static std::string MigrationName(const char* step, int slot, int from, int to) {
    return std::string(step) + "(slot " + std::to_string(slot) + ", node " + std::to_string(from) +
           " -> node " + std::to_string(to) + ")";
  }
  std::string CheckMigrationArgs(int slot, int from, int to) const {
    if (slot < 0 || slot >= kClusterSlots) return "no such slot";
    if (!Valid(from) || !Valid(to) || from == to) return "bad node indices";
    if (!running(from)) return "node " + std::to_string(from) + " is not running";
    if (!running(to)) return "node " + std::to_string(to) + " is not running";
    return "";
  }

  std::string binary_;
  LocalRedisClusterOptions options_;
  std::string dir_;
  std::vector<std::unique_ptr<RedisServer>> nodes_;
  std::vector<int> bus_ports_;
  std::vector<std::string> ids_;
  std::vector<std::vector<std::pair<int, int>>> killed_slots_;
  std::vector<std::vector<int>> killed_replicas_;
};

}  // namespace ctxcache::testing
