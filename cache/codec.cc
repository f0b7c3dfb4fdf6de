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

// Header dtype values of version 2: the KV payload is quantized segments (kv_cache.h), one
// per head; there are no float rows.
constexpr uint8_t kDtypeSegInt8 = 5, kDtypeSegInt4 = 6;
bool KnownDtype(uint8_t d) { return d >= 1 && d <= 4; }
bool SegmentDtype(uint8_t d) { return d == kDtypeSegInt8 || d == kDtypeSegInt4; }

// Bytes of a quantized head record's payload after its positions: K and V codes, then the
// key scales and minima [ceil(n / kKeyGroup), hd] and the value ones [n, hd / kValueGroup],
// fp16 (n < 2^32 and hd <= kMaxHeadDim, so this cannot overflow).
uint64_t SegmentPayloadBytes(KvDtype dtype, uint64_t n, uint64_t hd) {
  const uint64_t row = dtype == KvDtype::kInt4 ? hd / 2 : hd;
  const uint64_t key_groups = (n + kKeyGroup - 1) / kKeyGroup;
  return 2 * n * row + 2 * 2 * key_groups * hd + 2 * 2 * n * (hd / kValueGroup);
}
bool KnownKind(uint8_t k) { return k == 1 || k == 2; }

// Bytes of one row of `cols` values (cols <= kMaxDModel, so this cannot overflow).
uint64_t RowBytes(BlobDtype dtype, uint64_t cols) {
  switch (dtype) {
    case BlobDtype::kF16:
    case BlobDtype::kBf16:
      return 2 * cols;
    case BlobDtype::kF32:
      return 4 * cols;
    case BlobDtype::kInt8:
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
  absl::Status Rows(const float* x, int64_t rows, int64_t cols, BlobDtype dtype,
                    const std::string& what) {
    const int64_t n = rows * cols;
    switch (dtype) {
      case BlobDtype::kF16:
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
      case BlobDtype::kBf16:
        for (int64_t i = 0; i < n; ++i) Put(Fp32ToBf16(x[i]));
        return absl::OkStatus();
      case BlobDtype::kF32:
        Bytes(x, static_cast<size_t>(n) * 4);
        return absl::OkStatus();
      case BlobDtype::kInt8:
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
  absl::Status Fp16Rows(const uint16_t* x, int64_t rows, int64_t cols, BlobDtype dtype,
                        const std::string& what, std::vector<float>& buf) {
    const int64_t n = rows * cols;
    if (dtype == BlobDtype::kF16) {
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
absl::StatusOr<uint64_t> ValidateForEncode(const CompressedContext& c, BlobDtype dtype) {
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
  // A quantized context is written as its segments (format version 2), whatever `dtype`:
  // it has no float rows for dtype to apply to.
  const KvDtype seg_dtype = kv.StoredDtype();
  const bool segmented = seg_dtype != KvDtype::kF16;
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
      if (segmented) {
        const bool one = kh.segments.size() == 1 && kh.segments[0]->dtype == seg_dtype &&
                         kh.segments[0]->n == static_cast<int64_t>(n) && kh.k.empty();
        if (!one && !(n == 0 && kh.segments.empty())) {
          return absl::InvalidArgumentError(absl::StrCat(
              HeadName(l, h), ": a ", KvDtypeName(seg_dtype),
              " context holds exactly one segment of that dtype per head, covering its entries"));
        }
      } else if (!kh.segments.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(HeadName(l, h), " holds fp16 segments (a composed cache, not a context)"));
      } else if (kh.k.size() != n * dim || kh.v.size() != n * dim) {
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
      size += segmented ? n * 4 + SegmentPayloadBytes(seg_dtype, n, dim) : n * (4 + 2 * kv_row);
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
  absl::Status Rows(int64_t rows, int64_t cols, BlobDtype dtype, float* out, std::string_view what) {
    const char* p = data_.data() + pos_;
    const int64_t n = rows * cols;
    switch (dtype) {
      case BlobDtype::kF16:
      case BlobDtype::kBf16: {
        const bool f16 = dtype == BlobDtype::kF16;
        for (int64_t i = 0; i < n; ++i) {
          uint16_t h;
          std::memcpy(&h, p + 2 * i, 2);
          out[i] = f16 ? Fp16ToFp32(h) : Bf16ToFp32(h);
        }
        break;
      }
      case BlobDtype::kF32:
        if (n > 0) std::memcpy(out, p, static_cast<size_t>(n) * 4);
        break;
      case BlobDtype::kInt8: {
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
  // A quantized head's codes and fp16 scales / minima (format version 2). Scales must be
  // finite and >= 0 and minima finite: anything else would poison every attention read.
  absl::StatusOr<KvSegment> Segment(uint32_t n, uint32_t hd, KvDtype dtype,
                                    const std::string& head) {
    KvSegment seg;
    seg.dtype = dtype;
    seg.n = n;
    seg.head_dim = static_cast<int>(hd);
    RETURN_IF_ERROR(Need(SegmentPayloadBytes(dtype, n, hd), head + " quantized payload"));
    const size_t codes = size_t{n} * static_cast<size_t>(seg.RowCodeBytes());
    seg.kq.resize(codes);
    seg.vq.resize(codes);
    RETURN_IF_ERROR(Raw(seg.kq.data(), codes, "K codes"));
    RETURN_IF_ERROR(Raw(seg.vq.data(), codes, "V codes"));
    const size_t key_params = (size_t{n} + kKeyGroup - 1) / kKeyGroup * hd;
    const size_t value_params = size_t{n} * (hd / kValueGroup);
    struct Part {
      std::vector<uint16_t>* v;
      size_t count;
      const char* name;
      bool scale;
    };
    for (const Part& p : {Part{&seg.k_scale, key_params, "K scales", true},
                          Part{&seg.k_min, key_params, "K minima", false},
                          Part{&seg.v_scale, value_params, "V scales", true},
                          Part{&seg.v_min, value_params, "V minima", false}}) {
      const size_t at = pos_;
      p.v->resize(p.count);
      RETURN_IF_ERROR(Raw(p.v->data(), p.count * 2, p.name));
      for (size_t i = 0; i < p.count; ++i) {
        const float x = Fp16ToFp32((*p.v)[i]);
        if (!std::isfinite(x) || (p.scale && x < 0)) {
          return absl::InvalidArgumentError(absl::StrCat(head, " ", p.name, ": value ", x,
                                                         " at offset ", at + 2 * i));
        }
      }
    }
    return seg;
  }
  // K/V rows into the fp16 cache: a straight copy at fp16; the other dtypes decode to fp32
  // in `buf` as above and are rounded to nearest fp16. The caller has checked Need.
  absl::Status Fp16Rows(int64_t rows, int64_t cols, BlobDtype dtype, uint16_t* out,
                        std::string_view what, std::vector<float>& buf) {
    const int64_t n = rows * cols;
    if (dtype == BlobDtype::kF16) {
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
  if (version < 1 || version > kContextFormatVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported context format version ", version, " at offset ", kOffVersion,
                     " (this build reads versions 1..", kContextFormatVersion,
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

const char* BlobDtypeName(BlobDtype dtype) {
  switch (dtype) {
    case BlobDtype::kF16:
      return "fp16";
    case BlobDtype::kBf16:
      return "bf16";
    case BlobDtype::kF32:
      return "fp32";
    case BlobDtype::kInt8:
      return "int8";
  }
  return "unknown";
}

absl::StatusOr<std::string> EncodeContext(const CompressedContext& c, BlobDtype dtype) {
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
  // Version 1 whenever it suffices, so that older replicas still read fp16 contexts.
  const KvDtype seg_dtype = kv.StoredDtype();
  const bool segmented = seg_dtype != KvDtype::kF16;
  w.Put(static_cast<uint16_t>(segmented ? 2 : 1));
  w.Put(static_cast<uint8_t>(c.kind));
  w.Put(static_cast<uint8_t>(
      segmented ? (seg_dtype == KvDtype::kInt8 ? kDtypeSegInt8 : kDtypeSegInt4)
                : static_cast<uint8_t>(dtype)));
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
      if (segmented) {
        if (kh.segments.empty()) continue;  // an empty head
        const KvSegment& seg = *kh.segments[0];
        w.Bytes(seg.kq.data(), seg.kq.size());
        w.Bytes(seg.vq.data(), seg.vq.size());
        for (const std::vector<uint16_t>* p : {&seg.k_scale, &seg.k_min, &seg.v_scale, &seg.v_min}) {
          w.Bytes(p->data(), p->size() * 2);
        }
        continue;
      }
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
  const uint16_t version = Load<uint16_t>(bytes, kOffVersion);
  const bool segmented = version >= 2 && SegmentDtype(dtype_byte);
  if (!KnownDtype(dtype_byte) && !segmented) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown KV dtype ", dtype_byte, " at offset ", kOffDtype, " (format version ",
                     version, ")"));
  }
  // Segments carry K/V only; the digest rows of such a blob (none allowed) would need a float
  // dtype, so kF32 stands in and the digest check below refuses any.
  const BlobDtype dtype = segmented ? BlobDtype::kF32 : static_cast<BlobDtype>(dtype_byte);
  const KvDtype seg_dtype = dtype_byte == kDtypeSegInt4 ? KvDtype::kInt4 : KvDtype::kInt8;
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
  if (segmented && (c.kind != ContextKind::kKv || c.digest_tokens != 0 ||
                    head_dim % kValueGroup != 0 || (head_dim == 0 && n_layers > 0))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a ", KvDtypeName(seg_dtype), " context (offset ", kOffDtype, ") must be a KV context "
        "without digest rows and a head_dim that is a multiple of ", kValueGroup, "; got kind ",
        static_cast<int>(c.kind), ", ", c.digest_tokens, " digest tokens, head_dim ", head_dim));
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
  // position + K row + V row; a quantized head's scales come on top (checked per head).
  const uint64_t entry_bytes =
      segmented ? 4 + 2 * (seg_dtype == KvDtype::kInt4 ? head_dim / 2 : head_dim) : 4 + 2 * row;
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
      if (segmented) {
        if (n == 0) continue;
        ASSIGN_OR_RETURN(KvSegment seg, r.Segment(n, head_dim, seg_dtype, HeadName(l, h)));
        kh.segments.push_back(std::make_shared<const KvSegment>(std::move(seg)));
        continue;
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
