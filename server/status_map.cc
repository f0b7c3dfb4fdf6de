// absl::Status -> grpc::Status (see status_map.h).
#include "server/status_map.h"

#include <string>

namespace ctxcache::server {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  std::string message(status.message());
  // Status codes 0-16 are the canonical gRPC codes in both libraries.
  auto code = static_cast<grpc::StatusCode>(static_cast<int>(status.code()));
  switch (status.code()) {
    case absl::StatusCode::kDataLoss:
      // A damaged cache blob is a miss inside the store; reaching here is a server bug, and the
      // client can do nothing about it but retry.
      code = grpc::StatusCode::INTERNAL;
      message = "internal error (damaged cached data): " + message;
      break;
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kUnauthenticated:
      break;
    default:
      code = grpc::StatusCode::UNKNOWN;
      break;
  }
  return grpc::Status(code, message);
}

}  // namespace ctxcache::server
