"""The post-grad fusion pass: what it matches in the forward and backward graphs, and that the
fused graph computes what the unfused one does (on the CPU, through the ops' torch branch)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch.fx.experimental.proxy_tensor import make_fx

import lemo_compile
from conftest import tiny_llama, tiny_opt, token_batch
from lemo_compile.passes.fuse import fuse_row_movements
from lemo_compile.tags import Role, tag


def _train_step(model, ids, **options):
    backend = lemo_compile.LemoBackend(
        {"compiler": "aot_eager", "block_size": 16, "dense_layers": [0], **options}
    )
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch._dynamo.reset()
    return out.loss.detach(), grads, backend.reports[-1]


@pytest.mark.parametrize("dtype, batch, seq_len", [(torch.float32, 1, 150), (torch.bfloat16, 3, 64)])
def test_fusion_matches_and_changes_nothing(dtype, batch, seq_len):
    model = tiny_llama(dtype=dtype)
    ids = token_batch(batch, seq_len)
    plain_loss, plain_grads, plain = _train_step(model, ids, fuse=False)
    loss, grads, report = _train_step(model, ids)
    sparse = report.counters["sparse_layers"]
    assert sparse == 3
    # forward: one gather + RMSNorm and one residual scatter-add per sparse layer;
    # backward: one zero-padded scatter folded into the residual gradient per sparse layer
    assert report.counters["fused_gather_norm"] == sparse
    assert report.counters["fused_scatter_add"] == sparse
    assert report.counters["folded_zero_scatter"] == sparse
    assert report.counters["fused_gather"] >= 3 * sparse  # cos, sin (forward), the output grad
    assert not any(k.startswith("fused") or k.startswith("folded") for k in plain.counters)
    # On the CPU the fused ops run the same torch computations: results are identical.
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name


@pytest.mark.parametrize("dtype, mlp", [(torch.float32, "off"), (torch.bfloat16, "tokens")])
def test_layer_norm_fusion_on_opt(dtype, mlp):
    """OPT's blocks start with a LayerNorm: gather + LayerNorm -> lemo.gather_layer_norm, also in
    its MLP blocks, which norm the rows viewed as [B * K, D] (the op's torch branch on the CPU
    computes the statistics its own way: equal to rounding)."""
    model = tiny_opt(dtype=dtype)
    ids = token_batch(2, 150)
    plain_loss, plain_grads, _ = _train_step(model, ids, fuse=False, loss_segment=None, mlp=mlp)
    loss, grads, report = _train_step(model, ids, loss_segment=None, mlp=mlp)
    blocks = report.counters["sparse_layers"] + report.counters.get("mlp_sparse_layers", 0)
    assert blocks == (3 if mlp == "off" else 6)
    assert report.counters["fused_gather_norm"] == blocks
    assert report.graphs["post_grad_forward"].count("lemo.gather_layer_norm.default(") == blocks
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(loss, plain_loss, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **tol, msg=name)


def test_fused_graphs_keep_no_lemo_gather_or_scatter():
    model = tiny_llama()
    _, _, report = _train_step(model, token_batch(2, 100))
    forward, backward = report.graphs["post_grad_forward"], report.graphs["post_grad_backward"]
    assert forward.count("torch.ops.lemo.gather_rms_norm.default(") == 3
    assert forward.count("torch.ops.lemo.scatter_add_rows.default(") == 3
    assert backward.count("torch.ops.lemo.scatter_add_rows.default(") == 3
    for code in (forward, backward):
        assert "aten.scatter_add" not in code
        # token-row gathers (dim 1) are all fused, and no mask is gathered on dims 2 and 3: the
        # causal mask became is_causal=True
        assert re.search(r"aten\.gather\.default\([^,]+, 1,", code) is None
        assert re.search(r"aten\.gather\.default\([^,]+, [23],", code) is None


def test_model_without_sparse_layers_is_untouched():
    model = tiny_llama()
    _, _, report = _train_step(model, token_batch(1, 100), dense_layers=[0, 1, 2, 3])
    assert report.counters["sparse_layers"] == 0
    assert not any(k.startswith("fused") or k.startswith("folded") for k in report.counters)


def test_user_gathers_and_scatters_are_left_alone():
    """Only chains indexed by lemo's own selection (distinct, sorted indices) are rewritten."""

    def user_code(x, index, rows):
        expanded = index[:, :, None].expand(-1, -1, x.shape[2])
        return x.gather(1, expanded), torch.zeros_like(x).scatter_add(1, expanded, rows) + x

    x, rows = torch.randn(2, 10, 4), torch.randn(2, 3, 4)
    index = torch.tensor([[1, 1, 2], [0, 5, 5]])  # duplicates: a scatter-add must accumulate
    graph_module = make_fx(user_code)(x, index, rows)
    counters = fuse_row_movements(graph_module.graph)
    graph_module.recompile()
    assert counters == {}
    want = user_code(x, index, rows)
    got = graph_module(x, index, rows)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _rms_norm(rows, weight):  # Hugging Face's LlamaRMSNorm
    h = rows.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * h.to(rows.dtype)


def _gemma_rms_norm(rows, weight):  # Gemma's: `1 + weight`, multiplied on the right (float32)
    h = rows.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (h * (1.0 + weight.float())).type_as(rows)


def _layer_norm(rows, weight, bias):
    return torch.nn.functional.layer_norm(rows, rows.shape[-1:], weight, bias, 1e-5)


def _flat_layer_norm(rows, weight, bias):  # OPT's MLP blocks
    return _layer_norm(rows.reshape(-1, rows.shape[-1]), weight, bias)


@pytest.mark.parametrize("inductor_views", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, op, arity", [(_rms_norm, "gather_rms_norm", 1),
                                             (_gemma_rms_norm, "gather_rms_norm", 1),
                                             (_layer_norm, "gather_layer_norm", 2),
                                             (_flat_layer_norm, "gather_layer_norm", 2)])
def test_norms_after_a_gather_as_torch_decomposes_them_are_fused(inductor_views, dtype, norm, op,
                                                                 arity):
    """The patterns follow the installed torch: each norm as a model writes it, traced through
    Inductor's decompositions after a gather at lemo's selection, becomes the fused op (Gemma's
    only in float32, where no cast stands between the norm and its weight), with the same result;
    also with the views made reshapes, as Inductor makes them before its post-grad passes."""

    def chain(x, idx, *params):
        rows = x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))
        return norm(rows, *params)

    x = torch.randn(2, 10, 8, dtype=dtype)
    idx = torch.tensor([[0, 3, 4], [1, 2, 9]])
    params = [torch.rand(8, dtype=dtype) + 0.5 for _ in range(arity)]
    graph_module = make_fx(chain, select_decomp_table(), tracing_mode="fake")(x, idx, *params)
    if inductor_views:
        view_to_reshape(graph_module)
    # the tags selection gives these nodes
    tag(graph_module.graph.find_nodes(op="placeholder")[1], Role.SELECT)
    tag(graph_module.graph.find_nodes(op="call_function", target=torch.ops.aten.gather.default)[0],
        Role.GATHER)
    counters = fuse_row_movements(graph_module.graph)
    graph_module.recompile()
    fused = norm is not _gemma_rms_norm or dtype == torch.float32
    assert counters == ({"fused_gather_norm": 1} if fused else {"fused_gather": 1})
    assert (f"lemo.{op}.default" in graph_module.code) == fused
    torch.testing.assert_close(graph_module(x, idx, *params), chain(x, idx, *params))


def test_sparse_block_does_not_keep_its_residual_input_alive():
    """Why the residual add stays out of place (the paper adds into x in place): AOTAutograd's
    partitioner saves the gathered rows of a sparse block for backward, not its input x, so x dies
    at the scatter-add and an in-place add would save no memory, only bandwidth."""
    model = tiny_llama()
    _, _, report = _train_step(model, token_batch(1, 160))
    forward = report.graphs["post_grad_forward"]
    inputs = re.findall(r"torch\.ops\.lemo\.scatter_add_rows\.default\((\w+), ", forward)
    saved = re.search(r"return \((.*)\)", forward).group(1).replace(" ", "").split(",")
    assert len(inputs) == 3
    assert not set(inputs) & set(saved)
    # what is saved instead: the kept rows and 1/rms from each fused gather + norm
    fused = re.findall(r"(getitem_\d+) = gather_rms_norm_default(?:_\d+)?\[[12]\]", forward)
    assert len(fused) == 2 * 3 and set(fused) <= set(saved)
