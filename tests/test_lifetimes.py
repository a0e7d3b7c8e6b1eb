"""Shorter lifetimes in backward graphs (`passes/lifetimes.py`): dtype casts of PEFT's float32
adapters on a bfloat16 model under checkpointing, and gradient sums of matmul outputs. The
rewrites move where buffers live, never a value: gradients are bit-identical with and without
them (aot_eager, where `lemo.late_cast` is the same cast, `lemo.materialize` a copy and
`lemo.add_now` the same addition); that the peak drops is measured on the GPU (`test_gpu.py`)."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from conftest import compiled_step, peft_bf16_llama

LAYERS = 2  # layer 0 dense, layer 1 sparse: both kinds, at the least tracing cost
OPTIONS = {"compiler": "aot_eager", "block_size": 16, "keep_ratio": 0.5, "dense_layers": [0],
           "loss_segment": None}


def _lora_step(shorten: bool, adapter_dtype_float32: bool = True):
    """One compiled training step of a bf16 2-layer Llama (layer 0 dense) with LoRA on q/k/v/o and
    HF gradient checkpointing: (loss, gradients, training report)."""
    model = peft_bf16_llama(checkpointing=True, float32_adapters=adapter_dtype_float32,
                            layers=LAYERS)
    return compiled_step(model, {**OPTIONS, "shorten_casts": shorten})


def test_float32_adapters_get_short_lived_copies_and_identical_gradients():
    loss, reference, plain = _lora_step(shorten=False)
    loss_shortened, shortened, report = _lora_step(shorten=True)
    # each layer: one late copy of the q/k/v adapters' input and one of the o adapter's input,
    # for the weight gradients at the end of the layer's backward
    assert report.counters["split_widening_casts"] == 2 * LAYERS
    # the dense layer's o adapter output, read by the norm after it and by that norm's backward
    assert report.counters["materialized_narrowing_casts"] >= 1
    # each layer's attention input: six matmul outputs (q/k/v and their adapters) summed in order,
    # the four partial sums that the next addition reads by lemo.add_now
    assert report.counters["ordered_gradient_sums"] == 4 * LAYERS
    backward = report.graphs["post_grad_backward"]
    assert backward.count("lemo.add_now.default(") == 4 * LAYERS
    assert backward.count("lemo.late_cast.default(") == 2 * LAYERS
    assert "lemo.materialize.default(" in backward
    forward = report.graphs["post_grad_forward"]
    assert not any(op in forward for op in ("lemo.late_cast", "lemo.materialize", "lemo.add_now"))
    assert "split_widening_casts" not in plain.counters
    assert torch.equal(loss, loss_shortened)
    assert reference.keys() == shortened.keys() and len(reference) == 4 * LAYERS * 2
    for name, grad in reference.items():
        assert torch.equal(grad, shortened[name]), name


def test_adapters_in_the_model_dtype_leave_no_cast_to_shorten():
    _, _, report = _lora_step(shorten=True, adapter_dtype_float32=False)
    assert "split_widening_casts" not in report.counters
    assert "materialized_narrowing_casts" not in report.counters
    assert report.counters["ordered_gradient_sums"] == 4 * LAYERS  # matmul outputs, whatever dtype


@pytest.mark.parametrize("value", [1, "yes", None])
def test_shorten_casts_must_be_a_bool(value):
    with pytest.raises(ValueError, match="shorten_casts"):
        lemo_compile.LemoConfig(shorten_casts=value)
