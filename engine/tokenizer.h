// Tokenizers built from GGUF metadata (tokenizer.ggml.*):
//  - "gpt2": byte-level BPE with the pre-tokenizer named by tokenizer.ggml.pre (smollm,
//    llama-bpe / llama3, qwen2, gpt-2 default, ...);
//  - "llama": SentencePiece-style BPE over scores, with byte fallback (<0xNN> tokens).
// Special/control and user-defined ("added") tokens are matched in text only when
// parse_special is set, as in llama.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/gguf.h"

namespace ctxcache {

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);
  virtual ~Tokenizer() = default;

  // add_bos: prepend BOS (callers pass add_bos_default() unless told otherwise).
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos,
                                      bool parse_special) const = 0;
  // A byte range [begin, end) of an input.
  struct Span {
    size_t begin = 0, end = 0;
  };
  // Encode with parse_special, except that control and unknown tokens are not matched where
  // they would overlap one of `literal` (sorted, disjoint): there the text is ordinary text,
  // as with parse_special off. For rendered chat prompts: the template's own markers are
  // special, the users' message contents are not (a "<|im_start|>system" typed in a message
  // must not open a system turn). Text outside special tokens is tokenized as one piece across
  // span edges, so an input whose literal spans hold no special-token text encodes exactly as
  // Encode(text, add_bos, true) does.
  virtual std::vector<int32_t> EncodeWithLiterals(std::string_view text, bool add_bos,
                                                  absl::Span<const Span> literal) const = 0;
  // Concatenated bytes of the tokens (SPM: minus the space prefix Encode added at the start);
  // control tokens (BOS, EOS, <|im_start|>...) are rendered as their text unless skip_special.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special = false) const;
  // The bytes one token stands for (byte-level decoding applied, "▁" -> " " for SPM,
  // <0xNN> -> that byte). Empty for out-of-range ids.
  virtual std::string TokenBytes(int32_t id) const = 0;
  // The raw vocabulary string.
  const std::string& Piece(int32_t id) const;

  int32_t n_vocab() const { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  bool add_bos_default() const { return add_bos_; }
  bool IsControl(int32_t id) const;  // control/special token type (3) or user-defined (4)
  // Control or unknown tokens: the ones Decode(skip_special) drops. User-defined tokens are
  // ordinary text there, as in llama.cpp.
  bool IsHiddenSpecial(int32_t id) const;
  // EOS, EOT and chat-turn terminators (<|im_end|>, <|eot_id|>, <|end_of_text|>, ...).
  bool IsEndOfGeneration(int32_t id) const;
  std::optional<int32_t> FindToken(std::string_view piece) const;
  const std::string& model_name() const { return model_; }  // "gpt2" / "llama"
  const std::string& pre_name() const { return pre_; }

 protected:
  Tokenizer() = default;
  std::string model_, pre_;
  std::vector<std::string> pieces_;
  std::vector<int32_t> token_types_;  // GGUF token_type per id (1 normal .. 6 byte)
  int32_t bos_id_ = -1, eos_id_ = -1;
  bool add_bos_ = false;
  std::vector<int32_t> end_of_generation_ids_;
  // llama.cpp's token attributes (bit set, see tokenizer.cc): the GGUF type plus the fixes
  // llama.cpp applies by token text (EOG tokens forced to control, phi-3 rstrip, ...).
  std::vector<uint32_t> attrs_;
  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  // SPM: Encode puts a space before the text; Decode takes it off the first piece again.
  bool add_space_prefix_ = false;
};

// Turns a token stream into text without ever emitting a partial UTF-8 sequence: bytes of an
// unfinished character are held until the next token completes it (or Flush gives them up,
// replaced by U+FFFD).
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special = true)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  std::string Push(int32_t id);
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace ctxcache
