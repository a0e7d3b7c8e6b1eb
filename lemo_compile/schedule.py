"""Sparsity schedules: lemo options that change over the steps of one training run.

    schedule = lemo_compile.SparsitySchedule.sparse_then_dense(0.75, {"keep_ratio": 0.4})
    for step, batch in enumerate(loader):                  # a plain loop
        schedule.apply(model, step, total_steps)           # compiles `model` when a phase begins
        model(**batch).loss.backward()
        ...
    Trainer(model=model, args=args, ..., callbacks=[schedule.callback()])   # or HF Trainer

A phase is a run of consecutive optimizer steps with fixed lemo options: static shapes within it,
so the model compiles once per phase (`nn.Module.compile` in place, with a new `LemoBackend`;
Dynamo recompiles because the backend changed). A phase can also switch gradient checkpointing on
or off, which is how a dense phase fits where the sparse phase fitted: dense activations of a
layer that lemo made sparse are larger, and checkpointing keeps only the layer inputs.

Why schedules: fine-tuning sparse all the way tunes the adapters to a sparse model, which is then
evaluated dense; ending with a few dense steps recovers most of that gap (README, "Sparsity
schedules").
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from lemo_compile.backend import LemoBackend
from lemo_compile.config import LemoConfig
from lemo_compile.passes.manager import LemoWarning

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Phase:
    """Consecutive training steps with fixed lemo options.

    options:  lemo options for the phase (as for `torch.compile(..., options=...)`); validated
              when the schedule is made. `{"keep_ratio": 1.0}` is a dense phase (lemo's compiled
              base: fast attention and the segmented loss, no token elimination).
    steps:    the phase's length in optimizer steps, or
    fraction: its length as a fraction of the run's total steps (rounded to whole steps, at
              cumulative boundaries). At most one of the two; the last phase may give neither and
              then lasts to the end. The last phase also goes on if the run is longer than planned.
    gradient_checkpointing: True or False switches HF gradient checkpointing (non-reentrant) on
              or off when the phase begins; None leaves it as it is.
    """

    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int | None = None
    fraction: float | None = None
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.fraction is not None:
            raise ValueError("a lemo Phase takes `steps` or `fraction`, not both")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"a lemo Phase's `steps` must be an int >= 1, got {self.steps!r}")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float))
                                              and 0 < self.fraction <= 1):
            raise ValueError(f"a lemo Phase's `fraction` must be in (0, 1], got {self.fraction!r}")
        if self.gradient_checkpointing not in (None, True, False):
            raise ValueError("a lemo Phase's `gradient_checkpointing` must be True, False or None")


class SparsitySchedule:
    """Phases of lemo options over a training run; `apply` puts the model in the phase of a step.

    phases:      the phases in order (see `Phase`); all but the last need a length.
    total_steps: the run's optimizer steps, needed when a phase is given as a fraction; may also
                 be passed to `apply` (the Trainer callback passes `state.max_steps`).
    backends:    one `LemoBackend` per phase, made when the phase is first applied (its `reports`
                 say what lemo compiled in that phase); None before.
    """

    def __init__(self, phases: Sequence[Phase], total_steps: int | None = None):
        phases = list(phases)
        if not phases or not all(isinstance(p, Phase) for p in phases):
            raise ValueError("a lemo SparsitySchedule needs a non-empty list of Phase objects")
        for index, phase in enumerate(phases[:-1]):
            if phase.steps is None and phase.fraction is None:
                raise ValueError(f"phase {index} of the lemo schedule has no length: only the last "
                                 "phase may leave `steps` and `fraction` unset")
        fractions = sum(p.fraction for p in phases if p.fraction is not None)
        if fractions > 1 + 1e-9:
            raise ValueError(f"the phases' fractions add up to {fractions:g}, more than the whole run")
        if total_steps is not None:
            _check_total(total_steps)
        self.phases = phases
        self.configs = [LemoConfig.from_options(p.options) for p in phases]  # fails early
        self.total_steps = total_steps
        self.backends: list[LemoBackend | None] = [None] * len(phases)
        self._phase_of: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
        self._checked_totals: set[int | None] = set()

    @classmethod
    def sparse_then_dense(cls, sparse_fraction: float = 0.75,
                          options: Mapping[str, Any] | None = None, *,
                          total_steps: int | None = None,
                          dense_checkpointing: bool = True) -> SparsitySchedule:
        """Sparse with `options` for the first `sparse_fraction` of the steps, then dense to the
        end (`keep_ratio=1.0`, `mlp="off"`, the other options kept: no token or channel is
        dropped), with gradient checkpointing switched on for the dense phase unless
        `dense_checkpointing` is False."""
        options = dict(options or {})
        dense = {**options, "keep_ratio": 1.0, "mlp": "off", "mlp_keep_ratio": None}
        return cls([
            Phase(options, fraction=sparse_fraction),
            Phase(dense, gradient_checkpointing=True if dense_checkpointing else None),
        ], total_steps)

    def boundaries(self, total_steps: int | None = None) -> list[int]:
        """The first step of each phase (step 0 begins the first)."""
        total = total_steps if total_steps is not None else self.total_steps
        starts, step, done = [0], 0, 0.0
        for phase in self.phases[:-1]:
            if phase.steps is not None:
                step += phase.steps
            else:
                if total is None:
                    raise ValueError("this lemo schedule has phases given as fractions: pass "
                                     "total_steps (to the schedule or to apply)")
                _check_total(total)
                done += phase.fraction
                step = max(step, round(done * total))
            starts.append(step)
        return starts

    def empty_phases(self, total_steps: int | None = None) -> list[int]:
        """The phases that get no step of a run of `total_steps` steps (or the schedule's own
        total): a short run rounds a fraction to nothing, or the earlier phases fill it. [] when
        the total is unknown and no phase is given as a fraction."""
        total = total_steps if total_steps is not None else self.total_steps
        if total is None and all(p.fraction is None for p in self.phases):
            return []
        starts = self.boundaries(total)
        ends = starts[1:] + [total if total is not None else starts[-1] + 1]
        return [index for index, (start, end) in enumerate(zip(starts, ends)) if end <= start]

    def phase_at(self, step: int, total_steps: int | None = None) -> int:
        """The index of the phase that optimizer step `step` (0-based) belongs to."""
        if step < 0:
            raise ValueError(f"a training step is >= 0, got {step}")
        starts = self.boundaries(total_steps)
        return max(i for i, start in enumerate(starts) if start <= step)

    def apply(self, model: torch.nn.Module, step: int,
              total_steps: int | None = None) -> torch.nn.Module:
        """Put `model` in the phase of optimizer step `step`: when that phase is not the one last
        applied to it, switch gradient checkpointing as the phase says and compile the model in
        place with the phase's options. Returns `model`. Pass the uncompiled model (the schedule
        compiles it); HF and PEFT models are supported."""
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise TypeError("pass the model itself to the lemo schedule, not the result of "
                            "torch.compile: the schedule compiles it, once per phase")
        index = self.phase_at(step, total_steps)
        total = total_steps if total_steps is not None else self.total_steps
        if total not in self._checked_totals:
            self._checked_totals.add(total)
            if empty := self.empty_phases(total):
                warnings.warn(
                    f"lemo: schedule phase(s) {[i + 1 for i in empty]} of {len(self.phases)} get "
                    f"no step of this {total}-step run (phase starts {self.boundaries(total)}): "
                    "their options never apply; lengthen the run or give the phases in steps",
                    LemoWarning, stacklevel=2)
        if self._phase_of.get(model) == index:
            return model
        phase = self.phases[index]
        if phase.gradient_checkpointing is not None:
            _set_checkpointing(model, phase.gradient_checkpointing)
        if self.backends[index] is None:
            self.backends[index] = LemoBackend(self.configs[index])
        model.compile(backend=self.backends[index])
        self._phase_of[model] = index
        log.info("lemo: schedule phase %d of %d from step %d: options %s%s", index + 1,
                 len(self.phases), step, dict(phase.options) or "(defaults)",
                 "" if phase.gradient_checkpointing is None else
                 f", gradient checkpointing {'on' if phase.gradient_checkpointing else 'off'}")
        return model

    def callback(self):
        """An HF `TrainerCallback` that applies the schedule before every optimizer step (the
        run's total is the Trainer's `max_steps`). Do not also set `torch_compile` in the
        `TrainingArguments`: the schedule compiles the model."""
        return LemoScheduleCallback(self)


class LemoScheduleCallback(TrainerCallback):
    """The HF `TrainerCallback` of `SparsitySchedule.callback()`: applies `schedule` to the
    Trainer's model at the start of every step."""

    def __init__(self, schedule: SparsitySchedule):
        self.schedule = schedule

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("the lemo schedule callback got no model from the Trainer")
        self.schedule.apply(model, state.global_step, state.max_steps or None)


def _check_total(total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Switch HF gradient checkpointing of `model` (a transformers or PEFT model), non-reentrant.
    transformers renamed it "activation checkpointing" after 5.17; either name is used."""
    if hasattr(model, "activation_checkpointing_enable"):
        enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    elif hasattr(model, "gradient_checkpointing_enable"):
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    else:
        raise TypeError(f"a lemo schedule phase switches gradient checkpointing, but "
                        f"{type(model).__name__} has no gradient_checkpointing_enable(): use a "
                        "transformers (or PEFT) model, or leave gradient_checkpointing=None")
    if on:
        enable(**kwargs)
    else:
        disable()
