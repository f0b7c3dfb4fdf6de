#!/usr/bin/env python3
"""Reader for ctxcache context files ("CTXC" version 1, cache/codec.h), stdlib + numpy only.

    from tools.ctxc import read_ctxc
    ctx = read_ctxc("doc.ctxc")
    ctx.positions[layer][head]   # np.int32 array of the ORIGINAL positions kept by (layer, KV head)
    ctx.keys[layer][head]        # np.float32 [n, head_dim] (post-RoPE keys as stored)
    ctx.values[layer][head]      # np.float32 [n, head_dim]

Command line: `python3 tools/ctxc.py FILE` prints the header and the kept count per head.

The layout (see the comment at the top of cache/codec.h; little-endian):
  0 magic "CTXC" | 4 u16 version | 6 u8 kind | 7 u8 dtype | 8 u64 total size | 16 32-byte
  fingerprint | 48 u32 method_version | 52 i32 next_position | 56 i64 source_tokens |
  64 u32 n_layers | 68 u32 n_kv_heads | 72 u32 head_dim | 76 u32 d_model | 80 i64 digest_tokens |
  88 u16 method length + bytes | u32 params length + bytes | per (layer, head), layer-major:
  u32 n, n x i32 positions, n K rows, n V rows | digest rows | u32 CRC32C of all bytes before.
Rows: fp16/bf16 2 bytes per value, fp32 4, int8 = fp32 scale + head_dim int8 (value = q*scale).
"""
from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"CTXC"
VERSION = 1
HEADER_BYTES = 88
DTYPES = {1: "fp16", 2: "bf16", 3: "fp32", 4: "int8"}
KINDS = {1: "kv", 2: "digest"}


def _crc32c_table():
    poly = 0x82F63B78
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = None


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), the codec's checksum. Pure Python: ~1 s per few MB."""
    global _CRC_TABLE
    if _CRC_TABLE is None:
        _CRC_TABLE = _crc32c_table()
    t = _CRC_TABLE
    c = 0xFFFFFFFF
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


@dataclass
class Context:
    version: int
    kind: str
    dtype: str
    fingerprint: str
    method_version: int
    next_position: int
    source_tokens: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    digest_tokens: int
    method: str
    params: str
    positions: list = field(default_factory=list)  # [layer][head] -> int32 array
    keys: list = field(default_factory=list)       # [layer][head] -> float32 [n, head_dim]
    values: list = field(default_factory=list)
    digest: np.ndarray | None = None

    def kept(self) -> np.ndarray:
        """Kept entries per (layer, head) as an int array [n_layers, n_kv_heads]."""
        return np.array([[len(p) for p in row] for row in self.positions], dtype=np.int64)


class CtxcError(ValueError):
    pass


def _rows(buf: memoryview, off: int, n: int, dim: int, dtype: str):
    """Decodes n rows of dim values at off; returns (float32 [n, dim], new offset)."""
    if dtype == "fp16":
        size = 2 * n * dim
        a = np.frombuffer(buf, dtype="<f2", count=n * dim, offset=off).astype(np.float32)
    elif dtype == "bf16":
        size = 2 * n * dim
        u = np.frombuffer(buf, dtype="<u2", count=n * dim, offset=off).astype(np.uint32) << 16
        a = u.view(np.float32)
    elif dtype == "fp32":
        size = 4 * n * dim
        a = np.frombuffer(buf, dtype="<f4", count=n * dim, offset=off).astype(np.float32)
    else:  # int8: per row fp32 scale + dim int8
        row = 4 + dim
        size = row * n
        raw = np.frombuffer(buf, dtype=np.uint8, count=size, offset=off).reshape(n, row)
        scale = raw[:, :4].copy().view("<f4").reshape(n, 1)
        a = raw[:, 4:].copy().view(np.int8).astype(np.float32) * scale
    if off + size > len(buf):
        raise CtxcError(f"truncated rows at offset {off}")
    return a.reshape(n, dim), off + size


def parse_ctxc(data: bytes, check_crc: bool = True, load_rows: bool = True) -> Context:
    buf = memoryview(data)
    if len(data) < HEADER_BYTES + 2 + 4 + 4:
        raise CtxcError(f"{len(data)} bytes is too short for a context")
    if data[:4] != MAGIC:
        raise CtxcError("bad magic: not a CTXC context")
    (version, kind, dtype, total) = struct.unpack_from("<HBBQ", data, 4)
    if version != VERSION:
        raise CtxcError(f"unknown format version {version}")
    if total != len(data):
        raise CtxcError(f"header says {total} bytes, file has {len(data)}")
    if kind not in KINDS or dtype not in DTYPES:
        raise CtxcError(f"bad kind {kind} or dtype {dtype}")
    if check_crc:
        (stored,) = struct.unpack_from("<I", data, len(data) - 4)
        if crc32c(data[:-4]) != stored:
            raise CtxcError("checksum mismatch")
    fp = data[16:48].hex()
    (method_version, next_position, source_tokens, n_layers, n_kv, head_dim, d_model,
     digest_tokens) = struct.unpack_from("<IiqIIIIq", data, 48)
    off = HEADER_BYTES
    (mlen,) = struct.unpack_from("<H", data, off)
    off += 2
    method = bytes(buf[off:off + mlen]).decode()
    off += mlen
    (plen,) = struct.unpack_from("<I", data, off)
    off += 4
    params = bytes(buf[off:off + plen]).decode()
    off += plen
    ctx = Context(version, KINDS[kind], DTYPES[dtype], fp, method_version, next_position,
                  source_tokens, n_layers, n_kv, head_dim, d_model, digest_tokens, method, params)
    dt = DTYPES[dtype]
    for _layer in range(n_layers):
        prow, krow, vrow = [], [], []
        for _head in range(n_kv):
            if off + 4 > len(data):
                raise CtxcError(f"truncated head record at offset {off}")
            (n,) = struct.unpack_from("<I", data, off)
            off += 4
            if off + 4 * n > len(data):
                raise CtxcError(f"truncated positions at offset {off}")
            pos = np.frombuffer(buf, dtype="<i4", count=n, offset=off).astype(np.int32)
            off += 4 * n
            if load_rows:
                k, off = _rows(buf, off, n, head_dim, dt)
                v, off = _rows(buf, off, n, head_dim, dt)
            else:
                row = (4 + head_dim) if dt == "int8" else head_dim * (4 if dt == "fp32" else 2)
                off += 2 * n * row
                k = v = None
            prow.append(pos)
            krow.append(k)
            vrow.append(v)
        ctx.positions.append(prow)
        ctx.keys.append(krow)
        ctx.values.append(vrow)
    if digest_tokens > 0:
        ctx.digest, off = _rows(buf, off, digest_tokens, d_model, dt)
    if off + 4 != len(data):
        raise CtxcError(f"{len(data) - off - 4} trailing bytes after the payload")
    return ctx


def read_ctxc(path: str, check_crc: bool = True, load_rows: bool = True) -> Context:
    with open(path, "rb") as f:
        return parse_ctxc(f.read(), check_crc=check_crc, load_rows=load_rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--no-crc", action="store_true", help="skip the (slow, pure Python) CRC32C")
    args = ap.parse_args(argv)
    ctx = read_ctxc(args.file, check_crc=not args.no_crc, load_rows=False)
    print(f"{ctx.kind} context, {ctx.dtype}, method {ctx.method} v{ctx.method_version} "
          f"({ctx.params}), model {ctx.fingerprint[:16]}...")
    print(f"source_tokens {ctx.source_tokens}, next_position {ctx.next_position}, "
          f"{ctx.n_layers} layers x {ctx.n_kv_heads} KV heads x head_dim {ctx.head_dim}")
    kept = ctx.kept()
    for layer in range(ctx.n_layers):
        print(f"  layer {layer:2d}: kept " + " ".join(f"{k:5d}" for k in kept[layer]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
