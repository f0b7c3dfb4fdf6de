// A fake Redis server on loopback for fault tests (redis_fault_test, server_e2e_test): it
// speaks just enough RESP for the Redis tier and can answer slowly, trickle a reply, or delay
// only writes. No redis-server is needed.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/loopback_acceptor.h"

namespace ctxcache::testing {

// A fake Redis on 127.0.0.1:<ephemeral>. It parses RESP command arrays and answers: PING
// +PONG; GET, GETDEL nil (every lookup is a miss); MGET an array of nils; SET +OK; EVAL as the
// tier's publication script does when it stores ({1, nil}); INCR, EXPIRE 1; PUBLISH 0; SUBSCRIBE as
// Redis does (then PING in the subscribed form); anything else an error reply. Knobs (atomic, may
// change while it runs):
//  * delay_ms: wait this long before each reply;
//  * set_delay_ms: wait this long before a SET's reply (writes only);
//  * trickle_ms: > 0 answers GET with a 30-byte bulk string sent one byte every trickle_ms
//    (a slow-but-alive server: every read of the client gets a byte well within any
//    per-syscall timeout);
//  * cluster: answers CLUSTER SLOTS with one range 0..16383 served by itself, and every other
//    command but PING with "MOVED <slot> 127.0.0.1:<its port>" (a redirect loop);
//  * error_reply (set before the first command): answers every command but PING with this
//    error reply, e.g. "CLUSTERDOWN The cluster is down" (CLUSTER SLOTS as with `cluster`).
class FakeRedis {
 public:
  FakeRedis() : acceptor_([this](int fd) { Serve(fd); }) {}
  ~FakeRedis() { acceptor_.Stop(); }

  std::string Url(const std::string& credentials = "") const {
    return absl::StrCat("redis://", credentials, "127.0.0.1:", acceptor_.port());
  }
  int commands() const { return commands_.load(); }

  int port() const { return acceptor_.port(); }

  std::atomic<int> delay_ms{0}, set_delay_ms{0}, trickle_ms{0};
  std::atomic<bool> cluster{false};
  std::string error_reply;

 private:
  // Sleeps up to `ms` in small steps, false when the server is stopping.
  bool Sleep(int ms) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < until) {
      if (acceptor_.stopping()) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return !acceptor_.stopping();
  }

  static bool Send(int fd, std::string_view s) {
    while (!s.empty()) {
      const ssize_t n = send(fd, s.data(), s.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      s.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  // One complete command from the front of `buf` (its name upper-cased and the argument
  // count), or false when more bytes are needed.
  static bool TakeCommand(std::string& buf, std::string* name, int* argc) {
    size_t p = 0;
    auto line = [&](std::string* out) {
      const size_t e = buf.find("\r\n", p);
      if (e == std::string::npos) return false;
      *out = buf.substr(p, e - p);
      p = e + 2;
      return true;
    };
    std::string l;
    if (!line(&l) || l.empty() || l[0] != '*') return false;
    const int n = std::stoi(l.substr(1));
    for (int i = 0; i < n; ++i) {
      if (!line(&l) || l.empty() || l[0] != '$') return false;
      const size_t len = std::stoul(l.substr(1));
      if (buf.size() < p + len + 2) return false;
      if (i == 0) {
        *name = buf.substr(p, len);
        for (char& c : *name) c = static_cast<char>(toupper(c));
      }
      p += len + 2;
    }
    *argc = n;
    buf.erase(0, p);
    return true;
  }

  void Serve(int fd) {
    bool subscribed = false;
    std::string buf;
    char chunk[65536];
    while (!acceptor_.stopping()) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 20) <= 0) continue;
      const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
      if (n <= 0) break;
      buf.append(chunk, static_cast<size_t>(n));
      std::string name;
      int argc = 0;
      bool ok = true;
      while (ok && TakeCommand(buf, &name, &argc)) {
        ++commands_;
        if (!Sleep(delay_ms.load())) break;
        if (name == "PING") {
          ok = Send(fd, subscribed ? "*2\r\n$4\r\npong\r\n$0\r\n\r\n" : "+PONG\r\n");
        } else if (name == "CLUSTER" && (cluster.load() || !error_reply.empty())) {
          const std::string port = std::to_string(acceptor_.port());
          ok = Send(fd, absl::StrCat("*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:", port,
                                     "\r\n$4\r\nfake\r\n"));
        } else if (cluster.load()) {
          ok = Send(fd, absl::StrCat("-MOVED 1 127.0.0.1:", acceptor_.port(), "\r\n"));
        } else if (!error_reply.empty()) {
          ok = Send(fd, "-" + error_reply + "\r\n");
        } else if (name == "GET" && trickle_ms.load() > 0) {
          const std::string reply = "$30\r\n" + std::string(30, 'x') + "\r\n";
          for (size_t i = 0; ok && i < reply.size(); ++i) {
            ok = Sleep(trickle_ms.load()) && Send(fd, reply.substr(i, 1));
          }
        } else if (name == "GET" || name == "GETDEL") {
          ok = Send(fd, "$-1\r\n");
        } else if (name == "MGET") {
          std::string r = absl::StrCat("*", argc - 1, "\r\n");
          for (int i = 1; i < argc; ++i) r += "$-1\r\n";
          ok = Send(fd, r);
        } else if (name == "SET") {
          ok = Sleep(set_delay_ms.load()) && Send(fd, "+OK\r\n");
        } else if (name == "EVAL") {
          ok = Send(fd, "*2\r\n:1\r\n$-1\r\n");
        } else if (name == "PUBLISH") {
          ok = Send(fd, ":0\r\n");
        } else if (name == "INCR" || name == "EXPIRE") {
          ok = Send(fd, ":1\r\n");
        } else if (name == "SUBSCRIBE") {
          subscribed = true;
          ok = Send(fd, "*3\r\n$9\r\nsubscribe\r\n$19\r\nctxcache:invalidate\r\n:1\r\n");
        } else {
          ok = Send(fd, "-ERR fake redis does not know " + name + "\r\n");
        }
      }
      if (!ok) break;
    }
    close(fd);
  }

  std::atomic<int> commands_{0};
  LoopbackAcceptor acceptor_;  // last: its threads use the members above
};

}  // namespace ctxcache::testing
