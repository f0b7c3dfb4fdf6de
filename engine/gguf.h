// GGUF (v2, v3) reader. The file is untrusted: every count, length, offset and dimension is
// bounds- and overflow-checked, and failures come back as absl::Status naming what is wrong.
// Tensor data is mmapped and never copied; TensorInfo::data points into the mapping, which
// lives as long as the GgufFile.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/ggml_types.h"

namespace ctxcache {

enum class GgufValueType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6,
  kBool = 7, kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};

// One metadata value. Scalars of every integer width are widened to int64/uint64; arrays
// keep their element type. Arrays of arrays are rejected by the reader.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  GgufValueType array_type = GgufValueType::kUint8;  // element type when type == kArray
  std::variant<int64_t, uint64_t, double, bool, std::string,
               std::vector<int64_t>, std::vector<double>, std::vector<std::string>,
               std::vector<bool>>
      value;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ne[0] first: ne[0] is the contiguous (row) dimension
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;        // relative to the start of the data section
  uint64_t n_bytes = 0;
  int64_t n_elements = 0;
  const uint8_t* data = nullptr;  // into the mapping
};

class GgufFile {
 public:
  // Maps and parses `path`.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory copy (tests, fuzzing). The bytes are owned by the returned object.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBytes(std::string bytes);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& path() const { return path_; }
  // Whole file, for fingerprinting.
  const uint8_t* file_data() const { return base_; }
  uint64_t file_size() const { return size_; }

  const std::vector<std::string>& keys() const { return key_order_; }
  const GgufValue* Find(std::string_view key) const;
  bool Has(std::string_view key) const { return Find(key) != nullptr; }

  // Typed getters: NotFound when missing, InvalidArgument when the type does not fit
  // (any integer type converts to another when the value is in range).
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;  // any float or integer
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<const std::vector<std::string>*> GetStringArray(std::string_view key) const;
  absl::StatusOr<const std::vector<int64_t>*> GetIntArray(std::string_view key) const;
  absl::StatusOr<const std::vector<double>*> GetFloatArray(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // A readable rendering of a value (arrays summarised), for `ctxcache info`.
  static std::string Describe(const GgufValue& value, size_t max_items = 8);

 private:
  GgufFile() = default;
  absl::Status Parse();

  std::string path_;
  // FromBytes storage, 64-byte aligned like a mapping so tensor data keeps its alignment.
  struct FreeDeleter {
    void operator()(void* p) const;
  };
  std::unique_ptr<uint8_t, FreeDeleter> owned_;
  void* mapping_ = nullptr;       // mmap base when opened from a file
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<std::string> key_order_;
  std::unordered_map<std::string, GgufValue> kv_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace ctxcache
