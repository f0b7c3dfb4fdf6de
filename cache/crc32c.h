// CRC32C (Castagnoli), the checksum of the compressed-context codec. Chosen over CRC32 (zlib)
// because x86-64 computes it in hardware (SSE4.2 `crc32`), so checking a multi-megabyte KV
// blob on every cache read costs well under a millisecond; a table-driven path gives the same
// value on CPUs without it. Values match the usual CRC32C test vectors (RFC 3720 B.4).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ctxcache {

// CRC32C of `n` bytes. `crc` chains calls: Crc32c(b, nb, Crc32c(a, na)) == CRC of a then b.
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);
inline uint32_t Crc32c(std::string_view s, uint32_t crc = 0) {
  return Crc32c(s.data(), s.size(), crc);
}

// The portable path alone, so that tests can compare it with the hardware path.
uint32_t Crc32cPortable(const void* data, size_t n, uint32_t crc = 0);

}  // namespace ctxcache
