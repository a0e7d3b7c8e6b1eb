"""The GPU scripts in benchmarks/ are not run here; what can be checked of them without a GPU."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    # A script's folder comes first on sys.path, so a script named like an installed top-level
    # module (transformers >= 5.25 imports `kernels`) replaces it for every script beside it.
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts
    shadowing = [p.name for p in scripts if importlib.util.find_spec(p.stem) is not None]
    assert shadowing == []


def _script(name: str):
    """benchmarks/<name>.py as a module, loaded from its file with benchmarks/ on sys.path for
    its own imports of the other scripts, then taken off again with those imports: left there, it
    would make the test above see the scripts as installed modules."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"lemo_benchmarks_{name}",
                                                      BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
        scripts = {p.stem for p in BENCHMARKS.glob("*.py")}
        for imported in set(sys.modules) - before:
            if imported in scripts:
                del sys.modules[imported]
    return module


def test_selection_study_emulates_lemo_oracle_selection():
    """accuracy.py's `selection_study` runs sparse attention eagerly with its own selection; with
    lemo's oracle scores on a model with one sparse layer (the 4-layer default plan: layer 2) its
    loss must be lemo's compiled one, and its dense loss the plain model's."""
    import types

    import torch

    from conftest import tiny_llama

    accuracy = _script("accuracy")
    args = types.SimpleNamespace(long=128, eval_windows=2, batch=2, seed=0, block_size=16,
                                 compiler="aot_eager", keep_ratio=0.4)
    held_out = torch.randint(0, 101, (4000,), generator=torch.Generator().manual_seed(0))
    held_out = held_out.to(torch.uint8)  # a byte corpus, within the tiny model's vocabulary
    device = torch.device("cpu")
    model = tiny_llama(layers=4)
    batches = [accuracy.held_out_windows(held_out, args)[:2]]  # fitting windows for "update-learned"
    study = accuracy.selection_study(model, held_out, batches, args, device, draws=2)
    lemo = accuracy.sparse_eval(model, accuracy.lemo_options("oracle", args), held_out, args,
                                device)
    assert abs(study["dense"] - lemo["dense"]) <= 1e-5 * lemo["dense"]
    assert abs(study["oracle"] - lemo["sparse"]) <= 1e-5 * lemo["sparse"]
    assert abs(study["oracle"] - study["dense"]) > 1e-4 * study["dense"]  # the selection mattered
    assert len(study["random"]) == 2 and study["random"][0] != study["random"][1]
    assert study["update"] != study["dense"]
    assert study["update-learned"] != study["dense"]
    assert 0.0 <= study["update-learned recall"] <= 1.0


def test_gradient_study_emulates_lemo_backward():
    """accuracy.py's `gradient_study` differentiates its eager emulation of sparse attention; with
    lemo's oracle selection on a model with one sparse layer (layer 2 of 4) the gradients over the
    q/k/v/o weights must be lemo's compiled ones, layer by layer, and differ from the dense ones."""
    import types

    import torch

    import lemo_compile
    from conftest import tiny_llama
    from lemo_compile import ops
    from lemo_compile.predictors.calibrate import oracle_scores

    accuracy = _script("accuracy")
    args = types.SimpleNamespace(seed=0, block_size=16, compiler="aot_eager", keep_ratio=0.4)
    options = accuracy.lemo_options("oracle", args)
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 101, (2, 128), generator=torch.Generator().manual_seed(1))
    (sigma,), kept = oracle_scores(model, [ids], options=options)
    assert list(sigma) == [2]
    rows = {2: ops.select_tokens(sigma[2], kept[2], args.block_size, ids.shape[1])}
    weights = accuracy.attention_weights(model)
    for p in model.parameters():
        p.requires_grad_(p in set(weights))
    model.eval()
    loss, emulated, _ = accuracy.attention_weight_gradient(model, ids, rows)
    _, dense, _ = accuracy.attention_weight_gradient(model, ids, {})
    torch._dynamo.reset()
    model.train()
    compiled = torch.compile(model, backend=lemo_compile.LemoBackend(options))
    lemo_loss = compiled(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(lemo_loss, weights)
    torch._dynamo.reset()
    assert abs(loss - lemo_loss.item()) <= 1e-5 * loss
    for layer in range(4):
        lemo_grad = torch.cat([g.flatten() for g in grads[4 * layer: 4 * layer + 4]])
        torch.testing.assert_close(emulated[layer], lemo_grad, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(emulated[layer], dense[layer], rtol=1e-3, atol=1e-6)

    next_ids = torch.randint(0, 101, (2, 128), generator=torch.Generator().manual_seed(2))
    study = accuracy.gradient_study(model, ids, args, torch.device("cpu"), draws=2,
                                    next_ids=next_ids)
    assert study["oracle"]["loss"] == loss
    assert study["dense norm"]["all"] == pytest.approx(torch.cat(dense).norm().item(), rel=1e-5)
    assert study["groups"] == {"all": [0, 1, 2, 3], "below": [0, 1], "sparse": [2], "above": [3]}
    for reading in (study["oracle"], study["update"], study["taylor"], *study["random"],
                    study["random, mean of draws"]):
        assert all(-1.0 <= c < 0.9999 for c in reading["cosine"].values())
        assert all(r > 0.0 for r in reading["norm ratio"].values())
    assert study["random"][0]["loss"] != study["random"][1]["loss"]
    for name in ("oracle", "update", "taylor"):
        assert all(-1.0 <= c < 0.9999 for c in study[name]["cosine with random"].values())
    carried = study["carried over"]
    assert all(-1.0 <= carried[key] < 0.9999
               for key in ("difference cosine", "sparse cosine", "corrected cosine"))
    assert carried["corrected cosine"] != carried["sparse cosine"]
    assert "carried to the next batch" in accuracy._gradient_text(study)  # the printed line


def test_corrected_steps_follow_the_dense_trajectory_when_the_difference_is_constant():
    """accuracy.py's `corrected_steps`: with a sparse loss whose gradient is the dense one plus a
    constant, every step after a reference step subtracts exactly that constant, so SGD follows
    the dense run step for step, where stepping on the sparse gradient does not; the losses
    returned are the dense ones on reference steps and the sparse ones between. Without
    `subtract` ("interleaved") it is plain SGD on the dense loss every period-th step and on the
    sparse loss between."""
    import types

    import torch

    accuracy = _script("accuracy")
    target, shift = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -0.4])
    batches = [torch.full((1, 4), k + 1) for k in range(7)]

    def run(weight: torch.Tensor, shifted: bool):
        def forward(input_ids, labels):
            loss = ((weight - target * input_ids.float().mean()) ** 2).sum()
            return types.SimpleNamespace(loss=loss + (weight * shift).sum() if shifted else loss)
        return forward

    def trajectory(sparse_shifted: bool, corrected: bool, subtract: bool = True,
                   dense_every: int = 0) -> tuple[torch.Tensor, list[float]]:
        weight = torch.zeros(3, requires_grad=True)
        optimizer = torch.optim.SGD([weight], lr=0.1)
        if corrected:
            return weight, accuracy.corrected_steps(
                run(weight, sparse_shifted), run(weight, False), [weight], batches, optimizer,
                torch.device("cpu"), period=3, subtract=subtract)
        losses = []
        for step, ids in enumerate(batches):
            dense_step = dense_every and step % dense_every == 0
            loss = run(weight, sparse_shifted and not dense_step)(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return weight, losses

    dense_end, dense_losses = trajectory(sparse_shifted=False, corrected=False)
    corrected_end, losses = trajectory(sparse_shifted=True, corrected=True)
    sparse_end, _ = trajectory(sparse_shifted=True, corrected=False)
    torch.testing.assert_close(corrected_end, dense_end)
    assert not torch.allclose(sparse_end, dense_end, atol=1e-3)
    assert losses[3] == pytest.approx(dense_losses[3])  # a reference step: the dense loss
    assert losses[4] != pytest.approx(dense_losses[4])  # between: the sparse loss
    # "interleaved" (nothing subtracted): the dense step every third step, the sparse between
    interleaved_end, interleaved_losses = trajectory(True, corrected=True, subtract=False)
    expected_end, expected_losses = trajectory(True, corrected=False, dense_every=3)
    torch.testing.assert_close(interleaved_end, expected_end)
    assert interleaved_losses == pytest.approx(expected_losses)
    assert not torch.allclose(interleaved_end, dense_end, atol=1e-3)


def test_frontier_prices_a_run_at_another_keep_ratio_at_that_keep_ratio():
    """An accuracy run with --keep-ratio 0.2 gives its own points, priced from keep-0.2 rows; the
    default run's oracle is priced from keep-0.4 rows, and dense keeps its own name."""
    import argparse

    frontier = _script("frontier")

    def run(keep, gaps):
        rows = [{"variant": "dense", "held_out_loss": 1.0, "base_keep_ratio": keep,
                 "passkey": {"0.0": 1.0}}]
        rows += [{"variant": v, "held_out_loss": 1.0 + g, "base_keep_ratio": keep,
                  "passkey": {"0.0": 0.5}} for v, g in gaps.items()]
        return [(f"run{keep}", row) for row in rows]

    points = frontier.accuracy_points(run(0.4, {"oracle": 0.05}) + run(0.2, {"oracle": 0.1}))
    assert set(points) == {"dense", "oracle", "oracle, keep 0.2"}
    assert points["oracle, keep 0.2"]["gaps"] == [("run0.2", pytest.approx(10.0))]

    def row(variant, keep, step, peak):
        return ("lc", {"variant": variant, "seq_len": 16384, "layers": 32, "checkpointing": False,
                       "keep_ratio": keep, "step_s": step, "peak_gb": peak})

    rows = [row("liger", None, 1.0, 100.0), row("lemo", 0.4, 0.8, 70.0), row("lemo", 0.2, 0.6, 50.0)]
    args = argparse.Namespace(seq_len=16384, layers=32, checkpointing=False)
    saved_04, _ = frontier.cost("oracle", 0.4, rows, args)
    saved_02, _ = frontier.cost("oracle", 0.2, rows, args)
    assert saved_04["step"] == pytest.approx(20.0) and saved_04["peak"] == pytest.approx(30.0)
    assert saved_02["step"] == pytest.approx(40.0) and saved_02["peak"] == pytest.approx(50.0)
    missing, why = frontier.cost("oracle", 0.3, rows, args)
    assert missing is None and "keep 0.3" in why

    # "corrected" is labelled and priced by its own --correction-period (rows before the field:
    # the default, 4): a dense pass on one step in that many, besides the sparse one
    corrected = [("c", {"variant": "dense", "held_out_loss": 1.0, "passkey": {"0.0": 1.0}})] + [
        ("c", {"variant": "corrected", "held_out_loss": 1.01, "passkey": {"0.0": 1.0}, **extra})
        for extra in ({}, {"correction_period": 2})]
    points = frontier.accuracy_points(corrected)
    assert points["corrected"]["period"] == 4 and points["corrected, period 2"]["period"] == 2
    rows.append(("lc", {**row("lemo-base", 1.0, 1.2, 60.0)[1], "checkpointing": True}))
    every_4th, _ = frontier.cost("corrected", 0.4, rows, args, 4)
    every_2nd, _ = frontier.cost("corrected", 0.4, rows, args, 2)
    assert every_4th["step"] == pytest.approx(100 * (1 - (0.8 + 1.2 / 4)))
    assert every_2nd["step"] == pytest.approx(100 * (1 - (0.8 + 1.2 / 2)))
    assert every_2nd["peak"] == pytest.approx(30.0)
    # its control "interleaved" runs the dense step instead of a sparse one, not besides it
    interleaved, _ = frontier.cost("interleaved", 0.4, rows, args, 2)
    assert interleaved["step"] == pytest.approx(100 * (1 - (0.8 / 2 + 1.2 / 2)))


def test_long_context_summary_prefers_timed_runs_then_fit_checks_then_out_of_memory():
    """Per (length, checkpointing, system): the fastest timed run; a fit check (no step time) only
    where nothing was timed, shown as fitting with its peak; out of memory only where nothing fit;
    padded rows never."""
    summary = _script("summarize_long_context")

    def row(variant, length, step, peak=50.0, **extra):
        return {"variant": variant, "seq_len": length, "layers": 32, "checkpointing": True,
                "step_s": step, "peak_gb": peak, **extra}

    rows = [row("liger", 65536, 14.0), row("liger", 65536, None, fit_only=True),
            row("lemo", 65536, 10.0), row("lemo-tokens", 65536, 9.0),
            row("lemo-tokens", 65536, 5.0, padding=0.5),
            row("liger", 262144, None, 136.6, fit_only=True),
            row("lemo", 262144, None, error="out of memory"),
            row("lemo", 262144, None, 121.5, fit_only=True),
            row("liger", 524288, None, error="out of memory")]
    best = summary.best_rows(rows)
    assert best[(65536, True, "HF + Liger")]["step_s"] == 14.0
    assert best[(65536, True, "lemo")]["variant"] == "lemo-tokens"
    assert best[(65536, True, "lemo")]["step_s"] == 9.0
    assert best[(262144, True, "lemo")]["peak_gb"] == 121.5
    assert best[(524288, True, "HF + Liger")]["error"] == "out of memory"
    table = summary.markdown(best, {32}, ["x.jsonl"], None)
    assert "| 262,144 | yes |  | liger: fits, 136.6 GB |  | lemo: fits, 121.5 GB |" in table
    assert "| 524,288 | yes |  | out of memory |  |  |" in table


def test_summaries_refuse_rows_of_two_gpus():
    harness = _script("harness")
    h200 = {"variant": "liger", "device": "NVIDIA H200"}
    assert harness.one_device([h200, {"variant": "lemo", "error": "out of memory"}]) == "NVIDIA H200"
    with pytest.raises(ValueError, match="several GPUs"):
        harness.one_device([h200, {"variant": "lemo", "device": "NVIDIA H100 80GB HBM3"}])


def test_every_accuracy_variant_is_priced_or_says_why_not():
    """frontier.py prices each of accuracy.py's variants from its phases, or names why it is not
    priced: a new variant cannot drop off the frontier unnoticed."""
    frontier = _script("frontier")
    accuracy = _script("accuracy")
    unaccounted = [v for v in accuracy.VARIANTS
                   if v not in frontier.COST_OF and v not in accuracy.PERIODIC
                   and v not in frontier.UNPRICED]
    assert unaccounted == []
    for variant, phases in frontier.COST_OF.items():
        assert sum(share for share, *_ in phases) == pytest.approx(1.0), variant
    # a schedule's priced phases are the phases it fine-tunes with (COST_OF restates them)
    for variant in accuracy.SCHEDULES:
        schedule = accuracy.schedule_of(variant, {"keep_ratio": 0.4})
        starts = schedule.boundaries(40) + [40]
        run = [(round((starts[i + 1] - starts[i]) / 40, 6), p.options["keep_ratio"],
                p.gradient_checkpointing) for i, p in enumerate(schedule.phases)]
        priced = [(round(share, 6), keep, checkpointing)
                  for share, _, keep, checkpointing in frontier.COST_OF[variant]]
        assert run == priced, variant


def test_rising_and_its_control_run_the_same_phases_in_another_order():
    """`warmup-then-dense` keeps as many tokens as `rising` (keep 0.7 for a quarter of the steps,
    0.4 for half, dense with checkpointing for the last quarter), its keep-0.7 phase first."""
    accuracy = _script("accuracy")

    def phases(variant):
        schedule = accuracy.schedule_of(variant, {"keep_ratio": 0.4})
        starts = schedule.boundaries(40) + [40]
        return [(starts[i + 1] - starts[i], p.options["keep_ratio"], p.gradient_checkpointing)
                for i, p in enumerate(schedule.phases)]

    assert phases("rising") == [(20, 0.4, None), (10, 0.7, None), (10, 1.0, True)]
    assert phases("warmup-then-dense") == [(10, 0.7, None), (20, 0.4, None), (10, 1.0, True)]
    assert phases("rising-90") == [(26, 0.4, None), (10, 0.7, None), (4, 1.0, True)]
