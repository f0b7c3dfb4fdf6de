// Block formats of GGML quantized types and their plain (reference) dequantization.
// Layouts follow ggml-common.h; each row of a weight matrix is a whole number of blocks.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "engine/ggml_types.h"

namespace ctxcache {

// Dequantizes n elements (a multiple of the type's block size) from src into dst.
// InvalidArgument for unsupported types or a partial block.
absl::Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n);

}  // namespace ctxcache
