"""lemo's kernels on one GPU, side by side with the plain PyTorch chains they replace and with the
device's own ceilings, all measured in the same run.

Ceilings: a large device-to-device copy (bytes read + written per second) and a large bf16 matmul
(FLOP/s). Then, on the Llama-3-8B shape (D 4096, 32 query / 8 key heads of 128, vocab 128,256,
batch 1, bf16) at each --seq-lens length, with K = keep_ratio of the tokens kept:

  block_scores   lemo kernel | the chunked pure-torch oracle       (causal FLOPs / time vs matmul)
  gather_norm    lemo kernel | eager gather + RMSNorm | the same chain under torch.compile
  scatter_add    lemo kernel | eager scatter_add      | torch.compile   (bytes / time vs copy)
  gather_rows    lemo kernel | eager gather           | torch.compile
  loss fwd+bwd   lemo segmented op (Triton softmax) | its pure-torch segments | unsegmented
                 F.cross_entropy(F.linear(h, W).float()), frozen W (LoRA): time and peak memory

Times are medians of `triton.testing.do_bench`; the row kernels, which take tens of microseconds,
are timed as CUDA-graph replays (`do_bench_cudagraph`), so that the GPU's time is measured and not
the host's launch overhead. Prints a table last; writes one JSON line per measurement to --out.

    python benchmarks/kernel_speeds.py --seq-lens 4096 16384 --out kernels.jsonl

(Not named kernels.py: a script's folder comes first on sys.path, and a kernels.py there would
shadow the `kernels` package that transformers >= 5.25 imports, breaking every script beside it.)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def bench(fn, warmup=25, rep=200) -> float:
    """Median milliseconds of fn()."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn, rep=100) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph (no host launch overhead)."""
    import triton.testing

    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_rate() -> float:
    """GB/s of a 2 GiB bf16 device-to-device copy, counting bytes read and written."""
    source = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    ms = bench(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / ms / 1e6


def ceilings() -> dict:
    copy_gbs = copy_rate()
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return {"copy_GBps": copy_gbs, "matmul_TFLOPs": 2 * n**3 / ms / 1e9}


def plain_rms_norm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def row_benchmarks(seq_len, keep, args, floors) -> list[dict]:
    from lemo_compile import ops
    from lemo_compile.kernels import rows as row_kernels

    width = args.hidden
    kept = int(keep * seq_len)
    x = torch.randn(1, seq_len, width, device="cuda", dtype=torch.bfloat16)
    rows = torch.randn(1, kept, width, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(seq_len, device="cuda")[:kept].sort().values[None]
    index = idx[:, :, None].expand(-1, -1, width)
    size = x.element_size()

    def eager_gather_norm():
        return plain_rms_norm(x.gather(1, index), weight, 1e-5)

    def eager_scatter():
        return x.scatter_add(1, index, rows)

    def eager_gather():
        return x.gather(1, index)

    compiled = {
        name: torch.compile(fn)
        for name, fn in (("gather_norm", eager_gather_norm), ("scatter_add", eager_scatter),
                         ("gather_rows", eager_gather))
    }
    cases = {
        # bytes each must move at least: reads + writes
        "gather_norm": (3 * kept * width * size,
                        lambda: row_kernels.gather_rms_norm_triton(x, idx, weight, 1e-5),
                        eager_gather_norm),
        "scatter_add": ((2 * seq_len + kept) * width * size,
                        lambda: row_kernels.scatter_add_rows_triton(x, idx, rows),
                        eager_scatter),
        "gather_rows": (2 * kept * width * size,
                        lambda: row_kernels.gather_rows_triton(x, idx),
                        eager_gather),
    }
    # correctness in the same run, before timing
    y, got_rows, _ = ops.gather_rms_norm(x, idx, weight, 1e-5)
    torch.testing.assert_close(y.float(), eager_gather_norm().float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(ops.scatter_add_rows(x, idx, rows), eager_scatter())
    assert torch.equal(ops.gather_rows(x, idx), eager_gather())
    results = []
    for name, (nbytes, lemo_fn, eager_fn) in cases.items():
        for impl, fn in (("lemo", lemo_fn), ("eager", eager_fn), ("compiled", compiled[name])):
            ms = bench_graph(fn)
            gbs = nbytes / ms / 1e6
            results.append({
                "kernel": name, "impl": impl, "seq_len": seq_len, "kept": kept, "ms": ms,
                "GBps": gbs, "of_copy": gbs / floors["copy_GBps"],
            })
    return results


def block_score_benchmarks(seq_len, args, floors) -> list[dict]:
    from lemo_compile.kernels import block_scores as scores

    q = torch.randn(1, seq_len, args.heads, args.head_dim, device="cuda",
                    dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, seq_len, args.kv_heads, args.head_dim, device="cuda",
                    dtype=torch.bfloat16).transpose(1, 2)
    block = args.block_size
    n = seq_len // block
    # causal work in full tiles: n (n + 1) / 2 tiles of b x b dot products over d, per head
    flops = 2 * args.heads * args.head_dim * block * block * n * (n + 1) / 2
    got = scores.block_tile_max_triton(q, k, block)
    want = scores.block_tile_max_reference(q, k, block)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    results = []
    for impl, fn in (("lemo", lambda: scores.block_tile_max_triton(q, k, block)),
                     ("torch", lambda: scores.block_tile_max_reference(q, k, block))):
        ms = bench(fn, rep=100 if impl == "torch" else 200)
        tflops = flops / ms / 1e9
        results.append({
            "kernel": "block_scores", "impl": impl, "seq_len": seq_len, "ms": ms,
            "TFLOPs": tflops, "of_matmul": tflops / floors["matmul_TFLOPs"],
            "ms_per_step": ms * args.sparse_layers,
        })
    return results


def loss_benchmarks(seq_len, args) -> list[dict]:
    from lemo_compile import ops
    from lemo_compile.kernels import lm_loss

    h0 = torch.randn(seq_len, args.hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    target = torch.randint(0, args.vocab, (seq_len,), device="cuda")

    def run(loss_fn):
        h = h0.detach().requires_grad_(True)
        loss_fn(h).backward()
        return h.grad

    def segmented(h):
        return ops.linear_cross_entropy(h, weight, None, target, -100, "mean", 2048, torch.float32)

    def segmented_torch(h):  # the same op with its pure-torch softmax
        real = lm_loss.kernel_supports
        lm_loss.kernel_supports = lambda *args: False
        try:
            return segmented(h)
        finally:
            lm_loss.kernel_supports = real

    def unsegmented(h):
        return F.cross_entropy(F.linear(h, weight).float(), target)

    reference = run(unsegmented)
    results = []
    for impl, fn in (("lemo", segmented), ("lemo-torch", segmented_torch), ("unsegmented", unsegmented)):
        grad = run(fn)
        error = ((grad.float() - reference.float()).norm() / reference.float().norm()).item()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(fn)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = bench(lambda fn=fn: run(fn), warmup=3, rep=30)
        results.append({"kernel": "loss_fwd_bwd", "impl": impl, "seq_len": seq_len, "ms": ms,
                        "peak_extra_gb": peak / 1e9, "grad_rel_error": error})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--keep-ratio", type=float, default=0.4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--sparse-layers", type=int, default=15,
                        help="sparse layers per step, for the per-step cost (default: Llama-3-8B, 'auto')")
    parser.add_argument("--out", default="kernels.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    floors = ceilings()
    print(json.dumps(floors), flush=True)
    rows = [{"kernel": "ceilings", **floors, "device": torch.cuda.get_device_name(),
             "torch": torch.__version__}]
    for seq_len in args.seq_lens:
        rows += block_score_benchmarks(seq_len, args, floors)
        rows += row_benchmarks(seq_len, args.keep_ratio, args, floors)
        rows += loss_benchmarks(seq_len, args)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\ncopy {floors['copy_GBps']:.0f} GB/s, bf16 matmul {floors['matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'kernel':<13} {'impl':<12} {'seq':>6} {'ms':>9}  rate")
    for r in rows[1:]:
        if "GBps" in r:
            rate = f"{r['GBps']:.0f} GB/s ({100 * r['of_copy']:.0f}% of copy)"
        elif "TFLOPs" in r:
            rate = (f"{r['TFLOPs']:.0f} TFLOP/s ({100 * r['of_matmul']:.0f}% of matmul), "
                    f"{r['ms_per_step']:.1f} ms per step")
        else:
            rate = f"peak +{r['peak_extra_gb']:.2f} GB, grad rel err {r['grad_rel_error']:.1e}"
        print(f"{r['kernel']:<13} {r['impl']:<12} {r['seq_len']:>6} {r['ms']:>9.3f}  {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
