#!/usr/bin/env python3
"""Writes a greedy-decoding parity fixture (tests/data/parity/greedy_<model>.json).

Three prompts (one ChatML chat tokenized with special tokens) are run through llama.cpp and
continued for 64 greedy tokens: argmax of the raw logits at every step (temperature 0, no
repetition penalty, no sampler at all: ties go to the lowest id, like numpy.argmax). Every step
records the chosen id and llama.cpp's top-1 minus top-2 logit gap, so that
tests/greedy_parity_test.cc can tell a real divergence from a near-tie. Generation does not stop
at <|im_end|>: the fixture always holds n_gen tokens, which also exercises decoding past an
end-of-turn.

Rerun (needs `pip install llama-cpp-python numpy`; the model from tools/fetch_model.sh [NAME]):

    python3 tools/make_greedy_fixture.py [--n-gen 64] [--out PATH]     # SmolLM2
    python3 tools/make_greedy_fixture.py --model qwen2.5-0.5b          # Qwen2.5-Coder-0.5B

--model takes a name (MODELS below: GGUF in models/, fixture path, prompts) or a GGUF path
(then --out is required and the SmolLM2 prompts are used).

JSON layout (version 1):
    {"version": 1, "source": "llama.cpp X", "model_name": GGUF general.name, "n_vocab": V,
     "n_gen": 64,
     "cases": [{"name", "prompt", "special", "prompt_ids": [...], "output_ids": [...],
                "gaps": [...], "output_text"}]}
"""

import argparse
import json
import os
import sys

import numpy as np

# Same directory: the AMX workaround and the models' GGUF files live there.
from make_logit_fixture import MODELS as LOGIT_MODELS, ROOT, open_llama

PROMPTS = [
    ("story", "Once upon a time, in a small village at the foot of the mountains, there lived",
     False),
    ("code", "# Python function that returns the n-th Fibonacci number\ndef fibonacci(n):\n",
     False),
    ("chat", "<|im_start|>user\nExplain in two sentences why the sky is blue.<|im_end|>\n"
             "<|im_start|>assistant\n", True),
]

# Qwen2.5's chat prompt carries the system prompt its template adds by default.
QWEN_PROMPTS = PROMPTS[:2] + [
    ("chat", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
             "assistant.<|im_end|>\n<|im_start|>user\nExplain in two sentences why the sky is "
             "blue.<|im_end|>\n<|im_start|>assistant\n", True),
]

# Names as in make_logit_fixture.MODELS (which names the GGUF file); fixture and prompts.
MODELS = {
    "smollm2": dict(out="greedy_smollm2.json", prompts=PROMPTS),
    "qwen2.5-0.5b": dict(out="greedy_qwen2.5-0.5b.json", prompts=QWEN_PROMPTS),
}


def greedy(llm, prompt_ids, n_gen):
    """Greedy continuation from a fresh KV cache: (output ids, top-1 minus top-2 gaps)."""
    n_vocab = llm.n_vocab()
    llm.reset()
    out, gaps = [], []
    pending = list(prompt_ids)
    for _ in range(n_gen):
        llm.eval(pending)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
        top2 = np.argsort(-logits, kind="stable")[:2]
        token = int(np.argmax(logits))
        out.append(token)
        gaps.append(round(float(logits[top2[0]] - logits[top2[1]]), 5))
        pending = [token]
    return out, gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help=f"model name ({', '.join(MODELS)}) or GGUF path (%(default)s)")
    ap.add_argument("--out", help="fixture path (default: the named model's, in tests/data/parity)")
    ap.add_argument("--n-gen", type=int, default=64, help="greedy tokens (%(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (%(default)s)")
    args = ap.parse_args()

    import llama_cpp
    from gguf import GGUFReader
    if args.model in MODELS:
        model_path = os.path.join(ROOT, "models", LOGIT_MODELS[args.model]["gguf"])
        fetch = f"tools/fetch_model.sh {args.model}"
        out_path = args.out or os.path.join(ROOT, "tests", "data", "parity",
                                            MODELS[args.model]["out"])
        prompts = MODELS[args.model]["prompts"]
    elif not os.path.exists(args.model):
        sys.exit(f"--model {args.model}: neither a model name ({', '.join(MODELS)}) nor a file")
    elif args.out:
        model_path, fetch, out_path, prompts = args.model, "tools/fetch_model.sh", args.out, PROMPTS
    else:
        sys.exit(f"--out is required with a GGUF path (known names: {', '.join(MODELS)})")
    if not os.path.exists(model_path):
        sys.exit(f"model not found: {model_path} (run {fetch})")
    # Same configuration as the logit fixture: plain attention, fp16 KV, no repacking.
    llm = open_llama(model_path, n_ctx=1024, n_batch=512, n_threads=args.threads,
                     n_threads_batch=args.threads, logits_all=False, flash_attn=False,
                     verbose=False)
    cases = []
    for name, text, special in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        out, gaps = greedy(llm, ids, args.n_gen)
        detok = llm.detokenize(out, special=True).decode("utf-8", errors="replace")
        cases.append({"name": name, "prompt": text, "special": special, "prompt_ids": ids,
                      "output_ids": out, "gaps": gaps, "output_text": detok})
        print(f"{name}: {len(ids)} prompt tokens, min gap {min(gaps):.4f} "
              f"at step {int(np.argmin(gaps))}: {detok!r}")
    doc = {"version": 1,
           "source": f"llama.cpp {llama_cpp.__version__} (py), no flash-attn, no repack",
           "model_name": GGUFReader(model_path).fields["general.name"].contents(),
           "n_vocab": llm.n_vocab(), "n_gen": args.n_gen, "cases": cases}
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes)")


if __name__ == "__main__":
    main()
