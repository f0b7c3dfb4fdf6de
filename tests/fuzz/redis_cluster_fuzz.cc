// Fuzz target for what the Redis Cluster client and the cross-replica invalidation read from
// the network or configuration (cache/redis_cluster.h, cache/invalidation.h). Every check runs
// on the whole input (seeds are real messages, replies and URLs, each exercising its parser).
// Invariants:
//  * ParseInvalidation accepts exactly what FormatInvalidation writes (an independent
//    reference decides which texts those are; an accepted text formats back to itself), and
//    anything else is DataLoss; the message's names are escaped as the Redis key layout
//    (RedisTier::Escape); an invalidation built from the input's bytes survives Format then
//    Parse;
//  * UnescapeRedisName is RedisTier::Escape's inverse: Unescape(Escape(s)) == s for any s, and
//    it accepts exactly Escape's outputs (ok implies Escape(result) is the input);
//  * ParseClusterSlots on whatever hiredis's reader makes of the input never crashes; OK means
//    one range per element, sorted, disjoint, within 0..16383, ports in 1..65535, hosts
//    non-empty without space/CR/LF ("" and "?" become the host asked); an error reply is
//    Unavailable, anything else malformed DataLoss. A well-formed reply built from the input's
//    bytes (Redis 7 layout: [first, last, [ip, port, id, [meta]], replicas...]) parses to the
//    ranges it encodes;
//  * ParseRedisClusterUrl never crashes, fails with InvalidArgument only, never shows a
//    password in its message, and what it accepts is 1..64 seeds of db 0 with valid ports;
//  * RedisKeySlot agrees with a plain bit-serial CRC16-XMODEM and the hash tag rule.
#include <hiredis/hiredis.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/invalidation.h"
#include "cache/redis_cluster.h"
#include "cache/redis_tier.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using ctxcache::Invalidation;

// ---- Names and invalidation messages ----

bool IsPlain(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

int UpperHexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Reference: could Escape have written `s`? Plain bytes, or %XX (upper-case hex) of a byte
// that is not plain.
bool IsEscapedName(std::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (IsPlain(static_cast<unsigned char>(s[i]))) continue;
    if (s[i] != '%' || i + 2 >= s.size()) return false;
    const int hi = UpperHexValue(s[i + 1]), lo = UpperHexValue(s[i + 2]);
    if (hi < 0 || lo < 0 || IsPlain(static_cast<unsigned char>(hi * 16 + lo))) return false;
    i += 2;
  }
  return true;
}

bool IsWriteId(std::string_view s) {
  if (s.size() != 32) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// Reference: is `t` a message FormatInvalidation writes? "ctxinv1 d|s T K W", fields split at
// single spaces, T and K escaped names, K not empty, W "-" for d and a write id for s.
bool IsInvalidationText(std::string_view t) {
  std::vector<std::string_view> f;
  size_t start = 0;
  for (size_t i = 0; i <= t.size(); ++i) {
    if (i == t.size() || t[i] == ' ') {
      f.push_back(t.substr(start, i - start));
      start = i + 1;
    }
  }
  if (f.size() != 5 || f[0] != "ctxinv1" || (f[1] != "d" && f[1] != "s")) return false;
  if (!IsEscapedName(f[2]) || !IsEscapedName(f[3]) || f[3].empty()) return false;
  return f[1] == "d" ? f[4] == "-" : IsWriteId(f[4]);
}

std::string ExpectedText(const Invalidation& v) {
  const bool stored = v.kind == Invalidation::Kind::kStored;
  return absl::StrCat("ctxinv1 ", stored ? "s " : "d ", ctxcache::RedisTier::Escape(v.tenant), " ",
                      ctxcache::RedisTier::Escape(v.key), " ", stored ? v.write_id : "-");
}

void CheckInvalidation(std::string_view text) {
  const auto parsed = ctxcache::ParseInvalidation(text);
  FUZZ_CHECK(parsed.ok() == IsInvalidationText(text));
  if (!parsed.ok()) {
    FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kDataLoss);
    return;
  }
  FUZZ_CHECK(ctxcache::FormatInvalidation(*parsed) == text);
  FUZZ_CHECK(ExpectedText(*parsed) == text);
  FUZZ_CHECK(!parsed->key.empty());
  FUZZ_CHECK(parsed->kind == Invalidation::Kind::kStored ? IsWriteId(parsed->write_id)
                                                         : parsed->write_id.empty());
}

// An invalidation from the input's bytes: kind from byte 0, tenant of byte 1's length, the
// key the rest (never empty), a write id from the bytes' nibbles.
void CheckInvalidationRoundTrip(const uint8_t* data, size_t size) {
  if (size < 2) return;
  Invalidation v;
  v.kind = (data[0] & 1) != 0 ? Invalidation::Kind::kStored : Invalidation::Kind::kDeleted;
  const std::string_view rest(reinterpret_cast<const char*>(data + 2), size - 2);
  const size_t tenant_len = std::min<size_t>(data[1], rest.size());
  v.tenant = std::string(rest.substr(0, tenant_len));
  v.key = std::string(rest.substr(tenant_len));
  if (v.key.empty()) v.key.push_back('k');  // (= "k" trips gcc 12's -Wrestrict)
  if (v.kind == Invalidation::Kind::kStored) {
    static constexpr char kHex[] = "0123456789abcdef";
    for (size_t i = 0; i < 32; ++i) {
      v.write_id.push_back(kHex[(data[i / 2 % size] >> (i % 2 * 4)) & 15]);
    }
  }
  const std::string text = ctxcache::FormatInvalidation(v);
  FUZZ_CHECK(text == ExpectedText(v));
  const auto back = ctxcache::ParseInvalidation(text);
  FUZZ_CHECK(back.ok());
  FUZZ_CHECK(back->kind == v.kind && back->tenant == v.tenant && back->key == v.key &&
             back->write_id == v.write_id);
}

void CheckEscape(const std::string& s) {
  const std::string escaped = ctxcache::RedisTier::Escape(s);
  const auto back = ctxcache::UnescapeRedisName(escaped);
  FUZZ_CHECK(back.ok() && *back == s);
  // The input taken as an escaped name.
  const auto un = ctxcache::UnescapeRedisName(s);
  FUZZ_CHECK(un.ok() == IsEscapedName(s));
  if (un.ok()) {
    FUZZ_CHECK(ctxcache::RedisTier::Escape(*un) == s);
  } else {
    FUZZ_CHECK(un.status().code() == absl::StatusCode::kDataLoss);
  }
}

// ---- CLUSTER SLOTS ----

constexpr std::string_view kAskedHost = "192.0.2.1";

struct ReaderFree {
  void operator()(redisReader* r) const { redisReaderFree(r); }
};
struct ReplyFree {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reader = std::unique_ptr<redisReader, ReaderFree>;
using Reply = std::unique_ptr<redisReply, ReplyFree>;

// hiredis 0.14 allocates an array's element vector as soon as it reads "*<count>" (up to
// INT_MAX elements, before any arrives): a big count is hiredis's memory, not the parser's
// bug. Inputs with a count over 1024 anywhere (also inside strings: conservative) are not fed.
bool SmallAggregates(std::string_view in) {
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '*') continue;
    size_t j = i + 1;
    if (j < in.size() && (in[j] == '+' || in[j] == '-')) ++j;
    size_t digits = 0;
    long value = 0;
    while (j < in.size() && in[j] >= '0' && in[j] <= '9' && digits <= 4) {
      value = value * 10 + (in[j] - '0');
      ++digits;
      ++j;
    }
    if (digits > 4 || value > 1024) return false;
  }
  return true;
}

// The first complete reply hiredis reads from `in`, or null (incomplete or a protocol error).
Reply ReadReply(std::string_view in) {
  Reader reader(redisReaderCreate());
  FUZZ_CHECK(reader != nullptr);
  if (redisReaderFeed(reader.get(), in.data(), in.size()) != REDIS_OK) return nullptr;
  void* raw = nullptr;
  if (redisReaderGetReply(reader.get(), &raw) != REDIS_OK) {
    if (raw != nullptr) freeReplyObject(raw);
    return nullptr;
  }
  return Reply(static_cast<redisReply*>(raw));
}

void CheckParsedSlots(const redisReply& reply,
                      const absl::StatusOr<std::vector<ctxcache::RedisSlotRange>>& ranges) {
  if (!ranges.ok()) {
    FUZZ_CHECK(ranges.status().code() == (reply.type == REDIS_REPLY_ERROR
                                              ? absl::StatusCode::kUnavailable
                                              : absl::StatusCode::kDataLoss));
    return;
  }
  FUZZ_CHECK(reply.type == REDIS_REPLY_ARRAY);
  FUZZ_CHECK(ranges->size() == reply.elements);
  for (size_t i = 0; i < ranges->size(); ++i) {
    const ctxcache::RedisSlotRange& r = (*ranges)[i];
    FUZZ_CHECK(0 <= r.first && r.first <= r.last && r.last < ctxcache::kRedisClusterSlots);
    FUZZ_CHECK(i == 0 || (*ranges)[i - 1].last < r.first);
    FUZZ_CHECK(r.port >= 1 && r.port <= 65535);
    FUZZ_CHECK(!r.host.empty() && r.host.find_first_of(" \r\n") == std::string::npos);
    // It is one of the reply's elements, as written (bar the host asked for).
    bool found = false;
    for (size_t e = 0; e < reply.elements && !found; ++e) {
      const redisReply& el = *reply.element[e];
      if (el.element[0]->integer != r.first || el.element[1]->integer != r.last) continue;
      const redisReply& node = *el.element[2];
      const std::string host(node.element[0]->str, node.element[0]->len);
      found = node.element[1]->integer == r.port &&
              (host == r.host || ((host.empty() || host == "?") && r.host == kAskedHost));
    }
    FUZZ_CHECK(found);
  }
}

void CheckRawSlots(std::string_view in) {
  if (!SmallAggregates(in)) return;
  const Reply reply = ReadReply(in);
  if (reply == nullptr) return;
  CheckParsedSlots(*reply, ctxcache::ParseClusterSlots(*reply, kAskedHost));
}

// Takes bytes from the input, zeros once it runs out.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t U8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint16_t U16() {
    const uint8_t hi = U8();
    return static_cast<uint16_t>(hi << 8 | U8());
  }

 private:
  const uint8_t* data_;
  size_t size_, pos_ = 0;
};

void AppendBulk(std::string* out, std::string_view s) {
  absl::StrAppend(out, "$", s.size(), "\r\n");
  out->append(s);
  out->append("\r\n");
}

// A node as Redis 7.0 writes it: [endpoint, port, id, [metadata key/value...]] (6.x: no
// metadata; some builds more fields).
std::string NodeResp(Bytes& b, const std::string& endpoint, int port) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id;
  for (int i = 0; i < 40; ++i) id.push_back(kHex[(b.U8() + i) & 15]);
  const int shape = b.U8() % 4;  // 0: 6.x, 1: empty metadata, 2: hostname, 3: extra field
  std::string out = absl::StrCat("*", shape == 0 ? 3 : 4, "\r\n");
  AppendBulk(&out, endpoint);
  absl::StrAppend(&out, ":", port, "\r\n");
  AppendBulk(&out, id);
  if (shape == 1) out += "*0\r\n";
  if (shape == 2) {
    out += "*2\r\n";
    AppendBulk(&out, "hostname");
    AppendBulk(&out, absl::StrCat("redis-", port % 97, ".redis.svc"));
  }
  if (shape == 3) out += ":0\r\n";
  return out;
}

std::string Endpoint(Bytes& b, std::string* expected) {
  const uint8_t x = b.U8(), y = b.U8();
  switch (b.U8() % 6) {
    case 0:
      *expected = std::string(kAskedHost);
      return "";
    case 1:
      *expected = std::string(kAskedHost);
      return "?";
    case 2:
      *expected = absl::StrCat("fd00::", x, ":", y);
      return *expected;
    case 3:
      *expected = absl::StrCat("redis-", x, ".redis.svc.cluster.local");
      return *expected;
    default:
      *expected = absl::StrCat("10.0.", x, ".", y);
      return *expected;
  }
}

void CheckBuiltSlots(const uint8_t* data, size_t size) {
  Bytes b(data, size);
  std::vector<ctxcache::RedisSlotRange> expected;
  std::vector<std::string> elements;
  int slot = b.U8() % 8 == 0 ? b.U8() : 0;  // mostly from slot 0
  while (!b.empty() && slot < ctxcache::kRedisClusterSlots && expected.size() < 64) {
    ctxcache::RedisSlotRange r;
    r.first = slot;
    r.last = slot + b.U16() % (ctxcache::kRedisClusterSlots - slot);
    std::string endpoint = Endpoint(b, &r.host);
    r.port = 1 + b.U16() % 65535;
    std::string e;
    const int replicas = b.U8() % 3;
    absl::StrAppend(&e, "*", 3 + replicas, "\r\n:", r.first, "\r\n:", r.last, "\r\n");
    e += NodeResp(b, endpoint, r.port);
    for (int i = 0; i < replicas; ++i) {
      std::string ignored;
      const std::string replica = Endpoint(b, &ignored);
      e += NodeResp(b, replica, 1 + b.U16() % 65535);
    }
    elements.push_back(std::move(e));
    expected.push_back(std::move(r));
    const uint8_t gap = b.U8();
    slot = expected.back().last + 1 + (gap % 4 == 0 ? gap : 0);  // mostly adjacent
  }
  // Redis writes ranges in slot order; the parser must not rely on it.
  if (!elements.empty()) {
    const size_t turn = b.U8() % elements.size();
    std::rotate(elements.begin(), elements.begin() + static_cast<std::ptrdiff_t>(turn),
                elements.end());
    if ((b.U8() & 1) != 0) std::reverse(elements.begin(), elements.end());
  }
  std::string resp = absl::StrCat("*", elements.size(), "\r\n");
  for (const std::string& e : elements) resp += e;
  const Reply reply = ReadReply(resp);
  FUZZ_CHECK(reply != nullptr);
  const auto ranges = ctxcache::ParseClusterSlots(*reply, kAskedHost);
  FUZZ_CHECK(ranges.ok());
  CheckParsedSlots(*reply, ranges);
  FUZZ_CHECK(ranges->size() == expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    const ctxcache::RedisSlotRange &got = (*ranges)[i], &want = expected[i];
    FUZZ_CHECK(got.first == want.first && got.last == want.last && got.host == want.host &&
               got.port == want.port);
  }
}

// ---- Cluster URLs ----

bool IsLetters(std::string_view s) {
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) return false;
  }
  return true;
}

// Every fixed phrase of the messages (the cluster parser's and the redis:// parser's, which
// it quotes): a password that is a piece of one of them shows up for other reasons.
constexpr std::string_view kWording =
    "bad redis cluster URL: it must start with redis-cluster:// no seed node a cluster has "
    "database 0 only: no /db an empty seed in the list more than 64 seeds (expected "
    "redis-cluster://[user:password@]host:port[,host:port...]) bad redis cluster URL, seed "
    "bad redis URL: (expected redis://[user:password@]host[:port][/db]) TLS (rediss://) is not "
    "supported by this build it must start with redis:// query parameters and fragments are not "
    "supported credentials must be user:password@ or :password@ (a user needs a password) "
    "bad percent-escape in the user name password (write %XX with two hex digits) the password "
    "is empty unterminated [ in the IPv6 host expected :port after the ] the port after ':' is "
    "empty bad IPv6 host an IPv6 host goes in brackets: redis://[::1]:6379 the host is missing "
    "bad host \" the port must be a number in 1..65535, got \" the database must be a number "
    ">= 0, got \" ***";

void CheckClusterUrl(std::string_view url) {
  const auto parsed = ctxcache::ParseRedisClusterUrl(url);
  if (parsed.ok()) {
    FUZZ_CHECK(ctxcache::IsRedisClusterUrl(url));
    FUZZ_CHECK(!parsed->seeds.empty() && parsed->seeds.size() <= 64);
    for (const ctxcache::RedisUrl& s : parsed->seeds) {
      FUZZ_CHECK(!s.host.empty());
      FUZZ_CHECK(s.port >= 1 && s.port <= 65535);
      FUZZ_CHECK(s.db == 0);
      FUZZ_CHECK(s.user == parsed->seeds[0].user && s.password == parsed->seeds[0].password);
      FUZZ_CHECK(s.user.empty() || !s.password.empty());
    }
  } else {
    FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
  }

  // The password: after the scheme, before the last '@', after the first ':'. Checked when it
  // is 6+ letters found nowhere public (the scheme, the user, what follows the '@', the
  // wording): every value the messages quote is quoted, so a run of letters cannot straddle
  // a quote and be the password by accident.
  if (parsed.ok()) return;
  const size_t scheme = url.find("://");
  const size_t at = url.rfind('@');
  if (scheme == std::string_view::npos || at == std::string_view::npos || at < scheme + 3) return;
  const std::string_view userinfo = url.substr(scheme + 3, at - scheme - 3);
  const size_t colon = userinfo.find(':');
  if (colon == std::string_view::npos) return;
  const std::string_view user = userinfo.substr(0, colon);
  const std::string_view secret = userinfo.substr(colon + 1);
  if (secret.size() < 6 || !IsLetters(secret)) return;
  for (std::string_view part : {url.substr(0, scheme + 3), user, url.substr(at), kWording}) {
    if (part.find(secret) != std::string_view::npos) return;
  }
  const std::string message(parsed.status().message());
  FUZZ_CHECK(message.find(secret) == std::string::npos);
}

// ---- Hash slots ----

// Bit-serial CRC16-XMODEM (polynomial 0x1021, initial 0, no reflection, no final xor).
uint16_t ReferenceCrc16(std::string_view s) {
  unsigned crc = 0;
  for (unsigned char byte : s) {
    for (int bit = 7; bit >= 0; --bit) {
      const unsigned feedback = ((crc >> 15) & 1u) ^ ((byte >> bit) & 1u);
      crc = (crc << 1) & 0xFFFFu;
      if (feedback != 0) crc ^= 0x1021u;
    }
  }
  return static_cast<uint16_t>(crc);
}

int ReferenceSlot(std::string_view key) {
  size_t open = 0;
  while (open < key.size() && key[open] != '{') ++open;
  if (open < key.size()) {
    size_t close = open + 1;
    while (close < key.size() && key[close] != '}') ++close;
    if (close < key.size() && close > open + 1) key = key.substr(open + 1, close - open - 1);
  }
  return ReferenceCrc16(key) % 16384;
}

void CheckKeySlot(std::string_view key) {
  const int slot = ctxcache::RedisKeySlot(key);
  FUZZ_CHECK(slot >= 0 && slot < ctxcache::kRedisClusterSlots);
  FUZZ_CHECK(slot == ReferenceSlot(key));
  FUZZ_CHECK(ctxcache::Crc16Xmodem(key) == ReferenceCrc16(key));
}

// The reference against known values (CRC catalogue's check value, Redis's documentation).
bool ReferenceIsRight() {
  return ReferenceCrc16("123456789") == 0x31C3 && ReferenceSlot("foo") == 12182 &&
         ReferenceSlot("bar") == 5061 &&
         ReferenceSlot("{user1000}.following") == ReferenceSlot("{user1000}.followers") &&
         ReferenceSlot("foo{}{bar}") == ReferenceCrc16("foo{}{bar}") % 16384 &&
         ReferenceSlot("foo{{bar}}zap") == ReferenceSlot("{bar") &&
         ReferenceSlot("foo{bar}{zap}") == ReferenceSlot("bar");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool reference_ok = ReferenceIsRight();
  FUZZ_CHECK(reference_ok);
  const std::string text(reinterpret_cast<const char*>(data), size);

  CheckInvalidation(text);
  CheckInvalidationRoundTrip(data, size);
  CheckEscape(text);
  CheckRawSlots(text);
  CheckBuiltSlots(data, size);
  CheckClusterUrl(text);
  CheckKeySlot(text);
  return 0;
}
