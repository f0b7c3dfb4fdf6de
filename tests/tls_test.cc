// Transport security end to end (server/tls.h, server/auth.h): certificates made at test time
// with Debian's `openssl` command, a server in process (and the shipped binary where a signal
// or the exit status is what is tested), real gRPC, HTTPS and OpenSSL clients.
//
//  - plaintext clients are refused on every listener of a TLS server; a client trusting
//    another CA refuses the server; mutual TLS refuses a client without a certificate or with
//    one from another CA;
//  - a client certificate mapped to tenant A cannot read tenant B's contexts (gRPC and HTTP);
//  - a rotated certificate is served to new connections without a restart, an open
//    connection keeps working, a bad new certificate is refused and the old one kept;
//  - a revoked token is refused after SIGHUP (the binary) and after the file changes; a
//    malformed token file is refused with the old set kept;
//  - failed authentications are throttled per peer, and refused calls are counted by reason;
//  - bad certificate files stop the start-up naming the file and the problem;
//  - the CLI connects over TLS and mutual TLS.
#include "server/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "ctxcache/v1/ctxcache.grpc.pb.h"
#include "server/auth.h"
#include "server/logging.h"
#include "server/server.h"
#include "tests/redis_server.h"
#include "tests/test_util.h"

extern char** environ;

namespace ctxcache::testing {
namespace {

namespace pb = ::ctxcache::v1;
using server::ServerConfig;
using server::ServerInstance;
using Clock = std::chrono::steady_clock;

constexpr char kDocument[] =
    "The Harbor Street Library was founded in 1887 by the shipbuilder Margaret Olsen. Its cat, "
    "a grey tabby named Compass, sleeps on the map table most afternoons.";

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Replaces a file in one rename, as kubelet and cert-manager do.
void Replace(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".new";
  std::ofstream(tmp, std::ios::binary) << text;
  std::filesystem::rename(tmp, path);
}

// Certificates made with the openssl command: two CAs, server certificates (SAN localhost and
// 127.0.0.1), client certificates with CN and URI identities, an expired one, a key that
// matches nothing.
class Pki {
 public:
  Pki() {
    char templ[] = "/tmp/ctxcache-pki-XXXXXX";
    dir_ = mkdtemp(templ) != nullptr ? templ : "";
  }
  ~Pki() {
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  const std::string& error() const { return error_; }

  bool Make() {
    return !dir_.empty() && MakeCa("ca", "ctxcache test CA") && MakeCa("other-ca", "other CA") &&
           Leaf("server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth", 2) &&
           Leaf("server2", "ca", "localhost-rotated", "DNS:localhost,IP:127.0.0.1", "serverAuth",
                3) &&
           Leaf("expired", "ca", "localhost-expired", "DNS:localhost,IP:127.0.0.1", "serverAuth",
                -1) &&
           Leaf("alice", "ca", "alice", "URI:spiffe://test/ns/rag/sa/alice", "clientAuth", 2) &&
           Leaf("bob", "ca", "bob", "DNS:bob.example", "clientAuth", 2) &&
           Leaf("carol", "ca", "carol", "email:carol@example.com", "clientAuth", 2) &&
           Leaf("mallory", "other-ca", "alice", "URI:spiffe://test/ns/rag/sa/alice", "clientAuth",
                2) &&
           Run(absl::StrCat("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ",
                            Path("stray.key")));
  }

 private:
  bool Run(const std::string& cmd) {
    const std::string full = absl::StrCat(cmd, " >>", Path("openssl.log"), " 2>&1");
    if (std::system(full.c_str()) == 0) return true;
    error_ = absl::StrCat("failed: ", cmd, "\n", ReadAll(Path("openssl.log")));
    return false;
  }
  bool MakeCa(const std::string& name, const std::string& cn) {
    return Run(absl::StrCat("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes",
                            " -keyout ", Path(name + ".key"), " -out ", Path(name + ".pem"),
                            " -days 3 -subj '/CN=", cn, "'"));
  }
  bool Leaf(const std::string& name, const std::string& ca, const std::string& cn,
            const std::string& san, const std::string& usage, int days) {
    std::ofstream(Path(name + ".ext")) << "basicConstraints=CA:FALSE\nsubjectAltName=" << san
                                       << "\nextendedKeyUsage=" << usage << "\n";
    return Run(absl::StrCat("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes",
                            " -keyout ", Path(name + ".key"), " -out ", Path(name + ".csr"),
                            " -subj '/CN=", cn, "'")) &&
           Run(absl::StrCat("openssl x509 -req -in ", Path(name + ".csr"), " -CA ",
                            Path(ca + ".pem"), " -CAkey ", Path(ca + ".key"), " -set_serial ",
                            ++serial_, " -days ", days, " -extfile ", Path(name + ".ext"), " -out ",
                            Path(name + ".pem")));
  }
  std::string dir_, error_;
  int serial_ = 1000;
};

// A gRPC channel: plaintext (ca empty and plaintext), TLS trusting `ca`, with a client
// certificate when `client` names one of the Pki's.
std::shared_ptr<grpc::Channel> Channel(const std::string& address, const Pki* pki,
                                       const std::string& ca, const std::string& client = "") {
  if (pki == nullptr) return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = ReadAll(pki->Path(ca + ".pem"));
  if (!client.empty()) {
    o.pem_cert_chain = ReadAll(pki->Path(client + ".pem"));
    o.pem_private_key = ReadAll(pki->Path(client + ".key"));
  }
  // Each channel its own connection (no subchannel sharing), so a new channel is a new
  // handshake.
  grpc::ChannelArguments args;
  args.SetInt("grpc.use_local_subchannel_pool", 1);
  return grpc::CreateCustomChannel(address, grpc::SslCredentials(o), args);
}

// GetModelInfo with a deadline (and a token); the status, and the server certificate's CN
// as the client saw it.
grpc::Status Info(const std::shared_ptr<grpc::Channel>& channel, const std::string& token = "",
                  std::string* server_cn = nullptr) {
  auto stub = pb::ContextCache::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  pb::GetModelInfoResponse resp;
  grpc::Status s = stub->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &resp);
  if (server_cn != nullptr && ctx.auth_context() != nullptr) {
    for (const grpc::string_ref& cn : ctx.auth_context()->FindPropertyValues("x509_common_name")) {
      *server_cn = std::string(cn.data(), cn.size());
    }
  }
  return s;
}

// The CN of the certificate a TLS listener presents to a new connection; "" when the
// handshake fails.
std::string ServedCommonName(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string cn;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    timeval tv{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1) {
      if (X509* cert = SSL_get1_peer_certificate(ssl)) {
        for (const std::string& id : server::CertificateIdentities(cert)) {
          if (id.rfind("CN:", 0) == 0) cn = id.substr(3);
        }
        X509_free(cert);
      }
      SSL_shutdown(ssl);
    }
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    ERR_clear_error();
  }
  close(fd);
  return cn;
}

// An HTTPS client of a listener, trusting `ca`, with an optional client certificate.
std::unique_ptr<httplib::SSLClient> Https(int port, const Pki& pki, const std::string& ca,
                                          const std::string& client = "") {
  auto c = client.empty()
               ? std::make_unique<httplib::SSLClient>("127.0.0.1", port)
               : std::make_unique<httplib::SSLClient>("127.0.0.1", port, pki.Path(client + ".pem"),
                                                      pki.Path(client + ".key"));
  c->set_ca_cert_path(pki.Path(ca + ".pem").c_str());
  c->enable_server_certificate_verification(true);
  c->set_connection_timeout(5, 0);
  c->set_read_timeout(5, 0);
  return c;
}

// The value of an unlabelled or labelled series in a text exposition; -1 when absent.
double Metric(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

// Polls `done` every 50 ms for up to `seconds`.
template <typename F>
bool Eventually(F done, double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return done();
}

class TlsTest : public FastModelTest {
 protected:
  static void SetUpTestSuite() {
    (void)server::ConfigureLogging("plain", "warn");
    pki_ = new Pki();
    made_ = pki_->Make();
  }
  static void TearDownTestSuite() {
    delete pki_;
    pki_ = nullptr;
  }
  void SetUp() override {
    FastModelTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_TRUE(made_) << pki_->error();
    char templ[] = "/tmp/ctxcache-tls-test-XXXXXX";
    ASSERT_NE(mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }

  // A copy of a Pki file in this test's directory (so a test can rewrite it).
  std::string Copy(const std::string& name) {
    const std::string to = dir_ + "/" + name;
    std::filesystem::copy_file(pki_->Path(name), to,
                               std::filesystem::copy_options::overwrite_existing);
    return to;
  }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }

  ServerConfig TlsConfig(bool mutual) {
    ServerConfig c;
    c.listen = "127.0.0.1:0";
    c.metrics_listen = "127.0.0.1:0";
    c.http_listen = "127.0.0.1:0";
    c.workers = 1;
    c.threads_per_worker = 1;
    c.memory_cache_bytes = 64 << 20;
    c.max_kv_bytes = int64_t{1} << 30;
    c.drain_timeout_seconds = 5;
    c.tls_cert = Copy("server.pem");
    c.tls_key = Copy("server.key");
    if (mutual) c.tls_client_ca = Copy("ca.pem");
    return c;
  }

  std::unique_ptr<ServerInstance> Start(const ServerConfig& config) {
    absl::StatusOr<std::unique_ptr<ServerInstance>> s = ServerInstance::Start(config, &model());
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return nullptr;
    absl::Status st = (*s)->Load();
    EXPECT_TRUE(st.ok()) << st;
    return *std::move(s);
  }

  static Pki* pki_;
  static bool made_;
  std::string dir_;
};

Pki* TlsTest::pki_ = nullptr;
bool TlsTest::made_ = false;

TEST_F(TlsTest, PlaintextClientsAreRefusedOnEveryListener) {
  std::unique_ptr<ServerInstance> s = Start(TlsConfig(/*mutual=*/false));
  ASSERT_NE(s, nullptr);
  ASSERT_TRUE(s->tls());
  // gRPC: a plaintext client gets no answer; a TLS client trusting the CA does.
  const grpc::Status plain = Info(Channel(s->address(), nullptr, ""));
  EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();
  std::string cn;
  const grpc::Status tls = Info(Channel(s->address(), pki_, "ca"), "", &cn);
  EXPECT_TRUE(tls.ok()) << tls.error_message();
  EXPECT_EQ(cn, "localhost");
  // Metrics and the HTTP API: plain HTTP gets nothing back, HTTPS works.
  for (const int port : {s->metrics_port(), s->http_port()}) {
    httplib::Client plain_http("127.0.0.1", port);
    plain_http.set_connection_timeout(5, 0);
    plain_http.set_read_timeout(5, 0);
    const httplib::Result r = plain_http.Get("/health");
    EXPECT_TRUE(!r || (r->status != 200)) << "port " << port << " answered plain HTTP";
    const httplib::Result ok = Https(port, *pki_, "ca")->Get("/health");
    ASSERT_TRUE(ok) << "port " << port << ": " << httplib::to_string(ok.error());
    EXPECT_EQ(ok->status, 200) << ok->body;
  }
  const httplib::Result metrics = Https(s->metrics_port(), *pki_, "ca")->Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_GT(Metric(metrics->body, "ctxcache_tls_certificate_expiry_timestamp_seconds"),
            static_cast<double>(std::time(nullptr)));
  // /health on the metrics listener follows readiness: NOT_SERVING while draining.
  s->BeginDrain();
  const httplib::Result draining = Https(s->metrics_port(), *pki_, "ca")->Get("/health");
  ASSERT_TRUE(draining);
  EXPECT_EQ(draining->status, 503);
  EXPECT_EQ(draining->body, "NOT_SERVING\n");
}

TEST_F(TlsTest, AClientTrustingAnotherCaRefusesTheServer) {
  std::unique_ptr<ServerInstance> s = Start(TlsConfig(/*mutual=*/false));
  ASSERT_NE(s, nullptr);
  const grpc::Status wrong = Info(Channel(s->address(), pki_, "other-ca"));
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAVAILABLE) << wrong.error_message();
  for (const int port : {s->metrics_port(), s->http_port()}) {
    const httplib::Result r = Https(port, *pki_, "other-ca")->Get("/health");
    EXPECT_FALSE(r) << "port " << port << " was trusted with the wrong CA";
    if (!r) {
      EXPECT_EQ(r.error(), httplib::Error::SSLServerVerification);
    }
  }
}

TEST_F(TlsTest, MutualTlsRefusesClientsWithoutACertificateFromTheCa) {
  std::unique_ptr<ServerInstance> s = Start(TlsConfig(/*mutual=*/true));
  ASSERT_NE(s, nullptr);
  const grpc::Status none = Info(Channel(s->address(), pki_, "ca"));
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAVAILABLE) << none.error_message();
  const grpc::Status foreign = Info(Channel(s->address(), pki_, "ca", "mallory"));
  EXPECT_EQ(foreign.error_code(), grpc::StatusCode::UNAVAILABLE) << foreign.error_message();
  const grpc::Status alice = Info(Channel(s->address(), pki_, "ca", "alice"));
  EXPECT_TRUE(alice.ok()) << alice.error_message();
  // The HTTP API asks for a client certificate too.
  EXPECT_FALSE(Https(s->http_port(), *pki_, "ca")->Get("/v1/models"));
  EXPECT_FALSE(Https(s->http_port(), *pki_, "ca", "mallory")->Get("/v1/models"));
  const httplib::Result ok = Https(s->http_port(), *pki_, "ca", "alice")->Get("/v1/models");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  // The metrics listener does not (probes and scrapers have no client certificate).
  const httplib::Result probe = Https(s->metrics_port(), *pki_, "ca")->Get("/health");
  ASSERT_TRUE(probe);
  EXPECT_EQ(probe->status, 200);
}

TEST_F(TlsTest, ClientCertificatesNameTenantsThatCannotReadEachOther) {
  ServerConfig c = TlsConfig(/*mutual=*/true);
  c.tls_client_tenants = Write("tenants",
                               "# identity tenant\n"
                               "URI:spiffe://test/ns/rag/sa/alice tenant-a\n"
                               "CN:bob tenant-b\n");
  c.auth_tokens_file = Write("tokens", "bob-token-123 tenant-b\n");
  std::unique_ptr<ServerInstance> s = Start(c);
  ASSERT_NE(s, nullptr);
  auto alice = pb::ContextCache::NewStub(Channel(s->address(), pki_, "ca", "alice"));
  auto bob = pb::ContextCache::NewStub(Channel(s->address(), pki_, "ca", "bob"));
  auto carol = pb::ContextCache::NewStub(Channel(s->address(), pki_, "ca", "carol"));

  pb::CompressRequest req;
  req.mutable_document()->set_text(kDocument);
  req.mutable_compression()->set_method("snapkv");
  req.mutable_compression()->set_ratio(2);
  pb::CompressResponse compressed;
  {
    grpc::ClientContext ctx;
    const grpc::Status st = alice->Compress(&ctx, req, &compressed);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  auto get = [&](pb::ContextCache::Stub& stub, const std::string& token = "") {
    grpc::ClientContext ctx;
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    pb::GetContextRequest g;
    g.set_context_id(compressed.context().context_id());
    pb::GetContextResponse resp;
    return stub.GetContext(&ctx, g, &resp);
  };
  EXPECT_TRUE(get(*alice).ok());
  const grpc::Status b = get(*bob);
  EXPECT_EQ(b.error_code(), grpc::StatusCode::NOT_FOUND) << b.error_message();
  // A certificate no line maps: refused, naming its identities.
  const grpc::Status unmapped = get(*carol);
  EXPECT_EQ(unmapped.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(unmapped.error_message().find("email:carol@example.com"), std::string::npos)
      << unmapped.error_message();
  // ... unless it brings a token; a token of another tenant than the certificate's: refused.
  EXPECT_EQ(get(*carol, "bob-token-123").error_code(), grpc::StatusCode::NOT_FOUND);
  const grpc::Status mismatch = get(*alice, "bob-token-123");
  EXPECT_EQ(mismatch.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(mismatch.error_message().find("tenant-a"), std::string::npos)
      << mismatch.error_message();

  // The HTTP API maps certificates the same way.
  const std::string path = "/v1/contexts/" + compressed.context().context_id();
  const httplib::Result a_http = Https(s->http_port(), *pki_, "ca", "alice")->Get(path);
  ASSERT_TRUE(a_http);
  EXPECT_EQ(a_http->status, 200) << a_http->body;
  const httplib::Result b_http = Https(s->http_port(), *pki_, "ca", "bob")->Get(path);
  ASSERT_TRUE(b_http);
  EXPECT_EQ(b_http->status, 404) << b_http->body;
  const httplib::Result c_http = Https(s->http_port(), *pki_, "ca", "carol")->Get(path);
  ASSERT_TRUE(c_http);
  EXPECT_EQ(c_http->status, 401) << c_http->body;

  const std::string m = s->metrics().Render();
  EXPECT_EQ(Metric(m, "ctxcache_auth_refused_total{reason=\"unmapped_certificate\"}"), 2) << m;
  EXPECT_EQ(Metric(m, "ctxcache_auth_refused_total{reason=\"tenant_mismatch\"}"), 1);
}

TEST_F(TlsTest, ARotatedCertificateIsServedWithoutARestart) {
  ServerConfig c = TlsConfig(/*mutual=*/false);
  c.tls_reload_seconds = 1;
  std::unique_ptr<ServerInstance> s = Start(c);
  ASSERT_NE(s, nullptr);
  auto open = Channel(s->address(), pki_, "ca");
  std::string cn;
  ASSERT_TRUE(Info(open, "", &cn).ok());
  EXPECT_EQ(cn, "localhost");
  EXPECT_EQ(ServedCommonName(s->metrics_port()), "localhost");
  EXPECT_EQ(ServedCommonName(s->http_port()), "localhost");

  // The new pair arrives as one change of both files (kubelet swaps the Secret's directory).
  Replace(c.tls_key, ReadAll(pki_->Path("server2.key")));
  Replace(c.tls_cert, ReadAll(pki_->Path("server2.pem")));
  EXPECT_TRUE(Eventually(
      [&] {
        std::string now;
        return Info(Channel(s->address(), pki_, "ca"), "", &now).ok() && now == "localhost-rotated";
      },
      10))
      << "the gRPC listener never served the rotated certificate";
  EXPECT_TRUE(
      Eventually([&] { return ServedCommonName(s->metrics_port()) == "localhost-rotated"; }, 5));
  EXPECT_TRUE(
      Eventually([&] { return ServedCommonName(s->http_port()) == "localhost-rotated"; }, 5));
  // The connection made before the rotation still answers (same session, no reconnect).
  const grpc_connectivity_state before = open->GetState(false);
  EXPECT_TRUE(Info(open).ok());
  EXPECT_EQ(before, GRPC_CHANNEL_READY);
  std::string m = s->metrics().Render();
  EXPECT_GE(Metric(m, "ctxcache_tls_reloads_total{result=\"ok\"}"), 1) << m;

  // An expired certificate (with its key) is refused: the rotated one stays.
  Replace(c.tls_key, ReadAll(pki_->Path("expired.key")));
  Replace(c.tls_cert, ReadAll(pki_->Path("expired.pem")));
  EXPECT_TRUE(Eventually(
      [&] {
        return Metric(s->metrics().Render(), "ctxcache_tls_reloads_total{result=\"refused\"}") >= 1;
      },
      10));
  std::string still;
  EXPECT_TRUE(Info(Channel(s->address(), pki_, "ca"), "", &still).ok());
  EXPECT_EQ(still, "localhost-rotated");
  EXPECT_EQ(ServedCommonName(s->http_port()), "localhost-rotated");
}

TEST_F(TlsTest, TokenFileChangesAreReloadedAndMalformedOnesRefused) {
  ServerConfig c;
  c.listen = "127.0.0.1:0";
  c.workers = 1;
  c.threads_per_worker = 1;
  c.tls_reload_seconds = 1;
  c.auth_tokens_file = Write("tokens", "first-token-1 tenant-a\nsecond-token-2 tenant-b\n");
  std::unique_ptr<ServerInstance> s = Start(c);
  ASSERT_NE(s, nullptr);
  auto ch = Channel(s->address(), nullptr, "");
  ASSERT_TRUE(Info(ch, "first-token-1").ok());
  Replace(c.auth_tokens_file, "second-token-2 tenant-b\n");
  EXPECT_TRUE(Eventually(
      [&] { return Info(ch, "first-token-1").error_code() == grpc::StatusCode::UNAUTHENTICATED; },
      10))
      << "the revoked token still works";
  EXPECT_TRUE(Info(ch, "second-token-2").ok());
  // A malformed file (a line with three fields) is refused; the previous set stays.
  Replace(c.auth_tokens_file, "second-token-2 tenant-b extra\n");
  EXPECT_TRUE(Eventually(
      [&] {
        return Metric(s->metrics().Render(),
                      "ctxcache_auth_reloads_total{file=\"tokens\",result=\"refused\"}") == 1;
      },
      10));
  EXPECT_TRUE(Info(ch, "second-token-2").ok());
  EXPECT_EQ(Info(ch, "first-token-1").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  const std::string m = s->metrics().Render();
  EXPECT_EQ(Metric(m, "ctxcache_auth_reloads_total{file=\"tokens\",result=\"ok\"}"), 1) << m;
}

TEST_F(TlsTest, FailedAuthenticationsAreThrottledPerPeer) {
  ServerConfig c;
  c.listen = "127.0.0.1:0";
  c.http_listen = "127.0.0.1:0";
  c.workers = 1;
  c.threads_per_worker = 1;
  c.auth_failure_limit = 3;
  c.auth_tokens_file = Write("tokens", "good-token-1 tenant-a\n");
  std::unique_ptr<ServerInstance> s = Start(c);
  ASSERT_NE(s, nullptr);
  auto ch = Channel(s->address(), nullptr, "");
  EXPECT_TRUE(Info(ch, "good-token-1").ok());
  EXPECT_EQ(Info(ch, "guess-000001").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Info(ch).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Info(ch, "guess-000002").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // The limit is reached: even the right token waits, and the answer says for how long.
  const grpc::Status throttled = Info(ch, "good-token-1");
  EXPECT_EQ(throttled.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(throttled.error_message().find("retry in"), std::string::npos)
      << throttled.error_message();
  // The same peer over HTTP: 429.
  httplib::Client http("127.0.0.1", s->http_port());
  const httplib::Result r = http.Get("/v1/models", {{"Authorization", "Bearer good-token-1"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 429) << r->body;
  const std::string m = s->metrics().Render();
  EXPECT_EQ(Metric(m, "ctxcache_auth_refused_total{reason=\"unknown_token\"}"), 2) << m;
  EXPECT_EQ(Metric(m, "ctxcache_auth_refused_total{reason=\"missing_credentials\"}"), 1);
  EXPECT_EQ(Metric(m, "ctxcache_auth_refused_total{reason=\"throttled\"}"), 2);
  EXPECT_EQ(Metric(m, "ctxcache_auth_throttled_peers"), 1);
}

TEST_F(TlsTest, BadCertificateFilesStopTheStartUpNamingTheFile) {
  struct Case {
    const char* what;
    std::string cert, key, ca;
    std::string expect;  // in the message
  };
  const std::string missing = dir_ + "/no-such.pem";
  const std::string garbage = Write("garbage.pem", "not a certificate\n");
  const std::vector<Case> cases = {
      {"missing certificate", missing, Copy("server.key"), "",
       absl::StrCat("tls_cert ", missing, ": cannot read (No such file or directory)")},
      {"missing key", Copy("server.pem"), missing, "",
       absl::StrCat("tls_key ", missing, ": cannot read")},
      {"not a certificate", garbage, Copy("server.key"), "",
       absl::StrCat("tls_cert ", garbage, ": no PEM certificate in it")},
      {"a certificate as the key", Copy("server.pem"), Copy("alice.pem"), "",
       "no PEM private key in it"},
      {"key of another certificate", Copy("server.pem"), Copy("stray.key"), "",
       absl::StrCat("does not match the certificate in tls_cert ", dir_, "/server.pem")},
      {"expired certificate", Copy("expired.pem"), Copy("expired.key"), "",
       absl::StrCat("tls_cert ", dir_, "/expired.pem: expired on ")},
      {"client CA that is no certificate", Copy("server.pem"), Copy("server.key"), garbage,
       absl::StrCat("tls_client_ca ", garbage, ": no PEM certificate in it")},
      {"missing client CA", Copy("server.pem"), Copy("server.key"), missing,
       absl::StrCat("tls_client_ca ", missing, ": cannot read")},
      {"a directory as the certificate", dir_, Copy("server.key"), "",
       absl::StrCat("tls_cert ", dir_, ": is a directory")},
  };
  for (const Case& k : cases) {
    ServerConfig c;
    c.listen = "127.0.0.1:0";
    c.tls_cert = k.cert;
    c.tls_key = k.key;
    c.tls_client_ca = k.ca;
    absl::StatusOr<std::unique_ptr<ServerInstance>> s = ServerInstance::Start(c, &model());
    ASSERT_FALSE(s.ok()) << k.what << ": the server started";
    EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << k.what;
    EXPECT_NE(s.status().message().find(k.expect), std::string::npos)
        << k.what << ": " << s.status().message();
  }
  // Settings that only make sense together.
  ServerConfig half;
  half.tls_cert = Copy("server.pem");
  EXPECT_NE(server::ValidateServerConfig(half).message().find("tls_cert and tls_key go together"),
            std::string::npos);
  ServerConfig tenants_without_ca = TlsConfig(false);
  tenants_without_ca.tls_client_tenants = Write("t", "CN:x y\n");
  EXPECT_NE(server::ValidateServerConfig(tenants_without_ca).message().find("needs tls_client_ca"),
            std::string::npos);
}

// The shipped binary: start-up refused (exit 1, the file named) for an expired certificate;
// a revoked token refused after SIGHUP, a malformed file refused with the old set kept; the
// CLI over mutual TLS.
TEST_F(TlsTest, BinaryRefusesBadCertificatesReloadsTokensOnSighupAndServesTheCli) {
  auto spawn = [&](std::vector<std::string> args, const std::string& log) {
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&files, 2, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    pid_t pid = -1;
    EXPECT_EQ(posix_spawn(&pid, argv[0], &files, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&files);
    return pid;
  };
  const char* env = std::getenv("CTXCACHE_MODEL");
  const absl::StatusOr<std::string> found =
      env != nullptr && *env != '\0' ? absl::StatusOr<std::string>(env) : FindTestModel(kSmolLM2);
  ASSERT_TRUE(found.ok()) << found.status();
  const std::string model_path = *found;
  {
    const std::string log = dir_ + "/expired.log";
    const pid_t pid = spawn({CTXCACHE_SERVER_BIN, "--listen", "127.0.0.1:0", "--model", model_path,
                             "--tls-cert", Copy("expired.pem"), "--tls-key", Copy("expired.key")},
                            log);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
    EXPECT_NE(ReadAll(log).find(dir_ + "/expired.pem: expired on"), std::string::npos)
        << ReadAll(log);
  }
  const int port = FreeLoopbackPort();
  const std::string address = absl::StrCat("127.0.0.1:", port);
  const std::string tokens = Write("tokens", "old-token-1 tenant-a\nkept-token-2 tenant-b\n");
  const std::string log = dir_ + "/server.log";
  const pid_t pid = spawn(
      {CTXCACHE_SERVER_BIN, "--listen", address, "--model", model_path, "--workers", "1",
       "--auth-tokens", tokens, "--tls-reload-seconds", "3600", "--tls-cert", Copy("server.pem"),
       "--tls-key", Copy("server.key"), "--tls-client-ca", Copy("ca.pem")},
      log);
  // A new channel per try: one made before the server listens backs off for seconds.
  ASSERT_TRUE(Eventually(
      [&] { return Info(Channel(address, pki_, "ca", "alice"), "old-token-1").ok(); }, 60))
      << ReadAll(log);
  auto ch = Channel(address, pki_, "ca", "alice");
  // Revoked in the file: the file is only re-read hourly here, so SIGHUP is what applies it.
  Replace(tokens, "kept-token-2 tenant-b\n");
  ASSERT_EQ(kill(pid, SIGHUP), 0);
  EXPECT_TRUE(Eventually(
      [&] { return Info(ch, "old-token-1").error_code() == grpc::StatusCode::UNAUTHENTICATED; }, 5))
      << ReadAll(log);
  EXPECT_TRUE(Info(ch, "kept-token-2").ok());
  Replace(tokens, "kept-token-2\n");
  ASSERT_EQ(kill(pid, SIGHUP), 0);
  EXPECT_TRUE(Eventually(
      [&] {
        return ReadAll(log).find("tokens file " + tokens + " not reloaded") != std::string::npos;
      },
      5))
      << ReadAll(log);
  EXPECT_TRUE(Info(ch, "kept-token-2").ok());

  // The CLI: over mutual TLS it answers; without the CA flag it cannot connect.
  auto run = [](const std::string& cmd, int* rc) {
    std::string out;
    FILE* f = popen((cmd + " 2>&1").c_str(), "r");
    if (f == nullptr) return out;
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
    *rc = pclose(f);
    return out;
  };
  int rc = -1;
  const std::string cli =
      absl::StrCat(CTXCACHE_CLI_BIN, " info --server ", address, " --token kept-token-2");
  const std::string ok =
      run(absl::StrCat(cli, " --timeout 20 --tls-ca ", pki_->Path("ca.pem"), " --tls-cert ",
                       pki_->Path("alice.pem"), " --tls-key ", pki_->Path("alice.key")),
          &rc);
  EXPECT_EQ(rc, 0) << ok;
  EXPECT_NE(ok.find(model().fingerprint()), std::string::npos) << ok;
  // (A client that cannot connect waits out its deadline: short ones.)
  // `ctxcache health` (the images' HEALTHCHECK) over the same mutual TLS.
  const std::string health =
      run(absl::StrCat(CTXCACHE_CLI_BIN, " health --server ", address, " --timeout 20 --tls-ca ",
                       pki_->Path("ca.pem"), " --tls-cert ", pki_->Path("alice.pem"), " --tls-key ",
                       pki_->Path("alice.key")),
          &rc);
  EXPECT_EQ(rc, 0) << health;
  EXPECT_EQ(health, "SERVING\n");
  const std::string plain = run(cli + " --timeout 1", &rc);
  EXPECT_NE(rc, 0) << plain;
  const std::string no_cert =
      run(absl::StrCat(cli, " --timeout 1 --tls-ca ", pki_->Path("ca.pem")), &rc);
  EXPECT_NE(rc, 0) << no_cert;
  const std::string half = run(absl::StrCat(cli, " --tls-cert ", pki_->Path("alice.pem")), &rc);
  EXPECT_NE(half.find("--tls-cert and --tls-key go together"), std::string::npos) << half;

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadAll(log);
}

// --- no model needed below ---

TEST(CertTenantsTest, ParsesIdentityLinesAndNamesBadOnes) {
  absl::StatusOr<server::CertTenants> t = server::CertTenants::Parse(
      "# comment\n\nCN:alice a\n URI:spiffe://x/y  b \nDNS:h.example c\nemail:e@x d\n"
      "IP:10.0.0.1 e\n",
      "f");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->size(), 5u);
  const std::string* found = t->Find({"CN:nobody", "URI:spiffe://x/y"});
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(*found, "b");
  EXPECT_EQ(t->Find({"CN:bob", "DNS:other"}), nullptr);
  auto error = [](const std::string& text) {
    return std::string(server::CertTenants::Parse(text, "f").status().message());
  };
  EXPECT_NE(error("alice a\n").find("f:1: identity 'alice' must start with CN:"),
            std::string::npos);
  EXPECT_NE(error("CN:a x y\n").find("f:1: expected 'IDENTITY TENANT', got 3 fields"),
            std::string::npos);
  EXPECT_NE(error("CN:a t/x\n").find("tenant 't/x'"), std::string::npos);
  EXPECT_NE(error("CN:a x\nCN:a y\n").find("f:2: identity listed twice"), std::string::npos);
  EXPECT_NE(error("# nothing\n").find("no identities"), std::string::npos);
}

TEST(PeerHostTest, StripsTheSchemeAndPort) {
  EXPECT_EQ(server::PeerHost("ipv4:10.1.2.3:5555"), "10.1.2.3");
  EXPECT_EQ(server::PeerHost("ipv6:[::1]:5555"), "::1");
  EXPECT_EQ(server::PeerHost("ipv6:%5B::1%5D:1"), "%5B::1%5D:1");  // not bracketed: kept whole
  EXPECT_EQ(server::PeerHost("unix:/tmp/s"), "unix");
  EXPECT_EQ(server::PeerHost("192.168.0.9"), "192.168.0.9");
  EXPECT_EQ(server::PeerHost("fe80::1"), "fe80::1");
}

TEST(AuthThrottleTest, RefusesAfterTheLimitUntilTheOldestFailureLeavesTheMinute) {
  server::AuthThrottle t(3);
  const auto t0 = server::AuthThrottle::Clock::now();
  using std::chrono::seconds;
  t.RecordFailure("a", t0);
  t.RecordFailure("a", t0 + seconds(10));
  EXPECT_EQ(t.RetryAfterSeconds("a", t0 + seconds(10)), 0);
  t.RecordFailure("a", t0 + seconds(20));
  EXPECT_EQ(t.RetryAfterSeconds("a", t0 + seconds(20)), 40);  // the first leaves at t0 + 60
  EXPECT_EQ(t.RetryAfterSeconds("b", t0 + seconds(20)), 0);   // per host
  EXPECT_EQ(t.ThrottledPeers(t0 + seconds(20)), 1u);
  EXPECT_EQ(t.RetryAfterSeconds("a", t0 + seconds(60)), 0);
  EXPECT_EQ(t.ThrottledPeers(t0 + seconds(60)), 0u);
  // A flood of hosts stays bounded.
  for (size_t i = 0; i < server::AuthThrottle::kMaxPeers + 100; ++i) {
    t.RecordFailure(absl::StrCat("h", i), t0 + seconds(61));
  }
  EXPECT_EQ(t.RetryAfterSeconds("a", t0 + seconds(61)), 0);
  server::AuthThrottle off(0);
  for (int i = 0; i < 100; ++i) off.RecordFailure("a", t0);
  EXPECT_EQ(off.RetryAfterSeconds("a", t0), 0);
}

TEST(AuthenticatorTest, CertificatesTokensAndTheirConflicts) {
  char templ[] = "/tmp/ctxcache-auth-XXXXXX";
  ASSERT_NE(mkdtemp(templ), nullptr);
  const std::string dir = templ;
  std::ofstream(dir + "/tokens") << "token-of-a-1 a\ntoken-of-b-2 b\n";
  std::ofstream(dir + "/tenants") << "CN:alice a\n";
  server::AuthSettings settings{dir + "/tokens", dir + "/tenants", 0};
  absl::StatusOr<std::unique_ptr<server::Authenticator>> auth =
      server::Authenticator::Create(settings);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ((*auth)->Describe(), "2 tokens, 1 certificate identities");
  server::Peer alice{"ipv4:127.0.0.1:1", true, {"CN:alice", "DNS:a.example"}};
  server::Peer stranger{"ipv4:127.0.0.1:1", true, {"CN:stranger"}};
  server::Peer plain{"ipv4:127.0.0.1:1", false, {}};
  server::AuthRefusal why{};
  EXPECT_EQ(*(*auth)->Authenticate("", alice, &why), "a");
  EXPECT_EQ(*(*auth)->Authenticate("Bearer token-of-a-1", alice, &why), "a");
  EXPECT_FALSE((*auth)->Authenticate("Bearer token-of-b-2", alice, &why).ok());
  EXPECT_EQ(why, server::AuthRefusal::kTenantMismatch);
  EXPECT_FALSE((*auth)->Authenticate("Bearer nope-nope-nope", alice, &why).ok());
  EXPECT_EQ(why, server::AuthRefusal::kUnknownToken);
  EXPECT_EQ(*(*auth)->Authenticate("Bearer token-of-b-2", stranger, &why), "b");
  EXPECT_FALSE((*auth)->Authenticate("", stranger, &why).ok());
  EXPECT_EQ(why, server::AuthRefusal::kUnmappedCertificate);
  EXPECT_FALSE((*auth)->Authenticate("", plain, &why).ok());
  EXPECT_EQ(why, server::AuthRefusal::kMissingCredentials);
  EXPECT_FALSE((*auth)->Authenticate("Basic xyz", plain, &why).ok());
  EXPECT_EQ(why, server::AuthRefusal::kMalformedHeader);
  // Reload: an unreadable file keeps the set; SIGHUP (force) re-reads an unchanged one.
  std::filesystem::remove(dir + "/tenants");
  std::vector<server::Authenticator::Reloaded> r = (*auth)->Reload(false);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_TRUE(r[0].refused.ok());
  EXPECT_FALSE(r[0].changed);
  EXPECT_FALSE(r[1].refused.ok());
  EXPECT_EQ(*(*auth)->Authenticate("", alice, &why), "a");
  r = (*auth)->Reload(true);
  EXPECT_TRUE(r[0].changed);
  // Off: everyone is the default tenant.
  server::Authenticator off;
  EXPECT_FALSE(off.enabled());
  EXPECT_EQ(*off.Authenticate("", plain, &why), server::kDefaultTenant);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
}  // namespace ctxcache::testing
