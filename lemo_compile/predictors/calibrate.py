"""Training predictors against the oracle (`calibrate`) and measuring them (`predictor_recall`).

Both run the frozen model on the user's batches through a capturing torch.compile backend: lemo's
region finder locates every sparse layer's attention input h and its queries and keys in the Dynamo
graph, the graph runs eagerly with those as extra outputs, and the oracle's tile maxima M are
computed from q and k (the Triton kernel on CUDA). So calibration works for any model the backend
supports, with no per-family code.

Training: per sparse layer, SmoothL1 between the lower triangle of the predictor's P and M divided
by its per-sample maximum (the selection only depends on the ranking, so the scale is free).
Metrics, per layer, with the plan's k kept blocks:

* recall: the fraction of the oracle's kept blocks that the predictor also keeps;
* overlap: the oracle score mass (sigma) of the predictor's kept blocks over that of the oracle's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from lemo_compile.config import LemoConfig, plan_layers
from lemo_compile.kernels.block_scores import block_tile_max, scores_from_tiles
from lemo_compile.predictors.bank import ModelSignature, PredictorBank
from lemo_compile.regions import find_regions


@dataclasses.dataclass
class LayerSample:
    """One batch of one sparse layer: attention input h [B, S, D] and oracle tile maxima M [B, n, n]."""

    h: torch.Tensor
    tiles: torch.Tensor


class _Capture:
    """A torch.compile backend that runs the graph eagerly and records, per sparse layer of the plan,
    a `LayerSample` in `samples` (replaced at every call)."""

    def __init__(self, config: LemoConfig) -> None:
        self.config = config
        self.samples: dict[int, LayerSample] = {}
        self.signature: ModelSignature | None = None
        self.kept_blocks: dict[int, int] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Any:
        from lemo_compile.passes.select import model_signature

        regions = find_regions(gm)
        blocks = {l.index: l.attention for l in regions.layers if l.attention is not None}
        if not blocks:
            raise ValueError("lemo calibrate: no decoder layers recognised: "
                             + "; ".join(regions.problems))
        plans = plan_layers(self.config, len(regions.layers), regions.seq_len)
        layers = [p.layer for p in plans if p.sparse and p.layer in blocks]
        if not layers:
            raise ValueError("lemo calibrate: no layer is sparse with these options at this length")
        self.signature = model_signature(blocks[layers[0]], len(regions.layers), self.config.block_size)
        self.kept_blocks = {p.layer: p.kept_blocks for p in plans if p.layer in layers}
        extras = []
        for layer in layers:
            h = blocks[layer].attention_input()
            if h is None:
                raise ValueError(f"lemo calibrate: layer {layer}'s attention input was not found")
            extras += [h, blocks[layer].query, blocks[layer].key]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        originals = output.args[0]
        output.args = (tuple(originals) + tuple(extras),)
        gm.recompile()
        count = len(originals)

        def run(*args):
            values = gm(*args)
            for i, layer in enumerate(layers):
                h, q, k = values[count + 3 * i : count + 3 * i + 3]
                self.samples[layer] = LayerSample(h.detach(), block_tile_max(q, k, self.config.block_size))
            return tuple(values[:count])

        return run


def _run_frozen(model, capture: _Capture, batches: Iterable) -> Iterable[dict[int, LayerSample]]:
    """Yield the captured samples of each batch (a tensor of input ids or a dict of model kwargs)."""
    compiled = torch.compile(model, backend=capture, dynamic=False)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            kwargs.setdefault("use_cache", False)
            with torch.no_grad():
                compiled(**kwargs)
            yield capture.samples
    finally:
        model.train(was_training)


def _recall_and_overlap(predicted: torch.Tensor, oracle: torch.Tensor, kept: int) -> tuple[float, float]:
    """Mean over the batch of recall and overlap (module docstring) for scores [B, n]."""
    chosen = _top_blocks(predicted, kept)
    wanted = _top_blocks(oracle, kept)
    hits = torch.zeros_like(oracle, dtype=torch.bool).scatter_(1, chosen, True)
    recall = hits.gather(1, wanted).float().mean(dim=1)
    overlap = oracle.gather(1, chosen).sum(dim=1) / oracle.gather(1, wanted).sum(dim=1).clamp_min(1e-30)
    return recall.mean().item(), overlap.mean().item()


def _top_blocks(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """The kept block indices [B, k] of the selection rule (ties: lower index first)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kept]


def calibrate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    width: int = 128,
    rank: int = 32,
    shrink: bool = False,
    progress: bool = True,
) -> PredictorBank:
    """Train a `PredictorBank` for `model`'s sparse layers against the oracle.

    model:   any model the lemo backend supports; it is frozen (eval, no grad) throughout.
    batches: input ids [B, S] tensors, or dicts of model kwargs; iterated once, or `steps` times
             (cycling) when given. Lengths may differ between batches (each length compiles once).
    options: lemo options (block_size, keep_ratio, dense_layers) deciding which layers are sparse
             and how many blocks they keep, as they will be used in training.
    width, rank: the predictors' hidden width and feature count.
    shrink:  elastic shrinking: hidden units never active during the last quarter of the steps are
             removed at the end (`PredictorBank.shrink`).
    Returns the bank (frozen, eval mode), on the model's device; save it with `bank.save(path)`.
    """
    config = LemoConfig.from_options(options)
    capture = _Capture(config)
    if steps is not None:
        batches = itertools.islice(itertools.cycle(batches), steps)
    bank = optimizer = None
    bar = _progress(steps, progress)
    activity: dict[int, dict] = {}
    for step, samples in enumerate(_run_frozen(model, capture, batches)):
        if bank is None:
            bank = PredictorBank(capture.signature, samples, width=width, rank=rank)
            bank.to(next(iter(samples.values())).h.device)
            optimizer = torch.optim.Adam(bank.parameters(), lr=lr)
        observe = shrink and (steps is None or step >= steps * 3 // 4)
        loss = torch.zeros((), device=next(bank.parameters()).device)
        recalls = []
        for layer, sample in samples.items():
            predictor = bank.predictor(layer)
            if observe:
                activity[layer] = predictor.hidden_activity(sample.h, activity.get(layer))
            scores = predictor(sample.h)
            loss = loss + _fit_loss(scores, sample.tiles)
            with torch.no_grad():
                predicted = scores_from_tiles(torch.tril(scores))
                recalls.append(_recall_and_overlap(
                    predicted, scores_from_tiles(sample.tiles), capture.kept_blocks[layer])[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(step=step + 1, loss=f"{loss.item():.4f}",
                        recall=f"{sum(recalls) / len(recalls):.3f}")
    bar.close()
    if bank is None:
        raise ValueError("lemo calibrate: no batches")
    if activity:
        bank.shrink(activity)
    return bank.requires_grad_(False).eval()


def _fit_loss(predicted: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """SmoothL1 between P and M / max(M) per sample, over the causal (lower) triangle."""
    n = tiles.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=tiles.device).tril()
    target = tiles / tiles.amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    return F.smooth_l1_loss(predicted[:, lower], target[:, lower], beta=0.1)


def predictor_recall(
    model: torch.nn.Module,
    bank: PredictorBank,
    batches: Iterable,
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
) -> dict[int, dict[str, float]]:
    """Per sparse layer, the predictors' mean `recall` and `overlap` (module docstring) against
    the oracle on `batches`, with the plan's kept blocks; `options` as for `calibrate`."""
    config = LemoConfig.from_options(options)
    capture = _Capture(config)
    totals: dict[int, list[tuple[float, float]]] = {}
    for samples in _run_frozen(model, capture, batches):
        bank.check_fits(capture.signature, samples)
        for layer, sample in samples.items():
            with torch.no_grad():
                predicted = scores_from_tiles(torch.tril(bank.predictor(layer)(sample.h)))
            totals.setdefault(layer, []).append(_recall_and_overlap(
                predicted, scores_from_tiles(sample.tiles), capture.kept_blocks[layer]))
    return {
        layer: {"recall": sum(r for r, _ in values) / len(values),
                "overlap": sum(o for _, o in values) / len(values)}
        for layer, values in totals.items()
    }


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lemo calibrate", disable=not enabled, unit="step")
