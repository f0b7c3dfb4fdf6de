// SHA-256 (OpenSSL's EVP implementation, SHA-NI accelerated where the CPU has it). Used for
// model fingerprints and context keys, which must be stable across processes and machines.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace ctxcache {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  Sha256& Update(const void* data, size_t n);
  Sha256& Update(std::string_view s) { return Update(s.data(), s.size()); }
  // Length-prefixed update, so that field boundaries are part of the hash.
  Sha256& UpdateField(std::string_view s);
  std::array<uint8_t, 32> Final();
  std::string FinalHex();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::string ToHex(const uint8_t* data, size_t n);

}  // namespace ctxcache
