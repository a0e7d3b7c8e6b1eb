"""Segmented loss: the LM head and the cross-entropy run `loss_segment` rows at a time.

IR seen: the torch-level Dynamo FX graph. Pattern: `F.cross_entropy(chain(linear(h, W, b)), target)`
where `chain` only casts the dtype, flattens leading dims (`view(-1, V)`) or takes full slices, so
row r of the loss input is row r of `h.reshape(-1, D)`. Extra cross-entropy arguments (class weights,
label smoothing) or any other op in the chain leave the graph unchanged.

Rewrite: the cross-entropy becomes `ops.linear_cross_entropy(h.reshape(-1, D), W, b, target, ...)`
(under autocast, with h, W and b cast to the dtype the head ran in, as autocast cast them),
which never holds more than one segment's logits: each segment's gradients are computed in the
forward, while its logits exist, and scaled by the upstream gradient in backward. The logits are
then no longer computed; where the graph returned them (HF's `outputs.logits`), it returns a NaN
placeholder of the same shape, dtype and device that holds no memory.

Loss weighting (option `dropped_loss_weight` = d < 1): the rewritten loss also gets row weights
`ops.kept_share_weights(selections, S, d)`, from every sparse block's selection in the graph (its
kept indices, or a padded batch's kept flags, as the selection pass tagged them), so that token s
of row b counts d + (1 - d) x the share of the sparse blocks that kept it. A selection inside an
activation-checkpoint body reaches the loss as an extra output of the body
(`expose_body_selections`, run by the manager after the body's selection pass). A loss whose
rows are not the [B, S] tokens of the selections, or left unsegmented, is not weighted (the
manager warns).

Promise: the loss and all gradients equal the unsegmented ones up to float rounding (with loss
weighting: the weighted loss's).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx

from lemo_compile import ops
from lemo_compile.fx_utils import example_value, insert_call
from lemo_compile.regions import is_linear
from lemo_compile.tags import BLOCK_OF_SELECTION, KEPT_OF, Role, layer_of, role_of, tag

_CROSS_ENTROPY = (F.cross_entropy,)
_SAME_ROWS_METHODS = ("float", "to", "contiguous", "view", "reshape", "bfloat16", "half", "double")


@dataclasses.dataclass
class LossResult:
    """How many cross-entropy calls were segmented, how many of those weighted (`dropped_weight`
    < 1) from how many sparse blocks' `selections`, and how many returned logits became
    placeholders; `skipped`: why each other cross-entropy of the graph was left as it was,
    `unweighted`: why a segmented one was not weighted (the manager warns about both)."""

    segmented: int = 0
    weighted: int = 0
    selections: int = 0
    placeholder_outputs: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    unweighted: list[str] = dataclasses.field(default_factory=list)


def segment_loss_pass(gm: fx.GraphModule, segment: int, fake_mode,
                      dropped_weight: float = 1.0) -> LossResult:
    """Rewrite every LM-head cross-entropy of the graph into the segmented op, its rows weighted by
    what the sparse blocks kept when `dropped_weight` < 1 (module docstring)."""
    result = LossResult()
    graph = gm.graph
    selections = kept_selections(gm) if dropped_weight < 1 else []
    result.selections = len(selections)
    for loss in [n for n in graph.nodes if n.op == "call_function" and n.target in _CROSS_ENTROPY]:
        match = _match(loss)
        if isinstance(match, str):
            result.skipped.append(match)
            continue
        head, chain, target, ignore_index, reduction = match
        hidden, weight, bias = _linear_args(head)
        width = example_value(hidden).shape[-1]
        logits_dtype = example_value(loss.args[0]).dtype
        head_dtype = example_value(head).dtype
        with graph.inserting_before(loss):
            rows = insert_call(graph, fake_mode, "reshape", (hidden, -1, width), method=True)
            inserted = [rows]
            # under autocast the head ran in a narrower dtype than its operands: the op runs
            # with autocast off, so it gets them cast as autocast cast them
            operands = []
            for operand in (rows, weight, bias):
                if operand is not None and example_value(operand).dtype != head_dtype:
                    operand = insert_call(graph, fake_mode, "to", (operand, head_dtype), method=True)
                    inserted.append(operand)
                operands.append(operand)
            rows, weight, bias = operands
            arguments = (rows, weight, bias, target, ignore_index, reduction, segment, logits_dtype)
            row_weight = None
            if selections:
                row_weight = _row_weights(graph, fake_mode, hidden, selections, dropped_weight,
                                          loss.name, result)
            if row_weight is not None:
                inserted.append(row_weight)
                arguments += (row_weight,)
                result.weighted += 1
            segmented = graph.call_function(ops.linear_cross_entropy, arguments)
        # the loss's own value: the segmented loss stands in for it
        with fake_mode:
            segmented.meta["example_value"] = example_value(loss).new_empty(())
        for node in (*inserted, segmented):
            tag(node, Role.SEGMENTED_LOSS)
        loss.replace_all_uses_with(segmented)
        graph.erase_node(loss)
        for returned in chain:  # the logits as returned (OPT: linear(...).contiguous())
            logits = example_value(returned)
            for output in [u for u in returned.users if u.op == "output"]:
                with graph.inserting_before(output):
                    filler = insert_call(graph, fake_mode, ops.nan_placeholder,
                                         (list(logits.shape), logits.dtype, logits.device))
                tag(filler, Role.PLACEHOLDER)
                output.replace_input_with(returned, filler)
                result.placeholder_outputs += 1
        result.segmented += 1
    graph.eliminate_dead_code()
    return result


def kept_selections(gm: fx.GraphModule) -> list[fx.Node]:
    """Every sparse block's selection that gm's graph holds: its own blocks' (`block_selections`)
    and those its activation-checkpoint bodies pass out (`expose_body_selections`)."""
    exposed = [n for n in gm.graph.nodes if role_of(n) is Role.LOSS_SELECTION]
    return block_selections(gm.graph) + exposed


def block_selections(graph: fx.Graph) -> list[fx.Node]:
    """Per sparse block of `graph` (attention, MLP), the node that says which tokens it kept: a
    padded batch's kept flags [B, S] where they exist, else its kept indices [B, K]."""
    kept_roles = set(KEPT_OF.values())
    chosen: dict[tuple, fx.Node] = {}
    for node in graph.nodes:
        role = role_of(node)
        if role in KEPT_OF or role in kept_roles:
            key = (layer_of(node), BLOCK_OF_SELECTION[role])
            if role in kept_roles or key not in chosen:
                chosen[key] = node
    return list(chosen.values())


def expose_body_selections(gm: fx.GraphModule, body: fx.GraphModule, calls: list[fx.Node]) -> None:
    """Make the block selections of the activation-checkpoint body `body` of `gm` extra outputs of
    the body, read after each of its `calls` by a getitem tagged `Role.LOSS_SELECTION` (and the
    selection's layer), which `kept_selections` finds. Raises ValueError for a body whose output
    is not a tuple (Dynamo's form)."""
    selections = block_selections(body.graph)
    if not selections:
        return
    output = next(iter(body.graph.find_nodes(op="output")))
    if len(output.args) != 1 or not isinstance(output.args[0], (tuple, list)):
        raise ValueError("lemo option 'dropped_loss_weight': a checkpointed region's graph does not "
                         "return a tuple, so its token selection cannot reach the loss; leave the "
                         "option at 1.0 or turn gradient checkpointing off")
    first = len(output.args[0])
    output.args = ((*output.args[0], *selections),)
    body.recompile()
    for call in calls:
        call.meta["example_value"] = (*call.meta["example_value"],
                                      *(example_value(node) for node in selections))
        with gm.graph.inserting_after(call):
            for i, node in reversed(list(enumerate(selections))):
                item = gm.graph.call_function(operator.getitem, (call, first + i))
                item.meta["example_value"] = example_value(node)
                tag(item, Role.LOSS_SELECTION, layer_of(node))


def _row_weights(graph, fake_mode, hidden: fx.Node, selections: list[fx.Node],
                 dropped_weight: float, name: str, result: LossResult) -> fx.Node | None:
    """The row-weights node of a loss over `hidden` [B, S, D], or None (the reason in `result`)
    when its rows are not the selections' tokens."""
    shape = tuple(example_value(hidden).shape)
    batch = example_value(selections[0]).shape[0]
    if len(shape) != 3 or shape[0] != batch:
        result.unweighted.append(f"{name}: its rows are not the [batch, tokens] of the sparse layers")
        return None
    return insert_call(graph, fake_mode, ops.kept_share_weights,
                       (selections, shape[1], dropped_weight))


def _match(loss: fx.Node):
    """(lm_head linear node, target, ignore_index, reduction), or a string saying why not."""
    allowed = {"ignore_index", "reduction"}
    if len(loss.args) != 2 or set(loss.kwargs) - allowed:
        return f"{loss.name}: cross_entropy with arguments other than ignore_index / reduction"
    reduction = loss.kwargs.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        return f"{loss.name}: reduction {reduction!r}"
    source, target = loss.args
    value = example_value(source)
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return f"{loss.name}: the loss input is not [rows, vocab]"
    chain, node = [], source
    while not is_linear(node):
        if not _keeps_rows(node):
            return f"{loss.name}: {node.name} between the LM head and the loss changes rows"
        chain.append(node)
        node = node.args[0]
    chain.append(node)
    # From the LM head to the loss, each node feeds the next and may be returned, nothing else.
    for value, consumer in zip(chain, [loss, *chain[:-1]], strict=True):
        if any(u is not consumer and u.op != "output" for u in value.users):
            return f"{loss.name}: the logits are used by more than the loss"
    return node, chain, target, loss.kwargs.get("ignore_index", -100), reduction


def _keeps_rows(node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method" and node.target in _SAME_ROWS_METHODS:
        if node.target in ("view", "reshape"):
            last = example_value(node).shape[-1]
            return last == example_value(node.args[0]).shape[-1]
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        return all(i is Ellipsis or (isinstance(i, slice) and _is_full(i)) for i in index)
    return False


def _is_full(index: slice) -> bool:
    return index.step in (None, 1) and index.start in (None, 0) and index.stop is None


def _linear_args(head: fx.Node):
    args = list(head.args) + [None] * (3 - len(head.args))
    hidden, weight, bias = args[:3]
    return hidden, weight, head.kwargs.get("bias", bias)
