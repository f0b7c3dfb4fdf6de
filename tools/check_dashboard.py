#!/usr/bin/env python3
"""Checks that the Grafana dashboard and the Prometheus rules query only metrics ctxcache exports.

  tools/check_dashboard.py [--metrics FILE] [--dashboard JSON ...] [--rules YAML ...]

The metric list (--metrics, default deploy/metrics.txt) is either the checked-in list
(`NAME TYPE [LABELS]` per line) or a scraped /metrics page (Prometheus text exposition, read
from its `# TYPE` lines), so the same check runs against a live server:
  curl -s localhost:9464/metrics > /tmp/m.txt && tools/check_dashboard.py --metrics /tmp/m.txt

Checks, for every panel query (rows' nested panels included), template variable query and
alert/record expression:
  - every metric name it uses is a known family, or NAME_bucket / _sum / _count of a histogram;
  - rate()/irate()/increase() are only taken of counters and histogram series (not gauges);
  - histogram_quantile() is only given NAME_bucket series of a histogram;
  - every dashboard panel (other than rows) has at least one query.
Exits 1 with one line per problem, 0 with a summary otherwise.
"""
import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
HIST_SUFFIXES = ("_bucket", "_sum", "_count")
# PromQL words that are not metric names (functions are recognised by a following "(";
# aggregation operators may be followed by a by/without clause instead).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan", "atan2", "sum", "min", "max", "avg",
            "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"}
RATE_FUNCS = ("rate", "irate", "increase")


def load_metrics(path):
    """Returns {family: type} from a metrics.txt list or a scraped exposition page."""
    text = pathlib.Path(path).read_text()
    families = {}
    if re.search(r"^# TYPE ", text, re.M):
        for m in re.finditer(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)", text, re.M):
            families[m.group(1)] = m.group(2)
            # OpenMetrics names a counter family without its samples' _total suffix.
            if m.group(2) == "counter" and not m.group(1).endswith("_total"):
                families[m.group(1) + "_total"] = "counter"
        # A family may appear without a TYPE line (untyped): take the sample names too.
        for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M):
            name = m.group(1)
            if not any(name.endswith(s) and name[: -len(s)] in families for s in HIST_SUFFIXES):
                families.setdefault(name, "untyped")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) < 2 or parts[1] not in ("counter", "gauge", "histogram", "summary"):
                sys.exit(f"{path}:{n}: expected 'NAME TYPE [LABELS]', got {line!r}")
            families[parts[0]] = parts[1]
    if not families:
        sys.exit(f"{path}: no metric families found")
    return families


def strip_expr(expr):
    """Removes string literals, label matchers, range/subquery brackets, grouping clauses and
    Grafana variables, leaving metric names, function names, keywords and numbers."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    return e


def metric_names(expr):
    """(name, function applied directly to it or None) for each metric selector in expr."""
    e = strip_expr(expr)
    out = []
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", name):  # a bare duration, e.g. offset 5m
            continue
        # The innermost function whose "(" encloses this name.
        depth, func, i = 0, None, m.start() - 1
        while i >= 0:
            c = e[i]
            if c == ")":
                depth += 1
            elif c == "(":
                if depth == 0:
                    f = re.search(r"([a-zA-Z_]\w*)\s*$", e[:i])
                    func = f.group(1) if f else None
                    break
                depth -= 1
            i -= 1
        out.append((name, func))
    return out


def check_expr(expr, families, where, problems, need_metric=True):
    names = metric_names(expr)
    if need_metric and not names:
        problems.append(f"{where}: query names no metric: {expr!r}")
    for name, func in names:
        base, kind = name, families.get(name)
        if kind is None:
            for s in HIST_SUFFIXES:
                if name.endswith(s) and families.get(name[: -len(s)]) in ("histogram", "summary"):
                    base, kind = name[: -len(s)], "histogram-series"
                    break
        if kind is None:
            problems.append(f"{where}: unknown metric {name!r}")
            continue
        if func in RATE_FUNCS and kind == "gauge":
            problems.append(f"{where}: {func}() of gauge {name!r}")
    # histogram_quantile(q, ... NAME_bucket ...): every metric inside must be a _bucket series.
    for m in re.finditer(r"histogram_quantile\s*\(", expr):
        depth, j = 1, m.end()
        while j < len(expr) and depth:
            depth += {"(": 1, ")": -1}.get(expr[j], 0)
            j += 1
        for name, _ in metric_names(expr[m.end(): j - 1]):
            if not (name.endswith("_bucket") and
                    families.get(name[: -len("_bucket")]) == "histogram"):
                problems.append(f"{where}: histogram_quantile over {name!r}, not a histogram's "
                                "_bucket series")


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_dashboard(path, families, problems):
    try:
        dash = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        problems.append(f"{path}: not valid JSON: {e}")
        return 0
    n = 0
    for p in walk_panels(dash.get("panels", [])):
        if p.get("type") == "row":
            continue
        where = f"{path}: panel {p.get('title', p.get('id'))!r}"
        targets = [t for t in p.get("targets", []) if t.get("expr")]
        if not targets:
            problems.append(f"{where}: no query")
        for t in targets:
            check_expr(t["expr"], families, f"{where} {t.get('refId', '')}", problems)
            n += 1
    for v in dash.get("templating", {}).get("list", []):
        query = v.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if v.get("type") != "query" or not query:
            continue
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        check_expr(m.group(1) if m else query, families,
                   f"{path}: variable {v.get('name')!r}", problems)
        n += 1
    return n


def check_rules(path, families, problems):
    import yaml  # only needed for rule files
    try:
        doc = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: not valid YAML: {e}")
        return 0
    n = 0
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            check_expr(r.get("expr", ""), families, f"{path}: rule {name!r}", problems)
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", default=str(ROOT / "deploy/metrics.txt"),
                    help="deploy/metrics.txt-style list or a scraped /metrics page")
    ap.add_argument("--dashboard", action="append",
                    help="Grafana dashboard JSON (default deploy/grafana/*.json)")
    ap.add_argument("--rules", action="append",
                    help="Prometheus rule file (default deploy/prometheus/rules.yml)")
    ap.add_argument("--absent-ok", action="append", default=[], metavar="NAME",
                    help="a family deploy/metrics.txt lists that the scraped server does not "
                         "export in its configuration (e.g. the TLS certificate's expiry on a "
                         "plaintext server): taken from the list instead")
    args = ap.parse_args()
    families = load_metrics(args.metrics)
    listed = load_metrics(ROOT / "deploy/metrics.txt")
    for name in args.absent_ok:
        if name not in listed:
            sys.exit(f"--absent-ok {name}: not in deploy/metrics.txt")
        families.setdefault(name, listed[name])
    dashboards = args.dashboard or sorted(str(p) for p in (ROOT / "deploy/grafana").glob("*.json"))
    rules = args.rules if args.rules is not None else [str(ROOT / "deploy/prometheus/rules.yml")]
    problems = []
    n_queries = sum(check_dashboard(d, families, problems) for d in dashboards)
    n_rules = sum(check_rules(r, families, problems) for r in rules)
    for p in problems:
        print(p)
    if problems:
        print(f"check_dashboard: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_dashboard: ok: {n_queries} dashboard queries in {len(dashboards)} dashboard(s) "
          f"and {n_rules} rules use only the {len(families)} families of {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
