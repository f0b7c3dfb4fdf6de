// Fuzz target for the compressed-context decoder (cache/codec.h), which reads bytes from a
// shared Redis and from disk. Each input is decoded twice: as given (exercising the envelope
// checks: magic, version, size, checksum) and "resealed" with its size field and CRC32C
// recomputed, so that mutations reach the field-by-field parser behind the checksum, which
// no random mutation would otherwise pass. Whatever decodes must re-encode, and re-encoding
// at fp32 must be a fixed point. With clang and -DCTXCACHE_FUZZ=ON this links against
// libFuzzer; otherwise fuzz_driver.cc replays seeds (from codec_seeds.cc) plus mutations.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "cache/codec.h"
#include "cache/crc32c.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

constexpr char kFingerprint[] = "81ee8e0f5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";

void DecodeOne(std::string_view bytes) {
  auto c = ctxcache::DecodeContext(bytes);
  (void)ctxcache::DecodeContext(bytes, kFingerprint);
  if (!c.ok()) return;
  // A decoded context is always a valid one, and fp32 stores every float exactly.
  auto once = ctxcache::EncodeContext(*c, ctxcache::BlobDtype::kF32);
  FUZZ_CHECK(once.ok());
  auto back = ctxcache::DecodeContext(*once, c->model_fingerprint);
  FUZZ_CHECK(back.ok());
  auto twice = ctxcache::EncodeContext(*back, ctxcache::BlobDtype::kF32);
  FUZZ_CHECK(twice.ok() && *twice == *once);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  DecodeOne(in);
  if (size >= ctxcache::kContextHeaderBytes + 4) {
    std::string sealed(in);
    const uint64_t total = sealed.size();
    std::memcpy(sealed.data() + 8, &total, 8);
    const uint32_t crc = ctxcache::Crc32c(sealed.data(), sealed.size() - 4);
    std::memcpy(sealed.data() + sealed.size() - 4, &crc, 4);
    DecodeOne(sealed);
  }
  return 0;
}
