// Server configuration: one table of settings read from YAML, environment and flags.
#include "server/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache/redis_client.h"
#include "cache/redis_cluster.h"
#include "common/status.h"
#include "server/devices.h"

extern char** environ;

namespace ctxcache::server {
namespace {

using Setter = std::function<absl::Status(ServerConfig*, const std::string&)>;

struct Setting {
  const char* name;  // canonical, with underscores
  const char* help;
  Setter set;
};

// "--Memory-Cache_Bytes" and "memory_cache_bytes" name the same setting.
std::string Canonical(std::string name) {
  for (char& c : name) c = c == '-' ? '_' : static_cast<char>(std::tolower(c));
  return name;
}

std::string FlagName(const std::string& canonical) {
  std::string out = canonical;
  std::replace(out.begin(), out.end(), '_', '-');
  return "--" + out;
}

absl::Status Bad(const std::string& name, const std::string& value, const std::string& want) {
  return absl::InvalidArgumentError(
      absl::StrCat(name, ": '", value, "' is not valid; expected ", want));
}

Setter String(std::string ServerConfig::*field) {
  return [field](ServerConfig* c, const std::string& v) {
    c->*field = v;
    return absl::OkStatus();
  };
}

template <typename T>
Setter Integer(T ServerConfig::*field) {
  return [field](ServerConfig* c, const std::string& v) {
    int64_t x = 0;
    if (!absl::SimpleAtoi(v, &x) || x < std::numeric_limits<T>::min() ||
        x > std::numeric_limits<T>::max()) {
      return absl::InvalidArgumentError(absl::StrCat("'", v, "' is not an integer"));
    }
    c->*field = static_cast<T>(x);
    return absl::OkStatus();
  };
}

Setter Bytes(int64_t ServerConfig::*field) {
  return [field](ServerConfig* c, const std::string& v) {
    ASSIGN_OR_RETURN(c->*field, ParseByteSize(v));
    return absl::OkStatus();
  };
}

Setter Seconds(double ServerConfig::*field) {
  return [field](ServerConfig* c, const std::string& v) {
    double x = 0;
    if (!absl::SimpleAtod(v, &x) || !std::isfinite(x)) {
      return absl::InvalidArgumentError(absl::StrCat("'", v, "' is not a number of seconds"));
    }
    c->*field = x;
    return absl::OkStatus();
  };
}

const std::vector<Setting>& Settings() {
  static const auto* const settings = new std::vector<Setting>{
      {"listen", "HOST:PORT to serve gRPC on (default 127.0.0.1:50051; port 0 = any free port)",
       String(&ServerConfig::listen)},
      {"metrics_listen", "HOST:PORT for Prometheus /metrics, e.g. 127.0.0.1:9464 (default: off)",
       String(&ServerConfig::metrics_listen)},
      {"http_listen",
       "HOST:PORT for the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/contexts, ...; "
       "same tokens and tenants as gRPC) (default: off)",
       String(&ServerConfig::http_listen)},
      {"model",
       "GGUF model path (default: $CTXCACHE_MODEL, else "
       "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)",
       String(&ServerConfig::model)},
      {"digest_compressor",
       "digest compressor GGUF trained for the served model (train/README.md); method "
       "\"digest\" needs it, and the server refuses to start with one made for another model "
       "(default: none)",
       String(&ServerConfig::digest_compressor)},
      {"memory_cache_bytes", "memory tier budget in resident bytes, e.g. 1GiB (default 1GiB)",
       Bytes(&ServerConfig::memory_cache_bytes)},
      {"redis_url",
       "the shared tier: redis://[user:pass@]HOST:PORT[/db] (one node), or "
       "redis-cluster://[user:pass@]HOST:PORT[,HOST:PORT...] (a Redis Cluster's seed nodes) "
       "(default: none)",
       String(&ServerConfig::redis_url)},
      {"redis_pool_size", "Redis connections (default 4)", Integer(&ServerConfig::redis_pool_size)},
      {"redis_connect_timeout_ms", "Redis connect timeout (default 500)",
       Integer(&ServerConfig::redis_connect_timeout_ms)},
      {"redis_command_timeout_ms", "Redis command timeout (default 1000)",
       Integer(&ServerConfig::redis_command_timeout_ms)},
      {"redis_ttl_seconds", "Redis entry TTL, 0 = none (default 86400)",
       Integer(&ServerConfig::redis_ttl_seconds)},
      {"redis_tenant_quota_bytes", "Redis bytes per tenant, 0 = unlimited (default 0)",
       Bytes(&ServerConfig::redis_tenant_quota_bytes)},
      {"redis_key_prefix", "Redis key prefix (default ctxcache:)",
       String(&ServerConfig::redis_key_prefix)},
      {"redis_circuit_failures",
       "Redis errors or slow reads in a row that open the circuit breaker, 0 = never (default 5)",
       Integer(&ServerConfig::redis_circuit_failures)},
      {"redis_circuit_slow_ms",
       "A Redis read slower than this counts as a failure for the breaker, 0 = errors only "
       "(default 250)",
       Integer(&ServerConfig::redis_circuit_slow_ms)},
      {"redis_circuit_cool_down_ms",
       "How long an open circuit skips Redis before one probe (default 5000)",
       Integer(&ServerConfig::redis_circuit_cool_down_ms)},
      {"redis_write_queue_entries",
       "Computed contexts waiting for the background Redis writer; more are dropped "
       "(default 64)",
       Integer(&ServerConfig::redis_write_queue_entries)},
      {"redis_write_queue_bytes",
       "Bytes of computed contexts waiting for the background Redis writer; more are dropped "
       "(default 256MiB)",
       Bytes(&ServerConfig::redis_write_queue_bytes)},
      {"workers", "engine workers, 0 = min(4, cores) (default 0)", Integer(&ServerConfig::workers)},
      {"threads_per_worker", "threads per engine worker, 0 = cores / workers (default 0)",
       Integer(&ServerConfig::threads_per_worker)},
      {"device",
       "where the engine runs: cpu, cuda (every GPU, else the CPU), cuda:N[,cuda:M] (one "
       "worker per GPU; start-up fails if one is missing), or a list with cpu (default cpu)",
       String(&ServerConfig::device)},
      {"max_batch", "requests each worker serves at once, their decode steps batched (default 16)",
       Integer(&ServerConfig::max_batch)},
      {"step_prompt_tokens",
       "prompt tokens per batched step; longer prompts prefill in chunks between the others' "
       "decode steps, and a compression lets their steps through as often (default 512)",
       Integer(&ServerConfig::step_prompt_tokens)},
      {"max_queue_depth", "requests waiting for a worker before RESOURCE_EXHAUSTED (default 64)",
       Integer(&ServerConfig::max_queue_depth)},
      {"max_kv_bytes", "KV bytes in-flight requests may reserve, 0 = 1/4 of RAM (default 0)",
       Bytes(&ServerConfig::max_kv_bytes)},
      {"tenant_max_inflight",
       "requests one tenant may have queued or running, 0 = no limit (default 0)",
       Integer(&ServerConfig::tenant_max_inflight)},
      {"tenant_memory_cache_bytes",
       "memory tier bytes one tenant's contexts may hold, 0 = no limit (default 0)",
       Bytes(&ServerConfig::tenant_memory_cache_bytes)},
      {"max_document_tokens", "tokens per document (default 32768)",
       Integer(&ServerConfig::max_document_tokens)},
      {"max_document_bytes", "bytes per document text (default 4MiB)",
       Bytes(&ServerConfig::max_document_bytes)},
      {"max_contexts_per_request", "contexts per Generate (default 16)",
       Integer(&ServerConfig::max_contexts_per_request)},
      {"max_message_bytes", "largest gRPC request accepted (default 16MiB)",
       Bytes(&ServerConfig::max_message_bytes)},
      {"auth_tokens",
       "file of 'TOKEN TENANT' lines; enables bearer-token auth; reloaded on SIGHUP and when it "
       "changes (default: off)",
       String(&ServerConfig::auth_tokens_file)},
      {"auth_failure_limit",
       "failed authentications allowed per peer address per minute, then its calls are "
       "refused (RESOURCE_EXHAUSTED) until the minute's count falls; 0 = no limit (default 20)",
       Integer(&ServerConfig::auth_failure_limit)},
      {"tls_cert",
       "PEM certificate chain; with tls_key, every listener (gRPC, metrics, HTTP API) speaks "
       "TLS only (default: off)",
       String(&ServerConfig::tls_cert)},
      {"tls_key", "PEM private key of tls_cert (unencrypted)", String(&ServerConfig::tls_key)},
      {"tls_client_ca",
       "PEM CA bundle: gRPC and HTTP API clients must present a certificate it signed (mutual "
       "TLS; the metrics listener does not ask) (default: off)",
       String(&ServerConfig::tls_client_ca)},
      {"tls_client_tenants",
       "file of 'IDENTITY TENANT' lines mapping a client certificate's CN:, DNS:, URI:, email: "
       "or IP: identity to a tenant; needs tls_client_ca; reloaded like auth_tokens "
       "(default: off)",
       String(&ServerConfig::tls_client_tenants)},
      {"tls_reload_seconds",
       "how often the certificate, key, CA and the auth files are checked for changes "
       "(default 10)",
       Integer(&ServerConfig::tls_reload_seconds)},
      {"log_format", "plain | json (default plain)", String(&ServerConfig::log_format)},
      {"log_level", "trace | debug | info | warn | error (default info)",
       String(&ServerConfig::log_level)},
      {"drain_timeout_seconds", "on SIGTERM, wait this long for in-flight calls (default 30)",
       Seconds(&ServerConfig::drain_timeout_seconds)},
  };
  return *settings;
}

const Setting* Find(const std::string& canonical) {
  for (const Setting& s : Settings()) {
    if (canonical == s.name) return &s;
  }
  return nullptr;
}

absl::Status Apply(const std::string& canonical, const std::string& value,
                   const std::string& shown_name, ServerConfig* config) {
  const Setting* s = Find(canonical);
  if (s == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown setting ", shown_name, " (see ctxcache-server --help)"));
  }
  absl::Status st = s->set(config, value);
  if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat(shown_name, ": ", st.message()));
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read config file '", path, "'"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<int64_t> ParseByteSize(const std::string& text) {
  std::string t(absl::StripAsciiWhitespace(text));
  size_t digits = 0;
  while (digits < t.size() && (std::isdigit(static_cast<unsigned char>(t[digits])))) ++digits;
  std::string suffix = absl::AsciiStrToLower(absl::StripAsciiWhitespace(t.substr(digits)));
  int64_t n = 0;
  if (digits == 0 || !absl::SimpleAtoi(t.substr(0, digits), &n)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", text, "' is not a byte size (e.g. 1073741824, 512MiB, 1GiB)"));
  }
  int shift = 0;
  if (suffix.empty() || suffix == "b") shift = 0;
  else if (suffix == "k" || suffix == "kb" || suffix == "kib") shift = 10;
  else if (suffix == "m" || suffix == "mb" || suffix == "mib") shift = 20;
  else if (suffix == "g" || suffix == "gb" || suffix == "gib") shift = 30;
  else if (suffix == "t" || suffix == "tb" || suffix == "tib") shift = 40;
  else {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "' has an unknown unit; use K, M, G or T (binary: KiB, MiB, ...)"));
  }
  if (n > (std::numeric_limits<int64_t>::max() >> shift)) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is too large"));
  }
  return n << shift;
}

absl::Status CheckHostPort(const std::string& address, const std::string& setting) {
  const size_t colon = address.rfind(':');
  const std::string want = "HOST:PORT, e.g. 127.0.0.1:50051, 0.0.0.0:50051 or [::1]:50051";
  if (colon == std::string::npos || colon == 0) return Bad(setting, address, want);
  const std::string host = address.substr(0, colon);
  if (host.front() == '[' && host.back() != ']') return Bad(setting, address, want);
  int port = -1;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return Bad(setting, address, "a port from 0 to 65535 after the last ':'");
  }
  return absl::OkStatus();
}

absl::Status ApplyYaml(const std::string& yaml_text, const std::string& source,
                       ServerConfig* config) {
  // yaml-cpp reports errors by exception; they stop at this function.
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid YAML: ", e.what()));
  }
  if (root.IsNull()) return absl::OkStatus();  // an empty file configures nothing
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a mapping of settings (key: value per line)"));
  }
  for (const auto& item : root) {
    std::string key;
    try {
      key = item.first.as<std::string>();
    } catch (const YAML::Exception&) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": keys must be setting names"));
    }
    if (!item.second.IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": ", key, " must be a single value, not a list or mapping"));
    }
    RETURN_IF_ERROR(Apply(Canonical(key), item.second.Scalar(),
                          absl::StrCat(source, ": ", key), config));
  }
  return absl::OkStatus();
}

absl::StatusOr<ServerConfig> LoadServerConfig(int argc, const char* const* argv, int first,
                                              const std::map<std::string, std::string>& env) {
  // Flags are collected first (so that --config is known), applied last (so that they win).
  std::vector<std::pair<std::string, std::string>> flags;
  std::string config_file;
  if (auto it = env.find("CTXCACHE_CONFIG"); it != env.end()) config_file = it->second;
  ServerConfig config;
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      config.help = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", a, "'; settings are --name VALUE"));
    }
    a = a.substr(2);
    std::string value;
    if (size_t eq = a.find('='); eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("flag --", a, " needs a value"));
    }
    if (Canonical(a) == "config") {
      config_file = value;
    } else {
      flags.emplace_back(a, value);
    }
  }
  if (config.help) return config;
  if (!config_file.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(config_file));
    RETURN_IF_ERROR(ApplyYaml(text, config_file, &config));
  }
  for (const Setting& s : Settings()) {
    const std::string var = "CTXCACHE_" + absl::AsciiStrToUpper(s.name);
    if (auto it = env.find(var); it != env.end()) {
      RETURN_IF_ERROR(Apply(s.name, it->second, var, &config));
    }
  }
  for (const auto& [name, value] : flags) {
    RETURN_IF_ERROR(Apply(Canonical(name), value, "--" + name, &config));
  }
  RETURN_IF_ERROR(ValidateServerConfig(config));
  return config;
}

std::map<std::string, std::string> CtxcacheEnvironment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string kv = *e;
    if (kv.rfind("CTXCACHE_", 0) != 0) continue;
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return env;
}

absl::Status ValidateServerConfig(const ServerConfig& c) {
  RETURN_IF_ERROR(CheckHostPort(c.listen, "listen"));
  if (!c.metrics_listen.empty()) RETURN_IF_ERROR(CheckHostPort(c.metrics_listen, "metrics_listen"));
  if (!c.http_listen.empty()) RETURN_IF_ERROR(CheckHostPort(c.http_listen, "http_listen"));
  auto range = [](const char* name, int64_t v, int64_t lo, int64_t hi) -> absl::Status {
    if (v >= lo && v <= hi) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(name, " = ", v, " is out of range; allowed: ", lo, " to ", hi));
  };
  RETURN_IF_ERROR(range("memory_cache_bytes", c.memory_cache_bytes, 0, int64_t{1} << 50));
  RETURN_IF_ERROR(range("workers", c.workers, 0, 256));
  RETURN_IF_ERROR(range("threads_per_worker", c.threads_per_worker, 0, 1024));
  RETURN_IF_ERROR(range("max_batch", c.max_batch, 1, 256));
  RETURN_IF_ERROR(ParseDevices(c.device).status());
  RETURN_IF_ERROR(range("step_prompt_tokens", c.step_prompt_tokens, 16, 8192));
  RETURN_IF_ERROR(range("max_queue_depth", c.max_queue_depth, 1, 1 << 20));
  RETURN_IF_ERROR(range("max_kv_bytes", c.max_kv_bytes, 0, int64_t{1} << 50));
  RETURN_IF_ERROR(range("tenant_max_inflight", c.tenant_max_inflight, 0, 1 << 20));
  RETURN_IF_ERROR(
      range("tenant_memory_cache_bytes", c.tenant_memory_cache_bytes, 0, int64_t{1} << 50));
  RETURN_IF_ERROR(range("max_document_tokens", c.max_document_tokens, 1, int64_t{1} << 24));
  RETURN_IF_ERROR(range("max_document_bytes", c.max_document_bytes, 1, int64_t{1} << 30));
  RETURN_IF_ERROR(range("max_contexts_per_request", c.max_contexts_per_request, 1, 1024));
  RETURN_IF_ERROR(range("max_message_bytes", c.max_message_bytes, 1024, int64_t{1} << 31));
  RETURN_IF_ERROR(range("redis_pool_size", c.redis_pool_size, 1, 1024));
  RETURN_IF_ERROR(range("redis_connect_timeout_ms", c.redis_connect_timeout_ms, 1, 600000));
  RETURN_IF_ERROR(range("redis_command_timeout_ms", c.redis_command_timeout_ms, 1, 600000));
  RETURN_IF_ERROR(range("redis_ttl_seconds", c.redis_ttl_seconds, 0, int64_t{1} << 40));
  RETURN_IF_ERROR(range("redis_tenant_quota_bytes", c.redis_tenant_quota_bytes, 0,
                        int64_t{1} << 50));
  RETURN_IF_ERROR(range("redis_circuit_failures", c.redis_circuit_failures, 0, 1000000));
  RETURN_IF_ERROR(range("redis_circuit_slow_ms", c.redis_circuit_slow_ms, 0, 600000));
  RETURN_IF_ERROR(range("redis_circuit_cool_down_ms", c.redis_circuit_cool_down_ms, 0, 3600000));
  RETURN_IF_ERROR(range("redis_write_queue_entries", c.redis_write_queue_entries, 1, 1 << 20));
  RETURN_IF_ERROR(range("redis_write_queue_bytes", c.redis_write_queue_bytes, 1,
                        int64_t{1} << 50));
  if (!c.redis_url.empty()) {
    // The cache's own parser, so that what starts is what connects; its messages never
    // carry the password.
    const absl::Status url = IsRedisClusterUrl(c.redis_url)
                                 ? ParseRedisClusterUrl(c.redis_url).status()
                                 : ParseRedisUrl(c.redis_url).status();
    if (!url.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("redis_url: ", url.message()));
    }
  }
  RETURN_IF_ERROR(range("auth_failure_limit", c.auth_failure_limit, 0, 1000000));
  RETURN_IF_ERROR(range("tls_reload_seconds", c.tls_reload_seconds, 1, 3600));
  if (c.tls_cert.empty() != c.tls_key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tls_cert and tls_key go together: ", c.tls_cert.empty() ? "tls_key" : "tls_cert",
        " is set but ", c.tls_cert.empty() ? "tls_cert" : "tls_key", " is not"));
  }
  if (!c.tls_client_ca.empty() && c.tls_cert.empty()) {
    return absl::InvalidArgumentError(
        "tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS with client certificates");
  }
  if (!c.tls_client_tenants.empty() && c.tls_client_ca.empty()) {
    return absl::InvalidArgumentError(
        "tls_client_tenants needs tls_client_ca: without it no client certificate is verified");
  }
  if (c.log_format != "plain" && c.log_format != "json") {
    return Bad("log_format", c.log_format, "plain or json");
  }
  static const char* const kLevels[] = {"trace", "debug", "info", "warn", "error"};
  if (std::find(std::begin(kLevels), std::end(kLevels), c.log_level) == std::end(kLevels)) {
    return Bad("log_level", c.log_level, "trace, debug, info, warn or error");
  }
  if (!(c.drain_timeout_seconds >= 0 && c.drain_timeout_seconds <= 3600)) {
    return Bad("drain_timeout_seconds", absl::StrCat(c.drain_timeout_seconds), "0 to 3600");
  }
  return absl::OkStatus();
}

std::string ServerUsage() {
  std::string out =
      "usage: ctxcache-server [--config FILE.yaml] [--SETTING VALUE ...]\n\n"
      "Serves the ctxcache.v1.ContextCache gRPC API (plus grpc.health.v1 and reflection).\n"
      "Each setting is also a YAML key (underscores) and an environment variable\n"
      "CTXCACHE_<NAME>; flags win over the environment, which wins over the file.\n\n"
      "settings:\n";
  for (const Setting& s : Settings()) {
    absl::StrAppend(&out, "  ", FlagName(s.name), std::string(std::max<int>(1, 28 - static_cast<int>(std::string(s.name).size()) - 2), ' '),
                    s.help, "\n");
  }
  absl::StrAppend(&out, "  --config FILE", std::string(14, ' '),
                  "YAML file of settings (also CTXCACHE_CONFIG)\n");
  return out;
}

}  // namespace ctxcache::server
