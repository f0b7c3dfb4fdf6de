// Code point tables, UTF-8 helpers and the pre-tokenizer splitters (see unicode.h).
//
// The splitters mirror llama.cpp's custom regex matchers (src/unicode.cpp) decision by
// decision: where those differ from what the literal regex would do, we follow llama.cpp,
// since the point is identical token ids. The differences are marked "llama.cpp:" below.
#include "engine/unicode.h"

#include <algorithm>
#include <array>

namespace ctxcache::unicode {
namespace {

#include "engine/unicode_data.inc"

constexpr uint32_t kMaxCodepoint = 0x10FFFF;
constexpr uint32_t kReplacement = 0xFFFD;
// What a matcher sees outside the word it is matching: no code point, no flags. llama.cpp's
// lookaheads ((?!\S)) and "next character" tests treat the word's end this way.
constexpr uint32_t kOutOfRange = 0xFFFFFFFF;

// Flags of ASCII, looked up on every character of typical text: skips the binary search.
const std::array<uint16_t, 128>& AsciiFlags() {
  static const std::array<uint16_t, 128> table = [] {
    std::array<uint16_t, 128> t{};
    size_t run = 0;
    for (uint32_t c = 0; c < 128; ++c) {
      while (run + 1 < std::size(kFlagRuns) && kFlagRuns[run + 1].start <= c) ++run;
      t[c] = kFlagRuns[run].flags;
    }
    return t;
  }();
  return table;
}

// One word being matched: code points [ini, end) of the whole text.
class Word {
 public:
  Word(absl::Span<const uint32_t> cpts, size_t ini, size_t end)
      : cpts_(cpts), ini_(ini), end_(end) {}
  uint32_t Cpt(size_t pos) const { return pos >= ini_ && pos < end_ ? cpts_[pos] : kOutOfRange; }
  uint16_t Flags(size_t pos) const {
    return pos >= ini_ && pos < end_ ? CodepointFlags(cpts_[pos]) : 0;
  }

 private:
  absl::Span<const uint32_t> cpts_;
  size_t ini_, end_;
};

// Collects word lengths, dropping empty ones.
class Emitter {
 public:
  Emitter(std::vector<size_t>* out, size_t start) : out_(out), prev_end_(start) {}
  // Ends the current word at `end`; returns its length.
  size_t EmitUntil(size_t end) {
    const size_t len = end - prev_end_;
    if (len > 0) out_->push_back(len);
    prev_end_ = end;
    return len;
  }

 private:
  std::vector<size_t>* out_;
  size_t prev_end_;
};

constexpr uint16_t kLetterNumberSpace = kLetter | kNumber | kWhitespace;

uint32_t AsciiLower(uint32_t c) { return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c; }

// Length (2 or 3) of an English contraction suffix ('s 't 'm 'd 're 've 'll) starting at
// `pos`, or 0. Only ASCII letters lower-case to s/t/m/d/r/v/e/l, so ASCII folding is the same
// as llama.cpp's unicode_tolower here.
size_t ContractionLength(const Word& w, size_t pos, size_t end, bool ignore_case) {
  if (w.Cpt(pos) != '\'' || pos + 1 >= end) return 0;
  auto fold = [&](uint32_t c) { return ignore_case ? AsciiLower(c) : c; };
  const uint32_t c1 = fold(w.Cpt(pos + 1));
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (pos + 2 >= end) return 0;
  const uint32_t c2 = fold(w.Cpt(pos + 2));
  if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
  return 0;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
void SplitGpt2(const Word& w, size_t ini, size_t end, std::vector<size_t>* out) {
  Emitter emit(out, ini);
  for (size_t pos = ini; pos < end;) {
    if (size_t n = ContractionLength(w, pos, end, /*ignore_case=*/false)) {
      pos += emit.EmitUntil(pos + n);
      continue;
    }
    const uint32_t cpt = w.Cpt(pos);
    uint16_t f = cpt == ' ' ? w.Flags(pos + 1) : w.Flags(pos);
    // One optional leading space, then a run of one class.
    if (f & kLetter) {
      pos += cpt == ' ';
      while (f & kLetter) f = w.Flags(++pos);
      emit.EmitUntil(pos);
      continue;
    }
    if (f & kNumber) {
      pos += cpt == ' ';
      while (f & kNumber) f = w.Flags(++pos);
      emit.EmitUntil(pos);
      continue;
    }
    if (!(f & kLetterNumberSpace) && f != 0) {
      pos += cpt == ' ';
      while (!(f & kLetterNumberSpace) && f != 0) f = w.Flags(++pos);
      emit.EmitUntil(pos);
      continue;
    }
    size_t n_space = 0;
    while (w.Flags(pos + n_space) & kWhitespace) ++n_space;
    // \s+(?!\S): a whitespace run followed by more text leaves its last character to
    // prefix the next word; a run at the end of the word is kept whole.
    if (n_space > 1 && w.Cpt(pos + n_space) != kOutOfRange) {
      pos += n_space - 1;
      emit.EmitUntil(pos);
      continue;
    }
    if (n_space > 0) {
      pos += n_space;
      emit.EmitUntil(pos);
      continue;
    }
    emit.EmitUntil(++pos);
  }
}

// Llama 3 and Qwen2 (max_digits 3 and 1):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
void SplitLlama3(const Word& w, size_t ini, size_t end, size_t max_digits,
                 std::vector<size_t>* out) {
  Emitter emit(out, ini);
  for (size_t pos = ini; pos < end;) {
    if (size_t n = ContractionLength(w, pos, end, /*ignore_case=*/true)) {
      pos += emit.EmitUntil(pos + n);
      continue;
    }
    const uint32_t cpt = w.Cpt(pos);
    const uint16_t flags = w.Flags(pos);
    const bool is_crlf = cpt == '\r' || cpt == '\n';
    // [^\r\n\p{L}\p{N}]?\p{L}+ : any one non-letter prefix character, then letters.
    if (!is_crlf && !(flags & kNumber) && ((flags & kLetter) || (w.Flags(pos + 1) & kLetter))) {
      ++pos;
      while (w.Flags(pos) & kLetter) ++pos;
      emit.EmitUntil(pos);
      continue;
    }
    if (flags & kNumber) {  // \p{N}{1,max_digits}
      size_t group_start = pos;
      while (w.Flags(pos) & kNumber) {
        if (++pos - group_start >= max_digits) {
          emit.EmitUntil(pos);
          group_start = pos;
        }
      }
      emit.EmitUntil(pos);
      continue;
    }
    // ?[^\s\p{L}\p{N}]+[\r\n]*   llama.cpp: entry tests the flags of the current character
    // (never 0 inside the word), so a trailing lone space is taken here, alone.
    uint16_t f = cpt == ' ' ? w.Flags(pos + 1) : flags;
    if (!(f & kLetterNumberSpace) && flags != 0) {
      pos += cpt == ' ';
      while (!(f & kLetterNumberSpace) && f != 0) f = w.Flags(++pos);
      for (uint32_t c = w.Cpt(pos); c == '\r' || c == '\n'; c = w.Cpt(++pos)) {
      }
      emit.EmitUntil(pos);
      continue;
    }
    size_t n_space = 0;
    size_t last_crlf_end = 0;
    while (w.Flags(pos + n_space) & kWhitespace) {
      const uint32_t c = w.Cpt(pos + n_space);
      if (c == '\r' || c == '\n') last_crlf_end = pos + n_space + 1;
      ++n_space;
    }
    if (last_crlf_end > 0) {  // \s*[\r\n]+
      pos = last_crlf_end;
      emit.EmitUntil(pos);
      continue;
    }
    if (n_space > 1 && w.Cpt(pos + n_space) != kOutOfRange) {  // \s+(?!\S)
      pos += n_space - 1;
      emit.EmitUntil(pos);
      continue;
    }
    if (n_space > 0) {  // \s+
      pos += n_space;
      emit.EmitUntil(pos);
      continue;
    }
    emit.EmitUntil(++pos);
  }
}

// Rules that isolate matches of a simple pattern (llama.cpp runs these through std::regex):
// every match is a word, and so is the text between matches. `match(pos)` returns the match
// length at pos (0: none).
template <typename MatchFn>
void SplitIsolated(size_t ini, size_t end, MatchFn match, std::vector<size_t>* out) {
  size_t gap_start = ini;
  for (size_t pos = ini; pos < end;) {
    const size_t n = match(pos);
    if (n == 0) {
      ++pos;
      continue;
    }
    if (pos > gap_start) out->push_back(pos - gap_start);
    out->push_back(n);
    pos += n;
    gap_start = pos;
  }
  if (end > gap_start) out->push_back(end - gap_start);
}

bool IsDefaultPunctuation(uint32_t c) {
  switch (c) {
    case '$':
    case '+':
    case '<':
    case '=':
    case '>':
    case '^':
    case '~':
    case '|':
      return true;
    default:
      return (CodepointFlags(c) & kPunctuation) != 0;
  }
}

void ApplyRule(SplitRule rule, absl::Span<const uint32_t> cpts, size_t ini, size_t end,
               std::vector<size_t>* out) {
  const Word w(cpts, ini, end);
  auto run_of = [&](auto pred) {
    return [&, pred](size_t pos) {
      size_t n = 0;
      while (pos + n < end && pred(cpts[pos + n])) ++n;
      return n;
    };
  };
  auto is_number = [](uint32_t c) { return (CodepointFlags(c) & kNumber) != 0; };
  switch (rule) {
    case SplitRule::kGpt2:
      SplitGpt2(w, ini, end, out);
      return;
    case SplitRule::kLlama3:
      SplitLlama3(w, ini, end, 3, out);
      return;
    case SplitRule::kQwen2:
      SplitLlama3(w, ini, end, 1, out);
      return;
    case SplitRule::kNumbers:
      SplitIsolated(
          ini, end, [&](size_t pos) -> size_t { return is_number(cpts[pos]); }, out);
      return;
    case SplitRule::kNumberRuns:
      SplitIsolated(ini, end, run_of(is_number), out);
      return;
    case SplitRule::kPunctuation:
      SplitIsolated(ini, end, run_of(IsDefaultPunctuation), out);
      return;
    case SplitRule::kDigitTriples:
      SplitIsolated(
          ini, end,
          [&](size_t pos) -> size_t {
            auto digit = [&](size_t p) { return p < end && cpts[p] >= '0' && cpts[p] <= '9'; };
            return digit(pos) && digit(pos + 1) && digit(pos + 2) ? 3 : 0;
          },
          out);
      return;
  }
}

}  // namespace

uint16_t CodepointFlags(uint32_t cpt) {
  if (cpt < 128) return AsciiFlags()[cpt];
  if (cpt > kMaxCodepoint) return kUndefined;
  // Last run starting at or before cpt.
  const FlagRun* it =
      std::upper_bound(std::begin(kFlagRuns), std::end(kFlagRuns), cpt,
                       [](uint32_t value, const FlagRun& run) { return value < run.start; });
  return (it - 1)->flags;
}

const char* TableVersion() { return kUnicodeVersion; }

void DecodeUtf8(std::string_view text, std::vector<uint32_t>* cpts) {
  cpts->clear();
  cpts->reserve(text.size());
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  auto cont = [&](size_t i) { return i < n && (s[i] & 0xC0) == 0x80; };
  for (size_t i = 0; i < n;) {
    const uint8_t b = s[i];
    uint32_t cpt;
    size_t len;
    if (b < 0x80) {
      cpt = b, len = 1;
    } else if ((b & 0xE0) == 0xC0 && cont(i + 1)) {
      cpt = (b & 0x1Fu) << 6 | (s[i + 1] & 0x3Fu), len = 2;
    } else if ((b & 0xF0) == 0xE0 && cont(i + 1) && cont(i + 2)) {
      cpt = (b & 0x0Fu) << 12 | (s[i + 1] & 0x3Fu) << 6 | (s[i + 2] & 0x3Fu), len = 3;
    } else if ((b & 0xF8) == 0xF0 && cont(i + 1) && cont(i + 2) && cont(i + 3)) {
      cpt = (b & 0x07u) << 18 | (s[i + 1] & 0x3Fu) << 12 | (s[i + 2] & 0x3Fu) << 6 |
            (s[i + 3] & 0x3Fu);
      len = 4;
    } else {
      cpt = kReplacement, len = 1;
    }
    if (cpt > kMaxCodepoint) cpt = kReplacement;
    cpts->push_back(cpt);
    i += len;
  }
}

void AppendUtf8(uint32_t cpt, std::string* out) {
  if (cpt < 0x80) {
    out->push_back(static_cast<char>(cpt));
  } else if (cpt < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cpt >> 6)));
    out->push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else if (cpt < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cpt >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cpt >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cpt >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  }
}

namespace {

// Validates one sequence at s[0..n); returns its length, 0 when malformed, or -(bytes seen)
// when well-formed so far but cut short by the end of input.
int CheckSequence(const uint8_t* s, size_t n) {
  const uint8_t b = s[0];
  if (b < 0x80) return 1;
  int len;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3;
    if (b == 0xE0) lo = 0xA0;  // overlong
    if (b == 0xED) hi = 0x9F;  // surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4;
    if (b == 0xF0) lo = 0x90;  // overlong
    if (b == 0xF4) hi = 0x8F;  // past U+10FFFF
  } else {
    return 0;
  }
  for (int i = 1; i < len; ++i) {
    if (static_cast<size_t>(i) >= n) return -i;
    const uint8_t lo_i = i == 1 ? lo : 0x80, hi_i = i == 1 ? hi : 0xBF;
    if (s[i] < lo_i || s[i] > hi_i) return 0;
  }
  return len;
}

}  // namespace

std::optional<size_t> FirstInvalidUtf8(std::string_view text) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  for (size_t i = 0; i < text.size();) {
    const int len = CheckSequence(s + i, text.size() - i);
    if (len <= 0) return i;
    i += len;
  }
  return std::nullopt;
}

bool IsValidUtf8(std::string_view text) { return !FirstInvalidUtf8(text).has_value(); }

std::string ToValidUtf8(std::string_view bytes) {
  if (IsValidUtf8(bytes)) return std::string(bytes);
  const auto* s = reinterpret_cast<const uint8_t*>(bytes.data());
  std::string out;
  out.reserve(bytes.size() + 8);
  for (size_t i = 0; i < bytes.size();) {
    const int len = CheckSequence(s + i, bytes.size() - i);
    if (len > 0) {
      out.append(bytes.substr(i, len));
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      ++i;
    }
  }
  return out;
}

size_t IncompleteUtf8Suffix(std::string_view text) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  // A lead byte at most 3 bytes before the end could start an unfinished sequence.
  for (size_t back = 1; back <= 3 && back <= text.size(); ++back) {
    const size_t i = text.size() - back;
    if ((s[i] & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    return CheckSequence(s + i, back) < 0 ? back : 0;
  }
  return 0;
}

uint32_t ByteToCodepoint(uint8_t byte) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table[byte];
}

int CodepointToByte(uint32_t cpt) {
  static const std::array<int16_t, 324> table = [] {
    std::array<int16_t, 324> t;
    t.fill(-1);
    for (uint32_t b = 0; b < 256; ++b) t[ByteToCodepoint(static_cast<uint8_t>(b))] = b;
    return t;
  }();
  return cpt < table.size() ? table[cpt] : -1;
}

std::vector<size_t> Split(absl::Span<const uint32_t> cpts, absl::Span<const SplitRule> rules) {
  std::vector<size_t> words;
  if (cpts.empty()) return words;
  words.push_back(cpts.size());
  std::vector<size_t> next;
  for (const SplitRule rule : rules) {
    next.clear();
    size_t start = 0;
    for (const size_t len : words) {
      ApplyRule(rule, cpts, start, start + len, &next);
      start += len;
    }
    words.swap(next);
  }
  return words;
}

}  // namespace ctxcache::unicode
