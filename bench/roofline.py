#!/usr/bin/env python3
"""How close the engine runs to what this machine allows: the roofline in docs/benchmarks.md.

  python3 bench/roofline.py [--threads 2] [--reps 3] [--build build] [--no-doc]

1. build/bench/roofline_probe measures the ceilings: memory read bandwidth (GB/s, a 1 GiB
   buffer streamed by every thread), the prefill GEMM's FLOP/s (engine MatMul on the model's
   own FFN weights, 512 tokens) and attention's (OpenBLAS sgemm at its prefill block shape);
   and reads the model's per-token costs (weight bytes, KV bytes per cached token, params).
2. `ctxcache bench` times prefill and decode at contexts 512, 2048 and 8192 (median of --reps).
3. Decode: bytes moved per token = every weight matrix once + the K and V of every cached
   token (context + half the generated tokens on average); achieved GB/s = bytes x tok/s,
   against the measured read bandwidth.
   Prefill: FLOPs = 2 x params x N (weight products) + attention's causal 4 x layers x heads x
   head_dim x N(N+1)/2; achieved FLOP/s against the time the two kernels would take at their
   measured peaks (the roofline time), so "of peak" = roofline time / measured time.
4. Score extraction: the same prefill also reporting its last 64 rows' attention to an
   observer that sums it per key (`ctxcache bench --observe 64`, what snapkv and finch read),
   as overhead over the plain prefill.

Writes bench/results/roofline.json and the table between the roofline markers in
docs/benchmarks.md.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

from bench_common import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
RESULTS = os.path.join(ROOT, "bench", "results", "roofline.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- BEGIN roofline (bench/roofline.py) -->", "<!-- END roofline -->"
CONTEXTS = (512, 2048, 8192)
N_GEN = 64
N_CTX = 8192
OBSERVE = 64  # rows whose attention a prompt-guided scorer reads (snapkv's window)


def run_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.strip()}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    probe_bin = os.path.join(args.build, "bench", "roofline_probe")
    cli = os.path.join(args.build, "server", "ctxcache")
    for b in (probe_bin, cli):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} not found: cmake --build {args.build} --target roofline_probe ctxcache")

    print("probing the machine's ceilings...", file=sys.stderr)
    probe = run_json([probe_bin, "--model", args.model, "--threads", str(args.threads)])
    rows = []
    for n in CONTEXTS:
        prompt_decode = min(n, N_CTX - N_GEN)
        pre, obs, dec = [], [], []
        for rep in range(args.reps):
            print(f"\rcontext {n}: repetition {rep + 1}/{args.reps}", end="", file=sys.stderr,
                  flush=True)
            pre.append(run_json([cli, "bench", "--model", args.model, "--n-prompt", str(n),
                                 "--n-gen", "0", "--threads", str(args.threads), "--json"]))
            obs.append(run_json([cli, "bench", "--model", args.model, "--n-prompt", str(n),
                                 "--n-gen", "0", "--threads", str(args.threads), "--observe",
                                 str(OBSERVE), "--json"]))
            dec.append(run_json([cli, "bench", "--model", args.model, "--n-prompt",
                                 str(prompt_decode), "--n-gen", str(N_GEN), "--threads",
                                 str(args.threads), "--json"]))
        print(file=sys.stderr)
        prefill_s = statistics.median(r["prefill_s"] for r in pre)
        observed_s = statistics.median(r["prefill_s"] for r in obs)
        decode_tok_s = statistics.median(r["decode_tok_s"] for r in dec)

        # Decode: bytes per token, achieved bandwidth.
        avg_ctx = prompt_decode + N_GEN / 2
        kv_bytes = probe["kv_bytes_per_token"] * avg_ctx
        bytes_per_token = probe["weight_bytes"] + kv_bytes
        achieved_gbs = bytes_per_token * decode_tok_s / 1e9

        # Prefill: FLOPs, roofline time at the measured kernel peaks.
        gemm_flops = 2.0 * probe["params"] * n
        attn_flops = (4.0 * probe["n_layers"] * probe["n_heads"] * probe["head_dim"] *
                      n * (n + 1) / 2)
        roofline_s = (gemm_flops / (probe["matmul_gflops"] * 1e9) +
                      attn_flops / (probe["attn_gflops"] * 1e9))
        rows.append({
            "context": n,
            "decode_tok_s": decode_tok_s,
            "decode_bytes_per_token": bytes_per_token,
            "decode_kv_share": kv_bytes / bytes_per_token,
            "decode_achieved_gbs": achieved_gbs,
            "decode_of_bandwidth": achieved_gbs / probe["read_gbs"],
            "prefill_tok_s": n / prefill_s,
            "prefill_gflop": (gemm_flops + attn_flops) / 1e9,
            "prefill_attention_share": attn_flops / (gemm_flops + attn_flops),
            "prefill_achieved_gflops": (gemm_flops + attn_flops) / prefill_s / 1e9,
            "prefill_roofline_s": roofline_s,
            "prefill_of_peak": roofline_s / prefill_s,
            "score_extraction_overhead": observed_s / prefill_s - 1,
        })
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),  # bench_engine.py uses these ceilings only on the same machine
        "threads": args.threads,
        "reps": args.reps,
        "probe": probe,
        "contexts": rows,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    table = table_markdown(result)
    print(table)
    if not args.no_doc:
        write_doc(table)
    return 0


def table_markdown(r):
    p = r["probe"]
    lines = [
        f"Measured {r['date']}, {r['threads']} threads ({p['cpu']}), median of {r['reps']}. "
        f"Ceilings measured by `bench/roofline_probe`: memory read **{p['read_gbs']:.1f} GB/s**; "
        f"prefill GEMM ({p['matmul_type']} weights) **{p['matmul_gflops']:.0f} GFLOP/s**; "
        f"attention sgemm **{p['attn_gflops']:.0f} GFLOP/s**. Per token: "
        f"{p['weight_bytes'] / 1e6:.1f} MB of weights, {p['kv_bytes_per_token'] / 1e3:.1f} KB "
        f"of KV per cached token ({p['kv_value_bytes']:.0f}-byte values).",
        "",
        "| context | decode tok/s | MB moved/token (KV share) | GB/s achieved | of bandwidth "
        "| prefill tok/s | GFLOP (attention share) | GFLOP/s achieved | of kernel peak "
        "| score extraction |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["contexts"]:
        lines.append(
            f"| {c['context']} | {c['decode_tok_s']:.1f} | "
            f"{c['decode_bytes_per_token'] / 1e6:.1f} ({100 * c['decode_kv_share']:.0f}%) | "
            f"{c['decode_achieved_gbs']:.2f} | {100 * c['decode_of_bandwidth']:.0f}% | "
            f"{c['prefill_tok_s']:.1f} | {c['prefill_gflop']:.0f} "
            f"({100 * c['prefill_attention_share']:.0f}%) | "
            f"{c['prefill_achieved_gflops']:.1f} | {100 * c['prefill_of_peak']:.0f}% | "
            f"{100 * c['score_extraction_overhead']:+.1f}% |")
    return "\n".join(lines)


def write_doc(table):
    section = "\n".join([BEGIN, table, END])
    text = open(DOC).read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text += "\n## Roofline: how close to the hardware\n\n" + section + "\n"
    with open(DOC, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
