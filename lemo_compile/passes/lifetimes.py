"""Shorter lifetimes for wide values in backward graphs: the copies dtype casts make, and the terms
of gradient sums.

IR: Inductor's post-grad backward graph (functional aten ops after Inductor's decompositions, every
node with `meta["val"]`); forward graphs are left as they are.

Why: with PEFT's adapters kept in float32 on a bfloat16 model (its default), every adapted
projection casts its bfloat16 input to float32 for the adapter and narrows the adapter's float32
output back. Under activation checkpointing the backward graph recomputes a layer's forward and
then runs its backward, and Inductor keeps those float32 copies alive across the whole layer
(S x hidden x 4 bytes each, 1 GiB at 64K tokens and hidden 4096): a cast read by several matmuls
is computed once and held until its last reader (the adapter's weight gradient, after the MLP's
backward); a narrowed adapter output is inlined into its readers (the residual add, the next
norm and that norm's backward), which keeps the float32 matmul output alive until the last one.

Rewrites (counted in `counters` under their names):

* `split_widening_casts`: a widening float cast (e.g. bfloat16 -> float32) read by matmuls far
  apart (the adapter's forward in the recomputation, its weight gradient at the end of the layer)
  gets one copy per group of nearby matmuls, made just before the group; the narrower input is
  what stays alive in between (half the bytes). A late copy reads the value the cast's input is
  a layout of (views, permutes, contiguous copies: attention's output, which its backward keeps
  anyway, rather than the contiguous copy made for the o projection) and redoes the layout ops
  after the cast.
* `materialized_narrowing_casts`: a narrowing float cast (e.g. float32 -> bfloat16) of a value that
  pointwise ops compute from a float32 matmul output, when kernels far apart would each compute it
  inline (the o adapter's output: the norm after it and that norm's backward), is wrapped in
  `lemo.materialize`, so it is computed once into a narrow buffer and the matmul output is freed
  there. Narrowed values that a matmul or attention reads soon (the q/k/v adapters' outputs) are
  stored by Inductor anyway and left alone: storing them ourselves changed the layout Inductor
  chose for the recomputed attention's query, which cuDNN then refused.
* `ordered_gradient_sums`: a value read by several matmuls in the forward (a norm's output, read
  by the q/k/v projections and their adapters) gets its gradient as a sum of matmul outputs (six
  at a LoRA-adapted attention input, three of them float32 from the adapters). Inductor computes
  the whole sum inside the kernel that reads it (the norm's backward), so every term is alive
  until the last is computed: at 64K tokens 3 x 1 GiB float32 and 3 x 0.5 GiB bf16. Each partial
  sum that the next addition reads becomes `lemo.add_now`, an opaque addition Inductor runs where
  it stands (it would fuse a materialised one back into the reader), so the terms are added as
  they come, as eager autograd accumulates gradients, and each dies at its addition.

Promise: the values are those the graph defines (each copy computes the same cast of the same
input; a materialised value is the cast's value; `lemo.add_now` adds what the addition added), so
without code generation gradients are bit for bit the same; under Inductor a materialised value
or a partial sum is rounded to its dtype where a fused kernel may have kept it in float32
(Inductor does not round intermediates by default), a difference of bf16 rounding, as in eager
autograd. Only where buffers are allocated and freed changes otherwise.
"""

from __future__ import annotations

import torch
from torch import fx

from lemo_compile.fx_utils import insert_post_grad_call, is_backward_graph

aten, prims = torch.ops.aten, torch.ops.prims

_CAST = prims.convert_element_type.default
_MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)
# ops through which a narrowing cast's input is followed back to a matmul output: elementwise
# arithmetic and views (what PEFT's `result + lora_B(...) * scaling` decomposes into)
_POINTWISE = (aten.add.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.add.Scalar, aten.sub.Tensor,
              aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.rsqrt.default,
              aten.neg.default, _CAST, aten.view.default,
              aten._unsafe_view.default, aten.reshape.default, aten.expand.default)
# "near" in graph order: matmuls this close share one copy of a cast (Inductor fuses pointwise
# kernels up to 64 of its scheduler nodes apart, and graph nodes are at least as many: nearby
# copies would be made by one kernel and be live at once), and readers of a narrowed value this
# close keep its float32 source alive only briefly
_NEAR = 64
_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.var_mean.correction)
_LAYOUT = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
           aten.transpose.int, aten.clone.default)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
          aten.t.default, aten.expand.default)


def shorten_cast_lifetimes(graph: fx.Graph,
                           counters: dict[str, int] | None = None) -> dict[str, int]:
    """Apply the rewrites above to `graph` in place if it is a backward graph (it reads tangents);
    add their counts to `counters`, return it."""
    counters = counters if counters is not None else {}
    if not is_backward_graph(graph):
        return counters

    def count(name: str, made: int = 1) -> None:
        if made:
            counters[name] = counters.get(name, 0) + made

    order = {node: index for index, node in enumerate(graph.nodes)}
    for cast in list(graph.find_nodes(op="call_function", target=_CAST)):
        if _widens(cast):
            count("split_widening_casts", _split(graph, cast, order))
    order = {node: index for index, node in enumerate(graph.nodes)}
    for cast in list(graph.find_nodes(op="call_function", target=_CAST)):
        if (_narrows(cast) and _reads_float_matmul(cast.args[0])
                and _inlined_span(cast, order) > _NEAR):
            _materialize(graph, cast)
            count("materialized_narrowing_casts")
    partial = [add for add in graph.find_nodes(op="call_function", target=aten.add.Tensor)
               if _sums_matmuls(add) and any(_sums_matmuls(user) for user in add.users)
               and _same_layout(*add.args)]
    for add in partial:
        with graph.inserting_before(add):
            now = insert_post_grad_call(graph, torch.ops.lemo.add_now.default, tuple(add.args),
                                       like=add)
        add.replace_all_uses_with(now)
        graph.erase_node(add)
    count("ordered_gradient_sums", len(partial))
    return counters


def _dtypes(cast: fx.Node) -> tuple[torch.dtype, torch.dtype] | None:
    source, result = cast.args[0], cast.meta.get("val")
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(result, torch.Tensor):
        return None
    if not (value.dtype.is_floating_point and result.dtype.is_floating_point):
        return None
    return value.dtype, result.dtype


def _widens(cast: fx.Node) -> bool:
    dtypes = _dtypes(cast)
    return dtypes is not None and dtypes[0].itemsize < dtypes[1].itemsize


def _narrows(cast: fx.Node) -> bool:
    dtypes = _dtypes(cast)
    return dtypes is not None and dtypes[0].itemsize > dtypes[1].itemsize


def _split(graph: fx.Graph, cast: fx.Node, order: dict[fx.Node, int]) -> int:
    """Group the matmuls that read `cast` (directly or through views) by nearness in graph order;
    give each group but the first its own copy of the cast (`lemo.late_cast`, which Inductor
    cannot fuse back into the kernel that computes the cast's input), made just before the
    group's first matmul, and its own copies of the views; return the copies of the cast made."""
    groups: list[list[tuple[fx.Node, list[fx.Node]]]] = []
    for read in sorted(_matmul_reads(cast), key=lambda read: order[read[0]]):
        if groups and order[read[0]] - order[groups[-1][0][0]] <= _NEAR:
            groups[-1].append(read)
        else:
            groups.append([read])
    source, layout = _layout_source(cast.args[0])
    for group in groups[1:]:
        with graph.inserting_before(group[0][0]):
            copy = insert_post_grad_call(graph, torch.ops.lemo.late_cast.default,
                                         (source, cast.args[1]), like=cast)
            for view in layout:
                copy = insert_post_grad_call(graph, view.target, (copy, *view.args[1:]),
                                             view.kwargs, like=view)
        for matmul, path in group:
            viewed = copy
            with graph.inserting_before(matmul):
                for view in path[1:]:
                    viewed = insert_post_grad_call(graph, view.target, (viewed, *view.args[1:]),
                                                   view.kwargs, like=view)
            matmul.replace_input_with(path[-1], viewed)
    return max(len(groups) - 1, 0)


def _layout_source(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(source, [op, ...]): the value `node` is made from by layout ops only (views, permutes,
    reshapes, contiguous copies), and those ops in order. A late cast reads the source and
    re-applies them: the source (e.g. attention's output, kept for attention's backward) is alive
    anyway, while a contiguous copy of it made for an early reader would be kept alive for the
    late one."""
    layout = []
    while node.target in _LAYOUT and isinstance(node.args[0], fx.Node):
        layout.append(node)
        node = node.args[0]
    return node, layout[::-1]


def _matmul_reads(cast: fx.Node) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(matmul, [cast, view, ...]) for each matmul that reads `cast` through the views listed."""
    reads = []
    stack = [[cast]]
    while stack:
        path = stack.pop()
        for user in path[-1].users:
            if user.target in _MATMULS and all(user is not read for read, _ in reads):
                reads.append((user, path))
            elif user.target in _VIEWS and user.args[0] is path[-1]:
                stack.append([*path, user])
    return reads


def _reads_float_matmul(node: fx.Node) -> bool:
    """True when `node` is, or is computed by the ops of `_POINTWISE` from, a float32 matmul
    output."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in _MATMULS:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                return True
        elif node.target in _POINTWISE:
            stack.extend(node.args)
    return False


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    """Whether a and b have one shape and dtype (what `lemo.add_now` adds)."""
    a, b = a.meta.get("val"), b.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype)


def _sums_matmuls(node: fx.Node) -> bool:
    """True when `node` adds matmul outputs (through views and float casts) or such sums."""
    if node.target is not aten.add.Tensor or len(node.args) != 2:
        return False
    return all(isinstance(term, fx.Node) and (_is_matmul_output(term) or _sums_matmuls(term))
               for term in node.args)


def _is_matmul_output(node: fx.Node) -> bool:
    """True when `node` is a matmul's output, through views, float casts and materialisations."""
    while (node.target in _VIEWS + (_CAST, torch.ops.lemo.materialize.default)
           and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node.target in _MATMULS


def _inlined_span(node: fx.Node, order: dict[fx.Node, int]) -> int:
    """How far apart, in graph order, the readers are that would compute `node` inside their own
    kernels: node's readers, and through pointwise readers theirs, up to values that Inductor
    stores anyway (those read by an op that is neither pointwise nor a reduction, e.g. a matmul
    or attention): their readers read the stored value."""
    first = last = order[node]
    seen = {node}
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            first, last = min(first, order[user]), max(last, order[user])
            stored = any(reader.target not in _POINTWISE + _REDUCTIONS for reader in user.users)
            if user.target in _POINTWISE and not stored:
                stack.append(user)
    return last - first


def _materialize(graph: fx.Graph, cast: fx.Node) -> None:
    with graph.inserting_after(cast):
        held = graph.call_function(torch.ops.lemo.materialize.default, (cast,))
    held.meta.update(cast.meta)
    cast.replace_all_uses_with(held, delete_user_cb=lambda user: user is not held)
