#!/usr/bin/env python3
"""Cross-check ctxcache's finch / snapkv / expected_attention against NVIDIA kvpress.

Both sides see the same GGUF (models/SmolLM2-135M-Instruct.Q4_1.gguf; transformers
dequantizes it to fp32, ctxcache runs it natively) and exactly the same token ids (taken from
`ctxcache tokenize`). For every context, method and ratio the script

  * runs `ctxcache compress` and reads the kept ORIGINAL positions per (layer, KV head) from the
    context file (tools/ctxc.py);
  * runs the model through transformers once over [document ; window] (snapkv, finch) and once
    over the document alone (expected_attention), and inside a forward hook on every attention
    layer calls kvpress's own press.score() (SnapKVPress, FinchPress, ExpectedAttentionPress) on
    that layer's hidden states, keys and values — the same call BasePress.forward_hook makes;
  * selects from those scores two ways: "matched" (ctxcache's budget ceil(n / ratio) over the
    document entries, the 4 sinks forced, ties to the later position: ctxcache's selector) and
    "native" (kvpress's own ScorerPress / FinchPress.compress rule: n_kept = int(k_len * (1 -
    compression_ratio)) over document + window, the window padded with max + 1, no forced
    sinks for snapkv/finch);
  * runs controls that separate "algorithm" from "numerics": kvpress scores on ctxcache's own
    K/V (dumped with `compress --method none --dtype fp32`), ExpectedAttentionPress with query
    statistics from the last 128 queries (ctxcache's documented deviation), and a reference
    implementation of ctxcache's chunked Finch written with kvpress's primitives on transformers;
  * reports |ours ∩ theirs| / budget per (layer, KV head) (and Jaccard), mean / min, per layer,
    and classifies every differing entry (sink, within 10% of the budget boundary in kvpress's
    ranking = near tie, or far).

Setup (dev only; CPU torch is enough):
    pip install kvpress transformers torch gguf numpy
Run (the committed eval/results/kvpress_crosscheck.json; 17 min on 2 cores shared with a
benchmark at load ~5.5, `--ratios 4` alone takes about 60% of that):
    nice -n 10 python3 tools/kvpress_crosscheck.py --threads 2 --ratios 4 8 \
        --out eval/results/kvpress_crosscheck.json
See docs/kvpress_crosscheck.md for the results and the explanation of every difference.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctxc import read_ctxc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERIC_INSTRUCTION = "\nSummarize the document above."  # engine/compress/compress.h
N_SINK = 4            # CompressionSpec::n_sink
KERNEL = 5            # CompressionSpec::kernel (snapkv avg pooling)
N_FUTURE = 512        # CompressionSpec::n_future (expected_attention)
EA_STATS_ROWS = 128   # expected_attention.cc kStatsRows
FINCH_CHUNK = 512     # CompressionSpec::chunk
NEEDLE = "The special magic number is 7341928."

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Contexts: deterministic public text shipped with every CPython (pydoc_data: the Python
# Language Reference, PSF licence; textwrap.py source). The text depends on the Python version,
# so the JSON records each context's sha256 of the token ids.
# ---------------------------------------------------------------------------------------------

def _cut(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    i = text.rfind("\n\n", 0, n)
    return text[: i if i > n * 0.7 else n]


def build_contexts():
    from pydoc_data.topics import topics
    import textwrap

    execmodel = _cut(topics["execmodel"], 6500)
    # The needle goes at a sentence end ~40% into the document.
    at = execmodel.find(". ", int(len(execmodel) * 0.4)) + 1
    niah = execmodel[:at] + " " + NEEDLE + execmodel[at:]
    return [
        {"name": "niah_execmodel", "source": "pydoc_data.topics['execmodel'] + needle",
         "text": niah, "question": "What is the special magic number?"},
        {"name": "qa_import", "source": "pydoc_data.topics['import']",
         "text": _cut(topics["import"], 7000),
         "question": "What is raised if the attribute is not found in a from-import?"},
        {"name": "code_textwrap_noq", "source": "inspect.getsource(textwrap)",
         "text": _cut(inspect.getsource(textwrap), 6000), "question": ""},
        {"name": "qa_compound_2k", "source": "pydoc_data.topics['compound']",
         "text": _cut(topics["compound"], 8500),
         "question": "When is the else clause of a while loop executed?"},
    ]


# ---------------------------------------------------------------------------------------------
# ctxcache side
# ---------------------------------------------------------------------------------------------

def tokenize(cli, model, text, bos=True):
    cmd = [cli, "tokenize", "--model", model, "--ids-only"] + ([] if bos else ["--no-bos"]) + ["-"]
    out = subprocess.run(cmd, input=text.encode(), capture_output=True, check=True).stdout
    return [int(x) for x in out.split()]


def ours_compress(cli, model, doc_path, method, ratio, question, out, threads, chunk=None,
                  dtype="fp16"):
    cmd = [cli, "compress", "--model", model, "--method", method, "--doc", doc_path,
           "--out", out, "--json", "--quiet", "--threads", str(threads), "--dtype", dtype]
    if ratio:
        cmd += ["--ratio", str(ratio)]
    if question:
        cmd += ["--question", question]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1]), time.time() - t, cmd


# ---------------------------------------------------------------------------------------------
# Selection and metrics
# ---------------------------------------------------------------------------------------------

def order_desc(scores: np.ndarray) -> np.ndarray:
    """Indices by score descending, ties to the later position (ctxcache's selector)."""
    pos = np.arange(len(scores))
    return np.lexsort((-pos, -scores))


def select_matched(scores: np.ndarray, budget: int, n_sink: int = N_SINK) -> np.ndarray:
    """ctxcache's Select on kvpress scores: sinks forced, then the top budget - sinks."""
    n = len(scores)
    s = scores.astype(np.float64).copy()
    s[np.isnan(s)] = -np.inf
    s[:min(n_sink, n)] = np.inf
    return np.sort(order_desc(s)[:min(budget, n)])


def select_native(scores: np.ndarray, n_doc: int, k_len: int, ratio: float) -> np.ndarray:
    """kvpress ScorerPress.compress: topk(int(k_len * (1 - cr))) over all scores (window
    included, already padded); returns the kept document positions."""
    cr = 1.0 - 1.0 / ratio
    n_kept = max(1, int(k_len * (1 - cr)))
    idx = np.argsort(-scores, kind="stable")[:n_kept]
    return np.sort(idx[idx < n_doc])


def select_native_chunked(scores: np.ndarray, n_doc: int, ratio: float, chunk: int) -> np.ndarray:
    """FinchPress.compress with chunk_length: every chunk of the padded scores keeps
    int(len * (1 - cr)) by topk."""
    cr = 1.0 - 1.0 / ratio
    kept = []
    for i in range(0, len(scores), chunk):
        c = scores[i:i + chunk]
        k = max(1, int(len(c) * (1 - cr)))
        kept.append(i + np.argsort(-c, kind="stable")[:k])
    idx = np.concatenate(kept)
    return np.sort(idx[idx < n_doc])


def compare(ours, theirs, their_scores, budget, n_layers, n_kv, gaps_ok=True):
    """ours/theirs: [L][h] position arrays; their_scores: [L][h] kvpress doc scores (for the
    near-tie classification) or None."""
    ov = np.zeros((n_layers, n_kv))
    jac = np.zeros((n_layers, n_kv))
    cat = {"ours_only": 0, "theirs_only": 0, "sink": 0, "near_tie": 0, "far": 0}
    gaps = []
    worst = []
    for L in range(n_layers):
        for h in range(n_kv):
            a = set(int(x) for x in ours[L][h])
            b = set(int(x) for x in theirs[L][h])
            inter = len(a & b)
            ov[L, h] = inter / max(1, budget)
            jac[L, h] = inter / max(1, len(a | b))
            oo, to = a - b, b - a
            cat["ours_only"] += len(oo)
            cat["theirs_only"] += len(to)
            if their_scores is None or not (oo or to):
                continue
            s = np.asarray(their_scores[L][h], dtype=np.float64).copy()
            s[:N_SINK] = np.inf  # rank among the non-sink entries, as both selectors do
            order = order_desc(s)
            rank = np.empty(len(s), dtype=np.int64)
            rank[order] = np.arange(len(s))
            thr = s[order[min(budget, len(s)) - 1]]
            lo, hi = int(budget * 0.9), int(math.ceil(budget * 1.1))
            for p in oo | to:
                if p < N_SINK:
                    cat["sink"] += 1
                elif lo <= rank[p] < hi:
                    cat["near_tie"] += 1
                else:
                    cat["far"] += 1
            for p in (oo if gaps_ok else ()):
                if p >= N_SINK and np.isfinite(thr) and thr > 0:
                    gaps.append((thr - s[p]) / abs(thr))
            if ov[L, h] < 0.8:
                worst.append({"layer": L, "head": h, "overlap": round(float(ov[L, h]), 4),
                              "ours_only": sorted(oo)[:12], "theirs_only": sorted(to)[:12]})
    diff = cat["ours_only"] + cat["theirs_only"]
    out = {
        "budget": int(budget),
        "overlap_mean": float(ov.mean()), "overlap_min": float(ov.min()),
        "jaccard_mean": float(jac.mean()),
        "overlap_per_layer": [round(float(x), 4) for x in ov.mean(axis=1)],
        "overlap_min_head": {"layer": int(np.unravel_index(ov.argmin(), ov.shape)[0]),
                             "head": int(np.unravel_index(ov.argmin(), ov.shape)[1])},
        "differing_entries": cat,
    }
    if their_scores is not None and diff:
        out["differing_fraction"] = {k: round(cat[k] / diff, 4)
                                     for k in ("sink", "near_tie", "far")}
    if gaps:
        out["ours_only_relative_score_gap_median"] = float(np.median(gaps))
        out["ours_only_relative_score_gap_p90"] = float(np.percentile(gaps, 90))
    out["worst_heads"] = sorted(worst, key=lambda w: w["overlap"])[:5]
    return out


# ---------------------------------------------------------------------------------------------
# transformers / kvpress side
# ---------------------------------------------------------------------------------------------

def gguf_to_hf_perm(head_dim):
    """ctxcache keeps K in the GGUF row order (llama.cpp permutes q/k for interleaved RoPE);
    transformers un-permutes it. HF dim j = c * d/2 + i is GGUF dim 2 i + c."""
    half = head_dim // 2
    return np.array([(j % half) * 2 + j // half for j in range(head_dim)])


class Hooks:
    """Calls fn(layer_idx, module, hidden_states, keys, values, kwargs) after every attention
    layer, with the layer's full cache (like kvpress BasePress.forward_hook)."""

    def __init__(self, model, fn):
        self.model, self.fn, self.handles = model, fn, []

    def __enter__(self):
        lm = self.model.model
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb  # as kvpress BasePress.__call__ does
            self.handles.append(layer.self_attn.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def _hook(self, module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        layer = cache.layers[module.layer_idx]
        self.fn(module.layer_idx, module, kwargs["hidden_states"], layer, kwargs)
        return output

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def run_kvpress(model, ids_doc, ids_win, ours_kv, ratios):
    """Returns per-method kvpress scores per layer: dict name -> [L] np.array [n_kv, n_doc or
    n_doc + w] (the press's own output)."""
    import torch
    from transformers import DynamicCache
    from kvpress import ExpectedAttentionPress, FinchPress, SnapKVPress
    from kvpress.utils import get_prerope_query_states

    n, w = len(ids_doc), len(ids_win)
    d = model.config.head_dim
    perm = torch.from_numpy(gguf_to_hf_perm(d))
    snap = SnapKVPress(compression_ratio=0.75, window_size=w, kernel_size=KERNEL)
    finch = FinchPress(compression_ratio=0.75, normalize_scores=True)
    finch.window_size = w  # set by the delimiter hook in the pipeline; here we know it
    ea = ExpectedAttentionPress(compression_ratio=0.75, n_future_positions=N_FUTURE, n_sink=N_SINK,
                                use_covariance=True, use_vnorm=True, epsilon=0.0)

    class EALast128(ExpectedAttentionPress):
        """kvpress ExpectedAttentionPress with ctxcache's statistics: mean / covariance of the
        pre-RoPE queries of the document's last 128 tokens (instead of all but the sinks)."""

        def get_query_statistics(self, module, hidden_states):
            q_len = hidden_states.shape[1]
            rows = min(EA_STATS_ROWS, max(1, q_len - (module.head_dim + 1) - self.n_sink))
            q = get_prerope_query_states(module, hidden_states[:, q_len - rows:])
            mu = q.mean(dim=2, keepdim=True)
            c = q - mu
            cov = torch.einsum("bnsi,bnsj->bnij", c, c) / rows
            return self.apply_avg_rope(module, mu.squeeze(2), cov, q_len)

    ea128 = EALast128(compression_ratio=0.75, n_future_positions=N_FUTURE, n_sink=N_SINK)

    class FinchCountPlus1(FinchPress):
        """FinchPress.score with ctxcache's normalisation: window row j (0-based) sees
        n + j + 1 keys, kvpress multiplies it by arange(k_len - w, k_len)[j] = n + j."""

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            bsz, n_kv_, k_len, _ = keys.shape
            groups = module.config.num_attention_heads // n_kv_
            attn = SnapKVPress.compute_window_attention(
                module, hidden_states, keys, self.window_size, kwargs["position_embeddings"])
            counts = torch.arange(k_len - self.window_size + 1, k_len + 1)[None, None, :, None]
            s = (attn * counts).mean(dim=-2)
            return s.view(bsz, n_kv_, groups, k_len - self.window_size).mean(dim=2)

    finch1 = FinchCountPlus1(compression_ratio=0.75, normalize_scores=True)
    finch1.window_size = w
    # What kvpress's pipeline does with SnapKVPress by default: the question is not part of the
    # compressed context, the window is the context's own last 64 tokens.
    snap64 = SnapKVPress(compression_ratio=0.75, window_size=64, kernel_size=KERNEL)

    def our_kv(L, hf_keys, hf_values):
        # K rows are in GGUF order (permuted); V rows are not permuted by the conversion.
        hs = range(ours_kv.n_kv_heads)
        ok = torch.from_numpy(np.stack([ours_kv.keys[L][h][:, perm] for h in hs]))[None]
        ov = torch.from_numpy(np.stack([ours_kv.values[L][h] for h in hs]))[None]
        k = torch.cat([ok, hf_keys[:, :, n:]], dim=2)
        v = torch.cat([ov, hf_values[:, :, n:]], dim=2)
        return k, v

    res = {k: [] for k in ("snapkv", "snapkv_ourkv", "finch", "finch_ourkv", "finch_plus1",
                           "snapkv_last64", "ea", "ea_ourkv", "ea_last128", "ea_last128_ourkv")}
    kv_err = []

    def hook_win(L, module, hs, layer, kwargs):
        k, v = layer.keys, layer.values
        res["snapkv"].append(snap.score(module, hs, k, v, None, kwargs)[0].float().numpy())
        res["finch"].append(finch.score(module, hs, k, v, None, kwargs)[0].float().numpy())
        res["finch_plus1"].append(finch1.score(module, hs, k, v, None, kwargs)[0].float().numpy())
        ok, ov = our_kv(L, k, v)
        res["snapkv_ourkv"].append(snap.score(module, hs, ok, ov, None, kwargs)[0].float().numpy())
        res["finch_ourkv"].append(finch.score(module, hs, ok, ov, None, kwargs)[0].float().numpy())

    def hook_doc(L, module, hs, layer, kwargs):
        k, v = layer.keys, layer.values
        res["ea"].append(ea.score(module, hs, k, v, None, kwargs)[0].float().numpy())
        res["snapkv_last64"].append(snap64.score(module, hs, k, v, None, kwargs)[0].float().numpy())
        res["ea_last128"].append(ea128.score(module, hs, k, v, None, kwargs)[0].float().numpy())
        ok, ov = our_kv(L, k, v)
        res["ea_ourkv"].append(ea.score(module, hs, ok, ov, None, kwargs)[0].float().numpy())
        res["ea_last128_ourkv"].append(ea128.score(module, hs, ok, ov, None, kwargs)[0].float().numpy())
        kv_err.append({
            "layer": L,
            "k_rel_err": float((ok - k).norm() / k.norm()),
            "v_rel_err": float((ov - v).norm() / v.norm()),
        })

    with torch.no_grad():
        with Hooks(model, hook_win):
            model(torch.tensor([ids_doc + ids_win]), past_key_values=DynamicCache(), use_cache=True)
        with Hooks(model, hook_doc):
            model(torch.tensor([ids_doc]), past_key_values=DynamicCache(), use_cache=True)
    return res, kv_err


def reference_finch_chunked(model, ids_doc, ids_win, budget, chunk):
    """ctxcache's Finch (engine/compress/finch.cc) re-implemented on transformers with kvpress's
    SnapKVPress.compute_window_attention: for each chunk run [chunk ; window] on the compressed
    cache (keys keep their original positions), weight window row j by (m_j)/(keys last row sees)
    / w, average over rows and the GQA group, average-pool the scores over positions (kernel 5,
    positions a head does not hold count as zeros), keep the top budget + deferred of survivors +
    chunk, where the chunk itself is deferred (forced, judged in the next pass) unless it is the
    last one (finch method version 2; sinks forced, ties to the later position), drop the
    window. Returns [L][h] positions."""
    import torch
    from transformers import DynamicCache
    from kvpress import SnapKVPress

    n, w = len(ids_doc), len(ids_win)
    cfg = model.config
    n_kv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    positions = [np.zeros((n_kv, 0), dtype=np.int64) for _ in range(cfg.num_hidden_layers)]
    cache = DynamicCache()
    state = {}

    def hook(L, module, hs, layer, kwargs):
        k, v = layer.keys, layer.values  # [1, n_kv, m + w, d]
        m = k.shape[2] - w
        attn = SnapKVPress.compute_window_attention(module, hs, k, w, kwargs["position_embeddings"])
        wts = torch.tensor([(m + j + 1) / (m + w) / w for j in range(w)], dtype=attn.dtype)
        s = (attn * wts[None, None, :, None]).sum(dim=2)              # [1, H, m]
        s = s.view(1, n_kv, group, m).mean(dim=2)[0].float().numpy()  # [n_kv, m]
        pos = np.concatenate([positions[L], np.tile(state["chunk_pos"], (n_kv, 1))], axis=1)
        target = state["target"]
        if target < m:
            keep = np.stack([
                select_by_pos(pool_by_pos(s[h], pos[h], POOL_KERNEL), pos[h], target,
                              state["recent_from"]) for h in range(n_kv)])
        else:
            keep = np.tile(np.arange(m), (n_kv, 1))
        idx = torch.from_numpy(keep)[None, :, :, None].expand(-1, -1, -1, k.shape[3])
        layer.keys = k[:, :, :m].gather(2, idx).contiguous()
        layer.values = v[:, :, :m].gather(2, idx).contiguous()
        positions[L] = np.take_along_axis(pos, keep, axis=1)

    with torch.no_grad(), Hooks(model, hook):
        for b in range(0, n, chunk):
            e = min(n, b + chunk)
            state["chunk_pos"] = np.arange(b, e)
            deferred = e - b if e < n else 0  # the last chunk is judged in its own pass
            state["target"] = budget + deferred
            state["recent_from"] = e - deferred
            past = cache.get_seq_length()
            toks = ids_doc[b:e] + ids_win
            model(torch.tensor([toks]), past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(b, b + len(toks))[None],
                  cache_position=torch.arange(past, past + len(toks)))
    return [[positions[L][h] for h in range(n_kv)] for L in range(cfg.num_hidden_layers)]


POOL_KERNEL = 5  # finch.cc kPoolKernel


def pool_by_pos(scores, pos, kernel):
    """select.cc PoolByPosition: entry i's score becomes the sum of the scores of the entries
    within kernel // 2 positions of pos[i], over kernel (missing positions count as zeros)."""
    half = kernel // 2
    s = scores.astype(np.float64)
    lo = np.searchsorted(pos, pos - half, side="left")
    hi = np.searchsorted(pos, pos + half, side="right")
    c = np.concatenate([[0.0], np.cumsum(s)])
    return (c[hi] - c[lo]) / kernel


def select_by_pos(scores, pos, budget, recent_from=None):
    """Indices into scores (ascending) kept by ctxcache's Select: sinks (by original position)
    first, then entries at positions >= recent_from, then the best scores, ties to the later
    position."""
    s = scores.astype(np.float64).copy()
    tier = np.where(pos < N_SINK, 2, 0)
    if recent_from is not None:
        tier = np.where((tier == 0) & (pos >= recent_from), 1, tier)
    order = np.lexsort((-pos, -s, -tier))
    return np.sort(order[:budget])


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Writes a JSON report; see docs/kvpress_crosscheck.md.")
    ap.add_argument("--ctxcache", default=os.path.join(REPO, "build/server/ctxcache"))
    ap.add_argument("--model", default=os.path.join(REPO, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0],
                    help="compression factors (8 = keep 1/8); default 4")
    ap.add_argument("--contexts", nargs="*",
                    default=["niah_execmodel", "qa_import", "code_textwrap_noq"],
                    help="context names, or 'all' (niah_execmodel qa_import code_textwrap_noq "
                         "qa_compound_2k; default: the first three)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ctxcache threads")
    ap.add_argument("--out", default=os.path.join(REPO, "eval/results/kvpress_crosscheck.json"))
    ap.add_argument("--workdir", default=None, help="keep the .ctxc files here (default: a temp dir)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    import kvpress
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    contexts = build_contexts()
    if args.contexts and "all" not in args.contexts:
        unknown = set(args.contexts) - {c["name"] for c in contexts}
        if unknown:
            ap.error(f"unknown context(s) {sorted(unknown)}")
        contexts = [c for c in contexts if c["name"] in args.contexts]
    work = args.workdir or tempfile.mkdtemp(prefix="kvpress_xcheck_")
    os.makedirs(work, exist_ok=True)

    log(f"loading {args.model} through transformers (dequantized to fp32)")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.model)), gguf_file=os.path.basename(args.model),
        dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    cfg = model.config
    n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads

    report = {
        "meta": {
            "model": os.path.relpath(args.model, REPO),
            "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else
            __import__("importlib.metadata").metadata.version("kvpress"),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": args.threads,
            "ctxcache_sha256": hashlib.sha256(open(args.ctxcache, "rb").read()).hexdigest(),
            "ratios": args.ratios,
            "overlap": "per (layer, KV head): |ours ∩ theirs| / budget (budget = ours, "
                       "ceil(n_doc / ratio)); jaccard = |∩| / |∪|",
            "settings": {"n_sink": N_SINK, "snapkv_kernel": KERNEL, "pooling": "avg",
                         "n_future_positions": N_FUTURE, "ea_stats_rows_ours": EA_STATS_ROWS,
                         "finch_chunk": FINCH_CHUNK, "use_covariance": True, "use_vnorm": True,
                         "epsilon": 0.0},
        },
        "contexts": [], "numerics": [], "comparisons": [],
    }
    rows = []

    for ci, c in enumerate(contexts):
        t_ctx = time.time()
        log(f"context {ci + 1}/{len(contexts)}: {c['name']}")
        doc_path = os.path.join(work, f"{c['name']}.txt")
        with open(doc_path, "w") as f:
            f.write(c["text"])
        ids_doc = tokenize(args.ctxcache, args.model, c["text"], bos=True)
        ids_win = tokenize(args.ctxcache, args.model, c["question"] or GENERIC_INSTRUCTION, bos=False)
        n, w = len(ids_doc), len(ids_win)
        report["contexts"].append({
            "name": c["name"], "source": c["source"], "chars": len(c["text"]), "n_tokens": n,
            "question": c["question"] or None, "window": c["question"] or GENERIC_INSTRUCTION,
            "n_window": w, "ids_sha256": hashlib.sha256(
                (" ".join(map(str, ids_doc)) + "|" + " ".join(map(str, ids_win))).encode()).hexdigest(),
            "first_ids": ids_doc[:8],
        })
        log(f"  {n} document tokens, window of {w} tokens; ctxcache full K/V dump (fp32)")
        none_path = os.path.join(work, f"{c['name']}.none.ctxc")
        ours_compress(args.ctxcache, args.model, doc_path, "none", None, "", none_path,
                      args.threads, dtype="fp32")
        ours_kv = read_ctxc(none_path, check_crc=False)
        assert ours_kv.source_tokens == n, "ctxcache and tokenize disagree on the token count"

        log("  kvpress scores (transformers forward over doc+window and over doc)")
        sc, kv_err = run_kvpress(model, ids_doc, ids_win, ours_kv, args.ratios)
        report["numerics"].append({
            "context": c["name"],
            "k_rel_err_per_layer": [round(e["k_rel_err"], 5) for e in kv_err],
            "v_rel_err_per_layer": [round(e["v_rel_err"], 5) for e in kv_err],
        })
        del ours_kv

        def doc_scores(name):
            return [[sc[name][L][h][:n] for h in range(n_kv)] for L in range(n_layers)]

        def per_head(fn):
            return [[fn(L, h) for h in range(n_kv)] for L in range(n_layers)]

        for ratio in args.ratios:
            budget = min(n, int(math.ceil(n / ratio)))
            ours = {}
            for key, method, chunk in (("snapkv", "snapkv", None), ("finch", "finch", None),
                                       ("finch_1chunk", "finch", max(n, FINCH_CHUNK)),
                                       ("expected_attention", "expected_attention", None)):
                path = os.path.join(work, f"{c['name']}.{key}.r{ratio:g}.ctxc")
                meta, secs, cmd = ours_compress(args.ctxcache, args.model, doc_path, method, ratio,
                                                c["question"], path, args.threads, chunk=chunk)
                ctx = read_ctxc(path, check_crc=False, load_rows=False)
                assert ctx.source_tokens == n
                ours[key] = ctx.positions
                rel = [os.path.relpath(a, REPO) if a.startswith(REPO + os.sep) else a for a in cmd]
                report["contexts"][-1].setdefault("ctxcache_commands", []).append(
                    shlex.join(rel) + f"  # {secs:.1f}s")
                log(f"  ratio {ratio:g}: ctxcache {key} {secs:.1f}s")
            ref = reference_finch_chunked(model, ids_doc, ids_win, budget, FINCH_CHUNK)

            def add(method, variant, ours_pos, theirs_pos, their_scores, note):
                r = compare(ours_pos, theirs_pos, their_scores, budget, n_layers, n_kv,
                    gaps_ok="native" not in variant and "chunked" not in variant
                    and "pipeline" not in variant)
                r.update({"context": c["name"], "n_tokens": n, "ratio": ratio, "method": method,
                          "variant": variant, "note": note})
                report["comparisons"].append(r)
                rows.append(r)
                log(f"    {method:18s} {variant:28s} overlap mean {r['overlap_mean']:.3f} "
                    f"min {r['overlap_min']:.3f}")

            S = {k: doc_scores(k) for k in sc}
            full = lambda name: [[sc[name][L][h] for h in range(n_kv)] for L in range(n_layers)]  # noqa: E731
            m = lambda name: per_head(lambda L, h: select_matched(S[name][L][h], budget))  # noqa: E731

            # snapkv
            add("snapkv", "matched", ours["snapkv"], m("snapkv"), S["snapkv"],
                "SnapKVPress.score(window=question), ctxcache budget/sinks/tie rule")
            add("snapkv", "native", ours["snapkv"],
                per_head(lambda L, h: select_native(full("snapkv")[L][h], n, n + w, ratio)),
                S["snapkv"], "kvpress compress rule: int((n+w)/ratio) incl. the kept window, no sinks")
            add("snapkv", "kvpress_pipeline_default", ours["snapkv"],
                per_head(lambda L, h: select_native(full("snapkv_last64")[L][h], n, n, ratio)),
                S["snapkv_last64"], "SnapKVPress as kvpress's pipeline runs it: question not "
                "prefilled, window = the document's last 64 tokens (kept), int(n/ratio)")
            add("snapkv", "control_our_kv", ours["snapkv"], m("snapkv_ourkv"), S["snapkv_ourkv"],
                "SnapKVPress.score on ctxcache's own K (HF queries)")
            add("snapkv", "control_kvpress_hf_vs_our_kv", m("snapkv"), m("snapkv_ourkv"),
                S["snapkv_ourkv"], "kvpress vs kvpress: HF K vs ctxcache K (numerics floor)")
            # finch
            add("finch", "single_chunk_matched", ours["finch_1chunk"], m("finch"), S["finch"],
                "ctxcache --chunk >= n vs FinchPress.score (normalize_scores), matched selection")
            add("finch", "single_chunk_native", ours["finch_1chunk"],
                per_head(lambda L, h: select_native(full("finch")[L][h], n, n + w, ratio)),
                S["finch"], "FinchPress.compress rule, chunk_length=None")
            add("finch", "control_kvpress_count_vs_count_plus1", m("finch"), m("finch_plus1"),
                S["finch_plus1"], "kvpress vs kvpress: row weight n + j (kvpress) vs n + j + 1 "
                "(ctxcache, keys the row sees)")
            add("finch", "single_chunk_control_our_kv", ours["finch_1chunk"], m("finch_ourkv"),
                S["finch_ourkv"], "FinchPress.score on ctxcache's own K")
            add("finch", "chunk512_vs_reference", ours["finch"], ref, None,
                "ctxcache chunk 512 vs the same chunked algorithm on transformers (kvpress primitives)")
            add("finch", "chunk512_vs_kvpress_chunked", ours["finch"],
                per_head(lambda L, h: select_native_chunked(full("finch")[L][h], n, ratio, FINCH_CHUNK)),
                S["finch"], "FinchPress(chunk_length=512): one pass, per-chunk budgets")
            add("finch", "chunk512_vs_kvpress_single", ours["finch"], m("finch"), S["finch"],
                "ctxcache chunked vs FinchPress one-pass scores, matched selection")
            # expected attention
            add("expected_attention", "matched", ours["expected_attention"], m("ea"), S["ea"],
                "ExpectedAttentionPress.score (stats: all queries but sinks), matched selection")
            add("expected_attention", "native", ours["expected_attention"],
                per_head(lambda L, h: select_native(full("ea")[L][h], n, n, ratio)), S["ea"],
                "kvpress compress rule: int(n/ratio), sinks padded with max+1")
            add("expected_attention", "control_stats_last128", ours["expected_attention"],
                m("ea_last128"), S["ea_last128"],
                "ExpectedAttentionPress with ctxcache's statistics (last 128 true queries)")
            add("expected_attention", "control_stats_last128_our_kv", ours["expected_attention"],
                m("ea_last128_ourkv"), S["ea_last128_ourkv"],
                "as above, on ctxcache's own K/V (only query recovery + q numerics differ)")
            add("expected_attention", "control_kvpress_hf_vs_our_kv", m("ea"), m("ea_ourkv"),
                S["ea_ourkv"], "kvpress vs kvpress: HF K/V vs ctxcache K/V (numerics floor)")
            add("expected_attention", "control_kvpress_allstats_vs_last128", m("ea"),
                m("ea_last128"), S["ea_last128"],
                "kvpress vs kvpress: effect of the statistics window alone")

        report["contexts"][-1]["seconds"] = round(time.time() - t_ctx, 1)

    # Summary: mean over contexts per (method, variant, ratio).
    summary = {}
    for r in rows:
        key = (r["method"], r["variant"], r["ratio"])
        summary.setdefault(key, []).append(r)
    report["summary"] = [
        {"method": k[0], "variant": k[1], "ratio": k[2],
         "overlap_mean": round(float(np.mean([r["overlap_mean"] for r in v])), 4),
         "overlap_min": round(float(np.min([r["overlap_min"] for r in v])), 4),
         "jaccard_mean": round(float(np.mean([r["jaccard_mean"] for r in v])), 4),
         "per_context": {r["context"]: round(r["overlap_mean"], 4) for r in v}}
        for k, v in summary.items()]
    report["meta"]["seconds"] = round(time.time() - T0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    log(f"wrote {args.out}")
    print(f"\n{'method':20s} {'variant':38s} {'ratio':>5s} {'mean':>6s} {'min':>6s} {'jacc':>6s}")
    for s in report["summary"]:
        print(f"{s['method']:20s} {s['variant']:38s} {s['ratio']:5g} {s['overlap_mean']:6.3f} "
              f"{s['overlap_min']:6.3f} {s['jaccard_mean']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
