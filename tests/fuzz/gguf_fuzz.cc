// Fuzz target for the untrusted GGUF parser and the tokenizer built from its metadata.
// With clang and -DCTXCACHE_FUZZ=ON this links against libFuzzer (coverage-guided); otherwise
// fuzz_driver.cc replays seeds plus deterministic mutations (run under ASan+UBSan in CI).
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/gguf.h"
#include "engine/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = ctxcache::GgufFile::FromBytes(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  for (const std::string& key : (*file)->keys()) {
    (void)ctxcache::GgufFile::Describe(*(*file)->Find(key));
  }
  auto tok = ctxcache::Tokenizer::FromGguf(**file);
  if (tok.ok()) {
    const auto ids = (*tok)->Encode("Hello, world! 123 <|im_start|> héllo 世界", true, true);
    (void)(*tok)->Decode(ids);
  }
  return 0;
}
