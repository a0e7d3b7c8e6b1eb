"""Plain causal masks become `is_causal=True`: the fast attention kernel in every layer lemo compiles.

IR seen: the torch-level Dynamo FX graph and the bodies of its activation-checkpoint regions,
before token selection. Under Dynamo, transformers materialises the attention mask (a bool
[B|1, 1, S, S] tensor built from aranges) and calls `scaled_dot_product_attention(q, k, v,
attn_mask=mask, is_causal=False)`: no layer can then use the flash kernel, and an S x S tensor is
computed and kept. Eager transformers calls SDPA with `is_causal=True` and no mask instead.

How the mask is proven causal: a mask that depends on no graph input is a constant of the graph,
so it is evaluated for real, once, on its own device, and compared element by element with the
causal pattern (key position <= query position). The nodes whose results are no larger than a
sequence (aranges, position ids, [1, 1, S, 1] index views) are evaluated whole; the nodes whose
results hold both sequence dims are evaluated a block of query rows at a time, and only pointwise
ops and expands are accepted there, so no S x S tensor is ever built (at 128K tokens a row block is
512 rows). A mask computed from any graph input (the caller's attention_mask or position_ids:
padding, packed documents), or that is not causal (sliding windows, chunked attention), or that is
built by an op this evaluator does not accept, is left as it is.

Grouped-query attention: with a mask, transformers also repeats each key/value head for its group
of query heads (`repeat_kv`: `kv[:, :, None].expand(B, Hk, n, S, d).reshape(B, Hk * n, S, d)`),
a copy of K and V at the query's head count that is kept for backward. Without a mask eager
transformers passes the Hk heads and `enable_gqa=True` instead. A rewritten call whose key and
value are both such repeats (same n, head dim <= 256 as transformers requires for the fast
kernels) reads the unrepeated tensors with `enable_gqa=True`, as eager transformers does; SDPA maps
query head h to key/value head h // n, the head `repeat_kv` put there.

Promise: an SDPA call is rewritten to `is_causal=True` with no mask only when its query and key
lengths are equal and its mask equals the plain causal mask in every element (bool masks; float
masks with 0 for kept and -inf or the dtype's lowest value for hidden pairs). Then the two calls
compute the same attention (up to the kernel's rounding). Checkpoint bodies lose the mask input
they no longer read, and the mask's construction (and the key/value repeats) are removed from the
graph when nothing else reads them.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from lemo_compile.fx_utils import evaluate, example_value, get_attribute
from lemo_compile.regions import SDPA_TARGETS, checkpoint_bodies, is_view

# Ops accepted on values that hold both sequence dims: each output element is computed from the
# input elements at the same (broadcast) position, so a block of query rows of the output needs
# only that block of rows of its inputs.
_POINTWISE_FUNCTIONS = {
    operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.and_,
    operator.or_, operator.xor, operator.invert, operator.not_, operator.mul, operator.add,
    operator.sub, operator.neg, torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.bitwise_and, torch.bitwise_or,
    torch.bitwise_not, torch.where, torch.mul, torch.add, torch.sub,
}
_POINTWISE_METHODS = {
    "le", "lt", "ge", "gt", "eq", "ne", "logical_and", "logical_or", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_not", "__and__", "__or__", "__invert__", "mul", "add",
    "sub", "to", "bool", "float", "half", "bfloat16", "masked_fill", "type_as",
    # Dynamo records some operators as their dunder methods (torch 2.11: `a == b` -> __eq__)
    "__eq__", "__ne__", "__le__", "__lt__", "__ge__", "__gt__", "__xor__", "__mul__", "__add__",
    "__sub__", "__neg__", "__rand__", "__ror__",
}
_ROW_BLOCK_ELEMENTS = 1 << 26  # elements of one evaluated row block: 64M (64 MB as bool)

log = logging.getLogger(__name__)


def causal_attention_pass(gm: fx.GraphModule) -> int:
    """Rewrite the SDPA calls of gm (and of its checkpoint bodies) whose mask is the plain causal
    mask to `is_causal=True` without a mask, in place; returns how many calls were rewritten."""
    proven: dict[fx.Node, bool] = {}

    def is_causal(mask: fx.Node) -> bool:
        if mask not in proven:
            proven[mask] = _is_plain_causal(gm, mask)
        return proven[mask]

    count = sum(_rewrite(call, is_causal) for call in list(gm.graph.nodes))
    for body, calls in checkpoint_bodies(gm).items():
        placeholders = list(body.graph.find_nodes(op="placeholder"))
        read = {p for p in placeholders if p.users}

        def outer(mask: fx.Node) -> bool:
            if mask.op != "placeholder":
                return False  # computed inside the region: not a mask lemo can evaluate
            position = 1 + placeholders.index(mask)
            return all(isinstance(c.args[position], fx.Node) and is_causal(c.args[position])
                       for c in calls)

        rewritten = sum(_rewrite(call, outer) for call in list(body.graph.nodes))
        if rewritten:
            body.graph.eliminate_dead_code()
            body.recompile()
            _drop_inputs(body, calls, [i for i, p in enumerate(placeholders)
                                       if p in read and not p.users])
            count += rewritten
    if count:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return count


def _rewrite(call: fx.Node, is_causal) -> int:
    """Rewrite one SDPA call if its mask is proven causal; 1 if rewritten, else 0."""
    if call.op != "call_function" or call.target not in SDPA_TARGETS or len(call.args) < 2:
        return 0  # (a query and key passed by keyword: left as it is)
    args, kwargs = list(call.args), dict(call.kwargs)
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    causal_flag = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    if not isinstance(mask, fx.Node) or causal_flag:
        return 0
    query, key = (example_value(a) for a in args[:2])
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
            and query.shape[-2] == key.shape[-2]):
        return 0
    if not is_causal(mask):
        return 0
    if len(args) > 3:
        args[3] = None
    else:
        kwargs.pop("attn_mask")
    if len(args) > 5:
        args[5] = True
    else:
        kwargs["is_causal"] = True
    _use_grouped_heads(args, kwargs)
    call.args, call.kwargs = tuple(args), kwargs
    return 1


def _use_grouped_heads(args: list, kwargs: dict) -> None:
    """If the key and value in (args, kwargs) of an SDPA call are both `repeat_kv` copies with the
    same group size, read the unrepeated tensors with `enable_gqa=True` (in place)."""
    if len(args) < 3 or kwargs.get("enable_gqa") or (len(args) > 7 and args[7]):
        return
    key, value = _unrepeated(args[1]), _unrepeated(args[2])
    if key is None or value is None or key[1] != value[1]:
        return
    head_dims = {example_value(key[0]).shape[-1], example_value(value[0]).shape[-1]}
    if len(head_dims) != 1 or head_dims.pop() > 256:
        return  # transformers keeps repeat_kv here: SDPA's fast kernels would not run
    args[1], args[2] = key[0], value[0]
    if len(args) > 7:
        args[7] = True
    else:
        kwargs["enable_gqa"] = True


def _unrepeated(node) -> tuple[fx.Node, int] | None:
    """(kv, n) when `node` is `kv[:, :, None].expand(B, Hk, n, S, d).reshape(B, Hk * n, S, d)` for
    kv [B, Hk, S, d] (transformers' repeat_kv), else None."""
    if not is_view(node):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method"
            and expand.target == "expand" and isinstance(expand.args[0], fx.Node)):
        return None
    index = expand.args[0]
    full = slice(None, None, None)
    if not (index.op == "call_function" and index.target is operator.getitem
            and isinstance(index.args[0], fx.Node)
            and index.args[1] in ((full, full, None), (full, full, None, full, full))):
        return None
    kv, repeated, expanded = example_value(index.args[0]), example_value(node), example_value(expand)
    if not all(isinstance(v, torch.Tensor) for v in (kv, repeated, expanded)) or kv.dim() != 4:
        return None
    batch, heads, seq_len, dim = kv.shape
    groups = expanded.shape[2] if expanded.dim() == 5 else 0
    if (tuple(expanded.shape) != (batch, heads, groups, seq_len, dim)
            or tuple(repeated.shape) != (batch, heads * groups, seq_len, dim)):
        return None
    return index.args[0], groups


def _is_plain_causal(gm: fx.GraphModule, mask: fx.Node) -> bool:
    """Whether `mask` (a node of gm) depends on no graph input and equals the causal mask; the
    reason it is not is logged (INFO)."""
    reason = _why_not_causal(gm, mask)
    if reason:
        log.info("lemo: the attention mask %s is kept: %s", mask.name, reason)
    return reason is None


def _why_not_causal(gm: fx.GraphModule, mask: fx.Node) -> str | None:
    value = example_value(mask)
    if (not isinstance(value, torch.Tensor) or value.dim() < 2
            or not all(isinstance(s, int) for s in value.shape)
            or value.shape[-1] != value.shape[-2]):
        return f"its value is not a static [..., S, S] tensor ({value!r:.80})"
    seq_len = int(value.shape[-1])
    nodes = _ancestors(mask)
    for node in nodes:
        if node.op in ("placeholder", "output") or _is_random(node):
            return f"it is computed from {node.name} (a graph input, or random)"
    wide = {n for n in nodes if _holds_both_sequence_dims(n, seq_len)}
    for node in nodes:
        if node not in wide and any(a in wide for a in node.all_input_nodes):
            return f"{node.name} reduces or reshapes an S x S value"
        if node in wide and not _is_pointwise(node):
            return f"{node.name} ({node.target}) is not evaluated a row block at a time"
    try:
        with unset_fake_temporarily(), torch.no_grad():
            small = _evaluate(gm, [n for n in nodes if n not in wide], {})
            rows = max(1, _ROW_BLOCK_ELEMENTS // (seq_len * math.prod(value.shape[:-2])))
            for start in range(0, seq_len, rows):
                stop = min(seq_len, start + rows)
                block = _evaluate_rows(gm, [n for n in nodes if n in wide], small, seq_len,
                                       start, stop)
                if not _causal_rows(block[mask], start, stop):
                    return f"rows {start}-{stop - 1} are not causal"
    except Exception as err:  # an op that fails on real values: not proven, the mask stays
        return f"evaluating it failed: {err!r}"
    return None


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], env: dict) -> dict:
    """Run `nodes` (graph order) on real values; env maps already evaluated nodes to values."""
    env = dict(env)
    for node in nodes:
        env[node] = _run(gm, node, lambda n: env[n])
    return env


def _evaluate_rows(gm, nodes, small: dict, seq_len: int, start: int, stop: int) -> dict:
    """Run the nodes that hold both sequence dims on query rows start..stop-1 only: their inputs
    with the query dim (dim -2 of size S) are cut to those rows; expands expand to them."""

    def rows_of(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-2] == seq_len:
            return value[..., start:stop, :]
        return value

    env = {n: rows_of(v) for n, v in small.items()}
    for node in nodes:
        if node.op == "call_method" and node.target == "expand":
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
                sizes = tuple(sizes[0])
            sizes = list(sizes)
            if sizes[-2] != seq_len:
                raise ValueError(f"{node.name} expands the query dim to {sizes[-2]}")
            sizes[-2] = stop - start
            env[node] = env[node.args[0]].expand(*sizes)
        else:
            env[node] = _run(gm, node, lambda n: env[n])
    return env


def _causal_rows(block: torch.Tensor, start: int, stop: int) -> bool:
    """Whether `block` [..., stop - start, S] is rows start..stop-1 of the causal mask."""
    seq_len = block.shape[-1]
    if block.shape[-2] != stop - start:
        return False
    positions = torch.arange(seq_len, device=block.device)
    allowed = (positions[None, :] <= positions[start:stop, None]).expand_as(block)
    if block.dtype == torch.bool:
        return bool(torch.equal(block, allowed))
    if not block.is_floating_point():
        return False
    hidden = block.masked_select(~allowed)
    return bool((block.masked_select(allowed) == 0).all()
                and (hidden <= torch.finfo(block.dtype).min).all())


def _run(gm: fx.GraphModule, node: fx.Node, value_of):
    if node.op == "get_attr":
        return get_attribute(gm, node.target)
    return evaluate(node, value_of)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    """`node` and everything it is computed from, in graph order."""
    seen: set[fx.Node] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if current not in seen:
            seen.add(current)
            pending.extend(current.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _holds_both_sequence_dims(node: fx.Node, seq_len: int) -> bool:
    value = example_value(node)
    return (isinstance(value, torch.Tensor) and value.dim() >= 2
            and tuple(value.shape[-2:]) == (seq_len, seq_len))


def _is_pointwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and (node.target in _POINTWISE_METHODS or node.target == "expand")


def _is_random(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(word in name for word in ("rand", "dropout", "bernoulli", "normal", "multinomial"))


def _drop_inputs(body: fx.GraphModule, calls: list[fx.Node], unused: list[int]) -> None:
    """Remove the body's inputs at positions `unused` (which nothing reads any more) and the
    calls' matching arguments."""
    if not unused:
        return
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    for call in calls:
        call.args = tuple(a for i, a in enumerate(call.args) if i - 1 not in unused)
    for i in unused:
        body.graph.erase_node(placeholders[i])
    body.graph.lint()
    body.recompile()
