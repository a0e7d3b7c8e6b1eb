"""lemo under FSDP2 data parallelism: loss, memory and throughput on 1 and N GPUs, lemo and dense.

Recipe (what each rank runs): a Llama built from a config (default the Llama-3-8B width, `--layers`
deep; random weights, the same on every rank), PEFT LoRA r=8 on q/k/v/o, every decoder layer
compiled on its own (lemo: `lemo_compile.compile_decoder_layers(model, options)`; dense:
`layer.compile()`, Inductor), then `fully_shard` on every decoder layer and on the root with bf16
parameters and fp32 gradient reduction (`MixedPrecisionPolicy`), AdamW on the adapters. Each step
takes a global batch of `--global-batch` rows of random tokens (seeded by the step); rank r trains
rows r, r + N, ...; the reported loss is the mean over ranks (every row has the same length).

Run without torchrun, the script launches `torchrun --nproc_per_node=N` once per (variant, N) of
`--variants` x `--gpus`, each with its own Inductor cache directory, prints a table last and writes
one JSON line per run to --out: per-step losses, the median step time after `--warmup` steps,
tokens/s, and each rank's CUDA peak.

    python benchmarks/fsdp.py --layers 16 --seq-len 16384 --gpus 1 2 --variants dense lemo
    python benchmarks/fsdp.py --device cpu --layers 4 --hidden 64 ...   # a gloo smoke run

Set NCCL_NVLS_ENABLE=0 on machines where NVLink multicast must stay off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from harness import add_shape_arguments, forwarded, lora_llama, run_isolated

VARIANTS = ("dense", "lemo", "lemo-tokens")


def build_model(args):
    """The LoRA-wrapped Llama of the module docstring, its layers compiled and sharded."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import lemo_compile

    model = lora_llama(args, args.device, torch.float32)
    layers = lemo_compile.layerwise.decoder_layers(model)
    smoke = args.device == "cpu"  # no Inductor code generation on the CPU smoke run
    if args.variant == "dense":
        for layer in layers:
            layer.compile(backend="aot_eager" if smoke else "inductor")
    else:
        options = {"mlp": "tokens"} if args.variant == "lemo-tokens" else {}
        if smoke:
            options["compiler"] = "aot_eager"
        lemo_compile.compile_decoder_layers(model, options)
    dtype = torch.float32 if smoke else torch.bfloat16
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model.train()


def run_rank(args) -> None:
    """One rank's run (under torchrun); rank 0 prints the run's JSON line."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    cuda = args.device.startswith("cuda")
    model = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        generator = torch.Generator().manual_seed(1000 + step)
        batch = torch.randint(0, args.vocab, (args.global_batch, args.seq_len), generator=generator)
        ids = batch[rank::world].to(args.device)
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0],
                        device=args.device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    step_s = statistics.median(times[args.warmup:])
    if rank == 0:
        print(json.dumps({
            "variant": args.variant, "gpus": world, "layers": args.layers, "seq_len": args.seq_len,
            "global_batch": args.global_batch, "checkpointing": args.checkpointing,
            "first_step_s": times[0], "step_s": step_s, "step_times_s": times,
            "tokens_per_s": args.global_batch * args.seq_len / step_s,
            "peak_gb_per_rank": [p.item() for p in peaks], "losses": losses,
            "torch": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["dense", "lemo"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2],
                        help="processes per run (GPUs; on the CPU, gloo processes)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--global-batch", type=int, default=2,
                        help="rows per step over all ranks (a multiple of every --gpus)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=18, help="timed steps after the warm-up")
    add_shape_arguments(parser, layers=16)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--out", default="fsdp.jsonl")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_rank(args)
        return 0
    if any(args.global_batch % n for n in args.gpus):
        parser.error(f"--global-batch {args.global_batch} is not a multiple of every --gpus value")

    rows = []
    for variant in args.variants:
        for gpus in args.gpus:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={gpus}", __file__, "--variant", variant]
            command += forwarded(args, ("device", "seq_len", "global_batch", "warmup", "steps"))
            if args.checkpointing:
                command.append("--checkpointing")
            row = {"variant": variant, "gpus": gpus, "seq_len": args.seq_len}
            rows.append(run_isolated(command, row, args.out, args.timeout, f"{variant}-{gpus}"))
    print(f"\n{'variant':<12} {'GPUs':>4} {'step s':>7} {'tokens/s':>9} {'peak GB/GPU':>11} "
          f"{'loss 0':>7} {'loss last':>9}")
    for r in rows:
        head = f"{r['variant']:<12} {r['gpus']:>4}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        print(f"{head} {r['step_s']:>7.3f} {r['tokens_per_s']:>9.0f} "
              f"{max(r['peak_gb_per_rank']):>11.1f} {r['losses'][0]:>7.4f} {r['losses'][-1]:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
