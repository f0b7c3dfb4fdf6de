// Unit tests of the service's pieces that need no model and no network: configuration
// (flags, environment, YAML, validation), context id derivation, bearer-token auth, UTF-8
// checks, the absl -> gRPC status mapping, request ids and proto -> native conversion.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/auth.h"
#include "server/config.h"
#include "server/context_key.h"
#include "server/convert.h"
#include "server/devices.h"
#include "server/handlers.h"
#include "server/logging.h"
#include "server/server.h"
#include "server/server_metrics.h"
#include "server/status_map.h"

namespace ctxcache::server {
namespace {

absl::StatusOr<ServerConfig> Load(std::vector<std::string> args,
                                  std::map<std::string, std::string> env = {}) {
  std::vector<const char*> argv = {"ctxcache-server"};
  for (const std::string& a : args) argv.push_back(a.c_str());
  return LoadServerConfig(static_cast<int>(argv.size()), argv.data(), 1, env);
}

// A temporary file removed at scope exit.
class TempFile {
 public:
  explicit TempFile(const std::string& content) {
    char name[] = "/tmp/ctxcache-server-test-XXXXXX";
    const int fd = mkstemp(name);
    path_ = name;
    if (fd >= 0) {
      (void)!write(fd, content.data(), content.size());
      close(fd);
    }
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void ExpectInvalid(const absl::StatusOr<ServerConfig>& c, const std::string& fragment) {
  ASSERT_FALSE(c.ok()) << "expected an error containing: " << fragment;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_NE(c.status().message().find(fragment), std::string::npos) << c.status().message();
}

TEST(ServerConfigTest, NoArgumentsServeLoopbackWithTheMemoryCache) {
  absl::StatusOr<ServerConfig> c = Load({});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->listen, "127.0.0.1:50051");
  EXPECT_TRUE(c->model.empty());      // FindDefaultModel
  EXPECT_TRUE(c->redis_url.empty());  // memory tier only
  EXPECT_EQ(c->memory_cache_bytes, int64_t{1} << 30);
  EXPECT_TRUE(c->auth_tokens_file.empty());
  EXPECT_EQ(c->log_format, "plain");
  EXPECT_FALSE(c->help);
}

TEST(ServerConfigTest, FlagsBeatEnvironmentWhichBeatsTheYamlFile) {
  TempFile yaml(
      "# a comment\n"
      "listen: 0.0.0.0:6000\n"
      "workers: 3\n"
      "memory-cache-bytes: 64MiB\n"
      "log_format: json\n"
      "redis_url: redis://cache:6379/2\n");
  absl::StatusOr<ServerConfig> c =
      Load({"--config", yaml.path(), "--workers=5", "--auth-tokens", "/etc/tokens"},
           {{"CTXCACHE_WORKERS", "4"}, {"CTXCACHE_LISTEN", "127.0.0.1:7000"},
            {"CTXCACHE_REQUIRE_MODEL", "1"}});  // not a setting: ignored
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->workers, 5);                     // flag
  EXPECT_EQ(c->listen, "127.0.0.1:7000");       // env over file
  EXPECT_EQ(c->memory_cache_bytes, 64 << 20);   // file, dash spelling
  EXPECT_EQ(c->log_format, "json");
  EXPECT_EQ(c->redis_url, "redis://cache:6379/2");
  EXPECT_EQ(c->auth_tokens_file, "/etc/tokens");
  // CTXCACHE_CONFIG names the file too.
  absl::StatusOr<ServerConfig> e = Load({}, {{"CTXCACHE_CONFIG", yaml.path()}});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->workers, 3);
}

TEST(ServerConfigTest, BadSettingsAreRefusedWithTheirNameAndWhatIsAllowed) {
  ExpectInvalid(Load({"--wrokers", "2"}), "unknown setting --wrokers");
  ExpectInvalid(Load({"--workers", "two"}), "--workers: 'two' is not an integer");
  ExpectInvalid(Load({"--workers", "-1"}), "workers = -1 is out of range; allowed: 0 to 256");
  ExpectInvalid(Load({"--log-format", "xml"}), "log_format: 'xml' is not valid; expected plain or json");
  ExpectInvalid(Load({"--listen", "localhost"}), "listen: 'localhost' is not valid");
  ExpectInvalid(Load({"--listen", "127.0.0.1:70000"}), "a port from 0 to 65535");
  ExpectInvalid(Load({"--redis-url", "http://x:1"}), "redis_url: bad redis URL: it must start");
  // A bad URL with a password in it: the message names the problem, never the password.
  absl::StatusOr<ServerConfig> leaky = Load({"--redis-url", "redis://u:s3cret@host:notaport"});
  ExpectInvalid(leaky, "redis_url");
  EXPECT_EQ(leaky.status().message().find("s3cret"), std::string::npos) << leaky.status();
  ExpectInvalid(Load({"--memory-cache-bytes", "lots"}), "is not a byte size");
  ExpectInvalid(Load({"--max-queue-depth", "0"}), "max_queue_depth = 0 is out of range");
  ExpectInvalid(Load({"--drain-timeout-seconds", "-3"}), "drain_timeout_seconds");
  ExpectInvalid(Load({"--listen"}), "flag --listen needs a value");
  ExpectInvalid(Load({"serve"}), "unexpected argument 'serve'");
  ExpectInvalid(Load({}, {{"CTXCACHE_WORKERS", "many"}}), "CTXCACHE_WORKERS: 'many'");
  absl::StatusOr<ServerConfig> missing = Load({"--config", "/nonexistent/ctxcache.yaml"});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(ServerConfigTest, YamlErrorsNameTheFileAndKey) {
  TempFile unknown("listen: 127.0.0.1:1\nworkerz: 2\n");
  ExpectInvalid(Load({"--config", unknown.path()}), unknown.path() + ": workerz");
  TempFile list("workers: [1, 2]\n");
  ExpectInvalid(Load({"--config", list.path()}), "workers must be a single value");
  TempFile broken("listen: [unclosed\n");
  ExpectInvalid(Load({"--config", broken.path()}), "not valid YAML");
  TempFile scalar("just a string\n");
  ExpectInvalid(Load({"--config", scalar.path()}), "expected a mapping of settings");
  TempFile empty("");
  EXPECT_TRUE(Load({"--config", empty.path()}).ok());
}

// Tenant capacity is off unless asked for, and reads like every other setting.
TEST(ServerConfigTest, TenantLimitsAreOffByDefaultAndConfigurable) {
  absl::StatusOr<ServerConfig> c = Load({});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->tenant_max_inflight, 0);
  EXPECT_EQ(c->tenant_memory_cache_bytes, 0);
  TempFile yaml("tenant_max_inflight: 8\ntenant_memory_cache_bytes: 256MiB\n");
  c = Load({"--config", yaml.path()}, {{"CTXCACHE_TENANT_MAX_INFLIGHT", "6"}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->tenant_max_inflight, 6);  // env over file
  EXPECT_EQ(c->tenant_memory_cache_bytes, int64_t{256} << 20);
  ExpectInvalid(Load({"--tenant-max-inflight", "-1"}),
                "tenant_max_inflight = -1 is out of range; allowed: 0 to");
  ExpectInvalid(Load({"--tenant-memory-cache-bytes", "half"}),
                "--tenant-memory-cache-bytes: 'half' is not a byte size");
  const std::string usage = ServerUsage();
  EXPECT_NE(usage.find("--tenant-max-inflight"), std::string::npos);
  EXPECT_NE(usage.find("--tenant-memory-cache-bytes"), std::string::npos);
}

TEST(ServerConfigTest, HelpListsEverySetting) {
  absl::StatusOr<ServerConfig> c = Load({"--help"});
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->help);
  const std::string usage = ServerUsage();
  for (const char* flag : {"--listen", "--metrics-listen", "--redis-url", "--workers",
                           "--memory-cache-bytes", "--auth-tokens", "--log-format", "--config"}) {
    EXPECT_NE(usage.find(flag), std::string::npos) << flag;
  }
}

TEST(ServerConfigTest, ByteSizesAndAddresses) {
  EXPECT_EQ(*ParseByteSize("1024"), 1024);
  EXPECT_EQ(*ParseByteSize("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("2G"), int64_t{2} << 30);
  EXPECT_EQ(*ParseByteSize(" 3 kb "), 3072);
  EXPECT_FALSE(ParseByteSize("1.5G").ok());
  EXPECT_FALSE(ParseByteSize("-1").ok());
  EXPECT_FALSE(ParseByteSize("12XB").ok());
  EXPECT_FALSE(ParseByteSize("99999999999999T").ok());
  EXPECT_TRUE(CheckHostPort("[::1]:50051", "listen").ok());
  EXPECT_TRUE(CheckHostPort("0.0.0.0:0", "listen").ok());
  EXPECT_FALSE(CheckHostPort(":50051", "listen").ok());
  EXPECT_FALSE(CheckHostPort("host:port", "listen").ok());
}

TEST(ServerConfigTest, DeviceListsAreParsedAndBadOnesNamed) {
  absl::StatusOr<DeviceSpec> d = ParseDevices("cpu");
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(d->cpu);
  EXPECT_TRUE(d->gpus.empty());
  d = ParseDevices("cuda:1, cuda:0,cpu");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->gpus, (std::vector<int>{1, 0}));
  EXPECT_TRUE(d->cpu);
  d = ParseDevices("cuda");
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(d->all_gpus);
  ExpectInvalid(Load({"--device", "gpu"}), "\"gpu\" is not a device; allowed: cpu, cuda");
  ExpectInvalid(Load({"--device", "cuda:x"}), "\"cuda:x\" is not a device");
  ExpectInvalid(Load({"--device", "cuda:0,cuda:0"}), "names cuda:0 twice");
  ExpectInvalid(Load({"--device", "cuda,cuda:1"}), "already means every GPU");
  ExpectInvalid(Load({"--device", ""}), "is not a device");
  absl::StatusOr<ServerConfig> c = Load({"--device", "cuda:0"});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->device, "cuda:0");
}

TEST(ServerConfigTest, WorkerLayoutFollowsTheCores) {
  ServerConfig c;
  int workers = 0, threads = 0;
  ResolveWorkers(c, 2, &workers, &threads);
  EXPECT_EQ(workers, 2);
  EXPECT_EQ(threads, 1);
  ResolveWorkers(c, 16, &workers, &threads);
  EXPECT_EQ(workers, 4);
  EXPECT_EQ(threads, 4);
  c.workers = 1;
  ResolveWorkers(c, 8, &workers, &threads);
  EXPECT_EQ(workers, 1);
  EXPECT_EQ(threads, 8);
  c.threads_per_worker = 2;
  ResolveWorkers(c, 8, &workers, &threads);
  EXPECT_EQ(threads, 2);
}

// ---- context ids ----------------------------------------------------------------------------

CompressionSpec Spec(const std::string& method, double ratio) {
  CompressionSpec s;
  s.method = method;
  s.ratio = ratio;
  return s;
}

TEST(ContextIdTest, PinnedDerivation) {
  // Changing the derivation invalidates every cached context in every deployment's Redis:
  // this value may only change together with the "ctxcache.context_id.vN" tag. It was checked
  // independently: SHA-256 over each field as a little-endian u64 length plus its bytes
  // (tag, tenant, fingerprint, method, canonical params, "1", the int32 tokens, "question", "").
  // v2 (issue 14: fingerprint with hyper-parameters, exact float params); v1 gave
  // 21181c8a7f25db664d55042dd22b5e7081e1c3036a1573aa7afac5101705d745.
  const std::vector<int32_t> tokens = {1, 2, 3, 50000};
  EXPECT_EQ(ContextId("default", std::string(64, 'f'), Spec("snapkv", 4), 1, tokens),
            "7de07bab00548c619292441f81131596710e772dc3933be9b0b2c3937cc78c76");
}

TEST(ContextIdTest, EveryInputThatChangesTheBytesChangesTheId) {
  const std::string fp(64, 'a');
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  const std::string base = ContextId("t", fp, Spec("snapkv", 4), 1, tokens);
  EXPECT_EQ(base.size(), 64u);
  EXPECT_TRUE(ValidateContextId(base).ok());
  EXPECT_EQ(base, ContextId("t", fp, Spec("snapkv", 4), 1, tokens));  // stable
  std::set<std::string> ids = {base};
  auto add = [&](const std::string& id, const char* what) {
    EXPECT_TRUE(ids.insert(id).second) << what << " did not change the id";
  };
  add(ContextId("u", fp, Spec("snapkv", 4), 1, tokens), "tenant");
  add(ContextId("t", std::string(64, 'b'), Spec("snapkv", 4), 1, tokens), "fingerprint");
  add(ContextId("t", fp, Spec("streaming", 4), 1, tokens), "method");
  add(ContextId("t", fp, Spec("snapkv", 8), 1, tokens), "ratio");
  // Issue 14: ratio printed with 6 significant digits, so 3.999999 and 4 shared an id while
  // keeping different budgets (ceil(n / ratio) differs at n = 4000000 and up).
  add(ContextId("t", fp, Spec("snapkv", 3.999999), 1, tokens), "ratio 3.999999 vs 4");
  add(ContextId("t", fp, Spec("snapkv", std::nextafter(4.0, 5.0)), 1, tokens),
      "ratio one ulp above 4");
  CompressionSpec per_layer = Spec("snapkv", 4);
  per_layer.per_layer = true;
  add(ContextId("t", fp, per_layer, 1, tokens), "per_layer");
  add(ContextId("t", fp, Spec("snapkv", 4), 2, tokens), "method version");
  add(ContextId("t", fp, Spec("snapkv", 4), 1, {1, 2, 3, 5, 4}), "token order");
  add(ContextId("t", fp, Spec("snapkv", 4), 1, {1, 2, 3, 4}), "token count");
  CompressionSpec adaptive = Spec("snapkv", 4);
  adaptive.head_budget = "adaptive";
  add(ContextId("t", fp, adaptive, 1, tokens), "head_budget");
  adaptive.head_budget_alpha = 0.3;
  add(ContextId("t", fp, adaptive, 1, tokens), "head_budget_alpha");
  CompressionSpec asked = Spec("snapkv", 4);
  asked.question = "Who?";
  add(ContextId("t", fp, asked, 1, tokens), "question (snapkv)");
  // Field boundaries are hashed: moving a character between tenant and fingerprint differs.
  add(ContextId("ta", fp.substr(1), Spec("snapkv", 4), 1, tokens), "field boundary");
}

TEST(ContextIdTest, QuestionOnlyCountsForMethodsThatReadIt) {
  EXPECT_TRUE(MethodUsesQuestion("snapkv"));
  EXPECT_TRUE(MethodUsesQuestion("finch"));
  EXPECT_FALSE(MethodUsesQuestion("streaming"));
  EXPECT_FALSE(MethodUsesQuestion("expected_attention"));
  const std::string fp(64, 'a');
  CompressionSpec a = Spec("streaming", 4), b = Spec("streaming", 4);
  b.question = "irrelevant";
  EXPECT_EQ(ContextId("t", fp, a, 1, {7, 8}), ContextId("t", fp, b, 1, {7, 8}));
}

TEST(ContextIdTest, ValidateContextId) {
  EXPECT_TRUE(ValidateContextId(std::string(64, '0')).ok());
  EXPECT_FALSE(ValidateContextId(std::string(63, '0')).ok());
  EXPECT_FALSE(ValidateContextId(std::string(64, 'A')).ok());  // lowercase only
  EXPECT_FALSE(ValidateContextId("").ok());
  EXPECT_NE(ValidateContextId("xyz").message().find("64 lowercase hex"), std::string::npos);
}

// ---- auth ------------------------------------------------------------------------------------

TEST(TokenAuthTest, ParsesTokenFilesAndMapsBearerTokensToTenants) {
  absl::StatusOr<TokenAuth> auth = TokenAuth::Parse(
      "# tokens\n\n  alpha-secret-1   team-a \nbeta-secret-22\tteam.b\n", "tokens");
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE(auth->enabled());
  EXPECT_EQ(auth->size(), 2u);
  EXPECT_EQ(*auth->Authenticate("Bearer alpha-secret-1"), "team-a");
  EXPECT_EQ(*auth->Authenticate("bearer beta-secret-22"), "team.b");
  EXPECT_EQ(auth->Authenticate("").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(auth->Authenticate("").status().message().find("authorization: Bearer"),
            std::string::npos);
  EXPECT_EQ(auth->Authenticate("Basic abc").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth->Authenticate("Bearer alpha-secret-2").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth->Authenticate("Bearer ").status().code(), absl::StatusCode::kUnauthenticated);
  // Off: everyone is the default tenant.
  TokenAuth off;
  EXPECT_FALSE(off.enabled());
  EXPECT_EQ(*off.Authenticate(""), kDefaultTenant);
}

TEST(TokenAuthTest, RejectsMalformedTokenFiles) {
  auto err = [](const std::string& text) {
    return std::string(TokenAuth::Parse(text, "f").status().message());
  };
  EXPECT_NE(err("only-one-field\n").find("f:1: expected 'TOKEN TENANT'"), std::string::npos);
  EXPECT_NE(err("a b c\n").find("got 3 fields"), std::string::npos);
  EXPECT_NE(err("short t\n").find("too short"), std::string::npos);
  EXPECT_NE(err("long-enough-token bad/tenant\n").find("tenant 'bad/tenant'"), std::string::npos);
  EXPECT_NE(err("long-enough-token a\nlong-enough-token b\n").find("f:2: token listed twice"),
            std::string::npos);
  EXPECT_NE(err("# nothing\n").find("no tokens"), std::string::npos);
  EXPECT_EQ(TokenAuth::FromFile("/nonexistent/tokens").status().code(),
            absl::StatusCode::kNotFound);
}

// ---- UTF-8, status mapping, request ids ----------------------------------------------------

// Issue 14 (item 8): nothing warned when a server without auth listened beyond loopback.
TEST(TokenAuthTest, WarnsWhenAuthIsOffOnANonLoopbackAddress) {
  for (const char* local : {"127.0.0.1:50051", "127.3.2.1:0", "[::1]:50051", "localhost:80",
                            "unix:/tmp/ctxcache.sock"}) {
    EXPECT_TRUE(server::IsLoopbackListen(local)) << local;
    EXPECT_EQ(server::AuthOffWarning(local, false), "") << local;
  }
  for (const char* open : {"0.0.0.0:50051", "[::]:50051", "10.0.0.7:50051", "example.com:443",
                           "127.0.0.1.example.com:1", "1127.0.0.1:5", "127.0.0:5"}) {
    EXPECT_FALSE(server::IsLoopbackListen(open)) << open;
    const std::string w = server::AuthOffWarning(open, false);
    EXPECT_NE(w.find("authentication is off"), std::string::npos) << open;
    EXPECT_NE(w.find(open), std::string::npos) << w;
    EXPECT_NE(w.find("--auth-tokens"), std::string::npos) << w;
    EXPECT_EQ(server::AuthOffWarning(open, true), "") << open;
  }
}

TEST(Utf8Test, AcceptsUtf8AndNamesTheFirstBadByte) {
  EXPECT_TRUE(CheckUtf8("", "f").ok());
  EXPECT_TRUE(CheckUtf8("plain ascii", "f").ok());
  EXPECT_TRUE(CheckUtf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "f").ok());  // é € 😀
  EXPECT_TRUE(CheckUtf8("\xf4\x8f\xbf\xbf", "f").ok());                           // U+10FFFF
  const std::vector<std::pair<std::string, size_t>> bad = {
      {"ab\x80", 2},                  // lone continuation byte
      {"\xc0\xaf", 0},                // overlong '/'
      {"x\xe0\x80\xaf", 1},           // overlong, 3 bytes
      {"\xed\xa0\x80", 0},            // UTF-16 surrogate
      {"ok\xf4\x90\x80\x80", 2},      // past U+10FFFF
      {"end\xe2\x82", 3},             // truncated
      {"\xff", 0},                    // never valid
  };
  for (const auto& [text, offset] : bad) {
    absl::Status s = CheckUtf8(text, "doc");
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find(absl::StrCat("doc is not valid UTF-8 (first bad byte at offset ",
                                            offset, ")")),
              std::string::npos)
        << s.message();
  }
}

TEST(StatusMapTest, KeepsCodesAndMessagesExceptInternalDetails) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  const std::vector<std::pair<absl::Status, grpc::StatusCode>> cases = {
      {absl::InvalidArgumentError("m"), grpc::StatusCode::INVALID_ARGUMENT},
      {absl::NotFoundError("m"), grpc::StatusCode::NOT_FOUND},
      {absl::ResourceExhaustedError("m"), grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::DeadlineExceededError("m"), grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::CancelledError("m"), grpc::StatusCode::CANCELLED},
      {absl::UnavailableError("m"), grpc::StatusCode::UNAVAILABLE},
      {absl::UnauthenticatedError("m"), grpc::StatusCode::UNAUTHENTICATED},
      {absl::OutOfRangeError("m"), grpc::StatusCode::OUT_OF_RANGE},
      {absl::FailedPreconditionError("m"), grpc::StatusCode::FAILED_PRECONDITION},
      {absl::InternalError("m"), grpc::StatusCode::INTERNAL},
  };
  for (const auto& [in, code] : cases) {
    grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(out.error_code(), code) << in;
    EXPECT_EQ(out.error_message(), "m");
  }
  grpc::Status loss = ToGrpcStatus(absl::DataLossError("crc"));
  EXPECT_EQ(loss.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_NE(loss.error_message().find("crc"), std::string::npos);
}

TEST(LoggingTest, RequestIdsAndJsonEscaping) {
  EXPECT_EQ(RequestId("client-req.42_x"), "client-req.42_x");
  const std::string a = RequestId(""), b = RequestId("bad id with spaces");
  EXPECT_EQ(a.size(), 16u);
  EXPECT_EQ(b.size(), 16u);
  EXPECT_NE(a, b);
  EXPECT_EQ(RequestId(std::string(65, 'x')).size(), 16u);
  EXPECT_EQ(JsonEscape("a\"b\\c\nd\x01"), "a\\\"b\\\\c\\nd\\u0001");
  EXPECT_TRUE(ConfigureLogging("json", "warn").ok());
  EXPECT_TRUE(ConfigureLogging("plain", "warn").ok());  // twice: replaces, does not throw
}

// ---- proto -> native ---------------------------------------------------------------------------

TEST(ConvertTest, HeadBudgetReachesTheSpecAndDefaultsToTheMethods) {
  ctxcache::v1::CompressRequest req;
  req.mutable_document()->set_text("doc");
  ctxcache::v1::CompressionParams* p = req.mutable_compression();
  p->set_method("kvzip");
  p->set_ratio(4);
  absl::StatusOr<CompressInput> in = FromProto(req);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->spec.HeadBudget(), "global");  // kvzip's default (KVzip's one threshold)
  EXPECT_EQ(in->spec.head_budget_alpha, CompressionSpec().head_budget_alpha);
  EXPECT_EQ(in->spec.CanonicalParams(),
            "chunk=512;head_budget=global;head_budget_alpha=0.2;n_sink=4;per_layer=0;ratio=4");
  p->set_method("snapkv");
  in = FromProto(req);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->spec.HeadBudget(), "uniform");
  EXPECT_EQ(in->spec.CanonicalParams(), "kernel=5;n_sink=4;per_layer=0;pooling=avg;ratio=4");
  p->set_method("kvzip");
  p->set_head_budget("uniform");  // kvzip's previous selection, with its previous key
  in = FromProto(req);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->spec.CanonicalParams(), "chunk=512;n_sink=4;per_layer=0;ratio=4");
  p->set_head_budget("adaptive");
  p->set_head_budget_alpha(0.25);
  in = FromProto(req);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->spec.head_budget, "adaptive");
  EXPECT_EQ(in->spec.head_budget_alpha, 0.25);
  EXPECT_TRUE(in->spec.Validate().ok());
  EXPECT_EQ(in->spec.CanonicalParams(),
            "chunk=512;head_budget=adaptive;head_budget_alpha=0.25;n_sink=4;per_layer=0;ratio=4");
  p->set_head_budget("Adaptive");  // passed through as given; Validate names the choices
  in = FromProto(req);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->spec.Validate().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConvertTest, UnsetOptionalFieldsKeepTheEngineDefaults) {
  ctxcache::v1::GenerateRequest req;
  req.set_text("hi");
  absl::StatusOr<GenerateInput> in = FromProto(req);
  ASSERT_TRUE(in.ok());
  const GenerateParams defaults;
  EXPECT_EQ(in->params.max_tokens, defaults.max_tokens);
  EXPECT_EQ(in->params.sampling.temperature, defaults.sampling.temperature);
  EXPECT_EQ(in->params.sampling.top_k, defaults.sampling.top_k);
  EXPECT_EQ(in->params.sampling.top_p, defaults.sampling.top_p);
  EXPECT_EQ(in->params.decode.kind, DecodePolicy::Kind::kFull);
  EXPECT_FALSE(in->chat);
  EXPECT_EQ(in->text, "hi");

  // Zero is a value, not "unset": temperature 0 is greedy.
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_top_k(0);
  req.set_max_tokens(7);
  req.mutable_decode()->set_kind(ctxcache::v1::DecodePolicy::KIND_RECYCLED);
  req.mutable_decode()->set_stride(4);
  req.add_stop("\n\n");
  ctxcache::v1::ContextRef* ref = req.add_contexts();
  ref->mutable_inline_()->mutable_document()->mutable_tokens()->add_ids(5);
  ref->mutable_inline_()->mutable_compression()->set_method("finch");
  ref->mutable_inline_()->mutable_compression()->set_budget(64);
  ref->mutable_inline_()->mutable_compression()->set_chunk(128);
  ref->mutable_inline_()->set_question("Who?");
  ctxcache::v1::ContextRef* by_id = req.add_contexts();
  by_id->set_context_id("abc");
  by_id->mutable_select()->set_ratio(4);
  in = FromProto(req);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->params.sampling.temperature, 0.f);
  EXPECT_EQ(in->params.sampling.top_k, 0);
  EXPECT_EQ(in->params.max_tokens, 7);
  EXPECT_EQ(in->params.decode.kind, DecodePolicy::Kind::kRecycled);
  EXPECT_EQ(in->params.decode.stride, 4);
  EXPECT_EQ(in->params.stop, std::vector<std::string>{"\n\n"});
  ASSERT_EQ(in->contexts.size(), 2u);
  ASSERT_TRUE(in->contexts[0].inline_doc.has_value());
  const CompressInput& c = *in->contexts[0].inline_doc;
  EXPECT_FALSE(c.document.is_text);
  EXPECT_EQ(c.document.tokens, std::vector<int32_t>{5});
  EXPECT_EQ(c.spec.method, "finch");
  EXPECT_EQ(c.spec.budget, 64);
  EXPECT_EQ(c.spec.chunk, 128);
  EXPECT_EQ(c.spec.n_sink, CompressionSpec().n_sink);  // unset: default
  EXPECT_EQ(c.spec.question, "Who?");
  EXPECT_FALSE(in->contexts[0].select.has_value());  // no select: the context as stored
  EXPECT_EQ(in->contexts[1].context_id, "abc");
  ASSERT_TRUE(in->contexts[1].select.has_value());
  EXPECT_EQ(in->contexts[1].select->ratio, 4);
  EXPECT_EQ(in->contexts[1].select->budget, 0);

  req.mutable_decode()->set_kind(static_cast<ctxcache::v1::DecodePolicy::Kind>(9));
  EXPECT_EQ(FromProto(req).status().code(), absl::StatusCode::kInvalidArgument);
}

// Per-tenant capacity series are read from the scheduler and the memory tier at scrape. Past
// the 50-tenant cap the rest share tenant="other", which must carry their sum (not the last
// folded tenant's value).
TEST(ServerMetricsTest, TenantCapacitySeriesFoldTenantsPastTheCapIntoTheirSum) {
  ServerMetrics metrics("test");
  SchedulerStats sched;
  ContextStoreStats store;
  const int tenants = static_cast<int>(kMaxTenantSeries) + 3;
  for (int i = 0; i < tenants; ++i) {
    const std::string t = absl::StrCat("t", 100 + i);  // sorted in creation order
    sched.tenants[t] = TenantSchedulerStats{/*in_flight=*/1, /*refused=*/i};
    store.memory_tenant_bytes[t] = 1000 + i;
  }
  ServerMetrics::Sources sources;
  sources.scheduler = [&] { return sched; };
  sources.store = [&] { return store; };
  metrics.SetSources(sources);
  const std::string text = metrics.Render();
  auto has = [&](const std::string& line) {
    EXPECT_NE(text.find(line + "\n"), std::string::npos) << line << "\n" << text;
  };
  has("ctxcache_tenant_requests_refused_total{tenant=\"t100\"} 0");
  has("ctxcache_tenant_requests_refused_total{tenant=\"t101\"} 1");
  has("ctxcache_tenant_requests_in_flight{tenant=\"t149\"} 1");
  has("ctxcache_tenant_memory_cache_bytes{tenant=\"t149\"} 1049");
  // t150, t151, t152 fold: refused 50 + 51 + 52, one in flight each, bytes 1050 + 1051 + 1052.
  has("ctxcache_tenant_requests_refused_total{tenant=\"other\"} 153");
  has("ctxcache_tenant_requests_in_flight{tenant=\"other\"} 3");
  has("ctxcache_tenant_memory_cache_bytes{tenant=\"other\"} 3153");
  EXPECT_EQ(text.find("tenant=\"t150\""), std::string::npos);
  // Gauges follow the sources down (a tenant whose work ended reads 0, not its last value).
  sched.tenants["t100"].in_flight = 0;
  store.memory_tenant_bytes["t100"] = 0;
  const std::string later = metrics.Render();
  EXPECT_NE(later.find("ctxcache_tenant_requests_in_flight{tenant=\"t100\"} 0\n"),
            std::string::npos);
  EXPECT_NE(later.find("ctxcache_tenant_memory_cache_bytes{tenant=\"t100\"} 0\n"),
            std::string::npos);
  metrics.ClearSources();
}

}  // namespace
}  // namespace ctxcache::server
