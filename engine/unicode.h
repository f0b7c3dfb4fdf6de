// Unicode support for the tokenizers: code point classification (generated tables in
// unicode_data.inc), llama.cpp-compatible UTF-8 decoding, the GPT-2 byte<->unicode map of
// byte-level BPE, and the pre-tokenizer splitters that stand in for the regexes HF tokenizers
// use (`'s|'t| ?\p{L}+| ?\p{N}+...`). std::regex has no \p{..} classes, so each regex is a
// hand-written matcher over code points; each one reproduces llama.cpp's matcher of the same
// name (src/unicode.cpp), including its few deviations from the literal regex, because token
// ids must be identical to llama.cpp's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/types/span.h"

namespace ctxcache::unicode {

// Code point flags: exactly one category bit (general category group), plus kWhitespace for
// the White_Space property. Same partition as llama.cpp's unicode_cpt_flags.
enum Flag : uint16_t {
  kUndefined = 1 << 0,    // Cn (unassigned, noncharacters), and anything past U+10FFFF
  kNumber = 1 << 1,       // \p{N}
  kLetter = 1 << 2,       // \p{L}
  kSeparator = 1 << 3,    // \p{Z}
  kMark = 1 << 4,         // \p{M}
  kPunctuation = 1 << 5,  // \p{P}
  kSymbol = 1 << 6,       // \p{S}
  kControl = 1 << 7,      // \p{C} other than Cn
  kWhitespace = 1 << 8,   // \s
};

struct FlagRun {
  uint32_t start;
  uint16_t flags;
};

// Flags of one code point (kUndefined beyond U+10FFFF).
uint16_t CodepointFlags(uint32_t cpt);

// The Unicode version the tables were generated from.
const char* TableVersion();

// Length of the UTF-8 sequence a lead byte announces, by its high nibble (continuation bytes
// count as 1), as llama.cpp's unicode_len_utf8: the SPM and BPE symbol splitters use it.
inline size_t Utf8SequenceLength(uint8_t lead) {
  static constexpr uint8_t kLengths[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLengths[lead >> 4];
}

// Decodes UTF-8 the way llama.cpp does before pre-tokenizing: a malformed sequence becomes
// U+FFFD and consumes one byte. Overlong forms and surrogates are decoded, not rejected (as
// there), so ids match llama.cpp even for hostile input. Values past U+10FFFF (F5..F7 leads)
// become U+FFFD; llama.cpp throws on them.
void DecodeUtf8(std::string_view text, std::vector<uint32_t>* cpts);

// Appends the UTF-8 encoding of `cpt` (which must be <= 0x10FFFF).
void AppendUtf8(uint32_t cpt, std::string* out);

// True when `text` is well-formed UTF-8 (no overlongs, surrogates or values past U+10FFFF).
bool IsValidUtf8(std::string_view text);
// The byte offset of the first sequence that is not well-formed UTF-8 (as IsValidUtf8
// judges); nullopt when `text` is all UTF-8.
std::optional<size_t> FirstInvalidUtf8(std::string_view text);

// `bytes` with each malformed or truncated sequence replaced by U+FFFD (one per byte).
std::string ToValidUtf8(std::string_view bytes);

// Number of bytes at the end of `text` that form the start of an incomplete but so far
// well-formed UTF-8 sequence (0..3): the bytes a streaming decoder must hold back.
size_t IncompleteUtf8Suffix(std::string_view text);

// GPT-2's reversible byte -> printable code point map: bytes that are printable Latin-1 map
// to themselves, the rest to U+0100 upwards in byte order.
uint32_t ByteToCodepoint(uint8_t byte);
// The inverse; -1 for code points outside the map.
int CodepointToByte(uint32_t cpt);

// Pre-tokenizer rules. A pre-tokenizer is a sequence of rules; each splits every word the
// previous rule produced into smaller words (matches and the text between them both become
// words), as llama.cpp's unicode_regex_split does with its list of regexes.
enum class SplitRule {
  kGpt2,          // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,        // (?i:'s|..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
                  // \s*[\r\n]+|\s+(?!\S)|\s+
  kQwen2,         // as kLlama3 with \p{N} (single digits) instead of \p{N}{1,3}
  kNumbers,       // \p{N}: every number code point on its own
  kNumberRuns,    // \p{N}+
  kPunctuation,   // [\p{P}\$\+<=>\^~\|]+
  kDigitTriples,  // [0-9][0-9][0-9]
};

// Splits `cpts` into words; returns the word lengths (in code points), which sum to
// cpts.size(). An empty input gives no words.
std::vector<size_t> Split(absl::Span<const uint32_t> cpts, absl::Span<const SplitRule> rules);

}  // namespace ctxcache::unicode
