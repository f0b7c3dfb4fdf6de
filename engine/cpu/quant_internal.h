// Byte layouts of the GGML block formats this engine reads (ggml-common.h), shared by the
// reference dequantizer (quant.cc) and the SIMD kernels (matmul_*.cc). Blocks are packed
// and unaligned inside a row, so kernels read fields with memcpy or unaligned loads.
#pragma once

#include <cstdint>
#include <cstring>

namespace ctxcache::quant_internal {

constexpr int kQK = 32;    // elements per block of the legacy formats (Q4_0 ... Q8_0)
constexpr int kQKK = 256;  // elements per super-block of the K formats

// Fp16 fields are kept as raw bits (uint16_t) so the structs stay trivially copyable and
// byte-exact; half.h converts them.
struct BlockQ4_0 {
  uint16_t d;           // scale
  uint8_t qs[kQK / 2];  // element j in the low nibble of qs[j], element j+16 in the high one
};
struct BlockQ4_1 {
  uint16_t d;  // scale
  uint16_t m;  // minimum: x = q * d + m
  uint8_t qs[kQK / 2];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];        // bit j = fifth bit of element j (little-endian uint32)
  uint8_t qs[kQK / 2];  // low four bits, nibble order as Q4_0
};
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};
// Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed in
// `scales`; x = d * sc * q - dmin * m.
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[kQKK / 2];  // per 64 elements: 32 bytes, low nibbles first sub-block, high second
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[kQKK / 8];  // bit (2i, 2i+1) of qh[l] = fifth bit of sub-blocks 2i, 2i+1, lane l
  uint8_t qs[kQKK / 2];
};
// Q6_K: 16 sub-blocks of 16 with int8 scales; x = d * sc * (q - 32).
struct BlockQ6_K {
  uint8_t ql[kQKK / 2];  // low four bits
  uint8_t qh[kQKK / 4];  // high two bits
  int8_t scales[kQKK / 16];
  uint16_t d;
};

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// Reads a (possibly unaligned) little-endian u16 field.
inline uint16_t LoadU16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block. Bytes 0-3 hold
// scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the same for mins;
// bytes 8-11 the low four bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace ctxcache::quant_internal
