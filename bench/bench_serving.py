#!/usr/bin/env python3
"""Serving benchmark: many clients at once, ctxcache (continuous batching) vs llama-server.

Rerun (about 10 minutes on 2 idle cores; writes bench/results/serving.json and the table between
the serving-bench markers in docs/benchmarks.md):

    python3 bench/bench_serving.py
    python3 bench/bench_serving.py --clients 16 --workloads decode --no-doc   # a quick look

Needs a built build/server/ctxcache-server, llama-server built from the vendored llama.cpp
(bench/build_llama_cpp.sh), and grpcio + grpcio-tools (pip install grpcio grpcio-tools).

Two workloads, each at --clients (1, 4, 16) concurrent clients; every client sends --rounds
requests one after another (greedy, ignore_eos, so both servers generate exactly max_tokens):

  decode  a short chat question (~30 tokens), 256 new tokens.
  rag     each client owns a 2K-token document and asks 64-token questions about it, 64 new
          tokens. ctxcache: the document was compressed once beforehand (--method, --ratio)
          and is referenced by context_id, the cached, compressed context. llama-server: the
          document is in the prompt; with its prompt cache on, a slot that served the same
          client's document before re-uses that prefix, so before the timed rounds every client
          sends --warm-rounds (2) untimed requests to both servers (the peer's slots hold the
          documents, as ctxcache's cache holds the contexts; the peer's first reuse of a cached
          prefix measured several times slower than later ones, hence two). The share of the
          peer's prompt tokens served from its cache is recorded (prompt_tokens_from_cache).

Both servers use the same GGUF and the same number of threads (ctxcache: --workers x
--threads-per-worker; llama-server: -t and -tb), llama-server with -np = clients (continuous
batching, a slot per client) and a context of clients x per-slot tokens. Time to first token
is client-side, from sending the request to the first streamed text; aggregate tok/s is every
generated token of the timed rounds over their wall time. Servers run one at a time.

Cases: serve_<workload>_c<clients> with ctxcache_tok_s, peer_tok_s, ctxcache_ttft_p50_ms,
ctxcache_ttft_p99_ms, peer_ttft_p50_ms, peer_ttft_p99_ms (p99 of at most clients x rounds
requests: with 16 x 2 it is the worst but one).
"""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_common import machine, save_merged  # noqa: E402
import bench_service as bs  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "serving.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- BEGIN serving-bench (bench/bench_serving.py) -->", "<!-- END serving-bench -->"
DECODE_QUESTION = "Write a long story about a lighthouse keeper who finds a map in a bottle."
RAG_DOC_TOKENS = 2048


def percentile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(q / 100.0 * (len(v) - 1)))))
    return v[k]


def rag_question(i, r):
    """A ~64-token question (distinct per client and round)."""
    return (f"Request {i}-{r}. Read the records above carefully, then answer: in which year did "
            f"the council first plan the winter festival, which engineer repaired the seven copper "
            f"pipes, and what did the merchant record about grain prices? Give the years as "
            f"numbers and keep the answer short.")


# ---------------------------------------------------------------------------------------------
# The peer: llama-server over HTTP (OpenAI-compatible chat completions, streamed).

class LlamaServer:
    def __init__(self, procs, binary, model, threads, slots, ctx_per_slot, repack):
        self.port = bs.free_port()
        cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(threads), "-tb", str(threads), "-np", str(slots),
               "-c", str(slots * ctx_per_slot), "--cont-batching", "--no-webui", "-lv", "0",
               "--repack" if repack else "--no-repack"]
        self.cmd = cmd
        self.prompt_tokens = self.cached_tokens = 0
        self.proc = procs.start(f"llama-server-np{slots}", cmd)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited at start ({self.proc.returncode}): "
                                   f"{' '.join(cmd)}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit("llama-server not healthy after 120 s")
            time.sleep(0.2)

    def chat(self, content, max_tokens):
        """(TTFT seconds, completion tokens) of one streamed chat completion; counts the prompt
        tokens it served from its prompt cache."""
        body = json.dumps({
            "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "cache_prompt": True,
            "stream_options": {"include_usage": True}})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server: HTTP {resp.status}: {resp.read()[:300]!r}")
        first, tokens = None, None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            msg = json.loads(line[5:])
            for ch in msg.get("choices", []):
                if first is None and ch.get("delta", {}).get("content"):
                    first = time.perf_counter()
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
                self.prompt_tokens += msg["usage"].get("prompt_tokens", 0)
                self.cached_tokens += (msg["usage"].get("prompt_tokens_details") or {}).get(
                    "cached_tokens", 0)
        c.close()
        if first is None or tokens is None:
            raise RuntimeError("llama-server: stream ended without text or usage")
        return first - t0, tokens


# ---------------------------------------------------------------------------------------------
# Runs.

def run_clients(n_clients, rounds, one_request):
    """Runs n_clients threads of `rounds` requests each; (wall seconds, ttfts, tokens)."""
    ttfts, tokens = [], []

    def client(i):
        out = []
        for r in range(rounds):
            out.append(one_request(i, r))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as ex:
        for res in ex.map(client, range(n_clients)):
            for ttft, n in res:
                ttfts.append(ttft)
                tokens.append(n)
    return time.perf_counter() - t0, ttfts, tokens


def summarize(wall, ttfts, tokens):
    return {"tok_s": sum(tokens) / wall, "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
            "ttft_p99_ms": percentile(ttfts, 99) * 1e3, "requests": len(ttfts),
            "tokens": sum(tokens), "wall_s": wall}


def ctxcache_run(pb, srv, workload, n_clients, rounds, contexts, max_tokens, warm_rounds):
    def one(i, r):
        if workload == "decode":
            req = bs.chat_request(pb, DECODE_QUESTION, max_tokens, ignore_eos=True)
        else:
            req = bs.chat_request(pb, rag_question(i, r), max_tokens,
                                  [pb.ContextRef(context_id=contexts[i])], ignore_eos=True)
        ttft, usage, _ = srv.generate(req)
        return ttft, usage.completion_tokens
    if warm_rounds:
        run_clients(n_clients, warm_rounds, lambda i, r: one(i, -1 - r))
    return summarize(*run_clients(n_clients, rounds, one))


def peer_run(peer, workload, n_clients, rounds, docs, max_tokens, warm_rounds):
    def content(i, r):
        if workload == "decode":
            return DECODE_QUESTION
        return f"{docs[i]}\n\n{rag_question(i, r)}"
    if warm_rounds:  # every client's document into a slot's prompt cache, untimed
        run_clients(n_clients, warm_rounds,
                    lambda i, r: peer.chat(content(i, -1 - r), max_tokens))
    peer.prompt_tokens = peer.cached_tokens = 0
    out = summarize(*run_clients(n_clients, rounds,
                                 lambda i, r: peer.chat(content(i, r), max_tokens)))
    out["prompt_tokens_from_cache"] = peer.cached_tokens / max(1, peer.prompt_tokens)
    return out


def plot(result, path):
    """Aggregate tok/s and p99 time to first token by clients, per workload, both servers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = sorted({c["workload"] for c in result["cases"]})
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7), squeeze=False)
    for col, w in enumerate(workloads):
        cases = sorted((c for c in result["cases"] if c["workload"] == w),
                       key=lambda c: c["clients"])
        x = [c["clients"] for c in cases]
        for row, (key, label) in enumerate([("tok_s", "aggregate generated tok/s"),
                                            ("ttft_p99_ms", "time to first token, p99 (ms)")]):
            ax = axes[row][col]
            ax.plot(x, [c[f"ctxcache_{key}"] for c in cases], "o-", label="ctxcache")
            ax.plot(x, [c[f"peer_{key}"] for c in cases], "s--", label="llama-server")
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(v) for v in x])
            if key == "ttft_p99_ms":
                ax.set_yscale("log")
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.set_title(f"{w}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"Serving {result['model']} on {result['threads']} threads "
                 f"({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_doc(result):
    rows = ["| case | ctxcache tok/s | llama-server tok/s | ratio | ctxcache TTFT p50 / p99 ms "
            "| llama-server TTFT p50 / p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for c in sorted(result["cases"], key=lambda c: (c["workload"], c["clients"])):
        rows.append(
            f"| {c['name']} | {c['ctxcache_tok_s']:.0f} | {c['peer_tok_s']:.0f} | "
            f"{c['ctxcache_tok_s'] / c['peer_tok_s']:.2f}x | {c['ctxcache_ttft_p50_ms']:.0f} / "
            f"{c['ctxcache_ttft_p99_ms']:.0f} | {c['peer_ttft_p50_ms']:.0f} / "
            f"{c['peer_ttft_p99_ms']:.0f} |")
    table = "\n".join(rows)
    with open(DOC) as f:
        text = f.read()
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    meta = (f"\n\nMeasured {result['date']} on {result['machine']}, code {result['commit']}, "
            f"{result['model']}, {result['threads']} threads each; load average "
            f"{result['load_start']} at start, {result['load_end']} at end.\n\n")
    with open(DOC, "w") as f:
        f.write(text[:a] + meta + table + "\n\n![serving](img/serving.png)\n" + text[b:])
    plot(result, os.path.join(ROOT, "docs", "img", "serving.png"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=bs.DEFAULT_SERVER)
    ap.add_argument("--model", default=bs.DEFAULT_MODEL)
    ap.add_argument("--llama-server", default=None, help="default: from bench/build_llama_cpp.sh")
    # The server's automatic layout on 2 cores (workers = min(4, cores), cores / workers
    # threads each), which measured best here (docs/benchmarks.md).
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--workloads", nargs="+", default=["decode", "rag"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm-rounds", type=int, default=2,
                    help="untimed rag rounds per client before the timed ones, both servers")
    ap.add_argument("--method", default="kvzip")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--no-save", action="store_true", help="do not write serving.json")
    args = ap.parse_args()
    os.makedirs(bs.WORK, exist_ok=True)
    binary = args.llama_server
    if binary is None:
        out = subprocess.run([os.path.join(ROOT, "bench", "build_llama_cpp.sh"), "--check"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit("llama-server is not built: run bench/build_llama_cpp.sh (~15 min)")
        binary = os.path.join(out.stdout.strip(), "llama-server")
    pb, pb_grpc = bs.load_stubs()
    threads = args.workers * args.threads

    def warm_rounds(workload):
        return args.warm_rounds if workload == "rag" else 0
    load_start = os.getloadavg()[0]
    procs = bs.Processes()
    results = {}
    try:
        # ctxcache: one server for everything (its memory tier holds the compressed contexts).
        srv = bs.Server(procs, pb, pb_grpc, "ctxcache-serving", args,
                        ["--max-batch", str(args.max_batch)])
        cli = os.path.join(os.path.dirname(args.server), "ctxcache")

        def n_tokens(text):
            out = subprocess.run([cli, "tokenize", "--model", args.model, "-"], input=text,
                                 capture_output=True, text=True, check=True).stdout
            return len(out.splitlines())

        contexts, docs = [], []
        if "rag" in args.workloads:
            for i in range(max(args.clients)):
                # A document of at most RAG_DOC_TOKENS tokens of the served model (binary
                # search on words); the peer gets the same text.
                words = bs.filler_text(2000, seed=100 + i).split()
                lo, hi = 100, len(words)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if n_tokens(" ".join(words[:mid])) <= RAG_DOC_TOKENS:
                        lo = mid
                    else:
                        hi = mid - 1
                doc = " ".join(words[:lo])
                r = srv.stub.Compress(pb.CompressRequest(
                    document=pb.Document(text=doc.encode()),
                    compression=pb.CompressionParams(method=args.method, ratio=args.ratio)),
                    timeout=900)
                contexts.append(r.context.context_id)
                docs.append(doc)
                bs.log(f"document {i}: {r.context.original_tokens} tokens, {args.method} "
                       f"{args.ratio}x in {r.compute_ms / 1e3:.1f} s")
        for workload in args.workloads:
            max_tokens = 256 if workload == "decode" else 64
            for n in args.clients:
                results[(workload, n)] = {
                    "ctxcache": ctxcache_run(pb, srv, workload, n, args.rounds, contexts,
                                             max_tokens, warm_rounds(workload))}
                bs.log(f"ctxcache {workload} c{n}: {results[(workload, n)]['ctxcache']}")
        procs.stop_all()
        repack = True
        for workload in args.workloads:
            max_tokens = 256 if workload == "decode" else 64
            ctx_per_slot = 512 if workload == "decode" else RAG_DOC_TOKENS + 512
            for n in args.clients:
                def measure():
                    peer = LlamaServer(procs, binary, args.model, threads, n, ctx_per_slot,
                                       repack)
                    return peer_run(peer, workload, n, args.rounds, docs, max_tokens,
                                    warm_rounds(workload))
                try:
                    results[(workload, n)]["peer"] = measure()
                except (RuntimeError, OSError) as e:
                    if not repack:
                        raise
                    # llama.cpp 0.3.36's AMX path (used with weight repacking) dies with
                    # SIGILL on some Sapphire Rapids VMs (as in bench_engine.py): without it.
                    bs.log(f"llama-server failed with weight repacking on ({e}); retrying "
                           f"with --no-repack, kept for the following cases")
                    procs.stop_all()
                    repack = False
                    results[(workload, n)]["peer"] = measure()
                bs.log(f"llama-server {workload} c{n}: {results[(workload, n)]['peer']}")
                procs.stop_all()
    finally:
        procs.stop_all()
    cases = []
    for (workload, n), r in results.items():
        a, p = r["ctxcache"], r["peer"]
        cases.append({
            "name": f"serve_{workload}_c{n}", "workload": workload, "clients": n,
            "rounds": args.rounds, "max_tokens": 256 if workload == "decode" else 64,
            "ctxcache_tok_s": a["tok_s"], "peer_tok_s": p["tok_s"],
            "ctxcache_ttft_p50_ms": a["ttft_p50_ms"], "ctxcache_ttft_p99_ms": a["ttft_p99_ms"],
            "peer_ttft_p50_ms": p["ttft_p50_ms"], "peer_ttft_p99_ms": p["ttft_p99_ms"],
            "ctxcache": a, "peer": p})
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "commit": bs.commit(), "model": os.path.basename(args.model), "threads": threads,
        "ctxcache_layout": f"{args.workers} worker(s) x {args.threads} thread(s), max_batch "
                           f"{args.max_batch}",
        "rag_method": f"{args.method} {args.ratio}x", "peer_repack": repack,
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "command": "python3 bench/bench_serving.py " + " ".join(sys.argv[1:])}
    for c in cases:
        print(f"{c['name']}: ctxcache {c['ctxcache_tok_s']:.0f} tok/s (TTFT p50 "
              f"{c['ctxcache_ttft_p50_ms']:.0f} p99 {c['ctxcache_ttft_p99_ms']:.0f} ms), "
              f"llama-server {c['peer_tok_s']:.0f} tok/s (TTFT p50 {c['peer_ttft_p50_ms']:.0f} "
              f"p99 {c['peer_ttft_p99_ms']:.0f} ms), ratio "
              f"{c['ctxcache_tok_s'] / c['peer_tok_s']:.2f}x")
    if not args.no_save:
        result = save_merged(RESULTS, meta, cases)
        if not args.no_doc:
            write_doc(result)


if __name__ == "__main__":
    main()
