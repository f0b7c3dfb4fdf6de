// The compressed-context codec (format in codec.h): a size-exact writer, a bounds-checked
// reader that validates in the order that gives the most useful message (what is it, which
// version, is it whole, is it intact, is it ours, is it consistent), and atomic file I/O.
#include "cache/codec.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cache/crc32c.h"
#include "common/half.h"
#include "common/sha256.h"
#include "common/status.h"
#include "engine/cpu/attention.h"

namespace ctxcache {

// The format is little-endian and the codec copies values with memcpy; a big-endian port
// would need byte swaps in Put/Get.
static_assert(std::endian::native == std::endian::little, "codec assumes a little-endian host");

namespace {

// Limits well above any real model (Llama-3-405B: 126 layers, 8 KV heads, head_dim 128) that
// keep every size computation below far from overflow and reject absurd headers outright.
constexpr uint32_t kMaxLayers = 4096;
constexpr uint32_t kMaxKvHeads = 4096;
constexpr uint32_t kMaxHeadDim = 65536;
constexpr uint32_t kMaxDModel = 1u << 20;
constexpr size_t kMaxMethodBytes = 256;
constexpr size_t kMaxParamsBytes = size_t{1} << 20;
constexpr size_t kFingerprintBytes = 32;
constexpr size_t kChecksumBytes = 4;

// Header field offsets (see the table in codec.h).
constexpr size_t kOffVersion = 4, kOffKind = 6, kOffDtype = 7, kOffTotalSize = 8,
                 kOffFingerprint = 16, kOffMethodVersion = 48, kOffNextPosition = 52,
                 kOffSourceTokens = 56, kOffNLayers = 64, kOffNKvHeads = 68, kOffHeadDim = 72,
                 kOffDModel = 76, kOffDigestTokens = 80;
static_assert(kOffDigestTokens + 8 == kContextHeaderBytes);

bool KnownDtype(uint8_t d) { return d >= 1 && d <= 4; }
bool KnownKind(uint8_t k) { return k == 1 || k == 2; }

// Bytes of one row of `cols` values (cols <= kMaxDModel, so this cannot overflow).
uint64_t RowBytes(KvDtype dtype, uint64_t cols) {
  switch (dtype) {
    case KvDtype::kF16:
    case KvDtype::kBf16:
      return 2 * cols;
    case KvDtype::kF32:
      return 4 * cols;
    case KvDtype::kInt8:
      return 4 + cols;  // fp32 scale + one byte per value
  }
  return 4 * cols;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// Model::fingerprint() is lowercase hex of a SHA-256; stored as its 32 raw bytes. Uppercase
// is refused rather than folded, so that decode(encode(c)) == c for every accepted c.
absl::Status ParseFingerprint(std::string_view hex, uint8_t out[kFingerprintBytes]) {
  if (hex.size() != 2 * kFingerprintBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("model fingerprint must be 64 lowercase hex characters (a SHA-256), got ",
                     hex.size(), " characters"));
  }
  for (size_t i = 0; i < kFingerprintBytes; ++i) {
    const int hi = HexDigit(hex[2 * i]), lo = HexDigit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("model fingerprint must be 64 lowercase hex characters, found '",
                       std::string(hex.substr(hi < 0 ? 2 * i : 2 * i + 1, 1)), "' at ",
                       hi < 0 ? 2 * i : 2 * i + 1));
    }
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return absl::OkStatus();
}

// "81ee8e0f..." for messages: enough to tell models apart at a glance.
std::string FingerprintPrefix(std::string_view fp) {
  return fp.size() > 8 ? absl::StrCat(std::string(fp.substr(0, 8)), "...") : std::string(fp);
}

std::string HeadName(int layer, int head) { return absl::StrCat("layer ", layer, " head ", head); }

// ---- Writing -------------------------------------------------------------------------------

// Writes into a buffer sized exactly beforehand (EncodeContext computes the size), so the
// payload is never reallocated while it grows.
class Writer {
 public:
  explicit Writer(char* p) : p_(p) {}
  char* pos() const { return p_; }

  template <typename T>
  void Put(T v) {
    std::memcpy(p_, &v, sizeof v);
    p_ += sizeof v;
  }
  void Bytes(const void* data, size_t n) {
    if (n > 0) std::memcpy(p_, data, n);
    p_ += n;
  }

  // `rows` rows of `cols` values in `dtype`. Fails (naming `what`) where the dtype cannot
  // hold a value: a finite value past fp16's range would silently become inf, and int8's
  // scale is undefined for inf/nan.
  absl::Status Rows(const float* x, int64_t rows, int64_t cols, KvDtype dtype,
                    const std::string& what) {
    const int64_t n = rows * cols;
    switch (dtype) {
      case KvDtype::kF16:
        for (int64_t i = 0; i < n; ++i) {
          const uint16_t h = Fp32ToFp16(x[i]);
          if ((h & 0x7fff) == 0x7c00 && std::isfinite(x[i])) {
            return absl::InvalidArgumentError(
                absl::StrCat(what, ": value ", x[i], " at row ", i / cols,
                             " overflows fp16; store this context as bf16 or fp32"));
          }
          Put(h);
        }
        return absl::OkStatus();
      case KvDtype::kBf16:
        for (int64_t i = 0; i < n; ++i) Put(Fp32ToBf16(x[i]));
        return absl::OkStatus();
      case KvDtype::kF32:
        Bytes(x, static_cast<size_t>(n) * 4);
        return absl::OkStatus();
      case KvDtype::kInt8:
        for (int64_t r = 0; r < rows; ++r) {
          const float* row = x + r * cols;
          float amax = 0;
          for (int64_t c = 0; c < cols; ++c) {
            if (!std::isfinite(row[c])) {
              return absl::InvalidArgumentError(
                  absl::StrCat(what, ": non-finite value at row ", r, " cannot be stored as int8"));
            }
            amax = std::max(amax, std::fabs(row[c]));
          }
          const float scale = amax / 127.0f;
          const float inv = amax > 0 ? 127.0f / amax : 0.0f;
          Put(scale);
          for (int64_t c = 0; c < cols; ++c) {
            const float q = std::nearbyint(row[c] * inv);
            Put(static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f)));
          }
        }
        return absl::OkStatus();
    }
    return absl::InvalidArgumentError("unknown dtype");
  }

  // K/V rows, which the cache holds as fp16: a straight copy at fp16; widened to fp32 in
  // `buf` and written as above for the other dtypes.
  absl::Status Fp16Rows(const uint16_t* x, int64_t rows, int64_t cols, KvDtype dtype,
                        const std::string& what, std::vector<float>& buf) {
    const int64_t n = rows * cols;
    if (dtype == KvDtype::kF16) {
      Bytes(x, static_cast<size_t>(n) * 2);
      return absl::OkStatus();
    }
    buf.resize(static_cast<size_t>(n));
    Fp16ToFp32Row(x, buf.data(), n);
    return Rows(buf.data(), rows, cols, dtype, what);
  }

 private:
  char* p_;
};

// Checks that `context` is internally consistent and returns the exact encoded size.
absl::StatusOr<uint64_t> ValidateForEncode(const CompressedContext& c, KvDtype dtype) {
  if (!KnownDtype(static_cast<uint8_t>(dtype))) {
    return absl::InvalidArgumentError(absl::StrCat("unknown KV dtype ", static_cast<int>(dtype)));
  }
  if (!KnownKind(static_cast<uint8_t>(c.kind))) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown context kind ", static_cast<int>(c.kind)));
  }
  if (c.method.size() > kMaxMethodBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("method name is ", c.method.size(), " bytes, the limit is ", kMaxMethodBytes));
  }
  if (c.params.size() > kMaxParamsBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("params are ", c.params.size(), " bytes, the limit is ", kMaxParamsBytes));
  }
  if (c.source_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("source_tokens is ", c.source_tokens));
  }
  const KvCache& kv = c.kv;
  if (kv.next_position < 0) {
    return absl::InvalidArgumentError(absl::StrCat("next_position is ", kv.next_position));
  }
  if (kv.n_layers() < 0 || static_cast<uint32_t>(kv.n_layers()) > kMaxLayers ||
      kv.n_kv_heads() < 0 || static_cast<uint32_t>(kv.n_kv_heads()) > kMaxKvHeads ||
      kv.head_dim() < 0 || static_cast<uint32_t>(kv.head_dim()) > kMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV shape ", kv.n_layers(), " layers x ", kv.n_kv_heads(),
                     " heads x head_dim ", kv.head_dim(), " is outside the codec's limits"));
  }
  const int64_t n_heads = int64_t{kv.n_layers()} * kv.n_kv_heads();
  if (n_heads > 0 && kv.head_dim() == 0) {
    return absl::InvalidArgumentError("KV cache has heads but head_dim 0");
  }
  const uint64_t kv_row = RowBytes(dtype, static_cast<uint64_t>(kv.head_dim()));
  uint64_t size = kContextHeaderBytes + 2 + c.method.size() + 4 + c.params.size() +
                  static_cast<uint64_t>(n_heads) * 4 + kChecksumBytes;
  const size_t dim = static_cast<size_t>(kv.head_dim());
  for (int l = 0; l < kv.n_layers(); ++l) {
    for (int h = 0; h < kv.n_kv_heads(); ++h) {
      const KvHead& kh = kv.head(l, h);
      const size_t n = kh.pos.size();
      if (n > std::numeric_limits<uint32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat(HeadName(l, h), " has ", n, " entries"));
      }
      if (kh.k.size() != n * dim || kh.v.size() != n * dim) {
        return absl::InvalidArgumentError(
            absl::StrCat(HeadName(l, h), ": k holds ", kh.k.size(), " and v ", kh.v.size(),
                         " values, expected ", n, " entries x head_dim ", dim, " = ", n * dim));
      }
      for (size_t i = 0; i < n; ++i) {
        if (kh.pos[i] < 0 || kh.pos[i] >= kv.next_position) {
          return absl::InvalidArgumentError(
              absl::StrCat(HeadName(l, h), ": entry ", i, " has position ", kh.pos[i],
                           ", outside [0, next_position = ", kv.next_position, ")"));
        }
      }
      size += n * (4 + 2 * kv_row);
    }
  }
  if (c.digest_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("digest_tokens is ", c.digest_tokens));
  }
  if (c.digest_tokens == 0) {
    if (!c.digest.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("digest holds ", c.digest.size(), " values but digest_tokens is 0"));
    }
  } else {
    const uint64_t tokens = static_cast<uint64_t>(c.digest_tokens);
    const uint64_t d_model = c.digest.size() / tokens;
    if (d_model == 0 || d_model * tokens != c.digest.size() || d_model > kMaxDModel) {
      return absl::InvalidArgumentError(absl::StrCat("digest holds ", c.digest.size(),
                                                     " values, not digest_tokens ", c.digest_tokens,
                                                     " x d_model (1..", kMaxDModel, ")"));
    }
    size += tokens * RowBytes(dtype, d_model);
  }
  return size;
}

// ---- Reading -------------------------------------------------------------------------------

// A cursor over [0, end) of the input (end excludes the checksum). Every read is checked
// against what is left, and every failure names the field and the offset.
class Reader {
 public:
  Reader(std::string_view data, size_t pos, size_t end) : data_(data), pos_(pos), end_(end) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return end_ - pos_; }

  absl::Status Need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(what), " at offset ", pos_,
                                                     " needs ", n, " bytes, only ", remaining(),
                                                     " left before the checksum"));
    }
    return absl::OkStatus();
  }
  template <typename T>
  absl::Status Get(T* v, std::string_view what) {
    return Raw(v, sizeof(T), what);
  }
  absl::Status Raw(void* out, size_t n, std::string_view what) {
    RETURN_IF_ERROR(Need(n, what));
    if (n > 0) std::memcpy(out, data_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  absl::Status String(size_t n, std::string* out, std::string_view what) {
    RETURN_IF_ERROR(Need(n, what));
    out->assign(data_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  // The caller has checked Need(rows * RowBytes(dtype, cols)) and sized `out`.
  absl::Status Rows(int64_t rows, int64_t cols, KvDtype dtype, float* out, std::string_view what) {
    const char* p = data_.data() + pos_;
    const int64_t n = rows * cols;
    switch (dtype) {
      case KvDtype::kF16:
      case KvDtype::kBf16: {
        const bool f16 = dtype == KvDtype::kF16;
        for (int64_t i = 0; i < n; ++i) {
          uint16_t h;
          std::memcpy(&h, p + 2 * i, 2);
          out[i] = f16 ? Fp16ToFp32(h) : Bf16ToFp32(h);
        }
        break;
      }
      case KvDtype::kF32:
        if (n > 0) std::memcpy(out, p, static_cast<size_t>(n) * 4);
        break;
      case KvDtype::kInt8: {
        const char* row = p;
        for (int64_t r = 0; r < rows; ++r, row += 4 + cols) {
          float scale;
          std::memcpy(&scale, row, 4);
          if (!std::isfinite(scale) || scale < 0) {
            return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": int8 row ", r,
                                                           " has scale ", scale, " at offset ",
                                                           pos_ + static_cast<size_t>(row - p)));
          }
          for (int64_t c = 0; c < cols; ++c) {
            out[r * cols + c] = static_cast<float>(static_cast<int8_t>(row[4 + c])) * scale;
          }
        }
        break;
      }
    }
    pos_ += static_cast<size_t>(rows * static_cast<int64_t>(RowBytes(dtype, cols)));
    return absl::OkStatus();
  }
  // K/V rows into the fp16 cache: a straight copy at fp16; the other dtypes decode to fp32
  // in `buf` as above and are rounded to nearest fp16. The caller has checked Need.
  absl::Status Fp16Rows(int64_t rows, int64_t cols, KvDtype dtype, uint16_t* out,
                        std::string_view what, std::vector<float>& buf) {
    const int64_t n = rows * cols;
    if (dtype == KvDtype::kF16) {
      if (n > 0) std::memcpy(out, data_.data() + pos_, static_cast<size_t>(n) * 2);
      pos_ += static_cast<size_t>(n) * 2;
      return absl::OkStatus();
    }
    buf.resize(static_cast<size_t>(n));
    RETURN_IF_ERROR(Rows(rows, cols, dtype, buf.data(), what));
    Fp32ToFp16Row(buf.data(), out, n);
    return absl::OkStatus();
  }

 private:
  std::string_view data_;
  size_t pos_;
  size_t end_;
};

template <typename T>
T Load(std::string_view bytes, size_t off) {
  T v;
  std::memcpy(&v, bytes.data() + off, sizeof v);
  return v;
}

absl::Status Truncated(size_t got, uint64_t needed, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("truncated context: ", got, " bytes, ", std::string(what), " needs ", needed));
}

// The fixed header checks that come before the checksum: what the bytes are, and whether
// they are whole. Each names the problem better than "checksum mismatch" would.
absl::Status CheckEnvelope(std::string_view bytes) {
  const size_t magic_seen = std::min(bytes.size(), sizeof kContextMagic);
  if (magic_seen > 0 && std::memcmp(bytes.data(), kContextMagic, magic_seen) != 0) {
    std::string shown;
    for (size_t i = 0; i < magic_seen; ++i) {
      absl::StrAppendFormat(&shown, "%02x", static_cast<uint8_t>(bytes[i]));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "bad magic: not a ctxcache context (starts with 0x", shown, ", expected \"CTXC\")"));
  }
  if (bytes.size() < kOffVersion + 2) {
    return Truncated(bytes.size(), kOffVersion + 2, "magic + version");
  }
  const uint16_t version = Load<uint16_t>(bytes, kOffVersion);
  if (version != kContextFormatVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported context format version ", version, " at offset ", kOffVersion,
                     " (this build reads version ", kContextFormatVersion,
                     version > kContextFormatVersion ? "; written by a newer ctxcache" : "", ")"));
  }
  if (bytes.size() < kContextHeaderBytes + kChecksumBytes) {
    return Truncated(bytes.size(), kContextHeaderBytes + kChecksumBytes, "the fixed header");
  }
  const uint64_t total = Load<uint64_t>(bytes, kOffTotalSize);
  if (total > bytes.size()) return Truncated(bytes.size(), total, "the header's total size");
  if (total < bytes.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("context is ", bytes.size(), " bytes but its header (offset ", kOffTotalSize,
                     ") says ", total, ": trailing bytes or a damaged header"));
  }
  const size_t body = bytes.size() - kChecksumBytes;
  const uint32_t stored = Load<uint32_t>(bytes, body);
  const uint32_t computed = Crc32c(bytes.data(), body);
  if (stored != computed) {
    return absl::DataLossError(absl::StrFormat(
        "context checksum mismatch: stored crc32c %08x at offset %u, computed %08x over %u "
        "bytes; the bytes were damaged after they were written",
        stored, body, computed, body));
  }
  return absl::OkStatus();
}

}  // namespace

const char* KvDtypeName(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kF16:
      return "fp16";
    case KvDtype::kBf16:
      return "bf16";
    case KvDtype::kF32:
      return "fp32";
    case KvDtype::kInt8:
      return "int8";
  }
  return "unknown";
}

absl::StatusOr<std::string> EncodeContext(const CompressedContext& c, KvDtype dtype) {
  uint8_t fingerprint[kFingerprintBytes] = {};
  RETURN_IF_ERROR(ParseFingerprint(c.model_fingerprint, fingerprint));
  uint64_t size = 0;
  ASSIGN_OR_RETURN(size, ValidateForEncode(c, dtype));
  std::string out(size, '\0');
  Writer w(out.data());
  const KvCache& kv = c.kv;
  const uint32_t d_model =
      c.digest_tokens > 0 ? static_cast<uint32_t>(c.digest.size() / c.digest_tokens) : 0;
  w.Bytes(kContextMagic, sizeof kContextMagic);
  w.Put(kContextFormatVersion);
  w.Put(static_cast<uint8_t>(c.kind));
  w.Put(static_cast<uint8_t>(dtype));
  w.Put(size);
  w.Bytes(fingerprint, kFingerprintBytes);
  w.Put(c.method_version);
  w.Put(kv.next_position);
  w.Put(c.source_tokens);
  w.Put(static_cast<uint32_t>(kv.n_layers()));
  w.Put(static_cast<uint32_t>(kv.n_kv_heads()));
  w.Put(static_cast<uint32_t>(kv.head_dim()));
  w.Put(d_model);
  w.Put(c.digest_tokens);
  w.Put(static_cast<uint16_t>(c.method.size()));
  w.Bytes(c.method.data(), c.method.size());
  w.Put(static_cast<uint32_t>(c.params.size()));
  w.Bytes(c.params.data(), c.params.size());
  std::vector<float> buf;
  for (int l = 0; l < kv.n_layers(); ++l) {
    for (int h = 0; h < kv.n_kv_heads(); ++h) {
      const KvHead& kh = kv.head(l, h);
      w.Put(static_cast<uint32_t>(kh.pos.size()));
      w.Bytes(kh.pos.data(), kh.pos.size() * 4);
      RETURN_IF_ERROR(
          w.Fp16Rows(kh.k.data(), kh.n(), kv.head_dim(), dtype, HeadName(l, h) + " K", buf));
      RETURN_IF_ERROR(
          w.Fp16Rows(kh.v.data(), kh.n(), kv.head_dim(), dtype, HeadName(l, h) + " V", buf));
    }
  }
  RETURN_IF_ERROR(w.Rows(c.digest.data(), c.digest_tokens, d_model, dtype, "digest"));
  const size_t body = out.size() - kChecksumBytes;
  w.Put(Crc32c(out.data(), body));
  if (w.pos() != out.data() + out.size()) {  // the size computation and the writer disagree
    return absl::InternalError("context encoder wrote a different size than it computed");
  }
  return out;
}

absl::StatusOr<CompressedContext> DecodeContext(std::string_view bytes,
                                                std::string_view expected_fingerprint) {
  RETURN_IF_ERROR(CheckEnvelope(bytes));
  // From here on the bytes are whole and as written; what fails below is a writer bug or a
  // forgery, and is still refused field by field rather than trusted.
  const uint8_t kind = Load<uint8_t>(bytes, kOffKind), dtype_byte = Load<uint8_t>(bytes, kOffDtype);
  if (!KnownKind(kind)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown context kind ", kind, " at offset ", kOffKind));
  }
  if (!KnownDtype(dtype_byte)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown KV dtype ", dtype_byte, " at offset ", kOffDtype));
  }
  const KvDtype dtype = static_cast<KvDtype>(dtype_byte);
  CompressedContext c;
  c.kind = static_cast<ContextKind>(kind);
  c.model_fingerprint =
      ToHex(reinterpret_cast<const uint8_t*>(bytes.data()) + kOffFingerprint, kFingerprintBytes);
  if (!expected_fingerprint.empty() && expected_fingerprint != c.model_fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat("context was made by model ", FingerprintPrefix(c.model_fingerprint),
                     ", this server runs ", FingerprintPrefix(expected_fingerprint)));
  }
  c.method_version = Load<uint32_t>(bytes, kOffMethodVersion);
  const int32_t next_position = Load<int32_t>(bytes, kOffNextPosition);
  c.source_tokens = Load<int64_t>(bytes, kOffSourceTokens);
  const uint32_t n_layers = Load<uint32_t>(bytes, kOffNLayers);
  const uint32_t n_kv_heads = Load<uint32_t>(bytes, kOffNKvHeads);
  const uint32_t head_dim = Load<uint32_t>(bytes, kOffHeadDim);
  const uint32_t d_model = Load<uint32_t>(bytes, kOffDModel);
  c.digest_tokens = Load<int64_t>(bytes, kOffDigestTokens);
  if (next_position < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("next_position ", next_position, " at offset ", kOffNextPosition));
  }
  if (c.source_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("source_tokens ", c.source_tokens, " at offset ", kOffSourceTokens));
  }
  if (n_layers > kMaxLayers || n_kv_heads > kMaxKvHeads || head_dim > kMaxHeadDim ||
      (head_dim == 0 && n_layers > 0 && n_kv_heads > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV shape ", n_layers, " layers x ", n_kv_heads, " heads x head_dim ", head_dim,
        " (offsets ", kOffNLayers, "..", kOffHeadDim + 3, ") is outside the limits ", kMaxLayers,
        " x ", kMaxKvHeads, " x 1..", kMaxHeadDim));
  }
  if (c.digest_tokens < 0 || d_model > kMaxDModel || (c.digest_tokens > 0) != (d_model > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("digest shape ", c.digest_tokens, " tokens x d_model ", d_model, " (offsets ",
                     kOffDModel, ", ", kOffDigestTokens, ") is invalid"));
  }

  Reader r(bytes, kContextHeaderBytes, bytes.size() - kChecksumBytes);
  uint16_t method_len = 0;
  RETURN_IF_ERROR(r.Get(&method_len, "method length"));
  if (method_len > kMaxMethodBytes) {
    return absl::InvalidArgumentError(absl::StrCat("method length ", method_len, " at offset ",
                                                   r.pos() - 2, " exceeds ", kMaxMethodBytes));
  }
  RETURN_IF_ERROR(r.String(method_len, &c.method, "method"));
  uint32_t params_len = 0;
  RETURN_IF_ERROR(r.Get(&params_len, "params length"));
  if (params_len > kMaxParamsBytes) {
    return absl::InvalidArgumentError(absl::StrCat("params length ", params_len, " at offset ",
                                                   r.pos() - 4, " exceeds ", kMaxParamsBytes));
  }
  RETURN_IF_ERROR(r.String(params_len, &c.params, "params"));

  // Every head record holds at least its count, so the heads the header claims must fit in
  // what is left before KvCache allocates one KvHead per (layer, head).
  const uint64_t n_heads = uint64_t{n_layers} * n_kv_heads;
  RETURN_IF_ERROR(r.Need(n_heads * 4, absl::StrCat(n_layers, " x ", n_kv_heads,
                                                   " head records (4 bytes each at least)")));
  c.kv =
      KvCache(static_cast<int>(n_layers), static_cast<int>(n_kv_heads), static_cast<int>(head_dim));
  c.kv.next_position = next_position;
  const uint64_t row = RowBytes(dtype, head_dim);
  const uint64_t entry_bytes = 4 + 2 * row;  // position + K row + V row
  std::vector<float> buf;  // a head's rows at a non-fp16 dtype, before rounding to fp16
  for (int l = 0; l < static_cast<int>(n_layers); ++l) {
    for (int h = 0; h < static_cast<int>(n_kv_heads); ++h) {
      uint32_t n = 0;
      RETURN_IF_ERROR(r.Get(&n, HeadName(l, h) + " entry count"));
      // Checked against the input before allocating: a forged count cannot make us reserve
      // more than the bytes that are actually there.
      RETURN_IF_ERROR(
          r.Need(uint64_t{n} * entry_bytes, absl::StrCat(HeadName(l, h), ": ", n, " entries")));
      KvHead& kh = c.kv.head(l, h);
      kh.pos.resize(n);
      const size_t pos_offset = r.pos();
      RETURN_IF_ERROR(r.Raw(kh.pos.data(), size_t{n} * 4, "positions"));
      for (uint32_t i = 0; i < n; ++i) {
        if (kh.pos[i] < 0 || kh.pos[i] >= next_position) {
          return absl::InvalidArgumentError(absl::StrCat(
              HeadName(l, h), ": entry ", i, " at offset ", pos_offset + size_t{i} * 4,
              " has position ", kh.pos[i], ", outside [0, next_position = ", next_position, ")"));
        }
      }
      kh.k.resize(size_t{n} * head_dim);
      kh.v.resize(size_t{n} * head_dim);
      RETURN_IF_ERROR(r.Fp16Rows(n, head_dim, dtype, kh.k.data(), HeadName(l, h) + " K", buf));
      RETURN_IF_ERROR(r.Fp16Rows(n, head_dim, dtype, kh.v.data(), HeadName(l, h) + " V", buf));
    }
  }
  if (c.digest_tokens > 0) {
    const uint64_t digest_row = RowBytes(dtype, d_model);
    const uint64_t tokens = static_cast<uint64_t>(c.digest_tokens);
    // Divide rather than multiply: digest_tokens may be near 2^63.
    if (tokens > r.remaining() / digest_row) {
      return absl::InvalidArgumentError(
          absl::StrCat("digest of ", tokens, " tokens x d_model ", d_model, " at offset ", r.pos(),
                       " needs more than the ", r.remaining(), " bytes left before the checksum"));
    }
    c.digest.resize(tokens * d_model);
    RETURN_IF_ERROR(r.Rows(c.digest_tokens, d_model, dtype, c.digest.data(), "digest"));
  }
  if (r.remaining() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.remaining(), " unparsed bytes at offset ", r.pos(), " before the checksum"));
  }
  return c;
}

// ---- Files ---------------------------------------------------------------------------------

namespace {

absl::Status ErrnoError(int err, std::string_view what, const std::string& path) {
  const std::string msg = absl::StrCat(std::string(what), " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

}  // namespace

absl::Status WriteContextFile(const std::string& path, std::string_view bytes) {
  // mkostemp gives a unique name, so concurrent writers of the same path never share a
  // temporary file; the same directory keeps the rename on one filesystem (atomic). CLOEXEC:
  // a child process forked meanwhile must not inherit the descriptor.
  std::string tmp = path + ".tmp.XXXXXX";
  const int fd = mkostemp(tmp.data(), O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, "cannot create a temporary file for", path);
  absl::Status status = absl::OkStatus();
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      status = ErrnoError(n < 0 ? errno : EIO, "cannot write", tmp);
      break;
    }
    done += static_cast<size_t>(n);
  }
  // Data reaches the disk before the rename makes it visible: a crash leaves the old file
  // or the new one, never a renamed but empty one.
  if (status.ok() && fsync(fd) != 0) status = ErrnoError(errno, "cannot fsync", tmp);
  if (close(fd) != 0 && status.ok()) status = ErrnoError(errno, "cannot close", tmp);
  if (status.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    status = ErrnoError(errno, "cannot rename the temporary file onto", path);
  }
  if (!status.ok()) unlink(tmp.c_str());
  return status;
}

absl::StatusOr<std::string> ReadContextFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, "cannot open", path);
  struct stat st = {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoError(err, "cannot stat", path);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = read(fd, out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      return ErrnoError(err, "cannot read", path);
    }
    if (n == 0) break;  // the file shrank under us; what was read is checked by the decoder
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  close(fd);
  return out;
}

}  // namespace ctxcache
