// Redis URL parsing and the pooled hiredis client (see redis_client.h).
#include "cache/redis_client.h"

#include <hiredis/hiredis.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace ctxcache {
namespace {

constexpr std::string_view kScheme = "redis://";

absl::Status UrlError(std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("bad redis URL: ", std::string(what),
                   " (expected redis://[user:password@]host[:port][/db])"));
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding of the credentials. `what` names the field, never its value.
absl::StatusOr<std::string> PercentDecode(std::string_view s, std::string_view what) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    const int hi = i + 2 < s.size() ? HexValue(s[i + 1]) : -1;
    const int lo = i + 2 < s.size() ? HexValue(s[i + 2]) : -1;
    if (hi < 0 || lo < 0) {
      return UrlError(absl::StrCat("bad percent-escape in the ", std::string(what),
                                   " (write %XX with two hex digits)"));
    }
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

bool AllDigits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

bool ValidHostName(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
  });
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

timeval MsToTimeval(int64_t ms) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(ms / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000);
  return tv;
}

// Blocks SIGPIPE in this thread while hiredis writes, and swallows one raised meanwhile
// (see redis_client.h). A SIGPIPE that was already pending before is left for its owner.
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~ScopedSigpipeBlock() {
    const int saved_errno = errno;
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{0, 0};
        while (sigtimedwait(&pipe_, nullptr, &zero) == -1 && errno == EINTR) {
        }
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
    errno = saved_errno;
  }

 private:
  sigset_t pipe_, old_;
  bool was_pending_ = false;
};

// Sets the socket's send and receive timeouts to the time left until `deadline` (at least
// 1 ms: a zero timeval would mean "no timeout" to the kernel). False when it has passed.
bool ArmTimeout(redisContext* c, RedisDeadline deadline) {
  const auto left = deadline - RedisClock::now();
  if (left <= RedisClock::duration::zero()) return false;
  int64_t us = std::chrono::duration_cast<std::chrono::microseconds>(left).count();
  us = std::max<int64_t>(us, 1000);
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(us / 1000000);
  tv.tv_usec = static_cast<suseconds_t>(us % 1000000);
  return redisSetTimeout(c, tv) == REDIS_OK;
}

enum class IoOutcome { kOk, kDeadline, kLost, kStopped };

thread_local const StopFn* current_stop = nullptr;

// With a stop in scope: waits until `c`'s socket is readable, asking the stop every
// kRedisStopPollMs; kStopped (and the stop's status in *stopped) when it fires, kDeadline at
// `deadline`, kOk when there are bytes (or an error, which the read then reports).
IoOutcome AwaitReadable(redisContext* c, RedisDeadline deadline, absl::Status* stopped) {
  if (current_stop == nullptr || !*current_stop) return IoOutcome::kOk;
  for (;;) {
    if (absl::Status s = (*current_stop)(); !s.ok()) {
      *stopped = std::move(s);
      return IoOutcome::kStopped;
    }
    const auto left = deadline - RedisClock::now();
    if (left <= RedisClock::duration::zero()) return IoOutcome::kDeadline;
    const int64_t left_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
    pollfd p{};
    p.fd = c->fd;
    p.events = POLLIN;
    const int r = poll(&p, 1, static_cast<int>(std::min<int64_t>(left_ms, kRedisStopPollMs)));
    if (r > 0 || (r < 0 && errno != EINTR)) return IoOutcome::kOk;
  }
}

// Sends what hiredis has queued on `c`, then reads replies until `replies` holds `n`, all by
// `deadline`: the socket timeout is re-armed to the time left before every write and read,
// so a server that trickles its reply cannot stretch the call (see redis_client.h).
IoOutcome DriveIo(redisContext* c, size_t n, RedisDeadline deadline,
                  std::vector<RedisReply>* replies, absl::Status* stopped) {
  auto failed = [&]() {
    // A socket timeout (EAGAIN) or an error at the deadline is the deadline; anything else
    // (EOF, reset, protocol error) lost the connection.
    const int e = errno;
    return e == EAGAIN || e == EWOULDBLOCK || RedisClock::now() >= deadline ||
                   std::strcmp(c->errstr, std::strerror(EAGAIN)) == 0
               ? IoOutcome::kDeadline
               : IoOutcome::kLost;
  };
  int done = 0;
  while (!done) {
    if (!ArmTimeout(c, deadline)) return IoOutcome::kDeadline;
    errno = 0;
    if (redisBufferWrite(c, &done) != REDIS_OK) return failed();
  }
  while (replies->size() < n) {
    void* reply = nullptr;
    if (redisGetReplyFromReader(c, &reply) != REDIS_OK) return IoOutcome::kLost;
    if (reply != nullptr) {
      replies->emplace_back(static_cast<redisReply*>(reply));
      continue;
    }
    if (IoOutcome waited = AwaitReadable(c, deadline, stopped); waited != IoOutcome::kOk) {
      return waited;
    }
    if (!ArmTimeout(c, deadline)) return IoOutcome::kDeadline;
    errno = 0;
    if (redisBufferRead(c) != REDIS_OK) return failed();
  }
  return IoOutcome::kOk;
}

// Queues one command's arguments on `c` (no I/O).
bool Append(redisContext* c, const RedisArgs& args) {
  std::vector<const char*> argv;
  std::vector<size_t> lens;
  argv.reserve(args.size());
  lens.reserve(args.size());
  for (std::string_view a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  return redisAppendCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data()) ==
         REDIS_OK;
}

int64_t MsBetween(RedisClock::time_point a, RedisClock::time_point b) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(b - a).count();
}

}  // namespace

ScopedRedisStop::ScopedRedisStop(const StopFn* stop) : previous_(current_stop) {
  current_stop = stop;
}
ScopedRedisStop::~ScopedRedisStop() { current_stop = previous_; }

absl::Status CurrentRedisStop() {
  return current_stop == nullptr ? absl::OkStatus() : CheckStop(*current_stop);
}

absl::StatusOr<RedisUrl> ParseRedisUrl(std::string_view url) {
  if (absl::StartsWith(absl::string_view(url.data(), url.size()), "rediss://")) {
    return UrlError("TLS (rediss://) is not supported by this build");
  }
  if (url.substr(0, kScheme.size()) != kScheme) return UrlError("it must start with redis://");
  std::string_view rest = url.substr(kScheme.size());
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return UrlError("query parameters and fragments are not supported");
  }
  RedisUrl out;
  // The host part never holds '@', so the last one ends the credentials; a password may hold
  // a literal '@' only percent-encoded, but take the last one anyway to be forgiving.
  if (const size_t at = rest.rfind('@'); at != std::string_view::npos) {
    const std::string_view userinfo = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const size_t colon = userinfo.find(':');
    if (colon == std::string_view::npos) {
      return UrlError("credentials must be user:password@ or :password@ (a user needs a password)");
    }
    ASSIGN_OR_RETURN(out.user, PercentDecode(userinfo.substr(0, colon), "user name"));
    ASSIGN_OR_RETURN(out.password, PercentDecode(userinfo.substr(colon + 1), "password"));
    if (out.password.empty()) return UrlError("the password is empty");
  }
  std::string_view hostport = rest, db;
  if (const size_t slash = rest.find('/'); slash != std::string_view::npos) {
    hostport = rest.substr(0, slash);
    db = rest.substr(slash + 1);
  }
  std::string_view port;
  if (!hostport.empty() && hostport[0] == '[') {
    const size_t close = hostport.find(']');
    if (close == std::string_view::npos) return UrlError("unterminated [ in the IPv6 host");
    out.host = std::string(hostport.substr(1, close - 1));
    const std::string_view after = hostport.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return UrlError("expected :port after the ]");
      port = after.substr(1);
      if (port.empty()) return UrlError("the port after ':' is empty");
    }
    if (out.host.empty() || !std::all_of(out.host.begin(), out.host.end(), [](char c) {
          return HexValue(c) >= 0 || c == ':' || c == '.';
        })) {
      return UrlError("bad IPv6 host");
    }
  } else {
    const size_t colon = hostport.find(':');
    if (colon != std::string_view::npos &&
        hostport.find(':', colon + 1) != std::string_view::npos) {
      return UrlError("an IPv6 host goes in brackets: redis://[::1]:6379");
    }
    out.host = std::string(hostport.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = hostport.substr(colon + 1);
      if (port.empty()) return UrlError("the port after ':' is empty");
    }
    if (out.host.empty()) return UrlError("the host is missing");
    if (!ValidHostName(out.host)) {
      return UrlError(absl::StrCat("bad host \"", out.host, "\""));
    }
  }
  if (!port.empty()) {
    int p = 0;
    if (!AllDigits(port) || !absl::SimpleAtoi(absl::string_view(port.data(), port.size()), &p) ||
        p < 1 || p > 65535) {
      return UrlError(
          absl::StrCat("the port must be a number in 1..65535, got \"", std::string(port), "\""));
    }
    out.port = p;
  }
  if (!db.empty()) {
    int d = 0;
    if (!AllDigits(db) || !absl::SimpleAtoi(absl::string_view(db.data(), db.size()), &d)) {
      return UrlError(
          absl::StrCat("the database must be a number >= 0, got \"", std::string(db), "\""));
    }
    out.db = d;
  }
  return out;
}

std::string RedactRedisUrl(std::string_view url) {
  const size_t scheme = url.find("://");
  const size_t start = scheme == std::string_view::npos ? 0 : scheme + 3;
  const size_t at = url.rfind('@');
  if (at == std::string_view::npos || at < start) return std::string(url);
  const std::string_view userinfo = url.substr(start, at - start);
  const size_t colon = userinfo.find(':');
  // "user:secret" keeps the user; anything else before the '@' may be a secret entirely.
  const std::string kept =
      colon == std::string_view::npos ? std::string() : std::string(userinfo.substr(0, colon));
  return absl::StrCat(std::string(url.substr(0, start)), kept,
                      colon == std::string_view::npos ? "***" : ":***",
                      std::string(url.substr(at)));
}

void RedisReplyDeleter::operator()(redisReply* reply) const { freeReplyObject(reply); }

RedisClient::RedisClient(const RedisClientOptions& options)
    : options_(options),
      endpoint_(absl::StrCat(options.url.host, ":", options.url.port, "/", options.url.db)) {}

absl::StatusOr<std::unique_ptr<RedisClient>> RedisClient::Create(
    const RedisClientOptions& options) {
  if (options.url.host.empty()) return absl::InvalidArgumentError("redis: no host");
  if (options.pool_size < 1 || options.pool_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis pool_size must be in 1..1024, got ", options.pool_size));
  }
  if (options.connect_timeout_ms < 1 || options.command_timeout_ms < 1) {
    return absl::InvalidArgumentError(absl::StrCat("redis timeouts must be >= 1 ms, got connect ",
                                                   options.connect_timeout_ms, " ms and command ",
                                                   options.command_timeout_ms, " ms"));
  }
  if (options.backoff_initial_ms < 1 || options.backoff_max_ms < options.backoff_initial_ms) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis backoff must satisfy 1 <= initial <= max, got initial ",
                     options.backoff_initial_ms, " ms and max ", options.backoff_max_ms, " ms"));
  }
  return std::unique_ptr<RedisClient>(new RedisClient(options));
}

RedisClient::~RedisClient() {
  absl::MutexLock lock(&mu_);
  for (Conn& c : idle_) redisFree(c.ctx);
  idle_.clear();
}

bool RedisClient::connected() const {
  absl::MutexLock lock(&mu_);
  return healthy_;
}

RedisOperationDeadline RedisClient::OperationDeadline(RedisDeadline deadline) const {
  const RedisDeadline by_timeout =
      RedisClock::now() + std::chrono::milliseconds(options_.command_timeout_ms);
  return deadline < by_timeout ? RedisOperationDeadline{deadline, false}
                               : RedisOperationDeadline{by_timeout, true};
}

absl::StatusOr<redisContext*> RedisClient::Connect(RedisDeadline deadline) {
  const auto start = RedisClock::now();
  const int64_t left_ms = MsBetween(start, deadline);
  if (left_ms <= 0) {
    return absl::DeadlineExceededError(
        absl::StrCat("redis at ", endpoint_, ": no time left to connect"));
  }
  redisContext* c =
      redisConnectWithTimeout(options_.url.host.c_str(), options_.url.port,
                              MsToTimeval(std::min<int64_t>(options_.connect_timeout_ms, left_ms)));
  if (c == nullptr) return absl::UnavailableError("redis: cannot allocate a connection");
  absl::Status status;
  if (c->err != 0) {
    status = absl::UnavailableError(
        absl::StrCat("cannot connect to redis at ", endpoint_, ": ", c->errstr));
  } else {
    redisEnableKeepAlive(c);  // notice a peer that vanished without a FIN
    // AUTH and SELECT, pipelined, within the same deadline.
    std::vector<std::string> what;
    RedisArgs auth = {"AUTH"};
    if (!options_.url.password.empty()) {
      if (!options_.url.user.empty()) auth.push_back(options_.url.user);
      auth.push_back(options_.url.password);
      Append(c, auth);
      what.push_back(options_.url.user.empty()
                         ? std::string("AUTH")
                         : absl::StrCat("AUTH as user \"", options_.url.user, "\""));
    }
    const std::string db = std::to_string(options_.url.db);
    if (options_.url.db != 0) {
      Append(c, {"SELECT", db});
      what.push_back(absl::StrCat("SELECT ", db));
    }
    std::vector<RedisReply> replies;
    // Set-up is not cut by the call's stop: a connection half set up would count against
    // Redis (backoff), and it is short; the operation after it asks the stop.
    ScopedRedisStop no_stop(nullptr);
    absl::Status unused;
    switch (DriveIo(c, what.size(), deadline, &replies, &unused)) {
      case IoOutcome::kOk:
        for (size_t i = 0; i < replies.size() && status.ok(); ++i) {
          if (replies[i]->type == REDIS_REPLY_ERROR) {
            status = absl::UnavailableError(
                absl::StrCat("redis at ", endpoint_, ": ", what[i],
                             " refused: ", std::string(replies[i]->str, replies[i]->len)));
          }
        }
        break;
      case IoOutcome::kDeadline:
        status = absl::DeadlineExceededError(
            absl::StrCat("redis at ", endpoint_, ": connection set-up (", absl::StrJoin(what, ", "),
                         ") did not finish within ", MsBetween(start, RedisClock::now()), " ms"));
        break;
      case IoOutcome::kLost:
      case IoOutcome::kStopped:  // not reached: no stop in scope
        status = absl::UnavailableError(absl::StrCat("redis at ", endpoint_, ": ",
                                                     absl::StrJoin(what, ", "),
                                                     " got no answer: ", c->errstr));
        break;
    }
  }
  if (!status.ok()) {
    redisFree(c);
    return status;
  }
  return c;
}

void RedisClient::NoteConnectFailure(const absl::Status& status) {
  healthy_ = false;
  backoff_ms_ = backoff_ms_ == 0 ? options_.backoff_initial_ms
                                 : std::min<int64_t>(2 * backoff_ms_, options_.backoff_max_ms);
  // +-20% jitter, so that replicas that lost Redis together do not all come back at once.
  thread_local std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<double> jitter(0.8, 1.2);
  const int64_t wait_ms =
      std::min<int64_t>(static_cast<int64_t>(static_cast<double>(backoff_ms_) * jitter(rng)),
                        options_.backoff_max_ms);
  retry_at_ms_ = NowMs() + wait_ms;
  last_error_ = std::string(status.message());
}

absl::StatusOr<RedisClient::Conn> RedisClient::Acquire(RedisDeadline deadline) {
  std::vector<redisContext*> stale;  // freed outside the lock
  absl::StatusOr<Conn> result = absl::InternalError("redis: unreachable");
  {
    absl::MutexLock lock(&mu_);
    const auto start = RedisClock::now();
    while (true) {
      if (absl::Status stop = CurrentRedisStop(); !stop.ok()) {
        result = absl::Status(stop.code(), absl::StrCat("redis at ", endpoint_,
                                                        ": stopped waiting for a connection: ",
                                                        stop.message()));
        break;
      }
      const int64_t now = NowMs();
      if (!healthy_ && now < retry_at_ms_) {
        result = absl::UnavailableError(absl::StrCat("redis at ", endpoint_,
                                                     " is unavailable (next attempt in ",
                                                     retry_at_ms_ - now, " ms): ", last_error_));
        break;
      }
      while (!idle_.empty()) {
        Conn c = idle_.back();
        idle_.pop_back();
        if (c.generation == generation_) {
          result = c;
          break;
        }
        stale.push_back(c.ctx);
        --open_;
      }
      if (result.ok()) break;
      if (!healthy_ && probing_) {
        // Another call is finding out whether Redis is back; do not pile on a dead server.
        result = absl::UnavailableError(
            absl::StrCat("redis at ", endpoint_, " is unavailable (reconnecting): ", last_error_));
        break;
      }
      if (open_ < options_.pool_size) {
        ++open_;
        const bool probe = !healthy_;
        if (probe) probing_ = true;
        const uint64_t generation = generation_;
        mu_.Unlock();
        absl::StatusOr<redisContext*> c = Connect(deadline);
        mu_.Lock();
        if (probe) probing_ = false;
        if (!c.ok()) {
          --open_;
          // A connect the caller's own short deadline cut off says nothing about Redis.
          if (!absl::IsDeadlineExceeded(c.status()) ||
              deadline >= start + std::chrono::milliseconds(options_.connect_timeout_ms)) {
            NoteConnectFailure(c.status());
          }
          result = c.status();
        } else {
          result = Conn{*c, generation};
        }
        break;
      }
      const int64_t left = MsBetween(RedisClock::now(), deadline);
      if (left <= 0) {
        result = absl::DeadlineExceededError(
            absl::StrCat("redis at ", endpoint_, ": all ", options_.pool_size,
                         " connections stayed busy until the operation's deadline (",
                         MsBetween(start, RedisClock::now()), " ms)"));
        break;
      }
      // Woken when a connection comes back or is closed (or, with a stop in scope, every
      // kRedisStopPollMs to ask it); the loop re-checks everything.
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](RedisClient* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                 return !self->idle_.empty() ||
                                        self->open_ < self->options_.pool_size;
                               },
                               this),
                           absl::Milliseconds(current_stop != nullptr
                                                  ? std::min<int64_t>(left, kRedisStopPollMs)
                                                  : left));
    }
  }
  for (redisContext* c : stale) redisFree(c);
  return result;
}

void RedisClient::Release(Conn conn, bool healthy, bool lost) {
  std::vector<redisContext*> to_free;
  {
    absl::MutexLock lock(&mu_);
    if (healthy && !lost && conn.generation == generation_) {
      idle_.push_back(conn);
    } else {
      to_free.push_back(conn.ctx);
      --open_;
    }
    if (lost) {
      ++generation_;
      for (Conn& c : idle_) to_free.push_back(c.ctx);
      open_ -= static_cast<int>(idle_.size());
      idle_.clear();
    }
  }
  for (redisContext* c : to_free) redisFree(c);
}

absl::StatusOr<std::vector<RedisReply>> RedisClient::Pipeline(absl::Span<const RedisArgs> commands,
                                                              RedisOperationDeadline op) {
  ScopedSigpipeBlock sigpipe_block;
  const auto start = RedisClock::now();
  const RedisDeadline op_deadline = op.at;
  // Cut off by the caller's remaining time rather than by the configured timeout: then a
  // timeout says nothing about Redis's health (no backoff, the other connections stay).
  const bool caller_limited = !op.by_timeout;
  if (op_deadline <= start) {
    return absl::DeadlineExceededError(
        absl::StrCat("redis at ", endpoint_, ": the call had no time left for the operation"));
  }
  ASSIGN_OR_RETURN(Conn conn, Acquire(op_deadline));
  redisContext* c = conn.ctx;
  for (const RedisArgs& args : commands) {
    if (!Append(c, args)) {
      const absl::Status status = absl::UnavailableError(
          absl::StrCat("redis at ", endpoint_, ": cannot queue a command: ", c->errstr));
      Release(conn, /*healthy=*/false, /*lost=*/false);
      return status;
    }
  }
  std::vector<RedisReply> replies;
  replies.reserve(commands.size());
  absl::Status stopped;
  const IoOutcome outcome = DriveIo(c, commands.size(), op_deadline, &replies, &stopped);
  if (outcome == IoOutcome::kStopped) {
    // The caller gave up: the connection, mid-reply, cannot be reused, but nothing is said
    // about Redis (no backoff, the other connections stay).
    Release(conn, /*healthy=*/false, /*lost=*/false);
    return absl::Status(stopped.code(),
                        absl::StrCat("redis at ", endpoint_, ": stopped waiting for the reply after ",
                                     MsBetween(start, RedisClock::now()), " ms: ", stopped.message()));
  }
  if (outcome != IoOutcome::kOk) {
    const int64_t ran_ms = MsBetween(start, RedisClock::now());
    const absl::Status status =
        outcome == IoOutcome::kDeadline
            ? absl::DeadlineExceededError(absl::StrCat(
                  "redis at ", endpoint_, " did not complete the operation within ", ran_ms,
                  " ms (", replies.size(), " of ", commands.size(), " replies; limit: ",
                  caller_limited
                      ? std::string("the call's remaining time")
                      : absl::StrCat("redis_command_timeout_ms = ", options_.command_timeout_ms),
                  ")"))
            : absl::UnavailableError(
                  absl::StrCat("redis at ", endpoint_, ": connection lost: ", c->errstr));
    // The connection is mid-reply: it cannot be reused. After a lost connection or a timeout
    // of the configured length (a stalled server, where each attempt costs a full timeout)
    // every idle connection is suspect too: they are retired, and after such a timeout calls
    // fail fast for a backoff period instead of each paying the timeout again.
    const bool server_fault = outcome == IoOutcome::kLost || !caller_limited;
    Release(conn, /*healthy=*/false, /*lost=*/server_fault);
    if (outcome == IoOutcome::kDeadline && !caller_limited) {
      absl::MutexLock lock(&mu_);
      NoteConnectFailure(status);
    }
    return status;
  }
  Release(conn, /*healthy=*/true, /*lost=*/false);
  {
    absl::MutexLock lock(&mu_);
    healthy_ = true;
    backoff_ms_ = 0;
  }
  return replies;
}

absl::StatusOr<RedisReply> RedisClient::Command(const RedisArgs& args, RedisOperationDeadline op) {
  ASSIGN_OR_RETURN(std::vector<RedisReply> replies, Pipeline(absl::MakeConstSpan(&args, 1), op));
  return std::move(replies[0]);
}

absl::Status RedisClient::Ping(RedisDeadline deadline) {
  ASSIGN_OR_RETURN(RedisReply reply, Command({"PING"}, deadline));
  if (reply->type == REDIS_REPLY_ERROR) {
    return absl::UnavailableError(absl::StrCat(
        "redis at ", endpoint_, ": PING refused: ", std::string(reply->str, reply->len)));
  }
  return absl::OkStatus();
}

}  // namespace ctxcache
