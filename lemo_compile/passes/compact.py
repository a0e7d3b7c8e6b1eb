"""Re-running a residual block on fewer tokens: the shape surgery behind token elimination.

IR seen: the torch-level Dynamo FX graph, with static shapes baked into the block's nodes as
integers (`view(1, 4096, -1, 128)`, `expand(1, 8, 4, 4096, 128)`). Those constants are what make a
"run the same subgraph on K of the S tokens" rewrite hard: they must become K exactly where they
stand for the sequence, and nowhere else (a head dim may equal S).

How: `plan_compaction` walks the block in graph order with fake tensors of the *compacted* inputs.
Every op that takes no shape argument is simply re-run; for view / reshape / expand the new target
shape is derived from how the input's shape changed (which input dim shrank, and which output dim
holds that dim's elements), never by searching for the number S. Any other op with an integer argument
equal to S, an op that fails on the new shapes, or a result whose dims did not scale exactly by K / S
makes the whole block `CannotCompact`, and the block is left dense. Nothing is changed until
`apply_compaction`, so a failed plan leaves the graph as it was.

Promise: after `apply_compaction`, the block computes on the gathered rows exactly what it computed on
all rows, with every tensor whose dims held S now holding K there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from lemo_compile import ops
from lemo_compile.fx_utils import evaluate, example_value
from lemo_compile.regions import ResidualBlock, is_parameter, sequence_dims
from lemo_compile.tags import Role


class CannotCompact(Exception):
    """The block cannot be re-run on kept tokens; the message says which node and why."""


@dataclasses.dataclass
class CompactionPlan:
    """What `apply_compaction` will do to one block.

    gathers:    external inputs to gather at the kept tokens, with their sequence dims.
    new_args:   block nodes whose (args, kwargs) change (shape arguments).
    new_values: fake value of every block node and gathered input after compaction.
    """

    gathers: dict[fx.Node, tuple[int, ...]]
    new_args: dict[fx.Node, tuple[tuple, dict]]
    new_values: dict[fx.Node, Any]


def plan_compaction(
    block: ResidualBlock,
    residual: fx.Node,
    batch: int,
    seq_len: int,
    kept: int,
    fake_mode,
) -> CompactionPlan:
    """Plan running `block` on `kept` of `seq_len` tokens (see module docstring)."""
    order = {node: i for i, node in enumerate(residual.graph.nodes)}
    first = order[block.nodes[0]]
    members = set(block.nodes)
    gathers: dict[fx.Node, tuple[int, ...]] = {residual: (1,)}
    for node in block.nodes:
        for source in node.all_input_nodes:
            if source in members or source in gathers:
                continue
            if order[source] > first:
                raise CannotCompact(f"{source.name} is computed in the middle of the block")
            value = example_value(source)
            if not isinstance(value, torch.Tensor) or is_parameter(source):
                continue
            dims = sequence_dims(value, batch, seq_len)
            if dims is None:
                raise CannotCompact(
                    f"{source.name} {tuple(value.shape)} enters the block with the sequence length in "
                    "a position lemo does not know how to gather"
                )
            if dims:
                gathers[source] = dims

    with fake_mode:
        idx = torch.empty((batch, kept), dtype=torch.int64, device=example_value(residual).device)
        new_values: dict[fx.Node, Any] = {
            source: ops.gather_tokens(example_value(source), idx, dims)
            for source, dims in gathers.items()
        }
        new_args: dict[fx.Node, tuple[tuple, dict]] = {}
        for node in block.nodes:
            args, kwargs = _compacted_args(node, new_values, batch, seq_len)
            if (args, kwargs) != (node.args, node.kwargs):
                new_args[node] = (args, kwargs)
            try:
                new_values[node] = evaluate(
                    node, lambda n: new_values.get(n, example_value(n)), args, kwargs
                )
            except Exception as err:  # any failure here means the block cannot be compacted
                raise CannotCompact(f"{node.name} fails on {kept} tokens: {err}") from err
            _check_scaled(node, new_values[node], batch, seq_len, kept)
    out = new_values[block.output]
    if tuple(out.shape) != (batch, kept, example_value(block.output).shape[2]):
        raise CannotCompact(f"the block output has shape {tuple(out.shape)} on {kept} tokens")
    return CompactionPlan(gathers, new_args, new_values)


def apply_compaction(
    graph: fx.Graph,
    block: ResidualBlock,
    residual: fx.Node,
    plan: CompactionPlan,
    idx: fx.Node,
    tag: Callable[[fx.Node, str], None],
    valid: fx.Node | None = None,
) -> fx.Node:
    """Gather the block's inputs at idx and rewrite its nodes in place; returns the output [B, K, D].

    valid [B, K] (padded batches): which gathered rows are kept, the others being fillers; every
    gathered attention mask then hides the fillers as keys (`ops.hide_invalid_keys`)."""
    gathered: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(block.nodes[0]):
        for source, dims in plan.gathers.items():
            node = graph.call_function(ops.gather_tokens, (source, idx, dims))
            node.meta["example_value"] = plan.new_values[source]
            tag(node, Role.GATHER)
            if valid is not None and dims == (2, 3):
                node = graph.call_function(ops.hide_invalid_keys, (node, valid))
                node.meta["example_value"] = plan.new_values[source]
                tag(node, Role.HIDE_FILLERS)
            gathered[source] = node
    members = set(block.nodes)
    for node in block.nodes:
        if node in plan.new_args:
            node.args, node.kwargs = plan.new_args[node]
        for source in node.all_input_nodes:
            if source not in members and source in gathered:
                node.replace_input_with(source, gathered[source])
        node.meta["example_value"] = plan.new_values[node]
    return block.output


# Ops whose integer arguments are a target shape.
_RESHAPES = {"view", "reshape"}
_EXPANDS = {"expand"}


def _compacted_args(node: fx.Node, new_values, batch: int, seq_len: int) -> tuple[tuple, dict]:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    is_method = node.op == "call_method"
    if name in _RESHAPES | _EXPANDS and node.args and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        shape_args = node.args[1:] if is_method else node.args[1:]
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list, torch.Size)):
            shape_args = tuple(shape_args[0])
        if shape_args and all(isinstance(s, int) for s in shape_args):
            old_in = tuple(example_value(source).shape)
            new_in = tuple(new_values.get(source, example_value(source)).shape)
            if name in _RESHAPES:
                shape = _reshape_target(old_in, new_in, tuple(example_value(node).shape), node.name)
            else:
                shape = _expand_target(old_in, new_in, tuple(shape_args), node.name)
            return (source, tuple(shape)), dict(node.kwargs)
    suspicious = {seq_len, batch * seq_len}
    flat, _ = tree_flatten((node.args, node.kwargs))
    for item in flat:
        values = (item.start, item.stop) if isinstance(item, slice) else (item,)
        if any(isinstance(v, int) and not isinstance(v, bool) and v in suspicious for v in values):
            raise CannotCompact(
                f"{node.name} ({node.target}) takes the sequence length {seq_len} as an argument"
            )
    return node.args, dict(node.kwargs)


def _reshape_target(old_in, new_in, old_out, name) -> tuple[int, ...]:
    """New view shape: the output dim that holds the shrunk input dim's elements shrinks alike."""
    changed = [d for d, (a, b) in enumerate(zip(old_in, new_in)) if a != b]
    if not changed:
        return old_out
    if len(changed) > 1:
        raise CannotCompact(f"{name} reshapes a tensor compacted on several dims")
    dim = changed[0]
    before = math.prod(old_in[:dim])
    through = before * old_in[dim]
    prefix = 1
    for out_dim, size in enumerate(old_out):
        if prefix <= before and prefix * size >= through and before % prefix == 0 and (prefix * size) % through == 0:
            shape = list(old_out)
            shape[out_dim] = size // old_in[dim] * new_in[dim]
            return tuple(shape)
        prefix *= size
    # A merged dim split back (OPT's MLP output [B*S, D] viewed as [B, S, D]): the output dims
    # start..end-1 hold exactly the shrunk dim's elements, and the innermost of them shrinks.
    start, prefix = 0, 1
    while start < len(old_out) and prefix < before:
        prefix *= old_out[start]
        start += 1
    end, span = start, 1
    while end < len(old_out) and span < old_in[dim]:
        span *= old_out[end]
        end += 1
    inner = end - 1
    if (prefix == before and span == old_in[dim] and end - start >= 2
            and (old_out[inner] * new_in[dim]) % old_in[dim] == 0):
        shape = list(old_out)
        shape[inner] = old_out[inner] * new_in[dim] // old_in[dim]
        return tuple(shape)
    raise CannotCompact(f"{name} splits the sequence dim")


def _expand_target(old_in, new_in, sizes, name) -> tuple[int, ...]:
    """New expand sizes: a compacted input dim keeps its new size (or -1)."""
    offset = len(sizes) - len(old_in)
    new = list(sizes)
    for dim, (a, b) in enumerate(zip(old_in, new_in)):
        if a != b:
            if sizes[dim + offset] not in (-1, a):
                raise CannotCompact(f"{name} expands the sequence dim")
            new[dim + offset] = -1 if sizes[dim + offset] == -1 else b
    return tuple(new)


def _check_scaled(node: fx.Node, new, batch: int, seq_len: int, kept: int) -> None:
    """Every dim is unchanged, scaled by kept / seq_len, or a broadcast 1 that gathering made B."""
    old = example_value(node)
    for old_t, new_t in zip(_tensors(old), _tensors(new)):
        for a, b in zip(old_t.shape, new_t.shape):
            if a != b and a * kept != b * seq_len and (a, b) != (1, batch):
                raise CannotCompact(
                    f"{node.name}: shape {tuple(old_t.shape)} became {tuple(new_t.shape)}, "
                    f"not a sequence compaction {seq_len} -> {kept}"
                )
        if old_t.dim() != new_t.dim():
            raise CannotCompact(f"{node.name} changed rank on compaction")


def _tensors(value) -> list[torch.Tensor]:
    flat, _ = tree_flatten(value)
    return [v for v in flat if isinstance(v, torch.Tensor)]
