// Tokenizers built from GGUF metadata, reproducing llama.cpp's llama-vocab.cpp token for token:
//  - vocabulary loading: token attributes, the text-based fixes llama.cpp applies (EOG tokens
//    forced to control, phi-3's rstrip), special/EOG ids, add_bos / add_space_prefix defaults;
//  - special-token partitioning (tokenizer_st_partition): control and unknown tokens are
//    matched in text only with parse_special; user-defined tokens are matched always, as
//    HF tokenizers and llama.cpp do;
//  - byte-level BPE ("gpt2") over the pre-tokenizer words (engine/unicode.h), merging by rank;
//  - SentencePiece BPE ("llama") merging by score, with "▁" spaces and <0xNN> byte fallback;
//  - decoding, and the streaming IncrementalDecoder.
//
// Deviations from llama.cpp (all on input llama.cpp rejects or mishandles): invalid metadata is
// an InvalidArgument instead of an exception or assert; a byte with neither a <0xNN> nor a
// single-byte token becomes the unknown token (llama.cpp throws); Decode applies no
// clean_up_tokenization_spaces, so that it stays the plain concatenation the header promises.
#include "engine/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <queue>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/status.h"
#include "engine/unicode.h"

namespace ctxcache {
namespace {

// llama.cpp's llama_token_attr bits.
enum TokenAttr : uint32_t {
  kAttrUnknown = 1 << 0,
  kAttrUnused = 1 << 1,
  kAttrNormal = 1 << 2,
  kAttrControl = 1 << 3,
  kAttrUserDefined = 1 << 4,
  kAttrByte = 1 << 5,
  kAttrLstrip = 1 << 7,
  kAttrRstrip = 1 << 8,
};

// GGUF tokenizer.ggml.token_type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
// 6 byte) to attributes; anything else is "undefined" (no bits).
uint32_t AttrFromType(int64_t type) {
  static constexpr uint32_t kAttrs[] = {
      0, kAttrNormal, kAttrUnknown, kAttrControl, kAttrUserDefined, kAttrUnused, kAttrByte};
  return type >= 0 && type < 7 ? kAttrs[type] : 0;
}

constexpr absl::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581 "▁"

// clang-format off
// Token texts llama.cpp treats as end of generation (and forces to control type).
constexpr std::string_view kEogTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]",
    "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>", "[e~["};
// Fill-in-the-middle markers llama.cpp forces to control type; the pad/repo/file-separator
// ones also end generation.
constexpr std::string_view kFimTexts[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "\xE2\x96\x81<PRE>",
    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>",
    "\xE2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>", "<fim-middle>",
    "<fim_middle>", "<MID>", "\xE2\x96\x81<MID>", "<|code_middle|>", "<|middle|>",
    "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "begin\xEF\xBD\x9C>",
    "<\xEF\xBD\x9C" "fim\xE2\x96\x81hole\xEF\xBD\x9C>",
    "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "end\xEF\xBD\x9C>"};
constexpr std::string_view kFimEogTexts[] = {
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"};
// clang-format on

// One piece of the input after special-token partitioning: raw text, or a special token.
struct Fragment {
  int32_t token = -1;             // >= 0: a special token
  size_t offset = 0, length = 0;  // raw text: a range of the input
};

// Vocabulary and special-token handling shared by both models.
class VocabTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool add_bos,
                              bool parse_special) const override;
  std::vector<int32_t> EncodeWithLiterals(std::string_view text, bool add_bos,
                                          absl::Span<const Span> literal) const override;

  absl::Status LoadVocab(const GgufFile& gguf, bool spm);

 protected:
  // Appends the tokens of one raw-text fragment. `after_special`: the fragment starts the
  // input or follows a special token (SPM adds its space prefix there).
  virtual void EncodeText(std::string_view text, bool after_special,
                          std::vector<int32_t>* out) const = 0;

  // Abseil here predates absl::string_view == std::string_view, hence the conversion.
  int32_t Lookup(std::string_view text) const {
    auto it = token_to_id_.find(absl::string_view(text.data(), text.size()));
    return it == token_to_id_.end() ? -1 : it->second;
  }

  bool parse_special_default_ = false;
  int32_t unk_id_ = -1;

 private:
  // `literal`: ranges where control/unknown tokens are not matched even with parse_special.
  std::vector<Fragment> Partition(std::string_view text, bool parse_special,
                                  absl::Span<const Span> literal = {}) const;
  std::vector<int32_t> EncodeFragments(std::string_view text, bool add_bos,
                                       const std::vector<Fragment>& frags) const;
  // Special, user-defined and unknown tokens, longest text first: the order
  // tokenizer_st_partition tries them in.
  std::vector<int32_t> special_tokens_;
};

// Applies llama.cpp's attribute fixes and builds the special-token list and EOG set.
absl::Status VocabTokenizer::LoadVocab(const GgufFile& gguf, bool spm) {
  ASSIGN_OR_RETURN(const std::vector<std::string>* tokens,
                   gguf.GetStringArray("tokenizer.ggml.tokens"));
  const size_t n = tokens->size();
  if (n == 0) return absl::InvalidArgumentError("tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("tokenizer.ggml.tokens has too many entries");
  }
  pieces_.resize(n);
  token_types_.assign(n, 1);  // normal, when the file has no token_type
  attrs_.assign(n, kAttrNormal);
  token_to_id_.reserve(n);
  if (gguf.Has("tokenizer.ggml.token_type")) {
    ASSIGN_OR_RETURN(const std::vector<int64_t>* types,
                     gguf.GetIntArray("tokenizer.ggml.token_type"));
    if (types->size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type has ",
                                                     types->size(), " entries for ", n, " tokens"));
    }
    for (size_t i = 0; i < n; ++i) {
      token_types_[i] = static_cast<int32_t>((*types)[i]);
      attrs_[i] = AttrFromType((*types)[i]);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    // llama.cpp renames empty tokens rather than failing.
    pieces_[i] = (*tokens)[i].empty() ? absl::StrCat("[EMPTY_", i, "]") : (*tokens)[i];
    if (!token_to_id_.emplace(pieces_[i], static_cast<int32_t>(i)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.ggml.tokens: token ", i, " repeats the text of token ",
                       token_to_id_[pieces_[i]], " ('", absl::CHexEscape(pieces_[i]), "')"));
    }
  }

  // Special ids: model defaults, then metadata when in range (llama.cpp ignores bad ones).
  bos_id_ = spm ? 1 : 11;
  eos_id_ = spm ? 2 : 11;
  unk_id_ = spm ? 0 : -1;
  auto read_id = [&](std::string_view key, int32_t* id) {
    auto v = gguf.GetInt(key);
    if (v.ok() && *v >= 0 && *v < static_cast<int64_t>(n)) *id = static_cast<int32_t>(*v);
  };
  read_id("tokenizer.ggml.bos_token_id", &bos_id_);
  read_id("tokenizer.ggml.eos_token_id", &eos_id_);
  read_id("tokenizer.ggml.unknown_token_id", &unk_id_);
  int32_t eot_id = -1, eom_id = -1;
  read_id("tokenizer.ggml.eot_token_id", &eot_id);
  read_id("tokenizer.ggml.eom_token_id", &eom_id);
  if (gguf.Has("tokenizer.ggml.add_bos_token")) {
    ASSIGN_OR_RETURN(add_bos_, gguf.GetBool("tokenizer.ggml.add_bos_token"));
  }
  if (gguf.Has("tokenizer.ggml.add_space_prefix")) {
    ASSIGN_OR_RETURN(add_space_prefix_, gguf.GetBool("tokenizer.ggml.add_space_prefix"));
  }

  // Text-based fixes: these tokens are control even when the file says otherwise, so that
  // they are not matched without parse_special and are hidden by Decode(skip_special).
  absl::flat_hash_set<int32_t> eog;
  auto force_control = [&](std::string_view text, bool is_eog) {
    const int32_t id = Lookup(text);
    if (id < 0) return;
    attrs_[id] |= kAttrControl;
    if (is_eog) eog.insert(id);
  };
  for (std::string_view t : kEogTexts) force_control(t, true);
  for (std::string_view t : kFimTexts) force_control(t, false);
  for (std::string_view t : kFimEogTexts) force_control(t, true);
  // gpt-oss's channel markers are rendered and matched like user-defined tokens.
  for (std::string_view t : {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}) {
    if (int32_t id = Lookup(t); id >= 0) attrs_[id] = kAttrUserDefined;
  }
  for (int32_t id : {eos_id_, eot_id, eom_id}) {
    if (id >= 0) eog.insert(id);
  }
  end_of_generation_ids_.assign(eog.begin(), eog.end());
  std::sort(end_of_generation_ids_.begin(), end_of_generation_ids_.end());

  for (size_t i = 0; i < n; ++i) {
    if (attrs_[i] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) {
      special_tokens_.push_back(static_cast<int32_t>(i));
    }
  }
  std::stable_sort(special_tokens_.begin(), special_tokens_.end(),
                   [&](int32_t a, int32_t b) { return pieces_[a].size() > pieces_[b].size(); });

  // Per-model strip attributes, keyed by name as llama.cpp does (GGUF has no field for them).
  std::string name = absl::AsciiStrToLower(gguf.GetString("general.name").value_or(""));
  const std::string arch = gguf.GetString("general.architecture").value_or("");
  auto set_attr = [&](std::string_view text, uint32_t attr, bool on) {
    if (int32_t id = Lookup(text); id >= 0)
      attrs_[id] = on ? attrs_[id] | attr : attrs_[id] & ~attr;
  };
  if (absl::StrContains(pre_, "jina-v2-") || absl::StrContains(arch, "nomic-bert-moe") ||
      absl::StrContains(arch, "jina-bert-v3")) {
    set_attr("<mask>", kAttrLstrip, true);
  } else if (absl::StrContains(name, "phi-3") || absl::StrContains(name, "phi3")) {
    // Phi-3's added tokens swallow the whitespace after them.
    for (int32_t id : special_tokens_) attrs_[id] |= kAttrRstrip;
    set_attr("</s>", kAttrRstrip, true);
    for (std::string_view t : {"<unk>", "<s>", "<|endoftext|>"}) set_attr(t, kAttrRstrip, false);
  } else if (absl::StrContains(name, "modern-bert")) {
    set_attr("[MASK]", kAttrLstrip, true);
  }
  return absl::OkStatus();
}

// tokenizer_st_partition: for each special token in turn (longest first), split every raw
// text fragment at its occurrences, left to right.
std::vector<Fragment> VocabTokenizer::Partition(std::string_view text, bool parse_special,
                                                absl::Span<const Span> literal) const {
  std::vector<Fragment> frags;
  if (text.empty()) return frags;
  frags.push_back({-1, 0, text.size()});
  std::vector<Fragment> next;
  auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  for (const int32_t id : special_tokens_) {
    const uint32_t attr = attrs_[id];
    const bool needs_parse_special = (attr & (kAttrControl | kAttrUnknown)) != 0;
    if (!parse_special && needs_parse_special) continue;
    const std::string& piece = pieces_[id];
    // A match of a token that needs parse_special may not overlap a literal range (sorted,
    // disjoint: the first range ending after `at` is the only candidate).
    auto in_literal = [&](size_t at) {
      if (!needs_parse_special) return false;
      auto it = std::upper_bound(literal.begin(), literal.end(), at,
                                 [](size_t a, const Span& s) { return a < s.end; });
      return it != literal.end() && it->begin < at + piece.size();
    };
    next.clear();
    bool changed = false;
    for (const Fragment& f : frags) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      size_t begin = f.offset;
      const size_t end = f.offset + f.length;
      const std::string_view window = text.substr(0, end);
      for (size_t match, from = begin;
           (match = window.find(piece, from)) != std::string_view::npos;) {
        if (in_literal(match)) {
          from = match + 1;
          continue;
        }
        changed = true;
        size_t left_end = match;
        if (attr & kAttrLstrip) {
          while (left_end > begin && is_space(text[left_end - 1])) --left_end;
        }
        if (left_end > begin) next.push_back({-1, begin, left_end - begin});
        next.push_back({id, 0, 0});
        begin = match + piece.size();
        if (attr & kAttrRstrip) {
          while (begin < end && is_space(text[begin])) ++begin;
        }
        from = begin;
      }
      if (begin < end) next.push_back({-1, begin, end - begin});
    }
    if (changed) frags.swap(next);
  }
  return frags;
}

std::vector<int32_t> VocabTokenizer::Encode(std::string_view text, bool add_bos,
                                            bool parse_special) const {
  return EncodeFragments(text, add_bos, Partition(text, parse_special));
}

std::vector<int32_t> VocabTokenizer::EncodeWithLiterals(std::string_view text, bool add_bos,
                                                        absl::Span<const Span> literal) const {
  return EncodeFragments(text, add_bos, Partition(text, /*parse_special=*/true, literal));
}

std::vector<int32_t> VocabTokenizer::EncodeFragments(std::string_view text, bool add_bos,
                                                     const std::vector<Fragment>& frags) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && bos_id_ >= 0) out.push_back(bos_id_);
  bool after_special = true;
  for (const Fragment& f : frags) {
    if (f.token >= 0) {
      out.push_back(f.token);
      after_special = true;
    } else {
      EncodeText(text.substr(f.offset, f.length), after_special, &out);
      after_special = false;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE ("gpt2").

class BpeTokenizer final : public VocabTokenizer {
 public:
  absl::Status Init(const GgufFile& gguf);
  std::string TokenBytes(int32_t id) const override;

 protected:
  void EncodeText(std::string_view text, bool after_special,
                  std::vector<int32_t>* out) const override;

 private:
  struct Merge {
    int32_t rank;
    int32_t result;  // token of the merged text, -1 when the vocabulary lacks it
  };
  struct Symbol {
    int32_t prev, next;
    uint32_t start, n;  // bytes of the word
    int32_t id;         // token of the symbol's text, -1 if none
  };
  struct Bigram {
    int32_t rank, left, right;
    uint32_t size;
    int32_t result;  // Merge::result
    // Heap order: the "largest" pops first, which is the lowest rank, then the leftmost.
    bool operator<(const Bigram& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b);
  }
  // The byte-level ("Ġ") spelling of raw bytes.
  static std::string Mapped(std::string_view bytes);
  const Merge* FindMerge(std::string_view word, const Symbol& a, const Symbol& b) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

  std::vector<unicode::SplitRule> rules_;
  bool ignore_merges_ = false;
  int32_t byte_token_[256];
  // Merges of two tokens, by token ids: the fast path.
  absl::flat_hash_map<uint64_t, Merge> merges_;
  // Merges with a part that is not itself a token ("left right" text): only malformed or
  // unusual vocabularies have any.
  absl::flat_hash_map<std::string, Merge> text_merges_;
};

absl::Status BpeTokenizer::Init(const GgufFile& gguf) {
  using unicode::SplitRule;
  pre_ = gguf.GetString("tokenizer.ggml.pre").value_or("default");
  const std::string& p = pre_;
  auto any_of = [&](std::initializer_list<std::string_view> names) {
    return std::find(names.begin(), names.end(), p) != names.end();
  };
  // The regex lists of llama.cpp's llm_tokenizer_bpe, by pre-tokenizer name.
  if (any_of({"default"})) {
    rules_ = {SplitRule::kPunctuation, SplitRule::kGpt2, SplitRule::kNumberRuns,
              SplitRule::kDigitTriples};
  } else if (any_of({"llama3", "llama-v3", "llama-bpe", "falcon3"})) {
    rules_ = {SplitRule::kLlama3};
    ignore_merges_ = true;
    add_bos_ = true;
  } else if (any_of({"dbrx", "smaug-bpe"})) {
    rules_ = {SplitRule::kLlama3};
  } else if (any_of({"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
                     "jina-v2-de", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
                     "exaone4"})) {
    rules_ = {SplitRule::kGpt2};
  } else if (any_of({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"})) {
    // Digits are split one by one before the GPT-2 rules.
    rules_ = {SplitRule::kNumbers, SplitRule::kGpt2};
  } else if (any_of({"qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"})) {
    rules_ = {SplitRule::kQwen2};
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.ggml.pre '", p,
                     "' is not a pre-tokenizer we implement (known: default, "
                     "gpt-2, smollm, starcoder, llama-bpe/llama3, qwen2, and their aliases)"));
  }
  RETURN_IF_ERROR(LoadVocab(gguf, /*spm=*/false));

  for (int b = 0; b < 256; ++b) {
    std::string s;
    unicode::AppendUtf8(unicode::ByteToCodepoint(static_cast<uint8_t>(b)), &s);
    byte_token_[b] = Lookup(s);
  }
  ASSIGN_OR_RETURN(const std::vector<std::string>* merges,
                   gguf.GetStringArray("tokenizer.ggml.merges"));
  merges_.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const std::string& m = (*merges)[i];
    // As llama.cpp: split at the first space after the first byte; no space -> ("", "").
    const size_t sp = m.find(' ', 1);
    const std::string_view left = sp == std::string::npos ? "" : std::string_view(m).substr(0, sp);
    const std::string_view right =
        sp == std::string::npos ? "" : std::string_view(m).substr(sp + 1);
    const Merge merge{static_cast<int32_t>(i), Lookup(std::string(left) + std::string(right))};
    const int32_t l = Lookup(left), r = Lookup(right);
    if (l >= 0 && r >= 0) {
      merges_.emplace(PairKey(l, r), merge);  // the first (lowest) rank wins
    } else {
      text_merges_.emplace(std::string(left) + " " + std::string(right), merge);
    }
  }
  return absl::OkStatus();
}

std::string BpeTokenizer::Mapped(std::string_view bytes) {
  std::string s;
  for (char c : bytes) unicode::AppendUtf8(unicode::ByteToCodepoint(static_cast<uint8_t>(c)), &s);
  return s;
}

const BpeTokenizer::Merge* BpeTokenizer::FindMerge(std::string_view word, const Symbol& a,
                                                   const Symbol& b) const {
  if (a.id >= 0 && b.id >= 0) {
    auto it = merges_.find(PairKey(a.id, b.id));
    return it == merges_.end() ? nullptr : &it->second;
  }
  if (text_merges_.empty()) return nullptr;
  auto it = text_merges_.find(
      absl::StrCat(Mapped(word.substr(a.start, a.n)), " ", Mapped(word.substr(b.start, b.n))));
  return it == text_merges_.end() ? nullptr : &it->second;
}

// Merges one pre-tokenizer word (raw bytes; symbols start as single bytes, which is what the
// byte-level characters stand for) by rank, lowest first and leftmost on ties, as llama.cpp.
void BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.size() == 1 && byte_token_[static_cast<uint8_t>(word[0])] >= 0) {
    out->push_back(byte_token_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (ignore_merges_) {
    if (int32_t id = Lookup(Mapped(word)); id >= 0) {
      out->push_back(id);
      return;
    }
  }
  // Reused across calls: no allocation per word once warm.
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<Bigram> queue;  // a heap; see Bigram::operator<
  symbols.clear();
  queue.clear();
  const int32_t n = static_cast<int32_t>(word.size());
  for (int32_t i = 0; i < n; ++i) {
    symbols.push_back({i - 1, i + 1 == n ? -1 : i + 1, static_cast<uint32_t>(i), 1,
                       byte_token_[static_cast<uint8_t>(word[i])]});
  }
  auto add_bigram = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const Merge* m = FindMerge(word, symbols[left], symbols[right]);
    if (m == nullptr) return;
    queue.push_back({m->rank, left, right, symbols[left].n + symbols[right].n, m->result});
    std::push_heap(queue.begin(), queue.end());
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) add_bigram(i - 1, i);
  while (!queue.empty()) {
    std::pop_heap(queue.begin(), queue.end());
    const Bigram bg = queue.back();
    queue.pop_back();
    Symbol& left = symbols[bg.left];
    Symbol& right = symbols[bg.right];
    // Stale when either side has changed since the pair was queued. Symbols only grow to the
    // right and stay adjacent, so equal total length means the same text.
    if (left.n == 0 || right.n == 0 || left.n + right.n != bg.size) continue;
    left.n += right.n;
    left.id = bg.result;
    right.n = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = bg.left;
    add_bigram(left.prev, bg.left);
    add_bigram(bg.left, left.next);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    if (s.id >= 0) {
      out->push_back(s.id);
      continue;
    }
    // No token for the merged text: llama.cpp emits the tokens of its single bytes (of the
    // byte-level spelling), skipping those the vocabulary lacks.
    for (char c : Mapped(word.substr(s.start, s.n))) {
      if (int32_t id = Lookup(std::string_view(&c, 1)); id >= 0) out->push_back(id);
    }
  }
}

void BpeTokenizer::EncodeText(std::string_view text, bool /*after_special*/,
                              std::vector<int32_t>* out) const {
  thread_local std::vector<uint32_t> cpts;
  unicode::DecodeUtf8(text, &cpts);
  const std::vector<size_t> words = unicode::Split(cpts, rules_);
  std::string word;
  size_t start = 0;
  for (const size_t len : words) {
    // Re-encoding the decoded code points (rather than slicing `text`) is what llama.cpp
    // does: malformed bytes reach the merges as U+FFFD.
    word.clear();
    for (size_t i = start; i < start + len; ++i) unicode::AppendUtf8(cpts[i], &word);
    start += len;
    EncodeWord(word, out);
  }
}

std::string BpeTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return {};
  const uint32_t attr = attrs_[id];
  if (attr & (kAttrUnknown | kAttrControl | kAttrUserDefined)) return pieces_[id];
  if (!(attr & kAttrNormal)) return {};
  std::vector<uint32_t> cpts;
  unicode::DecodeUtf8(pieces_[id], &cpts);
  std::string bytes;
  for (uint32_t c : cpts) {
    const int b = unicode::CodepointToByte(c);
    // Outside the byte map (not a byte-level vocabulary entry): keep the character.
    if (b < 0) {
      unicode::AppendUtf8(c, &bytes);
    } else {
      bytes.push_back(static_cast<char>(b));
    }
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// SentencePiece BPE ("llama").

class SpmTokenizer final : public VocabTokenizer {
 public:
  absl::Status Init(const GgufFile& gguf);
  std::string TokenBytes(int32_t id) const override;

 protected:
  void EncodeText(std::string_view text, bool after_special,
                  std::vector<int32_t>* out) const override;

 private:
  struct Symbol {
    int32_t prev, next;
    uint32_t start, n;
  };
  struct Bigram {
    float score;
    int32_t left, right;
    uint32_t size;
    // Highest score first, then leftmost.
    bool operator<(const Bigram& o) const {
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  std::vector<float> scores_;
  int32_t byte_token_[256];
};

absl::Status SpmTokenizer::Init(const GgufFile& gguf) {
  pre_ = gguf.GetString("tokenizer.ggml.pre").value_or("default");
  add_bos_ = true;
  add_space_prefix_ = true;
  RETURN_IF_ERROR(LoadVocab(gguf, /*spm=*/true));
  scores_.assign(pieces_.size(), 0.0f);
  if (gguf.Has("tokenizer.ggml.scores")) {
    ASSIGN_OR_RETURN(const std::vector<double>* scores,
                     gguf.GetFloatArray("tokenizer.ggml.scores"));
    if (scores->size() != pieces_.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.scores has ", scores->size(),
                                                     " entries for ", pieces_.size(), " tokens"));
    }
    for (size_t i = 0; i < scores->size(); ++i) scores_[i] = static_cast<float>((*scores)[i]);
  }
  for (int b = 0; b < 256; ++b) {
    // <0xNN> first; else the byte itself as a token (llama.cpp's byte_to_token).
    static constexpr char kHex[] = "0123456789ABCDEF";
    const char name[] = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
    int32_t id = Lookup(std::string_view(name, sizeof(name)));
    if (id < 0) id = Lookup(std::string(1, static_cast<char>(b)));
    byte_token_[b] = id >= 0 ? id : unk_id_;
  }
  return absl::OkStatus();
}

void SpmTokenizer::EncodeText(std::string_view raw, bool after_special,
                              std::vector<int32_t>* out) const {
  std::string text;
  text.reserve(raw.size() + 8);
  if (add_space_prefix_ && after_special) text = " ";
  text.append(raw);
  absl::StrReplaceAll({{" ", kSpmSpace}}, &text);

  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (uint32_t offs = 0; offs < text.size();) {
    const uint32_t len = static_cast<uint32_t>(std::min<size_t>(
        unicode::Utf8SequenceLength(static_cast<uint8_t>(text[offs])), text.size() - offs));
    const int32_t index = static_cast<int32_t>(symbols.size());
    offs += len;
    symbols.push_back({index - 1, offs == text.size() ? -1 : index + 1, offs - len, len});
  }
  std::priority_queue<Bigram> queue;
  auto add_bigram = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t size = symbols[left].n + symbols[right].n;
    const int32_t id = Lookup(std::string_view(text).substr(symbols[left].start, size));
    if (id < 0) return;
    queue.push({scores_[id], left, right, size});
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) add_bigram(i - 1, i);
  while (!queue.empty()) {
    const Bigram bg = queue.top();
    queue.pop();
    Symbol& left = symbols[bg.left];
    Symbol& right = symbols[bg.right];
    if (left.n == 0 || right.n == 0 || left.n + right.n != bg.size) continue;
    left.n += right.n;
    right.n = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = bg.left;
    add_bigram(left.prev, bg.left);
    add_bigram(bg.left, left.next);
  }
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    const std::string_view piece = std::string_view(text).substr(s.start, s.n);
    if (int32_t id = Lookup(piece); id >= 0) {
      out->push_back(id);
      continue;
    }
    // Every merged symbol is a token, so this is a single character the vocabulary lacks:
    // byte fallback.
    for (char c : piece) {
      if (int32_t id = byte_token_[static_cast<uint8_t>(c)]; id >= 0) out->push_back(id);
    }
  }
}

std::string SpmTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return {};
  const uint32_t attr = attrs_[id];
  const std::string& piece = pieces_[id];
  if (attr & (kAttrUnknown | kAttrControl | kAttrUserDefined)) return piece;
  if (attr & kAttrNormal) return absl::StrReplaceAll(piece, {{kSpmSpace, " "}});
  if (attr & kAttrByte) {
    // "<0xNN>"
    auto hex = [](char c) {
      return c >= '0' && c <= '9'   ? c - '0'
             : c >= 'A' && c <= 'F' ? c - 'A' + 10
             : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                    : -1;
    };
    if (piece.size() == 6 && absl::StartsWith(piece, "<0x") && piece[5] == '>' &&
        hex(piece[3]) >= 0 && hex(piece[4]) >= 0) {
      return std::string(1, static_cast<char>(hex(piece[3]) * 16 + hex(piece[4])));
    }
  }
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizer

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& gguf) {
  auto model = gguf.GetString("tokenizer.ggml.model");
  if (!model.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF has no usable tokenizer: ", model.status().message()));
  }
  if (*model == "gpt2") {
    auto tok = std::unique_ptr<BpeTokenizer>(new BpeTokenizer());
    tok->model_ = *model;
    RETURN_IF_ERROR(tok->Init(gguf));
    return std::unique_ptr<Tokenizer>(std::move(tok));
  }
  if (*model == "llama") {
    auto tok = std::unique_ptr<SpmTokenizer>(new SpmTokenizer());
    tok->model_ = *model;
    RETURN_IF_ERROR(tok->Init(gguf));
    return std::unique_ptr<Tokenizer>(std::move(tok));
  }
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.model '", *model,
                                                 "' is not supported (supported: gpt2, llama)"));
}

const std::string& Tokenizer::Piece(int32_t id) const {
  static const std::string kEmpty;
  return id >= 0 && id < n_vocab() ? pieces_[id] : kEmpty;
}

bool Tokenizer::IsControl(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return false;
  return (attrs_[id] & (kAttrControl | kAttrUserDefined)) != 0;
}

bool Tokenizer::IsHiddenSpecial(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return false;
  return (attrs_[id] & (kAttrControl | kAttrUnknown)) != 0;
}

bool Tokenizer::IsEndOfGeneration(int32_t id) const {
  return std::binary_search(end_of_generation_ids_.begin(), end_of_generation_ids_.end(), id);
}

std::optional<int32_t> Tokenizer::FindToken(std::string_view piece) const {
  auto it = token_to_id_.find(absl::string_view(piece.data(), piece.size()));
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special) const {
  std::string text;
  // SPM: the space Encode put before the text comes off the first piece again (llama.cpp's
  // detokenize does the same, except after a skipped BOS, where it keeps it; we strip it there
  // too so that Decode(Encode(s, add_bos=true)) == s).
  bool strip_space = add_space_prefix_;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= n_vocab()) continue;
    const bool special = IsHiddenSpecial(id);
    if (special && skip_special) {
      if (!(i == 0 && id == bos_id_)) strip_space = false;
      continue;
    }
    std::string piece = TokenBytes(id);
    if (strip_space && !special && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    strip_space = false;
    text += piece;
  }
  return text;
}

// ---------------------------------------------------------------------------------------------
// IncrementalDecoder

std::string IncrementalDecoder::Push(int32_t id) {
  if (skip_special_ && tokenizer_.IsHiddenSpecial(id)) return {};
  pending_ += tokenizer_.TokenBytes(id);
  // Hold back the start of a character the next token may complete; anything else that is
  // malformed can never become valid and goes out as U+FFFD.
  const size_t hold = unicode::IncompleteUtf8Suffix(pending_);
  std::string ready =
      unicode::ToValidUtf8(std::string_view(pending_).substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return ready;
}

std::string IncrementalDecoder::Flush() {
  if (pending_.empty()) return {};
  pending_.clear();
  return "\xEF\xBF\xBD";
}

}  // namespace ctxcache
