// Scale-out end to end (issue 18): three ctxcache-server processes sharing a Redis Cluster of
// three primaries, each with a replica (tests/redis_cluster.h, redis-server from Debian), and
// one client spreading Compress / Generate / Delete / GetContext over them round robin, while
// a primary is killed (its replica takes over) and restarted, and a context's hash slot is
// migrated to another primary (CLUSTER SETSLOT ... MIGRATING/IMPORTING + MIGRATE).
//
// Pass:
//  * every OK answer equals the no-cache answer: the same question about the same document,
//    answered greedily by a fourth server with no Redis and no memory tier (the context
//    computed for that request alone);
//  * a deleted context is NOT_FOUND on every replica within 1 s (the invalidation);
//  * no request fails outside the window in which a primary is down (from the kill until the
//    cluster is healthy again, plus the servers' Redis circuit cool-down).
// Skips without redis-server or the model, or fails when CTXCACHE_REQUIRE_REDIS=1 /
// CTXCACHE_REQUIRE_MODEL=1 (CI).
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/redis_cluster.h"
#include "ctxcache/v1/ctxcache.grpc.pb.h"
#include "tests/redis_cluster.h"
#include "tests/redis_server.h"
#include "tests/test_util.h"

extern char** environ;

namespace ctxcache {
namespace {

namespace pb = ::ctxcache::v1;
using Clock = std::chrono::steady_clock;

// Short documents with one fact each, so that every answer is short and deterministic.
const std::vector<std::string>& Documents() {
  static const std::vector<std::string> docs = {
      "The lighthouse on Varrow Point was built in 1873 by the engineer Ada Quint. Its lamp "
      "burned whale oil until 1921, when it was converted to electricity.",
      "Marlow's bakery opens at six every morning. Its best-known loaf is a rye sourdough "
      "called the Black Anchor, baked only on Fridays.",
      "The river Tesk rises in the Orran hills and flows north for 212 kilometres before it "
      "reaches the sea at the port of Halden.",
      "In the game of Quarrel, each player starts with seven stones. A player who captures the "
      "opponent's last stone wins the round.",
      "The library cat is named Pim. Pim sleeps on the returns desk and is fed twice a day by "
      "the head librarian, Mr. Osei.",
      "Project Kestrel shipped its first satellite in March. The satellite weighs 44 kilograms "
      "and carries a camera built by Lumen Optics.",
  };
  return docs;
}
const std::vector<std::string>& Questions() {
  static const std::vector<std::string> q = {"What is the subject of the text?",
                                             "Give one number from the text."};
  return q;
}

std::string ServerBin() { return CTXCACHE_SERVER_BIN; }

// A ctxcache-server process on a free loopback port; killed (SIGKILL) when destroyed.
class ServerProcess {
 public:
  std::string Start(const std::vector<std::string>& extra, const std::string& log) {
    const int port = testing::FreeLoopbackPort();
    address_ = absl::StrCat("127.0.0.1:", port);
    log_ = log;
    std::vector<std::string> args = {ServerBin(), "--listen", address_, "--workers", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&files, 1, 2);
    const int rc = posix_spawn(&pid_, argv[0], &files, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&files);
    if (rc != 0) return absl::StrCat("posix_spawn ", argv[0], ": ", rc);
    channel_ = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    stub_ = pb::ContextCache::NewStub(channel_);
    const auto until = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < until) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      pb::GetModelInfoResponse info;
      if (stub_->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &info).ok()) return "";
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return "ctxcache-server exited at start; log " + log;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return "ctxcache-server did not answer within 60 s; log " + log;
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  pb::ContextCache::Stub& stub() { return *stub_; }
  const std::string& address() const { return address_; }

 private:
  pid_t pid_ = -1;
  std::string address_, log_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::ContextCache::Stub> stub_;
};

pb::CompressRequest CompressDoc(const std::string& doc) {
  pb::CompressRequest req;
  req.mutable_document()->set_text(doc);
  req.mutable_compression()->set_method("snapkv");
  req.mutable_compression()->set_ratio(2);
  return req;
}

pb::GenerateRequest Ask(const std::string& question) {
  pb::GenerateRequest req;
  pb::ChatMessage* m = req.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content(question);
  req.mutable_sampling()->set_temperature(0);
  req.set_max_tokens(12);
  return req;
}

std::unique_ptr<grpc::ClientContext> Call(int seconds = 30) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return ctx;
}

// The answer text, or the call's status.
grpc::Status Generate(pb::ContextCache::Stub& stub, const pb::GenerateRequest& req,
                      std::string* text) {
  auto ctx = Call();
  auto reader = stub.Generate(ctx.get(), req);
  pb::GenerateResponse msg;
  text->clear();
  while (reader->Read(&msg)) *text += msg.text();
  return reader->Finish();
}

class ScaleOutTest : public testing::FastModelTest {
 protected:
  void SetUp() override {
    FastModelTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    binary_ = testing::FindRedisServer();
    if (binary_.empty()) {
      if (testing::RequireRedis()) FAIL() << "redis-server not found and CTXCACHE_REQUIRE_REDIS=1";
      GTEST_SKIP() << "redis-server not found (tools/setup.sh installs it)";
    }
    char dir[] = "/tmp/ctxcache-scale-out-XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = dir;
  }
  std::string binary_, dir_;
};

TEST_F(ScaleOutTest, ThreeReplicasOverAClusterWithAFailoverAndAMigration) {
  testing::LocalRedisClusterOptions co;
  co.primaries = 3;
  co.replicas_per_primary = 1;
  co.node_timeout_ms = 1000;
  testing::LocalRedisCluster cluster(binary_, co);
  ASSERT_EQ(cluster.Start(), "");

  // The no-cache reference: no Redis, no memory tier; every request computes its context.
  ServerProcess reference;
  ASSERT_EQ(reference.Start({"--memory-cache-bytes", "0"}, dir_ + "/reference.log"), "");
  std::vector<std::vector<std::string>> expected(Documents().size());
  for (size_t d = 0; d < Documents().size(); ++d) {
    for (const std::string& q : Questions()) {
      pb::GenerateRequest req = Ask(q);
      *req.add_contexts()->mutable_inline_() = CompressDoc(Documents()[d]);
      std::string text;
      const grpc::Status s = Generate(reference.stub(), req, &text);
      ASSERT_TRUE(s.ok()) << s.error_message();
      expected[d].push_back(text);
    }
  }

  // Three replicas on the cluster. Short Redis timeouts and cool-down, so that an outage
  // plays out in the time this test has; the memory tier small enough to evict now and then.
  ServerProcess servers[3];
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(
        servers[i].Start({"--redis-url", cluster.SeedUrl(), "--redis-connect-timeout-ms", "200",
                          "--redis-command-timeout-ms", "500", "--redis-circuit-cool-down-ms",
                          "300", "--memory-cache-bytes", "4MiB"},
                         absl::StrCat(dir_, "/server", i, ".log")),
        "");
  }

  // Events mid-run: a primary killed after a third of the operations (restarted once its
  // replica has taken over), a slot migrated after two thirds, on a thread of its own.
  const int kOps = 72;
  // The outage, as steady-clock ticks (atomics: the event thread ends it); 0 = not yet.
  std::atomic<int64_t> down_from{0}, down_until{0};
  auto ticks = [](Clock::time_point t) {
    return static_cast<int64_t>(t.time_since_epoch().count());
  };
  std::thread events;
  std::string migration_error;
  int migrated_slot = -1;

  std::vector<std::string> ids(Documents().size());
  std::vector<bool> deleted(Documents().size(), true);  // nothing compressed yet
  int ok = 0, failed_in_window = 0, answers_checked = 0, deletes_checked = 0;
  std::vector<std::string> failures;
  auto in_window = [&](Clock::time_point t) {
    const int64_t from = down_from.load(), until = down_until.load();
    if (from == 0 || ticks(t) < from) return false;
    // The servers' circuit breaker keeps skipping Redis for its cool-down (300 ms) after the
    // outage, and a Redis client's reconnection backoff may outlast it a little (at most
    // redis_backoff_max_ms, 5 s by default, after the failed connects to the dead primary).
    return until == 0 ||
           t <= Clock::time_point(Clock::duration(until)) + std::chrono::milliseconds(300 + 5000);
  };

  for (int op = 0; op < kOps; ++op) {
    if (op == kOps / 3) {
      down_from = ticks(Clock::now());
      cluster.Kill(0);
      events = std::thread([&] { migration_error = cluster.WaitFailover(0, 20000); });
    }
    if (op == kOps / 2) {
      // Restarted on this thread: a node dies with the thread that started it
      // (PR_SET_PDEATHSIG), and this one lives as long as the test.
      events.join();
      ASSERT_EQ(migration_error, "") << "failover";
      ASSERT_EQ(cluster.Restart(0), "");
      ASSERT_EQ(cluster.WaitHealthy(20000), "");
      down_until = ticks(Clock::now());
    }
    if (op == 2 * kOps / 3) {
      // Migrate the slot of document 0's context to another primary, while requests go on.
      const std::string meta = absl::StrCat("ctxcache:{default:", ids[0], "}:m");
      migrated_slot = RedisKeySlot(meta);
      const int from = cluster.PrimaryForSlot(migrated_slot);
      int to = -1;
      for (int n = 0; n < cluster.nodes() && to < 0; ++n) {
        if (n != from && cluster.running(n) && !cluster.SlotRangesOf(n).empty()) to = n;
      }
      ASSERT_GE(from, 0);
      ASSERT_GE(to, 0);
      events = std::thread([&cluster, &migration_error, from, to, slot = migrated_slot] {
        migration_error = cluster.BeginMigration(slot, from, to);
        if (migration_error.empty()) {
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          migration_error = cluster.MigrateKeys(slot, from, to, /*max_keys=*/1);
        }
        if (migration_error.empty()) {
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          migration_error = cluster.MigrateSlot(slot, from, to);  // the rest, and the owner
        }
      });
    }

    const size_t d = static_cast<size_t>(op) % Documents().size();
    // Each document's operations rotate over the replicas (op / 6 shifts the pairing).
    const int replica = (op + op / static_cast<int>(Documents().size())) % 3;
    pb::ContextCache::Stub& stub = servers[replica].stub();
    const auto started = Clock::now();
    grpc::Status status;
    const int kind = (op / static_cast<int>(Documents().size())) % 4;
    if (deleted[d] || kind == 0) {
      pb::CompressResponse resp;
      status = stub.Compress(Call().get(), CompressDoc(Documents()[d]), &resp);
      if (status.ok()) {
        if (!ids[d].empty()) {
          EXPECT_EQ(resp.context().context_id(), ids[d]);  // a content hash: the same everywhere
        }
        ids[d] = resp.context().context_id();
        deleted[d] = false;
      }
    } else if (kind == 3 && d % 2 == 1) {
      // Every replica holds the context in its memory tier (GetContext loads it from Redis);
      // deleted on this one, it is NOT_FOUND on every replica within 1 s.
      for (ServerProcess& server : servers) {
        pb::GetContextRequest get;
        get.set_context_id(ids[d]);
        pb::GetContextResponse info;
        server.stub().GetContext(Call().get(), get, &info);  // an outage may fail it: fine
      }
      pb::DeleteContextRequest req;
      req.set_context_id(ids[d]);
      pb::DeleteContextResponse resp;
      status = stub.DeleteContext(Call().get(), req, &resp);
      if (status.ok()) {
        deleted[d] = true;
        ++deletes_checked;
        for (int r = 0; r < 3; ++r) {
          const auto until = Clock::now() + std::chrono::seconds(1);
          grpc::StatusCode code = grpc::StatusCode::OK;
          do {
            pb::GetContextRequest get;
            get.set_context_id(ids[d]);
            pb::GetContextResponse info;
            code = servers[r].stub().GetContext(Call().get(), get, &info).error_code();
            if (code == grpc::StatusCode::NOT_FOUND) break;
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
          } while (Clock::now() < until);
          if (code != grpc::StatusCode::NOT_FOUND && !in_window(Clock::now())) {
            failures.push_back(absl::StrCat("op ", op, ": deleted context ", ids[d],
                                            " still answers ", static_cast<int>(code),
                                            " on replica ", r, " after 1 s"));
          }
        }
      }
    } else {
      const size_t q = static_cast<size_t>(op / 3) % Questions().size();
      pb::GenerateRequest req = Ask(Questions()[q]);
      req.add_contexts()->set_context_id(ids[d]);
      std::string text;
      status = Generate(stub, req, &text);
      if (status.ok()) {
        ++answers_checked;
        if (text != expected[d][q]) {
          failures.push_back(absl::StrCat("op ", op, ": replica ", replica, " answered \"", text,
                                          "\" about document ", d, ", the no-cache answer is \"",
                                          expected[d][q], "\""));
        }
      }
    }
    if (status.ok()) {
      ++ok;
    } else if (in_window(started) || in_window(Clock::now())) {
      ++failed_in_window;
    } else {
      failures.push_back(absl::StrCat("op ", op, " on replica ", replica,
                                      " failed outside the outage: ", status.error_message()));
    }
  }
  if (events.joinable()) events.join();
  EXPECT_EQ(migration_error, "");
  for (const std::string& f : failures) ADD_FAILURE() << f;
  std::printf(
      "%d operations: %d OK (%d answers compared with the no-cache answer, %d deletes seen "
      "on all replicas), %d failed while a primary was down (%.1f s); slot %d migrated\n",
      kOps, ok, answers_checked, deletes_checked, failed_in_window,
      static_cast<double>(down_until.load() - down_from.load()) * Clock::period::num /
          Clock::period::den,
      migrated_slot);
  EXPECT_GT(answers_checked, kOps / 3);
  EXPECT_GT(deletes_checked, 2);
}

}  // namespace
}  // namespace ctxcache
