"""Padded batches (`attention_mask`): every row is computed as if it ran alone.

Semantics (README, "Semantics": padded batches): a row with L real tokens keeps what it would keep as a batch
of one of those L tokens: its own blocks (cut from its first real token), scored from its real
tokens only, `kept_blocks(ratio, L // b)` of them plus its L % b tail. Padding is never kept. The
compacted block has a static size fixed by S (`padded_kept_tokens`); the extra rows are fillers,
hidden as keys, whose results are dropped.

Tolerances, float32: logits and loss 1e-5 (rtol and atol), gradients rtol 1e-5 / atol 1e-6 against
rows compiled alone (measured when written: at most 2e-7 and 2e-8); 1e-4 against the eager reference
(`reference.lemo_forward_padded`), like the other reference tests.
"""

from __future__ import annotations

import functools
import random
import warnings

import pytest
import torch
from torch import fx

import lemo_compile
from conftest import grads, tiny_llama, token_batch
from lemo_compile import ops
from lemo_compile.config import LemoConfig
from lemo_compile.plan import kept_blocks, padded_kept_tokens, plan_layers
from reference import lemo_forward_padded, select_token_indices

BLOCK = 16
OPTIONS = {"compiler": "aot_eager", "block_size": BLOCK, "dense_layers": [0], "loss_segment": None}
SEQ = 150
# full blocks / tail / kept alone (ratio 0.4): 9/6/4 blocks (70 tokens), 6/1/3 (49), 2/9/1 (25),
# 1/4/all (20: a row that alone runs dense)
LENGTHS = (150, 97, 41, 20)


def _rows(lengths=LENGTHS, seed=1):
    return [token_batch(1, length, seed=seed + i)[0] for i, length in enumerate(lengths)]


def padded_batch(rows, side: str, seq_len: int = SEQ):
    """(input_ids, attention_mask, labels, position_ids) of `rows` padded on `side` to seq_len.
    labels are -100 at padding and, with left padding, at each row's first real token (which
    follows padding, so the batch would predict it from a padding position)."""
    ids = torch.zeros(len(rows), seq_len, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        start = 0 if side == "right" else seq_len - len(row)
        ids[r, start:start + len(row)] = row
        mask[r, start:start + len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if side == "left":
        for r, row in enumerate(rows):
            labels[r, seq_len - len(row)] = -100
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, labels, position_ids


# the row-by-row comparisons compile each row alone: 3 layers (two sparse, one feeding the
# other) keep what 4 would test at three quarters of the tracing time
ALONE_LAYERS = 3


@functools.lru_cache(maxsize=None)
def _alone(lengths=LENGTHS, options: tuple = ()):
    """Each row compiled alone (its real tokens only, no mask), with OPTIONS and `options` (the
    items of a dict), on ALONE_LAYERS layers: per row (logits [L, V], loss, counted labels,
    grads)."""
    results = []
    for row in _rows(lengths):
        torch._dynamo.reset()
        model = tiny_llama(layers=ALONE_LAYERS)
        backend = lemo_compile.LemoBackend({**OPTIONS, **dict(options)})
        out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=row[None], labels=row[None])
        out.loss.backward()
        assert not any(p.padded for p in backend.reports[-1].plans)
        results.append((out.logits[0].detach(), out.loss.detach(), len(row) - 1, grads(model)))
    return results


@pytest.mark.parametrize("side, positions, options", [
    ("right", True, ()), ("left", True, ()), ("left", False, ()),
    ("left", True, (("keep_first_blocks", 1), ("keep_last_blocks", 1))),
    ("left", True, (("distance_normalized", True),)),
])
def test_padded_batch_equals_each_row_compiled_alone(side, positions, options):
    """positions=False: HF's default positions (0 .. S-1 for every row); a left-padded row's then
    start at its padding count, which RoPE's relative form makes equal to rounding. With
    keep_first_blocks and keep_last_blocks each row keeps its own first and last blocks; with
    distance_normalized each row's tiles are divided by the means of its own blocks' tiles."""
    ids, mask, labels, position_ids = padded_batch(_rows(), side)
    model = tiny_llama(layers=ALONE_LAYERS)
    backend = lemo_compile.LemoBackend({**OPTIONS, **dict(options)})
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    extra = {"position_ids": position_ids} if positions else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", lemo_compile.LemoWarning)  # padding is handled: no warning
        out = compiled(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    got = grads(model)
    report = backend.reports[-1]
    assert report.counters["sparse_layers"] == 2
    assert [(p.padded, p.kept_blocks, p.kept_tokens) for p in report.plans] == [
        (True, 9, 150), (True, 4, 79), (True, 4, 79)]

    alone = _alone(options=options)
    total = sum(counted for _, _, counted, _ in alone)
    for r, (logits, _, _, _) in enumerate(alone):
        torch.testing.assert_close(out.logits[r][mask[r].bool()], logits, rtol=1e-5, atol=1e-5,
                                   msg=f"row {r}")
    want_loss = sum(loss * counted for _, loss, counted, _ in alone) / total
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, grad in got.items():
        want = sum(row_grads[name] * counted for _, _, counted, row_grads in alone) / total
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=name)


def _assert_matches_padded_reference(model, batch, backend, positions=True, **reference_options):
    """One compiled training step on a padded batch against `lemo_forward_padded`: logits at real
    tokens, loss and every gradient within 1e-4."""
    ids, mask, labels, position_ids = batch
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    extra = {"position_ids": position_ids} if positions else {}
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    logits, loss = lemo_forward_padded(model, ids, mask, labels, block_size=BLOCK, **reference_options)
    loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    return compiled


@pytest.mark.parametrize("side", ["left"])
def test_mlp_tokens_on_a_padded_batch_matches_the_reference(side):
    model = tiny_llama()
    backend = lemo_compile.LemoBackend({**OPTIONS, "mlp": "tokens", "mlp_keep_ratio": 0.25})
    _assert_matches_padded_reference(model, padded_batch(_rows(), side), backend, keep_ratio=0.4,
                                     dense_layers=[0], mlp="tokens", mlp_keep_ratio=0.25)
    report = backend.reports[-1]
    assert report.counters["mlp_sparse_layers"] == 3
    # 0.25: a full row keeps 3 of its 9 blocks and its tail of 6 (54), more than any shorter row
    # (8 blocks + 15: 2 * 16 + 15 = 47); with 0.4 (the attention) a row of 143 keeps the most
    assert [p.mlp_kept_tokens for p in report.plans] == [150, 54, 54, 54]
    assert [p.kept_tokens for p in report.plans] == [150, 79, 79, 79]


def test_predictor_scorer_on_a_padded_batch_matches_the_reference():
    from lemo_compile.kernels.block_scores import scores_from_tiles
    from lemo_compile.predictors import ModelSignature, PredictorBank

    torch.manual_seed(0)
    bank = PredictorBank(ModelSignature(64, 4, 16, 4, BLOCK), [1, 2, 3], width=16, rank=4)

    def scores(layer, h):
        return scores_from_tiles(torch.tril(bank.predictor(layer)(h)))

    backend = lemo_compile.LemoBackend({**OPTIONS, "scorer": "predictor", "predictors": bank})
    _assert_matches_padded_reference(tiny_llama(), padded_batch(_rows(), "left"), backend,
                                     keep_ratio=0.4, dense_layers=[0], scorer=scores)
    assert backend.reports[-1].counters["sparse_layers"] == 3


class Recording(lemo_compile.LemoBackend):
    def __call__(self, gm, example_inputs, **kwargs):
        self.gm, self.example_inputs = gm, list(example_inputs)
        return super().__call__(gm, example_inputs, **kwargs)


def _selections(backend: Recording) -> dict[tuple[str, int], torch.Tensor]:
    """Run the rewritten Dynamo graph on the inputs it was compiled for and collect what each
    layer selected: {(role, layer): value} for roles select / select_valid / mlp_select / ..."""
    found = {}

    class Capture(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            tag = node.meta.get("custom") or {}
            if tag.get("lemo") in ("select", "select_valid", "mlp_select", "mlp_select_valid"):
                found[(tag["lemo"], tag["lemo_layer"])] = value
            return value

    with torch.no_grad():
        Capture(backend.gm).run(*backend.example_inputs)
    return found


def _assert_own_selection(idx, valid, mask, ratio, kept_tokens):
    """Every row keeps exactly what it keeps alone: whole blocks of its own grid plus its tail, as
    many as its own plan says; no padding; idx sorted and distinct, of the static size."""
    assert idx.shape == (mask.shape[0], kept_tokens)
    for r in range(mask.shape[0]):
        row = idx[r].tolist()
        assert row == sorted(set(row)), "indices sorted and distinct"
        real = mask[r].bool()
        chosen = idx[r][valid[r]]
        assert real[chosen].all(), f"row {r}: padding selected"
        rank = (real.cumsum(0) - 1)[chosen]          # index among the row's real tokens
        length = int(real.sum())
        full = length // BLOCK
        blocks = sorted({int(t) // BLOCK for t in rank if t < full * BLOCK})
        assert len(blocks) == kept_blocks(ratio, full), f"row {r}"
        expected = [p * BLOCK + t for p in blocks for t in range(BLOCK)]
        assert rank.tolist() == expected + list(range(full * BLOCK, length)), f"row {r}"


@pytest.mark.parametrize("side, scorer", [("right", {"scorer": "oracle", "mlp": "tokens"}),
                                          ("left", {"scorer": "oracle", "mlp": "tokens"}),
                                          ("left", {"scorer": "random", "seed": 5})])
def test_padding_is_never_selected(side, scorer):
    """The selection itself, read from the running graph: per row, exactly its own kept blocks of
    real tokens (aligned to its first real token) plus its tail; fillers are flagged invalid."""
    ids, mask, labels, _ = padded_batch(_rows(), side)
    backend = Recording({**OPTIONS, **scorer})
    torch.compile(tiny_llama(), backend=backend, fullgraph=True)(
        input_ids=ids, attention_mask=mask, labels=labels)
    found = _selections(backend)
    plans = backend.reports[-1].plans
    roles = [("select", "select_valid", 0.4)]
    if scorer.get("mlp") == "tokens":
        roles.append(("mlp_select", "mlp_select_valid", 0.4))
    for layer in (1, 2, 3):
        for select, valid, ratio in roles:
            tokens = plans[layer].kept_tokens if select == "select" else plans[layer].mlp_kept_tokens
            _assert_own_selection(found[(select, layer)], found[(valid, layer)], mask, ratio, tokens)


def test_selection_ops_keep_each_rows_own_blocks():
    """ops.kept_row_tokens / select_kept_tokens / tokens_at against the reference selection of each
    row alone, on random scores and masks: right, left, and holes (mask zeros anywhere)."""
    rng = random.Random(0)
    seq_len, block = 70, 8
    for trial in range(30):
        batch = 4
        mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        for r in range(batch):
            length = rng.randint(0, seq_len)
            kind = trial % 3
            if kind == 0:
                mask[r, :length] = True
            elif kind == 1:
                mask[r, seq_len - length:] = True
            else:
                mask[r, torch.randperm(seq_len)[:length]] = True
        n = seq_len // block
        ratio = rng.choice([0.1, 0.4, 0.5, 0.9])
        scores = torch.rand(batch, n)
        scores[0, :2] = scores[0, 2]  # ties: the lower block first
        kept = ops.kept_row_tokens(scores, mask, ratio, block)
        size = padded_kept_tokens(ratio, seq_len, block)
        idx = ops.select_kept_tokens(kept, mask, size)
        valid = ops.tokens_at(kept, idx)
        for r in range(batch):
            positions = mask[r].nonzero()[:, 0]
            length = len(positions)
            own = select_token_indices(scores[r:r + 1, : length // block],
                                       kept_blocks(ratio, length // block), block, length)[0]
            assert idx[r][valid[r]].tolist() == positions[own].tolist(), (trial, r)
            assert sorted(set(idx[r].tolist())) == idx[r].tolist()


def test_padded_capacity_is_the_largest_own_kept_set():
    for ratio in (0.05, 0.25, 0.4, 0.5, 0.9, 1.0):
        for block in (1, 7, 16):
            for seq_len in (1, 15, 16, 17, 100, 150):
                most = max(kept_blocks(ratio, length // block) * block + length % block
                           for length in range(seq_len + 1))
                assert padded_kept_tokens(ratio, seq_len, block) == most, (ratio, block, seq_len)
    plans = plan_layers(LemoConfig(block_size=16, dense_layers=(0,)), 2, 150, padded=True)
    assert [(p.sparse, p.padded, p.kept_blocks, p.kept_tokens) for p in plans] == [
        (False, True, 9, 150), (True, True, 4, 79)]


def test_an_all_ones_mask_equals_no_mask():
    ids = token_batch(2, SEQ)
    results = []
    for mask in (None, torch.ones_like(ids)):
        torch._dynamo.reset()
        model = tiny_llama()
        backend = lemo_compile.LemoBackend(OPTIONS)
        extra = {} if mask is None else {"attention_mask": mask}
        out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids, **extra)
        out.loss.backward()
        results.append((out, grads(model), backend.reports[-1]))
    (plain, plain_grads, plain_report), (masked, masked_grads, report) = results
    assert [p.kept_tokens for p in plain_report.plans] == [150, 70, 70, 70]
    assert [p.kept_tokens for p in report.plans] == [150, 79, 79, 79]  # 9 filler rows per block
    torch.testing.assert_close(masked.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(masked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_one_graph_across_padding_patterns():
    """Two steps with other padding (right, then left with other lengths), same shape: one graph,
    both steps equal to the reference."""
    model = tiny_llama()
    backend = lemo_compile.LemoBackend(OPTIONS)
    compiled = _assert_matches_padded_reference(
        model, padded_batch(_rows(), "right"), backend, keep_ratio=0.4, dense_layers=[0])
    ids, mask, labels, position_ids = padded_batch(_rows((33, 150, 64, 129), seed=9), "left")
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels, position_ids=position_ids)
    _, loss = lemo_forward_padded(model, ids, mask, labels, block_size=BLOCK, keep_ratio=0.4,
                                  dense_layers=[0])
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)
    assert len(backend.reports) == 1


def test_gradient_checkpointing_on_a_padded_batch():
    """Layers inside checkpointed regions read the padding off the mask the region receives."""
    batch = padded_batch(_rows(), "left")
    results = []
    for checkpointing in (True, False):
        torch._dynamo.reset()
        model = tiny_llama()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            model.train()
        backend = lemo_compile.LemoBackend(OPTIONS)
        ids, mask, labels, position_ids = batch
        out = torch.compile(model, backend=backend, fullgraph=True)(
            input_ids=ids, attention_mask=mask, labels=labels, position_ids=position_ids)
        out.loss.backward()
        results.append((out.loss.detach(), grads(model), backend.reports[-1]))
    (loss, got, report), (plain_loss, want, plain_report) = results
    assert report.counters["sparse_layers"] == plain_report.counters["sparse_layers"] == 3
    # per sparse layer, its kept token indices and which of them are real tokens are saved
    assert report.counters["saved_selections"] == 6
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_hide_invalid_keys_and_real_tokens_for_bool_and_additive_masks():
    """Fillers vanish as keys; a filler query sees only itself (no fully masked row); the real
    tokens read off a mask are those that may attend to themselves. Bool and additive float masks
    say the same."""
    seq_len = 6
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    boolean = causal[None, None] & padding[:, None, None, :]
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    for mask in (boolean, additive):
        assert torch.equal(ops.real_tokens(mask, 2), padding)
    valid = torch.tensor([[False, False, True, False, True, True], [True] * 4 + [False] * 2])
    hidden = ops.hide_invalid_keys(boolean, valid)
    want = (boolean & valid[:, None, None, :]) | (torch.eye(seq_len, dtype=torch.bool) & ~valid[:, None, :, None])
    assert torch.equal(hidden, want)
    assert hidden.any(dim=-1).all()  # no query row is fully masked
    assert hidden[0, 0, :, 3].tolist() == [False, False, False, True, False, False]  # filler key
    hidden_additive = ops.hide_invalid_keys(additive, valid)
    torch.testing.assert_close(
        hidden_additive,
        torch.zeros(want.shape).masked_fill(~want, torch.finfo(torch.float32).min))


@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_packed_sequences_match_the_reference(keep_ratio):
    """HF's padding-free collator (`DataCollatorWithFlattening`): three documents in one row, their
    positions restarting at 0. transformers builds a block-diagonal causal mask from the
    position_ids; lemo keeps it (it depends on an input) and gathers it at the kept tokens, so each
    kept token attends to the kept tokens of its own document only (`lemo_forward` with
    position_ids); keep 1.0 equals the plain model."""
    from transformers import DataCollatorWithFlattening

    from reference import lemo_forward

    documents = [{"input_ids": token_batch(1, n, seed=s)[0].tolist()}
                 for s, n in enumerate((64, 50, 14))]
    packed = DataCollatorWithFlattening()(documents)
    ids, labels, position_ids = packed["input_ids"], packed["labels"], packed["position_ids"]
    model = tiny_llama()
    backend = lemo_compile.LemoBackend({**OPTIONS, "keep_ratio": keep_ratio})
    out = torch.compile(model, backend=backend, fullgraph=True)(
        input_ids=ids, labels=labels, position_ids=position_ids)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    if keep_ratio == 1.0:
        want = model(input_ids=ids, labels=labels, position_ids=position_ids)
        want_logits, want_loss = want.logits, want.loss
    else:
        want_logits, want_loss = lemo_forward(model, ids, labels, block_size=BLOCK,
                                              keep_ratio=keep_ratio, dense_layers=[0],
                                              position_ids=position_ids)
    want_loss.backward()
    (report,) = backend.reports
    assert report.counters["sparse_layers"] == (3 if keep_ratio < 1 else 0)
    assert report.counters["causal_attention"] == 0  # the documents' mask is not plain causal
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-4, atol=1e-4)
    for name, grad in grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    if keep_ratio < 1:  # the documents matter: as one document, the reference differs
        one_document, _ = lemo_forward(model, ids, labels, block_size=BLOCK,
                                       keep_ratio=keep_ratio, dense_layers=[0])
        assert (one_document - want_logits).abs().max() > 1e-2
