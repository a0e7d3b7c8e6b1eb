"""Locating decoder layers and their residual blocks in a Dynamo FX graph.

IR seen: the torch-level FX graph Dynamo hands a backend (`call_function` / `call_method` nodes,
parameters as placeholders, `node.meta["nn_module_stack"]` and `node.meta["example_value"]` intact).
Nothing here changes the graph (the rewrites that put residual adds in the form read here first
are `passes/residual.py`).

A *residual block* is the part of a pre-norm decoder layer that reads the residual stream x and adds
one result back: `x1 = x + f(Attn(norm1(x)))`, where f, the block's tail, computes each token's row
from that row alone: nothing (Llama), a dropout or view (OPT), a scale (Granite's
`residual_multiplier`), a norm on the block's output (Gemma's sandwich norms), or a chain of these.
It is found from the graph, not from module names: the attention module is the child of a decoder
layer that contains a scaled-dot-product-attention call; what its result reaches in the layer
through row-local ops must be one add whose other operand is x; the block is everything the add's
block operand depends on back to x, inside the layer. Layers are the modules at
`<something>.<index>` in the module paths (HF's `model.layers.3`) that have sub-modules, or, in a
graph compiled from one decoder layer (`compile_decoder_layers`), the graph's root module. A layer
whose MLP block does not read its attention block's sum (a post-norm layer) is not recognised.

Also here, the analysis the rewrites need about sequences: which dims of a tensor entering a block
hold the sequence (`sequence_dims`), the attention masks that enter a block (`attention_masks`),
and the masks computed from the caller's inputs, hence possibly padding (`input_dependent_masks`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re

import torch
import torch.nn.functional as F
from torch import fx

from lemo_compile.fx_utils import example_value, node_shape
from lemo_compile.plan import ModelSignature

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
LINEAR_TARGETS = (F.linear, torch._C._nn.linear)
ADD_TARGETS = (operator.add, operator.iadd, torch.add)

LAYER_PATH = re.compile(r"^(.*\.)?(\d+)$")


@dataclasses.dataclass
class ResidualBlock:
    """One residual block of a decoder layer, as nodes of the Dynamo graph.

    residual: x [B, S, D], the residual stream the block reads.
    output:   the block's result [B, S, D], what is added into x (the attention's o_proj output,
              or the end of the block's tail: the module docstring).
    add:      the node computing x + output.
    nodes:    the block's nodes in graph order (norm, attention, tail; x excluded).
    attention: the scaled-dot-product-attention call inside it (None for an MLP block).
    cache_outputs: block nodes returned by the graph besides through `add` (a KV cache).
    module_result: the block module's own result, where its tail starts (`output` when the
              block has no tail).
    routes_to_experts: the block's module takes a top-k over per-token scores (a
              mixture-of-experts MLP's router).
    """

    layer: int
    module_path: str
    residual: fx.Node
    output: fx.Node
    add: fx.Node
    nodes: list[fx.Node]
    attention: fx.Node | None
    cache_outputs: list[fx.Node]
    module_result: fx.Node
    routes_to_experts: bool = False

    @property
    def query(self) -> fx.Node:
        return _arg(self.attention, 0, "query")

    @property
    def key(self) -> fx.Node:
        return _arg(self.attention, 1, "key")

    def attention_input(self) -> fx.Node | None:
        """h = norm1(x) [B, S, D], what the attention module reads from the layer (pre-norm), or
        None when there is not exactly one such tensor of x's shape."""
        inside = {n for n in self.nodes if any(p == self.module_path for p, _ in module_stack(n))}
        shape = node_shape(self.residual)
        candidates = [
            n for n in [self.residual, *self.nodes]
            if n not in inside and node_shape(n) == shape and any(u in inside for u in n.users)
        ]
        return candidates[0] if len(candidates) == 1 else None

    def linear_input(self) -> fx.Node | None:
        """norm(x): the one tensor that the block's first linear layers read, [B, S, D] or
        flattened [B * S, D] (OPT's MLP), or None when there is not exactly one. A tensor derived
        from another such input (LoRA's dropout of it, a view of it) does not count."""
        shape = node_shape(self.residual)
        tokens, hidden = shape[0] * shape[1], shape[-1]
        members = set(self.nodes)
        reads = {n for _, n in self._linears()
                 if n is not self.residual and (s := node_shape(n)) is not None and s[-1] == hidden
                 and math.prod(s[:-1]) == tokens}

        def derived(node: fx.Node) -> bool:
            pending, seen = list(node.all_input_nodes), set()
            while pending:
                n = pending.pop()
                if n in reads:
                    return True
                if n in members and n not in seen:
                    seen.add(n)
                    pending.extend(n.all_input_nodes)
            return False

        first = [n for n in reads if not derived(n)]
        return first[0] if len(first) == 1 else None

    def mlp_activation(self) -> fx.Node | None:
        """The intermediate activation a that the block's down projection reads, [B, S, I] or
        [B * S, I] (a dropout just before the projection included: scoring copies drop it): the
        input of `down_projection()` when that is a plain linear call reading something no linear
        layer computes; when LoRA wraps the projection (base(a) + lora_B(lora_A(a)) * s), the one
        input of the block's linear layers with the residual's width D that no other linear layer
        computes and that is not D wide itself (so, then, I must differ from D). None when not
        found."""
        down = self.down_projection()
        if down is not None and not is_linear(down.args[0]):
            return down.args[0]
        hidden = node_shape(self.residual)[-1]
        reads = {n for linear, n in self._linears()
                 if (node_shape(linear) or (None,))[-1] == hidden}
        found = [n for n in reads
                 if not is_linear(n) and (node_shape(n) or (hidden,))[-1] != hidden]
        return found[0] if len(found) == 1 else None

    def _linears(self) -> list[tuple[fx.Node, fx.Node]]:
        """(linear call, the tensor it reads) for each `F.linear` of the block."""
        return [(n, n.args[0]) for n in self.nodes
                if is_linear(n) and n.args and isinstance(n.args[0], fx.Node)]

    def down_projection(self) -> fx.Node | None:
        """The plain linear call `F.linear(a, W[, b])` whose result is the block module's result
        (through dropouts and views: OPT's view(dropout(fc2(a)))), or None when that result is
        something else. A tail after it (a scale, a norm) only reads it."""
        down = self.module_result
        while down.op != "placeholder" and down.args and _passes_through(down, down.args[0]):
            down = down.args[0]
        plain = (is_linear(down) and not set(down.kwargs) - {"bias"} and len(down.args) >= 2
                 and all(isinstance(a, fx.Node) for a in down.args[:2]))
        return down if plain else None


@dataclasses.dataclass
class DecoderLayer:
    """A decoder layer: its index, module path, attention block (None when not recognised) and MLP
    block (the other child whose output is added into the residual stream; None when none is)."""

    index: int
    path: str
    attention: ResidualBlock | None
    problem: str = ""
    mlp: ResidualBlock | None = None


@dataclasses.dataclass
class ModelRegions:
    """Everything the finder located: decoder layers in order, and what it could not handle."""

    layers: list[DecoderLayer]
    problems: list[str]

    @property
    def batch_size(self) -> int:
        return node_shape(self._first_residual())[0]

    @property
    def seq_len(self) -> int:
        return node_shape(self._first_residual())[1]

    def _first_residual(self) -> fx.Node:
        for layer in self.layers:
            if layer.attention is not None:
                return layer.attention.residual
        raise ValueError("no attention block was found")


def model_signature(block: ResidualBlock, layers: int, block_size: int) -> ModelSignature:
    """The `ModelSignature` of a model, read off one of its attention blocks in the graph."""
    _, heads, _, head_dim = node_shape(block.query)
    hidden = node_shape(block.residual)[-1]
    return ModelSignature(int(hidden), int(heads), int(head_dim), layers, block_size)


def module_path(path: str) -> str:
    """Dynamo's module path (`L['self'].model.layers[0]`, `L['args'][0].model.layers.0`) as
    a plain dotted name (`model.layers.0`)."""
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])?\.?", "", path)
    path = re.sub(r"(\.)?__dict__\['_modules'\]\['([^']*)'\]", r".\2", path)  # PEFT's wrappers
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def module_stack(node: fx.Node) -> list[tuple[str, type]]:
    """The node's module stack, outermost first, as (dotted path, module class)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(module_path(path), cls) for path, cls in stack.values()]


def find_regions(gm: fx.GraphModule, root_layer: int | None = None) -> ModelRegions:
    """Locate decoder layers and their attention blocks in a Dynamo graph (see module docstring).

    root_layer: the graph is one decoder layer compiled on its own (`module.compile()` of the
    layer): its root module, whose nodes carry no module path of their own, is layer `root_layer`
    and its children (`self_attn`, `mlp`) are the layer's children."""
    layer_nodes, layer_index, children = _nodes_by_layer(gm, root_layer)
    problems: list[str] = []
    # An indexed module with no sub-modules (an nn.Sequential's Linear) is not a decoder layer.
    candidates = [p for p in layer_nodes if len(children.get(p, {})) >= 2]
    layers = [_decoder_layer(layer_index[path], path, set(layer_nodes[path]), children[path])
              for path in sorted(candidates, key=lambda p: (p.rsplit(".", 1)[0], layer_index[p]))]
    attends = any(is_sdpa(n) for m in gm.modules() if isinstance(m, fx.GraphModule)
                  for n in m.graph.nodes)
    if not layers and attends:
        # (a graph without attention, such as the embedding or the loss split off by a graph
        # break, holds no decoder layer to rewrite: nothing to say about it)
        problems.append(
            "no decoder layers (modules at '<name>.<index>' with sub-modules) were found (a "
            "graph that is one decoder layer, as a whole model compiled under FSDP2 gives, needs "
            "lemo_compile.compile_decoder_layers)"
        )
    problems.extend(layer.problem for layer in layers if layer.problem)
    indices = [layer.index for layer in layers]
    if root_layer is None and indices != list(range(len(layers))):
        problems.append(f"decoder layer indices are not 0..L-1: {indices}")
    return ModelRegions(layers, problems)


def _nodes_by_layer(gm: fx.GraphModule, root_layer: int | None):
    """The graph's nodes grouped by the decoder layer whose module runs them: (layer path ->
    nodes, layer path -> index, layer path -> child module path -> nodes)."""
    layer_nodes: dict[str, list[fx.Node]] = {}
    layer_index: dict[str, int] = {}
    children: dict[str, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        found = _layer_in_stack(node, root_layer)
        if found is None:
            continue
        index, path, child = found
        layer_nodes.setdefault(path, []).append(node)
        layer_index[path] = index
        if child is not None:
            children.setdefault(path, {}).setdefault(child, []).append(node)
    return layer_nodes, layer_index, children


def layer_index_of(node: fx.Node, root_layer: int | None = None) -> int | None:
    """The index of the decoder layer whose module runs `node` (read from its module stack, which
    AOTAutograd carries to the joint graph), None outside decoder layers; root_layer as for
    `find_regions`."""
    found = _layer_in_stack(node, root_layer)
    return None if found is None else found[0]


def _layer_in_stack(node: fx.Node, root_layer: int | None) -> tuple[int, str, str | None] | None:
    """(layer index, layer path, path of the layer's child that runs node or None) of the first
    decoder layer in node's module stack, outermost first."""
    stack = module_stack(node)
    if root_layer is not None:
        stack = [("", fx.GraphModule)] + stack
    for depth, (path, _cls) in enumerate(stack):
        index = _layer_index(path, root_layer)
        if index is not None:
            return index, path, stack[depth + 1][0] if depth + 1 < len(stack) else None
    return None


def _decoder_layer(index: int, path: str, nodes: set[fx.Node],
                   children: dict[str, list[fx.Node]]) -> DecoderLayer:
    """One candidate layer (its nodes, and its child modules' nodes) as a DecoderLayer: its
    attention and MLP blocks, or the problem that leaves it dense."""
    attention_children = [child for child, child_nodes in children.items()
                          if any(is_sdpa(n) for n in child_nodes)]
    if len(attention_children) != 1:
        if attention_children:
            problem = f"layer {path}: {len(attention_children)} attention modules"
        elif any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in nodes):
            problem = (
                f"layer {path}: it runs inside an activation-checkpoint (or other "
                "higher-order) region, which lemo does not rewrite yet"
            )
        else:
            problem = (
                f"layer {path}: no scaled_dot_product_attention call found (attention "
                "implementations other than 'sdpa' are not supported)"
            )
        return DecoderLayer(index, path, None, problem)
    child = attention_children[0]
    try:
        block = _attention_block(index, child, set(children[child]), nodes)
    except _NotABlock as err:
        return DecoderLayer(index, path, None, f"layer {path}: {err}")
    mlp = None
    claimed = set(block.nodes)  # the attention block's norms, before and after it
    for other, other_nodes in children.items():
        if other == child or set(other_nodes) <= claimed:
            continue
        try:
            mlp = _residual_block(index, other, set(other_nodes), nodes, attention=False)
        except _NotABlock:
            continue
        break
    if mlp is not None and mlp.residual is not block.add:
        if block.residual in mlp.nodes or mlp.residual in block.nodes:
            # y = x + f(Attn(norm1(x)) + MLP(norm2(x))) with f not the identity (Falcon):
            # canonical_residual_adds found no x + a + m to reorder
            problem = "its attention and MLP outputs are " + _PARALLEL_SUM_CHANGED
        else:
            # x1 = x + Attn(...) is changed before the MLP reads it: a post-norm layer
            # (x1 = norm(x + Attn(x))), whose eliminated tokens would not pass through unchanged.
            problem = ("the residual stream is transformed between its attention and MLP "
                       "blocks (a post-norm layer, e.g. OPT with do_layer_norm_before=False); "
                       "lemo supports pre-norm layers only")
        return DecoderLayer(index, path, None, f"layer {path}: {problem}")
    return DecoderLayer(index, path, block, mlp=mlp)


def _layer_index(path: str, root_layer: int | None) -> int | None:
    """The decoder-layer index of the module at `path`, None if it is not a decoder layer."""
    if root_layer is not None:
        return root_layer if path == "" else None
    match = LAYER_PATH.match(path)
    return None if match is None else int(match.group(2))


def checkpointed_layers(gm: fx.GraphModule, root_layer: int | None = None,
                        ) -> dict[int, tuple[fx.GraphModule, ModelRegions, DecoderLayer]]:
    """Decoder layers whose attention block sits inside an activation-checkpoint region: layer index
    -> (the region's body graph module, its regions, the layer as found there). Each body (see
    `checkpoint_bodies`) is searched like a whole graph (its nodes keep their module stacks);
    root_layer as for `find_regions`."""
    found = {}
    for body in checkpoint_bodies(gm):
        body_regions = find_regions(body, root_layer)
        for layer in body_regions.layers:
            if layer.attention is not None:
                found[layer.index] = (body, body_regions, layer)
    return found


def checkpoint_bodies(gm: fx.GraphModule) -> dict[fx.GraphModule, list[fx.Node]]:
    """Each activation-checkpoint body of gm and the calls that run it, in graph order.

    Dynamo captures `torch.utils.checkpoint` (HF's gradient checkpointing) as a
    `tag_activation_checkpoint(body, *args)` call whose first argument is a `get_attr` of the body;
    the body's placeholders take `args` in order."""
    bodies: dict[fx.GraphModule, list[fx.Node]] = {}
    checkpoint = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not checkpoint or not node.args:
            continue
        body_node = node.args[0]
        if not isinstance(body_node, fx.Node) or body_node.op != "get_attr":
            continue
        body = getattr(gm, body_node.target, None)
        if isinstance(body, fx.GraphModule):
            bodies.setdefault(body, []).append(node)
    return bodies


_PARALLEL_SUM_CHANGED = (
    "summed, and the sum changed, before they join the residual stream, like Falcon's; lemo "
    "supports x + f(Attn(norm(x))) + g(MLP(norm'(x))), each block's output changed on its own")


class _NotABlock(Exception):
    pass


def _attention_block(
    index: int, path: str, attention_nodes: set[fx.Node], layer_nodes: set[fx.Node]
) -> ResidualBlock:
    return _residual_block(index, path, attention_nodes, layer_nodes, attention=True)


def _residual_block(
    index: int, path: str, attention_nodes: set[fx.Node], layer_nodes: set[fx.Node], *,
    attention: bool,
) -> ResidualBlock:
    """The residual block around the child module `path` (module docstring); for an attention block
    it must hold exactly one SDPA call (then `ResidualBlock.attention`), for another block none."""
    leaving = [n for n in attention_nodes if any(u not in attention_nodes for u in n.users)]
    cache_outputs = [n for n in leaving if all(u.op == "output" for u in n.users if u not in attention_nodes)]
    outputs = [n for n in leaving if n not in cache_outputs]
    if len(outputs) != 1:
        raise _NotABlock(f"the attention module {path} has {len(outputs)} results used in the layer")
    module_result = outputs[0]
    output, add = _tail_end_and_add(module_result, attention_nodes, layer_nodes, path)
    residual = add.args[1] if add.args[0] is output else add.args[0]
    if not isinstance(residual, fx.Node):
        raise _NotABlock(f"the residual add after {path} does not add a tensor")
    res_shape, out_shape = node_shape(residual), node_shape(output)
    if res_shape is None or len(res_shape) != 3 or res_shape != out_shape:
        raise _NotABlock(
            f"the residual stream around {path} is not [batch, seq, hidden] "
            f"(residual {res_shape}, block output {out_shape})"
        )

    block = _block_nodes(output, residual, add, layer_nodes)
    ordered = [n for n in output.graph.nodes if n in block]
    if ordered and residual in layer_nodes:
        position = {n: i for i, n in enumerate(output.graph.nodes) if n is residual or n is ordered[0]}
        if position[residual] > position[ordered[0]]:  # (lemo inserts selection before the block)
            raise _NotABlock(
                f"the output of its {path.rsplit('.', 1)[-1]} module is added into a tensor "
                "computed after that block begins (in a parallel-residual layer whose attention "
                "and MLP outputs are " + _PARALLEL_SUM_CHANGED + ")")
    sdpa = [n for n in ordered if is_sdpa(n)]
    if len(sdpa) != (1 if attention else 0):
        raise _NotABlock(f"{len(sdpa)} attention calls in the block of {path}")
    return ResidualBlock(
        index, path, residual, output, add, ordered, sdpa[0] if sdpa else None,
        [n for n in cache_outputs if n in block], module_result,
        routes_to_experts=any(_is_topk(n) for n in attention_nodes),
    )


def _block_nodes(output: fx.Node, residual: fx.Node, add: fx.Node,
                 layer_nodes: set[fx.Node]) -> set[fx.Node]:
    """Everything `output` depends on inside the layer, back to `residual`, except what the rest of
    the layer also uses: a node with a user outside the block (a norm that a parallel-residual
    layer's attention and MLP both read) is the block's input, not part of it, and so is what
    only it needs. Removing such nodes can expose more (an ancestor also used by a removed node),
    so this repeats until no node of the block is used outside it."""
    shared: set[fx.Node] = set()
    while True:
        block: set[fx.Node] = set()
        pending = [output]
        while pending:
            node = pending.pop()
            if (node in block or node is residual or node in shared
                    or node.op in ("placeholder", "get_attr") or node not in layer_nodes):
                continue  # (outside the layer: rotary embedding, mask: an input of the block)
            block.add(node)
            pending.extend(node.all_input_nodes)
        used_outside = {n for n in block if n is not output and any(
            u not in block and u is not add and u.op != "output" for u in n.users)}
        if not used_outside:
            return block
        shared |= used_outside


def _tail_end_and_add(result: fx.Node, module_nodes: set[fx.Node], layer_nodes: set[fx.Node],
                      path: str) -> tuple[fx.Node, fx.Node]:
    """(end, add): the residual add that the module's `result` reaches, and the add's operand that
    holds the block's output (`result` itself, or the last node of the block's tail).

    The tail is what the layer does to the module's result before adding it into the residual
    stream, and it must compute each token's row from that token's row alone (`_is_row_local`):
    OPT's dropout and view, Granite's `out * residual_multiplier`, the norm Gemma puts on a block's
    output (`x + post_norm(block(pre_norm(x)))`). The add is the one node it reaches whose other
    operand does not come from the result: the residual x."""
    reach = downstream(result, layer_nodes)
    width = (node_shape(result) or (None,))[-1]
    adds: list[fx.Node] = []
    pending, seen = [result], {result}
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in module_nodes or user.op == "output" or user in seen:
                continue
            seen.add(user)
            if user not in layer_nodes:
                raise _NotABlock(f"the output of its {path.rsplit('.', 1)[-1]} module leaves the "
                                 f"layer before it is added into the residual stream")
            if _is_residual_add(user, reach):
                adds.append(user)
            elif _is_row_local(user, reach, width):
                pending.append(user)
            else:
                name = str(getattr(user.target, "__name__", user.target))
                raise _NotABlock(f"the output of its {path.rsplit('.', 1)[-1]} module is not added "
                                 f"into the residual stream through per-token operations (it goes "
                                 f"to {name}; lemo supports x + f(block(norm(x))) with f a scale, "
                                 "a norm or a dropout)")
    if len(adds) != 1:
        raise _NotABlock(f"the output of its {path.rsplit('.', 1)[-1]} module reaches "
                         f"{len(adds)} residual adds (one expected)")
    add = adds[0]
    end = next(a for a in add.args if a in reach)
    return end, add


def downstream(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    """`node` and every node of `within` computed from it."""
    found, pending = {node}, [node]
    while pending:
        for user in pending.pop().users:
            if user in within and user not in found:
                found.add(user)
                pending.append(user)
    return found


def _is_residual_add(node: fx.Node, reach: set[fx.Node]) -> bool:
    """An add of two tensors of which exactly one comes from the block (is in `reach`)."""
    if not (is_add(node) and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)):
        return False
    return sum(a in reach for a in node.args) == 1


# Elementwise ops: each element of the result from the elements at the same (broadcast) position
# of the inputs. Used by the row-local test below and by mlp="channels" (`passes/select.py`).
POINTWISE_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.pow, torch.tanh, torch.sigmoid,
    torch.exp, torch.erf, torch.relu, torch.square, torch.rsqrt, torch.sqrt,
    F.silu, F.gelu, F.relu, F.relu6, F.leaky_relu, F.elu, F.sigmoid, F.tanh, F.mish, F.softplus,
}
POINTWISE_METHODS = {
    "mul", "add", "sub", "div", "neg", "pow", "tanh", "sigmoid", "exp", "erf", "relu", "square",
    "rsqrt", "sqrt", "to", "float", "half", "bfloat16", "type_as", "contiguous", "clone",
    "__mul__", "__truediv__", "__add__", "__sub__", "__rmul__", "__radd__",
}

# Reductions: row-local when over the last dim only (checked in `_is_row_local`).
_ROW_REDUCTIONS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}


def _is_row_local(node: fx.Node, reach: set[fx.Node], width: int | None) -> bool:
    """Whether `node` computes each token's row from the same token's row of its inputs that come
    from the block (`reach`); its other tensor inputs must hold no tokens (all dims but the last
    of size 1: a weight, a scale). Dropouts and views (OPT) count, as they always did: they keep
    each element's place in memory, so elementwise ops after them stay row-local; a reduction
    must then be over a last dim of the block's width (one token's features)."""
    if node.args and node.args[0] in reach and _passes_through(node, node.args[0]):
        return True
    for source in node.all_input_nodes:
        value = example_value(source)
        if (source not in reach and isinstance(value, torch.Tensor)
                and math.prod(value.shape[:-1]) != 1):
            return False
    target = node.target
    if node.op == "call_function" and target in (F.layer_norm, getattr(F, "rms_norm", None)):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(shape, (tuple, list)) and list(shape) == [width]
    if node.op not in ("call_function", "call_method"):
        return False
    if target in _ROW_REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        shape = node_shape(node.args[0]) or ()
        return (len(shape) > 0 and shape[-1] == width
                and all(isinstance(d, int) and d % len(shape) == len(shape) - 1 for d in dims))
    if node.op == "call_function" and node.kwargs.get("inplace", False):
        return False
    return target in (POINTWISE_FUNCTIONS if node.op == "call_function" else POINTWISE_METHODS)


DROPOUT_TARGETS = (F.dropout, torch.dropout)
_VIEWS = ("view", "reshape")


def _passes_through(node: fx.Node, source: fx.Node) -> bool:
    """Whether `node` is a dropout or a view / reshape of `source` (its first argument)."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_function":
        return node.target in DROPOUT_TARGETS or node.target is torch.reshape
    return node.op == "call_method" and node.target in _VIEWS


def is_linear(node: fx.Node) -> bool:
    """Whether `node` calls `F.linear`."""
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _is_topk(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target is torch.topk)
            or (node.op == "call_method" and node.target == "topk"))


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ADD_TARGETS
    return node.op == "call_method" and node.target in ("add", "add_")


def _arg(node: fx.Node, position: int, name: str):
    return node.args[position] if len(node.args) > position else node.kwargs[name]


def is_view(node) -> bool:
    """Whether `node` is a view or reshape (`x.view(...)`, `x.reshape(...)`, `torch.reshape`)."""
    if not isinstance(node, fx.Node) or not node.args:
        return False
    if node.op == "call_function":
        return node.target is torch.reshape
    return node.op == "call_method" and node.target in _VIEWS


# ------------------------------------------------------------------ sequence dims and masks


def sequence_dims(value: torch.Tensor, batch: int, seq_len: int) -> tuple[int, ...] | None:
    """Sequence dims of an activation entering a block, () if it has none, None if ambiguous.

    [B|1, S] and [B|1, S, F] (hidden states, cos / sin): dim 1. [B|1, h, S, S] (mask): dims 2, 3.
    """
    shape = tuple(value.shape)
    if len(shape) in (2, 3) and shape[0] in (1, batch) and shape[1] == seq_len:
        return (1,)
    if len(shape) == 4 and shape[0] in (1, batch) and shape[2] == shape[3] == seq_len:
        return (2, 3)
    if seq_len in shape[1:]:
        return None
    return ()


def attention_masks(block: ResidualBlock, batch: int, seq_len: int) -> list[fx.Node]:
    """The attention masks [B|1, h, S, S] that enter `block` from outside it (sequence dims 2 and
    3), in graph order: what a padded batch's padding is read from."""
    members = set(block.nodes)
    found: dict[fx.Node, None] = {}
    for node in block.nodes:
        for source in node.all_input_nodes:
            value = example_value(source)
            if source in members or not isinstance(value, torch.Tensor):
                continue
            if sequence_dims(value, batch, seq_len) == (2, 3):
                found[source] = None
    return list(found)


def input_dependent_masks(gm: fx.GraphModule, batch: int, seq_len: int) -> list[fx.Node]:
    """Nodes of gm holding an attention mask [B|1, h, S, S] computed from (or equal to) a graph
    input other than a parameter or buffer: the caller's attention_mask (or position_ids), hence
    possibly padding. A purely causal mask (built from aranges) is not one of them."""
    found = []
    depends: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:  # topological order: inputs are decided before their users
        if node.op == "placeholder":
            depends[node] = not is_parameter(node)
        else:
            depends[node] = any(depends.get(n, False) for n in node.all_input_nodes)
        value = example_value(node)
        if depends[node] and isinstance(value, torch.Tensor):
            if sequence_dims(value, batch, seq_len) == (2, 3):
                found.append(node)
    return found


def is_parameter(node: fx.Node) -> bool:
    """Whether `node` holds a parameter or buffer of the model (not a caller's input)."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    grapharg = node.meta.get("grapharg")
    source = str(getattr(grapharg, "source", "")) or node.name
    return "_parameters" in source or "_buffers" in source or "parameters_" in node.name
