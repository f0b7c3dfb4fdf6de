// Fuzz target for StopMatcher (engine/generate.h), which decides, token by token, how much of
// the generated text may be streamed while a stop string could still be completing.
// Differential: after every Push, what was streamed so far must equal a naive reference
// computed from the whole text so far:
//  * some stop string occurs: stopped, and the stream is the text before its first occurrence;
//  * otherwise: not stopped, and the stream is the text less its longest suffix that is a
//    proper prefix of a stop string (held back: neither more, which would leak the start of a
//    stop string, nor less, which would delay text for nothing).
// At the end, the stream plus Flush() is the whole text.
//
// Input: fields separated by NUL; the first byte's low 2 bits + 1 is the number of stop
// strings, the next fields are those strings (empty ones are skipped: ValidateGenerateParams
// rejects them), the rest are the pushed chunks.
#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "engine/generate.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using ctxcache::fuzz::SplitFields;

struct Expected {
  bool stopped = false;
  size_t streamed = 0;  // bytes of the text that may have been streamed
};

Expected Reference(const std::string& text, const std::vector<std::string>& stops) {
  Expected e;
  size_t first = std::string::npos;
  for (const std::string& s : stops) first = std::min(first, text.find(s));
  if (first != std::string::npos) return {true, first};
  size_t hold = 0;
  for (const std::string& s : stops) {
    for (size_t len = 1; len < s.size() && len <= text.size(); ++len) {
      if (text.compare(text.size() - len, len, s, 0, len) == 0) hold = std::max(hold, len);
    }
  }
  e.streamed = text.size() - hold;
  return e;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t n_stop = (data[0] & 3) + 1;
  const std::vector<std::string_view> fields = SplitFields(data + 1, size - 1);
  std::vector<std::string> stops;
  size_t i = 0;
  for (; i < fields.size() && i < n_stop; ++i) {
    if (!fields[i].empty()) stops.emplace_back(fields[i]);
  }
  if (stops.empty()) return 0;
  ctxcache::StopMatcher matcher(stops);
  std::string text, streamed;
  bool stopped = false;
  for (; i < fields.size() && !stopped; ++i) {
    text.append(fields[i]);
    streamed += matcher.Push(fields[i], &stopped);
    const Expected want = Reference(text, stops);
    FUZZ_CHECK(stopped == want.stopped);
    FUZZ_CHECK(streamed == std::string_view(text).substr(0, want.streamed));
  }
  if (!stopped) {
    streamed += matcher.Flush();
    FUZZ_CHECK(streamed == text);
  }
  return 0;
}
