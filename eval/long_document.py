#!/usr/bin/env python3
"""A document four times longer than the model's window, compressed by finch and questioned.

SmolLM2-135M has an 8K-token window. This builds a 32K-token document (Jane Austen's prose,
the quality harness's haystack, with one "special magic number" needle at a chosen depth),
compresses it with `ctxcache compress --method finch --ratio 8` -- chunk by chunk against
the compressed cache, kept keys re-rotated to compact positions so that every position stays
inside the window -- then asks for the needle with `ctxcache generate --context`. It prints
the commands, their output and a verdict; --markdown prints a block for docs/quality.md.

  eval/long_document.py [--tokens 32768] [--depth 0.5] [--ratio 8] [--seed 3]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ruler  # noqa: E402  (the haystack, needles and token counting)

ROOT = ruler.ROOT


def build_document(count, tokens, depth, rng, haystack="prose"):
    key = ruler.key_phrase(rng, set())
    value = ruler.magic_number(rng, set())
    units = []
    if haystack == "noise":
        units = [ruler.NOISE] * (tokens // 20 + 1)
    else:
        with open(ruler.PROSE, encoding="utf-8") as f:
            paras = [p for p in f.read().split("\n\n") if p.strip()]
        start = rng.randrange(len(paras) // 2)
        for p in paras[start:] + paras[:start]:
            units.extend(x if x.endswith(".") else x + "." for x in p.split(". ") if x)
            if len(units) > 4 * tokens // 20:
                break

    def text(k):
        hay = units[:k]
        at = int(depth * len(hay))
        return " ".join(hay[:at] + [ruler.needle(key, value)] + hay[at:])

    # Largest k with at most `tokens` tokens (binary search; counting 32K tokens is quick).
    lo, hi = 1, len(units)
    if count(text(hi)) < tokens:
        raise SystemExit(f"not enough prose for {tokens} tokens")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(text(mid)) <= tokens:
            lo = mid
        else:
            hi = mid
    return text(lo), key, value


def run(cmd, show=True):
    if show:
        print("$ " + " ".join(a if " " not in a else repr(a) for a in cmd), file=sys.stderr)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {r.stderr.strip()}")
    return r, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "server", "ctxcache"))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--ratio", type=float, default=8)
    ap.add_argument("--method", default="finch")
    ap.add_argument("--haystack", choices=("prose", "noise"), default="prose",
                    help="Austen's prose (hard) or RULER's repeated noise sentences (easy)")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--keep", help="keep the document and the context file in this directory")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    count = ruler.TokenCounter(args.binary)
    doc, key, value = build_document(count, args.tokens, args.depth, rng, args.haystack)
    n = count(doc)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            tmp = args.keep
        doc_path, ctx_path = os.path.join(tmp, "doc.txt"), os.path.join(tmp, "doc.ctxc")
        with open(doc_path, "w", encoding="utf-8") as f:
            f.write(doc)
        compress = [args.binary, "compress", "--method", args.method, "--ratio", str(args.ratio),
                    "--chunk", str(args.chunk), "--doc", doc_path, "--question", question,
                    "--out", ctx_path, "--json", "--quiet"] + threads
        r, t_compress = run(compress)
        stats = json.loads(r.stdout)
        generate = [args.binary, "generate", "--context", ctx_path, "--chat", "--prompt",
                    question, "--temperature", "0", "--max-tokens", "32"] + threads
        g, t_generate = run(generate)
        answer = g.stdout.strip()
    ok = value in answer
    result = {"document_tokens": n, "needle_depth": args.depth, "key": key, "value": value,
              "ratio": args.ratio, "chunk": args.chunk, "compress": stats,
              "compress_wall_s": round(t_compress, 1), "answer": answer, "found": ok,
              "generate_wall_s": round(t_generate, 1)}
    print(json.dumps(result, indent=2))
    if args.markdown:
        hay = "Austen prose" if args.haystack == "prose" else "RULER noise sentences"
        print(f"\n- document: {n} tokens of {hay}, needle \"{ruler.needle(key, value)}\" "
              f"at depth {args.depth:.0%}\n- `ctxcache compress --method finch --ratio "
              f"{args.ratio:g} --chunk {args.chunk}`: {t_compress:.0f} s wall; {stats}\n"
              f"- `ctxcache generate --context` answer: \"{answer}\" -> "
              f"{'found' if ok else 'NOT found'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
