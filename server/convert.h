// Protobuf <-> native types, at the edge of the service: requests become handlers.h structs
// (with the engine's defaults for every unset optional field), outcomes become responses.
// The only file besides service.cc that includes the generated code.
#pragma once

#include "absl/status/statusor.h"
#include "ctxcache/v1/ctxcache.pb.h"
#include "server/handlers.h"

namespace ctxcache::server {

absl::StatusOr<CompressInput> FromProto(const ctxcache::v1::CompressRequest& req);
absl::StatusOr<GenerateInput> FromProto(const ctxcache::v1::GenerateRequest& req);

ctxcache::v1::CacheTier ToProto(CacheTier tier);
ctxcache::v1::FinishReason ToProto(FinishReason reason);
void ToProto(const ContextOutcome& outcome, ctxcache::v1::ContextInfo* info);
void ToProto(const GenerateOutcome& outcome, double queue_seconds, ctxcache::v1::Usage* usage);
// Every bound the server enforces: the request limits and the engine's knob bounds.
void ToProto(const RequestLimits& limits, ctxcache::v1::Limits* out);

}  // namespace ctxcache::server
