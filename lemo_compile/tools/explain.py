"""Seeing what lemo did: `explain()`, and the artefacts of `lemo inspect` and LEMO_DEBUG_DIR.

`explain(model, *args, options=..., **kwargs)` compiles the model's training forward with lemo's
graph passes, runs the rewritten graph once, eagerly, on the given inputs, and returns an
`Explanation`:

* the Dynamo graph before and after each pass (readable code) with unified diffs between them, and
  per decoder layer a diff of that layer's nodes (empty exactly for layers lemo left unchanged);
* the per-layer plan, pass counters (with "nodes_inserted" and the post-grad fusions the compiled
  graph gets) and warnings (`CompileReport`);
* the blocks each sparse layer kept for these inputs, per sample (attention, and MLP with
  mlp="tokens");
* per layer, the activation memory saved for backward, dense and with lemo, from AOTAutograd's
  partition of the two graphs (forward outputs kept for the backward, by shape, each charged to
  the layer that computes it: an estimate that ignores storage shared between views and
  Inductor's own buffer reuse). A layer's output that the next layer's norm keeps is charged to
  the layer that computed it, so the dense layer just before a sparse one shows a change too.

`Explanation.write(folder)` writes the artefacts: graphs per pass and their diffs, the plan as a
table and as JSON, the keep map (layers x blocks, PNG), the region graph (DOT) and the rewritten
forward graph as ONNX with lemo's operations as functions of a custom domain. Pictures, DOT and ONNX
need the `inspect` extra (`pip install lemo_compile[inspect]`).

With `LEMO_DEBUG_DIR=path` in the environment, the backend writes the same artefacts for every
training graph it compiles (`debug_dump`), the selection taken from the graph's first call.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor import compile_fx as inductor_compile_fx

from lemo_compile import ops
from lemo_compile.backend import DEBUG_DIR_VARIABLE, joint_graph_passes, set_debug_dumper
from lemo_compile.config import LemoConfig
from lemo_compile.fx_utils import compile_apart, fake_mode_of, own_copy
from lemo_compile.passes.fuse import fuse_row_movements
from lemo_compile.passes.manager import CompileReport, LemoWarning, run_graph_passes
from lemo_compile.plan import LayerPlan
from lemo_compile.regions import find_regions, module_stack
from lemo_compile.tags import BLOCK_OF_SELECTION, layer_of, role_of



@dataclasses.dataclass
class Explanation:
    """What lemo does to one model for one input (module docstring).

    config:     the options, validated.
    report:     the CompileReport of the graph holding the decoder layers (plans, counters,
                warnings, and `graphs`: code per stage, "dynamo" first, then each pass that ran).
    layer_diffs: per decoder layer, a unified diff of the layer's nodes before and after lemo's
                passes; "" for a layer lemo did not change.
    selected:   {"attention" | "mlp": {layer: kept block indices [B, k], ascending}} for this input.
                In a padded batch each row counts its blocks from its first real token and keeps
                its own number of them: a row that keeps fewer than the most is filled with -1.
    row_blocks: for a padded batch, each row's number of full blocks [B] (its tail and padding
                follow them); None otherwise.
    activation_bytes: per decoder layer, {"dense": bytes, "lemo": bytes} of the forward values the
                backward keeps (see the module docstring for what the estimate ignores).
    """

    config: LemoConfig
    report: CompileReport
    layer_diffs: dict[int, str]
    selected: dict[str, dict[int, torch.Tensor]]
    activation_bytes: dict[int, dict[str, int]]
    row_blocks: torch.Tensor | None = None
    _graph: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    _inputs: list[Any] = dataclasses.field(default_factory=list, repr=False)

    @property
    def plans(self) -> list[LayerPlan]:
        return self.report.plans

    @property
    def counters(self) -> dict[str, int]:
        return self.report.counters

    @property
    def graphs(self) -> dict[str, str]:
        return self.report.graphs

    def diffs(self) -> dict[str, str]:
        """Per pass that changed the graph, the unified diff from the stage before it."""
        stages = list(self.report.graphs.items())
        return {
            after: "".join(difflib.unified_diff(
                before_code.splitlines(keepends=True), after_code.splitlines(keepends=True),
                fromfile=before, tofile=after))
            for (before, before_code), (after, after_code) in zip(stages, stages[1:])
        }

    def keep_map(self, block: str = "attention", sample: int = 0) -> torch.Tensor:
        """[layers, n_blocks] int8 for one sample: 1 a kept block, 0 an eliminated one, -1 for
        every block of a layer whose `block` ("attention" or "mlp") runs dense, -2 for a sparse
        layer whose selection was not recorded (the graph did not run), and, in a padded batch,
        -3 in the recorded layers for the columns past the sample's own full blocks (its tail and
        padding; its blocks count from its first real token)."""
        plans = self.report.plans
        if not plans:
            return torch.zeros(0, 0, dtype=torch.int8)
        result = torch.full((len(plans), plans[0].n_blocks), -1, dtype=torch.int8)
        for plan in plans:
            if plan.sparse if block == "attention" else plan.mlp_sparse:
                result[plan.layer] = -2
        for layer, blocks in self.selected[block].items():
            own = blocks[sample]
            result[layer] = 0
            result[layer, own[own >= 0]] = 1
            if self.row_blocks is not None:
                result[layer, int(self.row_blocks[sample]):] = -3
        return result

    def table(self) -> str:
        """The plan as a text table: one row per decoder layer."""
        header = ("layer", "attention", "mlp", "activations dense -> lemo")
        rows = [header]
        for plan in self.report.plans:
            memory = self.activation_bytes.get(plan.layer, {})
            rows.append((
                str(plan.layer),
                _block_summary(plan.sparse, plan.kept_blocks, plan.n_blocks, plan.kept_tokens,
                               plan.reason),
                _mlp_summary(plan),
                f"{_mib(memory.get('dense', 0))} -> {_mib(memory.get('lemo', 0))}",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        saved = sum(m["dense"] - m["lemo"] for m in self.activation_bytes.values())
        config = self.config
        levers = "".join([
            f", explore {config.explore}" if config.explore else "",
            f", first {config.keep_first_blocks} and last {config.keep_last_blocks} blocks always "
            "kept" if config.keep_first_blocks or config.keep_last_blocks else "",
            ", tiles normalized per block distance" if config.distance_normalized else ""])
        summary = (f"{self.report.batch_size} x {self.report.seq_len} tokens, block size "
                   f"{config.block_size}, scorer {config.scorer!r}{levers}, mlp {config.mlp!r}; "
                   f"activations kept for backward: {_mib(saved)} less with lemo")
        return "\n".join([summary, *lines])

    def to_json(self) -> dict:
        """Plans, counters, warnings, selections and memory as plain JSON values."""
        return {
            "options": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "predictors"},
            "batch_size": self.report.batch_size,
            "seq_len": self.report.seq_len,
            "plans": [dataclasses.asdict(p) for p in self.report.plans],
            "counters": self.report.counters,
            "warnings": self.report.warnings,
            "selected_blocks": {block: {str(layer): blocks.tolist() for layer, blocks in per.items()}
                                for block, per in self.selected.items()},
            "row_blocks": None if self.row_blocks is None else self.row_blocks.tolist(),
            "activation_bytes": {str(k): v for k, v in self.activation_bytes.items()},
        }

    def write(self, folder: str | os.PathLike, *, onnx: bool = True) -> dict[str, pathlib.Path]:
        """Write every artefact under `folder` (created); returns {artefact: path}.

        graphs/NN_<stage>.py, graphs/NN_<stage>.diff, layers/layer_<i>.diff, plan.txt, plan.json,
        keep_map.png, regions.dot and (with `onnx`) model.onnx."""
        root = pathlib.Path(folder)
        (root / "graphs").mkdir(parents=True, exist_ok=True)
        (root / "layers").mkdir(exist_ok=True)
        written: dict[str, pathlib.Path] = {}
        diffs = self.diffs()
        for i, (stage, code) in enumerate(self.report.graphs.items()):
            written[f"graph:{stage}"] = _write(root / "graphs" / f"{i:02d}_{stage}.py", code)
            if stage in diffs:
                written[f"diff:{stage}"] = _write(root / "graphs" / f"{i:02d}_{stage}.diff", diffs[stage])
        for layer, diff in self.layer_diffs.items():
            written[f"layer:{layer}"] = _write(root / "layers" / f"layer_{layer}.diff", diff)
        written["plan.txt"] = _write(root / "plan.txt", self.table() + "\n")
        written["plan.json"] = _write(root / "plan.json", json.dumps(self.to_json(), indent=1))
        written["keep_map.png"] = write_keep_map(self, root / "keep_map.png")
        written["regions.dot"] = write_region_graph(self, root / "regions.dot")
        if onnx:
            if self._graph is None:
                raise ValueError("this Explanation has no rewritten graph to export (training=False)")
            from lemo_compile.tools.onnx_export import export_onnx

            export_onnx(self._graph, self._inputs, root / "model.onnx")
            written["model.onnx"] = root / "model.onnx"
        return written


def explain(
    model: torch.nn.Module,
    *args: Any,
    options: LemoConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Explanation:
    """What lemo does to `model` called as `model(*args, **kwargs)` in training (module docstring).

    The model is put in training mode for the call (lemo only rewrites training graphs) and
    restored afterwards; no backward runs and no parameter changes. Returns the `Explanation` of
    the graph that holds the decoder layers (with graph breaks, the first such graph).
    """
    config = LemoConfig.from_options(options)
    explainer = _Explainer(config)

    compiled = compile_apart(model, explainer)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            compiled(*args, **kwargs)
    finally:
        model.train(was_training)
    if not explainer.explanations:
        raise ValueError("lemo explain: torch.compile produced no graph for this call")
    with_layers = [e for e in explainer.explanations if e.report.plans]
    return (with_layers or explainer.explanations)[0]


class _Explainer:
    """A torch.compile backend that applies lemo's graph passes, keeps an Explanation per graph,
    and runs the rewritten graph eagerly (recording the selections of its first call)."""

    def __init__(self, config: LemoConfig) -> None:
        self.config = config
        self.explanations: list[Explanation] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        dense = own_copy(gm)
        gm = own_copy(gm)  # the passes may add inputs (predictors), which Dynamo must not see
        report = run_graph_passes(gm, self.config, fake_mode_of(gm, example_inputs))
        explanation = _explanation(self.config, report, dense, gm, list(example_inputs),
                                   count_fusions=True)
        self.explanations.append(explanation)

        def run(*args):
            outputs, explanation.selected, explanation.row_blocks = run_recording_selection(
                gm, [*args, *report.extra_inputs])
            return outputs

        return run


def _explanation(config: LemoConfig, report: CompileReport, dense: fx.GraphModule,
                 gm: fx.GraphModule, example_inputs: list, *, count_fusions: bool) -> Explanation:
    """The compile-time part of an Explanation (no selection yet) of `gm`, rewritten from `dense`.
    Adds the counter "nodes_inserted" (lemo's nodes in gm) and, with `count_fusions` (when the
    report's graph is not compiled for real), the post-grad fusion pass's counters as that pass
    would count them on the two partitioned graphs."""
    if report.training:
        report.counters["nodes_inserted"] = sum(
            1 for node in gm.graph.nodes if role_of(node) is not None)
    fusions = {} if count_fusions and config.fuse and report.training else None
    # the joint passes' own counts are left out: the real compile reports them
    joint = joint_graph_passes(config, report, counters={})
    memory = activation_bytes(dense, gm, example_inputs, report.extra_inputs, fusions, joint)
    report.counters.update(fusions or {})
    return Explanation(config, report, layer_diffs(dense, gm), {"attention": {}, "mlp": {}},
                       memory, _graph=gm, _inputs=[*example_inputs, *report.extra_inputs])


def run_recording_selection(
    gm: fx.GraphModule, inputs: Sequence[Any]
) -> tuple[Any, dict[str, dict[int, torch.Tensor]], torch.Tensor | None]:
    """Run a lemo-rewritten graph eagerly; returns its outputs, per block kind and layer the kept
    block indices [B, k] of its selection nodes (`Explanation.selected`), and for a padded batch
    each row's number of full blocks [B] (else None). Layers inside activation-checkpoint bodies
    are recorded too: the body is interpreted under `torch.utils.checkpoint`, so its activations
    are not kept, as in the compiled model."""
    selected: dict[str, dict[int, torch.Tensor]] = {"attention": {}, "mlp": {}}
    row_blocks: list[torch.Tensor] = []

    class Recorder(fx.Interpreter):
        def call_function(self, target, args, kwargs) -> Any:
            if target is torch.ops.higher_order.tag_activation_checkpoint:
                body, *body_inputs = args
                return torch.utils.checkpoint.checkpoint(Recorder(body).run, *body_inputs,
                                                         use_reentrant=False)
            return super().call_function(target, args, kwargs)

        def run_node(self, node: fx.Node) -> Any:
            value = super().run_node(node)
            block = BLOCK_OF_SELECTION.get(role_of(node))
            if block is not None and node.target is ops.select_tokens:
                block_size, kept_blocks = node.args[2], node.args[1]
                selected[block][layer_of(node)] = (
                    value[:, : kept_blocks * block_size : block_size] // block_size).cpu()
            if block is not None and node.target is ops.kept_row_tokens:
                real, block_size = self.env[node.args[1]], node.args[3]
                blocks, full = _own_kept_blocks(value, real, block_size)
                selected[block][layer_of(node)] = blocks.cpu()
                row_blocks.append(full.cpu())
            return value

    outputs = Recorder(gm).run(*inputs)
    return outputs, selected, row_blocks[0] if row_blocks else None


def _own_kept_blocks(kept: torch.Tensor, real: torch.Tensor,
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a padded batch's kept tokens [B, S] (`ops.kept_row_tokens`): each row's kept full
    blocks, counted from its first real token, [B, k] ascending and filled with -1 where a row
    keeps fewer than k, and each row's number of full blocks [B]."""
    full = ops.full_blocks(real, block_size)
    n = real.shape[1] // block_size
    own = ops.real_first(kept, real, 1, block_size)[:, : n * block_size : block_size]   # [B, n]
    own = own & (torch.arange(n, device=kept.device)[None, :] < full[:, None])
    order = torch.sort((~own).to(torch.uint8), dim=1, stable=True).indices[:, : int(own.sum(1).max())]
    return torch.where(own.gather(1, order), order, -1), full


def layer_diffs(before: fx.GraphModule, after: fx.GraphModule) -> dict[int, str]:
    """Per decoder layer (located in `before`), a unified diff of its node listing between the two
    graphs. A node reading a value from outside the layer shows it as `<in>`, so a layer that only
    reads a rewritten residual stream lists the same."""
    regions = find_regions(before)
    paths = {layer.path: layer.index for layer in regions.layers}
    diffs = {}
    listings = {name: _layer_listings(gm, paths) for name, gm in (("before", before), ("after", after))}
    for index in sorted(paths.values()):
        old = listings["before"].get(index, [])
        new = listings["after"].get(index, [])
        diffs[index] = "".join(difflib.unified_diff(
            old, new, fromfile=f"layer {index} (dynamo)", tofile=f"layer {index} (lemo)"))
    return diffs


def _layer_listings(gm: fx.GraphModule, paths: dict[str, int]) -> dict[int, list[str]]:
    owner = {node: _layer_of(node, paths) for node in gm.graph.nodes}
    listings: dict[int, list[str]] = {}
    for node, layer in owner.items():
        if layer is None or node.op == "placeholder":
            continue

        def show(arg, layer=layer) -> str:
            if isinstance(arg, fx.Node):
                return arg.name if owner.get(arg) == layer else "<in>"
            if isinstance(arg, (tuple, list)):
                inner = ", ".join(show(a) for a in arg)
                return f"({inner})" if isinstance(arg, tuple) else f"[{inner}]"
            return repr(arg)

        args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__qualname__", None) or str(node.target)
        listings.setdefault(layer, []).append(f"{node.name} = {target}({', '.join(args)})\n")
    return listings


def _layer_of(node: fx.Node, paths: dict[str, int]) -> int | None:
    layer = layer_of(node)
    if layer is not None:
        return layer
    for path, _cls in module_stack(node):
        if path in paths:
            return paths[path]
    return None


def activation_bytes(
    dense: fx.GraphModule, lemo: fx.GraphModule, example_inputs: list, extra_inputs: list,
    fusion_counters: dict[str, int] | None = None, joint: Callable | None = None,
) -> dict[int, dict[str, int]]:
    """Per decoder layer, the bytes of forward values that AOTAutograd's partition (Inductor's
    min-cut, as lemo compiles) keeps for the backward: {"dense": ..., "lemo": ...}. `joint`: what
    lemo runs on its joint graph before the partitioner (`backend.joint_graph_passes`), run on
    lemo's only. With `fusion_counters`, the post-grad fusion pass then runs on lemo's two
    partitioned graphs and adds its counts there."""
    paths = {layer.path: layer.index for layer in find_regions(dense).layers}
    result = {index: {"dense": 0, "lemo": 0} for index in paths.values()}
    for name, gm, inputs, passes in (("dense", dense, example_inputs, None),
                                     ("lemo", lemo, example_inputs + extra_inputs, joint)):
        saved, graphs = _saved_for_backward(gm, inputs, passes)
        for node in saved:
            layer = _layer_of(node, paths)
            value = node.meta.get("val")
            if layer is not None and isinstance(value, torch.Tensor):
                result[layer][name] += value.numel() * value.element_size()
        if name == "lemo" and fusion_counters is not None:
            for graph in graphs:
                fuse_row_movements(graph.graph, fusion_counters)
    return result


def _saved_for_backward(
    gm: fx.GraphModule, inputs: list, joint: Callable | None = None
) -> tuple[list[fx.Node], tuple[fx.GraphModule, ...]]:
    """The forward-graph nodes whose values the partitioned backward reads, and the partitioned
    (forward, backward) graphs; `joint` runs on the joint graph before the partitioner."""
    captured: dict[str, fx.GraphModule] = {}

    def forward_compiler(graph: fx.GraphModule, _inputs):
        captured["forward"] = graph
        return graph

    def partition(joint_module, joint_inputs, **kwargs):
        if joint is not None:
            joint(joint_module.graph)
        forward, backward = min_cut_rematerialization_partition(
            joint_module, joint_inputs, compiler="inductor", **kwargs)
        captured["backward"] = backward
        return forward, backward

    aot_module_simplified(own_copy(gm), inputs, fw_compiler=forward_compiler, partition_fn=partition,
                          decompositions=inductor_compile_fx.select_decomp_table())
    if "backward" not in captured:  # nothing in the graph needs a gradient: nothing is saved
        return [], (captured["forward"],)
    forward, backward = captured["forward"], captured["backward"]
    saved_names = {n.name for n in backward.graph.find_nodes(op="placeholder")
                   if not n.name.startswith("tangents")}
    outputs = forward.graph.find_nodes(op="output")[0].args[0]
    saved = [n for n in outputs if isinstance(n, fx.Node) and n.name in saved_names]
    return saved, (forward, backward)


def _mlp_summary(plan: LayerPlan) -> str:
    if plan.mlp_kept_channels is not None:
        return f"backward through {plan.mlp_kept_channels}/{plan.mlp_channels} channels"
    return _block_summary(plan.mlp_sparse, plan.mlp_kept_blocks, plan.n_blocks,
                          plan.mlp_kept_tokens, "")


def _block_summary(sparse: bool, kept: int, n_blocks: int, tokens: int, reason: str) -> str:
    if sparse:
        return f"{kept}/{n_blocks} blocks ({tokens} tokens)"
    return f"dense ({reason})" if reason else "dense"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def write_keep_map(explanation: Explanation, path: pathlib.Path, sample: int = 0) -> pathlib.Path:
    """A PNG of `Explanation.keep_map` (one panel for attention, one for the MLP when it is
    sparse): rows are layers, columns are blocks of `block_size` tokens."""
    plt = _import("matplotlib.pyplot", "keep-map pictures")
    from matplotlib.colors import ListedColormap

    panels = ["attention"] + (["mlp"] if explanation.selected["mlp"] else [])
    figure, axes = plt.subplots(len(panels), 1, squeeze=False,
                                figsize=(10, 1.5 + 0.35 * len(explanation.plans) * len(panels)))
    # past the sample's own blocks, not recorded, dense layer, eliminated, kept
    colours = ListedColormap(["#e8e0f0", "#f4c28f", "#d9d9d9", "#ffffff", "#1f4e99"])
    for axis, block in zip(axes[:, 0], panels):
        keep = explanation.keep_map(block, sample).numpy()
        axis.imshow(keep, cmap=colours, vmin=-3, vmax=1, aspect="auto", interpolation="nearest")
        axis.set_ylabel("layer")
        axis.set_xlabel(f"block ({explanation.config.block_size} tokens each)")
        padded = "" if explanation.row_blocks is None else ", tail and padding (lilac)"
        axis.set_title(f"{block}: kept blocks (blue), eliminated (white), dense layer (grey), "
                       f"selection not recorded (orange){padded}; sample {sample}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_region_graph(explanation: Explanation, path: pathlib.Path) -> pathlib.Path:
    """The region graph as DOT: the residual stream through each layer's attention and MLP block,
    each block labelled with what lemo does to it, and the selection feeding each sparse block."""
    nx = _import("networkx", "region graphs")
    _import("pydot", "DOT files")
    graph = nx.DiGraph(name="lemo_regions")
    previous = "embeddings"
    graph.add_node(previous, label="embeddings", shape="box")
    for plan in explanation.plans:
        for block, sparse, kept, tokens in (
            ("attention", plan.sparse, plan.kept_blocks, plan.kept_tokens),
            ("mlp", plan.mlp_sparse, plan.mlp_kept_blocks, plan.mlp_kept_tokens),
        ):
            name = f"layer{plan.layer}_{block}"
            summary = (_block_summary(sparse, kept, plan.n_blocks, tokens, plan.reason)
                       if block == "attention" else _mlp_summary(plan))
            graph.add_node(name, label=f"layer {plan.layer} {block}\\n{summary}", shape="box",
                           style="filled", fillcolor="lightblue" if sparse else "lightgrey")
            graph.add_edge(previous, name, label="residual")
            if sparse:
                select = f"{name}_select"
                scorer = explanation.config.scorer if block == "attention" else "activation norm"
                graph.add_node(select, label=f"select top {kept} blocks\\n({scorer})", shape="ellipse")
                graph.add_edge(previous, select)
                graph.add_edge(select, name, label="idx")
            previous = name
    graph.add_node("output", label="LM head + loss", shape="box")
    graph.add_edge(previous, "output", label="residual")
    nx.nx_pydot.write_dot(graph, path)
    return path


def debug_dump(gm: fx.GraphModule, dense: fx.GraphModule, report: CompileReport,
               config: LemoConfig, example_inputs: list):
    """For LEMO_DEBUG_DIR: a wrapper for the compiled callable of `gm` (rewritten from `dense`)
    that, at its first call, runs `gm` once eagerly (no grad, random state restored) to record the
    selection, then writes `Explanation.write`'s artefacts to $LEMO_DEBUG_DIR/graph_<n>/ (n: the
    first number not taken). Any failure of the dump warns (LemoWarning) and training goes on."""
    try:
        root = pathlib.Path(os.environ[DEBUG_DIR_VARIABLE])
        root.mkdir(parents=True, exist_ok=True)
        folder = _new_folder(root)
        explanation = _explanation(config, report, dense, gm, example_inputs, count_fusions=False)
    except Exception as err:  # a debug dump never stops training
        _warn_dump_failed(err)
        return lambda compiled: compiled

    def wrap(compiled):
        done = False

        def run(*args):
            nonlocal done
            if not done:
                done = True
                try:
                    with torch.no_grad(), torch.random.fork_rng(_devices(args)):
                        _, explanation.selected, explanation.row_blocks = run_recording_selection(
                            gm, [*args, *report.extra_inputs])
                    explanation.write(folder)
                except Exception as err:  # a debug dump never stops training
                    _warn_dump_failed(err, folder)
            return compiled(*args)

        return run

    return wrap


set_debug_dumper(debug_dump)


def _new_folder(root: pathlib.Path) -> pathlib.Path:
    """root/graph_<n> for the first n not taken, created (safe against another process taking it)."""
    n = 0
    while True:
        folder = root / f"graph_{n}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def _warn_dump_failed(err: Exception, folder: pathlib.Path | None = None) -> None:
    where = f" to {folder}" if folder is not None else ""
    warnings.warn(f"lemo: LEMO_DEBUG_DIR: could not write every artefact{where}: {err}",
                  LemoWarning, stacklevel=3)


def _devices(args) -> list[int]:
    return sorted({a.device.index or 0 for a in args
                   if isinstance(a, torch.Tensor) and a.device.type == "cuda"})


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"lemo: {what} need {module.split('.')[0]}: "
                          "pip install 'lemo_compile[inspect]'") from None
