// Fuzz target for what the Redis tier (cache/redis_tier.h) reads back from a shared Redis
// before it trusts an entry: the metadata record, and the key escaping that keeps tenants
// apart. Invariants:
//  * ParseMeta accepts exactly FormatMeta's output for a meta within the limits: anything it
//    accepts is that text (one text per record), and what it reads agrees with the quota
//    script's Lua pattern '^ctxm1 (%x+) %d+ (%d+) ' (write id and size), so C++ and Lua never
//    account one entry two ways;
//  * FormatMeta then ParseMeta is the identity for any meta within the limits;
//  * Escape's output uses only [A-Za-z0-9._-%] (never ':', the key separator) and decodes back
//    to its input (so it is injective: no two tenants share a prefix).
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "cache/redis_tier.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using Meta = ctxcache::RedisTier::Meta;

bool IsHex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// Lua's string.match(text, '^ctxm1 (%x+) %d+ (%d+) '): false when it does not match.
bool LuaMatch(std::string_view t, std::string* wid, std::string* size) {
  if (t.substr(0, 6) != "ctxm1 ") return false;
  size_t i = 6, start = i;
  while (i < t.size() && IsHex(t[i])) ++i;
  if (i == start || i >= t.size() || t[i] != ' ') return false;
  *wid = std::string(t.substr(start, i - start));
  start = ++i;
  while (i < t.size() && IsDigit(t[i])) ++i;
  if (i == start || i >= t.size() || t[i] != ' ') return false;
  start = ++i;
  while (i < t.size() && IsDigit(t[i])) ++i;
  if (i == start || i >= t.size() || t[i] != ' ') return false;
  *size = std::string(t.substr(start, i - start));
  return true;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;  // Escape writes upper case only
}

void CheckEscape(const std::string& s) {
  const std::string e = ctxcache::RedisTier::Escape(s);
  std::string back;
  for (size_t i = 0; i < e.size(); ++i) {
    const char c = e[i];
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || IsDigit(c) || c == '.' ||
                       c == '_' || c == '-';
    if (plain) {
      back.push_back(c);
      continue;
    }
    FUZZ_CHECK(c == '%' && i + 2 < e.size());
    const int hi = HexValue(e[i + 1]), lo = HexValue(e[i + 2]);
    FUZZ_CHECK(hi >= 0 && lo >= 0);
    back.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  FUZZ_CHECK(back == s);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  auto meta = ctxcache::RedisTier::ParseMeta(text);
  if (meta.ok()) {
    FUZZ_CHECK(ctxcache::RedisTier::FormatMeta(*meta) == text);
    FUZZ_CHECK(meta->parts >= 1 && meta->parts <= (1 << 20));
    FUZZ_CHECK(meta->bytes >= meta->parts && meta->bytes <= (int64_t{1} << 40));
    std::string wid, lua_size;
    FUZZ_CHECK(LuaMatch(text, &wid, &lua_size));
    FUZZ_CHECK(wid == meta->write_id && lua_size == std::to_string(meta->bytes));
  } else {
    FUZZ_CHECK(meta.status().code() == absl::StatusCode::kDataLoss);
  }

  // Any meta within the limits, built from the input's bytes, survives Format then Parse.
  if (size >= 20) {
    Meta m;
    static constexpr char kHex[] = "0123456789abcdef";
    for (int i = 0; i < 32; ++i) {
      const int nibble = (data[(i / 2) % 20] >> (i % 2 ? 0 : 4)) & 15;
      m.write_id.push_back(kHex[nibble]);
    }
    uint64_t a, b;
    std::memcpy(&a, data + 4, 8);
    std::memcpy(&b, data + 12, 8);
    std::memcpy(&m.crc, data, 4);
    m.parts = 1 + static_cast<int64_t>(a % (1 << 20));
    m.bytes = m.parts + static_cast<int64_t>(b % ((int64_t{1} << 40) - m.parts + 1));
    auto back = ctxcache::RedisTier::ParseMeta(ctxcache::RedisTier::FormatMeta(m));
    FUZZ_CHECK(back.ok());
    FUZZ_CHECK(back->write_id == m.write_id && back->parts == m.parts && back->bytes == m.bytes &&
               back->crc == m.crc);
  }

  CheckEscape(text);
  return 0;
}
