"""`lemo demo`'s measurements on a tiny setting (no Inductor): what it reports is what lemo saves."""

from __future__ import annotations

from lemo_compile.tools.demo import DemoSettings, format_table, run_variant


def test_demo_reports_the_activations_kept_for_backward():
    settings = DemoSettings(seq_len=256, steps=2, layers=4, hidden=64, block_size=16,
                            compiler="aot_eager", device="cpu")
    dense, lemo = run_variant("dense", settings), run_variant("lemo", settings)
    assert dense["kept_tokens"] == [] and lemo["kept_tokens"] == [256, 256, 112, 256]
    assert 0 < lemo["saved_bytes"] < dense["saved_bytes"]
    assert dense["cuda_peak_bytes"] is None
    table = format_table([dense, lemo], settings)
    saved = round(100 * (1 - lemo["saved_bytes"] / dense["saved_bytes"]))
    assert f"lemo keeps {saved}% fewer activation bytes for backward" in table
    assert "CUDA peak" not in table and "a reading" in table
