"""Options of the lemo backend, validated in one place.

`LemoConfig` is what `torch.compile(model, backend="lemo", options={...})` turns its options into;
`lemo_compile.plan` derives the per-layer plan from it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lemo_compile.predictors.bank import PredictorBank

SCORERS = ("oracle", "predictor", "random", "output")
MLP_MODES = ("off", "tokens", "channels")
COMPILERS = ("inductor", "aot_eager")


@dataclasses.dataclass(frozen=True)
class LemoConfig:
    """Validated lemo options (see the README's options table).

    block_size:   tokens per block; selection keeps or drops whole blocks.
    keep_ratio:   fraction of full blocks kept in each sparse layer, in (0, 1]; one float for all
                  layers or a sequence with one float per decoder layer.
    dense_layers: "auto" (the first L // 2 layers and the last one) or the indices of the layers that
                  run unchanged.
    scorer:       "oracle" (exact block scores from the layer's queries and keys), "predictor"
                  (trained predictors, needs `predictors`), "random" (a random-drop baseline) or
                  "output" (per token the L2 norm of the attention block's output, what the
                  block adds to the residual stream, computed densely on all tokens without
                  gradient; mean over each block: keeps the rows whose update is largest, for
                  measuring what a selection can keep; it runs the layer's attention twice, so it
                  saves memory, not time; not for padded batches, where the layer stays dense).
    predictors:   path or object holding trained predictors (scorer "predictor" only).
    mlp:          "off" keeps the MLP block dense; "tokens" runs the MLP block of every sparse layer
                  on its most active blocks only (oracle: the norm of the MLP's intermediate
                  activation per token, max over each block); "channels" keeps the MLP's forward
                  exact in every layer not in dense_layers, and sends its backward through the
                  top channels of the intermediate activation only (`ops.channel_linear`).
    mlp_keep_ratio: fraction of full blocks the MLP keeps with mlp="tokens"; None = the layer's
                  keep_ratio.
    mlp_channel_ratio: with mlp="channels", the fraction of the intermediate activation's channels
                  (per sample, by L2 norm over the tokens) that the backward goes through, in
                  (0, 1]; C = min(I, max(1, ceil(ratio * I))) of I. Default 0.5 (not tuned).
    loss_segment: rows per segment of the LM head + cross-entropy, or None for the plain loss.
    compiler:     "inductor" (real code generation) or "aot_eager" (AOTAutograd with Inductor's
                  decompositions and partitioner but no code generation: fast, for tests).
    fuse:         rewrite the gathers and scatter-adds of selection, in the forward and backward
                  graphs, into lemo's fused row kernels (`passes/fuse.py`); False leaves them to
                  Inductor (for comparisons).
    shorten_casts: in backward graphs, give matmuls that read a float32 copy of a bfloat16 tensor
                  late a copy of their own, and store once, narrowed, a float32 matmul output that
                  readers far apart would each recompute (`passes/lifetimes.py`), so that such
                  copies are not held across a whole layer's backward: with PEFT's float32
                  adapters on a bfloat16 model under checkpointing this lowers the peak by about
                  2-3 x S x hidden x 4 bytes, for a few extra casts. False leaves them to Inductor
                  (for comparisons).
    recompute_casts: outside checkpointed layers, make the backward recompute a float32 copy of a
                  bfloat16 (or float16) tensor that it reads, instead of the forward saving it
                  (`passes/recompute.py`): PEFT's float32 adapters' inputs, half the bytes (two
                  S x hidden float32 tensors less per dense layer), the same values, a few extra
                  casts in the backward (H200, 32 layers, 16K, mlp="tokens": peak 65.2 -> 53.0
                  GB, step 1.130 -> 1.140 s). False leaves the choice to the partitioner.
    swiglu_in_place: in backward graphs, write the SwiGLU MLP's gradients (Llama, Mistral, Qwen)
                  over its gate and up projections where these die there, as under checkpointing
                  (`passes/swiglu.py`): one S x intermediate tensor less at a checkpointed layer's
                  peak (1.9 GB at 64K tokens and Llama-3-8B's width). False leaves that backward to
                  Inductor (for comparisons).
    save_attention: with activation checkpointing (e.g. HF gradient checkpointing), keep each
                  checkpointed layer's attention output and log-sum-exp for the backward instead of
                  recomputing attention there (`passes/recompute.py`): faster at long lengths, and
                  S x hidden x 2 bytes (bf16) more per dense layer, K x hidden x 2 per sparse one.
                  True: every layer; "dense": the layers that run dense (a dense layer saves
                  more recomputation per byte than a sparse one, whose attention runs on K of S
                  tokens); a list of layer indices: those layers. No effect without
                  checkpointing.
    save_sparse_layers: with activation checkpointing, a sparse layer's checkpointed region is
                  not recomputed: its activations are kept as if it were not checkpointed
                  (`passes/recompute.py`). Dense layers are still recomputed. Pays with
                  mlp="tokens", where a sparse layer keeps a fraction of a dense layer's
                  activations; with mlp="off" its MLP keeps all of them. No effect without
                  checkpointing.
    backward_buffer_reuse: False (the default) compiles the backward graph with Inductor's buffer
                  reuse off: each buffer is freed at its last use, so the caching allocator can
                  lend the memory to whatever runs before a later same-sized value would have
                  reused it (under checkpointing: the attention backward, between one layer's MLP
                  backward and the previous layer's recomputed MLP). True keeps Inductor's default
                  (a freed buffer stays allocated until its planned reuse). The forward graph
                  always keeps Inductor's default. Inductor only.
    seed:         scorer "random" and `explore` only: None draws from torch's global RNG on every
                  call; an int gives each layer a fixed pattern.
    explore:      in [0, 1]: the share of each sparse attention block's k kept blocks drawn at
                  random (from the blocks the scorer did not pick) instead of by score; the
                  scorer's best k - round(explore * k) blocks are kept as before. 0 (the default)
                  keeps the scorer's choice; 1 is a random drop. Meant for fine-tuning: a fresh
                  draw at every step shows each layer every part of the context over a run (the
                  README's accuracy section says why). Not with scorer="random"; mlp="tokens"
                  keeps choosing its blocks by score. A padded row keeps fewer blocks, but the
                  scorer's share is counted on the full length, so such a row explores less.
    keep_first_blocks, keep_last_blocks: full blocks at the start and at the end of each row
                  (a padded row's own) that every sparse block keeps whatever their scores, within
                  its k (the lower blocks first when they are more than k); the rest of the k by
                  score. For text whose end matters most (a question and its answer, the labelled
                  tokens of instruction tuning, which sit last). Default 0 and 0.
    distance_normalized: scorers "oracle" and "predictor": each attention tile maximum (a
                  predictor's P entry) is divided by the row's mean of them at the same block
                  distance before the blocks' sums (`kernels/block_scores.tiles_per_distance`).
                  The plain sums favour the middle of a row, whose blocks have near neighbours
                  on both sides; with this a block scores by how much more it is attended than
                  blocks as far apart usually are. Default False (the semantics' oracle).
    dropped_loss_weight: in [0, 1]: in training, each token's term of the LM loss is weighted by
                  w = d + (1 - d) * (the share of the graph's sparse blocks, attention and with
                  mlp="tokens" MLP, that kept the token), d this value, and a "mean" loss becomes
                  the weighted mean (sum of w * loss over sum of w). A token that skipped sparse
                  blocks was computed by a thinner model, and its loss would tune the adapters
                  to that model; this counts it less. 1.0 (the default): every token counts
                  fully, the plain loss. Needs the segmented loss (`loss_segment`) and the loss
                  and the sparse layers in one graph: not with `compile_decoder_layers` (a clear
                  error); with gradient checkpointing the selections leave the checkpointed
                  regions as extra outputs.
    """

    block_size: int = 64
    keep_ratio: float | tuple[float, ...] = 0.4
    dense_layers: str | tuple[int, ...] = "auto"
    scorer: str = "oracle"
    predictors: Any = None
    mlp: str = "off"
    mlp_keep_ratio: float | None = None
    mlp_channel_ratio: float = 0.5
    loss_segment: int | None = 2048
    compiler: str = "inductor"
    fuse: bool = True
    shorten_casts: bool = True
    recompute_casts: bool = True
    swiglu_in_place: bool = True
    save_attention: bool | str | tuple[int, ...] = False
    save_sparse_layers: bool = False
    backward_buffer_reuse: bool = False
    seed: int | None = None
    explore: float = 0.0
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    distance_normalized: bool = False
    dropped_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        if isinstance(self.keep_ratio, Sequence) and not isinstance(self.keep_ratio, str):
            object.__setattr__(self, "keep_ratio", tuple(self.keep_ratio))
            if not self.keep_ratio:
                raise ValueError("lemo option 'keep_ratio': a per-layer list must not be empty")
            for ratio in self.keep_ratio:
                _check_ratio(ratio)
        else:
            _check_ratio(self.keep_ratio)
        if self.dense_layers != "auto":
            object.__setattr__(self, "dense_layers", _layer_indices(
                "dense_layers", self.dense_layers, "'auto' or a list of layer indices"))
        if not isinstance(self.save_attention, bool) and self.save_attention != "dense":
            object.__setattr__(self, "save_attention", _layer_indices(
                "save_attention", self.save_attention,
                "True, False, 'dense' or a list of layer indices"))
        _check_choice("scorer", self.scorer, SCORERS)
        _check_choice("mlp", self.mlp, MLP_MODES)
        _check_choice("compiler", self.compiler, COMPILERS)
        for name in ("fuse", "shorten_casts", "recompute_casts", "swiglu_in_place",
                     "save_sparse_layers", "backward_buffer_reuse", "distance_normalized"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"lemo option {name!r} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        if self.loss_segment is not None:
            _check_int("loss_segment", self.loss_segment, minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        _check_int("keep_first_blocks", self.keep_first_blocks, minimum=0)
        _check_int("keep_last_blocks", self.keep_last_blocks, minimum=0)
        if self.scorer == "predictor" and self.predictors is None:
            raise ValueError(
                "lemo option 'scorer' is 'predictor' but no 'predictors' were given: pass "
                "options={'predictors': PATH_OR_BANK} (made by `lemo calibrate`), or use "
                "scorer='oracle'"
            )
        if self.scorer == "predictor":
            if not isinstance(self.predictors, (str, os.PathLike, PredictorBank)):
                raise ValueError(
                    "lemo option 'predictors' must be a PredictorBank or the path of one saved by "
                    f"`lemo calibrate`, got {type(self.predictors).__name__}"
                )
        if (isinstance(self.explore, bool) or not isinstance(self.explore, (int, float))
                or not 0.0 <= self.explore <= 1.0):
            raise ValueError(f"lemo option 'explore' must be a number in [0, 1], got {self.explore!r}")
        if self.explore > 0 and self.scorer == "random":
            raise ValueError("lemo option 'explore' draws part of a scorer's blocks at random; "
                             "scorer='random' draws them all already: leave explore at 0")
        if self.distance_normalized and self.scorer in ("random", "output"):
            raise ValueError("lemo option 'distance_normalized' rescales the attention tiles of "
                             f"the oracle or of trained predictors; scorer={self.scorer!r} has "
                             "none")
        if (isinstance(self.dropped_loss_weight, bool)
                or not isinstance(self.dropped_loss_weight, (int, float))
                or not 0.0 <= self.dropped_loss_weight <= 1.0):
            raise ValueError("lemo option 'dropped_loss_weight' must be a number in [0, 1], got "
                             f"{self.dropped_loss_weight!r}")
        if self.dropped_loss_weight < 1 and self.loss_segment is None:
            raise ValueError("lemo option 'dropped_loss_weight' weights the rows of lemo's "
                             "segmented loss: it needs loss_segment (an integer), not None")
        if self.mlp_keep_ratio is not None:
            _check_ratio(self.mlp_keep_ratio, "mlp_keep_ratio")
        _check_ratio(self.mlp_channel_ratio, "mlp_channel_ratio")

    @classmethod
    def from_options(cls, options: LemoConfig | Mapping[str, Any] | None) -> LemoConfig:
        """Build a config from `torch.compile`'s `options` dict; unknown keys raise ValueError."""
        if options is None:
            return cls()
        if isinstance(options, LemoConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"lemo options must be a dict, got {type(options).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown lemo option(s) {unknown}; the options are {sorted(known)}"
            )
        return cls(**options)

    def keep_ratio_of(self, layer: int) -> float:
        """The keep ratio of decoder layer `layer`."""
        if isinstance(self.keep_ratio, tuple):
            if layer >= len(self.keep_ratio):
                raise ValueError(
                    f"lemo option 'keep_ratio' has {len(self.keep_ratio)} entries but the model "
                    f"has a layer {layer}: give one ratio per decoder layer"
                )
            return self.keep_ratio[layer]
        return self.keep_ratio

    def saves_attention(self, layer: int | None, dense: Collection[int]) -> bool:
        """Whether decoder layer `layer` keeps its attention output under checkpointing
        (`save_attention`), given the layers that run dense; None: an attention call outside any
        decoder layer."""
        if isinstance(self.save_attention, bool):
            return self.save_attention
        return layer in (dense if self.save_attention == "dense" else self.save_attention)

    def mlp_ratio_of(self, layer: int) -> float:
        """The MLP keep ratio of decoder layer `layer` (mlp="tokens")."""
        return self.mlp_keep_ratio or self.keep_ratio_of(layer)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"lemo option {name!r} must be an integer >= {minimum}, got {value!r}")


def _layer_indices(name: str, value: Any, expected: str) -> tuple[int, ...]:
    """`value` as a tuple of layer indices (integers >= 0), or ValueError naming the option."""
    if isinstance(value, str):
        raise ValueError(f"lemo option {name!r} must be {expected}, got {value!r}")
    try:
        layers = tuple(value)
    except TypeError:
        raise ValueError(f"lemo option {name!r} must be {expected}, got {value!r}") from None
    for layer in layers:
        _check_int(name, layer, minimum=0)
    return layers


def _check_ratio(value: Any, name: str = "keep_ratio") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"lemo option {name!r} must be in (0, 1], got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"lemo option {name!r} must be one of {list(allowed)}, got {value!r}")
