"""Training predictors against the oracle (`calibrate`), measuring them (`predictor_recall`,
`recall_and_overlap`), the oracle's block scores themselves (`oracle_scores`), and per-layer keep
ratios from them (`layer_keep_ratios`).

All three run the frozen model on the user's batches through a capturing torch.compile backend:
lemo's region finder locates every sparse layer's attention input h and its queries and keys in the
Dynamo graph, the graph runs eagerly with those as extra outputs, and the oracle's tile maxima M are
computed from q and k (the Triton kernel on CUDA). So calibration works for any model the backend
supports, with no per-family code.

Training: per sparse layer, SmoothL1 between the lower triangle of the predictor's P and M divided
by its per-sample maximum (the selection only depends on the ranking, so the scale is free). With
mlp="tokens" in the options, each sparse MLP block gets an `MlpPredictor` too, fitted the same way
to the norm of its intermediate activation per token (the MLP's oracle score), from its input.
Metrics, per layer, with the plan's k kept blocks (for MLP blocks: `mlp_recall`, `mlp_overlap`):

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

from lemo_compile.config import LemoConfig
from lemo_compile.fx_utils import compile_apart
from lemo_compile.kernels.block_scores import block_tile_max, scores_from_tiles
from lemo_compile.ops import token_block_scores
from lemo_compile.passes.residual import canonical_residual_adds
from lemo_compile.plan import ModelSignature, plan_layers
from lemo_compile.predictors.bank import DISTANCES, PredictorBank
from lemo_compile.regions import find_regions, model_signature


@dataclasses.dataclass
class LayerSample:
    """One batch of one sparse layer: attention input h [B, S, D] and oracle tile maxima M [B, n, n];
    with mlp="tokens", also the MLP's input mlp_h [B, S, D] and its oracle per-token scores
    mlp_scores [B, S] (the norm of the intermediate activation)."""

    h: torch.Tensor
    tiles: torch.Tensor
    mlp_h: torch.Tensor | None = None
    mlp_scores: torch.Tensor | None = None


class _Capture:
    """A torch.compile backend that runs the graph eagerly and records, per sparse layer of the plan,
    a `LayerSample` in `samples` (replaced at every call)."""

    def __init__(self, config: LemoConfig) -> None:
        self.config = config
        self.samples: dict[int, LayerSample] = {}
        self.signature: ModelSignature | None = None
        self.kept_blocks: dict[int, int] = {}
        self.mlp_kept_blocks: dict[int, int] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Any:
        canonical_residual_adds(gm)
        regions = find_regions(gm)
        found = {l.index: l for l in regions.layers if l.attention is not None}
        if not found and not regions.problems:
            return gm.forward  # a graph without attention (split off by a graph break)
        if not found:
            raise ValueError("lemo calibrate: no decoder layers recognised: "
                             + "; ".join(regions.problems))
        plans = plan_layers(self.config, len(regions.layers), regions.seq_len)
        layers = [p.layer for p in plans if p.sparse and p.layer in found]
        if not layers:
            raise ValueError("lemo calibrate: no layer is sparse with these options at this length")
        self.signature = model_signature(found[layers[0]].attention, len(regions.layers),
                                         self.config.block_size)
        self.kept_blocks = {p.layer: p.kept_blocks for p in plans if p.layer in layers}
        self.mlp_kept_blocks = {p.layer: p.mlp_kept_blocks for p in plans
                                if p.layer in layers and p.mlp_sparse}
        extras = []
        for layer in layers:
            block = found[layer].attention
            h = block.attention_input()
            if h is None:
                raise ValueError(f"lemo calibrate: layer {layer}'s attention input was not found")
            extras += [h, block.query, block.key]
            if layer in self.mlp_kept_blocks:
                extras += _mlp_nodes(found[layer])
        output = next(n for n in gm.graph.nodes if n.op == "output")
        originals = output.args[0]
        output.args = (tuple(originals) + tuple(extras),)
        gm.recompile()
        count = len(originals)
        batch, seq_len = regions.batch_size, regions.seq_len

        def run(*args):
            values = list(gm(*args))
            extra = iter(values[count:])
            for layer in layers:
                h, q, k = next(extra), next(extra), next(extra)
                sample = LayerSample(h.detach(), block_tile_max(q, k, self.config.block_size))
                if layer in self.mlp_kept_blocks:
                    mlp_h, intermediate = next(extra), next(extra)
                    sample.mlp_h = mlp_h.detach().reshape(batch, seq_len, -1)
                    sample.mlp_scores = intermediate.detach().float().reshape(
                        batch, seq_len, -1).norm(dim=-1)
                self.samples[layer] = sample
            return tuple(values[:count])

        return run


def _mlp_nodes(layer) -> list[fx.Node]:
    """The MLP block's input and intermediate activation (what its down projection reads)."""
    a = layer.mlp.mlp_activation() if layer.mlp is not None else None
    h = layer.mlp.linear_input() if layer.mlp is not None else None
    if a is None or h is None:
        raise ValueError(f"lemo calibrate: layer {layer.index}'s MLP block (its input and its "
                         "intermediate activation) was not recognised, so mlp='tokens' cannot be "
                         "calibrated")
    return [h, a]


def _run_frozen(model, capture: _Capture, batches: Iterable) -> Iterable[dict[int, LayerSample]]:
    """Yield the captured samples of each batch (a tensor of input ids or a dict of model kwargs)."""
    compiled = compile_apart(model, capture)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            kwargs.setdefault("use_cache", False)
            capture.samples = {}
            # one graph per sequence length: as many lengths as the batches have
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1024,
                                                             accumulated_recompile_limit=1024):
                compiled(**kwargs)
            if not capture.samples:
                raise RuntimeError(
                    "lemo calibrate: torch.compile ran this batch without lemo's capturing backend "
                    "(Dynamo fell back to eager: a graph break, or its recompile limit), so no "
                    "oracle labels were recorded")
            yield capture.samples
    finally:
        model.train(was_training)


def _sigma(tiles: torch.Tensor, config: LemoConfig) -> torch.Tensor:
    """Block scores [B, n] from tile maxima M or a predictor's P [B, n, n] (its lower triangle),
    as the compiled step computes them with `config` (option `distance_normalized`)."""
    return scores_from_tiles(torch.tril(tiles), config.distance_normalized)


def recall_and_overlap(predicted: torch.Tensor, oracle: torch.Tensor, kept: int) -> tuple[float, float]:
    """Mean over the batch of recall and overlap (module docstring) of the `kept` blocks that
    block scores `predicted` [B, n] select against those `oracle` [B, n] selects."""
    chosen = _top_blocks(predicted, kept)
    wanted = _top_blocks(oracle, kept)
    hits = torch.zeros_like(oracle, dtype=torch.bool).scatter_(1, chosen, True)
    recall = hits.gather(1, wanted).float().mean(dim=1)
    overlap = oracle.gather(1, chosen).sum(dim=1) / oracle.gather(1, wanted).sum(dim=1).clamp_min(1e-30)
    return recall.mean().item(), overlap.mean().item()


def _top_blocks(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """The kept block indices [B, k] of the selection rule (ties: lower index first)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kept]


def oracle_scores(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
) -> tuple[list[dict[int, torch.Tensor]], dict[int, int]]:
    """The oracle's block scores (sigma, float32 [B, n]) of the frozen `model` on each of
    `batches`, per sparse layer of the plan `options` give, and per such layer the number of
    blocks it keeps; model, batches and options as for `calibrate`. As in calibration, every
    layer is read in the dense forward: the first sparse layer's scores are those lemo's step
    selects with, a later one's differ from the step's by what earlier sparse layers drop."""
    capture = _Capture(LemoConfig.from_options(options))
    scores = [{layer: _sigma(sample.tiles.float(), capture.config)
               for layer, sample in samples.items()}
              for samples in _run_frozen(model, capture, batches)]
    return scores, capture.kept_blocks


def calibrate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    width: int = 128,
    rank: int = 32,
    distances: int = DISTANCES,
    shrink: bool = False,
    loss: str = "tiles",
    progress: bool = True,
) -> PredictorBank:
    """Train a `PredictorBank` for `model`'s sparse layers against the oracle.

    model:   any model the lemo backend supports; it is frozen (eval, no grad) throughout.
    batches: input ids [B, S] tensors, or dicts of model kwargs; iterated once, or `steps` times
             (cycling) when given. Lengths may differ between batches (each length compiles once).
    options: lemo options (block_size, keep_ratio, dense_layers; mlp, mlp_keep_ratio) deciding
             which layers are sparse and how many blocks they keep, as they will be used in
             training. With mlp="tokens", MLP predictors are trained too.
    width, rank: the predictors' hidden width and feature count.
    distances: how many block distances get their own learned bias (`bank` module docstring); 1
             leaves the predictors without one (a constant bias changes no ranking), as the paper's.
    shrink:  elastic shrinking: hidden units never active during the last quarter of the steps are
             removed at the end (`PredictorBank.shrink`).
    loss:    "tiles" (module docstring) or "ranking": the same plus a pairwise logistic loss on the
             block scores, between every block the oracle keeps and every block it drops.
    Returns the bank (frozen, eval mode), on the model's device; save it with `bank.save(path)`.
    """
    if loss not in ("tiles", "ranking"):
        raise ValueError(f"lemo calibrate: loss must be 'tiles' or 'ranking', got {loss!r}")
    if distances < 1:
        raise ValueError(f"lemo calibrate: distances must be at least 1, got {distances}")
    config = LemoConfig.from_options(options)
    capture = _Capture(config)
    if steps is not None:
        batches = itertools.islice(itertools.cycle(batches), steps)
    bank = optimizer = None
    bar = _progress(steps, progress)
    activity: dict[int, dict] = {}
    for step, samples in enumerate(_run_frozen(model, capture, batches)):
        if bank is None:
            bank = PredictorBank(capture.signature, samples, width=width, rank=rank,
                                 mlp_layers=capture.mlp_kept_blocks, distances=distances)
            bank.to(next(iter(samples.values())).h.device)
            optimizer = torch.optim.Adam(bank.parameters(), lr=lr)
        observe = shrink and (steps is None or step >= steps * 3 // 4)
        total = torch.zeros((), device=next(bank.parameters()).device)
        recalls, mlp_recalls = [], []
        for layer, sample in samples.items():
            predictor = bank.predictor(layer)
            if observe:
                activity[layer] = predictor.hidden_activity(sample.h, activity.get(layer))
            scores = predictor(sample.h)
            total = total + _fit_loss(scores, sample.tiles)
            predicted = _sigma(scores, config)
            oracle = _sigma(sample.tiles, config)
            if loss == "ranking":
                total = total + _ranking_loss(predicted, oracle, capture.kept_blocks[layer])
            recalls.append(recall_and_overlap(predicted.detach(), oracle,
                                              capture.kept_blocks[layer])[0])
            if sample.mlp_h is not None:
                token_scores = bank.mlp_predictor(layer)(sample.mlp_h)
                total = total + fit_token_loss(token_scores, sample.mlp_scores)
                mlp_recalls.append(_mlp_recall_and_overlap(
                    token_scores.detach(), sample.mlp_scores, config.block_size,
                    capture.mlp_kept_blocks[layer])[0])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        bar.update(1)
        shown = {"step": step + 1, "loss": f"{total.item():.4f}",
                 "recall": f"{sum(recalls) / len(recalls):.3f}"}
        if mlp_recalls:
            shown["mlp_recall"] = f"{sum(mlp_recalls) / len(mlp_recalls):.3f}"
        bar.set_postfix(**shown)
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


def _ranking_loss(predicted: torch.Tensor, oracle: torch.Tensor, kept: int) -> torch.Tensor:
    """Mean softplus(-4 (z_keep - z_drop)) over all pairs of a block the oracle keeps and one it
    drops, z: the predicted block scores [B, n] standardised per sample."""
    spread = predicted.std(dim=1, keepdim=True).clamp_min(1e-6)
    z = (predicted - predicted.mean(dim=1, keepdim=True)) / spread
    order = _top_blocks(oracle, oracle.shape[1])
    keep, drop = z.gather(1, order[:, :kept]), z.gather(1, order[:, kept:])
    return F.softplus(-4 * (keep[:, :, None] - drop[:, None, :])).mean()


def fit_token_loss(predicted: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """SmoothL1 between predicted per-token scores [B, S] and target ones (the MLP oracle's, or any
    per-token measure) divided by their per-sample max: the fit of an `MlpPredictor`."""
    target = scores / scores.amax(dim=1, keepdim=True).clamp_min(1e-30)
    return F.smooth_l1_loss(predicted, target, beta=0.1)


def _mlp_recall_and_overlap(predicted: torch.Tensor, scores: torch.Tensor, block_size: int,
                            kept: int) -> tuple[float, float]:
    """Recall and overlap of MLP block selection from per-token scores [B, S] (predicted, oracle)."""
    return recall_and_overlap(token_block_scores(predicted, block_size),
                              token_block_scores(scores, block_size), kept)


def predictor_recall(
    model: torch.nn.Module,
    bank: PredictorBank,
    batches: Iterable,
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
) -> dict[int, dict[str, float]]:
    """Per sparse layer, the predictors' mean `recall` and `overlap` (module docstring) against
    the oracle on `batches`, with the plan's kept blocks; `options` as for `calibrate`. With
    mlp="tokens" and a bank that has MLP predictors, also `mlp_recall` and `mlp_overlap`, the
    same for the MLP blocks' selection."""
    config = LemoConfig.from_options(options)
    capture = _Capture(config)
    totals: dict[int, dict[str, list[float]]] = {}
    for samples in _run_frozen(model, capture, batches):
        bank.check_fits(capture.signature, samples, capture.mlp_kept_blocks)
        for layer, sample in samples.items():
            values = totals.setdefault(layer, {})
            with torch.no_grad():
                predicted = _sigma(bank.predictor(layer)(sample.h), config)
                pairs = [("", recall_and_overlap(predicted, _sigma(sample.tiles, config),
                                                 capture.kept_blocks[layer]))]
                if sample.mlp_h is not None and layer in bank.mlp_layers:
                    pairs.append(("mlp_", _mlp_recall_and_overlap(
                        bank.mlp_predictor(layer)(sample.mlp_h), sample.mlp_scores,
                        config.block_size, capture.mlp_kept_blocks[layer])))
            for prefix, (recall, overlap) in pairs:
                values.setdefault(prefix + "recall", []).append(recall)
                values.setdefault(prefix + "overlap", []).append(overlap)
    return {layer: {name: sum(v) / len(v) for name, v in values.items()}
            for layer, values in totals.items()}


def layer_keep_ratios(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    options: LemoConfig | Mapping[str, Any] | None = None,
) -> tuple[float, ...]:
    """Per-layer keep ratios that spend the blocks `options` spend, shifted to the layers whose
    oracle scores are spread over more blocks (sparsity differs by layer: LeMo's observation).

    model, batches: as for `calibrate` (the model frozen; batches iterated once). options: lemo's
    options; their sparse layers and the mean of those layers' keep ratios (the budget) are kept.
    Per sparse layer and sample, the share of the sample's total block score (sigma) held by its
    top k blocks; a coverage target t gives each layer the mean over samples of (the fewest blocks
    whose share reaches t) / n, and t is the largest target whose ratios average at most the
    budget (`ratios_for_coverage`). Returns one ratio per decoder layer, 1.0 for the dense ones:
    pass it as options["keep_ratio"] with the same other options.
    """
    config = LemoConfig.from_options(options)
    capture = _Capture(config)
    shares: dict[int, list[torch.Tensor]] = {}
    for samples in _run_frozen(model, capture, batches):
        for layer, sample in samples.items():
            ordered = _sigma(sample.tiles.float(), config).sort(dim=1, descending=True).values
            total = ordered.sum(dim=1, keepdim=True).clamp_min(1e-30)
            shares.setdefault(layer, []).append((ordered.cumsum(dim=1) / total).cpu())
    if not shares:
        raise ValueError("lemo layer_keep_ratios: no batches")
    budget = sum(config.keep_ratio_of(layer) for layer in shares) / len(shares)
    ratios = ratios_for_coverage(shares, budget)
    return tuple(ratios.get(layer, 1.0) for layer in range(capture.signature.layers))


def ratios_for_coverage(shares: Mapping[int, list[torch.Tensor]], budget: float) -> dict[int, float]:
    """Per layer, the keep ratio reaching the largest common coverage target within `budget`.

    shares: per layer, tensors [B, n] of the cumulative share of the block score held by each
    sample's top 1..n blocks (non-decreasing along n, ending at 1). For a target t in [0, 1], a
    sample needs min(n, 1 + #{k: share_k < t}) blocks; a layer's ratio is the mean over its
    samples of that count over n. Returns the ratios at the largest t (bisection, to 1e-6) whose
    mean over the layers is at most `budget`, or at t = 0 (one block each) if none is."""
    def at(target: float) -> dict[int, float]:
        ratios = {}
        for layer, tensors in shares.items():
            needed = [((s < target).sum(dim=1) + 1).clamp(max=s.shape[1]) / s.shape[1]
                      for s in tensors]
            ratios[layer] = torch.cat(needed).float().mean().item()
        return ratios

    def mean(ratios: dict[int, float]) -> float:
        return sum(ratios.values()) / len(ratios)

    everything = at(1.0)
    if mean(everything) <= budget:
        return everything
    low, high = 0.0, 1.0
    while high - low > 1e-6:
        middle = (low + high) / 2
        if mean(at(middle)) <= budget:
            low = middle
        else:
            high = middle
    return at(low)


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lemo calibrate", disable=not enabled, unit="step")
