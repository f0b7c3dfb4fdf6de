#!/usr/bin/env python3
"""RULER-style synthetic long-context tasks for the quality harness (stdlib only).

Follows RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654; NVIDIA/RULER scripts/data/synthetic): the same task
families, templates and string-match scoring, with our own generator and haystacks:

  niah_single_noise   one needle "One of the special magic numbers for {key} is: {value}."
                      in the noise haystack (RULER niah_single_1)
  niah_single_prose   the same in the prose haystack (RULER niah_single_2)
  niah_multikey       four needles with different keys, one asked for (niah_multikey_1)
  niah_multivalue     four values for the same key, all asked for (niah_multivalue)
  niah_multiquery     four needles, all four keys asked for (niah_multiquery)
  vt                  variable tracking: one 4-hop chain VAR A = 12345, VAR B = VAR A, ...
                      among noise; name every variable holding the value (vt)
  cwe                 common-words extraction: a numbered word list, 10 words 30 times each,
                      the rest 3 times; name the 10 most common (cwe)
  fwe                 frequent-words extraction: Zipf-distributed coded words; name the 3
                      most frequent (fwe, alpha 2.0)
  qa_prose            question answering over the prose haystack (in the spirit of RULER's
                      qa_1/qa_2, with its QA template, but synthetic so that it is seeded and
                      has one checkable answer): 4-8 invented facts of one kind about
                      distinct invented people ("Cornelius Whitcombe was born in the town of
                      Fenbury."), one sentence each, at seeded sentence boundaries of the
                      Austen haystack; the question asks for one of them in plain words ("In
                      which town was Cornelius Whitcombe born?") and the reference is the
                      single answer string. The kind of fact is drawn per sample: birthplace,
                      trade, the year of a sea voyage, the colour of the person's house. Names
                      and answers are drawn from pools filtered against the whole of Austen,
                      so every name and answer occurs in the document exactly once.

Haystacks: "noise" is RULER's repeated "The grass is green. The sky is blue. ..."; "prose"
is Jane Austen's six novels (public domain; Debian package r-cran-janeaustenr, extracted by
tools/fetch_prose.py), standing in for RULER's Paul Graham essays, which are not free.

Lengths are in tokens of the model the eval will run (--model; default $CTXCACHE_MODEL, as
for ctxcache-eval, else the served model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M), counted by
`ctxcache tokenize --model` (whole prompt incl. the answer budget: input tokens <= length -
max_new_tokens - template reserve). Run ctxcache-eval with the same model: another tokenizer
gives other lengths (SmolLM2's takes ~3% more tokens than Qwen's for Austen). Each sample
records the model it was fitted for in "fitted_for". Everything is seeded: the same
arguments give byte-identical samples.

  eval/ruler.py --lengths 1024,2048 --n 2 --out eval/work/samples.jsonl
  eval/ruler.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --lengths 512 --out s.jsonl
"""
import argparse
import json
import os
import random
import string
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSE = os.path.join(ROOT, "models", "prose", "austen.txt")
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")
DEFAULT_MODEL = os.path.join(ROOT, "models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
# Tokens the chat template adds around the user turn, plus the difference between how the
# harness joins the parts ("\n\n" between them, the question tokenized after the cut) and
# how we count them ("\n"). Measured with `ctxcache tokenize --parse-special` (the
# harness's document + suffix, less our count) on every task: Qwen2.5's ChatML with its
# default system prompt ("You are Qwen, created by Alibaba Cloud. You are a helpful
# assistant.", 16 tokens) adds 29-30 tokens, SmolLM2's (16 tokens) 31-32, at 1K,
# 2K and 8K alike; 48 leaves 16 of slack. ctxcache-eval checks the real total against the
# window and fails a sample that does not fit.
TEMPLATE_RESERVE = 48

ADJECTIVES = ("amused ancient brave bright calm clever curious daring eager early elegant "
              "faithful fancy fierce gentle giant glossy graceful happy honest hungry jolly "
              "kind lively lucky mellow mighty modern narrow noble odd orange patient plain "
              "polite proud quick quiet rapid rare rich silent silly smooth steady sturdy "
              "swift tame tender tidy vast warm wild wise witty young zealous").split()
NOUNS = ("anchor apple badger basket beacon bicycle blanket bottle bridge candle canyon "
         "castle cedar cherry compass cottage crystal dolphin engine falcon feather garden "
         "glacier harbor helmet island jacket kettle ladder lantern lemon marble meadow "
         "mirror needle orchard otter panther pebble pencil pepper planet puzzle quilt "
         "rabbit ribbon saddle salmon spruce statue teapot thunder tiger tunnel velvet "
         "violin walnut whistle willow window").split()

TASKS = ("niah_single_noise", "niah_single_prose", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt", "cwe", "fwe", "qa_prose")

# max_new_tokens per task (RULER: niah 128, vt 30, cwe 120, fwe 50; ours are the answer's
# length plus slack, to keep the CPU run bounded).
MAX_NEW = {"niah_single_noise": 24, "niah_single_prose": 24, "niah_multikey": 24,
           "niah_multivalue": 64, "niah_multiquery": 64, "vt": 40, "cwe": 96, "fwe": 40,
           "qa_prose": 24}

NIAH_INSTRUCTION = ("Some special magic {kind} are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the {kind} afterwards.")


class TokenCounter:
    """Counts tokens with the project's own tokenizer (`ctxcache tokenize --ids-only`) of
    `model` (a GGUF path; None = ctxcache's own lookup: $CTXCACHE_MODEL, else its default)."""

    def __init__(self, binary, model=None):
        self.binary = binary
        self.model = model
        self._cache = {}

    def __call__(self, text):
        if text in self._cache:
            return self._cache[text]
        cmd = [self.binary, "tokenize", "--ids-only", "--no-bos", "-"]
        if self.model:
            cmd[2:2] = ["--model", self.model]
        r = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{self.binary} tokenize failed: {r.stderr.decode()}")
        n = len(r.stdout.split())
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[text] = n
        return n


def key_phrase(rng, used):
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in used:
            used.add(k)
            return k


def magic_number(rng, used):
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in used:
            used.add(v)
            return v


def needle(key, value):
    return f"One of the special magic numbers for {key} is: {value}."


def prose_units(rng):
    """Paragraphs of a random stretch of the novels (a different place per sample)."""
    if not os.path.exists(PROSE):
        raise SystemExit(f"prose haystack missing: run tools/fetch_prose.py (expects {PROSE})")
    with open(PROSE, encoding="utf-8") as f:
        paras = [p for p in f.read().split("\n\n") if p.strip()]
    start = rng.randrange(len(paras) // 2)
    # Sentences, so that needles sit between sentences and lengths fit finely.
    units = []
    for p in paras[start:] + paras[:start]:
        units.extend(x if x.endswith(".") else x + "." for x in p.split(". ") if x)
        if len(units) > 4000:  # enough for 8K tokens
            break
    return units


def insert_at_depths(units, needles, rng):
    """Needles at evenly spread random depths between haystack units (RULER's depth sweep)."""
    out = list(units)
    depths = sorted(rng.random() for _ in needles)
    for i, (d, n) in enumerate(zip(depths, needles)):
        out.insert(min(len(out), int(d * len(units)) + i), n)
    return out


def fit(build, budget, count, lo=1, hi=None):
    """Largest haystack size k with count(build(k)) <= budget (build is monotone in k)."""
    hi = hi or 64
    while count(build(hi)["prompt_text"]) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)["prompt_text"]) <= budget:
            lo = mid
        else:
            hi = mid
    return build(lo)


def niah(task, rng, haystack_units, sep):
    used_k, used_v = set(), set()
    if task in ("niah_single_noise", "niah_single_prose"):
        keys = [key_phrase(rng, used_k)]
        pairs = [(keys[0], magic_number(rng, used_v))]
        asked = keys
    elif task == "niah_multikey":
        keys = [key_phrase(rng, used_k) for _ in range(4)]
        pairs = [(k, magic_number(rng, used_v)) for k in keys]
        asked = keys[:1]
    elif task == "niah_multivalue":
        keys = [key_phrase(rng, used_k)]
        pairs = [(keys[0], magic_number(rng, used_v)) for _ in range(4)]
        asked = keys
    else:  # niah_multiquery
        keys = [key_phrase(rng, used_k) for _ in range(4)]
        pairs = [(k, magic_number(rng, used_v)) for k in keys]
        asked = keys
    needles = [needle(k, v) for k, v in pairs]
    rng.shuffle(needles)
    depth_rng = random.Random(rng.random())
    answers = [v for k, v in pairs if k in asked]
    if task == "niah_multivalue":
        question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        prefix = f" The special magic numbers for {asked[0]} mentioned in the provided text are"
    elif task == "niah_multiquery":
        joined = ", ".join(asked[:-1]) + f", and {asked[-1]}"
        question = f"What are all the special magic numbers for {joined} mentioned in the provided text?"
        prefix = f" The special magic numbers for {joined} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        prefix = f" The special magic number for {asked[0]} mentioned in the provided text is"
    reference = " " + ", ".join(answers) + "."
    kind = "numbers"

    def build(k):
        units = insert_at_depths(haystack_units[:k], needles, random.Random(depth_rng.random()))
        context = sep.join(units)
        instruction = NIAH_INSTRUCTION.format(kind=kind)
        return {"instruction": instruction, "context": context, "question": question,
                "answer_prefix": prefix, "outputs": answers, "reference": reference,
                "prompt_text": f"{instruction}\n{context}\n{question}{prefix}"}
    return build


def vt(rng):
    value = str(rng.randint(10000, 99999))
    names = []
    while len(names) < 5:
        n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if n not in names:
            names.append(n)
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    depth_rng = random.Random(rng.random())
    question = (f"Question: Find all variables that are assigned the value {value} in the text "
                "above.")
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, 5 "
              f"variables are assigned the value {value}, they are:")
    instruction = ("Memorize and track the chain(s) of variable assignment hidden in the "
                   "following text.")

    def build(k):
        units = [NOISE] * k
        # The chain's order must survive insertion: sorted depths keep it.
        units = insert_at_depths(units, chain, random.Random(depth_rng.random()))
        context = "\n".join(units)
        return {"instruction": instruction, "context": context, "question": question,
                "answer_prefix": prefix, "outputs": names, "reference": " " + " ".join(names),
                "prompt_text": f"{instruction}\n\n{context}\n{question}{prefix}"}
    return build


def cwe(rng, vocabulary, length):
    # RULER repeats the 10 common words 30 times and the others 3 times; that list alone is
    # ~1.5K tokens, so shorter contexts scale the counts down (common 4..30, others 1 or 3),
    # keeping the common words clearly more frequent.
    freq_common = max(4, min(30, length // 256))
    freq_rare = 3 if length >= 4096 else 1
    words = rng.sample(vocabulary, 600)
    common, rare_pool = words[:10], words[10:]
    question = ("Question: What are the 10 most common words in the above list?")
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    instruction = ("Below is a numbered list of words. In these words, some appear more often "
                   "than others. Memorize the ones that appear most often.")
    order_seed = rng.random()

    def build(k):
        # k is capped by the pool; beyond it the common words repeat more.
        rare = rare_pool[: min(k, len(rare_pool))]
        extra = max(0, k - len(rare_pool)) // 10
        items = common * (freq_common + extra) + rare * freq_rare
        random.Random(order_seed).shuffle(items)
        context = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return {"instruction": instruction, "context": context, "question": question,
                "answer_prefix": prefix, "outputs": common,
                "reference": " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common)),
                "prompt_text": f"{instruction}\n{context}\n{question}{prefix}"}
    return build


def fwe(rng):
    vocab = []
    while len(vocab) < 1000:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in vocab:
            vocab.append(w)
    alpha = 2.0
    weights = [1.0 / (i + 1) ** alpha for i in range(len(vocab))]
    seq_seed = rng.random()
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What "
                "are the three most frequently appeared words in the above coded text?")
    prefix = (" Answer: According to the coded text above, the three most frequently appeared "
              "words are:")
    instruction = ("Read the following coded text and track the frequency of each coded word. "
                   "Find the three most frequently appeared coded words.")

    def build(k):
        r = random.Random(seq_seed)
        seq = r.choices(vocab, weights=weights, k=k)
        counts = {}
        for w in seq:
            counts[w] = counts.get(w, 0) + 1
        top = sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))[:3]
        context = " ".join(seq)
        return {"instruction": instruction, "context": f"... {context} ...", "question": question,
                "answer_prefix": prefix, "outputs": top, "reference": " " + " ".join(top),
                "prompt_text": f"{instruction}\n... {context} ...\n{question}{prefix}"}
    return build


# qa_prose: invented people and answers. The pools are filtered against the whole of Austen
# (qa_pools), so a name or an answer never occurs in the haystack, only in its own fact.
QA_FIRST = ("Albertine Ambrose Augustin Barnaby Bartholomew Cecily Clementine Cornelius Cosmo "
            "Dorothea Drusilla Evander Ezekiel Felix Florian Gideon Griselda Horatio Ignatius "
            "Imogen Isolde Jasper Josiah Keziah Lavinia Leander Leopold Lorenzo Lucian "
            "Marguerite Mordecai Nathaniel Octavia Oswin Ottilie Percival Phineas Rosalind "
            "Rupert Sabina Seraphina Silas Thaddeus Theodora Tobias Tristram Ursula Valentine "
            "Wilfred Wilhelmina Winifred Zachariah").split()
QA_LAST = ("Abernethy Ainsworth Ashbury Blackwood Brackenridge Bramwell Carrington Cobbold "
           "Cresswell Dunmore Entwistle Fairweather Fotheringham Greywell Haverford "
           "Hollingsworth Illingworth Kettering Lockridge Mallory Merriweather Northcote "
           "Ormerod Pendlebury Pettigrew Quimby Ravensworth Rothwell Sedgwick Stallworth "
           "Thistlewood Underhill Vexley Warburton Wetherby Whitcombe Yardley").split()
QA_TOWN_HEADS = ("Ash Brack Bram Cold Crag Dun Elm Fal Fen Glen Gras Hather Hol Ink Kings Lang "
                 "Lyn Mar Mor North Oak Pen Quen Red Rook Sal Stan Tam Thorn Ul Ven Wex Whit "
                 "Wood Wy Yar").split()
QA_TOWN_TAILS = ("bury by combe dale field ford gate ham holme hurst leigh mere more stead "
                 "thorpe ton well wick worth").split()
# Trades start with a consonant ("was a {answer}").
QA_TRADES = ("bellfounder bookbinder brewer cartographer cheesemonger clockmaker cobbler "
             "falconer ferryman furrier glassblower glazier lacemaker lamplighter locksmith "
             "ropemaker shipwright stonemason tanner thatcher tinsmith watchmaker weaver "
             "wheelwright").split()
QA_COLOURS = ("burgundy cerulean chartreuse cobalt emerald heliotrope indigo lilac magenta "
              "maroon mauve ochre primrose russet sepia turquoise vermilion violet").split()
# kind: (fact, question, answer pool); {name} and {answer} are filled in.
QA_KINDS = {
    "birthplace": ("{name} was born in the town of {answer}.",
                   "In which town was {name} born?", "towns"),
    "trade": ("By trade, {name} was a {answer}.", "What was the trade of {name}?", "trades"),
    "voyage_year": ("{name} set out on a long sea voyage in the year {answer}.",
                    "In which year did {name} set out on a long sea voyage?", "years"),
    "house_colour": ("{name} lived in a house that was painted {answer}.",
                     "What colour was the house of {name} painted?", "colours"),
}
QA_INSTRUCTION = ("Answer the question based on the given text. Only give me the answer and do "
                  "not output any other words.")
QA_PREFIX = " Answer:"


_AUSTEN_LOWER = None


def austen_lower():
    global _AUSTEN_LOWER
    if _AUSTEN_LOWER is None:
        if not os.path.exists(PROSE):
            raise SystemExit(f"prose haystack missing: run tools/fetch_prose.py (expects {PROSE})")
        with open(PROSE, encoding="utf-8") as f:
            _AUSTEN_LOWER = f.read().lower()
    return _AUSTEN_LOWER


_QA_POOLS = None


def qa_pools():
    """The name and answer pools, less every entry that occurs anywhere in Austen (case-
    insensitive substring: "Eleanor" is in Northanger Abbey, "Tammere" in "stammered")."""
    global _QA_POOLS
    if _QA_POOLS is None:
        text = austen_lower()
        absent = lambda xs: [x for x in xs if x.lower() not in text]  # noqa: E731
        _QA_POOLS = {
            "first": absent(QA_FIRST), "last": absent(QA_LAST),
            "towns": absent(h + t for h in QA_TOWN_HEADS for t in QA_TOWN_TAILS),
            "trades": absent(QA_TRADES), "colours": absent(QA_COLOURS),
            "years": absent(str(y) for y in range(1600, 1900)),
        }
        for k, v in _QA_POOLS.items():
            assert len(v) >= 8, (k, v)
    return _QA_POOLS


def qa_prose(rng, haystack_units):
    """4-8 facts of one kind about distinct people at seeded sentence boundaries; the question
    asks for one of them. Every name and answer occurs once in the facts (and nowhere in the
    haystack, by qa_pools), so string_match_all on the one answer is unambiguous."""
    pools = qa_pools()
    kind = rng.choice(sorted(QA_KINDS))
    fact_t, question_t, pool = QA_KINDS[kind]
    n = rng.randint(4, 8)
    while True:  # redraw until no answer or name is part of another fact (e.g. town = surname)
        names = [f"{f} {l}" for f, l in zip(rng.sample(pools["first"], n),
                                            rng.sample(pools["last"], n))]
        answers = rng.sample(pools[pool], n)
        facts = [fact_t.format(name=m, answer=a) for m, a in zip(names, answers)]
        asked = rng.randrange(n)
        question = "Question: " + question_t.format(name=names[asked])
        joined = " ".join(facts).lower()
        fixed = f"{QA_INSTRUCTION} {question}{QA_PREFIX}".lower()
        if (all(joined.count(a.lower()) == 1 and a.lower() not in fixed for a in answers)
                and all(joined.count(w.lower()) == 1 for m in names for w in m.split())):
            break
    order = list(range(n))
    rng.shuffle(order)
    depth_seed = rng.random()
    answer = answers[asked]

    def build(k):
        units = insert_at_depths(haystack_units[:k], [facts[i] for i in order],
                                 random.Random(depth_seed))
        context = " ".join(units)
        return {"instruction": QA_INSTRUCTION, "context": context, "question": question,
                "answer_prefix": QA_PREFIX, "outputs": [answer], "reference": f" {answer}.",
                "fact_kind": kind, "facts": facts, "asked": names[asked],
                "prompt_text": f"{QA_INSTRUCTION}\n{context}\n{question}{QA_PREFIX}"}
    return build


def word_vocabulary():
    """Common English words for cwe: lower-case words of the prose haystack, 4-9 letters."""
    with open(PROSE, encoding="utf-8") as f:
        text = f.read(600_000)
    seen = {}
    for w in text.split():
        w = w.strip(".,;:!?\"'()-_").lower()
        if 4 <= len(w) <= 9 and w.isalpha():
            seen[w] = seen.get(w, 0) + 1
    return sorted(seen)


def make_sample(task, length, index, seed, count, fitted_for=None):
    rng = random.Random(f"{seed}:{task}:{length}:{index}")
    max_new = MAX_NEW[task]
    budget = length - max_new - TEMPLATE_RESERVE
    if task.startswith("niah"):
        prose = task != "niah_single_noise"
        units = prose_units(rng) if prose else [NOISE] * 100_000
        build = niah(task, rng, units, " " if prose else "\n")
    elif task == "vt":
        build = vt(rng)
    elif task == "cwe":
        build = cwe(rng, word_vocabulary(), length)
    elif task == "fwe":
        build = fwe(rng)
    elif task == "qa_prose":
        build = qa_prose(rng, prose_units(rng))
    else:
        raise SystemExit(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    s = fit(build, budget, count)
    s.update({"id": f"{task}-{length}-{index}", "task": task, "length": length, "index": index,
              "max_new_tokens": max_new, "input_tokens_estimate": count(s["prompt_text"])})
    if fitted_for:
        s["fitted_for"] = fitted_for
    del s["prompt_text"]
    return s


def string_match_all(prediction, outputs):
    """RULER's score for these tasks: the fraction of reference strings found (case-insensitive)."""
    p = prediction.lower()
    return sum(1.0 for o in outputs if o.lower() in p) / len(outputs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--n", type=int, default=1, help="samples per (task, length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctxcache", default=os.path.join(ROOT, "build", "server", "ctxcache"),
                    help="the ctxcache CLI (its tokenizer counts tokens)")
    ap.add_argument("--model", default=os.environ.get("CTXCACHE_MODEL") or DEFAULT_MODEL,
                    help="GGUF whose tokenizer fits the lengths: the model ctxcache-eval will "
                    "run (default: $CTXCACHE_MODEL, as for ctxcache-eval, else %(default)s)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not os.path.exists(args.model):
        ap.error(f"--model {args.model} not found (tools/fetch_model.sh fetches the models)")
    count = TokenCounter(args.ctxcache, args.model)
    fitted_for = os.path.splitext(os.path.basename(args.model))[0]
    tasks = args.tasks.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    jobs = [(t, L, i) for i in range(args.n) for L in lengths for t in tasks]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".part", "w", encoding="utf-8") as f:
        for j, (t, L, i) in enumerate(jobs):
            s = make_sample(t, L, i, args.seed, count, fitted_for)
            f.write(json.dumps(s) + "\n")
            print(f"\r[{j + 1}/{len(jobs)}] {s['id']}: ~{s['input_tokens_estimate']} tokens   ",
                  end="", file=sys.stderr, flush=True)
    os.replace(args.out + ".part", args.out)
    print(f"\nwrote {len(jobs)} samples to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
