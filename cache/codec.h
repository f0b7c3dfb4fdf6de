// The compressed-context codec: CompressedContext <-> bytes, for the memory and Redis tiers
// and for context files. The bytes come back from places we do not control (a shared Redis,
// a disk), so the reader treats them as untrusted: every length is bounds- and
// overflow-checked, nothing is allocated that the input could not justify, and damage is
// reported as a status naming the field and offset (tests/fuzz/codec_fuzz.cc fuzzes it).
//
// Format "CTXC", versions 1 and 2. Little-endian; offsets and sizes in bytes. Version 2 is
// version 1 plus quantized KV contexts (kv_dtype int8 / int4, kv_cache.h); a writer uses it
// only for those, so fp16 contexts stay readable by builds that know only version 1 (and a
// version-1 build refuses a quantized one by its version, with a message saying why).
//
//   off size  field
//     0    4  magic "CTXC"
//     4    2  u16 format version (1); a reader rejects versions it does not know
//     6    1  u8  kind: 1 KV, 2 digest (ContextKind)
//     7    1  u8  dtype of every float payload below: 1 fp16, 2 bf16, 3 fp32, 4 int8 rows;
//                 version 2 only: 5 int8 segments, 6 int4 segments (KV kind, no digest rows)
//     8    8  u64 total size of the blob, checksum included (truncation is named as such)
//    16   32  model fingerprint: the raw SHA-256 whose lowercase hex is Model::fingerprint()
//    48    4  u32 method_version
//    52    4  i32 next_position                      (>= 0)
//    56    8  i64 source_tokens                      (>= 0)
//    64    4  u32 n_layers                           (<= 4096)
//    68    4  u32 n_kv_heads                         (<= 4096)
//    72    4  u32 head_dim     (1..65536 when n_layers * n_kv_heads > 0, else <= 65536)
//    76    4  u32 d_model of the digest vectors      (<= 1 << 20; 0 when digest_tokens is 0)
//    80    8  i64 digest_tokens                      (>= 0)
//    88    2  u16 method length (<= 256), then that many bytes
//          4  u32 params length (<= 1 MiB), then that many bytes
//             n_layers * n_kv_heads head records, layer-major (layer 0 head 0, head 1, ...):
//          4    u32 n, the entries this head kept
//         4n    i32 original positions, each in [0, next_position)
//               n K rows, then n V rows, each head_dim values in dtype; or, for dtypes 5
//               and 6, the head's segment: K codes then V codes ([n, head_dim] bytes for
//               int8, [n, head_dim / 2] for int4, two channels per byte as KvSegment
//               says), then fp16 K scales and K minima ([ceil(n / 32), head_dim] each), then
//               fp16 V scales and V minima ([n, head_dim / 32] each)
//             digest_tokens rows of d_model values in dtype
//          4  u32 CRC32C of every byte before it
//
// A row in dtype: fp16 / bf16 are 2 bytes per value, fp32 4; int8 is an fp32 scale followed
// by one int8 per value (value = q * scale, scale = max|x| / 127, round to nearest).
// KvCache holds K/V as fp16 (kv_cache.h), so fp16 K/V rows are a straight copy either way,
// and K/V rows of the other dtypes are decoded to fp32 and then rounded to nearest fp16.
// Both the KV section and the digest section are always present (empty for the other kind),
// so a round trip is lossless for every field whatever the kind.
//
// Why this shape: the fixed 88-byte header lets a reader name the problem (wrong model,
// truncated, newer version) before it touches the payload; per-head records mirror KvCache,
// whose heads keep different tokens; the checksum covers the header too, so a damaged
// fingerprint reads as damage (DataLoss), never as "made by another model".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/compress/compressed_context.h"

namespace ctxcache {

// How K/V rows (and digest vectors) are stored. The engine keeps K/V as fp16, so kF16 is
// lossless for KV contexts (a copy) and half the bytes of kF32; kBf16 and kInt8 are lossy.
enum class BlobDtype : uint8_t { kF16 = 1, kBf16 = 2, kF32 = 3, kInt8 = 4 };

inline constexpr char kContextMagic[4] = {'C', 'T', 'X', 'C'};
inline constexpr uint16_t kContextFormatVersion = 2;  // the newest this build reads
inline constexpr size_t kContextHeaderBytes = 88;  // fixed part, before the method string

// "fp16", "bf16", "fp32", "int8".
const char* BlobDtypeName(BlobDtype dtype);

// Serialises `context`. `dtype` encodes float rows (fp16 K/V, digest vectors); a context
// holding int8 / int4 segments is written as they are (format version 2), whatever dtype. InvalidArgument if the value is inconsistent (row sizes that do not
// match the shape, positions outside [0, next_position), a fingerprint that is not 64
// lowercase hex characters, non-finite values with kInt8, ...): a bad value is refused at
// write time rather than stored and refused by every reader.
absl::StatusOr<std::string> EncodeContext(const CompressedContext& context,
                                          BlobDtype dtype = BlobDtype::kF16);

// Parses bytes made by EncodeContext. Errors:
//  * InvalidArgument: not a context (bad magic), unknown format version, truncated or
//    trailing bytes, and (only for bytes that pass the checksum, i.e. a writer bug or a
//    forgery) fields outside their ranges; the message names the field and offset.
//  * DataLoss: checksum mismatch (the bytes were damaged after they were written).
//  * FailedPrecondition: `expected_fingerprint` is given and the context was made by another
//    model ("context was made by model 81ee8e0f..., this server runs 1a2b3c4d...").
absl::StatusOr<CompressedContext> DecodeContext(std::string_view bytes,
                                                std::string_view expected_fingerprint = {});

// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
// reader sees the old file or the new one, never a half-written one (also after a crash: the
// data is fsync'ed before the rename). The file is readable by its owner only (0600): a KV
// cache holds its document in recoverable form.
absl::Status WriteContextFile(const std::string& path, std::string_view bytes);
// Reads a whole file. NotFound if it does not exist.
absl::StatusOr<std::string> ReadContextFile(const std::string& path);

}  // namespace ctxcache
