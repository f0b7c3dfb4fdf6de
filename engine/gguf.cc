#include "engine/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace ctxcache {
namespace {

constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
// Caps that no real file comes near; they bound what a hostile header can make us allocate
// before the bytes behind it are checked.
constexpr uint64_t kMaxStringBytes = uint64_t{1} << 30;

// A cursor over untrusted bytes. Every read is bounds-checked and fails with the offset.
class Reader {
 public:
  Reader(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}

  uint64_t offset() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  template <typename T>
  absl::Status Read(T* out, absl::string_view what) {
    if (remaining() < sizeof(T)) return Truncated(what, sizeof(T));
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, absl::string_view what) {
    uint64_t len = 0;
    RETURN_IF_ERROR(Read(&len, what));
    if (len > kMaxStringBytes || len > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF: ", what, " has length ", len, " at offset ", pos_ - 8, " but only ",
          remaining(), " bytes remain (truncated or corrupt file)"));
    }
    out->assign(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return absl::OkStatus();
  }

  absl::Status Truncated(absl::string_view what, uint64_t need) const {
    return absl::InvalidArgumentError(absl::StrCat("GGUF: file truncated while reading ", what,
                                                   " at offset ", pos_, " (need ", need,
                                                   " bytes, ", remaining(), " remain)"));
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// Minimum encoded size of one element of a value type; 0 for unknown types.
uint64_t MinEncodedSize(uint32_t type) {
  switch (static_cast<GgufValueType>(type)) {
    case GgufValueType::kUint8: case GgufValueType::kInt8: case GgufValueType::kBool: return 1;
    case GgufValueType::kUint16: case GgufValueType::kInt16: return 2;
    case GgufValueType::kUint32: case GgufValueType::kInt32: case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64: case GgufValueType::kInt64: case GgufValueType::kFloat64:
    case GgufValueType::kString: case GgufValueType::kArray:
      return 8;
  }
  return 0;
}

// Reads one scalar of `type` into an int64/uint64/double/bool/string variant alternative.
template <typename Variant>
absl::Status ReadScalar(Reader& r, GgufValueType type, Variant* out, absl::string_view what) {
  switch (type) {
    case GgufValueType::kUint8: { uint8_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = int64_t{v}; break; }
    case GgufValueType::kInt8: { int8_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = int64_t{v}; break; }
    case GgufValueType::kUint16: { uint16_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = int64_t{v}; break; }
    case GgufValueType::kInt16: { int16_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = int64_t{v}; break; }
    case GgufValueType::kUint32: { uint32_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = int64_t{v}; break; }
    case GgufValueType::kInt32: { int32_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = int64_t{v}; break; }
    case GgufValueType::kInt64: { int64_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = v; break; }
    case GgufValueType::kUint64: { uint64_t v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = v; break; }
    case GgufValueType::kFloat32: { float v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = double{v}; break; }
    case GgufValueType::kFloat64: { double v = 0; RETURN_IF_ERROR(r.Read(&v, what)); *out = v; break; }
    case GgufValueType::kBool: {
      uint8_t v = 0;
      RETURN_IF_ERROR(r.Read(&v, what));
      if (v > 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("GGUF: ", what, " is a bool with invalid byte ", int{v}));
      }
      *out = v == 1;
      break;
    }
    case GgufValueType::kString: {
      std::string s;
      RETURN_IF_ERROR(r.ReadString(&s, what));
      *out = std::move(s);
      break;
    }
    case GgufValueType::kArray:
      return absl::InvalidArgumentError(absl::StrCat("GGUF: ", what, ": nested arrays are not supported"));
  }
  return absl::OkStatus();
}

bool IsIntegerType(GgufValueType t) {
  return t == GgufValueType::kUint8 || t == GgufValueType::kInt8 ||
         t == GgufValueType::kUint16 || t == GgufValueType::kInt16 ||
         t == GgufValueType::kUint32 || t == GgufValueType::kInt32 ||
         t == GgufValueType::kUint64 || t == GgufValueType::kInt64;
}

absl::Status ReadValue(Reader& r, uint32_t raw_type, GgufValue* out, const std::string& key) {
  if (MinEncodedSize(raw_type) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF: key '", key, "' has unknown value type ", raw_type));
  }
  out->type = static_cast<GgufValueType>(raw_type);
  if (out->type != GgufValueType::kArray) {
    return ReadScalar(r, out->type, &out->value, key);
  }
  uint32_t elem_raw = 0;
  uint64_t count = 0;
  RETURN_IF_ERROR(r.Read(&elem_raw, key));
  RETURN_IF_ERROR(r.Read(&count, key));
  const uint64_t elem_min = MinEncodedSize(elem_raw);
  if (elem_min == 0 || elem_raw == static_cast<uint32_t>(GgufValueType::kArray)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF: key '", key, "' is an array of unsupported element type ", elem_raw));
  }
  if (count > r.remaining() / elem_min) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' claims ", count,
                                                   " array elements but only ", r.remaining(),
                                                   " bytes remain"));
  }
  const auto elem = static_cast<GgufValueType>(elem_raw);
  out->array_type = elem;
  std::variant<int64_t, uint64_t, double, bool, std::string> item;
  if (elem == GgufValueType::kString) {
    std::vector<std::string> v;
    v.reserve(count);
    for (uint64_t i = 0; i < count; ++i) {
      v.emplace_back();
      RETURN_IF_ERROR(r.ReadString(&v.back(), key));
    }
    out->value = std::move(v);
  } else if (elem == GgufValueType::kBool) {
    std::vector<bool> v(count);
    for (uint64_t i = 0; i < count; ++i) {
      RETURN_IF_ERROR(ReadScalar(r, elem, &item, key));
      v[i] = std::get<bool>(item);
    }
    out->value = std::move(v);
  } else if (elem == GgufValueType::kFloat32 || elem == GgufValueType::kFloat64) {
    std::vector<double> v(count);
    for (uint64_t i = 0; i < count; ++i) {
      RETURN_IF_ERROR(ReadScalar(r, elem, &item, key));
      v[i] = std::get<double>(item);
    }
    out->value = std::move(v);
  } else {
    std::vector<int64_t> v(count);
    for (uint64_t i = 0; i < count; ++i) {
      RETURN_IF_ERROR(ReadScalar(r, elem, &item, key));
      if (std::holds_alternative<uint64_t>(item)) {
        // uint64 arrays are stored as int64; values beyond INT64_MAX cannot be represented.
        const uint64_t u = std::get<uint64_t>(item);
        if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          return absl::InvalidArgumentError(
              absl::StrCat("GGUF: key '", key, "' has a uint64 element too large: ", u));
        }
        v[i] = static_cast<int64_t>(u);
      } else {
        v[i] = std::get<int64_t>(item);
      }
    }
    out->value = std::move(v);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    auto msg = absl::StrCat("cannot open model file '", path, "': ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a regular file"));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ > 0) {
    void* p = mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("mmap of '", path, "' failed: ", std::strerror(err)));
    }
    file->mapping_ = p;
    file->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  absl::Status s = file->Parse();
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return file;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBytes(std::string bytes) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = "<memory>";
  file->size_ = bytes.size();
  const size_t capacity = (bytes.size() + 63) / 64 * 64 + 64;
  file->owned_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, capacity)));
  if (file->owned_ == nullptr) return absl::ResourceExhaustedError("out of memory for GGUF bytes");
  std::memcpy(file->owned_.get(), bytes.data(), bytes.size());
  file->base_ = file->owned_.get();
  RETURN_IF_ERROR(file->Parse());
  return file;
}

void GgufFile::FreeDeleter::operator()(void* p) const { std::free(p); }

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) munmap(mapping_, size_);
}

absl::Status GgufFile::Parse() {
  Reader r(base_, size_);
  uint32_t magic = 0;
  RETURN_IF_ERROR(r.Read(&magic, "magic"));
  if (std::memcmp(&magic, "GGUF", 4) != 0) {
    return absl::InvalidArgumentError("not a GGUF file (bad magic; expected 'GGUF')");
  }
  RETURN_IF_ERROR(r.Read(&version_, "version"));
  if (version_ != 2 && version_ != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported GGUF version ", version_,
        (version_ == 1 ? " (v1 files are obsolete: reconvert the model)"
                       : " (supported: 2, 3; a huge value means a big-endian file)")));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  RETURN_IF_ERROR(r.Read(&n_tensors, "tensor count"));
  RETURN_IF_ERROR(r.Read(&n_kv, "metadata count"));
  // Each KV needs at least a key length and a type; each tensor info at least 8+4+4+8 bytes.
  if (n_kv > r.remaining() / 12) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF header claims ", n_kv, " metadata entries; the file is too small"));
  }
  if (n_tensors > r.remaining() / 24) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF header claims ", n_tensors, " tensors; the file is too small"));
  }

  key_order_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    RETURN_IF_ERROR(r.ReadString(&key, absl::StrCat("metadata key #", i)));
    uint32_t type = 0;
    RETURN_IF_ERROR(r.Read(&type, key));
    GgufValue value;
    RETURN_IF_ERROR(ReadValue(r, type, &value, key));
    if (kv_.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF: duplicate metadata key '", key, "'"));
    }
    key_order_.push_back(key);
    kv_.emplace(std::move(key), std::move(value));
  }

  if (const GgufValue* a = Find("general.alignment")) {
    if (!IsIntegerType(a->type)) {
      return absl::InvalidArgumentError("GGUF: general.alignment must be an integer");
    }
    const int64_t al = std::holds_alternative<int64_t>(a->value)
                           ? std::get<int64_t>(a->value)
                           : static_cast<int64_t>(std::min<uint64_t>(
                                 std::get<uint64_t>(a->value), uint64_t{1} << 62));
    if (al <= 0 || (al & (al - 1)) != 0 || al > (1 << 20)) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF: general.alignment ", al, " is not a power of two in [1, 2^20]"));
    }
    alignment_ = static_cast<uint64_t>(al);
  }

  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    RETURN_IF_ERROR(r.ReadString(&t.name, absl::StrCat("name of tensor #", i)));
    uint32_t n_dims = 0;
    RETURN_IF_ERROR(r.Read(&n_dims, t.name));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF: tensor '", t.name, "' has ", n_dims,
                                                     " dimensions (supported: 1..4)"));
    }
    int64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne = 0;
      RETURN_IF_ERROR(r.Read(&ne, t.name));
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(n_elements, static_cast<int64_t>(ne), &n_elements)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "GGUF: tensor '", t.name, "' dimension ", d, " = ", ne,
            (ne == 0 ? " is zero" : " overflows the element count")));
      }
      t.dims.push_back(static_cast<int64_t>(ne));
    }
    t.n_elements = n_elements;
    uint32_t type = 0;
    RETURN_IF_ERROR(r.Read(&type, t.name));
    const GgmlTypeTraits traits = GetGgmlTypeTraits(type);
    if (traits.block_size == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF: tensor '", t.name, "' has unknown type ", type));
    }
    t.type = static_cast<GgmlType>(type);
    if (t.dims[0] % traits.block_size != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF: tensor '", t.name, "' (", std::string(traits.name), ", shape [",
                       absl::StrJoin(t.dims, ", "), "]) has rows of ", t.dims[0],
                       " elements, not a multiple of the ", std::string(traits.name),
                       " block size ", traits.block_size));
    }
    // n_elements / block_size * type_size cannot overflow: n_elements < 2^63 and
    // type_size <= 292 < block_size * 2 for every block type except F32/F16/BF16.
    const uint64_t n_blocks = static_cast<uint64_t>(n_elements / traits.block_size);
    if (__builtin_mul_overflow(n_blocks, traits.type_size, &t.n_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF: tensor '", t.name, "' byte size overflows"));
    }
    RETURN_IF_ERROR(r.Read(&t.offset, t.name));
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF: tensor '", t.name, "' offset ",
                                                     t.offset, " is not aligned to ", alignment_));
    }
    if (tensor_index_.contains(t.name)) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF: duplicate tensor name '", t.name, "'"));
    }
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment.
  uint64_t data_start = r.offset();
  data_start = (data_start + alignment_ - 1) / alignment_ * alignment_;
  if (n_tensors > 0 && data_start > size_) {
    return absl::InvalidArgumentError("GGUF: file ends before its tensor data section");
  }
  const uint64_t data_size = n_tensors > 0 ? size_ - data_start : 0;
  for (GgufTensorInfo& t : tensors_) {
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF: tensor '", t.name, "' (", t.n_bytes, " bytes at data offset ", t.offset,
          ") extends past the end of the file (data section is ", data_size, " bytes)"));
    }
    t.data = base_ + data_start + t.offset;
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_.find(std::string(key));
  return it == kv_.end() ? nullptr : &it->second;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

absl::Status Missing(std::string_view key) {
  return absl::NotFoundError(absl::StrCat("GGUF metadata key '", std::string(key), "' is missing"));
}
absl::Status WrongType(std::string_view key, absl::string_view want) {
  return absl::InvalidArgumentError(
      absl::StrCat("GGUF metadata key '", std::string(key), "' is not ", want));
}

}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValueType::kString) return WrongType(key, "a string");
  return std::get<std::string>(v->value);
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (std::holds_alternative<int64_t>(v->value) && IsIntegerType(v->type)) {
    return std::get<int64_t>(v->value);
  }
  if (std::holds_alternative<uint64_t>(v->value)) {
    const uint64_t u = std::get<uint64_t>(v->value);
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(u);
    }
    return WrongType(key, "an integer in int64 range");
  }
  return WrongType(key, "an integer");
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (std::holds_alternative<double>(v->value)) return std::get<double>(v->value);
  if (IsIntegerType(v->type)) {
    ASSIGN_OR_RETURN(int64_t i, GetInt(key));
    return static_cast<double>(i);
  }
  return WrongType(key, "a number");
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValueType::kBool) return WrongType(key, "a bool");
  return std::get<bool>(v->value);
}

absl::StatusOr<const std::vector<std::string>*> GgufFile::GetStringArray(
    std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString) {
    return WrongType(key, "an array of strings");
  }
  return &std::get<std::vector<std::string>>(v->value);
}

absl::StatusOr<const std::vector<int64_t>*> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValueType::kArray || !IsIntegerType(v->array_type)) {
    return WrongType(key, "an array of integers");
  }
  return &std::get<std::vector<int64_t>>(v->value);
}

absl::StatusOr<const std::vector<double>*> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValueType::kArray || (v->array_type != GgufValueType::kFloat32 &&
                                           v->array_type != GgufValueType::kFloat64)) {
    return WrongType(key, "an array of floats");
  }
  return &std::get<std::vector<double>>(v->value);
}

std::string GgufFile::Describe(const GgufValue& value, size_t max_items) {
  auto quote = [](const std::string& s) {
    std::string out = "\"";
    for (char c : s.substr(0, 200)) {
      if (c == '\n') out += "\\n";
      else if (c == '"') out += "\\\"";
      else out += c;
    }
    if (s.size() > 200) out += "...";
    return out + "\"";
  };
  return std::visit(
      [&](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          return quote(v);
        } else if constexpr (std::is_same_v<T, bool>) {
          return v ? "true" : "false";
        } else if constexpr (std::is_arithmetic_v<T>) {
          return absl::StrCat(v);
        } else {
          std::vector<std::string> parts;
          for (size_t i = 0; i < v.size() && i < max_items; ++i) {
            if constexpr (std::is_same_v<typename T::value_type, std::string>) {
              parts.push_back(quote(v[i]));
            } else {
              parts.push_back(absl::StrCat(static_cast<typename T::value_type>(v[i])));
            }
          }
          std::string s = absl::StrCat("[", absl::StrJoin(parts, ", "));
          if (v.size() > max_items) absl::StrAppend(&s, ", ... (", v.size(), " items)");
          return s + "]";
        }
      },
      value.value);
}

}  // namespace ctxcache
