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
