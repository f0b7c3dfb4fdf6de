// Cancellation and deadlines through a real server (issue 14, item 1) and single flight's
// per-caller stops (item 2): a call that ends (client cancel, deadline, drain) frees its
// engine worker and its KV reservation promptly wherever its work is (queued, compressing,
// prefilling), is counted with its real code, and shares a computation with other callers
// without failing them.
//
// Timing bounds here are generous on purpose: the target is 250 ms (p99) from the
// cancel to the worker being free, but these machines are shared and noisy, so a test asserts
// "< 2 s" where the unfixed server took the whole computation (tens of seconds on SmolLM2 with
// one thread per worker). The target itself is measured by
// tools/reliability/cancel_latency.py, not asserted here.
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ctxcache/v1/ctxcache.grpc.pb.h"
#include "server/logging.h"
#include "server/server.h"
#include "tests/redis_server.h"
#include "tests/test_util.h"

namespace ctxcache::testing {
namespace {

namespace pb = ::ctxcache::v1;
using server::ServerConfig;
using server::ServerInstance;
using Clock = std::chrono::steady_clock;

// A worker freed later than this after its call ended counts as "kept running" (see the top).
constexpr double kFreedWithinSeconds = 2.0;

// About 3,300 SmolLM2 tokens: 12 numbered paragraphs, so that every request that should not
// share a flight can use its own `salt`. One thread prefills it in several seconds here.
std::string LongDocument(const std::string& salt = "") {
  std::string doc;
  for (int i = 0; i < 12; ++i) {
    absl::StrAppend(&doc, "Part ", i + 1, salt, ". The Harbor Street Library was founded in ",
                    1880 + i,
                    " by the shipbuilder Margaret Olsen, who donated her collection of books on "
                    "navigation, astronomy and marine engineering. The original building burned "
                    "down, and the library moved to a former customs house on Quay Road, where it "
                    "still stands today. Its most valuable item is a hand-drawn map of the "
                    "northern coastline made by the cartographer Elias Brandt. The library is "
                    "open from Tuesday to Saturday, from nine in the morning until six in the "
                    "evening, and it is closed on public holidays. Membership is free for "
                    "residents of the town; visitors pay twelve euros per year. The current head "
                    "librarian started a program that teaches children to tie sailing knots and "
                    "read nautical charts. The reading room ceiling is painted with the "
                    "constellations of the winter sky, and a grey tabby named Compass sleeps on "
                    "the map table most afternoons.\n");
  }
  return doc;
}

pb::CompressRequest LongCompress(const std::string& method, const std::string& salt = "") {
  pb::CompressRequest req;
  req.mutable_document()->set_text(LongDocument(salt));
  req.mutable_compression()->set_method(method);
  req.mutable_compression()->set_ratio(4);
  return req;
}

void SetDeadline(grpc::ClientContext& ctx, double seconds) {
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::duration_cast<std::chrono::system_clock::duration>(
                       std::chrono::duration<double>(seconds)));
}

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Polls `done` every 2 ms for up to `timeout` seconds; true once it holds.
bool WaitFor(const std::function<bool()>& done, double timeout) {
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(timeout));
  while (!done()) {
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// A unary Compress on its own thread, with its context reachable for TryCancel.
struct AsyncCompress {
  grpc::ClientContext ctx;
  pb::CompressResponse resp;
  grpc::Status status;
  std::thread thread;

  void Start(pb::ContextCache::Stub& stub, pb::CompressRequest req) {
    thread = std::thread([this, &stub, req = std::move(req)] {
      status = stub.Compress(&ctx, req, &resp);
    });
  }
  void Join() {
    if (thread.joinable()) thread.join();
  }
  ~AsyncCompress() { Join(); }
};

class ServerCancelTest : public FastModelTest {
 protected:
  struct Running {
    std::unique_ptr<ServerInstance> server;
    std::unique_ptr<pb::ContextCache::Stub> stub;
    server::Scheduler& sched() { return *server->scheduler(); }
    bool Idle() {
      const server::SchedulerStats s = sched().Stats();
      return s.running == 0 && s.queued == 0 && s.reserved_kv_bytes == 0;
    }
  };

  static void SetUpTestSuite() { (void)server::ConfigureLogging("plain", "warn"); }

  // max_batch 1: a second call waits in the queue, not for a turn on the busy worker.
  static Running Start(int workers, int max_batch = 1) {
    ServerConfig c;
    c.listen = "127.0.0.1:0";
    c.workers = workers;
    c.max_batch = max_batch;
    c.threads_per_worker = 1;
    c.memory_cache_bytes = 256 << 20;
    c.max_kv_bytes = int64_t{4} << 30;
    c.drain_timeout_seconds = 10;
    Running r;
    absl::StatusOr<std::unique_ptr<ServerInstance>> s = ServerInstance::Start(c, &model());
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return r;
    r.server = *std::move(s);
    absl::Status loaded = r.server->Load();
    EXPECT_TRUE(loaded.ok()) << loaded;
    r.stub = pb::ContextCache::NewStub(
        grpc::CreateChannel(r.server->address(), grpc::InsecureChannelCredentials()));
    return r;
  }

  static std::string Metrics(Running& r) { return r.server->metrics().Render(); }
};

// Caught: a Compress ran to completion after its 200 ms deadline (issue: 118 s, logged OK),
// holding the only worker; prefill and scoring never asked the call's stop.
TEST_F(ServerCancelTest, CompressDeadlineStopsTheWorkAndFreesTheWorker) {
  Running r = Start(1);
  ASSERT_NE(r.stub, nullptr);
  grpc::ClientContext ctx;
  SetDeadline(ctx, 0.2);
  pb::CompressResponse resp;
  const grpc::Status s =
      r.stub->Compress(&ctx, LongCompress("expected_attention"), &resp);
  const auto ended = Clock::now();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  ASSERT_TRUE(WaitFor([&] { return r.Idle(); }, 60));
  EXPECT_LT(SecondsSince(ended), kFreedWithinSeconds)
      << "the worker kept compressing after the deadline";
  // Counted (and logged) with its real code, not OK.
  EXPECT_NE(
      Metrics(r).find("ctxcache_requests_total{rpc=\"Compress\",code=\"DEADLINE_EXCEEDED\"} 1"),
      std::string::npos)
      << Metrics(r);
  // The single worker serves the next request without waiting.
  grpc::ClientContext next_ctx;
  pb::CompressRequest next;
  next.mutable_document()->set_text("A short note about the harbor.");
  next.mutable_compression()->set_method("snapkv");
  next.mutable_compression()->set_ratio(2);
  pb::CompressResponse next_resp;
  const grpc::Status ns = r.stub->Compress(&next_ctx, next, &next_resp);
  EXPECT_TRUE(ns.ok()) << ns.error_message();
  EXPECT_LT(next_resp.queue_ms(), kFreedWithinSeconds * 1e3);
}

// Caught: a cancelled Compress kept its queue slot and KV reservation until a worker reached
// it (the unary reactor never heard of the cancellation).
TEST_F(ServerCancelTest, CancelledQueuedCompressLeavesTheQueueAtOnce) {
  Running r = Start(1);
  ASSERT_NE(r.stub, nullptr);
  AsyncCompress running, queued;
  running.Start(*r.stub, LongCompress("snapkv", " (running)"));
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running == 1; }, 30));
  const int64_t running_bytes = r.sched().Stats().reserved_kv_bytes;
  queued.Start(*r.stub, LongCompress("snapkv", " (queued)"));
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().queued == 1; }, 30));
  ASSERT_GT(r.sched().Stats().reserved_kv_bytes, running_bytes);

  queued.ctx.TryCancel();
  const auto cancelled = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().queued == 0; }, 60));
  EXPECT_LT(SecondsSince(cancelled), kFreedWithinSeconds) << "the cancelled call kept its slot";
  EXPECT_EQ(r.sched().Stats().running, 1);
  EXPECT_LE(r.sched().Stats().reserved_kv_bytes, running_bytes);  // its reservation went too
  queued.Join();
  EXPECT_EQ(queued.status.error_code(), grpc::StatusCode::CANCELLED);

  // And the running one, mid-compression.
  running.ctx.TryCancel();
  const auto cancelled_running = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return r.Idle(); }, 60));
  EXPECT_LT(SecondsSince(cancelled_running), kFreedWithinSeconds)
      << "the cancelled compression kept running";
  running.Join();
  EXPECT_EQ(running.status.error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(r.server->WaitIdle(5));
  const std::string m = Metrics(r);
  EXPECT_NE(m.find("ctxcache_requests_total{rpc=\"Compress\",code=\"CANCELLED\"} 2"),
            std::string::npos)
      << m;
}

// With continuous batching a second call does not queue: it waits for its turn on the worker
// (EngineWorker::Exclusive) behind the running compression. Cancelled there, it must leave at
// once too, not when the compression ahead of it ends.
TEST_F(ServerCancelTest, CompressCancelledWhileWaitingForItsTurnLeavesAtOnce) {
  Running r = Start(1, /*max_batch=*/2);
  ASSERT_NE(r.stub, nullptr);
  AsyncCompress running, waiting;
  // Ahead of it, a compression that outlasts the bound many times over: kvzip (two passes)
  // over ~6.6K tokens (three documents; the test model's window is 8K), seconds even here.
  pb::CompressRequest ahead = LongCompress("kvzip", " (running)");
  std::string doc = ahead.document().text();
  for (int i = 0; i < 2; ++i) doc += LongDocument(absl::StrCat(" (running ", i, ")"));
  ahead.mutable_document()->set_text(doc);
  running.Start(*r.stub, ahead);
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running == 1; }, 30));
  waiting.Start(*r.stub, LongCompress("snapkv", " (waiting)"));
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running == 2; }, 30));
  EXPECT_EQ(r.sched().Stats().queued, 0);

  waiting.ctx.TryCancel();
  const auto cancelled = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running <= 1; }, 60));
  EXPECT_LT(SecondsSince(cancelled), kFreedWithinSeconds)
      << "the call cancelled while waiting for its turn stayed until the turn came";
  waiting.Join();
  EXPECT_EQ(waiting.status.error_code(), grpc::StatusCode::CANCELLED);
  // The compression ahead was still running (so the waiting call did leave before its turn):
  // it too ends cancelled, not done.
  running.ctx.TryCancel();
  running.Join();
  EXPECT_EQ(running.status.error_code(), grpc::StatusCode::CANCELLED)
      << running.status.error_message();
  ASSERT_TRUE(r.server->WaitIdle(30));
  EXPECT_EQ(r.sched().Stats().reserved_kv_bytes, 0);
}

// Caught: a Generate cancelled while its prompt was prefilled ran the whole prefill (the stop
// was asked only when decode emitted text).
TEST_F(ServerCancelTest, GenerateCancelledDuringPromptPrefillStops) {
  Running r = Start(1);
  ASSERT_NE(r.stub, nullptr);
  pb::GenerateRequest req;
  req.set_text(LongDocument() + "\nWho founded the library?");
  req.set_max_tokens(4);
  req.mutable_sampling()->set_temperature(0);
  grpc::ClientContext ctx;
  grpc::Status status;
  int messages = 0;
  std::thread client([&] {
    auto reader = r.stub->Generate(&ctx, req);
    pb::GenerateResponse msg;
    while (reader->Read(&msg)) ++messages;
    status = reader->Finish();
  });
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running == 1; }, 30));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // well inside the prefill
  ctx.TryCancel();
  const auto cancelled = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return r.Idle(); }, 120));
  EXPECT_LT(SecondsSince(cancelled), kFreedWithinSeconds) << "the prompt prefill ran on";
  client.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  EXPECT_EQ(messages, 0);
  ASSERT_TRUE(r.server->WaitIdle(5));
  EXPECT_NE(Metrics(r).find("ctxcache_requests_total{rpc=\"Generate\",code=\"CANCELLED\"} 1"),
            std::string::npos);
}

// Resident memory of this process (VmRSS).
[[maybe_unused]] int64_t RssBytes() {  // unused in sanitizer builds
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  }
  return -1;
}

// Caught by the memory soak (bench/soak.py memory): glibc kept the memory a finished request
// had freed (its arenas hold freed blocks that live allocations pin, and after the first large
// free its mmap threshold rises to 32 MiB, so the engine's big buffers come from the arenas),
// and RSS climbed to 1.8 GiB where 0.95 GiB was in use. A job here leaves 256 MiB freed but
// pinned by small live blocks, the way contexts kept in the memory tier pin a worker's arena;
// once the worker is idle that memory must be back with the system. Without the worker's
// malloc_trim the drop is ~0. Sanitizer builds use their own allocators (no glibc arenas).
TEST_F(ServerCancelTest, AFinishedJobsFreedMemoryGoesBackToTheSystem) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "sanitizer allocator: glibc's arenas and malloc_trim are not in use";
#else
  Running r = Start(1);
  ASSERT_NE(r.stub, nullptr);
  constexpr size_t kBig = size_t{16} << 20;
  constexpr int kBlocks = 16;
  std::vector<void*> pins;
  std::atomic<int64_t> rss_in_job{-1};
  std::atomic<bool> ran{false};
  absl::StatusOr<uint64_t> ticket = r.sched().Submit(
      1, Clock::time_point::max(),
      [&](server::EngineWorker&, server::Reservation&, double) {
        void* large = std::malloc(size_t{30} << 20);  // mmapped; its free raises the threshold
        std::memset(large, 1, size_t{30} << 20);
        asm volatile("" : : "r"(large) : "memory");  // the compiler may not elide the pair
        std::free(large);
        std::vector<void*> big;
        for (int i = 0; i < kBlocks; ++i) {
          big.push_back(std::malloc(kBig));
          std::memset(big.back(), 1, kBig);
          asm volatile("" : : "r"(big.back()) : "memory");
          pins.push_back(std::malloc(1024));  // a small live block after each big one
        }
        for (void* p : big) std::free(p);
        rss_in_job = RssBytes();
        ran = true;
      },
      [](const absl::Status&) {});
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE(WaitFor([&] { return ran.load() && r.Idle(); }, 60));
  const int64_t after = RssBytes();
  for (void* p : pins) std::free(p);
  EXPECT_GE(rss_in_job.load() - after, int64_t{128} << 20)
      << "RSS in the job after its frees " << (rss_in_job.load() >> 20) << " MiB, idle after it "
      << (after >> 20) << " MiB: the freed 256 MiB stayed with the process";
#endif
}

// Caught: the leader's stop ended the shared computation, and every waiter, however long its
// own deadline, received the leader's CANCELLED. (Against the code before this change the
// compression never stopped at all; against stop checks that use the leader's own stop inside
// the flight, the waiter failed with CANCELLED.)
TEST_F(ServerCancelTest, SingleFlightLeaderLeavingDoesNotFailTheWaiter) {
  Running r = Start(2);
  ASSERT_NE(r.stub, nullptr);
  AsyncCompress leader, waiter;
  leader.Start(*r.stub, LongCompress("snapkv"));
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running == 1; }, 30));
  SetDeadline(waiter.ctx, 300);
  waiter.Start(*r.stub, LongCompress("snapkv"));
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running == 2; }, 30));
  // Tokenizing the document takes milliseconds; then the waiter is in the flight.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  leader.ctx.TryCancel();
  leader.Join();
  EXPECT_EQ(leader.status.error_code(), grpc::StatusCode::CANCELLED);
  waiter.Join();
  EXPECT_TRUE(waiter.status.ok()) << waiter.status.error_code() << ": "
                                  << waiter.status.error_message();
  EXPECT_EQ(waiter.resp.context().context_id().size(), 64u);
  ASSERT_TRUE(r.server->WaitIdle(5));
  const std::string m = Metrics(r);
  EXPECT_NE(m.find("ctxcache_requests_total{rpc=\"Compress\",code=\"CANCELLED\"} 1"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("ctxcache_requests_total{rpc=\"Compress\",code=\"OK\"} 1"), std::string::npos)
      << m;
  // Computed once, for both.
  EXPECT_EQ(r.server->store()->Stats().memory_entries, 1);
}

// Caught: a waiter blocked with no deadline of its own until the leader finished, holding its
// worker long after its client had given up.
TEST_F(ServerCancelTest, SingleFlightWaitersOwnDeadlineEndsOnlyThatWaiter) {
  Running r = Start(2);
  ASSERT_NE(r.stub, nullptr);
  AsyncCompress leader;
  leader.Start(*r.stub, LongCompress("snapkv"));
  // The leader leads the flight before the waiter comes. Running is not enough: under
  // ThreadSanitizer tokenizing the document takes seconds, the second call reached the
  // flight first and led it, and its worker rightly kept computing for the first one
  // (fresh-clone CI, TSan step, on a loaded machine).
  ASSERT_TRUE(WaitFor([&] { return r.server->store()->Stats().flights == 1; }, 60));
  grpc::ClientContext ctx;
  SetDeadline(ctx, 0.5);
  pb::CompressResponse resp;
  const grpc::Status s = r.stub->Compress(&ctx, LongCompress("snapkv"), &resp);
  const auto ended = Clock::now();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  ASSERT_TRUE(WaitFor([&] { return r.sched().Stats().running <= 1; }, 120));
  EXPECT_LT(SecondsSince(ended), kFreedWithinSeconds) << "the waiter kept its worker";
  leader.Join();
  EXPECT_TRUE(leader.status.ok()) << leader.status.error_message();
  ASSERT_TRUE(r.server->WaitIdle(5));
  EXPECT_NE(
      Metrics(r).find("ctxcache_requests_total{rpc=\"Compress\",code=\"DEADLINE_EXCEEDED\"} 1"),
      std::string::npos);
}

// The binary: drain is bounded by drain_timeout_seconds whatever is running, and a second
// SIGTERM exits at once. Caught: SIGTERM waited for a running compression to finish (the
// issue: 67 s past a 30 s drain timeout), and a second SIGTERM was ignored.
class DrainTest : public ServerCancelTest {
 protected:
  struct Process {
    pid_t pid = -1;
    std::shared_ptr<grpc::Channel> channel;
  };
  static Process Spawn(double drain_timeout_seconds, int workers = 1) {
    Process p;
    const int port = FreeLoopbackPort();
    EXPECT_GT(port, 0);
    const std::string address = absl::StrCat("127.0.0.1:", port);
    std::vector<std::string> args = {CTXCACHE_SERVER_BIN, "--listen", address, "--workers",
                                     absl::StrCat(workers),
                                     "--threads-per-worker", "1", "--drain-timeout-seconds",
                                     absl::StrCat(drain_timeout_seconds), "--log-level", "warn"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, "/dev/null", O_WRONLY, 0);
    EXPECT_EQ(posix_spawn(&p.pid, argv[0], &files, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&files);
    p.channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    return p;
  }
  // Starts a long compression on the process and returns once its worker runs it.
  static void StartLongWork(Process& p, AsyncCompress& call,
                            std::unique_ptr<pb::ContextCache::Stub>& stub,
                            pb::CompressRequest work = LongCompress("expected_attention")) {
    stub = pb::ContextCache::NewStub(p.channel);
    // Ready once GetModelInfo answers (UNAVAILABLE while loading).
    ASSERT_TRUE(WaitFor(
        [&] {
          grpc::ClientContext ctx;
          SetDeadline(ctx, 1);
          pb::GetModelInfoResponse info;
          return stub->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &info).ok();
        },
        60));
    call.Start(*stub, std::move(work));
    // The compression is under way (the request has been sent and tokenized).
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  // Seconds until the process exits (waits up to `timeout`), or -1; `status` its wait status.
  static double WaitExit(pid_t pid, double timeout, int* status) {
    const auto t0 = Clock::now();
    while (SecondsSince(t0) < timeout) {
      if (waitpid(pid, status, WNOHANG) == pid) return SecondsSince(t0);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill(pid, SIGKILL);
    waitpid(pid, status, 0);
    return -1;
  }
};

TEST_F(DrainTest, DrainIsBoundedByItsTimeoutWhateverIsRunning) {
  Process p = Spawn(1);
  ASSERT_GT(p.pid, 0);
  AsyncCompress call;
  std::unique_ptr<pb::ContextCache::Stub> stub;
  StartLongWork(p, call, stub);
  ASSERT_EQ(kill(p.pid, SIGTERM), 0);
  int status = 0;
  // Target: the 1 s timeout plus a layer's work; 3 s of margin for a loaded machine.
  const double exited = WaitExit(p.pid, 30, &status);
  EXPECT_GE(exited, 0) << "still running 30 s after SIGTERM with a 1 s drain timeout";
  EXPECT_LT(exited, 1 + 3.0);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);  // not a clean drain
  call.Join();
  EXPECT_FALSE(call.status.ok());
}

// Drain under load (issue 14's campaign): two workers busy and a queue behind them (six
// clients streaming answers over documents of their own, one long compression), then
// SIGTERM with a 2 s drain timeout. Pass criterion: the process exits within the drain
// timeout + 5 s; every client's call ends by then too (none hangs: their own deadlines are
// 120 s); each ends OK (finished in the drain), or UNAVAILABLE (refused while draining, or
// stopped when the drain timed out), or CANCELLED only once the drain timeout has passed
// (cut by the final shutdown after the stopped calls' grace); clients that call again after
// the SIGTERM are refused, not left waiting.
TEST_F(DrainTest, DrainUnderLoadExitsInTimeAndNoClientHangs) {
  constexpr double kDrainSeconds = 2;
  Process p = Spawn(kDrainSeconds, /*workers=*/2);
  ASSERT_GT(p.pid, 0);
  AsyncCompress long_call;
  std::unique_ptr<pb::ContextCache::Stub> stub;
  // Twice the usual long document (~6,600 tokens): its compression should outlive the drain
  // timeout, so that the timeout path runs; on a fast machine it may not (checked below).
  pb::CompressRequest long_work = LongCompress("expected_attention");
  long_work.mutable_document()->set_text(LongDocument(" first") + LongDocument(" second"));
  StartLongWork(p, long_call, stub, std::move(long_work));

  std::atomic<bool> terminated{false};
  std::atomic<int> ok{0}, unavailable{0}, cut{0}, calls_after{0};
  std::vector<double> ended_after(6, -1);  // seconds from SIGTERM to a client's last call end
  Clock::time_point term_at;
  std::mutex mu;
  std::vector<std::string> unexpected;
  std::vector<std::thread> clients;
  for (int c = 0; c < 6; ++c) {
    clients.emplace_back([&, c] {
      auto client_stub = pb::ContextCache::NewStub(p.channel);
      for (int i = 0; i < 1000; ++i) {
        const bool after = terminated.load();
        pb::GenerateRequest req;
        pb::ChatMessage* m = req.mutable_chat()->add_messages();
        m->set_role("user");
        m->set_content("Who founded the library?");
        req.set_max_tokens(32);
        req.set_ignore_eos(true);
        req.mutable_sampling()->set_temperature(0);
        pb::CompressRequest* doc = req.add_contexts()->mutable_inline_();
        doc->mutable_document()->set_text(
            LongDocument(absl::StrCat(" client ", c, " call ", i)).substr(0, 2000));
        doc->mutable_compression()->set_method("snapkv");
        doc->mutable_compression()->set_ratio(4);
        grpc::ClientContext ctx;
        SetDeadline(ctx, 120);
        auto reader = client_stub->Generate(&ctx, req);
        pb::GenerateResponse msg;
        while (reader->Read(&msg)) {
        }
        const grpc::Status s = reader->Finish();
        if (after) ++calls_after;
        if (s.ok()) {
          ++ok;
        } else if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
          ++unavailable;
        } else if (s.error_code() == grpc::StatusCode::CANCELLED && terminated.load() &&
                   SecondsSince(term_at) >= kDrainSeconds) {
          ++cut;  // still running when the drain timeout and its grace ran out
        } else {
          std::lock_guard<std::mutex> lock(mu);
          unexpected.push_back(absl::StrCat(s.error_code(), ": ", s.error_message()));
        }
        if (terminated.load()) {
          std::lock_guard<std::mutex> lock(mu);
          ended_after[c] = SecondsSince(term_at);
          if (after) return;  // one call after SIGTERM, then stop
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::seconds(3));  // queue filled, workers busy
  {
    std::lock_guard<std::mutex> lock(mu);
    term_at = Clock::now();
  }
  terminated = true;
  ASSERT_EQ(kill(p.pid, SIGTERM), 0);
  int status = 0;
  const double exited = WaitExit(p.pid, 60, &status);
  for (std::thread& t : clients) t.join();
  long_call.Join();
  std::printf("[ drain under load ] exit %d after %.2f s (drain timeout %.0f s; long compression "
              "%s); %d calls OK, %d UNAVAILABLE, %d cut at shutdown, %d made after SIGTERM; last "
              "client call ended %.2f s after SIGTERM\n",
              WIFEXITED(status) ? WEXITSTATUS(status) : -1, exited, kDrainSeconds,
              long_call.status.ok() ? "finished" : "stopped", ok.load(), unavailable.load(),
              cut.load(), calls_after.load(),
              *std::max_element(ended_after.begin(), ended_after.end()));
  EXPECT_GE(exited, 0) << "still running 60 s after SIGTERM";
  EXPECT_LE(exited, kDrainSeconds + 5);
  EXPECT_TRUE(WIFEXITED(status));
  // Exit code 1 when the drain timed out and stopped work, 0 when everything in flight
  // finished in time: a stopped long compression means 1.
  EXPECT_LE(WEXITSTATUS(status), 1);
  if (!long_call.status.ok()) {
    EXPECT_EQ(WEXITSTATUS(status), 1) << long_call.status.error_message();
  }
  for (double t : ended_after) {
    EXPECT_GE(t, 0);
    EXPECT_LE(t, kDrainSeconds + 5) << "a client waited past the drain";
  }
  EXPECT_EQ(calls_after.load(), 6);
  EXPECT_TRUE(unexpected.empty()) << absl::StrJoin(unexpected, "\n");
  EXPECT_GT(unavailable.load(), 0);  // at least the calls made after SIGTERM
}

TEST_F(DrainTest, SecondSigtermExitsAtOnce) {
  Process p = Spawn(60);
  ASSERT_GT(p.pid, 0);
  AsyncCompress call;
  std::unique_ptr<pb::ContextCache::Stub> stub;
  StartLongWork(p, call, stub);
  ASSERT_EQ(kill(p.pid, SIGTERM), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_EQ(kill(p.pid, SIGTERM), 0);
  int status = 0;
  const double exited = WaitExit(p.pid, 30, &status);
  EXPECT_GE(exited, 0) << "a second SIGTERM did not end the process";
  EXPECT_LT(exited, kFreedWithinSeconds);
  EXPECT_TRUE(WIFEXITED(status)) << "signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 1);
  call.Join();
}

}  // namespace
}  // namespace ctxcache::testing
