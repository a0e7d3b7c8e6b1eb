"""Reassemble the small model trained by `benchmarks/predictors.py` into a Hugging Face checkpoint.

predictors.py writes the model as safetensors shards of at most 15 MiB (model.json holds the
LlamaConfig and the shard count) so that it can travel back from the GPU machine; this script puts
them together as a folder `AutoModelForCausalLM.from_pretrained` (and `lemo inspect`) can read.

    python benchmarks/trained_model.py RESULTS_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the --out-dir of benchmarks/predictors.py")
    parser.add_argument("out", help="the checkpoint folder to write")
    args = parser.parse_args()

    from predictors import load_shards  # beside this script

    model = load_shards(pathlib.Path(args.results))
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
