"""Post-grad fusion: the row movements that token selection leaves -> lemo's fused row ops.

IR: Inductor's post-grad graphs, forward and backward separately: functional aten ops after
Inductor's decompositions, every node with `meta["val"]`. Token selection (`select.py`) inserts
plain gathers and a scatter-add per sparse block on the Dynamo graph; AOTAutograd turns them, and
their gradients, into these chains (B batch, S tokens, K kept, D width, idx [B, K] from `select_tokens`):

    forward   aten.gather(x, 1, expand(idx[:, :, None], [B, K, D]))  + Hugging Face RMSNorm after it
              aten.scatter_add(x, 1, expand(idx...), rows)           the residual add
    backward  aten.gather(g, 1, expand(idx...))                     the gradient of the block output
              aten.add(g, aten.scatter_add(zeros, 1, expand(idx...), d_rows))
                                                                    a zero-padded [B, S, D] buffer

Rewrites, in this order (each counted in `counters` under its name):

* `fused_gather_norm`: the gather and the RMSNorm chain that reads it -> `lemo.gather_rms_norm`,
  whose outputs stand in for the norm's output, the gathered rows and 1/rms (the last two are what
  the norm's backward reads); the gather and the LayerNorm chain that reads it (OPT; Inductor's
  decomposition: var_mean, rsqrt, (h - mean) * rstd * weight + bias; the rows may be viewed as
  [B * K, D] first, as in OPT's MLP blocks) -> `lemo.gather_layer_norm`, whose outputs stand in
  for the output, the rows, the mean and 1/std.
* `fused_gather`: any other gather -> `lemo.gather_rows`.
* `folded_zero_scatter`: add(g, scatter_add(zeros, ...)) -> `lemo.scatter_add_rows(g, ...)`.
* `fused_scatter_add`: any other scatter-add -> `lemo.scatter_add_rows`.

Promise: only chains whose index comes from lemo's token selection are touched (those indices are
distinct and sorted per row, which the fused ops rely on), and each rewrite computes the same values
as the chain it replaces, up to floating-point rounding in the norm. A norm weight computed in the
graph after the gather (Gemma's `1 + weight`, in a reordered checkpoint body) is moved before it
when only pure calls compute it; otherwise that gather is left unfused.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lemo_compile.tags import Role, role_of

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def fuse_row_movements(graph: fx.Graph, counters: dict[str, int] | None = None) -> dict[str, int]:
    """Apply the rewrites above to `graph` in place; add their counts to `counters`, return it."""
    counters = counters if counters is not None else {}

    def count(name: str) -> None:
        counters[name] = counters.get(name, 0) + 1

    for node in list(graph.nodes):
        if node.target is aten.gather.default and _token_index(node) is not None:
            if _fuse_gather_norm(graph, node) or _fuse_gather_layer_norm(graph, node):
                count("fused_gather_norm")
            else:
                _replace(graph, node, torch.ops.lemo.gather_rows.default,
                         (node.args[0], _token_index(node)))
                count("fused_gather")
    for node in list(graph.nodes):
        if node.target is aten.scatter_add.default and _token_index(node) is not None:
            x, _, _, rows = node.args
            idx = _token_index(node)
            target = _zero_fold_target(node)
            if target is not None:
                add, other = target
                _replace(graph, add, torch.ops.lemo.scatter_add_rows.default, (other, idx, rows))
                count("folded_zero_scatter")
            else:
                _replace(graph, node, torch.ops.lemo.scatter_add_rows.default, (x, idx, rows))
                count("fused_scatter_add")
    graph.eliminate_dead_code()
    return counters


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_lemo(node: fx.Node, role: Role | None = None) -> bool:
    found = role_of(node)
    return found is not None and (role is None or found is role)


def _token_index(node: fx.Node) -> fx.Node | None:
    """idx [B, K] when node is a lemo gather / scatter-add along dim 1 of a [B, S, D] tensor whose
    index is idx expanded over D; else None."""
    if not _is_lemo(node) or len(node.args) < 3 or node.args[1] != 1 or node.kwargs:
        return None
    x, index = node.args[0], node.args[2]
    x_val, index_val = _val(x), _val(index)
    if x_val is None or index_val is None or x_val.dim() != 3 or index_val.dim() != 3:
        return None
    if index.target is not aten.expand.default or index_val.shape[2] != x_val.shape[2]:
        return None
    source = index.args[0]
    if source.target is aten.unsqueeze.default and source.args[1] in (2, -1):
        idx = source.args[0]
    elif source.target in (aten.view.default, aten.reshape.default):
        idx = source.args[0]
    else:
        return None
    idx_val = _val(idx)
    if (
        not isinstance(idx, fx.Node)
        or not (_is_lemo(idx, Role.SELECT) or _is_lemo(idx, Role.MLP_SELECT))
        or idx_val is None
        or idx_val.dtype != torch.int64
        or tuple(idx_val.shape) != tuple(index_val.shape[:2])
        or x_val.shape[0] not in (1, idx_val.shape[0])
    ):
        return None
    return idx


def _replace(graph: fx.Graph, node: fx.Node, op, args: tuple) -> fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(op, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _zero_fold_target(scatter: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(add node, g) when scatter adds into a zero buffer whose only use is `g + scatter`."""
    zeros = scatter.args[0]
    if not _is_zeros(zeros) or len(scatter.users) != 1:
        return None
    (add,) = scatter.users
    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is scatter else add.args[0]
    other_val, add_val = _val(other), _val(add)
    if other is scatter or other_val is None or add_val is None:
        return None
    if other_val.shape != add_val.shape or other_val.dtype != add_val.dtype:
        return None
    return add, other


def _is_zeros(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.target is aten.full.default:
        return node.args[1] == 0
    return node.target is aten.zeros.default


def _single_user(node: fx.Node, target, predicate=lambda user: True) -> fx.Node | None:
    users = [u for u in node.users if u.target is target and predicate(u)]
    return users[0] if len(users) == 1 else None


def _fuse_gather_norm(graph: fx.Graph, gather: fx.Node) -> bool:
    """Rewrite gather + `weight * (h * rsqrt(mean(h ** 2) + eps)).to(dtype)`, h = rows.float()."""
    x_val = _val(gather)
    width = x_val.shape[2]
    h = _float_rows(gather)
    square = h and _single_user(h, aten.pow.Tensor_Scalar, lambda u: u.args[1] == 2)
    mean = square and _only_user(square, aten.mean.dim)
    if mean is None or list(mean.args[1]) not in ([-1], [2]) or not _keepdim(mean):
        return False
    plus_eps = _only_user(mean, aten.add.Tensor)
    if plus_eps is None or not isinstance(plus_eps.args[1], float):
        return False
    rstd = _only_user(plus_eps, aten.rsqrt.default)
    normed = rstd and _single_user(rstd, aten.mul.Tensor, lambda u: h in u.args)
    if normed is None:
        return False
    scaled_input = _cast_back(normed, x_val.dtype)
    if scaled_input is None:
        return False
    weight_mul = _single_user(
        scaled_input, aten.mul.Tensor, lambda u: _is_weight(u, scaled_input, width)
    )
    if weight_mul is None:
        return False
    weight = weight_mul.args[0] if weight_mul.args[1] is scaled_input else weight_mul.args[1]

    return _substitute(graph, gather, torch.ops.lemo.gather_rms_norm.default,
                       (gather.args[0], _token_index(gather), weight, plus_eps.args[1]),
                       (weight_mul, gather, rstd),
                       (weight_mul, scaled_input, normed, rstd, plus_eps, mean, square, h, gather))


def _fuse_gather_layer_norm(graph: fx.Graph, gather: fx.Node) -> bool:
    """Rewrite gather + `((h - mean) * rsqrt(var + eps) * weight + bias).to(dtype)`, where
    var, mean = var_mean(h, -1, correction=0, keepdim=True), h = rows.float(); the rows may be
    viewed as [B * K, D] first (OPT's MLP blocks), and the fused outputs are then viewed so too."""
    x_val = _val(gather)
    width = x_val.shape[2]
    flat = [u for u in gather.users if u.target in _VIEWS and len(_val(u).shape) == 2]
    rows = flat[0] if len(flat) == 1 else gather
    h = _float_rows(rows)
    var_mean = h and _single_user(h, aten.var_mean.correction, lambda u: (
        list(u.args[1]) in ([-1], [_val(h).dim() - 1]) and u.kwargs.get("correction") == 0
        and u.kwargs.get("keepdim") is True))
    if var_mean is None:
        return False
    parts = {u.args[1]: u for u in var_mean.users if u.target is operator.getitem}
    if set(parts) != {0, 1}:
        return False
    var, mean = parts[0], parts[1]
    plus_eps = _only_user(var, aten.add.Tensor)
    if plus_eps is None or not isinstance(plus_eps.args[1], float):
        return False
    rstd = _only_user(plus_eps, aten.rsqrt.default)
    centred = rstd and _single_user(h, aten.sub.Tensor, lambda u: tuple(u.args) == (h, mean))
    normed = centred and _single_user(centred, aten.mul.Tensor, lambda u: rstd in u.args)
    weight_mul = normed and _single_user(
        normed, aten.mul.Tensor, lambda u: _is_weight(u, normed, width))
    bias_add = weight_mul and _single_user(
        weight_mul, aten.add.Tensor, lambda u: _is_weight(u, weight_mul, width))
    if bias_add is None:
        return False
    output = _cast_back(bias_add, x_val.dtype)
    if output is None:
        return False
    weight = weight_mul.args[0] if weight_mul.args[1] is normed else weight_mul.args[1]
    bias = bias_add.args[0] if bias_add.args[1] is weight_mul else bias_add.args[1]

    return _substitute(graph, gather, torch.ops.lemo.gather_layer_norm.default,
                       (gather.args[0], _token_index(gather), weight, bias, plus_eps.args[1]),
                       (output, rows, mean, rstd),
                       (output, bias_add, weight_mul, normed, centred, rstd, plus_eps, var, mean,
                        var_mean, h, rows, gather))


def _float_rows(gather: fx.Node) -> fx.Node | None:
    """h, the gathered rows in float32: the gather itself (fp32 models) or its one fp32 copy."""
    if _val(gather).dtype == torch.float32:
        return gather
    return _single_user(gather, torch.ops.prims.convert_element_type.default,
                        lambda u: u.args[1] == torch.float32)


def _cast_back(node: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    """`node` (float32) as the model's dtype: itself for float32 models, else its one cast."""
    if dtype == torch.float32:
        return node
    return _single_user(node, torch.ops.prims.convert_element_type.default,
                        lambda u: u.args[1] == dtype)


def _substitute(graph: fx.Graph, gather: fx.Node, op, args: tuple, originals: tuple,
                chain: tuple) -> bool:
    """Insert op(*args) before `gather`; its outputs, in order, replace `originals`. The op's
    outputs are [B, K, ...] like the gather; an original viewed as [B * K, ...] is replaced by
    the same view of its output. The nodes of `chain` that nothing reads any more are erased;
    those still read (what the backward saves) now compute from the fused outputs. False (and
    the graph unchanged but for pure nodes moved earlier) when an argument cannot be computed
    before the gather."""
    if not all(_hoist(arg, gather) for arg in args if isinstance(arg, fx.Node)):
        return False
    leading = tuple(_val(gather).shape[:2])
    vals = [_val(n) if tuple(_val(n).shape[:2]) == leading
            else _val(n).view(*leading, *_val(n).shape[1:]) for n in originals]
    with graph.inserting_before(gather):
        fused = graph.call_function(op, args)
        outputs = [graph.call_function(operator.getitem, (fused, i)) for i in range(len(originals))]
        for i, (val, original) in enumerate(zip(vals, originals, strict=True)):
            outputs[i].meta["val"] = val
            if val.shape != _val(original).shape:
                outputs[i] = graph.call_function(aten.view.default,
                                                 (outputs[i], list(_val(original).shape)))
    fused.meta.update(gather.meta)
    fused.meta["val"] = tuple(vals)
    for new, original in zip(outputs, originals, strict=True):
        new.meta.update(original.meta)
        original.replace_all_uses_with(new)
    for node in dict.fromkeys(chain):  # h is the gather itself in fp32 models
        if not node.users:
            graph.erase_node(node)
    return True


def _hoist(node: fx.Node, before: fx.Node) -> bool:
    """Make `node` come before `before`, moving it and what it is computed from if they come later:
    a norm weight computed in the graph (Gemma's `1 + weight`) can follow the gather, where the
    partitioner reorders a recomputed checkpoint body. Only pure calls move; False (nothing moved)
    when another node would have to."""
    order = {n: i for i, n in enumerate(before.graph.nodes)}
    later: list[fx.Node] = []  # to move, inputs first

    def visit(n: fx.Node) -> bool:
        if order[n] < order[before] or n in later:
            return True
        if (n is before or n.op != "call_function" or n.is_impure()
                or not all(map(visit, n.all_input_nodes))):
            return False
        later.append(n)
        return True

    if not visit(node):
        return False
    for n in later:
        before.prepend(n)
    return True


def _only_user(node: fx.Node, target) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if user.target is target else None


def _keepdim(mean: fx.Node) -> bool:
    return bool(mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))


def _is_weight(mul: fx.Node, scaled_input: fx.Node, width: int) -> bool:
    if len(mul.args) != 2:
        return False
    weight = mul.args[0] if mul.args[1] is scaled_input else mul.args[1]
    weight_val = _val(weight)
    return weight_val is not None and tuple(weight_val.shape) == (width,)
