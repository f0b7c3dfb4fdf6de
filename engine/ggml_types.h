// GGML tensor element types as numbered in GGUF files, with their block geometry.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ctxcache {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

struct GgmlTypeTraits {
  std::string_view name;
  int64_t block_size = 0;   // elements per block
  size_t type_size = 0;     // bytes per block
  bool supported = false;   // this engine can dequantize / compute with it
};

// Traits for a raw type number; block_size == 0 for numbers GGML does not define.
GgmlTypeTraits GetGgmlTypeTraits(uint32_t type);
inline GgmlTypeTraits GetGgmlTypeTraits(GgmlType type) {
  return GetGgmlTypeTraits(static_cast<uint32_t>(type));
}

}  // namespace ctxcache
