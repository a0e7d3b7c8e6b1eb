"""Token selection: run each sparse layer's attention block (and, with mlp="tokens", its MLP
block) on its informative tokens only; with mlp="channels", send the MLP's backward through its
most active intermediate channels only.

IR seen: the torch-level Dynamo FX graph (before AOTAutograd), with the regions of
`lemo_compile.regions`. Autograd through everything inserted here comes from AOTAutograd.

For every layer whose `LayerPlan` is sparse, it inserts, before the block:

    scores = <scorer>(...)                       # [B, n], no gradient
    idx    = ops.select_tokens(scores, k, b, S)   # [B, K] sorted token indices
    x_k    = ops.gather_tokens(x, idx, (1,))      # and cos / sin / mask at idx

rewrites the block in place to run on x_k (`compact.py`), and replaces the residual add with
`ops.scatter_add_tokens(x, idx, block_output)`: kept rows get the block's result added, the others
pass through.

The oracle scorer runs a copy of the block's query and key computation on all tokens
(input detached, dropout removed) and feeds `lemo::block_scores`. The predictor scorer reads the
block's attention input h = norm1(x) (a detached copy on all tokens) through the layer's trained
`BlockPredictor`, whose weights become extra graph inputs (`lemo_predictor_<layer>_*`) that the
backend passes itself (`SelectionResult.extra_inputs`): frozen, and no optimizer sees them. The
output scorer runs a copy of the whole block on all tokens (no gradient) and scores each token by
the norm of its result, mean over each block (not on padded batches: such a layer stays dense).
An MLP block is handled the same way, scored by the norm of its intermediate activation per token
(a detached copy on all tokens), max over each block; with the predictor scorer and a bank that
has MLP predictors, by the layer's `MlpPredictor` on a detached copy of the MLP's input instead
(weights passed the same way, `lemo_mlp_predictor_<layer>_*`).

Padded batches (`padded=True`: an attention mask computed from the caller's inputs exists):
each row is selected as if it ran alone (README, "Semantics": padded batches). Its real tokens are
read off the mask that reaches the layer's attention (`ops.real_tokens`); the scorer sees them in
the row's own frame (`ops.real_first`: real tokens first, so blocks start at the first real token,
and scores from real full blocks only); then

    kept  = ops.kept_row_tokens(scores, real, ratio, b)  # [B, S]: the row's own kept set
    idx   = ops.select_kept_tokens(kept, real, K)          # K = plan.kept_tokens, fixed by S
    valid = ops.tokens_at(kept, idx)                       # [B, K]: False for filler rows

Filler rows are hidden as keys in the gathered mask (`compact.apply_compaction`) and their block
results are dropped (`ops.scatter_add_kept_tokens`).

With mlp="channels" the MLP block keeps all its tokens; its down projection `F.linear(a, W, b)`
becomes (roles tagged "mlp_channels"):

    idx    = ops.select_channels(a.detach(), C)            # [B, C], top channels per sample
    leaf_k = ops.gather_channels(leaf, idx)                # each [B, S, I] input of a's pointwise
    a_k    = <a's pointwise chain replayed on the leaf_k>  #   chain (gate and up projections)
    out    = lemo.channel_linear(a.detach(), a_k, idx, W, b, dtype)

so the forward is exact and the gradient reaches the MLP only through a_k: what autograd saves for
the MLP's activation is [B, S, C] instead of [B, S, I] (see `ops.channel_linear` for the gradient).
A flattened MLP (OPT: a [B*S, I]) is viewed as [B, S, I] for this, and `out` back as [B*S, D].

Promise: the graph computes the semantics of README.md ("Semantics") for the sparse layers and is unchanged elsewhere;
a block that cannot be compacted stays dense and is reported in `SelectionResult.dense` (attention)
or `SelectionResult.mlp_dense` (with the reason).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from lemo_compile import ops, tags
from lemo_compile.config import LemoConfig
from lemo_compile.fx_utils import copy_with_value, example_value, insert_call, node_shape
from lemo_compile.plan import LayerPlan, kept_channels
from lemo_compile.passes.compact import (
    CannotCompact,
    apply_compaction,
    plan_compaction,
)
from lemo_compile.predictors.bank import (
    PredictorBank, as_bank, predicted_block_scores, predicted_mlp_block_scores,
)
from lemo_compile.regions import (
    DROPOUT_TARGETS, POINTWISE_FUNCTIONS, POINTWISE_METHODS, ModelRegions, ResidualBlock,
    attention_masks, model_signature,
)
from lemo_compile.tags import KEPT_OF, SCORE_OF, VALID_OF, Role


@dataclasses.dataclass
class SelectionResult:
    """Which layers the pass made sparse, which it had to leave dense (layer -> reason), the graph
    outputs it replaced by placeholders, and the tensors it appended to the graph's inputs (the
    predictor scorer's weights, in placeholder order), which the caller must pass. MLP blocks:
    `mlp_sparse` (mlp="tokens"), `mlp_channels` (mlp="channels": layer -> (kept C, size I)), and
    `mlp_dense` (either mode, layer -> why it stayed dense), and `mlp_activation_scored` (the
    predictor scorer's sparse MLP blocks scored by their activation: the bank has no MLP
    predictors)."""

    sparse: list[int]
    dense: dict[int, str]
    placeholder_outputs: int = 0
    extra_inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    mlp_sparse: list[int] = dataclasses.field(default_factory=list)
    mlp_dense: dict[int, str] = dataclasses.field(default_factory=dict)
    mlp_channels: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    mlp_activation_scored: list[int] = dataclasses.field(default_factory=list)


class _Padding:
    """The real-token flags [B, S] of a padded graph, one node per attention mask, inserted where
    the first block that needs them starts (masks are computed before every layer)."""

    def __init__(self, fake_mode) -> None:
        self.fake_mode = fake_mode
        self.masks: dict[int, fx.Node | None] = {}
        self.real: dict[fx.Node, fx.Node] = {}

    def note_layer(self, layer) -> None:
        """Remember the mask that reaches the layer's attention, before the layer is rewritten."""
        masks = []
        if layer.attention is not None:
            batch, seq_len = node_shape(layer.attention.residual)[:2]
            masks = attention_masks(layer.attention, batch, seq_len)
        self.masks[layer.index] = masks[0] if masks else None

    def real_tokens(self, graph: fx.Graph, layer: int, batch: int, seq_len: int, tag) -> fx.Node:
        mask = self.masks.get(layer)
        if mask is None:
            raise CannotCompact(
                "the batch is padded (an attention mask computed from the inputs exists) but no "
                "attention mask reaches this layer's attention, so its padding cannot be told apart"
            )
        if mask not in self.real:
            node = insert_call(graph, self.fake_mode, ops.real_tokens, (mask, batch))
            tag(node, Role.PADDING)
            self.real[mask] = node
        return self.real[mask]


def select_pass(
    gm: fx.GraphModule,
    regions: ModelRegions,
    plans: list[LayerPlan],
    config: LemoConfig,
    fake_mode,
    padded: bool = False,
) -> SelectionResult:
    """Insert token selection for every sparse layer of `plans` (see module docstring); `padded`:
    the batch may hold padding, which an attention mask in every attention block tells."""
    bank = _predictor_bank(regions, plans, config) if config.scorer == "predictor" else None
    ctx = _Rewrite(gm, config, fake_mode, SelectionResult([], {}),
                   _Padding(fake_mode) if padded else None, bank)
    # A rewritten block's residual add is replaced by a new node: a later block that reads the old
    # add (the layer's MLP, the next layer) reads the replacement, so the block is rewritten as a
    # copy of the analysis's block with that residual (the analysis itself stays as found).
    replaced: dict[fx.Node, fx.Node] = {}

    def current(block: ResidualBlock) -> ResidualBlock:
        return dataclasses.replace(block, residual=replaced.get(block.residual, block.residual))

    for layer in regions.layers:
        plan = plans[layer.index]
        if ctx.padding is not None:
            ctx.padding.note_layer(layer)
        if plan.sparse and layer.attention is not None:
            merged = _sparse_attention(ctx, layer.index, plan, current(layer.attention))
            if merged is not None:
                replaced[layer.attention.add] = merged
        if plan.mlp_sparse and layer.mlp is not None:
            merged = _sparse_mlp(ctx, layer.index, plan, current(layer.mlp))
            if merged is not None:
                replaced[layer.mlp.add] = merged
        elif plan.mlp_channel_ratio is not None and layer.mlp is not None:
            _channel_mlp(ctx, layer.index, plan, current(layer.mlp))
    gm.graph.eliminate_dead_code()
    return ctx.result


@dataclasses.dataclass
class _Rewrite:
    """What the rewrites of one `select_pass` call share: the graph module, the options, the fake
    mode values are computed in, the result being filled, the padding flags (padded batches) and
    the predictor bank (scorer="predictor")."""

    gm: fx.GraphModule
    config: LemoConfig
    fake_mode: FakeTensorMode
    result: SelectionResult
    padding: _Padding | None
    bank: PredictorBank | None


def _tagger(layer_index: int, anchor: fx.Node):
    def tag(node: fx.Node, role: Role) -> None:
        tags.tag(node, role, layer_index)
        node.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})

    return tag


MIXTURE_OF_EXPERTS = (
    "a mixture-of-experts MLP (a router picks experts per token): mlp='tokens' and 'channels' "
    "leave it dense, so the router and its auxiliary losses see every token; the layer's "
    "attention block is still sparse")


def _sparse_attention(ctx: _Rewrite, layer: int, plan: LayerPlan,
                      block: ResidualBlock) -> fx.Node | None:
    """Selection around one attention block; returns the new residual stream (None: left dense)."""
    gm, config, bank, fake_mode, result = ctx.gm, ctx.config, ctx.bank, ctx.fake_mode, ctx.result

    def scores(graph, residual, tag, real):
        if bank is not None:
            node = _insert_predictor(gm, block, residual, bank, fake_mode, tag, result.extra_inputs,
                                     config.distance_normalized, real)
        else:
            node = _insert_scorer(graph, block, residual, plan, config, fake_mode, tag, real)
        if config.explore == 0:
            return node
        # draws from the random scorer's source, so `seed` fixes the draw as it fixes that one's
        noise = insert_call(graph, fake_mode, torch.ops.lemo.random_block_scores.default,
                            (residual, plan.n_blocks, block.layer, config.seed))
        scored = plan.kept_blocks - round(config.explore * plan.kept_blocks)
        explored = insert_call(graph, fake_mode, ops.explore_scores, (node, noise, scored))
        for inserted in (noise, explored):
            tag(inserted, Role.SCORE)
        return explored

    try:
        merged = _sparse_block(ctx, layer, block, (plan.kept_blocks, plan.kept_tokens), scores,
                               Role.SELECT, config.keep_ratio_of(layer))
    except CannotCompact as err:
        result.dense[layer] = str(err)
        return None
    result.sparse.append(layer)
    return merged


def _sparse_mlp(ctx: _Rewrite, layer: int, plan: LayerPlan, block: ResidualBlock) -> fx.Node | None:
    """Token elimination in one MLP block (mlp="tokens"); returns the new residual stream (None:
    left dense). Scores: the layer's `MlpPredictor` on the MLP's input when the bank has one, else
    the norm of its intermediate activation per token, both on all tokens and without gradient."""
    gm, config, bank, fake_mode, result = ctx.gm, ctx.config, ctx.bank, ctx.fake_mode, ctx.result
    if block.routes_to_experts:
        result.mlp_dense[layer] = MIXTURE_OF_EXPERTS
        return None
    intermediate = block.mlp_activation()
    if intermediate is None:
        result.mlp_dense[layer] = "the MLP's intermediate activation was not recognised"
        return None
    predictor = bank.mlp_predictor(layer) if bank is not None and bank.mlp_layers else None
    if bank is not None and predictor is None:
        result.mlp_activation_scored.append(layer)

    def scores(graph, residual, tag, real):
        source = intermediate if predictor is None else block.linear_input()
        if source is None:
            raise CannotCompact("the MLP's input (the tensor its first linear layers read) was "
                                "not found, so its predictor has nothing to read")
        value = _per_sample(graph, _detached_copy(graph, block, residual, (source,), fake_mode,
                                                  tag, Role.MLP_SCORE)[source],
                            residual, fake_mode, tag, Role.MLP_SCORE)
        batch, seq_len = node_shape(residual)[:2]
        real_arg = (real,) if real is not None else ()
        if predictor is None:
            node = insert_call(graph, fake_mode, ops.activation_block_scores,
                               (value, config.block_size) + real_arg)
        else:
            tensors = [_constant_input(gm, t, f"lemo_mlp_predictor_{layer}_{i}", fake_mode,
                                       tag, Role.MLP_SCORE, result.extra_inputs, value)
                       for i, t in enumerate(predictor.tensors())]
            node = graph.call_function(predicted_mlp_block_scores,
                                       (value, tensors, config.block_size) + real_arg)
            example = example_value(value)
            with fake_mode:
                node.meta["example_value"] = example.new_empty(
                    (batch, seq_len // config.block_size), dtype=torch.float32)
        tag(node, Role.MLP_SCORE)
        return node

    try:
        merged = _sparse_block(ctx, layer, block, (plan.mlp_kept_blocks, plan.mlp_kept_tokens),
                               scores, Role.MLP_SELECT, config.mlp_ratio_of(layer))
    except CannotCompact as err:
        result.mlp_dense[layer] = str(err)
        return None
    result.mlp_sparse.append(layer)
    return merged


def _channel_mlp(ctx: _Rewrite, layer: int, plan: LayerPlan, block: ResidualBlock) -> None:
    """mlp="channels" in one MLP block (module docstring); a block whose down projection or
    intermediate activation is not recognised stays dense, its reason in `result.mlp_dense`."""
    gm, fake_mode, result = ctx.gm, ctx.fake_mode, ctx.result
    if block.routes_to_experts:
        result.mlp_dense[layer] = MIXTURE_OF_EXPERTS
        return
    output = block.down_projection()
    if output is None:
        result.mlp_dense[layer] = "the MLP's output is not a plain linear layer"
        return
    args = list(output.args) + [None] * (3 - len(output.args))
    a, weight, bias = args[:3]
    bias = output.kwargs.get("bias", bias)
    shape = tuple(example_value(a).shape)
    batch, seq_len = tuple(example_value(block.residual).shape[:2])
    flat = len(shape) == 2 and shape[0] == batch * seq_len  # OPT: fc2 reads [B*S, I]
    if not (flat or (len(shape) == 3 and shape[:2] == (batch, seq_len))):
        result.mlp_dense[layer] = (
            f"the MLP's intermediate activation has shape {list(shape)}, not [batch, seq, channels]")
        return
    channels = shape[-1]
    kept = kept_channels(plan.mlp_channel_ratio, channels)
    if kept == channels:
        return  # nothing to drop: the MLP stays exact
    chain, leaves = _pointwise_chain(block, a, shape)
    if chain is None:
        result.mlp_dense[layer] = leaves
        return
    graph = gm.graph
    tag = _tagger(layer, block.add)
    inserted: list[fx.Node] = []

    def call(target, args) -> fx.Node:
        inserted.append(insert_call(graph, fake_mode, target, args))
        return inserted[-1]

    def per_sample(node: fx.Node) -> fx.Node:  # [B*S, I] -> [B, S, I]
        return call(torch.Tensor.view, (node, (batch, seq_len, channels))) if flat else node

    with graph.inserting_before(output):
        detached = per_sample(call(torch.Tensor.detach, (a,)))
        idx = call(ops.select_channels, (detached, kept))
        env: dict[fx.Node, fx.Node] = {}
        for leaf in leaves:
            env[leaf] = call(ops.gather_channels, (per_sample(leaf), idx))
        for node in chain:
            env[node] = copy_with_value(graph, fake_mode, node, env)
            inserted.append(env[node])
        dtype = example_value(output).dtype
        new = call(torch.ops.lemo.channel_linear.default, (detached, env[a], idx, weight, bias, dtype))
        if flat:
            new = call(torch.Tensor.view, (new, (batch * seq_len, -1)))
    for node in inserted:
        tag(node, Role.MLP_CHANNELS)
    new.meta["stack_trace"] = output.meta.get("stack_trace")
    output.replace_all_uses_with(new)
    graph.erase_node(output)
    result.mlp_channels[layer] = (kept, channels)


def _pointwise_chain(block: ResidualBlock, a: fx.Node, shape):
    """(chain, leaves): the pointwise nodes of the block that `a` [B, S, I] is computed by, in
    graph order, and the [B, S, I] tensors they start from (the projections' outputs); or
    (None, reason) when a node on the way has another shape or is not known to be pointwise."""
    members = set(block.nodes)
    chain: set[fx.Node] = set()
    leaves: list[fx.Node] = []
    pending = [a]
    while pending:
        node = pending.pop()
        if node in chain or node in leaves:
            continue
        if not _is_pointwise(node) or node not in members:
            leaves.append(node)
            continue
        for arg in node.all_input_nodes:
            value = example_value(arg)
            if not isinstance(value, torch.Tensor):
                return None, f"the MLP's activation reads {arg.name}, which is not a tensor"
            if value.dim() == 0:
                continue
            if tuple(value.shape) != shape:
                return None, (f"the MLP's activation combines [batch, seq, channels] tensors with "
                              f"{arg.name} of shape {list(value.shape)}")
            pending.append(arg)
        chain.add(node)
    order = {n: i for i, n in enumerate(a.graph.nodes)}
    return sorted(chain, key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def _is_pointwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        # (the MLP's activations, the gate product, LoRA's scaled adds, dtype casts: computed on
        # a subset of channels they give those channels of the full result)
        return node.target in POINTWISE_FUNCTIONS and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in POINTWISE_METHODS


def _sparse_block(ctx: _Rewrite, layer: int, block: ResidualBlock, keep: tuple[int, int],
                  insert_scores, select_role: Role, keep_ratio: float) -> fx.Node:
    """Selection around one residual block: `insert_scores(graph, residual, tag, real)` inserts
    the block scores [B, n], then the top `kept_blocks` are selected and the block is compacted to
    `kept_tokens` rows (`keep` = (kept_blocks, kept_tokens)) and merged into the residual stream,
    which is returned. With padding (`ctx.padding`), each row keeps its own top blocks by
    `keep_ratio` (module docstring). Raises CannotCompact, leaving the graph unchanged, when the
    block cannot run on fewer tokens."""
    graph, config, fake_mode, padding = ctx.gm.graph, ctx.config, ctx.fake_mode, ctx.padding
    kept_blocks, kept_tokens = keep
    residual = block.residual
    batch, seq_len = node_shape(residual)[:2]
    compaction = plan_compaction(block, residual, batch, seq_len, kept_tokens, fake_mode)
    tag = _tagger(layer, block.add)
    with graph.inserting_before(block.nodes[0]):
        real = padding.real_tokens(graph, layer, batch, seq_len, tag) if padding else None
        scores = insert_scores(graph, residual, tag, real)
        if config.keep_first_blocks or config.keep_last_blocks:
            scores = insert_call(graph, fake_mode, ops.force_edge_blocks, (
                scores, config.keep_first_blocks, config.keep_last_blocks, config.block_size,
                real))
            tag(scores, SCORE_OF[select_role])
        valid = None
        if real is None:
            idx = insert_call(graph, fake_mode, ops.select_tokens,
                              (scores, kept_blocks, config.block_size, seq_len))
        else:
            kept = insert_call(graph, fake_mode, ops.kept_row_tokens,
                               (scores, real, keep_ratio, config.block_size))
            idx = insert_call(graph, fake_mode, ops.select_kept_tokens, (kept, real, kept_tokens))
            valid = insert_call(graph, fake_mode, ops.tokens_at, (kept, idx))
            tag(kept, KEPT_OF[select_role])
            tag(valid, VALID_OF[select_role])
        tag(idx, select_role)
    cache_shapes = {n: tuple(example_value(n).shape) for n in block.cache_outputs}
    merged = _compact_and_merge(graph, block, residual, compaction, idx, fake_mode, tag, valid)
    for cached, shape in cache_shapes.items():
        ctx.result.placeholder_outputs += _replace_output_use(graph, cached, shape, fake_mode, tag)
    return merged


def _compact_and_merge(graph, block, residual, compaction, idx, fake_mode, tag, valid) -> fx.Node:
    """Run the block on the kept rows and add its result into them: the new residual stream."""
    output = apply_compaction(graph, block, residual, compaction, idx, tag, valid)
    with graph.inserting_before(block.add):
        if valid is None:
            merged = insert_call(graph, fake_mode, ops.scatter_add_tokens, (residual, idx, output))
        else:
            merged = insert_call(graph, fake_mode, ops.scatter_add_kept_tokens,
                                 (residual, idx, output, valid))
        tag(merged, Role.SCATTER_ADD)
    block.add.replace_all_uses_with(merged)
    graph.erase_node(block.add)
    return merged


def _insert_scorer(graph, block: ResidualBlock, residual, plan, config, fake_mode, tag,
                   real=None) -> fx.Node:
    if config.scorer == "output":
        if real is not None:
            raise CannotCompact("scorer 'output' does not take padded batches")
        # the block's own result on all tokens, from a no-grad copy: per token its norm
        copy = _detached_copy(graph, block, residual, (block.output,), fake_mode, tag)
        value = _per_sample(graph, copy[block.output], residual, fake_mode, tag, Role.SCORE)
        node = insert_call(graph, fake_mode, ops.output_block_scores, (value, config.block_size))
        tag(node, Role.SCORE)
        return node
    if config.scorer == "random":
        # With padding, row r's scores are read in its own frame: entry p scores its block p.
        node = insert_call(graph, fake_mode, torch.ops.lemo.random_block_scores.default,
                           (residual, plan.n_blocks, block.layer, config.seed))
        tag(node, Role.SCORE)
        return node
    # Oracle: q and k after RoPE for all tokens, from a no-grad copy of the block's own computation.
    env = _detached_copy(graph, block, residual, (block.query, block.key), fake_mode, tag)
    q = insert_call(graph, fake_mode, torch.Tensor.detach, (env[block.query],))
    k = insert_call(graph, fake_mode, torch.Tensor.detach, (env[block.key],))
    nodes = [q, k]
    # block_scores divides q.k by sqrt(d). An attention called with its own `scale` (OPT scales q
    # itself and passes scale=1) has logits q.k * scale: rescale q so the scores see those logits.
    scale = block.attention.kwargs.get("scale")
    if scale is None and len(block.attention.args) > 6:
        scale = block.attention.args[6]
    if isinstance(scale, (int, float)):
        factor = float(scale) * math.sqrt(example_value(block.query).shape[-1])
        if abs(factor - 1.0) > 1e-6:
            q = insert_call(graph, fake_mode, operator.mul, (q, factor))
            nodes.append(q)
    full = None
    if real is not None:
        # Each row's real tokens first, zero past its full blocks: the tiles of its own blocks.
        q = insert_call(graph, fake_mode, ops.real_first, (q, real, 2, config.block_size, True))
        k = insert_call(graph, fake_mode, ops.real_first, (k, real, 2, config.block_size, True))
        nodes += [q, k]
        if config.distance_normalized:
            full = insert_call(graph, fake_mode, ops.full_blocks, (real, config.block_size))
            nodes.append(full)
    args = (q, k, config.block_size)
    if config.distance_normalized:
        args += (True, full)
    scores = insert_call(graph, fake_mode, torch.ops.lemo.block_scores.default, args)
    for node in (*nodes, scores):
        tag(node, Role.SCORE)
    return scores


def _per_sample(graph, value: fx.Node, residual, fake_mode, tag, role: Role) -> fx.Node:
    """`value` as [B, S, F]: a block tensor that the model flattened to [B*S, F] (OPT's MLP) is
    viewed back per sample (B, S from the residual stream); any other is returned as it is."""
    if example_value(value).dim() != 2:
        return value
    batch, seq_len = node_shape(residual)[:2]
    view = insert_call(graph, fake_mode, torch.Tensor.view, (value, (batch, seq_len, -1)))
    tag(view, role)
    return view


def _detached_copy(graph, block: ResidualBlock, residual, roots, fake_mode, tag,
                   role: Role = Role.SCORE) -> dict:
    """Copies of the block's nodes that `roots` depend on, computed from a detached x with dropout
    removed, on all tokens (the block itself is compacted afterwards): original -> copy."""
    wanted = _ancestors_in_block(block, roots)
    detached = insert_call(graph, fake_mode, torch.Tensor.detach, (residual,))
    tag(detached, role)
    env: dict[fx.Node, fx.Node] = {residual: detached}
    for node in block.nodes:
        if node not in wanted:
            continue
        if node.op == "call_function" and node.target in DROPOUT_TARGETS:
            env[node] = env.get(node.args[0], node.args[0])
            continue
        copy_ = graph.node_copy(node, lambda n: env.get(n, n))
        tag(copy_, role)
        env[node] = copy_
    return env


def _predictor_bank(regions: ModelRegions, plans: list[LayerPlan], config: LemoConfig):
    """The `predictors` option as a bank, checked against the model's shapes and sparse layers
    (`plans` has one plan per decoder layer of the model; `regions` may hold fewer, e.g. the one
    layer of an activation-checkpoint body)."""
    bank = as_bank(config.predictors)
    blocks = [layer.attention for layer in regions.layers if layer.attention is not None]
    bank.check_fits(
        model_signature(blocks[0], len(plans), config.block_size),
        [p.layer for p in plans if p.sparse],
        [p.layer for p in plans if p.mlp_sparse],
    )
    return bank


def _insert_predictor(
    gm: fx.GraphModule, block: ResidualBlock, residual, bank, fake_mode, tag, extra_inputs: list,
    per_distance: bool, real=None,
):
    h = block.attention_input()
    if h is None:
        raise ValueError(
            f"lemo scorer 'predictor': the attention input of layer {block.layer} ({block.module_path})"
            " could not be located in the graph (a pre-norm layer is expected)"
        )
    value = example_value(h)
    graph = gm.graph
    h_all = _detached_copy(graph, block, residual, (h,), fake_mode, tag)[h]  # on all tokens
    predictor = bank.predictor(block.layer)

    def graph_input(tensor: torch.Tensor, name: str) -> fx.Node:
        return _constant_input(gm, tensor, f"lemo_predictor_{block.layer}_{name}", fake_mode, tag,
                               Role.SCORE, extra_inputs, h)

    sides = [[graph_input(t, f"{side}{i}") for i, t in enumerate(predictor.side_tensors(side))]
             for side in ("q", "k")]
    distance_bias = graph_input(predictor.distance_bias, "distance_bias")
    args = (h_all, *sides, distance_bias, predictor.block_size, predictor.heads)
    kwargs = {"per_distance": True} if per_distance else {}
    if real is not None:
        kwargs["real"] = real
    node = graph.call_function(predicted_block_scores, args, kwargs)
    with fake_mode:
        node.meta["example_value"] = value.new_empty(
            (value.shape[0], value.shape[1] // predictor.block_size), dtype=torch.float32
        )
    tag(node, Role.SCORE)
    return node


def _constant_input(gm, tensor: torch.Tensor, name: str, fake_mode, tag, role: Role,
                    extra_inputs: list, like: fx.Node) -> fx.Node:
    """A new graph input holding `tensor` (float32, on `like`'s device) that the backend passes
    itself (`extra_inputs`): frozen, and no optimizer ever sees it."""
    constant = tensor.detach().to(example_value(like).device, torch.float32).clone()
    node = _append_input(gm, name, constant, fake_mode, extra_inputs)
    tag(node, role)
    return node


def _append_input(gm: fx.GraphModule, name: str, tensor: torch.Tensor, fake_mode,
                  extra_inputs: list) -> fx.Node:
    """A new last placeholder of gm holding `tensor` (static shape), which the backend passes
    itself: `tensor` is appended to `extra_inputs`, in placeholder order."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True)
    node._dynamo_source = None  # AOTAutograd asks every input where it came from
    extra_inputs.append(tensor)
    return node


def pass_body_inputs(gm: fx.GraphModule, body: fx.GraphModule, calls: list[fx.Node],
                     tensors: list[torch.Tensor], fake_mode, extra_inputs: list) -> None:
    """Give the activation-checkpoint body `body` of `gm` the constants a selection pass appended to
    its inputs (its last `len(tensors)` placeholders, holding `tensors`): each becomes a new input
    of `gm` (appended to `extra_inputs`, which the backend passes) and an operand of every call of
    the body in `calls` (`tag_activation_checkpoint(body, *operands)`: placeholders take the
    operands in order)."""
    if not tensors:
        return
    inner = [n for n in body.graph.nodes if n.op == "placeholder"][-len(tensors):]
    for placeholder, tensor in zip(inner, tensors, strict=True):
        outer = _append_input(gm, placeholder.name, tensor, fake_mode, extra_inputs)
        outer.meta["custom"] = dict(placeholder.meta.get("custom") or {})
        for call in calls:
            call.args = (*call.args, outer)


def _ancestors_in_block(block: ResidualBlock, roots) -> set[fx.Node]:
    members = set(block.nodes)
    seen: set[fx.Node] = set()
    pending = [r for r in roots if r in members]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        pending.extend(n for n in node.all_input_nodes if n in members)
    return seen


def _replace_output_use(graph: fx.Graph, node: fx.Node, shape, fake_mode, tag) -> int:
    """Return a NaN placeholder of `shape` instead of `node` from the graph (a KV cache entry that
    lemo computed on kept tokens only); returns how many outputs were replaced."""
    value = example_value(node)
    outputs = [u for u in node.users if u.op == "output"]
    for output in outputs:
        with graph.inserting_before(output):
            filler = insert_call(graph, fake_mode, ops.nan_placeholder,
                                 (list(shape), value.dtype, value.device))
            tag(filler, Role.PLACEHOLDER)
        output.replace_input_with(node, filler)
    return len(outputs)

