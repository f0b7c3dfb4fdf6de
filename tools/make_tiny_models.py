#!/usr/bin/env python3
"""Writes three tiny synthetic GGUF models and llama.cpp's logits for them (tests/data/tiny/).

They are the outside reference for tests/tiny_model_parity_test.cc, which covers the engine
paths the default model (SmolLM2, llama, tied, no RoPE scaling) does not:

    qwen2.gguf          arch qwen2: QKV biases, NEOX RoPE, GQA 4:2, separate output.weight,
                        F32 and F16 weights, rms eps 1e-6, freq_base 1e6, pre "qwen2"
    llama_scaled.gguf   arch llama: linear RoPE scaling factor 4, freq_base 500000, GQA 4:1,
                        Q8_0 and Q4_0 weights, tied output, pre "llama-bpe"; ffn_down falls
                        back to F16 as in llama-quantize (its rows, d_ff = 80, are not a
                        multiple of the 32-element block)
    llama_mha.gguf      arch llama: head_count_kv == head_count (3), head_dim 32, Q4_1 weights,
                        no rope.freq_base key (default 10000), separate output, pre "default"

Every model shares one byte-level BPE vocabulary: GPT-2's 256 byte tokens, a few dozen merges
learned from a fixed sentence, and the specials <|endoftext|>, <|im_start|>, <|im_end|>.
Weights are random with a fixed seed, scaled so that attention is far from uniform (|q.k| /
sqrt(head_dim) ~ 1-3), RoPE and the biases move logits by whole units, and logits spread over
a few units, so a wrong rotation, bias or scale cannot hide under the tolerance.

For each model, llama.cpp (llama-cpp-python) evaluates three fixed token sequences (8, 60 and
200 ids drawn from the seed, specials included) in one batch each from an empty cache, and
every logit is stored in <model>.logits.bin next to the GGUF. The script also runs a float64
numpy forward pass over the same (dequantized) weights and prints, and stores in the header,
how far llama.cpp's own logits are from it: the known rounding of llama.cpp (8-bit activations
for quantized weights, fp16 activations for F16 weights, fp16 K/V) on these models.

Rerun (needs `pip install llama-cpp-python gguf numpy`; a few seconds):

    python3 tools/make_tiny_models.py                  # writes tests/data/tiny/*
    python3 tools/make_tiny_models.py --out-dir /tmp/t # elsewhere

The output is deterministic: same seed, same bytes (llama.cpp's logits included, at a fixed
thread count).

Logits fixture, version 1 (little-endian):

    int32   magic            0x594E4954 ("TINY")
    int32   version          1
    int32   n_vocab
    int32   n_seqs
    float32 llama_vs_ref_max max |llama.cpp - float64 reference| over every stored logit
    float32 llama_vs_ref_mean mean of the same
    int32   reserved[2]      0
    char    source[64]       e.g. "llama.cpp 0.3.36 (py), no flash-attn, no repack", NUL-padded
    per sequence:
        int32   n_tokens
        int32   tokens[n_tokens]
        float32 logits[n_tokens][n_vocab]   llama.cpp's, position-major
    int32   magic again      (end marker)
"""

import argparse
import os
import struct
import sys

import numpy as np

MAGIC = 0x594E4954
VERSION = 1
SOURCE_BYTES = 64
MAX_GGUF_BYTES = 400 * 1024

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "data", "tiny")
SEQ_LENGTHS = (8, 60, 200)
N_CTX = 256

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_MERGES = 40
MERGE_CORPUS = (
    "the quick brown fox jumps over the lazy dog while the other dogs sleep in the shade of "
    "the old tree, and then the fox runs into the forest where there are other foxes"
)

# name, arch, tokenizer.ggml.pre, and the shape/format choices explained in the docstring.
# layer_types: weight class -> GGML type name, per layer ("F32", "F16", "Q8_0", "Q4_0",
# "Q4_1"); a quantized type whose block does not divide the row length falls back to F16.
MODELS = [
    dict(name="qwen2", arch="qwen2", pre="qwen2", n_layers=2, d_model=64, n_heads=4,
         n_kv_heads=2, d_ff=128, rms_eps=1e-6, freq_base=1e6, scaling=None, tied=False,
         bias=True, embd="F16", output="F32", file_type="MOSTLY_F16",
         layer_types=[dict(attn="F32", ffn="F32", down="F32"),
                      dict(attn="F16", ffn="F16", down="F16")]),
    dict(name="llama_scaled", arch="llama", pre="llama-bpe", n_layers=2, d_model=64, n_heads=4,
         n_kv_heads=1, d_ff=80, rms_eps=1e-5, freq_base=500000.0, scaling=4.0, tied=True,
         bias=False, embd="Q8_0", output=None, file_type="MOSTLY_Q8_0",
         layer_types=[dict(attn="Q4_0", ffn="Q8_0", down="Q8_0"),
                      dict(attn="Q8_0", ffn="Q4_0", down="Q4_0")]),
    dict(name="llama_mha", arch="llama", pre="default", n_layers=2, d_model=96, n_heads=3,
         n_kv_heads=3, d_ff=160, rms_eps=1e-5, freq_base=None, scaling=None, tied=False,
         bias=False, embd="Q4_1", output="Q4_1", file_type="MOSTLY_Q4_1",
         layer_types=[dict(attn="Q4_1", ffn="Q4_1", down="Q4_1")] * 2),
]


# ---- vocabulary ------------------------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2's byte -> printable character map (the byte tokens of every byte-level BPE)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_vocab():
    """Returns (tokens, token_types, merges): bytes, learned merges, then the specials."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    words = [[b2u[b] for b in (" " + w if i else w).encode()]
             for i, w in enumerate(MERGE_CORPUS.split(" "))]
    merges = []
    seen = set(tokens)
    while len(merges) < N_MERGES:
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        # Most frequent pair, ties broken by text: deterministic.
        candidates = sorted((-c, a, b) for (a, b), c in counts.items() if a + b not in seen)
        if not candidates:
            break
        _, a, b = candidates[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        seen.add(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    types = [1] * len(tokens) + [3] * len(SPECIALS)  # NORMAL, then CONTROL
    tokens += list(SPECIALS)
    return tokens, types, merges


# ---- weights ---------------------------------------------------------------------------------

def make_weights(spec, n_vocab, rng):
    """float32 weights by GGUF name, numpy shape [n_out, n_in] (GGUF dims reversed)."""
    d, hd = spec["d_model"], spec["d_model"] // spec["n_heads"]
    dq, dkv, ff = spec["n_heads"] * hd, spec["n_kv_heads"] * hd, spec["d_ff"]

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():  # near 1, not exactly: a dropped norm weight must show
        return (1.0 + rng.standard_normal(d) * 0.1).astype(np.float32)

    # Wq, Wk ~ N(0, 1.5/d): q, k elements ~ N(0, 1.5) on normed input, so q.k/sqrt(hd) has
    # std ~1.5 -- attention clearly position-dependent, but not so sharp that llama.cpp's
    # 8-bit activation rounding flips attention near-ties into logit jumps. The other
    # contributions to the residual stream are of the same order as the embeddings.
    qk_std = (1.5 / d) ** 0.5
    w = {"token_embd.weight": normal((n_vocab, d), 0.5), "output_norm.weight": norm_weight()}
    if not spec["tied"]:
        w["output.weight"] = normal((n_vocab, d), 0.4)
    for i in range(spec["n_layers"]):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm_weight()
        w[p + "attn_q.weight"] = normal((dq, d), qk_std)
        w[p + "attn_k.weight"] = normal((dkv, d), qk_std)
        w[p + "attn_v.weight"] = normal((dkv, d), 0.2)
        w[p + "attn_output.weight"] = normal((d, dq), 0.15)
        if spec["bias"]:
            # Large, as in real Qwen2 K biases: bias-before-RoPE vs after differs by units.
            w[p + "attn_q.bias"] = normal(dq, 1.0)
            w[p + "attn_k.bias"] = normal(dkv, 1.0)
            w[p + "attn_v.bias"] = normal(dkv, 0.5)
        w[p + "ffn_norm.weight"] = norm_weight()
        w[p + "ffn_gate.weight"] = normal((ff, d), 0.2)
        w[p + "ffn_up.weight"] = normal((ff, d), 0.2)
        w[p + "ffn_down.weight"] = normal((d, ff), 0.1)
    return w


def tensor_type(spec, name):
    """The GGML type name a tensor is stored in (1-D tensors always F32)."""
    if not name.endswith(".weight") or "norm" in name:
        return "F32"
    if name == "token_embd.weight":
        return spec["embd"]
    if name == "output.weight":
        return spec["output"]
    layer = spec["layer_types"][int(name.split(".")[1])]
    if "ffn_down" in name:
        return layer["down"]
    return layer["ffn"] if "ffn_" in name else layer["attn"]


def encode(array, type_name):
    """(data, raw_dtype) for GGUFWriter.add_tensor; F16 where the block does not fit a row."""
    import gguf
    from gguf import quants
    if type_name == "F32":
        return array.astype(np.float32), None
    if type_name == "F16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block != 0:
        return array.astype(np.float16), None
    return quants.quantize(array, qtype), qtype


def write_gguf(path, spec, tokens, types, merges, weights):
    import gguf
    a = spec["arch"]
    hd = spec["d_model"] // spec["n_heads"]
    w = gguf.GGUFWriter(path, a)
    w.add_name(f"ctxcache-tiny-{spec['name']}")
    w.add_context_length(512)
    w.add_embedding_length(spec["d_model"])
    w.add_block_count(spec["n_layers"])
    w.add_feed_forward_length(spec["d_ff"])
    w.add_head_count(spec["n_heads"])
    w.add_head_count_kv(spec["n_kv_heads"])
    w.add_layer_norm_rms_eps(spec["rms_eps"])
    if a == "llama":
        w.add_rope_dimension_count(hd)
    if spec["freq_base"] is not None:
        w.add_rope_freq_base(spec["freq_base"])
    if spec["scaling"] is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec["scaling"])
    w.add_file_type(gguf.LlamaFileType[spec["file_type"]])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    for name, array in weights.items():
        data, raw_dtype = encode(array, tensor_type(spec, name))
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- float64 reference -----------------------------------------------------------------------

def stored_weights(path):
    """The weights as llama.cpp sees them: dequantized from the GGUF, as float64."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    out = {}
    for t in GGUFReader(path).tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = a.reshape([int(x) for x in reversed(t.shape)])
    return out


def reference_forward(spec, w, ids):
    """float64 logits [n, n_vocab]: llama/qwen2 as llama.cpp defines them, no rounding."""
    n, d = len(ids), spec["d_model"]
    nh, nkv = spec["n_heads"], spec["n_kv_heads"]
    hd = d // nh
    base = spec["freq_base"] or 10000.0
    pos = np.arange(n, dtype=np.float64) / (spec["scaling"] or 1.0)
    ang = pos[:, None] * base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # x [n, heads, hd]
        y = np.empty_like(x)
        if spec["arch"] == "qwen2":  # NEOX: pairs (i, i + hd/2)
            x0, x1 = x[..., :hd // 2], x[..., hd // 2:]
            y[..., :hd // 2], y[..., hd // 2:] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        else:  # GGUF llama: adjacent pairs
            x0, x1 = x[..., 0::2], x[..., 1::2]
            y[..., 0::2], y[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return y

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + spec["rms_eps"]) * g

    def proj(h, p, what):
        y = h @ w[p + f"attn_{what}.weight"].T
        return y + w[p + f"attn_{what}.bias"] if spec["bias"] else y

    x = w["token_embd.weight"][np.asarray(ids)]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(spec["n_layers"]):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope(proj(h, p, "q").reshape(n, nh, hd))
        k = rope(proj(h, p, "k").reshape(n, nkv, hd))
        v = proj(h, p, "v").reshape(n, nkv, hd)
        att = np.empty((n, nh, hd))
        for j in range(nh):
            s = q[:, j] @ k[:, j // (nh // nkv)].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, j] = (s / s.sum(-1, keepdims=True)) @ v[:, j // (nh // nkv)]
        x = x + att.reshape(n, -1) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "ffn_up.weight"].T)) @ w[
            p + "ffn_down.weight"].T
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ out.T


# ---- llama.cpp and the fixture ---------------------------------------------------------------

def open_llama(path, threads, verbose):
    # The AMX repack workaround of make_logit_fixture.py (llama.cpp's AMX buffer crashes in
    # this VM); its numerics equal the regular AVX-512 kernels'.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_logit_fixture import open_llama as open_without_repack
    return open_without_repack(path, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX,
                               n_threads=threads, n_threads_batch=threads, logits_all=True,
                               flash_attn=False, verbose=verbose)


def make_sequences(n_vocab, rng):
    return [rng.integers(0, n_vocab, size=n).astype(np.int32) for n in SEQ_LENGTHS]


def write_fixture(path, source, n_vocab, seqs, logits, stats):
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<4iff2i", MAGIC, VERSION, n_vocab, len(seqs), stats[0], stats[1],
                            0, 0))
        f.write(source.encode()[:SOURCE_BYTES - 1].ljust(SOURCE_BYTES, b"\0"))
        for ids, lg in zip(seqs, logits):
            assert lg.shape == (len(ids), n_vocab)
            f.write(struct.pack("<i", len(ids)))
            f.write(np.asarray(ids, dtype="<i4").tobytes())
            f.write(np.asarray(lg, dtype="<f4").tobytes())
        f.write(struct.pack("<i", MAGIC))
    os.replace(path + ".part", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for the fixture format.")
    ap.add_argument("--out-dir", default=DEFAULT_OUT, help="output folder (%(default)s)")
    ap.add_argument("--seed", type=int, default=20250612, help="weights and token seed")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (%(default)s)")
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's load log")
    args = ap.parse_args()

    import llama_cpp
    os.makedirs(args.out_dir, exist_ok=True)
    tokens, types, merges = build_vocab()
    n_vocab = len(tokens)
    source = f"llama.cpp {llama_cpp.__version__} (py), no flash-attn, no repack"
    for index, spec in enumerate(MODELS):
        rng = np.random.default_rng([args.seed, index])
        gguf_path = os.path.join(args.out_dir, spec["name"] + ".gguf")
        write_gguf(gguf_path, spec, tokens, types, merges, make_weights(spec, n_vocab, rng))
        size = os.path.getsize(gguf_path)
        if size > MAX_GGUF_BYTES:
            sys.exit(f"{gguf_path} is {size} bytes > {MAX_GGUF_BYTES}")

        llm = open_llama(gguf_path, args.threads, args.verbose)
        if llm.n_vocab() != n_vocab:
            sys.exit(f"llama.cpp sees {llm.n_vocab()} tokens, we wrote {n_vocab}")
        ref_w = stored_weights(gguf_path)
        seqs = make_sequences(n_vocab, rng)
        logits, diffs = [], []
        for ids in seqs:
            llm.reset()
            llm.eval(ids.tolist())
            lg = np.array(llm.scores[:len(ids)], dtype=np.float32)
            ref = reference_forward(spec, ref_w, ids)
            diffs.append(np.abs(lg - ref).ravel())
            srt = np.sort(ref, -1)
            flips = int((lg.argmax(-1) != ref.argmax(-1)).sum())
            print(f"  {spec['name']:13s} {len(ids):4d} tokens: logit std {lg.std():.2f}, "
                  f"min top-2 gap {(srt[:, -1] - srt[:, -2]).min():.4f}, llama.cpp vs f64 "
                  f"max|d| {diffs[-1].max():.5f} mean {diffs[-1].mean():.5f}, argmax flips "
                  f"{flips}")
            logits.append(lg)
        del llm
        d = np.concatenate(diffs)
        fixture = os.path.join(args.out_dir, spec["name"] + ".logits.bin")
        write_fixture(fixture, source, n_vocab, seqs, logits, (float(d.max()), float(d.mean())))
        print(f"wrote {gguf_path} ({size} bytes), {fixture} "
              f"({os.path.getsize(fixture)} bytes)")


if __name__ == "__main__":
    main()
