// Fuzz target for the untrusted GGUF parser (engine/gguf.h) and the tokenizer built from its
// metadata. Invariants: every key listed can be found and described; every tensor's data lies
// inside the file (its first and last bytes are read, so ASan reports any overrun); a
// tokenizer that builds keeps the invariants of tokenizer_checks.h on a few strings.
// Seeds: gguf_seeds.cc (small GGUFs, written at build time) and corpus/gguf.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tokenizer_checks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = ctxcache::GgufFile::FromBytes(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  const ctxcache::GgufFile& f = **file;
  for (const std::string& key : f.keys()) {
    const ctxcache::GgufValue* v = f.Find(key);
    FUZZ_CHECK(v != nullptr);
    (void)ctxcache::GgufFile::Describe(*v);
  }
  const uint8_t* begin = f.file_data();
  const uint8_t* end = begin + f.file_size();
  volatile uint8_t sink = 0;
  for (const ctxcache::GgufTensorInfo& t : f.tensors()) {
    FUZZ_CHECK(t.n_elements >= 0);
    FUZZ_CHECK(f.FindTensor(t.name) != nullptr);
    if (t.n_bytes == 0) continue;
    FUZZ_CHECK(t.data != nullptr && t.data >= begin &&
               t.n_bytes <= static_cast<uint64_t>(end - t.data));
    sink = sink + t.data[0] + t.data[t.n_bytes - 1];
  }
  auto tok = ctxcache::Tokenizer::FromGguf(f);
  if (tok.ok()) {
    for (const char* text : {"Hello, world! 123 <|im_start|> h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C",
                             " the  the\n\n\t12345 \xF0\x9F\x98\x80", "\xE2\x82", "\xFF<s>x"}) {
      ctxcache::fuzz::CheckTokenizer(**tok, text);
    }
  }
  return 0;
}
