"""Model families beyond Llama: tiny random-init models compiled with lemo against the eager
reference of the same semantics, keep_ratio 1.0 against the plain model, one graph, and what lemo
inserted; OPT (pre-norm) against its own reference, post-norm OPT falls back to dense with a
warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import lemo_compile
from conftest import (
    assert_equals_plain_model, assert_matches_reference, grads, inserted_nodes, tiny_opt,
    token_batch,
)
from lemo_compile.passes.select import MIXTURE_OF_EXPERTS
from reference import opt_lemo_forward

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              use_cache=False)
FAMILIES = {
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),  # q/k norms
}
OPTIONS = {"compiler": "aot_eager", "block_size": 16, "dense_layers": [0]}


def _model(family: str):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**COMMON, **extra)).train()


class Recording(lemo_compile.LemoBackend):
    def __call__(self, gm, example_inputs, **kwargs):
        self.gm = gm
        return super().__call__(gm, example_inputs, **kwargs)


def _compiled(model, **options):
    backend = Recording({**OPTIONS, **options})
    return backend, torch.compile(model, backend=backend, fullgraph=True)


@pytest.mark.parametrize("mlp", ["off", "tokens", "channels"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_the_reference(family, mlp):
    model = _model(family)
    ids = token_batch(2, 150)
    backend = Recording({**OPTIONS, "loss_segment": None, "mlp": mlp})
    compiled = assert_matches_reference(model, ids, backend, block_size=16, keep_ratio=0.4,
                                        dense_layers=[0], mlp=mlp)
    report = backend.reports[-1]
    assert [p.kept_tokens for p in report.plans] == [150, 70, 70, 70]
    assert not report.warnings
    assert report.counters.get("mlp_sparse_layers", 0) == (3 if mlp == "tokens" else 0)
    assert report.counters.get("mlp_channel_layers", 0) == (3 if mlp == "channels" else 0)
    # one graph, no recompilation on the next step
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) == 1


@pytest.mark.parametrize("family", [*sorted(FAMILIES), "opt"])
def test_family_keep_ratio_one_is_the_plain_model(family):
    model = tiny_opt() if family == "opt" else _model(family)
    ids = token_batch(1, 128)
    _, compiled = _compiled(model, keep_ratio=1.0, loss_segment=None)
    got = compiled(input_ids=ids, labels=ids)
    want = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_structural_summary(family):
    model = _model(family)
    ids = token_batch(1, 150)
    backend, compiled = _compiled(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        compiled(input_ids=ids, labels=ids)
    report = backend.reports[-1]
    assert report.counters["sparse_layers"] == 3 and report.counters["segmented_losses"] == 1
    assert report.counters["causal_attention"] == 4
    roles = inserted_nodes(backend.gm)
    assert sorted(roles) == [1, 2, 3]
    for counts in roles.values():
        # gathers of x, cos and sin (the causal mask became is_causal=True); one selection; one
        # residual scatter-add
        assert counts["gather"] == 3 and counts["select"] == 1 and counts["scatter_add"] == 1
        assert counts["score"] > 10  # the oracle's copy of norm, q / k projections and RoPE


@pytest.mark.parametrize("mlp", ["off", "tokens", "channels"])
def test_opt_matches_the_reference(mlp):
    """OPT (learned positions, LayerNorm, dropout before each residual add, biases): attention
    blocks and, with mlp="tokens", MLP blocks (scored by ||relu(fc1)||) run on kept tokens; with
    mlp="channels", fc2's backward goes through the top channels of relu(fc1) only."""
    model = tiny_opt()
    ids = token_batch(2, 150)
    backend = Recording({**OPTIONS, "loss_segment": None, "mlp": mlp})
    compiled = assert_matches_reference(model, ids, backend, reference=opt_lemo_forward,
                                        block_size=16, keep_ratio=0.4, dense_layers=[0], mlp=mlp)
    report = backend.reports[-1]
    assert [p.kept_tokens for p in report.plans] == [150, 70, 70, 70]
    assert report.counters["sparse_layers"] == 3
    assert report.counters.get("mlp_sparse_layers", 0) == (3 if mlp == "tokens" else 0)
    assert report.counters.get("mlp_channel_layers", 0) == (3 if mlp == "channels" else 0)
    assert not report.warnings
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert len(backend.reports) == 1  # one graph, no recompilation


def test_opt_calibrated_predictors_match_the_reference():
    """`calibrate` on OPT (whose MLP reads a flattened [B*S, D] input) trains attention and MLP
    predictors, and the predictor scorer then selects what the reference selects with them."""
    from lemo_compile.kernels.block_scores import scores_from_tiles

    model = tiny_opt()
    options = {"block_size": 16, "keep_ratio": 0.4, "dense_layers": [0], "mlp": "tokens"}
    bank = lemo_compile.calibrate(model, [token_batch(1, 128, seed=s) for s in range(3)],
                                  options=options, progress=False)
    assert bank.layers == bank.mlp_layers == [1, 2, 3]
    ids = token_batch(2, 150)
    backend = Recording({**OPTIONS, **options, "loss_segment": None, "scorer": "predictor",
                         "predictors": bank})
    assert_matches_reference(
        model, ids, backend, reference=opt_lemo_forward, **options,
        scorer=lambda layer, h: scores_from_tiles(torch.tril(bank.predictor(layer)(h))),
        mlp_scorer=lambda layer, h2: bank.mlp_predictor(layer)(h2))
    report = backend.reports[-1]
    assert report.counters["mlp_sparse_layers"] == 3 and not report.warnings


def test_opt_loss_is_segmented():
    """OPT returns its logits as linear(...).contiguous(): the segmented loss still applies, and
    gives the loss and gradients of the unsegmented one."""
    model = tiny_opt()
    ids = token_batch(2, 150)
    results = []
    for segment in (None, 64):
        backend = Recording({**OPTIONS, "loss_segment": segment})
        loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), grads(model), backend.reports[-1]))
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
    (plain, plain_grads, _), (segmented, segmented_grads, report) = results
    assert report.counters["segmented_losses"] == 1
    torch.testing.assert_close(segmented, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(segmented_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_opt_reference_is_not_the_dense_model():
    """The equality above is not vacuous: the sparse reference differs from the plain model."""
    model = tiny_opt()
    ids = token_batch(1, 150)
    with torch.no_grad():
        logits, _ = opt_lemo_forward(model, ids, block_size=16, keep_ratio=0.4, dense_layers=[0])
        dense, _ = opt_lemo_forward(model, ids, block_size=16, keep_ratio=1.0, dense_layers=[0])
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(dense, plain, rtol=1e-5, atol=1e-5)
    assert (logits - plain).abs().max() > 1e-3


def test_opt_structural_summary():
    model = tiny_opt()
    ids = token_batch(1, 150)
    backend, compiled = _compiled(model, mlp="tokens")
    compiled(input_ids=ids, labels=ids)
    report = backend.reports[-1]
    assert report.counters["sparse_layers"] == 3 and report.counters["mlp_sparse_layers"] == 3
    assert report.counters["segmented_losses"] == 1
    roles = inserted_nodes(backend.gm)
    assert sorted(roles) == [1, 2, 3]
    for counts in roles.values():
        # learned positions are added before the layers and sdpa gets is_causal=True, no mask:
        # per block only x is gathered; one selection and one residual scatter-add each
        assert counts["gather"] == 2 and counts["scatter_add"] == 2
        assert counts["select"] == 1 and counts["mlp_select"] == 1
        assert counts["score"] > 5 and counts["mlp_score"] > 3


def test_opt_with_dropout_trains():
    """dropout > 0: the dropout runs on the kept rows of each sparse block; not equality-tested."""
    model = tiny_opt(dropout=0.1)
    ids = token_batch(1, 150)
    backend, compiled = _compiled(model, mlp="tokens")
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    report = backend.reports[-1]
    assert report.counters["sparse_layers"] == 3 and report.counters["mlp_sparse_layers"] == 3
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_post_norm_opt_falls_back_to_dense_with_a_warning():
    """OPT-350m's layout (do_layer_norm_before=False: x1 = norm(x + Attn(x))) is not a pre-norm
    layer: every layer runs dense, lemo says which and why, and training still works."""
    model = tiny_opt(layers=2, pre_norm=False)
    ids = token_batch(1, 128)
    backend = lemo_compile.LemoBackend(OPTIONS)
    with pytest.warns(lemo_compile.LemoWarning, match="model.decoder.layers.0.*post-norm"):
        out = torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
    out.loss.backward()
    assert backend.reports[-1].counters.get("sparse_layers", 0) == 0
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.loss) and model.lm_head.weight.grad is not None


def _lemo_warnings(model, *args, **kwargs) -> list[str]:
    backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend=backend)(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, lemo_compile.LemoWarning)]


def test_a_parallel_residual_sum_changed_as_a_whole_is_named_as_such_once():
    """Falcon adds its attention output into the MLP's in place and applies a dropout to the sum
    before adding x: no `x + a + m` to reorder, so its layers run dense, with one warning."""
    config = transformers.FalconConfig(vocab_size=101, hidden_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, use_cache=False)
    torch.manual_seed(0)
    ids = token_batch(1, 64)
    (message,) = _lemo_warnings(transformers.FalconForCausalLM(config).train(), input_ids=ids,
                                labels=ids)
    assert message.count("\n  - ") == 1 and "layers transformer.h.0-3: " in message
    assert "parallel-residual" in message and "post-norm" not in message


@pytest.mark.parametrize("scale, sandwich, pre_norm", [
    (0.5, False, True), (None, True, True), (0.5, True, True), (None, True, False)])
@pytest.mark.parametrize("keep_ratio", [0.4, 1.0])
def test_block_tails_match_the_reference(scale, sandwich, pre_norm, keep_ratio):
    """x + f(block(norm(x))) with f a scale (Granite), a norm on the block output (Gemma's sandwich
    norms) or both, and x + norm(block(x)) (OLMo2): the tail runs on the kept rows with the block;
    loss, logits and every gradient equal the eager reference; keep 1.0 equals the plain model;
    one graph."""
    _toy_matches_the_reference(keep_ratio, scale=scale, sandwich=sandwich, pre_norm=pre_norm)


@pytest.mark.parametrize("parallel, mlp, keep_ratio", [
    ("two", "off", 0.4), ("shared", "off", 0.4), ("two", "tokens", 0.4), ("shared", "tokens", 0.4),
    ("shared", "off", 1.0)])
def test_parallel_residual_layers_match_the_reference(parallel, mlp, keep_ratio):
    """y = x + Attn(norm1(x)) + MLP(norm2(x)), summed as GPT-NeoX does ((m + a) + x), with two
    norms or one that both blocks read: the attention block adds its kept rows into x, the MLP
    block (dense, or on its own kept rows) into the result, reading x."""
    _toy_matches_the_reference(keep_ratio, mlp=mlp, parallel=parallel)


def _toy_matches_the_reference(keep_ratio: float, mlp: str = "off", **toy_options) -> None:
    """One compiled training step of a 3-layer toy decoder (layers 1 and 2 sparse) against the
    eager reference, or against the plain model at keep 1.0: logits, loss, every gradient."""
    import toy
    from reference import toy_lemo_forward

    torch.manual_seed(0)
    model = toy.ToyDecoder(layers=3, **toy_options).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights away from 1, so that a missing norm shows
                p.uniform_(0.5, 1.5)
    ids, labels = token_batch(1, 150, vocab=32), token_batch(1, 150, vocab=32, seed=2)
    backend = lemo_compile.LemoBackend({**OPTIONS, "loss_segment": None, "keep_ratio": keep_ratio,
                                        "mlp": mlp})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lemo_compile.LemoWarning)  # no layer falls back
        logits, loss = torch.compile(model, backend=backend, fullgraph=True)(ids, labels)
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    if keep_ratio == 1.0:
        want_logits, want_loss = model(ids, labels)
    else:
        want_logits, want_loss = toy_lemo_forward(model, ids, labels, block_size=16,
                                                  dense_layers=[0], mlp=mlp)
    want_loss.backward()
    (report,) = backend.reports
    assert report.counters["sparse_layers"] == (2 if keep_ratio < 1 else 0)
    assert report.counters.get("mlp_sparse_layers", 0) == (2 if mlp == "tokens" else 0)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    for name, grad in grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4, msg=name)
    if keep_ratio < 1:  # the reference is not the plain model: the selection changes the result
        assert not torch.allclose(want_loss, model(ids, labels)[1])


TAILED = {  # families whose blocks have a tail: x + f(block(norm(x)))
    # x + block * residual_multiplier
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                {"residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                 "attention_multiplier": 0.25, "logits_scaling": 2.0}),
    # x + post_norm(block(pre_norm(x))), q/k norms, local and global layers (windows >= S here)
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512}),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM,  # the same, GLM's names
             {"head_dim": 16, "pad_token_id": 0}),
    # x + norm(block(x)): no pre-norm
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
}


PARALLEL = {  # parallel-residual families: y = x + Attn(norm(x)) + MLP(norm'(x))
    # two norms, (m + a) + x
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **{**COMMON, "num_key_value_heads": None})),
    # one norm both blocks read: (x + a) + m; (a + m) + x with dropouts on each; the same in GPT-J's
    # names
    "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON)),
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
        **{**COMMON, "num_key_value_heads": 4})),
    "gptj": lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=101, n_embd=64, n_inner=96, n_layer=4, n_head=4, rotary_dim=8, use_cache=False)),
}


def _shaped_model(family: str):
    torch.manual_seed(0)
    if family in PARALLEL:
        return PARALLEL[family]().train()
    config_class, model_class, extra = TAILED[family]
    return model_class(config_class(**COMMON, **extra)).train()


@pytest.mark.parametrize("family, mlp", [
    *((family, mlp) for family in ("gemma3", "granite", "gpt_neox", "cohere")
      for mlp in ("off", "tokens", "channels")),
    ("glm4", "off"), ("olmo2", "off"), ("phi", "off"), ("gptj", "off")])
def test_families_of_other_residual_shapes_run_sparse_and_keep_one_is_the_plain_model(family, mlp):
    """Block tails and parallel residuals in Hugging Face families: every layer but the first
    sparse, in each MLP mode (the shapes' semantics are checked against the reference on the toy
    decoder above); keep 1.0 equals the plain model."""
    model = _shaped_model(family)
    ids = token_batch(1, 150)
    backend, compiled = _compiled(model, mlp=mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    (report,) = backend.reports
    assert report.counters["sparse_layers"] == 3 and report.counters["causal_attention"] == 4
    assert report.counters.get("mlp_sparse_layers", 0) == (3 if mlp == "tokens" else 0)
    assert report.counters.get("mlp_channel_layers", 0) == (3 if mlp == "channels" else 0)
    assert not [w for w in report.warnings if "dense" in w]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads(model).values())
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        other = token_batch(1, 150, seed=3)  # (labels that are input_ids, as in the first step)
        compiled(input_ids=other, labels=other)  # a second step: no recompile
    assert len(backend.reports) == 1
    if mlp != "off":
        return

    _, compiled = _compiled(model, keep_ratio=1.0, loss_segment=None)
    assert_equals_plain_model(compiled, model, ids, grad_rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "granite", "cohere"])
def test_other_residual_shapes_under_checkpointing_equal_no_checkpointing(family):
    """Inside checkpointed layers too (the partitioner moves Gemma's `1 + weight` after the gather
    that the fused gather + RMSNorm replaces: the weight is moved back before it; Cohere's shared
    norm and parallel sum are rewritten inside the checkpointed body)."""
    model = _shaped_model(family)
    ids = token_batch(1, 150)
    results = []
    for checkpointing in (True, False):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        backend, compiled = _compiled(model, scorer="random", seed=0, loss_segment=None)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        assert backend.reports[-1].counters["sparse_layers"] == 3
        results.append((loss.detach(), grads(model)))
        model.zero_grad(set_to_none=True)
    (loss, got), (want_loss, want) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_block_tail_that_mixes_tokens_says_what_it_saw():
    import toy

    class MixingLayer(toy.Layer):
        def forward(self, x, cos, sin):
            x = x + torch.cumsum(self.attn(self.norm1(x), cos, sin), dim=1)
            return x + self.mlp(self.norm2(x))

    model = toy.ToyDecoder(layers=2)
    model.layers = torch.nn.ModuleList(MixingLayer(32, 4, 2, 48) for _ in range(2))
    (message,) = _lemo_warnings(model.train(), token_batch(1, 64, vocab=32))
    assert message.count("\n  - ") == 1
    assert ("layers layers.0-1: the output of its attn module is not added into the residual "
            "stream through per-token operations (it goes to cumsum;") in message


def test_peft_layer_paths_are_the_module_paths_users_know():
    from peft import LoraConfig, get_peft_model

    model = _model("qwen2")
    model.config._attn_implementation = "eager"
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    ids = token_batch(1, 64)
    (message,) = _lemo_warnings(model, input_ids=ids, labels=ids)
    assert "layers base_model.model.model.layers.0-3: no scaled_dot_product_attention" in message
    assert "__dict__" not in message


MIXTURES = {  # MoE MLPs: a router's top-k picks experts per token
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32)),
}


@pytest.mark.parametrize("family, mlp", [("mixtral", "tokens"), ("qwen2_moe", "channels")])
def test_mixture_of_experts_mlps_stay_dense_with_one_warning_that_says_so(family, mlp):
    """The attention blocks are sparse; the expert MLPs run dense (their router sees every token),
    and one warning names them as mixture-of-experts MLPs."""
    torch.manual_seed(0)
    model = MIXTURES[family]().train()
    ids = token_batch(1, 64)
    backend, compiled = _compiled(model, mlp=mlp, loss_segment=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(input_ids=ids, labels=ids).loss.backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, lemo_compile.LemoWarning)]
    (report,) = backend.reports
    assert report.counters["sparse_layers"] == 3
    assert not report.counters.get("mlp_sparse_layers") and not report.counters.get("mlp_channel_layers")
    assert messages == ["lemo: these MLP blocks run dense: layers 1-3: " + MIXTURE_OF_EXPERTS]
