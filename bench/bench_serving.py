#!/usr/bin/env python3
"""Serving benchmark: many clients at once, ctxcache (continuous batching) vs llama-server.

Rerun (about 10 minutes on 2 idle cores; writes bench/results/serving.json and the table between
the serving-bench markers in docs/benchmarks.md):

    python3 bench/bench_serving.py
    python3 bench/bench_serving.py --clients 16 --workloads decode --no-doc   # a quick look
    python3 bench/bench_serving.py --workloads ingest    # the third workload (not by default)

Needs a built build/server/ctxcache-server, llama-server built from the vendored llama.cpp
(bench/build_llama_cpp.sh), and grpcio + grpcio-tools (pip install grpcio grpcio-tools).

Three workloads, each at --clients (1, 4, 16) concurrent clients; every client sends --rounds
requests one after another (greedy, ignore_eos, so both servers generate exactly max_tokens).
The default --workloads is decode and rag; ingest runs when named (--workloads ingest):

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
  ingest  decode's request (256 new tokens) from every client, while one more client ingests
          new ~2K-token documents one after another for as long as the decode clients run, at
          most --ingest-docs (4) per case (each document distinct, another seed of rag's
          document maker, so nothing is cached): ctxcache: a Compress of it (--method,
          --ratio, as rag's documents are compressed); llama-server: a chat completion of it
          with max_tokens 1 (a prefill of the document), with a slot of its own (-np =
          clients + 1). Besides time to first token, every gap between consecutive streamed
          text chunks of a decode answer (inter-token gap) is recorded over the timed run, and
          the documents ingested meanwhile with their latency; the one in flight when the
          decode clients finish is waited for and counted. It shows how much an ingestion
          stalls the clients that are decoding meanwhile. The limit keeps a case short:
          llama-server puts its other slots' next tokens in the same batch as a prompt chunk
          (up to 2048 tokens), so each of its decode clients gets about one token per document
          chunk while documents keep coming (one 2K document measured a 16 s gap here); with no
          limit (--ingest-docs 0) a case can take an hour on 2 cores. ingest_whole_run in
          serving.json says whether the ingest client was still sending when the decode
          clients finished.

Both servers use the same GGUF and the same number of threads (ctxcache: --workers x
--threads-per-worker; llama-server: -t and -tb), llama-server with -np = clients (continuous
batching, a slot per client; one more for ingest) and a context of slots x per-slot tokens.
Time to first token is client-side, from sending the request to the first streamed text;
aggregate tok/s is every generated token of the timed rounds over their wall time. Servers run
one at a time.

Cases: serve_<workload>_c<clients> with ctxcache_tok_s, peer_tok_s, ctxcache_ttft_p50_ms,
ctxcache_ttft_p99_ms, peer_ttft_p50_ms, peer_ttft_p99_ms (p99 of at most clients x rounds
requests: with 16 x 2 it is the worst but one); ingest cases add ctxcache_gap_p50_ms,
ctxcache_gap_p99_ms, ctxcache_gap_max_ms, peer_gap_p50_ms, peer_gap_p99_ms, peer_gap_max_ms
(the decode clients' inter-token gaps), ctxcache_docs_ingested, peer_docs_ingested,
ctxcache_ingest_s_mean, peer_ingest_s_mean (documents ingested during the run, and their mean
client-side latency: the Compress call, or the completion). Their tok/s and TTFT are the
decode clients' only.
"""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import subprocess
import sys
import threading
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
INGEST_SEED = 1000  # ingest documents: seeds INGEST_SEED + k (rag's are 100 + client)
INGEST_READY = 8    # with no --ingest-docs limit: documents made ahead of a timed run (more
                    # are made during it, if needed)


def max_tokens_of(workload):
    return 64 if workload == "rag" else 256


def percentile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(q / 100.0 * (len(v) - 1)))))
    return v[k]


def make_document(n_tokens, seed):
    """A document of at most RAG_DOC_TOKENS tokens of the served model (binary search on the
    words of bs.filler_text(seed)); n_tokens(text) counts them."""
    words = bs.filler_text(2000, seed=seed).split()
    lo, hi = 100, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(" ".join(words[:mid])) <= RAG_DOC_TOKENS:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


class Documents:
    """Distinct ingest documents, made on first use and kept: document k has seed
    INGEST_SEED + k."""

    def __init__(self, n_tokens):
        self.n_tokens, self.docs, self.made_late = n_tokens, [], 0

    def ready(self, n):
        """Makes documents 0 .. n-1 (before a timed run)."""
        while len(self.docs) < n:
            self.docs.append(make_document(self.n_tokens, INGEST_SEED + len(self.docs)))

    def get(self, k):
        if k >= len(self.docs):
            self.made_late += 1  # during a timed run: the tokenizer takes CPU from it
            self.ready(k + 1)
        return self.docs[k]


def compress(pb, srv, doc, method, ratio):
    """CompressResponse of one document by text (rag's documents beforehand, ingest's)."""
    return srv.stub.Compress(pb.CompressRequest(
        document=pb.Document(text=doc.encode()),
        compression=pb.CompressionParams(method=method, ratio=ratio)), timeout=900)


def generate_timed(srv, req, timeout=900):
    """(arrival times of the streamed text chunks, seconds from sending the request; final
    usage) of one Generate: srv.generate timing every chunk, not only the first."""
    t0 = time.perf_counter()
    times, usage = [], None
    for msg in srv.stub.Generate(req, timeout=timeout):
        if msg.text:
            times.append(time.perf_counter() - t0)
        if msg.HasField("usage"):
            usage = msg.usage
    if usage is None or not times:
        raise RuntimeError(f"{srv.name}: Generate ended without text or usage")
    return times, usage


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
        times, tokens = self.chat_timed(content, max_tokens)
        return times[0], tokens

    def chat_timed(self, content, max_tokens):
        """(arrival times of the streamed content deltas, seconds from sending the request;
        completion tokens) of one streamed chat completion; counts the prompt tokens it served
        from its prompt cache."""
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
        times, tokens = [], None
        for raw in resp:
            now = time.perf_counter() - t0
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if any(ch.get("delta", {}).get("content") for ch in msg.get("choices", [])):
                times.append(now)
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
                self.prompt_tokens += msg["usage"].get("prompt_tokens", 0)
                self.cached_tokens += (msg["usage"].get("prompt_tokens_details") or {}).get(
                    "cached_tokens", 0)
        c.close()
        if not times or tokens is None:
            raise RuntimeError("llama-server: stream ended without text or usage")
        return times, tokens

    def ingest(self, document):
        """A chat completion of the document with max_tokens 1 (not streamed): the server
        prefills it. (prompt tokens, of them served from its prompt cache)."""
        body = json.dumps({
            "messages": [{"role": "user", "content": document}], "max_tokens": 1,
            "temperature": 0, "ignore_eos": True, "stream": False, "cache_prompt": True})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        data = resp.read()
        c.close()
        if resp.status != 200:
            raise RuntimeError(f"llama-server: HTTP {resp.status}: {data[:300]!r}")
        usage = json.loads(data)["usage"]
        return usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get(
            "cached_tokens", 0)


# ---------------------------------------------------------------------------------------------
# Runs.

def client_threads(n_clients, rounds, one_request):
    """Runs n_clients threads of `rounds` requests each, one_request(client, round);
    (wall seconds, every request's result)."""
    def client(i):
        return [one_request(i, r) for r in range(rounds)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as ex:
        out = [x for res in ex.map(client, range(n_clients)) for x in res]
    return time.perf_counter() - t0, out


def run_clients(n_clients, rounds, one_request):
    """Runs n_clients threads of `rounds` requests each; (wall seconds, ttfts, tokens)."""
    wall, out = client_threads(n_clients, rounds, one_request)
    return wall, [ttft for ttft, _ in out], [n for _, n in out]


def run_ingest(n_clients, rounds, one_request, document, ingest_one, max_docs):
    """The ingest workload: n_clients decode clients as run_clients runs them, one_request(i, r)
    giving (chunk arrival times, tokens), and one more client calling ingest_one(document(k))
    (a dict it records) for k = 0, 1, ... until they are done, or max_docs (0: no limit) are
    done; the call in flight when they finish is waited for (it is bounded by its own timeout)
    and counted. (summary, the documents' records.)"""
    stop = threading.Event()
    docs = []

    def ingester():
        k = 0
        while not stop.is_set() and not (max_docs and k >= max_docs):
            doc = document(k)
            t = time.perf_counter()
            rec = ingest_one(doc)
            docs.append(dict(rec, s=time.perf_counter() - t))
            k += 1
        return stop.is_set()  # false: it stopped at max_docs, before the decode clients

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(ingester)
        try:
            wall, out = client_threads(n_clients, rounds, one_request)
        finally:
            stop.set()
        t_end = time.perf_counter()
        covered = fut.result()
        tail = time.perf_counter() - t_end
    gaps = [b - a for times, _ in out for a, b in zip(times, times[1:])]
    res = summarize(wall, [times[0] for times, _ in out], [n for _, n in out])
    res.update({
        "gap_p50_ms": percentile(gaps, 50) * 1e3, "gap_p99_ms": percentile(gaps, 99) * 1e3,
        "gap_max_ms": max(gaps, default=float("nan")) * 1e3, "gaps": len(gaps),
        "chunks": sum(len(times) for times, _ in out), "docs_ingested": len(docs),
        "ingest_s_mean": sum(d["s"] for d in docs) / len(docs),
        "ingest_s": [round(d["s"], 3) for d in docs], "ingest_tail_s": tail,
        "ingest_whole_run": covered})
    return res, docs


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


def ctxcache_ingest_run(pb, srv, n_clients, rounds, max_tokens, documents, first_doc,
                        method, ratio, max_docs):
    """The ingest workload on ctxcache: ingest documents first_doc, first_doc + 1, ... (the
    server keeps every one it compressed, so no document repeats on it). (summary, documents
    used)."""
    def one(i, r):
        times, usage = generate_timed(
            srv, bs.chat_request(pb, DECODE_QUESTION, max_tokens, ignore_eos=True))
        return times, usage.completion_tokens

    def ingest_one(doc):
        r = compress(pb, srv, doc, method, ratio)
        return {"tokens": r.context.original_tokens, "compute_ms": r.compute_ms,
                "queue_ms": r.queue_ms}
    documents.ready(first_doc + (max_docs or INGEST_READY))
    late = documents.made_late
    out, docs = run_ingest(n_clients, rounds, one, lambda k: documents.get(first_doc + k),
                           ingest_one, max_docs)
    out["ingest_compute_ms_mean"] = sum(d["compute_ms"] for d in docs) / len(docs)
    out["ingest_queue_ms_mean"] = sum(d["queue_ms"] for d in docs) / len(docs)
    out["ingest_doc_tokens_mean"] = sum(d["tokens"] for d in docs) / len(docs)
    out["ingest_cache_hits"] = sum(1 for d in docs if d["compute_ms"] == 0)
    out["ingest_docs_made_during_run"] = documents.made_late - late
    return out, len(docs)


def peer_ingest_run(peer, n_clients, rounds, max_tokens, documents, max_docs):
    """The ingest workload on llama-server (a fresh server: documents 0, 1, ...)."""
    def ingest_one(doc):
        prompt, cached = peer.ingest(doc)
        return {"prompt_tokens": prompt, "cached_tokens": cached}
    documents.ready(max_docs or INGEST_READY)
    late = documents.made_late
    peer.prompt_tokens = peer.cached_tokens = 0
    out, docs = run_ingest(n_clients, rounds,
                           lambda i, r: peer.chat_timed(DECODE_QUESTION, max_tokens),
                           documents.get, ingest_one, max_docs)
    out["prompt_tokens_from_cache"] = peer.cached_tokens / max(1, peer.prompt_tokens)
    out["ingest_prompt_tokens_mean"] = sum(d["prompt_tokens"] for d in docs) / len(docs)
    out["ingest_prompt_tokens_from_cache"] = (sum(d["cached_tokens"] for d in docs) /
                                              max(1, sum(d["prompt_tokens"] for d in docs)))
    out["ingest_docs_made_during_run"] = documents.made_late - late
    return out


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
        second = (("gap_max_ms", "longest inter-token gap, decode clients (ms)")
                  if w == "ingest" else ("ttft_p99_ms", "time to first token, p99 (ms)"))
        for row, (key, label) in enumerate([("tok_s", "aggregate generated tok/s"), second]):
            ax = axes[row][col]
            ax.plot(x, [c[f"ctxcache_{key}"] for c in cases], "o-", label="ctxcache")
            ax.plot(x, [c[f"peer_{key}"] for c in cases], "s--", label="llama-server")
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(v) for v in x])
            if row == 1:
                ax.set_yscale("log")
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.set_title(f"{w} (decode clients + one ingesting)" if w == "ingest" else w)
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
    ingest = sorted((c for c in result["cases"] if c["workload"] == "ingest"),
                    key=lambda c: c["clients"])
    if ingest:
        rows += ["", "ingest: gaps between consecutive streamed tokens of the decode clients "
                 "while one more client ingests new 2K-token documents, and the documents "
                 "ingested meanwhile (mean latency).", "",
                 "| case | ctxcache gap p50 / p99 / max ms | llama-server gap p50 / p99 / max ms "
                 "| documents ingested, ctxcache / llama-server | mean ingest s, ctxcache / "
                 "llama-server |", "|---|---:|---:|---:|---:|"]
        for c in ingest:
            gaps = {side: " / ".join(bs.fmt_ms(c[f"{side}_gap_{q}_ms"])
                                     for q in ("p50", "p99", "max"))
                    for side in ("ctxcache", "peer")}
            rows.append(f"| {c['name']} | {gaps['ctxcache']} | {gaps['peer']} | "
                        f"{c['ctxcache_docs_ingested']} / {c['peer_docs_ingested']} | "
                        f"{c['ctxcache_ingest_s_mean']:.1f} / {c['peer_ingest_s_mean']:.1f} |")
    table = "\n".join(rows)
    with open(DOC) as f:
        text = f.read()
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    meta = (f"\n\nMeasured {result['date']} on {result['machine']}, code {result['commit']}, "
            f"{result['model']}, {result['threads']} threads each; load average "
            f"{result['load_start']} at start, {result['load_end']} at end.")
    fresh = [c["name"] for c in result["cases"] if c.get("date") == result["date"]]
    if len(fresh) < len(result["cases"]):  # a partial rerun (--workloads / --clients)
        meta += (f" That run measured {', '.join(fresh)}; the other rows are from earlier runs "
                 f"(each case's date and commit, where recorded, are in "
                 f"bench/results/serving.json).")
    meta += "\n\n"
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
    ap.add_argument("--workloads", nargs="+", default=["decode", "rag"],
                    choices=["decode", "rag", "ingest"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm-rounds", type=int, default=2,
                    help="untimed rag rounds per client before the timed ones, both servers")
    ap.add_argument("--method", default="kvzip", help="rag's and ingest's compression")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--ingest-docs", type=int, default=4,
                    help="most documents the ingest client sends per case (0: no limit; "
                         "llama-server then decodes a token per prompt batch for as long as "
                         "it lasts)")
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
        if not os.path.exists(cli):  # a server binary copied alone: the build's CLI
            cli = os.path.join(os.path.dirname(bs.DEFAULT_SERVER), "ctxcache")

        def n_tokens(text):
            out = subprocess.run([cli, "tokenize", "--model", args.model, "-"], input=text,
                                 capture_output=True, text=True, check=True).stdout
            return len(out.splitlines())

        contexts, docs = [], []
        if "rag" in args.workloads:
            for i in range(max(args.clients)):
                # The peer gets the same text.
                doc = make_document(n_tokens, 100 + i)
                r = compress(pb, srv, doc, args.method, args.ratio)
                contexts.append(r.context.context_id)
                docs.append(doc)
                bs.log(f"document {i}: {r.context.original_tokens} tokens, {args.method} "
                       f"{args.ratio}x in {r.compute_ms / 1e3:.1f} s")
        documents = Documents(n_tokens)  # ingest's
        ingested = 0  # documents the ctxcache server has compressed: the next one is new
        for workload in args.workloads:
            max_tokens = max_tokens_of(workload)
            for n in args.clients:
                if workload == "ingest":
                    out, used = ctxcache_ingest_run(pb, srv, n, args.rounds, max_tokens,
                                                    documents, ingested, args.method,
                                                    args.ratio, args.ingest_docs)
                    ingested += used
                else:
                    out = ctxcache_run(pb, srv, workload, n, args.rounds, contexts, max_tokens,
                                       warm_rounds(workload))
                results[(workload, n)] = {"ctxcache": out}
                bs.log(f"ctxcache {workload} c{n}: {results[(workload, n)]['ctxcache']}")
        procs.stop_all()
        repack = True
        for workload in args.workloads:
            max_tokens = max_tokens_of(workload)
            ctx_per_slot = 512 if workload == "decode" else RAG_DOC_TOKENS + 512
            for n in args.clients:
                def measure():
                    if workload == "ingest":  # a slot for the ingesting client
                        peer = LlamaServer(procs, binary, args.model, threads, n + 1,
                                           ctx_per_slot, repack)
                        return peer_ingest_run(peer, n, args.rounds, max_tokens, documents,
                                               args.ingest_docs)
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
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    for (workload, n), r in results.items():
        a, p = r["ctxcache"], r["peer"]
        case = {
            "name": f"serve_{workload}_c{n}", "workload": workload, "clients": n,
            "rounds": args.rounds, "max_tokens": max_tokens_of(workload),
            "ctxcache_tok_s": a["tok_s"], "peer_tok_s": p["tok_s"],
            "ctxcache_ttft_p50_ms": a["ttft_p50_ms"], "ctxcache_ttft_p99_ms": a["ttft_p99_ms"],
            "peer_ttft_p50_ms": p["ttft_p50_ms"], "peer_ttft_p99_ms": p["ttft_p99_ms"]}
        if workload == "ingest":
            for side, x in (("ctxcache", a), ("peer", p)):
                for k in ("gap_p50_ms", "gap_p99_ms", "gap_max_ms", "docs_ingested",
                          "ingest_s_mean"):
                    case[f"{side}_{k}"] = x[k]
        # When and from which code (a partial rerun keeps other runs' cases in serving.json).
        case.update({"date": date, "commit": bs.commit(), "ctxcache": a, "peer": p})
        cases.append(case)
    meta = {
        "date": date, "machine": machine(),
        "commit": bs.commit(), "model": os.path.basename(args.model), "threads": threads,
        "ctxcache_layout": f"{args.workers} worker(s) x {args.threads} thread(s), max_batch "
                           f"{args.max_batch}",
        "rag_method": f"{args.method} {args.ratio}x", "peer_repack": repack,
        "ingest_method": f"{args.method} {args.ratio}x", "ingest_docs": args.ingest_docs,
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "command": "python3 bench/bench_serving.py " + " ".join(sys.argv[1:])}
    for c in cases:
        print(f"{c['name']}: ctxcache {c['ctxcache_tok_s']:.0f} tok/s (TTFT p50 "
              f"{c['ctxcache_ttft_p50_ms']:.0f} p99 {c['ctxcache_ttft_p99_ms']:.0f} ms), "
              f"llama-server {c['peer_tok_s']:.0f} tok/s (TTFT p50 {c['peer_ttft_p50_ms']:.0f} "
              f"p99 {c['peer_ttft_p99_ms']:.0f} ms), ratio "
              f"{c['ctxcache_tok_s'] / c['peer_tok_s']:.2f}x")
        if c["workload"] == "ingest":
            for side, label in (("ctxcache", "ctxcache"), ("peer", "llama-server")):
                print(f"  {label}: inter-token gap p50 {c[f'{side}_gap_p50_ms']:.1f} p99 "
                      f"{c[f'{side}_gap_p99_ms']:.1f} max {c[f'{side}_gap_max_ms']:.0f} ms; "
                      f"{c[f'{side}_docs_ingested']} document(s) ingested, mean "
                      f"{c[f'{side}_ingest_s_mean']:.1f} s")
    if not args.no_save:
        result = save_merged(RESULTS, meta, cases)
        if not args.no_doc:
            write_doc(result)


if __name__ == "__main__":
    main()
