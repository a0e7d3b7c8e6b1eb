"""lemo's ops against plain-PyTorch references, forward and backward, on odd shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lemo_compile import ops
from reference import oracle_block_scores, select_token_indices


@pytest.mark.parametrize("seq_len", [1, 7, 63, 65, 200, 1000])
@pytest.mark.parametrize("batch, heads, kv_heads", [(1, 4, 4), (3, 4, 2)])
def test_block_scores_match_naive_oracle(seq_len, batch, heads, kv_heads):
    torch.manual_seed(seq_len)
    q = torch.randn(batch, heads, seq_len, 24)
    k = torch.randn(batch, kv_heads, seq_len, 24)
    got = ops.block_scores(q, k, 64)
    want = oracle_block_scores(q, k, 64)
    assert got.shape == (batch, seq_len // 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_block_scores_bf16_inputs():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 300, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 300, 16, dtype=torch.bfloat16)
    want = oracle_block_scores(q.float(), k.float(), 32)
    torch.testing.assert_close(ops.block_scores(q, k, 32), want.float(), rtol=1e-5, atol=1e-5)


def test_block_scores_chunking_does_not_change_the_result(monkeypatch):
    import lemo_compile.kernels.block_scores as block_scores

    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 257, 8), torch.randn(2, 2, 257, 8)
    whole = block_scores.block_scores_reference(q, k, 16)
    monkeypatch.setattr(block_scores, "_CHUNK_ELEMENTS", 1)  # one query block per chunk
    torch.testing.assert_close(block_scores.block_scores_reference(q, k, 16), whole)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    n_blocks=st.integers(1, 12),
    block=st.sampled_from([1, 4, 16]),
    tail=st.integers(0, 3),
    data=st.data(),
)
def test_select_tokens_matches_reference(batch, n_blocks, block, tail, data):
    kept = data.draw(st.integers(1, n_blocks))
    # few distinct values, so that ties are common
    values = data.draw(st.lists(st.integers(0, 3), min_size=batch * n_blocks, max_size=batch * n_blocks))
    scores = torch.tensor(values, dtype=torch.float32).reshape(batch, n_blocks)
    seq_len = n_blocks * block + min(tail, block - 1)
    idx = ops.select_tokens(scores, kept, block, seq_len)
    assert idx.shape == (batch, kept * block + seq_len % block)
    assert torch.equal(idx, select_token_indices(scores, kept, block, seq_len))
    assert bool((idx[:, 1:] > idx[:, :-1]).all())


def test_select_tokens_breaks_ties_towards_lower_blocks():
    idx = ops.select_tokens(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2, 2, 9)
    assert idx.tolist() == [[2, 3, 4, 5, 8]]


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), n_blocks=st.integers(1, 12), data=st.data())
def test_explore_scores_rank_the_scorer_best_first_then_the_noise(batch, n_blocks, data):
    """With ties common: the top k of explore_scores are the scorer's `scored` best blocks (ties:
    lower first, as select_tokens breaks them) and then the blocks of highest noise."""
    scored = data.draw(st.integers(0, n_blocks))
    values = data.draw(st.lists(st.integers(0, 3), min_size=batch * n_blocks, max_size=batch * n_blocks))
    scores = torch.tensor(values, dtype=torch.float32).reshape(batch, n_blocks)
    noise = torch.rand(batch, n_blocks, generator=torch.Generator().manual_seed(n_blocks))
    got = ops.explore_scores(scores, noise, scored)
    for row in range(batch):
        best = sorted(range(n_blocks), key=lambda p: (-values[row * n_blocks + p], p))[:scored]
        assert sorted(p for p in range(n_blocks) if got[row, p] == 2.0) == sorted(best)
        others = [p for p in range(n_blocks) if p not in best]
        assert torch.equal(got[row, others], noise[row, others])


def test_force_edge_blocks_keeps_each_row_own_edges():
    scores = torch.arange(8.0).repeat(2, 1)  # the later blocks score higher
    plain = ops.force_edge_blocks(scores, 2, 1, 4)
    assert ops.select_tokens(plain, 4, 1, 8).tolist() == [[0, 1, 6, 7]] * 2
    real = torch.zeros(2, 40, dtype=torch.bool)
    real[0, :24], real[1, :40] = True, True  # row 0: 6 full blocks of 4 (its own frame), row 1: 10
    padded = ops.force_edge_blocks(torch.zeros(2, 10), 1, 1, 4, real)
    assert padded.isinf().nonzero().tolist() == [[0, 0], [0, 5], [1, 0], [1, 9]]


def test_tiles_per_distance_divides_by_each_distance_mean():
    from lemo_compile.kernels.block_scores import scores_from_tiles, tiles_per_distance

    torch.manual_seed(0)
    tiles = torch.rand(2, 6, 6).tril()
    tiles[1, 4, 0] = 0.0  # a zero tile stays zero; its distance's mean counts it
    got = tiles_per_distance(tiles)
    for b in range(2):
        for d in range(6):
            diagonal = tiles[b].diagonal(offset=-d)
            torch.testing.assert_close(got[b].diagonal(offset=-d), diagonal / diagonal.mean())
    assert torch.equal(got.triu(diagonal=1), torch.zeros_like(got))
    # attention that only decays with distance: the plain sums favour the middle, normalized
    # every block scores the same
    index = torch.arange(8.0)
    decaying = (1.0 / (1.0 + index[:, None] - index[None, :])).tril()[None]
    plain = scores_from_tiles(decaying)[0]
    assert plain[3] > plain[0] and plain[4] > plain[7]
    torch.testing.assert_close(scores_from_tiles(tiles_per_distance(decaying))[0],
                               torch.full((8,), 8.0))


def test_tiles_per_distance_of_a_padded_row_is_that_of_its_own_blocks():
    from lemo_compile.kernels.block_scores import tiles_per_distance

    torch.manual_seed(1)
    tiles = torch.rand(2, 6, 6).tril()
    tiles[0, 4:], tiles[0, :, 4:] = 0.0, 0.0  # row 0: 4 blocks of its own, zero past them
    got = tiles_per_distance(tiles, torch.tensor([4, 6]))
    torch.testing.assert_close(got[0, :4, :4], tiles_per_distance(tiles[:1, :4, :4])[0])
    assert torch.equal(got[0, 4:], torch.zeros(2, 6)) and torch.equal(got[0, :, 4:], torch.zeros(6, 2))
    torch.testing.assert_close(got[1], tiles_per_distance(tiles[1:])[0])


def test_gather_tokens_rows_and_masks():
    torch.manual_seed(0)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    x = torch.randn(2, 6, 5)
    assert torch.equal(ops.gather_tokens(x, idx, (1,)), torch.stack([x[b, idx[b]] for b in range(2)]))
    cos = torch.randn(1, 6, 4)  # broadcast over the batch
    assert torch.equal(ops.gather_tokens(cos, idx, (1,)), torch.stack([cos[0, idx[b]] for b in range(2)]))
    mask = torch.randn(2, 1, 6, 6)
    want = torch.stack([mask[b][:, idx[b]][:, :, idx[b]] for b in range(2)])
    assert torch.equal(ops.gather_tokens(mask, idx, (2, 3)), want)


def test_scatter_add_tokens_forward_and_backward():
    torch.manual_seed(0)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    x = torch.randn(2, 6, 5, requires_grad=True)
    rows = torch.randn(2, 3, 5, requires_grad=True)
    out = ops.scatter_add_tokens(x, idx, rows)
    want = x.detach().clone()
    for b in range(2):
        want[b].index_add_(0, idx[b], rows.detach()[b])
    assert torch.equal(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad)
    assert torch.equal(rows.grad, torch.stack([grad[b, idx[b]] for b in range(2)]))


def _loss_and_grads(fn, h, weight, bias):
    inputs = [t for t in (h, weight, bias) if t is not None]
    loss = fn()
    return (loss, *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("rows", [1, 7, 63, 65, 300])
@pytest.mark.parametrize("segment", [1, 16, 64, 4096])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_torch(rows, segment, reduction, with_bias):
    torch.manual_seed(rows + segment)
    h = torch.randn(rows, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=True) if with_bias else None
    target = torch.randint(0, 37, (rows,))
    target[::3] = -100
    if rows == 1:
        target[0] = 5

    def plain():
        return F.cross_entropy(F.linear(h, weight, bias), target, ignore_index=-100, reduction=reduction)

    def segmented():
        return ops.linear_cross_entropy(h, weight, bias, target, -100, reduction, segment, torch.float64)

    for got, want in zip(_loss_and_grads(segmented, h, weight, bias), _loss_and_grads(plain, h, weight, bias)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_linear_cross_entropy_bf16_follows_the_upcast_chain():
    torch.manual_seed(0)
    h = torch.randn(200, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(301, 64) / 8).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 301, (200,))

    def plain():
        return F.cross_entropy(F.linear(h, weight).float(), target)

    def segmented():
        return ops.linear_cross_entropy(h, weight, None, target, -100, "mean", 48, torch.float32)

    got, want = _loss_and_grads(segmented, h, weight, None), _loss_and_grads(plain, h, weight, None)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    # bf16 gradients: one bf16 rounding step apart (fp32 accumulation over segments here)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-3)


def test_linear_cross_entropy_all_ignored_is_nan_like_torch_with_zero_gradients():
    """No label to count (a prompt-only batch): the loss is NaN, as torch's, and the gradients are
    zero, as torch's, not NaN (which an optimizer step would write into the weights)."""
    h = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    target = torch.full((4,), -100)

    def segmented():
        return ops.linear_cross_entropy(h, weight, None, target, -100, "mean", 2, torch.float32)

    def plain():
        return F.cross_entropy(F.linear(h, weight), target)

    got, want = _loss_and_grads(segmented, h, weight, None), _loss_and_grads(plain, h, weight, None)
    assert math.isnan(got[0].item()) and math.isnan(want[0].item())
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(w, torch.zeros_like(w)) and torch.equal(g, w)


def test_nan_placeholder_holds_one_element():
    filler = ops.nan_placeholder([2, 1000, 50000], torch.float32, torch.device("cpu"))
    assert filler.shape == (2, 1000, 50000) and filler.stride() == (0, 0, 0)
    assert torch.isnan(filler[1, 999, 49999])


@pytest.fixture
def requested_grads(monkeypatch):
    """The (h_grad, weight_grad) flags of every segmented-loss computation, in order."""
    from lemo_compile.kernels import lm_loss

    calls = []
    real = lm_loss.linear_cross_entropy_reference
    monkeypatch.setattr(lm_loss, "linear_cross_entropy_reference",
                        lambda *args, **kwargs: calls.append(args[8:10]) or real(*args, **kwargs))
    return calls


def test_linear_cross_entropy_frozen_head_gets_no_weight_gradient(requested_grads):
    h = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(5, 8)  # frozen
    target = torch.randint(0, 5, (10,))
    ops.linear_cross_entropy(h, weight, None, target, -100, "mean", 4, torch.float32).backward()
    # (h_grad, weight_grad): the [V, D] weight gradient is never computed
    assert requested_grads == [(True, False)] and weight.grad is None and h.grad is not None


def test_linear_cross_entropy_scales_by_the_upstream_gradient():
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, -100, 3, 4, 2])
    loss = ops.linear_cross_entropy(h, weight, None, target, -100, "mean", 4, torch.float64)
    (2.5 * loss).backward()
    h_ref = h.detach().clone().requires_grad_(True)
    weight_ref = weight.detach().clone().requires_grad_(True)
    (2.5 * F.cross_entropy(h_ref @ weight_ref.t(), target)).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(weight.grad, weight_ref.grad)


def test_linear_cross_entropy_without_grad_computes_no_gradients(requested_grads):
    h = torch.randn(10, 8, requires_grad=True)
    with torch.no_grad():
        ops.linear_cross_entropy(h, torch.randn(5, 8), None, torch.zeros(10, dtype=torch.long),
                                 -100, "mean", 4, torch.float32)
    assert requested_grads == [(False, False)]
