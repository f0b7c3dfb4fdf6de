// A real redis-server for integration tests: started by the test on a free loopback port,
// with no persistence, in a temporary directory, and killed at teardown. It can be killed
// and restarted on the same port (to test reconnection), or paused (SIGSTOP, a Redis that
// accepts connections and never answers).
//
// Tests decide what a missing binary means (FindRedisServer() returns ""): skip, or fail
// when CTXCACHE_REQUIRE_REDIS=1 (CI), in the test body or SetUp where GTEST_SKIP works.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace ctxcache::testing {

// The redis-server binary: CTXCACHE_REDIS_SERVER, else PATH, else /usr/bin; "" if none.
inline std::string FindRedisServer() {
  if (const char* env = std::getenv("CTXCACHE_REDIS_SERVER"); env != nullptr && *env != '\0') {
    return access(env, X_OK) == 0 ? std::string(env) : std::string();
  }
  std::vector<std::string> dirs;
  if (const char* path = std::getenv("PATH")) {
    std::stringstream ss(path);
    for (std::string dir; std::getline(ss, dir, ':');) {
      if (!dir.empty()) dirs.push_back(dir);
    }
  }
  dirs.push_back("/usr/bin");
  dirs.push_back("/usr/sbin");
  for (const std::string& dir : dirs) {
    const std::string candidate = dir + "/redis-server";
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

inline bool RequireRedis() {
  const char* env = std::getenv("CTXCACHE_REQUIRE_REDIS");
  return env != nullptr && std::string(env) == "1";
}

// In a gtest body: declares `var` as the redis-server binary, or ends the test: a failure
// when CTXCACHE_REQUIRE_REDIS=1, else a skip with the reason.
#define CTXCACHE_REDIS_SERVER_OR_SKIP(var)                                                  \
  const std::string var = ::ctxcache::testing::FindRedisServer();                          \
  if (var.empty()) {                                                                       \
    if (::ctxcache::testing::RequireRedis()) {                                             \
      FAIL() << "redis-server not found and CTXCACHE_REQUIRE_REDIS=1";                     \
    }                                                                                      \
    GTEST_SKIP() << "redis-server not found (tools/setup.sh installs it)";                 \
  }

// A port nothing listens on right now (the kernel's pick for a bound-then-closed socket).
inline int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

class RedisServer {
 public:
  // extra_args: more redis-server options, e.g. {"--requirepass", "secret"}.
  RedisServer(std::string binary, std::vector<std::string> extra_args = {})
      : binary_(std::move(binary)), extra_args_(std::move(extra_args)) {
    char tmpl[] = "/tmp/ctxcache-redis-XXXXXX";
    if (mkdtemp(tmpl) != nullptr) dir_ = tmpl;
  }
  ~RedisServer() {
    Kill();
    if (!dir_.empty()) {
      std::remove((dir_ + "/redis.log").c_str());
      rmdir(dir_.c_str());
    }
  }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  // Starts the server and waits until it answers. The first start picks a free port (and
  // tries another if a race took it); later starts reuse it. "" on success, else why not.
  std::string Start() {
    if (pid_ > 0) return "already running";
    if (dir_.empty()) return "cannot create a temporary directory";
    const bool pick_port = port_ <= 0;
    std::string error;
    for (int attempt = 0; attempt < (pick_port ? 5 : 1); ++attempt) {
      if (pick_port) port_ = FreeLoopbackPort();
      error = StartOnce();
      if (error.empty()) return "";
    }
    return error;
  }

  // SIGKILL: a crash, no goodbye to clients. Idempotent.
  void Kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);  // a paused server must be able to die
    ::kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  // SIGSTOP / SIGCONT: the kernel still accepts connections, the server never answers.
  void Pause() {
    if (pid_ > 0) ::kill(pid_, SIGSTOP);
  }
  void Resume() {
    if (pid_ > 0) ::kill(pid_, SIGCONT);
  }

  int port() const { return port_; }
  bool running() const { return pid_ > 0; }
  // redis://[userinfo@]127.0.0.1:port[/db]; userinfo such as ":secret" or "alice:pw".
  std::string Url(const std::string& userinfo = "", int db = 0) const {
    std::string url = "redis://";
    if (!userinfo.empty()) url += userinfo + "@";
    url += "127.0.0.1:" + std::to_string(port_);
    if (db != 0) url += "/" + std::to_string(db);
    return url;
  }

  // A raw connection for inspecting and damaging keys (caller frees with redisFree), with a
  // 2 s timeout so that a broken test fails instead of hanging. `auth`: AUTH arguments.
  redisContext* Connect(const std::vector<std::string>& auth = {}) const {
    redisContext* c = redisConnectWithTimeout("127.0.0.1", port_, timeval{2, 0});
    if (c == nullptr || c->err != 0) {
      if (c != nullptr) redisFree(c);
      return nullptr;
    }
    redisSetTimeout(c, timeval{2, 0});
    if (!auth.empty()) {
      std::vector<const char*> argv = {"AUTH"};
      std::vector<size_t> lens = {4};
      for (const std::string& a : auth) {
        argv.push_back(a.data());
        lens.push_back(a.size());
      }
      auto* r = static_cast<redisReply*>(
          redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data()));
      const bool ok = r != nullptr && r->type != REDIS_REPLY_ERROR;
      if (r != nullptr) freeReplyObject(r);
      if (!ok) {
        redisFree(c);
        return nullptr;
      }
    }
    return c;
  }

  std::string LogTail() const {
    std::ifstream in(dir_ + "/redis.log");
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return all.size() > 2000 ? all.substr(all.size() - 2000) : all;
  }

 private:
  std::string StartOnce() {
    std::vector<std::string> args = {binary_,
                                     "--port",
                                     std::to_string(port_),
                                     "--bind",
                                     "127.0.0.1",
                                     "--save",
                                     "",
                                     "--appendonly",
                                     "no",
                                     "--daemonize",
                                     "no",
                                     "--dir",
                                     dir_,
                                     "--logfile",
                                     dir_ + "/redis.log"};
    args.insert(args.end(), extra_args_.begin(), extra_args_.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // fork + exec rather than posix_spawn, for two things only the child can do: die with the
    // test (PR_SET_PDEATHSIG: a crashed test leaves no server behind), and drop the test's
    // stdout/stderr (a server holding ctest's pipe open would hang ctest until its timeout).
    const int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0) return std::string("open /dev/null: ") + std::strerror(errno);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
      close(devnull);
      return std::string("fork: ") + std::strerror(errno);
    }
    if (pid == 0) {  // child: async-signal-safe calls only
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);  // the test died before prctl took effect
      dup2(devnull, STDIN_FILENO);
      dup2(devnull, STDOUT_FILENO);
      dup2(devnull, STDERR_FILENO);
      execv(binary_.c_str(), argv.data());
      _exit(127);
    }
    close(devnull);
    pid_ = pid;
    // Ready when anything answers PING (NOAUTH counts: the server is up).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return "redis-server exited at start (port " + std::to_string(port_) + "); log:\n" +
               LogTail();
      }
      if (redisContext* c = redisConnectWithTimeout("127.0.0.1", port_, timeval{0, 200000})) {
        bool up = false;
        if (c->err == 0) {
          redisSetTimeout(c, timeval{0, 500000});
          if (auto* r = static_cast<redisReply*>(redisCommand(c, "PING"))) {
            up = true;
            freeReplyObject(r);
          }
        }
        redisFree(c);
        if (up) return "";
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    Kill();
    return "redis-server did not answer PING within 10 s on port " + std::to_string(port_) +
           "; log:\n" + LogTail();
  }

  std::string binary_;
  std::vector<std::string> extra_args_;
  std::string dir_;
  int port_ = -1;
  pid_t pid_ = -1;
};

}  // namespace ctxcache::testing
