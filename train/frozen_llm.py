#!/usr/bin/env python3
"""The frozen LLM the digest compressor is trained against, in PyTorch, and its parity check.

The compressor's digests go into the served model as input embeddings, so training must run
the same model our engine serves: the same GGUF, loaded by transformers (which dequantizes
every tensor to the requested dtype with the `gguf` package), frozen.

Parity (`python3 train/frozen_llm.py`): the logit fixture tests/data/parity/logits_<model>.bin
holds, for fixed token sequences, llama.cpp's logits and an independent fp32 numpy forward
pass's (tools/make_logit_fixture.py) at 32 ids per position; tests/logit_parity_test.cc checks
our engine against both. Here PyTorch's logits at the same ids are checked against the fp32
reference (same dequantized weights, fp32 throughout: they must agree to rounding) and
against llama.cpp (which rounds activations to 8 bits: the argmax must agree wherever
llama.cpp's top-1 leads by a clear margin). So PyTorch computes what our engine computes,
through one fixture both are checked against.

  python3 train/frozen_llm.py                       # the default model (Qwen2.5-Coder-0.5B)
  python3 train/frozen_llm.py --model models/X.gguf --fixture tests/data/parity/logits_X.bin
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
DEFAULT_MODEL = os.path.join(ROOT, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
DEFAULT_FIXTURE = os.path.join(ROOT, "tests", "data", "parity", "logits_qwen2.5-0.5b.bin")

# fp32 against fp32 over the same weights: only the order of additions differs (BLAS blocking,
# attention kernels). Measured on Qwen2.5-Coder-0.5B (2026-12-06, torch 2.15, transformers
# 5.25): at most 1.0e-4 over the fixture's 680 positions; the bound is 10x that.
MAX_ABS_VS_F32 = 1e-3
# llama.cpp's 8-bit activations move Qwen2.5's logits by ~0.06 on average and up to ~0.7
# (make_logit_fixture.py's measurements): where its top-1 leads by more than that, PyTorch
# must pick the same token.
CLEAR_GAP = 1.0


def load(path=DEFAULT_MODEL, dtype=torch.float32):
    """The GGUF as a frozen transformers causal LM (eval mode, no gradients to its weights)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def check(model, fixture):
    """Per prompt: PyTorch against the fixture's fp32 reference and llama.cpp (see above)."""
    import make_logit_fixture
    source, name, n_vocab, prompts = make_logit_fixture.read_fixture(fixture)
    if model.config.vocab_size != n_vocab:
        raise ValueError(f"{fixture} is for a {n_vocab}-token vocabulary, the model has "
                         f"{model.config.vocab_size}")
    rows = []
    for prompt, ids, records in prompts:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        diff_f32, diff_cpp, clear, agree = [], [], 0, 0
        for p, (argmax, gap, _, _, at, cpp, f32) in enumerate(records):
            ours = logits[p][at]
            diff_f32.append(np.abs(ours - f32).max())
            diff_cpp.append(np.abs(ours - cpp).mean())
            if gap > CLEAR_GAP:
                clear += 1
                agree += int(np.argmax(logits[p]) == argmax)
        rows.append({"prompt": prompt, "tokens": len(ids),
                     "max_abs_vs_f32": float(max(diff_f32)),
                     "mean_abs_vs_llama_cpp": float(np.mean(diff_cpp)),
                     "clear_positions": clear, "argmax_agree": agree})
    ok = all(r["max_abs_vs_f32"] <= MAX_ABS_VS_F32 and r["argmax_agree"] == r["clear_positions"]
             for r in rows)
    return {"fixture": os.path.relpath(fixture, ROOT), "reference": source, "model": name,
            "prompts": rows, "pass": ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--fixture", default=DEFAULT_FIXTURE)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.time()
    model = load(args.model)
    print(f"loaded {args.model} in {time.time() - t:.0f} s", file=sys.stderr)
    result = check(model, args.fixture)
    for r in result["prompts"]:
        print(f"{r['prompt']:>8} {r['tokens']:4d} tokens: max |torch - fp32 ref| "
              f"{r['max_abs_vs_f32']:.2e} (bound {MAX_ABS_VS_F32}), mean |torch - llama.cpp| "
              f"{r['mean_abs_vs_llama_cpp']:.3f}, argmax = llama.cpp's at "
              f"{r['argmax_agree']}/{r['clear_positions']} clear positions")
    print("PASS" if result["pass"] else "FAIL")
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
