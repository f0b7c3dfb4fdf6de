// `ctxcache`: the command-line face of the engine.
//   ctxcache generate --prompt TEXT [--chat] [--max-tokens N] [--temperature T] ...
//   ctxcache info [--model PATH]
//   ctxcache tokenize [--model PATH] [--ids-only] [--no-bos] [--parse-special] TEXT|-
//   ctxcache bench --n-prompt N --n-gen M [--threads T] [--observe ROWS] [--json]
// The model defaults to the fetched Qwen2.5-Coder-0.5B (FindDefaultModel); --model / CTXCACHE_MODEL
// override. Errors go to stderr with exit code 1 (2 for usage errors).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <set>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/cpu_features.h"
#include "common/progress.h"
#include "common/status.h"
#include "cache/codec.h"
#include "engine/chat_template.h"
#include "engine/compress/compress.h"
#include "engine/generate.h"
#include "engine/icformer.h"
#include "engine/model.h"
#include "engine/cpu/blas_kernels.h"
#include "server/cli/remote.h"

namespace ctxcache {
namespace {

using cli::ReadFileOrStdin;

constexpr const char* kUsage = R"(usage: ctxcache <command> [flags]

commands:
  generate   stream a completion for --prompt (or --prompt-file)
  info       print the model's metadata, configuration and fingerprint
  tokenize   print the token ids (and pieces) of TEXT, or of stdin with '-'
  compress   compress a document's KV cache into a context file
  bench      time prefill and decode (for bench/bench_engine.py)
  health     with --server: the server's grpc.health.v1 status (exit 0 only when SERVING)

common flags:
  --model PATH        GGUF model (default: $CTXCACHE_MODEL, else models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
  --threads N         worker threads (default: all usable cores)
  --digest-compressor FILE  the digest compressor trained for the model (method digest, and
                      generating from digest contexts)

generate flags:
  --prompt TEXT | --prompt-file FILE
  --chat              format the prompt as a user turn with the model's chat template
  --system TEXT       system message (with --chat)
  --raw-template      allow models whose chat template is unknown (plain concatenation)
  --max-tokens N      (default 256)     --temperature T   (default 0.8; 0 = greedy)
  --top-k K (40)  --top-p P (0.95)  --min-p P (0.05)  --repeat-penalty R (1.0)
  --seed S (0)    --stop STRING (repeatable)   --ignore-eos   --no-bos   --quiet
  --decode full|recycled   Recycled Attention: --stride S (10) --topk K (0 = 1/8 of keys)
                           [--dynamic --similarity T (0.85)]   (also for bench)

  --context FILE      a compressed context (repeatable; composed in order before the prompt)
  --select-ratio R    per-request selection: keep the 1/R of the contexts' entries per head
                      that this prompt attends to most (prefill once, select per query;
                      with --server, from each context id, which must be stored whole)

compress flags:
  --doc FILE (- for stdin)   --method M   (--ratio R | --budget N)   --out FILE
  --question TEXT     for prompt-guided methods (finch, snapkv)
  --per-layer         one kept set per layer instead of per KV head
  --kv-dtype fp16|int8|int4  how the kept entries are stored (default fp16; int8/int4 are
                      KIVI-style quantized, read as they are: 0.56x / 0.31x the bytes)
  --head-budget uniform|adaptive|global   adaptive: Ada-KV, a layer's KV heads share its
                      budget by score (snapkv finch expected_attention kvzip); global: every
                      head of every layer shares the model's (KVzip; kvzip's default, not
                      finch)   --head-budget-alpha A (share of its budget every head keeps,
                      default 0.2)
  --dtype fp16|bf16|fp32|int8  file encoding of an fp16 context (default fp16)
  --chunk N (finch/kvzip, default 512)
  methods: none streaming snapkv finch expected_attention kvzip anchor, and digest (digest
           form: --ratio R gives each chunk ceil(chunk / R) digest vectors, --budget N gives it
           N; needs --digest-compressor)

remote (against a running ctxcache-server; compress, generate, info, health):
  --server HOST:PORT  run the command on the server: compress prints a context id, which
                      generate takes as --context ID (repeatable); --model/--threads/--out unused
  --token TOKEN       bearer token (default $CTXCACHE_TOKEN)   --timeout SECONDS (deadline)
  --tls-ca FILE       connect over TLS, trusting this CA (default $CTXCACHE_TLS_CA); --tls
                      alone trusts the system's roots
  --tls-cert FILE --tls-key FILE   client certificate for mutual TLS ($CTXCACHE_TLS_CERT/_KEY)
  --tls-server-name NAME           the name to check in the server's certificate
  health: --service NAME (default: the server as a whole; ctxcache.v1.ContextCache)

tokenize flags:
  --ids-only   --no-bos   --parse-special

bench flags:
  --n-prompt N (512)  --n-gen M (64)  --json
  --observe ROWS      the prefill also reports its last ROWS rows' attention (score extraction)
  --compare-decode    prefill once, then time --n-gen decode steps with full attention and
                      with Recycled Attention (--stride, --topk) from copies of that cache,
                      alternating, --repeat N (3) times each: a paired speed-up on one machine
)";

// A tiny flag parser: --name value, --name=value, boolean --name, and positionals.
class Flags {
 public:
  absl::Status Parse(int argc, char** argv, int first, const std::vector<std::string>& booleans) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "-" || a.rfind("--", 0) != 0) {
        positional_.push_back(a);
        continue;
      }
      a = a.substr(2);
      std::string value;
      if (size_t eq = a.find('='); eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
      } else if (std::find(booleans.begin(), booleans.end(), a) != booleans.end()) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("flag --", a, " needs a value"));
      }
      values_[a].push_back(value);
    }
    return absl::OkStatus();
  }
  bool Has(const std::string& name) const { return values_.contains(name); }
  std::optional<std::string> Get(const std::string& name) const {
    auto it = values_.find(name);
    if (it == values_.end()) return std::nullopt;
    used_.insert(name);
    return it->second.back();
  }
  std::vector<std::string> GetAll(const std::string& name) const {
    auto it = values_.find(name);
    if (it == values_.end()) return {};
    used_.insert(name);
    return it->second;
  }
  bool Bool(const std::string& name) const {
    auto v = Get(name);
    return v.has_value() && *v != "false" && *v != "0";
  }
  template <typename T>
  absl::Status Number(const std::string& name, T* out) const {
    auto v = Get(name);
    if (!v) return absl::OkStatus();
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      double d;
      ok = absl::SimpleAtod(*v, &d);
      *out = static_cast<T>(d);
    } else {
      int64_t i;
      ok = absl::SimpleAtoi(*v, &i);
      *out = static_cast<T>(i);
    }
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", *v, "' is not a number"));
    return absl::OkStatus();
  }
  // Flags given but never read: a typo should not be silently ignored.
  absl::Status CheckAllUsed() const {
    for (const auto& [name, _] : values_) {
      if (!used_.contains(name)) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    return absl::OkStatus();
  }
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::map<std::string, std::vector<std::string>> values_;
  mutable std::set<std::string> used_;
  std::vector<std::string> positional_;
};

absl::StatusOr<std::string> ModelPath(const Flags& flags) {
  if (auto m = flags.Get("model")) return *m;
  return FindDefaultModel();
}

// The model, with the digest compressor --digest-compressor names attached (method digest,
// and contexts made by it).
absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& path,
                                                 const std::optional<std::string>& compressor) {
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(path));
  if (compressor) {
    ASSIGN_OR_RETURN(std::unique_ptr<IcFormer> f, IcFormer::Load(*compressor, *model));
    model->AttachDigestCompressor(std::move(f));
  }
  return model;
}

int Threads(const Flags& flags) {
  int n = ThreadPool::HardwareThreads();
  (void)flags.Number("threads", &n);
  return n < 1 ? 1 : n;
}

// --decode full|recycled [--stride S] [--topk K] [--dynamic] [--similarity T]
absl::Status ParseDecodePolicy(const Flags& flags, DecodePolicy* policy) {
  const std::string kind = flags.Get("decode").value_or("full");
  if (kind == "recycled") {
    policy->kind = DecodePolicy::Kind::kRecycled;
  } else if (kind != "full") {
    return absl::InvalidArgumentError(absl::StrCat("--decode '", kind, "': use full or recycled"));
  }
  RETURN_IF_ERROR(flags.Number("stride", &policy->stride));
  RETURN_IF_ERROR(flags.Number("topk", &policy->top_k));
  RETURN_IF_ERROR(flags.Number("similarity", &policy->similarity_threshold));
  policy->dynamic = flags.Bool("dynamic");
  return policy->Validate();
}

absl::Status CmdGenerate(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string path, ModelPath(flags));
  std::string prompt;
  if (auto p = flags.Get("prompt")) {
    prompt = *p;
  } else if (auto f = flags.Get("prompt-file")) {
    ASSIGN_OR_RETURN(prompt, ReadFileOrStdin(*f));
  } else {
    return absl::InvalidArgumentError("generate needs --prompt TEXT or --prompt-file FILE");
  }
  GenerateParams params;
  RETURN_IF_ERROR(flags.Number("max-tokens", &params.max_tokens));
  RETURN_IF_ERROR(flags.Number("temperature", &params.sampling.temperature));
  RETURN_IF_ERROR(flags.Number("top-k", &params.sampling.top_k));
  RETURN_IF_ERROR(flags.Number("top-p", &params.sampling.top_p));
  RETURN_IF_ERROR(flags.Number("min-p", &params.sampling.min_p));
  RETURN_IF_ERROR(flags.Number("repeat-penalty", &params.sampling.repetition_penalty));
  RETURN_IF_ERROR(flags.Number("seed", &params.sampling.seed));
  params.stop = flags.GetAll("stop");
  params.ignore_eos = flags.Bool("ignore-eos");
  RETURN_IF_ERROR(ParseDecodePolicy(flags, &params.decode));
  const bool chat = flags.Bool("chat"), quiet = flags.Bool("quiet");
  const bool no_bos = flags.Bool("no-bos"), raw_template = flags.Bool("raw-template");
  const auto system = flags.Get("system");
  const std::vector<std::string> context_files = flags.GetAll("context");
  double select_ratio = 0;
  RETURN_IF_ERROR(flags.Number("select-ratio", &select_ratio));
  if (flags.Has("select-ratio") && !(select_ratio > 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--select-ratio must be > 1 (8 keeps 1/8 of each head's entries), got ",
                     select_ratio));
  }
  const int threads = Threads(flags);
  const std::optional<std::string> compressor = flags.Get("digest-compressor");
  RETURN_IF_ERROR(flags.CheckAllUsed());
  RETURN_IF_ERROR(ValidateGenerateParams(params));

  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, LoadModel(path, compressor));
  const Tokenizer& tok = model->tokenizer();
  std::vector<int32_t> ids;
  if (chat) {
    const std::string tmpl_text = model->gguf().GetString("tokenizer.chat_template").value_or("");
    ASSIGN_OR_RETURN(ChatTemplate tmpl, DetectChatTemplate(tmpl_text, raw_template));
    std::vector<ChatMessage> messages;
    if (system) messages.push_back({"system", *system});
    messages.push_back({"user", prompt});
    ASSIGN_OR_RETURN(std::string text, ApplyChatTemplate(tmpl, messages, true));
    ids = tok.Encode(text, tok.add_bos_default() && !no_bos, /*parse_special=*/true);
  } else {
    ids = tok.Encode(prompt, tok.add_bos_default() && !no_bos, /*parse_special=*/false);
  }
  ThreadPool pool(threads);
  Runner runner(*model, &pool);
  KvCache cache = model->NewKvCache();
  if (!context_files.empty()) {
    std::vector<CompressedContext> contexts;
    for (const std::string& file : context_files) {
      ASSIGN_OR_RETURN(std::string bytes, ReadContextFile(file));
      auto ctx = DecodeContext(bytes, model->fingerprint());
      if (!ctx.ok()) {
        return absl::Status(ctx.status().code(), absl::StrCat(file, ": ", ctx.status().message()));
      }
      if (select_ratio > 0 && ctx->method != "none") {
        return absl::FailedPreconditionError(absl::StrCat(
            file, " was compressed with ", ctx->method, "; --select-ratio selects from contexts "
            "stored whole: compress the document with --method none"));
      }
      contexts.push_back(*std::move(ctx));
    }
    std::vector<const CompressedContext*> ptrs;
    int64_t kv_bytes = 0, full_bytes = 0;
    for (const CompressedContext& c : contexts) {
      ptrs.push_back(&c);
      kv_bytes += c.KvBytes();
      full_bytes += c.FullKvBytes();
    }
    ASSIGN_OR_RETURN(cache, ComposeContexts(ptrs, runner));
    if (select_ratio > 0) {
      // Prefill once, select per query: keep the entries this prompt attends to.
      const int64_t budget =
          std::max<int64_t>(1, static_cast<int64_t>(std::ceil(cache.MaxEntries() / select_ratio)));
      ASSIGN_OR_RETURN(cache, SelectForQuery(runner, cache, ids, budget));
    }
    if (!quiet) {
      // As the server's Usage: used = the contexts loaded, attended = what decoding reads.
      std::fprintf(stderr,
                   "[%zu context(s): KV %.2f MB used by this request vs %.2f MB full (saved "
                   "%.2f MB), %.2f MB attended%s]\n",
                   contexts.size(), kv_bytes / 1e6, full_bytes / 1e6,
                   (full_bytes - kv_bytes) / 1e6, cache.StoredBytes() / 1e6,
                   select_ratio > 0 ? absl::StrCat(", selected for this prompt at ",
                                                   select_ratio, "x").c_str()
                                    : "");
    }
  } else if (select_ratio > 0) {
    return absl::InvalidArgumentError("--select-ratio selects from --context files: give one");
  }
  ASSIGN_OR_RETURN(GenerateResult r, Generate(runner, cache, ids, params, [](std::string_view d) {
                     std::fwrite(d.data(), 1, d.size(), stdout);
                     std::fflush(stdout);
                     return true;
                   }));
  std::fputc('\n', stdout);
  if (!quiet) {
    const double n_dec = r.tokens.size() > 1 ? r.tokens.size() - 1 : 0;
    std::fprintf(stderr,
                 "\n[%lld prompt tokens in %.3f s (%.1f tok/s), %zu generated, %.1f tok/s decode, "
                 "finish: %s, threads %d]\n",
                 static_cast<long long>(r.prompt_tokens), r.prefill_seconds,
                 r.prompt_tokens / std::max(r.prefill_seconds, 1e-9), r.tokens.size(),
                 n_dec / std::max(r.decode_seconds, 1e-9),
                 std::string(FinishReasonName(r.finish)).c_str(), threads);
    if (params.decode.kind == DecodePolicy::Kind::kRecycled) {
      std::fprintf(stderr, "[recycled attention: %lld full and %lld recycled layer-steps]\n",
                   static_cast<long long>(r.full_attention_steps),
                   static_cast<long long>(r.recycled_attention_steps));
    }
  }
  return absl::OkStatus();
}

absl::Status CmdInfo(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string path, ModelPath(flags));
  RETURN_IF_ERROR(flags.CheckAllUsed());
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(path));
  const ModelConfig& c = model->config();
  const GgufFile& g = model->gguf();
  std::printf("file:          %s\n", path.c_str());
  std::printf("gguf version:  %u, %zu tensors, %zu metadata keys\n", g.version(),
              g.tensors().size(), g.keys().size());
  std::printf("fingerprint:   %s\n", model->fingerprint().c_str());
  std::printf("architecture:  %s (%s)\n", c.arch.c_str(), c.name.c_str());
  std::printf("layers %d, d_model %d, heads %d, kv heads %d, head_dim %d, ffn %d\n", c.n_layers,
              c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff);
  std::printf("vocab %d, context %d, rope base %g scale %g dims %d (%s), rms eps %g\n", c.n_vocab,
              c.n_ctx_train, c.rope_freq_base, c.rope_freq_scale, c.rope_dim,
              c.rope_style == RopeStyle::kNeox ? "neox" : "normal", c.rms_eps);
  std::printf("tied output:   %s, KV bytes/token (fp16): %lld\n", c.tied_output ? "yes" : "no",
              static_cast<long long>(model->KvBytesPerToken(2)));
  std::printf("tokenizer:     %s (pre: %s), bos %d, eos %d, add_bos %s\n",
              model->tokenizer().model_name().c_str(), model->tokenizer().pre_name().c_str(),
              model->tokenizer().bos_id(), model->tokenizer().eos_id(),
              model->tokenizer().add_bos_default() ? "yes" : "no");
  std::printf("cpu:           %s (OpenBLAS kernels: %s)\n\nmetadata:\n",
              GetCpuFeatures().ToString().c_str(), BlasCoreName().c_str());
  for (const std::string& key : g.keys()) {
    std::printf("  %-40s %s\n", key.c_str(), GgufFile::Describe(*g.Find(key)).c_str());
  }
  return absl::OkStatus();
}

absl::Status CmdTokenize(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string path, ModelPath(flags));
  const bool ids_only = flags.Bool("ids-only"), no_bos = flags.Bool("no-bos");
  const bool parse_special = flags.Bool("parse-special");
  RETURN_IF_ERROR(flags.CheckAllUsed());
  if (flags.positional().size() != 1) {
    return absl::InvalidArgumentError("tokenize takes exactly one TEXT argument (or - for stdin)");
  }
  std::string text = flags.positional()[0];
  if (text == "-") {
    ASSIGN_OR_RETURN(text, ReadFileOrStdin("-"));
  }
  // Only the tokenizer metadata is needed, so vocabulary-only GGUF files work too.
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> gguf, GgufFile::Open(path));
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::FromGguf(*gguf));
  const std::vector<int32_t> ids = tok->Encode(text, tok->add_bos_default() && !no_bos, parse_special);
  if (ids_only) {
    std::string line;
    for (size_t i = 0; i < ids.size(); ++i) absl::StrAppend(&line, i ? " " : "", ids[i]);
    std::printf("%s\n", line.c_str());
  } else {
    for (int32_t id : ids) {
      std::string piece = tok->TokenBytes(id);
      std::string shown;
      for (unsigned char ch : piece) {
        if (ch == '\n') shown += "\\n";
        else if (ch == '\t') shown += "\\t";
        else if (ch < 0x20) shown += absl::StrCat("\\x", absl::Hex(ch, absl::kZeroPad2));
        else shown += static_cast<char>(ch);
      }
      std::printf("%6d -> '%s'\n", id, shown.c_str());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<BlobDtype> ParseDtype(const std::string& name) {
  if (name == "fp16") return BlobDtype::kF16;
  if (name == "bf16") return BlobDtype::kBf16;
  if (name == "fp32") return BlobDtype::kF32;
  if (name == "int8") return BlobDtype::kInt8;
  return absl::InvalidArgumentError(absl::StrCat("--dtype '", name, "': use fp16, bf16, fp32 or int8"));
}

absl::Status CmdCompress(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string path, ModelPath(flags));
  CompressionSpec spec;
  spec.method = flags.Get("method").value_or("");
  RETURN_IF_ERROR(flags.Number("ratio", &spec.ratio));
  RETURN_IF_ERROR(flags.Number("budget", &spec.budget));
  RETURN_IF_ERROR(flags.Number("chunk", &spec.chunk));
  spec.per_layer = flags.Bool("per-layer");
  spec.head_budget = flags.Get("head-budget").value_or(spec.head_budget);
  RETURN_IF_ERROR(flags.Number("head-budget-alpha", &spec.head_budget_alpha));
  spec.question = flags.Get("question").value_or("");
  spec.kv_dtype = flags.Get("kv-dtype").value_or("fp16");
  const auto doc_file = flags.Get("doc");
  const auto out = flags.Get("out");
  ASSIGN_OR_RETURN(BlobDtype dtype, ParseDtype(flags.Get("dtype").value_or("fp16")));
  const bool quiet = flags.Bool("quiet"), json = flags.Bool("json");
  const int threads = Threads(flags);
  const std::optional<std::string> compressor = flags.Get("digest-compressor");
  RETURN_IF_ERROR(flags.CheckAllUsed());
  if (!doc_file) return absl::InvalidArgumentError("compress needs --doc FILE (or - for stdin)");
  if (!out) return absl::InvalidArgumentError("compress needs --out FILE");
  if (spec.method.empty()) {
    return absl::InvalidArgumentError(
        "compress needs --method (none, streaming, snapkv, finch, expected_attention, kvzip, "
        "anchor, digest)");
  }
  RETURN_IF_ERROR(spec.Validate());
  ASSIGN_OR_RETURN(std::string doc, ReadFileOrStdin(*doc_file));
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, LoadModel(path, compressor));
  const Tokenizer& tok = model->tokenizer();
  const std::vector<int32_t> ids = tok.Encode(doc, tok.add_bos_default(), /*parse_special=*/false);
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat("document '", *doc_file, "' is empty"));
  if (!quiet) {
    std::fprintf(stderr, "compressing %zu tokens with %s (%s)...\n", ids.size(),
                 spec.method.c_str(), spec.CanonicalParams().c_str());
  }
  ThreadPool pool(threads);
  Runner runner(*model, &pool);
  const auto t0 = std::chrono::steady_clock::now();
  ProgressBar bar;
  CompressProgress progress;
  if (!quiet && !json) {
    progress = [&bar](std::string_view stage, int64_t done, int64_t total) {
      bar.Update(stage, done, total);
    };
  }
  absl::StatusOr<CompressedContext> compressed = Compress(runner, ids, spec, progress);
  bar.Finish();
  ASSIGN_OR_RETURN(CompressedContext ctx, std::move(compressed));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSIGN_OR_RETURN(std::string bytes, EncodeContext(ctx, dtype));
  RETURN_IF_ERROR(WriteContextFile(*out, bytes));
  const int64_t heads = int64_t{ctx.kv.n_layers()} * ctx.kv.n_kv_heads();
  if (json) {
    std::printf("{\"method\":\"%s\",\"source_tokens\":%lld,\"kept_entries\":%lld,"
                "\"full_entries\":%lld,\"kv_bytes\":%lld,\"full_kv_bytes\":%lld,"
                "\"bytes_ratio\":%.4f,\"kv_dtype\":\"%s\",\"file_bytes\":%zu,"
                "\"seconds\":%.6f}\n",
                spec.method.c_str(), static_cast<long long>(ctx.source_tokens),
                static_cast<long long>(ctx.KeptEntries()), static_cast<long long>(ctx.FullEntries()),
                static_cast<long long>(ctx.KvBytes()), static_cast<long long>(ctx.FullKvBytes()),
                ctx.BytesRatio(), spec.kv_dtype.c_str(), bytes.size(), seconds);
    return absl::OkStatus();
  }
  cli::PrintContextSummary(ctx.source_tokens, double(ctx.KeptEntries()) / heads, ctx.KeptEntries(),
                           ctx.FullEntries(), ctx.FullKvBytes(), ctx.KvBytes(), spec.kv_dtype);
  if (ctx.kind == ContextKind::kDigest) {
    std::printf("digest:            %lld vectors of %d values (the model reads them in place of "
                "the document; kept per head counts the entries they occupy then)\n",
                static_cast<long long>(ctx.digest_tokens), model->config().d_model);
  }
  std::printf("file:              %s (%zu bytes, %s)\n"
              "time:              %.2f s\n",
              out->c_str(), bytes.size(),
              ctx.kv.StoredDtype() == KvDtype::kF16 ? BlobDtypeName(dtype)
                                                    : KvDtypeName(ctx.kv.StoredDtype()),
              seconds);
  return absl::OkStatus();
}

// bench --compare-decode: from one prefilled cache, n_gen greedy decode steps with full
// attention and with the recycled policy, alternating (full first), `repeat` times each, each
// run on its own copy of the cache. Pairs measured back to back share the machine's state, so
// the median of the per-pair ratios is steadier than two separate runs' tok/s.
absl::Status CompareDecode(const Model& model, Runner& runner, const KvCache& prefilled,
                           int32_t first, int n_gen, int repeat, const DecodePolicy& policy,
                           int threads, bool json) {
  using Clock = std::chrono::steady_clock;
  const ModelConfig& c = model.config();
  std::vector<double> full_tps, recycled_tps, ratios;
  std::vector<float> logits;
  for (int r = 0; r < repeat; ++r) {
    for (const bool use_recycled : {false, true}) {
      KvCache cache = prefilled;
      std::unique_ptr<RecycledAttentionState> state;
      if (use_recycled) {
        state = std::make_unique<RecycledAttentionState>(policy, c.n_layers, c.n_kv_heads,
                                                         c.n_heads, c.head_dim);
      }
      int32_t next = first;
      const auto t0 = Clock::now();
      for (int i = 0; i < n_gen; ++i) {
        RETURN_IF_ERROR(runner.Decode(next, cache, &logits, state.get()));
        next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) -
                                    logits.begin());
      }
      const double tps = n_gen / std::chrono::duration<double>(Clock::now() - t0).count();
      (use_recycled ? recycled_tps : full_tps).push_back(tps);
    }
    ratios.push_back(recycled_tps.back() / full_tps.back());
    if (!json) {
      std::printf("pair %d: full %.2f tok/s, recycled %.2f tok/s, %.3fx\n", r + 1,
                  full_tps.back(), recycled_tps.back(), ratios.back());
      std::fflush(stdout);
    }
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t m = v.size() / 2;
    return v.size() % 2 == 1 ? v[m] : (v[m - 1] + v[m]) / 2;
  };
  auto list = [](const std::vector<double>& v) {
    std::string out;
    for (double x : v) absl::StrAppend(&out, out.empty() ? "" : ",", absl::StrFormat("%.3f", x));
    return out;
  };
  const int64_t n_prompt = prefilled.head(0, 0).n();
  if (json) {
    std::printf(
        "{\"n_prompt\":%lld,\"n_gen\":%d,\"threads\":%d,\"stride\":%d,\"top_k\":%lld,"
        "\"full_tok_s\":[%s],\"recycled_tok_s\":[%s],\"speedup\":[%s],"
        "\"speedup_median\":%.4f,\"cpu\":\"%s\"}\n",
        static_cast<long long>(n_prompt), n_gen, threads, policy.stride,
        static_cast<long long>(policy.top_k), list(full_tps).c_str(), list(recycled_tps).c_str(),
        list(ratios).c_str(), median(ratios), GetCpuFeatures().ToString().c_str());
  } else {
    const std::string top_k = policy.top_k > 0 ? absl::StrCat(policy.top_k) : "1/8 of keys";
    std::printf("decode %d tokens after %lld: full %.2f tok/s, recycled (stride %d, top-K %s) "
                "%.2f tok/s (medians); speed-up %.3fx (median of %d pairs)\n",
                n_gen, static_cast<long long>(n_prompt), median(full_tps), policy.stride,
                top_k.c_str(), median(recycled_tps), median(ratios), repeat);
  }
  return absl::OkStatus();
}

absl::Status CmdBench(const Flags& flags) {
  ASSIGN_OR_RETURN(std::string path, ModelPath(flags));
  int n_prompt = 512, n_gen = 64;
  RETURN_IF_ERROR(flags.Number("n-prompt", &n_prompt));
  RETURN_IF_ERROR(flags.Number("n-gen", &n_gen));
  // --observe R: the prefill also reports the attention of its last R rows to an observer
  // that sums it per key, as the prompt-guided scorers do (the cost of score extraction).
  int observe = 0;
  RETURN_IF_ERROR(flags.Number("observe", &observe));
  DecodePolicy policy;
  RETURN_IF_ERROR(ParseDecodePolicy(flags, &policy));
  const bool json = flags.Bool("json");
  const bool compare = flags.Bool("compare-decode");
  int repeat = 3;
  RETURN_IF_ERROR(flags.Number("repeat", &repeat));
  const int threads = Threads(flags);
  RETURN_IF_ERROR(flags.CheckAllUsed());
  if (n_prompt < 1 || n_gen < 0) return absl::InvalidArgumentError("need --n-prompt >= 1, --n-gen >= 0");
  if (compare && (n_gen < 1 || repeat < 1 || repeat > 100)) {
    return absl::InvalidArgumentError("--compare-decode needs --n-gen >= 1 and 1 <= --repeat <= 100");
  }
  if (compare) policy.kind = DecodePolicy::Kind::kRecycled;
  if (observe < 0 || observe > n_prompt) {
    return absl::InvalidArgumentError("--observe needs 0 <= ROWS <= --n-prompt");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(path));
  if (n_prompt + n_gen > model->config().n_ctx_train) {
    return absl::InvalidArgumentError("n-prompt + n-gen exceeds the model's context window");
  }
  ThreadPool pool(threads);
  Runner runner(*model, &pool);
  KvCache cache = model->NewKvCache();
  // Token content does not change the work done; a fixed spread of ordinary ids.
  std::vector<int32_t> ids(n_prompt);
  for (int i = 0; i < n_prompt; ++i) ids[i] = 1000 + (i * 37) % (model->config().n_vocab - 1000);
  std::vector<float> logits;
  // Warm-up: touch the weights and scratch once, as llama-bench does.
  {
    KvCache warm = model->NewKvCache();
    RETURN_IF_ERROR(runner.Forward(absl::MakeConstSpan(ids.data(), std::min(n_prompt, 16)), warm,
                                   ForwardOptions{}, &logits));
  }
  ForwardOptions prefill_options;
  std::vector<std::vector<float>> key_scores(model->config().n_layers);
  if (observe > 0) {
    for (int r = n_prompt - observe; r < n_prompt; ++r) prefill_options.observe_rows.push_back(r);
    const int n_heads = model->config().n_heads;
    prefill_options.observer = [&](int layer, const float* probs, int n_rows, int64_t n_keys) {
      std::vector<float>& acc = key_scores[layer];
      acc.assign(n_keys, 0.f);
      for (int64_t hr = 0; hr < int64_t{n_heads} * n_rows; ++hr) {
        const float* row = probs + hr * n_keys;
        for (int64_t j = 0; j < n_keys; ++j) acc[j] += row[j];
      }
    };
  }
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  RETURN_IF_ERROR(runner.Forward(ids, cache, prefill_options, &logits));
  const auto t1 = Clock::now();
  int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  if (compare) {
    return CompareDecode(*model, runner, cache, next, n_gen, repeat, policy, threads, json);
  }
  std::unique_ptr<RecycledAttentionState> recycled;
  if (policy.kind == DecodePolicy::Kind::kRecycled) {
    const ModelConfig& c = model->config();
    recycled = std::make_unique<RecycledAttentionState>(policy, c.n_layers, c.n_kv_heads,
                                                        c.n_heads, c.head_dim);
  }
  for (int i = 0; i < n_gen; ++i) {
    RETURN_IF_ERROR(runner.Decode(next, cache, &logits, recycled.get()));
    next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  const auto t2 = Clock::now();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  const double pp = n_prompt / prefill_s, tg = n_gen > 0 ? n_gen / decode_s : 0;
  if (json) {
    std::printf(
        "{\"n_prompt\":%d,\"n_gen\":%d,\"threads\":%d,\"prefill_s\":%.6f,\"prefill_tok_s\":%.3f,"
        "\"decode_s\":%.6f,\"decode_tok_s\":%.3f,\"observe\":%d,\"cpu\":\"%s\",\"blas\":\"%s\"}\n",
        n_prompt, n_gen, threads, prefill_s, pp, decode_s, tg, observe,
        GetCpuFeatures().ToString().c_str(), BlasCoreName().c_str());
  } else {
    std::printf("prefill %d tokens: %.3f s (%.1f tok/s); decode %d tokens: %.3f s (%.1f tok/s); "
                "threads %d, cpu %s\n",
                n_prompt, prefill_s, pp, n_gen, decode_s, tg, threads,
                GetCpuFeatures().ToString().c_str());
  }
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
      std::string(argv[1]) == "help") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  Flags flags;
  absl::Status s =
      flags.Parse(argc, argv, 2,
                  {"chat", "raw-template", "ignore-eos", "no-bos", "quiet", "ids-only",
                   "parse-special", "json", "dynamic", "per-layer", "compare-decode", "tls"});
  if (s.ok()) {
    if (flags.Has("server")) {
      s = cli::RunRemote(cmd, cli::FlagSource{
                                  [&](const std::string& n) { return flags.Get(n); },
                                  [&](const std::string& n) { return flags.GetAll(n); },
                                  [&](const std::string& n) { return flags.Has(n); },
                                  [&] { return flags.CheckAllUsed(); }});
    } else if (cmd == "generate") s = CmdGenerate(flags);
    else if (cmd == "info") s = CmdInfo(flags);
    else if (cmd == "tokenize") s = CmdTokenize(flags);
    else if (cmd == "bench") s = CmdBench(flags);
    else if (cmd == "compress") s = CmdCompress(flags);
    else s = absl::InvalidArgumentError(absl::StrCat("unknown command '", cmd, "' (see ctxcache --help)"));
  }
  if (!s.ok()) {
    std::fprintf(stderr, "ctxcache %s: %s\n", cmd.c_str(), std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument && s.message().find("flag") != absl::string_view::npos ? 2 : 1;
  }
  return 0;
}

}  // namespace
}  // namespace ctxcache

int main(int argc, char** argv) {
  ctxcache::UseBestBlasKernels(argv);  // may re-execute (engine/cpu/blas_kernels.h)
  return ctxcache::Main(argc, argv);
}
