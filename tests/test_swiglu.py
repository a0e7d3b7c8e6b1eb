"""The SwiGLU backward written over its inputs (`passes/swiglu.py`): where it applies (backward
graphs in which gate and up die, as under checkpointing), where it must not (gate and up saved
from the forward), and that gradients are bit-identical under aot_eager, where the op's reference
rounds as autograd's decomposed graph does. The buffers it saves are read from generated code in
`test_inductor.py` and measured on the GPU in `test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from conftest import compiled_step, tiny_llama

LAYERS = 4
OPTIONS = {"compiler": "aot_eager", "block_size": 16, "keep_ratio": 0.5, "dense_layers": [0],
           "loss_segment": None}
CALL = "torch.ops.higher_order.auto_functionalized(torch.ops.lemo.swiglu_backward_.default"


def _step(in_place: bool, *, checkpointing: bool = True, dtype=torch.bfloat16, **options):
    """One compiled training step of a 4-layer Llama (layer 0 dense): (loss, gradients, the
    training report)."""
    model = tiny_llama(dtype=dtype, layers=LAYERS)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return compiled_step(model, {**OPTIONS, **options, "swiglu_in_place": in_place})


@pytest.mark.parametrize("dtype, mlp", [(torch.bfloat16, "off"), (torch.bfloat16, "tokens"),
                                        (torch.float32, "off")])
def test_checkpointed_swiglu_backward_is_written_in_place_with_identical_gradients(dtype, mlp):
    loss, reference, plain = _step(False, dtype=dtype, mlp=mlp)
    loss_in_place, in_place, report = _step(True, dtype=dtype, mlp=mlp)
    # every layer: dense, sparse, and the last one, whose recomputed silu(gate) also feeds the
    # layer's output (for the final norm's backward)
    assert report.counters["swiglu_backward_in_place"] == LAYERS
    assert report.graphs["post_grad_backward"].count(CALL) == LAYERS
    assert "swiglu_backward_" not in report.graphs["post_grad_forward"]
    assert "swiglu_backward_in_place" not in plain.counters
    assert torch.equal(loss, loss_in_place)
    assert reference.keys() == in_place.keys() and reference
    for name, grad in reference.items():
        assert torch.equal(grad, in_place[name]), name


def test_gate_and_up_saved_from_the_forward_are_not_written_over():
    """Without checkpointing gate and up are saved activations (backward graph inputs): written
    over, Inductor would copy them first, so the rewrite leaves them alone."""
    _, _, report = _step(True, checkpointing=False)
    assert "swiglu_backward_in_place" not in report.counters
    assert "swiglu_backward_" not in report.graphs["post_grad_backward"]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_swiglu_in_place_must_be_a_bool(value):
    with pytest.raises(ValueError, match="swiglu_in_place"):
        lemo_compile.LemoConfig(swiglu_in_place=value)
