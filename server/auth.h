// Optional bearer-token authentication: a token file maps tokens to tenants, and every call
// carries `authorization: Bearer <token>`. The tenant is part of every context id and every
// cache key, so a tenant can never read, list or delete another tenant's contexts.
//
// Token file: one "TOKEN TENANT" pair per line (whitespace-separated); blank lines and lines
// starting with '#' are ignored. Tenants are 1-64 characters of [A-Za-z0-9_.-].
#pragma once

#include <string>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace ctxcache::server {

// The tenant of every call when authentication is off.
inline constexpr char kDefaultTenant[] = "default";

class TokenAuth {
 public:
  // Authentication off: every call is tenant "default".
  TokenAuth() = default;
  static absl::StatusOr<TokenAuth> Parse(std::string_view text, const std::string& source);
  static absl::StatusOr<TokenAuth> FromFile(const std::string& path);

  bool enabled() const { return enabled_; }
  size_t size() const { return tenants_.size(); }
  // The tenant for an `authorization` header value (empty when absent). UNAUTHENTICATED with
  // a message saying what is wrong (missing, not "Bearer ...", unknown token).
  absl::StatusOr<std::string> Authenticate(std::string_view authorization) const;

  static bool IsValidTenant(std::string_view tenant);

 private:
  bool enabled_ = false;
  // Keyed by SHA-256 of the token: lookups hash the candidate first, so the time a lookup
  // takes says nothing about how much of a real token a guess shares.
  absl::flat_hash_map<std::string, std::string> tenants_;
};

// True when `listen` (HOST:PORT, as --listen takes it, or unix:PATH) only accepts connections
// from this machine: 127.0.0.0/8, [::1], localhost or a Unix socket.
bool IsLoopbackListen(std::string_view listen);

// The start-up warning for a server anyone on the network can use as any tenant it likes:
// authentication off on a non-loopback address. Empty when there is nothing to warn about.
std::string AuthOffWarning(std::string_view listen, bool auth_enabled);

}  // namespace ctxcache::server
