"""The `lemo` command. `lemo demo`: dense vs lemo fine-tuning side by side on a small Llama."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lemo_compile.demo import DemoSettings, run_demo, run_variant


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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
