"""Plain causal masks become `is_causal=True` (`passes/attention.py`): which masks are proven causal,
which are left alone, and that the rewritten graph computes what the original did."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import lemo_compile
from conftest import tiny_llama, token_batch
from lemo_compile.passes import attention
from lemo_compile.passes.attention import causal_attention_pass
from lemo_compile.regions import SDPA_TARGETS


def _captured(model, *args, **kwargs):
    """The Dynamo graph of model(*args, **kwargs) and its example inputs (real tensors)."""
    captured = []

    def record(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=record, fullgraph=True)(*args, **kwargs)
    ((gm, inputs),) = captured
    return gm, inputs


def _sdpa_calls(gm):
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def _square_values(gm, seq_len):
    """Nodes of gm and its bodies whose value has two dims of the sequence length."""
    return [n.name for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes
            if isinstance(v := n.meta.get("example_value"), torch.Tensor)
            and list(v.shape).count(seq_len) >= 2]


def _expands(gm):
    return [n.name for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_method" and n.target == "expand"
            and n.meta["example_value"].dim() == 5]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_llama_mask_becomes_is_causal_and_disappears(checkpointing):
    model = tiny_llama(layers=3)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = token_batch(2, 112)
    gm, inputs = _captured(model, input_ids=ids, labels=ids)
    want = gm(*inputs)
    assert _square_values(gm, 112)  # transformers built a [B, 1, S, S] mask
    assert causal_attention_pass(gm) == 3
    calls = _sdpa_calls(gm)
    assert len(calls) == 3
    for call in calls:
        assert call.kwargs.get("attn_mask") is None and call.kwargs["is_causal"] is True
        # grouped-query attention as eager transformers runs it: the 2 key/value heads, unrepeated
        assert call.kwargs["enable_gqa"] is True
        assert [a.meta["example_value"].shape[1] for a in call.args[1:3]] == [2, 2]
    assert _square_values(gm, 112) == []  # the mask's construction is gone
    assert _expands(gm) == []  # and the key/value repeats
    got = gm(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_padded_mask_is_left_alone():
    model = tiny_llama(layers=2)
    ids = token_batch(2, 64)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :10] = 0
    gm, _ = _captured(model, input_ids=ids, attention_mask=mask)
    assert causal_attention_pass(gm) == 0
    assert all(c.kwargs.get("attn_mask") is not None for c in _sdpa_calls(gm))
    # with a mask SDPA's fast kernels take no grouped heads: the key/value repeats stay
    assert not any(c.kwargs.get("enable_gqa") for c in _sdpa_calls(gm)) and len(_expands(gm)) == 4


def test_sliding_window_is_left_alone_and_short_windows_become_causal():
    config = transformers.MistralConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, sliding_window=32)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).train()
    ids = token_batch(1, 96)
    gm, _ = _captured(model, input_ids=ids)
    assert causal_attention_pass(gm) == 0  # a window of 32 in 96 tokens is not causal
    torch._dynamo.reset()
    gm, _ = _captured(model, input_ids=ids[:, :32])
    assert causal_attention_pass(gm) == 2  # a window as long as the sequence is


@pytest.mark.parametrize("window, local_layers", [(32, "all"), (40, "all"), (32, "odd")])
def test_sliding_window_layers_match_the_reference(window, local_layers):
    """A window shorter than the sequence stays a mask, gathered at the kept tokens: a kept token
    attends to the kept tokens among its `window` latest (by position in the row), as dense
    attention restricted to them would (windows of 2 and 2.5 blocks; Mistral's window in every
    layer, or Qwen2's local layers 1 and 3 between global ones)."""
    from reference import lemo_forward

    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, use_cache=False, sliding_window=window)
    torch.manual_seed(0)
    if local_layers == "all":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, num_hidden_layers=3)).train()
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, num_hidden_layers=4, use_sliding_window=True,
            layer_types=["full_attention", "sliding_attention"] * 2)).train()
        window = [None, window] * 2
    ids = token_batch(1, 150)
    backend = lemo_compile.LemoBackend({"compiler": "aot_eager", "block_size": 16,
                                        "dense_layers": [0], "loss_segment": None})
    out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want_logits, want_loss = lemo_forward(model, ids, ids, block_size=16, dense_layers=[0],
                                          sliding_window=window)
    want_loss.backward()
    (report,) = backend.reports
    layers = len(model.model.layers)
    assert report.counters["sparse_layers"] == layers - 1  # (dense_layers=[0])
    assert report.counters["causal_attention"] == (0 if local_layers == "all" else 2)
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    whole, _ = lemo_forward(model, ids, ids, block_size=16, dense_layers=[0])
    assert (whole - want_logits).abs().max() > 1e-2  # the window matters here


class MaskedAttention(nn.Module):
    """One SDPA call with a mask built from aranges by `mask_of(q_index, kv_index)`."""

    def __init__(self, mask_of):
        super().__init__()
        self.mask_of = mask_of

    def forward(self, q, k, v):
        positions = torch.arange(q.shape[-2])
        mask = self.mask_of(positions[:, None], positions[None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


MINUS = torch.finfo(torch.float32).min
MASKS = {
    "causal": (lambda q, kv: kv <= q, True),
    "causal, float": (lambda q, kv: torch.where(kv <= q, 0.0, MINUS), True),
    "causal, float -inf": (lambda q, kv: torch.zeros(()).masked_fill(kv > q, float("-inf")), True),
    "one key ahead": (lambda q, kv: kv <= q + 1, False),
    "last row hidden": (lambda q, kv: (kv <= q) & (q < 95), False),
    "all visible": (lambda q, kv: (kv <= q) | (kv >= 0), False),
    "float, small bias": (lambda q, kv: torch.where(kv <= q, 0.0, -1e4), False),
    "built by tril": (lambda q, kv: torch.ones(96, 96, dtype=torch.bool).tril(), False),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_only_the_plain_causal_mask_is_rewritten(name, monkeypatch):
    """Evaluated a few query rows at a time (so a difference in the last rows is seen too)."""
    monkeypatch.setattr(attention, "_ROW_BLOCK_ELEMENTS", 96 * 7)  # blocks of 7 rows
    mask_of, causal = MASKS[name]
    q, k, v = (torch.randn(1, 2, 96, 8) for _ in range(3))
    gm, inputs = _captured(MaskedAttention(mask_of), q, k, v)
    want = gm(*inputs)
    assert causal_attention_pass(gm) == (1 if causal else 0)
    torch.testing.assert_close(gm(*inputs), want, rtol=1e-5, atol=1e-5)
    # "built by tril" is causal, but tril is not evaluated a row block at a time: not proven


def test_sparse_layers_attend_causally_over_kept_tokens():
    """Through the backend: every layer, dense or sparse, runs is_causal=True with no mask."""
    model = tiny_llama(layers=4)
    ids = token_batch(2, 128)
    backend = lemo_compile.LemoBackend({"compiler": "aot_eager", "block_size": 16})
    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    report = backend.reports[-1]
    assert report.counters["causal_attention"] == 4 and report.counters["sparse_layers"] == 1
    assert "attn_mask" not in report.graphs["select"]
    assert report.graphs["select"].count("is_causal = True") == 4
    assert report.graphs["select"].count("enable_gqa = True") == 4


def test_eval_graphs_use_is_causal_too():
    model = tiny_llama(layers=2).eval()
    ids = token_batch(1, 64)
    backend = lemo_compile.LemoBackend({"compiler": "aot_eager"})
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids).logits
        want = model(input_ids=ids).logits
    assert backend.reports[-1].counters["causal_attention"] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
