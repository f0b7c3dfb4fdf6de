#!/usr/bin/env python3
"""Aggregates ctxcache-eval's raw lines into eval/results/quality.json, plots score and KL vs
compression ratio per method, and prints the Markdown tables of docs/quality.md.

  eval/report.py --raw eval/work/raw.jsonl --out eval/results/quality.json \
                 --plot docs/img/quality.png --doc docs/quality.md

quality.json is a list of {"task", "length", "method", "ratio", "n", "score", "full_score",
"kl", "kept_tokens", "kv_bytes"} (means over the n samples of that cell; ratio is the
compression factor, 8 = 1/8 kept; kept_tokens is per (layer, KV head); kv_bytes at fp16),
plus "ll", "full_ll" (teacher-forced log-likelihood of the reference answer) and
"full_kv_bytes". Decoding with Recycled Attention over the full context is reported
separately in the same file's sibling recycled.json. Rows of other head budgets than
"uniform" (ctxcache-eval --head-budget) are left out: these tables are the uniform budgets'.
"""
import argparse
import collections
import json
import os
import sys

BEGIN, END = "<!-- BEGIN quality-tables (eval/report.py) -->", "<!-- END quality-tables -->"
METHODS = ("streaming", "snapkv", "finch", "expected_attention", "kvzip", "anchor")


def load(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"skipping a damaged line in {path}", file=sys.stderr)
    return rows


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate(rows):
    cells = collections.defaultdict(list)
    for r in rows:
        if r.get("decode") == "recycled" or r.get("head_budget", "uniform") != "uniform":
            continue
        cells[(r["task"], r["length"], r["method"], r["ratio"])].append(r)
    out = []
    for (task, length, method, ratio), rs in sorted(
            cells.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]), kv[0][3])):
        out.append({
            "task": task, "length": length, "method": method, "ratio": ratio, "n": len(rs),
            "score": round(mean(r["score"] for r in rs), 4),
            "full_score": round(mean(r["full_score"] for r in rs), 4),
            "kl": round(mean(r["kl"] for r in rs), 4),
            "kept_tokens": round(mean(r["kept_tokens"] for r in rs), 1),
            "kv_bytes": round(mean(r["kv_bytes"] for r in rs)),
            "full_kv_bytes": round(mean(r["full_kv_bytes"] for r in rs)),
            "ll": round(mean(r["ll"] for r in rs), 3),
            "full_ll": round(mean(r["full_ll"] for r in rs), 3),
        })
    return out


def recycled(rows):
    rs = [r for r in rows if r.get("decode") == "recycled"]
    by = collections.defaultdict(list)
    for r in rs:
        by[r["length"]].append(r)
    return [{"length": L, "n": len(v), "score": round(mean(r["score"] for r in v), 4),
             "full_score": round(mean(r["full_score"] for r in v), 4),
             "same_text_as_full": round(mean(1.0 if r["same_as_full"] else 0.0 for r in v), 4)}
            for L, v in sorted(by.items())]


def by_method_ratio(cells, key, lengths=None):
    """Mean of `key` per (method, ratio) over tasks and the given lengths (cells weighted by n)."""
    acc = collections.defaultdict(lambda: [0.0, 0])
    for c in cells:
        if lengths and c["length"] not in lengths:
            continue
        a = acc[(c["method"], c["ratio"])]
        a[0] += c[key] * c["n"]
        a[1] += c["n"]
    return {k: v[0] / v[1] for k, v in acc.items() if v[1]}


def plot(cells, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted({c["length"] for c in cells})
    ratios = sorted({c["ratio"] for c in cells})
    fig, axes = plt.subplots(2, len(lengths) + 1, figsize=(4 * (len(lengths) + 1), 7.5),
                             squeeze=False)
    for col, ls in enumerate([None] + [[L] for L in lengths]):
        title = "all lengths" if ls is None else f"{ls[0] // 1024}K tokens"
        sc = by_method_ratio(cells, "score", ls)
        kl = by_method_ratio(cells, "kl", ls)
        full = [c["full_score"] * c["n"] for c in cells if ls is None or c["length"] in ls]
        nfull = [c["n"] for c in cells if ls is None or c["length"] in ls]
        for m in METHODS:
            xs = [r for r in ratios if (m, r) in sc]
            if not xs:
                continue
            axes[0][col].plot(xs, [sc[(m, r)] for r in xs], marker="o", label=m)
            axes[1][col].plot(xs, [kl[(m, r)] for r in xs], marker="o", label=m)
        if nfull:
            axes[0][col].axhline(sum(full) / sum(nfull), color="black", linestyle="--",
                                 label="full context")
        axes[0][col].set_title(f"RULER score, {title}")
        axes[1][col].set_title(f"KL(full || compressed), {title}")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(ratios)
            axes[row][col].set_xticklabels([f"{r:g}x" for r in ratios])
            axes[row][col].set_xlabel("compression ratio")
        axes[0][col].set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("ctxcache KV compression on SmolLM2-135M-Instruct (eval/report.py)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


QUERY_AGNOSTIC = ("streaming", "expected_attention", "kvzip", "anchor")


def targets(cells, ratios, solved=0.8):
    """Score kept relative to the full context on the (task, length) cells the full context
    solves (full_score >= 0.8): the issue's target definition. sum(score) / sum(full_score)."""
    ok = {(c["task"], c["length"]) for c in cells if c["full_score"] >= solved}
    lines = [f"Share of the full-context score kept, over the {len(ok)} (task, length) cells "
             f"where the full context scores >= {solved} ({', '.join(sorted({t for t, _ in ok}))}):",
             "", "| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for m in METHODS:
        per = []
        for r in ratios:
            cs = [c for c in cells if c["method"] == m and c["ratio"] == r
                  and (c["task"], c["length"]) in ok]
            full = sum(c["full_score"] * c["n"] for c in cs)
            per.append(f"{sum(c['score'] * c['n'] for c in cs) / full:.0%}" if full else "–")
        lines.append(f"| {m}{' (query-agnostic)' if m in QUERY_AGNOSTIC else ''} | "
                     + " | ".join(per) + " |")
    return "\n".join(lines)


def markdown(cells, rec):
    ratios = sorted({c["ratio"] for c in cells})
    lines = []
    sc, kl = by_method_ratio(cells, "score"), by_method_ratio(cells, "kl")
    full = mean(c["full_score"] for c in cells if c["method"] == METHODS[0] and c["ratio"] == ratios[0])
    head = "| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |"
    sep = "|---|" + "---|" * len(ratios)
    lines += ["Score (RULER string match, mean over tasks and lengths; full context "
              f"{full:.2f}):", "", head, sep]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(
            f"{sc[(m, r)]:.2f}" if (m, r) in sc else "–" for r in ratios) + " |")
    lines += ["", "KL(full ‖ compressed) over the answer span, nats per token:", "", head, sep]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(
            f"{kl[(m, r)]:.3f}" if (m, r) in kl else "–" for r in ratios) + " |")
    lengths = sorted({c["length"] for c in cells})
    lines += ["", "Score per length (mean over tasks run at that length; n = samples):", "",
              "| method | ratio | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |",
              "|---|---|" + "---|" * len(lengths)]
    full_by_len = {}
    for L in lengths:
        cs = [c for c in cells if c["length"] == L and c["method"] == METHODS[0] and c["ratio"] == ratios[0]]
        full_by_len[L] = (mean(c["full_score"] for c in cs), sum(c["n"] for c in cs))
    lines.append("| full context | 1x | " + " | ".join(
        f"{full_by_len[L][0]:.2f} (n={full_by_len[L][1]})" for L in lengths) + " |")
    for m in METHODS:
        for r in ratios:
            per = [by_method_ratio(cells, "score", [L]).get((m, r)) for L in lengths]
            if all(p is None for p in per):
                continue
            lines.append(f"| {m} | {r:g}x | " + " | ".join(
                "–" if p is None else f"{p:.2f}" for p in per) + " |")
    tasks = sorted({c["task"] for c in cells})
    lines += ["", "Score per task at 8x (mean over lengths; full context first):", "",
              "| task | full | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for t in tasks:
        cs = [c for c in cells if c["task"] == t and c["ratio"] == 8]
        if not cs:
            continue
        f = mean(c["full_score"] for c in cs if c["method"] == METHODS[0])
        per = []
        for m in METHODS:
            v = [c["score"] for c in cs if c["method"] == m]
            per.append(f"{mean(v):.2f}" if v else "–")
        lines.append(f"| {t} | {f:.2f} | " + " | ".join(per) + " |")
    lines += ["", targets(cells, ratios)]
    if rec:
        lines += ["", "Recycled Attention decoding over the full context (stride 10, top-K = 1/8 "
                  "of the keys):", "", "| length | n | score | full-attention score | same text |",
                  "|---|---|---|---|---|"]
        for r in rec:
            lines.append(f"| {r['length'] // 1024}K | {r['n']} | {r['score']:.2f} | "
                         f"{r['full_score']:.2f} | {r['same_text_as_full']:.0%} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--markdown", action="store_true", help="print the tables")
    ap.add_argument("--doc", help="also replace the tables between the markers in this file "
                    "(docs/quality.md)")
    args = ap.parse_args()
    rows = load(args.raw)
    cells = aggregate(rows)
    rec = recycled(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(cells, f, indent=1)
        f.write("\n")
    with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "recycled.json"), "w",
              encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    print(f"{len(cells)} cells from {len(rows)} rows -> {args.out}", file=sys.stderr)
    if args.plot:
        plot(cells, args.plot)
        print(f"plot -> {args.plot}", file=sys.stderr)
    if args.markdown:
        print(markdown(cells, rec))
    if args.doc:
        with open(args.doc, encoding="utf-8") as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            sys.exit(f"{args.doc} has no {BEGIN} ... {END} block to replace")
        block = f"{BEGIN}\n{markdown(cells, rec)}\n{END}"
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        with open(args.doc + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(args.doc + ".tmp", args.doc)
        print(f"tables -> {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
