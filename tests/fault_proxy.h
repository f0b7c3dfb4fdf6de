// A TCP fault proxy on loopback for tests against a real server (issue 14's Redis fault
// campaign): clients connect to the proxy, the proxy connects to the upstream (a real
// redis-server) and forwards both ways, damaging the upstream's replies as its mode says.
// The mode may change while connections are open; each connection applies the mode that
// holds when a reply's bytes arrive from the upstream.
//
//  * kPass: forward as is.
//  * kLatency: hold every reply chunk for latency_ms (a long link: full bandwidth, late).
//  * kTrickle: send replies one byte every trickle_ms (a slow-but-alive server; every read
//    of the client gets a byte well inside any per-syscall timeout).
//  * kReset: forward the first half of a reply chunk, then reset the client's connection
//    (RST: SO_LINGER 0) and drop the upstream one.
//  * kTruncate: forward the first half of a reply chunk, then close the client's connection
//    cleanly (FIN) and drop the upstream one.
//  * kBlackhole: requests are read and dropped, nothing is answered, connections stay open
//    (a server that accepts and never speaks).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/loopback_acceptor.h"

namespace ctxcache::testing {

class FaultProxy {
 public:
  enum Mode { kPass, kLatency, kTrickle, kReset, kTruncate, kBlackhole };

  static const char* ModeName(Mode m) {
    switch (m) {
      case kPass: return "pass";
      case kLatency: return "latency";
      case kTrickle: return "trickle";
      case kReset: return "reset";
      case kTruncate: return "truncate";
      case kBlackhole: return "blackhole";
    }
    return "?";
  }

  explicit FaultProxy(int upstream_port)
      : upstream_port_(upstream_port), acceptor_([this](int fd) { Serve(fd); }) {}
  ~FaultProxy() { acceptor_.Stop(); }
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  std::string Url() const { return absl::StrCat("redis://127.0.0.1:", acceptor_.port()); }
  void set_mode(Mode m) { mode_ = m; }
  Mode mode() const { return mode_.load(); }
  // Connections the proxy has accepted, and the ones it has broken (reset or truncated).
  int accepted() const { return acceptor_.accepted(); }
  int broken() const { return broken_.load(); }

  std::atomic<int> latency_ms{200}, trickle_ms{20};

 private:
  using Clock = std::chrono::steady_clock;

  int ConnectUpstream() const {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(upstream_port_));
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }

  static bool SendAll(int fd, std::string_view s) {
    while (!s.empty()) {
      const ssize_t n = send(fd, s.data(), s.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      s.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  // Forwards one client connection until either side closes, the proxy breaks it, or the
  // proxy stops. Replies wait in `pending` until their delivery time (latency) and leave one
  // byte at a time when trickling.
  void Serve(int client) {
    const int upstream = ConnectUpstream();
    if (upstream < 0) {
      close(client);
      return;
    }
    struct Chunk {
      Clock::time_point due;
      std::string bytes;
    };
    std::deque<Chunk> pending;
    Clock::time_point next_byte = Clock::now();
    bool client_open = true;
    bool broken = false;
    char buf[65536];
    while (!acceptor_.stopping() && client_open && !broken) {
      const Clock::time_point now = Clock::now();
      // Deliver what is due.
      while (!pending.empty() && pending.front().due <= now) {
        Chunk& c = pending.front();
        if (mode_ == kTrickle) {
          if (Clock::now() < next_byte) break;
          if (!SendAll(client, std::string_view(c.bytes).substr(0, 1))) client_open = false;
          c.bytes.erase(0, 1);
          next_byte = Clock::now() + std::chrono::milliseconds(trickle_ms.load());
        } else {
          if (!SendAll(client, c.bytes)) client_open = false;
          c.bytes.clear();
        }
        if (c.bytes.empty()) pending.pop_front();
        if (!client_open) break;
      }
      int timeout_ms = 20;
      if (!pending.empty()) {
        Clock::time_point due = std::max(pending.front().due,
                                         mode_ == kTrickle ? next_byte : Clock::time_point{});
        const auto wait =
            std::chrono::duration_cast<std::chrono::milliseconds>(due - Clock::now()).count();
        timeout_ms = static_cast<int>(std::clamp<int64_t>(wait, 0, 20));
      }
      pollfd p[2] = {{client, POLLIN, 0}, {upstream, POLLIN, 0}};
      if (poll(p, 2, timeout_ms) <= 0) continue;
      if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t n = recv(client, buf, sizeof(buf), 0);
        if (n <= 0) break;
        if (mode_ != kBlackhole && !SendAll(upstream, std::string_view(buf, n))) break;
      }
      if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t n = recv(upstream, buf, sizeof(buf), 0);
        if (n <= 0) break;
        const Mode m = mode_;
        if (m == kBlackhole) continue;
        if (m == kReset || m == kTruncate) {
          SendAll(client, std::string_view(buf, static_cast<size_t>(n) / 2));
          if (m == kReset) {
            const linger l{1, 0};
            setsockopt(client, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
          } else {
            shutdown(client, SHUT_RDWR);
          }
          ++broken_;
          broken = true;
          break;
        }
        const int delay = m == kLatency ? latency_ms.load() : 0;
        pending.push_back({Clock::now() + std::chrono::milliseconds(delay),
                           std::string(buf, static_cast<size_t>(n))});
      }
    }
    close(upstream);
    close(client);
  }

  const int upstream_port_;
  std::atomic<Mode> mode_{kPass};
  std::atomic<int> broken_{0};
  LoopbackAcceptor acceptor_;  // last: its threads use the members above
};

}  // namespace ctxcache::testing
