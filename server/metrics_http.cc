// The /metrics HTTP endpoint (see metrics_http.h).
#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "server/tls.h"
#include "spdlog/spdlog.h"

namespace ctxcache::server {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxHead = 8192;
constexpr auto kConnectionBudget = std::chrono::seconds(5);

int MillisLeft(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// Waits for `events` on fd until the deadline; false on timeout or error.
bool WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const int ms = MillisLeft(deadline);
    if (ms == 0) return false;
    pollfd p{fd, events, 0};
    const int r = poll(&p, 1, ms);
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) return false;
  }
}

// One accepted connection, plain or TLS, on a non-blocking socket; every operation ends by
// the connection's deadline.
class Conn {
 public:
  Conn(int fd, SSL_CTX* ctx, Clock::time_point deadline) : fd_(fd), deadline_(deadline) {
    if (ctx != nullptr) {
      ssl_ = SSL_new(ctx);
      if (ssl_ != nullptr) SSL_set_fd(ssl_, fd);
    }
  }
  ~Conn() {
    if (ssl_ != nullptr) {
      if (handshaken_) SSL_shutdown(ssl_);  // close_notify, best effort (non-blocking)
      SSL_free(ssl_);
    }
    ERR_clear_error();
  }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  // The TLS handshake (nothing for plain connections); false when it failed or timed out.
  bool Open(SSL_CTX* ctx) {
    if (ctx == nullptr) return true;
    if (ssl_ == nullptr) return false;
    handshaken_ = Retry([this] { return SSL_accept(ssl_); }) == 1;
    return handshaken_;
  }
  // Bytes read (0 at the end or on an error or timeout).
  ssize_t Read(char* buf, size_t size) {
    if (ssl_ != nullptr) {
      const int n = Retry([&] { return SSL_read(ssl_, buf, static_cast<int>(size)); });
      return n > 0 ? n : 0;
    }
    for (;;) {
      const ssize_t n = recv(fd_, buf, size, 0);
      if (n >= 0) return n;
      if (errno == EINTR) continue;
      if ((errno == EAGAIN || errno == EWOULDBLOCK) && WaitFor(fd_, POLLIN, deadline_)) continue;
      return 0;
    }
  }
  void WriteAll(const std::string& data) {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = 0;
      if (ssl_ != nullptr) {
        n = Retry([&] {
          return SSL_write(ssl_, data.data() + done, static_cast<int>(data.size() - done));
        });
        if (n <= 0) return;
      } else {
        n = send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
          if (!WaitFor(fd_, POLLOUT, deadline_)) return;
          continue;
        }
        if (n <= 0) return;
      }
      done += static_cast<size_t>(n);
    }
  }

 private:
  // Runs an OpenSSL call until it stops asking to wait for the socket.
  template <typename F>
  int Retry(F f) {
    for (;;) {
      const int r = f();
      if (r > 0) return r;
      const int e = SSL_get_error(ssl_, r);
      if (e == SSL_ERROR_WANT_READ && WaitFor(fd_, POLLIN, deadline_)) continue;
      if (e == SSL_ERROR_WANT_WRITE && WaitFor(fd_, POLLOUT, deadline_)) continue;
      return r;
    }
  }

  const int fd_;
  const Clock::time_point deadline_;
  SSL* ssl_ = nullptr;
  bool handshaken_ = false;
};

std::string Response(int code, const char* reason, const char* content_type,
                     const std::string& body, bool head, const char* extra_headers = "") {
  std::string r = absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ", content_type,
                               "\r\nContent-Length: ", body.size(), "\r\n", extra_headers,
                               "Connection: close\r\n\r\n");
  if (!head) r += body;
  return r;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, Options options) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics_listen ", address, ": no port"));
  }
  std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const int gai = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (gai != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_listen ", address, ": ", gai_strerror(gai)));
  }
  int fd = -1;
  std::string error = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) {
      error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 16) == 0) break;
    error = std::strerror(errno);
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve metrics on ", address, ": ", error,
        " (choose another with --metrics-listen HOST:PORT, or leave it empty to turn /metrics "
        "off)"));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  int bound_port = 0;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
    bound_port = bound.ss_family == AF_INET6
                     ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                     : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }
  const int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  }
  std::unique_ptr<MetricsHttpServer> s(
      new MetricsHttpServer(fd, wake, bound_port, std::move(options)));
  if (s->options_.tls != nullptr) {
    s->ssl_ctx_ = SSL_CTX_new(TLS_server_method());
    if (s->ssl_ctx_ == nullptr ||
        !s->options_.tls->SetUpSslCtx(s->ssl_ctx_, /*verify_clients=*/false)) {
      ERR_clear_error();
      return absl::InternalError("metrics_listen: OpenSSL refused the TLS settings");
    }
  }
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

MetricsHttpServer::MetricsHttpServer(int listen_fd, int wake_fd, int port, Options options)
    : listen_fd_(listen_fd), wake_fd_(wake_fd), port_(port), options_(std::move(options)) {}

MetricsHttpServer::~MetricsHttpServer() {
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
  close(listen_fd_);
  close(wake_fd_);
  SSL_CTX_free(ssl_ctx_);
}

void MetricsHttpServer::Loop() {
  for (;;) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const int r = poll(p, 2, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      spdlog::error("metrics endpoint: poll: {}", std::strerror(errno));
      return;
    }
    if (p[1].revents != 0) return;
    if (p[0].revents == 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) continue;  // EAGAIN, a client that gave up, EMFILE: try again on the next event
    Serve(fd);
    close(fd);
  }
}

void MetricsHttpServer::Serve(int fd) {
  const Clock::time_point deadline = Clock::now() + kConnectionBudget;
  Conn conn(fd, ssl_ctx_, deadline);
  if (!conn.Open(ssl_ctx_)) return;  // a plaintext request on the TLS port, a failed handshake
  std::string head;
  char buf[2048];
  while (head.find("\r\n\r\n") == std::string::npos && head.find("\n\n") == std::string::npos) {
    if (head.size() > kMaxHead) {
      conn.WriteAll(Response(431, "Request Header Fields Too Large", "text/plain", "", false));
      return;
    }
    const ssize_t n = conn.Read(buf, sizeof(buf));
    if (n <= 0) return;
    head.append(buf, static_cast<size_t>(n));
  }
  // Request line: METHOD SP TARGET SP HTTP/1.x
  const size_t eol = head.find_first_of("\r\n");
  const std::string line = head.substr(0, eol);
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0) {
    conn.WriteAll(Response(400, "Bad Request", "text/plain", "bad request\n", false));
    return;
  }
  const std::string method = line.substr(0, sp1);
  std::string path = line.substr(sp1 + 1, sp2 - sp1 - 1);
  path = path.substr(0, path.find('?'));
  const bool head_only = method == "HEAD";
  if (method != "GET" && !head_only) {
    conn.WriteAll(Response(405, "Method Not Allowed", "text/plain", "only GET\n", false,
                           "Allow: GET, HEAD\r\n"));
    return;
  }
  if (path == "/health") {
    const bool serving = !options_.serving || options_.serving();
    conn.WriteAll(
        serving ? Response(200, "OK", "text/plain", "SERVING\n", head_only)
                : Response(503, "Service Unavailable", "text/plain", "NOT_SERVING\n", head_only));
    return;
  }
  if (path != "/metrics") {
    conn.WriteAll(Response(404, "Not Found", "text/plain", "not found; try /metrics or /health\n",
                           head_only));
    return;
  }
  conn.WriteAll(Response(200, "OK", metrics::kContentType, options_.render(), head_only));
}

}  // namespace ctxcache::server
