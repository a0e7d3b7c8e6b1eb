"""Oracle block scores (LEMO.md, "Oracle score"): which 64-token blocks a layer's attention uses most.

For queries q [B, H, S, d] and keys k [B, Hk, S, d] (after RoPE; query head h reads key head
h // (H // Hk)), with n = S // b full blocks:

    A[i, j]  = sum_h relu(q_h[i] . k_h[j] / sqrt(d)) / H      for j <= i, else 0
    M[m, p]  = max of A over the b x b tile (queries of block m, keys of block p)
    sigma[p] = sum_{m >= p} M[m, p] + sum_{p' < p} M[p, p']   (attended-by plus attends-to)

The S % b tail is neither a query nor a key here. Scores carry no gradient.
"""

from __future__ import annotations

import math

import torch

# Elements of one chunk of query-block x key scores (fp32): bounds the reference's memory at
# ~256 MB whatever S is, instead of O(S^2).
_CHUNK_ELEMENTS = 1 << 26


def block_tile_max_reference(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Tile maxima M [B, n, n] (float32, zero above the diagonal), computed in query-block chunks."""
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    n = seq_len // block_size
    b = block_size
    tiles = torch.zeros(batch, n, n, dtype=torch.float32, device=q.device)
    if n == 0:
        return tiles
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * b * n * b))
    keys = k[:, :, : n * b].float()
    for first in range(0, n, chunk):
        last = min(n, first + chunk)
        rows = q[:, :, first * b : last * b].float()
        rows = rows.reshape(batch, kv_heads, group, (last - first) * b, head_dim)
        cols = keys[:, :, : last * b]
        scores = _relu_head_sum(rows, cols, scale) / heads
        query_pos = torch.arange(first * b, last * b, device=q.device)[:, None]
        key_pos = torch.arange(last * b, device=q.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, 0.0)
        scores = scores.reshape(batch, last - first, b, last, b).amax(dim=(2, 4))
        tiles[:, first:last, :last] = scores
    return tiles


def _relu_head_sum(rows: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:
    """sum over heads of relu(rows . cols * scale): rows [B, Hk, g, I, d], cols [B, Hk, J, d] -> [B, I, J]."""
    logits = torch.einsum("bkgid,bkjd->bkgij", rows, cols) * scale
    return logits.relu_().sum(dim=(1, 2))


def block_scores_reference(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block scores sigma [B, n] (float32) from tile maxima; see the module docstring."""
    tiles = block_tile_max_reference(q, k, block_size)
    return tiles.sum(dim=1) + tiles.sum(dim=2) - tiles.diagonal(dim1=1, dim2=2)
