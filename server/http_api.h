// The OpenAI-compatible HTTP API (--http-listen), on cpp-httplib (Debian's libcpp-httplib: a
// maintained, small library with a thread-per-connection server, chunked responses for
// Server-Sent Events, and TLS through OpenSSL for later; civetweb would do too but has no C++
// request/response types, and Boost.Beast would bring Boost and an async model we do not need).
//
// The same process as the gRPC service: the same engine workers, scheduler, cache, tokens and
// tenants, the same validation (a request becomes the gRPC request it means, then goes through
// the same FromProto and Handlers checks) and the same accounting (calls are counted, logged and
// metered as the gRPC method they are: Generate, Compress, GetContext, DeleteContext,
// GetModelInfo). The HTTP layer only translates.
//
//   POST /v1/chat/completions, POST /v1/completions   streaming (SSE) or not; `contexts`
//                                                      (ctxcache's extension) as ContextRef
//   POST /v1/contexts, GET|DELETE /v1/contexts/{id}    compress, look up, delete
//   GET /v1/models, GET /health
// Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP
// status that matches the gRPC code (HttpStatusFor).
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/service.h"
#include "server/tls.h"

namespace httplib {
class Server;
}

namespace ctxcache::server {

// The HTTP status for a gRPC-style status code (INVALID_ARGUMENT 400, UNAUTHENTICATED 401,
// PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, CANCELLED 499, UNAVAILABLE
// 503, DEADLINE_EXCEEDED 504, ...).
int HttpStatusFor(absl::StatusCode code);

// The id /v1/models lists for a model named `name` (general.name): lower case, runs of
// anything but letters, digits, '.', '_' and '-' as one '-'.
std::string ModelIdFor(const std::string& name);

class HttpApi {
 public:
  // Listens on HOST:PORT (port 0: any free port) and serves from `service` (which outlives
  // this). Requests before the model has loaded get 503; /health says "loading".
  // With `tls` (which outlives this) it speaks HTTPS only, and with mutual TLS requires a
  // client certificate (its identities can name the tenant, as on gRPC).
  static absl::StatusOr<std::unique_ptr<HttpApi>> Start(const std::string& listen,
                                                        ContextCacheService* service,
                                                        int64_t max_body_bytes,
                                                        const TlsCredentials* tls = nullptr);
  ~HttpApi();  // Stop()
  int port() const { return port_; }
  // Stops listening and waits for the requests in progress (their jobs finish or stop: a drain
  // that ran out of time has fired their stop checks).
  void Stop();

 private:
  HttpApi() = default;
  void Routes();

  ContextCacheService* service_ = nullptr;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace ctxcache::server
