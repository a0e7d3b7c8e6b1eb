"""What the benchmark scripts share: the Llama shape's arguments, running one configuration in its
own process, with its own Inductor cache directory (so that no variant is served another's
compiled code), recording its JSON line, writing a summary's table and plot from rows of one GPU,
and the layer sweep's plans (the same shares of a model's layers sparse at any depth)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable


def dense_layers_of(sparse_from: float, layers: int) -> list[int]:
    """The dense layers of a plan whose sparse layers run from layer round(sparse_from * layers)
    to the second-to-last: the leading layers and the last. sparse_from=0.5 is lemo's default
    plan; accuracy.py's 8-layer model and long_context.py's 32 layers share a sweep through it."""
    return [*range(round(sparse_from * layers)), layers - 1]


def run_isolated(command: list[str], row: dict, out: str, timeout: float, cache_name: str) -> dict:
    """Run `command`; its result is the last line of its stdout that is a JSON object. Returns
    that object, or `row` with an "error" (the exit status and stderr's tail, or the timeout)
    when there is none. The result is appended to the JSON-lines file `out` and printed."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix=f"inductor-{cache_name}-"))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            row = {**row, "error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:]}
            print(done.stderr[-3000:], file=sys.stderr)
        else:
            row = json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        row = {**row, "error": f"timeout after {timeout:.0f} s"}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


# (argument, default): the Llama-3-8B shape; --layers sets the depth
SHAPE_ARGUMENTS = (("hidden", 4096), ("intermediate", 14336), ("heads", 32), ("kv_heads", 8),
                   ("vocab", 128256))


def add_shape_arguments(parser: argparse.ArgumentParser, layers: int) -> None:
    """--layers (default `layers`) and the SHAPE_ARGUMENTS."""
    parser.add_argument("--layers", type=int, default=layers)
    for name, default in SHAPE_ARGUMENTS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)


def forwarded(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """Command-line arguments that give a child process the values of `names` (and the shape)."""
    command = []
    for name in (*names, "layers", *(name for name, _ in SHAPE_ARGUMENTS)):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return command


def lora_llama(args: argparse.Namespace, device: str, dtype):
    """A Llama of the shape arguments (`args.seq_len` positions, random weights from seed 0) on
    `device` in `dtype`, with HF gradient checkpointing if `args.checkpointing`, wrapped by PEFT
    LoRA r=8, alpha=16 on q/k/v/o."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len, use_cache=False,
        rope_theta=500000.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def one_device(rows: list[dict]) -> str | None:
    """The GPU that every row names (rows without the field, such as some out-of-memory rows, say
    nothing); raises ValueError for rows of several GPUs, whose step times and peaks one table
    must not mix (runs on another card go in their own files)."""
    devices = sorted({row["device"] for row in rows if row.get("device")})
    if len(devices) > 1:
        raise ValueError(f"rows from several GPUs ({', '.join(devices)}): summarize one at a time")
    return devices[0] if devices else None


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    """--markdown and --plot, the destinations `write_summary` takes."""
    parser.add_argument("--markdown", help="write the table here (default: print it)")
    parser.add_argument("--plot", help="write the plot (PNG) here")


def write_summary(markdown: str | None, plot: str | None, table_of: Callable[[str | None], str],
                  draw: Callable[[str], None]) -> None:
    """Write `table_of(the plot's path relative to the table)` to `markdown` (print it when None)
    and `draw(plot)` when a plot path is given."""
    plot_name = os.path.relpath(plot, os.path.dirname(markdown or ".")) if plot else None
    table = table_of(plot_name)
    if markdown:
        with open(markdown, "w") as f:
            f.write(table)
    else:
        print(table)
    if plot:
        draw(plot)
