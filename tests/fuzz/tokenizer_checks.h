// Tokenizer invariants shared by the gguf target (vocabularies built from fuzzed files) and
// the tokenizer target (the checked-in vocabularies on fuzzed text).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"
#include "engine/unicode.h"
#include "tests/fuzz/fuzz_util.h"

namespace ctxcache::fuzz {

// Encodes `text` both ways (special tokens parsed or not) and checks, for any vocabulary:
//  * every id is in the vocabulary;
//  * Decode accepts the ids;
//  * IncrementalDecoder streams exactly the tokens' bytes (hidden specials left out) with
//    malformed bytes as U+FFFD each and an unfinished last character as one U+FFFD, and its
//    output is always valid UTF-8, token by token.
// Returns the ids of the plain encoding (special tokens not parsed, the vocabulary's default
// BOS), so a caller checks more of it without encoding again (encoding is most of the time).
inline std::vector<int32_t> CheckTokenizer(const Tokenizer& tok, std::string_view text) {
  std::vector<int32_t> plain;
  for (bool parse_special : {true, false}) {
    std::vector<int32_t> ids = tok.Encode(text, tok.add_bos_default(), parse_special);
    std::string raw;
    for (int32_t id : ids) {
      FUZZ_CHECK(id >= 0 && id < tok.n_vocab());
      if (!tok.IsHiddenSpecial(id)) raw += tok.TokenBytes(id);
    }
    (void)tok.Decode(ids, /*skip_special=*/false);
    (void)tok.Decode(ids, /*skip_special=*/true);
    IncrementalDecoder decoder(tok);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string delta = decoder.Push(id);
      FUZZ_CHECK(unicode::IsValidUtf8(delta));
      streamed += delta;
    }
    streamed += decoder.Flush();
    const size_t hold = unicode::IncompleteUtf8Suffix(raw);
    const std::string want =
        unicode::ToValidUtf8(std::string_view(raw).substr(0, raw.size() - hold)) +
        (hold ? "\xEF\xBF\xBD" : "");
    FUZZ_CHECK(streamed == want);
    if (!parse_special) plain = std::move(ids);
  }
  return plain;
}

}  // namespace ctxcache::fuzz
