"""Per-layer compilation (`compile_decoder_layers`): each decoder layer compiled on its own, the
layers planned as in a whole-model compile, checked against the eager reference."""

from __future__ import annotations

import pytest
import torch
from conftest import grads, tiny_llama, token_batch
from reference import lemo_forward, lemo_forward_padded

import lemo_compile
from lemo_compile.layerwise import decoder_layers, layer_groups

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

AOT = {"compiler": "aot_eager", "loss_segment": None}


def _step(model, ids, labels=None, **kwargs):
    """Loss and parameter gradients of one forward and backward of `model`; no gradients left."""
    loss = model(input_ids=ids, labels=ids if labels is None else labels, **kwargs).loss
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), got


def _assert_step_matches(model, ids, reference, tol=1e-4, **kwargs):
    """One step of `model` (its layers compiled) against `reference()` -> (logits, loss), the eager
    reference on the same model: loss and every parameter gradient within `tol`."""
    loss, got = _step(model, ids, **kwargs)
    _, want_loss = reference()
    want_loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=tol, atol=tol)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("mlp", ["off", "tokens"])
def test_layers_compiled_one_by_one_match_the_reference(mlp):
    model = tiny_llama(layers=6)
    ids = token_batch(2, 320)
    backends = lemo_compile.compile_decoder_layers(model, {**AOT, "mlp": mlp})
    # the defaults: layers 0-2 and 5 dense, 3-4 sparse: two graphs
    assert [b.layer_group.layers for b in backends] == [(0, 1, 2, 5), (3, 4)]
    _assert_step_matches(model, ids, lambda: lemo_forward(model, ids, ids, mlp=mlp))
    reports = [r for b in backends for r in b.reports if r.training]
    assert len(reports) == 2
    sparse = {p.layer: p for r in reports for p in r.plans if p.sparse}
    assert sorted(sparse) == [3, 4] and all(p.kept_tokens == 2 * 64 for p in sparse.values())
    assert {p.layer for r in reports for p in r.plans} == set(range(6))
    if mlp == "tokens":
        assert all(p.mlp_sparse for p in sparse.values())
    assert not [w for r in reports for w in r.warnings]


def test_a_second_step_does_not_recompile():
    model = tiny_llama(layers=4)
    ids = token_batch(1, 256)
    backends = lemo_compile.compile_decoder_layers(model, AOT)
    for _ in range(3):
        _step(model, ids)
    assert [len(b.reports) for b in backends] == [1, 1]


def test_gradient_checkpointing_inside_each_layer():
    model = tiny_llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_batch(2, 256)
    backends = lemo_compile.compile_decoder_layers(model, AOT)
    _assert_step_matches(model, ids, lambda: lemo_forward(model, ids, ids))
    assert sum(r.counters.get("sparse_layers", 0) for b in backends for r in b.reports) == 1


def test_checkpointed_layers_save_the_attention_of_the_layers_listed():
    model = tiny_llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_batch(2, 256)
    backends = lemo_compile.compile_decoder_layers(model, {**AOT, "save_attention": [1, 2]})
    _assert_step_matches(model, ids, lambda: lemo_forward(model, ids, ids))
    saved = {layer: report.counters.get("saved_attention", 0)
             for backend in backends for report in backend.reports if report.training
             for layer in backend.layer_group.layers}
    assert saved == {0: 0, 1: 1, 2: 1, 3: 0}


def test_padded_batches_keep_each_row_as_alone():
    model = tiny_llama(layers=4)
    ids = token_batch(2, 256)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 40] = -100
    lemo_compile.compile_decoder_layers(model, AOT)
    _assert_step_matches(model, ids, lambda: lemo_forward_padded(model, ids, mask, labels),
                         labels=labels, attention_mask=mask)


def test_groups_follow_the_plan():
    config = lemo_compile.LemoConfig(keep_ratio=(1.0, 1.0, 0.5, 0.3, 0.3, 1.0), dense_layers=())
    assert [g.layers for g in layer_groups(config, 6)] == [(0, 1, 5), (2,), (3, 4)]
    saving = lemo_compile.LemoConfig(save_attention=[1])  # dense layers 0, 1 and 3
    assert [g.layers for g in layer_groups(saving, 4)] == [(0, 3), (1,), (2,)]
    saving_dense = lemo_compile.LemoConfig(save_attention="dense")
    assert [g.layers for g in layer_groups(saving_dense, 4)] == [(0, 1, 3), (2,)]
    seeded = lemo_compile.LemoConfig(scorer="random", seed=3)
    assert [g.layers for g in layer_groups(seeded, 3)] == [(0,), (1,), (2,)]


def test_errors():
    with pytest.raises(ValueError, match="no decoder layers found"):
        decoder_layers(torch.nn.Linear(2, 2))
    model = tiny_llama(layers=10)
    with pytest.raises(ValueError, match="recompile_limit"):
        lemo_compile.compile_decoder_layers(model, {"scorer": "random", "seed": 0})
    with pytest.raises(ValueError, match="not within"):
        lemo_compile.LayerGroup((4,), 4)
    with pytest.raises(ValueError, match="dropped_loss_weight"):
        lemo_compile.compile_decoder_layers(tiny_llama(), {"dropped_loss_weight": 0.5})


def test_a_whole_model_graph_of_one_layer_says_what_to_use():
    model = tiny_llama(layers=2)
    backend = lemo_compile.LemoBackend(AOT)
    layer = model.model.layers[0]
    compiled = torch.compile(layer, backend=backend)
    h = torch.randn(1, 128, 64, requires_grad=True)
    cos_sin = model.model.rotary_emb(h, torch.arange(128)[None])
    compiled(h, position_embeddings=cos_sin)[0].sum().backward()
    (report,) = backend.reports
    assert any("compile_decoder_layers" in w for w in report.warnings)
