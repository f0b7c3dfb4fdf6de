"""The IC-Former digest compressor (Wang et al., arXiv 2406.13618) in PyTorch: the reference the
C++ engine's compressor is checked against, and the module train/train_digest.py trains.

What it computes, per chunk of Lc context tokens (../shared/research/methods.md, section 1):

  C   = [E(chunk tokens) ; D]            the frozen LLM's own input embeddings of the chunk,
                                         then the learned initial digest embeddings D [n, d];
                                         the same C feeds every layer (never updated)
  h_0 = D
  per layer l:
    q = Wq RMSNorm_q(h),  k = Wk RMSNorm_c(C),  v = Wv RMSNorm_c(C)
    RoPE: keys at positions 0 .. Lc+n-1 (context, then digests), queries at Lc .. Lc+n-1
    digest i attends to every context token and to digests 0..i of C (causal among digests)
    h = h + Wo attn;   h = h + SwiGLU(RMSNorm_m(h))
  digests = RMSNorm_out(h_L)             fed to the frozen LLM as input embeddings

No LLM layer runs on the context, which is why compressing costs a small fraction of a
prefill. Digest i depends on the context and on digests 0..i only (its query path reads C,
never the other digests' states), so the first m of the n digest queries give the same m
vectors whatever n is: one compressor serves every ratio from Lc/n up, by taking a prefix of
its digest queries (`n_digest` per call). Training samples m per step for that reason.

Layout of the weights (also the GGUF's, train/export_gguf.py): per layer `q_norm`, `ctx_norm`,
`wq`, `wk`, `wv`, `wo` [d, d] (no biases), `mlp_norm`, `gate`, `up` [ff, d], `down` [d, ff];
then `out_norm` and `digest` [n_max, d]. Heads: d / head_dim, all with their own K/V.
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ICFormerConfig:
    hidden: int = 896          # the served model's hidden size (Qwen2.5-0.5B)
    head_dim: int = 64
    layers: int = 2
    ff: int = 1536
    max_digest: int = 128      # digest queries per chunk (the compressor's largest n)
    chunk: int = 512           # context tokens per chunk at most
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def heads(self):
        return self.hidden // self.head_dim

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope(x, positions, theta):
    """NEOX-style rotary embedding (halves rotated, as Qwen2 and the IC-Former code do) of
    x [..., T, head_dim] at integer positions [T]."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(0, half, dtype=torch.float32) / half)
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, c: ICFormerConfig):
        super().__init__()
        d = c.hidden
        self.c = c
        self.q_norm, self.ctx_norm, self.mlp_norm = (RMSNorm(d, c.eps) for _ in range(3))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, c.ff, bias=False), nn.Linear(d, c.ff, bias=False)
        self.down = nn.Linear(c.ff, d, bias=False)

    def forward(self, h, ctx, lc):
        """h [B, n, d] digest states; ctx [B, lc + n, d] (chunk embeddings, then the initial
        digest embeddings); lc context tokens (the same for the whole batch)."""
        c = self.c
        b, n, d = h.shape
        q = self.wq(self.q_norm(h)).view(b, n, c.heads, c.head_dim).transpose(1, 2)
        src = self.ctx_norm(ctx)
        k = self.wk(src).view(b, lc + n, c.heads, c.head_dim).transpose(1, 2)
        v = self.wv(src).view(b, lc + n, c.heads, c.head_dim).transpose(1, 2)
        q = rope(q, torch.arange(lc, lc + n), c.rope_theta)
        k = rope(k, torch.arange(0, lc + n), c.rope_theta)
        # Digest i sees all lc context tokens and digests 0..i.
        allowed = torch.ones(n, lc + n, dtype=torch.bool)
        allowed[:, lc:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + self.wo(a.transpose(1, 2).reshape(b, n, d))
        m = self.mlp_norm(h)
        return h + self.down(F.silu(self.gate(m)) * self.up(m))


class ICFormer(nn.Module):
    def __init__(self, c: ICFormerConfig):
        super().__init__()
        self.c = c
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.out_norm = RMSNorm(c.hidden, c.eps)
        # The paper zero-initialises the digest embeddings; small random ones let the digest
        # queries differ from the first step (zeros give every digest the same query).
        self.digest = nn.Parameter(torch.randn(c.max_digest, c.hidden) * 0.02)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)

    def forward(self, chunk_embeddings, n_digest):
        """chunk_embeddings [B, lc, d] (the frozen LLM's input embeddings of equal-length
        chunks) -> digests [B, n_digest, d]."""
        b, lc, _ = chunk_embeddings.shape
        if not 0 < lc <= self.c.chunk or not 0 < n_digest <= self.c.max_digest:
            raise ValueError(f"chunk of {lc} tokens, {n_digest} digests: the compressor takes "
                             f"1..{self.c.chunk} tokens and 1..{self.c.max_digest} digests")
        d0 = self.digest[:n_digest].to(chunk_embeddings.dtype).expand(b, -1, -1)
        ctx = torch.cat([chunk_embeddings, d0], dim=1)
        h = d0
        for layer in self.layers:
            h = layer(h, ctx, lc)
        return self.out_norm(h)


def split_chunks(n_tokens, chunk):
    """[start, end) of the equal-size chunks a document of n_tokens is compressed in (the
    IC-Former code's divide and conquer: ceil(n / chunk) chunks of near-equal length)."""
    k = max(1, math.ceil(n_tokens / chunk))
    size = math.ceil(n_tokens / k)
    return [(s, min(s + size, n_tokens)) for s in range(0, n_tokens, size)]


def digests_for(n_chunk_tokens, ratio, max_digest):
    """How many digests a chunk of n tokens gets at compression `ratio` (at least 1)."""
    return max(1, min(max_digest, math.ceil(n_chunk_tokens / ratio)))
