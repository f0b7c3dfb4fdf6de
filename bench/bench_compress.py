#!/usr/bin/env python3
"""Compression and decode-policy benchmark: writes bench/results/compress.json and a table in
docs/benchmarks.md.

Cases (issue "Compression"):
  compress_<method>_<len>   seconds to compress a <len>-token document (ratio 8) with <method>
                            (the 8192 case is 8064 tokens, leaving room for the question),
                            measured by `ctxcache compress --json` (prefill + scoring +
                            selection; model loading excluded), median of --reps runs.
  decode_full_<len>         decode tok/s after prefilling <len> tokens, full attention
  decode_recycled_<len>     the same with Recycled Attention (stride 10, top-K 1/8 of the keys)
                            measured by `ctxcache bench --json`, alternating full/recycled.

The document is deterministic English-like filler with a few facts, cut to exactly <len>
tokens by the model's tokenizer (via `ctxcache tokenize`). Rerun:
  python3 bench/bench_compress.py [--lengths 1024,2048,4096,8192] [--reps 3]
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

from bench_common import save_merged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["streaming", "snapkv", "finch", "expected_attention", "kvzip", "anchor"]
BEGIN, END = "<!-- BEGIN compress-bench (bench/bench_compress.py) -->", "<!-- END compress-bench -->"


def make_document(binary, n_tokens, seed=7):
    """Filler prose with facts, trimmed to n_tokens by the model's own tokenizer."""
    rng = random.Random(seed)
    subjects = ["The river", "A merchant", "The old library", "Our committee", "The harbor",
                "A young engineer", "The orchard", "The council"]
    verbs = ["opened", "described", "measured", "repaired", "visited", "recorded", "planned"]
    objects = ["the northern bridge", "a ledger of grain prices", "the winter festival",
               "seven copper pipes", "the tide tables", "a map of the valley"]
    words = []
    while len(words) < n_tokens * 2:
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in {rng.randint(1700, 1999)}."
        words.append(s)
    text = " ".join(words)
    out = subprocess.run([binary, "tokenize", "--ids-only", "--no-bos", "-"], input=text.encode(),
                         capture_output=True, check=True).stdout.decode().split()
    if len(out) < n_tokens:
        sys.exit(f"document generator produced only {len(out)} tokens")
    # Cut the text at the token boundary: decode by re-tokenizing prefixes would be slow, so
    # trim characters proportionally and verify.
    lo, hi = 0, len(text)
    while lo < hi:  # largest prefix with <= n_tokens tokens
        mid = (lo + hi + 1) // 2
        n = len(subprocess.run([binary, "tokenize", "--ids-only", "--no-bos", "-"],
                               input=text[:mid].encode(), capture_output=True,
                               check=True).stdout.split())
        if n <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def run_json(cmd, fatal=True):
    out = subprocess.run(cmd, capture_output=True, check=False)
    if out.returncode != 0:
        msg = out.stderr.decode().strip()[-400:]
        if fatal:
            sys.exit(f"{' '.join(cmd)} failed: {msg}")
        return {"error": msg}
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


# The 8K case leaves room for the question (and for the tokens prompt-guided methods append)
# inside the model's 8192-token window.
def doc_tokens(n):
    return n - 128 if n >= 8192 else n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build/server/ctxcache"))
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--decode-lengths", default="4096,8192")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/compress.json"))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: build it first (cmake --build build --target ctxcache)")
    cases = []
    tmpdir = os.path.join(ROOT, "bench/work")
    os.makedirs(tmpdir, exist_ok=True)
    for n in [int(x) for x in args.lengths.split(",")]:
        doc = os.path.join(tmpdir, f"doc_{n}.txt")
        with open(doc, "w") as f:
            f.write(make_document(args.binary, doc_tokens(n)))
        for method in args.methods.split(","):
            times = []
            for rep in range(args.reps):
                r = run_json([args.binary, "compress", "--doc", doc, "--method", method, "--ratio", "8",
                              "--question", "In which year was the northern bridge opened?",
                              "--out", os.path.join(tmpdir, "out.ctx"), "--json", "--quiet",
                              "--threads", str(args.threads)], fatal=False)
                if "error" in r:
                    break
                times.append(r["seconds"])
                print(f"compress_{method}_{n} rep {rep + 1}/{args.reps}: {r['seconds']:.2f} s "
                      f"({r['source_tokens']} tokens, kept {r['kept_entries']}/{r['full_entries']})",
                      flush=True)
            if "error" in r:
                print(f"compress_{method}_{n}: FAILED: {r['error']}", flush=True)
                cases.append({"name": f"compress_{method}_{n}", "seconds": None, "error": r["error"]})
            else:
                cases.append({"name": f"compress_{method}_{n}", "seconds": statistics.median(times),
                              "tokens": r["source_tokens"], "kv_bytes": r["kv_bytes"],
                              "full_kv_bytes": r["full_kv_bytes"]})
            save(args.out, args, cases)
    for n in [int(x) for x in args.decode_lengths.split(",")]:
        prompt = min(n, 8192 - args.n_gen)
        full, rec = [], []
        for rep in range(args.reps):
            base = [args.binary, "bench", "--n-prompt", str(prompt), "--n-gen", str(args.n_gen),
                    "--threads", str(args.threads), "--json"]
            full.append(run_json(base)["decode_tok_s"])
            rec.append(run_json(base + ["--decode", "recycled", "--stride", "10"])["decode_tok_s"])
            print(f"decode_{n} rep {rep + 1}/{args.reps}: full {full[-1]:.1f} tok/s, "
                  f"recycled {rec[-1]:.1f} tok/s", flush=True)
        cases.append({"name": f"decode_full_{n}", "tok_s": statistics.median(full), "prompt_tokens": prompt})
        cases.append({"name": f"decode_recycled_{n}", "tok_s": statistics.median(rec), "prompt_tokens": prompt,
                      "stride": 10, "top_k": "1/8 of keys"})
        save(args.out, args, cases)
    result = save(args.out, args, cases)
    print(f"wrote {args.out}")
    if not args.no_doc:
        write_doc(result)


def save(path, args, new_cases):
    """Writes the results, keeping earlier cases that this run did not measure (--lengths)."""
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads, "ratio": 8, "reps": args.reps,
            "date": time.strftime("%Y-%m-%d")}
    return save_merged(path, meta, new_cases)


def write_doc(result):
    path = os.path.join(ROOT, "docs/benchmarks.md")
    by = {c["name"]: c for c in result["cases"]}
    lengths = sorted({int(c["name"].rsplit("_", 1)[1]) for c in result["cases"] if c["name"].startswith("compress_")})
    methods = [m for m in METHODS if any(c["name"].startswith(f"compress_{m}_") for c in result["cases"])]
    lines = [BEGIN,
             f"Measured {result['date']}; {result['threads']} threads; ratio {result['ratio']}; "
             f"median of {result['reps']}. Regenerate with `python3 bench/bench_compress.py`.", "",
             "Compression time (seconds) by document length:", "",
             "| method | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for m in methods:
        def cell(name):
            c = by.get(name)
            if c is None:
                return ""
            return "fails (see json)" if c.get("seconds") is None else f"{c['seconds']:.2f}"
        lines.append(f"| {m} | " + " | ".join(cell(f"compress_{m}_{n}") for n in lengths) + " |")
    dl = sorted({int(c["name"].rsplit("_", 1)[1]) for c in result["cases"] if c["name"].startswith("decode_full_")})
    if dl:
        lines += ["", "Decode tok/s, full attention vs Recycled Attention (stride 10, top-K = 1/8 of keys):", "",
                  "| context | full | recycled | speed-up |", "|---:|---:|---:|---:|"]
        for n in dl:
            f, r = by[f"decode_full_{n}"]["tok_s"], by[f"decode_recycled_{n}"]["tok_s"]
            lines.append(f"| {n} | {f:.1f} | {r:.1f} | {r / f:.2f}x |")
    lines.append(END)
    block = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n## Compression and decode policies\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
