"""Compute kernels, one module per family, each Triton kernel beside its pure-torch reference.

`lemo_compile.ops` calls a family's Triton launcher for CUDA tensors and its reference for all other
tensors (that is how graphs compile and run on the CPU). Triton is optional: without it every op
runs its reference. Under `TRITON_INTERPRET=1` the launchers also run on CPU tensors (Triton's
interpreter), which is how the CPU test suite checks the kernels themselves.
"""

from __future__ import annotations

import os

import torch
from torch.library import wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op body should launch its Triton kernel for these tensors (all on CUDA)."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def launch(kernel):
    """`kernel` as an op body calls it. While torch.compile traces the body (a dispatch mode is
    active), through `wrap_triton`, so that Inductor compiles the kernel into its own code; when the
    op runs eagerly (or as an opaque call from compiled code), directly: `wrap_triton`'s eager path
    costs about 0.3 ms of host time per launch, more than these kernels take on the GPU."""
    if interpreting() or not is_in_torch_dispatch_mode():
        return kernel
    return wrap_triton(kernel)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
