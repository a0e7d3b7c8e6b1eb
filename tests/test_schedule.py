"""Sparsity schedules (`lemo_compile/schedule.py`): phase arithmetic, one compilation per phase in a
plain loop and under the HF Trainer, gradient checkpointing switched by a phase, and a dense phase
that computes what the plain model computes."""

from __future__ import annotations

import warnings

import pytest
import torch

import lemo_compile
from conftest import tiny_llama, token_batch
from lemo_compile import Phase, SparsitySchedule

OPTIONS = {"compiler": "aot_eager", "block_size": 16, "dense_layers": [0]}


def test_phase_boundaries_from_fractions_and_steps():
    schedule = SparsitySchedule([Phase(fraction=0.75), Phase({"keep_ratio": 1.0})], total_steps=10)
    assert schedule.boundaries() == [0, 8]  # 7.5 rounds to 8
    assert [schedule.phase_at(step) for step in range(12)] == [0] * 8 + [1] * 4  # the last goes on
    assert schedule.boundaries(total_steps=100) == [0, 75]
    steps = SparsitySchedule([Phase(steps=3), Phase({"keep_ratio": 0.6}, steps=2),
                              Phase({"keep_ratio": 1.0})])
    assert steps.boundaries() == [0, 3, 5]
    assert [steps.phase_at(step) for step in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    thirds = SparsitySchedule([Phase(fraction=1 / 3), Phase(fraction=1 / 3), Phase(fraction=1 / 3)])
    assert thirds.boundaries(total_steps=10) == [0, 3, 7]  # cumulative: no drift


def test_sparse_then_dense_drops_nothing_in_its_dense_phase():
    schedule = SparsitySchedule.sparse_then_dense(
        0.8, {"keep_ratio": 0.5, "mlp": "channels", "mlp_keep_ratio": 0.3})
    sparse, dense = schedule.configs
    assert (sparse.keep_ratio, sparse.mlp, sparse.mlp_keep_ratio) == (0.5, "channels", 0.3)
    assert (dense.keep_ratio, dense.mlp, dense.mlp_keep_ratio) == (1.0, "off", None)
    assert [p.gradient_checkpointing for p in schedule.phases] == [None, True]
    assert schedule.boundaries(total_steps=10) == [0, 8]


@pytest.mark.parametrize("make, message", [
    (lambda: Phase(steps=2, fraction=0.5), "not both"),
    (lambda: Phase(fraction=1.5), "fraction"),
    (lambda: Phase(steps=0), "steps"),
    (lambda: Phase(gradient_checkpointing="yes"), "gradient_checkpointing"),
    (lambda: SparsitySchedule([]), "non-empty"),
    (lambda: SparsitySchedule([Phase(), Phase()]), "no length"),
    (lambda: SparsitySchedule([Phase(fraction=0.8), Phase(fraction=0.5)]), "more than the whole"),
    (lambda: SparsitySchedule([Phase({"keep_ratio": 2.0})]), "keep_ratio"),
    (lambda: SparsitySchedule([Phase()], total_steps=0), "total_steps"),
    (lambda: SparsitySchedule([Phase(fraction=0.5), Phase()]).phase_at(0), "total_steps"),
])
def test_schedule_errors_are_clear(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_apply_refuses_a_compiled_model_and_checkpointing_without_hf():
    schedule = SparsitySchedule([Phase(OPTIONS)])
    with pytest.raises(TypeError, match="not the result of torch.compile"):
        schedule.apply(torch.compile(tiny_llama(), backend="eager"), 0)
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        SparsitySchedule([Phase(gradient_checkpointing=True)]).apply(torch.nn.Linear(2, 2), 0)


def _training_reports(backend):
    return [r for r in backend.reports if r.training]


def test_plain_loop_compiles_once_per_phase_and_ends_dense():
    model = tiny_llama()
    schedule = SparsitySchedule([
        Phase(OPTIONS, steps=2),
        Phase({**OPTIONS, "keep_ratio": 1.0}, gradient_checkpointing=True),
    ])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(2, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames checkpointing
        for step in range(5):
            assert schedule.apply(model, step) is model
            if step < 2:
                assert schedule.backends[1] is None
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sparse, dense = schedule.backends
        # one training graph per phase, whatever the number of steps in it
        assert [r.counters["sparse_layers"] for r in _training_reports(sparse)] == [3]
        assert [r.counters["sparse_layers"] for r in _training_reports(dense)] == [0]
        assert model.model.gradient_checkpointing
        # the dense phase computes the plain model: the loss and every gradient of the eager
        # forward (`model.forward` is not the compiled call)
        got = model(input_ids=ids, labels=ids).loss
        got.backward()
        got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        want = model.forward(input_ids=ids, labels=ids).loss
        want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert len(_training_reports(dense)) == 1  # and still no recompilation


def test_hf_trainer_callback_runs_the_phases_at_their_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    schedule = SparsitySchedule.sparse_then_dense(0.5, OPTIONS)
    seen = []
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
    )
    dataset = [{"input_ids": row, "labels": row} for row in token_batch(8, 128)]
    callback = schedule.callback()
    original = callback.on_step_begin

    def on_step_begin(args, state, control, **kwargs):
        original(args, state, control, **kwargs)
        seen.append((state.global_step, schedule.phase_at(state.global_step, state.max_steps),
                     kwargs["model"].model.gradient_checkpointing))

    callback.on_step_begin = on_step_begin
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    assert seen == [(0, 0, False), (1, 0, False), (2, 1, True), (3, 1, True)]
    sparse, dense = schedule.backends
    assert [r.counters["sparse_layers"] for r in _training_reports(sparse)] == [3]
    assert [r.counters["sparse_layers"] for r in _training_reports(dense)] == [0]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_a_phase_a_short_run_leaves_empty_is_reported():
    schedule = SparsitySchedule.sparse_then_dense(0.9, OPTIONS)
    assert schedule.empty_phases(total_steps=4) == [1]  # 3.6 rounds to 4: nothing left to be dense
    assert schedule.empty_phases(total_steps=10) == []
    filled = SparsitySchedule([Phase(steps=5), Phase(fraction=0.2), Phase()])
    assert filled.empty_phases(total_steps=5) == [1, 2]
    assert SparsitySchedule([Phase(steps=5), Phase()]).empty_phases() == []  # no total: unknown
    model = tiny_llama()
    with pytest.warns(lemo_compile.LemoWarning,
                      match=r"phase\(s\) \[2\] of 2 get no step of this 4-step"):
        schedule.apply(model, 0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lemo_compile.LemoWarning)
        schedule.apply(model, 1, 4)  # said once per run length
