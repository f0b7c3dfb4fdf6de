#!/usr/bin/env python3
"""A scripted run against a live ctxcache-server, scraped like Prometheus would, then checked
against the Grafana dashboard and drawn as its preview.

  tools/dashboard_demo.py --build build --out DIR [--seconds 60] [--interval 2] [--clients 2]
                          [--png FILE] [--no-redis] [--check]

1. Starts redis-server (unless --no-redis) and ctxcache-server with /metrics, two tenants
   (bearer tokens) and a small memory tier, so that contexts get evicted and come back from
   Redis the way they do on a busy replica.
2. Clients loop for --seconds over a pool of documents with `ctxcache --server`: compress one
   (method and ratio drawn from a fixed seed), then ask it one or two questions.
   Repeated documents are cache hits; new ones are compressed.
3. A scraper GETs /metrics every --interval seconds into DIR/scrapes/<unix time>.
4. Then: `tools/check_dashboard.py --metrics` the last scrape (every panel query names only
   metrics this live server exports), and `tools/render_dashboard_preview.py` over the scrapes
   (DIR/panels.json, and the PNG with --png).
With --check it fails (exit 1) unless every scripted call succeeded, the dashboard check
passed, every preview panel has data, and the PNG was written. Exit 77: a needed program
(the model, redis-server, matplotlib) is missing and CTXCACHE_REQUIRE_MODEL is not set.
"""
import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
SKIP = 77

PLACES = ["Harbor Street", "Quay Road", "Mill Lane", "North Gate", "Aska Bridge", "Elm Court"]
NAMES = ["Margaret Olsen", "Tomas Reyes", "Elias Brandt", "Ines Duarte", "Pavel Novak",
         "Amara Osei", "Lena Fischer", "Kenji Mori"]
THINGS = ["library", "museum", "observatory", "boat yard", "school", "market hall"]
METHODS = [("kvzip", 2), ("kvzip", 4), ("snapkv", 4), ("snapkv", 8), ("finch", 4),
           ("streaming", 8), ("expected_attention", 2), ("anchor", 4)]


def document(i):
    """A few hundred tokens of small facts; document i is always the same text."""
    r = random.Random(i)
    thing, place = r.choice(THINGS), r.choice(PLACES)
    facts = [f"Document {i}: notes on the {thing} on {place}."]
    for _ in range(r.randint(6, 14)):
        who, year, n = r.choice(NAMES), r.randint(1850, 2020), r.randint(2, 9000)
        facts.append(r.choice([
            f"In {year}, {who} donated {n} books to the {thing}.",
            f"The {thing} is open from nine until {r.randint(4, 8)} in the evening, except on "
            f"public holidays, and {who} holds the keys.",
            f"{who} measured the main hall at {n} square metres in {year}.",
            f"The access code for the archive room is {r.randint(1000000, 9999999)}.",
            f"A storm in {year} damaged the roof; repairs cost {n} crowns and took "
            f"{r.randint(2, 30)} weeks.",
        ]))
    return " ".join(facts)


QUESTIONS = ["Who holds the keys?", "What is the access code for the archive room?",
             "When was the roof damaged?", "How many books were donated?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {seconds} s waiting for {what}")


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Scraper(threading.Thread):
    def __init__(self, url, folder, interval):
        super().__init__(daemon=True)
        self.url, self.folder, self.interval = url, folder, interval
        self.stop = threading.Event()
        self.count, self.errors = 0, 0

    def scrape(self):
        t = time.time()
        try:
            text = fetch(self.url)
        except OSError as e:
            self.errors += 1
            print(f"scrape failed: {e}", file=sys.stderr)
            return None
        path = os.path.join(self.folder, f"{t:.3f}")
        with open(path, "w") as f:
            f.write(text)
        self.count += 1
        return path

    def run(self):
        while not self.stop.is_set():
            self.scrape()
            self.stop.wait(self.interval)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="CMake build folder")
    ap.add_argument("--out", required=True, help="folder for scrapes/, panels.json and logs")
    ap.add_argument("--seconds", type=float, default=60, help="how long the clients run")
    ap.add_argument("--interval", type=float, default=2, help="seconds between scrapes")
    ap.add_argument("--clients", type=int, default=2, help="concurrent client loops")
    ap.add_argument("--png", help="write the dashboard preview here (needs matplotlib)")
    ap.add_argument("--no-redis", action="store_true", help="memory tier only")
    ap.add_argument("--check", action="store_true", help="fail unless everything worked")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    require = os.environ.get("CTXCACHE_REQUIRE_MODEL") == "1"

    def missing(what):
        print(f"dashboard_demo: {what}", file=sys.stderr)
        return 1 if require else SKIP

    server_bin = os.path.join(args.build, "server", "ctxcache-server")
    cli_bin = os.path.join(args.build, "server", "ctxcache")
    for b in (server_bin, cli_bin):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} not found: build first (cmake --build {args.build})")
    if not os.path.exists(MODEL):
        return missing(f"{MODEL} not found (tools/setup.sh fetches it)")
    redis_bin = None if args.no_redis else shutil.which("redis-server")
    if not args.no_redis and redis_bin is None:
        return missing("redis-server not found (tools/setup.sh installs it); or pass --no-redis")
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return missing("matplotlib not importable (tools/setup.sh installs python3-matplotlib)")

    os.makedirs(args.out, exist_ok=True)
    scrapes = os.path.join(args.out, "scrapes")
    shutil.rmtree(scrapes, ignore_errors=True)
    os.makedirs(scrapes)
    work = tempfile.mkdtemp(prefix="ctxcache-demo-")
    procs = []
    failures = []
    try:
        redis_url = ""
        if redis_bin:
            rport = free_port()
            procs.append(subprocess.Popen(
                [redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", work],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            redis_url = f"redis://127.0.0.1:{rport}"

            def redis_up():
                try:
                    with socket.create_connection(("127.0.0.1", rport), timeout=0.5):
                        return True
                except OSError:
                    return False
            wait_for(redis_up, 20, "redis-server")

        tokens = {"token-alpha": "alpha", "token-beta": "beta"}
        token_file = os.path.join(work, "tokens.txt")
        with open(token_file, "w") as f:
            f.writelines(f"{t} {tenant}\n" for t, tenant in tokens.items())
        gport, mport = free_port(), free_port()
        address = f"127.0.0.1:{gport}"
        cmd = [server_bin, "--listen", address, "--metrics-listen", f"127.0.0.1:{mport}",
               "--model", MODEL, "--auth-tokens", token_file,
               # Small enough that contexts are evicted and come back from Redis.
               "--memory-cache-bytes", "6MiB" if redis_url else "64MiB"]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        server_log = open(os.path.join(args.out, "server.log"), "w")
        server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT)
        procs.append(server)
        metrics_url = f"http://127.0.0.1:{mport}/metrics"

        def info_ok():
            if server.poll() is not None:
                raise RuntimeError(f"ctxcache-server exited ({server.returncode}); see "
                                   f"{args.out}/server.log")
            r = subprocess.run([cli_bin, "info", "--server", address, "--token", "token-alpha"],
                               capture_output=True)
            return r.returncode == 0
        wait_for(info_ok, 120, "ctxcache-server to load the model")

        scraper = Scraper(metrics_url, scrapes, args.interval)
        scraper.start()
        time.sleep(2 * args.interval)  # a quiet baseline before the load

        docs = []
        for i in range(12):
            path = os.path.join(work, f"doc{i}.txt")
            with open(path, "w") as f:
                f.write(document(i))
            docs.append(path)
        stats = {"compress": 0, "generate": 0, "failed": 0}
        lock = threading.Lock()
        end = time.time() + args.seconds

        def call(argv):
            r = subprocess.run([cli_bin] + argv + ["--server", address], capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                with lock:
                    stats["failed"] += 1
                    failures.append(f"ctxcache {' '.join(argv[:1])} failed: {r.stderr.strip()}")
                return None
            return r.stdout

        def client(k):
            rng = random.Random(args.seed * 100 + k)
            while time.time() < end:
                token = rng.choice(list(tokens))
                # A skewed pool: a few documents are asked about often (hits), the rest rarely.
                doc = docs[min(int(rng.expovariate(0.35)), len(docs) - 1)]
                method, ratio = rng.choice(METHODS)
                extra = ["--question", rng.choice(QUESTIONS)] if method in ("finch", "snapkv") \
                    else []
                out = call(["compress", "--doc", doc, "--method", method, "--ratio", str(ratio),
                            "--json", "--token", token] + extra)
                if out is None:
                    continue
                cid = json.loads(out)["context_id"]
                with lock:
                    stats["compress"] += 1
                for _ in range(rng.randint(1, 2)):
                    if call(["generate", "--context", cid, "--prompt", rng.choice(QUESTIONS),
                             "--max-tokens", str(rng.randint(6, 16)), "--token", token,
                             "--quiet"]) is not None:
                        with lock:
                            stats["generate"] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        # Progress: one rewritten line on a terminal, a line every 10 s in a log.
        tty, ticks = sys.stderr.isatty(), 0
        while any(t.is_alive() for t in threads):
            left = max(0, end - time.time())
            with lock:
                line = (f"dashboard_demo: {stats['compress']} compress, {stats['generate']} "
                        f"generate, {stats['failed']} failed, {scraper.count} scrapes, "
                        f"{left:4.0f} s left")
            if tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            elif ticks % 10 == 0:
                print(line, file=sys.stderr, flush=True)
            ticks += 1
            time.sleep(1)
        if tty:
            print(file=sys.stderr)
        time.sleep(2 * args.interval)  # the tail after the load
        scraper.stop.set()
        scraper.join()
        last = scraper.scrape()
        print(f"dashboard_demo: {stats['compress']} compress and {stats['generate']} generate "
              f"calls, {stats['failed']} failed; {scraper.count} scrapes of {metrics_url}")
        if stats["compress"] == 0 or stats["generate"] == 0:
            failures.append("no successful compress or generate call")
        if last is None:
            failures.append("the final scrape failed")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)

    # The dashboard and the rules against what this live server exported.
    # The certificate's expiry is only exported with TLS, which this run does not use.
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_dashboard.py"),
                        "--metrics", last, "--absent-ok",
                        "ctxcache_tls_certificate_expiry_timestamp_seconds"],
                       capture_output=True, text=True)
    print(r.stdout.strip() or r.stderr.strip())
    if r.returncode != 0:
        failures.append(f"check_dashboard.py against the live /metrics failed:\n{r.stdout}"
                        f"{r.stderr}")
    panels_json = os.path.join(args.out, "panels.json")
    argv = [sys.executable, os.path.join(ROOT, "tools", "render_dashboard_preview.py"),
            "--scrapes", scrapes, "--json", panels_json,
            "--title", f"ctxcache dashboard preview: a {args.seconds:.0f} s scripted run, "
                       f"{args.clients} clients (tools/dashboard_demo.py)"]
    if args.png:
        argv += ["--out", args.png]
    r = subprocess.run(argv, capture_output=True, text=True)
    print(r.stdout.strip())
    if r.returncode != 0:
        failures.append(f"render_dashboard_preview.py failed: {r.stderr}")
    else:
        with open(panels_json) as f:
            panels = json.load(f)["panels"]
        for title, panel in panels.items():
            values = [v for line in panel["lines"].values() for _, v in line if v is not None]
            nonzero = [v for v in values if v != 0]
            print(f"  {title:36s} {len(panel['lines'])} series, {len(values)} points, "
                  f"{len(nonzero)} non-zero")
            # Redis errors are zero on a healthy run: a zero line is data; no line is not.
            if not values:
                failures.append(f"panel '{title}' has no data")
            elif not nonzero and "error" not in title.lower():
                failures.append(f"panel '{title}' is all zeros")
        if args.png and (not os.path.exists(args.png) or os.path.getsize(args.png) < 10_000):
            failures.append(f"{args.png} was not written (or is implausibly small)")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
