"""The GPU scripts in benchmarks/ are not run here; what can be checked of them without a GPU."""

from __future__ import annotations

import importlib.util
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    # A script's folder comes first on sys.path, so a script named like an installed top-level
    # module (transformers >= 5.25 imports `kernels`) replaces it for every script beside it.
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts
    shadowing = [p.name for p in scripts if importlib.util.find_spec(p.stem) is not None]
    assert shadowing == []


def _accuracy_script():
    """benchmarks/accuracy.py as a module (loaded from its file: putting benchmarks/ on sys.path
    would make the test above see the scripts as installed modules)."""
    spec = importlib.util.spec_from_file_location("lemo_benchmarks_accuracy",
                                                  BENCHMARKS / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_study_emulates_lemo_oracle_selection():
    """accuracy.py's `selection_study` runs sparse attention eagerly with its own selection; with
    lemo's oracle scores on a model with one sparse layer (the 4-layer default plan: layer 2) its
    loss must be lemo's compiled one, and its dense loss the plain model's."""
    import types

    import torch

    from conftest import tiny_llama

    accuracy = _accuracy_script()
    args = types.SimpleNamespace(long=128, eval_windows=2, batch=2, seed=0, block_size=16,
                                 compiler="aot_eager")
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
