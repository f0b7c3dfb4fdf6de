// The value that compression produces, the cache stores and generation consumes.
// engine/ produces and consumes it; cache/ serialises it (cache/codec) without knowing how
// it was made. KV form holds the kept entries per (layer, KV head) with their original
// positions (heads may keep different tokens); digest form holds soft-token embeddings.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_cache.h"

namespace ctxcache {

enum class ContextKind : uint8_t { kKv = 1, kDigest = 2 };

struct CompressedContext {
  ContextKind kind = ContextKind::kKv;
  std::string model_fingerprint;   // Model::fingerprint() of the model that made it
  std::string method;              // "finch", "snapkv", ..., "none" for a full context
  std::string params;              // canonical "key=value;..." (sorted keys), part of the key
  uint32_t method_version = 1;     // bumped when a method's output changes for the same input
  int64_t source_tokens = 0;       // tokens of the original document
  // KV form: kept entries; kv.next_position is where tokens after this context go (the
  // original length unless re-rotated to compact positions).
  KvCache kv;
  // Digest form: [digest_tokens, d_model] input embeddings.
  int64_t digest_tokens = 0;
  std::vector<float> digest;

  // Entries kept over all (layer, head) pairs, and what the full context would hold. A digest
  // keeps no entries but occupies digest_tokens positions of every (layer, KV head) once the
  // model has read it (ComposeContexts runs it): those count as its kept entries. A digest
  // context's kv is empty but has the model's shape.
  int64_t KeptEntries() const {
    return kind == ContextKind::kDigest ? digest_tokens * kv.n_layers() * kv.n_kv_heads()
                                        : kv.TotalEntries();
  }
  int64_t FullEntries() const {
    return source_tokens * kv.n_layers() * kv.n_kv_heads();
  }
  // Bytes as stored: the kept K/V entries (fp16 rows, or int8 / int4 codes with their
  // scales), or a digest's vectors at fp16 (the codec's row type; the engine rounds digests
  // to fp16 when it makes them, so every tier returns the same values). And what the
  // uncompressed context would need at fp16. Positions (4 bytes per kept entry) are counted
  // in neither.
  int64_t KvBytes() const {
    return kind == ContextKind::kDigest ? static_cast<int64_t>(digest.size()) * 2
                                        : kv.StoredBytes();
  }
  int64_t FullKvBytes() const {
    return FullEntries() * 2 * kv.head_dim() * 2;
  }
  // The KV this context occupies while a request attends to it: its stored entries for KV
  // form; for a digest, the fp16 K/V rows the model writes when it reads the digests.
  int64_t AttendedKvBytes() const {
    return kind == ContextKind::kDigest ? KeptEntries() * 2 * kv.head_dim() * 2
                                        : kv.StoredBytes();
  }
  // The compression every report states: fp16 bytes of the full KV / bytes stored.
  double BytesRatio() const {
    const int64_t used = KvBytes();
    return used > 0 ? static_cast<double>(FullKvBytes()) / static_cast<double>(used) : 0.0;
  }
};

}  // namespace ctxcache
