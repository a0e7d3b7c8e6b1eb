"""`lemo demo`: fine-tune a small Llama for a few steps, dense and with lemo, side by side.

The corpus is the Python standard library's own source (real text on every machine), read as bytes
(vocabulary 256); the model is a Llama built from a config (random init). Both variants are compiled
by lemo, "dense" with `keep_ratio=1.0` (the same compiled model without token elimination), so the
two differ by token elimination alone. Each runs in its own process, with Inductor's caches off
(its post-grad graphs, which the numbers are read from, must really be compiled). What the table
shows is true on any machine: the bytes of activations the compiled backward graph reads (what the
forward keeps for it, parameters and inputs excluded); on a GPU also the CUDA peak; step times are
readings of this machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import sysconfig
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lemo_compile


@dataclasses.dataclass
class DemoSettings:
    """What the demo trains: model size, sequence length, steps, and the lemo options."""

    seq_len: int = 2048
    batch_size: int = 1
    steps: int = 8
    layers: int = 8
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    keep_ratio: float = 0.4
    block_size: int = 64
    compiler: str = "inductor"
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def stdlib_corpus(max_bytes: int = 8 << 20) -> torch.Tensor:
    """The standard library's .py files (sorted by path), concatenated as uint8 tokens."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python source found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def build_model(settings: DemoSettings) -> torch.nn.Module:
    """A Llama of the demo's size (vocabulary 256, bytes), randomly initialised from `seed`."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=settings.hidden,
        intermediate_size=settings.hidden * 8 // 3,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=settings.seq_len,
        use_cache=False,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def run_variant(variant: str, settings: DemoSettings) -> dict:
    """Train `settings.steps` steps as "dense" (Inductor) or "lemo"; returns losses, times, memory."""
    # The demo only reads the loss, so the segmented loss's "logits are a placeholder" is expected.
    warnings.filterwarnings("ignore", message=".*NaN placeholder", category=lemo_compile.LemoWarning)
    device = torch.device(settings.device)
    corpus = stdlib_corpus()
    generator = torch.Generator().manual_seed(settings.seed)
    model = build_model(settings).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend = lemo_compile.LemoBackend(
        {"keep_ratio": settings.keep_ratio if variant == "lemo" else 1.0,
         "block_size": settings.block_size, "compiler": settings.compiler}
    )
    compiled = torch.compile(model, backend=backend)
    losses, times = [], []
    for step in range(settings.steps):
        if step == 1:  # measure memory over the steps after compilation
            _reset_peak_memory(device)
        starts = torch.randint(0, len(corpus) - settings.seq_len, (settings.batch_size,), generator=generator)
        batch = torch.stack([corpus[s : s + settings.seq_len] for s in starts]).to(device)
        begin = time.perf_counter()
        loss = compiled(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        losses.append(loss.item())
        print(f"  {variant}: step {step + 1}/{settings.steps} loss {losses[-1]:.3f} "
              f"({times[-1]:.2f} s)", file=sys.stderr, flush=True)
    report = max(backend.reports, key=lambda r: len(r.plans))  # the graph holding the layers
    kept = [plan.kept_tokens for plan in report.plans] if variant == "lemo" else []
    return {
        "variant": variant,
        "losses": losses,
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "saved_bytes": saved_activation_bytes(report),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "kept_tokens": kept,
    }


def saved_activation_bytes(report) -> int:
    """Bytes of the tensors the compiled backward graph reads that the forward computed (its inputs
    other than the incoming gradients, parameters and the caller's inputs, "primals_*")."""
    return sum(math.prod(shape) * dtype.itemsize
               for name, (shape, dtype) in report.saved_for_backward.items()
               if not name.startswith("primals"))


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def run_demo(settings: DemoSettings) -> list[dict]:
    """Run both variants, each in a fresh process, and print the side-by-side table."""
    print(
        f"lemo demo: Llama {settings.layers} layers x {settings.hidden}, {settings.seq_len} tokens x "
        f"{settings.batch_size}, {settings.steps} steps on the Python standard library's source, "
        f"device {settings.device}, compiler {settings.compiler}",
        flush=True,
    )
    results = []
    for variant in ("dense", "lemo"):
        command = [sys.executable, "-m", "lemo_compile.tools.cli", "demo", "--variant", variant,
                   "--settings", json.dumps(dataclasses.asdict(settings))]
        environment = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                           TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
        if done.returncode != 0:
            raise RuntimeError(f"the {variant} run failed (exit {done.returncode})")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(format_table(results, settings))
    return results


def format_table(results: list[dict], settings: DemoSettings) -> str:
    """The demo's summary table, one row per variant."""
    cuda = results[0]["cuda_peak_bytes"] is not None
    lines = [
        f"{'variant':<8} {'loss first -> last':<20} {'kept for backward (MB)':>23} "
        + (f"{'CUDA peak (MB)':>15} " if cuda else "")
        + f"{'step (s)':>9} {'1st step (s)':>13}  kept tokens per layer",
    ]
    for r in results:
        kept = " ".join(str(k) for k in r["kept_tokens"]) or f"all {settings.seq_len}"
        lines.append(
            f"{r['variant']:<8} {r['losses'][0]:>7.3f} -> {r['losses'][-1]:<9.3f} "
            f"{r['saved_bytes'] / 2**20:>23.1f} "
            + (f"{r['cuda_peak_bytes'] / 2**20:>15.0f} " if cuda else "")
            + f"{r['step_s']:>9.3f} {r['first_step_s']:>13.1f}  {kept}"
        )
    dense, lemo = results[0]["saved_bytes"], results[-1]["saved_bytes"]
    if dense:
        lines.append(f"lemo keeps {100 * (1 - lemo / dense):.0f}% fewer activation bytes for "
                     "backward than the same model without token elimination.")
    lines.append("(dense: the model compiled by lemo with keep_ratio=1.0; kept for backward: what "
                 "the compiled forward saves for the backward graph; step: median after the first, "
                 "which includes compilation" + ("; CUDA peak: steps 2+)" if cuda else
                                                 "; times on this machine's CPU are a reading)"))
    return "\n".join(lines)
