"""Trained block-score predictors (README.md, "Trained predictors"), one per sparse layer, and their storage.

A `BlockPredictor` reads a layer's attention input h = norm1(x) [B, S, D] (D = H slices of D / H),
reshapes it into 64-token blocks and, per block and per head slice, maps the block's b x D/H values
through a q-side and a k-side network (three linear layers with ReLU between them, weights shared
across head slices) to rank-r features. The block score matrix is

    P[m, p] = sum_h qhat[m, h] . khat[p, h] + r[min(m - p, R - 1)]     [B, n, n]

which approximates the oracle's tile maxima M up to a positive scale; the block scores are the same
`sigma` rule applied to P's lower triangle. Everything runs in float32, with no gradient.

The learned bias r over the block distance m - p (R entries, the last shared by all longer
distances) is lemo's addition to the paper's predictor: the oracle's q and k carry rotary position
information that h does not, and attention to nearby blocks depends on distance more than on
content. On held-out text of the small BPE model of `benchmarks/predictors.py` it raised the mean
recall from 0.50-0.53 to 0.69-0.80 at 4K-16K tokens (README, "Trained predictors"). R = 1 leaves
it out: one entry adds the same amount to every block score.

An `MlpPredictor` does the same for an MLP block (mlp="tokens"): a small network from the MLP's
input to a score per token, approximating the oracle's norm of the intermediate activation.

A `PredictorBank` holds the predictors of all sparse layers and the facts they were trained for
(the model's hidden size, heads, head dim and layer count, the block size); it is saved as a
safetensors file whose metadata carries those facts, and refuses a model that does not match.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from lemo_compile import ops
from lemo_compile.kernels.block_scores import scores_from_tiles
from lemo_compile.plan import ModelSignature

FORMAT = "lemo-predictors-2"
DISTANCES = 1024  # R: block distances with their own bias (64K tokens at block size 64)


class BlockPredictor(nn.Module):
    """The q-side and k-side networks of one layer: h [B, S, D] -> P [B, n, n] (float32).

    q_sizes / k_sizes: the widths of each side, input first: (b * D / H, hidden1, hidden2, rank).
    The two sides start equal (`BlockPredictor.new`) and may differ after elastic shrinking.
    distances: R, the length of the distance bias r (module docstring).
    """

    def __init__(self, block_size: int, heads: int, q_sizes, k_sizes,
                 distances: int = DISTANCES) -> None:
        super().__init__()
        self.block_size, self.heads = block_size, heads
        self.distance_bias = nn.Parameter(torch.zeros(distances))

        self.q_side = _network(q_sizes)
        self.k_side = _network(k_sizes)

    @classmethod
    def new(cls, block_size: int, hidden_size: int, heads: int, width: int = 128,
            rank: int = 32, distances: int = DISTANCES) -> BlockPredictor:
        """A freshly initialised predictor with hidden layers of `width`, `rank` features and a
        distance bias of `distances` entries."""
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {heads} heads")
        sizes = (block_size * hidden_size // heads, width, width, rank)
        return cls(block_size, heads, sizes, sizes, distances)

    @torch.no_grad()
    def hidden_activity(
        self, h: torch.Tensor, seen: dict | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """Which hidden ReLU units of each side are positive for some block of h, per hidden layer:
        {"q" | "k": [bool mask]}, OR-ed into `seen` (a previous result) when given."""
        blocks = _blocks(h, self.block_size, self.heads)
        result = {}
        for name in ("q", "k"):
            tensors, masks, x = self.side_tensors(name), [], blocks
            for i in range(0, len(tensors) - 2, 2):
                x = F.relu(F.linear(x, tensors[i], tensors[i + 1]))
                masks.append((x > 0).flatten(0, -2).any(dim=0))
            if seen is not None:
                masks = [a | b for a, b in zip(masks, seen[name], strict=True)]
            result[name] = masks
        return result

    def sizes(self, side: str) -> tuple[int, ...]:
        return _sizes(self.q_side if side == "q" else self.k_side)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return block_score_matrix(h, self.side_tensors("q"), self.side_tensors("k"),
                                  self.distance_bias, self.block_size, self.heads)

    def side_tensors(self, side: str) -> list[torch.Tensor]:
        """The q- or k-side's weights and biases, layer by layer: [W1, b1, W2, b2, W3, b3]."""
        return list((self.q_side if side == "q" else self.k_side).parameters())


class MlpPredictor(nn.Module):
    """One layer's MLP-block scorer (mlp="tokens"): the MLP's input h2 = norm2(x1) [B, S, D] ->
    a score per token [B, S] (float32), through linear layers with ReLU between them, of `sizes`
    (D, width, width, 1). It approximates, up to a positive scale, the oracle's per-token score
    (the norm of the MLP's intermediate activation); block scores are its maximum over each block,
    as for the oracle (`predicted_mlp_block_scores`). Elastic shrinking leaves it as it is."""

    def __init__(self, sizes) -> None:
        super().__init__()
        self.net = _network(sizes)

    @classmethod
    def new(cls, hidden_size: int, width: int = 128) -> MlpPredictor:
        return cls((hidden_size, width, width, 1))

    def sizes(self) -> tuple[int, ...]:
        return _sizes(self.net)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _side(h.float(), self.tensors())[..., 0]

    def tensors(self) -> list[torch.Tensor]:
        """Weights and biases, layer by layer: [W1, b1, W2, b2, W3, b3]."""
        return list(self.net.parameters())


def _network(sizes) -> nn.Sequential:
    """Linear layers of the given widths (input first), with a ReLU between consecutive ones."""
    sizes = tuple(sizes)
    layers: list[nn.Module] = []
    for i, (inputs, outputs) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(inputs, outputs)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def _sizes(network: nn.Sequential) -> tuple[int, ...]:
    linears = [m for m in network if isinstance(m, nn.Linear)]
    return (linears[0].in_features, *(m.out_features for m in linears))


def block_score_matrix(
    h: torch.Tensor, q_side: list[torch.Tensor], k_side: list[torch.Tensor],
    distance_bias: torch.Tensor, block_size: int, heads: int,
) -> torch.Tensor:
    """P [B, n, n] (float32) of a predictor given as tensors (see `BlockPredictor.side_tensors`);
    entries above the diagonal (m < p) carry no distance bias and are never used."""
    blocks = _blocks(h, block_size, heads)
    scores = torch.einsum("bmhr,bphr->bmp", _side(blocks, q_side), _side(blocks, k_side))
    n = scores.shape[-1]
    position = torch.arange(n, device=scores.device)
    distance = (position[:, None] - position[None, :]).clamp(0, distance_bias.shape[0] - 1)
    return scores + distance_bias[distance]


def _blocks(h: torch.Tensor, block_size: int, heads: int) -> torch.Tensor:
    """h [B, S, D] as each full block's slice per head: [B, n, H, b * D / H] (float32)."""
    batch, seq_len, hidden = h.shape
    n = seq_len // block_size
    blocks = h[:, : n * block_size].float().reshape(batch, n, block_size, heads, hidden // heads)
    return blocks.transpose(2, 3).reshape(batch, n, heads, -1)


def _side(x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    last = len(tensors) - 2
    for i in range(0, len(tensors), 2):
        x = F.linear(x, tensors[i], tensors[i + 1])
        if i < last:
            x = F.relu(x)
    return x


def predicted_block_scores(
    h: torch.Tensor, q_side: list[torch.Tensor], k_side: list[torch.Tensor],
    distance_bias: torch.Tensor, block_size: int, heads: int, per_distance: bool = False,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """sigma [B, n] (float32) from a predictor's P, with the oracle's rule (causal tiles only;
    per_distance: divided by their distance's mean first, as the option `distance_normalized`
    does to the oracle's tiles).

    With `real` [B, S] (a padded batch), each row's own blocks: its real tokens first
    (`ops.real_first`), and the tiles of blocks past its full ones (its tail, its padding) zeroed,
    so that a row's scores are those it would get alone.
    A graph function: the predictor scorer inserts it with the weights as graph constants."""
    h = h.detach()
    if real is not None:
        h = ops.real_first(h, real, 1, block_size)
    tiles = block_score_matrix(h, q_side, k_side, distance_bias, block_size, heads)
    full = None
    if real is not None:
        full = ops.full_blocks(real, block_size)
        own = torch.arange(tiles.shape[1], device=tiles.device)[None, :] < full[:, None]
        tiles = torch.where(own[:, :, None] & own[:, None, :], tiles, torch.zeros((), device=tiles.device))
    return scores_from_tiles(torch.tril(tiles), per_distance, full)


def predicted_mlp_block_scores(
    h: torch.Tensor, tensors: list[torch.Tensor], block_size: int, real: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLP block scores [B, n] (float32) of an `MlpPredictor` given as tensors, from the MLP's input
    h [B, S, D]: the max of the per-token scores over each full block (`ops.token_block_scores`,
    which also says what `real` does). A graph function, like `predicted_block_scores`."""
    return ops.token_block_scores(_side(h.detach().float(), tensors)[..., 0], block_size, real)


class PredictorBank(nn.Module):
    """Predictors for the sparse layers of one model, keyed by layer index: a `BlockPredictor` per
    sparse attention block and, when calibrated with mlp="tokens", an `MlpPredictor` per sparse MLP
    block.

    Build with `PredictorBank(signature, layers, width=..., rank=..., mlp_layers=...,
    distances=...)`, train with `lemo_compile.calibrate`, store with `save(path)` /
    `PredictorBank.load(path)`.
    """

    def __init__(self, signature: ModelSignature, layers, width: int = 128, rank: int = 32,
                 mlp_layers=(), distances: int = DISTANCES) -> None:
        super().__init__()
        self.signature = signature
        self.width, self.rank = width, rank
        self.predictors = nn.ModuleDict({
            str(layer): BlockPredictor.new(signature.block_size, signature.hidden_size,
                                           signature.heads, width, rank, distances)
            for layer in sorted(layers)
        })
        self.mlp_predictors = nn.ModuleDict({
            str(layer): MlpPredictor.new(signature.hidden_size, width) for layer in sorted(mlp_layers)
        })

    @property
    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.predictors)

    @property
    def mlp_layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.mlp_predictors)

    def predictor(self, layer: int) -> BlockPredictor:
        return self.predictors[str(layer)]

    def mlp_predictor(self, layer: int) -> MlpPredictor:
        return self.mlp_predictors[str(layer)]

    def shrink(self, activity) -> dict[int, dict[str, tuple[int, ...]]]:
        """Elastic shrinking: remove the hidden ReLU units that `activity` ({layer: merged
        `BlockPredictor.hidden_activity`}) never saw positive; on the observed inputs they contribute
        nothing, so the predictions there are unchanged. Returns each layer's new sizes per side."""
        with torch.no_grad():
            for layer, sides in activity.items():
                predictor = self.predictor(layer)
                for name, side in (("q", predictor.q_side), ("k", predictor.k_side)):
                    _prune_side(side, sides[name])
        return {layer: {s: self.predictor(layer).sizes(s) for s in "qk"} for layer in activity}

    def check_fits(self, signature: ModelSignature, sparse_layers, mlp_sparse_layers=()) -> None:
        """Raise ValueError unless this bank was trained for `signature` and covers every layer of
        `sparse_layers`, and, if it holds MLP predictors at all, every layer of `mlp_sparse_layers`
        (a bank without any leaves MLP blocks to the exact activation score)."""
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
        missing = sorted(set(mlp_sparse_layers) - set(self.mlp_layers))
        if self.mlp_layers and missing:
            raise ValueError(
                f"lemo predictors cover the MLP blocks of layers {self.mlp_layers} but the MLP blocks "
                f"of layers {missing} are sparse: calibrate with the same options."
            )

    def metadata(self) -> dict[str, str]:
        sizes = {layer: {**{side: self.predictor(layer).sizes(side) for side in "qk"},
                         "distances": self.predictor(layer).distance_bias.shape[0]}
                 for layer in self.layers}
        return {
            "format": FORMAT,
            "signature": json.dumps(dataclasses.asdict(self.signature)),
            "layers": json.dumps(self.layers),
            "width": str(self.width),
            "rank": str(self.rank),
            "sizes": json.dumps(sizes),
            "mlp_sizes": json.dumps({layer: self.mlp_predictor(layer).sizes()
                                     for layer in self.mlp_layers}),
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
        signature = ModelSignature(**json.loads(meta["signature"]))
        bank = cls(signature, [], width=int(meta["width"]), rank=int(meta["rank"]))
        for layer, sizes in json.loads(meta["sizes"]).items():
            bank.predictors[layer] = BlockPredictor(signature.block_size, signature.heads,
                                                    sizes["q"], sizes["k"], sizes["distances"])
        for layer, sizes in json.loads(meta.get("mlp_sizes", "{}")).items():
            bank.mlp_predictors[layer] = MlpPredictor(sizes)
        bank.load_state_dict(tensors)
        return bank.requires_grad_(False).eval()


def _prune_side(side: nn.Sequential, masks: list[torch.Tensor | None]) -> None:
    """Keep, in place, only the units of each hidden layer of `side` that `masks` marks active."""
    linears = [i for i, m in enumerate(side) if isinstance(m, nn.Linear)]
    for position, keep in enumerate(masks):
        if keep is None:
            continue  # never ran: nothing is known, keep all
        keep = keep.clone()
        if not keep.any():
            keep[0] = True  # keep one unit so that shapes stay valid
        index, following = linears[position], linears[position + 1]
        side[index] = _linear_rows(side[index], keep)
        side[following] = _linear_columns(side[following], keep)


def _linear_rows(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(layer.in_features, int(keep.sum()), device=layer.weight.device)
    new.weight.copy_(layer.weight[keep])
    new.bias.copy_(layer.bias[keep])
    return new


def _linear_columns(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(int(keep.sum()), layer.out_features, device=layer.weight.device)
    new.weight.copy_(layer.weight[:, keep])
    new.bias.copy_(layer.bias)
    return new


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
