// Remote CLI commands over gRPC (see remote.h).
#include "server/cli/remote.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "ctxcache/v1/ctxcache.grpc.pb.h"

namespace ctxcache::cli {
namespace {

namespace pb = ::ctxcache::v1;

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  // gRPC and absl share the canonical code numbers.
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

const char* TierName(pb::CacheTier t) {
  switch (t) {
    case pb::CACHE_TIER_COMPUTED:
      return "computed";
    case pb::CACHE_TIER_MEMORY:
      return "memory";
    case pb::CACHE_TIER_REDIS:
      return "redis";
    default:
      return "unknown";
  }
}

const char* FinishName(pb::FinishReason r) {
  switch (r) {
    case pb::FINISH_REASON_LENGTH:
      return "length";
    case pb::FINISH_REASON_STOP:
      return "stop";
    case pb::FINISH_REASON_END_OF_GENERATION:
      return "end_of_generation";
    case pb::FINISH_REASON_CONTEXT_FULL:
      return "context_full";
    default:
      return "unknown";
  }
}

class Remote {
 public:
  explicit Remote(const FlagSource& flags) : flags_(flags) {}

  absl::Status Run(const std::string& command) {
    const std::string address = flags_.get("server").value_or("");
    if (address.empty()) return absl::InvalidArgumentError("--server needs HOST:PORT");
    for (const char* local : {"model", "threads", "out", "dtype", "no-bos", "raw-template"}) {
      if (flags_.has(local)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "flag --", local, " is not used with --server: the server chooses its model and "
            "threads, and keeps compressed contexts in its cache (use the context id)"));
      }
    }
    token_ = flags_.get("token").value_or("");
    if (token_.empty()) {
      if (const char* env = std::getenv("CTXCACHE_TOKEN")) token_ = env;
    }
    RETURN_IF_ERROR(Number("timeout", &timeout_seconds_));
    quiet_ = Bool("quiet");
    ASSIGN_OR_RETURN(channel_, MakeChannel(address));
    stub_ = pb::ContextCache::NewStub(channel_);
    if (command == "compress") return Compress();
    if (command == "generate") return Generate();
    if (command == "info") return Info();
    if (command == "health") return Health();
    return absl::InvalidArgumentError(
        absl::StrCat("command '", command,
                     "' does not run against a server (compress, generate, info, health do)"));
  }

 private:
  // Plaintext unless a TLS flag is given: --tls (system roots), --tls-ca FILE (this CA),
  // --tls-cert/--tls-key (a client certificate for mutual TLS), --tls-server-name NAME (the
  // name checked in the server's certificate when the address is not it). The files can
  // also come from $CTXCACHE_TLS_CA, $CTXCACHE_TLS_CERT and $CTXCACHE_TLS_KEY.
  absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address) const {
    auto setting = [&](const char* flag, const char* env) {
      std::string v = flags_.get(flag).value_or("");
      if (v.empty()) {
        if (const char* e = std::getenv(env)) v = e;
      }
      return v;
    };
    const std::string ca = setting("tls-ca", "CTXCACHE_TLS_CA");
    const std::string cert = setting("tls-cert", "CTXCACHE_TLS_CERT");
    const std::string key = setting("tls-key", "CTXCACHE_TLS_KEY");
    const std::string server_name = flags_.get("tls-server-name").value_or("");
    const bool tls = Bool("tls") || !ca.empty() || !cert.empty() || !server_name.empty();
    if (!tls) return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    if (cert.empty() != key.empty()) {
      return absl::InvalidArgumentError(
          "--tls-cert and --tls-key go together (a client certificate and its key)");
    }
    grpc::SslCredentialsOptions options;
    auto read = [](const char* flag, const std::string& path, std::string* out) -> absl::Status {
      if (path.empty()) return absl::OkStatus();
      absl::StatusOr<std::string> text = ReadFileOrStdin(path);
      if (!text.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", flag, " ", path, ": ", text.status().message()));
      }
      *out = std::move(*text);
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(read("tls-ca", ca, &options.pem_root_certs));
    RETURN_IF_ERROR(read("tls-cert", cert, &options.pem_cert_chain));
    RETURN_IF_ERROR(read("tls-key", key, &options.pem_private_key));
    grpc::ChannelArguments args;
    if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
    return grpc::CreateCustomChannel(address, grpc::SslCredentials(options), args);
  }

  bool Bool(const std::string& name) const {
    auto v = flags_.get(name);
    return v.has_value() && *v != "false" && *v != "0";
  }
  template <typename T>
  absl::Status Number(const std::string& name, T* out) const {
    auto v = flags_.get(name);
    if (!v) return absl::OkStatus();
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      double d = 0;
      ok = absl::SimpleAtod(*v, &d);
      *out = static_cast<T>(d);
    } else {
      int64_t i = 0;
      ok = absl::SimpleAtoi(*v, &i);
      *out = static_cast<T>(i);
    }
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", *v, "' is not a number"));
    return absl::OkStatus();
  }
  // An optional proto field set only when the flag is given.
  template <typename T, typename Setter>
  absl::Status Optional(const std::string& name, Setter set) const {
    if (!flags_.has(name)) return absl::OkStatus();
    T value{};
    RETURN_IF_ERROR(Number(name, &value));
    set(value);
    return absl::OkStatus();
  }

  void Prepare(grpc::ClientContext& ctx) const {
    if (!token_.empty()) ctx.AddMetadata("authorization", "Bearer " + token_);
    if (timeout_seconds_ > 0) {
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds_ * 1e3)));
    }
  }

  absl::Status Compress() {
    pb::CompressRequest req;
    const auto doc_file = flags_.get("doc");
    pb::CompressionParams* p = req.mutable_compression();
    p->set_method(flags_.get("method").value_or(""));
    double ratio = 0;
    int64_t budget = 0;
    RETURN_IF_ERROR(Number("ratio", &ratio));
    RETURN_IF_ERROR(Number("budget", &budget));
    p->set_ratio(ratio);
    p->set_budget(budget);
    p->set_per_layer(Bool("per-layer"));
    if (const auto v = flags_.get("head-budget")) p->set_head_budget(*v);
    RETURN_IF_ERROR(
        Optional<double>("head-budget-alpha", [&](double v) { p->set_head_budget_alpha(v); }));
    RETURN_IF_ERROR(Optional<int>("chunk", [&](int v) { p->set_chunk(v); }));
    if (auto d = flags_.get("kv-dtype")) p->set_kv_dtype(*d);
    req.set_question(flags_.get("question").value_or(""));
    const bool json = Bool("json");
    RETURN_IF_ERROR(flags_.check_all_used());
    if (!doc_file) return absl::InvalidArgumentError("compress needs --doc FILE (or - for stdin)");
    ASSIGN_OR_RETURN(std::string doc, ReadFileOrStdin(*doc_file));
    req.mutable_document()->set_text(doc);

    grpc::ClientContext ctx;
    Prepare(ctx);
    pb::CompressResponse resp;
    RETURN_IF_ERROR(FromGrpc(stub_->Compress(&ctx, req, &resp)));
    const pb::ContextInfo& c = resp.context();
    if (json) {
      std::printf("{\"context_id\":\"%s\",\"tier\":\"%s\",\"method\":\"%s\",\"source_tokens\":%lld,"
                  "\"kept_entries\":%lld,\"full_entries\":%lld,\"kv_bytes\":%lld,"
                  "\"full_kv_bytes\":%lld,\"bytes_ratio\":%.4f,\"compute_ms\":%.3f,"
                  "\"total_ms\":%.3f}\n",
                  c.context_id().c_str(), TierName(c.tier()), c.method().c_str(),
                  static_cast<long long>(c.original_tokens()),
                  static_cast<long long>(c.kept_entries()), static_cast<long long>(c.full_entries()),
                  static_cast<long long>(c.kv_bytes()), static_cast<long long>(c.full_kv_bytes()),
                  double(c.full_kv_bytes()) / std::max<int64_t>(1, c.kv_bytes()), resp.compute_ms(),
                  resp.total_ms());
      return absl::OkStatus();
    }
    std::printf("context id:        %s\n", c.context_id().c_str());
    PrintContextSummary(c.original_tokens(), c.kept_tokens(), c.kept_entries(), c.full_entries(),
                        c.full_kv_bytes(), c.kv_bytes(), KvDtypeOfParams(c.params()));
    std::printf("tier:              %s\n"
                "time:              %.1f ms compute, %.1f ms total, %.1f ms queued\n",
                TierName(c.tier()), resp.compute_ms(), resp.total_ms(), resp.queue_ms());
    return absl::OkStatus();
  }

  absl::Status Generate() {
    pb::GenerateRequest req;
    std::string prompt;
    if (auto p = flags_.get("prompt")) {
      prompt = *p;
    } else if (auto f = flags_.get("prompt-file")) {
      ASSIGN_OR_RETURN(prompt, ReadFileOrStdin(*f));
    } else {
      return absl::InvalidArgumentError("generate needs --prompt TEXT or --prompt-file FILE");
    }
    if (Bool("chat")) {
      pb::ChatMessage* m = req.mutable_chat()->add_messages();
      m->set_role("user");
      m->set_content(prompt);
      req.mutable_chat()->set_system(flags_.get("system").value_or(""));
    } else {
      req.set_text(prompt);
    }
    double select_ratio = 0;
    RETURN_IF_ERROR(Number("select-ratio", &select_ratio));
    for (const std::string& id : flags_.get_all("context")) {
      pb::ContextRef* ref = req.add_contexts();
      ref->set_context_id(id);
      // The server checks the ratio and that each context is stored whole.
      if (flags_.has("select-ratio")) ref->mutable_select()->set_ratio(select_ratio);
    }
    if (flags_.has("select-ratio") && req.contexts().empty()) {
      return absl::InvalidArgumentError("--select-ratio selects from --context ids: give one");
    }
    pb::SamplingParams* s = req.mutable_sampling();
    RETURN_IF_ERROR(Optional<float>("temperature", [&](float v) { s->set_temperature(v); }));
    RETURN_IF_ERROR(Optional<int>("top-k", [&](int v) { s->set_top_k(v); }));
    RETURN_IF_ERROR(Optional<float>("top-p", [&](float v) { s->set_top_p(v); }));
    RETURN_IF_ERROR(Optional<float>("min-p", [&](float v) { s->set_min_p(v); }));
    RETURN_IF_ERROR(Optional<float>("repeat-penalty", [&](float v) { s->set_repetition_penalty(v); }));
    RETURN_IF_ERROR(Optional<uint64_t>("seed", [&](uint64_t v) { s->set_seed(v); }));
    RETURN_IF_ERROR(Optional<int>("max-tokens", [&](int v) { req.set_max_tokens(v); }));
    for (const std::string& stop : flags_.get_all("stop")) req.add_stop(stop);
    req.set_ignore_eos(Bool("ignore-eos"));
    pb::DecodePolicy* d = req.mutable_decode();
    const std::string kind = flags_.get("decode").value_or("full");
    if (kind == "recycled") {
      d->set_kind(pb::DecodePolicy::KIND_RECYCLED);
    } else if (kind != "full") {
      return absl::InvalidArgumentError(absl::StrCat("--decode '", kind, "': use full or recycled"));
    }
    RETURN_IF_ERROR(Optional<int>("stride", [&](int v) { d->set_stride(v); }));
    RETURN_IF_ERROR(Optional<int64_t>("topk", [&](int64_t v) { d->set_top_k(v); }));
    RETURN_IF_ERROR(Optional<float>("similarity", [&](float v) { d->set_similarity_threshold(v); }));
    d->set_dynamic(Bool("dynamic"));
    RETURN_IF_ERROR(flags_.check_all_used());

    grpc::ClientContext ctx;
    Prepare(ctx);
    std::unique_ptr<grpc::ClientReader<pb::GenerateResponse>> reader = stub_->Generate(&ctx, req);
    pb::GenerateResponse msg;
    pb::Usage usage;
    bool has_usage = false;
    while (reader->Read(&msg)) {
      std::fwrite(msg.text().data(), 1, msg.text().size(), stdout);
      std::fflush(stdout);
      if (msg.has_usage()) {
        usage = msg.usage();
        has_usage = true;
      }
    }
    const grpc::Status status = reader->Finish();
    std::fputc('\n', stdout);
    RETURN_IF_ERROR(FromGrpc(status));
    if (!quiet_ && has_usage) {
      std::string tiers;
      for (const pb::ContextUsage& c : usage.contexts()) {
        absl::StrAppend(&tiers, tiers.empty() ? "" : ", ", c.context_id().substr(0, 12), "… ",
                        TierName(c.tier()));
      }
      std::fprintf(stderr,
                   "\n[%d context(s)%s%s%s: %lld tokens -> %.1f kept per head]\n"
                   "[KV %.2f MB used vs %.2f MB full: saved %.2f MB; %.2f MB attended]\n"
                   "[%lld prompt tokens, %lld generated, TTFT %.1f ms, %.1f tok/s decode, "
                   "finish: %s]\n",
                   usage.contexts_size(), tiers.empty() ? "" : " (", tiers.c_str(),
                   tiers.empty() ? "" : ")", static_cast<long long>(usage.context_tokens_original()),
                   usage.context_tokens_kept(), usage.kv_bytes_used() / 1e6,
                   usage.kv_bytes_full() / 1e6, usage.kv_bytes_saved() / 1e6,
                   usage.kv_bytes_attended() / 1e6,
                   static_cast<long long>(usage.prompt_tokens()),
                   static_cast<long long>(usage.completion_tokens()), usage.ttft_ms(),
                   usage.decode_tokens_per_second(), FinishName(usage.finish_reason()));
    }
    return absl::OkStatus();
  }

  // grpc.health.v1 Check (--service NAME, default the server as a whole): prints the status;
  // an error unless SERVING, so it serves as a readiness check in scripts and exec probes.
  absl::Status Health() {
    const std::string service = flags_.get("service").value_or("");
    RETURN_IF_ERROR(flags_.check_all_used());
    if (service.size() > 127) return absl::InvalidArgumentError("--service: name too long");
    // HealthCheckRequest{service = 1} and HealthCheckResponse{status = 1} by hand: one
    // field each, so no generated code for grpc.health.v1 is needed.
    std::string request;
    if (!service.empty()) {
      request.push_back(0x0a);
      request.push_back(static_cast<char>(service.size()));
      request += service;
    }
    grpc::Slice slice(request);
    grpc::ByteBuffer req(&slice, 1), resp;
    grpc::ClientContext ctx;
    Prepare(ctx);
    grpc::GenericStub generic(channel_);
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status status;
    generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                      [&](grpc::Status s) {
                        std::lock_guard<std::mutex> lock(mu);
                        status = std::move(s);
                        done = true;
                        cv.notify_one();
                      });
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done; });
    }
    RETURN_IF_ERROR(FromGrpc(status));
    std::vector<grpc::Slice> slices;
    if (!resp.Dump(&slices).ok()) return absl::InternalError("unreadable health response");
    std::string bytes;
    for (const grpc::Slice& s : slices)
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    // Field 1, varint: 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN. An empty
    // message is UNKNOWN (proto3 default).
    const int code = bytes.size() >= 2 && bytes[0] == 0x08 ? bytes[1] : 0;
    static const char* const kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    const char* name = code >= 0 && code < 4 ? kNames[code] : "UNKNOWN";
    std::printf("%s\n", name);
    if (code != 1) return absl::UnavailableError(absl::StrCat("health: ", name));
    return absl::OkStatus();
  }

  absl::Status Info() {
    RETURN_IF_ERROR(flags_.check_all_used());
    grpc::ClientContext ctx;
    Prepare(ctx);
    pb::GetModelInfoResponse r;
    RETURN_IF_ERROR(FromGrpc(stub_->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &r)));
    std::string methods;
    for (const std::string& m : r.methods()) absl::StrAppend(&methods, methods.empty() ? "" : " ", m);
    std::printf("model:         %s (%s)\n", r.name().c_str(), r.architecture().c_str());
    std::printf("fingerprint:   %s\n", r.fingerprint().c_str());
    std::printf("layers %d, d_model %d, heads %d, kv heads %d, head_dim %d, vocab %d, context %d\n",
                r.n_layers(), r.d_model(), r.n_heads(), r.n_kv_heads(), r.head_dim(), r.n_vocab(),
                r.context_length());
    std::printf("KV bytes/token (fp16): %lld\n", static_cast<long long>(r.kv_bytes_per_token()));
    std::printf("methods:       %s\n", methods.c_str());
    std::printf("server:        %d worker(s), redis %s, documents up to %lld tokens / %lld bytes\n",
                r.workers(), r.redis_enabled() ? "on" : "off",
                static_cast<long long>(r.max_document_tokens()),
                static_cast<long long>(r.max_document_bytes()));
    std::printf("tenant:        %s\n", r.tenant().c_str());
    return absl::OkStatus();
  }

  const FlagSource& flags_;
  std::string token_;
  double timeout_seconds_ = 0;
  bool quiet_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::ContextCache::Stub> stub_;
};

}  // namespace

absl::Status RunRemote(const std::string& command, const FlagSource& flags) {
  absl::Status s = Remote(flags).Run(command);
  if (s.ok()) return s;
  // Name the code: "NOT_FOUND: no context ..." tells a script and a person what to do.
  return absl::Status(s.code(), absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message()));
}

void PrintContextSummary(int64_t source_tokens, double kept_per_head, int64_t kept_entries,
                         int64_t full_entries, int64_t full_kv_bytes, int64_t kv_bytes,
                         const std::string& kv_dtype) {
  std::printf(
      "document tokens:   %lld\n"
      "kept per head:     %.1f (%.2f%% of the entries)\n"
      "KV bytes:          %lld full (fp16) -> %lld stored as %s (%.1fx compression, saved %lld)\n",
      static_cast<long long>(source_tokens), kept_per_head,
      100.0 * kept_entries / std::max<int64_t>(1, full_entries),
      static_cast<long long>(full_kv_bytes), static_cast<long long>(kv_bytes), kv_dtype.c_str(),
      double(full_kv_bytes) / std::max<int64_t>(1, kv_bytes),
      static_cast<long long>(full_kv_bytes - kv_bytes));
}

std::string KvDtypeOfParams(const std::string& params) {
  for (absl::string_view kv : absl::StrSplit(params, ';')) {
    if (absl::ConsumePrefix(&kv, "kv_dtype=")) return std::string(kv);
  }
  return "fp16";
}

absl::StatusOr<std::string> ReadFileOrStdin(const std::string& path) {
  std::ostringstream ss;
  if (path == "-") {
    ss << std::cin.rdbuf();
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read '", path, "'"));
    ss << in.rdbuf();
  }
  return ss.str();
}

}  // namespace ctxcache::cli
