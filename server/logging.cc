// Logging setup and request ids (see logging.h).
#include "server/logging.h"

#include <spdlog/formatter.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ctxcache::server {
namespace {

// {"ts":"2024-01-02T03:04:05.678Z","level":"info","msg":"..."} — the message escaped, so any
// request text that reaches a log line cannot break the line structure.
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const auto t = std::chrono::system_clock::to_time_t(msg.time);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        msg.time.time_since_epoch()).count() % 1000;
    std::tm tm{};
    gmtime_r(&t, &tm);
    char ts[32];
    std::strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    const std::string level(spdlog::level::to_string_view(msg.level).data(),
                            spdlog::level::to_string_view(msg.level).size());
    const std::string line = absl::StrFormat(
        "{\"ts\":\"%s.%03dZ\",\"level\":\"%s\",\"msg\":\"%s\"}\n", ts, static_cast<int>(ms),
        level, JsonEscape(std::string_view(msg.payload.data(), msg.payload.size())));
    dest.append(line.data(), line.data() + line.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }
};

}  // namespace

std::string JsonEscape(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  return out;
}

absl::Status ConfigureLogging(const std::string& format, const std::string& level) {
  // Not registered by name, so that configuring twice (tests) replaces instead of throwing.
  auto logger = std::make_shared<spdlog::logger>(
      "ctxcache-server", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  if (format == "json") {
    logger->set_formatter(std::make_unique<JsonFormatter>());
  } else if (format == "plain") {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  } else {
    return absl::InvalidArgumentError(absl::StrCat("log format '", format, "': use plain or json"));
  }
  const spdlog::level::level_enum lvl = spdlog::level::from_str(level);
  logger->set_level(lvl);
  spdlog::set_default_logger(logger);
  return absl::OkStatus();
}

std::string RequestId(std::string_view client_id) {
  bool ok = !client_id.empty() && client_id.size() <= 64;
  for (char c : client_id) {
    ok = ok && (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                c == '-');
  }
  if (ok) return std::string(client_id);
  // A random per-process base plus a counter: unique in the process, and two processes'
  // ids do not collide in a shared log.
  static const uint64_t base = std::random_device{}() * 0x9E3779B97F4A7C15ull ^
                               static_cast<uint64_t>(std::random_device{}());
  static std::atomic<uint64_t> counter{0};
  return absl::StrFormat("%016x", base + counter.fetch_add(1) * 0x9E3779B97F4A7C15ull);
}

}  // namespace ctxcache::server
