#!/usr/bin/env python3
"""Bytes one context takes in each cache tier, measured; and the sizing table made from them.

    python3 bench/context_sizes.py --measure   # writes bench/results/context_sizes.json
    python3 bench/context_sizes.py [--doc]     # the tables of docs/operations.md#sizing from it

--measure took 50 minutes on 2 shared cores, most of it the ten 16K-token prefills.

--measure starts redis-server (no persistence, no maxmemory) and ctxcache-server (default model,
the shipped digest compressor, Redis tier on) on free loopback ports, and for every document
length and storage form: Compress (token ids of models/prose/austen.txt, method streaming, or
none, or digest), waits until the context's Redis keys exist, then records
  kv_bytes        CompressResponse's K+V as stored (what every report calls the context's size)
  memory_bytes    the rise of ctxcache_cache_bytes{tier="memory"} (MemoryTier::EntryBytes)
  redis_blob      the STRLEN of the new keys (the codec blob in parts, plus the metadata value)
  redis_used      the sum of MEMORY USAGE of the new keys (Redis' own accounting, key overhead in)
and deletes the context (DeleteContext) before the next. The table divides a cluster's usable
bytes by redis_used: documents of that length and form it holds.
Needs build/server/ctxcache-server, redis-server and redis-cli, grpcio and grpcio-tools.
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_service import WORK, Processes, free_port, load_stubs, start_redis  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "context_sizes.json")
DOC = os.path.join(ROOT, "docs", "operations.md")
BEGIN, END = "<!-- BEGIN sizing-table (bench/context_sizes.py) -->", "<!-- END sizing-table -->"
MODEL = os.path.join(ROOT, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
COMPRESSOR = os.path.join(ROOT, "train", "compressors",
                          "qwen2.5-coder-0.5b-instruct-q4_k_m.icformer.gguf")
# (label, method, ratio, kv_dtype): what the table's columns are.
FORMS = [("full fp16", "none", 0, "fp16")] + [
    (f"1/{r} {dt}", "streaming", r, dt) for r in (2, 4, 10) for dt in ("fp16", "int8", "int4")
] + [("digest 4x", "digest", 4, "fp16"), ("digest 8x", "digest", 8, "fp16")]


def redis_cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), "--raw", *args], check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


def memory_tier_bytes(metrics_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith('ctxcache_cache_bytes{tier="memory"}'):
            return int(float(line.split()[-1]))
    raise RuntimeError("no ctxcache_cache_bytes{tier=\"memory\"} in /metrics")


def measure(args):
    import grpc
    pb, pb_grpc = load_stubs()
    ids = subprocess.run([args.cli, "tokenize", "--ids-only", "--model", MODEL, "-"],
                         input=open(args.text, encoding="utf-8").read(400_000), check=True,
                         capture_output=True, text=True).stdout.split()
    ids = [int(t) for t in ids]
    os.makedirs(WORK, exist_ok=True)
    procs = Processes()
    try:
        rport = start_redis(procs)
        port, mport = free_port(), free_port()
        cmd = [args.server, "--listen", f"127.0.0.1:{port}", "--metrics-listen",
               f"127.0.0.1:{mport}", "--model", MODEL, "--digest-compressor", COMPRESSOR,
               "--redis-url", f"redis://127.0.0.1:{rport}/0", "--memory-cache-bytes", "2GiB",
               "--max-kv-bytes", "4GiB", "--log-level", "warn"]
        procs.start("server", cmd)
        stub = pb_grpc.ContextCacheStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.time() + 180
        while True:
            try:
                info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
                if info.workers > 0:
                    break
            except grpc.RpcError:
                pass
            if time.time() > deadline:
                sys.exit("ctxcache-server not serving after 180 s (bench/work/service/server.log)")
            time.sleep(0.5)
        cases = []
        for n in args.lengths:
            for label, method, ratio, dtype in FORMS:
                params = pb.CompressionParams(method=method)
                if ratio:
                    params.ratio = ratio
                if method != "digest":
                    params.kv_dtype = dtype
                before_keys = set(redis_cli(rport, "--scan"))
                mem0 = memory_tier_bytes(mport)
                t0 = time.time()
                r = stub.Compress(pb.CompressRequest(
                    document=pb.Document(tokens=pb.TokenIds(ids=ids[:n])), compression=params),
                    timeout=3600)
                secs = time.time() - t0
                mem = memory_tier_bytes(mport) - mem0
                # The Redis write finishes in the background: wait for its metadata key.
                cid = r.context.context_id
                for _ in range(600):
                    new = sorted(set(redis_cli(rport, "--scan")) - before_keys)
                    if any(cid in k and ":p:" not in k for k in new):
                        break
                    time.sleep(0.1)
                else:
                    raise RuntimeError(f"{label} {n}: no Redis metadata key for {cid}")
                new = [k for k in new if cid in k]
                blob = sum(int(redis_cli(rport, "STRLEN", k)[0]) for k in new)
                used = sum(int(redis_cli(rport, "MEMORY", "USAGE", k, "SAMPLES", "0")[0])
                           for k in new)
                c = dict(name=f"{label} {n}", form=label, method=method, ratio=ratio,
                         kv_dtype=dtype, tokens=n, kept_entries=r.context.kept_entries,
                         kv_bytes=r.context.kv_bytes, full_kv_bytes=r.context.full_kv_bytes,
                         memory_bytes=mem, redis_keys=len(new), redis_blob=blob,
                         redis_used=used, seconds=round(secs, 2))
                print(json.dumps(c), file=sys.stderr, flush=True)
                cases.append(c)
                stub.DeleteContext(pb.DeleteContextRequest(context_id=cid), timeout=60)
        meta = dict(date=datetime.date.today().isoformat(), model=os.path.basename(MODEL),
                    n_layers=info.n_layers, n_kv_heads=info.n_kv_heads, head_dim=info.head_dim,
                    d_model=info.d_model, kv_bytes_per_token=info.kv_bytes_per_token,
                    command="python3 bench/context_sizes.py --measure", server=" ".join(
                        os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in cmd))
        with open(args.results, "w") as f:
            json.dump(dict(meta, cases=cases), f, indent=2)
            f.write("\n")
    finally:
        procs.stop_all()


def table(res, primaries, maxmemory_gib, usable):
    cases = res["cases"]
    lengths = sorted({c["tokens"] for c in cases})
    forms = list(dict.fromkeys(c["form"] for c in cases))
    by = {(c["form"], c["tokens"]): c for c in cases}
    out = [f"Measured {res['date']}, {res['model']} ({res['n_layers']} layers, "
           f"{res['n_kv_heads']} KV heads, head_dim {res['head_dim']}), `{res['command']}`. "
           "Bytes per document; KV forms are method streaming (the bytes depend on the kept "
           "share and kv_dtype, not on the method):", "",
           "| form | tokens | kv_bytes | memory tier | Redis blob | Redis used | Redis used "
           "/ token | per 1 GiB memory tier |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in forms:
        for n in lengths:
            c = by[(f, n)]
            out.append(f"| {f} | {n:,} | {c['kv_bytes']:,} | {c['memory_bytes']:,} | "
                       f"{c['redis_blob']:,} | {c['redis_used']:,} | "
                       f"{c['redis_used'] / n:,.0f} | {2**30 // c['memory_bytes']:,} |")
    cap = maxmemory_gib * 2**30 * usable
    out += ["", f"Documents a Redis Cluster of N primaries holds, each primary with "
            f"{maxmemory_gib:g} GiB maxmemory of which {usable:.0%} holds entries: "
            "N x usable bytes / `Redis used` (replicas add no capacity):", "",
            "| form | " + " | ".join(f"N={p}, {n // 1024}k" for p in primaries for n in lengths)
            + " |", "|---|" + "---:|" * (len(primaries) * len(lengths))]
    for f in forms:
        row = [f"{math.floor(p * cap / by[(f, n)]['redis_used']):,}" for p in primaries
               for n in lengths]
        out.append(f"| {f} | " + " | ".join(row) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="measure (else: print the table)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--server", default=os.path.join(ROOT, "build", "server", "ctxcache-server"))
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "server", "ctxcache"))
    ap.add_argument("--text", default=os.path.join(ROOT, "models", "prose", "austen.txt"))
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--primaries", type=int, nargs="+", default=[3, 6, 12])
    ap.add_argument("--maxmemory-gib", type=float, default=16)
    ap.add_argument("--usable", type=float, default=0.75)
    ap.add_argument("--doc", action="store_true", help="also write the table into " + DOC)
    args = ap.parse_args()
    if args.measure:
        measure(args)
    with open(args.results) as f:
        text = table(json.load(f), args.primaries, args.maxmemory_gib, args.usable)
    print(text)
    if args.doc:
        doc = open(DOC).read()
        if BEGIN not in doc or END not in doc:
            sys.exit(f"{DOC} has no {BEGIN} ... {END}")
        doc = doc[:doc.index(BEGIN)] + f"{BEGIN}\n{text}\n{END}" + doc[doc.index(END) + len(END):]
        open(DOC, "w").write(doc)


if __name__ == "__main__":
    main()
