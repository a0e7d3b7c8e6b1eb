"""An eager, hand-written implementation of LEMO.md's semantics v1 for HF Llama-family models.

It imports nothing from lemo_compile: it runs the model's own submodules one by one and does the
selection with naive tensors (the full S x S score matrix), so that the compiled graph can be checked
against an independent statement of the same semantics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def oracle_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """sigma [B, n] from q [B, H, S, d] and k [B, Hk, S, d] (full S x S matrix, float64)."""
    batch, heads, seq_len, head_dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    n = seq_len // block_size
    scores = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        qb, kb = q[b].double(), k[b].double()
        a = (qb @ kb.transpose(-1, -2) / math.sqrt(head_dim)).clamp(min=0).sum(0) / heads
        a = torch.tril(a)[: n * block_size, : n * block_size]
        tiles = a.reshape(n, block_size, n, block_size).amax(dim=(1, 3))  # M[m, p]
        for p in range(n):
            scores[b, p] = tiles[p:, p].sum() + tiles[p, :p].sum()
    return scores.to(q.device)


def select_token_indices(scores: torch.Tensor, k_blocks: int, block_size: int, seq_len: int) -> torch.Tensor:
    """Sorted token indices [B, k*b + S % b]: the k best blocks (ties: lower index), then the tail."""
    rows = []
    n = scores.shape[1]
    for row in scores.tolist():
        best = sorted(range(n), key=lambda p: (-row[p], p))[:k_blocks]
        tokens = [p * block_size + t for p in sorted(best) for t in range(block_size)]
        rows.append(tokens + list(range(n * block_size, seq_len)))
    return torch.tensor(rows, dtype=torch.int64, device=scores.device)


def sparse_layer_plan(num_layers, seq_len, *, block_size=64, keep_ratio=0.4, dense_layers="auto"):
    """Blocks kept per layer, or None where the layer runs dense."""
    dense = set(range(num_layers // 2)) | {num_layers - 1} if dense_layers == "auto" else set(dense_layers)
    n = seq_len // block_size
    plan = []
    for layer in range(num_layers):
        ratio = keep_ratio[layer] if isinstance(keep_ratio, (list, tuple)) else keep_ratio
        k = min(n, max(1, math.ceil(ratio * n)))
        plan.append(None if layer in dense or n == 0 or k == n else k)
    return plan


def _random_scores(batch: int, n: int, seed: int, layer: int) -> torch.Tensor:
    return torch.rand(batch, n, generator=torch.Generator().manual_seed(seed * 1_000_003 + layer))


def _queries_and_keys(layer, h, cos, sin):
    """The layer's q [B, H, S, d] and k [B, Hk, S, d] after RoPE, computed by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    batch, seq_len, _ = h.shape
    q = attn.q_proj(h).view(batch, seq_len, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(batch, seq_len, -1, attn.head_dim).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


def lemo_forward(model, input_ids, labels=None, *, block_size=64, keep_ratio=0.4,
                 dense_layers="auto", scorer="oracle", seed=0):
    """(logits [B, S, V], loss or None) of a Llama-layout causal LM under LeMo semantics v1."""
    inner, layers = model.model, model.model.layers
    batch, seq_len = input_ids.shape
    plan = sparse_layer_plan(len(layers), seq_len, block_size=block_size, keep_ratio=keep_ratio,
                             dense_layers=dense_layers)
    x = inner.embed_tokens(input_ids)
    position_ids = torch.arange(seq_len, device=input_ids.device)[None]
    cos, sin = inner.rotary_emb(x, position_ids)
    for index, layer in enumerate(layers):
        k_blocks = plan[index]
        if k_blocks is None:
            a, _ = layer.self_attn(layer.input_layernorm(x), position_embeddings=(cos, sin),
                                   attention_mask=None)
            x = x + a
        else:
            with torch.no_grad():
                if scorer == "oracle":
                    q, k = _queries_and_keys(layer, layer.input_layernorm(x), cos, sin)
                    scores = oracle_block_scores(q, k, block_size)
                else:
                    scores = _random_scores(batch, seq_len // block_size, seed, index)
                idx = select_token_indices(scores, k_blocks, block_size, seq_len)
            rows = torch.stack([x[b, idx[b]] for b in range(batch)])
            cos_k = torch.stack([cos[0, idx[b]] for b in range(batch)])
            sin_k = torch.stack([sin[0, idx[b]] for b in range(batch)])
            a, _ = layer.self_attn(layer.input_layernorm(rows), position_embeddings=(cos_k, sin_k),
                                   attention_mask=None)
            x = torch.stack([x[b].index_add(0, idx[b], a[b]) for b in range(batch)])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.lm_head(inner.norm(x))
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
    return logits, loss
