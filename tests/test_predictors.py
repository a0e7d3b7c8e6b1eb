"""Trained predictors: storage, fit checks, the predictor scorer in compiled graphs, calibration."""

from __future__ import annotations

import pytest
import torch

import lemo_compile
from conftest import assert_matches_reference, tiny_llama, token_batch
from lemo_compile.kernels.block_scores import scores_from_tiles
from lemo_compile.predictors import ModelSignature, PredictorBank
from lemo_compile.predictors.calibrate import recall_and_overlap

BLOCK = 16
TINY = ModelSignature(hidden_size=64, heads=4, head_dim=16, layers=4, block_size=BLOCK)


def _bank(layers=(2, 3), seed=0, signature=TINY) -> PredictorBank:
    torch.manual_seed(seed)
    return PredictorBank(signature, layers, width=32, rank=8).requires_grad_(False).eval()


def _predictor_scores(bank):
    def scores(layer, h):
        return scores_from_tiles(torch.tril(bank.predictor(layer)(h)))

    return scores


def test_bank_save_load_round_trip(tmp_path):
    bank = _bank()
    path = tmp_path / "tiny.predictors.safetensors"
    bank.save(path)
    loaded = PredictorBank.load(path)
    assert loaded.signature == bank.signature and loaded.layers == [2, 3]
    assert (loaded.width, loaded.rank) == (32, 8)
    for name, tensor in bank.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    h = torch.randn(2, 100, 64)
    assert torch.equal(loaded.predictor(3)(h), bank.predictor(3)(h))
    assert all(not p.requires_grad for p in loaded.parameters())


def test_loading_another_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a lemo predictor file"):
        PredictorBank.load(path)


def test_bank_for_another_model_is_refused():
    other = ModelSignature(hidden_size=128, heads=4, head_dim=32, layers=4, block_size=BLOCK)
    with pytest.raises(ValueError, match="do not fit this model.*hidden 128.*hidden 64"):
        _bank(signature=other).check_fits(TINY, [2, 3])
    with pytest.raises(ValueError, match=r"layers \[1\] are sparse"):
        _bank().check_fits(TINY, [1, 2, 3])
    with pytest.raises(ValueError, match="block size 32"):
        _bank().check_fits(ModelSignature(64, 4, 16, 4, 32), [2, 3])


def test_predictors_option_must_be_a_bank_or_a_path():
    with pytest.raises(ValueError, match="'predictors' must be a PredictorBank or the path"):
        lemo_compile.LemoConfig.from_options({"scorer": "predictor", "predictors": 3})


def _backend(bank, **options) -> lemo_compile.LemoBackend:
    return lemo_compile.LemoBackend({
        "compiler": "aot_eager", "block_size": BLOCK, "dense_layers": [0, 1], "loss_segment": None,
        "scorer": "predictor", "predictors": bank, **options,
    })


def test_predictor_scorer_matches_the_reference_and_is_one_graph():
    model = tiny_llama()
    bank = _bank()
    ids = token_batch(2, 150)
    backend = _backend(bank)
    compiled = assert_matches_reference(model, ids, backend, block_size=BLOCK, keep_ratio=0.4,
                                        dense_layers=[0, 1], scorer=_predictor_scores(bank))
    report = backend.reports[-1]
    assert report.counters["sparse_layers"] == 2
    assert [p.kept_tokens for p in report.plans] == [150, 150, 70, 70]
    # a second step: same graph, no recompilation
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) == 1


def test_predictor_scores_normalized_per_distance_match_the_reference():
    from reference import tiles_by_distance

    def scores(layer, h):
        tiles = torch.tril(bank.predictor(layer)(h)).double()
        return scores_from_tiles(torch.stack([tiles_by_distance(t) for t in tiles]))

    model = tiny_llama()
    bank = _bank()
    ids = token_batch(2, 150)
    options = {"block_size": BLOCK, "dense_layers": [0, 1], "loss_segment": None,
               "scorer": "predictor", "predictors": bank, "compiler": "aot_eager"}
    selected = [lemo_compile.explain(model, input_ids=ids, labels=ids,
                                     options={**options, "distance_normalized": on}).selected
                for on in (False, True)]
    assert any(not torch.equal(selected[0]["attention"][layer], selected[1]["attention"][layer])
               for layer in (2, 3))  # the option changes the predictors' choice here
    assert_matches_reference(model, ids, _backend(bank, distance_normalized=True), block_size=BLOCK,
                             keep_ratio=0.4, dense_layers=[0, 1], scorer=scores)


def test_predictor_weights_are_frozen_inputs_the_backend_passes_itself():
    model = tiny_llama()
    bank = _bank()
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    ids = token_batch(1, 128)
    backend = _backend(bank)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        compiled(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    report = backend.reports[-1]
    # 2 sparse layers x ((q, k) sides x 3 linear layers x (weight, bias) + the distance bias)
    assert len(report.extra_inputs) == 2 * (2 * 3 * 2 + 1)
    assert all(not t.requires_grad for t in report.extra_inputs)
    assert report.graphs["select"].count("lemo_predictor_2_q0") >= 1
    assert not any("predictor" in name for name, _ in model.named_parameters())
    for name, tensor in bank.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    names = [f"{layer}.{name}" for layer in (2, 3)
             for name in [f"{side}.{i}" for side in ("q_side", "k_side") for i in range(6)]
             + ["distance_bias"]]
    copies = dict(zip(names, report.extra_inputs, strict=True))
    assert torch.equal(copies["2.q_side.0"], bank.predictor(2).q_side[0].weight)
    assert torch.equal(copies["3.distance_bias"], bank.predictor(3).distance_bias)


def test_bank_for_another_model_fails_compilation_clearly():
    model = tiny_llama()
    other = _bank(signature=ModelSignature(128, 4, 32, 4, BLOCK))
    compiled = torch.compile(model, backend=_backend(other), fullgraph=True)
    with pytest.raises(Exception, match="do not fit this model"):
        compiled(input_ids=token_batch(1, 128))


KEY = 100  # the planted key token


def _structured_llama():
    """A tiny Llama whose attention is structured: query head 0 / key head 0 have one channel (the
    lowest-frequency rotary pair, nearly position-independent over 512 tokens) that reads only the
    embedding direction of token KEY, so KEY tokens attend strongly to each other and the blocks
    that hold them dominate the oracle's scores."""
    model = tiny_llama()
    with torch.no_grad():
        direction = torch.zeros(64)
        direction[0] = 1.0
        model.model.embed_tokens.weight[KEY] = direction
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[7] = 2.0 * direction
            layer.self_attn.k_proj.weight[7] = 2.0 * direction
    return model


def _planted_batch(seed: int, batch: int = 4, seq_len: int = 512, block: int = 32) -> torch.Tensor:
    """Random tokens, and in 4 random blocks per row 3 KEY tokens at random places."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (batch, seq_len), generator=generator)
    for row in range(batch):
        for b in torch.randperm(seq_len // block, generator=generator)[:4]:
            ids[row, b * block + torch.randint(0, block, (3,), generator=generator)] = KEY
    return ids


def test_calibration_learns_structured_attention_far_above_random():
    model = _structured_llama()
    options = {"block_size": 32, "dense_layers": [0], "keep_ratio": 0.25}  # keep 4 of 16 blocks
    train = [_planted_batch(seed) for seed in range(16)]
    held_out = [_planted_batch(1000 + seed) for seed in range(4)]
    bank = lemo_compile.calibrate(model, train, options=options, steps=150, lr=3e-3, progress=False)
    assert bank.layers == [1, 2, 3]
    metrics = lemo_compile.predictor_recall(model, bank, held_out, options=options)
    recall = sum(m["recall"] for m in metrics.values()) / len(metrics)
    # The random scorer on the same held-out batches, through the same metric.
    generator = torch.Generator().manual_seed(0)
    oracle_like = torch.rand(16, 16, generator=generator)
    random_recall = recall_and_overlap(torch.rand(16, 16, generator=generator), oracle_like, 4)[0]
    per_layer = ", ".join(f"{m['recall']:.3f}" for m in metrics.values())
    print(f"\nplanted keys: held-out recall {recall:.3f} ({per_layer}), random {random_recall:.3f}")
    assert recall >= 0.7, metrics
    assert random_recall < 0.45
    assert recall >= 2.5 * random_recall
    assert all(m["overlap"] >= m["recall"] * 0.9 for m in metrics.values())


def test_lemo_calibrate_command(tmp_path, capsys, monkeypatch):
    """`lemo calibrate` on a saved byte-level checkpoint and a folder of text files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lemo_compile.tools.cli import main

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"part{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * 40)
    out = tmp_path / "tiny.predictors.safetensors"
    given = {}
    calibrate = lemo_compile.calibrate

    def recording_calibrate(*args, **kwargs):
        given.update(kwargs)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(lemo_compile, "calibrate", recording_calibrate)
    code = main(["calibrate", "--model", str(tmp_path / "model"), "--data", str(data),
                 "--seq-len", "128", "--steps", "3", "--block-size", "16", "--out", str(out),
                 "--dtype", "float32", "--held-out", "0.25", "--mlp", "tokens",
                 "--loss", "ranking", "--distances", "4", "--distance-normalized"])
    assert code == 0
    bank = PredictorBank.load(out)
    assert bank.predictor(2).distance_bias.shape == (4,)
    assert given["loss"] == "ranking" and given["distances"] == 4 and given["steps"] == 3
    assert given["options"]["distance_normalized"] is True
    assert bank.layers == [2] and bank.signature == ModelSignature(64, 4, 16, 4, 16)  # "auto"
    assert bank.mlp_layers == [2]
    printed = capsys.readouterr().out
    assert "held-out recall" in printed and "layer   2" in printed and "MLP recall" in printed


def test_elastic_shrinking_removes_dead_units_and_keeps_predictions():
    bank = _bank(layers=(2,))
    predictor = bank.predictor(2)
    with torch.no_grad():  # make 5 units of the q side's first hidden layer dead: never positive
        predictor.q_side[0].weight[:5] = 0.0
        predictor.q_side[0].bias[:5] = -1.0
    h = [torch.randn(2, 96, 64) for _ in range(3)]
    seen = None
    for x in h:
        seen = predictor.hidden_activity(x, seen)
    before = [predictor(x) for x in h]
    sizes = bank.shrink({2: seen})
    assert sizes[2]["q"][1] <= 32 - 5 and sizes[2]["q"][0] == 16 * 16
    for x, want in zip(h, before, strict=True):
        torch.testing.assert_close(predictor(x), want, rtol=1e-5, atol=1e-5)


def test_shrunk_bank_round_trips(tmp_path):
    model = _structured_llama()
    options = {"block_size": 32, "dense_layers": [0], "keep_ratio": 0.25}
    batches = [_planted_batch(seed, batch=1) for seed in range(4)]
    bank = lemo_compile.calibrate(model, batches, options=options, steps=8, shrink=True,
                                  progress=False)
    path = tmp_path / "shrunk.safetensors"
    bank.save(path)
    loaded = PredictorBank.load(path)
    h = torch.randn(1, 512, 64)
    for layer in bank.layers:
        assert loaded.predictor(layer).sizes("q") == bank.predictor(layer).sizes("q")
        torch.testing.assert_close(loaded.predictor(layer)(h), bank.predictor(layer)(h))


def test_predictor_inputs_are_compiled_with_static_shapes():
    """The predictor weights the backend adds must not get symbolic sizes: Dynamo has no source
    for them, so any guard on such a size (Inductor adds some on CUDA) broke guard building."""
    from lemo_compile.fx_utils import fake_mode_of

    model = tiny_llama()
    ids = token_batch(1, 128)
    inner = _backend(_bank())
    symbols = {}

    def backend(gm, example_inputs):
        mode = fake_mode_of(gm, example_inputs)
        compiled = inner(gm, example_inputs)
        env = mode.shape_env
        symbols.update(env.backed_var_to_val if hasattr(env, "backed_var_to_val")
                       else env.var_to_val)
        return compiled

    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids).loss.backward()
    assert inner.reports[-1].extra_inputs, "the predictor scorer added no inputs"
    assert symbols == {}


def _mlp_bank(layers=(2, 3), mlp_layers=(2, 3), seed=0) -> PredictorBank:
    torch.manual_seed(seed)
    return PredictorBank(TINY, layers, width=32, rank=8,
                         mlp_layers=mlp_layers).requires_grad_(False).eval()


def test_bank_with_mlp_predictors_round_trips(tmp_path):
    bank = _mlp_bank()
    path = tmp_path / "mlp.safetensors"
    bank.save(path)
    loaded = PredictorBank.load(path)
    assert loaded.mlp_layers == [2, 3] and loaded.mlp_predictor(2).sizes() == (64, 32, 32, 1)
    h = torch.randn(2, 100, 64)
    assert torch.equal(loaded.mlp_predictor(3)(h), bank.mlp_predictor(3)(h))
    assert loaded.mlp_predictor(3)(h).shape == (2, 100)
    with pytest.raises(ValueError, match=r"MLP blocks of layers \[1\] are sparse"):
        loaded.check_fits(TINY, [2, 3], [1, 2, 3])


def test_mlp_predictor_scorer_matches_the_reference_and_is_one_graph():
    model = tiny_llama()
    bank = _mlp_bank()
    ids = token_batch(2, 150)
    backend = lemo_compile.LemoBackend({
        "compiler": "aot_eager", "block_size": BLOCK, "dense_layers": [0, 1], "loss_segment": None,
        "scorer": "predictor", "predictors": bank, "mlp": "tokens", "mlp_keep_ratio": 0.25,
    })
    compiled = assert_matches_reference(
        model, ids, backend, block_size=BLOCK, keep_ratio=0.4, dense_layers=[0, 1],
        scorer=_predictor_scores(bank), mlp="tokens", mlp_keep_ratio=0.25,
        mlp_scorer=lambda layer, h2: bank.mlp_predictor(layer)(h2))
    report = backend.reports[-1]
    assert report.counters["mlp_sparse_layers"] == 2 and not report.warnings
    assert [p.mlp_kept_tokens for p in report.plans] == [150, 150, 54, 54]
    assert "lemo_mlp_predictor_3_0" in report.graphs["select"]
    # 2 layers x (attention: 2 sides x 6 tensors + distance bias; MLP: 3 linear layers x 2)
    assert len(report.extra_inputs) == 2 * (13 + 6)
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) == 1


def test_bank_without_mlp_predictors_scores_mlp_blocks_by_their_activation():
    model = tiny_llama()
    ids = token_batch(1, 128)
    backend = lemo_compile.LemoBackend({
        "compiler": "aot_eager", "block_size": BLOCK, "dense_layers": [0, 1], "loss_segment": None,
        "scorer": "predictor", "predictors": _bank(), "mlp": "tokens",
    })
    bank = _bank()
    with pytest.warns(lemo_compile.LemoWarning, match=r"no MLP predictors.*layers \[2, 3\]"):
        assert_matches_reference(model, ids, backend, block_size=BLOCK, keep_ratio=0.4,
                                 dense_layers=[0, 1], scorer=_predictor_scores(bank), mlp="tokens")
    assert backend.reports[-1].counters["mlp_sparse_layers"] == 2


def test_calibration_learns_mlp_scores_far_above_random():
    """Planted "loud" tokens: in every layer, 8 channels of the MLP's gate and up projections read
    only token KEY's embedding direction (gates of both signs, so that one half passes the SiLU
    whatever the sign KEY's MLP input has), so the 4 blocks per row that hold KEY tokens have by
    far the largest intermediate activation: the MLP oracle keeps them, and so must the
    predictors."""
    model = _structured_llama()
    with torch.no_grad():
        direction = model.model.embed_tokens.weight[KEY].clone()
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:4] = 0.5 * direction
            layer.mlp.gate_proj.weight[4:8] = -0.5 * direction
            layer.mlp.up_proj.weight[:8] = 0.5 * direction
    options = {"block_size": 32, "dense_layers": [0], "keep_ratio": 0.25, "mlp": "tokens"}
    train = [_planted_batch(seed) for seed in range(16)]
    held_out = [_planted_batch(1000 + seed) for seed in range(4)]
    bank = lemo_compile.calibrate(model, train, options=options, steps=150, lr=3e-3, progress=False)
    assert bank.mlp_layers == [1, 2, 3]
    torch.manual_seed(0)
    untrained = PredictorBank(bank.signature, bank.layers, mlp_layers=bank.mlp_layers).eval()

    def mean_mlp_recall(predictors):
        metrics = lemo_compile.predictor_recall(model, predictors, held_out, options=options)
        return sum(m["mlp_recall"] for m in metrics.values()) / len(metrics)

    trained_recall, untrained_recall = mean_mlp_recall(bank), mean_mlp_recall(untrained)
    print(f"MLP recall: trained {trained_recall:.3f}, untrained {untrained_recall:.3f}")
    # measured: trained 1.000, untrained 0.203 (random choice: 4 of 16 blocks, 0.25)
    assert trained_recall >= 0.9
    assert untrained_recall < 0.5


def test_calibration_does_not_make_a_later_compile_dynamic():
    """Calibrating at one length and then training at another in the same process: the training
    graph must still have static shapes (Dynamo's automatic dynamic shapes would otherwise mark the
    length dynamic, and lemo would run it dense)."""
    model = tiny_llama()
    lemo_compile.calibrate(model, [token_batch(1, 128)], options={"block_size": BLOCK},
                           progress=False)
    backend = lemo_compile.LemoBackend({"compiler": "aot_eager", "block_size": BLOCK,
                                        "loss_segment": None})
    ids = token_batch(1, 160)
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    report = backend.reports[-1]
    assert not report.warnings and report.counters["sparse_layers"] == 1


def test_recall_over_many_lengths_and_calls():
    """More sequence lengths than Dynamo's default recompile limit (8), in a second call at lengths
    the first saw too: every batch must still be captured (a batch run without the capture would
    have no labels)."""
    model = tiny_llama(layers=2)
    options = {"block_size": 8, "dense_layers": []}
    batches = [token_batch(1, 64 + 8 * i, seed=i) for i in range(9)]
    bank = lemo_compile.calibrate(model, batches[-2:], options=options, progress=False)
    metrics = lemo_compile.predictor_recall(model, bank, batches, options=options)  # 9 lengths
    assert sorted(metrics) == [0, 1]


def test_ranking_loss_orders_kept_blocks_above_dropped_ones():
    from lemo_compile.predictors.calibrate import _ranking_loss

    oracle = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])  # keeps blocks 0 and 2 (k = 2)
    right = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3]])
    wrong = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3]], requires_grad=True)
    assert _ranking_loss(right, oracle, 2) < _ranking_loss(wrong, oracle, 2)
    optimizer = torch.optim.SGD([wrong], lr=0.5)
    for _ in range(50):  # descending it turns the wrong ranking into the oracle's choice
        optimizer.zero_grad()
        _ranking_loss(wrong, oracle, 2).backward()
        optimizer.step()
    assert set(wrong.detach().topk(2).indices[0].tolist()) == {0, 2}


def test_calibrate_with_the_ranking_loss():
    model = _structured_llama()
    options = {"block_size": 32, "dense_layers": [0], "keep_ratio": 0.25}
    bank = lemo_compile.calibrate(model, [_planted_batch(0, batch=1)], options=options, steps=3,
                                  loss="ranking", progress=False)
    assert bank.layers == [1, 2, 3]
    with pytest.raises(ValueError, match="loss must be 'tiles' or 'ranking'"):
        lemo_compile.calibrate(model, [_planted_batch(0, batch=1)], options=options, loss="l2")


def test_calibrate_without_the_distance_bias(tmp_path):
    """distances=1: one bias entry for every distance, which adds the same amount to every block's
    score (each sums n tiles), so the predictors rank as the paper's, without position."""
    model = _structured_llama()
    options = {"block_size": 32, "dense_layers": [0], "keep_ratio": 0.25}
    batch = [_planted_batch(0, batch=1)]
    bank = lemo_compile.calibrate(model, batch, options=options, steps=3, distances=1,
                                  progress=False)
    assert {tuple(bank.predictor(layer).distance_bias.shape) for layer in bank.layers} == {(1,)}
    bank.save(tmp_path / "bank.safetensors")
    loaded = PredictorBank.load(tmp_path / "bank.safetensors")
    h = torch.randn(1, 512, 64)
    for layer in bank.layers:
        torch.testing.assert_close(loaded.predictor(layer)(h), bank.predictor(layer)(h))
    with pytest.raises(ValueError, match="distances must be at least 1"):
        lemo_compile.calibrate(model, batch, options=options, distances=0)


def test_coverage_ratios_give_concentrated_layers_fewer_blocks():
    from lemo_compile.predictors.calibrate import ratios_for_coverage

    def shares(*scores):
        ordered = torch.tensor(scores).sort(dim=1, descending=True).values
        return ordered.cumsum(1) / ordered.sum(1, keepdim=True)

    concentrated, flat = shares([100.0, 1.0, 1.0, 1.0]), shares([1.0, 1.0, 1.0, 1.0])
    # a target up to 0.75 needs 1 block of the concentrated layer and 3 of the flat one: mean 0.5
    assert ratios_for_coverage({3: [concentrated], 5: [flat]}, 0.5) == {3: 0.25, 5: 0.75}
    assert ratios_for_coverage({3: [concentrated], 5: [flat]}, 1.0) == {3: 1.0, 5: 1.0}
    assert ratios_for_coverage({3: [concentrated], 5: [flat]}, 0.1) == {3: 0.25, 5: 0.25}
    # the samples of a layer average: one sample needs 1 block, the other 3
    assert ratios_for_coverage({0: [torch.cat([concentrated, flat])]}, 0.5) == {0: 0.5}


def test_layer_keep_ratios_spend_the_budget_and_compile():
    model = tiny_llama(layers=6)
    batches = [token_batch(2, 512, seed=s) for s in (1, 2)]
    ratios = lemo_compile.layer_keep_ratios(model, batches, options={"keep_ratio": 0.4})
    assert len(ratios) == 6 and [ratios[i] for i in (0, 1, 2, 5)] == [1.0] * 4
    sparse = [ratios[3], ratios[4]]
    assert 0.4 - 1 / 8 < sum(sparse) / 2 <= 0.4  # 8 blocks of 64: the mean moves in steps of 1/8
    assert all(1 / 8 <= r <= 1 for r in sparse)
    backend = lemo_compile.LemoBackend({"keep_ratio": ratios, "compiler": "aot_eager",
                                        "loss_segment": None})
    assert_matches_reference(model, batches[0], backend, keep_ratio=ratios)


def test_oracle_scores_select_what_the_backend_selects():
    """`oracle_scores`' top k blocks of the first sparse layer are the blocks lemo's oracle keeps
    there in the compiled step (read by `explain`); the next layer's are read in the dense
    forward, so they differ from the step's, where the first sparse layer dropped tokens."""
    from lemo_compile.predictors.calibrate import oracle_scores

    model = tiny_llama(layers=6)
    ids = token_batch(2, 512, seed=3)
    options = {"keep_ratio": 0.4, "compiler": "aot_eager", "loss_segment": None}
    scores, kept = oracle_scores(model, [ids], options=options)
    assert kept == {3: 4, 4: 4} and len(scores) == 1
    selected = lemo_compile.explain(model, input_ids=ids, labels=ids, options=options).selected
    top = {}
    for layer, sigma in scores[0].items():
        assert sigma.shape == (2, 8) and sigma.dtype == torch.float32
        best = torch.sort(sigma, dim=1, descending=True, stable=True).indices[:, :4]
        top[layer] = best.sort(dim=1).values
    assert torch.equal(top[3], selected["attention"][3])
    assert not torch.equal(top[4], selected["attention"][4])
