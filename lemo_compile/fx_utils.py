"""FX helpers shared by the backend, its passes and the tools: graph copies, dotted attribute
access, the fake mode a graph's values live in, and `compile_apart` (a one-off compile in a frame
of its own). Nothing here changes a graph it is given."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
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
