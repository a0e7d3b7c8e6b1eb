"""lemo against what users run: LoRA fine-tuning steps at long lengths, side by side.

Model: a Llama built from a config with random bf16 weights (default the Llama-3-8B shape: hidden
4096, GQA 8 KV heads, MLP 14336, vocabulary 128,256; `--layers` sets the depth), LoRA r=8, alpha=16
on q/k/v/o (peft), batch 1, AdamW on the adapters; `--checkpointing` turns on HF's gradient
checkpointing (`use_reentrant=False`); `--padding F` left-pads the row by a fraction F and passes
the attention_mask (what a padded batch costs: transformers then builds a padding mask, and lemo
takes its exact masked path instead of `is_causal=True`); `--sparse-from F` runs the lemo
variants with their sparse layers from layer round(F * layers) to the second-to-last (the layer
sweep of accuracy.py; lemo's default plan is F = 0.5). Variants, each in its own process with
its own Inductor cache directory:

  hf              HF eager, SDPA attention, HF's loss
  liger           HF eager + Liger-Kernel (`apply_liger_kernel_to_llama`: RoPE, RMSNorm, SwiGLU,
                  fused linear cross-entropy): what a careful user runs today
  compile         torch.compile(model), Inductor, dense
  lemo-base       backend="lemo", keep_ratio=1.0: lemo's compiled base (fast attention, segmented
                  loss) with no token elimination
  lemo            backend="lemo", defaults (oracle, keep 0.4 in the sparse layers)
  lemo-save-attention  lemo with save_attention=True (with --checkpointing: attention outputs
                  kept for the backward, not recomputed)
  lemo-save-sparse  lemo with mlp="tokens" and save_sparse_layers=True (with --checkpointing:
                  sparse layers kept, not recomputed)
  lemo-tokens-save-attention  lemo with mlp="tokens" and save_attention=True
  lemo-tokens-save-dense-attention  lemo with mlp="tokens" and save_attention="dense"
                  (a dense layer's attention saves the most recomputation per byte)
  lemo-tokens-predictor-save-dense-attention  the same with scorer="predictor" (randomly
                  initialised attention and MLP predictors: their cost, not their accuracy)
  lemo-nofuse     lemo with fuse=False (selection's row movements left to Inductor)
  lemo-reuse      lemo with backward_buffer_reuse=True (the compiled backward keeps a freed buffer
                  allocated for Inductor's planned reuse, Inductor's default; lemo's default frees
                  it at its last use)
  lemo-longcasts  lemo with shorten_casts=False (the adapters' float32 copies left to Inductor:
                  under checkpointing, held across each layer's backward)
  lemo-swiglu-fused  lemo with swiglu_in_place=False (the SwiGLU backward left to Inductor's fused
                  kernel, which allocates one of its two outputs)
  lemo-tokens     lemo with mlp="tokens"
  lemo-random     lemo with scorer="random" (a fresh draw every step: no scoring pass)
  lemo-tokens-random-save-dense-attention  lemo-tokens-save-dense-attention with scorer="random"
  lemo-tokens-savecasts  lemo with mlp="tokens" and recompute_casts=False (the forward saves
                  the float32 copies of bf16 tensors that the backward reads, PEFT's adapters'
                  inputs, as the partitioner chooses, instead of the backward recomputing them)
  lemo-tokens-predictor  lemo with mlp="tokens" and scorer="predictor" (randomly initialised
                  attention and MLP predictors: their cost, not their accuracy)
  lemo-channels   lemo with mlp="channels"
  lemo-predictor  lemo with scorer="predictor" (randomly initialised predictors: their cost,
                  not their quality)

Per run: the first step (compilation included), the median of the steps after `--warmup` steps (the
second step of a compiled model is still slow, ~2x: warm-up, not the steady state), the CUDA peak over
all steps but the first, the loss of each step, and one more step under the profiler: the CUDA kernels that
run SDPA (flash, memory-efficient, cuDNN, or none for the math fallback), the 15 kernels of most
time, the GPU's busy time (`kernels_s`, against the profiled step's wall time), its longest idle
stretches and the CUDA runtime calls of most host time (`--trace-dir` also keeps Chrome traces). A
run that runs out of memory is reported as such; `--fit-only` runs one step and no profile,
for the longest length that fits (its peak is the first step's, compilation included). Prints a
table last and writes one JSON line per run to --out.

    python benchmarks/long_context.py --layers 16 --seq-lens 16384 --variants liger lemo-base lemo
    python benchmarks/long_context.py --layers 16 --seq-lens 65536 --checkpointing --variants liger lemo
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import statistics
import sys
import time

from harness import add_shape_arguments, dense_layers_of, forwarded, lora_llama, run_isolated

# Each lemo variant's options on top of keep_ratio (1.0 for lemo-base, --keep-ratio for the rest).
LEMO_VARIANT_OPTIONS: dict[str, dict] = {
    "lemo-base": {}, "lemo": {}, "lemo-predictor": {"scorer": "predictor"},
    "lemo-save-attention": {"save_attention": True},
    "lemo-save-sparse": {"mlp": "tokens", "save_sparse_layers": True},
    "lemo-tokens-save-attention": {"mlp": "tokens", "save_attention": True},
    "lemo-tokens-save-dense-attention": {"mlp": "tokens", "save_attention": "dense"},
    "lemo-tokens-predictor-save-dense-attention": {"mlp": "tokens", "scorer": "predictor",
                                                   "save_attention": "dense"},
    "lemo-nofuse": {"fuse": False},
    "lemo-reuse": {"backward_buffer_reuse": True},
    "lemo-longcasts": {"shorten_casts": False},
    "lemo-swiglu-fused": {"swiglu_in_place": False},
    "lemo-tokens": {"mlp": "tokens"},
    "lemo-tokens-savecasts": {"mlp": "tokens", "recompute_casts": False},
    "lemo-tokens-predictor": {"mlp": "tokens", "scorer": "predictor"},
    "lemo-random": {"scorer": "random"},
    "lemo-tokens-random-save-dense-attention": {"mlp": "tokens", "scorer": "random",
                                                "save_attention": "dense"},
    "lemo-channels": {"mlp": "channels"},
}
VARIANTS = ("hf", "liger", "compile", *LEMO_VARIANT_OPTIONS)
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "efficient", "cudnn", "attention", "sdpa")


def build_model(args):
    """The LoRA-wrapped Llama of the module docstring, on the GPU, in training mode."""
    import torch

    if args.variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    model = lora_llama(args, "cuda", torch.bfloat16)
    return model.train()


def keep_ratio_of(variant: str, keep_ratio: float) -> float | None:
    """The keep ratio a variant runs with: 1.0 for lemo-base, `keep_ratio` (--keep-ratio) for the
    other lemo variants, None for the set-ups without lemo."""
    if variant not in LEMO_VARIANT_OPTIONS:
        return None
    return 1.0 if variant == "lemo-base" else keep_ratio


def row_head(variant: str, seq_len: int, args) -> dict:
    """The fields that name a run in its JSON line, whatever its outcome."""
    return {"variant": variant, "seq_len": seq_len, "layers": args.layers,
            "checkpointing": args.checkpointing, "keep_ratio": keep_ratio_of(variant, args.keep_ratio),
            "sparse_from": args.sparse_from if variant in LEMO_VARIANT_OPTIONS else None}


def lemo_options(args) -> dict:
    import lemo_compile

    options: dict = {"keep_ratio": keep_ratio_of(args.variant, args.keep_ratio),
                     **LEMO_VARIANT_OPTIONS[args.variant]}
    if args.sparse_from is not None:
        options["dense_layers"] = dense_layers_of(args.sparse_from, args.layers)
    if options.get("save_attention") == "dense" and args.save_attention_layers:
        options["save_attention"] = args.save_attention_layers
    if options.get("scorer") == "predictor":
        from lemo_compile.predictors import ModelSignature, PredictorBank

        signature = ModelSignature(args.hidden, args.heads, args.hidden // args.heads, args.layers, 64)
        config = lemo_compile.LemoConfig(**{**options, "scorer": "oracle"})
        plans = lemo_compile.plan_layers(config, args.layers, args.seq_len)
        options["predictors"] = PredictorBank(signature, [p.layer for p in plans if p.sparse],
                                              mlp_layers=[p.layer for p in plans if p.mlp_sparse])
    return options


def run_one(args) -> dict:
    import torch

    model = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    backend = None
    step_model = model
    if args.variant == "compile":
        step_model = torch.compile(model)
    elif args.variant.startswith("lemo"):
        import lemo_compile

        backend = lemo_compile.LemoBackend(lemo_options(args))
        step_model = torch.compile(model, backend=backend)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    if args.padding:  # left padding: the exact masked path instead of is_causal=True
        pad = int(args.padding * args.seq_len)
        mask = torch.ones_like(ids)
        mask[:, :pad] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, pad] = -100  # the first real token would be predicted from padding
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def step():
        loss = step_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses, peak = [], [], 0
    steps = 1 if args.fit_only else args.warmup + args.steps
    for index in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        if index >= 1 or args.fit_only:
            peak = max(peak, torch.cuda.max_memory_allocated())
    result = {
        **row_head(args.variant, args.seq_len, args), "padding": args.padding,
        "first_step_s": times[0],
        "step_s": None if args.fit_only else statistics.median(times[args.warmup:]),
        "step_times_s": times, "fit_only": args.fit_only,
        "peak_gb": peak / 1e9, "losses": losses, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if backend is not None:  # every option the variant ran with, defaults included
        result["lemo_config"] = {
            field.name: value if isinstance(value, (bool, int, float, str, list, tuple, type(None)))
            else type(value).__name__
            for field in dataclasses.fields(backend.config)
            for value in [getattr(backend.config, field.name)]}
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if args.memory:
        result["live_at_peak"] = live_at_peak(step)
        if args.trace_dir and cache:  # the generated code the rows point into, to read them by
            for where in {row[2].split(":")[0] for row in result["live_at_peak"]}:
                for found in glob.glob(os.path.join(cache, "**", where), recursive=True):
                    shutil.copy(found, os.path.join(args.trace_dir, f"{args.variant}_{where}"))
    if args.fit_only:
        return result
    result.update(profile_step(step, args.trace_dir and os.path.join(
        args.trace_dir, f"{args.variant}_{args.seq_len}.json")))
    if backend is not None and backend.reports:
        report = max(backend.reports, key=lambda r: len(r.plans))
        result["kept_tokens"] = [p.kept_tokens for p in report.plans]
        counters: dict[str, int] = {}  # summed: with PEFT + checkpointing the model is 3 graphs
        for r in backend.reports:
            for name, value in r.counters.items():
                counters[name] = counters.get(name, 0) + value
        result["lemo_counters"] = counters
        result["lemo_warnings"] = [w for r in backend.reports for w in r.warnings]
    return result


def profile_step(step, trace: str | None = None) -> dict:
    """One step under the profiler (CPU and CUDA activity). Returns:

    attention_kernels: the CUDA kernels whose names say they compute attention, with their counts;
    top_kernels:       the 15 kernels of most total time (name, ms, count);
    kernels_s:         the GPU's busy time, the union of all kernel intervals, in seconds;
    profiled_step_s:   the wall time of the profiled step (against kernels_s: how idle the GPU is);
    gaps:              the 10 longest stretches with no kernel running (ms), each with the
                       innermost CPU op running when it began;
    runtime_calls:     CUDA runtime/driver calls by total host time (name, ms, count): syncs,
                       allocations and copies show up here.
    `trace`, if given, is a path the Chrome trace is written to.
    """
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - begin
    if trace:
        prof.export_chrome_trace(trace)
    found: dict[str, int] = {}
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    for event in kernels:
        name = event.key
        if any(word in name.lower() for word in ATTENTION_KERNEL_WORDS):
            found[name[:120]] = found.get(name[:120], 0) + event.count
    timed = sorted(kernels, key=lambda e: -_device_time(e))
    top = [(e.key[:120], _device_time(e) / 1e3, e.count) for e in timed[:15]]
    runtime = sorted((e for e in events if e.device_type == DeviceType.CPU
                      and e.key.startswith(("cuda", "cu"))), key=lambda e: -e.cpu_time_total)
    calls = [(e.key, e.cpu_time_total / 1e3, e.count) for e in runtime[:8]]

    spans, ops = [], []
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            spans.append((event.time_range.start, event.time_range.end))
        elif not event.key.startswith(("cuda", "cu")):
            ops.append((event.time_range.start, event.time_range.end, event.key))
    busy, gaps = busy_and_gaps(spans)
    described = []
    for length, at in sorted(gaps, reverse=True)[:10]:
        running = [(end - start, name) for start, end, name in ops if start <= at < end]
        described.append((round(length / 1e3, 3), min(running)[1][:100] if running else ""))
    return {"attention_kernels": found, "top_kernels": top, "kernels_s": busy / 1e6,
            "profiled_step_s": wall, "gaps": described, "runtime_calls": calls}


def live_at_peak(step, groups: int = 40) -> list[tuple[float, int, str]]:
    """One step with the CUDA allocator recording its history: the tensors live at the step's peak,
    grouped by where they were allocated (the innermost three Python frames outside torch's own
    modules), largest groups first, as (GB, count, where). An allocation in Inductor's generated
    code also shows that line and the four after it (the kernel that fills the buffer and the
    graph nodes it computes). Inductor reuses buffers (`bufN = bufM; del bufM  # reuse`): a row
    names where the memory was allocated, which may hold a later value of the same size at the
    peak; read the generated code (`--trace-dir` copies it) to know which."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    total, best, at_best = 0, -1, {}
    for event in snapshot["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _where(event.get("frames", [])))
            total += event["size"]
            if total > best:
                best, at_best = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    grouped: dict[str, list[int]] = {}
    for size, where in at_best.values():
        entry = grouped.setdefault(where, [0, 0])
        entry[0] += size
        entry[1] += 1
    rows = sorted(((size / 1e9, count, where) for where, (size, count) in grouped.items()),
                  reverse=True)
    return [(round(base / 1e9, 3), 0, "allocated before the step")] + [
        (round(gb, 3), count, where) for gb, count, where in rows[:groups]]


def _where(frames: list[dict]) -> str:
    """The innermost three frames of an allocation that are not torch's own code."""
    import linecache

    own = ("/torch/", "/contextlib.py", "/functools.py")
    kept = [f for f in frames if not any(part in f["filename"] for part in own)][:3]
    where = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in kept)
    if kept and kept[0]["name"] == "call" and "inductor" in kept[0]["filename"]:
        lines = [linecache.getline(kept[0]["filename"], kept[0]["line"] + i).strip()
                 for i in range(5)]
        where += " | " + " / ".join(line[:160] for line in lines if line)
    return where


def busy_and_gaps(spans: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """The length of the union of (start, end) intervals, and each hole between them as
    (length, start)."""
    busy, gaps, reach = 0.0, [], None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            if reach is not None:
                gaps.append((start - reach, reach))
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    return busy, gaps


def _device_time(event) -> float:
    """An event's device time in microseconds."""
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def kernel_summary(kernels: dict[str, int]) -> str:
    """A short word for the SDPA backends that the kernel names show."""
    kinds = set()
    for name in map(str.lower, kernels):
        if "cudnn" in name:
            kinds.add("cudnn")
        elif "flash" in name:
            kinds.add("flash")
        elif "fmha" in name or "efficient" in name:
            kinds.add("mem-eff")
    return "+".join(sorted(kinds)) or "math/none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["liger", "lemo-base", "lemo"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--keep-ratio", type=float, default=0.4)
    parser.add_argument("--sparse-from", type=float,
                        help="the lemo variants' sparse layers start at this share of the depth "
                             "(default: lemo's plan, the first half and the last layer dense)")
    parser.add_argument("--padding", type=float, default=0.0,
                        help="fraction of the row that is left padding (an attention_mask is passed)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (>= 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--fit-only", action="store_true",
                        help="one step and no profile: whether the set-up fits at each length, and "
                             "its peak (of that first step, compilation included)")
    parser.add_argument("--memory", action="store_true",
                        help="one more step under the allocator's history: what is live at its peak")
    add_shape_arguments(parser, layers=32)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--out", default="long_context.jsonl")
    parser.add_argument("--trace-dir", help="write each run's profiled step as a Chrome trace here")
    parser.add_argument("--save-attention-layers", type=int, nargs="+",
                        help="the layers the *-save-dense-attention variants keep the attention "
                             "of (default: every dense layer)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("lemo_compile").setLevel(logging.INFO)
        try:
            row = run_one(args)
        except Exception as err:  # noqa: BLE001 (reported as the row's result)
            import torch

            if not isinstance(err, torch.OutOfMemoryError):
                raise
            row = {**row_head(args.variant, args.seq_len, args), "error": "out of memory"}
        print(json.dumps(row))
        return 0

    rows = []
    for seq_len in args.seq_lens:
        for variant in args.variants:
            command = [sys.executable, __file__, "--variant", variant, "--seq-len", str(seq_len)]
            command += forwarded(args, ("keep_ratio", "padding", "warmup", "steps"))
            if args.checkpointing:
                command.append("--checkpointing")
            if args.trace_dir:
                command += ["--trace-dir", args.trace_dir]
            if args.save_attention_layers:
                command += ["--save-attention-layers", *map(str, args.save_attention_layers)]
            if args.sparse_from is not None:
                command += ["--sparse-from", str(args.sparse_from)]
            if args.memory:
                command.append("--memory")
            if args.fit_only:
                command.append("--fit-only")
            rows.append(run_isolated(command, row_head(variant, seq_len, args), args.out,
                                     args.timeout, variant))
    print(f"\n{'tokens':>7} {'ckpt':>4} {'variant':<20} {'step s':>7} {'peak GB':>8} "
          f"{'1st step s':>10} {'GPU busy':>8} {'attention':>10} {'loss 0':>7}")
    for r in rows:
        head = f"{r['seq_len']:>7} {'yes' if r['checkpointing'] else 'no':>4} {r['variant']:<20}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        if r.get("fit_only"):
            print(f"{head} {'fits':>7} {r['peak_gb']:>8.1f} {r['first_step_s']:>10.1f}")
            continue
        busy = r["kernels_s"] / r["profiled_step_s"]
        print(f"{head} {r['step_s']:>7.3f} {r['peak_gb']:>8.1f} {r['first_step_s']:>10.1f} "
              f"{busy:>8.0%} {kernel_summary(r['attention_kernels']):>10} {r['losses'][0]:>7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
