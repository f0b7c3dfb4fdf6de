// llama.cpp's tokenizer conformance suite (ggml-vocab-{llama-spm,phi-3,gpt-2}): every input
// must tokenize to exactly llama.cpp's ids (no BOS, special tokens not parsed), and decode back
// to itself. Reads tests/data/tokenizer/suite/ (a copy, see NOTICE.md there) and falls back to
// $CTXCACHE_SHARED_DIR/tokenizer-suite.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"

namespace ctxcache {
namespace {

namespace fs = std::filesystem;

std::string SuiteDir() {
  const fs::path local = fs::path(CTXCACHE_TEST_DATA) / "tokenizer" / "suite";
  if (fs::exists(local / "ggml-vocab-gpt-2.gguf")) return local.string();
  return (fs::path(CTXCACHE_SHARED_DIR) / "tokenizer-suite").string();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Case {
  std::string text;
  std::vector<int32_t> ids;
};

// The format of llama.cpp's test-tokenizer-0: inputs separated by "\n__ggml_vocab_test__\n",
// one output line of space-separated ids per input.
std::vector<Case> LoadCases(const std::string& base) {
  const std::string inp = ReadFile(base + ".inp");
  const std::string out = ReadFile(base + ".out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t next = inp.find(sep, pos);
    if (next == std::string::npos) {
      texts.push_back(inp.substr(pos));
      break;
    }
    texts.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::vector<std::string> lines = absl::StrSplit(out, '\n');
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  EXPECT_EQ(texts.size(), lines.size()) << base;
  std::vector<Case> cases;
  for (size_t i = 0; i < texts.size() && i < lines.size(); ++i) {
    Case c{texts[i], {}};
    for (absl::string_view tok : absl::StrSplit(lines[i], ' ', absl::SkipWhitespace())) {
      c.ids.push_back(std::stoi(std::string(tok)));
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

std::string Show(const std::vector<int32_t>& ids) { return absl::StrJoin(ids, " "); }

class ConformanceTest : public testing::TestWithParam<std::string> {};

bool CheckedIn(const std::string& name) {
  return name == "llama-spm" || name == "phi-3" || name == "gpt-2";
}

TEST_P(ConformanceTest, MatchesLlamaCppLineForLine) {
  // The larger vocabularies are fetched by tools/fetch_vocabs.sh (run by tools/setup.sh).
  const std::string base =
      CheckedIn(GetParam())
          ? SuiteDir() + "/ggml-vocab-" + GetParam() + ".gguf"
          : std::string(CTXCACHE_SOURCE_DIR) + "/models/vocab/ggml-vocab-" + GetParam() + ".gguf";
  if (!fs::exists(base)) {
    GTEST_SKIP() << "vocabulary " << base << " not fetched: run tools/fetch_vocabs.sh";
  }
  auto gguf = GgufFile::Open(base);
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  auto tok = Tokenizer::FromGguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<Case> cases = LoadCases(base);
  ASSERT_GE(cases.size(), 40u);  // 46 in the current suite
  int mismatches = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const std::vector<int32_t> got = (*tok)->Encode(c.text, /*add_bos=*/false,
                                                    /*parse_special=*/false);
    if (got != c.ids && mismatches++ < 5) {
      ADD_FAILURE() << GetParam() << " case " << i << ": '" << absl::CHexEscape(c.text)
                    << "'\n  want: " << Show(c.ids) << "\n  got:  " << Show(got);
    }
    // Byte-level BPE and SPM (with its space prefix taken off again) are lossless on valid
    // UTF-8, which every suite input is; llama.cpp's detokenizer only differs by its optional
    // clean-up of spaces before punctuation, which we do not apply.
    EXPECT_EQ((*tok)->Decode(c.ids), c.text) << GetParam() << " case " << i;
  }
  EXPECT_EQ(mismatches, 0) << GetParam() << ": " << mismatches << " of " << cases.size()
                           << " cases differ";
}

INSTANTIATE_TEST_SUITE_P(Vocabs, ConformanceTest,
                         // The first three are checked in; the others (several MB each) are
                         // fetched from PyPI by tools/fetch_vocabs.sh.
                         testing::Values("llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2",
                                         "starcoder", "command-r", "mpt", "refact"),
                         [](const testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& ch : name) {
                             if (ch == '-') ch = '_';
                           }
                           return name;
                         });

}  // namespace
}  // namespace ctxcache
