// Process-wide logging setup (spdlog): plain text or one JSON object per line, on stderr, and
// request ids (taken from the client's `x-request-id` metadata when it sends a sane one, else
// generated) that tie a call's log lines together and are echoed back as `x-request-id`.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace ctxcache::server {

// format: "plain" | "json"; level: trace | debug | info | warn | error.
absl::Status ConfigureLogging(const std::string& format, const std::string& level);

// The id for a call: `client_id` if it is 1-64 characters of [A-Za-z0-9._-], else a fresh
// 16-hex-digit id (unique within the process, unpredictable across processes).
std::string RequestId(std::string_view client_id);

// JSON string escaping (quotes not included), for the JSON log format.
std::string JsonEscape(std::string_view s);

}  // namespace ctxcache::server
