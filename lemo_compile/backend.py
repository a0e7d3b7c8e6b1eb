"""The `lemo` torch.compile backend.

`torch.compile(model, backend="lemo", options={...})` reaches `lemo_backend` through the entry point
group `torch_dynamo_backends`. For each Dynamo graph it:

1. validates the options (`LemoConfig`);
2. when the graph will be differentiated (gradients are enabled and one of its inputs requires
   grad, whatever `module.training` says) rewrites it with lemo's passes
   (`passes.manager.run_graph_passes`); a graph run under `torch.no_grad()` or
   `inference_mode()` is computed unchanged, so a fine-tuned model is evaluated dense (its plain
   causal masks still become `is_causal=True`, the same attention with the fast kernel);
3. hands the graph to Inductor's `compile_fx` with lemo's post-grad passes installed, or, with
   `compiler="aot_eager"`, to AOTAutograd with Inductor's decompositions and partitioner but no
   code generation.

`LemoBackend` is the same thing as an object that keeps the `CompileReport` of every graph it
compiled: `backend = LemoBackend({"keep_ratio": 0.3}); torch.compile(model, backend=backend)`.
With LEMO_DEBUG_DIR set, every training graph also dumps `explain()`'s artefacts there: the dump
is `tools.explain.debug_dump`, which installs itself with `set_debug_dumper` (the tools sit on top
of the backend; the backend does not import them).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch._inductor.compile_fx as inductor_compile_fx
import torch._inductor.config as inductor_config
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor import list_mode_options

from lemo_compile.config import LemoConfig
from lemo_compile.fx_utils import fake_mode_of, own_copy
from lemo_compile.passes.fuse import fuse_row_movements
from lemo_compile.passes.lifetimes import shorten_cast_lifetimes
from lemo_compile.passes.swiglu import swiglu_backward_in_place
from lemo_compile.passes.attention import causal_attention_pass
from lemo_compile.passes.manager import (
    CompileReport, InductorPasses, has_symbolic_shapes, run_graph_passes,
)
from lemo_compile.passes.recompute import recompute_widening_casts, save_in_checkpoints
from lemo_compile.plan import LayerGroup

log = logging.getLogger(__name__)

# transformers >= 5.25 requires `kernels`, whose wrapper around the attention modules' forward sets
# and resets a context variable. Inside an activation checkpoint Dynamo refuses such a side effect
# unless told not to replay it when the backward recomputes the forward, and otherwise breaks the
# graph at every checkpointed layer: lemo would then see no whole model and leave those layers
# dense. A set-and-reset pair needs no replay. Set when lemo is imported, which `torch.compile(...,
# backend="lemo")` does before tracing (README: "Supported models and set-ups").
if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True

DEBUG_DIR_VARIABLE = "LEMO_DEBUG_DIR"

# (rewritten graph, the graph as Dynamo gave it, report, config, example inputs) -> a wrapper
# for the graph's compiled callable.
DebugDumper = Callable[[fx.GraphModule, fx.GraphModule, CompileReport, LemoConfig, list],
                       Callable[[Callable], Callable]]
_debug_dumper: DebugDumper | None = None


def set_debug_dumper(dumper: DebugDumper | None) -> None:
    """Install what runs for every training graph while LEMO_DEBUG_DIR is set (None: nothing)."""
    global _debug_dumper
    _debug_dumper = dumper


class LemoBackend:
    """A torch.compile backend with fixed lemo options; `reports` holds one CompileReport per graph."""

    def __init__(self, options: LemoConfig | Mapping[str, Any] | None = None, *, mode: str | None = None,
                 layer_group: LayerGroup | None = None):
        self.config = LemoConfig.from_options(options)
        self.mode = mode
        self.layer_group = layer_group  # set: every graph is one decoder layer of the group
        self.reports: list[CompileReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        if kwargs:
            raise ValueError(
                f"lemo backend got unexpected arguments {sorted(kwargs)}; pass lemo options as "
                "torch.compile(..., options={...})"
            )
        fake_mode = fake_mode_of(gm, example_inputs)
        debug = None
        if _will_be_differentiated(example_inputs):
            if os.environ.get(DEBUG_DIR_VARIABLE) and _debug_dumper is not None:
                debug = own_copy(gm)  # the graph as Dynamo gave it, for the dumped diffs
            if self.config.scorer == "predictor":
                gm = own_copy(gm)  # the pass adds inputs, which Dynamo must not see in its graph
            report = run_graph_passes(gm, self.config, fake_mode, self.layer_group)
        else:
            report = CompileReport(training=False)
            if not has_symbolic_shapes(gm):
                report.counters["causal_attention"] = causal_attention_pass(gm)
        self.reports.append(report)
        _RECENT_REPORTS.append(report)
        log.info("lemo: compiled a graph: %s", report.summary())
        extra = report.extra_inputs
        # The inputs lemo adds are compiled as static fakes: given as real tensors, AOTAutograd
        # would give them symbolic sizes that Dynamo has no source for, and any guard Inductor
        # then puts on those sizes breaks Dynamo's guard building.
        static = [fake_mode.from_tensor(t, static_shapes=True) for t in extra]
        root_layer = self.layer_group.layers[0] if self.layer_group else None
        compiled = _compile(gm, [*example_inputs, *static], self.config, self.mode, report,
                            root_layer)
        compiled = _with_extra_inputs(compiled, extra) if extra else compiled
        if debug is not None:
            compiled = _debug_dumper(gm, debug, report, self.config, list(example_inputs))(compiled)
        return compiled


_RECENT_REPORTS: collections.deque[CompileReport] = collections.deque(maxlen=64)


def recent_reports() -> list[CompileReport]:
    """The `CompileReport`s of the last graphs lemo compiled in this process, oldest first (at
    most 64), from `backend="lemo"` and `LemoBackend` objects alike: how a user of the string
    backend sees what lemo did (each one is also logged at INFO level by the logger
    `lemo_compile.backend`)."""
    return list(_RECENT_REPORTS)


def lemo_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The function torch.compile calls for `backend="lemo"`; see the module docstring.

    Without `options`, those given to `register_with_accelerate(options)` apply, else the
    environment variable LEMO_OPTIONS (a JSON object of options): the ways to reach lemo through
    code that calls torch.compile for you (HF `Trainer` with `torch_compile_backend="lemo"`).
    """
    if options is None:
        options = _registered_options
    if options is None and os.environ.get(OPTIONS_VARIABLE):
        options = _options_from_environment()
    return LemoBackend(options, mode=mode)(gm, example_inputs)


OPTIONS_VARIABLE = "LEMO_OPTIONS"
_registered_options: LemoConfig | None = None


def register_with_accelerate(options: LemoConfig | Mapping[str, Any] | None = None) -> None:
    """Make Hugging Face accelerate accept the backend name "lemo", so that
    `TrainingArguments(torch_compile=True, torch_compile_backend="lemo")` works, for the HF
    `Trainer` and TRL's `SFTTrainer` alike; `options` (validated here) become the options of every
    `backend="lemo"` compile in this process that passes none (else LEMO_OPTIONS applies).

    The Trainer hands compilation to accelerate, whose `TorchDynamoPlugin` only takes the names of
    its `DynamoBackend` enum and refuses others ("'LEMO' is not a valid DynamoBackend"). This adds
    the member LEMO to that enum, in this process; accelerate then calls
    `torch.compile(model, backend="lemo")`. Nothing else of accelerate changes. Idempotent."""
    global _registered_options
    if options is not None:
        _registered_options = LemoConfig.from_options(options)
    from accelerate.utils import DynamoBackend

    if "LEMO" in DynamoBackend._value2member_map_:
        return
    member = str.__new__(DynamoBackend, "LEMO")
    member._name_, member._value_ = "LEMO", "LEMO"
    member.__objclass__ = DynamoBackend
    DynamoBackend._member_map_["LEMO"] = member
    DynamoBackend._value2member_map_["LEMO"] = member
    DynamoBackend._member_names_.append("LEMO")


def _compile_without_backward_reuse(inner_compile: Callable, gm, example_inputs, **kwargs):
    """Inductor's per-graph compile, with buffer reuse off for the backward graph only (the
    option `backward_buffer_reuse=False`, the default); the setting is part of Inductor's cache
    key."""
    if not kwargs.get("is_backward", False):
        return inner_compile(gm, example_inputs, **kwargs)
    with inductor_config.patch(allow_buffer_reuse=False):
        return inner_compile(gm, example_inputs, **kwargs)


def _options_from_environment() -> dict:
    text = os.environ[OPTIONS_VARIABLE]
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{OPTIONS_VARIABLE} must be a JSON object of lemo options: {err}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_VARIABLE} must be a JSON object of lemo options, got {text!r}")
    return options


def _compile(
    gm: fx.GraphModule, example_inputs, config: LemoConfig, mode: str | None, report: CompileReport,
    root_layer: int | None = None,
) -> Callable:
    # The backward graph is compiled later (at the first backward); its fusion counts land in the
    # same report.
    passes = []
    if report.training and config.fuse:
        passes.append(functools.partial(fuse_row_movements, counters=report.counters))
    if report.training and config.shorten_casts:
        passes.append(functools.partial(shorten_cast_lifetimes, counters=report.counters))
    if report.training and config.swiglu_in_place:
        passes.append(functools.partial(swiglu_backward_in_place, counters=report.counters))
    if report.training:
        passes.append(functools.partial(_record_post_grad, report=report))
    post_grad = InductorPasses(passes)
    joint = joint_graph_passes(config, report, report.counters, root_layer)
    if config.compiler == "inductor":
        patches = dict(list_mode_options(mode)) if mode else {}
        patches["post_grad_custom_post_pass"] = post_grad
        patches["joint_custom_post_pass"] = joint
        # read from the module at each compile (not bound at import), so a patched
        # compile_fx_inner (tests, profilers) is the one used
        inner_compile = inductor_compile_fx.compile_fx_inner
        if not config.backward_buffer_reuse:
            inner_compile = functools.partial(_compile_without_backward_reuse, inner_compile)
        return inductor_compile_fx.compile_fx(gm, example_inputs, inner_compile=inner_compile,
                                              config_patches=patches)

    def compile_without_codegen(graph_module: fx.GraphModule, inputs):
        post_grad(graph_module.graph)
        graph_module.recompile()
        return boxed_nop(graph_module, inputs)

    def partition(joint_module: fx.GraphModule, joint_inputs, **kwargs):
        joint(joint_module.graph)
        return min_cut_rematerialization_partition(joint_module, joint_inputs, compiler="inductor",
                                                   **kwargs)

    if mode:
        log.info("lemo: mode=%r has no effect with compiler='aot_eager'", mode)
    return aot_autograd(
        fw_compiler=compile_without_codegen,
        bw_compiler=compile_without_codegen,
        decompositions=inductor_compile_fx.select_decomp_table(),
        partition_fn=partition,
    )(gm, example_inputs)


def joint_graph_passes(config: LemoConfig, report: CompileReport, counters: dict[str, int],
                       root_layer: int | None = None) -> InductorPasses:
    """The passes lemo runs on a training graph's joint forward-backward graph before the
    partitioner (`passes/recompute.py`: what the forward saves), for `config` and the plans in
    `report`, counting into `counters`; none for an inference graph."""
    if not report.training:
        return InductorPasses([])
    saved = config.save_attention
    if saved == "dense":  # the layers that run dense as built (fallbacks included)
        saved = tuple(plan.layer for plan in report.plans if not plan.sparse)
    passes = [functools.partial(save_in_checkpoints, attention=saved,
                                sparse_layers=config.save_sparse_layers, counters=counters,
                                root_layer=root_layer)]
    if config.recompute_casts:
        passes.append(functools.partial(recompute_widening_casts, counters=counters))
    return InductorPasses(passes)


def _with_extra_inputs(compiled: Callable, extra: list[torch.Tensor]) -> Callable:
    """`compiled`, called with the caller's inputs followed by `extra` (Dynamo calls a backend's
    result with the inputs unpacked)."""

    def run(*args):
        return compiled(*args, *extra)

    return run


def _record_post_grad(graph: fx.Graph, report: CompileReport) -> None:
    """Keep the post-grad graph's code: the forward is compiled first, the backward second; of the
    backward, also the shapes of what it reads (`CompileReport.saved_for_backward`)."""
    name = "post_grad_backward" if "post_grad_forward" in report.graphs else "post_grad_forward"
    report.graphs[name] = graph.python_code("self").src
    if name == "post_grad_backward":
        for node in graph.find_nodes(op="placeholder"):
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and not node.name.startswith("tangents"):
                report.saved_for_backward[node.name] = (tuple(value.shape), value.dtype)


def _will_be_differentiated(example_inputs: Sequence[Any]) -> bool:
    """True when gradients are enabled and some input of the graph (a parameter, or the caller's
    tensor) requires grad: the graph is a training graph, whatever `module.training` says (a model
    from `from_pretrained` is in eval mode until `.train()`). Graphs run under `torch.no_grad()`
    or `torch.inference_mode()` are evaluation graphs."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
