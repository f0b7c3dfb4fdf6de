#!/usr/bin/env python3
"""Writes the digest compressor's parity fixture: a tiny random IC-Former (train/icformer.py)
as the GGUF the engine loads, and the digests PyTorch computes for fixed chunk embeddings.
tests/icformer_test.cc loads both and checks the C++ compressor against them.

  python3 tools/make_digest_fixture.py        # -> tests/data/digest/tiny_icformer.{gguf,bin}

Dev-side (needs torch: train/requirements.txt); the outputs are checked in, so CI needs no
torch. The weights are drawn wider than training's N(0, 0.02) (std 0.15, norms around 1) so
that every stage moves the result; the matrices are rounded to fp16 before PyTorch computes,
so both sides compute with the same weights.

Cases file (little-endian): "DGFX", u32 version 1, u32 d_model, u32 n_cases, then per case
u32 chunk tokens lc, u32 digests n, f32 chunk embeddings [lc, d], f32 digests [n, d].
"""
import os
import struct
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
from export_gguf import write_gguf  # noqa: E402
from icformer import ICFormer, ICFormerConfig  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data", "digest")
FINGERPRINT = "0" * 63 + "1"   # the "base model" the test loads it against
# (chunk tokens, digests): a full chunk at several digest counts (the prefix property),
# a short chunk, a single token into a single digest.
CASES = [(16, 8), (16, 3), (7, 5), (1, 1)]


def main():
    torch.manual_seed(7)
    cfg = ICFormerConfig(hidden=64, head_dim=16, layers=2, ff=96, max_digest=8, chunk=16)
    comp = ICFormer(cfg)
    with torch.no_grad():
        for name, p in comp.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                # Rounded to fp16 as the GGUF stores them (norms stay fp32 there).
                p.copy_((0.15 * torch.randn_like(p)).half().float())
    os.makedirs(OUT, exist_ok=True)
    write_gguf(os.path.join(OUT, "tiny_icformer.gguf"), cfg.to_dict(), comp.state_dict(),
               FINGERPRINT, 0, "tools/make_digest_fixture.py (random weights)")
    gen = torch.Generator().manual_seed(11)
    with open(os.path.join(OUT, "tiny_icformer.bin"), "wb") as f:
        f.write(b"DGFX" + struct.pack("<III", 1, cfg.hidden, len(CASES)))
        for lc, n in CASES:
            emb = torch.randn(1, lc, cfg.hidden, generator=gen)
            with torch.no_grad():
                out = comp(emb, n)
            f.write(struct.pack("<II", lc, n))
            f.write(emb[0].numpy().astype("<f4").tobytes())
            f.write(out[0].numpy().astype("<f4").tobytes())
            print(f"case lc={lc} n={n}: |digests| mean {out.abs().mean():.3f}")
    print(f"wrote {OUT}/tiny_icformer.{{gguf,bin}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
