#!/usr/bin/env python3
"""Aggregates ctxcache-eval's raw lines into eval/results/quality.json, plots score and KL
against the bytes ratio per method and KV dtype, and prints the Markdown tables of
docs/quality.md.

  eval/report.py --raw eval/work/raw.jsonl --out eval/results/quality.json \
                 --plot docs/img/quality.png --doc docs/quality.md

quality.json is a list of cells, one per (model, task, length, method, kv_dtype, head_budget,
ratio), each {"model", "task", "length", "method", "kv_dtype", "head_budget", "ratio",
"bytes_ratio", "n", "score", "ci_low", "ci_high", "full_score", "full_ci_low", "full_ci_high",
"kl", "kept_tokens", "kv_bytes", "full_kv_bytes", "ll", "full_ll"}: means over the n samples
of that cell. ratio is the compression factor in entries (8 = 1/8 of the (layer, KV head)
entries kept); kept_tokens is per (layer, KV head); kv_bytes is what the compressed context
stores at its kv_dtype, quantization scales included; full_kv_bytes is the full context's K
and V at fp16; bytes_ratio = full_kv_bytes / kv_bytes (over the cell's samples: total over
total). ll and full_ll are the teacher-forced log-likelihood of the reference answer.
[ci_low, ci_high] is the 95% Wilson score interval of score (full_ci_* of full_score), see
wilson(). Decoding with Recycled Attention over the full context is reported separately in
the same file's sibling recycled.json.

Raw rows from before the model / kv_dtype / head_budget fields count as
SmolLM2-135M-Instruct.Q4_1, fp16, uniform (DEFAULTS): that is what produced them.
"""
import argparse
import collections
import gzip
import json
import math
import os
import sys

BEGIN, END = "<!-- BEGIN quality-tables (eval/report.py) -->", "<!-- END quality-tables -->"
METHODS = ("streaming", "snapkv", "finch", "expected_attention", "kvzip", "anchor")
QUERY_AGNOSTIC = ("streaming", "expected_attention", "kvzip", "anchor")
KV_DTYPES = ("fp16", "int8", "int4")
HEAD_BUDGETS = ("uniform", "adaptive", "global")
# What raw rows written before these fields existed were run with.
DEFAULTS = {"model": "SmolLM2-135M-Instruct.Q4_1", "kv_dtype": "fp16", "head_budget": "uniform"}
SERVED_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"  # listed first when present
SOLVED = 0.8  # the "tasks where the full context scores at least 0.8"
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(p, n, z=Z95):
    """95% Wilson score interval (low, high) for a success rate p observed over n trials.

    Our scores are per-sample fractions in [0, 1] (string_match_all gives 2/3 when two of
    three reference strings are found): p is their mean and n the number of samples, i.e. a
    partial score counts as that fraction of a success. With 0/1 scores this is the exact
    Wilson interval; with partial scores it is somewhat wider than the data warrant (their
    variance is at most p(1 - p)), so it errs on the safe side. n = 0 gives (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, p))
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At p = 0 (1) the low (high) end is exactly 0 (1); rounding could leave 1e-17 off.
    lo = 0.0 if p == 0 else max(0.0, center - half)
    hi = 1.0 if p == 1 else min(1.0, center + half)
    return lo, hi


def normalize(row):
    """The row with the fields of older raw rows filled in (DEFAULTS)."""
    out = dict(row)
    for k, v in DEFAULTS.items():
        if out.get(k) in (None, ""):
            out[k] = v
    if out.get("method") == "digest":
        out["head_budget"] = "–"  # a digest keeps no per-head entries (ctxcache-eval writes uniform)
    return out


def bytes_ratio(full_kv_bytes, kv_bytes):
    """full_kv_bytes / kv_bytes: how many times smaller than the full fp16 K and V the stored
    context is (None when nothing was stored)."""
    return full_kv_bytes / kv_bytes if kv_bytes else None


def load(path):
    """Raw rows of one JSONL file (gzip-compressed when it ends in .gz, as the raw rows kept
    in eval/results/raw/ are)."""
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(normalize(json.loads(line)))
                except json.JSONDecodeError:
                    print(f"skipping a damaged line in {path}", file=sys.stderr)
    return rows


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _order(values, known):
    """Known values in their canonical order, then the others sorted."""
    return sorted(values, key=lambda v: (known.index(v) if v in known else len(known), str(v)))


def method_key(m):
    return (METHODS.index(m) if m in METHODS else len(METHODS), m)


def variant_key(v):
    """Sort key of a (method, kv_dtype, head_budget) triple."""
    m, kv, hb = v
    return (method_key(m), KV_DTYPES.index(kv) if kv in KV_DTYPES else len(KV_DTYPES), kv,
            HEAD_BUDGETS.index(hb) if hb in HEAD_BUDGETS else len(HEAD_BUDGETS), hb)


def models_of(cells):
    """Models in display order: the served model first, then by name."""
    return sorted({c["model"] for c in cells}, key=lambda m: (m != SERVED_MODEL, m))


def aggregate(rows):
    """One cell per (model, task, length, method, kv_dtype, head_budget, ratio)."""
    cells = collections.defaultdict(list)
    for r in map(normalize, rows):
        if r.get("decode") == "recycled":
            continue
        cells[(r["model"], r["task"], r["length"], r["method"], r["kv_dtype"], r["head_budget"],
               r["ratio"])].append(r)
    out = []
    for key in sorted(cells, key=lambda k: (k[0] != SERVED_MODEL, k[0], k[1], k[2],
                                            variant_key((k[3], k[4], k[5])), k[6])):
        model, task, length, method, kv_dtype, head_budget, ratio = key
        rs = cells[key]
        n = len(rs)
        score, full = mean(r["score"] for r in rs), mean(r["full_score"] for r in rs)
        lo, hi = wilson(score, n)
        flo, fhi = wilson(full, n)
        kv, fkv = sum(r["kv_bytes"] for r in rs), sum(r["full_kv_bytes"] for r in rs)
        br = bytes_ratio(fkv, kv)
        out.append({
            "model": model, "task": task, "length": length, "method": method,
            "kv_dtype": kv_dtype, "head_budget": head_budget, "ratio": ratio,
            "bytes_ratio": None if br is None else round(br, 3), "n": n,
            "score": round(score, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
            "full_score": round(full, 4), "full_ci_low": round(flo, 4),
            "full_ci_high": round(fhi, 4),
            "kl": round(mean(r["kl"] for r in rs), 4),
            "kept_tokens": round(mean(r["kept_tokens"] for r in rs), 1),
            "kv_bytes": round(kv / n),
            "full_kv_bytes": round(fkv / n),
            "ll": round(mean(r["ll"] for r in rs), 3),
            "full_ll": round(mean(r["full_ll"] for r in rs), 3),
        })
    return out


def full_context(rows):
    """The full-context score per (model, task, length) over distinct samples: every raw row
    of a sample repeats its full_score, so a sample counts once whatever the number of
    methods, ratios and KV dtypes it ran with. {key: {"n", "score", "ci_low", "ci_high"}}."""
    seen = {}
    for r in map(normalize, rows):
        sid = (r["model"], r.get("id") or (r["task"], r["length"], r.get("index")))
        if sid in seen:
            if abs(seen[sid][1] - r["full_score"]) > 1e-9:
                print(f"warning: sample {sid} has two full-context scores ({seen[sid][1]} and "
                      f"{r['full_score']}); keeping the first", file=sys.stderr)
            continue
        seen[sid] = ((r["model"], r["task"], r["length"]), r["full_score"])
    by = collections.defaultdict(list)
    for key, s in seen.values():
        by[key].append(s)
    return {k: stats(v) for k, v in sorted(by.items())}


def stats(scores):
    """Mean, n and Wilson interval of per-sample scores."""
    n = len(scores)
    p = sum(scores) / n if n else float("nan")
    lo, hi = wilson(p, n)
    return {"n": n, "score": p, "ci_low": lo, "ci_high": hi}


def combine(sts):
    """Pools per-group stats ({"n", "score"}) into one over all their samples (None if none)."""
    sts = [s for s in sts if s and s["n"]]
    n = sum(s["n"] for s in sts)
    if not n:
        return None
    p = sum(s["score"] * s["n"] for s in sts) / n
    lo, hi = wilson(p, n)
    return {"n": n, "score": p, "ci_low": lo, "ci_high": hi}


def full_from_cells(cells):
    """The full-context score per (model, task, length) when only cells are at hand: that of
    the cell with the most samples (all cells of a sample repeat its full score)."""
    out = {}
    for c in cells:
        k = (c["model"], c["task"], c["length"])
        if k not in out or c["n"] > out[k]["n"]:
            out[k] = {"n": c["n"], "score": c["full_score"]}
    for st in out.values():
        st["ci_low"], st["ci_high"] = wilson(st["score"], st["n"])
    return dict(sorted(out.items()))


def pooled(cells, key="score"):
    """Mean of `key` over the samples of these cells (cells weighted by n), with n, the
    Wilson interval (for scores) and the bytes ratio (total full bytes / total stored)."""
    n = sum(c["n"] for c in cells)
    if not n:
        return None
    p = sum(c[key] * c["n"] for c in cells) / n
    lo, hi = wilson(p, n)
    kv = sum(c["kv_bytes"] * c["n"] for c in cells)
    full = sum(c["full_kv_bytes"] * c["n"] for c in cells)
    return {"n": n, "score": p, "ci_low": lo, "ci_high": hi, "bytes_ratio": bytes_ratio(full, kv)}


def recycled(rows):
    by = collections.defaultdict(list)
    for r in map(normalize, rows):
        if r.get("decode") == "recycled":
            # Rows from before the stride / top-K flags ran the defaults (10, 1/8 of the keys).
            by[(r["model"], r["length"], r.get("recycled_stride", 10),
                r.get("recycled_topk", 0))].append(r)
    out = []
    for (model, L, stride, topk), v in sorted(by.items(),
                                              key=lambda kv: ((kv[0][0] != SERVED_MODEL,) + kv[0])):
        s = stats([r["score"] for r in v])
        f = stats([r["full_score"] for r in v])
        same = stats([1.0 if r["same_as_full"] else 0.0 for r in v])
        out.append({"model": model, "length": L, "stride": stride, "top_k": topk, "n": len(v),
                    "score": round(s["score"], 4),
                    "ci_low": round(s["ci_low"], 4), "ci_high": round(s["ci_high"], 4),
                    "full_score": round(f["score"], 4), "full_ci_low": round(f["ci_low"], 4),
                    "full_ci_high": round(f["ci_high"], 4),
                    "same_text_as_full": round(same["score"], 4),
                    "same_ci_low": round(same["ci_low"], 4),
                    "same_ci_high": round(same["ci_high"], 4)})
    return out


def variants(cells):
    return sorted({(c["method"], c["kv_dtype"], c["head_budget"]) for c in cells}, key=variant_key)


def label(v, agnostic=False):
    m, kv, hb = v
    return f"{m}{' (query-agnostic)' if agnostic and m in QUERY_AGNOSTIC else ''} | {kv} | {hb}"


def fmt_ci(st, digits=2):
    return f"{st['score']:.{digits}f} [{st['ci_low']:.{digits}f}, {st['ci_high']:.{digits}f}]"


def kfmt(L):
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def plot(cells, path, rows=None):
    """Score and KL against the bytes ratio (log scale), two rows of panels per model (all
    lengths, then each length): one line per (method, kv_dtype, head_budget), colour = method,
    line style = kv_dtype, marker = head_budget. The full context is a black line with its
    95% Wilson band (over distinct samples from `rows` when given, else full_from_cells)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    models = models_of(cells)
    lengths = sorted({c["length"] for c in cells})
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(
        list(METHODS) + sorted({c["method"] for c in cells} - set(METHODS)))}
    styles = {"fp16": "-", "int8": "--", "int4": ":"}
    markers = {"uniform": "o", "adaptive": "^", "global": "D"}
    full = full_context(rows) if rows is not None else full_from_cells(cells)
    # One column per length, plus "all lengths" when there are several.
    columns = [None] + [[L] for L in lengths] if len(lengths) > 1 else [lengths]
    ncol = len(columns)
    fig, axes = plt.subplots(2 * len(models), ncol, figsize=(max(8, 4 * ncol), 3.9 * 2 * len(models)),
                             squeeze=False)
    xs = []  # every plotted bytes ratio, for the ticks
    for mi, model in enumerate(models):
        mcells = [c for c in cells if c["model"] == model]
        for col, ls in enumerate(columns):
            title = "all lengths" if ls is None else f"{kfmt(ls[0])} tokens"
            sel = [c for c in mcells if ls is None or c["length"] in ls]
            ax_s, ax_k = axes[2 * mi][col], axes[2 * mi + 1][col]
            if not sel:  # this model did not run this length
                ax_s.axis("off")
                ax_k.axis("off")
                continue
            for v in variants(sel):
                pts = []
                for r in sorted({c["ratio"] for c in sel}):
                    cs = [c for c in sel if (c["method"], c["kv_dtype"], c["head_budget"]) == v
                          and c["ratio"] == r]
                    if cs and pooled(cs)["bytes_ratio"]:
                        pts.append((pooled(cs)["bytes_ratio"], pooled(cs)["score"],
                                    pooled(cs, "kl")["score"]))
                pts.sort()
                xs += [p[0] for p in pts]
                kw = dict(color=colours[v[0]], linestyle=styles.get(v[1], "-."),
                          marker=markers.get(v[2], "s"), markersize=4, linewidth=1.3)
                ax_s.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
                ax_k.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
            f = combine(s for (m, t, L), s in full.items()
                        if m == model and (ls is None or L in ls))
            if f:
                ax_s.axhline(f["score"], color="black", linewidth=1)
                ax_s.axhspan(f["ci_low"], f["ci_high"], color="grey", alpha=0.15, linewidth=0)
            ax_s.set_title(f"{model}\nscore, {title}", fontsize=9)
            ax_k.set_title(f"KL(full || compressed), {title}", fontsize=9)
            for ax in (ax_s, ax_k):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("bytes ratio (full fp16 KV / stored)")
            ax_s.set_ylim(-0.05, 1.05)
    if xs:
        # Powers of two around the data (a 2x cell stores slightly more than half: 1.99x).
        ticks = [2 ** k for k in range(int(math.floor(math.log2(min(xs)) + 0.1)),
                                       int(math.ceil(math.log2(max(xs)) - 0.1)) + 1)]
        for ax in axes.flat:
            if ax.axison:
                ax.set_xticks(ticks)
                ax.set_xticklabels([f"{t:g}x" for t in ticks])
                ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
    present = {c["method"] for c in cells}
    handles = [Line2D([], [], color=colours[m], label=m) for m in colours if m in present]
    handles += [Line2D([], [], color="grey", linestyle=styles.get(k, "-."), label=k)
                for k in _order({c["kv_dtype"] for c in cells}, KV_DTYPES)]
    hbs = _order({c["head_budget"] for c in cells}, HEAD_BUDGETS)
    if len(hbs) > 1:
        handles += [Line2D([], [], color="grey", marker=markers.get(h, "s"), linestyle="",
                           label=f"{h} heads") for h in hbs]
    handles.append(Line2D([], [], color="black", label="full context (band: 95% CI)"))
    h = fig.get_figheight()
    fig.suptitle("ctxcache KV compression: RULER score and KL against bytes stored "
                 "(eval/report.py)", y=1 - 0.1 / h, va="top")
    # As many legend columns as the figure's width holds (about 1.7 inches each).
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / 1.7)))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / h),
               ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.5 + 0.2 * math.ceil(len(handles) / ncol)) / h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def qualifying(cells, solved=SOLVED):
    """The cells whose full-context score is >= solved: the only ones a share of the
    full-context score is computed over (the issue's target definition)."""
    return [c for c in cells if c["full_score"] >= solved]


def share_of_full(cells, solved=SOLVED):
    """Per (model, method, kv_dtype, head_budget, ratio), over the qualifying cells:
    sum(score) / sum(full_score) over their samples, with n, the bytes ratio and an interval:
    the Wilson interval of the compressed score over those samples divided by their mean
    full-context score (the full-context score taken as fixed)."""
    groups = collections.defaultdict(list)
    for c in qualifying(cells, solved):
        groups[(c["model"], c["method"], c["kv_dtype"], c["head_budget"], c["ratio"])].append(c)
    out = {}
    for k, cs in groups.items():
        p = pooled(cs)
        f = sum(c["full_score"] * c["n"] for c in cs) / p["n"]
        out[k] = {"share": p["score"] / f, "ci_low": p["ci_low"] / f, "ci_high": p["ci_high"] / f,
                  "n": p["n"], "bytes_ratio": p["bytes_ratio"]}
    return out


def targets(cells, ratios=None, solved=SOLVED):
    """The share of the full-context score kept, only on cells where the full context scores
    >= solved, per (method, kv_dtype, head_budget) and ratio, as a Markdown table."""
    ratios = ratios or sorted({c["ratio"] for c in cells})
    ok = qualifying(cells, solved)
    models = models_of(cells)
    pairs = sorted({(c["model"], c["task"], c["length"]) for c in ok})
    allpairs = {(c["model"], c["task"], c["length"]) for c in cells}
    by_task = collections.defaultdict(list)
    for m, t, L in pairs:
        by_task[(m, t)].append(kfmt(L))
    listed = "; ".join((f"{m} " if len(models) > 1 else "") + f"{t} {', '.join(ls)}"
                       for (m, t), ls in sorted(by_task.items()))
    lines = [f"Share of the full-context score kept. Only cells where the full context scores "
             f">= {solved} count: {len(pairs)} of {len(allpairs)} (task, length) cells qualify "
             f"({len(ok)} of {len(cells)} cells of the grid)"
             + (f": {listed}." if listed else "."),
             "Each entry: share [95% interval] at the bytes ratio, n = qualifying samples. "
             "Interval: the Wilson interval of the compressed score over those samples divided "
             "by their mean full-context score.", ""]
    if not ok:
        return "\n".join(lines + ["(no cell qualifies)"])
    sh = share_of_full(cells, solved)
    for model in models:
        if len(models) > 1:
            lines += [f"{model}:", ""]
        vs = variants([c for c in ok if c["model"] == model])
        ns = {e["n"] for k, e in sh.items() if k[0] == model}
        one_n = ns.pop() if len(ns) == 1 else None
        lines += ["| method | kv | heads | " + " | ".join(f"{r:g}x" for r in ratios)
                  + (" |" if one_n is None else " | n |"),
                  "|---|---|---|" + "---|" * (len(ratios) + (one_n is not None))]
        for v in vs:
            per = []
            for r in ratios:
                e = sh.get((model,) + v + (r,))
                if e is None:
                    per.append("–")
                    continue
                br = f" at {e['bytes_ratio']:.1f}x" if e["bytes_ratio"] else ""
                per.append(f"{e['share']:.0%} [{e['ci_low']:.0%}, {e['ci_high']:.0%}]{br}"
                           + ("" if one_n is not None else f" (n={e['n']})"))
            lines.append(f"| {label(v, agnostic=True)} | " + " | ".join(per)
                         + ("" if one_n is None else f" | {one_n}") + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(st, header_n):
    """A score with its interval, and its n when it differs from the column's."""
    if st is None:
        return "–"
    return fmt_ci(st) + ("" if st["n"] == header_n else f" (n={st['n']})")


def model_tables(model, cells, full, rec):
    ratios = sorted({c["ratio"] for c in cells})
    lengths = sorted({c["length"] for c in cells} | {L for (m, t, L) in full if m == model})
    tasks = sorted({c["task"] for c in cells} | {t for (m, t, L) in full if m == model})
    fm = {(t, L): s for (m, t, L), s in full.items() if m == model}

    def pool_full(keys):
        return combine(fm.get(k) for k in keys)

    lines = [f"### {model}", ""]
    # 1. The full context, per task and length.
    lines += ["Full-context score per task and length (RULER string match, mean over samples "
              "[95% Wilson interval], n = samples):", "",
              "| task | " + " | ".join(kfmt(L) for L in lengths) + " | all lengths |",
              "|---|" + "---|" * (len(lengths) + 1)]
    for t in tasks:
        per = [fm.get((t, L)) for L in lengths]
        lines.append(f"| {t} | " + " | ".join(
            "–" if s is None else f"{fmt_ci(s)} (n={s['n']})" for s in per)
            + f" | {_cell(pool_full([(t, L) for L in lengths]), None)} |")
    lines.append("| all tasks | " + " | ".join(
        _cell(pool_full([(t, L) for t in tasks]), None) for L in lengths)
        + f" | {_cell(pool_full(list(fm)), None)} |")

    # 2. Score and KL against bytes, over tasks and lengths.
    allfull = pool_full(list(fm))
    lines += ["", "Score against bytes (mean over the tasks and lengths run [95% Wilson "
              "interval]; ratio = entries, bytes ratio = full fp16 K and V bytes / bytes stored, "
              "quantization scales included; KL(full ‖ compressed) over the answer span, nats "
              "per token):", "",
              "| method | kv | heads | ratio | bytes ratio | n | score | KL |",
              "|---|---|---|---|---|---|---|---|"]
    if allfull:
        lines.append(f"| full context | fp16 | – | 1x | 1.0x | {allfull['n']} | "
                     f"{fmt_ci(allfull)} | 0 |")
    for v in variants(cells):
        for r in ratios:
            cs = [c for c in cells if (c["method"], c["kv_dtype"], c["head_budget"]) == v
                  and c["ratio"] == r]
            if not cs:
                continue
            p, kl = pooled(cs), pooled(cs, "kl")
            br = f"{p['bytes_ratio']:.1f}x" if p["bytes_ratio"] else "–"
            lines.append(f"| {label(v)} | {r:g}x | {br} | {p['n']} | {fmt_ci(p)} | "
                         f"{kl['score']:.3f} |")

    # 3. Per length.
    hn = {L: (pool_full([(t, L) for t in tasks]) or {"n": 0})["n"] for L in lengths}
    lines += ["", "Score per length (mean over the tasks run at that length [95% Wilson "
              "interval]; n = samples, in the header, and in a cell where it differs):", "",
              "| method | kv | heads | ratio | " + " | ".join(
                  f"{kfmt(L)} (n={hn[L]})" for L in lengths) + " |",
              "|---|---|---|---|" + "---|" * len(lengths)]
    lines.append("| full context | fp16 | – | 1x | " + " | ".join(
        _cell(pool_full([(t, L) for t in tasks]), hn[L]) for L in lengths) + " |")
    for v in variants(cells):
        for r in ratios:
            per = []
            for L in lengths:
                cs = [c for c in cells if (c["method"], c["kv_dtype"], c["head_budget"]) == v
                      and c["ratio"] == r and c["length"] == L]
                per.append(_cell(pooled(cs), hn[L]) if cs else "–")
            if all(p == "–" for p in per):
                continue
            lines.append(f"| {label(v)} | {r:g}x | " + " | ".join(per) + " |")

    # 4. Per task at one ratio (8x when run).
    r8 = 8 if 8 in ratios else ratios[len(ratios) // 2]
    vs = variants([c for c in cells if c["ratio"] == r8])
    methods = sorted({v[0] for v in vs}, key=method_key)
    kvhb = sorted({v[1:] for v in vs}, key=lambda x: variant_key(("", ) + x))
    lines += ["", f"Score per task at {r8:g}x entries (mean over lengths [95% Wilson interval]; "
              "n = samples of the full context, and in a cell where it differs):", "",
              "| task | kv | heads | n | full | " + " | ".join(methods) + " |",
              "|---|---|---|---|---|" + "---|" * len(methods)]
    for t in tasks:
        f = pool_full([(t, L) for L in lengths])
        for kv, hb in kvhb:
            per = []
            for m in methods:
                cs = [c for c in cells if c["task"] == t and c["ratio"] == r8 and
                      (c["method"], c["kv_dtype"], c["head_budget"]) == (m, kv, hb)]
                per.append(_cell(pooled(cs), f and f["n"]) if cs else "–")
            if all(p == "–" for p in per):
                continue
            lines.append(f"| {t} | {kv} | {hb} | {f['n'] if f else '–'} | "
                         f"{fmt_ci(f) if f else '–'} | " + " | ".join(per) + " |")

    # 5. The targets' share of the full context.
    lines += ["", targets(cells, ratios)]

    # 6. Recycled Attention.
    rs = [r for r in rec if r["model"] == model]
    if rs:
        lines += ["", "Recycled Attention decoding over the full context (a full step every "
                  "`stride` steps, top-K recycled keys per KV head, 1/8 of the keys unless "
                  "given; [95% Wilson interval]):", "",
                  "| length | stride | top-K | n | score | full-attention score | same text |",
                  "|---|---|---|---|---|---|---|"]
        for r in rs:
            topk = r["top_k"] or "1/8"
            lines.append(
                f"| {kfmt(r['length'])} | {r['stride']} | {topk} | {r['n']} | "
                f"{r['score']:.2f} [{r['ci_low']:.2f}, "
                f"{r['ci_high']:.2f}] | {r['full_score']:.2f} [{r['full_ci_low']:.2f}, "
                f"{r['full_ci_high']:.2f}] | {r['same_text_as_full']:.0%} "
                f"[{r['same_ci_low']:.0%}, {r['same_ci_high']:.0%}] |")
    return lines


def markdown(cells, rec, rows=None):
    """The tables of docs/quality.md, one section per model. `rows` (the raw rows) give the
    full-context score over distinct samples; without them, full_from_cells."""
    full = full_context(rows) if rows is not None else full_from_cells(cells)
    lines = []
    for model in models_of(cells):
        lines += model_tables(model, [c for c in cells if c["model"] == model], full, rec) + [""]
    return "\n".join(lines).rstrip()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, nargs="+",
                    help="raw JSONL files (.gz too); a row for the same sample and setting in "
                    "several counts once")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--markdown", action="store_true", help="print the tables")
    ap.add_argument("--doc", help="also replace the tables between the markers in this file "
                    "(docs/quality.md)")
    args = ap.parse_args()
    rows, seen = [], set()
    for path in args.raw:
        for r in load(path):
            key = (r["model"], r["id"], r["method"], r.get("ratio"), r["kv_dtype"],
                   r["head_budget"], r.get("decode"), r.get("recycled_stride"),
                   r.get("recycled_topk"))
            if key not in seen:
                seen.add(key)
                rows.append(r)
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
        plot(cells, args.plot, rows)
        print(f"plot -> {args.plot}", file=sys.stderr)
    if args.markdown:
        print(markdown(cells, rec, rows))
    if args.doc:
        with open(args.doc, encoding="utf-8") as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            sys.exit(f"{args.doc} has no {BEGIN} ... {END} block to replace")
        block = f"{BEGIN}\n{markdown(cells, rec, rows)}\n{END}"
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        with open(args.doc + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(args.doc + ".tmp", args.doc)
        print(f"tables -> {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
