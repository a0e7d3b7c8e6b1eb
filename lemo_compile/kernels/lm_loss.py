"""Segmented LM head + cross-entropy (README.md, "Semantics": segmented loss): the N x V logits
never exist at once.

Rows are processed `segment` at a time, and each segment's gradients are computed right away, in
the forward, while its logits exist: the loss is the graph's last step, so its gradient is known up
to the upstream scalar, which the backward multiplies in. Nothing is recomputed, so the segmented
loss does the matmuls of the unsegmented one (forward and input gradient, plus the weight gradient
when the weight trains) with memory for one segment's logits.

Numerics follow the unsegmented chain
`F.cross_entropy(F.linear(h, W, b).to(logits_dtype), target, ignore_index=...)`: the matmul runs in
h's dtype, the softmax in `logits_dtype`, and the logits' gradient is cast to h's dtype before the
gradient matmuls, as autograd does for that chain. (With an upstream gradient other than 1 the
product is rounded once more, in h's dtype.) Optional per-row weights (lemo's
`dropped_loss_weight`) scale each row's loss and gradient; the mean is then the weighted mean.

Two implementations of the softmax part, selected by `kernel`:

* pure torch: per segment the logits in h's dtype, a `logits_dtype` copy and the temporary of
  `logsumexp` (about 2.6 GB for 2,048 rows of a 128K vocabulary in bf16 -> fp32);
* Triton (CUDA, fp32 softmax): one kernel per segment computes each row's logsumexp online and its
  loss, then overwrites the logits with their gradient in place; the segment holds its logits only
  (512 MB for 2,048 rows of a 128K vocabulary in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lemo_compile.kernels import HAS_TRITON, launch, tl, triton


def kernel_supports(h: torch.Tensor, logits_dtype: torch.dtype) -> bool:
    """Whether the Triton path applies: CUDA tensors, Triton, and an fp32 softmax."""
    return HAS_TRITON and h.is_cuda and logits_dtype == torch.float32


def linear_cross_entropy_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    segment: int,
    logits_dtype: torch.dtype,
    h_grad: bool = False,
    weight_grad: bool = False,
    kernel: bool = False,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss, dloss/dh, dloss/dW, dloss/db) of rows h [N, D] against target [N].

    row_weight: None, or [N] float32 weights >= 0: row r's loss (and gradient) counts row_weight[r]
    times, and "mean" divides by the sum of the weights of the rows with a target instead of
    their number.
    reduction "mean" divides by the number of targets != ignore_index (NaN when there are none, like
    torch, whose gradients are then zero, also like torch) or "sum". The loss is a `logits_dtype`
    scalar. dh [N, D] is computed when `h_grad`; dW [V, D] and db [V] (when there is a bias) when
    `weight_grad`; the others are None.
    `kernel`: the Triton softmax (see `kernel_supports`).
    """
    weights = (target != ignore_index).to(torch.float32)
    if row_weight is not None:
        weights = weights * row_weight.to(torch.float32)
    total_weight = weights.sum()
    if reduction == "mean":
        # With no label to count the loss is NaN (0 / 0, like torch) but the gradients are zero:
        # every row's gradient is masked out, and 1 / 0 would turn that 0 into NaN.
        scale = torch.where(total_weight > 0, total_weight, 1.0).to(logits_dtype).reciprocal()
    else:
        scale = torch.ones((), dtype=logits_dtype, device=h.device)
    wants_grad = h_grad or weight_grad
    grad_h = torch.empty_like(h) if h_grad else None
    grad_weight = torch.zeros_like(weight) if weight_grad else None
    grad_bias = torch.zeros_like(bias) if weight_grad and bias is not None else None
    total = torch.zeros((), dtype=logits_dtype, device=h.device)
    for start in range(0, h.shape[0], segment):
        rows = h[start : start + segment]
        classes = _safe_classes(target[start : start + segment], ignore_index)
        row_weights = weights[start : start + segment]
        logits = F.linear(rows, weight, bias)
        if kernel:
            losses = _loss_and_grad_triton_(logits, classes, row_weights, scale, wants_grad)
            grad_logits = logits  # overwritten in place when wants_grad
        else:
            losses, grad_logits = _loss_and_grad_torch(logits, classes, row_weights, scale,
                                                       logits_dtype, wants_grad)
        total = total + losses.sum()
        if grad_h is not None:
            torch.mm(grad_logits, weight, out=grad_h[start : start + segment])
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), rows)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(dim=0)
        del logits, grad_logits
    loss = total / total_weight.to(logits_dtype) if reduction == "mean" else total
    return loss, grad_h, grad_weight, grad_bias


def _safe_classes(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels with ignored rows set to class 0, safe to index with (their weight is 0)."""
    return torch.where(labels != ignore_index, labels, 0)


def _loss_and_grad_torch(logits, classes, weights, scale, logits_dtype, wants_grad):
    """Per-row weighted losses [R] and, when wanted, the logits' gradient in logits' dtype (else
    None); weights [R] float32, 0 for ignored rows."""
    z = logits.to(logits_dtype)
    lse = z.logsumexp(dim=1)
    weights = weights.to(logits_dtype)
    losses = (lse - z.gather(1, classes[:, None])[:, 0]) * weights
    if not wants_grad:
        return losses, None
    probs = z.sub_(lse[:, None]).exp_()  # softmax in place (z may be logits, not needed after)
    probs[torch.arange(z.shape[0], device=z.device), classes] -= 1
    return losses, probs.mul_(weights[:, None] * scale).to(logits.dtype)


# ------------------------------------------------------------------------------------ Triton path

_BLOCK_V = 4096


def _loss_and_grad_triton_(
    logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor,
    wants_grad: bool,
) -> torch.Tensor:
    """Per-row weighted losses [R] (float32); with `wants_grad`, logits [R, V] is overwritten with
    (softmax - onehot(classes)) * weights * scale, in its own dtype (weights [R] float32)."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        launch(_loss_and_grad_kernel)[(rows,)](
            logits, classes, weights, scale, losses, logits.stride(0),
            VOCAB=vocab, BLOCK_V=_BLOCK_V, GRAD=wants_grad, num_warps=8,
        )
    return losses


if HAS_TRITON:

    @triton.jit
    def _loss_and_grad_kernel(
        logits_ptr, classes_ptr, weight_ptr, scale_ptr, losses_ptr, stride,
        VOCAB: tl.constexpr, BLOCK_V: tl.constexpr, GRAD: tl.constexpr,
    ):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride
        # Online logsumexp, one running (max, sum) per lane; a finite start: no lane sees inf - inf.
        lane_max = tl.full((BLOCK_V,), -3.0e38, dtype=tl.float32)
        lane_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, VOCAB, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            v = tl.load(row_ptr + cols, mask=cols < VOCAB, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, v)
            lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(v - new_max)
            lane_max = new_max
        top = tl.max(lane_max, axis=0)
        lse = top + tl.log(tl.sum(lane_sum * tl.exp(lane_max - top), axis=0))
        target = tl.load(classes_ptr + row)
        row_weight = tl.load(weight_ptr + row)
        picked = tl.load(row_ptr + target).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(row_weight != 0, row_weight * (lse - picked), 0.0))
        if GRAD:
            factor = row_weight * tl.load(scale_ptr).to(tl.float32)
            for start in range(0, VOCAB, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < VOCAB
                v = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                grad = (tl.exp(v - lse) - tl.where(cols == target, 1.0, 0.0)) * factor
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)
