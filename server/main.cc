// `ctxcache-server`: serves the ctxcache.v1.ContextCache gRPC API. With no arguments it serves
// the default model on 127.0.0.1:50051 with the embedded memory cache; see --help for the
// settings (flags, CTXCACHE_* environment, YAML file). SIGTERM or SIGINT drains gracefully:
// health NOT_SERVING, new calls refused, in-flight calls finish (up to drain_timeout_seconds).
// Exit codes: 0 after a clean drain, 1 on a start-up error, 2 on a configuration error.
#include <signal.h>

#include <cstdio>
#include <string>
#include <thread>

#include <spdlog/spdlog.h>

#include "server/config.h"
#include "server/logging.h"
#include "engine/cpu/blas_kernels.h"
#include "server/server.h"

namespace ctxcache::server {
namespace {

int Main(int argc, char** argv) {
  absl::StatusOr<ServerConfig> config = LoadServerConfig(argc, argv, 1, CtxcacheEnvironment());
  if (!config.ok()) {
    std::fprintf(stderr, "ctxcache-server: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  if (config->help) {
    std::fputs(ServerUsage().c_str(), stdout);
    return 0;
  }
  if (absl::Status s = ConfigureLogging(config->log_format, config->log_level); !s.ok()) {
    std::fprintf(stderr, "ctxcache-server: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  // Signals are taken by one thread with sigwait, so the drain runs as ordinary code rather
  // than in a signal handler. Blocked before any other thread exists, so all inherit the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<std::unique_ptr<ServerInstance>> server = ServerInstance::Start(*config);
  if (!server.ok()) {
    spdlog::error("cannot start: {}", std::string(server.status().message()));
    return 1;
  }
  if (absl::Status s = (*server)->Load(); !s.ok()) {
    spdlog::error("cannot load: {}", std::string(s.message()));
    return 1;
  }
  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("{} received: draining (up to {} s)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               config->drain_timeout_seconds);
  const bool clean = (*server)->Drain(config->drain_timeout_seconds);
  server->reset();
  return clean ? 0 : 1;
}

}  // namespace
}  // namespace ctxcache::server

int main(int argc, char** argv) {
  ctxcache::UseBestBlasKernels(argv);  // may re-execute (engine/cpu/blas_kernels.h)
  return ctxcache::server::Main(argc, argv);
}
