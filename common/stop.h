// A cooperative stop signal for long work: a callable that answers OK to go on, or the status
// to end with (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE at shutdown). The engine and the
// cache ask it between units of work and never learn why it fired, so they stay free of gRPC;
// the server builds it from the call's context and deadline (server/service.cc).
//
// It must be cheap (an atomic load and a clock read): the engine asks it once per layer of
// every forward pass.
#pragma once

#include <functional>

#include "absl/status/status.h"

namespace ctxcache {

using StopFn = std::function<absl::Status()>;

// OK when there is no stop function.
inline absl::Status CheckStop(const StopFn& stop) { return stop ? stop() : absl::OkStatus(); }

}  // namespace ctxcache
