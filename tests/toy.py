"""A tiny pre-norm decoder the project owns: the golden-graph model, independent of transformers.

Same shape as the Llama family (RMSNorm, RoPE, grouped-query SDPA, gated MLP, residual adds, LM
head + cross-entropy), written plainly so that its Dynamo graph is small and stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = h.shape
        q = self.q(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))


class Layer(nn.Module):
    """x1 = x + tail1(attn(norm1(x))); y = x1 + tail2(mlp(norm2(x1))), where a tail is nothing, or
    (Gemma's sandwich norms) an RMSNorm of the block's output, then (Granite) times `scale`.
    pre_norm=False drops norm1 and norm2 (OLMo2 with sandwich=True: x + norm(block(x))).
    parallel="two" (GPT-NeoX): y = tail2(mlp(norm2(x))) + tail1(attn(norm1(x))) + x, summed in
    that order; parallel="shared" (Cohere, Phi, GPT-J): the same with one norm, computed once and
    read by both blocks."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, *,
                 scale: float | None = None, sandwich: bool = False, pre_norm: bool = True,
                 parallel: str | None = None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim) if pre_norm else nn.Identity()
        self.norm2 = RMSNorm(dim) if pre_norm and parallel != "shared" else None
        self.attn, self.mlp = Attention(dim, heads, kv_heads), MLP(dim, hidden)
        self.post1 = RMSNorm(dim) if sandwich else None
        self.post2 = RMSNorm(dim) if sandwich else None
        self.scale = scale
        self.parallel = parallel

    def tail(self, out: torch.Tensor, post: RMSNorm | None) -> torch.Tensor:
        if post is not None:
            out = post(out)
        return out if self.scale is None else out * self.scale

    def mlp_norm(self) -> nn.Module:
        """The norm the MLP block reads through."""
        return self.norm1 if self.norm2 is None else self.norm2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None:
            h = self.norm1(x)
            m = self.tail(self.mlp(h if self.norm2 is None else self.norm2(x)), self.post2)
            return m + self.tail(self.attn(h, cos, sin), self.post1) + x
        x = x + self.tail(self.attn(self.norm1(x), cos, sin), self.post1)
        return x + self.tail(self.mlp(self.mlp_norm()(x)), self.post2)


class ToyDecoder(nn.Module):
    """ids [B, S] -> (logits [B, S, V], loss or None); labels are already aligned with ids."""

    def __init__(self, vocab=32, dim=32, heads=4, kv_heads=2, hidden=48, layers=3, *,
                 scale: float | None = None, sandwich: bool = False, pre_norm: bool = True,
                 parallel: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, kv_heads, hidden, scale=scale,
                                          sandwich=sandwich, pre_norm=pre_norm, parallel=parallel)
                                    for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head_dim = dim // heads

    def rope(self, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, seq, head_dim] of positions 0..seq-1."""
        freqs = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, device=device) / self.head_dim)
        angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), freqs)
        angles = torch.cat([angles, angles], dim=-1)[None]
        return angles.cos(), angles.sin()

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        cos, sin = self.rope(ids.shape[1], ids.device)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
        return logits, loss
