#!/usr/bin/env python3
"""Trains the IC-Former digest compressor (train/icformer.py) against the frozen served model.

Phase `ae` (the paper's pretraining, plus ICAE's continuation objective): a random window of a
training document (train/prepare_text.py; never the quality harness's texts) is split into a
chunk of `--chunk` tokens and the `--cont` tokens after it. The compressor turns the chunk
into m digests (m = chunk / ratio, the ratio drawn from `--ratios` per step), and the frozen
LLM (train/frozen_llm.py: the served GGUF in PyTorch) is asked, with the digests as its first
input embeddings, either to
  reconstruct the chunk:  [digests, AE, chunk tokens]  loss on the chunk tokens
  or to continue it:      [digests, next tokens]        loss on the next tokens
(one objective per step, `--ae-share` of the steps reconstruct). Only the compressor and the
AE embedding learn; the LLM's weights are frozen and receive no gradients (its activations
do, to reach the digests). AdamW, cosine decay after a linear warm-up.

Phase 2 (`--qa-share`, the share of windows that are questions; the paper's instruction
fine-tuning): a synthetic question over a window of `--qa-tokens` training tokens
(train/qa_data.py), laid out as a document context and a question are at generation (the
chat header and instruction belong to the compressed document). The loss is the KL divergence,
on the answer's tokens, from the frozen model reading the whole text (the teacher) to the same
model reading the document's digests: the full-context model's answer, distilled.

Every `--eval-every` steps the same losses are measured on fixed windows of the held-out
documents; every `--save-every` steps (and on Ctrl-C / SIGTERM) a checkpoint is written
(compressor, AE embedding, optimizer, step, RNG states, the loss history), and a run started
with the same `--out` resumes from it. `--plot` draws the loss curves.

  python3 train/train_digest.py --out models/train/pilot --minutes 30     # the pilot
  python3 train/train_digest.py --out models/train/pilot --plot docs/img/digest_loss.png --steps 0
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time

import torch
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import frozen_llm  # noqa: E402
import qa_data  # noqa: E402
from icformer import ICFormer, ICFormerConfig, digests_for, split_chunks  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Texts:
    """Tokenized documents; windows of chunk + cont tokens drawn from them."""

    def __init__(self, path, tokenizer, min_tokens, limit=None):
        self.docs = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
                if len(ids) >= min_tokens:
                    self.docs.append(ids)
                if limit and len(self.docs) >= limit:
                    break
        if not self.docs:
            raise ValueError(f"{path}: no document of {min_tokens}+ tokens")
        # Draw documents by length, so that every window of the text is equally likely.
        self.weights = [len(d) - min_tokens + 1 for d in self.docs]

    def window(self, rng, n):
        doc = rng.choices(self.docs, weights=self.weights)[0]
        s = rng.randrange(0, len(doc) - n + 1)
        return doc[s:s + n]


def losses(llm, comp, ae_emb, embed, windows, chunk, cont, n_digest, reconstruct):
    """Mean token cross-entropy of the frozen LLM reading the digests of each window's chunk
    and reconstructing that chunk (reconstruct=True) or continuing after it."""
    ids = torch.tensor(windows)
    chunk_ids, next_ids = ids[:, :chunk], ids[:, chunk:chunk + cont]
    digests = comp(embed(chunk_ids), n_digest)
    b = ids.shape[0]
    if reconstruct:
        target = chunk_ids
        inputs = torch.cat([digests, ae_emb.expand(b, 1, -1).to(digests.dtype),
                            embed(chunk_ids[:, :-1])], dim=1)
    else:
        target = next_ids
        inputs = torch.cat([digests, embed(next_ids[:, :-1])], dim=1)
    # The logits of the last target-length positions predict the targets (the LM head runs
    # only there: on 151,936 outputs it is a third of the forward pass).
    out = llm(inputs_embeds=inputs, logits_to_keep=target.shape[1])
    return F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                           target.reshape(-1))


def qa_losses(llm, comp, embed, ex, ratio, chunk, max_digest, teacher_logp=None):
    """(KL from the teacher, cross-entropy of the answer, share of answer tokens that are the
    argmax) of the frozen LLM reading the digests of the example's document (compressed in
    the engine's chunks) before its question. ratio None: no document at all (a bound)."""
    m = len(ex.answer)
    tail = embed(torch.tensor([ex.suffix + ex.answer[:-1]]))
    parts = []
    if ratio is not None:
        doc = torch.tensor([ex.doc])
        for s, e in split_chunks(len(ex.doc), chunk):
            parts.append(comp(embed(doc[:, s:e]), digests_for(e - s, ratio, max_digest)))
    out = llm(inputs_embeds=torch.cat(parts + [tail], dim=1), logits_to_keep=m)
    logp = F.log_softmax(out.logits[0].float(), dim=-1)
    if teacher_logp is None:
        teacher_logp = teacher(llm, ex)
    kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
    target = torch.tensor(ex.answer)
    ce = F.nll_loss(logp.detach(), target)
    acc = (logp.detach().argmax(-1) == target).float().mean()
    return kl, float(ce), float(acc)


def teacher(llm, ex):
    """Log-probabilities on the answer's positions of the model reading the whole text."""
    with torch.no_grad():
        ids = torch.tensor([ex.doc + ex.suffix + ex.answer[:-1]])
        return F.log_softmax(llm(ids, logits_to_keep=len(ex.answer)).logits[0].float(), dim=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="run folder: checkpoint, history (resumed)")
    ap.add_argument("--model", default=frozen_llm.DEFAULT_MODEL)
    ap.add_argument("--text", default=os.path.join(ROOT, "models", "train", "text.jsonl"))
    ap.add_argument("--heldout", default=os.path.join(ROOT, "models", "train", "heldout.jsonl"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--ratios", default="4,8", help="compression ratios drawn per step")
    ap.add_argument("--ae-share", type=float, default=0.5)
    ap.add_argument("--qa-share", type=float, default=0.0,
                    help="share of windows that are synthetic questions (phase 2)")
    ap.add_argument("--qa-tokens", default="200,760",
                    help="text tokens of a question's document: a range lo,hi")
    ap.add_argument("--qa-eval", type=int, default=16, help="held-out questions per evaluation")
    ap.add_argument("--eval-ae-every", type=int, default=0,
                    help="phase-1 held-out losses every N steps (default: --eval-every)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ff", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=4, help="windows per optimizer step / batch")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (the "
                    "cosine schedule's length); 0: only evaluate / plot")
    ap.add_argument("--minutes", type=float, default=0, help="stop (with a checkpoint) after")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--save-every", type=int, default=25)
    # transformers keeps a GGUF's weights quantized and computes in float32 (bfloat16 only
    # adds casts around every matmul: slower, and further from what the engine computes).
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the frozen LLM's and compressor's compute type")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", help="draw the loss curves here (PNG) and exit")
    ap.add_argument("--init-from", help="a compressor GGUF (export_gguf.py) to go on training "
                    "from, when --out has no checkpoint: its weights, fresh optimizer state")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    history_path = os.path.join(args.out, "history.json")

    if args.plot:
        with open(history_path) as f:
            plot(json.load(f), args.plot)
        return 0

    dtype = getattr(torch, args.dtype)
    llm = frozen_llm.load(args.model, dtype=dtype)
    embed = llm.get_input_embeddings()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(args.model)),
                                        gguf_file=os.path.basename(args.model))
    need = args.chunk + args.cont
    train = Texts(args.text, tok, need)
    held = Texts(args.heldout, tok, need)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    qa_lo, qa_hi = (int(x) for x in args.qa_tokens.split(","))
    log(f"text: {len(train.docs)} training documents ({sum(map(len, train.docs)) / 1e6:.1f} M "
        f"tokens), {len(held.docs)} held out")

    # Up to chunk/2 digest queries: every ratio from 2x up can be trained or served.
    cfg = ICFormerConfig(hidden=llm.config.hidden_size, layers=args.layers, ff=args.ff,
                         max_digest=args.chunk // 2, chunk=args.chunk)
    torch.manual_seed(args.seed)
    comp = ICFormer(cfg).to(dtype)
    ae_emb = torch.nn.Parameter(torch.randn(1, 1, cfg.hidden, dtype=dtype) * 0.02)
    params = list(comp.parameters()) + [ae_emb]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    ratios = [float(r) for r in args.ratios.split(",")]
    rng = random.Random(args.seed)
    history = {"config": cfg.to_dict(), "args": vars(args), "train": [], "eval": []}
    step = 0
    if args.init_from and not os.path.exists(ckpt_path):
        from export_gguf import read_gguf
        g_cfg, g_sd, g_ae, g_steps = read_gguf(args.init_from)
        if any(g_cfg[k] != getattr(cfg, k) for k in ("hidden", "layers", "ff", "max_digest",
                                                      "chunk", "head_dim")):
            sys.exit(f"--init-from {args.init_from}: shape {g_cfg} differs from this run's")
        comp.load_state_dict({k: v.to(dtype) for k, v in g_sd.items()})
        if g_ae is not None:
            ae_emb.data.copy_(g_ae.to(dtype))
        history["init_from"] = {"file": args.init_from, "train_steps": g_steps}
        log(f"initialised from {args.init_from} ({g_steps} steps; fresh optimizer state)")
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        comp.load_state_dict(state["compressor"])
        ae_emb.data.copy_(state["ae"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        with open(history_path) as f:
            history = json.load(f)
        log(f"resumed at step {step}")
    n_params = sum(p.numel() for p in params)
    log(f"compressor: {cfg.layers} layers, d {cfg.hidden}, ff {cfg.ff}, {n_params / 1e6:.2f} M "
        f"parameters; chunk {args.chunk} tokens, ratios {ratios}; LLM in {args.dtype}")

    # Fixed held-out windows and settings, the same at every evaluation.
    eval_rng = random.Random(12345)
    eval_windows = [held.window(eval_rng, need) for _ in range(args.eval_windows)]
    qa_rng = random.Random(54321)
    qa_eval = [qa_data.draw_example(qa_rng, tok, held.docs, held.weights, qa_lo, qa_hi, im_end)
               for _ in range(args.qa_eval if args.qa_share > 0 else 0)]
    qa_teacher = [teacher(llm, ex) for ex in qa_eval]
    if qa_eval and "qa_bounds" not in history:
        # The teacher itself (KL 0 by definition) and the model with no document at all.
        none = [qa_losses(llm, comp, embed, ex, None, args.chunk, cfg.max_digest, t)
                for ex, t in zip(qa_eval, qa_teacher)]
        history["qa_bounds"] = {
            "teacher_ce": sum(float(F.nll_loss(t, torch.tensor(ex.answer)))
                              for ex, t in zip(qa_eval, qa_teacher)) / len(qa_eval),
            "teacher_acc": sum(float((t.argmax(-1) == torch.tensor(ex.answer)).float().mean())
                               for ex, t in zip(qa_eval, qa_teacher)) / len(qa_eval),
            "no_doc_kl": sum(float(k) for k, _, _ in none) / len(none),
            "no_doc_ce": sum(c for _, c, _ in none) / len(none),
            "no_doc_acc": sum(a for _, _, a in none) / len(none)}
        log(f"question bounds: {json.dumps(history['qa_bounds'])}")

    def evaluate(final=False):
        comp.eval()
        row = {"step": step}
        with torch.no_grad():
            for r in ratios:
                if qa_eval:
                    res = [qa_losses(llm, comp, embed, ex, r, args.chunk, cfg.max_digest, t)
                           for ex, t in zip(qa_eval, qa_teacher)]
                    row[f"qa_{r:g}x"] = sum(float(k) for k, _, _ in res) / len(res)
                    row[f"qa_ce_{r:g}x"] = sum(c for _, c, _ in res) / len(res)
                    row[f"qa_acc_{r:g}x"] = sum(a for _, _, a in res) / len(res)
                if step % (args.eval_ae_every or args.eval_every) and not final:
                    continue
                m = max(1, math.ceil(args.chunk / r))
                for name, rec in (("ae", True), ("cont", False)):
                    row[f"{name}_{r:g}x"] = float(sum(
                        losses(llm, comp, ae_emb, embed, [w], args.chunk, args.cont, m, rec)
                        for w in eval_windows) / len(eval_windows))
        comp.train()
        return row

    def bounds():
        """The continuation loss on the evaluation windows with the whole chunk as text (what
        a digest could at best recover) and with no context at all (what it must beat); and
        the reconstruction loss with no digest (the chunk's own language-model loss, where
        a digest that carries nothing leaves it; a perfect one takes it to 0)."""
        out = {}
        with torch.no_grad():
            total = 0.0
            for w in eval_windows:
                ids = torch.tensor([w[:args.chunk]])
                total += float(F.cross_entropy(llm(ids).logits[0, :-1].float(), ids[0, 1:]))
            out["ae_no_digest"] = total / len(eval_windows)
            for name, keep in (("cont_full_text", args.chunk), ("cont_no_context", 0)):
                total = 0.0
                for w in eval_windows:
                    ids = torch.tensor([w[args.chunk - keep:args.chunk + args.cont]])
                    logits = llm(ids).logits[0, keep - 1 if keep else 0:-1].float()
                    target = ids[0, keep if keep else 1:]
                    total += float(F.cross_entropy(logits, target))
                out[name] = total / len(eval_windows)
        return out

    def save():
        tmp = ckpt_path + ".part"
        torch.save({"compressor": comp.state_dict(), "ae": ae_emb.data, "config": cfg.to_dict(),
                    "optimizer": opt.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "step": step}, tmp)
        os.replace(tmp, ckpt_path)
        with open(history_path + ".part", "w") as f:
            json.dump(history, f)
        os.replace(history_path + ".part", history_path)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    if step == 0 and args.steps > 0:
        history["bounds"] = bounds()
        log(f"continuation loss bounds: {json.dumps(history['bounds'])}")
        history["eval"].append(evaluate())
        log(f"eval at step 0: {json.dumps(history['eval'][-1])}")
    t_start, t_last = time.time(), time.time()
    while step < args.steps and not stop["now"]:
        if args.minutes and time.time() - t_start > args.minutes * 60:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        total = {}
        for _ in range(args.accum):
            r = rng.choice(ratios)
            if rng.random() < args.qa_share:
                ex = qa_data.draw_example(rng, tok, train.docs, train.weights, qa_lo, qa_hi,
                                          im_end)
                loss, _, acc = qa_losses(llm, comp, embed, ex, r, args.chunk, cfg.max_digest)
                (loss / args.accum).backward()
                total.setdefault(f"qa_{r:g}x", []).append(loss.item())
                total.setdefault(f"qa_acc_{r:g}x", []).append(acc)
                continue
            rec = rng.random() < args.ae_share
            m = max(1, math.ceil(args.chunk / r))
            windows = [train.window(rng, need) for _ in range(args.batch)]
            loss = losses(llm, comp, ae_emb, embed, windows, args.chunk, args.cont, m, rec)
            (loss / args.accum).backward()
            key = f"{'ae' if rec else 'cont'}_{r:g}x"
            total.setdefault(key, []).append(loss.item())
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        step += 1
        now = time.time()
        history["train"].append({"step": step, "lr": lr, "grad_norm": norm,
                                 "seconds": now - t_last,
                                 **{k: sum(v) / len(v) for k, v in total.items()}})
        t_last = now
        done = time.time() - t_start
        log(f"step {step}/{args.steps} lr {lr:.2e} |g| {norm:.2f} "
            + " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(total.items()))
            + f" ({history['train'][-1]['seconds']:.1f} s/step, {done / 60:.1f} min)")
        if step % args.eval_every == 0:
            history["eval"].append(evaluate())
            log(f"eval at step {step}: {json.dumps(history['eval'][-1])}")
        if step % args.save_every == 0:
            save()
    if step and history["eval"] and history["eval"][-1]["step"] != step:
        history["eval"].append(evaluate(final=True))
        log(f"final eval at step {step}: {json.dumps(history['eval'][-1])}")
    save()
    log(f"checkpoint at step {step}: {ckpt_path}")
    return 0


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = history["train"]
    qa_keys = sorted({k for row in history["eval"] for k in row
                      if k.startswith("qa_") and not k.startswith(("qa_ce_", "qa_acc_"))})
    fig, axes = plt.subplots(1, 2 if qa_keys else 1, figsize=(13 if qa_keys else 8, 4),
                             squeeze=False)
    ax = axes[0][0]
    keys = sorted({k for row in train + history["eval"] for k in row
                   if k.startswith(("ae_", "cont_"))})
    for k in keys:
        pts = [(row["step"], row[k]) for row in train if k in row]
        # A running mean over 20 steps: each step's loss is of a few windows only.
        ys = [sum(y for _, y in pts[max(0, i - 19):i + 1]) / len(pts[max(0, i - 19):i + 1])
              for i in range(len(pts))]
        ax.plot([s for s, _ in pts], ys, lw=1, label=f"train {k} (mean of 20)")
    for k in keys:
        ev = [(row["step"], row[k]) for row in history["eval"] if k in row]
        if ev:
            ax.plot([s for s, _ in ev], [y for _, y in ev], "o--", ms=3, label=f"held-out {k}")
    styles = {"cont_full_text": "continuation, whole chunk as text",
              "cont_no_context": "continuation, no context",
              "ae_no_digest": "reconstruction, no digest (the text's own LM loss)"}
    for k, v in history.get("bounds", {}).items():
        ax.axhline(v, ls=":", lw=1, color="gray")
        ax.annotate(styles.get(k, k), (0, v), fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("digest compressor (IC-Former) training")
    ax.legend(fontsize=7)
    if qa_keys:
        # Phase 2: KL from the full-context model on the answers (left axis) and the share of
        # answer tokens the digest-reading model ranks first (right axis), held out.
        ax = axes[0][1]
        for k in qa_keys:
            ev = [(row["step"], row[k]) for row in history["eval"] if k in row]
            ax.plot([s for s, _ in ev], [y for _, y in ev], "o-", ms=3, label=f"held-out KL {k[3:]}")
        b = history.get("qa_bounds", {})
        if "no_doc_kl" in b:
            ax.axhline(b["no_doc_kl"], ls=":", lw=1, color="gray")
            ax.annotate("KL with no document", (0, b["no_doc_kl"]), fontsize=7, color="gray",
                        va="bottom")
        ax.set_xlabel("optimizer step (phase 2)")
        ax.set_ylabel("KL(full context || digest), nats / answer token")
        acc = ax.twinx()
        for k in qa_keys:
            ev = [(row["step"], row[f"qa_acc_{k[3:]}"]) for row in history["eval"]
                  if f"qa_acc_{k[3:]}" in row]
            acc.plot([s for s, _ in ev], [y for _, y in ev], "s--", ms=3,
                     label=f"held-out top-1 {k[3:]}")
        for name, label in (("teacher_acc", "top-1, full context"),
                            ("no_doc_acc", "top-1, no document")):
            if name in b:
                acc.axhline(b[name], ls="-.", lw=1, color="tab:red")
                acc.annotate(label, (0, b[name]), fontsize=7, color="tab:red", va="bottom")
        acc.set_ylim(0, 1)
        acc.set_ylabel("answer tokens ranked first")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = acc.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
        ax.set_title("phase 2: questions over held-out text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
