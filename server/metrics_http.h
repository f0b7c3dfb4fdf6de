// The Prometheus scrape endpoint: a minimal HTTP/1.1 server on one thread answering
// `GET /metrics` (and HEAD) with the registry's text exposition, `GET /health` with 200
// SERVING or 503 NOT_SERVING (what Kubernetes probes ask when the gRPC port speaks TLS, which
// its native gRPC probes cannot), 404 for any other path, 405 for other methods. Each
// connection carries one request and is closed after the answer. With TLS (server/tls.h) it
// speaks HTTPS only, with the server's certificate; it never asks for a client certificate
// (probes and scrapers do not have one: keep the port on a private network).
//
// Why our own server rather than civetweb: this endpoint serves one scraper a few times a
// minute, with a body produced in memory. About 200 lines of poll/accept/read/write give exact
// bind errors, port 0 (tests), bounded requests (8 KiB head, 5 s per connection, so a stalled
// client delays a scrape by at most that) and no extra runtime library in the server image
// (civetweb would add libcivetweb to every deployment for one GET). It is not a general HTTP
// server: no keep-alive, no bodies, no chunked requests.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

typedef struct ssl_ctx_st SSL_CTX;

namespace ctxcache::server {

class TlsCredentials;

class MetricsHttpServer {
 public:
  // Produces the body of GET /metrics (called on the server's thread).
  using Render = std::function<std::string()>;

  struct Options {
    Render render;
    std::function<bool()> serving;        // GET /health; null = always serving
    const TlsCredentials* tls = nullptr;  // HTTPS with these; outlives the server
  };
  // Binds `address` (HOST:PORT, "[v6]:PORT"; port 0 = any free port) and starts serving.
  // Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  Options options);
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  Render render) {
    return Start(address, Options{std::move(render), nullptr, nullptr});
  }
  // Stops the thread and closes the socket.
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer(int listen_fd, int wake_fd, int port, Options options);
  void Loop();
  void Serve(int fd);

  const int listen_fd_, wake_fd_;
  const int port_;
  const Options options_;
  SSL_CTX* ssl_ctx_ = nullptr;  // with TLS
  std::thread thread_;
};

}  // namespace ctxcache::server
