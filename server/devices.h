// Which devices serve (--device): the CPU workers, and one engine worker per GPU.
//
//   cpu              the CPU workers only (workers x threads_per_worker), the default
//   cuda             every visible GPU; where there is none (a build without CUDA, no driver,
//                    no device) the CPU workers serve, and the log says why
//   cuda:N[,cuda:M]  those GPUs; start-up fails when one is missing (naming the devices
//                    there are) or its weights do not fit
//   cpu,cuda:0       both: a GPU worker and the CPU workers
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/device_forward.h"
#include "engine/model.h"

namespace ctxcache::server {

struct DeviceSpec {
  bool cpu = false;       // the CPU workers
  bool all_gpus = false;  // "cuda": every visible GPU, else the CPU
  std::vector<int> gpus;  // "cuda:N" entries, in order
};

// InvalidArgument naming the entry and the accepted forms.
absl::StatusOr<DeviceSpec> ParseDevices(const std::string& text);

// Whether this build has the CUDA backend.
bool CudaBuilt();

struct OpenedDevices {
  std::vector<std::unique_ptr<DeviceForward>> gpus;  // one engine worker each
  bool cpu = false;                                  // CPU workers too
  std::string note;                                  // why the CPU serves instead, if it does
};

// Uploads the model to every GPU the spec names (in order).
absl::StatusOr<OpenedDevices> OpenDevices(const DeviceSpec& spec, const Model& model);

}  // namespace ctxcache::server
