// Model loading: GGUF metadata -> ModelConfig, tensor lookup and shape validation, tokenizer,
// fingerprint. The forward pass lives in runner.cc.
#include "engine/model.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/sha256.h"
#include "common/status.h"
#include "engine/cpu/quant.h"
#include "engine/icformer.h"

namespace ctxcache {
namespace {

std::string Key(const std::string& arch, const char* suffix) { return absl::StrCat(arch, ".", suffix); }

std::string DimsString(const std::vector<int64_t>& d) { return absl::StrCat("[", absl::StrJoin(d, ", "), "]"); }

absl::StatusOr<const GgufTensorInfo*> FindTensor(const GgufFile& g, const std::string& name,
                                                 const std::vector<int64_t>& dims) {
  const GgufTensorInfo* t = g.FindTensor(name);
  if (t == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("missing tensor '", name, "'"));
  }
  if (t->dims != dims) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape ",
                                                   DimsString(t->dims), ", expected ",
                                                   DimsString(dims)));
  }
  if (!GetGgmlTypeTraits(t->type).supported) {
    return absl::UnimplementedError(absl::StrCat(
        "tensor '", name, "' (shape ", DimsString(t->dims), ") has type ",
        std::string(GetGgmlTypeTraits(t->type).name),
        ", which this engine cannot compute (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
        "Q8_0, Q4_K, Q5_K, Q6_K); re-quantize the model to one of those, e.g. Q4_K_M"));
  }
  return t;
}

}  // namespace

absl::StatusOr<WeightMatrix> GgufMatrix(const GgufFile& g, const std::string& name, int64_t n_in,
                                        int64_t n_out) {
  ASSIGN_OR_RETURN(const GgufTensorInfo* t, FindTensor(g, name, {n_in, n_out}));
  WeightMatrix w;
  w.type = t->type;
  w.data = t->data;
  w.n_in = n_in;
  w.n_out = n_out;
  w.row_bytes = t->n_bytes / n_out;
  // The reader already refused partial blocks; this also checks the row size against the type.
  if (absl::Status s = ValidateWeightMatrix(w); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "' (", std::string(GetGgmlTypeTraits(t->type).name), ", shape ",
        DimsString(t->dims), "): ", s.message()));
  }
  return w;
}

absl::StatusOr<std::vector<float>> GgufVector(const GgufFile& g, const std::string& name,
                                              int64_t n) {
  ASSIGN_OR_RETURN(const GgufTensorInfo* t, FindTensor(g, name, {n}));
  std::vector<float> v(n);
  RETURN_IF_ERROR(DequantizeRow(t->type, t->data, v.data(), n));
  return v;
}

absl::StatusOr<int> GgufPositiveInt(const GgufFile& g, const std::string& key) {
  ASSIGN_OR_RETURN(int64_t v, g.GetInt(key));
  if (v <= 0 || v > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", key, " = ", v,
                                                   " is out of range"));
  }
  return static_cast<int>(v);
}

namespace {

absl::StatusOr<ModelConfig> ReadConfig(const GgufFile& g) {
  ModelConfig c;
  ASSIGN_OR_RETURN(c.arch, g.GetString("general.architecture"));
  if (c.arch != "llama" && c.arch != "qwen2") {
    return absl::UnimplementedError(absl::StrCat(
        "model architecture '", c.arch, "' is not supported (supported: llama, qwen2)"));
  }
  c.name = g.GetString("general.name").value_or(c.arch);
  const std::string& a = c.arch;
  ASSIGN_OR_RETURN(c.n_layers, GgufPositiveInt(g, Key(a, "block_count")));
  ASSIGN_OR_RETURN(c.d_model, GgufPositiveInt(g, Key(a, "embedding_length")));
  ASSIGN_OR_RETURN(c.n_heads, GgufPositiveInt(g, Key(a, "attention.head_count")));
  c.n_kv_heads = c.n_heads;
  if (g.Has(Key(a, "attention.head_count_kv"))) {
    ASSIGN_OR_RETURN(c.n_kv_heads, GgufPositiveInt(g, Key(a, "attention.head_count_kv")));
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head_count ", c.n_heads,
                                                   " is not a multiple of head_count_kv ",
                                                   c.n_kv_heads));
  }
  c.head_dim = c.d_model / c.n_heads;
  if (g.Has(Key(a, "attention.key_length"))) {
    ASSIGN_OR_RETURN(c.head_dim, GgufPositiveInt(g, Key(a, "attention.key_length")));
  }
  ASSIGN_OR_RETURN(c.d_ff, GgufPositiveInt(g, Key(a, "feed_forward_length")));
  ASSIGN_OR_RETURN(c.n_ctx_train, GgufPositiveInt(g, Key(a, "context_length")));
  ASSIGN_OR_RETURN(double eps, g.GetFloat(Key(a, "attention.layer_norm_rms_epsilon")));
  c.rms_eps = static_cast<float>(eps);
  if (g.Has(Key(a, "rope.freq_base"))) {
    ASSIGN_OR_RETURN(double base, g.GetFloat(Key(a, "rope.freq_base")));
    c.rope_freq_base = static_cast<float>(base);
  }
  c.rope_dim = c.head_dim;
  if (g.Has(Key(a, "rope.dimension_count"))) {
    ASSIGN_OR_RETURN(c.rope_dim, GgufPositiveInt(g, Key(a, "rope.dimension_count")));
  }
  if (c.rope_dim > c.head_dim || c.rope_dim % 2 != 0 || c.rope_dim > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("rope.dimension_count ", c.rope_dim,
                                                   " does not fit head_dim ", c.head_dim));
  }
  const std::string scaling = g.GetString(Key(a, "rope.scaling.type")).value_or("none");
  if (scaling == "linear") {
    ASSIGN_OR_RETURN(double factor, g.GetFloat(Key(a, "rope.scaling.factor")));
    if (factor <= 0) return absl::InvalidArgumentError("rope.scaling.factor must be positive");
    c.rope_freq_scale = static_cast<float>(1.0 / factor);
  } else if (scaling != "none") {
    return absl::UnimplementedError(absl::StrCat("RoPE scaling '", scaling,
                                                 "' is not supported (supported: none, linear)"));
  }
  c.rope_style = a == "qwen2" ? RopeStyle::kNeox : RopeStyle::kNormal;
  c.qkv_bias = a == "qwen2";
  return c;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  ASSIGN_OR_RETURN(m->gguf_, GgufFile::Open(path));
  const GgufFile& g = *m->gguf_;
  auto with_path = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  };
  auto config = ReadConfig(g);
  if (!config.ok()) return with_path(config.status());
  m->config_ = *std::move(config);
  ModelConfig& c = m->config_;

  const GgufTensorInfo* embd = g.FindTensor("token_embd.weight");
  if (embd == nullptr || embd->dims.size() != 2 || embd->dims[0] != c.d_model) {
    return with_path(absl::InvalidArgumentError(
        "model is missing token_embd.weight of shape [embedding_length, n_vocab]"));
  }
  c.n_vocab = static_cast<int>(embd->dims[1]);
  auto load = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(m->token_embd_, GgufMatrix(g, "token_embd.weight", c.d_model, c.n_vocab));
    ASSIGN_OR_RETURN(m->output_norm_, GgufVector(g, "output_norm.weight", c.d_model));
    c.tied_output = g.FindTensor("output.weight") == nullptr;
    if (c.tied_output) {
      m->output_ = m->token_embd_;
    } else {
      ASSIGN_OR_RETURN(m->output_, GgufMatrix(g, "output.weight", c.d_model, c.n_vocab));
    }
    const int64_t d = c.d_model, dq = int64_t{c.n_heads} * c.head_dim,
                  dkv = int64_t{c.n_kv_heads} * c.head_dim;
    m->layers_.resize(c.n_layers);
    m->norms_.resize(2 * c.n_layers);
    for (int i = 0; i < c.n_layers; ++i) {
      LayerWeights& L = m->layers_[i];
      const std::string p = absl::StrCat("blk.", i, ".");
      ASSIGN_OR_RETURN(m->norms_[2 * i], GgufVector(g, p + "attn_norm.weight", d));
      ASSIGN_OR_RETURN(m->norms_[2 * i + 1], GgufVector(g, p + "ffn_norm.weight", d));
      L.attn_norm = m->norms_[2 * i].data();
      L.ffn_norm = m->norms_[2 * i + 1].data();
      ASSIGN_OR_RETURN(L.wq, GgufMatrix(g, p + "attn_q.weight", d, dq));
      ASSIGN_OR_RETURN(L.wk, GgufMatrix(g, p + "attn_k.weight", d, dkv));
      ASSIGN_OR_RETURN(L.wv, GgufMatrix(g, p + "attn_v.weight", d, dkv));
      ASSIGN_OR_RETURN(L.wo, GgufMatrix(g, p + "attn_output.weight", dq, d));
      ASSIGN_OR_RETURN(L.w_gate, GgufMatrix(g, p + "ffn_gate.weight", d, c.d_ff));
      ASSIGN_OR_RETURN(L.w_up, GgufMatrix(g, p + "ffn_up.weight", d, c.d_ff));
      ASSIGN_OR_RETURN(L.w_down, GgufMatrix(g, p + "ffn_down.weight", c.d_ff, d));
      if (c.qkv_bias) {
        ASSIGN_OR_RETURN(L.bq, GgufVector(g, p + "attn_q.bias", dq));
        ASSIGN_OR_RETURN(L.bk, GgufVector(g, p + "attn_k.bias", dkv));
        ASSIGN_OR_RETURN(L.bv, GgufVector(g, p + "attn_v.bias", dkv));
      }
    }
    return absl::OkStatus();
  };
  if (absl::Status s = load(); !s.ok()) return with_path(s);

  auto tokenizer = Tokenizer::FromGguf(g);
  if (!tokenizer.ok()) return with_path(tokenizer.status());
  m->tokenizer_ = *std::move(tokenizer);
  if (m->tokenizer_->n_vocab() != c.n_vocab) {
    return with_path(absl::InvalidArgumentError(absl::StrCat(
        "tokenizer has ", m->tokenizer_->n_vocab(), " tokens but the embedding has ", c.n_vocab)));
  }

  m->fingerprint_ = Fingerprint(g, c);
  return m;
}

std::string Fingerprint(const GgufFile& g, const ModelConfig& c) {
  // Everything that changes what the forward pass computes, so that no other model (a
  // requantized copy, a changed vocabulary, or the same tensors under other hyper-parameters,
  // e.g. another rope.freq_base) ever reuses this one's cache entries:
  //  * tensor names, shapes, types and bytes;
  //  * the tokenizer metadata;
  //  * the configuration the engine derived and computes with (ModelConfig: every field the
  //    forward pass, RoPE and the window checks read, floats as their exact bits), so that a
  //    default the engine fills in for a missing key counts as well;
  //  * every "<arch>." metadata key as stored, so that a key the engine starts reading later
  //    is covered without anyone remembering to add it here (general.* stays out: a renamed
  //    copy computes the same thing).
  // v2: v1 left out the hyper-parameters (issue 14: a copy with rope.freq_base changed
  // shared the original's fingerprint and was served its cached contexts).
  Sha256 h;
  h.UpdateField("ctxcache-model-fingerprint-v2");
  for (const GgufTensorInfo& t : g.tensors()) {
    h.UpdateField(t.name);
    h.UpdateField(DimsString(t.dims));
    h.UpdateField(std::to_string(static_cast<uint32_t>(t.type)));
    h.Update(t.data, t.n_bytes);
  }
  for (const std::string& key : g.keys()) {
    if (key.rfind("tokenizer.", 0) == 0) {
      h.UpdateField(key);
      h.UpdateField(GgufFile::Describe(*g.Find(key), SIZE_MAX));
    }
  }
  h.UpdateField("config");
  h.UpdateField(ConfigFingerprintText(c));
  h.UpdateField("metadata");
  const std::string arch_prefix = c.arch + ".";
  for (const std::string& key : g.keys()) {
    if (key.rfind(arch_prefix, 0) == 0) {
      h.UpdateField(key);
      h.UpdateField(GgufFile::Describe(*g.Find(key), SIZE_MAX));
    }
  }
  return h.FinalHex();
}

std::string ConfigFingerprintText(const ModelConfig& c) {
  // Floats as the hex of their bits: exact, where a decimal print could round two apart.
  auto bits = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return absl::StrFormat("%08x", u);
  };
  return absl::StrCat("arch=", c.arch, ";n_layers=", c.n_layers, ";d_model=", c.d_model,
                      ";n_heads=", c.n_heads, ";n_kv_heads=", c.n_kv_heads,
                      ";head_dim=", c.head_dim, ";d_ff=", c.d_ff, ";n_vocab=", c.n_vocab,
                      ";n_ctx_train=", c.n_ctx_train, ";rms_eps=", bits(c.rms_eps),
                      ";rope_freq_base=", bits(c.rope_freq_base),
                      ";rope_freq_scale=", bits(c.rope_freq_scale), ";rope_dim=", c.rope_dim,
                      ";rope_style=", static_cast<int>(c.rope_style),
                      ";qkv_bias=", c.qkv_bias ? 1 : 0, ";tied_output=", c.tied_output ? 1 : 0);
}

RopeParams RopeParamsFor(const ModelConfig& c) {
  RopeParams p;
  p.head_dim = c.head_dim;
  p.rope_dim = c.rope_dim;
  p.freq_base = c.rope_freq_base;
  p.freq_scale = c.rope_freq_scale;
  p.neox = c.rope_style == RopeStyle::kNeox;
  return p;
}

absl::StatusOr<std::string> FindDefaultModel() {
  constexpr const char* kFile = kDefaultModelFile;
  if (const char* env = std::getenv("CTXCACHE_MODEL"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  std::vector<std::string> candidates = {absl::StrCat("models/", kFile)};
#ifdef CTXCACHE_SOURCE_DIR
  candidates.push_back(absl::StrCat(CTXCACHE_SOURCE_DIR, "/models/", kFile));
#endif
  // Next to the executable's tree (build/server/ctxcache -> models/).
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    std::string dir(exe, n);
    for (int up = 0; up < 4; ++up) {
      dir = dir.substr(0, dir.find_last_of('/'));
      if (dir.empty()) break;
      candidates.push_back(absl::StrCat(dir, "/models/", kFile));
    }
  }
  for (const std::string& c : candidates) {
    struct stat st;
    if (stat(c.c_str(), &st) == 0 && S_ISREG(st.st_mode)) return c;
  }
  return absl::NotFoundError(absl::StrCat(
      "default model ", kFile, " not found (looked in ", absl::StrJoin(candidates, ", "),
      "); run tools/fetch_model.sh, or pass --model PATH / set CTXCACHE_MODEL"));
}

void Model::AttachDigestCompressor(std::unique_ptr<IcFormer> compressor) {
  digest_compressor_ = std::move(compressor);
}

}  // namespace ctxcache
