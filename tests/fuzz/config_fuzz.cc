// Fuzz target for the server's configuration parsing (server/config.h): a YAML file, byte
// sizes and listen addresses, from the operator's files, flags and environment. Invariants:
//  * ApplyYaml returns (never throws: yaml-cpp's exceptions stop inside it) OK or
//    InvalidArgument, and so does ValidateServerConfig on what it produced;
//  * no error of ValidateServerConfig carries the Redis password (checked when the password
//    holds a byte found nowhere else in the configuration's text settings or the messages'
//    fixed wording, so that finding it can only mean it leaked);
//  * a byte size that parses is >= 0 and parses back from its plain decimal spelling;
//  * an address CheckHostPort accepts ends in ':' and a port of 0..65535.
// Input: the YAML text; it is also tried as a byte size and as an address.
#include <bitset>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/strings/numbers.h"
#include "server/config.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

bool InvalidOrOk(const absl::Status& s) {
  return s.ok() || s.code() == absl::StatusCode::kInvalidArgument;
}

// The password as written in a redis URL: after "://", before the last '@', after the first
// ':' of what lies between (all of it when there is no ':'), as RedactRedisUrl hides it.
std::string_view Secret(std::string_view url, std::string_view* rest) {
  const size_t scheme = url.find("://");
  const size_t at = url.rfind('@');
  if (scheme == std::string_view::npos || at == std::string_view::npos || at < scheme + 3) {
    return {};
  }
  const std::string_view userinfo = url.substr(scheme + 3, at - scheme - 3);
  const size_t colon = userinfo.find(':');
  *rest = url.substr(at);
  return colon == std::string_view::npos ? userinfo : userinfo.substr(colon + 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  ctxcache::server::ServerConfig config;
  const absl::Status applied = ctxcache::server::ApplyYaml(text, "fuzz.yaml", &config);
  FUZZ_CHECK(InvalidOrOk(applied));
  if (applied.ok()) {
    const absl::Status valid = ctxcache::server::ValidateServerConfig(config);
    FUZZ_CHECK(InvalidOrOk(valid));
    std::string_view rest;
    const std::string_view secret = Secret(config.redis_url, &rest);
    if (!valid.ok() && !secret.empty()) {
      std::bitset<256> seen;
      const std::string_view user_and_scheme =
          std::string_view(config.redis_url).substr(0, secret.data() - config.redis_url.data());
      for (std::string_view s :
           {user_and_scheme, rest, std::string_view(config.listen),
            std::string_view(config.metrics_listen), std::string_view(config.log_format),
            std::string_view(config.log_level),
            std::string_view("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                             " _-.,:;'\"()[]/@%=*+<>?!#")}) {
        for (unsigned char c : s) seen.set(c);
      }
      bool distinctive = false;
      for (unsigned char c : secret) distinctive = distinctive || !seen.test(c);
      if (distinctive) {
        FUZZ_CHECK(std::string(valid.message()).find(secret) == std::string::npos);
      }
    }
  }

  const auto bytes = ctxcache::server::ParseByteSize(text);
  FUZZ_CHECK(InvalidOrOk(bytes.status()));
  if (bytes.ok()) {
    FUZZ_CHECK(*bytes >= 0);
    const auto again = ctxcache::server::ParseByteSize(std::to_string(*bytes));
    FUZZ_CHECK(again.ok() && *again == *bytes);
  }

  const absl::Status address = ctxcache::server::CheckHostPort(text, "listen");
  FUZZ_CHECK(InvalidOrOk(address));
  if (address.ok()) {
    const size_t colon = text.rfind(':');
    FUZZ_CHECK(colon != std::string::npos);
    int port = -1;
    FUZZ_CHECK(absl::SimpleAtoi(text.substr(colon + 1), &port) && port >= 0 && port <= 65535);
  }
  return 0;
}
