"""The operations lemo's passes insert into graphs.

Two kinds live here, each named for what it computes:

* `torch.library` ops (namespace `lemo`). Those with Triton kernels are `triton_op`s: their bodies
  launch the kernel for CUDA tensors (through `wrap_triton`, so Inductor compiles the kernel into its
  own code) and run the pure-torch reference otherwise; fake implementations come from tracing the
  body. The segmented loss is an opaque `custom_op`, so that its segment loop is never unrolled into
  a graph; so is `lemo::channel_linear` (mlp="channels"), whose autograd formula defines that
  mode's gradient. `lemo::materialize` (an identity with an Inductor lowering of its own),
  `lemo::late_cast` (an opaque dtype cast) and `lemo::add_now` (an opaque addition) decide where
  Inductor places a buffer.
  `lemo::swiglu_backward_` writes the SwiGLU MLP's gradients over its inputs; it is a `custom_op`
  whose body launches its kernel directly, because it enters graphs after Inductor's tracing (a
  post-grad pass inserts it, wrapped in `auto_functionalized`, and Inductor's re-inplacing pass
  decides that writing in place is safe), so Inductor calls it as an opaque op.
  Differentiable ops carry an autograd formula (the fusion pass inserts some of
  them after autograd, where the formula is not used; it is there for eager callers).
* Plain graph functions (`select_tokens`, `gather_tokens`, `scatter_add_tokens`, ...): inserted as
  `call_function` nodes on the Dynamo graph; AOTAutograd traces through them into aten ops, so
  autograd and Inductor fusion come for free.

Shapes: B batch, S sequence length, n = S // block full blocks, K kept tokens, D hidden size.
"""

from __future__ import annotations

import torch
from torch._inductor import lowering as inductor_lowering

from lemo_compile.kernels import block_scores as _scores
from lemo_compile.kernels import lm_loss as _loss
from lemo_compile.kernels import rows as _rows
from lemo_compile.kernels import swiglu as _swiglu
from lemo_compile.kernels import use_triton
from lemo_compile.plan import kept_blocks

# ------------------------------------------------------------------------------------- scorers


@torch.library.triton_op("lemo::block_scores", mutates_args=())
def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, per_distance: bool = False,
                 full_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle block scores sigma [B, n] (float32) from q [B, H, S, d] and k [B, Hk, S, d]; no grad.
    per_distance: the tiles divided by their distance's mean first (`tiles_per_distance`, whose
    `full_blocks` [B] gives a padded row's own blocks)."""
    if use_triton(q, k) and _scores.triton_supports(block_size, q.shape[3]):
        tiles = _scores.block_tile_max_triton(q, k, block_size)
    else:
        tiles = _scores.block_tile_max_reference(q, k, block_size)
    return _scores.scores_from_tiles(tiles, per_distance, full_blocks)


def random_seed_of(seed: int, layer: int) -> int:
    """The generator seed of layer `layer` for the random scorer with option `seed`."""
    return seed * 1_000_003 + layer


@torch.library.custom_op("lemo::random_block_scores", mutates_args=())
def random_block_scores(like: torch.Tensor, n_blocks: int, layer: int, seed: int | None) -> torch.Tensor:
    """Uniform random scores [B, n_blocks] (float32) on like's device; B = like.shape[0].

    seed None: torch's global RNG, new scores every call. seed int: a CPU generator seeded with
    `random_seed_of(seed, layer)`, the same scores every call.
    """
    shape = (like.shape[0], n_blocks)
    if seed is None:
        return torch.rand(shape, device=like.device)
    generator = torch.Generator().manual_seed(random_seed_of(seed, layer))
    return torch.rand(shape, generator=generator).to(like.device)


@random_block_scores.register_fake
def _(like: torch.Tensor, n_blocks: int, layer: int, seed: int | None) -> torch.Tensor:
    return like.new_empty((like.shape[0], n_blocks), dtype=torch.float32)


# ------------------------------------------------------------------ selection (graph functions)


def select_tokens(scores: torch.Tensor, kept_blocks: int, block_size: int, seq_len: int) -> torch.Tensor:
    """Token indices [B, kept_blocks * block_size + S % block_size] (int64), sorted per row.

    Keeps the `kept_blocks` highest-scoring full blocks of scores [B, n] (ties: lower block index
    first), expands them to their tokens and appends the tail tokens n * block_size .. S - 1.
    """
    batch, n_blocks = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    blocks = torch.sort(order[:, :kept_blocks], dim=1).values
    offsets = torch.arange(block_size, device=scores.device)
    tokens = (blocks[:, :, None] * block_size + offsets).reshape(batch, kept_blocks * block_size)
    tail = torch.arange(n_blocks * block_size, seq_len, device=scores.device)
    return torch.cat([tokens, tail.expand(batch, -1)], dim=1)


def explore_scores(scores: torch.Tensor, noise: torch.Tensor, scored_blocks: int) -> torch.Tensor:
    """Block scores [B, n] (float32) for option `explore`: ranked by them, each row's
    `scored_blocks` best blocks of scores [B, n] (ties: the lower block first) come first, then
    every other block by noise [B, n] (in [0, 1)). The top k >= scored_blocks of the result are
    the scorer's best and k - scored_blocks blocks drawn by the noise."""
    # a block's rank counts the blocks ahead of it (higher, or equal and lower): no sort, which
    # ONNX export lacks; [B, n, n] booleans, 4 MB a row at n = 2048 (128K tokens)
    ahead = (scores[:, None, :] > scores[:, :, None]) | (
        (scores[:, None, :] == scores[:, :, None])
        & torch.ones(scores.shape[1], scores.shape[1], dtype=torch.bool,
                     device=scores.device).tril(diagonal=-1))
    rank = ahead.sum(dim=2)
    return torch.where(rank < scored_blocks, 2.0, noise.float())


def full_blocks(real: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each row's number of full blocks of real tokens [B] (int64), from real [B, S] (bool)."""
    return real.sum(dim=1) // block_size


def force_edge_blocks(scores: torch.Tensor, first: int, last: int, block_size: int,
                      real: torch.Tensor | None = None) -> torch.Tensor:
    """Block scores [B, n] (float32) with each row's first `first` and last `last` full blocks set
    to +inf, so that a top-k selection (ties: the lower block first) keeps them. A padded row's
    blocks are its own (real [B, S]: the scores are in its own frame, `real_first`): its last
    blocks end at its last full block."""
    n_blocks = scores.shape[1]
    block = torch.arange(n_blocks, device=scores.device)[None, :]
    if real is None:
        full = torch.full((1, 1), n_blocks, device=scores.device)
    else:
        full = full_blocks(real, block_size)[:, None]
    forced = (block < first) | ((block >= full - last) & (block < full))
    return scores.float().masked_fill(forced, float("inf"))


def activation_block_scores(
    intermediate: torch.Tensor, block_size: int, real: torch.Tensor | None = None
) -> torch.Tensor:
    """MLP block scores [B, n] (float32): per token the L2 norm of the MLP's intermediate activation
    intermediate [B, S, F] (act(gate) * up; OPT: relu(fc1)), then `token_block_scores`."""
    return token_block_scores(intermediate.float().norm(dim=-1), block_size, real)


def output_block_scores(output: torch.Tensor, block_size: int) -> torch.Tensor:
    """scorer="output" block scores [B, n] (float32): per token the L2 norm of an attention
    block's result output [B, S, D], averaged over each full block (the tail is always kept).
    The mean, not the MLP scorer's max: in the first measurement (README, Accuracy) blocks ranked
    by their mean kept more of a model than random ones in six readings of six, ranked by their
    largest row in four."""
    return token_block_scores(output.float().norm(dim=-1), block_size, mean=True)


def token_block_scores(
    scores: torch.Tensor, block_size: int, real: torch.Tensor | None = None, mean: bool = False
) -> torch.Tensor:
    """Block scores [B, n] from per-token scores [B, S]: the max over each full block (the mean
    with `mean`).

    With `real` [B, S] (padding), the blocks are each row's own: its real tokens, in order, cut
    into blocks (`real_first`); entries past a row's full blocks are meaningless."""
    batch, seq_len = scores.shape
    n_blocks = seq_len // block_size
    if real is not None:
        scores = real_first(scores, real, 1, block_size)
    blocks = scores[:, : n_blocks * block_size].reshape(batch, n_blocks, block_size)
    return blocks.mean(dim=-1) if mean else blocks.amax(dim=-1)


# ------------------------------------------------------- padded batches (graph functions)
#
# A padded row is computed as if it ran alone: its L real tokens, in order, are cut into blocks of
# their own (a left-padded row's blocks start at its first real token, not at position 0), scored
# from real tokens only, and the row keeps `plan.kept_blocks(ratio, L // b)` of them plus its
# L % b tail. The compacted block has a static number of rows K for every row length; a row's
# remaining rows are fillers (padding first, then unkept real tokens): hidden as keys, and their
# results are discarded (`hide_invalid_keys`, `scatter_add_kept_tokens`).


def real_tokens(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Which tokens are real (not padding), [B, S] bool, read off the attention mask that reaches
    SDPA, mask [B or 1, h or 1, S, S] (bool: True attends; float: additive, 0 attends).

    Token j is real when it may attend to itself: Hugging Face's masks hide padding keys from every
    query and keep the diagonal otherwise (causal, sliding-window and chunked alike)."""
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if diagonal.dtype != torch.bool:
        diagonal = diagonal > torch.finfo(diagonal.dtype).min / 2
    return diagonal.expand(batch, -1)


def real_first(t: torch.Tensor, real: torch.Tensor, dim: int, block_size: int,
               zero_partial: bool = False) -> torch.Tensor:
    """t with each row's tokens reordered along `dim` so that its real tokens come first, in order,
    then its padding: the frame in which the row's own blocks are t's blocks 0 .. L // b - 1.

    t [B, ..., S (at dim), ...], real [B, S]. zero_partial: zero every entry past the row's full
    blocks (its tail and its padding), so that they add nothing to block scores."""
    batch, seq_len = real.shape
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices     # [B, S]
    view = [batch] + [1] * (t.dim() - 1)
    view[dim] = seq_len
    if t.shape[0] != batch:
        t = t.expand(batch, *t.shape[1:])
    t = t.gather(dim, order.reshape(view).expand(t.shape))
    if zero_partial:
        full = real.sum(dim=1, keepdim=True) // block_size * block_size          # [B, 1]
        inside = torch.arange(seq_len, device=real.device)[None, :] < full       # [B, S]
        t = torch.where(inside.reshape(view), t, torch.zeros((), dtype=t.dtype, device=t.device))
    return t


def kept_row_tokens(scores: torch.Tensor, real: torch.Tensor, keep_ratio: float,
                    block_size: int) -> torch.Tensor:
    """The tokens each row keeps, [B, S] bool, as it would keep them alone.

    scores [B, n]: block scores in each row's own frame (`real_first`); real [B, S]. A row with L
    real tokens has m = L // b full blocks; it keeps its `kept_blocks(keep_ratio, m)` best ones
    (ties: the lower block first) and its L % b tail. Padding is never kept."""
    batch, n_blocks = scores.shape
    device = scores.device
    full = full_blocks(real, block_size)                                         # [B]
    table = torch.tensor([kept_blocks(keep_ratio, m) for m in range(n_blocks + 1)], device=device)
    keep = table[full]                                                           # [B]
    block = torch.arange(n_blocks, device=device)[None, :]
    own = block < full[:, None]                                                  # [B, n]
    ranked = torch.where(own, scores.float(), torch.full((), float("-inf"), device=device))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.argsort(order, dim=1)                                           # block -> rank
    block_kept = own & (rank < keep[:, None])
    position = real.long().cumsum(dim=1) - 1          # a real token's index among the row's real
    token_block = (position // block_size).clamp(0, n_blocks - 1)
    in_tail = position >= (full * block_size)[:, None]
    return real & (in_tail | block_kept.gather(1, token_block))


def select_kept_tokens(kept: torch.Tensor, real: torch.Tensor, kept_tokens: int) -> torch.Tensor:
    """Token indices [B, kept_tokens] (int64), sorted per row: every kept token (kept [B, S] holds
    at most kept_tokens per row), then fillers, padding before unkept real tokens, by position."""
    seq_len = kept.shape[1]
    position = torch.arange(seq_len, device=kept.device)[None, :]
    rank = torch.where(kept, 0, torch.where(real, 2, 1))
    chosen = torch.sort(position + seq_len * rank, dim=1).indices[:, :kept_tokens]
    return torch.sort(chosen, dim=1).values


def tokens_at(flags: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """flags [B, S] at the token indices idx [B, K] -> [B, K] (which selected rows are kept)."""
    return flags.gather(1, idx)


def hide_invalid_keys(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A compacted attention mask [B, h, K, K] with the filler rows (valid [B, K] False) hidden as
    keys from every query; a filler query sees only itself, so that no query row is fully masked
    (its result is discarded, and no gradient reaches it)."""
    kept_key = valid[:, None, None, :]
    own_key = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device) & ~valid[:, None, :, None]
    if mask.dtype == torch.bool:
        return (mask & kept_key) | own_key
    visible = ((mask > torch.finfo(mask.dtype).min / 2) & kept_key) | own_key
    return torch.where(visible, torch.where(own_key, 0, mask), torch.finfo(mask.dtype).min)


def scatter_add_kept_tokens(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor,
                            valid: torch.Tensor) -> torch.Tensor:
    """`scatter_add_tokens(x, idx, rows)` with the filler rows (valid [B, K] False) dropped."""
    rows = torch.where(valid[:, :, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return scatter_add_tokens(x, idx, rows)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Rows of t at per-sample token indices idx [B, K], along each sequence dim in `dims`.

    t has the batch in dim 0 (size B, or 1 to broadcast) and S on every dim in `dims`; the result
    has K there. A mask [B, h, S, S] gathered on dims (2, 3) gives the compacted [B, h, K, K].
    """
    batch, kept = idx.shape
    if t.shape[0] != batch:
        t = t.expand(batch, *t.shape[1:])
    for dim in dims:
        view = [batch] + [1] * (t.dim() - 1)
        view[dim] = kept
        index = idx.reshape(view).expand(*t.shape[:dim], kept, *t.shape[dim + 1 :])
        t = t.gather(dim, index)
    return t


def scatter_add_tokens(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x + rows placed at idx: x [B, S, D], idx [B, K] (distinct per row), rows [B, K, D] -> [B, S, D].

    Rows of x not in idx pass through unchanged; this is the residual add of a sparse block.
    """
    return _rows.scatter_add_rows_reference(x, idx, rows)


def nan_placeholder(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A NaN tensor of `shape` that holds one element (stride 0): an output lemo does not compute."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


# ----------------------------------------------------------------- MLP channels (mlp="channels")


def select_channels(intermediate: torch.Tensor, kept: int) -> torch.Tensor:
    """Channel indices [B, kept] (int64, sorted per row) of the MLP intermediate activation
    intermediate [B, S, I]: per sample, the `kept` channels of largest L2 norm over all S tokens
    (computed in float32; ties: lower channel index first). No gradient."""
    norms = intermediate.detach().float().norm(dim=1)                           # [B, I]
    order = torch.sort(norms, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :kept], dim=1).values


def gather_channels(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, :, idx[b, c]]: t [B, S, I], idx [B, C] -> [B, S, C] (its gradient scatters back)."""
    batch, seq_len = t.shape[:2]
    return t.gather(2, idx[:, None, :].expand(batch, seq_len, idx.shape[1]))


@torch.library.custom_op("lemo::channel_linear", mutates_args=())
def channel_linear(
    a: torch.Tensor,
    a_kept: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The down projection of mlp="channels": an exact forward, a backward through kept channels.

    a [B, S, I]: the MLP's intermediate activation (act(gate) * up; OPT: relu(fc1)); idx [B, C]:
    per sample the kept channels (`select_channels`); a_kept [B, S, C] = a[b, :, idx[b]], the same
    values computed by a separate path that carries the gradient; weight [D, I], bias [D] or None.

    Forward: `F.linear(a, weight, bias)` computed in `dtype` (what the dense linear would give,
    autocast included): exactly the dense MLP's output. `a` gets no gradient.
    Backward, with m[b, j] = 1 if channel j is in idx[b] else 0 and g = dL/dout [B, S, D]; it is the
    exact gradient of  out = (m * a) @ W^T + b + stopgrad(((1 - m) * a) @ W^T),  that is:

        dL/da_kept[b, s, c] = sum_d g[b, s, d] W[d, idx[b, c]]       (= dL/da on kept channels; the
                                                                       other channels get none)
        dL/dW[d, j]         = sum_b m[b, j] sum_s g[b, s, d] a[b, s, j]   (dropped columns of a
                                                                       sample contribute nothing)
        dL/db[d]            = sum_{b, s} g[b, s, d]                   (exact)

    Only a_kept, idx and weight are saved for backward.
    """
    with torch.autocast(a.device.type, enabled=False):
        return torch.nn.functional.linear(
            a.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        )


@channel_linear.register_fake
def _(a, a_kept, idx, weight, bias, dtype):
    return a.new_empty((*a.shape[:-1], weight.shape[0]), dtype=dtype)


def _channel_linear_setup(ctx, inputs, output) -> None:
    _, a_kept, idx, weight, bias, dtype = inputs
    ctx.dtype = dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(a_kept, idx, weight)


def _channel_linear_grad(ctx, grad):
    a_kept, idx, weight = ctx.saved_tensors
    batch, kept = idx.shape
    out_features = weight.shape[0]
    grad = grad.to(ctx.dtype)
    grad_kept = grad_weight = grad_bias = None
    if ctx.needs_input_grad[1]:
        columns = weight.to(ctx.dtype).t()[idx]                                # [B, C, D]
        grad_kept = torch.matmul(grad, columns.transpose(1, 2)).to(a_kept.dtype)  # [B, S, C]
    if ctx.needs_input_grad[3]:
        per_sample = torch.matmul(grad.transpose(1, 2), a_kept.to(ctx.dtype))  # [B, D, C]
        flat = per_sample.float().permute(1, 0, 2).reshape(out_features, batch * kept)
        # samples that keep the same channel add up: in float32, whatever the weight's dtype
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_weight = total.index_add(1, idx.reshape(-1), flat).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(dim=tuple(range(grad.dim() - 1))).to(ctx.bias_dtype)
    return None, grad_kept, None, grad_weight, grad_bias, None


channel_linear.register_autograd(_channel_linear_grad, setup_context=_channel_linear_setup)


# ------------------------------------------------------------- row movement (fused Triton ops)


@torch.library.triton_op("lemo::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, j], :]: x [B or 1, S, D], idx [B, K] -> [B, K, D]."""
    if use_triton(x, idx) and _rows.triton_supports(x.shape[2]):
        return _rows.gather_rows_triton(x, idx)
    return _rows.gather_rows_reference(x, idx)


@torch.library.triton_op("lemo::scatter_add_rows", mutates_args=())
def scatter_add_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, S, D] with rows [B, K, D] added at the distinct tokens idx [B, K] -> [B, S, D]."""
    if use_triton(x, idx, rows) and _rows.triton_supports(x.shape[2]):
        return _rows.scatter_add_rows_triton(x, idx, rows)
    return _rows.scatter_add_rows_reference(x, idx, rows)


@torch.library.triton_op("lemo::gather_rms_norm", mutates_args=())
def gather_rms_norm(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm of the kept rows: (y [B, K, D], rows [B, K, D], rstd [B, K, 1] float32).

    y = weight * (rows.float() * rstd).to(x.dtype), rows = x gathered at idx [B, K]; rows and rstd
    are what the norm's backward uses (they carry no gradient of their own).
    """
    if use_triton(x, idx, weight) and _rows.triton_supports(x.shape[2]):
        return _rows.gather_rms_norm_triton(x, idx, weight, eps)
    return _rows.gather_rms_norm_reference(x, idx, weight, eps)


@torch.library.triton_op("lemo::gather_layer_norm", mutates_args=())
def gather_layer_norm(
    x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of the kept rows: (y [B, K, D], rows [B, K, D], mean, rstd [B, K, 1] float32).

    y = F.layer_norm(rows, (D,), weight, bias, eps) with float32 statistics, in x's dtype; rows,
    mean and rstd are what the norm's backward uses (they carry no gradient of their own).
    """
    if use_triton(x, idx, weight, bias) and _rows.triton_supports(x.shape[2]):
        return _rows.gather_layer_norm_triton(x, idx, weight, bias, eps)
    return _rows.gather_layer_norm_reference(x, idx, weight, bias, eps)


def _gather_rows_setup(ctx, inputs, output) -> None:
    x, idx = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(idx)


def _gather_rows_grad(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _spread(grad, idx, ctx.x_shape), None


def _spread(grad_rows: torch.Tensor, idx: torch.Tensor, x_shape) -> torch.Tensor:
    """The gradient of x for a gather of its rows at idx: zeros with grad_rows added at idx."""
    batch, seq_len, width = grad_rows.shape[0], x_shape[1], x_shape[2]
    grad = scatter_add_rows(grad_rows.new_zeros((batch, seq_len, width)), idx, grad_rows)
    return grad.sum(dim=0, keepdim=True) if x_shape[0] != batch else grad


def _scatter_add_rows_setup(ctx, inputs, output) -> None:
    x, idx, rows = inputs
    ctx.rows_dtype = rows.dtype
    ctx.save_for_backward(idx)


def _scatter_add_rows_grad(ctx, grad):
    (idx,) = ctx.saved_tensors
    return grad, None, gather_rows(grad, idx).to(ctx.rows_dtype)


def _gather_rms_norm_setup(ctx, inputs, output) -> None:
    x, idx, weight, eps = inputs
    _, rows, rstd = output
    ctx.x_shape = x.shape
    ctx.mark_non_differentiable(rows, rstd)
    ctx.save_for_backward(idx, weight, rows, rstd)


def _gather_rms_norm_grad(ctx, grad_y, grad_rows, grad_rstd):
    idx, weight, rows, rstd = ctx.saved_tensors
    d_rows, d_weight = _rows.rms_norm_rows_backward_reference(grad_y, rows, rstd, weight)
    return _spread(d_rows, idx, ctx.x_shape), None, d_weight, None


def _gather_layer_norm_setup(ctx, inputs, output) -> None:
    x, idx, weight, bias, eps = inputs
    _, rows, mean, rstd = output
    ctx.x_shape = x.shape
    ctx.mark_non_differentiable(rows, mean, rstd)
    ctx.save_for_backward(idx, weight, rows, mean, rstd)


def _gather_layer_norm_grad(ctx, grad_y, grad_rows, grad_mean, grad_rstd):
    idx, weight, rows, mean, rstd = ctx.saved_tensors
    d_rows, d_weight, d_bias = _rows.layer_norm_rows_backward_reference(
        grad_y, rows, mean, rstd, weight
    )
    return _spread(d_rows, idx, ctx.x_shape), None, d_weight, d_bias, None


gather_rows.register_autograd(_gather_rows_grad, setup_context=_gather_rows_setup)
scatter_add_rows.register_autograd(_scatter_add_rows_grad, setup_context=_scatter_add_rows_setup)
gather_rms_norm.register_autograd(_gather_rms_norm_grad, setup_context=_gather_rms_norm_setup)
gather_layer_norm.register_autograd(_gather_layer_norm_grad, setup_context=_gather_layer_norm_setup)

# -------------------------------------------------------------- segmented loss (custom op + grad)


def kept_share_weights(selections: list[torch.Tensor], seq_len: int,
                       dropped_weight: float) -> torch.Tensor:
    """The loss's row weights [B * S] (float32) of option `dropped_loss_weight` = `dropped_weight`
    (d): d + (1 - d) * the share of `selections` that kept each token, row b * S + s for token s
    of row b. selections: one per sparse block, its kept token indices [B, K] (int64) or, in a
    padded batch, its kept flags [B, S] (bool). A graph function."""
    kept = []
    for selection in selections:
        if selection.dtype == torch.bool:
            kept.append(selection.to(torch.float32))
        else:
            flags = selection.new_zeros((selection.shape[0], seq_len), dtype=torch.float32)
            kept.append(flags.scatter(1, selection, 1.0))
    share = torch.stack(kept).mean(dim=0)
    return (dropped_weight + (1.0 - dropped_weight) * share).reshape(-1)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight, bias).to(logits_dtype), target)` in row segments.

    h [N, D], weight [V, D], bias [V] or None, target [N] int64; returns a `logits_dtype` scalar.
    row_weight: None, or [N] float32 weights of the rows' losses (no gradient), the mean then the
    weighted mean (`kernels.lm_loss.linear_cross_entropy_reference`).
    A graph function: it asks `lemo::linear_cross_entropy_with_grads` for the gradients that
    autograd will need (decided from requires_grad while the graph is traced).
    """
    grad_mode = torch.is_grad_enabled()
    h_grad = grad_mode and h.requires_grad
    weight_grad = grad_mode and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss, _, _, _ = linear_cross_entropy_with_grads(
        h, weight, bias, target, row_weight, ignore_index, reduction, segment, logits_dtype, h_grad,
        weight_grad,
    )
    return loss


@torch.library.custom_op("lemo::linear_cross_entropy_with_grads", mutates_args=())
def linear_cross_entropy_with_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    row_weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
    h_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dh, dloss/dW, dloss/db), the gradients computed segment by segment in the
    forward (see `kernels.lm_loss`); each is an empty [0] tensor when not asked for (`h_grad`,
    `weight_grad`; db also when there is no bias). Autograd multiplies them by the upstream grad.
    The head runs in its operands' dtype whatever autocast is on (the segmented-loss pass casts them
    as autocast cast the head it replaces): the gradients must have their operands' dtypes."""
    with torch.autocast(h.device.type, enabled=False):
        outputs = _loss.linear_cross_entropy_reference(
            h, weight, bias, target, ignore_index, reduction, segment, logits_dtype, h_grad,
            weight_grad, kernel=_loss.kernel_supports(h, logits_dtype), row_weight=row_weight,
        )
    return tuple(t if t is not None else h.new_empty((0,)) for t in outputs)


@linear_cross_entropy_with_grads.register_fake
def _(h, weight, bias, target, row_weight, ignore_index, reduction, segment, logits_dtype, h_grad,
      weight_grad):
    return (
        h.new_empty((), dtype=logits_dtype),
        torch.empty_like(h) if h_grad else h.new_empty((0,)),
        torch.empty_like(weight) if weight_grad else h.new_empty((0,)),
        torch.empty_like(bias) if weight_grad and bias is not None else h.new_empty((0,)),
    )


def _linear_cross_entropy_setup(ctx, inputs, output) -> None:
    _, _, bias, _, _, _, _, _, _, h_grad, weight_grad = inputs
    _, grad_h, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_h, grad_weight, grad_bias)
    ctx.save_for_backward(grad_h, grad_weight, grad_bias)
    ctx.computed = (h_grad, weight_grad, weight_grad and bias is not None)


def _linear_cross_entropy_grad(ctx, grad, *_unused):
    saved = ctx.saved_tensors
    needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    grads = []
    for need, computed, unit in zip(needed, ctx.computed, saved, strict=True):
        if need and not computed:
            raise RuntimeError(
                "lemo::linear_cross_entropy_with_grads: a gradient is needed that the forward was "
                "told not to compute (requires_grad changed between tracing and running?)"
            )
        grads.append(unit * grad.to(unit.dtype) if need else None)
    return (*grads, None, None, None, None, None, None, None, None)


linear_cross_entropy_with_grads.register_autograd(
    _linear_cross_entropy_grad, setup_context=_linear_cross_entropy_setup
)


# ------------------------------------------------------------ buffer placement (Inductor lowering)


@torch.library.custom_op("lemo::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """x's values, held in a buffer of x's own. Under Inductor (the lowering below) x is computed
    into its buffer where this op stands, and every reader reads that buffer, instead of each
    reader's kernel recomputing x from x's inputs (Inductor inlines pointwise values into their
    readers), which would keep those inputs alive until the last reader. Eager: a copy."""
    return x.clone()


@materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lemo::late_cast", mutates_args=())
def late_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x converted to `dtype`, by a kernel of its own where this op stands: Inductor calls an
    opaque op as it is and never fuses it into the kernel that computes x, which would make the
    converted copy exist as early as x does."""
    return x.to(dtype, copy=True)


@late_cast.register_fake
def _(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("lemo::add_now", mutates_args=())
def add_now(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b (same shape and dtype), by a kernel of its own where this op stands: Inductor calls an
    opaque op as it is and never fuses it into its readers, so a and b are freed here instead of
    living until the kernel that reads the sum (which may read many such terms at once)."""
    return a + b


@add_now.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(a)


@inductor_lowering.register_lowering(torch.ops.lemo.materialize.default, type_promotion_kind=None)
def _materialize_lowering(x):
    x.realize()
    return inductor_lowering.clone(x)  # a view of the realized buffer that readers inline


# ------------------------------------------------------------------------- in-place backward


@torch.library.custom_op("lemo::swiglu_backward_", mutates_args=("gate", "up"))
def swiglu_backward_(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> None:
    """gate <- d gate, up <- d up: the backward of `silu(gate) * up` given its gradient `grad`
    (`kernels/swiglu.py`), written over the inputs, so that it allocates nothing."""
    if use_triton(gate, up, grad) and _swiglu.triton_supports(gate, up, grad):
        _swiglu.swiglu_backward_in_place_triton(gate, up, grad)
        return
    d_gate, d_up = _swiglu.swiglu_backward_reference(gate, up, grad)
    gate.copy_(d_gate)
    up.copy_(d_up)


@swiglu_backward_.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> None:
    return None
