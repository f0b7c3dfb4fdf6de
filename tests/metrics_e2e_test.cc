// The Prometheus endpoint end to end: a server in process with --metrics-listen on a free
// loopback port and the real default model, a scripted set of calls over gRPC, then a scrape
// of /metrics over HTTP, checked against what the calls returned:
//  * `promtool check metrics` accepts the exposition (promtool: Debian package prometheus;
//    missing, the test skips, or fails when CTXCACHE_REQUIRE_PROMTOOL=1 or
//    CTXCACHE_REQUIRE_MODEL=1, as tools/test.sh sets);
//  * ctxcache_kv_bytes_saved_per_request_sum is the sum of Usage.kv_bytes_saved over the
//    Generate responses and its _count the number of successful Generate calls;
//  * ctxcache_requests_total matches the calls made, by method and code, INVALID_ARGUMENT and
//    NOT_FOUND included; token and byte counters match the responses' usage (bytes attended
//    included, below bytes used for the document selected per query).
// A second case runs with a real redis-server (skips without one unless
// CTXCACHE_REQUIRE_REDIS=1) and checks the Redis tier's lookups, operations, errors and
// ctxcache_redis_up, before and after the redis-server is killed.
// The HTTP endpoint itself (404, 405, HEAD, bind errors) is tested without the model.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ctxcache/v1/ctxcache.grpc.pb.h"
#include "server/logging.h"
#include "server/metrics_http.h"
#include "server/server.h"
#include "tests/redis_server.h"
#include "tests/test_util.h"

namespace ctxcache::testing {
namespace {

namespace pb = ::ctxcache::v1;
using server::ServerConfig;
using server::ServerInstance;

constexpr char kDocument[] =
    "The Harbor Street Library was founded in 1887 by the shipbuilder Margaret Olsen, who "
    "donated her collection of 4,200 books on navigation, astronomy and marine engineering. "
    "The original building burned down in 1921, and the library moved to a former customs "
    "house on Quay Road, where it still stands today. Its most valuable item is a hand-drawn "
    "map of the northern coastline made in 1764 by the cartographer Elias Brandt. The library "
    "is open from Tuesday to Saturday, from nine in the morning until six in the evening.";

constexpr char kSecondDocument[] =
    "The town of Vellmar lies at the mouth of the river Aska. Its main industries are fishing "
    "and boat repair, and about 9,000 people live there. The town hall clock was built in "
    "1902 and has never stopped, even during the great storm of 1953.";

// One HTTP exchange with 127.0.0.1:port: the raw response ("" when the connection fails).
std::string HttpExchange(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(request.size())) {
    char buf[4096];
    for (;;) {
      const ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      response.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  return response;
}

std::string Get(int port, const std::string& path, const std::string& method = "GET") {
  return HttpExchange(port, absl::StrCat(method, " ", path,
                                         " HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"));
}

struct HttpResponse {
  std::string status_line, headers, body;
};

HttpResponse Split(const std::string& raw) {
  HttpResponse r;
  const size_t end = raw.find("\r\n\r\n");
  const std::string head = raw.substr(0, end);
  r.status_line = head.substr(0, head.find("\r\n"));
  r.headers = head;
  if (end != std::string::npos) r.body = raw.substr(end + 4);
  return r;
}

// Sample values by their exact series text ("name{labels}" as rendered).
std::map<std::string, double> ParseSamples(const std::string& text) {
  std::map<std::string, double> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.empty() || line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    double v = 0;
    if (sp == std::string::npos || !absl::SimpleAtod(line.substr(sp + 1), &v)) {
      ADD_FAILURE() << "unparsable sample line: " << line;
      continue;
    }
    out[line.substr(0, sp)] = v;
  }
  return out;
}

// The path of an executable on PATH, or "".
std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path != nullptr ? path : "/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    const std::string candidate = dirs.substr(start, end - start) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return "";
}

bool EnvIs1(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == "1";
}

// ---- the endpoint alone -------------------------------------------------------------------

TEST(MetricsHttpTest, ServesMetricsOnly) {
  int renders = 0;
  absl::StatusOr<std::unique_ptr<server::MetricsHttpServer>> s =
      server::MetricsHttpServer::Start("127.0.0.1:0", [&] {
        ++renders;
        return std::string("# TYPE up gauge\nup 1\n");
      });
  ASSERT_TRUE(s.ok()) << s.status();
  const int port = (*s)->port();
  ASSERT_GT(port, 0);

  HttpResponse ok = Split(Get(port, "/metrics"));
  EXPECT_EQ(ok.status_line, "HTTP/1.1 200 OK");
  EXPECT_NE(ok.headers.find("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
            std::string::npos)
      << ok.headers;
  EXPECT_NE(ok.headers.find("Content-Length: 21"), std::string::npos) << ok.headers;
  EXPECT_EQ(ok.body, "# TYPE up gauge\nup 1\n");

  EXPECT_EQ(Split(Get(port, "/metrics?x=1")).status_line, "HTTP/1.1 200 OK");
  HttpResponse head = Split(Get(port, "/metrics", "HEAD"));
  EXPECT_EQ(head.status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(head.body, "");
  EXPECT_EQ(Split(Get(port, "/")).status_line, "HTTP/1.1 404 Not Found");
  EXPECT_EQ(Split(Get(port, "/metricsx")).status_line, "HTTP/1.1 404 Not Found");
  EXPECT_EQ(Split(Get(port, "/metrics", "POST")).status_line, "HTTP/1.1 405 Method Not Allowed");
  EXPECT_EQ(Split(HttpExchange(port, "garbage\r\n\r\n")).status_line, "HTTP/1.1 400 Bad Request");
  EXPECT_EQ(Split(HttpExchange(port, std::string(20000, 'a'))).status_line.substr(0, 12),
            "HTTP/1.1 431");
  EXPECT_EQ(renders, 3);  // GET, GET with a query, HEAD

  // The port is taken: a second server cannot bind it and says so.
  absl::StatusOr<std::unique_ptr<server::MetricsHttpServer>> clash =
      server::MetricsHttpServer::Start(absl::StrCat("127.0.0.1:", port), [] { return ""; });
  ASSERT_FALSE(clash.ok());
  EXPECT_TRUE(absl::IsUnavailable(clash.status())) << clash.status();
  EXPECT_NE(clash.status().message().find("--metrics-listen"), std::string::npos);
}

// ---- the server end to end ----------------------------------------------------------------

class MetricsE2ETest : public FastModelTest {
 protected:
  static void SetUpTestSuite() { (void)server::ConfigureLogging("plain", "warn"); }
};

pb::GenerateRequest Ask(const std::string& question) {
  pb::GenerateRequest req;
  pb::ChatMessage* m = req.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content(question);
  req.mutable_sampling()->set_temperature(0);
  req.set_max_tokens(6);
  return req;
}

struct StreamResult {
  grpc::Status status;
  bool has_usage = false;
  pb::Usage usage;
};

StreamResult RunGenerate(pb::ContextCache::Stub& stub, const pb::GenerateRequest& req) {
  grpc::ClientContext ctx;
  StreamResult out;
  std::unique_ptr<grpc::ClientReader<pb::GenerateResponse>> reader = stub.Generate(&ctx, req);
  pb::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_usage()) {
      out.has_usage = true;
      out.usage = msg.usage();
    }
  }
  out.status = reader->Finish();
  return out;
}

TEST_F(MetricsE2ETest, ScrapeMatchesTheCallsMade) {
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "127.0.0.1:0";
  config.workers = 1;
  config.threads_per_worker = 2;
  config.memory_cache_bytes = 256 << 20;
  config.max_kv_bytes = int64_t{2} << 30;
  absl::StatusOr<std::unique_ptr<ServerInstance>> started = ServerInstance::Start(config, &model());
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<ServerInstance> server = *std::move(started);
  const int port = server->metrics_port();
  ASSERT_GT(port, 0);
  // Served while loading too (no store figures nor model yet).
  HttpResponse loading = Split(Get(port, "/metrics"));
  EXPECT_EQ(loading.status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(loading.body.find("ctxcache_build_info"), std::string::npos) << loading.body;
  EXPECT_EQ(loading.body.find("ctxcache_cache_lookups_total"), std::string::npos) << loading.body;
  ASSERT_TRUE(server->Load().ok());

  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  auto stub = pb::ContextCache::NewStub(channel);

  // Compress twice (computed, then a memory hit).
  pb::CompressRequest compress;
  compress.mutable_document()->set_text(kDocument);
  compress.mutable_compression()->set_method("snapkv");
  compress.mutable_compression()->set_ratio(4);
  std::string context_id;
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext ctx;
    pb::CompressResponse resp;
    grpc::Status s = stub->Compress(&ctx, compress, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    context_id = resp.context().context_id();
  }
  // A bad method: INVALID_ARGUMENT.
  {
    pb::CompressRequest bad = compress;
    bad.mutable_compression()->set_method("no-such-method");
    grpc::ClientContext ctx;
    pb::CompressResponse resp;
    EXPECT_EQ(stub->Compress(&ctx, bad, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Three successful Generates: by id, with an inline document (computed, stored whole and
  // selected per query), with no context.
  std::vector<StreamResult> generated;
  {
    pb::GenerateRequest by_id = Ask("Who founded the library?");
    by_id.add_contexts()->set_context_id(context_id);
    pb::GenerateRequest inline_doc = Ask("How many people live in Vellmar?");
    pb::CompressRequest* in = inline_doc.add_contexts()->mutable_inline_();
    in->mutable_document()->set_text(kSecondDocument);
    in->mutable_compression()->set_method("none");
    inline_doc.mutable_contexts(0)->mutable_select()->set_ratio(2);
    pb::GenerateRequest plain = Ask("Say hello.");
    for (const pb::GenerateRequest* req : {&by_id, &inline_doc, &plain}) {
      generated.push_back(RunGenerate(*stub, *req));
      ASSERT_TRUE(generated.back().status.ok()) << generated.back().status.error_message();
      ASSERT_TRUE(generated.back().has_usage);
    }
  }
  // A Generate without messages: INVALID_ARGUMENT.
  {
    pb::GenerateRequest bad = Ask("x");
    bad.mutable_chat()->clear_messages();
    EXPECT_EQ(RunGenerate(*stub, bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // GetModelInfo OK; GetContext of an id never stored: NOT_FOUND.
  {
    grpc::ClientContext ctx;
    pb::GetModelInfoResponse resp;
    EXPECT_TRUE(stub->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &resp).ok());
  }
  {
    grpc::ClientContext ctx;
    pb::GetContextRequest req;
    req.set_context_id(std::string(64, 'a'));
    pb::GetContextResponse resp;
    EXPECT_EQ(stub->GetContext(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  // A worker counts itself idle just after the client saw the status: wait for that.
  for (int i = 0; i < 500 && server->scheduler()->Stats().running > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const HttpResponse scrape = Split(Get(port, "/metrics"));
  ASSERT_EQ(scrape.status_line, "HTTP/1.1 200 OK");
  EXPECT_NE(scrape.headers.find("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
            std::string::npos);
  const std::string& text = scrape.body;
  const std::map<std::string, double> m = ParseSamples(text);
  auto value = [&](const std::string& series) -> double {
    auto it = m.find(series);
    if (it == m.end()) {
      ADD_FAILURE() << "no sample " << series << " in:\n" << text;
      return -1;
    }
    return it->second;
  };

  // (a) promtool accepts it.
  const std::string promtool = FindOnPath("promtool");
  if (promtool.empty()) {
    if (EnvIs1("CTXCACHE_REQUIRE_PROMTOOL") || EnvIs1("CTXCACHE_REQUIRE_MODEL")) {
      ADD_FAILURE() << "promtool not found (tools/setup.sh installs the prometheus package)";
    } else {
      std::fprintf(stderr, "promtool not found: the exposition check is skipped\n");
    }
  } else {
    char tmpl[] = "/tmp/ctxcache-metrics-XXXXXX";
    const int fd = mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
    close(fd);
    const std::string cmd = absl::StrCat(promtool, " check metrics < ", tmpl, " 2>&1");
    std::FILE* p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[512];
    while (size_t n = std::fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
    const int rc = pclose(p);
    unlink(tmpl);
    EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << "promtool check metrics:\n" << out;
  }

  // (b) bytes saved: the histogram holds exactly what the responses reported.
  double saved = 0, full = 0, used = 0, attended = 0, prompt = 0, completion = 0, original = 0;
  for (const StreamResult& g : generated) {
    saved += static_cast<double>(g.usage.kv_bytes_saved());
    full += static_cast<double>(g.usage.kv_bytes_full());
    used += static_cast<double>(g.usage.kv_bytes_used());
    attended += static_cast<double>(g.usage.kv_bytes_attended());
    prompt += static_cast<double>(g.usage.prompt_tokens());
    completion += static_cast<double>(g.usage.completion_tokens());
    original += static_cast<double>(g.usage.context_tokens_original());
  }
  EXPECT_GT(saved, 0);
  EXPECT_EQ(value("ctxcache_kv_bytes_saved_per_request_sum"), saved);
  EXPECT_EQ(value("ctxcache_kv_bytes_saved_per_request_count"), 3);
  EXPECT_EQ(value("ctxcache_kv_bytes_saved_per_request_bucket{le=\"+Inf\"}"), 3);
  EXPECT_EQ(value("ctxcache_tenant_kv_bytes_saved_total{tenant=\"default\"}"), saved);
  EXPECT_EQ(value("ctxcache_kv_bytes_full_total"), full);
  EXPECT_EQ(value("ctxcache_kv_bytes_used_total"), used);
  EXPECT_LT(attended, used);
  EXPECT_EQ(value("ctxcache_kv_bytes_attended_total"), attended);
  EXPECT_EQ(value("ctxcache_prompt_tokens_total"), prompt);
  EXPECT_EQ(value("ctxcache_generated_tokens_total"), completion);
  EXPECT_EQ(value("ctxcache_context_tokens_original_total"), original);
  EXPECT_GT(value("ctxcache_context_tokens_kept_total"), 0);
  EXPECT_EQ(value("ctxcache_ttft_seconds_count"), 3);

  // (c) calls by method and code.
  EXPECT_EQ(value("ctxcache_requests_total{rpc=\"Compress\",code=\"OK\"}"), 2);
  EXPECT_EQ(value("ctxcache_requests_total{rpc=\"Compress\",code=\"INVALID_ARGUMENT\"}"), 1);
  EXPECT_EQ(value("ctxcache_requests_total{rpc=\"Generate\",code=\"OK\"}"), 3);
  EXPECT_EQ(value("ctxcache_requests_total{rpc=\"Generate\",code=\"INVALID_ARGUMENT\"}"), 1);
  EXPECT_EQ(value("ctxcache_requests_total{rpc=\"GetModelInfo\",code=\"OK\"}"), 1);
  EXPECT_EQ(value("ctxcache_requests_total{rpc=\"GetContext\",code=\"NOT_FOUND\"}"), 1);
  double total_calls = 0;
  for (const auto& [series, v] : m) {
    if (series.rfind("ctxcache_requests_total{", 0) == 0) total_calls += v;
  }
  EXPECT_EQ(total_calls, 9);
  EXPECT_EQ(value("ctxcache_request_duration_seconds_count{rpc=\"Compress\"}"), 3);
  EXPECT_EQ(value("ctxcache_request_duration_seconds_count{rpc=\"Generate\"}"), 4);

  // Compressions actually computed: the first Compress and the inline document.
  EXPECT_EQ(value("ctxcache_compression_duration_seconds_count{method=\"snapkv\"}"), 1);
  EXPECT_EQ(value("ctxcache_compression_duration_seconds_count{method=\"none\"}"), 1);
  EXPECT_EQ(value("ctxcache_compression_ratio_count{method=\"snapkv\"}"), 1);
  EXPECT_GE(value("ctxcache_compression_ratio_sum{method=\"snapkv\"}"), 1.5);
  EXPECT_EQ(value("ctxcache_compression_ratio_sum{method=\"none\"}"), 1);
  // The second Compress and the Generate by id hit the memory tier; no Redis tier here.
  EXPECT_GE(value("ctxcache_cache_lookups_total{tier=\"memory\",result=\"hit\"}"), 2);
  EXPECT_EQ(value("ctxcache_cache_entries{tier=\"memory\"}"), 2);
  EXPECT_GT(value("ctxcache_cache_bytes{tier=\"memory\"}"), 0);
  EXPECT_EQ(m.count("ctxcache_redis_up"), 0u);
  EXPECT_EQ(m.count("ctxcache_redis_circuit_state"), 0u);
  EXPECT_EQ(value("ctxcache_redis_operations_total{op=\"get\"}"), 0);
  // Scheduler and process.
  EXPECT_EQ(value("ctxcache_workers"), 1);
  EXPECT_EQ(value("ctxcache_queue_depth"), 0);
  EXPECT_EQ(value("ctxcache_running_requests"), 0);
  EXPECT_GT(value("ctxcache_worker_busy_seconds_total"), 0);
  // The one worker ran requests, so its Runner holds scratch, at most what it keeps.
  EXPECT_GT(value("ctxcache_worker_scratch_bytes"), 0);
  EXPECT_LE(value("ctxcache_worker_scratch_bytes"), 128.0 * (1 << 20));
  EXPECT_GT(value("ctxcache_process_resident_memory_bytes"), 1e6);
  // The heap holds at least the memory tier's two contexts and the worker's scratch.
  EXPECT_GE(value("ctxcache_heap_in_use_bytes"),
            value("ctxcache_cache_bytes{tier=\"memory\"}") +
                value("ctxcache_worker_scratch_bytes"));
  EXPECT_EQ(value(absl::StrCat("ctxcache_build_info{version=\"", CTXCACHE_VERSION,
                               "\",model=\"", model().config().name, "\"}")),
            1);

  server->Drain(10);
}

TEST_F(MetricsE2ETest, RedisTierLookupsAndOperations) {
  CTXCACHE_REDIS_SERVER_OR_SKIP(binary);
  RedisServer redis(binary);
  ASSERT_EQ(redis.Start(), "");
  ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "127.0.0.1:0";
  config.workers = 1;
  config.threads_per_worker = 2;
  config.redis_url = redis.Url();
  config.redis_command_timeout_ms = 500;
  absl::StatusOr<std::unique_ptr<ServerInstance>> started = ServerInstance::Start(config, &model());
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<ServerInstance> server = *std::move(started);
  ASSERT_TRUE(server->Load().ok());
  const int port = server->metrics_port();
  auto stub = pb::ContextCache::NewStub(
      grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
  auto compress = [&](const std::string& doc) {
    pb::CompressRequest req;
    req.mutable_document()->set_text(doc);
    req.mutable_compression()->set_method("snapkv");
    req.mutable_compression()->set_ratio(4);
    grpc::ClientContext ctx;
    pb::CompressResponse resp;
    return stub->Compress(&ctx, req, &resp);
  };
  auto scrape = [&] { return ParseSamples(Split(Get(port, "/metrics")).body); };

  ASSERT_TRUE(compress(kDocument).ok());  // redis get: miss; computed; redis put
  ASSERT_TRUE(server->store()->WaitForWrites(absl::Seconds(30)));  // the put runs in the background
  server->store()->ClearMemory();
  ASSERT_TRUE(compress(kDocument).ok());  // redis get: hit
  {
    grpc::ClientContext ctx;
    pb::GetContextRequest req;
    req.set_context_id(std::string(64, 'b'));
    pb::GetContextResponse resp;
    EXPECT_EQ(stub->GetContext(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }  // redis get: miss
  std::map<std::string, double> m = scrape();
  EXPECT_EQ(m["ctxcache_redis_up"], 1);
  // The breaker and the background writer: closed, nothing skipped or dropped, queue empty.
  for (const char* name : {"ctxcache_redis_circuit_state", "ctxcache_redis_circuit_opens_total",
                           "ctxcache_redis_short_circuited_total",
                           "ctxcache_redis_slow_operations_total",
                           "ctxcache_redis_write_queue_depth",
                           "ctxcache_redis_writes_dropped_total"}) {
    ASSERT_EQ(m.count(name), 1u) << name;
    EXPECT_EQ(m[name], 0) << name;
  }
  EXPECT_EQ(m["ctxcache_cache_lookups_total{tier=\"redis\",result=\"hit\"}"], 1);
  EXPECT_EQ(m["ctxcache_cache_lookups_total{tier=\"redis\",result=\"miss\"}"], 2);
  EXPECT_EQ(m["ctxcache_cache_lookups_total{tier=\"redis\",result=\"error\"}"], 0);
  EXPECT_EQ(m["ctxcache_cache_lookups_total{tier=\"redis\",result=\"corrupt\"}"], 0);
  EXPECT_EQ(m["ctxcache_redis_operations_total{op=\"get\"}"], 3);
  EXPECT_EQ(m["ctxcache_redis_operations_total{op=\"put\"}"], 1);
  EXPECT_EQ(m["ctxcache_redis_errors_total{op=\"get\"}"], 0);
  EXPECT_EQ(m["ctxcache_redis_operation_duration_seconds_count{op=\"get\"}"], 3);
  EXPECT_EQ(m["ctxcache_compression_duration_seconds_count{method=\"snapkv\"}"], 1);

  redis.Kill();
  ASSERT_TRUE(compress(kSecondDocument).ok());  // redis get and put fail; computed anyway
  // The put runs in the background: wait for it to fail before reading its counters.
  ASSERT_TRUE(server->store()->WaitForWrites(absl::Seconds(30)));
  m = scrape();
  EXPECT_EQ(m["ctxcache_redis_up"], 0);
  EXPECT_EQ(m["ctxcache_cache_lookups_total{tier=\"redis\",result=\"error\"}"], 1);
  EXPECT_EQ(m["ctxcache_redis_operations_total{op=\"get\"}"], 4);
  EXPECT_EQ(m["ctxcache_redis_errors_total{op=\"get\"}"], 1);
  EXPECT_EQ(m["ctxcache_redis_operations_total{op=\"put\"}"], 2);
  EXPECT_EQ(m["ctxcache_redis_errors_total{op=\"put\"}"], 1);
  EXPECT_EQ(m["ctxcache_requests_total{rpc=\"Compress\",code=\"OK\"}"], 3);
  server->Drain(10);
}

}  // namespace
}  // namespace ctxcache::testing
