"""Compiling a model's decoder layers one by one with lemo: the per-layer compile of FSDP2 users.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer and gathers its parameters
in hooks around the layer's forward. Dynamo does not trace those hooks: a whole model compiled
under FSDP2 breaks into one graph per layer whose root module is the layer itself, and one such
graph serves every layer of the same shape, so nothing in it says which layer runs. The recipe
FSDP2 users follow compiles each decoder layer on its own (`module.compile()`, before or after
`fully_shard`); `compile_decoder_layers` does that with lemo. Layers with the same plan share one
`LemoBackend` that knows which layers it serves (`LayerGroup`), so the layers are planned as in a
whole-model compile and Dynamo keeps one cache entry per group, not one per layer (a cache entry
is tied to its backend object, and Dynamo allows `recompile_limit` entries per function).

What a whole-model compile does and this does not: the segmented loss (the LM head and loss stay
eager: use your fused loss, e.g. Liger-Kernel's) and the causal-mask rewrite (eager transformers
already calls SDPA with `is_causal=True` when there is no padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lemo_compile.backend import LemoBackend
from lemo_compile.config import LemoConfig
from lemo_compile.plan import LayerGroup, dense_layer_set


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: its longest `nn.ModuleList` whose entries all have at least two
    sub-modules (HF's `model.model.layers`, also inside PEFT's wrappers). Raises ValueError if
    there is none."""
    found: nn.ModuleList | None = None
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and all(len(list(entry.children())) >= 2 for entry in module)
                and (found is None or len(module) > len(found))):
            found = module
    if found is None:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}: no nn.ModuleList of modules with "
            "sub-modules; pass layers=... to compile_decoder_layers"
        )
    return found


def layer_groups(config: LemoConfig, num_layers: int) -> list[LayerGroup]:
    """The layers of a model of `num_layers` layers that can share one compiled graph, in order of
    their first layer: those with the same plan at every sequence length (dense or not, the same
    keep ratios, whether checkpointing saves their attention). With per-layer scoring state
    (trained predictors, a seeded random scorer) every layer is its own group."""
    dense = dense_layer_set(config, num_layers)
    per_layer = config.scorer == "predictor" or (config.scorer == "random" and config.seed is not None)
    members: dict[tuple, list[int]] = {}
    for layer in range(num_layers):
        key = (layer,) if per_layer else (
            layer in dense, config.keep_ratio_of(layer), config.mlp_ratio_of(layer),
            config.saves_attention(layer, dense))
        members.setdefault(key, []).append(layer)
    return [LayerGroup(tuple(layers), num_layers) for layers in members.values()]


def compile_decoder_layers(
    model: nn.Module,
    options: LemoConfig | Mapping[str, Any] | None = None,
    *,
    layers: nn.ModuleList | None = None,
    mode: str | None = None,
    **compile_kwargs: Any,
) -> list[LemoBackend]:
    """Compile each decoder layer of `model` in place with lemo (`layer.compile(backend=...)`).

    options: lemo's options, as for `backend="lemo"`. layers: the decoder layers (default:
    `decoder_layers(model)`). mode, compile_kwargs: Inductor's mode and the other arguments of
    `torch.compile` (`dynamic=False`, `fullgraph=True`, ...).
    Returns the backends, one per `layer_groups` group; each keeps a `CompileReport` per graph it
    compiled (one, and one more in the group of layer 0 when that layer's input needs no
    gradient), with one plan per layer of its group. Raises ValueError when the graphs may
    outnumber `torch._dynamo.config.recompile_limit` (raise it, or give fewer distinct ratios),
    and for `dropped_loss_weight` below 1 (the loss is not in the layers' graphs).
    """
    config = LemoConfig.from_options(options)
    if config.dropped_loss_weight < 1:
        raise ValueError("lemo option 'dropped_loss_weight' weights the loss by what the sparse "
                         "layers kept, but compile_decoder_layers compiles each layer apart from "
                         "the loss: leave it at 1.0, or compile the whole model")
    layers = decoder_layers(model) if layers is None else layers
    groups = layer_groups(config, len(layers))
    # One graph per group, and one more for the first layer when its input needs no gradient
    # (a frozen embedding's output, as with LoRA): Dynamo guards on requires_grad.
    needed, limit = len(groups) + 1, torch._dynamo.config.recompile_limit
    if needed > limit:
        raise ValueError(
            f"lemo needs up to {needed} compiled graphs for these {len(layers)} layers (one per "
            f"distinct plan, one more for the first layer), more than "
            f"torch._dynamo.config.recompile_limit = {limit}: raise that limit, or use fewer "
            "distinct keep ratios"
        )
    backends = []
    for group in groups:
        backend = LemoBackend(config, mode=mode, layer_group=group)
        for index in group.layers:
            layers[index].compile(backend=backend, **compile_kwargs)
        backends.append(backend)
    return backends
