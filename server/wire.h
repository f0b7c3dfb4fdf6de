// Request parsing at the gRPC edge, owned by the service instead of gRPC's protobuf codec.
//
// Why: libprotobuf refuses a proto3 `string` field holding invalid UTF-8, and gRPC turns any
// parse failure into UNIMPLEMENTED with an empty message (plus an unthrottled libprotobuf
// ERROR line per request). The service registers its methods with CheckedRequest<T> as the
// request type instead: parsing never fails the call, the handler sees why the bytes were not
// a T and answers INVALID_ARGUMENT naming the field, through the usual auth, logging and
// metrics. The wire format is unchanged: valid clients parse exactly as before, on the same
// single pass; only a failed parse costs a second one (strings read as bytes) to find the
// field to name.
#pragma once

#include <google/protobuf/message.h>
#include <grpcpp/impl/codegen/serialization_traits.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace ctxcache::server {

// A request as the service receives it: the message, or why its bytes are not one (then
// `message` is empty).
template <class T>
struct CheckedRequest {
  T message;
  absl::Status status;
};

// Parses `buffer` (consumed) into `msg`. InvalidArgument naming the first `string` field that
// is not UTF-8 ("contexts[0].inline.compression.method is not valid UTF-8 (first bad byte at
// offset 3)"), or saying the bytes are not a valid message of that type.
absl::Status ParseRequest(grpc::ByteBuffer* buffer, google::protobuf::Message* msg);

// Routes libprotobuf's log lines to spdlog: the "invalid UTF-8" parse complaint at debug
// level (ParseRequest reports it to the client and the call's log line says it), the rest
// as warnings at most once per 10 s, with the number left out. Idempotent.
void InstallProtobufLogHandler();

}  // namespace ctxcache::server

namespace grpc {

template <class T>
class SerializationTraits<ctxcache::server::CheckedRequest<T>, void> {
 public:
  static Status Serialize(const ctxcache::server::CheckedRequest<T>& req, ByteBuffer* bb,
                          bool* own_buffer) {
    return SerializationTraits<T>::Serialize(req.message, bb, own_buffer);
  }
  // Always OK: a request that does not parse reaches the handler with its status set.
  static Status Deserialize(ByteBuffer* buffer, ctxcache::server::CheckedRequest<T>* req) {
    req->status = ctxcache::server::ParseRequest(buffer, &req->message);
    return Status::OK;
  }
};

}  // namespace grpc
