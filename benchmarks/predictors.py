"""Predictor quality on a model that has learned something, in one GPU run.

1. Corpus: the Python source of this machine's standard library and installed packages (real text no
   one here wrote); files are split into train / held-out by a hash of their path. Tokens are bytes
   (--vocab 256, the default) or the ids of a byte-level BPE of --vocab entries fitted on the train
   split (saved as tokenizer.json beside the model).
2. Base model: a small Llama (default 8 layers x 512, ~25M parameters with 256 tokens) trained
   from scratch on the train split for --train-minutes: at --train-len tokens per sequence, then,
   for the last --long-fraction of the time, at --long-len (same tokens per step), so that its
   attention is meaningful at the lengths measured.
3. Predictors: `lemo_compile.calibrate` on train-split sequences of the --calib-lens (cycled),
   base model frozen, oracle labels from the Triton block-score kernel; one bank per --losses
   entry and --distances length, on the same sequences, to compare them side by side.
4. Recall: `lemo_compile.predictor_recall` on held-out sequences at each of --eval-lens.

With --model-dir (the --out-dir of an earlier run, or a folder holding its model.json, shards and,
for BPE, tokenizer.json), step 2 loads that model instead of training one. With --mlp tokens (the
default), calibration also trains the MLP predictors and step 4 reports their recall. Before step 3,
the run reports per length how sharp the oracle's own choice is (two held-out sequences): the share
of blocks whose score lies within 3% of the k-th largest (a near-tie the recall metric still
counts), the spread of the block scores (standard deviation over mean), and the recall of the
oracle computed in float32 against the oracle of the bf16 model. With no --losses, the run stops
there.

Writes the results (JSON lines), the predictor banks and the model (as shards of at most 15 MiB, so
that they can travel back from a machine that returns small files) to --out-dir; prints a table last.

    python benchmarks/predictors.py --out-dir results/predictors
    python benchmarks/predictors.py --model-dir results/predictors --out-dir results/again
    python benchmarks/predictors.py --vocab 4096 --out-dir results/bpe
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pathlib
import random
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

import lemo_compile
from lemo_compile.predictors.bank import DISTANCES


def corpus(held_out: float, max_bytes: int) -> tuple[list[bytes], list[bytes]]:
    """(train, held-out) file contents of the .py files, split by a hash of the file's path."""
    roots = {pathlib.Path(p) for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"])}
    train, test, total = [], [], 0
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            digest = hashlib.sha1(str(path.relative_to(root)).encode()).digest()[0] / 255
            (test if digest < held_out else train).append(data)
            total += len(data)
            if total >= max_bytes:
                break
    return train, test


def train_tokenizer(files: list[bytes], vocab: int, sample_bytes: int = 64 << 20):
    """A byte-level BPE tokenizer (`tokenizers`) of `vocab` entries, fitted on an even sample of
    `files` of about `sample_bytes`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    every = max(1, sum(map(len, files)) // sample_bytes)
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([f.decode("utf-8", "replace") for f in files[::every]], trainer)
    return tokenizer


def tokenize(files: list[bytes], tokenizer=None) -> torch.Tensor:
    """The files as one token stream [N] (int64): their bytes, or their BPE ids with `tokenizer`."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8).long()
    encoded = tokenizer.encode_batch([f.decode("utf-8", "replace") for f in files])
    return torch.cat([torch.tensor(e.ids, dtype=torch.long) for e in encoded])


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2, max_position_embeddings=max(args.eval_lens),
        rope_theta=500000.0, use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def sequences(tokens: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    """`count` random windows [count, length] of the token stream."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length, (count,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def train_base(model, train_tokens, args, device) -> list[float]:
    """Plain next-byte training for --train-minutes (bf16 autocast, AdamW, cosine decay)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    step_fn = torch.compile(lambda ids: F.cross_entropy(
        model(input_ids=ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))
    losses, begin, step = [], time.time(), 0
    budget = args.train_minutes * 60
    while time.time() - begin < budget:
        long = time.time() - begin > (1 - args.long_fraction) * budget
        length = args.long_len if long else args.train_len
        batch = max(1, args.train_batch * args.train_len // length)
        ids = sequences(train_tokens, length, batch, seed=step).to(device)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(
                min(1.0, (time.time() - begin) / budget) * torch.pi)).item()))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            losses.append(loss.item())
            print(f"base step {step}: loss {losses[-1]:.3f} at {length} tokens "
                  f"({time.time() - begin:.0f} s)", flush=True)
        step += 1
    return losses


@torch.no_grad()
def held_out_loss(model, test_tokens, length, device) -> float:
    model.eval()
    ids = sequences(test_tokens, length, 4, seed=123).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


def load_shards(folder: pathlib.Path):
    """The model written by an earlier run to `folder` (model.json and its shards), in bf16."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    meta = json.loads((folder / "model.json").read_text())
    shards = meta.pop("shards")
    state = {}
    for i in range(shards):
        state.update(load_file(folder / f"model.{i}.safetensors"))
    model = LlamaForCausalLM(LlamaConfig(**meta))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The LM head may share the embedding's weights, so the state dict may leave it out.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(torch.bfloat16)


NOISE_LEVELS = (0.0025, 0.005, 0.01, 0.02)


@torch.no_grad()
def oracle_sharpness(model, held: list[torch.Tensor], options: dict) -> dict[str, float]:
    """How sharp the oracle's top-k is on `held` (mean over sparse layers and sequences): the share
    of blocks whose score lies within 3% of the k-th largest, the spread of the block scores (their
    standard deviation over their mean), the recall between the oracle of the model in float32
    and in its own dtype, and the recall of the oracle against itself plus Gaussian noise of
    each of NOISE_LEVELS times its mean score (8 draws): what a predictor with that error reaches."""
    from lemo_compile.predictors.calibrate import oracle_scores, recall_and_overlap

    def scores_in(dtype):
        model.to(dtype)
        return oracle_scores(model, held, options=options)

    own_dtype = next(model.parameters()).dtype
    exact, kept = scores_in(torch.float32)
    rounded, _ = scores_in(own_dtype)
    near, spread, recalls = [], [], []
    noisy: dict[float, list[float]] = {level: [] for level in NOISE_LEVELS}
    generator = torch.Generator().manual_seed(0)
    for one, other in zip(exact, rounded, strict=True):
        for layer, sigma in one.items():
            kth = sigma.sort(dim=1, descending=True).values[:, kept[layer] - 1 : kept[layer]]
            near.append(((sigma - kth).abs() <= 0.03 * kth).float().mean().item())
            spread.append((sigma.std(dim=1) / sigma.mean(dim=1)).mean().item())
            recalls.append(recall_and_overlap(other[layer], sigma, kept[layer])[0])
            for level, found in noisy.items():
                for _ in range(8):
                    noise = torch.randn(sigma.shape, generator=generator).to(sigma.device)
                    scale = level * sigma.mean(dim=1, keepdim=True)
                    found.append(recall_and_overlap(sigma + scale * noise, sigma, kept[layer])[0])
    return {"near_threshold_share": sum(near) / len(near), "score_spread": sum(spread) / len(spread),
            "recall_bf16_vs_fp32_oracle": sum(recalls) / len(recalls),
            "recall_with_noise": {str(level): sum(found) / len(found) for level, found in noisy.items()}}


def save_shards(tensors: dict[str, torch.Tensor], prefix: pathlib.Path, limit: int = 15 << 20) -> int:
    """Write tensors as safetensors shards of at most `limit` bytes: prefix.0.safetensors, ..."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().cpu().contiguous()
        size += nbytes
    shards.append(current)
    for i, shard in enumerate(shards):
        save_file(shard, f"{prefix}.{i}.safetensors")
    return len(shards)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="predictor_results")
    parser.add_argument("--model-dir", default=None, help="reuse the model of an earlier run")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256,
                        help="256: bytes; more: a byte-level BPE of that size, fitted on the train split")
    parser.add_argument("--train-minutes", type=float, default=4.0)
    parser.add_argument("--train-len", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--long-len", type=int, default=16384)
    parser.add_argument("--long-fraction", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-bytes", type=int, default=400 << 20)
    parser.add_argument("--calib-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--calib-steps", type=int, default=1200)
    parser.add_argument("--eval-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--keep-ratio", type=float, default=0.4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--mlp", choices=("off", "tokens"), default="tokens")
    parser.add_argument("--losses", nargs="*", choices=("tiles", "ranking"), default=["tiles"],
                        help="calibration losses (lemo_compile.calibrate's loss), one bank each; none: only "
                             "the base model and its oracle's sharpness")
    parser.add_argument("--distances", type=int, nargs="+", default=[DISTANCES],
                        help="lengths of the predictors' distance bias (calibrate's distances; 1: "
                             "none), one bank per --losses entry and length")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_files, test_files = corpus(0.05, args.max_bytes)
    tokenizer = None
    if args.model_dir and (pathlib.Path(args.model_dir) / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(pathlib.Path(args.model_dir) / "tokenizer.json"))
    elif not args.model_dir and args.vocab > 256:
        tokenizer = train_tokenizer(train_files, args.vocab)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    train_tokens, test_tokens = tokenize(train_files, tokenizer), tokenize(test_files, tokenizer)
    train_bytes = sum(map(len, train_files))
    print(f"corpus: {train_bytes / 1e6:.0f} MB train ({train_bytes / len(train_tokens):.2f} bytes per "
          f"token), {sum(map(len, test_files)) / 1e6:.1f} MB held out")
    if args.model_dir:
        model, losses = load_shards(pathlib.Path(args.model_dir)).to(device), []
    else:
        model = build_model(args)
        losses = train_base(model, train_tokens, args, device)
        model.to(torch.bfloat16)
    model.eval().requires_grad_(False)
    if not args.model_dir:  # saved before calibration: a run cut short still brings the model back
        shards = save_shards(model.state_dict(), out / "model")
        (out / "model.json").write_text(json.dumps({**model.config.to_dict(), "shards": shards}))
    rows: list[dict] = []

    def record(row: dict) -> None:
        """Print the row and append it to predictors.jsonl (as it comes: a run cut short keeps it)."""
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "predictors.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    (out / "predictors.jsonl").unlink(missing_ok=True)
    record({"what": "base", "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "model_dir": args.model_dir, "vocab": model.config.vocab_size, "losses": losses,
            "test_bytes_per_token": sum(map(len, test_files)) / len(test_tokens),
            "held_out_loss": {n: held_out_loss(model, test_tokens, n, device) for n in args.eval_lens}})

    options = {"block_size": args.block_size, "keep_ratio": args.keep_ratio, "mlp": args.mlp}
    random.seed(0)
    calib = [sequences(train_tokens, args.calib_lens[i % len(args.calib_lens)], 1,
                       seed=10_000 + i).to(device) for i in range(args.calib_steps)]
    held = {length: [sequences(test_tokens, length, 1, seed=20_000 + i).to(device)
                     for i in range(args.eval_sequences)] for length in args.eval_lens}
    sharpness = {}
    for length in args.eval_lens:
        sharpness[length] = oracle_sharpness(model, held[length][:2], options)
        record({"what": "oracle", "seq_len": length, **sharpness[length]})
    for loss, distances in itertools.product(args.losses, args.distances):
        begin = time.time()
        bank = lemo_compile.calibrate(model, calib, options=options, loss=loss, distances=distances,
                                      progress=False)
        record({"what": "calibration", "loss": loss, "distances": distances,
                "seconds": time.time() - begin, "steps": args.calib_steps,
                "seq_lens": args.calib_lens, "layers": bank.layers, "mlp_layers": bank.mlp_layers})
        bank.save(out / f"predictors.{loss}.{distances}.safetensors")
        for length in args.eval_lens:
            metrics = lemo_compile.predictor_recall(model, bank, held[length], options=options)
            mean = lambda name: sum(m[name] for m in metrics.values()) / len(metrics)  # noqa: E731
            row = {"what": "recall", "loss": loss, "distances": distances, "seq_len": length,
                   "mean_recall": mean("recall"),
                   "mean_overlap": mean("overlap"),
                   "per_layer": {str(k): v for k, v in metrics.items()}}
            if bank.mlp_layers:
                row.update(mean_mlp_recall=mean("mlp_recall"), mean_mlp_overlap=mean("mlp_overlap"))
            record(row)
    print(f"\nbase: {rows[0]['params_M']:.1f}M params, held-out loss {rows[0]['held_out_loss']}")
    print(f"{'tokens':>7} {'near-ties':>10} {'spread':>7} {'bf16 oracle':>12}  "
          f"oracle + noise {' / '.join(map(str, NOISE_LEVELS))} of the mean score")
    for length, row in sharpness.items():
        print(f"{length:>7} {row['near_threshold_share']:>10.2f} {row['score_spread']:>7.3f} "
              f"{row['recall_bf16_vs_fp32_oracle']:>12.3f}  "
              + " / ".join(f"{r:.3f}" for r in row["recall_with_noise"].values()))
    print(f"\n{'loss':>8} {'distances':>9} {'tokens':>7} {'recall':>7} {'overlap':>8} "
          f"{'MLP recall':>11}  per-layer recall")
    for row in rows:
        if row["what"] == "recall":
            per = " ".join(f"{v['recall']:.3f}" for v in row["per_layer"].values())
            print(f"{row['loss']:>8} {row['distances']:>9} {row['seq_len']:>7} {row['mean_recall']:>7.3f} "
                  f"{row['mean_overlap']:>8.3f} "
                  f"{row.get('mean_mlp_recall', float('nan')):>11.3f}  {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
