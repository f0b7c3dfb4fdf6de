#!/usr/bin/env python3
"""A small ctxcache client: compress a document once, ask questions over it, print the savings.

    python3 examples/python/client.py --server 127.0.0.1:50051 info
    python3 examples/python/client.py compress --doc report.txt --method snapkv --ratio 4
    python3 examples/python/client.py ask --context ID --question "Who signed it?"
    python3 examples/python/client.py compress --doc report.txt --method none --ratio 0
    python3 examples/python/client.py ask --context ID --select-ratio 8 --question "Who?"
    python3 examples/python/client.py demo --doc report.txt "Who signed it?" "When?"
    # over TLS, verifying the server with ca.pem; with a client certificate (mutual TLS)
    python3 examples/python/client.py --server ctxcache:50051 --tls-ca ca.pem info
    python3 examples/python/client.py --tls-ca ca.pem --tls-cert client.pem --tls-key client.key info

The Python stubs are generated at start-up from proto/ctxcache/v1/ctxcache.proto with
grpcio-tools (into a temporary directory), so there is nothing to build or check in. Needs
`pip install grpcio grpcio-tools` (see README.md next to this file).
"""

import argparse
import importlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO_FILE = os.path.join("ctxcache", "v1", "ctxcache.proto")


def load_stubs():
    """Generates ctxcache_pb2 / ctxcache_pb2_grpc from the .proto and imports them."""
    try:
        import grpc  # noqa: F401
        from grpc_tools import protoc
    except ImportError:
        sys.exit(
            "client.py needs grpcio and grpcio-tools: pip install grpcio grpcio-tools\n"
            "(grpcio-tools generates the Python stubs from proto/ctxcache/v1/ctxcache.proto "
            "at start-up)"
        )
    out = tempfile.mkdtemp(prefix="ctxcache-stubs-")
    # protoc's own include directory (google/protobuf/*.proto) ships inside grpc_tools.
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(PROTO_ROOT, PROTO_FILE),
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) on {os.path.join(PROTO_ROOT, PROTO_FILE)}")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("ctxcache.v1.ctxcache_pb2")
    pb2_grpc = importlib.import_module("ctxcache.v1.ctxcache_pb2_grpc")
    return pb2, pb2_grpc


TIERS = {0: "unspecified", 1: "computed", 2: "memory", 3: "redis"}
FINISH = {0: "unspecified", 1: "length", 2: "stop", 3: "end_of_generation", 4: "context_full"}


def read_pem(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror}") from None


def make_channel(server, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None):
    """A gRPC channel to server: plaintext, or TLS when tls_ca or a client certificate is given.

    tls_ca: PEM file of the CA(s) that signed the server's certificate (None: gRPC's default
    roots). tls_cert + tls_key: PEM client certificate chain and key, for a server that asks
    for one (mutual TLS); both or neither. tls_server_name: the name checked against the
    server's certificate instead of server's host (e.g. when dialing an IP address)."""
    import grpc

    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs both tls_cert and tls_key "
                         f"(got only {'tls_cert' if tls_cert else 'tls_key'})")
    if not (tls_ca or tls_cert):
        if tls_server_name:
            raise ValueError("tls_server_name needs TLS: give tls_ca (or a client certificate)")
        return grpc.insecure_channel(server)
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "CA file") if tls_ca else None,
        private_key=read_pem(tls_key, "client key") if tls_key else None,
        certificate_chain=read_pem(tls_cert, "client certificate") if tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return grpc.secure_channel(server, creds, options=options)


class Client:
    def __init__(self, server, token=None, timeout=None, tls_ca=None, tls_cert=None,
                 tls_key=None, tls_server_name=None):
        import grpc

        self.grpc = grpc
        self.channel = make_channel(server, tls_ca, tls_cert, tls_key, tls_server_name)
        self.pb2, pb2_grpc = load_stubs()
        self.stub = pb2_grpc.ContextCacheStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def info(self):
        return self.stub.GetModelInfo(
            self.pb2.GetModelInfoRequest(), metadata=self.metadata, timeout=self.timeout
        )

    def compress(self, text, method="snapkv", ratio=4.0, budget=0, question=""):
        req = self.pb2.CompressRequest(
            document=self.pb2.Document(text=text.encode("utf-8")),
            compression=self.pb2.CompressionParams(method=method, ratio=ratio, budget=budget),
            question=question.encode("utf-8"),
        )
        return self.stub.Compress(req, metadata=self.metadata, timeout=self.timeout)

    def ask(self, context_ids, question, max_tokens=128, temperature=0.0, on_text=None,
            select_ratio=0.0):
        """Streams the answer (on_text per piece); returns (text, usage).

        select_ratio > 1 selects from each context (stored whole: method "none") the 1/ratio
        of its entries this question attends to most, for this request only."""
        refs = [self.pb2.ContextRef(context_id=c) for c in context_ids]
        for ref in refs:
            if select_ratio:
                ref.select.ratio = select_ratio
        req = self.pb2.GenerateRequest(
            contexts=refs,
            chat=self.pb2.ChatPrompt(
                messages=[self.pb2.ChatMessage(role="user", content=question.encode("utf-8"))]
            ),
            sampling=self.pb2.SamplingParams(temperature=temperature),
            max_tokens=max_tokens,
        )
        text, usage = [], None
        for msg in self.stub.Generate(req, metadata=self.metadata, timeout=self.timeout):
            if msg.text:
                text.append(msg.text)
                if on_text:
                    on_text(msg.text)
            if msg.HasField("usage"):
                usage = msg.usage
        return "".join(text), usage


def print_context(info, compute_ms):
    full, kept = info.full_kv_bytes, info.kv_bytes
    print(f"context id:      {info.context_id}")
    print(f"tier:            {TIERS.get(info.tier, info.tier)} ({compute_ms:.0f} ms computing)")
    print(f"document tokens: {info.original_tokens}, kept per head {info.kept_tokens:.1f}")
    print(f"KV bytes (fp16): {full:,} full -> {kept:,} kept (saved {full - kept:,})")


def print_usage(u):
    tiers = ", ".join(f"{c.context_id[:12]}… {TIERS.get(c.tier, c.tier)}" for c in u.contexts)
    print(
        f"  [{tiers or 'no context'}] KV {u.kv_bytes_used / 1e6:.2f} MB used vs "
        f"{u.kv_bytes_full / 1e6:.2f} MB full, saved {u.kv_bytes_saved / 1e6:.2f} MB, "
        f"{u.kv_bytes_attended / 1e6:.2f} MB attended; "
        f"TTFT {u.ttft_ms:.0f} ms, {u.decode_tokens_per_second:.1f} tok/s, "
        f"finish {FINISH.get(u.finish_reason, u.finish_reason)}",
        file=sys.stderr,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=os.environ.get("CTXCACHE_SERVER", "127.0.0.1:50051"))
    ap.add_argument("--token", default=os.environ.get("CTXCACHE_TOKEN"), help="bearer token")
    ap.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    t = ap.add_argument_group("TLS (plaintext unless --tls-ca or --tls-cert is given)")
    t.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("CTXCACHE_TLS_CA"),
                   help="connect over TLS, verifying the server with this PEM CA bundle "
                        "(default $CTXCACHE_TLS_CA)")
    t.add_argument("--tls-cert", metavar="FILE", default=os.environ.get("CTXCACHE_TLS_CERT"),
                   help="PEM client certificate chain for mutual TLS, with --tls-key "
                        "(default $CTXCACHE_TLS_CERT)")
    t.add_argument("--tls-key", metavar="FILE", default=os.environ.get("CTXCACHE_TLS_KEY"),
                   help="PEM private key of --tls-cert (default $CTXCACHE_TLS_KEY)")
    t.add_argument("--tls-server-name", metavar="NAME",
                   help="name to check in the server's certificate instead of the host of "
                        "--server")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="the served model and limits")
    c = sub.add_parser("compress", help="compress a document; prints its context id")
    c.add_argument("--doc", required=True, help="text file (- for stdin)")
    c.add_argument("--method", default="snapkv")
    c.add_argument("--ratio", type=float, default=4.0)
    c.add_argument("--question", default="", help="for prompt-guided methods (snapkv, finch)")
    a = sub.add_parser("ask", help="ask a question over compressed contexts")
    a.add_argument("--context", action="append", default=[], help="context id (repeatable)")
    a.add_argument("--question", required=True)
    a.add_argument("--max-tokens", type=int, default=128)
    a.add_argument("--select-ratio", type=float, default=0.0,
                   help="select per query from contexts stored whole (method none)")
    d = sub.add_parser("demo", help="compress once, then ask each question over it")
    d.add_argument("--doc", required=True)
    d.add_argument("--method", default="snapkv")
    d.add_argument("--ratio", type=float, default=4.0)
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("questions", nargs="+")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together (or $CTXCACHE_TLS_CERT and "
                 f"$CTXCACHE_TLS_KEY): only {'--tls-cert' if args.tls_cert else '--tls-key'} "
                 "is set")
    if args.tls_server_name and not (args.tls_ca or args.tls_cert):
        ap.error("--tls-server-name needs TLS: add --tls-ca FILE")

    try:
        client = Client(args.server, args.token, args.timeout, tls_ca=args.tls_ca,
                        tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_server_name=args.tls_server_name)
    except ValueError as e:
        sys.exit(f"{ap.prog}: {e}")
    read = lambda path: sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    stream = lambda t: (sys.stdout.write(t), sys.stdout.flush())
    try:
        if args.command == "info":
            print(client.info())
        elif args.command == "compress":
            r = client.compress(read(args.doc), args.method, args.ratio, question=args.question)
            print_context(r.context, r.compute_ms)
        elif args.command == "ask":
            _, usage = client.ask(args.context, args.question, args.max_tokens, on_text=stream,
                                  select_ratio=args.select_ratio)
            print()
            print_usage(usage)
        elif args.command == "demo":
            r = client.compress(read(args.doc), args.method, args.ratio)
            print_context(r.context, r.compute_ms)
            for q in args.questions:
                print(f"\nQ: {q}\nA: ", end="")
                _, usage = client.ask([r.context.context_id], q, args.max_tokens, on_text=stream)
                print()
                print_usage(usage)
    except client.grpc.RpcError as e:  # status code + the server's actionable message
        sys.exit(f"{args.command}: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
