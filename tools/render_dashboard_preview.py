#!/usr/bin/env python3
"""Renders a PNG preview of the main ctxcache dashboard panels from scraped /metrics pages.

  tools/render_dashboard_preview.py --scrapes DIR --out preview.png [--json series.json]
                                    [--window SECONDS] [--title TEXT]

DIR holds one file per scrape of ctxcache-server's /metrics, named by the scrape's unix time
(`1760000000`, `1760000000.5`, optionally with a .txt/.prom suffix), for instance:
  while sleep 5; do curl -s localhost:9464/metrics > scrapes/$(date +%s); done

Each panel is computed as Grafana's query for it (deploy/grafana/ctxcache.json) would be by
Prometheus: rate() with Prometheus' extrapolation over a window (default: 4 scrape
intervals, as Grafana's $__rate_interval), sum by the panel's labels, and histogram_quantile()
with Prometheus' linear interpolation inside buckets. --json writes the computed series (the
PNG needs matplotlib; the numbers do not).
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict

# ---------------------------------------------------------------------------------------------
# Exposition parsing

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:\\.|[^"\\])*)"\s*,?')


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse_exposition(text):
    """{(name, ((label, value), ...)): float} from Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"not a sample line: {line!r}")
        name, labels_text, value = m.group(1), m.group(3) or "", m.group(4)
        labels, pos = [], 0
        while pos < len(labels_text):
            lm = _LABEL.match(labels_text, pos)
            if not lm:
                raise ValueError(f"bad labels in {line!r}")
            labels.append((lm.group(1), _unescape(lm.group(2))))
            pos = lm.end()
        out[(name, tuple(sorted(labels)))] = float(value)
    return out


def load_scrapes(directory):
    """[(unix time, samples)] sorted by time, from files named by unix time."""
    scrapes = []
    for fname in os.listdir(directory):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:\.txt|\.prom)?", fname)
        if not m:
            continue
        with open(os.path.join(directory, fname)) as f:
            scrapes.append((float(m.group(1)), parse_exposition(f.read())))
    scrapes.sort(key=lambda s: s[0])
    return scrapes


# ---------------------------------------------------------------------------------------------
# PromQL, the Prometheus way

def extrapolated_rate(points, range_start, range_end, is_counter=True, is_rate=True):
    """Prometheus' extrapolatedRate (promql/functions.go) over [(t, v)] inside the range."""
    if len(points) < 2:
        return None
    first_t, first_v = points[0]
    last_t, last_v = points[-1]
    result = last_v - first_v
    if is_counter:
        prev = first_v
        for _, v in points[1:]:
            if v < prev:
                result += prev  # counter reset
            prev = v
    duration_to_start = first_t - range_start
    duration_to_end = range_end - last_t
    sampled = last_t - first_t
    if sampled <= 0:
        return None
    avg_between = sampled / (len(points) - 1)
    if is_counter and result > 0 and first_v >= 0:
        duration_to_zero = sampled * (first_v / result)
        if duration_to_zero < duration_to_start:
            duration_to_start = duration_to_zero
    threshold = avg_between * 1.1
    extrapolate_to = sampled
    extrapolate_to += duration_to_start if duration_to_start < threshold else avg_between / 2
    extrapolate_to += duration_to_end if duration_to_end < threshold else avg_between / 2
    result *= extrapolate_to / sampled
    if is_rate:
        result /= range_end - range_start
    return result


def bucket_quantile(q, buckets):
    """Prometheus' bucketQuantile: buckets is [(upper bound, cumulative count)]."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    # Coalesce equal bounds, then make the counts monotonic (ensureMonotonic).
    merged = []
    for ub, c in buckets:
        if merged and merged[-1][0] == ub:
            merged[-1] = (ub, merged[-1][1] + c)
        else:
            merged.append((ub, c))
    mono, top = [], -math.inf
    for ub, c in merged:
        top = max(top, c)
        mono.append((ub, top))
    buckets = mono
    observations = buckets[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start = buckets[b - 1][0]
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * (rank / count)


class Series:
    """The scrapes as time series, with the PromQL building blocks the panels need."""

    def __init__(self, scrapes, window):
        self.times = [t for t, _ in scrapes]
        self.window = window
        self.data = defaultdict(list)  # (name, labels) -> [(t, v)]
        for t, samples in scrapes:
            for key, v in samples.items():
                self.data[key].append((t, v))

    def rate(self, name, t, match=None):
        """{labels: rate} of every series of `name` (matching `match`) at time t."""
        out = {}
        for (n, labels), points in self.data.items():
            if n != name or (match and not all(dict(labels).get(k) == v
                                               for k, v in match.items())):
                continue
            # [t - window, t], closed as in Prometheus 2.x (3.x leaves the start out).
            inside = [(pt, v) for pt, v in points if t - self.window <= pt <= t]
            r = extrapolated_rate(inside, t - self.window, t)
            if r is not None:
                out[labels] = r
        return out

    def instant(self, name, t, match=None):
        """{labels: latest value at or before t (within 5 minutes, as Prometheus looks back)}."""
        out = {}
        for (n, labels), points in self.data.items():
            if n != name or (match and not all(dict(labels).get(k) == v
                                               for k, v in match.items())):
                continue
            before = [v for pt, v in points if t - 300 < pt <= t]
            if before:
                out[labels] = before[-1]
        return out

    @staticmethod
    def sum_by(values, by=()):
        out = defaultdict(float)
        for labels, v in values.items():
            d = dict(labels)
            out[tuple((k, d.get(k, "")) for k in by)] += v
        return dict(out)

    def histogram_quantile(self, q, name, t, by=()):
        """histogram_quantile(q, sum by (le, BY) (rate(NAME_bucket[window])))."""
        rates = self.sum_by(self.rate(name + "_bucket", t), tuple(by) + ("le",))
        groups = defaultdict(list)
        for key, v in rates.items():
            d = dict(key)
            le = float(d.pop("le"))
            groups[tuple((k, d[k]) for k in by)].append((le, v))
        return {k: bucket_quantile(q, b) for k, b in groups.items()}

    def ratio(self, num, den):
        return {k: num[k] / den[k] for k in num if k in den and den[k] != 0}


def _key(group):
    return " ".join(v for _, v in group) or "all"


def compute_panels(series, times):
    """{panel title: {"unit": ..., "lines": {legend: [[t, value or None], ...]}}}."""
    panels = {}

    def add(title, unit, t, values):
        lines = panels.setdefault(title, {"unit": unit, "lines": {}})["lines"]
        for legend, v in values.items():
            ok = v is not None and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))
            lines.setdefault(legend, []).append([t, v if ok else None])

    s = series
    for t in times:
        saved = "ctxcache_kv_bytes_saved_per_request"
        mean = s.ratio(s.sum_by(s.rate(saved + "_sum", t)), s.sum_by(s.rate(saved + "_count", t)))
        add("KV memory saved per request", "bytes", t, {
            "p50": s.histogram_quantile(0.5, saved, t).get((), None),
            "p95": s.histogram_quantile(0.95, saved, t).get((), None),
            "mean": mean.get((), None)})
        add("Compression ratio (p50 by method)", "x", t, {
            _key(k): v for k, v in
            s.histogram_quantile(0.5, "ctxcache_compression_ratio", t, ("method",)).items()})
        hits = s.sum_by(s.rate("ctxcache_cache_lookups_total", t, {"result": "hit"}), ("tier",))
        lookups = s.sum_by(s.rate("ctxcache_cache_lookups_total", t), ("tier",))
        add("Cache hit rate by tier", "ratio", t,
            {_key(k): hits.get(k, 0.0) / v for k, v in lookups.items() if v > 0})
        add("Time to first token", "s", t, {
            "p50": s.histogram_quantile(0.5, "ctxcache_ttft_seconds", t).get((), None),
            "p95": s.histogram_quantile(0.95, "ctxcache_ttft_seconds", t).get((), None)})
        add("Generated tokens/s", "tokens/s", t,
            {"tokens/s": s.sum_by(s.rate("ctxcache_generated_tokens_total", t)).get((), None)})
        add("Queue depth and running", "requests", t, {
            "queued": s.sum_by(s.instant("ctxcache_queue_depth", t)).get((), None),
            "running": s.sum_by(s.instant("ctxcache_running_requests", t)).get((), None)})
        busy = s.sum_by(s.rate("ctxcache_worker_busy_seconds_total", t), ("instance",))
        workers = s.sum_by(s.instant("ctxcache_workers", t), ("instance",))
        add("Worker utilization", "ratio", t,
            {_key(k): v for k, v in s.ratio(busy, workers).items()})
        add("Redis errors/s by op", "errors/s", t, {
            _key(k): v for k, v in
            s.sum_by(s.rate("ctxcache_redis_errors_total", t), ("op",)).items()})
        add("KV bytes saved per tenant", "bytes/s", t, {
            _key(k): v for k, v in
            s.sum_by(s.rate("ctxcache_tenant_kv_bytes_saved_total", t), ("tenant",)).items()})
    return panels


def draw(panels, out, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 3.4), squeeze=False)
    t0 = min((p[0] for pan in panels.values() for line in pan["lines"].values() for p in line),
             default=0)
    for ax, name in zip(axes.flat, names):
        pan = panels[name]
        scale, unit = 1.0, pan["unit"]
        if unit == "bytes":
            scale, unit = 1 / 2**20, "MiB"
        elif unit == "bytes/s":
            scale, unit = 1 / 2**20, "MiB/s"
        for legend, points in sorted(pan["lines"].items()):
            xs = [(t - t0) / 60 for t, v in points]
            ys = [v * scale if v is not None else math.nan for t, v in points]
            ax.plot(xs, ys, label=legend, linewidth=1.6)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if pan["lines"]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scrapes", required=True, help="folder of /metrics files named by unix time")
    ap.add_argument("--out", help="PNG to write (needs matplotlib)")
    ap.add_argument("--json", help="write the computed panel series here")
    ap.add_argument("--window", type=float,
                    help="rate window in seconds (default: 4 median scrape intervals)")
    ap.add_argument("--title", default="ctxcache dashboard preview (from scraped /metrics)")
    args = ap.parse_args()
    if not args.out and not args.json:
        ap.error("nothing to do: give --out and/or --json")
    scrapes = load_scrapes(args.scrapes)
    if len(scrapes) < 2:
        sys.exit(f"{args.scrapes}: need at least 2 scrapes named by unix time, found {len(scrapes)}")
    times = [t for t, _ in scrapes]
    step = statistics.median(b - a for a, b in zip(times, times[1:]))
    window = args.window or 4 * step
    series = Series(scrapes, window)
    panels = compute_panels(series, times[1:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"window_seconds": window, "panels": panels}, f, indent=1)
    if args.out:
        draw(panels, args.out, args.title)
    print(f"render_dashboard_preview: {len(scrapes)} scrapes, rate window {window:g} s, "
          f"{len(panels)} panels" + (f" -> {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
