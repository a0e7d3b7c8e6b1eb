"""Trained block-score predictors (LEMO.md, "Predictors"), one per sparse layer, and their storage.

A `BlockPredictor` reads a layer's attention input h = norm1(x) [B, S, D] (D = H slices of D / H),
reshapes it into 64-token blocks and, per block and per head slice, maps the block's b x D/H values
through a q-side and a k-side network (three linear layers with ReLU between them, weights shared
across head slices) to rank-r features. The block score matrix is

    P[m, p] = sum_h qhat[m, h] . khat[p, h]                       [B, n, n]

which approximates the oracle's tile maxima M up to a positive scale; the block scores are the same
`sigma` rule applied to P's lower triangle. Everything runs in float32, with no gradient.

A `PredictorBank` holds the predictors of all sparse layers and the facts they were trained for
(the model's hidden size, heads, head dim and layer count, the block size); it is saved as a
safetensors file whose metadata carries those facts, and refuses a model that does not match.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "lemo-predictors-1"


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """What a bank must agree with: the model's shapes as lemo sees them in the graph."""

    hidden_size: int
    heads: int
    head_dim: int
    layers: int
    block_size: int

    def describe(self) -> str:
        return (f"hidden {self.hidden_size}, {self.heads} heads of {self.head_dim}, "
                f"{self.layers} layers, block size {self.block_size}")


class BlockPredictor(nn.Module):
    """The q-side and k-side networks of one layer: h [B, S, D] -> P [B, n, n] (float32)."""

    def __init__(self, block_size: int, hidden_size: int, heads: int, width: int = 128,
                 rank: int = 32) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {heads} heads")
        self.block_size, self.heads = block_size, heads
        slice_size = block_size * hidden_size // heads

        def side() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(slice_size, width), nn.ReLU(),
                nn.Linear(width, width), nn.ReLU(),
                nn.Linear(width, rank),
            )

        self.q_side = side()
        self.k_side = side()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return block_score_matrix(h, self.side_tensors("q"), self.side_tensors("k"),
                                  self.block_size, self.heads)

    def side_tensors(self, side: str) -> list[torch.Tensor]:
        """The q- or k-side's weights and biases, layer by layer: [W1, b1, W2, b2, W3, b3]."""
        return list((self.q_side if side == "q" else self.k_side).parameters())


def block_score_matrix(
    h: torch.Tensor, q_side: list[torch.Tensor], k_side: list[torch.Tensor], block_size: int,
    heads: int,
) -> torch.Tensor:
    """P [B, n, n] (float32) of a predictor given as tensors (see `BlockPredictor.side_tensors`)."""
    batch, seq_len, hidden = h.shape
    n = seq_len // block_size
    blocks = h[:, : n * block_size].float().reshape(batch, n, block_size, heads, hidden // heads)
    blocks = blocks.transpose(2, 3).reshape(batch, n, heads, -1)  # [B, n, H, b * D/H]
    return torch.einsum("bmhr,bphr->bmp", _side(blocks, q_side), _side(blocks, k_side))


def _side(x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    last = len(tensors) - 2
    for i in range(0, len(tensors), 2):
        x = F.linear(x, tensors[i], tensors[i + 1])
        if i < last:
            x = F.relu(x)
    return x


def predicted_block_scores(
    h: torch.Tensor, q_side: list[torch.Tensor], k_side: list[torch.Tensor], block_size: int,
    heads: int,
) -> torch.Tensor:
    """sigma [B, n] (float32) from a predictor's P, with the oracle's rule (causal tiles only).

    A graph function: the predictor scorer inserts it with the weights as graph constants."""
    from lemo_compile.kernels.block_scores import scores_from_tiles

    tiles = block_score_matrix(h.detach(), q_side, k_side, block_size, heads)
    return scores_from_tiles(torch.tril(tiles))


class PredictorBank(nn.Module):
    """Predictors for the sparse layers of one model, keyed by layer index.

    Build with `PredictorBank(signature, layers, width=..., rank=...)`, train with
    `lemo_compile.calibrate`, store with `save(path)` / `PredictorBank.load(path)`.
    """

    def __init__(self, signature: ModelSignature, layers, width: int = 128, rank: int = 32) -> None:
        super().__init__()
        self.signature = signature
        self.width, self.rank = width, rank
        self.predictors = nn.ModuleDict({
            str(layer): BlockPredictor(signature.block_size, signature.hidden_size, signature.heads,
                                       width, rank)
            for layer in sorted(layers)
        })

    @property
    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.predictors)

    def predictor(self, layer: int) -> BlockPredictor:
        return self.predictors[str(layer)]

    def check_fits(self, signature: ModelSignature, sparse_layers) -> None:
        """Raise ValueError unless this bank was trained for `signature` and covers every layer of
        `sparse_layers`."""
        if signature != self.signature:
            raise ValueError(
                "lemo predictors do not fit this model: they were trained for "
                f"{self.signature.describe()}, the model has {signature.describe()}. Calibrate "
                "predictors for this model (`lemo calibrate`) or use scorer='oracle'."
            )
        missing = sorted(set(sparse_layers) - set(self.layers))
        if missing:
            raise ValueError(
                f"lemo predictors cover layers {self.layers} but layers {missing} are sparse: "
                "calibrate with the same dense_layers, or make those layers dense."
            )

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "signature": json.dumps(dataclasses.asdict(self.signature)),
            "layers": json.dumps(self.layers),
            "width": str(self.width),
            "rank": str(self.rank),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights and metadata as one safetensors file."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, os.fspath(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PredictorBank:
        """Read a bank written by `save`; a file of another kind raises ValueError."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a lemo predictor file (format {meta.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        bank = cls(ModelSignature(**json.loads(meta["signature"])), json.loads(meta["layers"]),
                   width=int(meta["width"]), rank=int(meta["rank"]))
        bank.load_state_dict(tensors)
        return bank.requires_grad_(False).eval()


def as_bank(predictors: PredictorBank | str | os.PathLike) -> PredictorBank:
    """The `predictors` option as a bank: a PredictorBank, or the path of a saved one."""
    if isinstance(predictors, PredictorBank):
        return predictors
    if isinstance(predictors, (str, os.PathLike)):
        return PredictorBank.load(predictors)
    raise ValueError(
        "lemo option 'predictors' must be a PredictorBank or the path of one saved by "
        f"`lemo calibrate`, got {type(predictors).__name__}"
    )
