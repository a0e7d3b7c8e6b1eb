"""The `lemo` command.

`lemo demo`: dense vs lemo fine-tuning side by side on a small Llama.
`lemo calibrate`: train block-score predictors for a model against the oracle (`lemo_compile.calibrate`).
`lemo inspect`: what lemo does to a model at a sequence length: the plan as a table, and
`lemo_compile.explain`'s artefacts (graphs, diffs, keep map, region graph, ONNX) in a folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import lemo_compile
from lemo_compile.tools.demo import DemoSettings, run_demo, run_variant
from lemo_compile.predictors.bank import DISTANCES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lemo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="fine-tune a small Llama dense and with lemo, side by side")
    defaults = DemoSettings()
    demo.add_argument("--seq-len", type=int, default=defaults.seq_len)
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size)
    demo.add_argument("--steps", type=int, default=defaults.steps)
    demo.add_argument("--layers", type=int, default=defaults.layers)
    demo.add_argument("--hidden", type=int, default=defaults.hidden)
    demo.add_argument("--keep-ratio", type=float, default=defaults.keep_ratio)
    demo.add_argument("--compiler", choices=("inductor", "aot_eager"), default=defaults.compiler)
    demo.add_argument("--device", default=defaults.device)
    # Internal: one variant in this process, result as JSON on stdout (used by `lemo demo` itself).
    demo.add_argument("--variant", choices=("dense", "lemo"), help=argparse.SUPPRESS)
    demo.add_argument("--settings", help=argparse.SUPPRESS)
    calibrate = commands.add_parser(
        "calibrate", help="train block-score predictors for a model against the oracle"
    )
    calibrate.add_argument("--model", required=True,
                           help="a Hugging Face checkpoint folder (AutoModelForCausalLM)")
    calibrate.add_argument("--data", required=True,
                           help="a text file, or a folder of .txt/.md/.rst/.py files")
    calibrate.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    calibrate.add_argument("--steps", type=int, default=400)
    calibrate.add_argument("--batch-size", type=int, default=1)
    calibrate.add_argument("--out", required=True, help="where to write the predictors")
    calibrate.add_argument("--keep-ratio", type=float, default=0.4)
    calibrate.add_argument("--block-size", type=int, default=64)
    calibrate.add_argument("--dense-layers", default="auto",
                           help="'auto' or comma-separated indices of dense layers")
    calibrate.add_argument("--mlp", choices=("off", "tokens"), default="off",
                           help="'tokens': also train MLP-block predictors (for mlp='tokens')")
    calibrate.add_argument("--mlp-keep-ratio", type=float, default=None,
                           help="the MLP blocks' keep ratio (default: --keep-ratio)")
    calibrate.add_argument("--lr", type=float, default=1e-3)
    calibrate.add_argument("--loss", choices=("tiles", "ranking"), default="tiles",
                           help="'ranking': add a pairwise loss between kept and dropped blocks")
    calibrate.add_argument("--distances", type=int, default=DISTANCES,
                           help="block distances with their own learned bias (1: no distance bias)")
    calibrate.add_argument("--held-out", type=float, default=0.1,
                           help="fraction of the files kept out of training, for the recall report")
    calibrate.add_argument("--distance-normalized", action="store_true",
                           help="score blocks as the option distance_normalized does (train "
                                "with that option too): recall is then measured on those scores")
    calibrate.add_argument("--shrink", action="store_true",
                           help="elastic shrinking: drop predictor units that are never active")
    calibrate.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    calibrate.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    inspect = commands.add_parser(
        "inspect", help="show what lemo does to a model: plan table, graphs, keep map, DOT, ONNX")
    inspect.add_argument("model", help="a Hugging Face checkpoint folder, or a config.json (random "
                                       "weights)")
    inspect.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    inspect.add_argument("--batch-size", type=int, default=1)
    inspect.add_argument("--text", help="a text file to take the tokens from (default: random ids)")
    inspect.add_argument("--out", default="lemo_inspect", help="the folder for the artefacts")
    inspect.add_argument("--options", default="{}",
                         help='lemo options as JSON, e.g. \'{"keep_ratio": 0.3, "mlp": "tokens"}\'')
    inspect.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    inspect.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    if args.command == "calibrate":
        return run_calibrate(args)
    if args.command == "inspect":
        return run_inspect(args)
    if args.variant:
        settings = DemoSettings(**json.loads(args.settings))
        print(json.dumps(run_variant(args.variant, settings)))
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step includes compilation)")
    settings = dataclasses.replace(
        defaults, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
        layers=args.layers, hidden=args.hidden, keep_ratio=args.keep_ratio,
        compiler=args.compiler, device=args.device,
    )
    run_demo(settings)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """`lemo calibrate`: train, save, then report per-layer recall on the held-out files."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.to(device)
    dense = "auto" if args.dense_layers == "auto" else [int(i) for i in args.dense_layers.split(",")]
    options = {"block_size": args.block_size, "keep_ratio": args.keep_ratio, "dense_layers": dense,
               "mlp": args.mlp, "mlp_keep_ratio": args.mlp_keep_ratio,
               "distance_normalized": args.distance_normalized}
    encode = _encoder(args.model, model.config.vocab_size)
    files = _text_files(pathlib.Path(args.data))
    held = max(1, round(len(files) * args.held_out)) if len(files) > 1 else 0
    train = _batches(files[: len(files) - held], encode, args.seq_len, args.batch_size, device)
    test = _batches(files[len(files) - held :], encode, args.seq_len, args.batch_size, device)
    if not train:
        raise SystemExit(f"lemo calibrate: {args.data} holds fewer than {args.seq_len} tokens "
                         "for training")
    bank = lemo_compile.calibrate(model, train, options=options, steps=args.steps, lr=args.lr,
                                  shrink=args.shrink, loss=args.loss, distances=args.distances)
    bank.save(args.out)
    print(f"wrote {args.out}: predictors for layers {bank.layers}"
          + (f", MLP predictors for layers {bank.mlp_layers}" if bank.mlp_layers else ""))
    if test:
        metrics = lemo_compile.predictor_recall(model, bank, test[:16], options=options)
        print(f"held-out recall ({min(len(test), 16)} batches of {args.seq_len} tokens):")
        for layer, values in metrics.items():
            mlp = (f"  MLP recall {values['mlp_recall']:.3f}  overlap {values['mlp_overlap']:.3f}"
                   if "mlp_recall" in values else "")
            print(f"  layer {layer:3d}  recall {values['recall']:.3f}  overlap "
                  f"{values['overlap']:.3f}{mlp}")
        mean = sum(v["recall"] for v in metrics.values()) / len(metrics)
        print(f"  mean       recall {mean:.3f}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """`lemo inspect`: explain() on one batch, print the plan, write the artefacts."""
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise SystemExit(f"lemo inspect: --options is not JSON: {err}") from None
    path = pathlib.Path(args.model)
    dtype = getattr(torch, args.dtype)
    if not path.exists():
        raise SystemExit(f"lemo inspect: {path} does not exist")
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        print(f"{path}: no weights, random initialisation from the config")
    vocab = model.config.vocab_size
    if args.text:
        encode = _encoder(args.model, vocab) if has_weights else (lambda t: list(t.encode("utf-8")))
        tokens = encode(pathlib.Path(args.text).read_text(encoding="utf-8", errors="replace"))
        needed = args.seq_len * args.batch_size
        if len(tokens) < needed:
            raise SystemExit(f"lemo inspect: {args.text} holds {len(tokens)} tokens, "
                             f"{needed} are needed")
        ids = torch.tensor(tokens[:needed]).reshape(args.batch_size, args.seq_len) % vocab
    else:
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    print(f"explaining {type(model).__name__} at {args.batch_size} x {args.seq_len} tokens ...",
          flush=True)
    with warnings.catch_warnings():
        # inspect never reads the training logits: the segmented loss's placeholder is expected
        warnings.filterwarnings("ignore", message=".*NaN placeholder",
                                category=lemo_compile.LemoWarning)
        explanation = lemo_compile.explain(model, input_ids=ids, labels=ids, use_cache=False,
                                           options=options)
    print(explanation.table())
    written = explanation.write(args.out, onnx=not args.no_onnx)
    print(f"wrote {len(written)} files to {args.out}/: "
          + ", ".join(sorted({p.relative_to(args.out).parts[0] for p in written.values()})))
    return 0


def _encoder(model_path: str, vocab_size: int):
    """The checkpoint's tokenizer, or bytes as token ids when it has none (byte-level models)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    except (OSError, ValueError):
        if vocab_size < 256:
            raise SystemExit(f"lemo calibrate: {model_path} has no tokenizer and a vocabulary of "
                             f"{vocab_size} < 256, so bytes cannot serve as tokens") from None
        return lambda text: list(text.encode("utf-8"))


def _text_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".rst", ".py"))
    if not files:
        raise SystemExit(f"lemo calibrate: no .txt/.md/.rst/.py files under {path}")
    return files


def _batches(files, encode, seq_len: int, batch_size: int, device) -> list:
    """The files' tokens, concatenated in order and cut into [batch_size, seq_len] batches."""
    tokens: list[int] = []
    for path in files:
        tokens += encode(path.read_text(encoding="utf-8", errors="replace"))
    per_batch = seq_len * batch_size
    return [
        torch.tensor(tokens[start : start + per_batch], device=device).reshape(batch_size, seq_len)
        for start in range(0, len(tokens) - per_batch + 1, per_batch)
    ]


if __name__ == "__main__":
    sys.exit(main())
