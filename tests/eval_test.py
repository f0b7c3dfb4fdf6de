#!/usr/bin/env python3
"""Tests of the quality harness: the RULER-style generator (eval/ruler.py), its scoring, the
runner (ctxcache-eval) end to end on small samples with the real model, and the report
(eval/report.py: Wilson intervals, the >= 0.8 filter, bytes ratios from old and new raw rows).

  tests/eval_test.py CTXCACHE_BIN CTXCACHE_EVAL_BIN   (ctest passes both)
  tests/eval_test.py CTXCACHE_BIN CTXCACHE_EVAL_BIN WilsonTest QaProseTest   (some classes)

The generator counts with the served model (ruler.DEFAULT_MODEL, Qwen2.5-Coder-0.5B); the
runner test runs SmolLM2-135M, the fast model, and fits its samples to SmolLM2's tokenizer.
"""
import collections
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "eval"))
import report  # noqa: E402
import ruler  # noqa: E402

CTXCACHE = EVAL = None
SMOLLM = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


class ScoringTest(unittest.TestCase):
    def test_string_match_all_is_case_insensitive_and_partial(self):
        self.assertEqual(ruler.string_match_all("The number is 1234567.", ["1234567"]), 1.0)
        self.assertEqual(ruler.string_match_all("ABCDE and fghij", ["abcde", "FGHIJ", "KLMNO"]),
                         2 / 3)
        self.assertEqual(ruler.string_match_all("", ["1"]), 0.0)


class GeneratorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.count = ruler.TokenCounter(CTXCACHE, ruler.DEFAULT_MODEL)
        cls.samples = {t: ruler.make_sample(t, 1024, 0, 0, cls.count) for t in ruler.TASKS}

    def test_counts_with_the_given_model(self):
        # Qwen2.5 and SmolLM2 split this text differently: --model reaches the tokenizer.
        text = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        self.assertEqual(self.count(text), 16)
        self.assertEqual(ruler.TokenCounter(CTXCACHE, SMOLLM)(text), 18)
        self.assertTrue(ruler.DEFAULT_MODEL.endswith("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))

    def test_deterministic(self):
        for t in ("niah_multikey", "vt", "fwe"):
            self.assertEqual(ruler.make_sample(t, 1024, 0, 0, self.count), self.samples[t], t)
        self.assertNotEqual(ruler.make_sample("vt", 1024, 1, 0, self.count)["outputs"],
                            self.samples["vt"]["outputs"])

    def test_fits_the_length_tightly(self):
        for t, s in self.samples.items():
            budget = 1024 - s["max_new_tokens"] - ruler.TEMPLATE_RESERVE
            self.assertLessEqual(s["input_tokens_estimate"], budget, t)
            self.assertGreater(s["input_tokens_estimate"], budget * 0.8, t)

    def test_needles_are_in_the_context(self):
        for t in ("niah_single_noise", "niah_single_prose", "niah_multikey", "niah_multivalue",
                  "niah_multiquery"):
            s = self.samples[t]
            for v in s["outputs"]:
                self.assertRegex(s["context"], rf"special magic numbers for [a-z]+-[a-z]+ is: {v}\.")
        self.assertEqual(len(re.findall("special magic numbers", self.samples["niah_multikey"]["context"])), 4)
        self.assertIn("emma", ruler.austen_lower()[:200000])

    def test_variable_chain_in_order(self):
        s = self.samples["vt"]
        names = s["outputs"]
        pos = [s["context"].index(f"VAR {n} =") for n in names]
        self.assertEqual(pos, sorted(pos))
        for a, b in zip(names, names[1:]):
            self.assertIn(f"VAR {b} = VAR {a}.", s["context"])

    def test_extraction_answers_are_the_most_frequent(self):
        cwe = self.samples["cwe"]
        words = re.findall(r"^\d+\. (\S+)$", cwe["context"], re.M)
        top = [w for w, _ in collections.Counter(words).most_common(10)]
        self.assertEqual(sorted(top), sorted(cwe["outputs"]))
        fwe = self.samples["fwe"]
        counts = collections.Counter(fwe["context"].strip(". ").split())
        self.assertEqual(sorted(w for w, _ in counts.most_common(3)), sorted(fwe["outputs"]))


class QaProseTest(unittest.TestCase):
    """qa_prose: 4-8 invented facts of one kind in the Austen haystack, one asked for."""

    @classmethod
    def setUpClass(cls):
        cls.count = ruler.TokenCounter(CTXCACHE, ruler.DEFAULT_MODEL)
        cls.s = ruler.make_sample("qa_prose", 1024, 0, 0, cls.count)
        # Unfitted builds over many seeds (no tokenizer needed) for the invariants.
        cls.built = []
        for i in range(40):
            rng = random.Random(f"test:{i}")
            cls.built.append(ruler.qa_prose(rng, ruler.prose_units(rng))(150))

    def check(self, s):
        answer = s["outputs"][0]
        self.assertEqual(len(s["outputs"]), 1)
        ctx = s["context"]
        # The answer occurs in the document exactly once, and nowhere else in the prompt.
        self.assertEqual(ctx.lower().count(answer.lower()), 1, (answer, s["facts"]))
        for part in ("instruction", "question", "answer_prefix"):
            self.assertNotIn(answer.lower(), s[part].lower())
        # 4-8 facts of one kind, each once, at sentence boundaries of the haystack.
        self.assertTrue(4 <= len(s["facts"]) <= 8, s["facts"])
        fact_t, question_t, _ = ruler.QA_KINDS[s["fact_kind"]]
        pattern = re.escape(fact_t).replace(r"\{name\}", r"(\w+ \w+)").replace(
            r"\{answer\}", r"(\w+)")
        people = {}
        for f in s["facts"]:
            m = re.fullmatch(pattern, f)
            self.assertIsNotNone(m, (f, s["fact_kind"]))
            people[m.group(1)] = m.group(2)
            self.assertEqual(ctx.count(f), 1, f)
            i = ctx.index(f)
            self.assertTrue(i == 0 or ctx[i - 2:i] == ". ", ctx[max(0, i - 40):i])
            self.assertTrue(i + len(f) == len(ctx) or ctx[i + len(f)] == " ")
        self.assertEqual(len(people), len(s["facts"]))  # distinct people
        self.assertEqual(len(set(people.values())), len(s["facts"]))  # distinct answers
        # The question names the person whose fact holds the answer, in plain words.
        self.assertEqual(people[s["asked"]], answer)
        self.assertEqual(s["question"], "Question: " + question_t.format(name=s["asked"]))
        self.assertEqual(ctx.count(s["asked"]), 1)
        self.assertEqual(s["answer_prefix"], " Answer:")
        self.assertEqual(s["reference"], f" {answer}.")
        self.assertEqual(ruler.string_match_all(f" {answer}.", s["outputs"]), 1.0)
        other = next(a for p, a in people.items() if p != s["asked"])
        self.assertEqual(ruler.string_match_all(f" {other}.", s["outputs"]), 0.0)

    def test_the_fitted_sample(self):
        self.check(self.s)
        self.assertEqual(self.s["task"], "qa_prose")
        self.assertEqual(self.s["max_new_tokens"], ruler.MAX_NEW["qa_prose"])
        self.assertIn("qa_prose", ruler.TASKS)

    def test_many_seeds(self):
        for s in self.built:
            self.check(s)
        self.assertEqual({s["fact_kind"] for s in self.built}, set(ruler.QA_KINDS))
        self.assertGreater(len({len(s["facts"]) for s in self.built}), 2)

    def test_deterministic(self):
        self.assertEqual(ruler.make_sample("qa_prose", 1024, 0, 0, self.count), self.s)
        other = ruler.make_sample("qa_prose", 1024, 1, 0, self.count)
        self.assertNotEqual(other["facts"], self.s["facts"])

    def test_lengths_fit(self):
        for L, s in ((1024, self.s), (512, ruler.make_sample("qa_prose", 512, 3, 0, self.count))):
            budget = L - s["max_new_tokens"] - ruler.TEMPLATE_RESERVE
            self.assertEqual(s["input_tokens_estimate"],
                             self.count(f"{s['instruction']}\n{s['context']}\n{s['question']}"
                                        f"{s['answer_prefix']}"))
            self.assertLessEqual(s["input_tokens_estimate"], budget)
            self.assertGreater(s["input_tokens_estimate"], budget * 0.9)


class WilsonTest(unittest.TestCase):
    """95% Wilson score interval, against values computed by hand:
    center = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2),
    z = 1.959964, z^2 = 3.841459."""

    def test_known_values(self):
        # 0 of 10: [0, (z^2/n) / (1 + z^2/n)] = [0, 0.384146 / 1.384146]
        lo, hi = report.wilson(0.0, 10)
        self.assertEqual(lo, 0.0)
        self.assertAlmostEqual(hi, 0.277533, places=5)
        # 10 of 10: the mirror image.
        lo, hi = report.wilson(1.0, 10)
        self.assertAlmostEqual(lo, 0.722467, places=5)
        self.assertEqual(hi, 1.0)
        # 5 of 10: 0.5 -+ 1.415989 * sqrt(0.025 + 0.009604) = 0.5 -+ 0.263408
        lo, hi = report.wilson(0.5, 10)
        self.assertAlmostEqual(lo, 0.236592, places=5)
        self.assertAlmostEqual(hi, 0.763408, places=5)
        # 1 of 10: center 0.169385, half 0.151233 (the published 0.0179-0.4042)
        lo, hi = report.wilson(0.1, 10)
        self.assertAlmostEqual(lo, 0.017876, places=5)
        self.assertAlmostEqual(hi, 0.404150, places=5)
        # 1 of 1 (a one-sample cell): [z^2/... ] = [1 / (1 + z^2), 1]
        lo, hi = report.wilson(1.0, 1)
        self.assertAlmostEqual(lo, 1 / (1 + 3.841459), places=5)

    def test_partial_scores_are_fractions_of_a_success(self):
        # Ten samples scoring 1/2 each give the interval of 5 successes in 10.
        self.assertEqual(report.stats([0.5] * 10)["ci_low"], report.wilson(0.5, 10)[0])
        self.assertEqual(report.stats([1, 0] * 5)["ci_high"], report.wilson(0.5, 10)[1])
        self.assertEqual(report.wilson(0.3, 0), (0.0, 1.0))
        lo, hi = report.wilson(2 / 3, 3)
        self.assertTrue(0 < lo < 2 / 3 < hi < 1)


def raw_row(task="niah_single_noise", length=1024, method="snapkv", ratio=8.0, score=1.0,
            full=1.0, index=0, kv_bytes=2_500_000, full_kv_bytes=20_000_000, **extra):
    r = {"id": f"{task}-{length}-{index}", "task": task, "length": length, "index": index,
         "method": method, "ratio": ratio, "score": score, "full_score": full, "kl": 0.5,
         "ll": -2.0, "full_ll": -1.0, "kept_tokens": 100.0, "kv_bytes": kv_bytes,
         "full_kv_bytes": full_kv_bytes}
    r.update(extra)
    return r


class ReportTest(unittest.TestCase):
    OLD_FIELDS = {"task", "length", "method", "ratio", "n", "score", "full_score", "kl",
                  "kept_tokens", "kv_bytes", "full_kv_bytes", "ll", "full_ll"}
    NEW_FIELDS = {"model", "kv_dtype", "head_budget", "bytes_ratio", "ci_low", "ci_high"}

    def test_bytes_ratio_from_old_rows(self):
        # Rows written before model / kv_dtype / head_budget existed: SmolLM2, fp16, uniform.
        rows = [raw_row(index=i, kv_bytes=4_999_680, full_kv_bytes=19_952_640) for i in range(2)]
        (c,) = report.aggregate(rows)
        self.assertTrue(set(c) >= self.OLD_FIELDS | self.NEW_FIELDS, set(c))
        self.assertEqual((c["model"], c["kv_dtype"], c["head_budget"]),
                         ("SmolLM2-135M-Instruct.Q4_1", "fp16", "uniform"))
        self.assertAlmostEqual(c["bytes_ratio"], 19_952_640 / 4_999_680, places=3)
        self.assertEqual(c["n"], 2)
        self.assertEqual((c["ci_low"], c["ci_high"]), tuple(round(x, 4) for x in
                                                            report.wilson(1.0, 2)))

    def test_bytes_ratio_from_new_rows(self):
        q = "qwen2.5-coder-0.5b-instruct-q4_k_m"
        rows = [
            # int8 at 8x entries: 1/8 of the entries at ~half the bytes each, scales included.
            raw_row(model=q, kv_dtype="int8", head_budget="adaptive", index=0, score=1.0,
                    kv_bytes=1_300_000, full_kv_bytes=20_000_000),
            raw_row(model=q, kv_dtype="int8", head_budget="adaptive", index=1, score=0.0,
                    kv_bytes=700_000, full_kv_bytes=12_000_000),
            # The same sample and ratio at fp16 / uniform, and an old row: separate cells.
            raw_row(model=q, kv_dtype="fp16", head_budget="uniform", index=0),
            raw_row(index=0),
        ]
        cells = report.aggregate(rows)
        self.assertEqual(len(cells), 3)
        by = {(c["model"], c["kv_dtype"], c["head_budget"]): c for c in cells}
        c = by[(q, "int8", "adaptive")]
        self.assertEqual(c["n"], 2)
        self.assertEqual(c["score"], 0.5)
        # Total full bytes over total stored bytes: 32 MB / 2 MB.
        self.assertAlmostEqual(c["bytes_ratio"], 16.0)
        self.assertEqual(c["kv_bytes"], 1_000_000)
        self.assertEqual(by[(q, "fp16", "uniform")]["bytes_ratio"], 8.0)
        self.assertEqual(by[("SmolLM2-135M-Instruct.Q4_1", "fp16", "uniform")]["bytes_ratio"], 8.0)
        self.assertEqual(report.bytes_ratio(100, 0), None)
        # The served model is listed first.
        self.assertEqual(report.models_of(cells)[0], q)
        # The full-context score counts each sample once, whatever it ran with.
        full = report.full_context(rows)
        self.assertEqual(full[(q, "niah_single_noise", 1024)]["n"], 2)
        self.assertEqual(full[("SmolLM2-135M-Instruct.Q4_1", "niah_single_noise", 1024)]["n"], 1)

    def test_digest_rows_have_no_head_budget(self):
        # ctxcache-eval writes a digest's spec default ("uniform"); a digest keeps no
        # per-head entries, so its cell is labelled "–", apart from the KV methods' cells.
        q = "qwen2.5-coder-0.5b-instruct-q4_k_m"
        rows = [raw_row(model=q, method="digest", ratio=4.0, kv_dtype="fp16",
                        head_budget="uniform", kv_bytes=700_000),
                raw_row(model=q, method="kvzip", ratio=4.0, kv_dtype="fp16",
                        head_budget="uniform")]
        cells = {c["method"]: c for c in report.aggregate(rows)}
        self.assertEqual(cells["digest"]["head_budget"], "–")
        self.assertEqual(cells["kvzip"]["head_budget"], "uniform")
        self.assertIn("digest | fp16 | –", report.markdown(report.aggregate(rows), []))

    def test_share_of_full_only_counts_cells_the_full_context_solves(self):
        rows = []
        for i in range(4):
            rows.append(raw_row(task="a", index=i, full=1.0, score=0.5))   # full 1.0: counts
            rows.append(raw_row(task="b", index=i, full=0.8, score=0.4))   # full 0.8: counts
            rows.append(raw_row(task="c", index=i, full=0.75, score=0.0))  # full 0.75: does not
            rows.append(raw_row(task="d", index=i, full=1.0 if i < 3 else 0.0,
                                score=0.0))                                # mean 0.75: does not
        cells = report.aggregate(rows)
        self.assertEqual(sorted(c["task"] for c in report.qualifying(cells)), ["a", "b"])
        share = report.share_of_full(cells)
        (key,) = share
        e = share[key]
        self.assertEqual(e["n"], 8)
        self.assertAlmostEqual(e["share"], (0.5 * 4 + 0.4 * 4) / (1.0 * 4 + 0.8 * 4))
        lo, hi = report.wilson(0.45, 8)
        self.assertAlmostEqual(e["ci_low"], lo / 0.9)
        self.assertAlmostEqual(e["ci_high"], hi / 0.9)
        text = report.targets(cells, [8.0])
        self.assertIn("2 of 4 (task, length) cells qualify", text)
        self.assertIn("a 1K; b 1K.", text)
        self.assertIn("| snapkv | fp16 | uniform | 50% [", text)
        self.assertIn(" at 8.0x | 8 |", text)
        # Nothing qualifies: said so, no table.
        none = report.targets([c for c in cells if c["task"] in "cd"], [8.0])
        self.assertIn("0 of 2 (task, length) cells qualify", none)
        self.assertIn("no cell qualifies", none)

    def test_tables_and_plot_from_mixed_rows(self):
        q = "qwen2.5-coder-0.5b-instruct-q4_k_m"
        rows = [raw_row(index=i, score=float(i % 2)) for i in range(3)]  # old rows
        for kv, scale in (("fp16", 1.0), ("int8", 0.53), ("int4", 0.28)):
            for ratio in (2.0, 8.0):
                for i in range(2):
                    rows.append(raw_row(model=q, kv_dtype=kv, head_budget="uniform", index=i,
                                        ratio=ratio, method="kvzip",
                                        kv_bytes=int(20_000_000 / ratio * scale)))
        rows.append(dict(raw_row(model=q, index=0, method="none", ratio=1), decode="recycled",
                         same_as_full=True))
        cells = report.aggregate(rows)
        rec = report.recycled(rows)
        text = report.markdown(cells, rec, rows)
        self.assertLess(text.index(f"### {q}"), text.index("### SmolLM2-135M-Instruct.Q4_1"))
        self.assertIn("| niah_single_noise | 1.00 [0.34, 1.00] (n=2) | 1.00 [0.34, 1.00] (n=2) |",
                      text)  # full context per task and length, interval and n
        self.assertIn("| kvzip | int4 | uniform | 8x | 28.6x | 2 | 1.00 [0.34, 1.00] |", text)
        self.assertIn("| 1K | 10 | 1/8 | 1 | 1.00 [0.21, 1.00] |", text)  # recycled, interval
        self.assertIn("0.33 [0.06, 0.79]", text)  # SmolLM2's 1 of 3
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest("matplotlib is not installed")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "q.png")
            report.plot(cells, path, rows)
            self.assertGreater(os.path.getsize(path), 10_000)


class RunnerTest(unittest.TestCase):
    def test_end_to_end_and_resume(self):
        with tempfile.TemporaryDirectory() as tmp:
            samples, raw = os.path.join(tmp, "s.jsonl"), os.path.join(tmp, "raw.jsonl")
            subprocess.run([sys.executable, os.path.join(ROOT, "eval", "ruler.py"), "--tasks",
                            "niah_single_noise", "--lengths", "512", "--ctxcache", CTXCACHE,
                            "--model", SMOLLM, "--out", samples], check=True, capture_output=True)
            self.assertEqual(json.loads(open(samples).readline())["fitted_for"],
                             "SmolLM2-135M-Instruct.Q4_1")
            cmd = [EVAL, "--samples", samples, "--out", raw, "--methods", "streaming,finch,snapkv",
                   "--ratios", "2,16", "--head-budget", "uniform,adaptive", "--kv-dtypes",
                   "fp16,int4", "--recycled", "--recycled-stride", "4,10", "--threads", "2",
                   "--model", SMOLLM]
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            rows = [json.loads(l) for l in open(raw)]
            every_dtype = [x for x in rows if x.get("decode") != "recycled"]
            comp = [x for x in every_dtype if x["kv_dtype"] == "fp16" and x["method"] != "none"]
            # Every selection stored both ways: the same entries, int4 in 0.31x the bytes.
            int4 = {(x["method"], x["ratio"], x["head_budget"]): x
                    for x in every_dtype if x["kv_dtype"] == "int4" and x["method"] != "none"}
            # ... and the whole document at int4: what quantization alone costs.
            whole = [x for x in every_dtype if x["method"] == "none"]
            self.assertEqual([(x["kv_dtype"], x["ratio"]) for x in whole], [("int4", 1)])
            self.assertAlmostEqual(whole[0]["bytes_ratio"], 256 / 80, delta=0.1)
            self.assertEqual(len(int4), len(comp))
            for x in comp:
                q = int4[(x["method"], x["ratio"], x["head_budget"])]
                self.assertEqual(q["kept_tokens"], x["kept_tokens"])
                self.assertAlmostEqual(q["kv_bytes"] / x["kv_bytes"], 80 / 256, delta=0.02)
                self.assertAlmostEqual(q["bytes_ratio"], x["full_kv_bytes"] / q["kv_bytes"])
                self.assertEqual(q["model"], "SmolLM2-135M-Instruct.Q4_1")
            uniform = [x for x in comp if x["head_budget"] == "uniform"]
            adaptive = {(x["method"], x["ratio"]): x for x in comp if x["head_budget"] == "adaptive"}
            self.assertEqual(sorted((x["method"], x["ratio"]) for x in uniform),
                             sorted((m, r) for m in ("streaming", "finch", "snapkv") for r in (2, 16)))
            # Adaptive head budgets: the same total as uniform; streaming takes none.
            self.assertEqual(sorted(adaptive), sorted((m, r) for m in ("finch", "snapkv")
                                                      for r in (2, 16)))
            self.assertIn("streaming takes no head budget adaptive; skipped", r.stderr)
            for x in uniform:
                if x["method"] != "streaming":
                    a = adaptive[(x["method"], x["ratio"])]
                    self.assertEqual((a["kept_tokens"], a["kv_bytes"]),
                                     (x["kept_tokens"], x["kv_bytes"]), a)
            for x in comp:
                self.assertGreaterEqual(x["kl"], 0)
                self.assertLessEqual(x["ll"], 0)
                n = x["doc_tokens"]
                self.assertAlmostEqual(x["kept_tokens"], -(-n // int(x["ratio"])), delta=0.01)
                self.assertLess(x["kv_bytes"], x["full_kv_bytes"])
            # An easy 512-token needle: the full context answers it, and so do the prompt-guided
            # methods at 2x, with answer distributions close to the full context's (the
            # question-agnostic streaming may drop the needle, depending on its depth).
            self.assertEqual(comp[0]["full_score"], 1.0, comp[0]["full_prediction"])
            guided = [x for x in uniform if x["method"] in ("snapkv", "finch") and x["ratio"] == 2]
            self.assertEqual(len(guided), 2)
            for x in guided:
                self.assertEqual(x["score"], 1.0, x)
                self.assertLess(x["kl"], 0.5, x)
            self.assertTrue(all(x["kl"] > 0.5 for x in uniform if x["ratio"] == 16), uniform)
            # One recycled row per (stride, top-K) pair, from the one prefill.
            self.assertEqual(sorted((x["recycled_stride"], x["recycled_topk"]) for x in rows
                                    if x.get("decode") == "recycled"), [(4, 0), (10, 0)])
            # Resuming skips finished samples.
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("0 samples to run", r.stderr)
            self.assertEqual(len(open(raw).readlines()), len(rows))
            # The report: one cell per (method, ratio, head budget, kv_dtype): 6 uniform and 4
            # adaptive selections, each at fp16 and int4, and the whole document at int4.
            out = os.path.join(tmp, "quality.json")
            subprocess.run([sys.executable, os.path.join(ROOT, "eval", "report.py"), "--raw", raw,
                            "--out", out], check=True, capture_output=True)
            cells = json.load(open(out))
            self.assertEqual(len(cells), 21)
            for c in cells:
                self.assertEqual(set(c) >= {"task", "length", "method", "ratio", "n", "score",
                                            "full_score", "kl", "kept_tokens", "kv_bytes",
                                            "model", "kv_dtype", "head_budget", "bytes_ratio",
                                            "ci_low", "ci_high"}, True)
                self.assertEqual(c["n"], 1)
                self.assertEqual(c["model"], "SmolLM2-135M-Instruct.Q4_1")
                self.assertIn(c["kv_dtype"], ("fp16", "int4"))
                self.assertAlmostEqual(c["bytes_ratio"], c["full_kv_bytes"] / c["kv_bytes"],
                                       delta=0.01)
                self.assertTrue(c["ci_low"] <= c["score"] <= c["ci_high"], c)
            # --doc rewrites only the block between the markers, tables included.
            doc = os.path.join(tmp, "quality.md")
            with open(doc, "w") as f:
                f.write("intro\n<!-- BEGIN quality-tables (eval/report.py) -->\nold\n"
                        "<!-- END quality-tables -->\noutro\n")
            subprocess.run([sys.executable, os.path.join(ROOT, "eval", "report.py"), "--raw", raw,
                            "--out", out, "--doc", doc], check=True, capture_output=True)
            text = open(doc).read()
            self.assertTrue(text.startswith("intro\n<!-- BEGIN") and text.endswith("outro\n"), text)
            self.assertNotIn("\nold\n", text)
            self.assertIn("| snapkv | ", text)
            self.assertIn("Share of the full-context score kept", text)

    def test_bad_arguments_are_clear(self):
        r = subprocess.run([EVAL, "--samples", "x", "--out", "y", "--methods", "magic"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown method 'magic'", r.stderr)
        r = subprocess.run([EVAL, "--samples", "x", "--out", "y", "--head-budget", "uniform,ada"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--head-budget: head_budget must be \"uniform\"", r.stderr)
        r = subprocess.run([EVAL, "--samples", "/nonexistent", "--out", "/tmp/ctx-eval-none"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot read --samples", r.stderr)


if __name__ == "__main__":
    CTXCACHE, EVAL = sys.argv[1], sys.argv[2]
    unittest.main(argv=[sys.argv[0], "-v"] + sys.argv[3:])
