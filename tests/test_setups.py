"""Real-world set-ups: PEFT LoRA, options through the environment, the Hugging Face Trainer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lemo_compile
from conftest import tiny_llama, token_batch

OPTIONS = {"compiler": "aot_eager", "block_size": 16, "dense_layers": [0]}


@pytest.mark.parametrize("batch", [1, 2])
def test_batch_without_counted_labels_leaves_the_weights_intact(batch):
    """Labels all -100 (prompt-only rows after truncation): the loss is NaN, as plain HF's, and
    every gradient equals plain HF's (zero), so an optimizer step keeps the weights finite."""
    model = tiny_llama()
    ids = token_batch(batch, 96)
    labels = torch.full_like(ids, -100)
    backend = lemo_compile.LemoBackend(OPTIONS)  # the segmented loss is on by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        loss = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=labels).loss
    loss.backward()
    assert backend.reports[-1].counters["segmented_losses"] == 1
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want_loss = model(input_ids=ids, labels=labels).loss
    want_loss.backward()
    assert torch.isnan(loss) and torch.isnan(want_loss)
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p.grad), name
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.grad = got[name]
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"])
def test_peft_lora_trains_only_the_adapters(targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    backend = lemo_compile.LemoBackend(OPTIONS)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(2, 150)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        for _ in range(6):
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert backend.reports[-1].counters["sparse_layers"] == 3 and len(backend.reports) == 1
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, adapters[name]), name


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("LEMO_OPTIONS", '{"compiler": "aot_eager", "block_size": 16, "keep_ratio": 0.25}')
    model = tiny_llama()
    with pytest.warns(lemo_compile.LemoWarning, match="logits"):
        out = torch.compile(model, backend="lemo")(input_ids=token_batch(1, 128), labels=token_batch(1, 128))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("text, message", [("[1, 2]", "JSON object"), ("{bad", "JSON object"),
                                           ('{"keep_ratio": 7}', "keep_ratio")])
def test_bad_options_in_the_environment_are_clear_errors(monkeypatch, text, message):
    monkeypatch.setenv("LEMO_OPTIONS", text)
    model = tiny_llama()
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="lemo")(input_ids=token_batch(1, 64))


def _trainer_args(tmp_path, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
        **extra,
    )


def _dataset():
    return [{"input_ids": row, "labels": row} for row in token_batch(8, 128)]


def test_hf_trainer_with_a_model_compiled_by_lemo(tmp_path):
    """The supported route: compile the model in place with lemo, then hand it to the Trainer."""
    from transformers import Trainer

    model = tiny_llama()
    model.compile(backend="lemo", options={**OPTIONS}, fullgraph=True)
    trainer = Trainer(model=model, args=_trainer_args(tmp_path), train_dataset=_dataset())
    with pytest.warns(lemo_compile.LemoWarning, match="NaN placeholder"):
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("through", ["register", "environment"])
def test_hf_trainer_with_torch_compile_backend_lemo(tmp_path, monkeypatch, through):
    """TrainingArguments(torch_compile_backend="lemo"): accelerate refuses the name until
    `register_with_accelerate()`; then the Trainer compiles with lemo, with the options given
    to `register_with_accelerate(options)` or, without them, from LEMO_OPTIONS."""
    from transformers import Trainer

    from lemo_compile import backend

    options = {**OPTIONS, "loss_segment": 64}
    monkeypatch.setattr(backend, "_registered_options", None)
    if through == "register":
        lemo_compile.register_with_accelerate(options)
    else:
        monkeypatch.setenv("LEMO_OPTIONS", json.dumps(options))
        lemo_compile.register_with_accelerate()
    lemo_compile.register_with_accelerate()  # idempotent; keeps the registered options
    args = _trainer_args(tmp_path, torch_compile=True, torch_compile_backend="lemo")
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    # the segmented loss's warning: lemo compiled the training graph, with these options
    with pytest.warns(lemo_compile.LemoWarning, match="loss_segment=64"):
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def _checkpointed_step(checkpointing: bool, lora: bool = False, fullgraph: bool = True,
                       layers: int = 4, **options):
    model = tiny_llama(layers=layers)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj"]))
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers renames the method
            model.gradient_checkpointing_enable()
    model.train()
    backend = lemo_compile.LemoBackend({**OPTIONS, **options})
    ids = token_batch(2, 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        out = torch.compile(model, backend=backend, fullgraph=fullgraph)(input_ids=ids, labels=ids)
    out.loss.backward()
    layers = [r for r in backend.reports if r.plans]  # the graph with the decoder layers
    assert len(layers) == 1
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, layers[0]


@pytest.mark.parametrize("scorer", [{"scorer": "oracle"}, {"scorer": "random", "seed": 3},
                                    {"scorer": "random", "seed": None},
                                    {"scorer": "output"},
                                    {"scorer": "oracle", "mlp": "tokens"},
                                    {"scorer": "oracle", "mlp": "channels"},
                                    {"scorer": "oracle", "explore": 0.5, "seed": None}])
def test_gradient_checkpointing_gives_the_same_results(scorer):
    """Layers inside activation-checkpoint regions are found and rewritten inside the region (a
    fresh random draw, the random scorer or `explore` without a seed, included: each step starts
    from the same RNG state, and the backward must not draw again)."""
    loss, grads, report = _checkpointed_step(True, **scorer)
    plain_loss, plain_grads, plain_report = _checkpointed_step(False, **scorer)
    assert report.counters["sparse_layers"] == plain_report.counters["sparse_layers"] == 3
    assert [p.kept_tokens for p in report.plans] == [p.kept_tokens for p in plain_report.plans]
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_importing_lemo_lets_dynamo_keep_checkpointed_layers_with_side_effects():
    """transformers >= 5.25 (through the `kernels` package it requires) wraps attention forwards
    in a context-variable set and reset, which Dynamo refuses inside an activation checkpoint
    unless told not to replay forward side effects in the backward; without that every
    checkpointed layer is a graph break and the checkpointing tests here fail (they did on a
    fresh install of 5.25). Importing lemo sets it: checked here, whichever transformers is
    installed (a stand-in for the wrapper outside transformers did not reproduce Dynamo's
    refusal, so the behaviour itself is covered by the checkpointing tests on 5.25)."""
    import subprocess
    import sys

    flag = "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint"
    code = f"import torch; before = {flag}; import lemo_compile; print(before, {flag})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_gradient_checkpointing_with_peft_lora_gives_the_same_results():
    """With frozen embeddings, HF's gradient checkpointing makes the embedding output require grad
    through a hook that Dynamo cannot keep in one graph (fullgraph=True fails, whatever the
    backend): the embedding is split off, and lemo rewrites the graph that holds the layers."""
    # two layers (layer 0 dense, layer 1 sparse): PEFT under checkpointing traces slowly
    loss, grads, report = _checkpointed_step(True, lora=True, fullgraph=False, layers=2)
    plain_loss, plain_grads, plain_report = _checkpointed_step(False, lora=True, fullgraph=False,
                                                               layers=2)
    assert report.counters["sparse_layers"] == plain_report.counters["sparse_layers"] == 1
    assert not report.warnings
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    adapters = {name: grad for name, grad in grads.items() if grad is not None}
    assert adapters and all("lora_" in name for name in adapters)
    for name, grad in adapters.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_attention_mask_draws_no_warning():
    """Padding is kept out of selection (tests/test_padding.py), so a mask is no cause to warn."""
    model = tiny_llama()
    ids = token_batch(2, 128)
    backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lemo_compile.LemoWarning)
        torch.compile(model, backend=backend)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              labels=ids)
    assert backend.reports[-1].counters["sparse_layers"] == 3
    assert all(p.padded for p in backend.reports[-1].plans)


def test_bf16_autocast_matches_the_reference_under_autocast():
    """A float32 model trained under bf16 autocast: lemo's graph against the eager reference run
    under the same autocast (bf16 tolerances: the two round at different places)."""
    from reference import lemo_forward

    model = tiny_llama()
    ids = token_batch(2, 150)
    backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": None})
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = lemo_forward(model, ids, ids, block_size=16, keep_ratio=0.4, dense_layers=[0])
    loss.backward()
    assert backend.reports[-1].counters["sparse_layers"] == 3
    torch.testing.assert_close(out.loss.float(), loss.float(), rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():  # measured when written: at most 0.8% of the scale
        scale = p.grad.abs().max()
        assert (got[name] - p.grad).abs().max() <= 0.02 * scale + 1e-6, name


def test_segmented_loss_under_bf16_autocast_matches_the_unsegmented_loss():
    """A float32 model under bf16 autocast with the segmented loss: the LM head runs in bf16 as
    autocast runs it (the op gets the head's operands cast to bf16), so every gradient below the
    head equals that of the same compile with the loss left unsegmented (measured when written: the
    same bits; with the head in float32 they differed by 0.5% of their scale), and the head's own,
    accumulated in bf16 segment by segment, is within bf16 rounding of it."""
    ids = token_batch(2, 150)
    results = []
    for segment in (None, 64):
        model = tiny_llama()
        backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": segment})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
        out.loss.backward()
        assert backend.reports[-1].counters.get("segmented_losses", 0) == (segment is not None)
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters()}))
    (want_loss, want), (loss, got) = results
    torch.testing.assert_close(loss, want_loss)
    for name, grad in want.items():
        assert got[name].dtype == torch.float32, name
        tolerance = 0.01 if name == "lm_head.weight" else 1e-3
        assert (got[name] - grad).abs().max() <= tolerance * grad.abs().max(), name


def _tiny_bank(mlp_layers=()):
    from lemo_compile.predictors import ModelSignature, PredictorBank

    torch.manual_seed(0)
    return PredictorBank(ModelSignature(64, 4, 16, 4, 16), [1, 2, 3], width=16, rank=4,
                         mlp_layers=mlp_layers).requires_grad_(False).eval()


@pytest.mark.parametrize("mlp", [{}, {"mlp": "tokens"}, {"mlp": "channels"}])
def test_predictor_scorer_in_checkpointed_layers_equals_unchecked(mlp):
    """The predictors' weights are inputs of the graph, passed on to each checkpointed layer's
    body; selections are saved, so the recomputation sees the forward's rows."""
    bank = _tiny_bank(mlp_layers=[1, 2, 3] if mlp.get("mlp") == "tokens" else ())
    loss, want, plain = _checkpointed_step(False, scorer="predictor", predictors=bank, **mlp)
    got_loss, got, report = _checkpointed_step(True, scorer="predictor", predictors=bank, **mlp)
    assert report.counters["sparse_layers"] == 3 and report.counters["dense_fallbacks"] == 0
    assert [p.kept_tokens for p in report.plans] == [p.kept_tokens for p in plain.plans]
    assert [p.mlp_kept_tokens for p in report.plans] == [p.mlp_kept_tokens for p in plain.plans]
    assert len(report.extra_inputs) == len(plain.extra_inputs) > 0
    assert not any("run dense" in w for w in report.warnings)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
