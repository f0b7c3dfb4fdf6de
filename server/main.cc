// `ctxcache-server`: serves the ctxcache.v1.ContextCache gRPC API. With no arguments it serves
// the default model on 127.0.0.1:50051 with the embedded memory cache; see --help for the
// settings (flags, CTXCACHE_* environment, YAML file). SIGTERM or SIGINT drains gracefully:
// health NOT_SERVING, new calls refused, in-flight calls finish (up to drain_timeout_seconds,
// then they are stopped); a second signal exits at once (status 1). SIGHUP re-reads the token
// file, the client-certificate tenants file and the certificates (they are also re-read when
// they change, every tls_reload_seconds).
// Exit codes: 0 after a clean drain, 1 on a start-up error, 2 on a configuration error.
#include <signal.h>
#include <unistd.h>

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
  sigaddset(&signals, SIGHUP);
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
  for (;;) {
    sigwait(&signals, &sig);
    if (sig != SIGHUP) break;
    spdlog::info("SIGHUP received: reloading the auth files and certificates");
    (*server)->Reload();
  }
  spdlog::info("{} received: draining (up to {} s; a second signal exits at once)",
               sig == SIGTERM ? "SIGTERM" : "SIGINT", config->drain_timeout_seconds);
  // An operator who signals again does not want to wait for the drain: exit now, without
  // running destructors (threads are mid-work), status 1 as for an unclean drain. A handler,
  // not a second sigwait: threads started before the mask was set (a BLAS library's, at
  // load) do not block the signals, so a signal blocked everywhere else could land on one of
  // them and take the default action instead. Unblocked here, the main thread (which the
  // kernel prefers) runs the handler.
  struct sigaction exit_now = {};
  exit_now.sa_handler = [](int) {
    static constexpr char kMessage[] =
        "second signal received: exiting without finishing the drain\n";
    (void)!write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
    _exit(1);
  };
  sigaction(SIGTERM, &exit_now, nullptr);
  sigaction(SIGINT, &exit_now, nullptr);
  pthread_sigmask(SIG_UNBLOCK, &signals, nullptr);
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
