"""What the backward recomputes instead of the forward saving it: in checkpointed layers, and
float32 copies anywhere.

IR: AOTAutograd's joint forward-backward graph (aten ops, after Inductor's decompositions), before
the partitioner splits it; installed as Inductor's `joint_custom_post_pass` (and run by the
`aot_eager` compiler before its partitioner). Nodes that came from an activation-checkpoint region
carry `meta["recompute"]` (a `CheckpointPolicy`); the partitioner recomputes those in the backward
unless one says MUST_SAVE. These passes change only such tags, never the graph's nodes, so every
value and gradient is unchanged; what changes is what the forward saves and what the backward
recomputes.

`save_in_checkpoints` promises, inside checkpointed regions only (a graph without them is left as
it is):

* **Selections are saved.** The token indices a sparse block runs on (and, for padded batches, which
  of them are real) are saved for the backward: a few bytes per kept token. Without this the
  partitioner recomputes the whole selection (the scorer over all tokens, its sort) in the backward
  just to know which rows to scatter gradients to. Saving it also guarantees that the backward sees
  the very rows the forward chose.
* **Attention outputs are saved** when asked (`save_attention`: True, or the layers listed): the
  fused attention ops' outputs (the attention output and its log-sum-exp) are kept, so the backward
  recomputes the projections but not attention itself. That costs S x hidden x 2 bytes per dense
  layer and K x hidden x 2 per sparse one (bf16), and saves the recomputation of the costliest op
  at long lengths. An attention op's layer is read from its module stack, which AOTAutograd
  carries into the joint graph (`regions.layer_index_of`).
* **Sparse layers are not recomputed** when asked (`save_sparse_layers=True`): the checkpoint
  regions that hold a selection (one region per checkpointed layer) lose their recompute tags, so
  the partitioner treats them as it treats code outside checkpointing (it saves what the backward
  needs, and may still recompute cheap ops); dense layers stay checkpointed.

`recompute_widening_casts` (option `recompute_casts`), outside checkpointed regions:

* **Float32 copies are recomputed, not saved.** PEFT keeps LoRA adapters in float32 on a bfloat16
  model and casts each adapter's input to float32; the weight gradient of lora_A reads that copy.
  The partitioner saves the copy (it will not recompute an op whose backward reader is a matmul),
  4 bytes per element where its bfloat16 source, often saved anyway (attention's output, which its
  own backward reads), takes 2. Such casts, and the views of them that the backward reads, are
  tagged MUST_RECOMPUTE (the norms' float32 inputs that their backward reads are such casts too):
  the backward makes the copy again from the narrow tensor, with the same values (widening to
  float32 is exact). At Llama-3-8B's shape that is two [S, hidden] float32 tensors per dense
  layer (268 MB each at 16K tokens), and two [K, hidden] per sparse one.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from lemo_compile.regions import layer_index_of
from lemo_compile.tags import SELECTIONS, role_of

# The nodes whose results are saved in checkpointed regions (a name of its own, so that a test can
# switch the saving off).
SELECTION_ROLES = SELECTIONS


def save_in_checkpoints(graph: fx.Graph, *, attention: bool | tuple[int, ...], sparse_layers: bool,
                        counters: dict[str, int], root_layer: int | None = None) -> None:
    """Mark, in checkpointed regions of the joint graph, lemo's selections (and the fused attention
    ops: all with `attention` True, those of the layers listed otherwise) MUST_SAVE, and with
    `sparse_layers` untag the regions that select; counts them in `counters` ("saved_selections",
    "saved_attention", "saved_sparse_layers"). root_layer: the graph is that decoder layer
    compiled on its own (as for `regions.find_regions`)."""
    if sparse_layers:
        selecting = {node.meta.get("ac_graph_id") for node in graph.nodes
                     if _is_recomputed(node) and role_of(node) in SELECTION_ROLES}
        selecting.discard(None)
        for node in graph.nodes:
            if _is_recomputed(node) and node.meta.get("ac_graph_id") in selecting:
                del node.meta["recompute"]
        if selecting:
            counters["saved_sparse_layers"] = len(selecting)
    for node in graph.nodes:
        if node.op != "call_function" or not _is_recomputed(node):
            continue
        if role_of(node) in SELECTION_ROLES and any(role_of(u) not in SELECTION_ROLES
                                                    for u in node.users):
            _must_save(node)
            counters["saved_selections"] = counters.get("saved_selections", 0) + 1
        elif _is_fused_attention(node) and (attention if isinstance(attention, bool) else
                                            layer_index_of(node, root_layer) in attention):
            _must_save(node)
            counters["saved_attention"] = counters.get("saved_attention", 0) + 1


def _is_recomputed(node: fx.Node) -> bool:
    return node.meta.get("recompute") in (CheckpointPolicy.PREFER_RECOMPUTE,
                                          CheckpointPolicy.MUST_RECOMPUTE)


def _must_save(node: fx.Node) -> None:
    """Tag MUST_SAVE the op that computes node's data: node, or for a view the op under it (the
    partitioner recomputes views of saved values, and never bans a view from recomputation); for a
    multi-output op (reached through a getitem), the op and all its getitems, as the partitioner
    decides recomputation per op and saves the outputs it needs."""
    while isinstance(node.target, torch._ops.OpOverload) and node.target.is_view:
        node = node.args[0]
    producer = node.args[0] if node.target is operator.getitem else node
    for tagged in (producer, *(u for u in producer.users if u.target is operator.getitem)):
        tagged.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def _is_fused_attention(node: fx.Node) -> bool:
    """An SDPA forward kernel (flash, cuDNN, memory-efficient, CPU flash): the ops that return the
    attention output with the statistics their backward needs."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    name = target._opname
    return name.startswith("_scaled_dot_product_") and not name.endswith("_backward")


def recompute_widening_casts(graph: fx.Graph, *, counters: dict[str, int]) -> None:
    """Tag MUST_RECOMPUTE, outside checkpointed regions of the joint graph, each float32 cast of a
    narrower floating-point tensor that the forward computes and the backward reads, with the views
    of it that lead there; counts the casts in `counters` ("recomputed_casts")."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
                n in backward for n in node.all_input_nodes):
            backward.add(node)
    for node in graph.nodes:
        if node in backward or not _is_widening_cast(node) or "recompute" in node.meta:
            continue
        views = _views_read_by(node, backward)
        if views is None:
            continue
        for tagged in (node, *views):
            tagged.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        counters["recomputed_casts"] = counters.get("recomputed_casts", 0) + 1


def _is_widening_cast(node: fx.Node) -> bool:
    if node.target is not torch.ops.prims.convert_element_type.default:
        return False
    source, result = (n.meta.get("val") if isinstance(n, fx.Node) else None
                      for n in (node.args[0], node))
    return (isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor)
            and source.dtype in (torch.bfloat16, torch.float16) and result.dtype == torch.float32)


def _views_read_by(cast: fx.Node, backward: set[fx.Node]) -> list[fx.Node] | None:
    """The forward views of `cast` (views of views included) when the backward reads the cast or
    one of them; None when it reads none."""
    views, stack, read = [], [cast], False
    while stack:
        for user in stack.pop().users:
            if user in backward:
                read = True
            elif isinstance(user.target, torch._ops.OpOverload) and user.target.is_view:
                views.append(user)
                stack.append(user)
    return views if read else None
