// A device that runs a Runner's forward passes (the CUDA backend, engine/cuda/cuda_runner.h).
//
// The Runner stays the front: it checks the tokens and caches, embeds the tokens on the host
// and hands the device the embeddings and the pass's sequences. The device runs every layer
// and the output head and fills the logits, like the CPU path (same inputs, same cache
// semantics, results within the device's arithmetic of the CPU's).
//
// The host KvCache stays the truth. A device keeps its own copy of each cache it has served
// (a mirror named by KvCache::uid), brings it up to date before a pass (only entries appended
// since, unless the cache's generation says entries were rewritten: then all of it) and
// appends each pass's new K/V to the host cache too, so compression, the codec and the cache
// tiers see exactly what a CPU pass would have written.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/stop.h"

namespace ctxcache {

class KvCache;
struct ForwardOptions;

class DeviceForward {
 public:
  // Rows [row0, row0 + n) of a pass: one sequence's tokens, appended to its cache.
  struct Sequence {
    KvCache* cache = nullptr;
    int64_t row0 = 0, n = 0;
    // observe_rows (relative to this sequence's rows) and observer; all_logits.
    const ForwardOptions* options = nullptr;
    // When set: the last row's logits [n_vocab] (every row's with options->all_logits).
    std::vector<float>* logits = nullptr;
  };

  virtual ~DeviceForward() = default;

  // "cuda:0 (NVIDIA H100 80GB HBM3)".
  virtual std::string name() const = 0;
  // Whether Run can serve a sequence with these options; the Runner runs a pass the device
  // cannot serve on the CPU (the host cache is complete, so either may run any pass).
  virtual bool Supports(const ForwardOptions& options) const = 0;
  // One pass: x [n, d_model] (host) are the rows' input embeddings, sequences in row order,
  // their caches already checked by the Runner. Appends to every sequence's cache and
  // advances its next_position; fills the requested logits. `stop` is asked between layers;
  // on a stop or an error the caches are partly written (the caller discards them, as on the
  // CPU). RESOURCE_EXHAUSTED when the device runs out of memory for this pass.
  virtual absl::Status Run(const float* x, int64_t n, absl::Span<const Sequence> seqs,
                           const StopFn& stop) = 0;
  // Device memory this backend holds now (weights, mirrors, scratch).
  virtual int64_t DeviceBytes() const = 0;
};

}  // namespace ctxcache
