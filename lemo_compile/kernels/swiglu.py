"""The SwiGLU MLP's backward (Llama, Mistral, Qwen: `down(silu(gate) * up)`), written over its inputs.

Shapes: gate, up and grad share one shape [..., I] and dtype; grad is the gradient of
`silu(gate) * up`. Numerics: those of PyTorch's autograd on Hugging Face's MLP in gate's dtype
(and of the graph Inductor compiles for it): silu computed in float32, as x / (1 + exp(-x)) like
ATen's kernel, and rounded to gate's dtype; `grad * up` rounded to it before silu's backward;
every other step in float32.

* `swiglu_backward_reference(gate, up, grad) -> (d_gate, d_up)`, new tensors.
* `swiglu_backward_in_place_triton(gate, up, grad)`: the same values, d_gate written over gate and
  d_up over up, one pass over the three tensors. Written in place, the backward allocates nothing:
  where gate and up die (a checkpointed layer's recomputed MLP), it holds three [..., I] tensors at
  once instead of four.
"""

from __future__ import annotations

import torch

from lemo_compile.kernels import HAS_TRITON, launch, tl, triton

_BLOCK = 1024


def triton_supports(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors: one shape and dtype, all contiguous (it walks them
    as flat arrays)."""
    return (HAS_TRITON and gate.shape == up.shape == grad.shape
            and gate.dtype == up.dtype == grad.dtype
            and all(t.is_contiguous() for t in (gate, up, grad)))


def swiglu_backward_reference(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of `silu(gate) * up` given `grad`, in gate's dtype."""
    gate32 = gate.float()
    sigmoid = torch.sigmoid(gate32)
    d_up = grad * (gate32 / (1 + torch.exp(-gate32))).to(gate.dtype)
    d_act = (grad * up).float()
    d_gate = d_act * sigmoid * (1 + gate32 * (1 - sigmoid))
    return d_gate.to(gate.dtype), d_up


def swiglu_backward_in_place_triton(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> None:
    """gate <- d gate, up <- d up (see `swiglu_backward_reference`); needs `triton_supports`."""
    numel = gate.numel()
    if numel:
        launch(_swiglu_backward_kernel)[(triton.cdiv(numel, _BLOCK),)](
            gate, up, grad, numel, BLOCK=_BLOCK, num_warps=4,
        )


if HAS_TRITON:

    @triton.jit
    def _swiglu_backward_kernel(gate_ptr, up_ptr, grad_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        dtype = gate.dtype
        gate32 = gate.to(tl.float32)
        sigmoid = tl.sigmoid(gate32)
        act = (gate32 / (1.0 + tl.exp(-gate32))).to(dtype).to(tl.float32)
        d_up = grad.to(tl.float32) * act
        d_act = (grad.to(tl.float32) * up.to(tl.float32)).to(dtype).to(tl.float32)
        d_gate = d_act * sigmoid * (1.0 + gate32 * (1.0 - sigmoid))
        tl.store(gate_ptr + offsets, d_gate.to(dtype), mask=mask)
        tl.store(up_ptr + offsets, d_up.to(dtype), mask=mask)
