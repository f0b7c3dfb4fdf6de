// Reference (scalar, exact) dequantization of the GGML block formats. Every SIMD kernel is
// checked against these functions, and these are checked bit-for-bit against the gguf Python
// package's dequantizer through fixtures (tests/quant_test.cc, tools/make_quant_fixtures.py).
//
// The float operations mirror ggml-quants.c dequantize_row_* exactly, including their order
// (e.g. (d * sc) * q - dmin * m), so results are identical, not merely close. The project
// builds with -std=c++20, which implies -ffp-contract=off: no FMA contraction changes them.
#include "engine/cpu/quant.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "engine/cpu/quant_internal.h"

namespace ctxcache {
namespace {

using namespace quant_internal;  // NOLINT(build/namespaces): block structs only

// Copies block i of type B out of an unaligned byte stream.
template <typename B>
B LoadBlock(const void* src, int64_t i) {
  B b;
  std::memcpy(&b, static_cast<const uint8_t*>(src) + i * sizeof(B), sizeof(B));
  return b;
}

void DequantizeQ4_0(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ4_0>(src, i);
    const float d = Fp16ToFp32(b.d);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = static_cast<float>((b.qs[j] & 0x0f) - 8) * d;
      y[j + kQK / 2] = static_cast<float>((b.qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantizeQ4_1(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ4_1>(src, i);
    const float d = Fp16ToFp32(b.d), m = Fp16ToFp32(b.m);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = static_cast<float>(b.qs[j] & 0x0f) * d + m;
      y[j + kQK / 2] = static_cast<float>(b.qs[j] >> 4) * d + m;
    }
  }
}

// The fifth bits of Q5_0/Q5_1: bit j of the little-endian u32 belongs to element j.
inline uint32_t LoadQh(const uint8_t qh[4]) {
  return static_cast<uint32_t>(qh[0]) | static_cast<uint32_t>(qh[1]) << 8 |
         static_cast<uint32_t>(qh[2]) << 16 | static_cast<uint32_t>(qh[3]) << 24;
}

void DequantizeQ5_0(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ5_0>(src, i);
    const float d = Fp16ToFp32(b.d);
    const uint32_t qh = LoadQh(b.qh);
    for (int j = 0; j < kQK / 2; ++j) {
      const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
      y[j] = static_cast<float>(((b.qs[j] & 0x0f) | h0 << 4) - 16) * d;
      y[j + kQK / 2] = static_cast<float>(((b.qs[j] >> 4) | h1 << 4) - 16) * d;
    }
  }
}

void DequantizeQ5_1(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ5_1>(src, i);
    const float d = Fp16ToFp32(b.d), m = Fp16ToFp32(b.m);
    const uint32_t qh = LoadQh(b.qh);
    for (int j = 0; j < kQK / 2; ++j) {
      const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
      y[j] = static_cast<float>((b.qs[j] & 0x0f) | h0 << 4) * d + m;
      y[j + kQK / 2] = static_cast<float>((b.qs[j] >> 4) | h1 << 4) * d + m;
    }
  }
}

void DequantizeQ8_0(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ8_0>(src, i);
    const float d = Fp16ToFp32(b.d);
    for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(b.qs[j]) * d;
  }
}

void DequantizeQ4_K(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const auto b = LoadBlock<BlockQ4_K>(src, i);
    const float d = Fp16ToFp32(b.d), dmin = Fp16ToFp32(b.dmin);
    const uint8_t* q = b.qs;
    // Each 32 bytes of qs carry two sub-blocks: low nibbles, then high nibbles.
    for (int is = 0; is < 8; is += 2, q += 32) {
      uint8_t sc, m;
      ScaleMinK4(is, b.scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      ScaleMinK4(is + 1, b.scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0f) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void DequantizeQ5_K(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const auto b = LoadBlock<BlockQ5_K>(src, i);
    const float d = Fp16ToFp32(b.d), dmin = Fp16ToFp32(b.dmin);
    const uint8_t* ql = b.qs;
    uint8_t u1 = 1, u2 = 2;  // qh bit of the current pair of sub-blocks
    for (int is = 0; is < 8; is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
      uint8_t sc, m;
      ScaleMinK4(is, b.scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      ScaleMinK4(is + 1, b.scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) {
        *y++ = d1 * static_cast<float>((ql[l] & 0x0f) + (b.qh[l] & u1 ? 16 : 0)) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        *y++ = d2 * static_cast<float>((ql[l] >> 4) + (b.qh[l] & u2 ? 16 : 0)) - m2;
      }
    }
  }
}

void DequantizeQ6_K(const void* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const auto b = LoadBlock<BlockQ6_K>(src, i);
    const float d = Fp16ToFp32(b.d);
    const uint8_t* ql = b.ql;
    const uint8_t* qh = b.qh;
    const int8_t* sc = b.scales;
    // Each half (128 elements) uses 64 bytes of ql, 32 of qh and 8 scales (one per 16).
    for (int n = 0; n < kQKK; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32;
        const int q2 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32;
        const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
        const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
        y[l] = d * sc[is + 0] * static_cast<float>(q1);
        y[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
        y[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
        y[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
      }
    }
  }
}

}  // namespace

absl::Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n) {
  const GgmlTypeTraits traits = GetGgmlTypeTraits(type);
  if (traits.block_size == 0 || !traits.supported) {
    return absl::InvalidArgumentError(
        absl::StrCat("DequantizeRow: unsupported GGML type ", static_cast<uint32_t>(type),
                     traits.name.empty() ? "" : absl::StrCat(" (", std::string(traits.name), ")")));
  }
  if (n < 0 || n % traits.block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DequantizeRow: ", std::string(traits.name), " row of ", n,
                     " elements is not a whole number of ", traits.block_size, "-element blocks"));
  }
  if (n == 0) return absl::OkStatus();
  if (src == nullptr || dst == nullptr) {
    return absl::InvalidArgumentError("DequantizeRow: null src or dst");
  }
  const int64_t nb = n / traits.block_size;
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Fp16ToFp32(LoadU16(bytes + 2 * i));
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFp32(LoadU16(bytes + 2 * i));
      break;
    case GgmlType::kQ4_0:
      DequantizeQ4_0(src, dst, nb);
      break;
    case GgmlType::kQ4_1:
      DequantizeQ4_1(src, dst, nb);
      break;
    case GgmlType::kQ5_0:
      DequantizeQ5_0(src, dst, nb);
      break;
    case GgmlType::kQ5_1:
      DequantizeQ5_1(src, dst, nb);
      break;
    case GgmlType::kQ8_0:
      DequantizeQ8_0(src, dst, nb);
      break;
    case GgmlType::kQ4_K:
      DequantizeQ4_K(src, dst, nb);
      break;
    case GgmlType::kQ5_K:
      DequantizeQ5_K(src, dst, nb);
      break;
    case GgmlType::kQ6_K:
      DequantizeQ6_K(src, dst, nb);
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("DequantizeRow: no dequantizer for ", std::string(traits.name)));
  }
  return absl::OkStatus();
}

}  // namespace ctxcache
