"""The accuracy/cost frontier: what each fine-tuning setting costs in accuracy (`accuracy.py`)
against what it saves at the Llama-3-8B shape (`long_context.py`), to choose defaults on.

Accuracy: per `accuracy.py` run (one file: one pretraining), each variant's held-out loss gap to
that run's dense LoRA, in percent, and its mean passkey retrieval; a variant's point is the mean
gap over the runs that have it (each run's gap is listed too). A run at another `--keep-ratio`
than lemo's 0.4 gives its own points ("oracle, keep 0.2"), priced with that keep ratio in the
variant's sparse phases.

Cost: the step time and peak memory saved against HF + Liger-Kernel (what users run for dense
LoRA) at one length and checkpointing setting (`--seq-len`, `--checkpointing`, `--layers`), read
from the long-context row of the set-up that runs the variant (`COST_OF`) against the HF + Liger
row of the same run (one `--out` file; that row at the setting's checkpointing, whatever a phase
runs with); a schedule's from its phases: step time weighted by the phases' shares of the steps,
peak the largest phase's. A schedule's dense phase with checkpointing at a setting without it
needs both in one file: `long_context.py` run twice with the same `--out`, once with
`--checkpointing`. A variant whose set-up has no row there is listed with its
cost missing, never estimated; a variant missing from `COST_OF` (random blocks: a baseline, not a
setting to choose) has no cost.
Long-context rows without a `keep_ratio` field ran with the script's default, 0.4. They must come
from one GPU (`harness.one_device`).

Of several matching long-context rows the last one read counts: give the files oldest first.

    python benchmarks/frontier.py --accuracy benchmarks/results/accuracy_8x512_*.jsonl \\
        --long-context benchmarks/results/long_context_32layers_16k.jsonl \\
        benchmarks/results/long_context_32layers_16k_recast.jsonl \\
        benchmarks/results/long_context_32layers_16k_predictor.jsonl \\
        benchmarks/results/long_context_32layers_16k_keep06.jsonl --seq-len 16384 \\
        --markdown docs/frontier.md --plot docs/frontier.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from accuracy import (CORRECTION_PERIOD, DEFAULT_KEEP_RATIO, KEEPS_ITS_OWN, LOSS_WEIGHTS, PERIODIC,
                      SPARSE_FROM)
from harness import add_summary_arguments, one_device, write_summary


def periodic_phases(variant: str, period: int) -> list[tuple[float, str, float | None, bool | None]]:
    """accuracy.py's "corrected" or "interleaved" at `--correction-period` period: one step in
    `period` dense; the others sparse, and for "corrected" that step too (its shares add to
    1 + 1 / period)."""
    sparse = 1.0 if variant == "corrected" else 1 - 1 / period
    return [(sparse, "lemo", 0.4, None), (1 / period, "lemo-base", 1.0, True)]


# accuracy.py variant -> its phases: (share of the steps, long_context.py variant, keep ratio
# (None without lemo), gradient checkpointing or None for the --checkpointing setting). The dense
# phase of a schedule runs with gradient checkpointing (`SparsitySchedule.sparse_then_dense`), on
# lemo's compiled base. "corrected" and "interleaved" are priced at their own period instead
# (`periodic_phases`).
COST_OF: dict[str, list[tuple[float, str, float | None, bool | None]]] = {
    "dense": [(1.0, "liger", None, None)],
    "oracle": [(1.0, "lemo", 0.4, None)],
    "explore": [(1.0, "lemo", 0.4, None)],  # the oracle plus a [B, n] random draw per layer
    "edges": [(1.0, "lemo", 0.4, None)],  # the oracle with two blocks' scores overwritten
    "distance": [(1.0, "lemo", 0.4, None)],  # the oracle plus O(n^2) work on its [B, n, n] tiles
    "predictor": [(1.0, "lemo-predictor", 0.4, None)],
    "tokens": [(1.0, "lemo-tokens", 0.4, None)],
    "channels": [(1.0, "lemo-channels", 0.4, None)],
    "keep06": [(1.0, "lemo", 0.6, None)],
    "then-dense": [(0.75, "lemo", 0.4, None), (0.25, "lemo-base", 1.0, True)],
    "then-dense-kept-loss": [(0.75, "lemo", 0.4, None), (0.25, "lemo-base", 1.0, True)],
    "then-dense-random": [(0.75, "lemo-random", 0.4, None), (0.25, "lemo-base", 1.0, True)],
    "then-dense-90": [(0.9, "lemo", 0.4, None), (0.1, "lemo-base", 1.0, True)],
    "warmup": [(0.25, "lemo", 0.7, None), (0.75, "lemo", 0.4, None)],
    "rising": [(0.5, "lemo", 0.4, None), (0.25, "lemo", 0.7, None), (0.25, "lemo-base", 1.0, True)],
    "warmup-then-dense": [(0.25, "lemo", 0.7, None), (0.5, "lemo", 0.4, None),
                          (0.25, "lemo-base", 1.0, True)],
    "rising-90": [(0.65, "lemo", 0.4, None), (0.25, "lemo", 0.7, None),
                  (0.1, "lemo-base", 1.0, True)],
    # the layer sweep: the oracle's set-up at the same share of the depth (`--sparse-from`)
    **{variant: [(1.0, "lemo", 0.4, None)] for variant in SPARSE_FROM},
    # loss weighting: the oracle's set-up plus a [B, S] weight per token in the loss
    **{variant: [(1.0, "lemo", 0.4, None)] for variant in LOSS_WEIGHTS},
}
BASELINE = "liger"
# variants with no cost, and why
UNPRICED = {"random": "a baseline, not a setting", "random-fresh": "a baseline, not a setting",
            "random-kept-loss": "a baseline, not a setting",
            "layerwise": "per-layer keep ratios: not run by long_context.py",
            "output": "an oracle for measuring (each sparse layer's attention runs twice)"}


def read(files: list[str]) -> list[tuple[str, dict]]:
    return [(name, json.loads(line)) for name in files for line in open(name) if line.strip()]


def accuracy_points(rows: list[tuple[str, dict]]) -> dict[str, dict]:
    """point -> {"variant", "keep": the run's --keep-ratio, "period": the --correction-period of
    "corrected" and "interleaved" (else None), "gaps": [(file, % gap to that file's dense LoRA)],
    "passkey": [mean per run]}; a point is the variant's name, followed by ", keep K" for a run at
    another --keep-ratio than lemo's default (variants that keep their own ratio excepted) and
    ", period P" for those two at another period than the default."""
    dense = {name: row["held_out_loss"] for name, row in rows if row["variant"] == "dense"}
    points: dict[str, dict] = {}
    for name, row in rows:
        if name not in dense or row["variant"].startswith("base") or "held_out_loss" not in row:
            continue
        variant, keep = row["variant"], row.get("base_keep_ratio", DEFAULT_KEEP_RATIO)
        if variant in KEEPS_ITS_OWN:
            keep = DEFAULT_KEEP_RATIO
        period = row.get("correction_period", CORRECTION_PERIOD) if variant in PERIODIC else None
        label = (variant + ("" if keep == DEFAULT_KEEP_RATIO else f", keep {keep:g}")
                 + ("" if period in (None, CORRECTION_PERIOD) else f", period {period}"))
        point = points.setdefault(label, {"variant": variant, "keep": keep, "period": period,
                                          "gaps": [], "passkey": []})
        point["gaps"].append((os.path.basename(name), 100 * (row["held_out_loss"] / dense[name] - 1)))
        point["passkey"].append(statistics.mean(row["passkey"].values()))
    return points


def _keep_ratio(row: dict) -> float | None:
    """A long-context row's keep ratio; rows from before the field ran with the defaults."""
    if "keep_ratio" in row:
        return row["keep_ratio"]
    if not row["variant"].startswith("lemo"):
        return None
    return 1.0 if row["variant"] == "lemo-base" else 0.4


def _sparse_from(row: dict) -> float:
    """Where a long-context row's sparse layers start, as a share of the depth (lemo's default
    plan, 0.5, for rows from before `--sparse-from`)."""
    return 0.5 if row.get("sparse_from") is None else row["sparse_from"]


def cost(variant: str, keep_ratio: float, rows: list[tuple[str, dict]], args,
         period: int | None = None) -> tuple[dict | None, str]:
    """({"step": % saved, "peak": % saved, "files": the rows' files} against HF + Liger, "") or
    (None, what is missing), for `variant` fine-tuned at --keep-ratio `keep_ratio` (and, for
    "corrected" and "interleaved", --correction-period `period`, None for the default). Each phase
    is compared with the HF + Liger row of its own run (file), so that readings of different runs
    are not mixed; of several matching rows the last one read counts."""
    phases = (periodic_phases(variant, period or CORRECTION_PERIOD) if variant in PERIODIC
              else COST_OF.get(variant))
    if phases is None:
        return None, UNPRICED.get(variant, "no cost mapped in COST_OF")
    # COST_OF's sparse phases name lemo's default keep ratio: a run at another is priced at its own
    phases = [(share, name, keep_ratio if keep == DEFAULT_KEEP_RATIO else keep, checkpointing)
              for share, name, keep, checkpointing in phases]
    sparse_from = SPARSE_FROM.get(variant, 0.5)

    def find(name: str, keep: float | None, checkpointing: bool,
             file: str | None = None) -> tuple[str, dict] | None:
        for where, row in reversed(rows):
            if ((file is None or where == file) and row["variant"] == name
                    and row["seq_len"] == args.seq_len and row["layers"] == args.layers
                    and row["checkpointing"] == checkpointing and _keep_ratio(row) == keep
                    and (keep in (None, 1.0) or _sparse_from(row) == sparse_from)
                    and "error" not in row and not row.get("padding")
                    and not row.get("fit_only")):
                return where, row
        return None

    step = peak = 0.0
    missing, files = [], set()
    for share, name, keep, checkpointing in phases:
        with_checkpointing = args.checkpointing if checkpointing is None else checkpointing
        found = find(name, keep, with_checkpointing)
        # the baseline is dense LoRA as users run it at this setting, whatever the phase runs
        baseline = found and find(BASELINE, None, args.checkpointing, found[0])
        if not found or not baseline:
            setting = (f"{name}, keep {keep}{', checkpointing' if with_checkpointing else ''}"
                       + (f", sparse from {sparse_from}" if sparse_from != 0.5 else ""))
            missing.append(setting if not found else f"{BASELINE} in the run of {setting}")
            continue
        (file, row), (_, liger) = found, baseline
        files.add(os.path.basename(file))
        step += share * row["step_s"] / liger["step_s"]
        peak = max(peak, row["peak_gb"] / liger["peak_gb"])
    if missing:
        return None, "no row for " + "; ".join(missing)
    return {"step": 100 * (1 - step), "peak": 100 * (1 - peak), "files": sorted(files)}, ""


def markdown(points: dict, costs: dict, args, plot_name: str | None) -> str:
    setting = (f"{args.layers} layers, {args.seq_len:,} tokens, "
               f"{'with' if args.checkpointing else 'without'} gradient checkpointing")
    lines = ["# Accuracy against cost", "",
             "Generated by `benchmarks/frontier.py` from " + ", ".join(
                 f"`{os.path.basename(n)}`" for n in args.accuracy) + " (accuracy, "
             "`benchmarks/results/`). Loss gap: held-out loss against dense LoRA in the same run; "
             f"saved: against HF + Liger-Kernel at {setting}, from the long-context rows named in "
             "the last column (the README gives machines, dates and commands).", "",
             "| variant | loss gap (mean) | per run | passkey (mean per run) | step time saved | "
             "peak saved | cost from |", "|---|---|---|---|---|---|---|"]
    for variant, point in sorted(points.items(), key=lambda item: statistics.mean(
            g for _, g in item[1]["gaps"])):
        gaps = [g for _, g in point["gaps"]]
        saved, why = costs[variant]
        lines.append(
            f"| {variant} | {statistics.mean(gaps):+.1f}% | "
            + ", ".join(f"{g:+.1f}%" for g in gaps) + " | "
            + ", ".join(f"{p:.2f}" for p in point["passkey"]) + " | "
            + (f"{saved['step']:.0f}% | {saved['peak']:.0f}% | {', '.join(saved['files'])} |"
               if saved else f" | | {why} |"))
    if plot_name:
        lines += ["", f"![loss gap against time and memory saved]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(points: dict, costs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, key, name in ((axes[0], "step", "step time saved (%)"),
                            (axes[1], "peak", "peak memory saved (%)")):
        for variant, point in points.items():
            saved = costs[variant][0]
            if saved is None:
                continue
            gaps = [g for _, g in point["gaps"]]
            axis.scatter([saved[key]] * len(gaps), gaps, color="0.7", s=12)
            axis.scatter(saved[key], statistics.mean(gaps), s=30)
            axis.annotate(variant, (saved[key], statistics.mean(gaps)), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss gap to dense LoRA (%)")
    figure.suptitle("accuracy against cost (grey: single runs; best: low and to the right)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", nargs="+", required=True, help="accuracy.py JSON lines")
    parser.add_argument("--long-context", nargs="+", required=True,
                        help="long_context.py JSON lines")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--checkpointing", action="store_true")
    add_summary_arguments(parser)
    args = parser.parse_args()
    points = accuracy_points(read(args.accuracy))
    rows = read(args.long_context)
    try:
        one_device([row for _, row in rows])
    except ValueError as error:
        parser.error(str(error))
    costs = {label: cost(point["variant"], point["keep"], rows, args, point["period"])
             for label, point in points.items()}
    write_summary(args.markdown, args.plot,
                  lambda plot_name: markdown(points, costs, args, plot_name),
                  lambda path: plot(points, costs, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
