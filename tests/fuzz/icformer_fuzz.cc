// Fuzz target for the digest compressor's loader (engine/icformer.h) on top of the GGUF
// parser: a compressor file comes from disk, shipped or handed over by an operator. The width
// and fingerprint it is checked against are the file's own (so that the shape checks, not
// the identity check, see the input). Invariants: a refusal is FailedPrecondition; a
// compressor that loads has the shape it states and compresses a small chunk (every weight
// is read) without reading outside the file; its input checks refuse out-of-range calls.
// Seeds: corpus/icformer (the parity fixture, tests/data/digest/tiny_icformer.gguf).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/icformer.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = ctxcache::GgufFile::FromBytes(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  const int64_t width = (*file)->GetInt("icformer.embedding_length").value_or(64);
  const std::string fingerprint = (*file)->GetString("icformer.base_fingerprint").value_or("");
  if (width < 1 || width > (1 << 20)) return 0;
  auto f = ctxcache::IcFormer::FromGguf(*std::move(file), "fuzz input", static_cast<int>(width),
                                        fingerprint);
  if (!f.ok()) {
    FUZZ_CHECK(f.status().code() == absl::StatusCode::kFailedPrecondition);
    return 0;
  }
  const ctxcache::IcFormerConfig& c = (*f)->config();
  FUZZ_CHECK(c.d_model == width && c.n_heads * c.head_dim == c.d_model);
  // Bounded work: small shapes only (a real compressor is checked by the parity test).
  if (int64_t{c.d_model} * (c.d_model + c.d_ff) * c.n_layers > (int64_t{1} << 22)) return 0;
  const int64_t lc = std::min(c.chunk_length, 8);
  const int n = std::min(c.digest_count, 4);
  std::vector<float> emb(lc * c.d_model, 0.25f), out(n * c.d_model);
  FUZZ_CHECK((*f)->CompressChunk(emb.data(), lc, n, out.data(), nullptr).ok());
  FUZZ_CHECK(!(*f)->CompressChunk(emb.data(), lc, c.digest_count + 1, out.data(), nullptr).ok());
  return 0;
}
