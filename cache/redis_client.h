// A small synchronous Redis client over hiredis (0.14, the Debian 12 package): URL parsing,
// a bounded connection pool with AUTH and SELECT done once per connection, operation
// deadlines, and reconnection with exponential backoff.
//
// Deadlines bound an operation, not a syscall: every call takes an absolute deadline on the
// steady clock (RedisDeadline) and ends by the smaller of it and now + command_timeout_ms,
// whatever the server does. hiredis's blocking calls apply a socket timeout to each read or
// write, so a slow-but-alive server that trickles a reply (a chunk every 0.7 s with a 1 s
// timeout) kept a call waiting for as long as it pleased (issue 14); here the client drives
// hiredis's buffer functions itself and sets the socket timeout to the time left before each
// read and write, so waiting for the pool, connecting, AUTH/SELECT, sending and every reply
// chunk all come out of one budget.
//
// The client serves a cache, so it is built to fail fast rather than to try hard: a request
// must never wait long on a Redis that is down. After a failed connect, or a command that
// timed out, the client is "in backoff" for a while (doubling from backoff_initial_ms up to
// backoff_max_ms, with jitter so that replicas do not reconnect in lockstep) and every call
// returns Unavailable at once; the first call after the backoff probes the server with one
// connection. A lost connection (EOF, reset: e.g. Redis restarted) also drops the idle
// connections opened before it, since they died with it, so that one request, not one per
// pooled connection, pays for the discovery.
//
// Cancellation: an operation also ends when the call it serves gives up. The caller names that
// call's stop for a scope (ScopedRedisStop, per thread); while an operation waits for a reply it
// asks the stop every kRedisStopPollMs and, when it fires, ends with the stop's status (the
// connection, mid-reply, is closed; Redis is not blamed). So a cancelled call frees its thread
// within a poll interval instead of waiting out command_timeout_ms on a stalled Redis.
//
// SIGPIPE: hiredis 0.14 writes with write(2), which raises SIGPIPE on a socket the server has
// closed and would kill the process. Every call blocks SIGPIPE in the calling thread for its
// duration and consumes one it raised, leaving the process's signal disposition alone.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/stop.h"

struct redisContext;
struct redisReply;

namespace ctxcache {

// redis://[user:password@]host[:port][/db]. user and password are percent-decoded (write
// "%40" for "@", "%3A" for ":", "%2F" for "/"); ":password@" alone authenticates the default
// user (AUTH password), "user:password@" an ACL user (AUTH user password). host may be an
// IPv6 literal in brackets. port defaults to 6379, db to 0.
struct RedisUrl {
  std::string host;
  int port = 6379;
  std::string user;      // empty: AUTH with the password alone (if any)
  std::string password;  // empty: no AUTH
  int db = 0;
};
// InvalidArgument naming what is wrong; the password never appears in a message.
absl::StatusOr<RedisUrl> ParseRedisUrl(std::string_view url);
// The URL with the credentials' secret replaced by "***", for logs: "redis://u:***@h:1/0".
// Anything between the scheme and the last '@' that is not a user name is redacted, even in a
// URL ParseRedisUrl would refuse, so no log line can carry a password.
std::string RedactRedisUrl(std::string_view url);

// An absolute deadline on the steady clock. A caller passes the time its own call must end by
// (e.g. the gRPC deadline converted to steady time); kNoRedisDeadline leaves only the
// configured command timeout.
using RedisClock = std::chrono::steady_clock;
using RedisDeadline = RedisClock::time_point;
inline constexpr RedisDeadline kNoRedisDeadline = RedisDeadline::max();

// The deadline one operation (one or several round trips) ends by, and which limit set it:
// by_timeout when the configured command timeout came first (then running out of time says
// the server is slow, and the client backs off), else the caller's remaining time did.
struct RedisOperationDeadline {
  RedisDeadline at = kNoRedisDeadline;
  bool by_timeout = true;
};

// How often an operation waiting for Redis's reply asks the current stop (see the top).
inline constexpr int kRedisStopPollMs = 10;

// Makes `stop` the stop of every Redis operation this thread starts until the scope ends
// (scopes nest: the innermost wins, the outer one is back after it). Null: none.
class ScopedRedisStop {
 public:
  explicit ScopedRedisStop(const StopFn* stop);
  ~ScopedRedisStop();
  ScopedRedisStop(const ScopedRedisStop&) = delete;
  ScopedRedisStop& operator=(const ScopedRedisStop&) = delete;

 private:
  const StopFn* previous_;
};
// The current scope's stop asked now: OK when none is set or it has not fired.
absl::Status CurrentRedisStop();

struct RedisReplyDeleter {
  void operator()(redisReply* reply) const;
};
// A hiredis reply; its fields are hiredis's (type REDIS_REPLY_*, str/len, integer, element).
using RedisReply = std::unique_ptr<redisReply, RedisReplyDeleter>;

// One command's arguments; they are sent as binary-safe bulk strings.
using RedisArgs = std::vector<std::string_view>;

struct RedisClientOptions {
  RedisUrl url;
  int pool_size = 4;
  int connect_timeout_ms = 500;
  int command_timeout_ms = 1000;  // per operation (see the top), capped by the caller's deadline
  int backoff_initial_ms = 100;
  int backoff_max_ms = 5000;
};

class RedisClient {
 public:
  // Validates the options; does not connect (the first call does).
  static absl::StatusOr<std::unique_ptr<RedisClient>> Create(const RedisClientOptions& options);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // The deadline an operation starting now ends by: min(deadline, now + command_timeout_ms).
  RedisOperationDeadline OperationDeadline(RedisDeadline deadline) const;

  // Sends `commands` on one pooled connection, pipelined (one round trip), and returns their
  // replies in order, by OperationDeadline(deadline) at the latest (the caller may pass an
  // operation's deadline to several calls: they share it). A reply may be an error reply
  // (REDIS_REPLY_ERROR, e.g. OOM): judging it is the caller's business. The status is about
  // transport only:
  //  * Unavailable: cannot connect, in backoff, AUTH/SELECT refused, connection lost;
  //  * DeadlineExceeded: the deadline came first (waiting for a pooled connection,
  //    connecting, sending or reading), with how long the call ran and which limit it hit.
  absl::StatusOr<std::vector<RedisReply>> Pipeline(absl::Span<const RedisArgs> commands,
                                                   RedisDeadline deadline = kNoRedisDeadline) {
    return Pipeline(commands, OperationDeadline(deadline));
  }
  absl::StatusOr<RedisReply> Command(const RedisArgs& args,
                                     RedisDeadline deadline = kNoRedisDeadline) {
    return Command(args, OperationDeadline(deadline));
  }
  // The same within an operation's deadline that several calls share.
  absl::StatusOr<std::vector<RedisReply>> Pipeline(absl::Span<const RedisArgs> commands,
                                                   RedisOperationDeadline op);
  absl::StatusOr<RedisReply> Command(const RedisArgs& args, RedisOperationDeadline op);

  // Opens one connection now if none is open (not in backoff). For a start-up log line.
  absl::Status Ping(RedisDeadline deadline = kNoRedisDeadline);

  // False from a failed connect or a timed-out command until a connect succeeds again.
  bool connected() const;
  // "host:port/db", for messages.
  const std::string& endpoint() const { return endpoint_; }

 private:
  struct Conn {
    redisContext* ctx = nullptr;
    uint64_t generation = 0;  // connections older than the last lost one are not reused
  };
  explicit RedisClient(const RedisClientOptions& options);

  absl::StatusOr<Conn> Acquire(RedisDeadline deadline);
  // healthy=false closes the connection. lost=true also retires the idle ones (see top).
  void Release(Conn conn, bool healthy, bool lost);
  absl::StatusOr<redisContext*> Connect(RedisDeadline deadline);
  void NoteConnectFailure(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RedisClientOptions options_;
  const std::string endpoint_;

  mutable absl::Mutex mu_;
  std::vector<Conn> idle_ ABSL_GUARDED_BY(mu_);
  int open_ ABSL_GUARDED_BY(mu_) = 0;  // idle + checked out + being connected
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool healthy_ ABSL_GUARDED_BY(mu_) = false;
  bool probing_ ABSL_GUARDED_BY(mu_) = false;  // an unhealthy client lets one connect at a time
  int64_t backoff_ms_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t retry_at_ms_ ABSL_GUARDED_BY(mu_) = 0;  // steady clock; calls before it fail fast
  std::string last_error_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ctxcache
