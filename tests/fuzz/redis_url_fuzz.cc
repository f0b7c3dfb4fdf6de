// Fuzz target for the Redis URL parser and its redaction for logs (cache/redis_client.h): the
// URL comes from configuration and holds the password. Invariants:
//  * a URL that parses has a host, a port in 1..65535, a db >= 0, and a password when it has
//    a user; written back in canonical form (every credential byte percent-encoded, an IPv6
//    host in brackets) it parses to the same fields;
//  * its redaction parses to the same host, port, db and user, with the password "***"
//    (so a log line shows where the server connects, and as whom, never with what);
//  * for any input at all, the redacted text and any parse error leave out the password:
//    the bytes between the credentials' first ':' and the last '@'. Checked when the password
//    holds a byte found nowhere else (not in the rest of the URL, nor in the parser's fixed
//    wording), so that finding it in the output can only mean it leaked.
#include <bitset>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "cache/redis_client.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

std::string PercentEncodeAll(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    out.push_back('%');
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

std::string Canonical(const ctxcache::RedisUrl& u) {
  std::string out = "redis://";
  if (!u.password.empty()) {
    absl::StrAppend(&out, PercentEncodeAll(u.user), ":", PercentEncodeAll(u.password), "@");
  }
  const bool v6 = u.host.find(':') != std::string::npos;
  absl::StrAppend(&out, v6 ? "[" : "", u.host, v6 ? "]" : "", ":", u.port, "/", u.db);
  return out;
}

bool SameEndpoint(const ctxcache::RedisUrl& a, const ctxcache::RedisUrl& b) {
  return a.host == b.host && a.port == b.port && a.db == b.db && a.user == b.user;
}

// Every fixed phrase of the parser's messages: a "password" that is a piece of one of them
// (e.g. "pass") appears in an error for reasons that have nothing to do with it.
constexpr std::string_view kWording =
    "bad redis URL: (expected redis://[user:password@]host[:port][/db]) TLS (rediss://) is not "
    "supported by this build it must start with redis:// query parameters and fragments are not "
    "supported credentials must be user:password@ or :password@ (a user needs a password) "
    "bad percent-escape in the user name password (write %XX with two hex digits) the password "
    "is empty unterminated [ in the IPv6 host expected :port after the ] the port after ':' is "
    "empty bad IPv6 host an IPv6 host goes in brackets: redis://[::1]:6379 the host is missing "
    "bad host \" the port must be a number in 1..65535, got \" the database must be a number "
    ">= 0, got \" ***";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string url(reinterpret_cast<const char*>(data), size);
  const auto parsed = ctxcache::ParseRedisUrl(url);
  const std::string redacted = ctxcache::RedactRedisUrl(url);
  if (parsed.ok()) {
    FUZZ_CHECK(!parsed->host.empty());
    FUZZ_CHECK(parsed->port >= 1 && parsed->port <= 65535);
    FUZZ_CHECK(parsed->db >= 0);
    FUZZ_CHECK(parsed->user.empty() || !parsed->password.empty());
    const auto again = ctxcache::ParseRedisUrl(Canonical(*parsed));
    FUZZ_CHECK(again.ok());
    FUZZ_CHECK(SameEndpoint(*again, *parsed) && again->password == parsed->password);
    const auto shown = ctxcache::ParseRedisUrl(redacted);
    FUZZ_CHECK(shown.ok());
    FUZZ_CHECK(SameEndpoint(*shown, *parsed));
    FUZZ_CHECK(shown->password == (parsed->password.empty() ? "" : "***"));
  } else {
    FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
  }

  // The secret, as written: after the scheme, before the last '@', after the first ':'.
  const size_t scheme = url.find("://");
  const size_t at = url.rfind('@');
  if (scheme == std::string::npos || at == std::string::npos || at < scheme + 3) return 0;
  const std::string_view userinfo = std::string_view(url).substr(scheme + 3, at - scheme - 3);
  const size_t colon = userinfo.find(':');
  const std::string_view user = colon == std::string_view::npos ? "" : userinfo.substr(0, colon);
  const std::string_view secret =
      colon == std::string_view::npos ? userinfo : userinfo.substr(colon + 1);
  std::bitset<256> public_bytes;
  for (std::string_view part : {std::string_view(url).substr(0, scheme + 3), user,
                                std::string_view(url).substr(at), kWording}) {
    for (unsigned char c : part) public_bytes.set(c);
  }
  bool distinctive = false;
  for (unsigned char c : secret) distinctive = distinctive || !public_bytes.test(c);
  if (!distinctive) return 0;
  FUZZ_CHECK(redacted.find(secret) == std::string::npos);
  if (!parsed.ok()) {
    FUZZ_CHECK(std::string(parsed.status().message()).find(secret) == std::string::npos);
  }
  return 0;
}
