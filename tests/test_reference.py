"""Sanity checks of the eager reference itself (tests/reference.py), independent of lemo_compile."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reference import lemo_forward, oracle_block_scores, select_token_indices, sparse_layer_plan

BLOCK = 32
SEQ_LEN = 250  # 7 full blocks of 32 and a tail of 26


def tiny_model() -> LlamaForCausalLM:
    """A 4-layer float32 Llama (hidden 64, 4 query heads, 2 kv heads), seeded."""
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def tokens(batch: int = 2, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Random token ids [batch, seq_len]."""
    return torch.randint(0, 101, (batch, seq_len), generator=torch.Generator().manual_seed(1))


def test_keep_ratio_one_is_the_plain_model():
    model, ids = tiny_model(), tokens()
    logits, loss = lemo_forward(model, ids, ids, block_size=BLOCK, keep_ratio=1.0, dense_layers=[])
    plain = model(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, plain.loss, rtol=1e-5, atol=1e-5)


def test_oracle_block_scores_by_hand():
    # S = 5, block 2: blocks {0, 1}, {2, 3}; token 4 is the tail and must not count (huge values).
    q = torch.tensor([1.0, 2.0, 3.0, 1.0, 100.0]).view(1, 1, 5, 1)
    k = torch.tensor([1.0, -1.0, 2.0, 1.0, 100.0]).view(1, 1, 5, 1)
    # A = relu(q_i k_j), j <= i:  [1 . . .], [2 0 . .], [3 0 6 .], [1 0 2 1]
    # M = [[2, 0], [3, 6]];  sigma = [M00 + M10, M11 + M10] = [5, 9]
    assert oracle_block_scores(q, k, 2).tolist() == [[5.0, 9.0]]

    # Two query heads sharing one kv head; the second head is -1 everywhere, so relu(-k_j) = [0 1 0 0].
    q2 = torch.cat([q[..., :4, :], -torch.ones(1, 1, 4, 1)], dim=1)  # [1, 2, 4, 1]
    # A = (A_head0 + A_head1) / 2 = [.5 . . .], [1 .5 . .], [1.5 .5 3 .], [.5 .5 1 .5]
    # M = [[1, 0], [1.5, 3]];  sigma = [2.5, 4.5]
    assert oracle_block_scores(q2, k[..., :4, :], 2).tolist() == [[2.5, 4.5]]


def test_select_token_indices_ties_order_and_tail():
    # Blocks 1, 2, 3 tie: the lower indices 1 and 2 win; the tail token 8 is always appended.
    assert select_token_indices(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2, 2, 9).tolist() == [[2, 3, 4, 5, 8]]
    # Per sample; the kept blocks come out in ascending order whatever their rank.
    scores = torch.tensor([[3.0, 1.0, 5.0], [0.0, 7.0, 7.0]])
    idx = select_token_indices(scores, 2, 2, 7)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [[0, 1, 4, 5, 6], [2, 3, 4, 5, 6]]
    # No full block at all: only the tail.
    assert select_token_indices(torch.zeros(1, 0), 0, 64, 5).tolist() == [[0, 1, 2, 3, 4]]


def test_sparse_layer_plan():
    assert sparse_layer_plan(8, 1000, block_size=64) == [None, None, None, None, 6, 6, 6, None]
    assert sparse_layer_plan(4, 250, block_size=BLOCK, keep_ratio=[1.0, 0.2, 0.5, 0.9], dense_layers=[]) == [
        None, 2, 4, None]  # n = 7: k = 7 (dense), 2, 4, 7 (dense)
    assert sparse_layer_plan(4, 20, block_size=BLOCK, dense_layers=[]) == [None] * 4  # n = 0


@pytest.mark.parametrize("scorer", ["oracle", "random"])
def test_sparse_layer_drops_tokens_and_gradients_flow(scorer):
    model, ids = tiny_model(), tokens()
    assert sparse_layer_plan(4, SEQ_LEN, block_size=BLOCK, keep_ratio=0.4) == [None, None, 3, None]
    _, dense_loss = lemo_forward(model, ids, ids, block_size=BLOCK, keep_ratio=1.0)
    logits, loss = lemo_forward(model, ids, ids, block_size=BLOCK, keep_ratio=0.4, scorer=scorer, seed=3)
    assert logits.shape == (2, SEQ_LEN, 101)
    assert abs(loss.item() - dense_loss.item()) > 1e-4
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # The same selection every call.
    _, again = lemo_forward(model, ids, ids, block_size=BLOCK, keep_ratio=0.4, scorer=scorer, seed=3)
    assert again.item() == loss.item()
