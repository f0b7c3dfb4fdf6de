#!/usr/bin/env python3
"""Fetches the prose haystack of the quality harness: Jane Austen's six novels (public domain),
from the Debian package r-cran-janeaustenr, without installing R.

The package keeps each novel as an R character vector (one element per printed line) in an R
lazy-load database (data/Rdata.rdb): a sequence of records, each a 4-byte big-endian length
followed by a zlib stream of R's XDR serialization. We download the .deb with `apt-get
download` (no root needed), unpack it with `dpkg-deb -x`, and read the character vectors with
the small reader below (only what these records use: header, STRSXP of CHARSXPs). The novels
are joined into paragraphs and written to models/prose/austen.txt (git-ignored; ~4 MB).

  tools/fetch_prose.py            prints the path, fetching when missing (idempotent, ~2 s)
"""
import os
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "models", "prose", "austen.txt")
PACKAGE = "r-cran-janeaustenr"
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

STRSXP, CHARSXP = 16, 9


def read_strsxp(raw):
    """The character vector in one R XDR serialization (format version 2 or 3)."""
    if raw[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    off = 2
    version, _, _ = struct.unpack_from(">iii", raw, off)
    off += 12
    if version == 3:  # native encoding name
        (n,) = struct.unpack_from(">i", raw, off)
        off += 4 + n
    (flags,) = struct.unpack_from(">i", raw, off)
    off += 4
    if flags & 0xFF != STRSXP:
        raise ValueError(f"expected a character vector, got SEXP type {flags & 0xFF}")
    (length,) = struct.unpack_from(">i", raw, off)
    off += 4
    out = []
    for _ in range(length):
        (flags,) = struct.unpack_from(">i", raw, off)
        off += 4
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected a string, got SEXP type {flags & 0xFF}")
        (n,) = struct.unpack_from(">i", raw, off)
        off += 4
        if n < 0:  # NA
            out.append("")
            continue
        out.append(raw[off : off + n].decode("utf-8", errors="replace"))
        off += n
    return out


def read_rdb(data):
    """Every record of an R lazy-load database that is a character vector."""
    off, novels = 0, []
    while off + 4 <= len(data):
        d = zlib.decompressobj()
        raw = d.decompress(data[off + 4 :])
        off = len(data) - len(d.unused_data)
        try:
            novels.append(read_strsxp(raw))
        except (ValueError, struct.error):
            continue
    return novels


def paragraphs(lines):
    """Printed lines -> paragraphs (blank lines separate them); chapter headings dropped."""
    out, cur = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            cur.append(line)
            continue
        if cur:
            text = " ".join(cur)
            if len(text) > 80 and not text.isupper():
                out.append(text)
            cur = []
    return out


def main():
    if os.path.exists(DEST) and os.path.getsize(DEST) > 0:
        print(DEST)
        return 0
    os.makedirs(os.path.dirname(DEST), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # apt warns when its sandbox user cannot write the temp dir (harmless): show apt's
        # output only when the download fails.
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True,
                           text=True)
        if r.returncode != 0:  # no package lists yet (a fresh image): update them once
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            subprocess.run(sudo + ["apt-get", "update", "-qq"], check=False)
            r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True,
                               text=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return 1
        deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
        subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, deb), os.path.join(tmp, "x")],
                       check=True)
        with open(os.path.join(tmp, "x", RDB), "rb") as f:
            novels = read_rdb(f.read())
    if len(novels) < 6:
        print(f"fetch_prose: expected 6 novels in {PACKAGE}, found {len(novels)}", file=sys.stderr)
        return 1
    text = "\n\n".join("\n\n".join(paragraphs(lines)) for lines in novels)
    with open(DEST + ".part", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(DEST + ".part", DEST)
    print(DEST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
