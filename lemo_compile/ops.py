"""The operations lemo's passes insert into graphs.

Two kinds live here, each named for what it computes:

* `torch.library` custom ops (namespace `lemo`): opaque to the compiler, with a fake (meta)
  implementation and, where they are differentiable, an autograd formula. Their bodies call the
  pure-torch references in `lemo_compile.kernels`.
* Plain graph functions (`select_tokens`, `gather_tokens`, `scatter_add_tokens`, ...): inserted as
  `call_function` nodes on the Dynamo graph; AOTAutograd traces through them into aten ops, so
  autograd and Inductor fusion come for free.

Shapes: B batch, S sequence length, n = S // block full blocks, K kept tokens, D hidden size.
"""

from __future__ import annotations

import torch

from lemo_compile.kernels.block_scores import block_scores_reference
from lemo_compile.kernels.lm_loss import (
    linear_cross_entropy_backward_reference,
    linear_cross_entropy_reference,
)

# --------------------------------------------------------------------------- scorers (custom ops)


@torch.library.custom_op("lemo::block_scores", mutates_args=())
def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Oracle block scores sigma [B, n] (float32) from q [B, H, S, d] and k [B, Hk, S, d]; no grad."""
    return block_scores_reference(q, k, block_size)


@block_scores.register_fake
def _(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2] // block_size), dtype=torch.float32)


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
    index = idx[:, :, None].expand(-1, -1, x.shape[2])
    return x.scatter_add(1, index, rows.to(x.dtype))


def nan_placeholder(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A NaN tensor of `shape` that holds one element (stride 0): an output lemo does not compute."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


# -------------------------------------------------------------- segmented loss (custom op + grad)


@torch.library.custom_op("lemo::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight, bias).to(logits_dtype), target)` in row segments.

    h [N, D], weight [V, D], bias [V] or None, target [N] int64; returns a `logits_dtype` scalar.
    """
    return linear_cross_entropy_reference(
        h, weight, bias, target, ignore_index, reduction, segment, logits_dtype
    )


@linear_cross_entropy.register_fake
def _(h, weight, bias, target, ignore_index, reduction, segment, logits_dtype):
    return h.new_empty((), dtype=logits_dtype)


@torch.library.custom_op("lemo::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
    weight_grad: bool,
) -> list[torch.Tensor]:
    """[dh, dW, db] of `linear_cross_entropy`; dW and db are empty [0] when not computed (no
    `weight_grad`, or no bias)."""
    grads = linear_cross_entropy_backward_reference(
        grad, h, weight, bias, target, ignore_index, reduction, segment, logits_dtype, weight_grad
    )
    return [g if g is not None else h.new_empty((0,)) for g in grads]


@linear_cross_entropy_backward.register_fake
def _(grad, h, weight, bias, target, ignore_index, reduction, segment, logits_dtype, weight_grad):
    grad_weight = torch.empty_like(weight) if weight_grad else h.new_empty((0,))
    grad_bias = torch.empty_like(bias) if weight_grad and bias is not None else h.new_empty((0,))
    return [torch.empty_like(h), grad_weight, grad_bias]


def _linear_cross_entropy_setup(ctx, inputs, output) -> None:
    h, weight, bias, target, ignore_index, reduction, segment, logits_dtype = inputs
    ctx.save_for_backward(h, weight, bias, target)
    ctx.options = (ignore_index, reduction, segment, logits_dtype)


def _linear_cross_entropy_grad(ctx, grad):
    h, weight, bias, target = ctx.saved_tensors
    # A frozen LM head (LoRA) needs no weight gradient: skipping it saves a [V, D] buffer.
    weight_grad = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    grad_h, grad_weight, grad_bias = linear_cross_entropy_backward(
        grad, h, weight, bias, target, *ctx.options, weight_grad
    )
    return (
        grad_h,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if bias is not None and ctx.needs_input_grad[2] else None,
        None, None, None, None, None,
    )


linear_cross_entropy.register_autograd(
    _linear_cross_entropy_grad, setup_context=_linear_cross_entropy_setup
)
