// Token file parsing and bearer-token lookup (see auth.h).
#include "server/auth.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/sha256.h"

namespace ctxcache::server {
namespace {

std::string TokenDigest(std::string_view token) { return Sha256().Update(token).FinalHex(); }

// The "KEY TENANT" lines of a token or tenants file: blank lines and '#' comments skipped,
// two whitespace-separated fields, a valid tenant. `add(where, key, tenant)` takes each pair
// ("where" is "FILE:LINE: " for its messages). `what` names the key ("TOKEN"), `plural` the
// entries ("tokens").
absl::Status ForEachTenantLine(
    std::string_view text, const std::string& source, const char* what, const char* plural,
    const std::function<absl::Status(const std::string& where, const std::string& key,
                                     const std::string& tenant)>& add) {
  int line_no = 0, pairs = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    const std::string where = absl::StrCat(source, ":", line_no, ": ");
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "expected '", what, " TENANT', got ", fields.size(), " fields"));
    }
    const std::string key(fields[0]), tenant(fields[1]);
    if (!TokenAuth::IsValidTenant(tenant)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "tenant '", tenant, "' must be 1-64 characters of letters, digits, _ . -"));
    }
    if (absl::Status s = add(where, key, tenant); !s.ok()) return s;
    ++pairs;
  }
  if (pairs == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": no ", plural, " (expected '", what, " TENANT' lines)"));
  }
  return absl::OkStatus();
}

// The whole of a file; NotFound naming it (as `what`) when it cannot be read.
absl::StatusOr<std::string> ReadWhole(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", what, " '", path, "'"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

bool TokenAuth::IsValidTenant(std::string_view tenant) {
  if (tenant.empty() || tenant.size() > 64) return false;
  for (char c : tenant) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<TokenAuth> TokenAuth::Parse(std::string_view text, const std::string& source) {
  TokenAuth auth;
  auth.enabled_ = true;
  absl::Status s = ForEachTenantLine(
      text, source, "TOKEN", "tokens",
      [&](const std::string& where, const std::string& token, const std::string& tenant) {
        if (token.size() < 8) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, "token is too short (at least 8 characters)"));
        }
        if (!auth.tenants_.emplace(TokenDigest(token), tenant).second) {
          return absl::InvalidArgumentError(absl::StrCat(where, "token listed twice"));
        }
        return absl::OkStatus();
      });
  if (!s.ok()) return s;
  return auth;
}

absl::StatusOr<TokenAuth> TokenAuth::FromFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWhole(path, "auth token file");
  if (!text.ok()) return text.status();
  return Parse(*text, path);
}

absl::StatusOr<std::string> TokenAuth::Authenticate(std::string_view authorization,
                                                    AuthRefusal* refusal) const {
  AuthRefusal ignored;
  if (refusal == nullptr) refusal = &ignored;
  if (!enabled_) return std::string(kDefaultTenant);
  if (authorization.empty()) {
    *refusal = AuthRefusal::kMissingCredentials;
    return absl::UnauthenticatedError(
        "this server requires a bearer token: send metadata 'authorization: Bearer <token>'");
  }
  constexpr std::string_view kBearer = "bearer ";
  if (authorization.size() <= kBearer.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(authorization.data(), kBearer.size()),
                              absl::string_view(kBearer.data(), kBearer.size()))) {
    *refusal = AuthRefusal::kMalformedHeader;
    return absl::UnauthenticatedError(
        "the authorization metadata must be 'Bearer <token>'");
  }
  std::string_view token = authorization.substr(kBearer.size());
  while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
  auto it = tenants_.find(TokenDigest(token));
  if (it == tenants_.end()) {
    *refusal = AuthRefusal::kUnknownToken;
    return absl::UnauthenticatedError("unknown bearer token");
  }
  return it->second;
}

const char* AuthRefusalName(AuthRefusal reason) {
  switch (reason) {
    case AuthRefusal::kMissingCredentials:
      return "missing_credentials";
    case AuthRefusal::kMalformedHeader:
      return "malformed_header";
    case AuthRefusal::kUnknownToken:
      return "unknown_token";
    case AuthRefusal::kUnmappedCertificate:
      return "unmapped_certificate";
    case AuthRefusal::kTenantMismatch:
      return "tenant_mismatch";
    case AuthRefusal::kThrottled:
      return "throttled";
  }
  return "unknown";
}

namespace {

bool IsValidIdentity(std::string_view id) {
  for (const char* prefix : {"CN:", "DNS:", "URI:", "email:", "IP:"}) {
    const size_t n = std::strlen(prefix);
    if (id.size() > n && id.substr(0, n) == prefix) return true;
  }
  return false;
}

std::string JoinIdentities(const std::vector<std::string>& ids) {
  std::string out;
  for (const std::string& id : ids) absl::StrAppend(&out, out.empty() ? "" : ", ", id);
  return out.empty() ? "no identities" : out;
}

}  // namespace

absl::StatusOr<CertTenants> CertTenants::Parse(std::string_view text, const std::string& source) {
  CertTenants out;
  absl::Status s = ForEachTenantLine(
      text, source, "IDENTITY", "identities",
      [&](const std::string& where, const std::string& identity, const std::string& tenant) {
        if (!IsValidIdentity(identity)) {
          return absl::InvalidArgumentError(absl::StrCat(
              where, "identity '", identity,
              "' must start with CN:, DNS:, URI:, email: or IP: (as the certificate names it)"));
        }
        if (!out.tenants_.emplace(identity, tenant).second) {
          return absl::InvalidArgumentError(absl::StrCat(where, "identity listed twice"));
        }
        return absl::OkStatus();
      });
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<CertTenants> CertTenants::FromFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWhole(path, "tls_client_tenants file");
  if (!text.ok()) return text.status();
  return Parse(*text, path);
}

const std::string* CertTenants::Find(const std::vector<std::string>& identities) const {
  for (const std::string& id : identities) {
    if (auto it = tenants_.find(id); it != tenants_.end()) return &it->second;
  }
  return nullptr;
}

std::string PeerHost(std::string_view address) {
  if (address.substr(0, 5) == "unix:" || address.substr(0, 14) == "unix-abstract:") return "unix";
  for (std::string_view scheme : {"ipv4:", "ipv6:"}) {
    if (address.substr(0, scheme.size()) == scheme) address.remove_prefix(scheme.size());
  }
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    return std::string(
        address.substr(1, close == std::string_view::npos ? address.npos : close - 1));
  }
  // "1.2.3.4:5678" -> "1.2.3.4"; a bare IPv6 address (more than one colon) stays whole.
  if (std::count(address.begin(), address.end(), ':') == 1) {
    address = address.substr(0, address.find(':'));
  }
  return std::string(address);
}

void AuthThrottle::Expire(std::deque<Clock::time_point>& failures, Clock::time_point now) const {
  while (!failures.empty() && now - failures.front() >= kWindow) failures.pop_front();
}

int AuthThrottle::RetryAfterSeconds(const std::string& host, Clock::time_point now) {
  if (limit_ <= 0) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = failures_.find(host);
  if (it == failures_.end()) return 0;
  Expire(it->second, now);
  if (static_cast<int>(it->second.size()) < limit_) return 0;
  const auto left = it->second.front() + kWindow - now;
  return static_cast<int>(std::chrono::ceil<std::chrono::seconds>(left).count());
}

void AuthThrottle::RecordFailure(const std::string& host, Clock::time_point now) {
  if (limit_ <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (failures_.size() >= kMaxPeers && !failures_.contains(host)) {
    // Drop hosts whose failures have all left the window; if none, the one whose newest
    // failure is oldest.
    auto oldest = failures_.end();
    for (auto it = failures_.begin(); it != failures_.end();) {
      Expire(it->second, now);
      if (it->second.empty()) {
        failures_.erase(it++);
        continue;
      }
      if (oldest == failures_.end() || it->second.back() < oldest->second.back()) oldest = it;
      ++it;
    }
    if (failures_.size() >= kMaxPeers && oldest != failures_.end()) failures_.erase(oldest);
  }
  std::deque<Clock::time_point>& f = failures_[host];
  Expire(f, now);
  f.push_back(now);
  // Only the newest `limit` failures matter for when the host may try again.
  while (static_cast<int>(f.size()) > limit_) f.pop_front();
}

size_t AuthThrottle::ThrottledPeers(Clock::time_point now) {
  if (limit_ <= 0) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (auto& [host, f] : failures_) {
    Expire(f, now);
    if (static_cast<int>(f.size()) >= limit_) ++n;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(const AuthSettings& settings) {
  std::unique_ptr<Authenticator> a(new Authenticator(settings));
  // The first load is a forced reload that must not be refused.
  for (const Reloaded& r : a->Reload(/*force=*/true)) {
    if (!r.refused.ok()) return r.refused;
  }
  return a;
}

std::string Authenticator::Describe() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  if (tokens_ != nullptr) absl::StrAppend(&out, tokens_->size(), " tokens");
  if (cert_tenants_ != nullptr) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", cert_tenants_->size(),
                    " certificate identities");
  }
  return out.empty() ? "off" : out;
}

absl::StatusOr<std::string> Authenticator::Authenticate(std::string_view authorization,
                                                        const Peer& peer, AuthRefusal* refusal) {
  if (!enabled()) return std::string(kDefaultTenant);
  std::shared_ptr<const TokenAuth> tokens;
  std::shared_ptr<const CertTenants> cert_tenants;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tokens = tokens_;
    cert_tenants = cert_tenants_;
  }
  const auto now = AuthThrottle::Clock::now();
  const std::string host = PeerHost(peer.address);
  if (const int wait = throttle_.RetryAfterSeconds(host, now); wait > 0) {
    *refusal = AuthRefusal::kThrottled;
    return absl::ResourceExhaustedError(
        absl::StrCat("too many failed authentications from ", host, " (", throttle_.limit(),
                     " in the last minute); retry in ", wait, " s"));
  }
  absl::StatusOr<std::string> tenant = [&]() -> absl::StatusOr<std::string> {
    const std::string* by_cert = cert_tenants != nullptr && peer.has_certificate
                                     ? cert_tenants->Find(peer.identities)
                                     : nullptr;
    if (by_cert != nullptr) {
      if (authorization.empty()) return *by_cert;
      // A token sent along with a mapped certificate must name the same tenant.
      absl::StatusOr<std::string> by_token = tokens != nullptr
                                                 ? tokens->Authenticate(authorization, refusal)
                                                 : absl::StatusOr<std::string>(*by_cert);
      if (!by_token.ok()) return by_token.status();
      if (*by_token != *by_cert) {
        *refusal = AuthRefusal::kTenantMismatch;
        return absl::UnauthenticatedError(
            absl::StrCat("the bearer token is tenant \"", *by_token,
                         "\" but the client certificate is tenant \"", *by_cert,
                         "\": send one of them, or credentials of one tenant"));
      }
      return *by_cert;
    }
    if (tokens != nullptr) {
      absl::StatusOr<std::string> by_token = tokens->Authenticate(authorization, refusal);
      if (by_token.ok() || cert_tenants == nullptr || !peer.has_certificate ||
          !authorization.empty()) {
        return by_token;
      }
    }
    // Only certificates could have named the tenant.
    if (!peer.has_certificate) {
      *refusal = AuthRefusal::kMissingCredentials;
      return absl::UnauthenticatedError(
          tokens != nullptr
              ? "this server requires a bearer token ('authorization: Bearer <token>') or a "
                "client certificate mapped to a tenant"
              : "this server requires a client certificate mapped to a tenant (mutual TLS)");
    }
    *refusal = AuthRefusal::kUnmappedCertificate;
    return absl::UnauthenticatedError(
        absl::StrCat("the client certificate (", JoinIdentities(peer.identities),
                     ") is not mapped to a tenant in the server's tls_client_tenants file"));
  }();
  if (!tenant.ok()) throttle_.RecordFailure(host, now);
  return tenant;
}

namespace {

// Re-reads one file's set (TokenAuth or CertTenants) and swaps it in when its text changed
// (every time with `force`) and it parses; otherwise the set in use stays.
template <typename Set>
Authenticator::Reloaded ReloadSet(const char* file, const std::string& path, const char* what,
                                  bool force, std::mutex& mu, std::shared_ptr<const Set>& set,
                                  std::string& text_in_use) {
  Authenticator::Reloaded r{file, path};
  absl::StatusOr<std::string> text = ReadWhole(path, what);
  std::lock_guard<std::mutex> lock(mu);
  if (!text.ok()) {
    r.refused = text.status();
  } else if (force || set == nullptr || *text != text_in_use) {
    absl::StatusOr<Set> parsed = Set::Parse(*text, path);
    if (!parsed.ok()) {
      r.refused = parsed.status();
    } else {
      set = std::make_shared<const Set>(std::move(*parsed));
      text_in_use = std::move(*text);
      r.changed = true;
    }
  }
  r.entries = set != nullptr ? set->size() : 0;
  return r;
}

}  // namespace

std::vector<Authenticator::Reloaded> Authenticator::Reload(bool force) {
  std::vector<Reloaded> out;
  if (!settings_.tokens_file.empty()) {
    out.push_back(ReloadSet("tokens", settings_.tokens_file, "auth token file", force, mu_, tokens_,
                            tokens_text_));
  }
  if (!settings_.client_tenants_file.empty()) {
    out.push_back(ReloadSet("client_tenants", settings_.client_tenants_file,
                            "tls_client_tenants file", force, mu_, cert_tenants_, tenants_text_));
  }
  return out;
}

bool IsLoopbackListen(std::string_view listen) {
  if (listen.substr(0, 5) == "unix:" || listen.substr(0, 14) == "unix-abstract:") return true;
  std::string_view host = listen;
  if (const size_t colon = host.rfind(':'); colon != std::string_view::npos) {
    host = host.substr(0, colon);
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host == "localhost" || host == "::1") return true;
  // 127.0.0.0/8: four dotted decimal parts of 1-3 digits, the first 127.
  if (host.substr(0, 4) != "127.") return false;
  int parts = 0, digits = 0;
  for (const char c : host) {
    if (c == '.') {
      if (digits == 0) return false;
      ++parts;
      digits = 0;
    } else if (c >= '0' && c <= '9' && digits < 3) {
      ++digits;
    } else {
      return false;
    }
  }
  return parts == 3 && digits > 0;
}

std::string AuthOffWarning(std::string_view listen, bool auth_enabled) {
  if (auth_enabled || IsLoopbackListen(listen)) return "";
  return absl::StrCat(
      "authentication is off and the server listens on ", std::string(listen),
      ", which is not a loopback address: anyone who can reach it can compress, read and "
      "delete contexts as tenant \"",
      kDefaultTenant, "\"; give it a token file (--auth-tokens FILE) or listen on 127.0.0.1");
}

}  // namespace ctxcache::server
