"""mlp="channels": the MLP's forward is exact, its backward goes through the top channels of the
intermediate activation only. The op against its written definition, the compiled model against the
eager reference (`reference.channel_mlp`), and what autograd saves."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import lemo_compile
from conftest import assert_matches_reference, grads, inserted_nodes, tiny_llama, token_batch
from lemo_compile import ops

OPTIONS = {"compiler": "aot_eager", "block_size": 16, "dense_layers": [0], "mlp": "channels",
           "loss_segment": None}
# Compiled vs reference, float32: both compute the same gradient formula with differently ordered
# sums; measured when written, at most 2e-7 in logits and 1e-8 in any gradient entry.
TOL = 1e-5


class Recording(lemo_compile.LemoBackend):
    def __call__(self, gm, example_inputs, **kwargs):
        self.gm = gm
        return super().__call__(gm, example_inputs, **kwargs)


def _step(model, ids, **options):
    """One compiled training step: (logits, loss, grads, report); leaves no gradients behind."""
    backend = lemo_compile.LemoBackend({**OPTIONS, **options})
    out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), got, backend.reports[-1]


# ----------------------------------------------------------------------------------- the ops


def _masked_definition(a, idx, weight, bias):
    """The gradient definition of `ops.channel_linear`, written with a 0/1 channel mask."""
    mask = torch.zeros(a.shape[0], 1, a.shape[2], dtype=a.dtype)
    for b in range(a.shape[0]):
        mask[b, 0, idx[b]] = 1
    return F.linear(a * mask, weight, bias) + F.linear(a * (1 - mask), weight).detach()


@pytest.mark.parametrize("batch, seq_len, channels, kept", [(1, 1, 1, 1), (3, 7, 13, 5), (2, 65, 63, 20)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_channel_linear_matches_its_definition(batch, seq_len, channels, kept, with_bias):
    torch.manual_seed(0)
    a = torch.randn(batch, seq_len, channels)
    weight = torch.randn(6, channels, requires_grad=True)
    bias = torch.randn(6, requires_grad=True) if with_bias else None
    idx = torch.stack([torch.randperm(channels)[:kept].sort().values for _ in range(batch)])
    upstream = torch.randn(batch, seq_len, 6)

    a_kept = ops.gather_channels(a, idx).requires_grad_()
    out = ops.channel_linear(a, a_kept, idx, weight, bias, torch.float32)
    torch.testing.assert_close(out, F.linear(a, weight, bias), rtol=0, atol=0)
    params = [weight] + ([bias] if with_bias else [])
    got = torch.autograd.grad(out, [a_kept, *params], upstream)

    a_ref = a.clone().requires_grad_()
    want_out = _masked_definition(a_ref, idx, weight, bias)
    want = torch.autograd.grad(want_out, [a_ref, *params], upstream)
    # the gradient of a, read at the kept channels, and zero elsewhere by the definition
    torch.testing.assert_close(got[0], ops.gather_channels(want[0], idx), rtol=1e-5, atol=1e-5)
    kept_mask = torch.zeros(batch, channels, dtype=torch.bool)
    kept_mask[torch.arange(batch)[:, None], idx] = True
    assert torch.all(want[0].abs().sum(1)[~kept_mask] == 0)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_channel_linear_keeping_every_channel_is_the_dense_gradient():
    torch.manual_seed(1)
    a = torch.randn(2, 9, 11, requires_grad=True)
    weight = torch.randn(5, 11, requires_grad=True)
    idx = torch.arange(11).expand(2, 11)
    out = ops.channel_linear(a.detach(), ops.gather_channels(a, idx), idx, weight, None, torch.float32)
    upstream = torch.randn(2, 9, 5)
    got = torch.autograd.grad(out, [a, weight], upstream)
    want = torch.autograd.grad(F.linear(a, weight), [a, weight], upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_channel_linear_with_a_dropped_channel_is_not_the_dense_gradient():
    """The definition is not a no-op: the weight column of a dropped channel gets nothing."""
    torch.manual_seed(2)
    a = torch.randn(1, 4, 3)
    weight = torch.randn(2, 3, requires_grad=True)
    idx = torch.tensor([[0, 2]])
    out = ops.channel_linear(a, ops.gather_channels(a, idx), idx, weight, None, torch.float32)
    (grad,) = torch.autograd.grad(out.sum(), [weight])
    assert torch.all(grad[:, 1] == 0) and torch.all(grad[:, [0, 2]] != 0)


def test_select_channels_per_sample_by_norm_over_tokens():
    a = torch.zeros(2, 3, 5)
    a[0, :, 4] = 3.0   # norm sqrt(27)
    a[0, 0, 1] = 5.0   # norm 5
    a[0, :, 2] = 1.0   # norm sqrt(3)
    a[1, 2, 0] = -9.0  # sample 1: channel 0 first, then the ties 1..4 lower index first
    assert ops.select_channels(a, 2).tolist() == [[1, 4], [0, 1]]
    assert ops.select_channels(a, 3).tolist() == [[1, 2, 4], [0, 1, 2]]


# --------------------------------------------------------------------- compiled vs reference


@pytest.mark.parametrize("batch, seq_len, kv_heads, ratio", [(1, 150, 2, 0.5), (3, 128, 4, 0.3)])
def test_mlp_channels_matches_the_reference(batch, seq_len, kv_heads, ratio):
    model = tiny_llama(kv_heads=kv_heads)
    ids = token_batch(batch, seq_len)
    backend = Recording({**OPTIONS, "mlp_channel_ratio": ratio})
    compiled = assert_matches_reference(model, ids, backend, block_size=16, keep_ratio=0.4,
                                        dense_layers=[0], mlp="channels", mlp_channel_ratio=ratio,
                                        tol=TOL)
    report = backend.reports[-1]
    kept = math.ceil(ratio * 96)
    assert report.counters["mlp_channel_layers"] == 3 == report.counters["sparse_layers"]
    assert [(p.mlp_channel_ratio, p.mlp_kept_channels, p.mlp_channels) for p in report.plans] == [
        (None, None, None)] + [(ratio, kept, 96)] * 3
    assert [p.mlp_kept_tokens for p in report.plans] == [seq_len] * 4  # every token in the MLP
    roles = inserted_nodes(backend.gm)
    assert sorted(roles) == [1, 2, 3]
    for layer in (1, 2, 3):
        # detach, select, 2 gathers (gate, up), silu and mul replayed, channel_linear
        assert roles[layer]["mlp_channels"] == 7
    targets = Counter(n.target for n in backend.gm.graph.nodes)
    assert targets[torch.ops.lemo.channel_linear.default] == 3
    # one graph, no recompilation on the next step
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) == 1


def test_mlp_channels_matches_the_reference_on_qwen2():
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, use_cache=False)
    model = transformers.Qwen2ForCausalLM(config).train()
    ids = token_batch(2, 150)
    backend = lemo_compile.LemoBackend({**OPTIONS, "mlp_channel_ratio": 0.25})
    assert_matches_reference(model, ids, backend, block_size=16, keep_ratio=0.4, dense_layers=[0],
                             mlp="channels", mlp_channel_ratio=0.25, tol=TOL)
    assert backend.reports[-1].counters["mlp_channel_layers"] == 3


def test_mlp_channels_on_every_layer_with_dense_attention_matches_the_reference():
    """The MLP rewrite does not depend on the attention block being sparse."""
    model = tiny_llama()
    ids = token_batch(2, 100)
    backend = lemo_compile.LemoBackend({**OPTIONS, "dense_layers": [], "keep_ratio": 1.0,
                                        "mlp_channel_ratio": 0.1})
    assert_matches_reference(model, ids, backend, block_size=16, keep_ratio=1.0, dense_layers=[],
                             mlp="channels", mlp_channel_ratio=0.1, tol=TOL)
    report = backend.reports[-1]
    assert report.counters["mlp_channel_layers"] == 4 and report.counters["sparse_layers"] == 0
    assert [p.mlp_kept_channels for p in report.plans] == [10] * 4


def test_mlp_channel_ratio_one_is_the_dense_mlp():
    """Keeping every channel leaves the MLP as it is: same logits, loss and gradients, bit for bit,
    as mlp="off"."""
    model = tiny_llama()
    ids = token_batch(2, 100)
    logits, loss, got, report = _step(model, ids, mlp_channel_ratio=1.0)
    dense_logits, dense_loss, dense, _ = _step(model, ids, mlp="off")
    assert report.counters["mlp_channel_layers"] == 0 and report.counters["sparse_layers"] == 3
    assert not report.warnings
    assert torch.equal(logits, dense_logits) and torch.equal(loss, dense_loss)
    assert got.keys() == dense.keys()
    for name in got:
        assert torch.equal(got[name], dense[name]), name


def test_mlp_channels_forward_is_exact():
    """Any ratio: the forward (logits, loss) is the dense MLP's; the gradients are not."""
    model = tiny_llama()
    ids = token_batch(2, 100)
    dense_logits, dense_loss, dense, _ = _step(model, ids, mlp="off")
    name = "model.layers.2.mlp.gate_proj.weight"
    for ratio in (0.01, 0.5, 0.95):
        torch._dynamo.reset()
        logits, loss, got, report = _step(model, ids, mlp_channel_ratio=ratio)
        assert report.counters["mlp_channel_layers"] == 3
        torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(loss, dense_loss, rtol=0, atol=1e-6)
        assert (got[name] - dense[name]).abs().max() > 1e-3 * dense[name].abs().max()
        # a gate row (channel) gets gradient only from the samples that keep it: <= B * C rows
        rows_with_grad = int((got[name].abs().sum(1) > 0).sum())
        assert 0 < rows_with_grad <= 2 * math.ceil(ratio * 96)
        dense_layer = got["model.layers.0.mlp.gate_proj.weight"]
        assert int((dense_layer.abs().sum(1) > 0).sum()) == 96


def test_mlp_channels_saves_only_the_kept_channels():
    """What autograd saves for each MLP: [B, S, C] tensors instead of [B, S, I] (the memory claim),
    read off the backward graph's inputs."""
    batch, seq_len, channels, layers = 2, 80, 96, 4
    kept = 48
    model = tiny_llama()
    ids = token_batch(batch, seq_len)
    common = {"dense_layers": [], "keep_ratio": 1.0}  # attention dense: only the MLPs differ

    def saved(report):
        return {name: value for name, value in report.saved_for_backward.items()
                if not name.startswith("primals")}

    def nbytes(values):
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in values.values())

    *_, dense_report = _step(model, ids, mlp="off", **common)
    *_, report = _step(model, ids, mlp_channel_ratio=0.5, **common)
    dense_saved, channel_saved = saved(dense_report), saved(report)
    assert report.counters["mlp_channel_layers"] == layers

    def full_width(values):
        return [n for n, (shape, _) in values.items() if shape and shape[-1] == channels]

    # dense: gate, up and act(gate) * up per layer, [B * S, I] each
    assert len(full_width(dense_saved)) == 3 * layers
    # channels: no activation of width I is saved at all ...
    assert full_width(channel_saved) == []
    # ... but three of width C per layer, and the kept indices [B, C]
    shapes = Counter(shape for shape, _ in channel_saved.values())
    assert shapes[(batch, seq_len, kept)] == 3 * layers
    assert shapes[(batch, kept)] == layers
    saving = 3 * layers * batch * seq_len * (channels - kept) * 4 - layers * batch * kept * 8
    assert nbytes(dense_saved) - nbytes(channel_saved) >= saving


def test_mlp_channels_with_lora_on_gate_and_up_matches_the_reference():
    """LoRA adapters on gate_proj / up_proj are part of the pointwise chain that is replayed on the
    kept channels (their adds and scaling); the adapters' gradients follow the definition."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "gate_proj", "up_proj"]))
    model.train()
    for name, p in model.named_parameters():  # non-zero B so that the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = token_batch(2, 128)
    backend = lemo_compile.LemoBackend({**OPTIONS, "mlp_channel_ratio": 0.4})
    inner = model.base_model.model
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    from reference import lemo_forward

    _, loss = lemo_forward(inner, ids, ids, block_size=16, keep_ratio=0.4, dense_layers=[0],
                           mlp="channels", mlp_channel_ratio=0.4)
    loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    assert backend.reports[-1].counters["mlp_channel_layers"] == 3
    torch.testing.assert_close(out.loss, loss, rtol=TOL, atol=TOL)
    assert got.keys() == want.keys() and any("mlp.gate_proj.lora_A" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=TOL, atol=TOL, msg=name)


def test_lora_on_the_down_projection_falls_back_to_a_dense_mlp_with_a_warning():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    ids = token_batch(1, 128)
    backend = lemo_compile.LemoBackend(OPTIONS)
    with pytest.warns(lemo_compile.LemoWarning, match="MLP blocks run dense.*not a plain linear"):
        out = torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
    out.loss.backward()
    report = backend.reports[-1]
    assert report.counters["mlp_channel_layers"] == 0 and report.counters["sparse_layers"] == 3
    assert all(p.mlp_channel_ratio is None and p.mlp_kept_channels is None for p in report.plans)


def test_mlp_channels_under_bf16_autocast_keeps_the_forward():
    model = tiny_llama()
    ids = token_batch(2, 150)
    results = {}
    for mlp in ("channels", "off"):
        torch._dynamo.reset()
        backend = lemo_compile.LemoBackend({**OPTIONS, "mlp": mlp})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
        out.loss.backward()
        results[mlp] = (out.loss.detach(), grads(model))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results["channels"][0], results["off"][0], rtol=0, atol=0)
    for name, grad in results["channels"][1].items():
        assert torch.isfinite(grad).all() and grad.dtype == torch.float32, name


def test_mlp_channel_ratio_is_ignored_without_mlp_channels():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = lemo_compile.LemoConfig.from_options({"mlp": "tokens", "mlp_channel_ratio": 0.2})
    plans = lemo_compile.plan_layers(config, num_layers=4, seq_len=160)
    assert all(p.mlp_channel_ratio is None for p in plans)
