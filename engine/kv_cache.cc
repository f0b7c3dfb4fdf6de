#include "engine/kv_cache.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "engine/cpu/attention.h"

namespace ctxcache {
namespace {

int QMax(KvDtype dtype) { return dtype == KvDtype::kInt4 ? 15 : 255; }

// The code of x in a group with (fp16-rounded) scale s and minimum m: what dequantizes
// closest, clamped to the dtype's range.
inline int Code(float x, float s, float m, int qmax) {
  if (!(s > 0.f)) return 0;
  const float c = std::nearbyint((x - m) / s);
  return static_cast<int>(std::clamp(c, 0.f, static_cast<float>(qmax)));
}

// fp16 scale and minimum of a group spanning [lo, hi]: (hi - lo) / qmax and lo, rounded to
// fp16 (the top of the range may then fall a rounding step past the last code; Code clamps).
void GroupParams(float lo, float hi, int qmax, uint16_t* scale, uint16_t* min) {
  *min = Fp32ToFp16(lo);
  *scale = Fp32ToFp16((hi - Fp16ToFp32(*min)) / static_cast<float>(qmax));
}

// Code c of channel i in a row of codes.
inline int RowCode(const uint8_t* row, int i, int hd, KvDtype dtype) {
  if (dtype == KvDtype::kInt8) return row[i];
  const int half = hd / 2;
  return i < half ? (row[i] & 0xF) : (row[i - half] >> 4);
}

inline void PutCode(uint8_t* row, int i, int hd, KvDtype dtype, int code) {
  if (dtype == KvDtype::kInt8) {
    row[i] = static_cast<uint8_t>(code);
    return;
  }
  const int half = hd / 2;
  if (i < half) {
    row[i] = static_cast<uint8_t>((row[i] & 0xF0) | code);
  } else {
    row[i - half] = static_cast<uint8_t>((row[i - half] & 0x0F) | (code << 4));
  }
}

}  // namespace

const char* KvDtypeName(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kF16: return "fp16";
    case KvDtype::kInt8: return "int8";
    case KvDtype::kInt4: return "int4";
  }
  return "?";
}

absl::StatusOr<KvDtype> ParseKvDtype(const std::string& name) {
  if (name == "fp16") return KvDtype::kF16;
  if (name == "int8") return KvDtype::kInt8;
  if (name == "int4") return KvDtype::kInt4;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown kv_dtype \"", name, "\"; expected fp16, int8 or int4"));
}

int64_t KvSegment::Bytes() const {
  if (dtype == KvDtype::kF16) return 2 * n * head_dim * 2;
  const int64_t codes = 2 * n * RowCodeBytes();
  const int64_t scales = 2 * 2 * (static_cast<int64_t>(k_scale.size()) +
                                  static_cast<int64_t>(v_scale.size()));
  return codes + scales;
}

void KvSegment::LoadRows(int64_t begin, int64_t end, float* k, float* v) const {
  const int hd = head_dim;
  if (dtype == KvDtype::kF16) {
    Fp16ToFp32Row(k16.data() + begin * hd, k, (end - begin) * hd);
    Fp16ToFp32Row(v16.data() + begin * hd, v, (end - begin) * hd);
    return;
  }
  const int64_t rb = RowCodeBytes();
  const int vg = hd / kValueGroup;
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* kr = kq.data() + j * rb;
    const uint8_t* vr = vq.data() + j * rb;
    const uint16_t* ks = k_scale.data() + (j / kKeyGroup) * hd;
    const uint16_t* km = k_min.data() + (j / kKeyGroup) * hd;
    float* ko = k + (j - begin) * hd;
    float* vo = v + (j - begin) * hd;
    for (int i = 0; i < hd; ++i) {
      ko[i] = static_cast<float>(RowCode(kr, i, hd, dtype)) * Fp16ToFp32(ks[i]) + Fp16ToFp32(km[i]);
      const int g = i / kValueGroup;
      vo[i] = static_cast<float>(RowCode(vr, i, hd, dtype)) * Fp16ToFp32(v_scale[j * vg + g]) +
              Fp16ToFp32(v_min[j * vg + g]);
    }
  }
}

absl::StatusOr<KvSegment> QuantizeRows(const float* k, const float* v, int64_t n, int head_dim,
                                       KvDtype dtype) {
  KvSegment s;
  s.dtype = dtype;
  s.n = n;
  s.head_dim = head_dim;
  const int hd = head_dim;
  if (dtype == KvDtype::kF16) {
    s.k16.resize(n * hd);
    s.v16.resize(n * hd);
    Fp32ToFp16Row(k, s.k16.data(), n * hd);
    Fp32ToFp16Row(v, s.v16.data(), n * hd);
    return s;
  }
  if (hd <= 0 || hd % kValueGroup != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_dtype ", KvDtypeName(dtype), " needs a head_dim that is a multiple of ", kValueGroup,
        "; this model's is ", hd, " (use kv_dtype fp16)"));
  }
  const int qmax = QMax(dtype);
  const int64_t rb = s.RowCodeBytes();
  s.kq.assign(n * rb, 0);
  s.vq.assign(n * rb, 0);
  const int64_t n_groups = (n + kKeyGroup - 1) / kKeyGroup;
  s.k_scale.resize(n_groups * hd);
  s.k_min.resize(n_groups * hd);
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t j0 = g * kKeyGroup, j1 = std::min(n, j0 + kKeyGroup);
    for (int i = 0; i < hd; ++i) {
      float lo = k[j0 * hd + i], hi = lo;
      for (int64_t j = j0 + 1; j < j1; ++j) {
        lo = std::min(lo, k[j * hd + i]);
        hi = std::max(hi, k[j * hd + i]);
      }
      GroupParams(lo, hi, qmax, &s.k_scale[g * hd + i], &s.k_min[g * hd + i]);
      const float sc = Fp16ToFp32(s.k_scale[g * hd + i]), mn = Fp16ToFp32(s.k_min[g * hd + i]);
      for (int64_t j = j0; j < j1; ++j) {
        PutCode(s.kq.data() + j * rb, i, hd, dtype, Code(k[j * hd + i], sc, mn, qmax));
      }
    }
  }
  const int vg = hd / kValueGroup;
  s.v_scale.resize(n * vg);
  s.v_min.resize(n * vg);
  for (int64_t j = 0; j < n; ++j) {
    for (int g = 0; g < vg; ++g) {
      const float* x = v + j * hd + g * kValueGroup;
      const auto [lo, hi] = std::minmax_element(x, x + kValueGroup);
      GroupParams(*lo, *hi, qmax, &s.v_scale[j * vg + g], &s.v_min[j * vg + g]);
      const float sc = Fp16ToFp32(s.v_scale[j * vg + g]), mn = Fp16ToFp32(s.v_min[j * vg + g]);
      for (int i = 0; i < kValueGroup; ++i) {
        PutCode(s.vq.data() + j * rb, g * kValueGroup + i, hd, dtype, Code(x[i], sc, mn, qmax));
      }
    }
  }
  return s;
}

int64_t KvHead::n_frozen() const {
  int64_t n = 0;
  for (const auto& s : segments) n += s->n;
  return n;
}

void KvHead::LoadRows(int64_t begin, int64_t end, int head_dim, float* k, float* v) const {
  int64_t base = 0;
  for (const auto& s : segments) {
    const int64_t b = std::max(begin, base), e = std::min(end, base + s->n);
    if (b < e) s->LoadRows(b - base, e - base, k + (b - begin) * head_dim, v + (b - begin) * head_dim);
    base += s->n;
  }
  if (end > base) {
    const int64_t b = std::max(begin, base);
    Fp16ToFp32Row(this->k.data() + (b - base) * head_dim, k + (b - begin) * head_dim,
                  (end - b) * head_dim);
    Fp16ToFp32Row(this->v.data() + (b - base) * head_dim, v + (b - begin) * head_dim,
                  (end - b) * head_dim);
  }
}

KvCache::KvCache(int n_layers, int n_kv_heads, int head_dim)
    : n_layers_(n_layers), n_kv_heads_(n_kv_heads), head_dim_(head_dim),
      heads_(static_cast<size_t>(n_layers) * n_kv_heads) {}

uint64_t KvCache::NewUid() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

KvCache::KvCache(const KvCache& other)
    : next_position(other.next_position),
      n_layers_(other.n_layers_),
      n_kv_heads_(other.n_kv_heads_),
      head_dim_(other.head_dim_),
      heads_(other.heads_) {}

KvCache& KvCache::operator=(const KvCache& other) {
  if (this == &other) return *this;
  next_position = other.next_position;
  n_layers_ = other.n_layers_;
  n_kv_heads_ = other.n_kv_heads_;
  head_dim_ = other.head_dim_;
  heads_ = other.heads_;
  uid_ = NewUid();  // other entries under this name: not a rewrite of the old ones
  return *this;
}

KvCache::KvCache(KvCache&& other) noexcept
    : next_position(other.next_position),
      n_layers_(other.n_layers_),
      n_kv_heads_(other.n_kv_heads_),
      head_dim_(other.head_dim_),
      heads_(std::move(other.heads_)),
      uid_(other.uid_),
      generation_(other.generation_) {
  other.heads_.clear();
  other.uid_ = NewUid();
}

KvCache& KvCache::operator=(KvCache&& other) noexcept {
  if (this == &other) return *this;
  next_position = other.next_position;
  n_layers_ = other.n_layers_;
  n_kv_heads_ = other.n_kv_heads_;
  head_dim_ = other.head_dim_;
  heads_ = std::move(other.heads_);
  uid_ = other.uid_;
  generation_ = other.generation_;
  other.heads_.clear();
  other.uid_ = NewUid();
  return *this;
}

void KvCache::Append(int layer, const float* k, const float* v, const int32_t* positions,
                     int64_t n) {
  const int64_t row = static_cast<int64_t>(n_kv_heads_) * head_dim_;
  for (int h = 0; h < n_kv_heads_; ++h) {
    KvHead& kh = heads_[layer * n_kv_heads_ + h];  // not head(): an append is no rewrite
    const size_t base = kh.k.size();
    kh.k.resize(base + n * head_dim_);
    kh.v.resize(base + n * head_dim_);
    for (int64_t t = 0; t < n; ++t) {
      Fp32ToFp16Row(k + t * row + h * head_dim_, kh.k.data() + base + t * head_dim_, head_dim_);
      Fp32ToFp16Row(v + t * row + h * head_dim_, kh.v.data() + base + t * head_dim_, head_dim_);
    }
    kh.pos.insert(kh.pos.end(), positions, positions + n);
  }
}

void KvCache::Truncate(int64_t n) {
  ++generation_;
  for (KvHead& kh : heads_) {
    const int64_t keep = std::max(n, kh.n_frozen());
    if (kh.n() <= keep) continue;
    kh.pos.resize(keep);
    const int64_t tail = keep - kh.n_frozen();
    kh.k.resize(tail * head_dim_);
    kh.v.resize(tail * head_dim_);
  }
}

void KvCache::Reserve(int64_t n_per_head) {
  for (KvHead& kh : heads_) {
    kh.pos.reserve(n_per_head);
    kh.k.reserve(n_per_head * head_dim_);
    kh.v.reserve(n_per_head * head_dim_);
  }
}

void KvCache::Clear() {
  ++generation_;
  for (KvHead& kh : heads_) {
    kh.segments.clear();
    kh.pos.clear();
    kh.k.clear();
    kh.v.clear();
  }
  next_position = 0;
}

int64_t KvCache::TotalEntries() const {
  int64_t n = 0;
  for (const KvHead& kh : heads_) n += kh.n();
  return n;
}

int64_t KvCache::Bytes(int bytes_per_value) const {
  return TotalEntries() * 2 * head_dim_ * bytes_per_value;
}

int64_t KvCache::StoredBytes() const {
  int64_t bytes = 0;
  for (const KvHead& kh : heads_) {
    for (const auto& s : kh.segments) bytes += s->Bytes();
    bytes += (kh.n() - kh.n_frozen()) * 2 * head_dim_ * 2;
  }
  return bytes;
}

int64_t KvCache::ResidentBytes() const {
  int64_t bytes = 0;
  for (const KvHead& kh : heads_) {
    for (const auto& s : kh.segments) bytes += s->Bytes();
    bytes += static_cast<int64_t>((kh.k.capacity() + kh.v.capacity()) * sizeof(uint16_t) +
                                  kh.pos.capacity() * sizeof(int32_t));
  }
  return bytes;
}

void KvCache::ShrinkToFit() {
  for (KvHead& kh : heads_) {
    kh.segments.shrink_to_fit();
    kh.k.shrink_to_fit();
    kh.v.shrink_to_fit();
    kh.pos.shrink_to_fit();
  }
}

int64_t KvCache::MaxEntries() const {
  int64_t n = 0;
  for (const KvHead& kh : heads_) n = std::max(n, kh.n());
  return n;
}

KvDtype KvCache::StoredDtype() const {
  for (const KvHead& kh : heads_) {
    for (const auto& s : kh.segments) {
      if (s->dtype != KvDtype::kF16) return s->dtype;
    }
  }
  return KvDtype::kF16;
}

absl::Status KvCache::Freeze(KvDtype dtype) {
  std::vector<float> k, v;
  std::vector<std::shared_ptr<const KvSegment>> frozen(heads_.size());
  for (size_t i = 0; i < heads_.size(); ++i) {
    const KvHead& kh = heads_[i];
    k.resize(kh.n() * head_dim_);
    v.resize(kh.n() * head_dim_);
    kh.LoadRows(0, kh.n(), head_dim_, k.data(), v.data());
    absl::StatusOr<KvSegment> seg = QuantizeRows(k.data(), v.data(), kh.n(), head_dim_, dtype);
    if (!seg.ok()) return seg.status();
    frozen[i] = std::make_shared<const KvSegment>(*std::move(seg));
  }
  // Only now that every head succeeded: a failure leaves the cache as it was.
  ++generation_;
  for (size_t i = 0; i < heads_.size(); ++i) {
    heads_[i].segments.clear();
    if (heads_[i].n() > 0) heads_[i].segments.push_back(std::move(frozen[i]));  // none if empty
    // Released, not cleared: a cleared vector keeps its capacity, and a frozen context kept
    // its whole fp16 copy next to its int8 / int4 codes (the memory soak's idle RSS held
    // ~200 MiB that the memory tier's byte count did not).
    std::vector<uint16_t>().swap(heads_[i].k);
    std::vector<uint16_t>().swap(heads_[i].v);
  }
  return absl::OkStatus();
}

void KvCache::Thaw() {
  ++generation_;
  std::vector<float> buf;
  for (KvHead& kh : heads_) {
    if (kh.segments.empty()) continue;
    const int64_t nf = kh.n_frozen();
    std::vector<uint16_t> k(kh.n() * head_dim_), v(kh.n() * head_dim_);
    buf.resize(2 * nf * head_dim_);
    kh.LoadRows(0, nf, head_dim_, buf.data(), buf.data() + nf * head_dim_);
    Fp32ToFp16Row(buf.data(), k.data(), nf * head_dim_);
    Fp32ToFp16Row(buf.data() + nf * head_dim_, v.data(), nf * head_dim_);
    std::copy(kh.k.begin(), kh.k.end(), k.begin() + nf * head_dim_);
    std::copy(kh.v.begin(), kh.v.end(), v.begin() + nf * head_dim_);
    kh.k = std::move(k);
    kh.v = std::move(v);
    kh.segments.clear();
  }
}

}  // namespace ctxcache
