"""The per-layer plan: pure arithmetic on a `LemoConfig`, the layer count and the sequence length.

`plan_layers` turns a config plus the model's layer count and the (static) sequence length into one
`LayerPlan` per decoder layer: dense or sparse, and how many blocks a sparse layer keeps.
`kept_blocks`, `padded_kept_tokens` and `kept_channels` are the counts it is made of (the kernels
and the reference use the same ones); `LayerGroup` names the layers one backend serves when decoder
layers are compiled one by one; `ModelSignature` is the model's shape as lemo sees it in the graph
(what a predictor bank must agree with).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the options module imports the predictor bank, which runs on these counts
    from lemo_compile.config import LemoConfig


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What lemo does with one decoder layer for one (static) sequence length.

    sparse:       True when the attention block runs on `kept_tokens` tokens instead of all.
    n_blocks:     full blocks in the sequence (S // block_size); the S % block_size tail is kept.
    kept_blocks:  full blocks kept (== n_blocks for a dense layer); with padding, what a row of
                  all S real tokens keeps (a shorter row keeps its own count, see `padded`).
    kept_tokens:  the rows the compacted block runs on: kept_blocks * block_size + tail (== S for
                  a dense layer); with padding, `padded_kept_tokens` (room for any row's kept set).
    reason:       why the layer is dense, empty for a sparse layer.
    mlp_kept_blocks, mlp_kept_tokens: the same for the MLP block (== n_blocks / S when it is
                  dense: mlp="off", a dense layer, or nothing to drop).
    padded:       the block is planned for a padded batch (an attention mask reaches it): each row
                  keeps what it would keep alone, `kept_blocks(ratio, L // block_size)` blocks of
                  its L real tokens plus their tail; the other rows of the compacted block are
                  fillers whose results are discarded.
    mlp_channel_ratio: mlp="channels": the fraction of the MLP's intermediate channels its backward
                  keeps (None: the MLP's backward is exact; also for a ratio of 1).
    mlp_kept_channels, mlp_channels: as applied (set in `CompileReport.plans`), the channels the
                  backward keeps and the intermediate size I; None when the MLP's backward is
                  exact (mlp != "channels", a dense layer, C == I, or a fallback).
    """

    layer: int
    sparse: bool
    seq_len: int
    n_blocks: int
    kept_blocks: int
    kept_tokens: int
    reason: str = ""
    mlp_kept_blocks: int = -1
    mlp_kept_tokens: int = -1
    padded: bool = False
    mlp_channel_ratio: float | None = None
    mlp_kept_channels: int | None = None
    mlp_channels: int | None = None

    def __post_init__(self) -> None:
        if self.mlp_kept_blocks < 0:
            object.__setattr__(self, "mlp_kept_blocks", self.n_blocks)
            object.__setattr__(self, "mlp_kept_tokens", self.seq_len)

    @property
    def mlp_sparse(self) -> bool:
        return self.mlp_kept_tokens < self.seq_len


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Decoder layers compiled one by one that share one backend: each graph that backend sees is
    one decoder layer (the graph's root module is the layer), of a model of `num_layers` layers.

    layers: the indices of the layers sharing the backend, ascending; they share one plan, so one
            Dynamo graph serves them all and it is planned as `layers[0]`.
    """

    layers: tuple[int, ...]
    num_layers: int

    def __post_init__(self) -> None:
        if not self.layers or any(not 0 <= i < self.num_layers for i in self.layers):
            raise ValueError(f"layer group {self.layers} is not within 0..{self.num_layers - 1}")


def dense_layer_set(config: LemoConfig, num_layers: int) -> frozenset[int]:
    """Indices of the layers `config.dense_layers` keeps dense in a model of `num_layers` layers."""
    if config.dense_layers == "auto":
        return frozenset(range(num_layers // 2)) | {num_layers - 1}
    _check_layers_exist("dense_layers", config.dense_layers, num_layers)
    return frozenset(config.dense_layers)


def _check_layers_exist(option: str, layers: tuple[int, ...], num_layers: int) -> None:
    out_of_range = [layer for layer in layers if layer >= num_layers]
    if out_of_range:
        raise ValueError(
            f"lemo option {option!r} names layers {out_of_range} but the model has "
            f"{num_layers} decoder layers"
        )


def kept_blocks(ratio: float, n_blocks: int) -> int:
    """Full blocks a sparse layer keeps out of `n_blocks`: min(n, max(1, ceil(ratio * n))), 0 for
    n == 0. Keeping all n means the layer (or, with padding, the row) runs dense."""
    return min(n_blocks, max(1, math.ceil(ratio * n_blocks)))


def padded_kept_tokens(ratio: float, seq_len: int, block_size: int) -> int:
    """The most tokens a row of any length L <= seq_len keeps on its own (its kept blocks plus its
    L % block_size tail): the static size of a block compacted for a padded batch."""
    most = 0
    for n in range(seq_len // block_size + 1):
        longest = min(seq_len, (n + 1) * block_size - 1)  # the longest row with n full blocks
        most = max(most, kept_blocks(ratio, n) * block_size + longest - n * block_size)
    return most


def plan_layers(config: LemoConfig, num_layers: int, seq_len: int,
                padded: bool = False) -> list[LayerPlan]:
    """One `LayerPlan` per decoder layer for sequences of `seq_len` tokens; `padded`: for batches
    whose rows may hold padding (then a sparse block's `kept_tokens` is `padded_kept_tokens`)."""
    if isinstance(config.keep_ratio, tuple) and len(config.keep_ratio) != num_layers:
        raise ValueError(
            f"lemo option 'keep_ratio' has {len(config.keep_ratio)} entries but the model has "
            f"{num_layers} decoder layers"
        )
    dense = dense_layer_set(config, num_layers)
    if isinstance(config.save_attention, tuple):
        _check_layers_exist("save_attention", config.save_attention, num_layers)
    n_blocks, tail = divmod(seq_len, config.block_size)
    plans = []
    for layer in range(num_layers):
        kept = kept_blocks(config.keep_ratio_of(layer), n_blocks)
        if layer in dense:
            reason = "dense_layers"
        elif n_blocks == 0:
            reason = f"sequence shorter than one block ({seq_len} < {config.block_size})"
        elif kept == n_blocks:
            reason = "keeps every block"
        else:
            reason = ""
        mlp = {}
        if config.mlp == "tokens" and layer not in dense and n_blocks:
            ratio = config.mlp_ratio_of(layer)
            mlp_kept = kept_blocks(ratio, n_blocks)
            mlp_tokens = mlp_kept * config.block_size + tail
            if padded and mlp_kept < n_blocks:
                mlp_tokens = padded_kept_tokens(ratio, seq_len, config.block_size)
            mlp = {"mlp_kept_blocks": mlp_kept, "mlp_kept_tokens": mlp_tokens}
        if config.mlp == "channels" and config.mlp_channel_ratio < 1 and layer not in dense:
            mlp = {"mlp_channel_ratio": config.mlp_channel_ratio}
        if reason:
            plans.append(LayerPlan(layer, False, seq_len, n_blocks, n_blocks, seq_len, reason, **mlp,
                                   padded=padded))
        else:
            kept_tokens = kept * config.block_size + tail
            if padded:
                kept_tokens = padded_kept_tokens(config.keep_ratio_of(layer), seq_len,
                                                 config.block_size)
            plans.append(LayerPlan(layer, True, seq_len, n_blocks, kept, kept_tokens, **mlp,
                                   padded=padded))
    return plans


def kept_channels(ratio: float, channels: int) -> int:
    """Channels an MLP of intermediate size `channels` keeps in its backward with mlp="channels"."""
    return min(channels, max(1, math.ceil(ratio * channels)))


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
