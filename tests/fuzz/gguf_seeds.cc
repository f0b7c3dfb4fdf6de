// Writes the seed corpus of the gguf fuzz target: small GGUFs that parse, one per path the
// parser and the tokenizer factory take (a byte-level BPE vocabulary with merges and special
// tokens, the same under other pre-tokenizers, a SentencePiece vocabulary with scores and
// byte fallback, a file with a tensor and every value type). Small, so the fuzzer runs fast;
// the checked-in vocabularies (megabytes) are the tokenizer target's business.
// Usage: gguf_seeds DIR (the directory is created if missing).
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "tests/gguf_builder.h"

namespace {

using ctxcache::testing::GgufBuilder;

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + n.
std::string ByteLevel(int b) {
  static int map[256];
  static bool done = false;
  if (!done) {
    int next = 256;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE;
      map[c] = printable ? c : next++;
    }
    done = true;
  }
  const int cp = map[b];
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

std::string Bpe(const std::string& pre) {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  for (int b = 0; b < 256; ++b) {
    tokens.push_back(ByteLevel(b));
    types.push_back(1);
  }
  const std::string sp = ByteLevel(' ');  // "Ġ"
  for (const std::string& t :
       std::vector<std::string>{sp + "t", "he", sp + "the", "in", sp + "a", "12", "123"}) {
    tokens.push_back(t);
    types.push_back(1);
  }
  for (const char* t : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    tokens.push_back(t);
    types.push_back(3);
  }
  const int32_t n = static_cast<int32_t>(tokens.size());
  return GgufBuilder()
      .KvStr("general.architecture", "llama")
      .KvStr("tokenizer.ggml.model", "gpt2")
      .KvStr("tokenizer.ggml.pre", pre)
      .KvStrArray("tokenizer.ggml.tokens", tokens)
      .KvI32Array("tokenizer.ggml.token_type", types)
      .KvStrArray("tokenizer.ggml.merges",
                  {sp + " t", "h e", sp + "t he", "i n", sp + " a", "1 2", "12 3"})
      .KvU32("tokenizer.ggml.bos_token_id", n - 3)
      .KvU32("tokenizer.ggml.eos_token_id", n - 1)
      .KvBool("tokenizer.ggml.add_bos_token", false)
      .KvStr("tokenizer.chat_template",
             "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
             "'<|im_end|>' + '\\n'}}{% endfor %}")
      .Build();
}

std::string Spm() {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  std::vector<float> scores = {0, 0, 0};
  char buf[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
    tokens.push_back(buf);
    types.push_back(6);
    scores.push_back(0);
  }
  const std::vector<std::string> words = {"\xE2\x96\x81",
                                          "\xE2\x96\x81t",
                                          "\xE2\x96\x81the",
                                          "t",
                                          "h",
                                          "e",
                                          "he",
                                          "o",
                                          "\xE2\x96\x81wor",
                                          "ld"};
  for (size_t i = 0; i < words.size(); ++i) {
    tokens.push_back(words[i]);
    types.push_back(1);
    scores.push_back(-static_cast<float>(i));
  }
  return GgufBuilder()
      .KvStr("general.architecture", "llama")
      .KvStr("tokenizer.ggml.model", "llama")
      .KvStrArray("tokenizer.ggml.tokens", tokens)
      .KvI32Array("tokenizer.ggml.token_type", types)
      .KvF32Array("tokenizer.ggml.scores", scores)
      .KvU32("tokenizer.ggml.bos_token_id", 1)
      .KvU32("tokenizer.ggml.eos_token_id", 2)
      .KvU32("tokenizer.ggml.unknown_token_id", 0)
      .KvBool("tokenizer.ggml.add_space_prefix", true)
      .Build();
}

std::string Tensors() {
  std::string data;
  for (int i = 0; i < 6; ++i) data += GgufBuilder::Pod(static_cast<float>(i) * 0.5f);
  return GgufBuilder()
      .KvStr("general.architecture", "llama")
      .KvU32("llama.context_length", 2048)
      .KvI32("llama.block_count", 2)
      .KvF32("llama.rope.freq_base", 10000.0f)
      .KvBool("general.flag", true)
      .KvF32Array("general.floats", {1.0f, -2.5f})
      .KvI32Array("general.ints", {1, -2, 3})
      .Kv("general.u64", 10, GgufBuilder::Pod(uint64_t{1} << 40))
      .Kv("general.i8", 1, GgufBuilder::Pod(int8_t{-5}))
      .Kv("general.f64", 12, GgufBuilder::Pod(2.5))
      .Tensor("token_embd.weight", {3, 2}, /*F32*/ 0, data)
      .Tensor("output_norm.weight", {3}, 0, data.substr(0, 12))
      .Build();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gguf_seeds DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    std::perror(dir.c_str());
    return 1;
  }
  const struct {
    const char* name;
    std::string bytes;
  } seeds[] = {
      {"bpe_gpt2.gguf", Bpe("gpt-2")},       {"bpe_qwen2.gguf", Bpe("qwen2")},
      {"bpe_llama3.gguf", Bpe("llama-bpe")}, {"bpe_smollm.gguf", Bpe("smollm")},
      {"bpe_default.gguf", Bpe("default")},  {"spm.gguf", Spm()},
      {"tensors.gguf", Tensors()},
  };
  for (const auto& seed : seeds) {
    std::ofstream out(dir + "/" + seed.name, std::ios::binary);
    out << seed.bytes;
    if (!out) {
      std::fprintf(stderr, "gguf_seeds: cannot write %s/%s\n", dir.c_str(), seed.name);
      return 1;
    }
  }
  return 0;
}
