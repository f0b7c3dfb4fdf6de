// Token file parsing and bearer-token lookup (see auth.h).
#include "server/auth.h"

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/sha256.h"

namespace ctxcache::server {
namespace {

std::string TokenDigest(std::string_view token) { return Sha256().Update(token).FinalHex(); }

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
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    const std::string where = absl::StrCat(source, ":", line_no, ": ");
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "expected 'TOKEN TENANT', got ", fields.size(), " fields"));
    }
    const std::string token(fields[0]), tenant(fields[1]);
    if (token.size() < 8) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "token is too short (at least 8 characters)"));
    }
    if (!IsValidTenant(tenant)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "tenant '", tenant, "' must be 1-64 characters of letters, digits, _ . -"));
    }
    if (!auth.tenants_.emplace(TokenDigest(token), tenant).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, "token listed twice"));
    }
  }
  if (auth.tenants_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": no tokens (expected 'TOKEN TENANT' lines)"));
  }
  return auth;
}

absl::StatusOr<TokenAuth> TokenAuth::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read auth token file '", path, "'"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return Parse(ss.str(), path);
}

absl::StatusOr<std::string> TokenAuth::Authenticate(std::string_view authorization) const {
  if (!enabled_) return std::string(kDefaultTenant);
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "this server requires a bearer token: send metadata 'authorization: Bearer <token>'");
  }
  constexpr std::string_view kBearer = "bearer ";
  if (authorization.size() <= kBearer.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(authorization.data(), kBearer.size()),
                              absl::string_view(kBearer.data(), kBearer.size()))) {
    return absl::UnauthenticatedError(
        "the authorization metadata must be 'Bearer <token>'");
  }
  std::string_view token = authorization.substr(kBearer.size());
  while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
  auto it = tenants_.find(TokenDigest(token));
  if (it == tenants_.end()) return absl::UnauthenticatedError("unknown bearer token");
  return it->second;
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
