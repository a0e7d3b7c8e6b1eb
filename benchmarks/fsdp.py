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
import subprocess
import sys
import tempfile
import time

VARIANTS = ("dense", "lemo", "lemo-tokens")


def build_model(args):
    """The LoRA-wrapped Llama of the module docstring, its layers compiled and sharded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import lemo_compile

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len, use_cache=False,
        rope_theta=500000.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
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
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
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
            for name in ("device", "seq_len", "global_batch", "warmup", "steps", "layers", "hidden",
                         "intermediate", "heads", "kv_heads", "vocab"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if args.checkpointing:
                command.append("--checkpointing")
            env = dict(os.environ,
                       TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix=f"inductor-{variant}-{gpus}-"))
            row = {"variant": variant, "gpus": gpus, "seq_len": args.seq_len}
            try:
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, timeout=args.timeout)
                lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
                if done.returncode != 0 or not lines:
                    row.update(error=f"exit {done.returncode}", stderr_tail=done.stderr[-3000:])
                    print(done.stderr[-3000:], file=sys.stderr)
                else:
                    row = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                row["error"] = f"timeout after {args.timeout:.0f} s"
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
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
