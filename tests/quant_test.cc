// Tests of the reference dequantizer (engine/cpu/quant.h): bit-exact parity with the gguf
// Python package through fixtures (tools/make_quant_fixtures.py), and argument checking.
#include "engine/cpu/quant.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ctxcache {
namespace {

struct Fixture {
  uint32_t type = 0;
  uint32_t n = 0;
  std::vector<uint8_t> raw;
  std::vector<float> values;
};

// Parses the format documented at the top of tools/make_quant_fixtures.py.
bool LoadFixture(const std::string& name, Fixture* f, std::string* error) {
  const std::string path = std::string(CTXCACHE_TEST_DATA) + "/quant/" + name + ".bin";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = "cannot open " + path + " (run tools/make_quant_fixtures.py)";
    return false;
  }
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                   std::istreambuf_iterator<char>());
  constexpr size_t kHeader = 20;
  if (bytes.size() < kHeader || std::memcmp(bytes.data(), "CQFX", 4) != 0) {
    *error = path + ": bad magic";
    return false;
  }
  uint32_t header[4];  // version, type, n, n_bytes
  std::memcpy(header, bytes.data() + 4, sizeof(header));
  if (header[0] != 1) {
    *error = path + ": unsupported version " + std::to_string(header[0]);
    return false;
  }
  f->type = header[1];
  f->n = header[2];
  const size_t n_bytes = header[3];
  if (bytes.size() != kHeader + n_bytes + 4ull * f->n) {
    *error = path + ": size does not match header";
    return false;
  }
  f->raw.assign(bytes.begin() + kHeader, bytes.begin() + kHeader + n_bytes);
  f->values.resize(f->n);
  std::memcpy(f->values.data(), bytes.data() + kHeader + n_bytes, 4ull * f->n);
  return true;
}

class DequantizeFixtureTest : public ::testing::TestWithParam<GgmlType> {};

TEST_P(DequantizeFixtureTest, MatchesGgufBitForBit) {
  const GgmlType type = GetParam();
  const GgmlTypeTraits traits = GetGgmlTypeTraits(type);
  Fixture f;
  std::string error;
  ASSERT_TRUE(LoadFixture(std::string(traits.name), &f, &error)) << error;
  ASSERT_EQ(f.type, static_cast<uint32_t>(type));
  ASSERT_EQ(f.raw.size(), f.n / traits.block_size * traits.type_size);

  std::vector<float> out(f.n, -12345.0f);
  ASSERT_TRUE(DequantizeRow(type, f.raw.data(), out.data(), f.n).ok());
  // Dequantization is a few exactly specified float operations per element, done in the
  // same order as ggml/gguf, so the results must be identical. Bits are compared (not
  // values) so that -0.0, infinities and NaN payloads are checked too.
  int mismatches = 0;
  for (uint32_t i = 0; i < f.n && mismatches < 10; ++i) {
    uint32_t got, want;
    std::memcpy(&got, &out[i], 4);
    std::memcpy(&want, &f.values[i], 4);
    if (got != want) {
      ++mismatches;
      ADD_FAILURE() << traits.name << " element " << i << " (block " << i / traits.block_size
                    << "): got " << out[i] << " want " << f.values[i];
    }
  }

  // Dequantizing block by block gives the same as the whole row (no state across blocks).
  std::vector<float> piece(traits.block_size);
  for (uint32_t b = 0; b < f.n / traits.block_size; ++b) {
    ASSERT_TRUE(
        DequantizeRow(type, f.raw.data() + b * traits.type_size, piece.data(), traits.block_size)
            .ok());
    ASSERT_EQ(0,
              std::memcmp(piece.data(), out.data() + b * traits.block_size, 4 * traits.block_size))
        << "block " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeFixtureTest,
                         ::testing::Values(GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16,
                                           GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0,
                                           GgmlType::kQ5_1, GgmlType::kQ8_0, GgmlType::kQ4_K,
                                           GgmlType::kQ5_K, GgmlType::kQ6_K),
                         [](const auto& info) {
                           return std::string(GetGgmlTypeTraits(info.param).name);
                         });

using ::testing::HasSubstr;

TEST(DequantizeRowTest, RejectsPartialBlock) {
  std::vector<uint8_t> raw(4 * 144);
  std::vector<float> out(1024);
  const absl::Status s = DequantizeRow(GgmlType::kQ4_K, raw.data(), out.data(), 300);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("Q4_K"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("256"));
  EXPECT_EQ(DequantizeRow(GgmlType::kQ4_0, raw.data(), out.data(), 33).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DequantizeRow(GgmlType::kQ8_0, raw.data(), out.data(), -32).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DequantizeRowTest, RejectsUnsupportedTypes) {
  std::vector<uint8_t> raw(1024);
  std::vector<float> out(256);
  for (GgmlType t : {GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ8_1, GgmlType::kQ8_K,
                     static_cast<GgmlType>(4), static_cast<GgmlType>(999)}) {
    const absl::Status s = DequantizeRow(t, raw.data(), out.data(), 256);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << static_cast<uint32_t>(t);
    EXPECT_THAT(std::string(s.message()), HasSubstr("unsupported"));
  }
}

TEST(DequantizeRowTest, EmptyRowIsOk) {
  EXPECT_TRUE(DequantizeRow(GgmlType::kQ6_K, nullptr, nullptr, 0).ok());
}

}  // namespace
}  // namespace ctxcache
