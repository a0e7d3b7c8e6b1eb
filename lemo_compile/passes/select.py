"""Token selection: run each sparse layer's attention block on its informative tokens only.

IR seen: the torch-level Dynamo FX graph (before AOTAutograd), with the regions of
`lemo_compile.regions`. Autograd through everything inserted here comes from AOTAutograd.

For every layer whose `LayerPlan` is sparse, it inserts, before the block:

    scores = <scorer>(...)                       # [B, n], no gradient
    idx    = ops.select_tokens(scores, k, b, S)   # [B, K] sorted token indices
    x_k    = ops.gather_tokens(x, idx, (1,))      # and cos / sin / mask at idx

rewrites the block in place to run on x_k (`compact.py`), and replaces the residual add with
`ops.scatter_add_tokens(x, idx, block_output)`: kept rows get the block's result added, the others
pass through. The oracle scorer runs a copy of the block's query and key computation on all tokens
(input detached, dropout removed) and feeds `lemo::block_scores`.

Promise: the graph computes LEMO.md's semantics v1 for the sparse layers and is unchanged elsewhere;
a block that cannot be compacted stays dense and is reported in `SelectionResult.dense`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx

from lemo_compile import ops
from lemo_compile.config import LayerPlan, LemoConfig
from lemo_compile.passes.compact import CannotCompact, apply_compaction, plan_compaction
from lemo_compile.regions import ModelRegions, ResidualBlock

_DROPOUTS = (F.dropout, torch.dropout)


@dataclasses.dataclass
class SelectionResult:
    """Which layers the pass made sparse, which it had to leave dense (layer -> reason), and the
    graph outputs it replaced by placeholders."""

    sparse: list[int]
    dense: dict[int, str]
    placeholder_outputs: int = 0


def select_pass(
    gm: fx.GraphModule,
    regions: ModelRegions,
    plans: list[LayerPlan],
    config: LemoConfig,
    fake_mode,
) -> SelectionResult:
    """Insert token selection for every sparse layer of `plans` (see module docstring)."""
    result = SelectionResult([], {})
    graph = gm.graph
    batch, seq_len = regions.batch_size, regions.seq_len
    for layer in regions.layers:
        plan = plans[layer.index]
        block = layer.attention
        if not plan.sparse or block is None:
            continue
        residual = block.residual
        try:
            compaction = plan_compaction(block, residual, batch, seq_len, plan.kept_tokens, fake_mode)
        except CannotCompact as err:
            result.dense[layer.index] = str(err)
            continue

        def tag(node: fx.Node, role: str, layer_index: int = layer.index, add: fx.Node = block.add) -> None:
            node.meta["custom"] = {"lemo": role, "lemo_layer": layer_index}
            node.meta["nn_module_stack"] = dict(add.meta.get("nn_module_stack") or {})

        with graph.inserting_before(block.nodes[0]):
            scores = _insert_scorer(graph, block, residual, plan, config, fake_mode, tag)
            idx = _call(graph, fake_mode, ops.select_tokens,
                        (scores, plan.kept_blocks, config.block_size, seq_len))
            tag(idx, "select")
        cache_shapes = {n: tuple(n.meta["example_value"].shape) for n in block.cache_outputs}
        output = apply_compaction(graph, block, residual, compaction, idx, tag)
        with graph.inserting_before(block.add):
            merged = _call(graph, fake_mode, ops.scatter_add_tokens, (residual, idx, output))
            tag(merged, "scatter_add")
        for cached, shape in cache_shapes.items():
            result.placeholder_outputs += _replace_output_use(graph, cached, shape, fake_mode, tag)
        block.add.replace_all_uses_with(merged)
        graph.erase_node(block.add)
        result.sparse.append(layer.index)
    graph.eliminate_dead_code()
    return result


def _insert_scorer(graph, block: ResidualBlock, residual, plan, config, fake_mode, tag) -> fx.Node:
    if config.scorer == "random":
        node = _call(graph, fake_mode, torch.ops.lemo.random_block_scores.default,
                     (residual, plan.n_blocks, block.layer, config.seed))
        tag(node, "score")
        return node
    # Oracle: q and k after RoPE for all tokens, from a no-grad copy of the block's own computation.
    wanted = _ancestors_in_block(block, (block.query, block.key))
    detached = _call(graph, fake_mode, torch.Tensor.detach, (residual,))
    tag(detached, "score")
    env: dict[fx.Node, fx.Node] = {residual: detached}
    for node in block.nodes:
        if node not in wanted:
            continue
        if node.op == "call_function" and node.target in _DROPOUTS:
            env[node] = env.get(node.args[0], node.args[0])
            continue
        copy = graph.node_copy(node, lambda n: env.get(n, n))
        tag(copy, "score")
        env[node] = copy
    q = _call(graph, fake_mode, torch.Tensor.detach, (env[block.query],))
    k = _call(graph, fake_mode, torch.Tensor.detach, (env[block.key],))
    scores = _call(graph, fake_mode, torch.ops.lemo.block_scores.default, (q, k, config.block_size))
    for node in (q, k, scores):
        tag(node, "score")
    return scores


def _ancestors_in_block(block: ResidualBlock, roots) -> set[fx.Node]:
    members = set(block.nodes)
    seen: set[fx.Node] = set()
    pending = [r for r in roots if r in members]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        pending.extend(n for n in node.all_input_nodes if n in members)
    return seen


def _replace_output_use(graph: fx.Graph, node: fx.Node, shape, fake_mode, tag) -> int:
    """Return a NaN placeholder of `shape` instead of `node` from the graph (a KV cache entry that
    lemo computed on kept tokens only); returns how many outputs were replaced."""
    value = node.meta["example_value"]
    outputs = [u for u in node.users if u.op == "output"]
    for output in outputs:
        with graph.inserting_before(output):
            filler = _call(graph, fake_mode, ops.nan_placeholder, (list(shape), value.dtype, value.device))
            tag(filler, "placeholder")
        output.replace_input_with(node, filler)
    return len(outputs)


def _call(graph: fx.Graph, fake_mode, target, args: tuple) -> fx.Node:
    """Insert `target(*args)` and record its fake value as the node's example_value."""
    node = graph.call_function(target, args)
    values = tuple(a.meta["example_value"] if isinstance(a, fx.Node) else a for a in args)
    with fake_mode:
        node.meta["example_value"] = target(*values)
    return node
