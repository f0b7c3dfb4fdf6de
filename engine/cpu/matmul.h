// Products of quantized weight matrices with fp32 activations: MatVec for decode, MatMul
// (a GEMM path) for prefill. Each entry point has a plain reference (…Reference) that the
// parity tests compare against, and picks its fast path at run time (cpu_features.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "common/thread_pool.h"
#include "engine/ggml_types.h"

namespace ctxcache {

// A weight matrix as stored in GGUF: n_out rows (output features), each row n_in elements of
// `type` (ne[0] = n_in is the contiguous dimension), row r at data + r * row_bytes.
struct WeightMatrix {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  int64_t n_in = 0;
  int64_t n_out = 0;
  size_t row_bytes = 0;
};

// OK when w describes a matrix MatVec/MatMul can compute with: a supported type, n_in a
// multiple of its block size, row_bytes at least one row, data set when there is any.
// Callers validate once (at model load); MatVec/MatMul re-check cheaply and, on a matrix
// that fails, write NaN to y instead of computing (they cannot return a Status).
absl::Status ValidateWeightMatrix(const WeightMatrix& w);

// y[n_out] = W · x[n_in]. pool may be null (single thread).
void MatVec(const WeightMatrix& w, const float* x, float* y, ThreadPool* pool);
void MatVecReference(const WeightMatrix& w, const float* x, float* y);

// y[n_tok, n_out] = x[n_tok, n_in] · Wᵀ (row-major activations, one token per row).
void MatMul(const WeightMatrix& w, const float* x, int64_t n_tok, float* y, ThreadPool* pool);
void MatMulReference(const WeightMatrix& w, const float* x, int64_t n_tok, float* y);

// MatMul computes up to this many tokens with the dot kernels, which give every token row
// bitwise what MatVec gives it alone (a batched decode step relies on it); above, a GEMM.
int64_t MatMulDotMaxTokens();

}  // namespace ctxcache
