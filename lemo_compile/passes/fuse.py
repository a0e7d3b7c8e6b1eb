"""Post-grad fusion: the row movements that token selection leaves -> lemo's fused row ops.

IR: Inductor's post-grad graphs, forward and backward separately: functional aten ops after
Inductor's decompositions, every node with `meta["val"]`, the graph a GraphModule's (the pattern
matcher's need). Token selection (`select.py`) inserts plain gathers and a scatter-add per sparse
block on the Dynamo graph; AOTAutograd turns them, and their gradients, into these chains (B batch,
S tokens, K kept, D width, idx [B, K] from `select_tokens`):

    forward   aten.gather(x, 1, expand(idx[:, :, None], [B, K, D]))  + Hugging Face RMSNorm after it
              aten.scatter_add(x, 1, expand(idx...), rows)           the residual add
    backward  aten.gather(g, 1, expand(idx...))                     the gradient of the block output
              aten.add(g, aten.scatter_add(zeros, 1, expand(idx...), d_rows))
                                                                    a zero-padded [B, S, D] buffer

Matching uses Inductor's pattern matcher, with patterns traced from the pure-torch chains below
(`_rms_norm`, `_layer_norm`, ...) through Inductor's decompositions: one per dtype variant (float32
models have no casts; narrower ones cast the rows to float32 and the result back) and per form (the
side the norm's weight is on; rows viewed as [B * K, D] through a view, or through the reshape that
Inductor makes of every view before its post-grad passes: compiler="aot_eager" and `explain` run
this pass on AOTAutograd's graphs, which keep views). The traced patterns leave ints, floats, lists
and dtypes open; the checks pin those the chains state, and that the index is lemo's
(`_token_index`). The nodes of a norm chain may have readers outside it (what the backward saves):
they then read the fused op's outputs, or compute from them.

Rewrites, in this order (each counted in `counters` under its name):

* `fused_gather_norm`: the gather and the RMSNorm chain that reads it (the weight multiplied on
  either side: Gemma's is `normed * (1 + weight)`) -> `lemo.gather_rms_norm`, whose outputs stand
  in for the norm's output, the gathered rows and 1/rms (the last two are what the norm's backward
  reads); the gather and the LayerNorm chain that reads it (OPT; Inductor's decomposition:
  var_mean, rsqrt, (h - mean) * rstd * weight + bias; the rows may be viewed as [B * K, D] first,
  as in OPT's MLP blocks) -> `lemo.gather_layer_norm`, whose outputs stand in for the output, the
  rows, the mean and 1/std.
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

import functools
import operator

import torch
from torch import fx
from torch._inductor import pattern_matcher as pm
from torch._inductor.fx_passes.post_grad import view_to_reshape

from lemo_compile.fx_utils import any_readers, insert_post_grad_call
from lemo_compile.tags import Role, role_of

aten = torch.ops.aten
prims = torch.ops.prims

# the norms' eps when traced: the pattern matcher turns this constant into the handler's `eps`
_TRACED_EPS = 1e-6


def fuse_row_movements(graph: fx.Graph, counters: dict[str, int] | None = None) -> dict[str, int]:
    """Apply the rewrites above to `graph` in place; add their counts to `counters`, return it."""
    counters = counters if counters is not None else {}
    for name, patterns in _rewrites():
        made = patterns.apply(graph)
        if made:
            counters[name] = counters.get(name, 0) + made
    graph.eliminate_dead_code()
    return counters


# ----------------------------------------------------------------- the chains, as torch states them


def _gather(x, index):
    return x.gather(1, index)


def _scatter_add(x, index, rows):
    return x.scatter_add(1, index, rows)


def _g_plus_zero_scatter(g, zeros, index, rows):
    return g + zeros.scatter_add(1, index, rows)


def _zero_scatter_plus_g(g, zeros, index, rows):
    return zeros.scatter_add(1, index, rows) + g


def _rms_norm(x, index, weight, eps):
    """Hugging Face's RMSNorm of the gathered rows: (output, rows, 1/rms)."""
    rows = x.gather(1, index)
    normed, rstd = _rms_normed(rows, eps)
    return weight * normed, rows, rstd


def _rms_norm_weight_last(x, index, weight, eps):
    """The same with the weight multiplied on the right (Gemma's `normed * (1 + weight)`)."""
    rows = x.gather(1, index)
    normed, rstd = _rms_normed(rows, eps)
    return normed * weight, rows, rstd


def _rms_normed(rows, eps):
    h = rows.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * rstd).to(rows.dtype), rstd


def _layer_norm(x, index, weight, bias, eps):
    """A LayerNorm of the gathered rows as Inductor decomposes it: (output, rows, mean, 1/std)."""
    return _layer_norm_of(x.gather(1, index), weight, bias, eps)


def _flat_layer_norm(x, index, weight, bias, eps):
    """The same of the rows viewed as [B * K, D] (OPT's MLP blocks)."""
    return _layer_norm_of(x.gather(1, index).view(-1, x.shape[2]), weight, bias, eps)


def _layer_norm_of(rows, weight, bias, eps):
    h = rows.float()
    var, mean = torch.var_mean(h, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return ((h - mean) * rstd * weight + bias).to(rows.dtype), rows, mean, rstd


@functools.cache
def _rewrites() -> tuple[tuple[str, pm.PatternMatcherPass], ...]:
    """Each rewrite's name and the pass holding its patterns, in the order they apply (traced
    once)."""
    norms, gathers, folds, scatters = (pm.PatternMatcherPass() for _ in range(4))
    # the example inputs are distinct tensors: make_fx traces a tensor passed twice as one input
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16 stands for any narrower dtype
        x, index = torch.empty(2, 8, 4, dtype=dtype), torch.zeros(2, 3, 4, dtype=torch.int64)
        weight, bias = torch.empty(4, dtype=dtype), torch.empty(4, dtype=dtype)
        rms_inputs, layer_norm_inputs = (x, index, weight), (x, index, weight, bias)
        check = functools.partial(_is_fusable_norm, casts=dtype != torch.float32)
        for chain, inputs, fuse, trace in (
                (_rms_norm, rms_inputs, _fuse_rms_norm, pm.fwd_only),
                (_rms_norm_weight_last, rms_inputs, _fuse_rms_norm, pm.fwd_only),
                (_layer_norm, layer_norm_inputs, _fuse_layer_norm, pm.fwd_only),
                (_flat_layer_norm, layer_norm_inputs, _fuse_layer_norm, pm.fwd_only),
                (_flat_layer_norm, layer_norm_inputs, _fuse_layer_norm, _fwd_only_with_reshapes)):
            pattern = pm.gen_pattern(chain, inputs, trace, scalar_workaround={"eps": _TRACED_EPS})
            pm.register_graph_pattern(any_readers(pattern), extra_check=check,
                                      pass_dict=norms)(fuse)
    x, zeros, rows = torch.empty(2, 8, 4), torch.empty(2, 8, 4), torch.empty(2, 3, 4)
    index = torch.zeros(2, 3, 4, dtype=torch.int64)
    pm.register_graph_pattern(pm.gen_pattern(_gather, (x, index), pm.fwd_only),
                              extra_check=_reads_token_index, pass_dict=gathers)(_rewrite_gather)
    for chain in (_g_plus_zero_scatter, _zero_scatter_plus_g):
        # not any_readers: the scatter-add is folded only when the add is its one reader
        pm.register_graph_pattern(pm.gen_pattern(chain, (x, zeros, index, rows), pm.fwd_only),
                                  extra_check=_is_zero_fold, pass_dict=folds)(_fold_zero_scatter)
    pm.register_graph_pattern(pm.gen_pattern(_scatter_add, (x, index, rows), pm.fwd_only),
                              extra_check=_reads_token_index, pass_dict=scatters)(_rewrite_scatter)
    return (("fused_gather_norm", norms), ("fused_gather", gathers),
            ("folded_zero_scatter", folds), ("fused_scatter_add", scatters))


def _fwd_only_with_reshapes(fn, args, **kwargs) -> fx.GraphModule:
    """`pm.fwd_only`'s graph with its views made reshapes, as Inductor makes them before its
    post-grad passes (the AOTAutograd graphs that compiler="aot_eager" and explain fuse keep
    views)."""
    graph_module = pm.fwd_only(fn, args, **kwargs)
    view_to_reshape(graph_module)
    return graph_module


# ------------------------------------------------------------------------------------- the checks


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


def _reads_token_index(match: pm.Match) -> bool:
    """Whether the matched gather / scatter-add is indexed by lemo's selection."""
    return _token_index(match.output_node()) is not None


def _is_zero_fold(match: pm.Match) -> bool:
    """Whether the matched `g + scatter_add(zeros, ...)` can be the scatter-add into g: lemo's
    selection indexes it, the buffer is zeros and g has the sum's shape and dtype."""
    add, g = match.output_node(), match.kwargs["g"]
    g_val, add_val = _val(g), _val(add)
    return (
        _token_index(_matched(match, aten.scatter_add.default)) is not None
        and _is_zeros(match.kwargs["zeros"])
        and not add.kwargs  # an alpha would scale the scatter-add
        and g_val is not None and add_val is not None
        and g_val.shape == add_val.shape and g_val.dtype == add_val.dtype
    )


def _is_zeros(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.target is aten.full.default:
        return node.args[1] == 0
    return node.target is aten.zeros.default


def _is_fusable_norm(match: pm.Match, casts: bool) -> bool:
    """Whether a matched gather + norm is fused: lemo's selection indexes the gather, the rows are
    float32 exactly when the chain has no casts, the constants the pattern leaves open are the
    chain's, and the weight (and bias) are [D] tensors computable before the gather."""
    gather, rows = _matched(match, aten.gather.default), match.output_nodes()[1]
    width = _val(gather).shape[2]
    params = [match.kwargs[name] for name in ("weight", "bias") if name in match.kwargs]
    return (
        _token_index(gather) is not None
        and (_val(rows).dtype != torch.float32) == casts
        and isinstance(match.kwargs["eps"], float)
        and all(_states_constants(node, rows) for node in match.nodes)
        and all(_val(p) is not None and tuple(_val(p).shape) == (width,)
                and _to_move(p, gather) is not None for p in params)
    )


def _states_constants(node: fx.Node, rows: fx.Node) -> bool:
    """Whether a node of a matched norm chain has the constants that the chain states and that its
    traced pattern leaves open."""
    if node.target is prims.convert_element_type.default:  # the rows to float32, the output back
        return _val(node).dtype == (torch.float32 if node.args[0] is rows else _val(rows).dtype)
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[1] == 2
    if node.target is aten.mean.dim:
        return _over_last_dim(node)
    if node.target is aten.var_mean.correction:
        return _over_last_dim(node) and node.kwargs.get("correction") == 0
    if node.target in (aten.view.default, aten.reshape.default):  # the rows as [B * K, D]
        return _val(node).dim() == 2
    return True


def _over_last_dim(reduction: fx.Node) -> bool:
    dims = reduction.args[1]
    return dims is not None and list(dims) in ([-1], [_val(reduction.args[0]).dim() - 1])


def _matched(match: pm.Match, target) -> fx.Node:
    """The match's node that calls `target` (the patterns call each of these once)."""
    return next(node for node in match.nodes if node.target is target)


def _to_move(node: fx.Node, before: fx.Node) -> list[fx.Node] | None:
    """The nodes to move before `before` so that `node` is computed before it: `node` and what it is
    computed from that comes later, inputs first (a norm weight computed in the graph, Gemma's
    `1 + weight`, can follow the gather where the partitioner reorders a recomputed checkpoint
    body). None when one of them is not a pure call, or is `before` itself."""
    later: list[fx.Node] = []

    def visit(n: fx.Node) -> bool:
        if n < before or n in later:  # fx nodes compare by their position in the graph
            return True
        if (n is before or n.op != "call_function" or n.is_impure()
                or not all(map(visit, n.all_input_nodes))):
            return False
        later.append(n)
        return True

    return later if visit(node) else None


# ----------------------------------------------------------------------------------- the rewrites


def _fuse_rms_norm(match: pm.Match, x: fx.Node, index: fx.Node, weight: fx.Node,
                   eps: float) -> None:
    gather = _matched(match, aten.gather.default)
    _substitute(match, torch.ops.lemo.gather_rms_norm.default,
                (x, _token_index(gather), weight, eps), (weight,))


def _fuse_layer_norm(match: pm.Match, x: fx.Node, index: fx.Node, weight: fx.Node,
                     bias: fx.Node, eps: float) -> None:
    gather = _matched(match, aten.gather.default)
    _substitute(match, torch.ops.lemo.gather_layer_norm.default,
                (x, _token_index(gather), weight, bias, eps), (weight, bias))


def _substitute(match: pm.Match, op, args: tuple, params: tuple[fx.Node, ...]) -> None:
    """Insert op(*args) before the match's gather, after moving `params` (the norm's weight and
    bias) there if they came later; its outputs, in order, replace the match's outputs. The op's
    outputs are [B, K, ...] like the gather; an output viewed as [B * K, ...] is replaced by the
    same view of the op's. The matched nodes that nothing reads any more are erased; those still
    read (what the backward saves) now compute from the fused outputs."""
    graph = match.graph
    gather = _matched(match, aten.gather.default)
    for param in params:  # each after the last has moved: the two may share what they move
        for node in _to_move(param, gather):
            gather.prepend(node)
    with graph.inserting_before(gather):
        fused = insert_post_grad_call(graph, op, args, like=gather)
        for index, original in enumerate(match.output_nodes()):
            output = insert_post_grad_call(graph, operator.getitem, (fused, index), like=original)
            shape = _val(original).shape
            if _val(output).shape != shape:
                output = insert_post_grad_call(graph, aten.view.default, (output, list(shape)),
                                               like=original)
            original.replace_all_uses_with(output)
    match.erase_nodes()


def _rewrite_gather(match: pm.Match, x: fx.Node, index: fx.Node) -> None:
    gather = match.output_node()
    gather.replace_all_uses_with(insert_post_grad_call(
        match.graph, torch.ops.lemo.gather_rows.default, (x, _token_index(gather)), like=gather))
    match.erase_nodes()


def _fold_zero_scatter(match: pm.Match, g: fx.Node, zeros: fx.Node, index: fx.Node,
                       rows: fx.Node) -> None:
    add, idx = match.output_node(), _token_index(_matched(match, aten.scatter_add.default))
    add.replace_all_uses_with(insert_post_grad_call(
        match.graph, torch.ops.lemo.scatter_add_rows.default, (g, idx, rows), like=add))
    match.erase_nodes()


def _rewrite_scatter(match: pm.Match, x: fx.Node, index: fx.Node, rows: fx.Node) -> None:
    scatter = match.output_node()
    scatter.replace_all_uses_with(insert_post_grad_call(
        match.graph, torch.ops.lemo.scatter_add_rows.default, (x, _token_index(scatter), rows),
        like=scatter))
    match.erase_nodes()
