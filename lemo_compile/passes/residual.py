"""Residual adds in one form, before the regions are found: the rewrites `regions.find_regions`
relies on.

IR seen: the torch-level Dynamo FX graph, as `regions.py` reads it. Promise: the same values (the
parallel-residual sum up to float rounding, since it is re-associated), node metadata kept for the
region finder (`nn_module_stack`, example values).

Two rewrites put residual adds in the form of a residual block (`canonical_residual_adds`):
flattened adds (OPT's MLP: `(x.reshape(-1, D) + out).view(B, S, D)` becomes
`x + out.reshape(B, S, D)`) and parallel-residual sums (`x + Attn(norm(x)) + MLP(norm'(x))`,
in any order, becomes `(x + Attn(...)) + MLP(...)`: the MLP block then adds into x1 = x + Attn
while reading x, and a norm both blocks read is an input of each block, not part of either).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lemo_compile.fx_utils import example_value, node_shape
from lemo_compile.regions import (
    LAYER_PATH, downstream, is_add, is_sdpa, is_view, module_stack,
)


def canonical_residual_adds(gm: fx.GraphModule, fake_mode=None) -> int:
    """`unflatten_residual_adds` then `reassociate_parallel_residuals` on gm (the same values);
    returns how many adds were rewritten."""
    return unflatten_residual_adds(gm, fake_mode) + reassociate_parallel_residuals(gm, fake_mode)


def unflatten_residual_adds(gm: fx.GraphModule, fake_mode=None) -> int:
    """Rewrite `(x.reshape(-1, D) + out).view(B, S, D)` (x [B, S, D], out [B*S, D]; OPT's MLP)
    to `x + out.reshape(B, S, D)`, so that the MLP block reads and adds into x like any other
    residual block. Same values; returns how many adds were rewritten."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not (is_add(node) and len(node.args) == 2 and not node.kwargs and len(node.users) == 1):
            continue
        (back,) = node.users
        shape = node_shape(back)
        if not (is_view(back) and back.args[0] is node and shape is not None and len(shape) == 3):
            continue
        for flat, out in (node.args, node.args[::-1]):
            if not (isinstance(flat, fx.Node) and isinstance(out, fx.Node) and is_view(flat)
                    and flat.args[0] is not None and isinstance(flat.args[0], fx.Node)
                    and node_shape(flat.args[0]) == shape and node_shape(flat) == node_shape(out)
                    and len(node_shape(flat)) == 2):
                continue
            x = flat.args[0]
            with graph.inserting_before(node):
                # reshape: `out` [B*S, D] need not be contiguous (view would fail at compile time)
                out3 = graph.call_method("reshape", (out, shape))
                new = graph.call_function(operator.add, (x, out3))
            for created in (out3, new):
                _inherit_meta(created, node)
            value = example_value(out)
            if fake_mode is not None:
                with fake_mode:
                    out3.meta["example_value"] = value.reshape(shape)
            else:
                out3.meta["example_value"] = value.reshape(shape)
            new.meta["example_value"] = example_value(back)
            back.replace_all_uses_with(new)
            graph.erase_node(back)
            graph.erase_node(node)
            if not flat.users:
                graph.erase_node(flat)
            count += 1
            break
    if count:
        graph.lint()
        gm.recompile()
    return count


def reassociate_parallel_residuals(gm: fx.GraphModule, fake_mode=None) -> int:
    """Rewrite each parallel-residual layer's output, the sum of its input x, its attention
    block's output a and its MLP block's output m in any order and grouping (GPT-NeoX's
    `(m + a) + x`, GPT-J's and Phi's `(a + m) + x`, ...), as `(x + a) + m`: the attention block then
    adds into x like a sequential layer's, and the MLP block into x + a, while still reading x.
    The same sum up to rounding; returns how many sums were rewritten (or, already in that order,
    moved: x + a is then computed right after a, before the MLP block).

    The roles are read off the graph: within one layer (a module path of the nodes' module stacks)
    a is computed from the layer's one attention call, x is one of that call's inputs' sources,
    m is neither."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    count = 0
    for layer_nodes in _nodes_by_layer(gm).values():
        calls = [n for n in layer_nodes if is_sdpa(n)]
        if len(calls) != 1:
            continue
        after = downstream(calls[0], layer_nodes)
        before = _upstream(calls[0], layer_nodes)
        for outer in [n for n in graph.nodes if n in layer_nodes and _is_plain_add(n)]:
            if outer not in layer_nodes:
                continue  # erased by an earlier rewrite
            inner = next((a for a in outer.args if _is_plain_add(a) and len(a.users) == 1
                          and a in layer_nodes), None)
            if inner is None:
                continue
            leaves = [*inner.args, next(a for a in outer.args if a is not inner)]
            a = [n for n in leaves if n in after]
            x = [n for n in leaves if n in before and n not in after]
            m = [n for n in leaves if n not in before and n not in after]
            if not (len(a) == len(x) == len(m) == 1) or len({node_shape(n) for n in leaves}) != 1:
                continue
            (a,), (x,), (m,) = a, x, m
            count += 1
            # x1 = x + a right after a, and the MLP's own nodes after it, as in a sequential
            # layer: lemo inserts a block's selection before the block's first node, and the MLP
            # block's selection reads x1.
            last = max((x, a), key=order.__getitem__)
            mlp_nodes = _feeding_only(m, layer_nodes - before - after)
            if any(u not in (inner, outer) for u in m.users):
                mlp_nodes = set()
            if inner.args in ((x, a), (a, x)):  # already (x + a) + m (Cohere): only moved
                last.append(inner)
                x1, y = inner, outer
            else:
                with graph.inserting_after(last):
                    x1 = graph.call_function(operator.add, (x, a))
                with graph.inserting_before(outer):
                    y = graph.call_function(operator.add, (x1, m))
                for created in (x1, y):
                    _inherit_meta(created, outer)
                    created.meta["example_value"] = example_value(outer)
                if fake_mode is not None:  # (x1's value: same shape, dtype and device as y's)
                    with fake_mode:
                        x1.meta["example_value"] = torch.empty_like(example_value(outer))
                outer.replace_all_uses_with(y)
                graph.erase_node(outer)
                graph.erase_node(inner)
                layer_nodes.difference_update((outer, inner))
                layer_nodes.update((x1, y))
            for node in [n for n in graph.nodes if n in mlp_nodes]:
                y.prepend(node)
            order = {node: i for i, node in enumerate(graph.nodes)}
    if count:
        graph.lint()
        gm.recompile()
    return count


def _inherit_meta(created: fx.Node, replaced: fx.Node) -> None:
    """Give a node a rewrite created the module stack and source of the node it replaces (what
    the region finder and error messages read)."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in replaced.meta:
            created.meta[key] = replaced.meta[key]


def _nodes_by_layer(gm: fx.GraphModule) -> dict[str, set[fx.Node]]:
    """The nodes of each decoder-layer candidate (a module at `<name>.<index>`), by its path."""
    layers: dict[str, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, _cls in module_stack(node):
            if LAYER_PATH.match(path):
                layers.setdefault(path, set()).add(node)
                break
    return layers


def _upstream(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    """Every node `node` is computed from inside `within`, plus the nodes outside it that those
    read directly (the layer's inputs)."""
    found, pending = set(), [node]
    while pending:
        for source in pending.pop().all_input_nodes:
            if source not in found:
                found.add(source)
                if source in within:
                    pending.append(source)
    return found


def _feeding_only(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    """`node` and the operations (no graph inputs) it is computed from inside `within`, when all
    of them are used only to compute `node` (else the empty set: nothing can be moved on its
    own)."""
    found = {node} | {n for n in _upstream(node, within) if n in within and n.op.startswith("call_")}
    if any(u not in found for n in found - {node} for u in n.users):
        return set()
    return found


def _is_plain_add(node) -> bool:
    """An out-of-place add of two tensors (an in-place one changes its first operand, which other
    nodes may read: not rewritten)."""
    out_of_place = (node.target in (operator.add, torch.add) if node.op == "call_function"
                    else node.target == "add") if isinstance(node, fx.Node) else False
    return (out_of_place and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args))
