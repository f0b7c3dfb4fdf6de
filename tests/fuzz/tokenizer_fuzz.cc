// Fuzz target for the tokenizers of real vocabularies (the checked-in llama.cpp test vocabs:
// GPT-2 byte-level BPE, Llama SentencePiece, Phi-3 SentencePiece) on arbitrary text: what
// clients send as documents and chat messages. Invariants, besides tokenizer_checks.h:
//  * text is never read as a special token unless asked: encoding without parse_special
//    yields no control token (the property that stops a user forging a chat turn);
//  * well-formed text round-trips: Decode(Encode(text)) == text. SentencePiece vocabularies
//    spell a space "▁" (U+2581), so there a "▁" the text already held comes back as a space
//    (as in llama.cpp and sentencepiece): those texts are left out for them.
// Input: the first byte picks the vocabulary, the rest is the text.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "engine/unicode.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tokenizer_checks.h"

namespace {

struct Vocab {
  std::unique_ptr<ctxcache::GgufFile> file;
  std::unique_ptr<ctxcache::Tokenizer> tok;
};

const std::vector<Vocab>& Vocabs() {
  static const std::vector<Vocab>* vocabs = [] {
    auto* v = new std::vector<Vocab>;
    for (const char* name :
         {"ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf"}) {
      const std::string path = std::string(CTXCACHE_TEST_DATA) + "/tokenizer/suite/" + name;
      auto file = ctxcache::GgufFile::Open(path);
      if (!file.ok()) {
        std::fprintf(stderr, "tokenizer_fuzz: %s: %s\n", path.c_str(),
                     file.status().ToString().c_str());
        std::abort();
      }
      auto tok = ctxcache::Tokenizer::FromGguf(**file);
      if (!tok.ok()) std::abort();
      v->push_back({std::move(*file), std::move(*tok)});
    }
    return v;
  }();
  return *vocabs;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > 2048) return 0;
  const ctxcache::Tokenizer& tok = *Vocabs()[data[0] % Vocabs().size()].tok;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  std::vector<int32_t> ids = ctxcache::fuzz::CheckTokenizer(tok, text);
  // Encoded with the vocabulary's default BOS: a leading BOS is not part of the text.
  if (tok.add_bos_default() && !ids.empty() && ids.front() == tok.bos_id()) ids.erase(ids.begin());
  for (int32_t id : ids) FUZZ_CHECK(!tok.IsControl(id));
  const bool spm_space = tok.model_name() == "llama" && text.find("\xE2\x96\x81") != text.npos;
  if (ctxcache::unicode::IsValidUtf8(text) && !spm_space) FUZZ_CHECK(tok.Decode(ids) == text);
  return 0;
}
