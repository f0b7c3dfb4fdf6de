#!/usr/bin/env python3
"""Writes a trained digest compressor (train/train_digest.py's checkpoint) as a small GGUF the
engine loads, with a JSON record beside it (SHA-256, base model fingerprint, command, commit).

GGUF layout (architecture "icformer"; every key under "icformer."):
  icformer.embedding_length       d (must equal the base model's)
  icformer.head_dim, .block_count, .feed_forward_length, .digest_count (n_max), .chunk_length
  icformer.rope.freq_base, icformer.attention.layer_norm_rms_epsilon
  icformer.base_fingerprint       the served model's fingerprint (`ctxcache info`): the engine
                                  refuses a compressor trained against another model
  icformer.train_steps, icformer.source  (what produced it)
tensors (F16 unless --dtype f32; norms always F32), numpy shapes [rows, cols] = [out, in]:
  blk.N.{q_norm,ctx_norm,mlp_norm}.weight [d]; blk.N.{wq,wk,wv,wo}.weight [d, d];
  blk.N.{gate,up}.weight [ff, d]; blk.N.down.weight [d, ff]; out_norm.weight [d];
  digest.weight [n_max, d]

  python3 train/export_gguf.py --run models/train/full --out train/compressors/NAME.gguf
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import frozen_llm  # noqa: E402

ARCH = "icformer"


def base_fingerprint(model, binary):
    """The engine's own fingerprint of the base model (`ctxcache info`)."""
    out = subprocess.run([binary, "info", "--model", model], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if line.startswith("fingerprint:"):
            return line.split()[1]
    raise RuntimeError(f"`{binary} info` printed no fingerprint")


def write_gguf(path, cfg, state_dict, fingerprint, train_steps, source, dtype="f16", ae=None):
    """Writes a compressor (ICFormerConfig as a dict, ICFormer's state_dict) as the GGUF the
    engine's engine/icformer.cc loads; also used by tools/make_digest_fixture.py. `ae`, the
    training's reconstruction-prompt embedding [1, 1, d], goes in as "ae.weight" (the engine
    ignores it; train_digest.py --init-from reads it back to go on training)."""
    import gguf
    w = gguf.GGUFWriter(path + ".part", ARCH)
    w.add_uint32(f"{ARCH}.embedding_length", cfg["hidden"])
    w.add_uint32(f"{ARCH}.head_dim", cfg["head_dim"])
    w.add_uint32(f"{ARCH}.block_count", cfg["layers"])
    w.add_uint32(f"{ARCH}.feed_forward_length", cfg["ff"])
    w.add_uint32(f"{ARCH}.digest_count", cfg["max_digest"])
    w.add_uint32(f"{ARCH}.chunk_length", cfg["chunk"])
    w.add_float32(f"{ARCH}.rope.freq_base", cfg["rope_theta"])
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", cfg["eps"])
    w.add_string(f"{ARCH}.base_fingerprint", fingerprint)
    w.add_uint32(f"{ARCH}.train_steps", train_steps)
    w.add_string(f"{ARCH}.source", source)
    mat = np.float16 if dtype == "f16" else np.float32
    for name, t in state_dict.items():
        a = t.float().numpy()
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            name = f"blk.{i}.{rest}"
        elif name == "digest":
            name = "digest.weight"
        a = a.astype(np.float32 if name.endswith("norm.weight") else mat)
        w.add_tensor(name, a)
    if ae is not None:
        w.add_tensor("ae.weight", ae.float().reshape(-1).numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path + ".part", path)


def main():
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="train_digest.py's --out folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=frozen_llm.DEFAULT_MODEL, help="the base model")
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "server", "ctxcache"))
    ap.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    args = ap.parse_args()
    state = torch.load(os.path.join(args.run, "checkpoint.pt"), weights_only=False)
    cfg, sd = state["config"], state["compressor"]
    fingerprint = base_fingerprint(args.model, args.binary)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with open(os.path.join(args.run, "history.json")) as f:
        history = json.load(f)
    command = history["args"]
    # A run started --init-from a shipped compressor continues its steps.
    init = history.get("init_from")
    steps = state["step"] + (init["train_steps"] if init else 0)

    write_gguf(args.out, cfg, sd, fingerprint, steps,
               f"train/train_digest.py at {commit}", args.dtype, ae=state["ae"])
    with open(args.out, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    record = {"file": os.path.basename(args.out), "sha256": sha,
              "bytes": os.path.getsize(args.out), "base_model": os.path.basename(args.model),
              "base_fingerprint": fingerprint, "train_steps": steps, "commit": commit,
              "config": cfg, "train_command": command}
    if init:
        record["init_from"] = init
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    print(f"{args.out}: {record['bytes'] / 2**20:.1f} MiB, sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def read_gguf(path):
    """A compressor GGUF back as (ICFormerConfig dict, state_dict of float32 tensors, ae
    tensor or None, train_steps): train_digest.py --init-from goes on training from it."""
    import gguf
    import torch
    r = gguf.GGUFReader(path)

    def field(key):
        f = r.fields[f"{ARCH}.{key}"]
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0].item()

    cfg = {"hidden": field("embedding_length"), "head_dim": field("head_dim"),
           "layers": field("block_count"), "ff": field("feed_forward_length"),
           "max_digest": field("digest_count"), "chunk": field("chunk_length"),
           "rope_theta": field("rope.freq_base"),
           "eps": field("attention.layer_norm_rms_epsilon")}
    sd, ae = {}, None
    for t in r.tensors:
        a = torch.from_numpy(np.array(t.data, dtype=np.float32))
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists ne[0] first
        a = a.reshape(shape) if len(shape) > 1 else a.reshape(-1)
        name = t.name
        if name == "ae.weight":
            ae = a.reshape(1, 1, -1)
            continue
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            name = f"layers.{i}.{rest}"
        elif name == "digest.weight":
            name = "digest"
        sd[name] = a
    return cfg, sd, ae, field("train_steps")
