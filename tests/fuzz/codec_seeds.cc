// Writes the seed corpus of the codec fuzz target: small valid contexts covering both forms,
// every dtype, per-head lengths that differ and empty heads. Generated at test time rather
// than checked in, so the seeds always follow the current format version.
// Usage: codec_seeds DIR (the directory is created if missing).
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cache/codec.h"
#include "common/half.h"

namespace {

ctxcache::CompressedContext KvContext() {
  ctxcache::CompressedContext c;
  c.model_fingerprint = "81ee8e0f5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";
  c.method = "snapkv";
  c.params = "budget=0.5";
  c.source_tokens = 6;
  c.kv = ctxcache::KvCache(2, 2, 4);
  c.kv.next_position = 6;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      ctxcache::KvHead& kh = c.kv.head(l, h);
      const int n = l + h;  // 0, 1, 1, 2 entries
      for (int i = 0; i < n; ++i) kh.pos.push_back(2 * i + h);
      for (int i = 0; i < n * 4; ++i) {
        kh.k.push_back(ctxcache::Fp32ToFp16(0.25f * static_cast<float>(i - l)));
        kh.v.push_back(ctxcache::Fp32ToFp16(-0.5f * static_cast<float>(i + h)));
      }
    }
  }
  return c;
}

ctxcache::CompressedContext DigestContext() {
  ctxcache::CompressedContext c = KvContext();
  c.kind = ctxcache::ContextKind::kDigest;
  c.method = "icformer";
  c.kv = ctxcache::KvCache(2, 2, 4);
  c.kv.next_position = 3;
  c.digest_tokens = 3;
  for (int i = 0; i < 3 * 5; ++i) c.digest.push_back(0.1f * static_cast<float>(i));
  return c;
}

// A KV context stored at kv_dtype (format version 2): head_dim 32, the narrowest that
// quantizes, with heads of 0, 1, 33 and 2 entries (two key groups in one of them).
ctxcache::CompressedContext QuantContext(ctxcache::KvDtype dtype) {
  ctxcache::CompressedContext c = KvContext();
  c.params = std::string("budget=0.5;kv_dtype=") + ctxcache::KvDtypeName(dtype);
  c.source_tokens = 40;
  c.kv = ctxcache::KvCache(2, 2, 32);
  c.kv.next_position = 40;
  const int counts[4] = {0, 1, 33, 2};
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      ctxcache::KvHead& kh = c.kv.head(l, h);
      const int n = counts[2 * l + h];
      for (int i = 0; i < n; ++i) kh.pos.push_back(i + h);
      for (int i = 0; i < n * 32; ++i) {
        kh.k.push_back(ctxcache::Fp32ToFp16(0.125f * static_cast<float>(i % 37 - l)));
        kh.v.push_back(ctxcache::Fp32ToFp16(-0.25f * static_cast<float>(i % 11 + h)));
      }
    }
  }
  if (!c.kv.Freeze(dtype).ok()) std::abort();
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: codec_seeds DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    std::perror(dir.c_str());
    return 1;
  }
  ctxcache::CompressedContext empty;
  empty.model_fingerprint = KvContext().model_fingerprint;
  const struct {
    const char* name;
    ctxcache::CompressedContext context;
    ctxcache::BlobDtype dtype;
  } seeds[] = {
      {"kv_f16.ctxc", KvContext(), ctxcache::BlobDtype::kF16},
      {"kv_bf16.ctxc", KvContext(), ctxcache::BlobDtype::kBf16},
      {"kv_int8.ctxc", KvContext(), ctxcache::BlobDtype::kInt8},
      {"digest_f32.ctxc", DigestContext(), ctxcache::BlobDtype::kF32},
      {"empty_f16.ctxc", empty, ctxcache::BlobDtype::kF16},
      {"kv_seg_int8.ctxc", QuantContext(ctxcache::KvDtype::kInt8), ctxcache::BlobDtype::kF16},
      {"kv_seg_int4.ctxc", QuantContext(ctxcache::KvDtype::kInt4), ctxcache::BlobDtype::kF16},
  };
  for (const auto& seed : seeds) {
    auto bytes = ctxcache::EncodeContext(seed.context, seed.dtype);
    absl::Status status =
        bytes.ok() ? ctxcache::WriteContextFile(dir + "/" + seed.name, *bytes) : bytes.status();
    if (!status.ok()) {
      std::fprintf(stderr, "codec_seeds: %s: %s\n", seed.name, status.ToString().c_str());
      return 1;
    }
  }
  return 0;
}
