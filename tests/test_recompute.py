"""What activation checkpointing recomputes in lemo's layers (`passes/recompute.py`): selections are
saved, attention outputs and whole sparse layers when asked, and gradients are those of the run
without checkpointing."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import lemo_compile
from conftest import compiled_step, grads, peft_bf16_llama, tiny_llama, token_batch
from lemo_compile.passes.manager import InductorPasses
from lemo_compile.passes.recompute import save_in_checkpoints
from lemo_compile.tools.demo import saved_activation_bytes

OPTIONS = {"compiler": "aot_eager", "block_size": 16, "keep_ratio": 0.5, "dense_layers": [0],
           "loss_segment": None}
SEQ_LEN = 256


def _step(checkpointing: bool, mlp: str = "off", **options):
    """One compiled training step of a 4-layer Llama (layers 1-3 sparse): (loss, gradients,
    report)."""
    model = tiny_llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend = lemo_compile.LemoBackend({**OPTIONS, "mlp": mlp, **options})
    ids = token_batch(1, SEQ_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loss = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids).loss
    loss.backward()
    (report,) = [r for r in backend.reports if r.training]
    return loss.detach(), grads(model), report


def _scorer_ops(code: str) -> list[str]:
    """The selection's ops (sorts; the oracle's score reductions) in a post-grad graph's code."""
    return [line.strip() for line in code.splitlines() if "aten.sort" in line or "aten.amax" in line]


@pytest.mark.parametrize("mlp", ["off", "tokens"])
def test_checkpointed_layers_save_their_selection_and_keep_their_gradients(mlp):
    want_loss, want, plain_report = _step(False, mlp)
    # without checkpointing the pass has nothing to do
    assert not {"saved_selections", "saved_attention"} & set(plain_report.counters)
    for save_attention in (False, True):
        loss, got, report = _step(True, mlp, save_attention=save_attention)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)

        blocks = 3 * (2 if mlp == "tokens" else 1)  # sparse attention (and MLP) blocks
        assert report.counters["saved_selections"] == blocks
        kept = (1, SEQ_LEN // 2)  # a block's kept token indices [B, K]
        saved = [shape for shape, dtype in report.saved_for_backward.values()
                 if dtype == torch.int64]
        assert saved.count(kept) == blocks
        assert _scorer_ops(report.graphs["post_grad_backward"]) == []  # nothing re-selected
        if save_attention:
            assert report.counters["saved_attention"] == 4  # every checkpointed layer's attention
            assert "_scaled_dot_product_flash_attention_for_cpu.default" not in (
                report.graphs["post_grad_backward"])  # attention's forward is not recomputed
        else:
            assert "saved_attention" not in report.counters


def _attention_forwards(code: str) -> int:
    return code.count("aten._scaled_dot_product_flash_attention_for_cpu.default")


def test_saved_sparse_layers_are_not_recomputed():
    want_loss, want, _ = _step(False, "tokens")
    _, _, checkpointed = _step(True, "tokens")
    loss, got, report = _step(True, "tokens", save_sparse_layers=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert report.counters["saved_sparse_layers"] == 3
    # every checkpointed layer's attention is recomputed in the backward, but with the option
    # only the dense layer 0's
    assert _attention_forwards(checkpointed.graphs["post_grad_backward"]) == 4
    assert _attention_forwards(report.graphs["post_grad_backward"]) == 1
    assert "saved_sparse_layers" not in checkpointed.counters


def test_attention_is_saved_in_the_layers_listed_only():
    want_loss, want, _ = _step(False)
    loss, got, report = _step(True, save_attention=[0, 2])  # dense layer 0 and sparse layer 2
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert report.counters["saved_attention"] == 2
    # layers 1 and 3 recompute their attention in the backward
    assert _attention_forwards(report.graphs["post_grad_backward"]) == 2


def test_dense_saves_the_attention_of_the_layers_that_run_dense():
    _, _, report = _step(True, save_attention="dense")  # layer 0 dense, layers 1-3 sparse
    assert report.counters["saved_attention"] == 1
    assert _attention_forwards(report.graphs["post_grad_backward"]) == 3


def test_save_attention_layers_must_exist():
    config = lemo_compile.LemoConfig(save_attention=[1, 7])
    with pytest.raises(ValueError, match="save_attention.*names layers \\[7\\]"):
        lemo_compile.plan_layers(config, 4, SEQ_LEN)


@pytest.mark.parametrize("value", ["yes", [1.5], [-1], 3])
def test_save_attention_is_a_bool_or_layer_indices(value):
    with pytest.raises(ValueError, match="save_attention"):
        lemo_compile.LemoConfig(save_attention=value)


def test_without_saving_the_selection_the_backward_would_recompute_it(monkeypatch):
    """The baseline the pass improves on: the partitioner re-runs the scorer in the backward."""
    monkeypatch.setattr("lemo_compile.passes.recompute.SELECTION_ROLES", frozenset())
    _, _, report = _step(True)
    assert "saved_selections" not in report.counters
    assert _scorer_ops(report.graphs["post_grad_backward"])


def test_the_cache_key_covers_the_passes_settings():
    def key(attention):
        return InductorPasses([functools.partial(save_in_checkpoints, attention=attention,
                                                 sparse_layers=False, counters={})]).uuid()

    assert key(True) != key(False)
    assert key(True) == key(True)
    assert len({key(True), key((0, 2)), key((0, 3))}) == 3


@pytest.mark.parametrize("name", ["save_attention", "save_sparse_layers"])
def test_save_options_must_be_bools(name):
    with pytest.raises(ValueError, match=name):
        lemo_compile.LemoConfig(**{name: "yes"})


def _peft_bf16_step(recompute_casts: bool, checkpointing: bool = False, layers: int = 4):
    """One compiled step of `peft_bf16_llama` (layer 0 dense): (loss, gradients, training
    report)."""
    return compiled_step(peft_bf16_llama(checkpointing=checkpointing, layers=layers),
                         {**OPTIONS, "mlp": "tokens", "recompute_casts": recompute_casts},
                         seq_len=SEQ_LEN)


def _saved_float32_bytes(report, width: int) -> int:
    """Bytes of the [..., width] float32 tensors the forward saves for the backward."""
    return sum(math.prod(shape) * 4 for name, (shape, dtype) in report.saved_for_backward.items()
               if dtype == torch.float32 and shape and shape[-1] == width
               and not name.startswith("primals"))


def test_float32_copies_of_adapter_inputs_are_recomputed_not_saved():
    loss, reference, plain = _peft_bf16_step(recompute_casts=False)
    loss_recomputed, recomputed, report = _peft_bf16_step(recompute_casts=True)
    width = tiny_llama().config.hidden_size
    # per layer at least the four adapters' input copies (q, k and v each make their own); also
    # the norms' float32 inputs that their backward reads
    assert report.counters["recomputed_casts"] >= 4 * 4
    assert "recomputed_casts" not in plain.counters
    # without the pass the forward saves those copies in float32: 2 x [S, width] in the dense
    # layer, 2 x [K, width] in each sparse one
    kept = SEQ_LEN // 2
    assert _saved_float32_bytes(plain, width) == (2 * SEQ_LEN + 3 * 2 * kept) * width * 4
    assert _saved_float32_bytes(report, width) == 0
    # the narrow sources saved in their place (where they were not saved already) take half
    assert (saved_activation_bytes(report)
            <= saved_activation_bytes(plain) - _saved_float32_bytes(plain, width) // 2)
    assert torch.equal(loss, loss_recomputed)
    assert reference.keys() == recomputed.keys() and len(reference) == 4 * 4 * 2
    for name, grad in reference.items():
        assert torch.equal(grad, recomputed[name]), name


def test_checkpointed_layers_keep_their_own_recompute_tags():
    # two layers (one dense, one sparse): PEFT under checkpointing traces slowly, layer by layer
    _, _, report = _peft_bf16_step(recompute_casts=True, checkpointing=True, layers=2)
    # the layers' casts carry the checkpoint's tags already; the one left is the final norm's
    # float32 input, outside the layers
    assert report.counters["recomputed_casts"] == 1


def test_explain_partitions_with_the_joint_passes():
    """`explain` counts what the forward keeps as lemo's compile would: with `recompute_casts` the
    sparse layers' bytes drop by their float32 copies (2 x [K, hidden] x 4 bytes each, K = S / 2),
    less the bf16 sources kept in their place."""
    def lemo_bytes(recompute_casts: bool) -> dict[int, int]:
        ids = token_batch(1, SEQ_LEN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            explanation = lemo_compile.explain(
                peft_bf16_llama(layers=2), input_ids=ids, labels=ids,
                options={**OPTIONS, "mlp": "tokens", "recompute_casts": recompute_casts})
        return {layer: m["lemo"] for layer, m in explanation.activation_bytes.items()}

    saved, recast = lemo_bytes(False), lemo_bytes(True)
    copies = 2 * (SEQ_LEN // 2) * tiny_llama().config.hidden_size * 4
    assert recast[1] <= saved[1] - copies // 2, (saved, recast)  # layer 1, the sparse one


@pytest.mark.parametrize("value", [1, "yes", None])
def test_recompute_casts_must_be_a_bool(value):
    with pytest.raises(ValueError, match="recompute_casts"):
        lemo_compile.LemoConfig(recompute_casts=value)
