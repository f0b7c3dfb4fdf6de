// The one place where absl::Status (used everywhere inside) becomes grpc::Status (what a
// client sees). The codes are the same enumeration in both libraries; the mapping exists so
// that messages are sanitised and a few internal codes get the meaning a client can act on.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace ctxcache::server {

// Same code, same message, except:
//  * DataLoss / FailedPrecondition from the codec about a cache blob are internal details of
//    the cache (the store treats them as misses); if one escapes it is INTERNAL.
//  * Unknown stays UNKNOWN; OK maps to OK.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace ctxcache::server
