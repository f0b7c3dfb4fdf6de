// GGUF reader: round trips of hand-built files, and corrupt files that must fail with a
// status naming the problem (never a crash: this suite also runs under ASan+UBSan in CI).
#include "engine/gguf.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "engine/model.h"
#include "tests/gguf_builder.h"

namespace ctxcache {
namespace {

using ::ctxcache::testing::GgufBuilder;
using ::testing::HasSubstr;

std::string F32Bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

GgufBuilder ValidFile() {
  GgufBuilder b;
  b.KvStr("general.architecture", "llama")
      .KvU32("llama.block_count", 2)
      .KvF32("llama.rope.freq_base", 10000.f)
      .KvBool("tokenizer.ggml.add_bos_token", true)
      .KvStrArray("tokenizer.ggml.tokens", {"a", "b", "<s>"})
      .KvI32Array("tokenizer.ggml.token_type", {1, 1, 3})
      .Tensor("w", {4, 2}, 0, F32Bytes({1, 2, 3, 4, 5, 6, 7, 8}))
      .Tensor("b", {4}, 0, F32Bytes({9, 10, 11, 12}));
  return b;
}

absl::Status ParseError(const std::string& bytes) {
  auto f = GgufFile::FromBytes(bytes);
  return f.ok() ? absl::OkStatus() : f.status();
}

TEST(GgufTest, ReadsMetadataAndTensors) {
  auto f = GgufFile::FromBytes(ValidFile().Build());
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("llama.block_count"), 2);
  EXPECT_FLOAT_EQ(*g.GetFloat("llama.rope.freq_base"), 10000.f);
  EXPECT_TRUE(*g.GetBool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ((*g.GetStringArray("tokenizer.ggml.tokens"))->at(2), "<s>");
  EXPECT_EQ((*g.GetIntArray("tokenizer.ggml.token_type"))->at(2), 3);
  ASSERT_EQ(g.tensors().size(), 2u);
  const GgufTensorInfo* w = g.FindTensor("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dims, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(w->n_bytes, 32u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w->data) % 32, 0u) << "tensor data must be aligned";
  float last;
  std::memcpy(&last, w->data + 28, 4);
  EXPECT_EQ(last, 8.f);
  const GgufTensorInfo* b = g.FindTensor("b");
  float first;
  std::memcpy(&first, b->data, 4);
  EXPECT_EQ(first, 9.f);
}

TEST(GgufTest, TypedGettersReportMissingAndWrongType) {
  auto f = GgufFile::FromBytes(ValidFile().Build());
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)->GetString("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*f)->GetString("llama.block_count").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*f)->GetIntArray("tokenizer.ggml.tokens").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GgufTest, AcceptsVersion2AndVocabOnlyFiles) {
  GgufBuilder b;
  b.Version(2).KvStrArray("tokenizer.ggml.tokens", {"x"});
  auto f = GgufFile::FromBytes(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->tensors().empty());
}

TEST(GgufTest, HonoursCustomAlignment) {
  GgufBuilder b;
  b.Alignment(64).KvU32("general.alignment", 64).Tensor("t", {2}, 0, F32Bytes({1, 2}));
  auto f = GgufFile::FromBytes(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->alignment(), 64u);
}

struct CorruptCase {
  std::string name;
  std::string bytes;
  std::string message;  // substring the error must contain
};

std::vector<CorruptCase> CorruptCases() {
  std::vector<CorruptCase> cases;
  const std::string valid = ValidFile().Build();
  cases.push_back({"empty", "", "truncated"});
  cases.push_back({"bad_magic", GgufBuilder().Magic("GGML").Build(), "bad magic"});
  cases.push_back({"version_1", GgufBuilder().Version(1).Build(), "version 1"});
  cases.push_back({"big_endian_version", GgufBuilder().Version(0x03000000).Build(),
                   "unsupported GGUF version"});
  cases.push_back({"truncated_header", valid.substr(0, 14), "truncated"});
  for (size_t cut : {30ul, 100ul, valid.size() / 2, valid.size() - 1}) {
    cases.push_back({"truncated_at_" + std::to_string(cut), valid.substr(0, cut), ""});
  }
  cases.push_back({"huge_tensor_count", GgufBuilder().TensorCount(uint64_t{1} << 62).Build(),
                   "tensors"});
  cases.push_back({"huge_kv_count", GgufBuilder().KvCount(~uint64_t{0}).Build(), "metadata"});
  cases.push_back({"huge_string", GgufBuilder().Kv("k", 8, GgufBuilder::Pod(~uint64_t{0})).Build(),
                   "length"});
  cases.push_back({"huge_array",
                   GgufBuilder()
                       .Kv("k", 9, GgufBuilder::Pod(uint32_t{4}) + GgufBuilder::Pod(uint64_t{1} << 61))
                       .Build(),
                   "array elements"});
  cases.push_back({"nested_array",
                   GgufBuilder()
                       .Kv("k", 9, GgufBuilder::Pod(uint32_t{9}) + GgufBuilder::Pod(uint64_t{1}))
                       .Build(),
                   "element type"});
  cases.push_back({"unknown_value_type", GgufBuilder().Kv("k", 77, "").Build(), "unknown value type"});
  cases.push_back({"bad_bool", GgufBuilder().Kv("k", 7, std::string(1, 5)).Build(), "bool"});
  cases.push_back({"duplicate_key", GgufBuilder().KvU32("a", 1).KvU32("a", 2).Build(),
                   "duplicate metadata key 'a'"});
  cases.push_back({"duplicate_tensor",
                   GgufBuilder().Tensor("t", {2}, 0, F32Bytes({1, 2})).Tensor("t", {2}, 0, F32Bytes({1, 2})).Build(),
                   "duplicate tensor name 't'"});
  cases.push_back({"offset_past_end",
                   GgufBuilder().Tensor("t", {2}, 0, F32Bytes({1, 2})).Tensor("u", {2}, 0, "", 4096).Build(),
                   "past the end"});
  cases.push_back({"misaligned_offset",
                   GgufBuilder().Tensor("t", {2}, 0, F32Bytes({1, 2}), 4).Build(),
                   "not aligned"});
  cases.push_back({"bad_alignment_value", GgufBuilder().KvU32("general.alignment", 24).Build(),
                   "power of two"});
  cases.push_back({"dimension_overflow",
                   GgufBuilder().Tensor("t", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, "").Build(),
                   "overflows"});
  cases.push_back({"negative_dimension",
                   GgufBuilder().Tensor("t", {~uint64_t{0}}, 0, "").Build(), "overflows"});
  cases.push_back({"zero_dimension", GgufBuilder().Tensor("t", {0}, 0, "").Build(), "is zero"});
  cases.push_back({"too_many_dims", GgufBuilder().Tensor("t", {1, 1, 1, 1, 1}, 0, "").Build(),
                   "dimensions"});
  cases.push_back({"unknown_tensor_type", GgufBuilder().Tensor("t", {32}, 99, "").Build(),
                   "unknown type 99"});
  cases.push_back({"partial_block", GgufBuilder().Tensor("t", {33}, 8, std::string(68, 0)).Build(),
                   "tensor 't' (Q8_0, shape [33]) has rows of 33 elements, not a multiple of the "
                   "Q8_0 block size 32"});
  cases.push_back({"tensor_bytes_short",
                   GgufBuilder().Tensor("t", {64}, 0, F32Bytes({1, 2})).Build(), "past the end"});
  return cases;
}

TEST(GgufTest, CorruptFilesFailWithClearErrors) {
  for (const CorruptCase& c : CorruptCases()) {
    SCOPED_TRACE(c.name);
    absl::Status s = ParseError(c.bytes);
    ASSERT_FALSE(s.ok()) << c.name << " parsed but should not have";
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message)) << s;
  }
}

TEST(GgufTest, EveryTruncationOfAValidFileFailsCleanly) {
  const std::string valid = ValidFile().Build();
  for (size_t cut = 0; cut < valid.size(); ++cut) {
    EXPECT_FALSE(GgufFile::FromBytes(valid.substr(0, cut)).ok()) << "cut at " << cut;
  }
}

TEST(GgufTest, OpenReportsMissingFileAndParsesRealFile) {
  auto missing = GgufFile::Open("/nonexistent/model.gguf");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/model.gguf"));

  const std::string path = ::testing::TempDir() + "/gguf_test_valid.gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out << ValidFile().Build();
  }
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 2u);
  std::remove(path.c_str());
}

TEST(GgufTest, DescribeSummarisesArrays) {
  auto f = GgufFile::FromBytes(ValidFile().Build());
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(GgufFile::Describe(*(*f)->Find("tokenizer.ggml.tokens"), 2),
            "[\"a\", \"b\", ... (3 items)]");
  EXPECT_EQ(GgufFile::Describe(*(*f)->Find("llama.block_count")), "2");
}

// A real (tiny) model whose tensor `name` claims ggml type `type`: the type field follows the
// name, the dimension count and the dimensions in the tensor's info record.
std::string TinyModelWithTensorType(const std::string& name, uint32_t type) {
  std::ifstream in(std::string(CTXCACHE_TEST_DATA) + "/tiny/llama_mha.gguf", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string bytes = ss.str();
  const size_t at = bytes.find(name);
  EXPECT_NE(at, std::string::npos) << name;
  if (at == std::string::npos) return "";
  uint32_t n_dims;
  std::memcpy(&n_dims, &bytes[at + name.size()], 4);
  std::memcpy(&bytes[at + name.size() + 4 + 8 * n_dims], &type, 4);
  const std::string path =
      ::testing::TempDir() + "/gguf_test_type_" + std::to_string(type) + ".gguf";
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// A tensor the engine cannot compute is refused when the model loads, with its name, type and
// shape: never a NaN answer or a crash later.
TEST(GgufTest, ModelLoadRefusesTensorsItCannotCompute) {
  const std::string ok = TinyModelWithTensorType("blk.0.attn_q.weight", 3);  // its own Q4_1
  ASSERT_TRUE(Model::Load(ok).ok()) << Model::Load(ok).status();

  const std::string q8_1 = TinyModelWithTensorType("blk.0.attn_q.weight", 9);
  auto m = Model::Load(q8_1);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented) << m.status();
  EXPECT_THAT(std::string(m.status().message()),
              HasSubstr("tensor 'blk.0.attn_q.weight' (shape [96, 96]) has type Q8_1"));

  // Q2_K's blocks are 256 elements, rows here are 96: refused by the reader, by name.
  const std::string q2_k = TinyModelWithTensorType("blk.0.attn_k.weight", 10);
  m = Model::Load(q2_k);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_THAT(std::string(m.status().message()),
              HasSubstr("tensor 'blk.0.attn_k.weight' (Q2_K, shape [96, 96]) has rows of 96"));
  for (const auto& p : {ok, q8_1, q2_k}) std::remove(p.c_str());
}

}  // namespace
}  // namespace ctxcache
