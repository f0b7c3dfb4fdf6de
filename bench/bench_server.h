// Helpers shared by the benchmarks that run a server in process (cancel_latency,
// adversarial_clients).
#pragma once

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "server/logging.h"

namespace ctxcache::bench {

// The 1-minute load average (the machines these run on are shared: say how busy it was).
inline std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  in >> one;
  return one.empty() ? "null" : one;
}

// Quiet server logs, then the model at `path` (the default model when empty); null, after
// saying why on stderr, when there is none.
inline std::unique_ptr<Model> LoadBenchModel(std::string path) {
  (void)server::ConfigureLogging("plain", "error");
  if (path.empty()) {
    absl::StatusOr<std::string> found = FindDefaultModel();
    if (!found.ok()) {
      std::fprintf(stderr, "%s\n", std::string(found.status().message()).c_str());
      return nullptr;
    }
    path = *found;
  }
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(path);
  if (!model.ok()) {
    std::fprintf(stderr, "cannot load %s: %s\n", path.c_str(),
                 std::string(model.status().message()).c_str());
    return nullptr;
  }
  return *std::move(model);
}

}  // namespace ctxcache::bench
