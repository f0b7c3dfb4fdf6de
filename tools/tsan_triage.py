#!/usr/bin/env python3
"""Sorts ThreadSanitizer reports (tools/tsan.sh) into ctxcache's and gRPC's own.

usage: tools/tsan_triage.py LOG_DIR      exit 1 if any report is ctxcache's, else 0

gRPC is Debian's build, not instrumented: TSan sees the header-inline parts of its C++ API
(compiled into our objects) but not the core that hands a call's objects from one thread to
another, so it reports races between two gRPC accesses to gRPC's own objects (a batch, a tag,
a reactor's vptr) that are ordered inside libgrpc. A data race counts as gRPC's when, for
*every* access in it, the innermost frame outside the C++ standard library (and TSan's own
interceptors) is gRPC code (namespace grpc:: or grpc_core::, a grpcpp header, libgrpc or
libgpr): gRPC's code touching gRPC's objects, e.g. a std::function inside its tag. Everything else counts as ours and fails the run: a race
where one access is ctxcache code, and every other kind of report (lock-order inversion,
use after free, signal-unsafe call, ...). Each report is printed with its verdict.
"""
import os
import re
import sys

ACCESS = re.compile(r"^\s+(Previous )?(atomic )?(write|read) of size|^\s+(Atomic )?(Write|Read) of size",
                    re.IGNORECASE)
FRAME = re.compile(r"^\s+#(\d+) (.*)$")
STDLIB = re.compile(r"^(std::|__gnu_cxx::|operator new|operator delete|malloc|free|memcpy|memmove|memset)"
                    r"|/usr/include/c\+\+/|libstdc\+\+|libtsan")
GRPC = re.compile(r"(^|[\s(<])(grpc::|grpc_core::|grpc_)|/grpcpp/|libgrpc|libgpr")


def reports(text):
    parts = text.split("WARNING: ThreadSanitizer:")
    for part in parts[1:]:
        body = part.split("==================")[0]
        yield "WARNING: ThreadSanitizer:" + body


def verdict(report):
    kind = report.splitlines()[0]
    if "data race" not in kind:
        return "ours", kind
    lines = report.splitlines()
    frames = []
    for i, line in enumerate(lines):
        if not ACCESS.match(line):
            continue
        owner = ""
        for next_line in lines[i + 1:]:
            m = FRAME.match(next_line)
            if not m:
                break
            if not STDLIB.search(m.group(2)):
                owner = m.group(2)
                break
        frames.append(owner)
    if frames and all(GRPC.search(f) for f in frames):
        return "grpc", kind
    return "ours", kind


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    ours = grpc = 0
    for name in sorted(os.listdir(sys.argv[1])):
        with open(os.path.join(sys.argv[1], name), errors="replace") as f:
            text = f.read()
        for report in reports(text):
            who, kind = verdict(report)
            if who == "ours":
                ours += 1
                print(f"== ctxcache's ({name}):\n{report}", file=sys.stderr)
            else:
                grpc += 1
                first = next((l for l in report.splitlines() if l.strip().startswith("#0")), "")
                print(f"tsan-triage: gRPC-internal ({name}): {kind.strip()} at {first.strip()[:160]}",
                      file=sys.stderr)
    print(f"tsan-triage: {ours} report(s) in ctxcache's code, {grpc} inside gRPC (not counted)",
          file=sys.stderr)
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
