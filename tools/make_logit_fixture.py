#!/usr/bin/env python3
"""Writes a logit parity fixture (tests/data/parity/logits_<model>.bin) from llama.cpp.

The fixture is the outside reference for tests/logit_parity_test.cc: a handful of prompts
(prose, code, a ChatML chat, numbers, and a longer document: ~1000 tokens for SmolLM2, 160
for Qwen2.5, whose fixture must stay small with a 152K vocabulary), tokenized by llama.cpp
itself (so the C++ test does not depend on our tokenizer), and for every position a compact
summary of llama.cpp's logits: the argmax, the top-1 minus top-2 gap, the log-sum-exp over the
whole vocabulary, and the logits of the top-16 ids and of 16 pseudo-random ids (so the
comparison is not only at the top of the distribution).

Next to every llama.cpp value it stores the same value from a second, independent reference:
a plain fp32 numpy forward pass over the GGUF weights dequantized by the `gguf` package
(class NumpyLlama below: llama, and qwen2 with its Q/K/V biases and NEOX RoPE), which rounds
nothing but fp32. llama.cpp rounds activations to 8 bits for its quantized dot products; on
SmolLM2 (large outlier activations) that alone moves logits by ~0.2 on average and by up to
~3-6 at a few positions (on Qwen2.5 by ~0.06, at most ~0.7), which the script prints for
every prompt. Our engine rounds too (bf16 GEMM operands in prefill, 8-bit activations in
decode, fp16 K/V), so tests/logit_parity_test.cc checks against both references
statistically (per-model bounds explained in tests/test_util.h).

Rerun (needs `pip install llama-cpp-python numpy gguf`; the model from
tools/fetch_model.sh [NAME]; about a minute on 2 cores):

    python3 tools/make_logit_fixture.py             # SmolLM2: tests/data/parity/logits_smollm2.bin
    python3 tools/make_logit_fixture.py --model qwen2.5-0.5b   # .../logits_qwen2.5-0.5b.bin

--model takes a name (MODELS below: its GGUF in models/, its fixture path, its chat prompt and
long-prompt length) or a GGUF path (then --out is required and the SmolLM2 prompt set is used).

Binary format, version 1 (little-endian, llm.c style; every field 4 bytes unless noted):

    header  int32[64]:
        [0] magic 20250611   [1] version 1   [2] n_prompts   [3] n_vocab
        [4] n_top (16)       [5] n_rand (16) [6] total positions over all prompts
        [7] name_bytes (32)  [8] text_bytes (64)   [9..63] zero
    char    source[text_bytes]      e.g. "llama.cpp 0.3.36", NUL-padded
    char    model_name[text_bytes]  GGUF general.name, NUL-padded
    per prompt:
        char    name[name_bytes]    NUL-padded ("prose", "code", "chat", "numbers", "long")
        int32   n_tokens
        int32   tokens[n_tokens]
        per position, n_tokens records of (n_ids = n_top + n_rand):
            int32   argmax          llama.cpp's
            float32 gap             llama.cpp's top-1 minus top-2 logit
            float32 lse             llama.cpp's log(sum(exp(logits))) over the full vocabulary
            float32 lse_f32         the same from the fp32 numpy reference
            int32   ids[n_ids]      llama.cpp's top n_top ids, descending by logit, then n_rand
                                    distinct ids drawn per (prompt, position) from the seed
            float32 logits[n_ids]   llama.cpp's logits at ids
            float32 logits_f32[n_ids]  the fp32 numpy reference's logits at ids
    int32   magic again (end marker: catches truncation and size mistakes)
"""

import argparse
import os
import random
import struct
import sys
import time

import numpy as np

MAGIC = 20250611
VERSION = 1
HEADER_INTS = 64
NAME_BYTES = 32
TEXT_BYTES = 64
N_TOP = 16
N_RAND = 16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROSE = (
    "The old lighthouse stood at the edge of the cliff, and every night its keeper climbed "
    "the spiral stairs to light the lamp."
)

CODE = '''def merge_sorted(a, b):
    """Merges two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out


def test_merge_sorted():
    assert merge_sorted([1, 4, 9], [2, 3, 10]) == [1, 2, 3, 4, 9, 10]
    assert merge_sorted([], [5]) == [5]
'''

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nWhat are three good habits for keeping a small garden "
    "healthy through a dry summer?<|im_end|>\n<|im_start|>assistant\n"
)

# The same question in Qwen2.5's ChatML, with the system prompt its template adds by default.
QWEN_CHAT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n<|im_start|>user\nWhat are three good habits for keeping a small "
    "garden healthy through a dry summer?<|im_end|>\n<|im_start|>assistant\n"
)

NUMBERS = (
    "Fibonacci numbers: 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987.\n"
    "Squares: 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121, 144.\n"
    "Invoice 2024-0417: 3 x 12.50 = 37.50; 2 x 7.25 = 14.50; subtotal 52.00; tax 8% = 4.16; "
    "total 56.16.\n"
    "Powers of two: 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096.\n"
    "17 + 25 = 42, 100 - 58 = 42, 6 * 7 = 42, 84 / 2 = "
)

LONG_INTRO = (
    "Notes from the Harbor Almanac\n\n"
    "The town of Wrenmouth grew up around a harbor that freezes only in the hardest winters. "
    "Its first houses were built from the timbers of wrecked ships, and for a long time the "
    "people said that a house would creak in a storm the way its ship had once creaked at sea. "
    "The fishermen kept careful books: the hour they left, the wind, the catch, the hour they "
    "came home. Most of those books were lost in the fire of the old customs house, but one "
    "keeper's log survived in a tin box under the floor of the lighthouse, and it is copied "
    "here in full, with the spelling made regular and the weights given in pounds.\n\n"
)

_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west",
          "north-west"]
_WEATHER = ["clear and cold", "grey with a low sky", "fog until noon", "steady rain",
            "bright, with high cloud", "squalls from the sea", "calm and warm"]
_BOATS = ["the Margaret", "the Heron", "the Two Brothers", "the Little Ann", "the Perseverance"]
_FISH = ["cod", "haddock", "mackerel", "herring", "pollock"]
_EVENTS = [
    "The lamp was trimmed twice in the night.",
    "A schooner passed outside the bar at first light.",
    "The bell on the north buoy was heard clearly until dawn.",
    "Gulls settled on the gallery rail and would not be moved.",
    "Oil delivered: four barrels, one leaking, set aside.",
    "The children from the school came to see the lens.",
    "Ice on the lower steps; salted them before breakfast.",
]


def long_text(rng: random.Random) -> str:
    """A deterministic ~1000-token document: an intro and seeded keeper's-log entries."""
    parts = [LONG_INTRO]
    for day in range(1, 60):
        boat, fish = rng.choice(_BOATS), rng.choice(_FISH)
        parts.append(
            f"Day {day}, {_DAYS[day % 7]}. Wind {rng.choice(_WINDS)}, force "
            f"{rng.randint(1, 8)}. Weather {rng.choice(_WEATHER)}. {boat} out at "
            f"{rng.randint(4, 7)} o'clock, home at {rng.randint(1, 6)}, with "
            f"{rng.randint(2, 60) * 10} pounds of {fish}. {rng.choice(_EVENTS)}\n")
    return "".join(parts)


# The models this script knows by name (tools/fetch_model.sh NAME fetches each): GGUF file in
# models/, fixture, chat prompt, tokens of the long prompt. Qwen2.5 tokenizes digits one by
# one (numbers: 292 tokens) and has a 152K vocabulary; 160 long tokens keep its fixture at
# ~275 KB (400 bytes per position).
MODELS = {
    "smollm2": dict(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", out="logits_smollm2.bin",
                    chat=CHAT, long_tokens=1000),
    "qwen2.5-0.5b": dict(gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                         out="logits_qwen2.5-0.5b.bin", chat=QWEN_CHAT, long_tokens=160),
}


def resolve_model(model, out, long_tokens):
    """(GGUF path, fixture path, profile) for --model NAME_OR_PATH."""
    if model in MODELS:
        prof = MODELS[model]
        path = os.path.join(ROOT, "models", prof["gguf"])
        fetch = f"tools/fetch_model.sh {model}"
        out = out or os.path.join(ROOT, "tests", "data", "parity", prof["out"])
    else:
        prof, path, fetch = MODELS["smollm2"], model, "tools/fetch_model.sh"
        if not os.path.exists(path):
            sys.exit(f"--model {model}: neither a model name ({', '.join(MODELS)}) nor a file")
        if not out:
            sys.exit("--out is required with a GGUF path (known names: "
                     f"{', '.join(MODELS)})")
    if not os.path.exists(path):
        sys.exit(f"model not found: {path} (run {fetch})")
    return path, out, dict(prof, long_tokens=long_tokens or prof["long_tokens"])


def open_llama(model_path, **kwargs):
    """llama_cpp.Llama with weight repacking ("extra buffer types") turned off.

    On this machine's CPUs (Sapphire Rapids class, inside a VM) llama.cpp 0.3.36 routes Q4_1
    matmuls with more than one token to its AMX extra buffer, and ggml_backend_amx_mul_mat
    segfaults there. Without extra buffers it uses its regular AVX-512/VNNI kernels, whose
    numerics (8-bit activations, fp32 accumulation) are the same. llama-cpp-python exposes no
    argument for it, so the default model parameters are wrapped for this one construction.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib
    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=model_path, **kwargs)
    finally:
        lib.llama_model_default_params = original


def build_prompts(llm, chat: str, long_tokens: int, seed: int):
    """Returns [(name, token ids)] tokenized by llama.cpp (no BOS: SmolLM2 and Qwen2.5 add
    none)."""
    rng = random.Random(seed)
    texts = [("prose", PROSE, False), ("code", CODE, False), ("chat", chat, True),
             ("numbers", NUMBERS, False), ("long", long_text(rng), False)]
    prompts = []
    for name, text, special in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if name == "long":
            if len(ids) < long_tokens:
                raise SystemExit(f"long prompt has only {len(ids)} tokens < {long_tokens}")
            ids = ids[:long_tokens]
        prompts.append((name, ids))
    return prompts


def llama_logits(llm, ids):
    """All-position logits [n, n_vocab] for one prompt, from a fresh KV cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def log_sum_exp(row: np.ndarray) -> float:
    m = float(row.max())
    return m + float(np.log(np.exp(row.astype(np.float64) - m).sum()))


def summarize(logits: np.ndarray, logits_f32: np.ndarray, rng: np.random.Generator):
    """Per-position records (see the format in the docstring)."""
    n, n_vocab = logits.shape
    records = []
    for p in range(n):
        row = logits[p]
        top = np.argsort(-row, kind="stable")[:N_TOP]
        ids = np.concatenate([top, rng.choice(n_vocab, size=N_RAND, replace=False)])
        records.append((int(top[0]), float(row[top[0]] - row[top[1]]), log_sum_exp(row),
                        log_sum_exp(logits_f32[p]), ids, row[ids], logits_f32[p][ids]))
    return records


def write_fixture(path, source, model_name, n_vocab, prompts, summaries):
    header = [0] * HEADER_INTS
    header[:9] = [MAGIC, VERSION, len(prompts), n_vocab, N_TOP, N_RAND,
                  sum(len(ids) for _, ids in prompts), NAME_BYTES, TEXT_BYTES]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack(f"<{HEADER_INTS}i", *header))
        f.write(source.encode()[:TEXT_BYTES - 1].ljust(TEXT_BYTES, b"\0"))
        f.write(model_name.encode()[:TEXT_BYTES - 1].ljust(TEXT_BYTES, b"\0"))
        for (name, ids), records in zip(prompts, summaries):
            f.write(name.encode().ljust(NAME_BYTES, b"\0"))
            f.write(struct.pack("<i", len(ids)))
            f.write(np.asarray(ids, dtype="<i4").tobytes())
            for argmax, gap, lse, lse_f32, ids, logits, logits_f32 in records:
                f.write(struct.pack("<ifff", argmax, gap, lse, lse_f32))
                f.write(np.asarray(ids, dtype="<i4").tobytes())
                f.write(np.asarray(logits, dtype="<f4").tobytes())
                f.write(np.asarray(logits_f32, dtype="<f4").tobytes())
        f.write(struct.pack("<i", MAGIC))
    os.replace(path + ".part", path)


def read_fixture(path):
    """The fixture back: (source, model_name, n_vocab, [(name, ids, records)]), records as
    write_fixture takes them (train/frozen_llm.py checks PyTorch against it)."""
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack_from(f"<{HEADER_INTS}i", data, 0)
    if header[0] != MAGIC or header[1] != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} logit fixture")
    n_prompts, n_vocab, n_top, n_rand, _, name_bytes, text_bytes = header[2:9]
    off = HEADER_INTS * 4
    text = lambda n: data[off:off + n].split(b"\0", 1)[0].decode()  # noqa: E731
    source = text(text_bytes)
    off += text_bytes
    model_name = text(text_bytes)
    off += text_bytes
    n_ids, prompts = n_top + n_rand, []
    for _ in range(n_prompts):
        name = text(name_bytes)
        off += name_bytes
        (n_tokens,) = struct.unpack_from("<i", data, off)
        ids = np.frombuffer(data, "<i4", n_tokens, off + 4).tolist()
        off += 4 + 4 * n_tokens
        records = []
        for _ in range(n_tokens):
            argmax, gap, lse, lse_f32 = struct.unpack_from("<ifff", data, off)
            off += 16
            at = np.frombuffer(data, "<i4", n_ids, off)
            logits = np.frombuffer(data, "<f4", n_ids, off + 4 * n_ids)
            logits_f32 = np.frombuffer(data, "<f4", n_ids, off + 8 * n_ids)
            off += 12 * n_ids
            records.append((argmax, gap, lse, lse_f32, at, logits, logits_f32))
        prompts.append((name, ids, records))
    if struct.unpack_from("<i", data, off)[0] != MAGIC:
        raise ValueError(f"{path}: truncated or misread (no end marker)")
    return source, model_name, n_vocab, prompts


# ---- the independent fp32 numpy reference ------------------------------------------------

class NumpyLlama:
    """A plain fp32 Llama forward over dequantized GGUF weights (the engine's math).

    Architectures llama and qwen2; qwen2 differs in three places: Q/K/V projections carry
    biases (blk.N.attn_{q,k,v}.bias), RoPE rotates halves (x[i], x[i + hd/2]) instead of
    adjacent pairs (NEOX style; the GGUF converter leaves Qwen's Q/K rows unpermuted), and its
    freq_base is 1e6. The output head is output.weight, or token_embd.weight when the file has
    none (tied). No RoPE scaling: neither model uses it.
    """

    def __init__(self, path):
        from gguf import GGUFReader
        from gguf.quants import dequantize
        r = GGUFReader(path)
        arch = r.fields["general.architecture"].contents()
        if arch not in ("llama", "qwen2"):
            sys.exit(f"NumpyLlama: architecture {arch} is not supported (llama, qwen2)")
        f = {k[len(arch) + 1:]: v.contents() for k, v in r.fields.items()
             if k.startswith(arch + ".")}
        self.neox = arch == "qwen2"
        self.n_layers = f["block_count"]
        self.n_heads = f["attention.head_count"]
        self.n_kv = f["attention.head_count_kv"]
        self.d = f["embedding_length"]
        self.hd = self.d // self.n_heads
        self.eps = f["attention.layer_norm_rms_epsilon"]
        self.base = f.get("rope.freq_base", 10000.0)
        if f.get("rope.dimension_count", self.hd) != self.hd or "rope.scaling.type" in f:
            sys.exit("NumpyLlama: partial RoPE and RoPE scaling are not implemented")
        self.w = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float32)
            self.w[t.name] = a.reshape([int(x) for x in reversed(t.shape)])
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])

    def _norm(self, x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * g

    def _rope(self, x, n):  # x [n, heads, hd]; GGUF llama: adjacent pairs; qwen2: halves
        inv = self.base ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        ang = np.arange(n)[:, None] * inv[None, :]
        c = np.cos(ang).astype(np.float32)[:, None, :]
        s = np.sin(ang).astype(np.float32)[:, None, :]
        half = self.hd // 2
        lo, hi = (slice(0, half), slice(half, None)) if self.neox else \
            (slice(0, None, 2), slice(1, None, 2))
        x0, x1 = x[..., lo], x[..., hi]
        y = np.empty_like(x)
        y[..., lo] = x0 * c - x1 * s
        y[..., hi] = x0 * s + x1 * c
        return y

    def _proj(self, h, p, name, heads):  # [n, heads, hd], plus the bias where there is one
        y = h @ self.w[p + name + ".weight"].T
        if p + name + ".bias" in self.w:
            y = y + self.w[p + name + ".bias"]
        return y.reshape(len(h), heads, self.hd)

    def forward(self, ids):
        n, w = len(ids), self.w
        x = w["token_embd.weight"][np.asarray(ids)]
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        g = self.n_heads // self.n_kv
        for layer in range(self.n_layers):
            p = f"blk.{layer}."
            h = self._norm(x, w[p + "attn_norm.weight"])
            q = self._rope(self._proj(h, p, "attn_q", self.n_heads), n)
            k = self._rope(self._proj(h, p, "attn_k", self.n_kv), n)
            v = self._proj(h, p, "attn_v", self.n_kv)
            att = np.empty((n, self.n_heads, self.hd), dtype=np.float32)
            for hh in range(self.n_heads):
                s = q[:, hh] @ k[:, hh // g].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                att[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, hh // g]
            x = x + att.reshape(n, -1) @ w[p + "attn_output.weight"].T
            h = self._norm(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            up = h @ w[p + "ffn_up.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "ffn_down.weight"].T
        return self._norm(x, w["output_norm.weight"]) @ self.out.T


def report(name, ll, nl):
    """Prints how far llama.cpp is from the fp32 reference over the whole vocabulary."""
    d = np.abs(nl - ll)
    p, v = np.unravel_index(np.argmax(d), d.shape)
    srt = np.sort(ll, axis=-1)
    gap = srt[:, -1] - srt[:, -2]
    flips = np.nonzero(ll.argmax(-1) != nl.argmax(-1))[0]
    print(f"  llama.cpp vs fp32 reference: max|d| {d.max():.3f} at pos {p} id {v}; mean|d| "
          f"{d.mean():.4f}; argmax differs at {len(flips)} positions, llama.cpp gaps there "
          f"<= {max([float(gap[i]) for i in flips], default=0):.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the binary format.")
    ap.add_argument("--model", default="smollm2",
                    help=f"model name ({', '.join(MODELS)}) or GGUF path (%(default)s)")
    ap.add_argument("--out", help="fixture path (default: the named model's, in tests/data/parity)")
    ap.add_argument("--long-tokens", type=int,
                    help="tokens in the long prompt (default: the named model's; SmolLM2 1000)")
    ap.add_argument("--seed", type=int, default=1234, help="text and random-id seed")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (%(default)s)")
    args = ap.parse_args()

    import llama_cpp
    from gguf import GGUFReader
    model_path, out, prof = resolve_model(args.model, args.out, args.long_tokens)
    model_name = GGUFReader(model_path).fields["general.name"].contents()
    n_ctx = max(2048, prof["long_tokens"] + 16)
    # flash_attn off: the plain attention path (fp32 softmax over an fp16 KV cache) is
    # llama.cpp's most accurate CPU configuration; the reference should not add error.
    llm = open_llama(model_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                     n_threads=args.threads, n_threads_batch=args.threads, logits_all=True,
                     flash_attn=False, verbose=False)
    n_vocab = llm.n_vocab()
    prompts = build_prompts(llm, prof["chat"], prof["long_tokens"], args.seed)
    rng = np.random.default_rng(args.seed)
    reference = NumpyLlama(model_path)
    summaries = []
    for name, ids in prompts:
        t0 = time.time()
        logits = llama_logits(llm, ids)
        logits_f32 = reference.forward(ids)
        summaries.append(summarize(logits, logits_f32, rng))
        gaps = np.array([r[1] for r in summaries[-1]])
        print(f"{name:8s} {len(ids):5d} tokens  min gap {gaps.min():.4f}  "
              f"gaps<0.05: {(gaps < 0.05).sum()}  {time.time() - t0:.1f}s", flush=True)
        report(name, logits, logits_f32)
    source = f"llama.cpp {llama_cpp.__version__} (py), no flash-attn, no repack"
    write_fixture(out, source, model_name, n_vocab, prompts, summaries)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
