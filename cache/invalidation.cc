// Invalidation messages and the pub/sub listener (see invalidation.h).
#include "cache/invalidation.h"

#include <hiredis/hiredis.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"

namespace ctxcache {
namespace {

// This Debian's Abseil has its own string_view.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr std::string_view kTag = "ctxinv1";

bool IsPlain(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

int UpperHex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string EscapeName(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (IsPlain(static_cast<char>(c))) {
      out.push_back(static_cast<char>(c));
    } else {
      static constexpr char kHex[] = "0123456789ABCDEF";
      out += {'%', kHex[c >> 4], kHex[c & 15]};
    }
  }
  return out;
}

bool IsWriteId(std::string_view s) {
  return s.size() == 32 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct ContextFree {
  void operator()(redisContext* c) const { redisFree(c); }
};
using Connection = std::unique_ptr<redisContext, ContextFree>;

}  // namespace

absl::StatusOr<std::string> UnescapeRedisName(std::string_view escaped) {
  std::string out;
  out.reserve(escaped.size());
  for (size_t i = 0; i < escaped.size(); ++i) {
    const char c = escaped[i];
    if (IsPlain(c)) {
      out.push_back(c);
      continue;
    }
    const int hi = c == '%' && i + 2 < escaped.size() ? UpperHex(escaped[i + 1]) : -1;
    const int lo = hi >= 0 ? UpperHex(escaped[i + 2]) : -1;
    const char decoded = static_cast<char>(hi * 16 + lo);
    // Escape writes %XX (upper-case hex) for exactly the bytes that are not plain.
    if (hi < 0 || lo < 0 || IsPlain(decoded)) {
      return absl::DataLossError("not an escaped name");
    }
    out.push_back(decoded);
    i += 2;
  }
  return out;
}

std::string FormatInvalidation(const Invalidation& v) {
  const bool stored = v.kind == Invalidation::Kind::kStored;
  return absl::StrCat(Av(kTag), stored ? " s " : " d ", EscapeName(v.tenant), " ",
                      EscapeName(v.key), " ", stored ? v.write_id : "-");
}

absl::StatusOr<Invalidation> ParseInvalidation(std::string_view text) {
  auto bad = [text] {
    return absl::DataLossError(absl::StrCat("unreadable invalidation message \"",
                                            Av(text.substr(0, std::min<size_t>(text.size(), 120))),
                                            "\""));
  };
  const std::vector<absl::string_view> f = absl::StrSplit(Av(text), ' ');
  if (f.size() != 5 || f[0] != Av(kTag) || (f[1] != "d" && f[1] != "s")) return bad();
  Invalidation v;
  v.kind = f[1] == "s" ? Invalidation::Kind::kStored : Invalidation::Kind::kDeleted;
  absl::StatusOr<std::string> tenant =
      UnescapeRedisName(std::string_view(f[2].data(), f[2].size()));
  absl::StatusOr<std::string> key = UnescapeRedisName(std::string_view(f[3].data(), f[3].size()));
  if (!tenant.ok() || !key.ok() || key->empty()) return bad();
  if (v.kind == Invalidation::Kind::kStored ? !IsWriteId(std::string_view(f[4].data(), f[4].size()))
                                            : f[4] != "-") {
    return bad();
  }
  v.tenant = *std::move(tenant);
  v.key = *std::move(key);
  if (v.kind == Invalidation::Kind::kStored) v.write_id = std::string(f[4]);
  return v;
}

InvalidationListener::InvalidationListener(InvalidationListenerOptions options)
    : options_(std::move(options)) {
  thread_ = std::thread([this] { Run(); });
}

InvalidationListener::~InvalidationListener() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

bool InvalidationListener::WaitFirstAttempt(absl::Duration timeout) const {
  const absl::Time end = absl::Now() + timeout;
  while (!subscribed() && attempts_.load(std::memory_order_relaxed) == 0) {
    if (absl::Now() >= end) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return subscribed();
}

bool InvalidationListener::SleepUnlessStopping(int64_t ms) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(ms));
  return !stopping_;
}

void InvalidationListener::Run() {
  // hiredis writes with write(2): a node that closed the socket would raise SIGPIPE. This
  // thread blocks it for its whole life (the signal then stays pending on it, harmlessly).
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  std::mt19937 rng(std::random_device{}());
  int64_t backoff = 0;
  size_t next = 0;
  bool ever_subscribed = false;
  std::string last_why;
  int64_t last_warned_ms = 0;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
    }
    const std::vector<RedisUrl> nodes = options_.nodes ? options_.nodes() : std::vector<RedisUrl>{};
    std::string why = "no node to subscribe on";
    bool was_subscribed = false;
    if (!nodes.empty()) {
      const RedisUrl& node = nodes[next % nodes.size()];
      why = Session(node, &ever_subscribed, &was_subscribed);
      attempts_.fetch_add(1, std::memory_order_relaxed);
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) return;
      }
      // A lasting failure (Redis down, SUBSCRIBE refused) warns once a minute, not per retry.
      const int64_t now = NowMs();
      if (why != last_why || now - last_warned_ms >= 60000) {
        spdlog::warn("redis tier: invalidation subscription to {}:{} ended: {}{}", node.host,
                     node.port, why, nodes.size() > 1 ? "; trying the next node" : "");
        last_why = why;
        last_warned_ms = now;
      }
      ++next;  // the next node (a cluster's primary may be gone)
    }
    // Backoff between attempts; a session that subscribed resets it.
    backoff = was_subscribed ? 0
              : backoff == 0 ? options_.backoff_initial_ms
                             : std::min<int64_t>(2 * backoff, options_.backoff_max_ms);
    std::uniform_real_distribution<double> jitter(0.8, 1.2);
    if (!SleepUnlessStopping(static_cast<int64_t>(static_cast<double>(backoff) * jitter(rng)))) {
      return;
    }
  }
}

std::string InvalidationListener::Session(const RedisUrl& node, bool* ever_subscribed,
                                          bool* subscribed) {
  const timeval connect_tv{options_.connect_timeout_ms / 1000,
                           (options_.connect_timeout_ms % 1000) * 1000};
  Connection c(redisConnectWithTimeout(node.host.c_str(), node.port, connect_tv));
  if (c == nullptr) return "cannot allocate a connection";
  if (c->err != 0) return absl::StrCat("cannot connect: ", c->errstr);
  redisEnableKeepAlive(c.get());
  redisSetTimeout(c.get(), connect_tv);  // for AUTH and SUBSCRIBE, which block
  auto run = [&c](const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const std::string& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    return RedisReply(static_cast<redisReply*>(
        redisCommandArgv(c.get(), static_cast<int>(argv.size()), argv.data(), lens.data())));
  };
  if (!node.password.empty()) {
    std::vector<std::string> auth = {"AUTH"};
    if (!node.user.empty()) auth.push_back(node.user);
    auth.push_back(node.password);
    RedisReply r = run(auth);
    if (r == nullptr) return absl::StrCat("AUTH got no answer: ", c->errstr);
    if (r->type == REDIS_REPLY_ERROR) {
      return absl::StrCat("AUTH refused: ", std::string(r->str, r->len));
    }
  }
  {
    RedisReply r = run({"SUBSCRIBE", options_.channel});
    if (r == nullptr) return absl::StrCat("SUBSCRIBE got no answer: ", c->errstr);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_STRING ||
        std::string_view(r->element[0]->str, r->element[0]->len) != "subscribe") {
      return r->type == REDIS_REPLY_ERROR
                 ? absl::StrCat("SUBSCRIBE refused: ", std::string(r->str, r->len))
                 : std::string("unexpected reply to SUBSCRIBE");
    }
  }
  const bool first = !*ever_subscribed;
  *ever_subscribed = true;
  *subscribed = true;
  if (options_.on_subscribed) options_.on_subscribed(first);
  subscribed_.store(true, std::memory_order_relaxed);
  // Counted last: whoever sees the count also sees the memory tier cleared and the flag up.
  if (!first) resubscriptions_.fetch_add(1, std::memory_order_release);
  struct Unsubscribed {
    std::atomic<bool>* flag;
    ~Unsubscribed() { flag->store(false, std::memory_order_relaxed); }
  } unsubscribed{&subscribed_};

  int64_t ping_sent_ms = -1;  // a PING awaiting its answer
  int64_t last_heard_ms = NowMs();
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return "stopped";
    }
    const int64_t now = NowMs();
    if (ping_sent_ms >= 0 && now - ping_sent_ms > options_.ping_interval_ms) {
      return absl::StrCat("no answer to PING within ", options_.ping_interval_ms, " ms");
    }
    if (ping_sent_ms < 0 && now - last_heard_ms >= options_.ping_interval_ms) {
      const char* ping = "PING";
      if (redisAppendCommandArgv(c.get(), 1, &ping, nullptr) != REDIS_OK)
        return "cannot queue PING";
      int done = 0;
      while (!done) {
        if (redisBufferWrite(c.get(), &done) != REDIS_OK) {
          return absl::StrCat("connection lost: ", c->errstr);
        }
      }
      ping_sent_ms = now;
    }
    pollfd p{};
    p.fd = c->fd;
    p.events = POLLIN;
    const int ready = poll(&p, 1, kPollMs);
    if (ready < 0 && errno != EINTR) return "poll failed";
    if (ready <= 0) continue;
    if (redisBufferRead(c.get()) != REDIS_OK) return absl::StrCat("connection lost: ", c->errstr);
    while (true) {
      void* raw = nullptr;
      if (redisGetReplyFromReader(c.get(), &raw) != REDIS_OK) return "protocol error";
      if (raw == nullptr) break;
      RedisReply reply(static_cast<redisReply*>(raw));
      last_heard_ms = NowMs();
      if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 2 ||
          reply->element[0]->type != REDIS_REPLY_STRING) {
        continue;
      }
      const std::string_view kind(reply->element[0]->str, reply->element[0]->len);
      if (kind == "pong") {
        ping_sent_ms = -1;
      } else if (kind == "message" && reply->elements == 3 &&
                 reply->element[2]->type == REDIS_REPLY_STRING) {
        absl::StatusOr<Invalidation> v =
            ParseInvalidation(std::string_view(reply->element[2]->str, reply->element[2]->len));
        if (!v.ok()) {
          malformed_.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        messages_.fetch_add(1, std::memory_order_relaxed);
        if (options_.on_message) options_.on_message(*v);
      }
    }
  }
}

}  // namespace ctxcache
