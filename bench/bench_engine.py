#!/usr/bin/env python3
"""Engine throughput, ctxcache vs llama.cpp on the same GGUF and thread count.

Cases (tokens per second, median of --reps repetitions, peer and ours alternating):
  prefill_N  one forward pass over an N-token prompt (fresh KV cache)
  decode_N   --n-gen single-token decode steps after prefilling N tokens (decode time only)
N is 512 and 2048 for prefill, 128 and 2048 for decode; --long adds prefill_8192 and
decode_8192 (the decode case then prefills 8192 - n_gen tokens to stay in the model's 8192
window).

ours: `build/server/ctxcache bench --model PATH --n-prompt N --n-gen M --threads T --json`, one
process per repetition; it prints {"n_prompt", "n_gen", "threads", "prefill_s",
"prefill_tok_s", "decode_s", "decode_tok_s"} after a short warm-up pass.
peer: llama.cpp through llama-cpp-python, timed in-process the same way: one context per case
(n_ctx = prompt + n_gen, n_batch = n_ctx so a prompt is one llama_decode call, n_threads =
n_threads_batch = T), a warm-up pass, then per repetition a KV reset, the prefill as one eval
and n_gen one-token evals. Prompt ids are the same fixed spread as ours (1000 + 37 i mod ...).
Weight repacking is off in llama.cpp (its AMX path crashes on this VM, see
tools/make_logit_fixture.py: open_llama); flash attention follows --peer-flash-attn.

Writes bench/results/engine.json:
  {"machine": ..., "threads": T, "peer": "llama.cpp <version>",
   "cases": [{"name": "prefill_512", "ctxcache_tok_s": x, "peer_tok_s": y, "ratio": x/y}, ...]}
and regenerates the table between the engine-bench markers in docs/benchmarks.md.

Rerun:  python3 bench/bench_engine.py [--threads 2] [--reps 5] [--long] [--peer-only]
Needs llama-cpp-python and, unless --peer-only, a built ctxcache binary (--binary).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from bench_common import machine  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_BINARY = os.path.join(ROOT, "build", "server", "ctxcache")
RESULTS = os.path.join(ROOT, "bench", "results", "engine.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- BEGIN engine-bench (bench/bench_engine.py) -->", "<!-- END engine-bench -->"
N_CTX_TRAIN = 8192


def cases(long: bool, n_gen: int):
    """[(name, kind, n_prompt, n_gen)] in run order."""
    out = [("prefill_512", "prefill", 512, 0), ("prefill_2048", "prefill", 2048, 0),
           ("decode_128", "decode", 128, n_gen), ("decode_2048", "decode", 2048, n_gen)]
    if long:
        out += [("prefill_8192", "prefill", 8192, 0),
                ("decode_8192", "decode", N_CTX_TRAIN - n_gen, n_gen)]
    return out


def prompt_ids(n, n_vocab):
    return [1000 + (i * 37) % (n_vocab - 1000) for i in range(n)]


class Peer:
    """llama.cpp in-process, one context per (n_prompt, n_gen) shape."""

    def __init__(self, model, threads, ubatch, flash_attn):
        import llama_cpp
        from make_logit_fixture import open_llama
        self.version = llama_cpp.__version__
        self.model, self.threads, self.ubatch, self.flash_attn = model, threads, ubatch, flash_attn
        self.open_llama = open_llama
        self.llm, self.shape = None, None

    def _context(self, n_prompt, n_gen):
        if self.shape != (n_prompt, n_gen):
            self.llm = None  # free the previous context first
            n_ctx = n_prompt + n_gen
            self.llm = self.open_llama(
                self.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(self.ubatch, n_ctx),
                n_threads=self.threads, n_threads_batch=self.threads,
                flash_attn=self.flash_attn, verbose=False)
            self.shape = (n_prompt, n_gen)
            self.llm.eval(prompt_ids(min(16, n_prompt), self.llm.n_vocab()))  # warm-up
        return self.llm

    def run(self, n_prompt, n_gen):
        import numpy as np
        llm = self._context(n_prompt, n_gen)
        n_vocab = llm.n_vocab()
        ids = prompt_ids(n_prompt, n_vocab)
        llm.reset()  # n_tokens = 0: the next eval drops every KV entry first
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(n_gen):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def run_ours(binary, model, threads, n_prompt, n_gen):
    if not os.path.exists(binary):
        sys.exit(f"ctxcache binary not found: {binary}\n"
                 "build it (cmake --build build --target ctxcache), pass --binary, or run "
                 "with --peer-only to measure llama.cpp alone")
    cmd = [binary, "bench", "--model", model, "--n-prompt", str(n_prompt), "--n-gen",
           str(n_gen), "--threads", str(threads), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.strip()}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        sys.exit(f"{' '.join(cmd)} printed no JSON line:\n{p.stdout}")
    return json.loads(lines[-1])


def tok_s(kind, n_prompt, n_gen, r):
    return n_prompt / r["prefill_s"] if kind == "prefill" else n_gen / r["decode_s"]


def write_doc(result):
    rows = ["| case | ctxcache tok/s | llama.cpp tok/s | ratio (ours/peer) |",
            "|---|---:|---:|---:|"]
    for c in result["cases"]:
        ours = "—" if c["ctxcache_tok_s"] is None else f"{c['ctxcache_tok_s']:.1f}"
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}"
        rows.append(f"| {c['name']} | {ours} | {c['peer_tok_s']:.1f} | {ratio} |")
    section = "\n".join([
        BEGIN,
        f"Measured {result['date']} on {result['machine']}; {result['threads']} threads; "
        f"peer {result['peer']} ({result['peer_config']}); median of {result['reps']} "
        f"repetitions, peer and ours alternating; decode cases time {result['n_gen']} "
        "one-token steps after prefilling N tokens. Regenerate with "
        "`python3 bench/bench_engine.py`.",
        "", *rows, END])
    text = open(DOC).read() if os.path.exists(DOC) else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = (text or "# Benchmarks\n") + "\n## Engine throughput vs llama.cpp\n\n" + section \
            + "\n"
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for what is measured.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path (%(default)s)")
    ap.add_argument("--binary", default=DEFAULT_BINARY, help="ctxcache binary (%(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both (%(default)s)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, >= 5 (%(default)s)")
    ap.add_argument("--n-gen", type=int, default=64, help="decode steps (%(default)s)")
    ap.add_argument("--long", action="store_true", help="add prefill_8192 and decode_8192")
    ap.add_argument("--only", default="",
                    help="comma-separated case names to run; their results replace the same "
                         "cases in --out, the others are kept")
    ap.add_argument("--peer-only", action="store_true",
                    help="measure llama.cpp alone (no ctxcache binary needed)")
    ap.add_argument("--peer-ubatch", type=int, default=512,
                    help="llama.cpp n_ubatch, its default physical batch (%(default)s)")
    ap.add_argument("--peer-flash-attn", choices=["on", "off"], default="off",
                    help="llama.cpp flash attention (%(default)s)")
    ap.add_argument("--out", default=RESULTS, help="results JSON (%(default)s)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    if args.reps < 5:
        ap.error("--reps must be at least 5 (the result is a median)")
    if not os.path.exists(args.model):
        sys.exit(f"model not found: {args.model} (run tools/fetch_model.sh)")
    if not args.peer_only and not os.path.exists(args.binary):
        run_ours(args.binary, args.model, args.threads, 1, 0)  # exits with the message

    peer = Peer(args.model, args.threads, args.peer_ubatch, args.peer_flash_attn == "on")
    selected = [c for c in cases(args.long, args.n_gen)
                if not args.only or c[0] in args.only.split(",")]
    out_cases = []
    for name, kind, n_prompt, n_gen in selected:
        ours_runs, peer_runs = [], []
        for rep in range(args.reps):
            order = ("peer", "ours") if rep % 2 == 0 else ("ours", "peer")
            for who in order:
                if who == "peer":
                    peer_runs.append(tok_s(kind, n_prompt, n_gen, peer.run(n_prompt, n_gen)))
                elif not args.peer_only:
                    r = run_ours(args.binary, args.model, args.threads, n_prompt, n_gen)
                    ours_runs.append(tok_s(kind, n_prompt, n_gen, r))
            print(f"{name} rep {rep + 1}/{args.reps}: peer {peer_runs[-1]:.1f} tok/s"
                  + (f", ours {ours_runs[-1]:.1f} tok/s" if ours_runs else ""), flush=True)
        p = statistics.median(peer_runs)
        o = statistics.median(ours_runs) if ours_runs else None
        out_cases.append({"name": name, "ctxcache_tok_s": o, "peer_tok_s": p,
                          "ratio": o / p if o is not None else None})
        print(f"== {name}: peer {p:.1f} tok/s" +
              (f", ours {o:.1f} tok/s, ratio {o / p:.2f}" if o is not None else ""), flush=True)

    if args.only and os.path.exists(args.out):
        # A partial rerun replaces its cases in the previous results and keeps the others.
        with open(args.out) as f:
            previous = {c["name"]: c for c in json.load(f).get("cases", [])}
        previous.update({c["name"]: c for c in out_cases})
        order = [c[0] for c in cases(True, args.n_gen)]
        out_cases = sorted(previous.values(),
                           key=lambda c: order.index(c["name"]) if c["name"] in order else 99)
    result = {"machine": machine(), "threads": args.threads,
              "peer": f"llama.cpp {peer.version}", "cases": out_cases}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    if not args.no_doc:
        write_doc(dict(result, date=datetime.date.today().isoformat(), reps=args.reps,
                       n_gen=args.n_gen,
                       peer_config=f"llama-cpp-python, n_ubatch {args.peer_ubatch}, flash "
                                   f"attention {args.peer_flash_attn}, no weight repacking"))
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
