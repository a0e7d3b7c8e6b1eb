"""An eager, pure-PyTorch reference of LeMo token elimination for HF Llama-family causal LMs.

It imports nothing from lemo_compile. The forward pass is run by hand from the model's own
submodules, and the block selection is written naively (the full S x S score matrix, one sample at a
time), so that the compiled graph can be checked against an independent statement of the semantics.

Semantics, per pre-norm decoder layer (h = norm1(x); x1 = x + Attn(h); y = x1 + MLP(norm2(x1))):

* The sequence of S tokens is cut into n = S // b full blocks of b tokens; the r = S % b trailing
  tokens are a partial block that is always kept and never scored.
* Dense layers ("auto": the first L // 2 layers and the last one) run unchanged. Every other layer
  keeps k = min(n, max(1, ceil(keep_ratio * n))) blocks, and runs dense when n == 0 or k == n.
* In a sparse layer the blocks are scored without gradient (the "oracle" score below, or seeded
  random numbers), the k best blocks plus the tail give sorted token indices idx [B, K], and only
  the residual rows x[:, idx] go through norm1 and attention (a causal attention over the compacted
  sequence, with the RoPE cos/sin of the kept positions). The attention output is added back into
  those rows; the eliminated rows pass through the attention block unchanged. The MLP is dense,
  unless `mlp` says otherwise (see `lemo_forward`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def oracle_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int,
                        distance_normalized: bool = False) -> torch.Tensor:
    """The oracle block scores sigma [B, n] (float64) of queries q [B, H, S, d], keys k [B, H_kv, S, d].

    Per sample: A [S, S] with A[i, j] = sum_h relu(q_h[i] . k_h[j] / sqrt(d)) / H for j <= i, else 0
    (query head h reads kv head h // (H // H_kv)); M [n, n] = max of A over each b x b tile of full
    blocks; sigma[p] = sum_{m >= p} M[m, p] + sum_{p' < p} M[p, p'] (column p from the diagonal down,
    plus row p left of the diagonal). The partial tail block takes no part. Computed in float64.
    distance_normalized: before sigma, each M[m, p] is divided by the mean of the sample's M[m', p']
    with m' - p' = m - p (0 where that mean is 0).
    """
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    n = seq_len // block_size
    sigma = torch.zeros(batch, n, dtype=torch.float64, device=q.device)
    for b in range(batch):
        # A [S, S]: mean over query heads of the positive parts of the scaled logits, causal.
        a = torch.zeros(seq_len, seq_len, dtype=torch.float64, device=q.device)
        for h in range(heads):
            q_h = q[b, h].double()                               # [S, d]
            k_h = k[b, h // (heads // kv_heads)].double()        # [S, d]
            a += (q_h @ k_h.T / math.sqrt(head_dim)).clamp(min=0)
        a = torch.tril(a / heads)
        # M [n, n]: the max of each b x b tile over the full blocks only.
        full = a[: n * block_size, : n * block_size]
        tiles = full.reshape(n, block_size, n, block_size).amax(dim=(1, 3))  # tiles[m, p] = M[m, p]
        if distance_normalized:
            tiles = tiles_by_distance(tiles)
        for p in range(n):
            sigma[b, p] = tiles[p:, p].sum() + tiles[p, :p].sum()
    return sigma


def tiles_by_distance(tiles: torch.Tensor) -> torch.Tensor:
    """Tile maxima M [n, n] (zero above the diagonal) with each diagonal m - p = d divided by its
    mean (0 where that mean is not positive): the option `distance_normalized`."""
    tiles = tiles.clone()
    for d in range(tiles.shape[0]):
        diagonal = tiles.diagonal(offset=-d)                         # M[d, 0], M[d + 1, 1], ...
        mean = diagonal.mean()
        diagonal.copy_(diagonal / mean if mean > 0 else torch.zeros_like(diagonal))
    return tiles


def select_token_indices(scores: torch.Tensor, k_blocks: int, block_size: int, seq_len: int) -> torch.Tensor:
    """Kept token indices idx [B, k_blocks * b + S % b] (int64, sorted ascending) from scores [B, n].

    Per sample: the k_blocks highest-scoring blocks (ties: the lower block index first), in ascending
    order, expanded to their tokens (block p -> p*b .. p*b + b - 1), then the tail tokens n*b .. S-1.
    """
    batch, n = scores.shape
    assert n == seq_len // block_size, (scores.shape, block_size, seq_len)
    assert 0 <= k_blocks <= n, (k_blocks, n)
    tail = list(range(n * block_size, seq_len))
    rows = []
    for row in scores.tolist():
        ranked = sorted(range(n), key=lambda p: (-row[p], p))   # best first, lower index on ties
        kept_blocks = sorted(ranked[:k_blocks])
        tokens = [p * block_size + t for p in kept_blocks for t in range(block_size)]
        rows.append(tokens + tail)
    return torch.tensor(rows, dtype=torch.int64, device=scores.device).reshape(batch, -1)


def sparse_layer_plan(num_layers: int, seq_len: int, *, block_size: int = 64, keep_ratio=0.4,
                      dense_layers="auto") -> list[int | None]:
    """Blocks kept per layer: a list of num_layers entries, k (an int) for a sparse layer, None if dense.

    keep_ratio: a float, or one float per layer (indexed by layer number). dense_layers: "auto"
    (layers 0 .. L//2 - 1 and L - 1) or a list of layer indices. A layer is also dense when it has
    nothing to drop: n = seq_len // block_size == 0, or k = min(n, max(1, ceil(ratio * n))) == n.
    """
    if dense_layers == "auto":
        dense = set(range(num_layers // 2)) | {num_layers - 1}
    else:
        dense = set(dense_layers)
        assert all(0 <= layer < num_layers for layer in dense), (dense_layers, num_layers)
    if isinstance(keep_ratio, (list, tuple)):
        assert len(keep_ratio) == num_layers, (keep_ratio, num_layers)
        ratios = list(keep_ratio)
    else:
        ratios = [keep_ratio] * num_layers
    n = seq_len // block_size
    plan: list[int | None] = []
    for layer in range(num_layers):
        k = min(n, max(1, math.ceil(ratios[layer] * n)))
        plan.append(None if layer in dense or n == 0 or k == n else k)
    return plan


def with_edges_kept(scores: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Block scores [B, n] where the first `first` and the last `last` blocks outrank every other."""
    scores = scores.clone()
    n = scores.shape[1]
    scores[:, :first] = float("inf")
    if last:
        scores[:, n - last:] = float("inf")
    return scores


def mlp_token_selection(token_scores: torch.Tensor, k_blocks: int, mlp_keep_ratio: float | None,
                        block_size: int, edges: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """mlp="tokens": the token indices [B, K] an MLP block runs on, from per-token scores [B, S]
    (the oracle: the L2 norm of the intermediate activation): max over each full block, the top k
    blocks (the layer's k, or ceil(mlp_keep_ratio * n) clamped to [1, n]) plus the tail; `edges`
    (first, last) blocks always among the k (`with_edges_kept`)."""
    batch, seq_len = token_scores.shape
    n = seq_len // block_size
    scores = token_scores.float()[:, : n * block_size].reshape(batch, n, block_size).amax(dim=-1)
    scores = with_edges_kept(scores, *edges)
    if mlp_keep_ratio is not None:
        k_blocks = min(n, max(1, math.ceil(mlp_keep_ratio * n)))
    return select_token_indices(scores, k_blocks, block_size, seq_len)


def random_block_scores(batch: int, n_blocks: int, seed: int, layer: int, device=None) -> torch.Tensor:
    """The "random" scorer's scores [B, n] for one layer: a fixed CPU generator per (seed, layer)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(batch, n_blocks, generator=generator).to(device)


def queries_and_keys(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A Llama-family attention module's q [B, H, S, d] and k [B, H_kv, S, d] after RoPE, from
    h [B, S, D]; per-head q / k norms (Qwen3's q_norm, k_norm) are applied before RoPE."""
    batch, seq_len, _ = h.shape
    q = attn.q_proj(h).view(batch, seq_len, -1, attn.head_dim)
    k = attn.k_proj(h).view(batch, seq_len, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows t[b or 0, idx[b]] per sample: t [1 or B, S, ...], idx [B, K] -> [B, K, ...]."""
    return torch.stack([t[b if t.shape[0] > 1 else 0, idx[b]] for b in range(idx.shape[0])])


def causal_attention(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """layer.self_attn on h [B, T, D] with RoPE cos/sin [1 or B, T, d], causal over T -> [B, T, D];
    with `mask` (bool [B, 1, T, T], True attends) that mask instead (sdpa attention only).

    With attention_mask=None the sdpa (and flash) paths of HF apply a causal mask themselves; the
    eager path would attend to everything, so it gets an explicit additive causal mask instead.
    """
    if mask is None and getattr(layer.self_attn.config, "_attn_implementation", "sdpa") == "eager":
        t = h.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        mask = torch.zeros(t, t, dtype=h.dtype, device=h.device).masked_fill(
            future, torch.finfo(h.dtype).min)[None, None]
    out, _ = layer.self_attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=mask)
    return out


def explored_block_scores(scores: torch.Tensor, k_blocks: int, explore: float, seed: int,
                          layer: int) -> torch.Tensor:
    """Option `explore` on one layer's block scores [B, n]: the k - round(explore * k) best blocks
    of each row keep the top places (ties: lower block first), the random scorer's numbers rank
    the others."""
    batch, n_blocks = scores.shape
    scored = k_blocks - round(explore * k_blocks)
    ranked = random_block_scores(batch, n_blocks, seed, layer, scores.device).clone()
    for b in range(batch):
        best = sorted(range(n_blocks), key=lambda p: (-scores[b, p].item(), p))[:scored]
        ranked[b, best] = 2.0
    return ranked


def lemo_forward(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, block_size: int = 64,
                 keep_ratio=0.4, dense_layers="auto", scorer="oracle", seed: int = 0, explore: float = 0.0,
                 keep_first_blocks: int = 0, keep_last_blocks: int = 0,
                 distance_normalized: bool = False, mlp: str = "off", mlp_keep_ratio: float | None = None,
                 mlp_channel_ratio: float = 0.5, mlp_scorer=None,
                 position_ids: torch.Tensor | None = None, sliding_window=None,
                 dropped_loss_weight: float = 1.0):
    """(logits [B, S, V], loss or None) of a Llama-layout causal LM under LeMo token elimination.

    input_ids, labels: [B, S] (no padding, no cache; position_ids = arange(S)). position_ids
    [B, S] that restart at 0 mark packed documents (HF's DataCollatorWithFlattening): RoPE takes
    them, and a token attends only to the earlier tokens of its own document, in dense layers and,
    restricted to the kept tokens, in sparse ones; blocks and scores ignore the documents (the
    oracle scores every earlier token of the row). sliding_window: a token attends only to the
    `sliding_window` latest tokens, itself included (Mistral's window), by their positions in the
    row; an int for every layer, or one int or None (no window) per layer; the oracle still scores
    every earlier token. The model is used as
    it is (train or eval mode) and not modified. Gradients flow through everything except the block
    scoring. loss: the HF causal-LM loss (mean cross-entropy of logits[:, :-1] against labels[:, 1:],
    ignoring -100), in float32. scorer: "oracle", "random" (seeded by `seed` and the layer index),
    "output" (per token the norm of the dense attention block's result, mean over each block), or
    a function (layer index, attention input h [B, S, D]) -> block scores [B, n] (trained predictors);
    explore > 0 replaces a share of the attention's kept blocks by random ones
    (`explored_block_scores`); keep_first_blocks and keep_last_blocks blocks at the ends are kept
    by every sparse block (`with_edges_kept`); distance_normalized: the oracle's tiles divided
    by their block distance's mean (`oracle_block_scores`).
    mlp: "off" (dense MLP blocks) or "tokens": in each sparse layer the MLP block runs on the same
    number of blocks, chosen by the largest per-token norm of act(gate) * up within each block
    (mlp_keep_ratio: k = min(n, max(1, ceil(mlp_keep_ratio * n))) blocks instead); mlp_scorer, a
    function (layer index, MLP input h2 [B, S, D]) -> per-token scores [B, S] (trained MLP
    predictors), replaces that norm; or "channels": in each layer not in `dense_layers` the MLP's output is the dense one, but its
    gradient flows only through C = min(I, max(1, ceil(mlp_channel_ratio * I))) channels of the
    intermediate activation a = act(gate) * up [B, S, I]: per sample those of largest L2 norm over
    the tokens (ties: lower channel first). With m the 0/1 mask of kept channels, the down
    projection is  (m * a) @ W^T + b + ((1 - m) * a) @ W^T  with the last term detached.
    dropped_loss_weight d < 1: token s of row b has weight w = d + (1 - d) * (the share of the
    sparse blocks, attention and with mlp="tokens" MLP, that kept it; 1 when there are none), and
    the loss is sum(w * cross-entropy) / sum(w) over the counted labels (the logits at s against
    the label at s + 1).
    """
    if not callable(scorer) and scorer not in ("oracle", "random", "output"):
        raise ValueError(f"unknown scorer {scorer!r}")
    if mlp not in ("off", "tokens", "channels"):
        raise ValueError(f"unknown mlp {mlp!r}")
    inner = model.model
    batch, seq_len = input_ids.shape
    plan = sparse_layer_plan(len(inner.layers), seq_len, block_size=block_size, keep_ratio=keep_ratio,
                             dense_layers=dense_layers)

    x = inner.embed_tokens(input_ids)                                          # [B, S, D]
    token = torch.arange(seq_len, device=input_ids.device)
    earlier = token[None, :] <= token[:, None]                                 # [S, S]
    documents = None                                                           # [B, 1, S, S]
    if position_ids is None:
        position_ids = token[None]                                             # [1, S]
    else:
        document = (position_ids == 0).cumsum(dim=1)                           # [B, S]
        documents = ((document[:, :, None] == document[:, None, :]) & earlier)[:, None]
    windows = (sliding_window if isinstance(sliding_window, (list, tuple))
               else [sliding_window] * len(inner.layers))
    masks = []  # per layer: bool [1 or B, 1, S, S], or None (plain causal)
    for window in windows:
        mask = documents
        if window is not None:
            local = (earlier & (token[:, None] - token[None, :] < window))[None, None]
            mask = local if mask is None else mask & local
        masks.append(mask)
    cos, sin = inner.rotary_emb(x, position_ids)                               # [1 or B, S, d]
    kept = []  # per sparse block: 1.0 where it kept the token [B, S]

    def note_kept(idx: torch.Tensor) -> None:
        kept.append(torch.zeros(batch, seq_len, device=x.device).scatter(1, idx, 1.0))

    for layer_index, layer in enumerate(inner.layers):
        k_blocks = plan[layer_index]
        mask = masks[layer_index]
        if k_blocks is None:
            # Dense attention block.
            x = x + causal_attention(layer, layer.input_layernorm(x), cos, sin, mask)
        else:
            # Choose the kept tokens (no gradient).
            with torch.no_grad():
                if callable(scorer):
                    scores = scorer(layer_index, layer.input_layernorm(x))
                elif scorer == "oracle":
                    q, k = queries_and_keys(layer.self_attn, layer.input_layernorm(x), cos, sin)
                    scores = oracle_block_scores(q, k, block_size, distance_normalized)
                elif scorer == "output":  # the dense block's result per token: norm, block mean
                    out = causal_attention(layer, layer.input_layernorm(x), cos, sin, mask)
                    norms = out.float().norm(dim=-1)[:, :seq_len // block_size * block_size]
                    scores = norms.reshape(batch, seq_len // block_size, block_size).mean(-1)
                else:
                    scores = random_block_scores(batch, seq_len // block_size, seed, layer_index, x.device)
                if explore:
                    scores = explored_block_scores(scores, k_blocks, explore, seed, layer_index)
                scores = with_edges_kept(scores, keep_first_blocks, keep_last_blocks)
                idx = select_token_indices(scores, k_blocks, block_size, seq_len)  # [B, K]
            note_kept(idx)
            # Attention on the kept residual rows only, added back into those rows.
            rows = gather_rows(x, idx)                                         # [B, K, D]
            kept_mask = None if mask is None else torch.stack(
                [mask[b if mask.shape[0] > 1 else 0][:, idx[b]][:, :, idx[b]]
                 for b in range(batch)])                                       # [B, 1, K, K]
            a = causal_attention(layer, layer.input_layernorm(rows), gather_rows(cos, idx),
                                 gather_rows(sin, idx), kept_mask)              # [B, K, D]
            x = torch.stack([x[b].index_add(0, idx[b], a[b].to(x.dtype)) for b in range(batch)])
        if mlp == "tokens" and k_blocks is not None:
            # MLP on the blocks whose intermediate activation is largest (no gradient in the choice).
            with torch.no_grad():
                h2 = layer.post_attention_layernorm(x)
                if mlp_scorer is not None:
                    token_scores = mlp_scorer(layer_index, h2)
                else:
                    activation = layer.mlp.act_fn(layer.mlp.gate_proj(h2)) * layer.mlp.up_proj(h2)
                    token_scores = activation.float().norm(dim=-1)
                idx = mlp_token_selection(token_scores, k_blocks, mlp_keep_ratio, block_size,
                                          (keep_first_blocks, keep_last_blocks))
            note_kept(idx)
            m = layer.mlp(layer.post_attention_layernorm(gather_rows(x, idx)))
            x = torch.stack([x[b].index_add(0, idx[b], m[b].to(x.dtype)) for b in range(batch)])
        elif mlp == "channels" and not _listed_dense(layer_index, len(inner.layers), dense_layers):
            x = x + channel_mlp(layer.mlp, layer.post_attention_layernorm(x), mlp_channel_ratio)
        else:
            # Dense MLP block.
            x = x + layer.mlp(layer.post_attention_layernorm(x))

    logits = model.lm_head(inner.norm(x))                                      # [B, S, V]
    loss = None
    if labels is not None and dropped_loss_weight == 1:
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
    elif labels is not None:
        terms = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
        share = torch.stack(kept).mean(dim=0) if kept else torch.ones(batch, seq_len)
        weight = dropped_loss_weight + (1 - dropped_loss_weight) * share[:, :-1].reshape(-1)
        weight = weight * (labels[:, 1:].reshape(-1) != -100)
        loss = (terms * weight).sum() / weight.sum()
    return logits, loss


def lemo_forward_padded(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor | None = None, **options):
    """(logits [B, S, V], loss or None) of a padded batch under LeMo token elimination: every row as
    if it ran alone.

    Row r's real tokens (attention_mask[r] == 1), in order, go through `lemo_forward` as a batch of
    one (so with positions 0 .. L-1 and the row's own blocks, plan and selection); their logits go
    back to their positions, zeros at padding. loss: the mean cross-entropy over every row's counted
    labels, i.e. the sum over rows of (row loss x its number of counted labels) / their total. This
    is the padded batch's HF loss when no counted label follows padding (labels -100 at padding
    and, with left padding, at each row's first real token). options: those of `lemo_forward`; a
    "random" scorer draws each row's scores as a batch of one, which a batch does not.
    """
    batch, seq_len = input_ids.shape
    rows, total, count = [], 0.0, 0
    for r in range(batch):
        real = attention_mask[r].bool()
        row_labels = labels[r, real][None] if labels is not None else None
        logits, loss = lemo_forward(model, input_ids[r, real][None], row_labels, **options)
        padded = logits.new_zeros(seq_len, logits.shape[-1]).index_put(
            (real.nonzero()[:, 0],), logits[0])
        rows.append(padded)
        if row_labels is not None:
            counted = int((row_labels[0, 1:] != -100).sum())
            if counted:
                total = total + loss * counted
                count += counted
    loss = total / count if labels is not None else None
    return torch.stack(rows), loss
def _listed_dense(layer_index: int, num_layers: int, dense_layers) -> bool:
    """Whether `dense_layers` ("auto" or a list) names this layer."""
    if dense_layers == "auto":
        return layer_index < num_layers // 2 or layer_index == num_layers - 1
    return layer_index in dense_layers


def channel_mlp(mlp, h: torch.Tensor, ratio: float) -> torch.Tensor:
    """A Llama-layout MLP (gate_proj, up_proj, act_fn, down_proj) on h [B, S, D] whose gradient goes
    through the top channels of its intermediate activation only (see `lemo_forward`)."""
    a = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)                         # [B, S, I]
    return channel_down_projection(a, mlp.down_proj, ratio)


def channel_down_projection(a: torch.Tensor, down, ratio: float) -> torch.Tensor:
    """down(a) for an intermediate activation a [B, S, I] and a linear layer `down`, with the
    gradient through a's top C = min(I, max(1, ceil(ratio * I))) channels per sample only (by L2
    norm over the tokens, ties: lower channel first): (m * a) @ W^T + b + stopgrad(((1 - m) * a) @ W^T)."""
    batch, _, channels = a.shape
    kept = min(channels, max(1, math.ceil(ratio * channels)))
    mask = torch.zeros(batch, 1, channels, dtype=a.dtype, device=a.device)
    with torch.no_grad():
        for b in range(batch):
            norms = [float(torch.linalg.vector_norm(a[b, :, j].float())) for j in range(channels)]
            ranked = sorted(range(channels), key=lambda j: (-norms[j], j))
            mask[b, 0, ranked[:kept]] = 1
    weight, bias = down.weight, down.bias
    through_kept = F.linear(a * mask, weight, bias)
    through_dropped = F.linear(a * (1 - mask), weight).detach()
    return through_kept + through_dropped


def opt_lemo_forward(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                     block_size: int = 64, keep_ratio=0.4, dense_layers="auto", scorer="oracle",
                     seed: int = 0, mlp: str = "off", mlp_keep_ratio: float | None = None,
                     mlp_scorer=None, mlp_channel_ratio: float = 0.5):
    """(logits [B, S, V], loss or None) of a pre-norm HF OPTForCausalLM under LeMo token
    elimination: the semantics of `lemo_forward` on OPT's layout.

    x = embed_tokens(ids) (through project_in if any) + learned positions (0 .. S-1), added once
    before the first layer, so nothing per layer depends on the position. Per layer:
    x1 = x + dropout(Attn(self_attn_layer_norm(x))), y = x1 + dropout(fc2(act(fc1(final_layer_norm(x1))))).
    Oracle queries are q_proj(h) (without OPT's own 1/sqrt(d) factor, which the score's 1/sqrt(d)
    replaces) and keys k_proj(h), both per head. Attention in a sparse layer runs on the kept rows
    only (causal over them), and its dropout is applied to those rows only. mlp="tokens": the MLP
    block's per-token score is ||act(fc1(final_layer_norm(x1)))||_2 (or mlp_scorer(layer index,
    final_layer_norm(x1)), as in `lemo_forward`), max per block. mlp="channels": in each layer not in
    `dense_layers`, fc2's gradient goes through the top channels of act(fc1(...)) only
    (`channel_down_projection`). Requires do_layer_norm_before=True.
    """
    if mlp not in ("off", "tokens", "channels"):
        raise ValueError(f"opt_lemo_forward: unsupported mlp {mlp!r}")
    decoder = model.model.decoder
    config = model.config
    assert config.do_layer_norm_before, "post-norm OPT has no lemo semantics"
    batch, seq_len = input_ids.shape
    plan = sparse_layer_plan(len(decoder.layers), seq_len, block_size=block_size,
                             keep_ratio=keep_ratio, dense_layers=dense_layers)
    n = seq_len // block_size

    embeds = decoder.embed_tokens(input_ids)
    if decoder.project_in is not None:
        embeds = decoder.project_in(embeds)
    positions = torch.arange(seq_len, device=input_ids.device)[None].expand(batch, seq_len)
    x = embeds + decoder.embed_positions(torch.ones_like(input_ids), 0, position_ids=positions)

    def attention(layer, rows):                              # rows [B, T, D] -> [B, T, D]
        a, _ = layer.self_attn(hidden_states=layer.self_attn_layer_norm(rows), attention_mask=None)
        return F.dropout(a, p=layer.dropout, training=model.training)

    def mlp_block(layer, rows):
        hidden = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(rows))))
        return F.dropout(hidden, p=layer.dropout, training=model.training)

    def add_rows(x, idx, out):
        return torch.stack([x[b].index_add(0, idx[b], out[b].to(x.dtype)) for b in range(batch)])

    for layer_index, layer in enumerate(decoder.layers):
        k_blocks = plan[layer_index]
        if k_blocks is None:
            x = x + attention(layer, x)
        else:
            with torch.no_grad():
                if callable(scorer):
                    scores = scorer(layer_index, layer.self_attn_layer_norm(x))
                elif scorer == "oracle":
                    attn = layer.self_attn
                    h = layer.self_attn_layer_norm(x)
                    q = attn.q_proj(h).view(batch, seq_len, attn.num_heads, attn.head_dim).transpose(1, 2)
                    k = attn.k_proj(h).view(batch, seq_len, attn.num_heads, attn.head_dim).transpose(1, 2)
                    scores = oracle_block_scores(q, k, block_size)
                else:
                    scores = random_block_scores(batch, n, seed, layer_index, x.device)
                idx = select_token_indices(scores, k_blocks, block_size, seq_len)
            x = add_rows(x, idx, attention(layer, gather_rows(x, idx)))
        if mlp == "tokens" and k_blocks is not None:
            with torch.no_grad():
                h2 = layer.final_layer_norm(x)
                if mlp_scorer is not None:
                    token_scores = mlp_scorer(layer_index, h2)
                else:
                    token_scores = layer.activation_fn(layer.fc1(h2)).float().norm(dim=-1)
                idx = mlp_token_selection(token_scores, k_blocks, mlp_keep_ratio, block_size)
            x = add_rows(x, idx, mlp_block(layer, gather_rows(x, idx)))
        elif mlp == "channels" and not _listed_dense(layer_index, len(decoder.layers), dense_layers):
            a = layer.activation_fn(layer.fc1(layer.final_layer_norm(x)))
            hidden = channel_down_projection(a, layer.fc2, mlp_channel_ratio)
            x = x + F.dropout(hidden, p=layer.dropout, training=model.training)
        else:
            x = x + mlp_block(layer, x)

    if decoder.final_layer_norm is not None:
        x = decoder.final_layer_norm(x)
    if decoder.project_out is not None:
        x = decoder.project_out(x)
    logits = model.lm_head(x)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
    return logits, loss


def toy_lemo_forward(model, ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                     block_size: int = 64, keep_ratio=0.4, dense_layers="auto", mlp: str = "off"):
    """(logits, loss or None) of the project's toy decoder (`tests/toy.py`) under LeMo token
    elimination with the oracle scorer: the semantics of `lemo_forward`, with each block's tail
    (the toy's sandwich norm and / or scale on the block's output) part of the block, so run on the
    kept rows only: x1 = x + tail1(Attn(norm1(x))) in a sparse layer adds tail1 of the kept rows'
    attention into those rows, and nothing into the others. mlp: "off" (a dense MLP block) or
    "tokens" (in a sparse layer the MLP block runs on as many blocks, those of largest
    ||silu(gate) * up|| per token, and adds into those rows). A parallel-residual layer
    (y = x + Attn(norm1(x)) + MLP(norm(x))) is the same with the MLP block reading x instead of
    x1 and adding into x1: each block chooses its own rows from x. Batch 1 (the toy's RoPE
    broadcasts cos [1, S, d] over the batch)."""
    assert ids.shape[0] == 1, "toy_lemo_forward: batch 1"
    seq_len = ids.shape[1]
    plan = sparse_layer_plan(len(model.layers), seq_len, block_size=block_size,
                             keep_ratio=keep_ratio, dense_layers=dense_layers)
    cos, sin = model.rope(seq_len, ids.device)
    x = model.embed(ids)
    for layer_index, layer in enumerate(model.layers):
        k_blocks = plan[layer_index]
        if k_blocks is None:
            x1 = x + layer.tail(layer.attn(layer.norm1(x), cos, sin), layer.post1)
        else:
            attn = layer.attn
            with torch.no_grad():
                h = layer.norm1(x)
                q = attn.q(h).view(1, seq_len, attn.heads, attn.head_dim).transpose(1, 2)
                k = attn.k(h).view(1, seq_len, attn.kv_heads, attn.head_dim).transpose(1, 2)
                q, k = _toy_rotate(q, cos, sin), _toy_rotate(k, cos, sin)
                scores = oracle_block_scores(q, k, block_size)
                idx = select_token_indices(scores, k_blocks, block_size, seq_len)  # [1, K]
            rows = x[:, idx[0]]
            out = layer.tail(attn(layer.norm1(rows), cos[:, idx[0]], sin[:, idx[0]]), layer.post1)
            x1 = x[0].index_add(0, idx[0], out[0])[None]
        mlp_in, norm = (x if layer.parallel else x1), layer.mlp_norm()
        if mlp == "tokens" and k_blocks is not None:
            with torch.no_grad():
                h2 = norm(mlp_in)
                activation = F.silu(layer.mlp.gate(h2)) * layer.mlp.up(h2)
                idx = mlp_token_selection(activation.float().norm(dim=-1), k_blocks, None, block_size)
            out = layer.tail(layer.mlp(norm(mlp_in[:, idx[0]])), layer.post2)
            x = x1[0].index_add(0, idx[0], out[0])[None]
        else:
            x = x1 + layer.tail(layer.mlp(norm(mlp_in)), layer.post2)
    logits = model.head(model.norm(x))
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
    return logits, loss


def _toy_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
