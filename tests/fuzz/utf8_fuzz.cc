// Fuzz target for the UTF-8 helpers of engine/unicode.h: validation (what the service accepts
// as text), repair (what a stream emits for bytes that are not text), the held-back suffix of
// an unfinished character (IncrementalDecoder) and decoding to code points (the pre-tokenizer).
// Differential against a reference written from the Unicode standard's definition (D92: a
// code point's shortest encoding, no surrogates, nothing past U+10FFFF) by computing the code
// point, where the code under test checks byte ranges (Table 3-7).
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/unicode.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

namespace unicode = ctxcache::unicode;

// Length of the well-formed sequence at s[i..], or 0 when none starts there.
size_t RefSequence(std::string_view s, size_t i, uint32_t* cp_out = nullptr) {
  const auto b = static_cast<uint8_t>(s[i]);
  size_t len;
  uint32_t cp, min;
  if (b < 0x80) {
    if (cp_out) *cp_out = b;
    return 1;
  } else if ((b & 0xE0) == 0xC0) {
    len = 2, cp = b & 0x1F, min = 0x80;
  } else if ((b & 0xF0) == 0xE0) {
    len = 3, cp = b & 0x0F, min = 0x800;
  } else if ((b & 0xF8) == 0xF0) {
    len = 4, cp = b & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    const auto c = static_cast<uint8_t>(s[i + k]);
    if ((c & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (c & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  if (cp_out) *cp_out = cp;
  return len;
}

bool RefValid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t len = RefSequence(s, i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

// Each byte that starts no well-formed sequence becomes U+FFFD.
std::string RefRepair(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const size_t len = RefSequence(s, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  return out;
}

size_t AnnouncedLength(uint8_t lead) {
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

// The bytes at the end that begin a character more bytes could still complete: the last
// lead byte among the final three, when its bytes so far extend to a well-formed sequence.
// The only constraints past the lead are on the second byte, and each allowed range touches
// 0x80 or 0xBF, so trying both fillers decides it.
size_t RefIncompleteSuffix(std::string_view s) {
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const std::string_view tail = s.substr(s.size() - back);
    if ((static_cast<uint8_t>(tail[0]) & 0xC0) == 0x80) continue;
    const size_t len = AnnouncedLength(static_cast<uint8_t>(tail[0]));
    if (len <= back) return 0;
    for (char filler : {'\x80', '\xBF'}) {
      const std::string completed = std::string(tail) + std::string(len - back, filler);
      if (RefSequence(completed, 0) == len) return back;
    }
    return 0;
  }
  return 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const bool valid = unicode::IsValidUtf8(in);
  FUZZ_CHECK(valid == RefValid(in));
  // The first bad offset (what the server's INVALID_ARGUMENT names): everything before it is
  // valid, and the text from it on is not.
  const std::optional<size_t> bad = unicode::FirstInvalidUtf8(in);
  FUZZ_CHECK(bad.has_value() == !valid);
  if (bad) {
    FUZZ_CHECK(*bad < in.size());
    FUZZ_CHECK(RefValid(in.substr(0, *bad)));
    FUZZ_CHECK(!RefValid(in.substr(*bad)));
  }

  const std::string repaired = unicode::ToValidUtf8(in);
  FUZZ_CHECK(repaired == RefRepair(in));
  FUZZ_CHECK(unicode::IsValidUtf8(repaired));
  FUZZ_CHECK(!valid || repaired == in);

  const size_t hold = unicode::IncompleteUtf8Suffix(in);
  FUZZ_CHECK(hold == RefIncompleteSuffix(in));
  // What a stream emits before the held bytes never ends inside a character that the held
  // bytes begin: valid text cut anywhere splits into a valid head and a held tail.
  if (valid) {
    for (size_t cut = 0; cut <= in.size() && cut < 8; ++cut) {
      const std::string_view head = in.substr(0, in.size() - cut);
      FUZZ_CHECK(
          unicode::IsValidUtf8(head.substr(0, head.size() - unicode::IncompleteUtf8Suffix(head))));
    }
  }

  // Decoding: well-formed text decodes to the reference code points, which re-encode to it.
  std::vector<uint32_t> cpts;
  unicode::DecodeUtf8(in, &cpts);
  FUZZ_CHECK(cpts.size() <= in.size());
  for (uint32_t c : cpts) FUZZ_CHECK(c <= 0x10FFFF);
  if (valid) {
    std::vector<uint32_t> want;
    for (size_t i = 0; i < in.size();) {
      uint32_t cp = 0;
      i += RefSequence(in, i, &cp);
      want.push_back(cp);
    }
    FUZZ_CHECK(cpts == want);
    std::string back;
    for (uint32_t c : cpts) unicode::AppendUtf8(c, &back);
    FUZZ_CHECK(back == in);
  }
  return 0;
}
