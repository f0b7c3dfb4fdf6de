// The KV cache, laid out the way compression prunes it: per layer, per KV head, a compact
// list of entries (K row, V row, original position). Heads may keep different tokens after
// per-head selection, so every (layer, head) has its own length. Keys are stored after RoPE,
// at their original positions; next_position says where the next token goes (after
// compression it stays at the original document length unless the context was re-rotated).
//
// Stored contexts may instead hold their entries quantized (int8 / int4, KvDtype below) in
// frozen segments that requests read in place.
//
// K and V are stored as fp16 bits, like llama.cpp's default f16 cache: decode at long contexts
// is bound by reading this cache, and half the bytes of fp32 is half the time. Values enter
// through Append rounded to nearest fp16 (the forward pass and re-rotation round to fp16
// anyway, so this loses nothing and a context serialises to fp16 by a plain copy); readers
// convert with Fp16ToFp32Row (engine/cpu/attention.h) or Fp16ToFp32 (common/half.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ctxcache {

// How a stored context keeps its K/V entries (the kv_dtype compression parameter). kF16 is
// what the forward pass writes; kInt8 / kInt4 are KIVI's asymmetric integer quantization
// (Liu et al., arXiv 2402.02750): keys per channel over groups of kKeyGroup tokens (key
// outliers sit in fixed channels), values per token over groups of kValueGroup channels, each
// group with an fp16 scale and minimum: x ~ code * scale + min.
enum class KvDtype : uint8_t { kF16 = 0, kInt8 = 1, kInt4 = 2 };
inline constexpr int kKeyGroup = 32;    // tokens per key scale (per channel)
inline constexpr int kValueGroup = 32;  // channels per value scale (per token)

const char* KvDtypeName(KvDtype dtype);  // "fp16", "int8", "int4"
// InvalidArgument naming the choices for anything else.
absl::StatusOr<KvDtype> ParseKvDtype(const std::string& name);

// A frozen run of one head's entries, shared read-only by every request that attends over it
// (a quantized stored context is read in place, never expanded to fp16). Rows are in entry
// order; key groups start at the segment's first row.
struct KvSegment {
  KvDtype dtype = KvDtype::kF16;
  int64_t n = 0;
  int head_dim = 0;
  std::vector<uint16_t> k16, v16;  // kF16: [n, head_dim] fp16 bits
  // kInt8: one code per byte, [n, head_dim]. kInt4: [n, head_dim / 2], byte i holding channel
  // i in its low nibble and channel i + head_dim / 2 in its high nibble.
  std::vector<uint8_t> kq, vq;
  std::vector<uint16_t> k_scale, k_min;  // fp16 [ceil(n / kKeyGroup), head_dim]
  std::vector<uint16_t> v_scale, v_min;  // fp16 [n, head_dim / kValueGroup]

  int64_t RowCodeBytes() const { return dtype == KvDtype::kInt4 ? head_dim / 2 : head_dim; }
  // Bytes this segment occupies: codes or fp16 rows, plus scales and minima.
  int64_t Bytes() const;
  // K and V of rows [begin, end) as fp32, into k and v ([end - begin, head_dim] each). The
  // plain reference dequantization; attention's kernels have their own (parity-tested).
  void LoadRows(int64_t begin, int64_t end, float* k, float* v) const;
};

// Quantizes [n, head_dim] fp32 rows (K, V of one head) into a segment; head_dim must be a
// multiple of kValueGroup (InvalidArgument otherwise).
absl::StatusOr<KvSegment> QuantizeRows(const float* k, const float* v, int64_t n, int head_dim,
                                       KvDtype dtype);

struct KvHead {
  // Entries [0, n_frozen()) in frozen segments (a stored context, possibly quantized), then
  // entries [n_frozen(), n()) as fp16 rows in k and v (what the forward pass appends).
  std::vector<std::shared_ptr<const KvSegment>> segments;
  std::vector<uint16_t> k;       // [n - n_frozen, head_dim] fp16 bits, post-RoPE
  std::vector<uint16_t> v;       // [n - n_frozen, head_dim] fp16 bits
  std::vector<int32_t> pos;      // [n] original positions, all entries
  int64_t n() const { return static_cast<int64_t>(pos.size()); }
  int64_t n_frozen() const;
  // K and V of entries [begin, end) as fp32 ([end - begin, head_dim] each), whatever holds
  // them.
  void LoadRows(int64_t begin, int64_t end, int head_dim, float* k, float* v) const;
};

class KvCache {
 public:
  KvCache() = default;
  KvCache(int n_layers, int n_kv_heads, int head_dim);
  // A copy is another cache (a new uid); a move hands the uid over with the entries.
  KvCache(const KvCache& other);
  KvCache& operator=(const KvCache& other);
  KvCache(KvCache&& other) noexcept;
  KvCache& operator=(KvCache&& other) noexcept;

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }

  // Write access may change any entry: it counts as a rewrite (generation() below).
  KvHead& head(int layer, int kv_head) {
    ++generation_;
    return heads_[layer * n_kv_heads_ + kv_head];
  }
  const KvHead& head(int layer, int kv_head) const { return heads_[layer * n_kv_heads_ + kv_head]; }

  // Position the next appended token gets.
  int32_t next_position = 0;

  // For copies of the entries kept elsewhere (a GPU's mirror, engine/device_forward.h):
  // uid() names this cache for as long as it lives (process-unique, never reused), and
  // generation() changes whenever entries may have been rewritten or removed (write access
  // through head(), Truncate, Clear, Freeze, Thaw), never on Append. So a copy that holds a
  // head's first m entries stays valid while uid and generation are unchanged and only needs
  // entries [m, n).
  uint64_t uid() const { return uid_; }
  uint64_t generation() const { return generation_; }

  // Appends n tokens' K and V for one layer: k, v are [n, n_kv_heads * head_dim] (row-major,
  // head-major within a row), positions [n]. Values are rounded to nearest fp16.
  void Append(int layer, const float* k, const float* v, const int32_t* positions, int64_t n);
  // Drops everything past the first n entries of every head (undo a speculative append).
  // Frozen entries are never dropped: n below a head's n_frozen() keeps those.
  void Truncate(int64_t n);
  void Reserve(int64_t n_per_head);
  void Clear();

  // Entries summed over all (layer, head) pairs, and the bytes they would take at
  // `bytes_per_value` (2: the fp16 size; 4 for an fp32 store): K and V rows; positions are
  // not counted.
  int64_t TotalEntries() const;
  int64_t Bytes(int bytes_per_value = 2) const;
  // The bytes K and V actually take: frozen segments at their dtype (codes, scales, minima),
  // the rest at fp16. Positions are not counted (4 bytes per entry, whatever the dtype).
  int64_t StoredBytes() const;
  // The bytes the cache's buffers hold in memory: StoredBytes' segments, and the fp16 rows
  // and positions at their vectors' capacity (which outgrows their size as a pass appends).
  int64_t ResidentBytes() const;
  // The most entries any head holds (the attention span).
  int64_t MaxEntries() const;
  // Whether any head holds a quantized segment, and the dtype of the first one (kF16 if none).
  KvDtype StoredDtype() const;

  // Moves every head's entries into one frozen segment of `dtype` (a stored context: the last
  // step of compression). InvalidArgument when the head_dim does not suit the dtype.
  absl::Status Freeze(KvDtype dtype);
  // Gives back every vector's spare capacity (a finished context that will only be read:
  // what a memory tier charges for an entry must be what it holds).
  void ShrinkToFit();
  // Every head's entries back into plain fp16 rows (the inverse of Freeze, lossy for int
  // dtypes), for work that rewrites entries (re-rotation, per-query selection).
  void Thaw();

 private:
  static uint64_t NewUid();

  int n_layers_ = 0, n_kv_heads_ = 0, head_dim_ = 0;
  std::vector<KvHead> heads_;  // [n_layers * n_kv_heads]
  uint64_t uid_ = NewUid();
  uint64_t generation_ = 0;
};

}  // namespace ctxcache
