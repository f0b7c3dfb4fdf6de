// Helpers shared by the fuzz targets: a loud invariant check, and the input layout most
// targets use (fields separated by a byte that seeds and dictionaries can spell).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string_view>
#include <vector>

namespace ctxcache::fuzz {

// A broken invariant must be loud: libFuzzer and the replay driver notice crashes only. The
// message names the invariant, so a crash report says what broke before the stack does.
#define FUZZ_CHECK(cond)                                                                       \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "fuzz invariant broken at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      __builtin_trap();                                                                        \
    }                                                                                          \
  } while (0)

// The input split at every `sep` byte (n separators give n + 1 fields, empty ones included).
inline std::vector<std::string_view> SplitFields(const uint8_t* data, size_t size,
                                                 char sep = '\0') {
  std::vector<std::string_view> out;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  size_t start = 0;
  for (size_t i = 0; i <= in.size(); ++i) {
    if (i == in.size() || in[i] == sep) {
      out.push_back(in.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

}  // namespace ctxcache::fuzz
