"""Peak memory and step time of LoRA fine-tuning steps: dense Inductor vs lemo, side by side.

Model: a Llama built from a config (random bf16 weights; default the Llama-3-8B shape), LoRA r=8,
alpha=16 on q/k/v/o (peft), batch 1, AdamW on the adapters. Variants, each compiled fresh:

  dense       torch.compile(model)                       (Inductor, HF's plain loss)
  lemo-loss   backend="lemo", keep_ratio=1.0             (segmented loss only, no token elimination)
  lemo        backend="lemo" with --keep-ratio           (oracle selection + segmented loss)
  lemo-nofuse the same with fuse=False                   (selection's gathers and scatter-adds left
                                                          to Inductor instead of lemo's row kernels)
  lemo-predictor the same with scorer="predictor"        (randomly initialised predictors: their
                                                          cost, not their quality)

For lemo-predictor the row also holds the predictors' own cost, measured after the steps in the same
process: `predictor_ms`, the time of all sparse layers' score functions (compiled with Inductor, as
they are inside the training graph) on a [1, S, D] bf16 input; `predictor_weights_gb`, the bank's
weights on the GPU; `predictor_extra_gb`, the largest rise of allocated memory over one layer's call.

Each (length, variant) runs in its own process, with its own Inductor cache directory, so peaks do
not mix and no variant is served another's compiled code. Step time: the median of `--steps` steps
after `--warmup` steps. Prints a table last and writes one JSON line per run to --out.

    python benchmarks/train_step.py --seq-lens 4096 8192 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("dense", "lemo-loss", "lemo", "lemo-nofuse", "lemo-predictor")


def run_one(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lemo_compile

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len, use_cache=False,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    backend = bank = None
    if args.variant == "dense":
        compiled = torch.compile(model)
    else:
        keep = 1.0 if args.variant == "lemo-loss" else args.keep_ratio
        options = {"keep_ratio": keep, "fuse": args.variant != "lemo-nofuse"}
        if args.variant == "lemo-predictor":
            from lemo_compile.predictors import ModelSignature, PredictorBank

            signature = ModelSignature(args.hidden, args.heads, args.hidden // args.heads,
                                       args.layers, 64)
            plans = lemo_compile.plan_layers(lemo_compile.LemoConfig(keep_ratio=keep), args.layers,
                                             args.seq_len)
            bank = PredictorBank(signature, [p.layer for p in plans if p.sparse])
            options.update(scorer="predictor", predictors=bank)
        backend = lemo_compile.LemoBackend(options)
        compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device="cuda")
    times, losses = [], []
    peak_forward = peak_step = 0  # over the steps after the first (compilation)
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        loss = compiled(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        forward = torch.cuda.max_memory_allocated()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        losses.append(loss.item())
        if step >= 1:
            peak_forward = max(peak_forward, forward)
            peak_step = max(peak_step, torch.cuda.max_memory_allocated())
    result = {
        "variant": args.variant, "seq_len": args.seq_len, "layers": args.layers,
        "hidden": args.hidden,
        "keep_ratio": None if args.variant in ("dense", "lemo-loss") else args.keep_ratio,
        "compile_step_s": times[0], "step_s": statistics.median(times[args.warmup:]),
        "step_times_s": times,
        "peak_gb": peak_step / 1e9, "peak_forward_gb": peak_forward / 1e9, "losses": losses,
        "torch": torch.__version__, "device": torch.cuda.get_device_name(),
    }
    if backend is not None and backend.reports:
        result["kept_tokens"] = [p.kept_tokens for p in backend.reports[-1].plans]
    if bank is not None:
        result.update(predictor_cost(bank.to("cuda"), args))
    return result


def predictor_cost(bank, args) -> dict:
    """The bank's score functions alone: summed time over its layers, weights and transient memory."""
    import torch

    from lemo_compile.predictors.bank import predicted_block_scores

    score = torch.compile(predicted_block_scores, dynamic=False)
    h = torch.randn(1, args.seq_len, args.hidden, device="cuda", dtype=torch.bfloat16)
    calls = [
        (bank.predictor(layer).side_tensors("q"), bank.predictor(layer).side_tensors("k"),
         bank.predictor(layer).distance_bias, 64, args.heads)
        for layer in bank.layers
    ]
    for call in calls[:2]:
        score(h, *call)  # compile and warm up
    torch.cuda.synchronize()
    extra = 0
    for call in calls:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        score(h, *call)
        torch.cuda.synchronize()
        extra = max(extra, torch.cuda.max_memory_allocated() - base)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    repeats = 5
    start.record()
    for _ in range(repeats):
        for call in calls:
            score(h, *call)
    end.record()
    torch.cuda.synchronize()
    weights = sum(t.numel() * t.element_size() for t in bank.state_dict().values())
    return {"predictor_ms": start.elapsed_time(end) / repeats, "predictor_weights_gb": weights / 1e9,
            "predictor_extra_gb": extra / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["dense", "lemo-loss", "lemo"])
    parser.add_argument("--keep-ratio", type=float, default=0.4)
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps before the timed ones (>= 1; a compiled model's second step is "
                             "still slow)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", default="train_step.jsonl")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args)))
        return 0

    rows = []
    for seq_len in args.seq_lens:
        for variant in args.variants:
            command = [sys.executable, __file__, "--variant", variant, "--seq-len", str(seq_len)]
            for name in ("keep_ratio", "warmup", "steps", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            cache = tempfile.mkdtemp(prefix=f"inductor-{variant}-")  # no variant runs another's code
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache))
            if done.returncode != 0:
                row = {"variant": variant, "seq_len": seq_len, "error": f"exit {done.returncode}",
                       "stderr_tail": done.stderr[-3000:]}
                print(done.stderr[-3000:], file=sys.stderr)
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\n{'seq':>6} {'variant':<10} {'step s':>8} {'peak GB':>8} {'fwd peak':>9} {'compile s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['seq_len']:>6} {r['variant']:<10} {r['error']}")
            continue
        print(f"{r['seq_len']:>6} {r['variant']:<10} {r['step_s']:>8.3f} {r['peak_gb']:>8.1f} "
              f"{r['peak_forward_gb']:>9.1f} {r['compile_step_s']:>10.1f}")
        if "predictor_ms" in r:
            print(f"{'':>6} predictors: {r['predictor_ms']:.1f} ms "
                  f"({100 * r['predictor_ms'] / 1000 / r['step_s']:.2f}% of the step), weights "
                  f"{r['predictor_weights_gb']:.3f} GB + {r['predictor_extra_gb']:.3f} GB transient "
                  f"({100 * (r['predictor_weights_gb'] + r['predictor_extra_gb']) / r['peak_gb']:.2f}% "
                  "of the peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
