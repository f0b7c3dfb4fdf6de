#!/usr/bin/env python3
"""Service benchmark: time to first token through the gRPC service, vs llama.cpp prefilling.

Rerun (about 12 minutes on 2 idle cores; writes bench/results/service.json and the table between
the service-bench markers in docs/benchmarks.md):

    python3 bench/bench_service.py
    python3 bench/bench_service.py --lengths 2048 --reps 2 --no-doc     # a quick look

Needs a built build/server/ctxcache-server, redis-server on PATH, llama-cpp-python, and
grpcio + grpcio-tools (`pip install grpcio grpcio-tools`; the Python stubs are generated from
proto/ctxcache/v1/ctxcache.proto into bench/work/pb/ at start).

One question over a document of 2K, 4K and 8K tokens (the 8K document is 8064 tokens, leaving
room for the prompt in the model's 8192-token window). Documents are English-like filler with
facts (as in bench_compress.py), tokenized once and sent as token ids, so both sides prefill
exactly the same ids. Each repetition prefixes "Record <tag>." to the document (and drops as
many tokens from its end), so a document that must not be cached never is. Situations:

  peer_full   llama.cpp (llama-cpp-python, same GGUF, n_threads = n_threads_batch = --threads,
              n_ctx 8192, the prompt in one llama_decode call of n_ubatch 512, weight
              repacking off as in bench_engine.py): KV reset, then document + chat prompt
              prefilled from scratch and the first token picked (argmax). In process.
  nocache     ctxcache-server, Generate with the document inline, method "none" (full KV, no
              compression), on a server with no Redis and a zero-byte memory tier.
  cold        Generate with the document inline, finch ratio 8 with the question, not cached
              yet: compression + Redis write + prompt + first token.
  memory_hit  Generate by context_id (the last cold context), found in the memory tier.
  redis_hit   Generate by the same context_id on a second server whose memory tier is 0
              bytes, so every request reads the entry from Redis (fetch, CRC, decode).

The chat prompt is the model's template around the question (ChatML with SmolLM2's default
system message), rendered by the server (ChatPrompt) and by this script for the peer; the
server's usage.prompt_tokens is checked against the peer's count. TTFT is measured client-side
from sending Generate to the first streamed message carrying text; the server's own ttft_ms
(context load/compression + prompt prefill, queueing excluded) from the final usage message is
recorded as server_ms. The ctxcache-servers run with --workers 2 (--workers) and
--threads-per-worker 2 (--threads): one request uses as many threads as the peer. Peer,
nocache and cold alternate within a repetition (the order rotates); the hits alternate with
each other. The reported value is the median; --reps-8k (default 1) applies to the slow
situations at 8K.

Throughput: --tput-clients (8) client threads, each sending --tput-requests (2) Generate calls
by context_id (memory hit, the --tput-len context), --tput-tokens (32) tokens each, greedy,
ignore_eos; reported as aggregate completion tokens/s and requests/s over the wall time. It
runs on the main server and again on a server with --threads-per-worker --tput-alt-threads
(default 1: workers x threads = cores on 2 CPUs; 0 skips it), because more engine threads
than cores makes concurrent decoding several times slower (see docs/benchmarks.md).

Timings are noisy: the machine is shared (other builds and tests run on the same 2 cores), so
the load average at start and end is recorded in the JSON.
"""

import argparse
import concurrent.futures
import datetime
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from bench_common import machine, save_merged  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_SERVER = os.path.join(ROOT, "build", "server", "ctxcache-server")
WORK = os.path.join(ROOT, "bench", "work", "service")
PB_DIR = os.path.join(ROOT, "bench", "work", "pb")
RESULTS = os.path.join(ROOT, "bench", "results", "service.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- BEGIN service-bench (bench/bench_service.py) -->", "<!-- END service-bench -->"
SITUATIONS = ["peer_full", "nocache", "cold", "memory_hit", "redis_hit"]
QUESTION = "In which year was the northern bridge opened?"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
N_CTX = 8192


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Set-up: stubs, documents, processes.

def load_stubs():
    """Generates the Python gRPC stubs (when missing or older than the proto) and imports them."""
    proto = os.path.join(ROOT, "proto", "ctxcache", "v1", "ctxcache.proto")
    out = os.path.join(PB_DIR, "ctxcache", "v1", "ctxcache_pb2.py")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(proto):
        try:
            from grpc_tools import protoc
        except ImportError:
            sys.exit("grpcio-tools is missing: pip install grpcio grpcio-tools")
        os.makedirs(PB_DIR, exist_ok=True)
        rc = protoc.main(["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"--python_out={PB_DIR}",
                          f"--grpc_python_out={PB_DIR}", proto])
        if rc != 0:
            sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, PB_DIR)
    import grpc  # noqa: F401
    from ctxcache.v1 import ctxcache_pb2, ctxcache_pb2_grpc
    return ctxcache_pb2, ctxcache_pb2_grpc


def filler_text(n_words_hint, seed=7):
    """English-like filler with facts (the generator of bench_compress.py)."""
    rng = random.Random(seed)
    subjects = ["The river", "A merchant", "The old library", "Our committee", "The harbor",
                "A young engineer", "The orchard", "The council"]
    verbs = ["opened", "described", "measured", "repaired", "visited", "recorded", "planned"]
    objects = ["the northern bridge", "a ledger of grain prices", "the winter festival",
               "seven copper pipes", "the tide tables", "a map of the valley"]
    out = []
    while len(out) < n_words_hint:
        out.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in "
                   f"{rng.randint(1700, 1999)}.")
    return " ".join(out)


def doc_tokens(n):
    return n - 128 if n >= N_CTX else n


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Processes:
    """Child processes (redis-server, ctxcache-server) killed at exit, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, name, cmd):
        logf = open(os.path.join(WORK, f"{name}.log"), "w")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p, logf))
        return p

    def stop_all(self):
        for _, p, logf in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            logf.close()
        self.procs = []


def start_redis(procs):
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        sys.exit("redis-server not found (tools/setup.sh installs it)")
    port = free_port()
    d = tempfile.mkdtemp(prefix="ctxcache-bench-redis-")
    p = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", d])
    deadline = time.time() + 10
    while time.time() < deadline:
        if p.poll() is not None:
            sys.exit(f"redis-server exited at start; see {WORK}/redis.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return port
        except OSError:
            time.sleep(0.05)
    sys.exit("redis-server did not answer PING within 10 s")


class Server:
    """One ctxcache-server process and a stub on it."""

    def __init__(self, procs, pb, pb_grpc, name, args, extra, workers=None, threads=None):
        import grpc
        self.name, self.pb = name, pb
        self.port = free_port()
        self.workers = workers or args.workers
        self.threads = threads or args.threads
        cmd = [args.server, "--listen", f"127.0.0.1:{self.port}", "--model", args.model,
               "--workers", str(self.workers), "--threads-per-worker", str(self.threads),
               "--log-level", "warn"] + extra
        self.cmd = cmd
        self.proc = procs.start(name, cmd)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", 64 << 20),
                                               ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.ContextCacheStub(self.channel)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"{name} exited at start ({' '.join(cmd)}); see {WORK}/{name}.log")
            try:
                self.info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.time() > deadline:
                    sys.exit(f"{name} not serving after 120 s; see {WORK}/{name}.log")
                time.sleep(0.1)
        # Warm-up: page the weights in and give each worker one prefill of a few hundred
        # tokens (distinct documents, method none), concurrently so both workers get one.
        def warm(i):
            ids = [1000 + (37 * j + 101 * i) % 40000 for j in range(300)]
            self.generate(chat_request(pb, "Hello!", 2, [inline_ref(pb, ids, "none")]))
        with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
            list(ex.map(warm, range(self.workers)))

    def generate(self, req, timeout=900):
        """(client TTFT seconds, final usage, text) of one streamed Generate."""
        t0 = time.perf_counter()
        first, usage, text = None, None, ""
        for msg in self.stub.Generate(req, timeout=timeout):
            if first is None and (msg.text or msg.HasField("usage")):
                first = time.perf_counter()
            text += msg.text
            if msg.HasField("usage"):
                usage = msg.usage
        if usage is None:
            raise RuntimeError(f"{self.name}: Generate ended without usage")
        return first - t0, usage, text


def chat_request(pb, question, max_tokens, contexts=(), ignore_eos=False):
    return pb.GenerateRequest(
        contexts=list(contexts),
        chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content=question.encode())]),
        sampling=pb.SamplingParams(temperature=0), max_tokens=max_tokens, ignore_eos=ignore_eos)


def inline_ref(pb, ids, method, ratio=0.0, question=""):
    params = pb.CompressionParams(method=method)
    if ratio:
        params.ratio = ratio
    return pb.ContextRef(inline=pb.CompressRequest(
        document=pb.Document(tokens=pb.TokenIds(ids=ids)), compression=params,
        question=question.encode()))


# ---------------------------------------------------------------------------------------------
# The peer.

class Peer:
    def __init__(self, model, threads, ubatch):
        import llama_cpp
        from make_logit_fixture import open_llama
        self.version = llama_cpp.__version__
        self.threads, self.ubatch = threads, ubatch
        self.llm = open_llama(model, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=ubatch,
                              n_threads=threads, n_threads_batch=threads, flash_attn=False,
                              verbose=False)
        # Warm-up: a 512-token batch (the first large batch allocates the compute buffers).
        self.llm.eval([1000 + (37 * j) % 40000 for j in range(512)])

    def tokenize(self, text, special):
        return self.llm.tokenize(text.encode(), add_bos=False, special=special)

    def chat_ids(self, question):
        text = (f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        return self.tokenize(text, True)

    def ttft(self, ids):
        """Seconds from an empty KV cache to the first token (prefill + argmax)."""
        import numpy as np
        llm = self.llm
        n_vocab = llm.n_vocab()
        llm.reset()  # the next eval drops every KV entry first
        t0 = time.perf_counter()
        llm.eval(ids)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        token = int(logits.argmax())
        return time.perf_counter() - t0, token


# ---------------------------------------------------------------------------------------------
# Results.

def commit():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def write_doc(result, doc=DOC):
    by = {c["name"]: c for c in result["cases"]}
    lengths = sorted({int(c["name"].rsplit("_", 1)[1]) for c in result["cases"]
                      if c["name"].startswith("ttft_")})
    get = lambda s, n, k="ms": (by.get(f"ttft_{s}_{n}") or {}).get(k)  # noqa: E731
    def column(n):
        name = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        c = by.get(f"ttft_peer_full_{n}") or by.get(f"ttft_nocache_{n}") or {}
        return f"{name} ({c.get('doc_tokens', n)}-token doc)"
    head = "| situation | " + " | ".join(column(n) for n in lengths) + " |"
    sep = "|---|" + "---:|" * len(lengths)
    rows = [head, sep]
    labels = {"peer_full": "peer_full (llama.cpp prefill)", "nocache": "nocache (ours, full KV)",
              "cold": "cold (finch r8 + first token)", "memory_hit": "memory_hit",
              "redis_hit": "redis_hit"}
    for s in SITUATIONS:
        cells = []
        for n in lengths:
            c = by.get(f"ttft_{s}_{n}")
            if c is None:
                cells.append("")
                continue
            cell = fmt_ms(c["ms"])
            if c.get("server_ms") is not None:
                cell += f" ({fmt_ms(c['server_ms'])})"
            if c.get("reps", 0) == 1:
                cell += " ¹"
            cells.append(cell)
        rows.append(f"| {labels[s]} | " + " | ".join(cells) + " |")

    def ratio(a, b, n):
        x, y = get(a, n), get(b, n)
        return f"{x / y:,.0f}x" if x and y else "—"
    rows.append("| **peer_full / memory_hit** | " + " | ".join(ratio("peer_full", "memory_hit", n)
                                                            for n in lengths) + " |")
    rows.append("| **peer_full / redis_hit** | " + " | ".join(ratio("peer_full", "redis_hit", n)
                                                           for n in lengths) + " |")
    rows.append("| peer_full / nocache | " + " | ".join(
        (f"{get('peer_full', n) / get('nocache', n):.2f}x" if get("peer_full", n) and get("nocache", n) else "—")
        for n in lengths) + " |")

    targets = []
    if 8192 in lengths and get("peer_full", 8192):
        for s, want in (("redis_hit", 20), ("memory_hit", 30)):
            if get(s, 8192):
                r = get("peer_full", 8192) / get(s, 8192)
                targets.append(f"{s} {r:,.0f}x faster than peer_full (target ≥{want}x: "
                               f"{'met' if r >= want else 'MISSED'})")
    tput = [c for c in result["cases"] if c["name"].startswith("throughput_")]
    if "prompt_tokens" not in result:
        peers = [c for c in result["cases"] if c["name"].startswith("ttft_peer_full_")]
        if peers:
            result = dict(result, prompt_tokens=peers[0]["prompt_tokens"] - peers[0]["doc_tokens"])
    lines = [BEGIN,
             f"Measured {result['date']} on {result['machine']}; commit {result['commit']}; "
             f"{result['threads']} threads per request on both sides (ctxcache-server "
             f"{result['server_flags']}); peer {result['peer']}. "
             f"Median of {result['reps']} repetitions (at 8K: {result.get('reps_8k', '?')}; hits: "
             f"{result['hit_reps']}); "
             f"¹ = a single repetition. Load average at start {result['loadavg_start']}, "
             f"at end {result['loadavg_end']}: the machine was shared, expect ±20% or worse. "
             "Regenerate with `python3 bench/bench_service.py`.", "",
             "One question over one document; client-side time from sending Generate to the "
             "first streamed text, ms (the server's own `ttft_ms` in parentheses: context "
             "load or compression + prompt prefill, queueing and gRPC excluded). Both sides "
             "prefill the same token ids: the document, then the chat-templated question "
             f"({result.get('prompt_tokens', 'about 40')} tokens with SmolLM2's default system "
             "message).", "",
             "- **peer_full**: llama.cpp prefills document + prompt into an empty KV cache and "
             "picks the first token, in process (no RPC).",
             "- **nocache**: ctxcache, document inline with method `none` (full KV, no "
             "compression), on a server with no Redis and a 0-byte memory tier.",
             "- **cold**: document inline, finch ratio 8 with the question, not cached yet "
             "(compression, memory + Redis write, prompt, first token).",
             "- **memory_hit** / **redis_hit**: Generate by `context_id` (the cold context) on "
             "the server that made it / on a second server with a 0-byte memory tier, which "
             "reads the entry from Redis on every request.", "",
             *rows, ""]
    if targets:
        lines += ["At 8K: " + "; ".join(targets) + ".", ""]
    for c in tput:
        lines.append(f"- Throughput, `{c.get('server_flags', '?')}`: {c['clients']} concurrent clients × "
                     f"{c['requests_per_client']} Generate by context_id (memory hit, "
                     f"{c['doc_tokens']}-token document, finch r8), {c['max_tokens']} tokens each: "
                     f"**{c['tokens_per_s']:.1f} tokens/s**, {c['requests_per_s']:.2f} requests/s "
                     f"(wall {c['wall_s']:.1f} s; client TTFT median {c['ttft_ms_median']:,.0f} ms, "
                     f"max {c['ttft_ms_max']:,.0f} ms).")
    if len(tput) >= 2:
        lo, hi = min(tput, key=lambda c: c["tokens_per_s"]), max(tput, key=lambda c: c["tokens_per_s"])
        lines += ["", f"Concurrency needs no more engine threads than cores: `{hi['server_flags']}` "
                  f"serves {hi['tokens_per_s'] / lo['tokens_per_s']:.1f}x the tokens/s of "
                  f"`{lo['server_flags']}` on this {os.cpu_count()}-CPU machine. The engine's "
                  "thread pools split every operation statically and spin at a barrier after "
                  "it, so with more runnable threads than cores each operation waits for a "
                  "descheduled thread. Single-request TTFT (the table) is unaffected, as only "
                  "one worker runs at a time; the server's automatic layout (`--workers 0 "
                  "--threads-per-worker 0`) gives cores / workers threads per worker."]
    lines.append(END)
    block = "\n".join(lines)
    text = open(doc).read() if os.path.exists(doc) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Service: time to first token\n\n" + block + "\n"
    with open(doc, "w") as f:
        f.write(text)
    log(f"updated {doc}")


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for what is measured.")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--server", default=DEFAULT_SERVER, help="ctxcache-server binary")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--threads", type=int, default=2, help="threads per request, both sides")
    ap.add_argument("--workers", type=int, default=2, help="ctxcache-server engine workers")
    ap.add_argument("--reps", type=int, default=3, help="peer_full / nocache / cold repetitions")
    ap.add_argument("--reps-8k", type=int, default=1,
                    help="repetitions of peer_full / nocache / cold at 8K (slow)")
    ap.add_argument("--hit-reps", type=int, default=5, help="memory_hit / redis_hit repetitions")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens per TTFT request")
    ap.add_argument("--peer-ubatch", type=int, default=512)
    ap.add_argument("--tput-len", type=int, default=2048)
    ap.add_argument("--tput-clients", type=int, default=8)
    ap.add_argument("--tput-requests", type=int, default=2, help="requests per client")
    ap.add_argument("--tput-tokens", type=int, default=32)
    ap.add_argument("--tput-alt-threads", type=int, default=1,
                    help="also measure throughput with this many threads per worker (0: skip)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--doc", default=DOC, help="markdown file whose service-bench section is "
                    "regenerated (%(default)s)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch --doc")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(n > N_CTX or n < 256 for n in lengths):
        ap.error(f"lengths must be in 256..{N_CTX}")
    if not os.path.exists(args.server):
        sys.exit(f"{args.server} not found: build it first (ninja -C build)")
    if not os.path.exists(args.model):
        sys.exit(f"model not found: {args.model} (run tools/setup.sh)")
    os.makedirs(WORK, exist_ok=True)
    pb, pb_grpc = load_stubs()
    run_start = time.time()
    meta = {"machine": machine(), "threads": args.threads, "commit": commit(),
            "date": datetime.date.today().isoformat(), "reps": args.reps,
            "reps_8k": args.reps_8k, "hit_reps": args.hit_reps, "max_tokens": args.max_tokens,
            "question": QUESTION, "cold_method": "finch", "ratio": 8,
            "server_flags": f"--workers {args.workers} --threads-per-worker {args.threads}",
            "loadavg_start": loadavg()}

    log("loading llama.cpp (peer)")
    peer = Peer(args.model, args.threads, args.peer_ubatch)
    meta["peer"] = f"llama.cpp {peer.version} (llama-cpp-python, n_ubatch {args.peer_ubatch}, " \
                   "flash attention off, no weight repacking)"
    chat_ids = peer.chat_ids(QUESTION)
    base_text = filler_text(max(lengths) * 2)
    base_ids = peer.tokenize(base_text, False)
    if len(base_ids) < doc_tokens(max(lengths)):
        sys.exit(f"the filler has only {len(base_ids)} tokens")
    nonce = random.Random().randrange(1 << 30)

    def variant(n, tag):
        """An n-token document no earlier request has sent: a tagged prefix, then the filler."""
        prefix = peer.tokenize(f"Record {tag}-{nonce}. ", False)
        return prefix + base_ids[:n - len(prefix)]

    procs = Processes()
    cases = []
    try:
        redis_port = start_redis(procs)
        redis_url = f"redis://127.0.0.1:{redis_port}"
        log(f"redis-server on {redis_port}; starting ctxcache-server x3")
        main_srv = Server(procs, pb, pb_grpc, "server_main", args, ["--redis-url", redis_url])
        reader = Server(procs, pb, pb_grpc, "server_redis_reader", args,
                        ["--redis-url", redis_url, "--memory-cache-bytes", "0"])
        plain = Server(procs, pb, pb_grpc, "server_nocache", args, ["--memory-cache-bytes", "0"])
        tput_context = None

        for n in lengths:
            nd = doc_tokens(n)
            reps = args.reps_8k if n >= N_CTX else args.reps
            runs = {s: [] for s in SITUATIONS}
            server_ms = {s: [] for s in SITUATIONS}
            extra = {s: {} for s in SITUATIONS}
            hit_id = None
            order = ["peer_full", "nocache", "cold"]
            for rep in range(reps):
                for s in order[rep % 3:] + order[:rep % 3]:
                    doc = variant(nd, f"{s}{rep}")
                    if s == "peer_full":
                        sec, _ = peer.ttft(doc + chat_ids)
                        runs[s].append(sec * 1e3)
                        extra[s]["prompt_tokens"] = len(doc) + len(chat_ids)
                        meta["prompt_tokens"] = len(chat_ids)
                        log(f"ttft_{s}_{n} rep {rep + 1}/{reps}: {sec * 1e3:,.0f} ms "
                            f"({len(doc) + len(chat_ids)} tokens prefilled)")
                        continue
                    if s == "nocache":
                        srv, ref = plain, inline_ref(pb, doc, "none")
                    else:
                        srv, ref = main_srv, inline_ref(pb, doc, "finch", 8, QUESTION)
                    sec, usage, _ = srv.generate(chat_request(pb, QUESTION, args.max_tokens, [ref]))
                    tier = usage.contexts[0].tier
                    if tier != pb.CACHE_TIER_COMPUTED:
                        sys.exit(f"ttft_{s}_{n}: context came from tier {tier}, expected computed")
                    if usage.prompt_tokens != len(chat_ids):
                        sys.exit(f"prompt tokens differ: server {usage.prompt_tokens}, peer "
                                 f"{len(chat_ids)}")
                    runs[s].append(sec * 1e3)
                    server_ms[s].append(usage.ttft_ms)
                    extra[s].setdefault("compute_ms", []).append(usage.contexts[0].compute_ms)
                    extra[s]["kept_entries"] = usage.contexts[0].kept_entries
                    extra[s]["full_entries"] = usage.contexts[0].full_entries
                    extra[s]["kv_bytes"] = usage.contexts[0].kv_bytes
                    if s == "cold":
                        hit_id = usage.contexts[0].context_id
                    log(f"ttft_{s}_{n} rep {rep + 1}/{reps}: {sec * 1e3:,.0f} ms "
                        f"(server {usage.ttft_ms:,.0f} ms, compute "
                        f"{usage.contexts[0].compute_ms:,.0f} ms)")

            # Hits on the last cold context: by id on the main server (memory) and on the
            # reader (memory tier 0 bytes: Redis every time), alternating.
            for rep in range(args.hit_reps):
                for s, srv, want in (("memory_hit", main_srv, pb.CACHE_TIER_MEMORY),
                                     ("redis_hit", reader, pb.CACHE_TIER_REDIS)):
                    ref = pb.ContextRef(context_id=hit_id)
                    sec, usage, _ = srv.generate(chat_request(pb, QUESTION, args.max_tokens, [ref]))
                    if usage.contexts[0].tier != want:
                        sys.exit(f"ttft_{s}_{n}: tier {usage.contexts[0].tier}, expected {want}")
                    runs[s].append(sec * 1e3)
                    server_ms[s].append(usage.ttft_ms)
                    extra[s]["kv_bytes"] = usage.contexts[0].kv_bytes
                    log(f"ttft_{s}_{n} rep {rep + 1}/{args.hit_reps}: {sec * 1e3:,.1f} ms "
                        f"(server {usage.ttft_ms:,.1f} ms)")
            if n == args.tput_len:
                tput_context = (hit_id, nd)

            for s in SITUATIONS:
                c = {"name": f"ttft_{s}_{n}", "ms": statistics.median(runs[s]),
                     "reps": len(runs[s]), "runs_ms": [round(x, 2) for x in runs[s]],
                     "doc_tokens": nd}
                if server_ms[s]:
                    c["server_ms"] = statistics.median(server_ms[s])
                for k, v in extra[s].items():
                    c[k] = statistics.median(v) if isinstance(v, list) else v
                cases.append(c)
                log(f"== ttft_{s}_{n}: {c['ms']:,.1f} ms" +
                    (f" (server {c['server_ms']:,.1f} ms)" if "server_ms" in c else "") +
                    f", {c['reps']} rep(s)")
            save_merged(args.out, dict(meta, loadavg_end=loadavg()), cases)

        if tput_context is not None:
            cases.append(throughput(pb, main_srv, tput_context, args))
            # The same load on the server's automatic layout for 2 cores (--workers 2
            # --threads-per-worker 1: as many threads as cores), which reads the context
            # from Redis once and then from its memory tier.
            if args.tput_alt_threads and args.tput_alt_threads != args.threads:
                alt = Server(procs, pb, pb_grpc, "server_tput_alt", args,
                             ["--redis-url", redis_url], threads=args.tput_alt_threads)
                alt.generate(chat_request(pb, QUESTION, 1, [pb.ContextRef(context_id=tput_context[0])]))
                cases.append(throughput(pb, alt, tput_context, args))
        meta["loadavg_end"] = loadavg()
        meta["wall_minutes"] = round((time.time() - run_start) / 60, 1)
        result = save_merged(args.out, meta, cases)
        log(f"wrote {args.out} ({meta['wall_minutes']} min)")
        if not args.no_doc:
            write_doc(result, args.doc)
    finally:
        procs.stop_all()


def throughput(pb, srv, context, args):
    hit_id, nd = context
    ref = pb.ContextRef(context_id=hit_id)
    questions = [QUESTION, "What did the council plan?", "What did the merchant record?",
                 "Which pipes were repaired?"]
    results, lock = [], threading.Lock()

    def client(i):
        for r in range(args.tput_requests):
            req = chat_request(pb, questions[(i + r) % len(questions)], args.tput_tokens, [ref],
                               ignore_eos=True)
            sec, usage, _ = srv.generate(req)
            with lock:
                results.append((sec, usage.completion_tokens, usage.contexts[0].tier))

    log(f"throughput: {args.tput_clients} clients x {args.tput_requests} requests x "
        f"{args.tput_tokens} tokens over the {args.tput_len} context, {srv.name} "
        f"(--workers {srv.workers} --threads-per-worker {srv.threads})")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.tput_clients) as ex:
        for f in [ex.submit(client, i) for i in range(args.tput_clients)]:
            f.result()
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    if any(r[2] != pb.CACHE_TIER_MEMORY for r in results):
        sys.exit("throughput: a request did not hit the memory tier")
    c = {"name": f"throughput_memory_hit_{args.tput_len}_w{srv.workers}x{srv.threads}",
         "server_flags": f"--workers {srv.workers} --threads-per-worker {srv.threads}",
         "clients": args.tput_clients,
         "requests_per_client": args.tput_requests, "requests": len(results),
         "max_tokens": args.tput_tokens, "doc_tokens": nd, "completion_tokens": tokens,
         "wall_s": round(wall, 3), "tokens_per_s": tokens / wall,
         "requests_per_s": len(results) / wall,
         "ttft_ms_median": statistics.median(r[0] for r in results) * 1e3,
         "ttft_ms_max": max(r[0] for r in results) * 1e3}
    log(f"== {c['name']}: {c['tokens_per_s']:.1f} tokens/s, {c['requests_per_s']:.2f} "
        f"requests/s ({tokens} tokens in {wall:.1f} s)")
    return c


if __name__ == "__main__":
    main()
