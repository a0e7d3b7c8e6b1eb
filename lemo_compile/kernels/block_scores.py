"""Oracle block scores (README.md, "Semantics": oracle scores): which 64-token blocks a layer's
attention uses most.

For queries q [B, H, S, d] and keys k [B, Hk, S, d] (after RoPE; query head h reads key head
h // (H // Hk)), with n = S // b full blocks:

    A[i, j]  = sum_h relu(q_h[i] . k_h[j] / sqrt(d)) / H      for j <= i, else 0
    M[m, p]  = max of A over the b x b tile (queries of block m, keys of block p)
    sigma[p] = sum_{m >= p} M[m, p] + sum_{p' < p} M[p, p']   (attended-by plus attends-to)

The S % b tail is neither a query nor a key here. Scores carry no gradient. With the option
`distance_normalized`, each M[m, p] is first divided by the mean of M at its block distance m - p
(`tiles_per_distance`).

The Triton kernel computes M tile by tile, FlashAttention-style: each program owns a square of
query x key tokens, accumulates the head sum of relu(q.k) in registers and keeps only the tile
maxima, so the S x S scores never reach memory. It needs a power-of-two block size >= 16.
"""

from __future__ import annotations

import math

import torch

from lemo_compile.kernels import HAS_TRITON, interpreting, launch, next_power_of_2, tl, triton

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


def scores_from_tiles(tiles: torch.Tensor, per_distance: bool = False,
                      full_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """sigma [B, n] from tile maxima M [B, n, n] (zero above the diagonal); per_distance: of
    `tiles_per_distance(tiles, full_blocks)` (the option `distance_normalized`)."""
    if per_distance:
        tiles = tiles_per_distance(tiles, full_blocks)
    return tiles.sum(dim=1) + tiles.sum(dim=2) - tiles.diagonal(dim1=1, dim2=2)


def tiles_per_distance(tiles: torch.Tensor, full_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Tile maxima M [B, n, n] (zero above the diagonal) with each M[m, p] divided by its row's
    mean tile maximum at the same block distance m - p (option `distance_normalized`), float32.

    Why: with attention's locality, near tiles are larger, and sigma sums a block's tiles on both
    sides, so a block in the middle of a row (near neighbours on both sides) outscores the row's
    first and last blocks (near neighbours on one side). Divided by their distance's mean, tiles
    count how much more a block is attended than blocks as far apart usually are.

    full_blocks [B] (int): row b's own tiles are those of its first full_blocks[b] blocks (a padded
    row laid out by `ops.real_first`); all n without it. Other tiles, and tiles whose distance
    mean is 0, become 0."""
    batch, n, _ = tiles.shape
    index = torch.arange(n, device=tiles.device)
    distance = index[:, None] - index[None, :]
    own = (distance >= 0).expand(batch, n, n)
    if full_blocks is not None:
        own = own & (index[None, :, None] < full_blocks[:, None, None])
    at = distance.clamp_min(0).reshape(1, n * n).expand(batch, n * n)
    values = torch.where(own, tiles.float(), 0.0)
    sums = values.new_zeros(batch, n).scatter_add_(1, at, values.reshape(batch, n * n))
    counts = values.new_zeros(batch, n).scatter_add_(1, at, own.reshape(batch, n * n).float())
    mean = (sums / counts.clamp_min(1.0)).gather(1, at).reshape(batch, n, n)
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(own & (mean > 0), values / mean.clamp_min(tiny), 0.0)


def block_tile_max(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Tile maxima M [B, n, n]: the Triton kernel for CUDA tensors it supports, else the reference."""
    if q.is_cuda and k.is_cuda and triton_supports(block_size, q.shape[3]):
        return block_tile_max_triton(q, k, block_size)
    return block_tile_max_reference(q, k, block_size)


def block_scores_reference(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block scores sigma [B, n] (float32); see the module docstring."""
    return scores_from_tiles(block_tile_max_reference(q, k, block_size))


# Query (and key) tokens per program: a 128 x 128 square holds (128 / b)^2 tiles.
_SQUARE = 128


def triton_supports(block_size: int, head_dim: int) -> bool:
    """Whether `block_tile_max_triton` handles this block size and head dim."""
    return (
        HAS_TRITON
        and 16 <= block_size <= _SQUARE
        and block_size & (block_size - 1) == 0
        and head_dim <= 256
    )


def block_tile_max_triton(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Tile maxima M [B, n, n] (float32, zero above the diagonal), like `block_tile_max_reference`.

    q [B, H, S, d] and k [B, Hk, S, d] in any strides; bf16/fp16 products run on the tensor cores
    with fp32 accumulation, fp32 ones in full fp32 precision.
    """
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    if not triton_supports(block_size, head_dim):
        raise ValueError(f"no Triton kernel for block size {block_size} and head dim {head_dim}")
    n = seq_len // block_size
    tiles = torch.zeros(batch, n, n, dtype=torch.float32, device=q.device)
    if n == 0:
        return tiles
    per_side = max(1, _SQUARE // block_size)
    squares = triton.cdiv(n, per_side)
    launch(_tile_max_kernel)[(squares, squares, batch)](
        q, k, tiles,
        *q.stride(), *k.stride(),
        n, heads // kv_heads, head_dim, 1.0 / (math.sqrt(head_dim) * heads),
        HEADS=heads,
        BLOCK=block_size,
        PER_SIDE=per_side,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        IEEE=q.dtype == torch.float32,
        UPCAST=interpreting(),
        num_warps=8,
    )
    return tiles


if HAS_TRITON:

    @triton.jit
    def _tile_max_kernel(
        q_ptr, k_ptr, out_ptr,
        sq_b, sq_h, sq_s, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        n_blocks, group, head_dim, scale,
        HEADS: tl.constexpr, BLOCK: tl.constexpr, PER_SIDE: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Program (key square, query square, batch row): PER_SIDE x PER_SIDE tiles of M.
        key_square = tl.program_id(0)
        query_square = tl.program_id(1)
        b = tl.program_id(2)
        if key_square > query_square:
            return  # strictly above the diagonal: M stays zero
        SIDE: tl.constexpr = BLOCK * PER_SIDE
        rows = query_square * SIDE + tl.arange(0, SIDE)
        cols = key_square * SIDE + tl.arange(0, SIDE)
        dims = tl.arange(0, BLOCK_D)
        tokens = n_blocks * BLOCK  # the partial tail block takes no part
        q_mask = (rows[:, None] < tokens) & (dims[None, :] < head_dim)
        k_mask = (cols[:, None] < tokens) & (dims[None, :] < head_dim)
        q_base = q_ptr + b * sq_b + rows[:, None] * sq_s + dims[None, :] * sq_d
        k_base = k_ptr + b * sk_b + cols[:, None] * sk_s + dims[None, :] * sk_d
        acc = tl.zeros((SIDE, SIDE), dtype=tl.float32)
        for h in tl.range(0, HEADS):
            qh = tl.load(q_base + h * sq_h, mask=q_mask, other=0.0)
            kh = tl.load(k_base + (h // group) * sk_h, mask=k_mask, other=0.0)
            if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns as integers
                qh = qh.to(tl.float32)
                kh = kh.to(tl.float32)
            if IEEE:
                logits = tl.dot(qh, tl.trans(kh), input_precision="ieee")
            else:
                logits = tl.dot(qh, tl.trans(kh))
            acc += tl.maximum(logits, 0.0)
        # relu commutes with the positive scale 1 / (sqrt(d) H), so it is applied once here.
        acc = tl.where(cols[None, :] <= rows[:, None], acc * scale, 0.0)
        tile = tl.max(tl.max(tl.reshape(acc, (PER_SIDE, BLOCK, PER_SIDE, BLOCK)), axis=3), axis=1)
        m = query_square * PER_SIDE + tl.arange(0, PER_SIDE)
        p = key_square * PER_SIDE + tl.arange(0, PER_SIDE)
        out = out_ptr + b * n_blocks * n_blocks + m[:, None] * n_blocks + p[None, :]
        tl.store(out, tile, mask=(m[:, None] < n_blocks) & (p[None, :] < n_blocks))
