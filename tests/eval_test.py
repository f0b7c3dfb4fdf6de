#!/usr/bin/env python3
"""Tests of the quality harness: the RULER-style generator (eval/ruler.py), its scoring, the
runner (ctxcache-eval) end to end on small samples with the real model, and the report.

  tests/eval_test.py CTXCACHE_BIN CTXCACHE_EVAL_BIN   (ctest passes both)
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "eval"))
import ruler  # noqa: E402

CTXCACHE = EVAL = None


class ScoringTest(unittest.TestCase):
    def test_string_match_all_is_case_insensitive_and_partial(self):
        self.assertEqual(ruler.string_match_all("The number is 1234567.", ["1234567"]), 1.0)
        self.assertEqual(ruler.string_match_all("ABCDE and fghij", ["abcde", "FGHIJ", "KLMNO"]),
                         2 / 3)
        self.assertEqual(ruler.string_match_all("", ["1"]), 0.0)


class GeneratorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.count = ruler.TokenCounter(CTXCACHE)
        cls.samples = {t: ruler.make_sample(t, 1024, 0, 0, cls.count) for t in ruler.TASKS}

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
        self.assertIn("Emma", open(ruler.PROSE, encoding="utf-8").read(200000))

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


class RunnerTest(unittest.TestCase):
    def test_end_to_end_and_resume(self):
        with tempfile.TemporaryDirectory() as tmp:
            samples, raw = os.path.join(tmp, "s.jsonl"), os.path.join(tmp, "raw.jsonl")
            subprocess.run([sys.executable, os.path.join(ROOT, "eval", "ruler.py"), "--tasks",
                            "niah_single_noise", "--lengths", "512", "--ctxcache", CTXCACHE,
                            "--out", samples], check=True, capture_output=True)
            cmd = [EVAL, "--samples", samples, "--out", raw, "--methods", "streaming,finch,snapkv",
                   "--ratios", "2,16", "--head-budget", "uniform,adaptive", "--recycled",
                   "--threads", "2"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            rows = [json.loads(l) for l in open(raw)]
            comp = [x for x in rows if x.get("decode") != "recycled"]
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
            self.assertEqual(len([x for x in rows if x.get("decode") == "recycled"]), 1)
            # Resuming skips finished samples.
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("0 samples to run", r.stderr)
            self.assertEqual(len(open(raw).readlines()), len(rows))
            # The report aggregates the uniform rows into the published schema.
            out = os.path.join(tmp, "quality.json")
            subprocess.run([sys.executable, os.path.join(ROOT, "eval", "report.py"), "--raw", raw,
                            "--out", out], check=True, capture_output=True)
            cells = json.load(open(out))
            self.assertEqual(len(cells), 6)
            for c in cells:
                self.assertEqual(set(c) >= {"task", "length", "method", "ratio", "n", "score",
                                            "full_score", "kl", "kept_tokens", "kv_bytes"}, True)
                self.assertEqual(c["n"], 1)
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
    unittest.main(argv=[sys.argv[0], "-v"])
