// Optional bearer-token authentication: a token file maps tokens to tenants, and every call
// carries `authorization: Bearer <token>`. The tenant is part of every context id and every
// cache key, so a tenant can never read, list or delete another tenant's contexts.
//
// Token file: one "TOKEN TENANT" pair per line (whitespace-separated); blank lines and lines
// starting with '#' are ignored. Tenants are 1-64 characters of [A-Za-z0-9_.-].
//
// With mutual TLS (server/tls.h) a client certificate can name the tenant instead: the
// tls_client_tenants file has "IDENTITY TENANT" lines, IDENTITY being one of the
// certificate's CN:<common name>, DNS:<name>, URI:<uri> (a SPIFFE id), email:<address>,
// IP:<address>. Both files are reloaded while the server runs (Authenticator::Reload: on
// SIGHUP and when they change); a new file that does not parse is refused and the old set
// kept. Failed authentications are limited per peer address (AuthThrottle).
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace ctxcache::server {

// The tenant of every call when authentication is off.
inline constexpr char kDefaultTenant[] = "default";

// Why a call was refused (the reason label of ctxcache_auth_refused_total).
enum class AuthRefusal : int {
  kMissingCredentials,   // no token (and no mapped certificate)
  kMalformedHeader,      // authorization is not "Bearer <token>"
  kUnknownToken,         // a token the file does not list (or no longer lists)
  kUnmappedCertificate,  // a client certificate none of whose identities is mapped
  kTenantMismatch,       // a token and a certificate naming different tenants
  kThrottled,            // too many failures from this peer address in the last minute
};
inline constexpr int kAuthRefusalCount = 6;
const char* AuthRefusalName(AuthRefusal reason);

class TokenAuth {
 public:
  // Authentication off: every call is tenant "default".
  TokenAuth() = default;
  static absl::StatusOr<TokenAuth> Parse(std::string_view text, const std::string& source);
  static absl::StatusOr<TokenAuth> FromFile(const std::string& path);

  bool enabled() const { return enabled_; }
  size_t size() const { return tenants_.size(); }
  // The tenant for an `authorization` header value (empty when absent). UNAUTHENTICATED with
  // a message saying what is wrong (missing, not "Bearer ...", unknown token), and the reason
  // in `refusal` when given.
  absl::StatusOr<std::string> Authenticate(std::string_view authorization,
                                           AuthRefusal* refusal = nullptr) const;

  static bool IsValidTenant(std::string_view tenant);

 private:
  bool enabled_ = false;
  // Keyed by SHA-256 of the token: lookups hash the candidate first, so the time a lookup
  // takes says nothing about how much of a real token a guess shares.
  absl::flat_hash_map<std::string, std::string> tenants_;
};

// Client-certificate identities mapped to tenants (the tls_client_tenants file).
class CertTenants {
 public:
  CertTenants() = default;  // none
  static absl::StatusOr<CertTenants> Parse(std::string_view text, const std::string& source);
  static absl::StatusOr<CertTenants> FromFile(const std::string& path);
  size_t size() const { return tenants_.size(); }
  // The tenant of the first of `identities` that is mapped; null when none is.
  const std::string* Find(const std::vector<std::string>& identities) const;

 private:
  absl::flat_hash_map<std::string, std::string> tenants_;
};

// Who is calling, as the transport tells.
struct Peer {
  std::string address;  // gRPC's form ("ipv4:10.0.0.5:41234", "ipv6:[::1]:5000") or a bare IP
  bool has_certificate = false;         // a client certificate verified by the handshake
  std::vector<std::string> identities;  // its CertificateIdentities (server/tls.h)
};
// The host part of a peer address: "10.0.0.5", "::1"; "unix" for Unix sockets.
std::string PeerHost(std::string_view address);

// Failed authentications per peer host over a sliding minute: once `limit` failures are in
// the window, that host's calls are refused unread until the oldest leaves it. At most
// kMaxPeers hosts are tracked (the oldest entries go first), so a flood of addresses cannot
// grow it without bound. Thread-safe.
class AuthThrottle {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr size_t kMaxPeers = 10000;
  static constexpr std::chrono::seconds kWindow{60};
  explicit AuthThrottle(int limit) : limit_(limit) {}
  int limit() const { return limit_; }
  // Seconds until `host` may try again (rounded up); 0 when it may now.
  int RetryAfterSeconds(const std::string& host, Clock::time_point now);
  void RecordFailure(const std::string& host, Clock::time_point now);
  // Hosts refused right now.
  size_t ThrottledPeers(Clock::time_point now);

 private:
  void Expire(std::deque<Clock::time_point>& failures, Clock::time_point now) const;
  const int limit_;
  std::mutex mu_;
  absl::flat_hash_map<std::string, std::deque<Clock::time_point>> failures_;  // guarded by mu_
};

struct AuthSettings {
  std::string tokens_file;          // empty = no bearer tokens
  std::string client_tenants_file;  // empty = certificates do not name tenants
  int failure_limit = 20;           // per peer host per minute; 0 = no throttling
};

// Authentication as the service applies it: bearer tokens, certificate tenants, throttling.
// The sets are swapped whole on reload, so a call sees either the old or the new one.
class Authenticator {
 public:
  Authenticator() : Authenticator(AuthSettings{}) {}  // off: every call is tenant "default"
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(const AuthSettings& settings);

  bool enabled() const {
    return !settings_.tokens_file.empty() || !settings_.client_tenants_file.empty();
  }
  // "3 tokens, 2 certificate identities" or "off" (for the start-up log line).
  std::string Describe() const;
  // The calling tenant; UNAUTHENTICATED (RESOURCE_EXHAUSTED when throttled) with the reason
  // in `refusal`.
  absl::StatusOr<std::string> Authenticate(std::string_view authorization, const Peer& peer,
                                           AuthRefusal* refusal);

  struct Reloaded {
    const char* file;  // "tokens" | "client_tenants"
    std::string path;
    bool changed = false;  // a new set is in use
    size_t entries = 0;    // of the set in use
    absl::Status refused;  // the file changed (or SIGHUP) and could not be used
  };
  // Re-reads the files that changed since they were loaded (every file when `force`, as on
  // SIGHUP). One entry per configured file.
  std::vector<Reloaded> Reload(bool force);
  size_t ThrottledPeers() { return throttle_.ThrottledPeers(AuthThrottle::Clock::now()); }

 private:
  explicit Authenticator(const AuthSettings& settings)
      : settings_(settings), throttle_(settings.failure_limit) {}
  const AuthSettings settings_;
  AuthThrottle throttle_;
  mutable std::mutex mu_;
  std::shared_ptr<const TokenAuth> tokens_;          // guarded by mu_; null = no tokens
  std::shared_ptr<const CertTenants> cert_tenants_;  // guarded by mu_; null = none
  std::string tokens_text_, tenants_text_;           // what they were loaded from
};

// True when `listen` (HOST:PORT, as --listen takes it, or unix:PATH) only accepts connections
// from this machine: 127.0.0.0/8, [::1], localhost or a Unix socket.
bool IsLoopbackListen(std::string_view listen);

// The start-up warning for a server anyone on the network can use as any tenant it likes:
// authentication off on a non-loopback address. Empty when there is nothing to warn about.
std::string AuthOffWarning(std::string_view listen, bool auth_enabled);

}  // namespace ctxcache::server
