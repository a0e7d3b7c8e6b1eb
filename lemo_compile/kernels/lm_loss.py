"""Segmented LM head + cross-entropy (LEMO.md, "Loss"): the N x V logits never exist at once.

Rows are processed `segment` at a time; the backward recomputes each segment's logits instead of
saving them, so the extra memory is O(segment x V) in both passes. Numerics follow the unsegmented
chain `F.cross_entropy(F.linear(h, W, b).to(logits_dtype), target, ignore_index=...)`: the matmul runs
in h's dtype, the softmax in `logits_dtype`, and the gradient of the logits is cast back to h's
dtype before the two matmuls of the backward, as autograd does for that chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segments(rows: int, segment: int) -> range:
    return range(0, rows, segment)


def _segment_logits(h, weight, bias, logits_dtype):
    return F.linear(h, weight, bias).to(logits_dtype)


def linear_cross_entropy_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
) -> torch.Tensor:
    """Loss (a `logits_dtype` scalar) of rows h [N, D] against target [N]; reduction "mean" or "sum".

    "mean" divides by the number of targets != ignore_index (NaN when there are none, like torch).
    """
    total = torch.zeros((), dtype=logits_dtype, device=h.device)
    for start in _segments(h.shape[0], segment):
        logits = _segment_logits(h[start : start + segment], weight, bias, logits_dtype)
        total = total + F.cross_entropy(
            logits, target[start : start + segment], ignore_index=ignore_index, reduction="sum"
        )
    if reduction == "mean":
        return total / (target != ignore_index).sum()
    return total


def linear_cross_entropy_backward_reference(
    grad: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dh [N, D], dW [V, D], db [V] or None) of the loss above, scaled by `grad`."""
    scale = grad.to(logits_dtype)
    if reduction == "mean":
        scale = scale / (target != ignore_index).sum()
    grad_h = torch.empty_like(h)
    # Accumulate the per-segment weight gradients in at least fp32: bf16 sums would drift.
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=accumulate, device=h.device)
    for start in _segments(h.shape[0], segment):
        rows = h[start : start + segment]
        labels = target[start : start + segment]
        valid = labels != ignore_index
        probs = _segment_logits(rows, weight, bias, logits_dtype).softmax(dim=-1)
        picked = torch.where(valid, labels, 0)
        probs[torch.arange(rows.shape[0], device=h.device), picked] -= valid.to(probs.dtype)
        grad_logits = (probs * (valid[:, None] * scale)).to(h.dtype)
        grad_h[start : start + segment] = grad_logits @ weight
        grad_weight += (grad_logits.t() @ rows).to(accumulate)
        if grad_bias is not None:
            grad_bias += grad_logits.to(accumulate).sum(dim=0)
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_h, grad_weight.to(weight.dtype), grad_bias
