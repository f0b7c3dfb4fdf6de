#!/usr/bin/env python3
"""Writes tests/data/quant/<TYPE>.bin: GGML blocks and what the gguf package dequantizes them to.

The PyPI `gguf` package (gguf.quants) is the outside reference for tests/quant_test.cc, which
requires DequantizeRow to reproduce these floats bit for bit.

File format (all little-endian), version 1:
    offset  size  field
    0       4     magic  b"CQFX"
    4       4     u32 version (1)
    8       4     u32 ggml type number (as in GGUF: F32=0, F16=1, Q4_0=2, ... BF16=30)
    12      4     u32 n: number of elements (a multiple of the block size)
    16      4     u32 n_bytes: size of the raw quantized data
    20      n_bytes       raw blocks, exactly as stored in a GGUF tensor
    20+n_bytes  4*n       float32 values from gguf.quants.dequantize

Types gguf can quantize are quantized from random data with awkward blocks mixed in (all
zeros, a constant, all negative, huge and tiny magnitudes). K-quants, which gguf only
dequantizes, get random block bytes with sane fp16 scales (including zero and negative ones).

Usage: python3 tools/make_quant_fixtures.py [out_dir]   (default: tests/data/quant)
"""

import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

MAGIC = b"CQFX"
VERSION = 1
SEED = 20240611


def awkward_blocks(rng: np.random.Generator, block: int, n_blocks: int) -> np.ndarray:
    """n_blocks * block floats: random normal blocks with special blocks spliced in."""
    x = rng.standard_normal((n_blocks, block)).astype(np.float32)
    x[0] = 0.0                                   # all zeros: scale 0
    x[1] = 0.75                                  # constant block
    x[2] = -np.abs(x[2]) - 0.5                   # all negative: negative min / scale
    x[3] *= 3.0e3                                # large magnitudes (fp16 scale ~ 1e2)
    x[4] *= 1.0e-4                               # tiny magnitudes (subnormal fp16 scales)
    x[5, :] = np.linspace(-1.0, 1.0, block)      # exact extremes, ties in rounding
    x[6, 0] = 50.0                               # one outlier dominating the scale
    return x.reshape(-1)


def fp16_bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def random_k_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random K-quant super-blocks whose fp16 scales are finite and moderate."""
    _, type_size = quants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
    dmin = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
    d[0] = 0.0                                   # zero scale
    d[1] = -abs(d[1]) - np.float16(0.01)         # negative scale
    dmin[2] = 0.0
    d[3] = np.float16(6.0e4)                     # near fp16 max
    d[4] = np.float16(3.0e-7)                    # subnormal fp16
    if qtype == T.Q6_K:
        raw[:, -2:] = fp16_bits(d)               # Q6_K keeps d last
        raw[5, 192:208] = np.frombuffer(bytes([0x80, 0x7f] * 8), dtype=np.uint8)  # int8 extremes
    else:
        raw[:, 0:2] = fp16_bits(d)               # Q4_K / Q5_K: d, dmin first
        raw[:, 2:4] = fp16_bits(dmin)
        raw[5, 4:16] = 0xff                      # all 6-bit scales and mins at 63
        raw[5, 16:] = 0xff                       # all quants at their maximum
    return raw


def float_bits_blocks(rng: np.random.Generator, qtype: T, n: int) -> np.ndarray:
    """F32/F16/BF16 data with specials: signed zeros, infinities, subnormals, extremes."""
    x = rng.standard_normal(n).astype(np.float32)
    specials = [0.0, -0.0, np.inf, -np.inf, 65504.0, -65504.0, 6.0e-8, -6.0e-8, 1.0e-40,
                3.0e38, -3.0e38, 1.0 / 3.0]
    x[: len(specials)] = np.array(specials, dtype=np.float32)
    if qtype == T.F32:
        return x.view(np.uint8)
    if qtype == T.F16:
        with np.errstate(over="ignore"):         # +-3e38 overflow to +-inf on purpose
            return x.astype(np.float16).view(np.uint8)
    return quants.quantize(x.reshape(1, -1), T.BF16).reshape(-1)


def write_fixture(out_dir: str, name: str, qtype: T, raw: np.ndarray) -> None:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    block, type_size = quants.GGML_QUANT_SIZES[qtype]
    assert raw.size % type_size == 0
    n = raw.size // type_size * block
    if qtype == T.F32:
        values = raw.view(np.float32).copy()
    elif qtype == T.F16:
        values = raw.view(np.float16).astype(np.float32)
    else:
        values = quants.dequantize(raw.reshape(1, -1), qtype).astype(np.float32).reshape(-1)
    assert values.size == n
    path = os.path.join(out_dir, f"{name}.bin")
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<IIII", VERSION, int(qtype), n, raw.size))
        f.write(raw.tobytes())
        f.write(values.astype("<f4").tobytes())
    print(f"{path}: {n} elements, {raw.size} bytes")


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "quant")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for qtype in (T.F32, T.F16, T.BF16):
        write_fixture(out_dir, qtype.name, qtype, float_bits_blocks(rng, qtype, 256))
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        x = awkward_blocks(rng, 32, 16)
        raw = quants.quantize(x.reshape(1, -1), qtype).reshape(-1)
        write_fixture(out_dir, qtype.name, qtype, raw)
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        write_fixture(out_dir, qtype.name, qtype, random_k_blocks(rng, qtype, 8))


if __name__ == "__main__":
    main()
