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

}  // namespace ctxcache::testing
