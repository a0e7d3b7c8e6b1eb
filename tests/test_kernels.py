"""lemo's Triton kernels against their pure-torch references, through the ops, forward and backward.

Each test runs twice: "reference" (the ops' pure-torch branch) and "triton" (the ops forced onto
their Triton launchers). Without CUDA the kernels run in Triton's interpreter on CPU tensors
(`TRITON_INTERPRET=1`, set by conftest); the `cuda` cases run the compiled kernels on the GPU.
The expected values come from plain PyTorch chains (float64 where rounding would blur the check).

bf16 tolerances: the interpreter truncates float32 -> bf16 where the GPU rounds to nearest, so each
bf16 rounding in a chain may land one bf16 step (up to 2^-7 relative) off PyTorch's; the norm's
output goes through two (the normalised rows, then the product with the weight).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lemo_compile import ops
from lemo_compile.kernels import HAS_TRITON, interpreting
from lemo_compile.kernels import lm_loss as lm_loss_kernels
from reference import oracle_block_scores

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
BF16_TOL = {"rtol": 2e-2, "atol": 1e-2}


@pytest.fixture(params=["reference", "triton"])
def path(request, monkeypatch):
    """Which branch the ops take; "triton" forces the Triton launchers on any device."""
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.fail("Triton is not installed: the kernel tests need it (pip install triton)")
        if request.node.callspec.params["device"] == "cpu" and not interpreting():
            pytest.skip("Triton kernels take CPU tensors only in the interpreter (TRITON_INTERPRET=1)")
        monkeypatch.setattr(ops, "use_triton", lambda *tensors: True)
        monkeypatch.setattr(lm_loss_kernels, "kernel_supports",
                            lambda h, logits_dtype: logits_dtype == torch.float32)
    return request.param


def _token_indices(batch: int, seq_len: int, kept: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randperm(seq_len, generator=generator)[:kept].sort().values for _ in range(batch)]
    )


# ---------------------------------------------------------------------------------- block scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq_len, head_dim, block",
    [
        (1, 2, 2, 1, 16, 64),
        (2, 2, 1, 7, 16, 16),
        (1, 4, 2, 63, 24, 16),
        (2, 4, 2, 65, 24, 64),
        (1, 3, 1, 1000, 40, 64),
        (2, 2, 2, 300, 16, 32),
        (1, 2, 1, 520, 16, 128),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_scores(path, device, batch, heads, kv_heads, seq_len, head_dim, block, dtype):
    torch.manual_seed(seq_len + heads)
    # q in the layout the model produces ([B, S, H, d] transposed): not contiguous
    q = torch.randn(batch, seq_len, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, dtype=dtype, device=device)
    got = ops.block_scores(q, k, block)
    want = oracle_block_scores(q.double(), k.double(), block)
    assert got.shape == (batch, seq_len // block) and got.dtype == torch.float32
    # bf16 inputs are exact in the products' fp32 accumulation; only summation order differs
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- row kernels

ROW_SHAPES = [  # batch, seq_len, width, kept
    (1, 1, 7, 1),
    (2, 7, 24, 3),
    (1, 63, 64, 63),
    (3, 65, 100, 20),
    (2, 1000, 48, 400),
]


def _x_and_rows(batch, seq_len, width, kept, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, width, generator=generator).to(dtype).to(device)
    rows = torch.randn(batch, kept, width, generator=generator).to(dtype).to(device)
    return x, _token_indices(batch, seq_len, kept, seed).to(device), rows


def _plain_gather(x, idx):
    return torch.stack([x[b if x.shape[0] > 1 else 0, idx[b]] for b in range(idx.shape[0])])


def _plain_scatter_add(x, idx, rows):
    out = x.clone()
    for b in range(idx.shape[0]):
        out[b, idx[b]] += rows[b].to(x.dtype)
    return out


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), **BF16_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, seq_len, width, kept", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows(path, device, batch, seq_len, width, kept, dtype):
    x, idx, _ = _x_and_rows(batch, seq_len, width, kept, dtype, device)
    x.requires_grad_(True)
    got = ops.gather_rows(x, idx)
    assert torch.equal(got, _plain_gather(x.detach(), idx))  # a copy: exact
    grad = torch.randn_like(got)
    got.backward(grad)
    want = torch.zeros_like(x)
    for b in range(batch):
        want[b, idx[b]] = grad[b]
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_rows_broadcasts_batch_one(path, device):
    """cos / sin tables come with batch 1 (or a stride-0 batch) and are gathered per sample."""
    table = torch.randn(1, 70, 24, device=device)
    idx = _token_indices(3, 70, 10, seed=2).to(device)
    want = _plain_gather(table, idx)
    assert torch.equal(ops.gather_rows(table, idx), want)
    assert torch.equal(ops.gather_rows(table.expand(3, 70, 24), idx), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, seq_len, width, kept", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_add_rows(path, device, batch, seq_len, width, kept, dtype):
    x, idx, rows = _x_and_rows(batch, seq_len, width, kept, dtype, device, seed=1)
    x.requires_grad_(True)
    rows.requires_grad_(True)
    got = ops.scatter_add_rows(x, idx, rows)
    _close(got, _plain_scatter_add(x.detach(), idx, rows.detach()), dtype)
    untouched = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    untouched.scatter_(1, idx, False)
    assert torch.equal(got[untouched], x.detach()[untouched])  # eliminated rows pass through exactly
    grad = torch.randn_like(got)
    got.backward(grad)
    assert torch.equal(x.grad, grad)
    assert torch.equal(rows.grad, _plain_gather(grad, idx))


def _plain_rms_norm(x, weight, eps):
    """Hugging Face's LlamaRMSNorm, written out."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, seq_len, width, kept", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rms_norm(path, device, batch, seq_len, width, kept, dtype):
    x, idx, _ = _x_and_rows(batch, seq_len, width, kept, dtype, device, seed=2)
    weight = (1 + 0.1 * torch.randn(width, device=device)).to(dtype)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    y, rows, rstd = ops.gather_rms_norm(x, idx, weight, 1e-5)
    refs = {}
    for ref_dtype in (dtype, torch.float64):  # PyTorch's own chain, and the float64 truth
        x_ref = x.detach().to(ref_dtype).requires_grad_(True)
        weight_ref = weight.detach().to(ref_dtype).requires_grad_(True)
        y_ref = _plain_rms_norm(_plain_gather(x_ref, idx), weight_ref, 1e-5)
        refs[ref_dtype] = (y_ref, x_ref, weight_ref)
    assert torch.equal(rows, _plain_gather(x.detach(), idx))
    assert rstd.shape == (batch, kept, 1) and rstd.dtype == torch.float32
    _close(y, refs[dtype][0].detach(), dtype)
    grad = torch.randn_like(y)
    y.backward(grad)
    for y_ref, _, _ in refs.values():
        y_ref.backward(grad.to(y_ref.dtype))
    truth = refs[torch.float64]
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad.double(), truth[1].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weight.grad.double(), truth[2].grad, rtol=1e-5, atol=1e-5)
    else:  # no further from the truth than PyTorch's bf16 chain (which rounds more often)
        for got, plain, exact in ((x.grad, refs[dtype][1].grad, truth[1].grad),
                                  (weight.grad, refs[dtype][2].grad, truth[2].grad)):
            scale = exact.abs().max()
            assert (got.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-3 * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, seq_len, width, kept", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_layer_norm(path, device, batch, seq_len, width, kept, dtype):
    x, idx, _ = _x_and_rows(batch, seq_len, width, kept, dtype, device, seed=3)
    x = (x + 0.5).requires_grad_(True)  # a non-zero mean, so centring matters
    weight = (1 + 0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_(True)
    bias = (0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_(True)
    y, rows, mean, rstd = ops.gather_layer_norm(x, idx, weight, bias, 1e-5)
    assert torch.equal(rows, _plain_gather(x.detach(), idx))
    assert mean.shape == rstd.shape == (batch, kept, 1)
    refs = {}
    for ref_dtype in (dtype, torch.float64):  # PyTorch's own layer_norm, and the float64 truth
        leaves = [t.detach().to(ref_dtype).requires_grad_(True) for t in (x, weight, bias)]
        y_ref = F.layer_norm(_plain_gather(leaves[0], idx), (width,), leaves[1], leaves[2], 1e-5)
        refs[ref_dtype] = (y_ref, leaves)
    _close(y, refs[dtype][0].detach(), dtype)
    grad = torch.randn_like(y)
    y.backward(grad)
    for y_ref, _ in refs.values():
        y_ref.backward(grad.to(y_ref.dtype))
    for got, plain, exact in zip((x, weight, bias), refs[dtype][1], refs[torch.float64][1], strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(got.grad.double(), exact.grad, rtol=1e-5, atol=1e-5)
        else:  # no further from the truth than PyTorch's bf16 layer_norm
            scale = exact.grad.abs().max()
            error = (got.grad.double() - exact.grad).abs().max()
            assert error <= 2 * (plain.grad.double() - exact.grad).abs().max() + 1e-3 * scale


# ------------------------------------------------------------------------------- segmented loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "rows, width, vocab, segment", [(1, 8, 7, 4), (7, 16, 100, 3), (65, 24, 5000, 64), (200, 8, 4097, 48)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy(path, device, rows, width, vocab, segment, dtype):
    generator = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, width, generator=generator).to(dtype).to(device).requires_grad_(True)
    weight = (0.3 * torch.randn(vocab, width, generator=generator)).to(dtype).to(device)
    weight.requires_grad_(True)
    target = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    target[1::3] = -100
    loss = ops.linear_cross_entropy(h, weight, None, target, -100, "mean", segment, torch.float32)
    h_ref = h.detach().clone().requires_grad_(True)
    weight_ref = weight.detach().clone().requires_grad_(True)
    loss_ref = F.cross_entropy(F.linear(h_ref, weight_ref).float(), target, ignore_index=-100)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    loss_ref.backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(h.grad, h_ref.grad, **tol)
    torch.testing.assert_close(weight.grad, weight_ref.grad, **tol)
    assert not math.isnan(loss.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_with_row_weights(path, device, reduction):
    """Row weights scale each row's loss and gradient; "mean" is the weighted mean over the rows
    with a target (a weight of 0 drops a row as an ignored target does)."""
    generator = torch.Generator().manual_seed(11)
    h = torch.randn(65, 24, generator=generator).to(device).requires_grad_(True)
    weight = (0.3 * torch.randn(5000, 24, generator=generator)).to(device).requires_grad_(True)
    target = torch.randint(0, 5000, (65,), generator=generator).to(device)
    target[::7] = -100
    row_weight = torch.rand(65, generator=generator).to(device)
    row_weight[1::5] = 0.0
    loss = ops.linear_cross_entropy(h, weight, None, target, -100, reduction, 16, torch.float32,
                                    row_weight)
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, weight)]
    terms = F.cross_entropy(F.linear(*leaves), target, ignore_index=-100, reduction="none")
    want = (terms * row_weight).sum()
    if reduction == "mean":
        want = want / (row_weight * (target != -100)).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    want.backward()
    for got, expected in zip((h, weight), leaves, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_ignores_autocast(path, device):
    """The op computes in its operands' dtypes under autocast too (the segmented-loss pass hands it
    operands already cast as autocast cast the head): the same loss and gradients, in float32."""
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(65, 24, generator=generator).to(device)
    weight = (0.3 * torch.randn(5000, 24, generator=generator)).to(device)
    target = torch.randint(0, 5000, (65,), generator=generator).to(device)
    results = []
    for autocast in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (h, weight)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = ops.linear_cross_entropy(*leaves, None, target, -100, "mean", 16, torch.float32)
        loss.backward()
        results.append([loss, *(t.grad for t in leaves)])
    for plain, autocast in zip(*results, strict=True):
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ SwiGLU backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (63, 65), (2, 1000, 48), (3, 2049)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_swiglu_backward_in_place(path, device, shape, dtype, contiguous):
    """lemo.swiglu_backward_ writes autograd's gradients of silu(gate) * up over gate and up."""
    generator = torch.Generator().manual_seed(sum(shape))
    gate, up, grad = (3 * torch.randn(shape, generator=generator) for _ in range(3))
    if not contiguous:  # a transposed layout: the kernel walks flat arrays, so the op falls back
        gate, up, grad = (t.mT.contiguous().mT if t.dim() > 1 else t[::1] for t in (gate, up, grad))
    gate, up, grad = (t.to(device=device, dtype=dtype) for t in (gate, up, grad))
    gate_ref = gate.clone().requires_grad_(True)
    up_ref = up.clone().requires_grad_(True)
    (F.silu(gate_ref) * up_ref).backward(grad)
    ops.swiglu_backward_(gate, up, grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(gate, gate_ref.grad, **tol)
    torch.testing.assert_close(up, up_ref.grad, **tol)
