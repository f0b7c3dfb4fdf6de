// Status helpers shared by engine/, cache/ and server/. Abseil 20220623 (Debian 12) has no
// status macros, so we define the two we use everywhere.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CTX_STATUS_CONCAT_INNER_(a, b) a##b
#define CTX_STATUS_CONCAT_(a, b) CTX_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                       \
  do {                                              \
    ::absl::Status _ctx_status = (expr);            \
    if (!_ctx_status.ok()) return _ctx_status;      \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates the StatusOr `expr`; on error returns its status,
// otherwise moves the value into `lhs` (which may be a declaration, e.g. `auto x`).
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(CTX_STATUS_CONCAT_(_ctx_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                           \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()
