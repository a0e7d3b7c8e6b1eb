"""ONNX export of lemo's rewritten forward graph, with lemo's operations as ONNX functions.

`export_onnx(gm, example_inputs, path)` writes the torch-level Dynamo graph after lemo's passes
(what `passes.manager.run_graph_passes` leaves in `gm`) as an ONNX model, to read in Netron or run
with onnxruntime. It pictures the forward computation only: no backward, no kernels.

lemo's operations are nodes of the domain "lemo" (version 1), each calling a function declared in
`model.functions` whose body is standard ONNX (opset 18) implementing lemo's semantics:
select_tokens, gather_tokens (one call per gathered dim), scatter_add_tokens, block_scores
(oracle), activation_block_scores (MLP), predicted_block_scores and predicted_mlp_block_scores
(predictor scorer; predictors
with three linear layers per side, as `BlockPredictor.new` makes them, other depths are exported
as plain ops), random_block_scores and linear_cross_entropy (the segmented loss, as its forward
value). Each function's doc_string says what it computes. Each call carries the inserted node's
tags as metadata_props "lemo.role" and "lemo.layer" (-1: in no layer).

random_block_scores is a STAND-IN: lemo draws the random scorer's scores from a seeded
torch.Generator, which ONNX cannot reproduce, so its body draws unseeded uniform [0, 1) scores
(RandomUniformLike) of the same shape: the exported model keeps other random blocks than torch.

How: on a copy of gm, activation-checkpoint regions are inlined (a forward recomputes nothing) and
every operation lemo inserted becomes an opaque op of the torch.library namespace `lemo_onnx`
(defined here; each runs lemo's implementation). `torch.onnx.export(..., dynamo=True)` exports the
copy with torch's own translations for everything else and a custom translation table that emits
each `lemo_onnx` op as a bare node of the domain "lemo" (an onnxscript Op with an OpSchema made
from the function's signature). The function definitions are added to the model afterwards:
torch.onnx inlines every function present during export (its opset conversion does), which would
dissolve lemo's operations into plain ops. Then constant folding and dead-node removal.

Placeholders of gm (the model's inputs and, in current torch, its parameters and buffers) become
the ONNX graph's inputs, in order and named like the placeholders (the file holds no weights);
outputs are named like gm's output nodes where those names are free (`loss`, `logits`, ...).
Shapes are static: those of `example_inputs`, as in the compiled graph.

Limits: onnxruntime's CPU provider has no bfloat16 kernels for common ops (Mul, MatMul), so a
bf16 model exports and passes the checker but does not run there. Written and tested against
torch 2.13, onnx 1.23, onnxscript 0.7 and onnxruntime 1.32; it relies on torch.onnx's custom
translation table and on onnxscript Ops whose OpSchema is given.

Needs the optional packages onnx and onnxscript (`pip install "lemo_compile[inspect]"`); importing
this module without them raises ImportError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import operator
import os
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.optimizer
import torch
from onnx.defs import OpSchema
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType
from onnxscript.values import Op, Opset
from torch import fx

from lemo_compile import ops
from lemo_compile.fx_utils import get_attribute, own_copy, set_attribute
from lemo_compile.predictors import bank
from lemo_compile.tags import Role, layer_of, role_of

DOMAIN = "lemo"
DOMAIN_VERSION = 1
OPSET = 18

__all__ = ["DOMAIN", "export_onnx"]


def export_onnx(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Export lemo's rewritten forward graph `gm` to ONNX; returns the model (and writes it to
    `path` unless None).

    gm:             a torch-level FX graph as `run_graph_passes` leaves it (the Dynamo graph a
                    torch.compile backend receives, rewritten by lemo); not modified.
    example_inputs: one real tensor per placeholder of gm, in order: what the backend received,
                    followed by `CompileReport.extra_inputs` for the predictor scorer. They fix
                    the exported shapes and dtypes.

    What the model is built to satisfy (tested on tiny Llama and toy-decoder graphs):
    `onnx.checker.check_model(model, full_check=True)` passes; every operation lemo inserted is a
    node of the domain "lemo" calling a function of `model.functions` with a body of standard
    ops; onnxruntime, fed `example_inputs` in order, computes gm's outputs up to float rounding
    (a near-tie of block scores could in principle select another block), except that the
    random scorer's scores are a stand-in (module docstring).
    Raises ValueError when example_inputs are not one per placeholder, TypeError for an input
    that is not a tensor, NotImplementedError for the graph of a padded batch, of the options
    `distance_normalized` or `dropped_loss_weight`, or of `scorer="output"`.
    """
    nodes = [node for module in gm.modules() if isinstance(module, fx.GraphModule)
             for node in module.graph.nodes]  # checkpointed bodies included
    if any(role_of(node) is Role.PADDING for node in nodes):
        raise NotImplementedError("export_onnx: graphs of padded batches (lemo's per-row "
                                  "selection) are not supported yet")
    if any((node.target is torch.ops.lemo.block_scores.default and len(node.args) > 3)
           or node.kwargs.get("per_distance") for node in nodes):
        raise NotImplementedError("export_onnx: the option distance_normalized (tiles divided "
                                  "per block distance) is not supported yet")
    if any(node.target is ops.output_block_scores for node in nodes):
        raise NotImplementedError("export_onnx: scorer='output' is not supported")
    if any(node.target is ops.kept_share_weights for node in nodes):
        raise NotImplementedError("export_onnx: the option dropped_loss_weight (the loss's rows "
                                  "weighted) is not supported")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"export_onnx: gm has {len(placeholders)} placeholders but {len(example_inputs)} "
            "example inputs were given (pass one tensor per placeholder, in order)"
        )
    for node, value in zip(placeholders, example_inputs, strict=True):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"export_onnx: example input for {node.name} is a {type(value).__name__}, not a "
                "tensor (graphs with symbolic or scalar inputs are not exported)"
            )
    copy = _export_copy(gm)
    inputs = tuple(t.detach() for t in example_inputs)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            _Forward(copy).eval(),  # the graph's ops fix train/eval behaviour; eval: no warning
            inputs,
            dynamo=True,
            opset_version=OPSET,  # torchlib's own opset: nothing to convert
            input_names=[n.name for n in placeholders],
            custom_translation_table=_translation_table(),
            optimize=False,  # torch's optimization inlines all functions
            verbose=False,
            report=False,
        )
    _add_functions(program.model)
    _name_outputs(program.model, _output_names(gm))
    # Constant folding (shape arithmetic) and clean-up; not torch's `optimize=True`, which would
    # inline lemo's functions, nor onnxscript's pattern rewrites (slow, and a picture of the
    # graph wants it as it is).
    onnxscript.optimizer.fold_constants(program.model)
    ir.passes.common.RemoveUnusedNodesPass()(program.model)
    model = program.model_proto
    model.doc_string = (
        "lemo's rewritten forward graph; lemo's operations are functions of the domain 'lemo'"
    )
    if path is not None:
        onnx.save_model(model, os.fspath(path))
    return model


class _Forward(torch.nn.Module):
    """The graph as a module for torch.export: all placeholders are positional arguments."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = gm

    def forward(self, *args):
        return self.graph_module(*args)


def _output_names(gm: fx.GraphModule) -> list[str | None]:
    """The names of the nodes gm returns (None for an output that is not a node)."""
    (output,) = gm.graph.find_nodes(op="output")
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [v.name if isinstance(v, fx.Node) else None for v in values]


def _name_outputs(model, names: list[str | None]) -> None:
    """Give the ONNX outputs gm's output names where that is unambiguous (an onnx_ir Model)."""
    graph = model.graph
    if len(names) != len(graph.outputs):
        return
    used = {v.name for v in graph.inputs} | set(graph.initializers)
    used |= {v.name for node in graph for v in node.outputs}
    inputs = set(graph.inputs)
    for value, name in zip(graph.outputs, names, strict=True):
        if name is None or value.name == name or name in used or value in inputs:
            continue
        if sum(v is value for v in graph.outputs) > 1:
            continue
        used.add(name)
        value.name = name


# ------------------------------------------------------------------ the graph copy, for export


def _export_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm in which activation-checkpoint regions are inlined (a forward has nothing to
    recompute) and lemo's operations are `lemo_onnx` ops; gm itself, and the graph modules it
    calls, are left as they were (`fx_utils.own_copy` copies those too)."""
    copy = own_copy(gm)
    _use_export_ops(copy)
    return copy


def _use_export_ops(gm: fx.GraphModule) -> None:
    """In place, in gm and the graph modules it calls: inline checkpoint regions and replace
    lemo's operations by their export ops."""
    graph = gm.graph
    for node in graph.find_nodes(op="call_function", target=_CHECKPOINT):
        _inline_checkpoint(gm, node)
    for node in graph.find_nodes(op="get_attr"):
        value = get_attribute(gm, node.target)
        if isinstance(value, fx.GraphModule):
            _use_export_ops(value)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.lemo.channel_linear.default:
            # mlp="channels" changes only the backward: its forward, the dense down projection,
            # is what a forward graph shows
            a, _kept, _idx, weight, bias, dtype = node.args
            with graph.inserting_before(node):
                new = graph.call_function(_exact_channel_linear, (a, weight, bias, dtype))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            continue
        replacement = _replacement(node)
        if replacement is None:
            continue
        target, args = replacement
        with graph.inserting_before(node):
            new = graph.call_function(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


_CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def _inline_checkpoint(gm: fx.GraphModule, call: fx.Node) -> None:
    """Replace `tag_activation_checkpoint(body, *args)` in gm by the body's nodes."""
    body_node, *args = call.args
    body = get_attribute(gm, body_node.target)
    graph = gm.graph
    env: dict[fx.Node, Any] = {}
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    env.update(zip(placeholders, args, strict=True))
    results = None
    with graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                results = fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.op == "get_attr":
                inner = get_attribute(body, node.target)
                name = f"{body_node.target}_{node.target.replace('.', '_')}"
                set_attribute(gm, name, inner)
                env[node] = graph.get_attr(name)
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
    for user in list(call.users):
        if user.target is not operator.getitem:
            raise NotImplementedError(f"export_onnx: {call.name} is used by {user.name}")
        user.replace_all_uses_with(results[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(call)
    if not body_node.users:
        graph.erase_node(body_node)


def _exact_channel_linear(a, weight, bias, dtype):
    """The forward of `lemo::channel_linear`: the dense down projection, in `dtype`."""
    return torch.nn.functional.linear(a.to(dtype), weight.to(dtype),
                                      None if bias is None else bias.to(dtype))


def _replacement(node: fx.Node) -> tuple[Callable, tuple] | None:
    """(export op, its arguments) for one of lemo's operations, None for any other node (and for
    predictors of another depth than three linear layers per side, exported as plain ops)."""
    exported = _BY_TARGET.get(node.target)
    if exported is None:
        return None
    name = exported.name
    args = _bound(node)
    if name == "predicted_block_scores" and not len(args[1]) == len(args[2]) == 6:
        return None
    if name == "predicted_mlp_block_scores" and len(args[1]) != 6:
        return None
    # export_onnx refuses distance_normalized and padded graphs up front: the plain scorers
    if node.target is torch.ops.lemo.block_scores.default:
        args = args[:3]
    elif name == "predicted_block_scores":
        args = args[:6]
    elif name == "linear_cross_entropy":  # export_onnx refuses row weights up front
        args = args[:8]
    elif "real" in inspect.signature(node.target).parameters:
        # export_onnx refuses padded graphs up front, so `real` is None: the unpadded form
        args = args[:-1]
        if name == "gather_tokens":
            args = (*args[:2], list(args[2]))
    role, layer = role_of(node), layer_of(node)
    tag = ("" if role is None else role.value, -1 if layer is None else layer)
    return getattr(torch.ops.lemo_onnx, name).default, (*args, *tag)


def _bound(node: fx.Node) -> tuple:
    """node's arguments, all positional, in the order of its target's parameters."""
    if isinstance(node.target, torch._ops.OpOverload):
        values = list(node.args)
        for argument in node.target._schema.arguments[len(values):]:
            values.append(node.kwargs.get(argument.name, argument.default_value))
        return tuple(values)
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


# ------------------------------------- fake implementations of the export ops (their output shapes)


def _gathered_like(t, idx, dims):
    shape = [idx.shape[0], *t.shape[1:]]
    for dim in dims:
        shape[dim] = idx.shape[1]
    return t.new_empty(shape)


def _selected_like(scores, kept_blocks, block_size, seq_len):
    kept = kept_blocks * block_size + seq_len - scores.shape[1] * block_size
    return scores.new_empty((scores.shape[0], kept), dtype=torch.int64)


def _block_scores_like(x, blocks: int):
    return x.new_empty((x.shape[0], blocks), dtype=torch.float32)


def _predicted(h, q_side, k_side, distance_bias, block_size, heads):
    return bank.predicted_block_scores(h, q_side, k_side, distance_bias, block_size, heads)


def _predicted_mlp(h, tensors, block_size):
    return bank.predicted_mlp_block_scores(h, tensors, block_size)


# ------------------------------------------------------------ the ONNX functions of domain "lemo"
#
# onnxscript functions: their Python bodies are translated to ONNX (opset 18) function bodies, not
# run. Integer parameters are attributes; `_FLOAT` is the ONNX type code of float32.

_lemo = Opset(DOMAIN, DOMAIN_VERSION)
_FLOAT = 1
_END = 2**63 - 1  # a Slice end past any dim
_T = TypeVar("_T", bound=TensorType)
_Rows = TypeVar("_Rows", bound=TensorType)
_Loss = TypeVar("_Loss", bound=TensorType)


@script(_lemo, default_opset=op)
def select_tokens(scores: FLOAT, kept_blocks: int, block_size: int, seq_len: int) -> INT64:
    """Token indices idx [B, K] (int64, sorted per row) of the `kept_blocks` highest-scoring
    blocks of scores [B, n] (ties: lower block first), expanded to their tokens, followed by the
    tail tokens n * block_size .. seq_len - 1. lemo_compile.ops.select_tokens."""
    kept = op.Reshape(op.Constant(value_int=kept_blocks), [1])
    size = op.Constant(value_int=block_size)
    one = op.Constant(value_int=1)
    _values, order = op.TopK(scores, kept, axis=1, largest=1, sorted=1)
    blocks, _order = op.TopK(order, kept, axis=1, largest=0, sorted=1)  # ascending
    offsets = op.Range(op.Constant(value_int=0), size, one)
    tokens = op.Add(op.Unsqueeze(op.Mul(blocks, size), [2]), offsets)  # [B, kept, size]
    batch = op.Shape(scores, start=0, end=1)
    tokens = op.Reshape(tokens, op.Concat(batch, [-1], axis=0))
    n_blocks = op.Squeeze(op.Shape(scores, start=1, end=2), [0])
    tail = op.Range(op.Mul(n_blocks, size), op.Constant(value_int=seq_len), one)
    tail = op.Expand(op.Unsqueeze(tail, [0]), op.Concat(batch, op.Shape(tail), axis=0))
    idx = op.Concat(tokens, tail, axis=1)
    return idx


@script(_lemo, default_opset=op)
def gather_tokens(t: _T, idx: INT64, dim: int) -> _T:
    """t [B or 1, ...] at the per-sample token indices idx [B, K] along `dim` (K replaces S
    there). lemo_compile.ops.gather_tokens, one dim per call."""
    batch = op.Shape(idx, start=0, end=1)
    kept = op.Shape(idx, start=1, end=2)
    full = op.Expand(t, op.Concat(batch, op.Shape(t, start=1), axis=0))  # batch 1 -> B
    shape = op.Shape(full)
    at = op.Reshape(op.Constant(value_int=dim), [1])
    after = op.Add(at, [1])
    ones = op.Expand([1], op.Shape(shape))
    end = op.Constant(value_ints=[_END])
    # idx viewed as [B, 1, .., K (at dim), .., 1], then expanded to t's shape with K at dim
    view = op.Concat(batch, op.Slice(ones, [1], at), kept, op.Slice(ones, after, end), axis=0)
    target = op.Concat(op.Slice(shape, [0], at), kept, op.Slice(shape, after, end), axis=0)
    index = op.Expand(op.Reshape(idx, view), target)
    gathered = op.GatherElements(full, index, axis=dim)
    return gathered


@script(_lemo, default_opset=op)
def scatter_add_tokens(x: _T, idx: INT64, rows: _Rows) -> _T:
    """x [B, S, D] with rows [B, K, D] added at the distinct tokens idx [B, K]; other rows pass
    through: a sparse block's residual add. lemo_compile.ops.scatter_add_tokens."""
    index = op.Expand(op.Unsqueeze(idx, [2]), op.Shape(rows))
    merged = op.ScatterElements(x, index, op.CastLike(rows, x), axis=1, reduction="add")
    return merged


@script(_lemo, default_opset=op)
def block_scores(q: _T, k: _T, block_size: int) -> FLOAT:
    """Oracle block scores sigma [B, n] (float32) from q [B, H, S, d] and k [B, Hk, S, d]:
    tile maxima of the head-averaged relu(q.k / sqrt(d)) over causal pairs, then, per block, the
    sum of what it attends to and what attends to it. lemo::block_scores."""
    size = op.Reshape(op.Constant(value_int=block_size), [1])
    batch = op.Shape(q, start=0, end=1)
    heads = op.Shape(q, start=1, end=2)
    kv_heads = op.Shape(k, start=1, end=2)
    head_dim = op.Shape(q, start=3, end=4)
    n = op.Div(op.Shape(q, start=2, end=3), size)
    used = op.Mul(n, size)  # the S % block_size tail takes no part
    queries = op.Slice(op.Cast(q, to=_FLOAT), [0], used, [2])
    keys = op.Slice(op.Cast(k, to=_FLOAT), [0], used, [2])
    # query head h reads key head h // (H / Hk)
    keys = op.Expand(op.Unsqueeze(keys, [2]),
                     op.Concat(batch, kv_heads, op.Div(heads, kv_heads), used, head_dim, axis=0))
    keys = op.Reshape(keys, op.Concat(batch, heads, used, head_dim, axis=0))
    scale = op.Reciprocal(op.Sqrt(op.Cast(head_dim, to=_FLOAT)))
    logits = op.Mul(op.MatMul(queries, op.Transpose(keys, perm=[0, 1, 3, 2])), scale)
    attention = op.Div(op.ReduceSum(op.Relu(logits), [1], keepdims=0), op.Cast(heads, to=_FLOAT))
    attention = op.Trilu(attention, upper=0)  # causal: keys after the query count 0
    tiles = op.Reshape(attention, op.Concat(batch, n, size, n, size, axis=0))
    tiles = op.ReduceMax(tiles, [2, 4], keepdims=0)  # M [B, n, n]
    diagonal = op.ReduceSum(op.Trilu(op.Trilu(tiles, upper=1), upper=0), [2], keepdims=0)
    attended = op.Add(op.ReduceSum(tiles, [1], keepdims=0), op.ReduceSum(tiles, [2], keepdims=0))
    scores = op.Sub(attended, diagonal)
    return scores


@script(_lemo, default_opset=op)
def activation_block_scores(intermediate: _T, block_size: int) -> FLOAT:
    """MLP block scores [B, n] (float32): the L2 norm of intermediate [B, S, F] per token, max
    over each full block. lemo_compile.ops.activation_block_scores."""
    size = op.Reshape(op.Constant(value_int=block_size), [1])
    batch = op.Shape(intermediate, start=0, end=1)
    n = op.Div(op.Shape(intermediate, start=1, end=2), size)
    norms = op.ReduceL2(op.Cast(intermediate, to=_FLOAT), [-1], keepdims=0)  # [B, S]
    norms = op.Slice(norms, [0], op.Mul(n, size), [1])
    scores = op.ReduceMax(op.Reshape(norms, op.Concat(batch, n, size, axis=0)), [2], keepdims=0)
    return scores


@script(_lemo, default_opset=op)
def predicted_block_scores(h: _T, q_w1: FLOAT, q_b1: FLOAT, q_w2: FLOAT, q_b2: FLOAT, q_w3: FLOAT,
                           q_b3: FLOAT, k_w1: FLOAT, k_b1: FLOAT, k_w2: FLOAT, k_b2: FLOAT,
                           k_w3: FLOAT, k_b3: FLOAT, distance_bias: FLOAT, block_size: int,
                           heads: int) -> FLOAT:
    """The predictor scorer's block scores [B, n] (float32) from the attention input h
    [B, S, D], a predictor's q-side and k-side weights (three linear layers each) and its
    block-distance bias [R]: lemo_compile.predictors.bank.predicted_block_scores."""
    size = op.Reshape(op.Constant(value_int=block_size), [1])
    count = op.Reshape(op.Constant(value_int=heads), [1])
    batch = op.Shape(h, start=0, end=1)
    n = op.Div(op.Shape(h, start=1, end=2), size)
    # each full block's slice per head: [B, n, H, b * D / H]
    blocks = op.Slice(op.Cast(h, to=_FLOAT), [0], op.Mul(n, size), [1])
    slices = op.Div(op.Shape(h, start=2, end=3), count)
    blocks = op.Reshape(blocks, op.Concat(batch, n, size, count, slices, axis=0))
    blocks = op.Transpose(blocks, perm=[0, 1, 3, 2, 4])
    blocks = op.Reshape(blocks, op.Concat(batch, n, count, [-1], axis=0))
    q = op.Relu(op.Add(op.MatMul(blocks, op.Transpose(q_w1)), q_b1))
    q = op.Relu(op.Add(op.MatMul(q, op.Transpose(q_w2)), q_b2))
    q = op.Add(op.MatMul(q, op.Transpose(q_w3)), q_b3)
    k = op.Relu(op.Add(op.MatMul(blocks, op.Transpose(k_w1)), k_b1))
    k = op.Relu(op.Add(op.MatMul(k, op.Transpose(k_w2)), k_b2))
    k = op.Add(op.MatMul(k, op.Transpose(k_w3)), k_b3)
    # the bias of each tile's block distance m - p, clamped to [0, R - 1]
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(n, [0]), op.Constant(value_int=1))
    distance = op.Sub(op.Unsqueeze(positions, [1]), op.Unsqueeze(positions, [0]))
    last = op.Sub(op.Shape(distance_bias), [1])
    distance = op.Clip(distance, op.Constant(value_int=0), op.Squeeze(last, [0]))
    products = op.Einsum(q, k, equation="bmhr,bphr->bmp")
    tiles = op.Trilu(op.Add(products, op.Gather(distance_bias, distance)), upper=0)  # causal P
    diagonal = op.ReduceSum(op.Trilu(op.Trilu(tiles, upper=1), upper=0), [2], keepdims=0)
    attended = op.Add(op.ReduceSum(tiles, [1], keepdims=0), op.ReduceSum(tiles, [2], keepdims=0))
    scores = op.Sub(attended, diagonal)
    return scores


@script(_lemo, default_opset=op)
def predicted_mlp_block_scores(h: _T, w1: FLOAT, b1: FLOAT, w2: FLOAT, b2: FLOAT, w3: FLOAT,
                               b3: FLOAT, block_size: int) -> FLOAT:
    """The MLP predictor's block scores [B, n] (float32) from the MLP's input h [B, S, D] and its
    three linear layers: a score per token, max over each full block.
    lemo_compile.predictors.bank.predicted_mlp_block_scores."""
    size = op.Reshape(op.Constant(value_int=block_size), [1])
    batch = op.Shape(h, start=0, end=1)
    n = op.Div(op.Shape(h, start=1, end=2), size)
    x = op.Relu(op.Add(op.MatMul(op.Cast(h, to=_FLOAT), op.Transpose(w1)), b1))
    x = op.Relu(op.Add(op.MatMul(x, op.Transpose(w2)), b2))
    x = op.Add(op.MatMul(x, op.Transpose(w3)), b3)  # [B, S, 1]
    tokens = op.Slice(op.Squeeze(x, [2]), [0], op.Mul(n, size), [1])
    scores = op.ReduceMax(op.Reshape(tokens, op.Concat(batch, n, size, axis=0)), [2], keepdims=0)
    return scores


@script(_lemo, default_opset=op)
def random_block_scores(like: _T, n_blocks: int, layer: int, seed: int) -> FLOAT:
    """STAND-IN for lemo::random_block_scores: uniform [0, 1) scores [B, n_blocks] (float32),
    drawn without a seed. lemo draws them from a torch.Generator seeded from (seed, layer)
    (seed -1: torch's global generator), which ONNX cannot reproduce."""
    shape = op.Concat(op.Shape(like, start=0, end=1),
                      op.Reshape(op.Constant(value_int=n_blocks), [1]), axis=0)
    scores = op.RandomUniformLike(op.ConstantOfShape(shape), dtype=_FLOAT, low=0.0, high=1.0)
    return scores


@script(_lemo, default_opset=op)
def linear_cross_entropy(h: _T, weight: _T, bias: _T | None, target: INT64, ignore_index: int,
                         reduction: str, segment: int, logits_dtype: int) -> _Loss:
    """The forward value of lemo's segmented loss: cross_entropy(linear(h, weight, bias) cast to
    logits_dtype, target) with ignore_index and reduction, on all rows at once (lemo runs it
    `segment` rows at a time and computes gradients on the way; the value is the same)."""
    logits = op.Cast(op.Gemm(h, weight, bias, transB=1), to=logits_dtype)
    loss = op.SoftmaxCrossEntropyLoss(logits, target, ignore_index=ignore_index,
                                      reduction=reduction)
    return loss


# ----------------------------------------------------------- translations of the export ops
#
# A translation emits a plain node of domain "lemo" (through an onnxscript Op with an OpSchema made
# from the function's signature), not the function itself: torch.onnx.export inlines every function
# it sees in the model (its opset conversion step does), so the definitions are added afterwards.

_TENSOR_TYPES = [f"tensor({t})" for t in ("float", "double", "float16", "bfloat16", "int64",
                                          "int32", "int16", "int8", "uint8", "bool")]


def _node_op(function) -> Op:
    """An onnxscript Op that makes a node calling `function` (its signature as an OpSchema)."""
    hints = typing.get_type_hints(function.function)
    inputs, attributes, constraints = [], [], []
    for name in inspect.signature(function.function).parameters:
        hint = hints.get(name)
        if hint in (int, str):
            kind = OpSchema.AttrType.INT if hint is int else OpSchema.AttrType.STRING
            attributes.append(OpSchema.Attribute(name, kind, "", required=True))
            continue
        optional = type(None) in typing.get_args(hint)
        option = OpSchema.FormalParameterOption.Optional if optional else (
            OpSchema.FormalParameterOption.Single)
        inputs.append(OpSchema.FormalParameter(name, f"T_{name}", "", param_option=option))
        constraints.append((f"T_{name}", _TENSOR_TYPES, ""))
    outputs = []
    for name in function.to_function_proto().output:
        outputs.append(OpSchema.FormalParameter(name, f"T_out_{name}", ""))
        constraints.append((f"T_out_{name}", _TENSOR_TYPES, ""))
    schema = OpSchema(function.name, DOMAIN, DOMAIN_VERSION, inspect.getdoc(function.function) or "",
                      inputs=inputs, outputs=outputs, type_constraints=constraints,
                      attributes=attributes)
    return Op(_lemo, function.name, schema)


def _emit(name: str, *inputs, lemo_role: str, lemo_layer: int, **attributes):
    """A node of domain "lemo" calling function `name`, tagged with the node's role and layer."""
    output = _NODE_OPS[name](*inputs, **attributes)
    node = output.producer()
    node.metadata_props["lemo.role"] = lemo_role
    node.metadata_props["lemo.layer"] = str(lemo_layer)
    return output


def _select_tokens(scores, kept_blocks, block_size, seq_len, role, layer):
    return _emit("select_tokens", scores, kept_blocks=kept_blocks, block_size=block_size,
                 seq_len=seq_len, lemo_role=role, lemo_layer=layer)


def _gather_tokens(t, idx, dims, role, layer):
    for dim in dims:  # one call per sequence dim: ops.gather_tokens gathers them in turn
        t = _emit("gather_tokens", t, idx, dim=dim, lemo_role=role, lemo_layer=layer)
    return t


def _scatter_add_tokens(x, idx, rows, role, layer):
    return _emit("scatter_add_tokens", x, idx, rows, lemo_role=role, lemo_layer=layer)


def _block_scores(q, k, block_size, role, layer):
    return _emit("block_scores", q, k, block_size=block_size, lemo_role=role, lemo_layer=layer)


def _activation_block_scores(intermediate, block_size, role, layer):
    return _emit("activation_block_scores", intermediate, block_size=block_size,
                 lemo_role=role, lemo_layer=layer)


def _predicted_block_scores(h, q_side, k_side, distance_bias, block_size, heads, role, layer):
    return _emit("predicted_block_scores", h, *q_side, *k_side, distance_bias,
                 block_size=block_size, heads=heads, lemo_role=role, lemo_layer=layer)


def _predicted_mlp_block_scores(h, tensors, block_size, role, layer):
    return _emit("predicted_mlp_block_scores", h, *tensors, block_size=block_size,
                 lemo_role=role, lemo_layer=layer)


def _random_block_scores(like, n_blocks, generator_layer, seed, role, layer):
    return _emit("random_block_scores", like, n_blocks=n_blocks, layer=generator_layer,
                 seed=-1 if seed is None else seed, lemo_role=role, lemo_layer=layer)


def _linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, segment, logits_dtype,
                          role, layer):
    return _emit("linear_cross_entropy", h, weight, bias, target, ignore_index=ignore_index,
                 reduction=reduction, segment=segment, logits_dtype=int(logits_dtype),
                 lemo_role=role, lemo_layer=layer)


# ----------------------------------------------------------- lemo's operations, one entry each


@dataclasses.dataclass(frozen=True)
class _Exported:
    """One of lemo's operations, everything its export needs: the graph targets it stands for
    (`_replacement` maps their arguments), the export op `lemo_onnx::<name>` (schema `parameters`,
    lemo's `implementation` so that the export copy computes what the graph computes, `fake` for
    the output's shape; every export op takes two more arguments, the node's role and layer
    tags), the ONNX `function` named `name` that the model declares, and `translation`, which
    emits the export op as node(s) calling that function."""

    function: Any
    targets: tuple
    parameters: str
    implementation: Callable
    fake: Callable
    translation: Callable

    @property
    def name(self) -> str:
        return self.function.name


_OPERATIONS = (
    _Exported(select_tokens, (ops.select_tokens,),
              "Tensor scores, int kept_blocks, int block_size, int seq_len",
              ops.select_tokens, _selected_like, _select_tokens),
    _Exported(gather_tokens, (ops.gather_tokens,), "Tensor t, Tensor idx, int[] dims",
              lambda t, idx, dims: ops.gather_tokens(t, idx, tuple(dims)), _gathered_like,
              _gather_tokens),
    _Exported(scatter_add_tokens, (ops.scatter_add_tokens,), "Tensor x, Tensor idx, Tensor rows",
              ops.scatter_add_tokens, lambda x, idx, rows: torch.empty_like(x),
              _scatter_add_tokens),
    _Exported(block_scores, (torch.ops.lemo.block_scores.default,),
              "Tensor q, Tensor k, int block_size",
              lambda q, k, block_size: torch.ops.lemo.block_scores(q, k, block_size),
              lambda q, k, block_size: _block_scores_like(q, q.shape[2] // block_size),
              _block_scores),
    _Exported(activation_block_scores, (ops.activation_block_scores,),
              "Tensor intermediate, int block_size", ops.activation_block_scores,
              lambda x, block_size: _block_scores_like(x, x.shape[1] // block_size),
              _activation_block_scores),
    _Exported(predicted_block_scores, (bank.predicted_block_scores,),
              "Tensor h, Tensor[] q_side, Tensor[] k_side, Tensor distance_bias, int block_size, "
              "int heads",
              _predicted,
              lambda h, q_side, k_side, distance_bias, block_size, heads: _block_scores_like(
                  h, h.shape[1] // block_size),
              _predicted_block_scores),
    _Exported(predicted_mlp_block_scores, (bank.predicted_mlp_block_scores,),
              "Tensor h, Tensor[] tensors, int block_size", _predicted_mlp,
              lambda h, tensors, block_size: _block_scores_like(h, h.shape[1] // block_size),
              _predicted_mlp_block_scores),
    _Exported(random_block_scores, (torch.ops.lemo.random_block_scores.default,),
              "Tensor like, int n_blocks, int layer, int? seed",
              lambda like, n_blocks, layer, seed: torch.ops.lemo.random_block_scores(
                  like, n_blocks, layer, seed),
              lambda like, n_blocks, layer, seed: _block_scores_like(like, n_blocks),
              _random_block_scores),
    _Exported(linear_cross_entropy, (ops.linear_cross_entropy,),
              "Tensor h, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
              "str reduction, int segment, ScalarType logits_dtype",
              ops.linear_cross_entropy,
              lambda h, weight, bias, target, ignore_index, reduction, segment, logits_dtype: (
                  h.new_empty((), dtype=logits_dtype)),
              _linear_cross_entropy),
)
_BY_TARGET = {target: exported for exported in _OPERATIONS for target in exported.targets}
_NODE_OPS = {exported.name: _node_op(exported.function) for exported in _OPERATIONS}

_library = torch.library.Library("lemo_onnx", "DEF")
for _exported in _OPERATIONS:
    _library.define(f"{_exported.name}({_exported.parameters}, str lemo_role, int lemo_layer) "
                    "-> Tensor")
    _library.impl(_exported.name, lambda *args, f=_exported.implementation: f(*args[:-2]),
                  "CompositeExplicitAutograd")
    torch.library.register_fake(f"lemo_onnx::{_exported.name}",
                                lambda *args, f=_exported.fake: f(*args[:-2]), lib=_library)


def _translation_table() -> dict:
    """torch.onnx's custom_translation_table: each export op -> the function that emits it."""
    return {getattr(torch.ops.lemo_onnx, exported.name).default: exported.translation
            for exported in _OPERATIONS}


def _add_functions(model) -> None:
    """Declare the functions of domain "lemo" that the model's nodes call (an onnx_ir Model)."""
    called = {node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN}
    for exported in _OPERATIONS:
        if exported.name in called:
            definition = ir.serde.deserialize_function(exported.function.to_function_proto())
            model.functions[definition.identifier()] = definition
    if called:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what torch's ONNX exporter prints about itself during lemo's export: a warning per
    torchvision op it cannot register when torchvision is not installed (lemo's graphs hold none),
    and the FutureWarning its own copying of tree specs raises (`isinstance(treespec, LeafSpec)`)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)
