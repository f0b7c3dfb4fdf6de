"""Synthetic questions over the training text, for the digest compressor's phase 2 (issue 15).

IC-Former's second stage teaches the digests to carry what a question about the document asks
for. The paper fine-tunes on instruction data; we have none that is not the quality harness's
(whose tasks must never be trained on), so the questions are made from the training text
itself, with answers that are spans of it:

  next      Which words come right after "<5-8 words>" in the text?    -> the 4-8 words after
  before    Which words come right before "<5-8 words>" in the text?   -> the 4-6 words before
  sentence  Quote the sentence of the text that contains the word "w". -> that sentence
  first     What are the first n words of the text?                    -> those words

The cue is a span that occurs once in the window, and "w" a word (5+ letters) that does, so
every question has one answer. Each example is laid out as the served model sees a document
context and a question at generation (eval/quality.cc's PrepareSample): one user turn of the
chat template, "<instruction>\\n\\n<text>\\n\\n<question>", then the assistant header and an
optional answer prefix. Everything up to the question is the *document* (compressed: the chat
header included, as the engine compresses a context's every token); the question and header
are the *suffix* (read as tokens); the answer ends with <|im_end|>.

The answers here are only the positions where the teacher is read: the loss (train_digest.py)
is the divergence of the digest-reading model from the **full-context model** on them, i.e.
the answer distilled from what the model says when it reads the whole text.
"""
import re
from dataclasses import dataclass

# Our own phrasings (not the quality harness's instructions).
INSTRUCTIONS = (
    "Read the text below, then answer the question that follows it.",
    "Here is a passage. Use it to answer the question at the end, as briefly as possible.",
    "The question after this document is about its exact wording. Reply with the words asked "
    "for and nothing else.",
    "Look carefully at the following text; a question about it comes last.",
)
PREFIXES = ("", "Answer:")
KINDS = ("next", "before", "sentence", "first")

_WORD = re.compile(r"\S+")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")


@dataclass
class Example:
    kind: str
    doc: list       # token ids: chat header, instruction and text (what a context compresses)
    suffix: list    # token ids: "\n\n<question><|im_end|>\n<|im_start|>assistant\n<prefix>"
    answer: list    # token ids of the answer, <|im_end|> last
    question: str
    answer_text: str


def make_question(rng, text):
    """(kind, question, answer) about `text`, or None when this text offers no unique cue."""
    words = _WORD.findall(text)
    if len(words) < 40:
        return None
    for _ in range(8):
        kind = rng.choice(KINDS)
        if kind in ("next", "before"):
            k = rng.randint(5, 8)
            m = rng.randint(4, 8) if kind == "next" else rng.randint(4, 6)
            lo = 0 if kind == "next" else m
            hi = len(words) - k - (m if kind == "next" else 0)
            if hi <= lo:
                continue
            i = rng.randrange(lo, hi)
            cue = " ".join(words[i:i + k])
            if text.count(cue) != 1:
                continue
            span = words[i + k:i + k + m] if kind == "next" else words[i - m:i]
            where = "after" if kind == "next" else "before"
            return kind, (f'Which {m} words come right {where} "{cue}" in the text?',
                          " ".join(span))
        if kind == "sentence":
            sentences = [s.strip() for s in _SENTENCE.findall(text)]
            sentences = [s for s in sentences if 6 <= len(s.split()) <= 30]
            if not sentences:
                continue
            s = rng.choice(sentences)
            cands = [w for w in re.findall(r"[A-Za-z]{5,}", s)
                     if len(re.findall(rf"\b{w}\b", text)) == 1]
            if not cands:
                continue
            w = rng.choice(cands)
            return kind, (f'Quote the sentence of the text that contains the word "{w}".', s)
        if kind == "first":
            m = rng.randint(5, 10)
            return kind, (f"What are the first {m} words of the text?", " ".join(words[:m]))
    return None


def make_example(rng, tok, doc_ids, n_tokens, im_end):
    """A question over a window of about n_tokens of the tokenized document doc_ids (whole
    words only), laid out as described above; None when no question could be made."""
    s = rng.randrange(0, max(1, len(doc_ids) - n_tokens + 1))
    text = tok.decode(doc_ids[s:s + n_tokens])
    # Drop the partial first and last words the token window may have cut.
    first, last = text.find(" "), text.rfind(" ")
    if first < 0 or last <= first:
        return None
    text = text[first + 1:last].strip()
    made = make_question(rng, text)
    if made is None:
        return None
    kind, (question, answer) = made
    user = f"{rng.choice(INSTRUCTIONS)}\n\n{text}\n\n{question}"
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                     add_generation_prompt=True)
    prefix = rng.choice(PREFIXES)
    prompt += prefix
    cut = prompt.rfind("\n\n" + question)
    doc = tok(prompt[:cut], add_special_tokens=False)["input_ids"]
    suffix = tok(prompt[cut:], add_special_tokens=False)["input_ids"]
    answer = tok((" " if prefix else "") + answer, add_special_tokens=False)["input_ids"]
    return Example(kind, doc, suffix, answer + [im_end], question, answer)


def draw_example(rng, tok, docs, weights, lo, hi, im_end):
    """An example over a window of lo..hi text tokens of a document drawn from `docs`."""
    while True:
        doc = rng.choices(docs, weights=weights)[0]
        ex = make_example(rng, tok, doc, rng.randint(lo, hi), im_end)
        if ex is not None:
            return ex
