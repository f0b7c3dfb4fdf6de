// Builds GGUF files byte by byte for tests: valid ones for round trips, and corrupt ones
// (every field can be overridden) for the reader's error paths.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ctxcache::testing {

class GgufBuilder {
 public:
  GgufBuilder& Magic(const std::string& m) { magic_ = m; return *this; }
  GgufBuilder& Version(uint32_t v) { version_ = v; return *this; }
  // Overrides the counts written in the header (default: the real counts).
  GgufBuilder& TensorCount(uint64_t n) { tensor_count_ = n; has_tensor_count_ = true; return *this; }
  GgufBuilder& KvCount(uint64_t n) { kv_count_ = n; has_kv_count_ = true; return *this; }

  GgufBuilder& KvU32(const std::string& key, uint32_t v) { return Kv(key, 4, Pod(v)); }
  GgufBuilder& KvI32(const std::string& key, int32_t v) { return Kv(key, 5, Pod(v)); }
  GgufBuilder& KvF32(const std::string& key, float v) { return Kv(key, 6, Pod(v)); }
  GgufBuilder& KvBool(const std::string& key, bool v) { return Kv(key, 7, std::string(1, v ? 1 : 0)); }
  GgufBuilder& KvStr(const std::string& key, const std::string& v) { return Kv(key, 8, Str(v)); }
  GgufBuilder& KvStrArray(const std::string& key, const std::vector<std::string>& v) {
    std::string body = Pod(uint32_t{8}) + Pod(uint64_t{v.size()});
    for (const auto& s : v) body += Str(s);
    return Kv(key, 9, body);
  }
  GgufBuilder& KvI32Array(const std::string& key, const std::vector<int32_t>& v) {
    std::string body = Pod(uint32_t{5}) + Pod(uint64_t{v.size()});
    for (int32_t x : v) body += Pod(x);
    return Kv(key, 9, body);
  }
  GgufBuilder& KvF32Array(const std::string& key, const std::vector<float>& v) {
    std::string body = Pod(uint32_t{6}) + Pod(uint64_t{v.size()});
    for (float x : v) body += Pod(x);
    return Kv(key, 9, body);
  }
  // A raw key/value with an arbitrary type number and encoded body.
  GgufBuilder& Kv(const std::string& key, uint32_t type, const std::string& body) {
    kvs_ += Str(key) + Pod(type) + body;
    ++n_kv_;
    return *this;
  }

  // A tensor: dims (ne[0] first), ggml type, data bytes. Offset defaults to the next aligned
  // position in the data section; pass offset to override.
  GgufBuilder& Tensor(const std::string& name, const std::vector<uint64_t>& dims, uint32_t type,
                      const std::string& data, int64_t offset = -1) {
    uint64_t off = offset >= 0 ? static_cast<uint64_t>(offset) : AlignUp(data_.size());
    infos_ += Str(name) + Pod(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) infos_ += Pod(d);
    infos_ += Pod(type) + Pod(off);
    if (offset < 0) {
      data_.resize(off, '\0');
      data_ += data;
    }
    ++n_tensors_;
    return *this;
  }

  GgufBuilder& Alignment(uint64_t a) { alignment_ = a; return *this; }

  std::string Build() const {
    std::string out = magic_ + Pod(version_);
    out += Pod(has_tensor_count_ ? tensor_count_ : n_tensors_);
    out += Pod(has_kv_count_ ? kv_count_ : n_kv_);
    out += kvs_ + infos_;
    if (n_tensors_ > 0) {
      out.resize(AlignUp(out.size()), '\0');
      out += data_;
    }
    return out;
  }

  template <typename T>
  static std::string Pod(T v) {
    std::string s(sizeof(T), '\0');
    std::memcpy(s.data(), &v, sizeof(T));
    return s;
  }
  static std::string Str(const std::string& s) { return Pod(uint64_t{s.size()}) + s; }

 private:
  uint64_t AlignUp(uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  std::string magic_ = "GGUF";
  uint32_t version_ = 3;
  uint64_t tensor_count_ = 0, kv_count_ = 0;
  bool has_tensor_count_ = false, has_kv_count_ = false;
  uint64_t n_kv_ = 0, n_tensors_ = 0;
  uint64_t alignment_ = 32;
  std::string kvs_, infos_, data_;
};

// A copy of the GGUF file `file` with metadata `key` set to a value of GGUF type `type`
// (encoded `body`, as GgufBuilder::Kv takes it): replaced where the key exists, appended
// otherwise. Tensor infos and data are kept as they are (their offsets are relative to the
// data section, which is re-aligned after the new header). Returns "" when `file` is not a
// GGUF v2/v3 file this helper can walk (a test bug, not a reader test).
inline std::string GgufWithKv(const std::string& file, const std::string& key, uint32_t type,
                              const std::string& body) {
  size_t p = 0;
  bool ok = true;
  auto take = [&](size_t n) {
    ok = ok && p + n <= file.size();
    const size_t at = p;
    if (ok) p += n;
    return at;
  };
  auto u32 = [&]() { uint32_t v = 0; const size_t at = take(4); if (ok) std::memcpy(&v, &file[at], 4); return v; };
  auto u64 = [&]() { uint64_t v = 0; const size_t at = take(8); if (ok) std::memcpy(&v, &file[at], 8); return v; };
  auto str = [&]() { const uint64_t n = u64(); const size_t at = take(n); return ok ? file.substr(at, n) : std::string(); };
  auto scalar_size = [](uint32_t t) -> size_t {
    switch (t) {
      case 0: case 1: case 7: return 1;
      case 2: case 3: return 2;
      case 4: case 5: case 6: return 4;
      case 10: case 11: case 12: return 8;
      default: return 0;
    }
  };
  auto skip_value = [&](uint32_t t) {
    if (t == 8) { str(); return; }
    if (t == 9) {
      const uint32_t et = u32();
      const uint64_t n = u64();
      for (uint64_t i = 0; ok && i < n; ++i) {
        if (et == 8) str(); else take(scalar_size(et));
      }
      return;
    }
    ok = ok && scalar_size(t) != 0;
    take(scalar_size(t));
  };
  if (file.compare(0, 4, "GGUF") != 0) return "";
  take(4);
  const uint32_t version = u32();
  const uint64_t n_tensors = u64(), n_kv = u64();
  uint64_t alignment = 32;
  std::string kvs;
  bool replaced = false;
  for (uint64_t i = 0; ok && i < n_kv; ++i) {
    const size_t start = p;
    const std::string k = str();
    const uint32_t t = u32();
    const size_t value_at = p;
    skip_value(t);
    if (k == "general.alignment" && t == 4) std::memcpy(&alignment, &file[value_at], 4), alignment &= 0xffffffffu;
    if (k == key) {
      kvs += GgufBuilder::Str(key) + GgufBuilder::Pod(type) + body;
      replaced = true;
    } else {
      kvs += file.substr(start, p - start);
    }
  }
  if (!replaced) kvs += GgufBuilder::Str(key) + GgufBuilder::Pod(type) + body;
  const size_t infos_start = p;
  for (uint64_t i = 0; ok && i < n_tensors; ++i) {
    str();
    const uint32_t n_dims = u32();
    take(8 * static_cast<size_t>(n_dims) + 4 + 8);
  }
  if (!ok || alignment == 0) return "";
  const std::string infos = file.substr(infos_start, p - infos_start);
  const size_t data_start = (p + alignment - 1) / alignment * alignment;
  std::string out = "GGUF" + GgufBuilder::Pod(version) + GgufBuilder::Pod(n_tensors) +
                    GgufBuilder::Pod(n_kv + (replaced ? 0 : 1)) + kvs + infos;
  out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
  if (data_start < file.size()) out += file.substr(data_start);
  return out;
}

}  // namespace ctxcache::testing
