#!/usr/bin/env python3
"""tools/tsan_triage.py sorts ThreadSanitizer reports: a race between two of gRPC's own
accesses (innermost non-standard-library frame in gRPC) is not counted; one where an access
is ctxcache's, or any other kind of report, fails. Reports below are trimmed real ones."""
import os
import subprocess
import sys
import tempfile

TRIAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "tsan_triage.py")

GRPC_RACE = """==================
WARNING: ThreadSanitizer: data race (pid=12832)
  Write of size 8 at 0x7b9800041c88 by thread T17:
    #0 std::function<void (bool)>::operator=(decltype(nullptr)) /usr/include/c++/12/bits/std_function.h:506 (t+0x1)
    #1 grpc::internal::CallbackWithSuccessTag::Clear() /usr/include/grpcpp/support/callback_common.h:177 (t+0x1)
  Previous read of size 8 at 0x7b9800041c88 by thread T23:
    #0 std::_Function_base::_M_empty() const /usr/include/c++/12/bits/std_function.h:247 (t+0x2)
    #1 grpc::internal::CallbackWithSuccessTag::Run(bool) /usr/include/grpcpp/support/callback_common.h:212 (t+0x2)
SUMMARY: ThreadSanitizer: data race
==================
"""

OUR_RACE = """==================
WARNING: ThreadSanitizer: data race (pid=7)
  Write of size 8 at 0x7b2c00005800 by thread T16:
    #0 ctxcache::server::GenerateReactor::SetTicket(unsigned long) /work/main/server/service.cc:420 (t+0x3)
    #1 grpc::internal::CallbackWithSuccessTag::Run(bool) /usr/include/grpcpp/support/callback_common.h:212 (t+0x3)
  Previous read of size 8 at 0x7b2c00005800 by thread T11:
    #0 grpc::internal::CallbackWithSuccessTag::Run(bool) /usr/include/grpcpp/support/callback_common.h:212 (t+0x4)
SUMMARY: ThreadSanitizer: data race
==================
"""

INVERSION = """==================
WARNING: ThreadSanitizer: lock-order-inversion (potential deadlock) (pid=8)
  Cycle in lock order graph: M1 => M2 => M1
    #0 grpc_core::Mutex::Lock() (libgrpc.so.29+0x1)
SUMMARY: ThreadSanitizer: lock-order-inversion
==================
"""


def run(*reports):
    with tempfile.TemporaryDirectory() as d:
        for i, r in enumerate(reports):
            with open(os.path.join(d, f"tsan.{i}"), "w") as f:
                f.write(r)
        return subprocess.run([sys.executable, TRIAGE, d], capture_output=True, text=True).returncode


def main():
    checks = [
        ("no reports", run(), 0),
        ("a race inside gRPC only", run(GRPC_RACE), 0),
        ("a race with a ctxcache access", run(OUR_RACE), 1),
        ("ours among gRPC's", run(GRPC_RACE, OUR_RACE), 1),
        ("a lock-order inversion, even in gRPC", run(INVERSION), 1),
    ]
    failed = [f"{name}: exit {got}, want {want}" for name, got, want in checks if got != want]
    for line in failed:
        print("FAIL", line)
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
