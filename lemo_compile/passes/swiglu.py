"""The SwiGLU MLP's backward written over its inputs, in backward graphs.

IR: Inductor's post-grad backward graph (functional aten ops after Inductor's decompositions, every
node with `meta["val"]`); forward graphs are left as they are. Matching uses Inductor's pattern
matcher, with patterns traced from `silu` and `silu_backward` through the same decompositions, so
they follow what the installed torch produces.

Why: the backward of `down(silu(gate) * up)` computes d_gate and d_up from gate, up and the
gradient of the product, all [S, I] (I = 14336 at Llama-3-8B's shape: 1.9 GB each at 64K tokens in
bf16). Inductor fuses both into one kernel and writes one output over a dead input only; the other
is a new buffer, so four such tensors are alive at once. Under activation checkpointing this is the
peak of a layer's backward. `lemo.swiglu_backward_` writes d_gate over gate and d_up over up:
three.

Rewrite (counted in `counters` as `swiglu_backward_in_place`): the pattern's two outputs become
the results of `auto_functionalized(lemo.swiglu_backward_, gate, up, grad)`, inserted before their
first reader. Inductor's re-inplacing pass (which runs after this one) then calls the op on gate's
and up's own buffers. The rewrite is made only where that is safe and certain: gate and up are
computed in this graph (not graph inputs such as saved activations, which Inductor would copy
first) and nothing reads them, or a view of them, after the op.

Promise: the same formula with the same roundings to the inputs' dtype as the decomposed graph
(`kernels/swiglu.py`); a fused Inductor kernel may skip the intermediate roundings, a difference of
one rounding of the inputs' dtype.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch._inductor import pattern_matcher as pm

from lemo_compile.fx_utils import any_readers, insert_post_grad_call, is_backward_graph

aten = torch.ops.aten

# ops whose result shares its input's storage (what "a view of gate" follows)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.permute.default, aten.t.default, aten.expand.default, aten.slice.Tensor,
          aten.squeeze.dim, aten.unsqueeze.default, aten.alias.default)


def swiglu_backward_in_place(graph: fx.Graph,
                             counters: dict[str, int] | None = None) -> dict[str, int]:
    """Apply the rewrite above to `graph` in place if it is a backward graph (it reads tangents);
    add the count to `counters`, return it."""
    counters = counters if counters is not None else {}
    if is_backward_graph(graph):
        made = _patterns().apply(graph)
        if made:
            counters["swiglu_backward_in_place"] = counters.get("swiglu_backward_in_place", 0) + made
    return counters


def _swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """(d gate, d up) as autograd computes them for `silu(gate) * up` (HF's MLP): silu in float32,
    `grad * up` in gate's dtype."""
    gate32 = gate.float()
    d_up = grad * F.silu(gate32).to(gate.dtype)
    d_gate = aten.silu_backward((grad * up).float(), gate32).to(gate.dtype)
    return d_gate, d_up


@functools.cache
def _patterns() -> pm.PatternMatcherPass:
    """The pass holding the patterns: traced once, for float32 (no casts) and for a narrower dtype
    (casts to float32 and back: the pattern's dtype arguments match any dtype; `_safe` checks that
    gate, up, the gradient and both results share one)."""
    patterns = pm.PatternMatcherPass()
    for dtype in (torch.bfloat16, torch.float32):
        example = [torch.empty(2, 4, dtype=dtype) for _ in range(3)]
        # any readers: the last layer's recomputation reads silu(gate) for the layer's output
        # too; `_safe` checks when such readers run
        pattern = any_readers(pm.gen_pattern(_swiglu_backward, example, pm.fwd_only))
        pm.register_graph_pattern(pattern, extra_check=_safe, pass_dict=patterns)(_rewrite)
    return patterns


def _safe(match: pm.Match) -> bool:
    """Whether writing over gate and up at the outputs' first reader is safe and certain (see the
    module docstring), and the values are what the kernel takes."""
    gate, up, grad = (match.kwargs[name] for name in ("gate", "up", "grad"))
    values = [node.meta.get("val") for node in (gate, up, grad, *match.output_nodes())]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return False
    if len({(v.shape, v.dtype, v.device) for v in values}) != 1 or not values[0].is_floating_point():
        return False
    inside = set(match.nodes)
    outputs = match.output_nodes()
    readers = [user for output in outputs for user in output.users]
    if not readers:
        return False
    at = min(readers)  # fx nodes compare by their position in the graph
    if any(user not in inside and user >= at
           for node in inside - set(outputs) for user in node.users):
        return False  # an intermediate value read after the op (which erases what it can)
    if any(node >= at for node in (gate, up, grad)):
        return False
    bases = [_base(node) for node in (gate, up, grad)]
    if len(set(bases)) != 3:
        return False
    return all(_dies_before(base, inside, at) for base in bases[:2])


def _base(node: fx.Node) -> fx.Node:
    while node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _dies_before(base: fx.Node, inside: set[fx.Node], at: fx.Node) -> bool:
    """True when `base` is computed in the graph and every reader of it or of its views, other than
    the match's nodes, comes before node `at`."""
    if base.op != "call_function":
        return False
    storage, stack = {base}, [base]
    while stack:
        for user in stack.pop().users:
            if user.target in _VIEWS and user.args[0] in storage and user not in storage:
                storage.add(user)
                stack.append(user)
    return all(user in storage or user in inside or user < at
               for node in storage for user in node.users)


def _rewrite(match: pm.Match, gate: fx.Node, up: fx.Node, grad: fx.Node) -> None:
    graph = match.graph
    outputs = match.output_nodes()
    first_reader = min(user for output in outputs for user in output.users)
    op = torch.ops.lemo.swiglu_backward_.default
    with graph.inserting_before(first_reader):
        call = insert_post_grad_call(graph, torch.ops.higher_order.auto_functionalized, (op,),
                                     {"gate": gate, "up": up, "grad": grad})
        # its results end with the mutated arguments, in order: (..., d gate, d up)
        first = len(call.meta["val"]) - len(outputs)
        for index, output in enumerate(outputs, start=first):
            output.replace_all_uses_with(
                insert_post_grad_call(graph, operator.getitem, (call, index), like=output))
    match.erase_nodes()
