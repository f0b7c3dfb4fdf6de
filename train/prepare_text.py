#!/usr/bin/env python3
"""Fetches and cleans the training text of the digest compressor (IC-Former, issue 15).

The text must never be what the quality harness evaluates on: the harness's haystacks are
Jane Austen's novels (tools/fetch_prose.py) and RULER's synthetic noise, so the compressor
learns from other English text that Debian packages ship:

  moby      Herman Melville's Moby Dick (r-cran-tokenizers' example data, an R lazy-load
            database read with tools/fetch_prose.py's reader), split at its chapters
  pydoc     the Python 3.11 manual (python3.11-doc's GNU info file: plain text, one node
            per section), menus and cross-reference lines dropped

Each source is split into documents of whole paragraphs; documents are written, one JSON
object per line ({"source", "title", "text"}), to models/train/text.jsonl (git-ignored, ~20
MB). A fixed share of each source (every 20th document) goes to models/train/heldout.jsonl,
never trained on: the loss curves' validation set.

  python3 train/prepare_text.py          prints the two paths, fetching when missing (~10 s)
"""
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import fetch_prose  # noqa: E402  (its R lazy-load reader and paragraph joiner)

OUT_DIR = os.path.join(ROOT, "models", "train")
TRAIN = os.path.join(OUT_DIR, "text.jsonl")
HELDOUT = os.path.join(OUT_DIR, "heldout.jsonl")
HELDOUT_EVERY = 20

MOBY_PACKAGE, MOBY_RDB = "r-cran-tokenizers", "usr/lib/R/site-library/tokenizers/data/Rdata.rdb"
PYDOC_PACKAGE, PYDOC_INFO = "python3.11-doc", "usr/share/info/python3.11.info.gz"


def apt_download(package, tmp):
    """Unpacks `package`'s .deb into tmp/x (no root needed; updates the lists once if empty)."""
    r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
    if r.returncode != 0:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=False)
        r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                           text=True)
    if r.returncode != 0:
        raise RuntimeError(f"apt-get download {package} failed:\n{r.stdout}{r.stderr}")
    deb = next(f for f in os.listdir(tmp) if f.startswith(package.split(":")[0] + "_"))
    subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, deb), os.path.join(tmp, "x")],
                   check=True)
    return os.path.join(tmp, "x")


def moby_documents(root):
    with open(os.path.join(root, MOBY_RDB), "rb") as f:
        records = fetch_prose.read_rdb(f.read())
    text = next(r[0] for r in records if r and "MOBY DICK" in r[0])
    text = text.replace("\r\n", "\n")
    start = text.index("*** START OF THIS PROJECT GUTENBERG")
    end = text.index("*** END OF THIS PROJECT GUTENBERG")
    body = text[text.index("\n", start) + 1:end]
    # Chapters start with a line "CHAPTER n. Title." (the table of contents lists them too,
    # one per line with no text after: those documents are too short and dropped).
    parts = re.split(r"\n(CHAPTER \d+\.[^\n]*)\n", body)
    docs = []
    for title, chapter in zip(parts[1::2], parts[2::2]):
        paras = fetch_prose.paragraphs(chapter.split("\n"))
        if sum(len(p) for p in paras) > 1000:
            docs.append({"source": "moby", "title": title.strip(), "text": "\n\n".join(paras)})
    return docs


def pydoc_documents(root):
    with gzip.open(os.path.join(root, PYDOC_INFO), "rt", encoding="utf-8",
                   errors="replace") as f:
        info = f.read()
    docs = []
    for node in info.split("\x1f")[1:]:
        lines = node.split("\n")
        header = next((l for l in lines[:3] if l.startswith("File:")), "")
        title = re.search(r"Node: ([^,]+)", header)
        keep = []
        for line in lines:
            s = line.strip()
            # Drop the node header, menus ("* Name: node."), underlines of headings and
            # info's cross-reference lines; keep prose and code as printed.
            if line.startswith("File:") or s.startswith("* ") or s == "* Menu:":
                continue
            if s and set(s) <= set("=-*.~^"):
                continue
            keep.append(line.rstrip())
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip()
        # Cross-references print as "*note isfinite(): ee7." (label: node): the label stays.
        text = re.sub(r"\*[Nn]ote\s+([^:]+?):\s*[^\s.,;]+[.,;]?", r"\1", text)
        if len(text) > 1000:
            docs.append({"source": "pydoc", "title": title.group(1) if title else "",
                         "text": text})
    return docs


def main():
    if all(os.path.exists(p) and os.path.getsize(p) > 0 for p in (TRAIN, HELDOUT)):
        print(TRAIN)
        print(HELDOUT)
        return 0
    os.makedirs(OUT_DIR, exist_ok=True)
    docs = []
    for package, reader in ((MOBY_PACKAGE, moby_documents), (PYDOC_PACKAGE, pydoc_documents)):
        with tempfile.TemporaryDirectory() as tmp:
            found = reader(apt_download(package, tmp))
        print(f"{package}: {len(found)} documents, "
              f"{sum(len(d['text']) for d in found) / 1e6:.1f} M characters", file=sys.stderr)
        docs.extend(found)
    for path, keep in ((TRAIN, lambda i: i % HELDOUT_EVERY != 0),
                       (HELDOUT, lambda i: i % HELDOUT_EVERY == 0)):
        with open(path + ".part", "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                if keep(i):
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
        os.replace(path + ".part", path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
