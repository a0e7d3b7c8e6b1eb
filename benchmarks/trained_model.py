"""Reassemble the small model trained by `benchmarks/predictors.py` into a Hugging Face checkpoint.

predictors.py writes the model as safetensors shards of at most 15 MiB (model.json holds the
LlamaConfig and the shard count) so that it can travel back from the GPU machine; this script puts
them together as a folder `AutoModelForCausalLM.from_pretrained` (and `lemo inspect`) can read.

    python benchmarks/trained_model.py RESULTS_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the --out-dir of benchmarks/predictors.py")
    parser.add_argument("out", help="the checkpoint folder to write")
    args = parser.parse_args()

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    results = pathlib.Path(args.results)
    meta = json.loads((results / "model.json").read_text())
    shards = meta.pop("shards")
    state = {}
    for i in range(shards):
        state.update(load_file(results / f"model.{i}.safetensors"))
    model = LlamaForCausalLM(LlamaConfig(**meta))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The LM head shares the embedding's weights, so the state dict may leave it out.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
