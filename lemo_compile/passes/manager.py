"""Ordering lemo's passes, and what they report.

Three stages, each seeing one IR:

* `run_graph_passes` on the torch-level Dynamo graph, before AOTAutograd: plain causal masks ->
  `is_causal=True` (`attention.py`) -> regions -> plan -> token selection (`select.py`; layers
  inside activation-checkpoint regions are rewritten inside the region's body graph) ->
  segmented loss (`loss.py`). It returns a `CompileReport`.
* `InductorPasses` on AOTAutograd's joint graph, installed as `joint_custom_post_pass`: what
  activation checkpointing saves in lemo's layers (`recompute.py`).
* `InductorPasses` on Inductor's post-grad aten graphs (forward and backward), installed as
  `post_grad_custom_post_pass`: the kernel fusion (`fuse.py`), and in backward graphs shorter
  buffer lifetimes (`lifetimes.py`) and the SwiGLU backward in place (`swiglu.py`).

An `InductorPasses`' `uuid()` hashes the source of the package and its list of passes, so that
Inductor's caches never reuse a graph compiled by other code or with other passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
import warnings
from collections.abc import Callable

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lemo_compile.config import LemoConfig
from lemo_compile.fx_utils import example_value, node_shape
from lemo_compile.passes.attention import causal_attention_pass
from lemo_compile.passes.loss import expose_body_selections, segment_loss_pass
from lemo_compile.passes.select import SelectionResult, pass_body_inputs, select_pass
from lemo_compile.plan import LayerGroup, LayerPlan, plan_layers
from lemo_compile.passes.residual import canonical_residual_adds
from lemo_compile.regions import (DecoderLayer, checkpoint_bodies, checkpointed_layers,
                                  find_regions, input_dependent_masks)


class LemoWarning(UserWarning):
    """Something lemo could not do as asked; the run goes on (dense where it had to)."""


@dataclasses.dataclass
class CompileReport:
    """What lemo did to one compiled graph.

    training:  whether the graph was rewritten for training (eval graphs are computed unchanged:
               only their plain causal masks become `is_causal=True`).
    plans:     one LayerPlan per decoder layer, as applied (a layer that had to stay dense says why).
    counters:  pass counters: causal_attention (SDPA calls whose plain causal mask became
               `is_causal=True`, `passes/attention.py`; eval graphs too), sparse_layers,
               dense_fallbacks, segmented_losses, placeholder_outputs, mlp_sparse_layers
               (mlp="tokens"), mlp_channel_layers (mlp="channels": MLP blocks whose backward
               keeps only their top channels), saved_selections, saved_attention and
               saved_sparse_layers (what checkpointed layers save instead of recomputing,
               `passes/recompute.py`), and the post-grad passes' (`passes/fuse.py`,
               `passes/lifetimes.py`, `passes/swiglu.py`), summed over the forward graph and, once
               it is compiled at the first backward, the backward graph.
    warnings:  the messages of the LemoWarnings raised for this graph.
    extra_inputs: tensors the passes appended to the graph's inputs (predictor weights); the
               backend passes them after the caller's inputs.
    graphs:    readable graph code: "dynamo" (as received), after each pass that changed it, and
               Inductor's post-grad graphs after lemo's post-grad passes ("post_grad_forward",
               and "post_grad_backward" once the backward is compiled).
    saved_for_backward: once the backward is compiled, its post-grad graph's inputs other than the
               incoming gradients, name -> (shape, dtype): what the forward saved for it, plus the
               graph inputs it reads (names "primals_*": parameters and the caller's inputs).
    """

    training: bool
    batch_size: int | None = None
    seq_len: int | None = None
    plans: list[LayerPlan] = dataclasses.field(default_factory=list)
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    graphs: dict[str, str] = dataclasses.field(default_factory=dict)
    extra_inputs: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)
    saved_for_backward: dict[str, tuple[tuple[int, ...], torch.dtype]] = dataclasses.field(
        default_factory=dict, repr=False)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, LemoWarning, stacklevel=3)

    def summary(self) -> str:
        """One line: training or eval, the sequence shape, the sparse layers, the counters."""
        if not self.training:
            return f"eval graph, computed unchanged; counters {self.counters}"
        sparse = [p.layer for p in self.plans if p.sparse]
        shape = f"batch {self.batch_size} x {self.seq_len} tokens" if self.seq_len else "no layers"
        return (f"training graph, {shape}, sparse layers {sparse} of {len(self.plans)}; "
                f"counters {self.counters}; {len(self.warnings)} warnings")


def run_graph_passes(gm: fx.GraphModule, config: LemoConfig, fake_mode,
                     layer_group: LayerGroup | None = None) -> CompileReport:
    """Apply token selection and the segmented loss to a training graph, in place.

    layer_group: the graph is one decoder layer compiled on its own, serving the group's layers
    (planned as its first layer; the report's plans are one per layer of the group)."""
    report = CompileReport(training=True)
    report.graphs["dynamo"] = gm.code
    if has_symbolic_shapes(gm):
        report.warn(
            "lemo: the graph has a dynamic sequence length; token elimination needs static "
            "shapes, so this graph runs dense. Pad batches to a fixed length, or pass "
            "dynamic=False to torch.compile."
        )
        return report
    report.counters["causal_attention"] = causal_attention_pass(gm)
    for module in gm.modules():  # the graph and any activation-checkpoint bodies in it
        if isinstance(module, fx.GraphModule):
            canonical_residual_adds(module, fake_mode)
    _select(gm, config, fake_mode, layer_group, report)
    if config.loss_segment is not None:
        _segment_loss(gm, config, fake_mode, report)
    gm.graph.lint()
    gm.recompile()
    return report


def _select(gm: fx.GraphModule, config: LemoConfig, fake_mode, layer_group: LayerGroup | None,
            report: CompileReport) -> None:
    """Find the decoder layers, plan them, run the selection pass over the graph and over each
    checkpointed body, and record the final plans, counters and warnings in `report`."""
    root_layer = layer_group.layers[0] if layer_group else None
    regions = find_regions(gm, root_layer)
    checkpointed = checkpointed_layers(gm, root_layer)
    layers = [checkpointed[l.index][2] if l.index in checkpointed else l for l in regions.layers]
    layer_problems = {l.problem for l in regions.layers}
    problems = [l.problem for l in layers if l.problem]
    problems += [p for p in regions.problems if p not in layer_problems]
    sparse_layers = [layer for layer in layers if layer.attention is not None]
    if problems:
        report.warn("lemo: some decoder layers were not recognised and run dense:"
                    + "".join(f"\n  - {line}" for line in _grouped_by_reason(problems)))
    if not sparse_layers:
        return
    report.batch_size, report.seq_len = node_shape(sparse_layers[0].attention.residual)[:2]
    # A padded batch: the attention mask depends on the caller's inputs (its attention_mask).
    # Every sparse attention block then reads the padding off the mask that reaches it.
    padded = bool(input_dependent_masks(gm, report.batch_size, report.seq_len))
    if not padded and any("attention_mask" in n.name for n in gm.graph.find_nodes(op="placeholder")):
        report.warn(
            "lemo: the model is called with an attention_mask, but no attention mask computed "
            "from it reaches the attention (an attention implementation that takes the 2-D mask "
            "itself?), so lemo cannot tell padding apart: with padded batches, padding can be "
            "kept instead of real tokens. Pad-free batches (or an all-ones mask) are safe."
        )
    num_layers = layer_group.num_layers if layer_group else len(layers)
    plans = plan_layers(config, num_layers, report.seq_len, padded=padded)
    _warn_unplanned_dense_layers(
        report, [plans[i] for i in layer_group.layers] if layer_group else plans, config)
    selection = SelectionResult([], {})
    if any(l.attention is not None for l in regions.layers):
        selection = select_pass(gm, regions, plans, config, fake_mode, padded)
    calls = checkpoint_bodies(gm)
    bodies = {id(body): (body, body_regions) for body, body_regions, _ in checkpointed.values()}
    for body, body_regions in bodies.values():
        _select_in_body(gm, body, calls[body], body_regions, plans, config, fake_mode, padded,
                        selection)
    _record_selection(report, selection, layers, plans, config, layer_group)
    gm.recompile()
    report.graphs["select"] = gm.code


def _record_selection(report: CompileReport, selection: SelectionResult,
                      layers: list[DecoderLayer], plans: list[LayerPlan], config: LemoConfig,
                      layer_group: LayerGroup | None) -> None:
    """Record in `report` what the selection passes built: the plans as built (a layer that fell
    back runs dense, with the reason), the extra inputs, the counters and the warnings."""
    report.extra_inputs = selection.extra_inputs
    if selection.mlp_activation_scored:
        report.warn(
            "lemo: the predictor bank has no MLP predictors, so the MLP blocks of layers "
            f"{selection.mlp_activation_scored} are scored by their intermediate activation "
            "(exact, but computed on all tokens). Calibrate with mlp='tokens' to train them."
        )
    if selection.dense:
        report.warn(
            "lemo: these layers run dense because their attention block could not be "
            "compacted: " + "; ".join(f"layer {i}: {why}" for i, why in selection.dense.items())
        )
    fallback = dict(selection.dense)
    fallback.update({l.index: l.problem for l in layers if l.attention is None})
    mlp_fallback = dict(selection.mlp_dense)
    mlp_fallback.update({l.index: "no MLP block recognised" for l in layers
                         if l.mlp is None and (plans[l.index].mlp_sparse
                                               or plans[l.index].mlp_channel_ratio is not None)})
    if mlp_fallback:
        by_reason: dict[str, list[int]] = {}
        for index, why in sorted(mlp_fallback.items()):
            by_reason.setdefault(why, []).append(index)
        report.warn("lemo: these MLP blocks run dense: " + "; ".join(
            f"layer{'s' if len(i) > 1 else ''} {_ranges(i)}: {why}" for why, i in by_reason.items()))
    report.plans = [_as_built(p, fallback, mlp_fallback, selection.mlp_channels) for p in plans]
    if layer_group:
        report.plans = [dataclasses.replace(report.plans[layer_group.layers[0]], layer=i)
                        for i in layer_group.layers]
    if config.mlp == "tokens":
        report.counters["mlp_sparse_layers"] = len(selection.mlp_sparse)
    if config.mlp == "channels":
        report.counters["mlp_channel_layers"] = len(selection.mlp_channels)
    report.counters["sparse_layers"] = len(selection.sparse)
    report.counters["dense_fallbacks"] = len(selection.dense)
    report.counters["placeholder_outputs"] = selection.placeholder_outputs
    if selection.placeholder_outputs:
        report.warn(
            "lemo: the model returns its KV cache in training (use_cache=True); the cache "
            "entries of sparse layers are NaN placeholders. Pass use_cache=False."
        )


def _select_in_body(gm: fx.GraphModule, body: fx.GraphModule, calls: list[fx.Node], body_regions,
                    plans: list[LayerPlan], config: LemoConfig, fake_mode, padded: bool,
                    selection: SelectionResult) -> None:
    """The selection pass over one activation-checkpoint body of `gm` (run by `calls`), its result
    merged into `selection`; the predictors' weights it reads become inputs of `gm` passed on to
    the body, and with `dropped_loss_weight` its selections become outputs that the loss reads.
    A scorer that draws at random (no seed) may run in the body: `recompute.save_in_checkpoints`
    saves every selection, so the backward never draws again."""
    inside = [l.index for l in body_regions.layers if l.attention is not None]
    if not any(plans[i].sparse or plans[i].mlp_channel_ratio is not None for i in inside):
        return
    inner = select_pass(body, body_regions, plans, config, fake_mode, padded)
    pass_body_inputs(gm, body, calls, inner.extra_inputs, fake_mode, selection.extra_inputs)
    if config.dropped_loss_weight < 1:
        expose_body_selections(gm, body, calls)
    selection.sparse += inner.sparse
    selection.dense.update(inner.dense)
    selection.placeholder_outputs += inner.placeholder_outputs
    selection.mlp_sparse += inner.mlp_sparse
    selection.mlp_dense.update(inner.mlp_dense)
    selection.mlp_channels.update(inner.mlp_channels)
    body.graph.lint()
    body.recompile()


def _as_built(plan: LayerPlan, fallback: dict[int, str], mlp_fallback: dict[int, str],
              mlp_channels: dict[int, tuple[int, int]]) -> LayerPlan:
    """`plan` as the selection pass built it: a sparse layer that fell back runs dense (with the
    reason), an MLP block that fell back keeps all tokens, and an MLP block that runs on a subset
    of channels records it (other layers lose the planned channel ratio)."""
    if plan.layer in fallback and plan.sparse:
        plan = dataclasses.replace(plan, sparse=False, kept_blocks=plan.n_blocks,
                                   kept_tokens=plan.seq_len, reason=fallback[plan.layer])
    if plan.layer in mlp_fallback:
        plan = dataclasses.replace(plan, mlp_kept_blocks=plan.n_blocks, mlp_kept_tokens=plan.seq_len)
    if plan.layer in mlp_channels:
        kept, size = mlp_channels[plan.layer]
        return dataclasses.replace(plan, mlp_kept_channels=kept, mlp_channels=size)
    return dataclasses.replace(plan, mlp_channel_ratio=None)


def _segment_loss(gm: fx.GraphModule, config: LemoConfig, fake_mode, report: CompileReport) -> None:
    """The segmented-loss pass, its counters and warnings recorded in `report`."""
    loss = segment_loss_pass(gm, config.loss_segment, fake_mode, config.dropped_loss_weight)
    report.counters["segmented_losses"] = loss.segmented
    if config.dropped_loss_weight < 1:
        report.counters["weighted_losses"] = loss.weighted
        for reason in loss.unweighted:
            report.warn(f"lemo: dropped_loss_weight does not apply to a loss ({reason}): every "
                        "token of it counts fully")
        if loss.selections and not loss.segmented:
            report.warn("lemo: dropped_loss_weight does not apply: the graph with the sparse "
                        "layers computes no LM loss that lemo segments (labels not passed to "
                        "the model, or a graph break before the loss?)")
    if loss.placeholder_outputs:
        report.counters["placeholder_outputs"] = (
            report.counters.get("placeholder_outputs", 0) + loss.placeholder_outputs
        )
        report.warn(
            "lemo: the loss is computed in segments (loss_segment="
            f"{config.loss_segment}), so the training forward does not compute the logits: "
            "outputs.logits is a NaN placeholder. Pass loss_segment=None to get them."
        )
    for reason in loss.skipped:
        report.warn(
            f"lemo: a cross-entropy was left unsegmented ({reason}): its logits are computed "
            "whole, as without lemo (loss_segment does not apply to it)"
        )
    if loss.segmented:
        gm.recompile()
        report.graphs["loss"] = gm.code


def _grouped_by_reason(problems: list[str]) -> list[str]:
    """Problems of the form "layer <prefix>.<i>: <reason>", one line per (prefix, reason) with the
    layer indices as ranges ("layer model.layers.0-3, 5: <reason>"); other problems as they are."""
    groups: dict[tuple[str, str], list[int]] = {}
    others = []
    for problem in problems:
        match = re.match(r"^layer (.*)\.(\d+): (.*)$", problem, re.S)
        if match:
            groups.setdefault((match[1], match[3]), []).append(int(match[2]))
        else:
            others.append(problem)
    lines = [f"layer{'s' if len(i) > 1 else ''} {prefix}.{_ranges(i)}: {reason}"
             for (prefix, reason), i in groups.items()]
    return lines + others


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _warn_unplanned_dense_layers(report: CompileReport, plans: list[LayerPlan],
                                 config: LemoConfig) -> None:
    """One warning for the layers the plan leaves dense although the options asked for sparsity
    (the sequence is shorter than a block; keep_ratio < 1 still keeps every block): not the
    layers of `dense_layers`, nor those given keep_ratio 1.0."""
    by_reason: dict[str, list[int]] = {}
    for plan in plans:
        if plan.reason and plan.reason != "dense_layers" and config.keep_ratio_of(plan.layer) < 1:
            by_reason.setdefault(plan.reason, []).append(plan.layer)
    if by_reason:
        report.warn("lemo: these layers run dense although they are not in dense_layers: " + "; ".join(
            f"layers {layers}: {reason}" for reason, layers in by_reason.items()))


def has_symbolic_shapes(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        value = example_value(node)
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


class InductorPasses(CustomGraphPass):
    """lemo's passes over one of Inductor's graph stages (the joint graph, or the post-grad forward
    and backward graphs), in order.

    Its `uuid()` enters Inductor's cache keys (FX graph cache, AOTAutograd cache): it covers the
    source of the whole package (passes, ops and kernels, which Inductor may inline) and which
    passes run with which arguments (e.g. `fuse=True` or `False`), so that a cached graph is never
    served to a compile that would have produced other code."""

    def __init__(self, passes: list[Callable[[fx.Graph], None]] | None = None) -> None:
        self.passes = list(passes or [])

    def __call__(self, graph: fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> bytes:
        package = pathlib.Path(__file__).parent.parent
        sources = get_hash_for_files(tuple(str(p) for p in sorted(package.rglob("*.py"))))
        names = ",".join(_pass_name(p) for p in self.passes)
        return hashlib.sha256(sources + names.encode()).digest()


def _pass_name(graph_pass: Callable) -> str:
    """The qualified name of a pass (of the function a functools.partial wraps) and the settings
    (bool, int, str or tuple keyword arguments) it was bound to."""
    function = getattr(graph_pass, "func", graph_pass)
    settings = sorted((key, value) for key, value in getattr(graph_pass, "keywords", {}).items()
                      if isinstance(value, (bool, int, str, tuple)))
    return f"{function.__module__}.{function.__qualname__}{settings}"
