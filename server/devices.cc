// --device parsing and the GPUs' start-up (devices.h).
#include "server/devices.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#if CTXCACHE_HAS_CUDA
#include "engine/cuda/cuda_runner.h"
#endif

namespace ctxcache::server {

absl::StatusOr<DeviceSpec> ParseDevices(const std::string& text) {
  DeviceSpec spec;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    item = absl::StripAsciiWhitespace(item);
    const absl::string_view entry = item;  // item loses its "cuda:" below
    int index = -1;
    if (item == "cpu") {
      spec.cpu = true;
    } else if (item == "cuda") {
      spec.all_gpus = true;
    } else if (absl::ConsumePrefix(&item, "cuda:") && absl::SimpleAtoi(item, &index) &&
               index >= 0 && index < 1024) {
      if (std::find(spec.gpus.begin(), spec.gpus.end(), index) != spec.gpus.end()) {
        return absl::InvalidArgumentError(absl::StrCat("device = \"", text, "\" names cuda:", index,
                                                       " twice (one worker per GPU)"));
      }
      spec.gpus.push_back(index);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("device = \"", text, "\": \"", entry,
                       "\" is not a device; allowed: cpu, cuda (every GPU, else the CPU), "
                       "cuda:N, or a comma-separated list of them"));
    }
  }
  if (spec.all_gpus && !spec.gpus.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device = \"", text, "\": \"cuda\" already means every GPU; drop the cuda:N entries"));
  }
  return spec;
}

bool CudaBuilt() {
#if CTXCACHE_HAS_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<OpenedDevices> OpenDevices(const DeviceSpec& spec, const Model& model) {
  OpenedDevices out;
  out.cpu = spec.cpu;
  std::vector<int> gpus = spec.gpus;
  if (spec.all_gpus) {
#if CTXCACHE_HAS_CUDA
    absl::StatusOr<std::vector<cuda::DeviceInfo>> devices = cuda::ListDevices();
    if (devices.ok()) {
      for (const cuda::DeviceInfo& d : *devices) gpus.push_back(d.index);
    } else {
      out.note = std::string(devices.status().message());
    }
#else
    out.note = "this build has no CUDA backend (configure with -DCTXCACHE_CUDA=ON)";
#endif
    if (gpus.empty()) out.cpu = true;  // "cuda" falls back to the CPU, saying so
  }
  if (!gpus.empty() && !CudaBuilt()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device cuda:", gpus[0],
                     " was asked for but this build has no CUDA backend "
                     "(configure with -DCTXCACHE_CUDA=ON, or serve with --device cpu)"));
  }
#if CTXCACHE_HAS_CUDA
  for (int index : gpus) {
    absl::StatusOr<std::unique_ptr<DeviceForward>> gpu = cuda::NewCudaForward(model, index);
    if (!gpu.ok()) {
      return absl::Status(gpu.status().code(),
                          absl::StrCat("cannot serve on cuda:", index, ": ", gpu.status().message(),
                                       " (serve on the CPU with --device cpu)"));
    }
    spdlog::info("{} loaded the model: {:.0f} MiB of GPU memory", (*gpu)->name(),
                 static_cast<double>((*gpu)->DeviceBytes()) / (1 << 20));
    out.gpus.push_back(*std::move(gpu));
  }
#else
  (void)model;
#endif
  return out;
}

}  // namespace ctxcache::server
