"""FX helpers shared by the backend, its passes and the tools: graph copies, dotted attribute
access, the fake mode a graph's values live in, node values (`example_value`, `node_shape`,
`evaluate`), the one way a pass inserts a node with its value (`insert_call`, `copy_with_value`;
`insert_post_grad_call` in Inductor's post-grad IR), `any_readers` (traced patterns for Inductor's
pattern matcher), and `compile_apart` (a one-off compile in a frame of its own). Only the insertion
helpers change a graph, and only where the caller says."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._inductor import pattern_matcher as pm
from torch._subclasses.fake_tensor import FakeTensorMode


def own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of gm's graph, keeping what AOTAutograd reads of Dynamo's (node
    metadata, placeholder sources, the parameter source table). The graph modules gm calls
    (activation-checkpoint bodies, which lemo's passes rewrite in place) are copied too, except
    one held by a module the graph also uses itself (`get_attr "a"` and `"a.body"`): the copy
    shares that module with gm, so it cannot hold a body of its own."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for node in graph.find_nodes(op="get_attr"):
        value = get_attribute(copy, node.target)
        parent = node.target.rpartition(".")[0]
        shared = bool(parent) and get_attribute(copy, parent) is get_attribute(gm, parent)
        if isinstance(value, fx.GraphModule) and not shared:
            set_attribute(copy, node.target, own_copy(value))
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def get_attribute(module: torch.nn.Module, target: str):
    """The attribute a `get_attr` node's dotted `target` names in `module`."""
    for name in target.split("."):
        module = getattr(module, name)
    return module


def set_attribute(module: torch.nn.Module, target: str, value) -> None:
    """Set the attribute a dotted `target` names in `module` (its parent modules must exist)."""
    parent, _, last = target.rpartition(".")
    setattr(get_attribute(module, parent) if parent else module, last, value)


def fake_mode_of(gm: fx.GraphModule, example_inputs):
    """The fake mode of the graph's `example_value`s (Dynamo's), which passes must compute in."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode"):
            return value.fake_mode
    mode = detect_fake_mode(example_inputs)
    if mode is None:
        mode = FakeTensorMode()
    return mode


def example_value(node) -> Any:
    """The value recorded for `node` in Dynamo's IR (`meta["example_value"]`: a fake tensor, a tuple
    of them, or a Python value); None for a non-node argument or a node without one."""
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def node_shape(node) -> tuple[int, ...] | None:
    """The shape of `node`'s example value when it is a tensor, else None."""
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def evaluate(node: fx.Node, value_of: Callable[[fx.Node], Any], args: tuple | None = None,
             kwargs: dict | None = None) -> Any:
    """`node`'s target applied to values: each input node n of `args`/`kwargs` (default: the node's
    own) becomes `value_of(n)`. For call_function and call_method nodes; ValueError for others.
    Run it under the graph's fake mode to get a fake value."""
    args, kwargs = fx.node.map_aggregate(
        (node.args if args is None else args, node.kwargs if kwargs is None else kwargs),
        lambda a: value_of(a) if isinstance(a, fx.Node) else a,
    )
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise ValueError(f"cannot evaluate the {node.op} node {node.name}")


def insert_call(graph: fx.Graph, fake_mode, target, args: tuple, kwargs: dict | None = None, *,
                method: bool = False) -> fx.Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point, as a call_function node (a
    call_method node when `method`, `target` then a method name), with its example value computed
    in `fake_mode` from its arguments' example values."""
    insert = graph.call_method if method else graph.call_function
    node = insert(target, args, kwargs)
    with fake_mode:
        node.meta["example_value"] = evaluate(node, example_value)
    return node


def is_backward_graph(graph: fx.Graph) -> bool:
    """Whether an AOTAutograd graph is a backward graph: it reads incoming gradients
    (placeholders named `tangents_*`)."""
    return any(node.name.startswith("tangents") for node in graph.find_nodes(op="placeholder"))


def insert_post_grad_call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, *,
                          like: fx.Node | None = None) -> fx.Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point in Inductor's post-grad IR:
    with `like`'s metadata (stack trace, tags) when given, and `meta["val"]` computed from its
    inputs' `meta["val"]` in their fake mode."""
    node = graph.call_function(target, args, kwargs or {})
    if like is not None:
        node.meta.update(like.meta)
    values = [n.meta["val"] for n in node.all_input_nodes]
    mode = detect_fake_mode(values)
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = evaluate(node, lambda n: n.meta["val"])
    return node


def any_readers(pattern: pm.PatternExpr) -> pm.PatternExpr:
    """Let every node of a traced pattern (`pm.gen_pattern`) have readers outside the match (a
    traced pattern asks for the exact count it had in the traced function); returns `pattern`. The
    caller's `extra_check` or replacement decides what those readers may see."""
    stack = [pattern]
    while stack:
        node = stack.pop()
        if isinstance(node, pm.MultiOutputPattern):
            stack.extend(node.outputs)
        elif isinstance(node, pm.CallFunction):
            node.users = pm.MULTIPLE
            stack.extend(arg for arg in (*node.args, *node.kwargs.values())
                         if isinstance(arg, pm.PatternExpr))
    return pattern


def copy_with_value(graph: fx.Graph, fake_mode, node: fx.Node,
                    env: Mapping[fx.Node, fx.Node]) -> fx.Node:
    """A copy of `node` inserted at the graph's insertion point, reading env's replacements of its
    inputs, with its example value recomputed in `fake_mode`."""
    copy = graph.node_copy(node, lambda n: env.get(n, n))
    with fake_mode:
        copy.meta["example_value"] = evaluate(copy, example_value)
    return copy


def compile_apart(model: torch.nn.Module, backend: Callable) -> Callable[..., Any]:
    """`torch.compile(model, backend=backend, dynamic=False)` for a one-off look at the model
    (calibration, explain), through a frame of its own: Dynamo remembers the sizes each compiled
    frame saw and makes them dynamic when they change, so compiling model.forward itself at these
    lengths would make the user's own training compile, at another length, dynamic (and dense).
    Each call gets a new code object, so that compiled entries never pile up towards Dynamo's
    recompile limit across calls."""
    call = types.FunctionType(_call.__code__.replace(), _call.__globals__, "lemo_call")
    compiled = torch.compile(call, backend=backend, dynamic=False)
    return lambda *args, **kwargs: compiled(model, args, kwargs)


def _call(model, args, kwargs):
    return model(*args, **kwargs)
