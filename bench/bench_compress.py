#!/usr/bin/env python3
"""Compression and decode-policy benchmark: writes bench/results/compress.json and a table in
docs/benchmarks.md.

Cases (issue "Compression"):
  compress_<method>_<len>   seconds to compress a <len>-token document (ratio 8) with <method>;
                            digest (with --digest-compressor, after streaming in --methods)
                            also states its speed-up over streaming's plain prefill
                            (the 8192 case is 8064 tokens, leaving room for the question),
                            measured by `ctxcache compress --json` (prefill + scoring +
                            selection; model loading excluded), median of --reps runs.
  decode_recycled_<len>_s<S>_k<K>
                            decode tok/s after prefilling <len> tokens, full attention and
                            Recycled Attention (stride S, top-K K keys per KV head; 0 = 1/8 of
                            the keys), measured by `ctxcache bench --compare-decode --json`:
                            one prefill, then --reps pairs of full and recycled runs from
                            copies of that cache, back to back; the speed-up is the median of
                            the pairs' ratios (steadier than two separate medians on a noisy
                            machine). --recycled lists the settings, e.g. 10:0,16:512.

The document is deterministic English-like filler with a few facts, cut to exactly <len>
tokens by the model's tokenizer (via `ctxcache tokenize`). Rerun:
  python3 bench/bench_compress.py [--lengths 1024,2048,4096,8192] [--reps 3]
  python3 bench/bench_compress.py --lengths '' --decode-lengths 8192 --recycled 10:0,16:512 \
      --threads 1 --reps 7                      # the Recycled Attention speed-ups only
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
def cpu_model():
    """The CPU's model name (/proc/cpuinfo), e.g. "AMD EPYC 9R14 96-Core Processor"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def doc_tokens(n):
    return n - 128 if n >= 8192 else n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build/server/ctxcache"))
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--decode-lengths", default="4096,8192")
    ap.add_argument("--recycled", default="10:0",
                    help="Recycled Attention settings STRIDE:TOPK,... (TOPK 0 = 1/8 of the keys)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/compress.json"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--digest-compressor", default="",
                    help="method digest's compressor GGUF (docs/digest.md); digest is measured "
                         "only with one")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: build it first (cmake --build build --target ctxcache)")
    cases = []
    tmpdir = os.path.join(ROOT, "bench/work")
    os.makedirs(tmpdir, exist_ok=True)
    settings = [tuple(int(v) for v in x.split(":")) for x in args.recycled.split(",") if x]
    for n in [int(x) for x in args.lengths.split(",") if x]:
        doc = os.path.join(tmpdir, f"doc_{n}.txt")
        with open(doc, "w") as f:
            f.write(make_document(args.binary, doc_tokens(n)))
        for method in args.methods.split(","):
            if method == "digest" and not args.digest_compressor:
                sys.exit("--methods digest needs --digest-compressor FILE")
            extra = ["--digest-compressor", args.digest_compressor] if method == "digest" else []
            times = []
            for rep in range(args.reps):
                r = run_json([args.binary, "compress", "--doc", doc, "--method", method, "--ratio", "8",
                              "--question", "In which year was the northern bridge opened?",
                              "--out", os.path.join(tmpdir, "out.ctx"), "--json", "--quiet",
                              "--threads", str(args.threads)] + extra, fatal=False)
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
                # Each case says when and how it was measured: a partial rerun keeps the
                # others (save_merged), whose top-level fields may be another run's.
                case = {"name": f"compress_{method}_{n}", "seconds": statistics.median(times),
                        "tokens": r["source_tokens"], "kv_bytes": r["kv_bytes"],
                        "full_kv_bytes": r["full_kv_bytes"], "threads": args.threads,
                        "reps": args.reps, "date": time.strftime("%Y-%m-%d"),
                        "machine": cpu_model()}
                # Digest form against prefill-based compression of the same document, measured
                # in this run (streaming: a plain prefill, the cheapest KV method).
                base = next((c for c in cases if c["name"] == f"compress_streaming_{n}"
                             and c.get("seconds")), None)
                if method == "digest" and base:
                    case["speedup_vs_streaming"] = base["seconds"] / case["seconds"]
                cases.append(case)
            save(args.out, args, cases)
    for n in [int(x) for x in args.decode_lengths.split(",") if x]:
        prompt = min(n, 8192 - args.n_gen)
        for stride, top_k in settings:
            r = run_json([args.binary, "bench", "--n-prompt", str(prompt), "--n-gen", str(args.n_gen),
                          "--threads", str(args.threads), "--compare-decode", "--repeat", str(args.reps),
                          "--stride", str(stride), "--topk", str(top_k), "--json"])
            print(f"decode_{n} stride {stride} top-K {top_k or '1/8'}: full {r['full_tok_s']} tok/s, "
                  f"recycled {r['recycled_tok_s']} tok/s, speed-up {r['speedup_median']:.3f}x "
                  f"(median of {args.reps} pairs)", flush=True)
            cases.append({"name": f"decode_recycled_{n}_s{stride}_k{top_k}", "prompt_tokens": prompt,
                          "n_gen": args.n_gen, "stride": stride, "top_k": top_k,
                          "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                          "full_tok_s": statistics.median(r["full_tok_s"]),
                          "recycled_tok_s": statistics.median(r["recycled_tok_s"]),
                          "speedup_median": r["speedup_median"], "speedups": r["speedup"]})
            save(args.out, args, cases)
    result = save(args.out, args, cases)
    print(f"wrote {args.out}")
    if not args.no_doc:
        write_doc(result)


def save(path, args, new_cases):
    """Writes the results, keeping earlier cases that this run did not measure (--lengths).
    The top-level fields describe the compression cases: a run that measured none (--lengths '')
    keeps the earlier ones (each decode case carries its own threads and date)."""
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads, "ratio": 8, "reps": args.reps,
            "date": time.strftime("%Y-%m-%d")}
    if not any(c["name"].startswith("compress_") for c in new_cases) and os.path.exists(path):
        with open(path) as f:
            meta = {k: v for k, v in json.load(f).items() if k != "cases"}
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
    rec = sorted((c for c in result["cases"] if c["name"].startswith("decode_recycled_") and "stride" in c
                  and "speedup_median" in c), key=lambda c: (c["prompt_tokens"], c["stride"], c["top_k"]))
    if rec:
        lines += ["", "Decode tok/s, full attention vs Recycled Attention, paired (`ctxcache bench "
                  "--compare-decode`: one prefill, full and recycled runs back to back; medians; the "
                  "speed-up is the median of the pairs' ratios):", "",
                  "| context | stride | top-K | threads | full | recycled | speed-up | pairs | date |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for c in rec:
            k = c["top_k"] or "1/8"
            pairs = ", ".join(f"{x:.2f}" for x in c["speedups"])
            lines.append(f"| {c['prompt_tokens']} | {c['stride']} | {k} | {c['threads']} | "
                         f"{c['full_tok_s']:.1f} | {c['recycled_tok_s']:.1f} | "
                         f"{c['speedup_median']:.2f}x | {pairs} | {c['date']} |")
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
