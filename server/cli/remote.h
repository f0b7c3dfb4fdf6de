// `ctxcache --server HOST:PORT compress|generate|info ...`: the CLI's commands run against a
// ctxcache-server over gRPC instead of a local engine, with the same flags where they mean the
// same thing. Differences: `generate --context` takes context ids (what `compress` printed)
// instead of files; `compress` needs no --out (the context stays in the server's cache); the
// server picks the model and threads. --token (or $CTXCACHE_TOKEN) sends a bearer token,
// --timeout SECONDS sets the call's deadline.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ctxcache::cli {

// The parts of main.cc's flag parser the remote commands read (kept as a view so that the
// parser stays in main.cc).
struct FlagSource {
  std::function<std::optional<std::string>(const std::string&)> get;
  std::function<std::vector<std::string>(const std::string&)> get_all;
  std::function<bool(const std::string&)> has;
  std::function<absl::Status()> check_all_used;
};

// The whole of a file, or of stdin when path is "-" (documents and prompts, local or remote).
absl::StatusOr<std::string> ReadFileOrStdin(const std::string& path);

// What compress prints about a context, local or remote: tokens, entries kept, and the
// compression in bytes (fp16 bytes of the full KV / bytes stored at kv_dtype).
void PrintContextSummary(int64_t source_tokens, double kept_per_head, int64_t kept_entries,
                         int64_t full_entries, int64_t full_kv_bytes, int64_t kv_bytes,
                         const std::string& kv_dtype);
// The kv_dtype named in canonical params ("...;kv_dtype=int4;..."), "fp16" when absent.
std::string KvDtypeOfParams(const std::string& params);

// Runs `command` against flags' --server. Errors carry the server's status code name.
absl::Status RunRemote(const std::string& command, const FlagSource& flags);

}  // namespace ctxcache::cli
