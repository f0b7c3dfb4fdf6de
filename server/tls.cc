// Certificates for every listener, validated and reloaded (see tls.h).
#include "server/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace ctxcache::server {

struct TlsMaterial::Parsed {
  X509* leaf = nullptr;
  EVP_PKEY* key = nullptr;
  STACK_OF(X509) * chain = nullptr;  // intermediates after the leaf
  X509_STORE* client_store = nullptr;
  ~Parsed() {
    X509_free(leaf);
    EVP_PKEY_free(key);
    sk_X509_pop_free(chain, X509_free);
    X509_STORE_free(client_store);
  }
};

namespace {

// The text of a file; NotFound/PermissionDenied naming the setting and the file.
absl::StatusOr<std::string> ReadText(const char* setting, const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat(setting, " ", path, ": is a directory (name the file in it, e.g. tls.crt)"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    return absl::FailedPreconditionError(
        absl::StrCat(setting, " ", path, ": cannot read (", std::strerror(err), ")"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every certificate in a PEM text, in order.
std::vector<X509*> ReadCertificates(const std::string& pem) {
  std::vector<X509*> certs;
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  while (X509* c = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) certs.push_back(c);
  BIO_free(bio);
  ERR_clear_error();  // the end of the text reads as "no start line"
  return certs;
}

std::string AsnTimeText(const ASN1_TIME* t) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return "?";
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

int64_t AsnTimeUnix(const ASN1_TIME* t) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return static_cast<int64_t>(timegm(&tm));
}

std::string Utf8(const ASN1_STRING* s) {
  unsigned char* out = nullptr;
  const int n = ASN1_STRING_to_UTF8(&out, s);
  if (n < 0) return "";
  std::string text(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  OPENSSL_free(out);
  return text;
}

std::string CommonName(X509* cert) {
  X509_NAME* name = X509_get_subject_name(cert);
  const int i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (i < 0) return "";
  return Utf8(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
}

// Writes `text` to `path` with mode 0600 (the file must not exist).
absl::Status WritePrivate(const std::string& path, const std::string& text) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return absl::InternalError(absl::StrCat(path, ": ", std::strerror(errno)));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      close(fd);
      return absl::InternalError(absl::StrCat(path, ": ", std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  if (close(fd) != 0) return absl::InternalError(absl::StrCat(path, ": ", std::strerror(errno)));
  return absl::OkStatus();
}

// Serves the current set to each handshake (SSL_CTX_set_cert_cb): certificate, key and chain,
// and the client CA bundle the peer's certificate is verified against.
int ServeCurrent(SSL* ssl, void* arg) {
  const auto* creds = static_cast<const TlsCredentials*>(arg);
  std::shared_ptr<const TlsMaterial> m = creds->current();
  return TlsCredentials::Install(ssl, *m) ? 1 : 0;
}

}  // namespace

absl::StatusOr<TlsTexts> ReadTlsTexts(const TlsFiles& files) {
  TlsTexts t;
  ASSIGN_OR_RETURN(t.cert, ReadText("tls_cert", files.cert));
  ASSIGN_OR_RETURN(t.key, ReadText("tls_key", files.key));
  if (!files.client_ca.empty()) {
    ASSIGN_OR_RETURN(t.client_ca, ReadText("tls_client_ca", files.client_ca));
  }
  return t;
}

absl::StatusOr<std::shared_ptr<const TlsMaterial>> TlsMaterial::Load(
    const TlsFiles& files, std::chrono::system_clock::time_point now) {
  ASSIGN_OR_RETURN(TlsTexts texts, ReadTlsTexts(files));
  return FromTexts(files, std::move(texts), now);
}

absl::StatusOr<std::shared_ptr<const TlsMaterial>> TlsMaterial::FromTexts(
    const TlsFiles& files, TlsTexts texts, std::chrono::system_clock::time_point now) {
  std::shared_ptr<TlsMaterial> m(new TlsMaterial());
  m->parsed_ = std::make_unique<Parsed>();
  Parsed& p = *m->parsed_;
  m->cert_pem_ = std::move(texts.cert);
  m->key_pem_ = std::move(texts.key);
  m->client_ca_pem_ = std::move(texts.client_ca);
  std::vector<X509*> certs = ReadCertificates(m->cert_pem_);
  if (certs.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("tls_cert ", files.cert, ": no PEM certificate in it"));
  }
  p.leaf = certs[0];
  p.chain = sk_X509_new_null();
  for (size_t i = 1; i < certs.size(); ++i) sk_X509_push(p.chain, certs[i]);
  {
    BIO* bio = BIO_new_mem_buf(m->key_pem_.data(), static_cast<int>(m->key_pem_.size()));
    // No passphrase callback: an encrypted key fails here rather than prompting.
    p.key = PEM_read_bio_PrivateKey(
        bio, nullptr, [](char*, int, int, void*) { return 0; }, nullptr);
    BIO_free(bio);
    ERR_clear_error();
  }
  if (p.key == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "tls_key ", files.key, ": no PEM private key in it (an encrypted key is not accepted)"));
  }
  if (X509_check_private_key(p.leaf, p.key) != 1) {
    ERR_clear_error();
    return absl::FailedPreconditionError(absl::StrCat(
        "tls_key ", files.key, " does not match the certificate in tls_cert ", files.cert));
  }
  const time_t t = std::chrono::system_clock::to_time_t(now);
  const ASN1_TIME* not_after = X509_get0_notAfter(p.leaf);
  const ASN1_TIME* not_before = X509_get0_notBefore(p.leaf);
  if (X509_cmp_time(not_after, const_cast<time_t*>(&t)) <= 0) {
    return absl::FailedPreconditionError(absl::StrCat("tls_cert ", files.cert, ": expired on ",
                                                      AsnTimeText(not_after), " (",
                                                      CommonName(p.leaf), ")"));
  }
  if (X509_cmp_time(not_before, const_cast<time_t*>(&t)) > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("tls_cert ", files.cert, ": not valid before ", AsnTimeText(not_before),
                     " (is the clock right?)"));
  }
  m->not_after_unix_ = AsnTimeUnix(not_after);
  std::string serial = "?";
  if (BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(p.leaf), nullptr)) {
    if (char* hex = BN_bn2hex(bn)) {
      serial = hex;
      OPENSSL_free(hex);
    }
    BN_free(bn);
  }
  m->summary_ = absl::StrCat("CN=", CommonName(p.leaf), ", serial ", serial, ", valid until ",
                             AsnTimeText(not_after));
  if (!files.client_ca.empty()) {
    std::vector<X509*> cas = ReadCertificates(m->client_ca_pem_);
    if (cas.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("tls_client_ca ", files.client_ca, ": no PEM certificate in it"));
    }
    p.client_store = X509_STORE_new();
    for (X509* ca : cas) {
      X509_STORE_add_cert(p.client_store, ca);  // takes its own reference
      X509_free(ca);
    }
  }
  return std::shared_ptr<const TlsMaterial>(std::move(m));
}

TlsMaterial::~TlsMaterial() = default;

absl::StatusOr<std::unique_ptr<TlsCredentials>> TlsCredentials::Create(const TlsFiles& files) {
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError("tls_cert and tls_key go together: set both or neither");
  }
  absl::StatusOr<std::shared_ptr<const TlsMaterial>> m =
      TlsMaterial::Load(files, std::chrono::system_clock::now());
  if (!m.ok()) return m.status();
  std::unique_ptr<TlsCredentials> c(new TlsCredentials(files));
  c->current_ = *m;
  const char* tmp = std::getenv("TMPDIR");
  std::string templ =
      absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/ctxcache-tls-XXXXXX");
  if (mkdtemp(templ.data()) == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot make a private directory for the certificates under ", templ, ": ",
                     std::strerror(errno), " (set TMPDIR to a writable directory)"));
  }
  c->dir_ = templ;
  if (absl::Status s = c->WritePrivateCopy(**m); !s.ok()) return s;
  return c;
}

TlsCredentials::~TlsCredentials() {
  if (dir_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::shared_ptr<const TlsMaterial> TlsCredentials::current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

absl::Status TlsCredentials::WritePrivateCopy(const TlsMaterial& m) {
  const int gen = ++generation_;
  const std::string gdir = absl::StrCat(dir_, "/g", gen);
  if (mkdir(gdir.c_str(), 0700) != 0) {
    return absl::InternalError(absl::StrCat(gdir, ": ", std::strerror(errno)));
  }
  if (absl::Status s = WritePrivate(gdir + "/key.pem", m.key_pem()); !s.ok()) return s;
  if (absl::Status s = WritePrivate(gdir + "/cert.pem", m.cert_pem()); !s.ok()) return s;
  if (absl::Status s = WritePrivate(gdir + "/ca.pem", m.client_ca_pem()); !s.ok()) return s;
  // One rename of a symlink switches the key and the certificate together.
  const std::string link_tmp = absl::StrCat(dir_, "/current.", gen);
  if (symlink(absl::StrCat("g", gen).c_str(), link_tmp.c_str()) != 0 ||
      rename(link_tmp.c_str(), (dir_ + "/current").c_str()) != 0) {
    return absl::InternalError(absl::StrCat(dir_, "/current: ", std::strerror(errno)));
  }
  // The generation before the previous one is no longer read by anyone.
  if (gen > 2) {
    std::error_code ec;
    std::filesystem::remove_all(absl::StrCat(dir_, "/g", gen - 2), ec);
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> TlsCredentials::GrpcServerCredentials() const {
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      dir_ + "/current/key.pem", dir_ + "/current/cert.pem",
      mutual() ? dir_ + "/current/ca.pem" : std::string(), /*refresh_interval_sec=*/1);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (mutual()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

bool TlsCredentials::Install(SSL* ssl, const TlsMaterial& m) {
  const TlsMaterial::Parsed& p = *m.parsed_;
  if (SSL_use_cert_and_key(ssl, p.leaf, p.key, p.chain, /*override=*/1) != 1) return false;
  if (p.client_store != nullptr && SSL_set1_verify_cert_store(ssl, p.client_store) != 1) {
    return false;
  }
  return true;
}

bool TlsCredentials::SetUpSslCtx(SSL_CTX* ctx, bool verify_clients) const {
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) return false;
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_cert_cb(ctx, ServeCurrent, const_cast<TlsCredentials*>(this));
  if (verify_clients && mutual()) {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  } else {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
  }
  return true;
}

TlsReload TlsCredentials::Reload() {
  TlsReload out;
  std::shared_ptr<const TlsMaterial> old = current();
  absl::StatusOr<TlsTexts> texts = ReadTlsTexts(files_);
  if (!texts.ok()) {
    out.refused = texts.status();
    return out;
  }
  // An unchanged set is not parsed again.
  if (texts->cert == old->cert_pem() && texts->key == old->key_pem() &&
      texts->client_ca == old->client_ca_pem()) {
    return out;
  }
  absl::StatusOr<std::shared_ptr<const TlsMaterial>> m =
      TlsMaterial::FromTexts(files_, *std::move(texts), std::chrono::system_clock::now());
  if (!m.ok()) {
    out.refused = m.status();
    return out;
  }
  if (absl::Status s = WritePrivateCopy(**m); !s.ok()) {
    out.refused = s;
    return out;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    current_ = *m;
  }
  out.changed = true;
  return out;
}

std::vector<std::string> CertificateIdentities(X509* cert) {
  std::vector<std::string> ids;
  if (cert == nullptr) return ids;
  if (std::string cn = CommonName(cert); !cn.empty()) ids.push_back("CN:" + cn);
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (names == nullptr) return ids;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    switch (n->type) {
      case GEN_DNS:
        ids.push_back("DNS:" + Utf8(n->d.dNSName));
        break;
      case GEN_URI:
        ids.push_back("URI:" + Utf8(n->d.uniformResourceIdentifier));
        break;
      case GEN_EMAIL:
        ids.push_back("email:" + Utf8(n->d.rfc822Name));
        break;
      case GEN_IPADD: {
        const ASN1_OCTET_STRING* ip = n->d.iPAddress;
        char buf[INET6_ADDRSTRLEN] = {};
        const int family = ip->length == 4 ? AF_INET : ip->length == 16 ? AF_INET6 : 0;
        if (family != 0 && inet_ntop(family, ip->data, buf, sizeof(buf)) != nullptr) {
          ids.push_back(absl::StrCat("IP:", buf));
        }
        break;
      }
      default:
        break;
    }
  }
  GENERAL_NAMES_free(names);
  return ids;
}

std::vector<std::string> PemCertificateIdentities(std::string_view pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  ERR_clear_error();
  std::vector<std::string> ids = CertificateIdentities(cert);
  X509_free(cert);
  return ids;
}

}  // namespace ctxcache::server
