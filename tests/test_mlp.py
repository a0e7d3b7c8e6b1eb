"""MLP-block token elimination (mlp="tokens") against the eager reference of the same semantics
(mlp="channels": `test_mlp_channels.py`)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

import lemo_compile
from conftest import assert_matches_reference, tiny_llama, token_batch

OPTIONS = {"compiler": "aot_eager", "block_size": 16, "dense_layers": [0], "mlp": "tokens"}


class Recording(lemo_compile.LemoBackend):
    def __call__(self, gm, example_inputs, **kwargs):
        self.gm = gm
        return super().__call__(gm, example_inputs, **kwargs)


@pytest.mark.parametrize("batch, seq_len, kv_heads", [(1, 150, 2), (3, 128, 4)])
def test_mlp_tokens_matches_the_reference(batch, seq_len, kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    ids = token_batch(batch, seq_len)
    backend = Recording({**OPTIONS, "loss_segment": None})
    compiled = assert_matches_reference(model, ids, backend, block_size=16, keep_ratio=0.4,
                                        dense_layers=[0], mlp="tokens")
    report = backend.reports[-1]
    assert report.counters["mlp_sparse_layers"] == 3 == report.counters["sparse_layers"]
    kept = [p.mlp_kept_tokens for p in report.plans]
    assert kept == [seq_len] + [p.kept_tokens for p in report.plans[1:]] and kept[1] < seq_len
    roles: dict[int, Counter] = {}
    for node in backend.gm.graph.nodes:
        tag = node.meta.get("custom") or {}
        if "lemo_layer" in tag:
            roles.setdefault(tag["lemo_layer"], Counter())[tag["lemo"]] += 1
    for layer in (1, 2, 3):
        assert roles[layer]["mlp_select"] == 1 and roles[layer]["scatter_add"] == 2
        assert roles[layer]["mlp_score"] > 0
    # one graph, no recompilation
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) == 1


def test_mlp_tokens_with_the_intermediate_width_of_the_hidden_width():
    """I == D: the activation is found as the down projection's input, not by its width."""
    model = tiny_llama(intermediate=64)
    ids = token_batch(1, 128)
    backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": None})
    assert_matches_reference(model, ids, backend, block_size=16, keep_ratio=0.4, dense_layers=[0],
                             mlp="tokens")
    assert backend.reports[-1].counters["mlp_sparse_layers"] == 3


def test_mlp_tokens_with_keep_ratio_one_is_the_plain_model():
    model = tiny_llama()
    ids = token_batch(1, 128)
    compiled = torch.compile(model, backend=lemo_compile.LemoBackend(
        {**OPTIONS, "keep_ratio": 1.0, "loss_segment": None}))
    got = compiled(input_ids=ids, labels=ids)
    want = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_mlp_keep_ratio_sets_the_mlp_blocks_only():
    model = tiny_llama()
    ids = token_batch(1, 160)
    backend = lemo_compile.LemoBackend({**OPTIONS, "mlp_keep_ratio": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    plans = backend.reports[-1].plans
    assert [(p.kept_tokens, p.mlp_kept_tokens) for p in plans] == [
        (160, 160), (64, 32), (64, 32), (64, 32)]


def test_mlp_tokens_fuses_its_gathers_and_norms():
    model = tiny_llama()
    ids = token_batch(1, 128)
    backend = lemo_compile.LemoBackend(OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    counters = backend.reports[-1].counters
    # per sparse layer: attention and MLP each gather + norm, scatter-add, fold in backward
    assert counters["fused_gather_norm"] == 2 * 3
    assert counters["fused_scatter_add"] == 2 * 3
    assert counters["folded_zero_scatter"] == 2 * 3


def test_mlp_tokens_with_lora_on_every_linear_matches_the_reference():
    """LoRA on all linear layers, down_proj included: the MLP's activation is still found (the
    input of the wrapped down projection), and the block runs on its kept rows, adapters and all."""
    from peft import LoraConfig, get_peft_model

    from conftest import grads
    from reference import lemo_forward

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    for name, p in model.named_parameters():  # non-zero B so that the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = token_batch(2, 128)
    backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": None})
    out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    _, loss = lemo_forward(model.base_model.model, ids, ids, block_size=16, keep_ratio=0.4,
                           dense_layers=[0], mlp="tokens")
    loss.backward()
    want = grads(model)
    report = backend.reports[-1]
    assert report.counters["mlp_sparse_layers"] == 3 and not report.warnings
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)
    assert got.keys() == want.keys() and any("mlp.down_proj.lora_A" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
