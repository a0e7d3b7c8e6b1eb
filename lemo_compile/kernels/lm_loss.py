"""Segmented LM head + cross-entropy (LEMO.md, "Loss"): the N x V logits never exist at once.

Rows are processed `segment` at a time; the backward recomputes each segment's logits instead of
saving them. Numerics follow the unsegmented chain
`F.cross_entropy(F.linear(h, W, b).to(logits_dtype), target, ignore_index=...)`: the matmul runs in
h's dtype, the softmax in `logits_dtype`, and the gradient of the logits is cast back to h's dtype
before the matmuls of the backward, as autograd does for that chain.

Memory per segment: the logits in h's dtype and in `logits_dtype`, plus the temporary that
`logsumexp` allocates at the size of the latter (the backward's softmax then works in place), so
about 2.6 GB for 2,048 rows of a 128K vocabulary in bf16 -> fp32. The weight gradient, when the weight
needs one (not under LoRA), is accumulated in the weight's dtype by in-place matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segment_logits(h, weight, bias, logits_dtype) -> torch.Tensor:
    return F.linear(h, weight, bias).to(logits_dtype)


def _valid_targets(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [R] bool, labels with ignored rows set to class 0, safe to index with)."""
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, 0)


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
    for start in range(0, h.shape[0], segment):
        labels = target[start : start + segment]
        logits = _segment_logits(h[start : start + segment], weight, bias, logits_dtype)
        valid, classes = _valid_targets(labels, ignore_index)
        picked = logits.gather(1, classes[:, None])[:, 0]
        total = total + ((logits.logsumexp(dim=1) - picked) * valid).sum()
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
    weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dh [N, D], dW [V, D], db [V]) of the loss above, scaled by `grad`.

    dW and db are None when `weight_grad` is False or (db) there is no bias.
    """
    scale = grad.to(logits_dtype)
    if reduction == "mean":
        scale = scale / (target != ignore_index).sum()
    grad_h = torch.empty_like(h)
    grad_weight = torch.zeros_like(weight) if weight_grad else None
    grad_bias = torch.zeros_like(bias) if weight_grad and bias is not None else None
    for start in range(0, h.shape[0], segment):
        rows = h[start : start + segment]
        labels = target[start : start + segment]
        valid, classes = _valid_targets(labels, ignore_index)
        probs = _segment_logits(rows, weight, bias, logits_dtype)
        probs.sub_(probs.logsumexp(dim=1, keepdim=True)).exp_()  # softmax, in place
        probs[torch.arange(rows.shape[0], device=h.device), classes] -= valid.to(probs.dtype)
        grad_logits = probs.mul_(valid[:, None] * scale).to(h.dtype)
        del probs
        torch.mm(grad_logits, weight, out=grad_h[start : start + segment])
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), rows)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(dim=0)
    return grad_h, grad_weight, grad_bias
