// Transport security for every listener (--tls-cert, --tls-key, --tls-client-ca): one set of
// certificates, validated before it is served and replaced while the server runs when its
// files change (cert-manager rotates them in Kubernetes), without dropping connections: a
// connection keeps the session it has, new handshakes get the new certificate.
//
// Two consumers:
//  - gRPC, through grpc::experimental::TlsServerCredentials on a FileWatcherCertificateProvider.
//    It does not watch the operator's files: it watches a private copy (a directory of our own,
//    0700) that is only written with a set that passed validation, and swapped in one rename
//    of a symlink, as the provider requires for an atomic key-and-certificate change. A new
//    file that does not parse, does not match its key or has expired is refused with a log
//    line; the server keeps serving the set it has.
//  - OpenSSL listeners (the metrics endpoint, the HTTP API): SetUpSslCtx installs a
//    certificate callback that hands each new handshake the current set.
//
// Client certificates (mutual TLS) are verified against tls_client_ca; the identities a
// certificate names (CertificateIdentities) map to tenants in server/auth.h.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct x509_st X509;

namespace grpc {
class ServerCredentials;
}

namespace ctxcache::server {

struct TlsFiles {
  std::string cert;       // PEM certificate chain, leaf first
  std::string key;        // PEM private key (unencrypted)
  std::string client_ca;  // PEM CA bundle for client certificates; empty = no mutual TLS
};

// The files' text.
struct TlsTexts {
  std::string cert, key, client_ca;
};
// Reads the files (client_ca only when set); errors name the setting, the file and why.
absl::StatusOr<TlsTexts> ReadTlsTexts(const TlsFiles& files);

// One validated set: the files' text and the parsed objects the OpenSSL listeners hand out.
class TlsMaterial {
 public:
  // Reads and checks the files: readable, PEM, the key matches the leaf certificate, the leaf
  // is valid at `now` (not expired, not before its start). Errors name the setting, the file
  // and the problem ("tls_key /x/tls.key does not match the certificate in tls_cert ...").
  static absl::StatusOr<std::shared_ptr<const TlsMaterial>> Load(
      const TlsFiles& files, std::chrono::system_clock::time_point now);
  // The same checks on texts already read (`files` names them in errors).
  static absl::StatusOr<std::shared_ptr<const TlsMaterial>> FromTexts(
      const TlsFiles& files, TlsTexts texts, std::chrono::system_clock::time_point now);
  ~TlsMaterial();
  TlsMaterial(const TlsMaterial&) = delete;
  TlsMaterial& operator=(const TlsMaterial&) = delete;

  const std::string& cert_pem() const { return cert_pem_; }
  const std::string& key_pem() const { return key_pem_; }
  const std::string& client_ca_pem() const { return client_ca_pem_; }
  int64_t not_after_unix() const { return not_after_unix_; }
  // "CN=server, serial 1A2B, valid until 2027-01-05 10:00:00 UTC" (for logs).
  const std::string& summary() const { return summary_; }

 private:
  friend class TlsCredentials;
  TlsMaterial() = default;
  std::string cert_pem_, key_pem_, client_ca_pem_;
  int64_t not_after_unix_ = 0;
  std::string summary_;
  struct Parsed;
  std::unique_ptr<Parsed> parsed_;
};

// The outcome of a Reload.
struct TlsReload {
  bool changed = false;  // a new set is being served
  absl::Status refused;  // the files changed but the new set was refused (the old one stays)
};

class TlsCredentials {
 public:
  // Validates the files (see TlsMaterial::Load) and writes the private copy gRPC watches.
  static absl::StatusOr<std::unique_ptr<TlsCredentials>> Create(const TlsFiles& files);
  ~TlsCredentials();  // removes the private copy

  bool mutual() const { return !files_.client_ca.empty(); }
  const TlsFiles& files() const { return files_; }
  std::shared_ptr<const TlsMaterial> current() const;

  // Server credentials for gRPC: TLS 1.2+, and with tls_client_ca a client certificate is
  // required and verified. The provider re-reads the private copy every second.
  std::shared_ptr<grpc::ServerCredentials> GrpcServerCredentials() const;
  // Prepares an OpenSSL server context: TLS 1.2+, the current set served per handshake, and
  // with `verify_clients` (only when mutual()) a client certificate required and verified
  // against the current CA bundle. False when OpenSSL refuses a setting.
  bool SetUpSslCtx(SSL_CTX* ctx, bool verify_clients) const;

  // Re-reads the files; when their text changed and the new set validates, serves it.
  TlsReload Reload();

  // Hands `m` to one connection (the certificate callback's work); false when OpenSSL refuses.
  static bool Install(SSL* ssl, const TlsMaterial& m);

 private:
  explicit TlsCredentials(TlsFiles files) : files_(std::move(files)) {}
  absl::Status WritePrivateCopy(const TlsMaterial& m);

  const TlsFiles files_;
  std::string dir_;  // private copy: dir_/current -> dir_/gN
  int generation_ = 0;
  mutable std::mutex mu_;
  std::shared_ptr<const TlsMaterial> current_;  // guarded by mu_
};

// The identities of a certificate as the tenants file names them: "CN:<subject CN>",
// "DNS:<name>", "URI:<uri>", "email:<address>", "IP:<address>" (subject alternative names).
std::vector<std::string> CertificateIdentities(X509* cert);
// The same for the first certificate of a PEM text (as gRPC reports a peer's certificate);
// empty when it does not parse.
std::vector<std::string> PemCertificateIdentities(std::string_view pem);

}  // namespace ctxcache::server
