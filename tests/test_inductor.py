"""Real Inductor code generation on the CPU, end to end (slow: ~20 s per compile on 2 cores)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lemo_compile
from conftest import tiny_llama, tiny_opt, token_batch
from reference import lemo_forward

pytestmark = pytest.mark.inductor


def test_inductor_training_step_matches_reference():
    model = tiny_llama(kv_heads=2, layers=2)
    ids = token_batch(2, 150)
    backend = lemo_compile.LemoBackend(
        {"compiler": "inductor", "block_size": 16, "dense_layers": [0], "loss_segment": 64}
    )
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with pytest.warns(lemo_compile.LemoWarning, match="logits"):
        out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, loss = lemo_forward(model, ids, ids, block_size=16, keep_ratio=0.4, dense_layers=[0])
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert backend.reports[-1].counters["sparse_layers"] == 1


def test_inductor_padded_batch_matches_reference():
    """Padded-batch selection (sorts, cumulative sums, a constant table) through real codegen."""
    from reference import lemo_forward_padded
    from test_padding import padded_batch, _rows

    model = tiny_llama(kv_heads=2, layers=2)
    ids, mask, labels, position_ids = padded_batch(_rows(), "left")
    backend = lemo_compile.LemoBackend(
        {"compiler": "inductor", "block_size": 16, "dense_layers": [0], "loss_segment": None}
    )
    out = torch.compile(model, backend=backend, fullgraph=True)(
        input_ids=ids, attention_mask=mask, labels=labels, position_ids=position_ids)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits, loss = lemo_forward_padded(model, ids, mask, labels, block_size=16, keep_ratio=0.4,
                                       dense_layers=[0])
    loss.backward()
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert backend.reports[-1].counters["sparse_layers"] == 1


def test_inductor_opt_fuses_the_layer_norm_of_both_blocks():
    """OPT's attention and MLP blocks each start with a LayerNorm; the MLP's reads the kept rows
    viewed as [B * K, D] (a reshape in Inductor's post-grad graph): both become
    lemo.gather_layer_norm, and the step equals the unfused one."""
    ids = token_batch(2, 150)
    options = {"block_size": 16, "dense_layers": [0], "mlp": "tokens", "loss_segment": None}
    model = tiny_opt(layers=2)
    backend = lemo_compile.LemoBackend({**options, "compiler": "inductor"})
    with torch._inductor.config.patch(fx_graph_cache=False):  # the post-grad pass must run
        loss = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids).loss
    loss.backward()
    assert backend.reports[-1].counters["fused_gather_norm"] == 2
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    unfused = lemo_compile.LemoBackend({**options, "compiler": "aot_eager", "fuse": False})
    want = torch.compile(model, backend=unfused, fullgraph=True)(input_ids=ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_inductor_cache_keeps_fused_and_unfused_code_apart(tmp_path, monkeypatch):
    """Inductor's FX graph cache keys on the post-grad pass's uuid: compiling the same graph with
    fuse=False and then fuse=True in one process must run lemo's post-grad passes both times (each
    variant gets its own code), while repeating a variant is served from the cache."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    ids = token_batch(1, 64)
    options = {"compiler": "inductor", "block_size": 16, "dense_layers": [0], "loss_segment": None}
    reports = []
    with torch._inductor.config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        for fuse in (False, True, True):
            torch._dynamo.reset()
            model = tiny_llama(layers=2)
            backend = lemo_compile.LemoBackend({**options, "fuse": fuse})
            hits = counters["inductor"]["fxgraph_cache_hit"]
            torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
            reports.append((backend.reports[-1], counters["inductor"]["fxgraph_cache_hit"] - hits))
    (unfused, unfused_hits), (fused, fused_hits), (again, again_hits) = reports
    assert unfused_hits == 0 and fused_hits == 0
    assert "post_grad_forward" in unfused.graphs and "post_grad_forward" in fused.graphs
    assert not any(name.startswith("fused_") for name in unfused.counters)
    assert fused.counters["fused_gather_norm"] == 1
    assert again_hits == 1 and "post_grad_forward" not in again.graphs


def test_inductor_backward_buffer_reuse_off_patches_the_backward_only(monkeypatch):
    """By default (backward_buffer_reuse=False) the backward graph is compiled with Inductor's
    buffer reuse off and the forward graph with it on (Inductor's default)."""
    import torch._inductor.compile_fx as compile_fx_module
    import torch._inductor.config as inductor_config

    seen = []
    real_inner = compile_fx_module.compile_fx_inner

    def recording_inner(gm, example_inputs, **kwargs):
        seen.append((kwargs.get("is_backward", False), inductor_config.allow_buffer_reuse))
        return real_inner(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx_inner", recording_inner)
    ids = token_batch(1, 64)
    backend = lemo_compile.LemoBackend({"compiler": "inductor", "block_size": 16, "dense_layers": [0],
                                        "loss_segment": None})
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(tiny_llama(layers=2), backend=backend, fullgraph=True)
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert seen == [(False, True), (True, False)]


def _buffers_live_at(code: str, marker: str, numel: int, dtype: str) -> list[list[str]]:
    """For each line of Inductor's generated `code` that matches `marker`: the buffers of `dtype`
    (e.g. "float32") and `numel` elements allocated before it and not yet freed (read from the
    code's allocations, `del`s and in-place reuses)."""
    live: dict[str, int] = {}
    found = []
    for line in code.splitlines():
        allocation = re.search(rf"(buf\d+) = empty_strided_\w+\(\(([\d, ]*)\), .*torch\.{dtype}\)",
                               line)
        if allocation:
            sizes = allocation.group(2).split(",")
            live[allocation.group(1)] = math.prod(int(d) for d in sizes if d.strip())
        reuse = re.search(r"(buf\d+) = (?:reinterpret_tensor\()?(buf\d+)\b.*del \2\s+# reuse", line)
        if reuse and reuse.group(2) in live:
            live[reuse.group(1)] = live.pop(reuse.group(2))
        elif not reuse:
            for freed in re.findall(r"del (buf\d+)", line):
                live.pop(freed, None)
        if re.search(marker, line):
            found.append(sorted(name for name, size in live.items() if size == numel))
    return found


@pytest.mark.parametrize("memory_passes", [True, False])
def test_inductor_checkpointed_mlp_backward_holds_three_mlp_buffers_and_no_float32_copy(
        memory_passes):
    """PEFT's float32 adapters on a bf16 Llama under checkpointing, at the SwiGLU backward of each
    layer (the peak of a checkpointed layer), in the generated backward code. `shorten_casts`: no
    float32 [S, hidden] buffer is alive there; without it, the adapters' copies are.
    `swiglu_in_place`: lemo.swiglu_backward_ runs on gate and up's own buffers and three [S, I]
    buffers are alive (gate, up, the gradient); without it, Inductor's fused kernel adds a fourth."""
    from peft import LoraConfig, get_peft_model

    seq_len, hidden, intermediate = 256, 64, 96
    model = tiny_llama(dtype=torch.bfloat16, layers=2, intermediate=intermediate)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapters = LoraConfig(r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, adapters)
    backend = lemo_compile.LemoBackend({"compiler": "inductor", "block_size": 16,
                                        "dense_layers": [0], "loss_segment": None,
                                        "shorten_casts": memory_passes,
                                        "swiglu_in_place": memory_passes})
    ids = token_batch(1, seq_len)

    def step():
        loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
        loss.backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, codes = run_and_get_code(step)
    (backward,) = [code for code in codes if "silu_backward" in code]
    # the calls that compute the SwiGLU backward: lemo's op, or Inductor's fused kernel
    marker = r"lemo\.swiglu_backward_\.default\(" if memory_passes else r"silu_backward\w*\(buf"
    fp32 = _buffers_live_at(backward, marker, seq_len * hidden, "float32")
    mlp = _buffers_live_at(backward, marker, seq_len * intermediate, "bfloat16")
    assert len(fp32) == len(mlp) == 2  # the sparse layer's MLP and the dense layer's
    if memory_passes:
        assert fp32 == [[], []]
        assert [len(buffers) for buffers in mlp] == [3, 3]
        calls = re.findall(r"lemo\.swiglu_backward_\.default\((.*)\)\n", backward)
        for buffers, call in zip(mlp, calls):  # written over gate and up, reading the gradient
            assert sorted(re.findall(r"buf\d+", call)) == buffers
    else:  # the dense layer holds the copies of its q/k/v and o adapters' inputs and o's output
        assert len(fp32[-1]) == 3
        assert [len(buffers) for buffers in mlp] == [4, 4]
