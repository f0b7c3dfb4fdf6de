// The server's configuration: defaults, then an optional YAML file, then CTXCACHE_*
// environment variables, then command-line flags (later sources win), validated once at start
// so that a bad value stops the server with a message naming the setting and what is allowed.
//
// Every setting has one name used in all three places: flag `--memory-cache-bytes`, YAML key
// `memory_cache_bytes` (dashes and underscores are interchangeable), environment variable
// `CTXCACHE_MEMORY_CACHE_BYTES`. The YAML file comes from `--config FILE` or
// `CTXCACHE_CONFIG`.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ctxcache::server {

// The address `ctxcache-server` listens on without --listen: loopback only, so a server
// started by hand is not reachable from the network until asked.
inline constexpr char kDefaultListen[] = "127.0.0.1:50051";

struct ServerConfig {
  std::string listen = kDefaultListen;  // HOST:PORT (port 0 = any free port)
  std::string metrics_listen;           // HOST:PORT for Prometheus /metrics; empty = not served
  std::string http_listen;              // HOST:PORT for the OpenAI-compatible HTTP API; empty = off
  std::string model;                    // GGUF path; empty = FindDefaultModel()
  std::string digest_compressor;        // IC-Former GGUF for method "digest"; empty = none
  // Cache tiers.
  int64_t memory_cache_bytes = int64_t{1} << 30;
  std::string redis_url;  // redis://[user:pass@]HOST:PORT[/db] or redis-cluster://...; empty = none
  int redis_pool_size = 4;
  int redis_connect_timeout_ms = 500;
  int redis_command_timeout_ms = 1000;
  int64_t redis_ttl_seconds = 24 * 3600;
  int64_t redis_tenant_quota_bytes = 0;  // 0 = unlimited
  std::string redis_key_prefix = "ctxcache:";
  // Circuit breaker and background writer (cache/context_store.h RedisOptions).
  int redis_circuit_failures = 5;   // 0 = no breaker
  int redis_circuit_slow_ms = 250;  // 0 = only errors count
  int redis_circuit_cool_down_ms = 5000;
  int redis_write_queue_entries = 64;
  int64_t redis_write_queue_bytes = int64_t{256} << 20;
  // Engine workers: each owns a Runner with threads_per_worker threads; 0 = automatic
  // (workers = min(4, cores), threads = cores / workers).
  int workers = 0;
  int threads_per_worker = 0;
  // Where the engine runs (server/devices.h): "cpu", "cuda" (every GPU, else the CPU),
  // "cuda:N[,cuda:M]" (one worker per GPU), or a list with cpu and GPUs.
  std::string device = "cpu";
  // Continuous batching: requests each worker serves at once (their decode tokens share one
  // forward pass per step), and the prompt tokens a step takes (longer prompts are prefilled
  // in chunks of this many, interleaved with the others' decode steps).
  int max_batch = 16;
  int step_prompt_tokens = 512;
  // Admission: requests waiting for a worker, and KV bytes (fp32 working caches) that queued
  // and running requests may reserve; 0 = automatic (a quarter of physical memory).
  int max_queue_depth = 64;
  int64_t max_kv_bytes = 0;
  // Tenant capacity (0 = off, the default): requests one tenant may have queued or running,
  // and memory-tier bytes its contexts may hold, so that one tenant cannot starve the others.
  int tenant_max_inflight = 0;
  int64_t tenant_memory_cache_bytes = 0;
  // Request limits.
  int64_t max_document_tokens = 32768;
  int64_t max_document_bytes = 4 << 20;
  int max_contexts_per_request = 16;
  int64_t max_message_bytes = 16 << 20;  // gRPC receive limit
  // Security and operations.
  std::string auth_tokens_file;  // "TOKEN TENANT" lines; empty = no auth, tenant "default"
  int auth_failure_limit = 20;   // failed authentications per peer address per minute; 0 = off
  // Transport security (server/tls.h): with tls_cert and tls_key every listener speaks TLS;
  // tls_client_ca requires client certificates (gRPC, HTTP API); tls_client_tenants maps
  // their identities to tenants. Files are checked for changes every tls_reload_seconds.
  std::string tls_cert, tls_key, tls_client_ca, tls_client_tenants;
  int tls_reload_seconds = 10;
  std::string log_format = "plain";  // plain | json
  std::string log_level = "info";    // trace | debug | info | warn | error
  double drain_timeout_seconds = 30;  // SIGTERM: finish in-flight calls for at most this long
  bool help = false;
};

// Parses argv[first..argc) and `env` (only CTXCACHE_* names that are settings are read;
// others are ignored). InvalidArgument names the flag, key or variable and the allowed values.
absl::StatusOr<ServerConfig> LoadServerConfig(int argc, const char* const* argv, int first,
                                              const std::map<std::string, std::string>& env);
// The process environment's CTXCACHE_* variables.
std::map<std::string, std::string> CtxcacheEnvironment();

// Applies a YAML document (a mapping of setting names to scalars) onto `config`.
absl::Status ApplyYaml(const std::string& yaml_text, const std::string& source,
                       ServerConfig* config);

// Checks ranges and formats (listen address, log format, sizes, ...).
absl::Status ValidateServerConfig(const ServerConfig& config);

// Byte sizes: a plain integer or one with a binary suffix (K, M, G, KiB, MiB, GiB; KB/MB/GB
// are read as binary too, the common intent for memory sizes).
absl::StatusOr<int64_t> ParseByteSize(const std::string& text);

// Splits "host:port" / "[v6]:port"; InvalidArgument when the port is missing or not 0-65535.
absl::Status CheckHostPort(const std::string& address, const std::string& setting);

// The --help text.
std::string ServerUsage();

}  // namespace ctxcache::server
