#!/usr/bin/env python3
"""Long soaks of the whole service (issue 14's campaign; docs/reliability.md has the last results).

    python3 bench/soak.py chaos  --minutes 30    # two replicas, one Redis, chaos on the Redis keys
    python3 bench/soak.py memory --minutes 60    # one server under churn, its RSS sampled

Both need a built build/server/ctxcache-server, redis-server on PATH and grpcio + grpcio-tools
(`pip install grpcio grpcio-tools`; stubs are generated from the proto as bench_service.py
does). The model defaults to SmolLM2-135M (models/, tools/fetch_model.sh): the soaks test the
service, not answer quality, and a small model turns more requests over in the time. Logs of
every process go to bench/work/soak-<mode>/; results to bench/results/soak_<mode>.json (and a
plot to docs/img/soak_memory.png).

chaos: replicas A and B (1 worker, 1 thread each, an 8 MiB memory tier so most hits come from
Redis) share one real redis-server. Before the soak a third server with no Redis and no memory
tier answers every (document, setting) pair once: the golden answers. During the soak, client
threads send greedy requests to a random replica: a Generate with the document inline, or a
Compress on one replica followed by a Generate by context_id on either (the other replica must
find it in Redis). Meanwhile a chaos thread, every 1-4 s, does one of: delete a random part or
metadata key, flip one byte of a part, expire keys within a second, FLUSHALL, or SIGKILL Redis
(restarted 2-8 s later on the same port, empty).
  Pass: every OK answer is byte-equal to its golden answer; both replicas serve to the end
  (health SERVING, no exit); some requests of every kind succeeded. Calls that fail are counted
  by status code: a Generate by context_id whose entry chaos removed is NOT_FOUND by design.

memory: one server (2 workers, a memory tier of 256 MiB, --max-kv-bytes 1 GiB,
Redis with maxmemory 256 MiB) under three clients that never repeat a document: inline
Generates over fresh documents of ~60 to ~5000 tokens with every method and kv_dtype, Compress +
Generate by id, Generates by id of recent contexts (memory and Redis hits), DeleteContext,
calls cancelled by a short deadline, Recycled-Attention decoding, query selection from a
stored whole context. Every 5 s the server's RSS (/proc/PID/status VmRSS) is sampled; every 5
minutes the clients pause (each finishes its call), and once nothing is in flight the idle RSS
is sampled: what the server retains (memory tier, allocator, caches), without the working
memory of whatever happens to be running, which swings the busy samples by hundreds of MiB.
  Pass: RSS never above model file + memory tier + KV budget + 512 MiB; no upward trend: a least
  squares line through the idle samples less the memory tier's bytes and the workers' kept
  scratch (both read from /metrics at the same moment: the tier holds contexts by design, its
  fill moves with evictions; each worker keeps up to 128 MiB of scratch, sized by its last
  jobs) after the first 10 minutes rises by at most 32 MiB over that span.
"""

import argparse
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_service as bs  # noqa: E402  (stubs, processes, request builders)

DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
MiB = 1 << 20


def log(msg):
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Redis: a restartable real redis-server and a minimal RESP client for the chaos.

class Redis:
    def __init__(self, procs, port, extra=()):
        self.procs, self.port, self.extra = procs, port, list(extra)
        self.dir = tempfile.mkdtemp(prefix="ctxcache-soak-redis-")
        self.proc = None
        self.starts = 0
        self.start()

    def start(self):
        binary = "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else "redis-server"
        self.starts += 1
        self.proc = self.procs.start(f"redis-{self.starts}", [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.dir] + self.extra)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def command(self, *args, timeout=2.0):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            s.sendall(b"*%d\r\n" % len(parts) + b"".join(
                b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
            f = s.makefile("rb")
            return _read_resp(f)


def _read_resp(f):
    line = f.readline()
    if not line:
        raise OSError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise OSError(f"Redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise OSError(f"unexpected RESP reply {line!r}")


def scan_keys(redis, pattern):
    keys, cursor = [], b"0"
    while True:
        cursor, batch = redis.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        keys += batch
        if cursor in (b"0", "0"):
            return keys


# ---------------------------------------------------------------------------------------------
# Servers and requests.

def start_server(procs, pb, pb_grpc, name, args, extra, workers, threads):
    ns = SimpleNamespace(server=args.server, model=args.model, workers=workers, threads=threads)
    return bs.Server(procs, pb, pb_grpc, name, ns, extra, workers=workers, threads=threads)


def params(pb, method, ratio, dtype):
    p = pb.CompressionParams(method=method)
    if ratio:
        p.ratio = ratio
    if dtype:
        p.kv_dtype = dtype
    return p


def compress_request(pb, text, setting):
    method, ratio, dtype, question = setting
    return pb.CompressRequest(document=pb.Document(text=text.encode()),
                              compression=params(pb, method, ratio, dtype),
                              question=question.encode())


def answer_request(pb, ref, question, max_tokens, decode=None, select=None):
    req = bs.chat_request(pb, question, max_tokens, [ref])
    if select:
        req.contexts[0].select.ratio = select
    if decode is not None:
        req.decode.CopyFrom(decode)
    return req


def generate_text(stub, req, timeout):
    text, usage = "", None
    for msg in stub.Generate(req, timeout=timeout):
        text += msg.text
        if msg.HasField("usage"):
            usage = msg.usage
    if usage is None:
        raise RuntimeError("Generate ended without usage")
    return text, usage


def health_ok(server):
    """grpc.health.v1 Check of the whole server (service ""), by hand: the request is an empty
    message and SERVING is field 1 = 1, so no grpcio-health-checking is needed."""
    import grpc
    check = server.channel.unary_unary("/grpc.health.v1.Health/Check")
    try:
        return check(b"", timeout=5) == b"\x08\x01"
    except grpc.RpcError:
        return False


def documents(n, seed):
    """n documents of ~200-650 tokens of filler, each with one fact and a question about it."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        code = rng.randint(10000, 99999)
        body = bs.filler_text(rng.randint(15, 45), seed=seed * 1000 + i)  # ~14 tokens each
        cut = rng.randint(0, len(body) // 2)
        text = f"{body[:cut]} The access code of vault {i} is {code}. {body[cut:]}"
        docs.append((text, f"What is the access code of vault {i}?"))
    return docs


def commit():
    return bs.commit()


# ---------------------------------------------------------------------------------------------
# chaos

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.seconds = {}  # kind -> [calls, total s, max s]
        self.mismatches = []

    def timed(self, kind, seconds):
        with self.lock:
            t = self.seconds.setdefault(kind, [0, 0.0, 0.0])
            t[0] += 1
            t[1] += seconds
            t[2] = max(t[2], seconds)

    def latency(self):
        with self.lock:
            return {k: {"calls": n, "mean_s": round(total / n, 3), "max_s": round(mx, 3)}
                    for k, (n, total, mx) in self.seconds.items()}

    def add(self, kind, code):
        with self.lock:
            self.counts.setdefault(kind, {}).setdefault(code, 0)
            self.counts[kind][code] += 1

    def mismatch(self, what):
        with self.lock:
            self.mismatches.append(what)


def run_chaos(args):
    import grpc
    pb, pb_grpc = bs.load_stubs()
    bs.WORK = os.path.join(ROOT, "bench", "work", "soak-chaos")
    started_at_commit = commit()
    os.makedirs(bs.WORK, exist_ok=True)
    procs = bs.Processes()
    try:
        redis = Redis(procs, bs.free_port())
        url = f"redis://127.0.0.1:{redis.port}"
        common = ["--redis-command-timeout-ms", "500", "--redis-connect-timeout-ms", "300",
                  "--redis-circuit-cool-down-ms", "1000", "--max-queue-depth", "256"]
        golden_server = start_server(procs, pb, pb_grpc, "golden", args,
                                     ["--memory-cache-bytes", "0"], 1, 1)
        docs = documents(args.documents, args.seed)
        settings = [("none", 0, "", ""), ("snapkv", 4, "int8", "q"), ("kvzip", 4, "int4", ""),
                    ("expected_attention", 8, "fp16", ""), ("finch", 8, "int8", "q"),
                    ("streaming", 4, "int4", ""), ("anchor", 4, "", "")]
        methods = set(golden_server.info.methods)
        settings = [s for s in settings if s[0] in methods]

        def resolve(setting, question):
            return setting[:3] + (question if setting[3] == "q" else "",)

        log(f"golden answers: {len(docs)} documents x {len(settings)} settings")
        golden = {}
        t0 = time.time()
        for d, (text, question) in enumerate(docs):
            for s, setting in enumerate(settings):
                ref = pb.ContextRef(inline=compress_request(pb, text, resolve(setting, question)))
                golden[(d, s)], _ = generate_text(
                    golden_server.stub, answer_request(pb, ref, question, args.max_tokens), 600)
        log(f"golden answers took {time.time() - t0:.0f} s")
        golden_server.proc.send_signal(signal.SIGTERM)

        replicas = [start_server(procs, pb, pb_grpc, name, args,
                                 common + ["--redis-url", url, "--memory-cache-bytes", "8MiB"], 1, 1)
                    for name in ("replica-a", "replica-b")]
        tally = Tally()
        stop = threading.Event()
        chaos_log = []

        def client(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                d, s = rng.randrange(len(docs)), rng.randrange(len(settings))
                text, question = docs[d]
                setting = resolve(settings[s], question)
                first = rng.choice(replicas)
                kind = rng.choice(["inline", "by_id"])
                stage = f"generate_{kind}"
                try:
                    if kind == "inline":
                        ref = pb.ContextRef(inline=compress_request(pb, text, setting))
                        where = first.name
                    else:
                        stage = "compress"
                        resp = first.stub.Compress(compress_request(pb, text, setting), timeout=120)
                        tally.add("compress", "OK")
                        stage = "generate_by_id"
                        second = rng.choice(replicas)
                        ref = pb.ContextRef(context_id=resp.context.context_id)
                        where = f"{first.name}->{second.name}"
                        first = second
                    answer, usage = generate_text(
                        first.stub, answer_request(pb, ref, question, args.max_tokens), 120)
                    tiers = ",".join(pb.CacheTier.Name(c.tier) for c in usage.contexts)
                    if answer != golden[(d, s)]:
                        tally.mismatch({"kind": kind, "where": where, "doc": d,
                                        "setting": list(settings[s][:3]), "tiers": tiers,
                                        "answer": answer, "golden": golden[(d, s)]})
                        log(f"MISMATCH {kind} {where} doc {d} {settings[s][:3]} ({tiers}): "
                            f"{answer!r} != {golden[(d, s)]!r}")
                    tally.add(stage, "OK")
                    for c in usage.contexts:
                        tally.add("tier", pb.CacheTier.Name(c.tier))
                except grpc.RpcError as e:
                    tally.add(stage, e.code().name)

        def chaos(seed):
            rng = random.Random(seed)
            while not stop.wait(rng.uniform(1, 4)):
                action = rng.choices(
                    ["delete_part", "delete_meta", "flip_byte", "expire", "flushall", "kill"],
                    weights=[4, 3, 5, 3, 1, 1])[0]
                try:
                    if action == "kill":
                        redis.kill()
                        down = rng.uniform(2, 8)
                        if stop.wait(down):
                            redis.start()
                            break
                        redis.start()
                        chaos_log.append(("kill", round(down, 1)))
                        continue
                    if action == "flushall":
                        redis.command("FLUSHALL")
                        chaos_log.append(("flushall", 1))
                        continue
                    pattern = "*:m:*" if action == "delete_meta" else "*:p:*"
                    if action == "expire":
                        pattern = rng.choice(["*:m:*", "*:p:*"])
                    keys = scan_keys(redis, pattern)
                    if not keys:
                        continue
                    if action in ("delete_part", "delete_meta"):
                        n = redis.command("DEL", *rng.sample(keys, min(len(keys), rng.randint(1, 3))))
                    elif action == "expire":
                        n = sum(redis.command("PEXPIRE", k, rng.randint(1, 1000))
                                for k in rng.sample(keys, min(len(keys), rng.randint(1, 5))))
                    else:
                        key = rng.choice(keys)
                        size = redis.command("STRLEN", key)
                        if not size:
                            continue
                        at = rng.randrange(size)
                        old = redis.command("GETRANGE", key, at, at)
                        if not old:
                            continue
                        redis.command("SETRANGE", key, at, bytes([old[0] ^ (1 << rng.randrange(8))]))
                        n = 1
                    chaos_log.append((action, n))
                except OSError as e:
                    chaos_log.append((action + "_failed", str(e)[:60]))

        log(f"soak: {args.minutes} min, {args.clients} clients, replicas on "
            f"{[r.port for r in replicas]}, Redis on {redis.port}")
        threads = [threading.Thread(target=client, args=(args.seed + 1 + i,), daemon=True)
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=chaos, args=(args.seed + 100,), daemon=True))
        for t in threads:
            t.start()
        t_start = time.time()
        alive = True
        health_failures = []
        while time.time() - t_start < args.minutes * 60:
            time.sleep(min(30, max(1, args.minutes * 60 - (time.time() - t_start))))
            for r in replicas:
                if r.proc.poll() is not None:
                    alive = False
                    health_failures.append(f"{r.name} exited with {r.proc.returncode}")
                elif not health_ok(r):
                    health_failures.append(f"{r.name} not SERVING at "
                                           f"{time.time() - t_start:.0f} s")
            with tally.lock:
                ok = sum(v.get("OK", 0) for k, v in tally.counts.items() if k.startswith("gen"))
                bad = len(tally.mismatches)
            log(f"{(time.time() - t_start) / 60:.1f} min: {ok} OK answers, {bad} mismatches, "
                f"{len(chaos_log)} chaos actions, Redis started {redis.starts}x")
            if not alive:
                break
        stop.set()
        for t in threads:
            t.join(timeout=150)
        final_health = {r.name: health_ok(r) for r in replicas}
        counts = tally.counts
        ok_inline = counts.get("generate_inline", {}).get("OK", 0)
        ok_by_id = counts.get("generate_by_id", {}).get("OK", 0)
        redis_hits = counts.get("tier", {}).get("CACHE_TIER_REDIS", 0)
        actions = {}
        for a, _ in chaos_log:
            actions[a] = actions.get(a, 0) + 1
        passed = (not tally.mismatches and alive and all(final_health.values())
                  and ok_inline > 0 and ok_by_id > 0 and redis_hits > 0)
        result = {
            "test": "two-replica chaos soak", "date": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": started_at_commit, "model": os.path.basename(args.model),
            "minutes": round((time.time() - t_start) / 60, 1), "clients": args.clients,
            "documents": len(docs), "settings": [list(s) for s in settings],
            "max_tokens": args.max_tokens, "counts": counts, "chaos_actions": actions,
            "redis_starts": redis.starts, "mismatches": tally.mismatches[:50],
            "mismatch_count": len(tally.mismatches), "replicas_alive": alive,
            "final_health": final_health, "health_failures": health_failures[:50],
            "loadavg": bs.loadavg(), "pass": passed,
            "criterion": "every OK answer byte-equal to the golden (no-cache) answer; both "
                         "replicas alive and SERVING at the end; OK inline and by-id answers "
                         "and Redis hits all seen",
        }
        save(args.results or os.path.join(ROOT, "bench", "results", "soak_chaos.json"), result)
        log(f"{'PASS' if passed else 'FAIL'}: {json.dumps(counts)}; chaos {actions}; "
            f"{len(tally.mismatches)} mismatches")
        return 0 if passed else 1
    finally:
        procs.stop_all()


# ---------------------------------------------------------------------------------------------
# memory

def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def trend(samples, skip_s):
    """(rise in bytes over the span, span seconds) of a least-squares line after skip_s."""
    pts = [(t, r) for t, r in samples if t >= skip_s]
    if len(pts) < 3:
        return None, 0
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    slope = sum((t - mt) * (r - mr) for t, r in pts) / var if var else 0.0
    span = pts[-1][0] - pts[0][0]
    return slope * span, span


def run_memory(args):
    import grpc
    pb, pb_grpc = bs.load_stubs()
    bs.WORK = os.path.join(ROOT, "bench", "work", "soak-memory")
    os.makedirs(bs.WORK, exist_ok=True)
    procs = bs.Processes()
    memory_tier, kv_budget = args.memory_tier_mib * MiB, args.kv_budget_mib * MiB
    started_at_commit = commit()  # the code under test (HEAD may move during an hour)
    binary_mtime = datetime.datetime.fromtimestamp(
        os.path.getmtime(args.server), datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        redis = Redis(procs, bs.free_port(), ["--maxmemory", "256mb",
                                              "--maxmemory-policy", "allkeys-lru"])
        metrics_port = bs.free_port()
        server = start_server(procs, pb, pb_grpc, "server", args, [
            "--redis-url", f"redis://127.0.0.1:{redis.port}",
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--memory-cache-bytes", f"{args.memory_tier_mib}MiB",
            "--max-kv-bytes", f"{args.kv_budget_mib}MiB", "--max-queue-depth", "256"], 2, 1)
        model_bytes = os.path.getsize(args.model)
        bound = model_bytes + memory_tier + kv_budget + 512 * MiB
        pid = server.proc.pid
        samples = []
        stop = threading.Event()
        tally = Tally()
        recent, recent_lock = [], threading.Lock()
        whole = []  # context ids stored with method none (for query selection)
        settings = [(m, r, d) for m in ("snapkv", "kvzip", "expected_attention", "streaming",
                                        "finch", "anchor", "none")
                    for r, d in ((4, "fp16"), (8, "int8"), (16, "int4"))]
        settings = [s for s in settings if s[0] in set(server.info.methods)]
        counter = [0]

        def fresh_document(rng):
            with recent_lock:
                counter[0] += 1
                k = counter[0]
            n_sentences = int(rng.choice([5, 20, 60, 150, 350]) * rng.uniform(0.8, 1.2))  # ~14 tokens each
            return f"Document {k}. " + bs.filler_text(n_sentences, seed=k)

        def one_request(rng):
            op = rng.choices(["inline", "compress", "by_id", "delete", "cancel", "recycled",
                              "select"], weights=[5, 3, 4, 1, 2, 1, 1])[0]
            t_op = time.time()
            try:
                if op in ("inline", "cancel", "recycled"):
                    m, r, d = rng.choice(settings)
                    ref = pb.ContextRef(inline=compress_request(
                        pb, fresh_document(rng), (m, 0 if m == "none" else r, d, "")))
                    decode = None
                    if op == "recycled":
                        decode = pb.DecodePolicy(kind=pb.DecodePolicy.KIND_RECYCLED)
                    timeout = rng.uniform(0.05, 1.5) if op == "cancel" else 300
                    generate_text(server.stub, answer_request(
                        pb, ref, "Summarize.", rng.choice([4, 16, 48]), decode), timeout)
                elif op == "compress":
                    m, r, d = rng.choice(settings)
                    resp = server.stub.Compress(compress_request(
                        pb, fresh_document(rng), (m, 0 if m == "none" else r, d, "")),
                        timeout=300)
                    with recent_lock:
                        recent.append(resp.context.context_id)
                        del recent[:-200]
                        if m == "none":
                            whole.append(resp.context.context_id)
                            del whole[:-50]
                elif op in ("by_id", "delete", "select"):
                    with recent_lock:
                        pool = whole if op == "select" else recent
                        cid = rng.choice(pool) if pool else None
                    if cid is None:
                        return
                    if op == "delete":
                        server.stub.DeleteContext(pb.DeleteContextRequest(context_id=cid),
                                                  timeout=30)
                    else:
                        generate_text(server.stub, answer_request(
                            pb, pb.ContextRef(context_id=cid), "What is it about?", 8,
                            select=8 if op == "select" else None), 300)
                tally.add(op, "OK")
                tally.timed(op, time.time() - t_op)
            except grpc.RpcError as e:
                tally.add(op, e.code().name)
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    stop.wait(rng.uniform(0.2, 1.0))  # back off, as the message asks

        # Idle sampling: the clients pause (each finishes its call first), the server goes
        # idle, and its RSS then is what it retains (memory tier, allocator, caches): the
        # trend of these samples says whether memory leaks; the busy samples swing by the
        # working memory of whatever is in flight.
        paused = threading.Event()
        busy, busy_lock = [0], threading.Lock()

        def client(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                with busy_lock:
                    go = not paused.is_set()
                    if go:
                        busy[0] += 1
                if not go:
                    stop.wait(0.1)
                    continue
                try:
                    one_request(rng)
                finally:
                    with busy_lock:
                        busy[0] -= 1

        def idle_rss():
            """RSS with every client paused and nothing in flight (None: not idle in 300 s)."""
            with busy_lock:
                paused.set()
            try:
                give_up = time.time() + 300
                while time.time() < give_up:
                    with busy_lock:
                        if busy[0] == 0:
                            break
                    time.sleep(0.1)
                else:
                    return None
                time.sleep(2)  # background Redis writes, the last trim
                readings = []
                for _ in range(3):
                    time.sleep(1)
                    readings.append(rss_bytes(pid))
                g = gauges()
                return (min(readings), g.get('ctxcache_cache_bytes{tier="memory"}'),
                        g.get("ctxcache_worker_scratch_bytes"),
                        g.get("ctxcache_heap_in_use_bytes"))
            finally:
                paused.clear()

        def gauges():
            """Every series' value from one scrape of the server's /metrics ({}: no answer)."""
            import urllib.request
            out = {}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                            timeout=10) as r:
                    for line in r.read().decode().splitlines():
                        if line and not line.startswith("#"):
                            series, _, value = line.rpartition(" ")
                            try:
                                out[series] = int(float(value))
                            except (ValueError, OverflowError):  # NaN, +Inf: not a byte count
                                pass
            except OSError:
                pass
            return out

        log(f"memory soak: {args.minutes} min, bound {bound / MiB:.0f} MiB (model "
            f"{model_bytes / MiB:.0f} + tier {args.memory_tier_mib} + KV {args.kv_budget_mib} + 512)")
        threads = [threading.Thread(target=client, args=(args.seed + i,), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        t_start = time.time()
        next_log, next_idle = 0, args.idle_every_minutes * 60
        idle_samples, tier_samples, scratch_samples, rest_samples = [], [], [], []
        heap_rest_samples = []  # heap in use less tier and scratch: allocations, not RSS
        while time.time() - t_start < args.minutes * 60 and server.proc.poll() is None:
            if time.time() - t_start >= next_idle:
                next_idle += args.idle_every_minutes * 60
                at = round(time.time() - t_start, 1)
                idle = idle_rss()
                if idle is not None:
                    rss, tier, scratch, heap = idle
                    idle_samples.append((at, rss))
                    if tier is not None and scratch is not None:
                        tier_samples.append((at, tier))
                        scratch_samples.append((at, scratch))
                        rest_samples.append((at, rss - tier - scratch))
                        if heap:
                            heap_rest_samples.append((at, heap - tier - scratch))
                    log(f"{at / 60:.1f} min: idle RSS {rss / MiB:.0f} MiB, memory tier "
                        f"{(tier or 0) / MiB:.0f} MiB, worker scratch {(scratch or 0) / MiB:.0f} "
                        f"MiB, heap in use {(heap or 0) / MiB:.0f} MiB")
            samples.append((round(time.time() - t_start, 1), rss_bytes(pid)))
            if time.time() - t_start >= next_log:
                next_log += 60
                log(f"{(time.time() - t_start) / 60:.1f} min: RSS {samples[-1][1] / MiB:.0f} MiB "
                    f"(max {max(r for _, r in samples) / MiB:.0f}); {json.dumps(tally.counts)}; "
                    f"{json.dumps(tally.latency())}")
            time.sleep(5)
        alive = server.proc.poll() is None
        stop.set()
        for t in threads:
            t.join(timeout=330)
        peak = max(r for _, r in samples + idle_samples)
        raw_rise, span = trend(idle_samples, args.warmup_minutes * 60)
        # The trend is judged on the idle RSS less the memory tier's bytes: the tier holds
        # contexts by design (up to its cap, inside the bound) and its fill moves with
        # evictions and deletes (the idle RSS swung by +-175 MiB around a flat middle in the
        # first idle-sampled run, 5x the 32 MiB criterion); and less the scratch the workers
        # keep between jobs (up to 128 MiB each, sized by the last jobs: with the tier alone
        # subtracted the rest still swung +-200 MiB). What a leak adds is in the rest.
        # Without those readings (no /metrics), the raw idle RSS is judged.
        rise, span = (trend(rest_samples, args.warmup_minutes * 60)
                      if len(rest_samples) == len(idle_samples) else (raw_rise, span))
        busy_rise, _ = trend(samples, args.warmup_minutes * 60)
        passed = (alive and peak <= bound and rise is not None and rise <= 32 * MiB
                  and sum(v.get("OK", 0) for v in tally.counts.values()) > 0)
        result = {
            "test": "memory-bound soak", "date": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": started_at_commit, "server_binary_mtime": binary_mtime,
            "model": os.path.basename(args.model),
            "minutes": round((time.time() - t_start) / 60, 1), "clients": args.clients,
            "model_bytes": model_bytes, "memory_tier_bytes": memory_tier,
            "kv_budget_bytes": kv_budget, "bound_bytes": bound, "peak_rss_bytes": peak,
            "idle_trend_after_warmup_bytes": rise, "idle_trend_span_s": span,
            "idle_rss_trend_after_warmup_bytes": raw_rise,
            "idle_memory_tier_samples": tier_samples,
            "idle_worker_scratch_samples": scratch_samples,
            "idle_rest_samples": rest_samples,
            "idle_heap_rest_samples": heap_rest_samples,
            "idle_heap_rest_trend_after_warmup_bytes":
                trend(heap_rest_samples, args.warmup_minutes * 60)[0],
            "busy_trend_after_warmup_bytes": busy_rise, "idle_every_minutes": args.idle_every_minutes,
            "idle_samples": idle_samples,
            "warmup_minutes": args.warmup_minutes, "server_alive": alive,
            "counts": tally.counts, "latency": tally.latency(), "samples": samples, "loadavg": bs.loadavg(), "pass": passed,
            "criterion": "RSS <= model + memory tier + KV budget + 512 MiB at every sample; a "
                         "least-squares line through the idle samples (RSS less the memory "
                         "tier's bytes and the workers' kept scratch) after the warm-up rises "
                         "<= 32 MiB",
        }
        save(args.results or os.path.join(ROOT, "bench", "results", "soak_memory.json"), result)
        # The documented plot for the documented results; beside the JSON for any other run.
        plot_memory(result, os.path.splitext(args.results)[0] + ".png" if args.results
                    else os.path.join(ROOT, "docs", "img", "soak_memory.png"))
        log(f"{'PASS' if passed else 'FAIL'}: peak {peak / MiB:.0f} MiB of {bound / MiB:.0f}; "
            f"idle trend {rise / MiB if rise is not None else float('nan'):+.1f} MiB over "
            f"{span / 60:.0f} min; {json.dumps(tally.counts)}")
        return 0 if passed else 1
    finally:
        procs.stop_all()


def plot_memory(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    t = [s[0] / 60 for s in result["samples"]]
    r = [s[1] / MiB for s in result["samples"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, r, lw=1, label="server RSS (busy)")
    if result.get("idle_samples"):
        ax.plot([s[0] / 60 for s in result["idle_samples"]],
                [s[1] / MiB for s in result["idle_samples"]], "ko", ms=4,
                label="idle RSS (clients paused)")
    if result.get("idle_rest_samples"):
        ax.plot([s[0] / 60 for s in result["idle_rest_samples"]],
                [s[1] / MiB for s in result["idle_rest_samples"]], "g^", ms=4,
                label="idle RSS less memory tier and worker scratch (judged)")
    ax.axhline(result["bound_bytes"] / MiB, color="red", ls="--",
               label="bound: model + memory tier + KV budget + 512 MiB")
    ax.axvline(result["warmup_minutes"], color="gray", ls=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, result["bound_bytes"] / MiB * 1.1)
    ax.set_title(f"memory soak, {result['model']}, {result['date'][:10]}: "
                 f"{'pass' if result['pass'] else 'FAIL'}")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


def save(path, result):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"results: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["chaos", "memory"])
    ap.add_argument("--minutes", type=float, default=None,
                    help="soak length (default 30 for chaos, 60 for memory)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--server", default=bs.DEFAULT_SERVER)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--documents", type=int, default=12, help="chaos: distinct documents")
    ap.add_argument("--max-tokens", type=int, default=12, help="chaos: answer length")
    ap.add_argument("--memory-tier-mib", type=int, default=256)
    ap.add_argument("--kv-budget-mib", type=int, default=1024)
    ap.add_argument("--warmup-minutes", type=float, default=10)
    ap.add_argument("--idle-every-minutes", type=float, default=5,
                    help="memory: pause the clients and sample the idle RSS this often")
    ap.add_argument("--results", default=None, help="JSON path (default bench/results/soak_MODE.json)")
    args = ap.parse_args()
    if args.minutes is None:
        args.minutes = 30 if args.mode == "chaos" else 60
    for path, what in ((args.model, "model (tools/fetch_model.sh)"),
                       (args.server, "server (cmake --build build)")):
        if not os.path.exists(path):
            sys.exit(f"no {what} at {path}")
    return run_chaos(args) if args.mode == "chaos" else run_memory(args)


if __name__ == "__main__":
    sys.exit(main())
