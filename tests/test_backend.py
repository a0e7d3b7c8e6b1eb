"""The lemo backend end to end on tiny HF Llama models (no-codegen compiler: fast on the CPU).

The eager reference (`reference.py`) implements README.md's semantics by hand from the model's modules;
the compiled model must match it in logits, loss and every parameter gradient.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import lemo_compile
from conftest import (
    assert_equals_plain_model, assert_matches_reference, grads, inserted_nodes, tiny_llama,
    token_batch,
)
from reference import lemo_forward

FAST = {"compiler": "aot_eager", "block_size": 16}


def compile_lemo(model, **options):
    backend = lemo_compile.LemoBackend({**FAST, **options})
    return torch.compile(model, backend=backend, fullgraph=True), backend


def assert_same_training_step(model, ids, options, **reference_options):
    """One forward + backward, compiled vs eager reference: logits, loss and all grads within 1e-4."""
    backend = lemo_compile.LemoBackend({**FAST, **options})
    assert_matches_reference(model, ids, backend, block_size=FAST["block_size"], **reference_options)
    return backend.reports[-1]


@pytest.mark.parametrize("seq_len", [160, 150])  # a multiple of the block (16) and not
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query attention and not
def test_oracle_matches_eager_reference(seq_len, batch, kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    ids = token_batch(batch, seq_len)
    options = {"keep_ratio": 0.4, "dense_layers": [0], "loss_segment": None}
    report = assert_same_training_step(model, ids, options, keep_ratio=0.4, dense_layers=[0])
    n_blocks = seq_len // 16
    kept = 4 * 16 + seq_len % 16  # ceil(0.4 * n_blocks) = 4 blocks for n = 9 and n = 10
    assert [p.kept_tokens for p in report.plans] == [seq_len, kept, kept, kept]
    assert [p.n_blocks for p in report.plans] == [n_blocks] * 4
    assert report.counters["sparse_layers"] == 3


def test_random_scorer_with_seed_matches_reference():
    model = tiny_llama()
    ids = token_batch(2, 128)
    options = {"scorer": "random", "seed": 7, "keep_ratio": 0.25, "dense_layers": [0, 3],
               "loss_segment": None}
    assert_same_training_step(model, ids, options, scorer="random", seed=7,
                              keep_ratio=0.25, dense_layers=[0, 3])


@pytest.mark.parametrize("explore", [0.5, 1.0])
def test_explore_with_seed_matches_reference(explore):
    """explore=0.5 keeps the oracle's 2 best of 4 blocks and 2 drawn at random; explore=1.0
    keeps the random scorer's blocks."""
    model = tiny_llama()
    ids = token_batch(2, 160)
    options = {"explore": explore, "seed": 7, "dense_layers": [0], "loss_segment": None}
    assert_same_training_step(model, ids, options, explore=explore, seed=7, dense_layers=[0])
    if explore == 1.0:  # the same step as the reference's random scorer with that seed
        assert_same_training_step(model, ids, options, scorer="random", seed=7, dense_layers=[0])


def test_explore_without_seed_draws_again_at_every_call():
    """With seed=None the random share is drawn anew at every step (the selection changes from
    call to call); with a seed it is the same draw every call."""
    ids = token_batch(1, 320)
    losses = {}
    for seed in (None, 3):
        model = tiny_llama()
        compiled, _ = compile_lemo(model, explore=0.5, seed=seed, dense_layers=[0],
                                   loss_segment=None)
        losses[seed] = {compiled(input_ids=ids, labels=ids).loss.item() for _ in range(4)}
    assert len(losses[3]) == 1
    assert len(losses[None]) > 1


@pytest.mark.parametrize("mlp", ["off", "tokens"])
def test_edge_blocks_kept_match_reference(mlp):
    """keep_first_blocks=1, keep_last_blocks=2: every sparse block keeps blocks 0, 8 and 9 of 10
    and its best other one (k = 4)."""
    model = tiny_llama()
    ids = token_batch(2, 160)
    options = {"keep_first_blocks": 1, "keep_last_blocks": 2, "mlp": mlp, "dense_layers": [0],
               "loss_segment": None}
    backend = lemo_compile.LemoBackend({**FAST, **options})
    explanation = lemo_compile.explain(model, input_ids=ids, labels=ids, options={**FAST, **options})
    selected = [blocks for per_block in explanation.selected.values() for blocks in per_block.values()]
    assert len(selected) == (6 if mlp == "tokens" else 3)
    for blocks in selected:
        assert all({0, 8, 9} <= set(row.tolist()) for row in blocks), blocks
    assert "first 1 and last 2 blocks always kept" in explanation.table().splitlines()[0]
    assert_matches_reference(model, ids, backend, block_size=FAST["block_size"], mlp=mlp,
                             keep_first_blocks=1, keep_last_blocks=2, dense_layers=[0])


def test_distance_normalized_oracle_matches_reference():
    """The option changes which blocks the oracle keeps (here in at least one sparse layer) and
    matches the reference's normalized oracle."""
    model = tiny_llama()
    ids = token_batch(2, 320)
    options = {**FAST, "dense_layers": [0], "loss_segment": None}
    plain = lemo_compile.explain(model, input_ids=ids, labels=ids, options=options).selected
    explanation = lemo_compile.explain(model, input_ids=ids, labels=ids,
                                       options={**options, "distance_normalized": True})
    normalized = explanation.selected
    assert "tiles normalized per block distance" in explanation.table().splitlines()[0]
    assert any(not torch.equal(plain["attention"][layer], normalized["attention"][layer])
               for layer in plain["attention"])
    backend = lemo_compile.LemoBackend({**options, "distance_normalized": True})
    assert_matches_reference(model, ids, backend, block_size=FAST["block_size"],
                             distance_normalized=True, dense_layers=[0])


def test_output_scorer_matches_reference():
    """scorer="output" keeps the blocks whose dense attention results have the largest per-token
    norm; here it keeps other blocks than the oracle in some sparse layer."""
    model = tiny_llama()
    ids = token_batch(2, 160)
    options = {**FAST, "dense_layers": [0], "loss_segment": None}
    selected = [lemo_compile.explain(model, input_ids=ids, labels=ids,
                                     options={**options, "scorer": scorer}).selected["attention"]
                for scorer in ("oracle", "output")]
    assert any(not torch.equal(selected[0][layer], selected[1][layer]) for layer in (1, 2, 3))
    backend = lemo_compile.LemoBackend({**options, "scorer": "output"})
    assert_matches_reference(model, ids, backend, block_size=FAST["block_size"], scorer="output",
                             dense_layers=[0])
    assert backend.reports[-1].counters["sparse_layers"] == 3


def test_output_scorer_leaves_padded_batches_dense():
    model = tiny_llama(layers=2)
    ids = token_batch(2, 64)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    backend = lemo_compile.LemoBackend({**FAST, "dense_layers": [0], "loss_segment": None,
                                        "scorer": "output"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        torch.compile(model, backend=backend, fullgraph=True)(
            input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    report = backend.reports[-1]
    assert report.counters["sparse_layers"] == 0 and report.counters["dense_fallbacks"] == 1
    assert any("does not take padded batches" in w for w in report.warnings)


def test_per_layer_keep_ratios_match_reference():
    model = tiny_llama()
    ids = token_batch(1, 176)
    ratios = [1.0, 0.2, 0.5, 0.9]
    options = {"keep_ratio": ratios, "dense_layers": [], "loss_segment": None}
    report = assert_same_training_step(model, ids, options, keep_ratio=ratios, dense_layers=[])
    assert [p.kept_blocks for p in report.plans] == [11, 3, 6, 10]


def test_keep_ratio_one_equals_the_plain_model():
    model = tiny_llama()
    ids = token_batch(2, 150)
    compiled, backend = compile_lemo(model, keep_ratio=1.0, dense_layers=[], loss_segment=None)
    assert_equals_plain_model(compiled, model, ids)
    assert not any(p.sparse for p in backend.reports[-1].plans)


def test_segmented_loss_equals_unsegmented():
    ids = token_batch(2, 150)
    results = []
    for segment in (None, 64):
        model = tiny_llama()
        compiled, backend = compile_lemo(model, keep_ratio=0.4, dense_layers=[0], loss_segment=segment)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lemo_compile.LemoWarning)
            out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out, grads(model), backend.reports[-1]))
        torch._dynamo.reset()
    (plain, plain_grads, _), (segmented, segmented_grads, report) = results
    assert report.counters["segmented_losses"] == 1
    torch.testing.assert_close(segmented.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(segmented_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the logits were not computed: a NaN placeholder of the right shape that holds no memory
    assert segmented.logits.shape == plain.logits.shape
    assert segmented.logits.stride() == (0, 0, 0) and torch.isnan(segmented.logits).all()


def _loss_step(compiled, model, ids, **call):
    """The compiled model's training loss on ids (its logits placeholders, unwarned) and the
    parameters' gradients; leaves none behind."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        loss = compiled(input_ids=ids, labels=ids, **call).loss
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    return loss, got


@pytest.mark.parametrize("mlp", ["off", "tokens"])
def test_dropped_loss_weight_matches_reference(mlp):
    """dropped_loss_weight: each token's loss weighted by the share of the sparse blocks (and
    with mlp="tokens" the MLP blocks) that kept it; loss and gradients as the reference's weighted
    loss, which differs from the plain one."""
    model = tiny_llama()
    ids = token_batch(2, 160)
    options = {"dense_layers": [0], "mlp": mlp, "dropped_loss_weight": 0.25, "loss_segment": 96}
    compiled, backend = compile_lemo(model, **options)
    loss, got = _loss_step(compiled, model, ids)
    assert backend.reports[-1].counters["weighted_losses"] == 1
    reference = {"block_size": FAST["block_size"], "dense_layers": [0], "mlp": mlp}
    _, want_loss = lemo_forward(model, ids, ids, dropped_loss_weight=0.25, **reference)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, plain = lemo_forward(model, ids, ids, **reference)
    assert abs(plain - loss) > 1e-4 * plain  # 10x the tolerance the match above holds to


def test_dropped_loss_weight_reads_a_padded_batchs_kept_flags():
    """With an attention mask (the padded-batch path: per-row kept flags feed the weights) of
    all ones, the weighted loss and gradients are those without one."""
    model = tiny_llama(layers=3)
    ids = token_batch(2, 128)
    options = {"dense_layers": [0], "dropped_loss_weight": 0.0, "loss_segment": 96}
    results = []
    for call in ({}, {"attention_mask": torch.ones_like(ids)}):
        compiled, backend = compile_lemo(model, **options)
        results.append(_loss_step(compiled, model, ids, **call))
        assert backend.reports[-1].counters["weighted_losses"] == 1
        torch._dynamo.reset()
    assert "kept_row_tokens" in backend.reports[-1].graphs["select"]  # the padded path ran
    (plain, plain_grads), (masked, masked_grads) = results
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(masked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mlp", ["off", "tokens"])
def test_dropped_loss_weight_under_gradient_checkpointing(mlp):
    """Under HF gradient checkpointing the sparse layers' selections leave their checkpointed
    regions for the loss: loss and gradients as without checkpointing."""
    ids = token_batch(2, 128)
    options = {"dense_layers": [0], "mlp": mlp, "dropped_loss_weight": 0.0, "loss_segment": 96}
    results = []
    for checkpointing in (False, True):
        model = tiny_llama(layers=3)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        compiled, backend = compile_lemo(model, **options)
        results.append(_loss_step(compiled, model, ids))
        report = backend.reports[-1]
        assert report.counters["weighted_losses"] == 1 and report.counters["sparse_layers"] == 2
        torch._dynamo.reset()
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_segmented_loss_warns_that_logits_are_placeholders():
    compiled, _ = compile_lemo(tiny_llama(), loss_segment=32)
    with pytest.warns(lemo_compile.LemoWarning, match="outputs.logits is a NaN placeholder"):
        compiled(input_ids=token_batch(1, 64), labels=token_batch(1, 64))


def test_one_graph_and_no_recompilation_over_three_training_steps():
    model = tiny_llama()
    compiled, backend = compile_lemo(model, dense_layers=[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(3):
        ids = token_batch(2, 150, seed=step)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert len(backend.reports) == 1, "recompiled"
    assert backend.reports[0].counters["sparse_layers"] == 3
    assert all(torch.isfinite(torch.tensor(losses)))


def test_eval_mode_compiles_the_model_unchanged():
    model = tiny_llama().eval()
    compiled, backend = compile_lemo(model)
    ids = token_batch(1, 160)
    with torch.no_grad():
        out = compiled(input_ids=ids, labels=ids)
        plain = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert backend.reports[-1].training is False and not backend.reports[-1].plans


def test_a_differentiated_graph_is_rewritten_whatever_the_module_mode():
    """`from_pretrained` returns a model in eval mode: trained like that (gradients on, parameters
    requiring grad), its graph is still a training graph and lemo rewrites it."""
    model = tiny_llama().eval()
    compiled, backend = compile_lemo(model)
    ids = token_batch(1, 160)
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert backend.reports[-1].training is True
    assert backend.reports[-1].counters["sparse_layers"] == 1


def test_a_frozen_model_with_gradients_enabled_compiles_unchanged():
    model = tiny_llama().train().requires_grad_(False)
    compiled, backend = compile_lemo(model)
    ids = token_batch(1, 160)
    out = compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
    assert backend.reports[-1].training is False


def test_sequence_shorter_than_one_block_stays_dense():
    model = tiny_llama()
    compiled, backend = compile_lemo(model, dense_layers=[], loss_segment=None)
    ids = token_batch(2, 11)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
    report = backend.reports[-1]
    assert not any(p.sparse for p in report.plans)
    assert all("shorter than one block" in p.reason for p in report.plans)


class NotADecoder(torch.nn.Module):
    """A model without attention: nothing for lemo to rewrite (as in the pieces of an HF model
    that a graph break splits off: the embedding, the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).sum()


class UnstructuredAttention(torch.nn.Module):
    """Attention, but not in decoder layers the finder knows (no modules at '<name>.<index>')."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def test_model_without_attention_compiles_unchanged_without_a_warning():
    model = NotADecoder()
    compiled, backend = compile_lemo(model)
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lemo_compile.LemoWarning)
        loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, model(x))
    assert backend.reports[-1].plans == [] and not backend.reports[-1].warnings


def test_unrecognised_attention_model_compiles_dense_with_one_warning():
    model = UnstructuredAttention()
    compiled, backend = compile_lemo(model)
    x = torch.randn(1, 128, 8)
    with pytest.warns(lemo_compile.LemoWarning) as caught:
        loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, model(x))
    messages = [str(w.message) for w in caught if issubclass(w.category, lemo_compile.LemoWarning)]
    assert len(messages) == 1 and "no decoder layers" in messages[0]


def test_eager_attention_falls_back_dense_with_a_warning_naming_the_layers():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    compiled, backend = compile_lemo(model, loss_segment=None)
    ids = token_batch(1, 160)
    with pytest.warns(lemo_compile.LemoWarning, match="layers model.layers.0-3: no scaled_dot_product_attention"):
        out = compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
    assert not any(p.sparse for p in backend.reports[-1].plans)


def test_kv_cache_outputs_of_sparse_layers_are_placeholders_with_a_warning():
    model = tiny_llama()
    model.config.use_cache = True
    compiled, _ = compile_lemo(model, dense_layers=[0], loss_segment=None)
    ids = token_batch(1, 160)
    with pytest.warns(lemo_compile.LemoWarning, match="use_cache=False"):
        out = compiled(input_ids=ids, labels=ids)
    keys = out.past_key_values.layers[2].keys
    assert keys.shape[2] == 160 and torch.isnan(keys).all()
    assert not torch.isnan(out.past_key_values.layers[0].keys).any()


def test_bad_options_raise_before_compiling():
    with pytest.raises(ValueError, match="keep_ratio"):
        lemo_compile.LemoBackend({"keep_ratio": 2})


def structural_summary(report) -> dict:
    """Inserted nodes per layer by role, kept lengths and op counts, from the rewritten graph code."""
    return {
        "plans": [(p.layer, p.sparse, p.kept_tokens) for p in report.plans],
        "counters": dict(report.counters),
    }


def test_structural_summary_of_a_tiny_hf_llama():
    """The rewritten Dynamo graph of a tiny Llama: which nodes lemo inserted, per layer."""
    captured = {}

    class Recording(lemo_compile.LemoBackend):
        def __call__(self, gm, example_inputs, **kwargs):
            compiled = super().__call__(gm, example_inputs, **kwargs)
            captured["gm"] = gm
            return compiled

    backend = Recording({**FAST, "dense_layers": [0, 3]})
    model = tiny_llama()
    ids = token_batch(1, 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    report = backend.reports[-1]
    assert structural_summary(report) == {
        "plans": [(0, False, 150), (1, True, 70), (2, True, 70), (3, False, 150)],
        "counters": {"causal_attention": 4, "sparse_layers": 2, "dense_fallbacks": 0,
                     "placeholder_outputs": 1,
                     "segmented_losses": 1,
                     # post-grad fusion, forward graph only (no backward ran): per sparse layer
                     # the gather + norm, the cos / sin gathers and the residual scatter-add
                     "fused_gather_norm": 2, "fused_gather": 4, "fused_scatter_add": 2},
    }
    per_layer = inserted_nodes(captured["gm"])
    # score: detach(x), the copied norm (8 nodes), q/k projections + views (6), RoPE (16),
    # detach(q), detach(k), block_scores (the keys unrepeated: the attention reads them with
    # enable_gqa); then select, gathers of x / cos / sin (no mask: HF's causal mask became
    # is_causal=True) and the scatter_add
    expected = Counter({"score": 34, "gather": 3, "select": 1, "scatter_add": 1})
    assert per_layer == {1: expected, 2: expected}
    targets = Counter(str(n.target) for n in captured["gm"].graph.nodes if n.op == "call_function")
    assert targets["lemo.block_scores.default"] == 2
    assert sum("linear_cross_entropy" in t for t in targets.elements()) == 1
    sdpa = [n for n in captured["gm"].graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert [tuple(n.meta["example_value"].shape) for n in sdpa] == [
        (1, 4, 150, 16), (1, 4, 70, 16), (1, 4, 70, 16), (1, 4, 150, 16)]


def test_backend_name_lemo_works_without_importing_the_package():
    """`backend="lemo"` resolves through the torch_dynamo_backends entry point."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "fn = lookup_backend('lemo')\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["lemo_compile.backend", "lemo_backend"]


def test_options_reach_the_backend_through_torch_compile():
    model = tiny_llama()
    compiled = torch.compile(model, backend="lemo", fullgraph=True,
                             options={**FAST, "keep_ratio": 0.3, "loss_segment": None})
    ids = token_batch(1, 160)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad()
    _, loss = lemo_forward(model, ids, ids, block_size=16, keep_ratio=0.3)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)


def test_bad_option_through_torch_compile_raises_value_error():
    compiled = torch.compile(tiny_llama(), backend="lemo", options={"keep_ratio": "most"})
    ids = token_batch(1, 32)
    with pytest.raises(Exception) as caught:
        compiled(input_ids=ids, labels=ids)
    chain = []
    err = caught.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, ValueError) and "keep_ratio" in str(e) for e in chain)


def test_layers_left_dense_by_the_sequence_length_draw_one_warning():
    model = tiny_llama()
    ids = token_batch(1, 40)
    backend = lemo_compile.LemoBackend({**FAST, "block_size": 64})
    with pytest.warns(lemo_compile.LemoWarning) as caught:
        torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    dense = [str(w.message) for w in caught if "not in dense_layers" in str(w.message)]
    assert dense == ["lemo: these layers run dense although they are not in dense_layers: "
                     "layers [2]: sequence shorter than one block (40 < 64)"]


def test_keep_ratio_one_draws_no_dense_warning():
    model = tiny_llama()
    ids = token_batch(1, 64)
    backend = lemo_compile.LemoBackend({**FAST, "keep_ratio": 1.0, "loss_segment": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lemo_compile.LemoWarning)
        torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    assert [p.reason for p in backend.reports[-1].plans] == ["dense_layers", "dense_layers",
                                                             "keeps every block", "dense_layers"]


def test_string_backend_reports_are_readable(caplog):
    model = tiny_llama()
    ids = token_batch(1, 64)
    with caplog.at_level("INFO", logger="lemo_compile.backend"), warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        torch.compile(model, backend="lemo", options={"compiler": "aot_eager", "block_size": 16})(
            input_ids=ids, labels=ids).loss.backward()
    report = lemo_compile.recent_reports()[-1]
    assert report.training and [p.layer for p in report.plans if p.sparse] == [2]
    assert any("sparse layers [2] of 4" in r.getMessage() for r in caplog.records)


def test_a_cross_entropy_left_unsegmented_is_reported():
    """A loss the segmented op cannot compute (here: label smoothing) stays as it is, and lemo
    says so, with the reason, instead of silently computing the logits whole."""
    model = tiny_llama()
    ids = token_batch(2, 150)

    def smoothed_loss(input_ids):
        logits = model(input_ids=input_ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               input_ids[:, 1:].reshape(-1), label_smoothing=0.1)

    backend = lemo_compile.LemoBackend({"compiler": "aot_eager", "block_size": 16,
                                        "dense_layers": [0]})
    with pytest.warns(lemo_compile.LemoWarning, match="left unsegmented .*other than ignore_index"):
        loss = torch.compile(smoothed_loss, backend=backend)(ids)
    loss.backward()
    report = backend.reports[-1]
    assert report.counters["segmented_losses"] == 0
    assert any("left unsegmented" in w for w in report.warnings)
