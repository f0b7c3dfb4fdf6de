#!/usr/bin/env python3
"""Tests tools/render_dashboard_preview.py on synthetic /metrics scrapes (run by
tests/deploy_test.sh; everything is written to a temporary folder).

  deploy_preview_test.py REPO_ROOT [--require-matplotlib]

1. Known answers: constant rates (one through a counter reset), bucket-interpolated
   quantiles and mean = rate(_sum)/rate(_count), computed by hand.
2. The Prometheus engine agrees: the same scrapes become promtool input series, and
   `promtool test rules` checks that Prometheus evaluates the panels' expressions to the
   script's numbers (including extrapolation at a series' start).
3. The PNG is drawn (when matplotlib is importable; required with --require-matplotlib).
"""
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(sys.argv[1])
REQUIRE_MPL = "--require-matplotlib" in sys.argv
SCRIPT = os.path.join(ROOT, "tools", "render_dashboard_preview.py")
T0, STEP, N = 1_700_000_000, 15, 41
MI = 2**20
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def close(a, b, rel=1e-9):
    return a is not None and b is not None and abs(a - b) <= rel * max(1.0, abs(b))


def scrape(i):
    """The /metrics text at scrape i (time T0 + 15 i)."""
    lines = []

    def s(name, value, **labels):
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    lines.append("# TYPE ctxcache_generated_tokens_total counter")
    # 30 tokens/s; the process restarts between scrapes 19 and 20.
    s("ctxcache_generated_tokens_total", 1000 + 450 * i if i < 20 else 450 * (i - 19))
    lines.append("# TYPE ctxcache_kv_bytes_saved_per_request histogram")
    # Every 15 s: 10 requests, 2 saving <= 1 MiB, 6 in (1, 2] MiB, 2 in (2, 4] MiB; 15 MiB.
    for le, per in ((MI, 2), (2 * MI, 8), (4 * MI, 10), ("+Inf", 10)):
        s("ctxcache_kv_bytes_saved_per_request_bucket", 100 + per * i, le=le)
    s("ctxcache_kv_bytes_saved_per_request_sum", 15 * MI * i)
    s("ctxcache_kv_bytes_saved_per_request_count", 100 + 10 * i)
    lines.append("# TYPE ctxcache_ttft_seconds histogram")
    for le, per in ((0.1, 0), (0.25, 3), (0.5, 9), (1.0, 10), ("+Inf", 10)):
        s("ctxcache_ttft_seconds_bucket", per * i, le=le)
    lines.append("# TYPE ctxcache_cache_lookups_total counter")
    s("ctxcache_cache_lookups_total", 45 * i, tier="memory", result="hit")
    s("ctxcache_cache_lookups_total", 15 * i, tier="memory", result="miss")
    s("ctxcache_cache_lookups_total", 15 * i, tier="redis", result="hit")
    s("ctxcache_cache_lookups_total", 15 * i, tier="redis", result="miss")
    s("ctxcache_queue_depth", i % 5)
    s("ctxcache_running_requests", 2)
    s("ctxcache_workers", 2, instance="a")
    s("ctxcache_worker_busy_seconds_total", 22.5 * i, instance="a")
    # A tenant whose series appears at scrape 10 (extrapolation toward zero at its start).
    if i >= 10:
        s("ctxcache_tenant_kv_bytes_saved_total", 5 * MI + MI * (i - 10) * 15, tenant="acme")
    s("ctxcache_tenant_kv_bytes_saved_total", 2 * MI * i * 15, tenant="globex")
    for method, ratio_bucket in (("kvzip", 4), ("snapkv", 8)):
        for le in (2, 4, 8, 16, "+Inf"):
            per = 3 if le == "+Inf" or le >= ratio_bucket else 0
            s("ctxcache_compression_ratio_bucket", per * i, method=method, le=le)
    s('ctxcache_redis_errors_total', 0.5 * i * 15, op="get")
    return "\n".join(lines) + "\n"


with tempfile.TemporaryDirectory(prefix="ctxcache-preview-") as tmp:
    scrapes = os.path.join(tmp, "scrapes")
    os.mkdir(scrapes)
    texts = {}
    for i in range(N):
        texts[i] = scrape(i)
        with open(os.path.join(scrapes, str(T0 + STEP * i)), "w") as f:
            f.write(texts[i])
    out_json = os.path.join(tmp, "series.json")
    have_mpl = subprocess.run([sys.executable, "-c", "import matplotlib"],
                              capture_output=True).returncode == 0
    png = os.path.join(tmp, "preview.png")
    cmd = [sys.executable, SCRIPT, "--scrapes", scrapes, "--json", out_json]
    if have_mpl:
        cmd += ["--out", png]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout + r.stderr, end="")
    check(r.returncode == 0, "render_dashboard_preview.py exits 0")
    panels = json.load(open(out_json))["panels"]

    def at(title, legend, i):
        for t, v in panels[title]["lines"].get(legend, []):
            if t == T0 + STEP * i:
                return v
        return None

    # --- 1. known answers (window 60 s = 4 scrapes) ---------------------------------------
    for i in (10, 25, 40):
        check(close(at("Generated tokens/s", "tokens/s", i), 30.0), f"tokens/s = 30 at scrape {i}")
    check(close(at("Generated tokens/s", "tokens/s", 21), 30.0),
          "tokens/s = 30 across the counter reset")
    check(close(at("KV memory saved per request", "p50", 30), 1.5 * MI), "saved p50 = 1.5 MiB")
    check(close(at("KV memory saved per request", "p95", 30), 3.5 * MI), "saved p95 = 3.5 MiB")
    check(close(at("KV memory saved per request", "mean", 30), 1.5 * MI),
          "saved mean = rate(_sum)/rate(_count) = 1.5 MiB")
    check(close(at("Time to first token", "p50", 30), 0.25 + 0.25 * (5 - 3) / 6),
          "TTFT p50 interpolated in (0.25, 0.5]")
    check(close(at("Time to first token", "p95", 30), 0.5 + 0.5 * 0.5), "TTFT p95 in (0.5, 1]")
    check(close(at("Cache hit rate by tier", "memory", 30), 0.75), "memory hit rate 0.75")
    check(close(at("Cache hit rate by tier", "redis", 30), 0.5), "redis hit rate 0.5")
    check(close(at("Worker utilization", "a", 30), 0.75), "worker utilization 0.75")
    check(close(at("Compression ratio (p50 by method)", "kvzip", 30), 3.0), "kvzip p50 ratio 3")
    check(close(at("Compression ratio (p50 by method)", "snapkv", 30), 6.0), "snapkv p50 ratio 6")
    check(at("Queue depth and running", "queued", 12) == 2, "queue depth = last sample")
    check(close(at("KV bytes saved per tenant", "globex", 30), 2 * MI), "globex 2 MiB/s")
    check(close(at("Redis errors/s by op", "get", 30), 0.5), "redis get errors 0.5/s")

    # --- 2. Prometheus evaluates the same expressions to the same numbers -------------------
    series = {}
    for i in range(N):
        for line in texts[i].splitlines():
            if line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            series.setdefault(name_labels, ["_"] * N)[i] = value
    inputs = "\n".join(f"      - series: '{k}'\n        values: '{' '.join(v)}'"
                       for k, v in series.items())
    groups = []
    n_exprs = 0
    for i in (11, 12, 21, 30):  # 11, 12: the acme series started at scrape 10
        exprs = []
        t = T0 + STEP * i
        cases = [
            ("sum(rate(ctxcache_generated_tokens_total[1m]))", "Generated tokens/s", "tokens/s",
             "{}"),
            ("histogram_quantile(0.95, sum by (le) "
             "(rate(ctxcache_kv_bytes_saved_per_request_bucket[1m])))",
             "KV memory saved per request", "p95", "{}"),
            ("histogram_quantile(0.5, sum by (le) (rate(ctxcache_ttft_seconds_bucket[1m])))",
             "Time to first token", "p50", "{}"),
            ("sum by (tenant) (rate(ctxcache_tenant_kv_bytes_saved_total{tenant=\"acme\"}[1m]))",
             "KV bytes saved per tenant", "acme", '{tenant="acme"}'),
        ]
        for expr, title, legend, labels in cases:
            v = at(title, legend, i)
            if v is None:
                check(False, f"{title}/{legend} has a value at scrape {i}")
                continue
            # round(x, 0.001) on both sides, the same way (Prometheus: floor(x * 1/to + 0.5) /
            # (1/to)), so that the last-bit differences of summing in another order vanish.
            inv = 1.0 / 0.001
            exp = math.floor(v * inv + 0.5) / inv
            exprs.append(f"      - expr: 'round({expr}, 0.001)'\n        eval_time: {STEP * i}s\n"
                         f"        exp_samples:\n          - labels: '{labels}'\n"
                         f"            value: {exp!r}")
        n_exprs += len(exprs)
        # One test group per evaluation time: promtool loads the series afresh for each.
        groups.append(f"  - interval: {STEP}s\n    input_series:\n{inputs}\n"
                      "    promql_expr_test:\n" + "\n".join(exprs) + "\n")
    test_file = os.path.join(tmp, "preview_promql_test.yml")
    with open(test_file, "w") as f:
        # promtool loads input series in steps of evaluation_interval: one scrape interval, so
        # every sample up to each eval_time is there.
        f.write(f"evaluation_interval: {STEP}s\ntests:\n" + "".join(groups))
    r = subprocess.run(["promtool", "test", "rules", test_file], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:] + r.stderr[-4000:])
    check(r.returncode == 0,
          f"promtool evaluates {n_exprs} panel expressions to the script's numbers")

    # --- 3. the PNG ---------------------------------------------------------------------------
    if have_mpl:
        with open(png, "rb") as f:
            head = f.read(8)
        check(head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 20000,
              f"PNG drawn ({os.path.getsize(png)} bytes, in a temporary folder)")
    elif REQUIRE_MPL:
        check(False, "matplotlib is importable (required)")
    else:
        print("skip PNG: matplotlib is not installed (tools/setup.sh --dev installs it)")

print(f"deploy_preview_test: {len(failures)} failure(s)")
sys.exit(1 if failures else 0)
