// A stand-in for libFuzzer's main when building with gcc: feeds the target every seed file
// given on the command line, then deterministic mutations of each (bit flips, byte
// overwrites with boundary values, truncations, splices), so the sanitizer build exercises
// the parser's error paths in every CI run. A directory argument stands for every file in it
// (sorted by name), as libFuzzer reads a corpus. Usage: fuzz_driver [--iterations N] SEED...
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

void Run(const std::string& s) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

std::string Mutate(const std::string& seed, std::mt19937_64& rng) {
  std::string s = seed;
  if (s.empty()) return s;
  std::uniform_int_distribution<size_t> pos(0, s.size() - 1);
  static constexpr uint64_t kBoundary[] = {0, 1, 0x7f, 0xff, 0xffff, 0xffffffffull,
                                           0x7fffffffffffffffull, 0xffffffffffffffffull};
  switch (rng() % 5) {
    case 0:
      s[pos(rng)] ^= static_cast<char>(1u << (rng() % 8));
      break;
    case 1: {  // overwrite 1/2/4/8 bytes with a boundary value
      const size_t width = size_t{1} << (rng() % 4);
      const size_t at = pos(rng);
      const uint64_t v = kBoundary[rng() % 8];
      std::memcpy(&s[at], &v, std::min(width, s.size() - at));
      break;
    }
    case 2:
      s.resize(pos(rng));
      break;
    case 3: {  // duplicate a chunk
      const size_t a = pos(rng), len = std::min<size_t>(rng() % 64, s.size() - a);
      s.insert(pos(rng), s.substr(a, len));
      break;
    }
    default:
      s[pos(rng)] = static_cast<char>(rng());
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 2000;
  std::vector<std::string> seeds;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--iterations") == 0 && i + 1 < argc) {
      iterations = std::atoi(argv[++i]);
      continue;
    }
    std::vector<std::string> paths;
    std::error_code ec;
    if (std::filesystem::is_directory(argv[i], ec)) {
      for (const auto& entry : std::filesystem::directory_iterator(argv[i])) {
        if (entry.is_regular_file()) paths.push_back(entry.path().string());
      }
      std::sort(paths.begin(), paths.end());
    } else {
      paths.push_back(argv[i]);
    }
    for (const std::string& path : paths) {
      std::ifstream in(path, std::ios::binary);
      if (!in) {
        std::fprintf(stderr, "fuzz_driver: cannot read %s\n", path.c_str());
        return 2;
      }
      std::stringstream ss;
      ss << in.rdbuf();
      seeds.push_back(ss.str());
    }
  }
  if (seeds.empty()) {
    std::fprintf(stderr, "usage: fuzz_driver [--iterations N] SEED...\n");
    return 2;
  }
  std::mt19937_64 rng(12345);
  size_t runs = 0;
  for (const std::string& seed : seeds) {
    Run(seed);
    std::string cur = seed;
    for (int i = 0; i < iterations; ++i, ++runs) {
      // Stack mutations a few deep, restarting from the seed now and then.
      cur = (i % 4 == 0) ? Mutate(seed, rng) : Mutate(cur, rng);
      Run(cur);
    }
  }
  std::printf("fuzz_driver: %zu inputs from %zu seeds, no crash\n", runs + seeds.size(), seeds.size());
  return 0;
}
