#!/usr/bin/env python3
"""Engine throughput, ctxcache vs llama.cpp (llama-bench) on the same GGUF and thread count.

Cases, per model set (tokens per second, median of --reps repetitions):
  prefill_N  one forward pass over an N-token prompt into an empty KV cache, N = 512, 2048, 8192
  decode_D   --n-gen one-token decode steps after D tokens are in the cache (decode time only),
             D = 128, 2048, 8192; D is capped at the model's training context minus --n-gen
             (SmolLM2: 8192 - 64 = 8128), so both engines stay inside the trained window.
Model sets: smollm2 (SmolLM2-135M-Instruct Q4_1; case names as above) and qwen2.5-0.5b
(Qwen2.5-Coder-0.5B-Instruct Q4_K_M; case names "qwen2.5-0.5b/prefill_512", ...).

ours: `build/server/ctxcache bench --model PATH --n-prompt N --n-gen M --threads T --json`, one
process per repetition; it prints {"prefill_s", "prefill_tok_s", "decode_s", "decode_tok_s",
...} after a short warm-up pass. prefill_N runs --n-prompt N --n-gen 0; decode_D runs
--n-prompt D --n-gen M and reports the M decode steps only.

peer (default, --peer llama-bench): llama.cpp's own benchmark tool, built natively for this CPU
by bench/build_llama_cpp.sh from the llama.cpp source llama-cpp-python 0.3.36 vendors. One
llama-bench process per case: `-m PATH -t T -r REPS -o json -fa 0,1` plus `-p N -n 0`
(prefill_N) or `-p 0 -n M -d D` (decode_D: D tokens prefilled untimed, then M timed one-token
steps, the same as ours). llama-bench warms up once per setting, then times REPS repetitions.
Each flash-attention setting is measured and the faster one (by median) is the peer's number
(`peer_flash_attn`). Weight repacking is llama.cpp's default (on); if llama-bench crashes with
it (llama.cpp 0.3.36's AMX path did, through llama-cpp-python, on a Sapphire Rapids VM) the
case is rerun with `--repack 0` and that is recorded. Ours then runs its REPS processes right
after, so both sides of a case see nearly the same machine state; `loadavg` is the 1-minute
load average at the case's start (it still counts the previous case's own threads).
--peer inprocess keeps the older peer: llama.cpp through llama-cpp-python, timed in-process
the same way (one context per case, n_batch = the whole prompt, --peer-flash-attn, no weight
repacking), alternating with ours repetition by repetition.

Roofline, per case and per engine: decode: bytes read per token (every weight matrix once;
the token embedding one row, or all of it when the output head is tied to it; plus the fp16 K
and V of the mean context over the timed steps) x tok/s, over the measured DRAM read
bandwidth. Prefill: FLOPs per token (2 x the layers' matrix parameters, the output head once
per prompt, causal attention 4 x layers x heads x head_dim x mean context) x tok/s, over the
measured peak of the best GEMM kernel. Per-token costs come from the GGUF (`gguf` package);
the ceilings (read_gbs, matmul_gflops) from bench/results/roofline.json, which
bench/roofline.py writes with build/bench/roofline_probe. Ceilings measured on another
machine or thread count are not used: the achieved GB/s and GFLOP/s are still written, the
fractions are null. matmul_gflops is the engine's own prefill GEMM timed by the probe; a
faster path (or cache-resident weights, for decode) shows as a share above 100%.

Writes bench/results/engine.json (cases of model sets not rerun are kept, merged by name):
  {"machine", "cpu_flags", "threads", "peer", "peer_build", "ceilings", "models",
   "cases": [{"name", "model_set", "kind", "n_prompt", "n_gen", "ctxcache_tok_s",
              "peer_tok_s", "ratio", "peer_flash_attn", "roofline", ...}, ...]}
and regenerates the table between the engine-bench markers in docs/benchmarks.md.

Rerun:  bench/build_llama_cpp.sh            # once, ~10-15 min on 2 cores
        python3 bench/bench_engine.py [--model-set smollm2|qwen2.5-0.5b|all] [--threads 2]
                [--reps 5] [--cases 'prefill_*,qwen2.5-0.5b/decode_128'] [--peer-only --out F]
Needs the gguf package, a built ctxcache binary (--binary) unless --peer-only, and
llama-bench (--llama-bench, default: where bench/build_llama_cpp.sh puts it).
"""

import argparse
import datetime
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_common import cpu_flags, machine  # noqa: E402

DEFAULT_BINARY = os.path.join(ROOT, "build", "server", "ctxcache")
BUILD_SCRIPT = os.path.join(ROOT, "bench", "build_llama_cpp.sh")
RESULTS = os.path.join(ROOT, "bench", "results", "engine.json")
ROOFLINE = os.path.join(ROOT, "bench", "results", "roofline.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- BEGIN engine-bench (bench/bench_engine.py) -->", "<!-- END engine-bench -->"

# name -> (case-name prefix, GGUF path, label). The smollm2 names carry no prefix: they are the
# names the results file has always used.
MODEL_SETS = {
    "smollm2": ("", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                "SmolLM2-135M-Instruct Q4_1"),
    "qwen2.5-0.5b": ("qwen2.5-0.5b/",
                     os.path.join(ROOT, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
                     "Qwen2.5-Coder-0.5B-Instruct Q4_K_M"),
}
FETCH_HINT = {"smollm2": "tools/fetch_model.sh",
              "qwen2.5-0.5b": "tools/fetch_model.sh qwen2.5-0.5b"}
PREFILL_LENGTHS = (512, 2048, 8192)
DECODE_DEPTHS = (128, 2048, 8192)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# What a token costs, from the GGUF.

def model_costs(path):
    """Per-token costs of a GGUF model for the roofline: decode weight bytes, KV bytes per
    cached token (fp16 K and V, as both engines store them), matrix parameters, attention
    shape and the training context."""
    from gguf import GGUFReader
    r = GGUFReader(path)

    def field(key, default=None):
        f = r.fields.get(key)
        if f is None or not f.data:
            return default
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v.tolist()[0]

    arch = field("general.architecture")
    n_layer = int(field(f"{arch}.block_count"))
    n_embd = int(field(f"{arch}.embedding_length"))
    n_head = int(field(f"{arch}.attention.head_count"))
    n_kv_head = int(field(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(field(f"{arch}.attention.key_length", n_embd // n_head))
    n_ctx_train = int(field(f"{arch}.context_length"))
    tensors = {t.name: t for t in r.tensors}
    embd = tensors["token_embd.weight"]
    tied = "output.weight" not in tensors
    n_vocab = int(embd.shape[-1])  # gguf lists ne0 (n_embd) first, then n_vocab
    # Decode: every tensor once, except the embedding, of which one row is looked up -- unless
    # the head is tied to it, then the head reads all of it.
    weight_bytes = sum(int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight")
    weight_bytes += int(embd.n_bytes) if tied else int(embd.n_bytes) // n_vocab
    layer_params = sum(int(t.n_elements) for n, t in tensors.items()
                       if n.startswith("blk.") and len(t.shape) == 2)
    head_params = int((embd if tied else tensors["output.weight"]).n_elements)
    return {
        "file": os.path.basename(path), "bytes": os.path.getsize(path), "arch": arch,
        "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv_head, "head_dim": head_dim,
        "n_ctx_train": n_ctx_train, "tied_output": tied,
        "decode_weight_bytes": weight_bytes,
        "kv_bytes_per_token": 2 * 2 * n_layer * n_kv_head * head_dim,
        "layer_matrix_params": layer_params, "head_params": head_params,
    }


def case_roofline(case, costs, ceilings, ours_tok_s, peer_tok_s):
    """{"bound", cost per token, achieved rate and fraction of the ceiling, per engine}."""
    n, m = case["n_prompt"], case["n_gen"]
    out = {}
    if case["kind"] == "decode":
        per_tok = costs["decode_weight_bytes"] + costs["kv_bytes_per_token"] * (n + m / 2)
        out.update(bound="memory", bytes_per_token=per_tok)
        ceiling = ceilings.get("read_gbs") if ceilings else None
        unit = "gbs"
    else:
        attn = 4.0 * costs["n_layer"] * costs["n_head"] * costs["head_dim"] * (n + 1) / 2
        per_tok = 2.0 * costs["layer_matrix_params"] + 2.0 * costs["head_params"] / n + attn
        out.update(bound="compute", flop_per_token=per_tok, attention_share=attn / per_tok)
        ceiling = ceilings.get("gemm_gflops") if ceilings else None
        unit = "gflops"
    out[f"ceiling_{unit}"] = ceiling
    for who, tok_s in (("ctxcache", ours_tok_s), ("peer", peer_tok_s)):
        achieved = None if tok_s is None else per_tok * tok_s / 1e9
        out[f"{who}_{unit}"] = achieved
        out[who] = achieved / ceiling if achieved is not None and ceiling else None
    return out


def load_ceilings(path, threads):
    """The machine ceilings from roofline.json; None when the file is missing, and no ceiling
    values (the reason logged) when it was measured on another machine or thread count."""
    if not os.path.exists(path):
        log(f"note: {path} not found; roofline fractions left empty (run bench/roofline.py)")
        return None
    with open(path) as f:
        r = json.load(f)
    probe = r.get("probe", {})
    source = os.path.abspath(path)
    if source.startswith(ROOT + os.sep):
        source = os.path.relpath(source, ROOT)
    ceilings = {"source": source, "date": r.get("date"),
                "threads": r.get("threads"), "read_gbs": probe.get("read_gbs"),
                "gemm_gflops": probe.get("matmul_gflops"),
                "gemm_kernel": f"ctxcache MatMul, {probe.get('matmul_type')} weights",
                "machine": r.get("machine")}
    here = machine()
    if r.get("machine"):  # CPU model and count; the kernel release may differ
        same = r["machine"].rsplit(", ", 1)[0] == here.rsplit(", ", 1)[0]
    else:  # older files name only the CPU features the probe saw
        has_amx = any(f.startswith("amx") for f in cpu_flags())
        same = ("amx" in probe.get("cpu", "")) == has_amx
    if not same or r.get("threads") != threads:
        what = (f"on another machine ({r.get('machine') or probe.get('cpu')}, this is {here})"
                if not same else f"with {r.get('threads')} threads, not {threads}")
        log(f"note: {path} was measured {what}; roofline fractions left empty -- rerun "
            "bench/roofline.py here with the same --threads")
        return dict(ceilings, matches_this_machine=False, read_gbs=None, gemm_gflops=None,
                    measured_read_gbs=probe.get("read_gbs"),
                    measured_gemm_gflops=probe.get("matmul_gflops"))
    return dict(ceilings, matches_this_machine=True)


# ---------------------------------------------------------------------------------------------
# Cases and the two engines.

def all_cases(model_set, n_gen, n_ctx_train):
    """[{name, model_set, kind, n_prompt, n_gen}] in run order for one model set."""
    prefix = MODEL_SETS[model_set][0]
    out = [{"name": f"{prefix}prefill_{n}", "model_set": model_set, "kind": "prefill",
            "n_prompt": n, "n_gen": 0} for n in PREFILL_LENGTHS if n <= n_ctx_train]
    out += [{"name": f"{prefix}decode_{d}", "model_set": model_set, "kind": "decode",
             "n_prompt": min(d, n_ctx_train - n_gen), "n_gen": n_gen} for d in DECODE_DEPTHS]
    return out


def case_order(name):
    """Sort key: model sets in MODEL_SETS order (unprefixed names are smollm2's), then the
    run order within a set."""
    prefixes = [prefix for prefix, _, _ in MODEL_SETS.values()]
    set_index = next((i for i, p in enumerate(prefixes) if p and name.startswith(p)),
                     prefixes.index("") if "/" not in name else len(prefixes))
    names = [f"prefill_{n}" for n in PREFILL_LENGTHS] + [f"decode_{d}" for d in DECODE_DEPTHS]
    rest = name.rsplit("/", 1)[-1]
    return (set_index, names.index(rest) if rest in names else len(names), name)


def run_ours(binary, model, threads, n_prompt, n_gen):
    cmd = [binary, "bench", "--model", model, "--n-prompt", str(n_prompt), "--n-gen",
           str(n_gen), "--threads", str(threads), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.strip()}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        sys.exit(f"{' '.join(cmd)} printed no JSON line:\n{p.stdout}")
    r = json.loads(lines[-1])
    return n_prompt / r["prefill_s"] if n_gen == 0 else n_gen / r["decode_s"]


class LlamaBench:
    """llama.cpp's llama-bench, one process per case, both flash-attention settings."""

    def __init__(self, path, threads, reps, repack):
        self.path, self.threads, self.reps, self.repack = path, threads, reps, repack
        self.info = None  # build_commit, build_number, cpu_info from its first JSON record

    def _run(self, model, case, repack):
        cmd = [self.path, "-m", model, "-t", str(self.threads), "-r", str(self.reps),
               "-o", "json", "-fa", "0,1", "--repack", "1" if repack else "0", "--progress"]
        if case["kind"] == "prefill":
            cmd += ["-p", str(case["n_prompt"]), "-n", "0"]
        else:
            cmd += ["-p", "0", "-n", str(case["n_gen"]), "-d", str(case["n_prompt"])]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err = []
        for line in p.stderr:  # progress lines; kept for the error message
            err.append(line.rstrip())
            if sys.stderr.isatty() and line.startswith("llama-bench: benchmark"):
                print("\r  " + line.rstrip()[len("llama-bench: "):] + "\033[K", end="",
                      file=sys.stderr, flush=True)
        out = p.stdout.read()
        rc = p.wait()
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        return cmd, rc, out, "\n".join(err[-30:])

    def run(self, model, case):
        """{"tok_s": best median, "flash_attn": "on"/"off", "by_flash_attn": {...},
        "repack": bool, "samples": {...}}."""
        cmd, rc, out, err = self._run(model, case, self.repack)
        if rc < 0 and self.repack:
            log(f"warning: llama-bench died with signal {-rc} with weight repacking on "
                f"(llama.cpp's AMX path does on some CPUs); retrying with --repack 0, and "
                f"keeping it off for the following cases")
            self.repack = False
            cmd, rc, out, err = self._run(model, case, self.repack)
        if rc != 0:
            sys.exit(f"{' '.join(cmd)} failed ({rc}):\n{err}")
        try:
            records = json.loads(out)
        except json.JSONDecodeError:
            sys.exit(f"{' '.join(cmd)} printed no JSON array:\n{out[:2000]}\n{err}")
        by_fa, samples = {}, {}
        for rec in records:
            if int(rec["n_threads"]) != self.threads:
                sys.exit(f"llama-bench ran {rec['n_threads']} threads, asked for {self.threads}")
            fa = {0: "off", 1: "on"}.get(int(rec["flash_attn"]), str(rec["flash_attn"]))
            samples[fa] = [float(x) for x in rec["samples_ts"]]
            by_fa[fa] = statistics.median(samples[fa])
            if self.info is None:
                self.info = {k: rec.get(k) for k in ("build_commit", "build_number", "cpu_info",
                                                     "backends")}
        best = max(by_fa, key=by_fa.get)
        return {"tok_s": by_fa[best], "flash_attn": best, "by_flash_attn": by_fa,
                "repack": self.repack, "samples": samples}

    def version(self, build):
        """'llama.cpp <commit> (vendored by llama-cpp-python X), llama-bench'. Built from the
        sdist there is no git history, so llama-bench's build_number is meaningless."""
        commit = (self.info or {}).get("build_commit")
        src = build.get("llama_cpp_python")
        return (f"llama.cpp {commit}" + (f" (vendored by llama-cpp-python {src})" if src else "")
                + ", llama-bench")


class InProcessPeer:
    """llama.cpp in-process through llama-cpp-python, one context per (n_prompt, n_gen)."""

    def __init__(self, threads, ubatch, flash_attn):
        import llama_cpp
        from make_logit_fixture import open_llama
        self.llama_version = llama_cpp.__version__
        self.threads, self.ubatch, self.flash_attn = threads, ubatch, flash_attn
        self.open_llama = open_llama
        self.llm, self.key = None, None

    def _context(self, model, n_prompt, n_gen):
        if self.key != (model, n_prompt, n_gen):
            self.llm = None  # free the previous context first
            n_ctx = n_prompt + n_gen
            self.llm = self.open_llama(
                model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(self.ubatch, n_ctx),
                n_threads=self.threads, n_threads_batch=self.threads,
                flash_attn=self.flash_attn, verbose=False)
            self.key = (model, n_prompt, n_gen)
            self.llm.eval(prompt_ids(min(16, n_prompt), self.llm.n_vocab()))  # warm-up
        return self.llm

    def run_once(self, model, n_prompt, n_gen):
        import numpy as np
        llm = self._context(model, n_prompt, n_gen)
        n_vocab = llm.n_vocab()
        llm.reset()  # n_tokens = 0: the next eval drops every KV entry first
        t0 = time.perf_counter()
        llm.eval(prompt_ids(n_prompt, n_vocab))
        t1 = time.perf_counter()
        for _ in range(n_gen):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        t2 = time.perf_counter()
        return n_prompt / (t1 - t0) if n_gen == 0 else n_gen / (t2 - t1)

    def version(self, build):
        return f"llama.cpp via llama-cpp-python {self.llama_version}, in-process"


def prompt_ids(n, n_vocab):
    return [1000 + (i * 37) % (n_vocab - 1000) for i in range(n)]


def find_llama_bench(explicit):
    if explicit:
        if not os.access(explicit, os.X_OK):
            sys.exit(f"--llama-bench {explicit}: not an executable")
        return explicit
    p = subprocess.run([BUILD_SCRIPT, "--check"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("llama-bench is not built: run bench/build_llama_cpp.sh (~10-15 min on 2 "
                 "cores) or pass --llama-bench PATH")
    return os.path.join(p.stdout.strip(), "llama-bench")


def peer_build_info(llama_bench):
    """What build_llama_cpp.sh recorded next to its build, if that is where the binary is."""
    info = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(llama_bench))),
                        "build-info.json")
    base = {"binary": llama_bench, "built_by": "bench/build_llama_cpp.sh"}
    if os.path.exists(info):
        with open(info) as f:
            return dict(base, **json.load(f))
    return dict(base, built_by="unknown (not built by bench/build_llama_cpp.sh)")


# ---------------------------------------------------------------------------------------------
# Results.

def fmt(x, spec, none="—"):
    return none if x is None else format(x, spec)


def write_doc(result):
    ceil = result.get("ceilings") or {}
    rows = ["| case | ctxcache tok/s | llama.cpp tok/s | best -fa | ratio (ours/peer) | "
            "roofline ours | roofline peer |",
            "|---|---:|---:|:-:|---:|---:|---:|"]
    for c in result["cases"]:
        rl = c.get("roofline") or {}
        unit = "GB/s" if rl.get("bound") == "memory" else "GFLOP/s"
        key = "gbs" if rl.get("bound") == "memory" else "gflops"

        def roof(who):
            if not rl or rl.get(f"{who}_{key}") is None:
                return "—"
            frac = f" ({100 * rl[who]:.0f}%)" if rl.get(who) is not None else ""
            return f"{rl[f'{who}_{key}']:.1f} {unit}{frac}"

        rows.append(f"| {c['name']} | {fmt(c['ctxcache_tok_s'], '.1f')} | "
                    f"{fmt(c['peer_tok_s'], '.1f')} | {c.get('peer_flash_attn') or '—'} | "
                    f"{fmt(c['ratio'], '.2f')} | {roof('ctxcache')} | {roof('peer')} |")
    models = "; ".join(f"{ms}: {m['label']} ({m['file']})"
                       for ms, m in result.get("models", {}).items())
    if ceil.get("matches_this_machine"):
        ceil_text = (f"Roofline: decode as achieved GB/s (bytes read per token x tok/s) and its "
                     f"share of the measured {ceil['read_gbs']:.1f} GB/s read bandwidth; "
                     f"prefill as achieved GFLOP/s and its share of the "
                     f"{ceil['gemm_gflops']:.0f} GFLOP/s peak of the best GEMM kernel "
                     f"({ceil['gemm_kernel']}; {ceil['source']}, {ceil['date']}).")
    else:
        why = (f"{ceil['source']} was measured on another machine or thread count" if ceil
               else "no ceilings were available")
        ceil_text = ("Roofline: achieved GB/s (decode: bytes read per token x tok/s) and GFLOP/s "
                     f"(prefill); no share of peak, because {why} (run bench/roofline.py on "
                     "this machine, then this script).")
    if any(c.get("peer") != "llama-bench" for c in result["cases"]):
        ceil_text += (" Cases without a `best -fa` were measured against the in-process "
                      "llama-cpp-python peer.")
    if any((c.get("roofline") or {}).get(who, 0) and c["roofline"][who] > 1
           for c in result["cases"] for who in ("ctxcache", "peer")):
        ceil_text += (" A share above 100% means the probe's ceiling is not that case's real "
                      "limit: weights partly served from the CPU caches (decode), or a faster "
                      "GEMM path than the one the probe times (prefill).")
    dates = sorted({c["date"] for c in result["cases"] if c.get("date")})
    section = "\n".join([
        BEGIN,
        f"Measured {', '.join(dates) or 'on an unrecorded date'} on {result['machine']}; "
        f"{result['threads']} threads; peer {result['peer']} "
        f"({result.get('peer_build', {}).get('cmake_flags', 'build flags unrecorded')}). "
        f"Models: {models}. Median of the repetitions; the peer's number is the faster of "
        "flash attention off and on (`best -fa`); decode_D times the one-token steps after D "
        f"tokens are cached. {ceil_text} Regenerate with `python3 bench/bench_engine.py "
        "--model-set all`.",
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


def save(path, header, new_cases):
    """Writes header + cases, keeping the earlier cases this run did not measure (merged by
    name) and the earlier model descriptions."""
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    cases = {c["name"]: c for c in old.get("cases", [])}
    cases.update({c["name"]: c for c in new_cases})
    models = dict(old.get("models", {}), **header.get("models", {}))
    result = dict(header, models=models,
                  cases=sorted(cases.values(), key=lambda c: case_order(c["name"])))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model-set", choices=[*MODEL_SETS, "all"], default="smollm2",
                    help="which model(s) to run (%(default)s)")
    ap.add_argument("--model", help="GGUF path overriding the model set's file (one set only)")
    ap.add_argument("--cases", "--only", default="",
                    help="comma-separated case names or shell patterns to run, e.g. "
                         "'prefill_*' or 'qwen2.5-0.5b/decode_2048' (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both (%(default)s)")
    ap.add_argument("--reps", type=int, default=5,
                    help="repetitions per case and engine (%(default)s; the results file in "
                         "the repository needs at least 5)")
    ap.add_argument("--n-gen", type=int, default=64, help="decode steps timed (%(default)s)")
    ap.add_argument("--binary", default=DEFAULT_BINARY, help="ctxcache binary (%(default)s)")
    ap.add_argument("--peer", choices=["llama-bench", "inprocess"], default="llama-bench",
                    help="how llama.cpp is measured (%(default)s)")
    ap.add_argument("--llama-bench", help="llama-bench binary (default: the one "
                                          "bench/build_llama_cpp.sh built)")
    ap.add_argument("--peer-repack", choices=["on", "off"], default="on",
                    help="llama-bench weight repacking; on falls back to off if it crashes "
                         "(%(default)s)")
    ap.add_argument("--peer-ubatch", type=int, default=512,
                    help="--peer inprocess: n_ubatch (%(default)s)")
    ap.add_argument("--peer-flash-attn", choices=["on", "off"], default="off",
                    help="--peer inprocess: flash attention (%(default)s)")
    ap.add_argument("--peer-only", action="store_true",
                    help="measure llama.cpp alone (no ctxcache binary needed; needs --out)")
    ap.add_argument("--roofline", default=ROOFLINE, help="machine ceilings (%(default)s)")
    ap.add_argument("--out", default=RESULTS, help="results JSON (%(default)s)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--doc-only", action="store_true",
                    help="measure nothing: regenerate the docs/benchmarks.md table from --out")
    args = ap.parse_args()
    if args.doc_only:
        with open(args.out) as f:
            write_doc(json.load(f))
        log(f"updated {DOC} from {args.out}")
        return

    to_repo = os.path.abspath(args.out) == RESULTS
    if to_repo and args.reps < 5:
        ap.error("--reps below 5 only with --out elsewhere (the committed results are medians "
                 "of at least 5)")
    if to_repo and args.peer_only:
        ap.error("--peer-only results would replace ctxcache's numbers: pass --out elsewhere")
    if args.reps < 1 or args.threads < 1 or args.n_gen < 1:
        ap.error("--reps, --threads and --n-gen must be positive")
    sets = list(MODEL_SETS) if args.model_set == "all" else [args.model_set]
    if args.model and len(sets) > 1:
        ap.error("--model needs a single --model-set")
    if not args.peer_only and not os.access(args.binary, os.X_OK):
        sys.exit(f"ctxcache binary not found: {args.binary}\nbuild it (cmake --build build "
                 "--target ctxcache), pass --binary, or use --peer-only --out FILE")

    # Models and cases.
    models, selected, costs = {}, [], {}
    patterns = [p for p in args.cases.split(",") if p]
    for ms in sets:
        path = args.model or MODEL_SETS[ms][1]
        if not os.path.exists(path):
            sys.exit(f"model not found: {path} (run {FETCH_HINT[ms]})")
        costs[ms] = model_costs(path)
        models[ms] = {"label": MODEL_SETS[ms][2], "path": os.path.relpath(path, ROOT),
                      **{k: costs[ms][k] for k in ("file", "bytes", "arch", "n_ctx_train",
                                                   "tied_output", "decode_weight_bytes",
                                                   "kv_bytes_per_token",
                                                   "layer_matrix_params")}}
        for c in all_cases(ms, args.n_gen, costs[ms]["n_ctx_train"]):
            if not patterns or any(fnmatch.fnmatchcase(c["name"], p) for p in patterns):
                selected.append(dict(c, model=path))
    if not selected:
        sys.exit(f"no case matches --cases {args.cases!r}")
    ceilings = load_ceilings(args.roofline, args.threads)

    if args.peer == "llama-bench":
        lb_path = find_llama_bench(args.llama_bench)
        peer = LlamaBench(lb_path, args.threads, args.reps, args.peer_repack == "on")
        peer_build = peer_build_info(lb_path)
    else:
        peer = InProcessPeer(args.threads, args.peer_ubatch, args.peer_flash_attn == "on")
        peer_build = {"built_by": "llama-cpp-python wheel",
                      "cmake_flags": f"llama-cpp-python {peer.llama_version}, n_ubatch "
                                     f"{args.peer_ubatch}, no weight repacking"}

    out_cases = []
    t_start = time.time()
    for i, c in enumerate(selected):
        load = os.getloadavg()[0]
        log(f"[{i + 1}/{len(selected)}] {c['name']}: "
            + (f"prefill {c['n_prompt']} tokens" if c["kind"] == "prefill" else
               f"{c['n_gen']} decode steps at depth {c['n_prompt']}")
            + f" (load {load:.1f}, {time.time() - t_start:.0f} s so far)")
        ours, extra = [], {}
        if args.peer == "llama-bench":
            r = peer.run(c["model"], c)
            p, fa = r["tok_s"], r["flash_attn"]
            extra = {"peer_tok_s_by_flash_attn": r["by_flash_attn"], "peer_repack": r["repack"],
                     "peer_samples_tok_s": r["samples"]}
            if not args.peer_only:
                ours = [run_ours(args.binary, c["model"], args.threads, c["n_prompt"],
                                 c["n_gen"]) for _ in range(args.reps)]
        else:
            peer_runs = []
            for rep in range(args.reps):  # alternate, so both see the same machine state
                for who in (("peer", "ours") if rep % 2 == 0 else ("ours", "peer")):
                    if who == "peer":
                        peer_runs.append(peer.run_once(c["model"], c["n_prompt"], c["n_gen"]))
                    elif not args.peer_only:
                        ours.append(run_ours(args.binary, c["model"], args.threads,
                                             c["n_prompt"], c["n_gen"]))
            p, fa = statistics.median(peer_runs), args.peer_flash_attn
            extra = {"peer_samples_tok_s": {fa: peer_runs}}
        o = statistics.median(ours) if ours else None
        case = {
            "name": c["name"], "model_set": c["model_set"], "kind": c["kind"],
            "n_prompt": c["n_prompt"], "n_gen": c["n_gen"],
            "ctxcache_tok_s": o, "peer_tok_s": p, "ratio": o / p if o is not None else None,
            "peer_flash_attn": fa,
            "roofline": case_roofline(c, costs[c["model_set"]], ceilings, o, p),
            "peer": args.peer, "threads": args.threads, "reps": args.reps,
            "ctxcache_samples_tok_s": ours or None,
            **extra, "loadavg": round(load, 2),
            "date": datetime.date.today().isoformat(),
        }
        out_cases.append(case)
        log(f"    peer {p:.1f} tok/s (fa {fa}"
            + (", " + ", ".join(f"{k} {v:.1f}" for k, v in
                                extra["peer_tok_s_by_flash_attn"].items())
               if "peer_tok_s_by_flash_attn" in extra else "") + ")"
            + (f"; ours {o:.1f} tok/s, ratio {o / p:.2f}" if o is not None else ""))

    header = {
        "machine": machine(), "cpu_flags": " ".join(cpu_flags()), "threads": args.threads,
        "peer": peer.version(peer_build), "peer_build": peer_build, "ceilings": ceilings,
        "models": models,
    }
    result = save(args.out, header, out_cases)
    log(f"wrote {args.out} ({len(out_cases)} cases measured, {len(result['cases'])} in the "
        f"file; {time.time() - t_start:.0f} s)")
    if not args.no_doc:
        if to_repo:
            write_doc(result)
            log(f"updated {DOC}")
        else:
            log(f"{DOC} not touched (results went to {args.out}, not {RESULTS})")


if __name__ == "__main__":
    main()
