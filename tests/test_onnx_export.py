"""ONNX export of lemo's rewritten forward graph (`lemo_compile.tools.onnx_export`).

Two levels: each ONNX function of the domain "lemo" run alone by onnxruntime against lemo's torch
implementation (odd shapes, ties, tails), and whole rewritten graphs (tiny HF Llama, the project's
toy decoder) exported once per module and checked for validity, structure and, with onnxruntime,
for the torch graph's outputs (atol = rtol = 1e-5, float32).
"""

from __future__ import annotations

import warnings

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

import lemo_compile  # noqa: E402
from conftest import token_batch  # noqa: E402
from lemo_compile.tools import onnx_export as ox  # noqa: E402
from lemo_compile import ops  # noqa: E402
from lemo_compile.fx_utils import fake_mode_of, own_copy  # noqa: E402
from lemo_compile.config import LemoConfig  # noqa: E402
from lemo_compile.passes.manager import run_graph_passes  # noqa: E402
from toy import ToyDecoder  # noqa: E402

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64}


# --------------------------------------------------------------- one function, run on its own


def run_function(function, inputs, expected: torch.Tensor, **attributes) -> torch.Tensor:
    """Run `function` of onnx_export in a one-node model with onnxruntime (inputs: tensors, None
    for an omitted optional input); `expected` gives the output's declared shape and dtype."""
    names = [f"x{i}" if t is not None else "" for i, t in enumerate(inputs)]
    graph_inputs = [
        helper.make_tensor_value_info(name, ONNX_TYPE[t.dtype], list(t.shape))
        for name, t in zip(names, inputs, strict=True) if t is not None
    ]
    output = helper.make_tensor_value_info("y", ONNX_TYPE[expected.dtype], list(expected.shape))
    node = helper.make_node(function.name, names, ["y"], domain=ox.DOMAIN, **attributes)
    model = helper.make_model(
        helper.make_graph([node], function.name, graph_inputs, [output]),
        opset_imports=[helper.make_opsetid("", ox.OPSET),
                       helper.make_opsetid(ox.DOMAIN, ox.DOMAIN_VERSION)],
        functions=[function.to_function_proto()],
    )
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True) if t is not None}
    return torch.from_numpy(session.run(None, feed)[0])


@pytest.mark.parametrize(("batch", "seq_len", "block", "kept"), [(1, 28, 4, 3), (3, 30, 4, 2),
                                                                  (2, 7, 7, 1), (2, 65, 16, 4)])
def test_select_tokens_function(batch, seq_len, block, kept):
    n = seq_len // block
    generator = torch.Generator().manual_seed(seq_len)
    scores = torch.randint(0, 3, (batch, n), generator=generator).float()  # many ties
    want = ops.select_tokens(scores, kept, block, seq_len)
    got = run_function(ox.select_tokens, [scores], want, kept_blocks=kept, block_size=block,
                       seq_len=seq_len)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("shape", "dims"), [((3, 9, 5), (1,)), ((1, 9, 5), (1,)), ((3, 9), (1,)),
                                             ((3, 1, 9, 9), (2, 3)), ((1, 2, 9, 9), (2, 3))])
def test_gather_tokens_function(shape, dims):
    t = torch.randn(shape)
    idx = torch.tensor([[0, 4, 8], [1, 2, 3], [5, 6, 7]])
    want = ops.gather_tokens(t, idx, dims)
    got = t
    for dim in dims:  # the export makes one call per dim
        got = run_function(ox.gather_tokens, [got, idx], ops.gather_tokens(got, idx, (dim,)),
                           dim=dim)
    assert torch.equal(got, want)


def test_scatter_add_tokens_function():
    x, rows = torch.randn(2, 7, 3), torch.randn(2, 3, 3)
    idx = torch.tensor([[0, 3, 6], [1, 2, 5]])
    want = ops.scatter_add_tokens(x, idx, rows)
    torch.testing.assert_close(run_function(ox.scatter_add_tokens, [x, idx, rows], want), want,
                               **TOLERANCE)


@pytest.mark.parametrize(("heads", "kv_heads", "seq_len", "block"), [(4, 2, 63, 8), (2, 2, 64, 16),
                                                                     (3, 1, 9, 3)])
def test_block_scores_function(heads, kv_heads, seq_len, block):
    q, k = torch.randn(2, heads, seq_len, 16), torch.randn(2, kv_heads, seq_len, 16)
    want = torch.ops.lemo.block_scores(q, k, block)
    got = run_function(ox.block_scores, [q, k], want, block_size=block)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_activation_block_scores_function():
    intermediate = torch.randn(2, 65, 24)
    want = ops.activation_block_scores(intermediate, 16)
    got = run_function(ox.activation_block_scores, [intermediate], want, block_size=16)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_predicted_block_scores_function():
    from lemo_compile.predictors.bank import BlockPredictor, predicted_block_scores

    torch.manual_seed(0)
    predictor = BlockPredictor.new(8, 32, 4, width=16, rank=4)
    h = torch.randn(2, 70, 32)
    q_side = [t.detach() for t in predictor.side_tensors("q")]
    k_side = [t.detach() for t in predictor.side_tensors("k")]
    distance_bias = torch.randn(5)  # fewer entries than the 8 blocks' distances: clamped
    want = predicted_block_scores(h, q_side, k_side, distance_bias, 8, 4)
    got = run_function(ox.predicted_block_scores, [h, *q_side, *k_side, distance_bias], want,
                       block_size=8, heads=4)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_predicted_mlp_block_scores_function():
    from lemo_compile.predictors.bank import MlpPredictor, predicted_mlp_block_scores

    torch.manual_seed(0)
    tensors = [t.detach() for t in MlpPredictor.new(32, width=16).tensors()]
    h = torch.randn(2, 70, 32)
    want = predicted_mlp_block_scores(h, tensors, 8)
    got = run_function(ox.predicted_mlp_block_scores, [h, *tensors], want, block_size=8)
    torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_function(reduction, with_bias):
    h, weight = torch.randn(13, 8), torch.randn(11, 8)
    bias = torch.randn(11) if with_bias else None
    target = torch.randint(0, 11, (13,))
    target[[2, 7]] = -100
    want = ops.linear_cross_entropy(h, weight, bias, target, -100, reduction, 4, torch.float32)
    got = run_function(ox.linear_cross_entropy, [h, weight, bias, target], want,
                       ignore_index=-100, reduction=reduction, segment=4,
                       logits_dtype=TensorProto.FLOAT)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_random_block_scores_function_is_a_uniform_stand_in():
    like = torch.zeros(3, 40, 8)
    want = torch.ops.lemo.random_block_scores(like, 5, 1, 7)
    got = run_function(ox.random_block_scores, [like], want, n_blocks=5, layer=1, seed=7)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    assert ((got >= 0) & (got < 1)).all()


# ------------------------------------------------------------------------ whole rewritten graphs


def rewritten_graph(model, call, options):
    """(gm, inputs): the Dynamo graph of `call(compiled model)` after lemo's passes, and the real
    tensors it takes (the predictor scorer's weights last), captured by a backend that runs the
    graph unchanged."""
    captured = {}

    def backend(gm, example_inputs):
        rewritten = own_copy(gm)  # the predictor scorer adds inputs, which Dynamo must not see
        config = LemoConfig.from_options({"compiler": "aot_eager", **options})
        report = run_graph_passes(rewritten, config, fake_mode_of(gm, example_inputs))
        captured["graph"] = (rewritten, [*example_inputs, *report.extra_inputs])
        return gm.forward

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lemo_compile.LemoWarning)
        call(torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    return captured["graph"]


def tiny_llama(*, checkpointing=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def llama_call(batch, seq_len):
    ids = token_batch(batch, seq_len, vocab=128)
    return lambda compiled: compiled(input_ids=ids, labels=ids)


class Exported:
    """A rewritten graph, its inputs, its code before export and the exported model (from file)."""

    def __init__(self, gm, inputs, path):
        self.gm, self.inputs, self.code = gm, inputs, _all_code(gm)
        self.returned = ox.export_onnx(gm, inputs, path)
        self.model = onnx.load(str(path))

    def lemo_nodes(self):
        return [n for n in self.model.graph.node if n.domain == ox.DOMAIN]

    def run(self):
        """(torch outputs, onnxruntime outputs) on the example inputs."""
        with torch.no_grad():
            want = self.gm(*self.inputs)
        session = ort.InferenceSession(self.model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = dict(zip(names, (t.detach().numpy() for t in self.inputs), strict=True))
        return list(want), [torch.from_numpy(a) for a in session.run(None, feed)]


def _all_code(gm) -> str:
    return "\n".join(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))


@pytest.fixture(scope="module")
def llama_oracle(tmp_path_factory):
    """Oracle scorer on attention and MLP blocks, layers in activation-checkpoint regions, a
    sequence with a tail (66 = 16 blocks of 4 + 2)."""
    options = {"block_size": 4, "keep_ratio": 0.5, "dense_layers": [], "mlp": "tokens",
               "loss_segment": None}
    gm, inputs = rewritten_graph(tiny_llama(checkpointing=True), llama_call(2, 66), options)
    assert any(n.target is ox._CHECKPOINT for n in gm.graph.nodes)
    return Exported(gm, inputs, tmp_path_factory.mktemp("onnx") / "llama_oracle.onnx")


def test_export_is_a_valid_model_file(llama_oracle):
    onnx.checker.check_model(llama_oracle.model, full_check=True)
    assert llama_oracle.returned == llama_oracle.model


def test_export_leaves_the_graph_unchanged(llama_oracle):
    assert _all_code(llama_oracle.gm) == llama_oracle.code


def test_export_copy_computes_what_the_graph_computes(llama_oracle):
    """The copy that is exported: checkpoints inlined, lemo's operations as `lemo_onnx` ops."""
    copy = ox._export_copy(llama_oracle.gm)
    assert not any(n.target is ox._CHECKPOINT for n in copy.graph.nodes)
    assert any(n.target is torch.ops.lemo_onnx.select_tokens.default for n in copy.graph.nodes)
    with torch.no_grad():
        got, want = copy(*llama_oracle.inputs), llama_oracle.gm(*llama_oracle.inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lemo_ops_are_function_calls_of_the_lemo_domain(llama_oracle):
    model = llama_oracle.model
    functions = {f.name: f for f in model.functions if f.domain == ox.DOMAIN}
    calls = [n.op_type for n in llama_oracle.lemo_nodes()]
    assert set(functions) == set(calls) == {
        "block_scores", "select_tokens", "gather_tokens", "scatter_add_tokens",
        "activation_block_scores",
    }
    # per layer: attention (scores, selection, 3 gathers: x, cos, sin; the causal mask became
    # is_causal=True; merge) and MLP (scores, selection, 1 gather, merge)
    assert calls.count("select_tokens") == 4 and calls.count("scatter_add_tokens") == 4
    assert calls.count("block_scores") == calls.count("activation_block_scores") == 2
    assert calls.count("gather_tokens") == 8
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), ("lemo", 1)}
    for function in functions.values():  # real bodies of standard ops
        assert function.node and all(n.domain == "" for n in function.node), function.name
    select = next(n for n in llama_oracle.lemo_nodes() if n.op_type == "select_tokens")
    assert {a.name: a.i for a in select.attribute} == {"kept_blocks": 8, "block_size": 4,
                                                       "seq_len": 66}
    tags = [{p.key: p.value for p in n.metadata_props} for n in llama_oracle.lemo_nodes()]
    assert {t["lemo.layer"] for t in tags} == {"0", "1"}
    assert {t["lemo.role"] for t in tags} == {"score", "select", "gather", "scatter_add",
                                              "mlp_score", "mlp_select"}


def test_onnxruntime_computes_the_rewritten_graph(llama_oracle):
    (loss, logits), (ort_loss, ort_logits) = llama_oracle.run()
    torch.testing.assert_close(ort_logits, logits, **TOLERANCE)
    torch.testing.assert_close(ort_loss, loss, **TOLERANCE)
    assert [o.name for o in llama_oracle.model.graph.output] == ["loss", "logits"]


def test_inputs_must_match_the_placeholders(llama_oracle):
    with pytest.raises(ValueError, match="placeholders but"):
        ox.export_onnx(llama_oracle.gm, llama_oracle.inputs[:-1])


def test_predictor_scorer_and_segmented_loss_export(tmp_path):
    from lemo_compile.predictors import ModelSignature, PredictorBank

    torch.manual_seed(0)
    bank = PredictorBank(ModelSignature(64, 4, 16, 2, 4), [0, 1], width=32, rank=8,
                         mlp_layers=[0, 1])
    options = {"block_size": 4, "keep_ratio": 0.5, "dense_layers": [], "loss_segment": 32,
               "scorer": "predictor", "predictors": bank.requires_grad_(False).eval(),
               "mlp": "tokens"}
    gm, inputs = rewritten_graph(tiny_llama(), llama_call(2, 64), options)
    exported = Exported(gm, inputs, tmp_path / "predictor.onnx")
    calls = [n.op_type for n in exported.lemo_nodes()]
    assert calls.count("predicted_block_scores") == 2 and calls.count("linear_cross_entropy") == 1
    assert calls.count("predicted_mlp_block_scores") == 2
    assert {f.name for f in exported.model.functions} == set(calls)
    (loss, logits), (ort_loss, ort_logits) = exported.run()
    torch.testing.assert_close(ort_loss, loss, **TOLERANCE)
    # the segmented loss leaves the logits uncomputed: a NaN placeholder in both
    assert ort_logits.shape == logits.shape and torch.isnan(ort_logits).all()


@pytest.mark.parametrize("option, match", [
    ({"distance_normalized": True}, "distance_normalized"),
    ({"scorer": "output"}, "scorer='output'"),
    ({"dropped_loss_weight": 0.5, "loss_segment": 64}, "dropped_loss_weight"),
])
def test_unsupported_options_are_refused_clearly(option, match):
    options = {"block_size": 16, "dense_layers": [0], "loss_segment": None, **option}
    gm, inputs = rewritten_graph(tiny_llama(), llama_call(2, 64), options)
    with pytest.raises(NotImplementedError, match=match):
        ox.export_onnx(gm, inputs)


@pytest.mark.parametrize("options", [{"keep_first_blocks": 1, "keep_last_blocks": 1},
                                     {"explore": 0.5, "seed": 3}])
def test_selection_levers_export(tmp_path, options):
    """The edge blocks kept and the explored share are standard ops in the exported model: with
    the edges kept onnxruntime gives the graph's loss; `explore` draws its random share from the
    random scorer's stand-in, so only the shapes are compared."""
    options = {"block_size": 16, "dense_layers": [0], "loss_segment": None, **options}
    gm, inputs = rewritten_graph(tiny_llama(), llama_call(2, 64), options)
    exported = Exported(gm, inputs, tmp_path / "levers.onnx")
    calls = [n.op_type for n in exported.lemo_nodes()]
    assert calls.count("select_tokens") == 1  # one sparse layer of two
    assert calls.count("random_block_scores") == ("explore" in options)
    (loss, logits), (ort_loss, ort_logits) = exported.run()
    if "explore" in options:
        assert ort_logits.shape == logits.shape and torch.isfinite(ort_loss)
    else:
        torch.testing.assert_close(ort_loss, loss, **TOLERANCE)
        torch.testing.assert_close(ort_logits, logits, **TOLERANCE)


def test_toy_decoder_with_random_scores_export(tmp_path, caplog):
    """The random scorer's function is a stand-in (other random blocks than torch's), so the
    model is checked for structure and shapes only. The export prints nothing of torch's
    exporter's own (its torchvision lookups, its tree-spec FutureWarning)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (1, 62))
    options = {"block_size": 4, "keep_ratio": 0.5, "dense_layers": [0], "loss_segment": None,
               "scorer": "random", "seed": 7}
    gm, inputs = rewritten_graph(ToyDecoder(layers=2).train(), lambda c: c(ids, ids), options)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        exported = Exported(gm, inputs, tmp_path / "toy.onnx")
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert not [r for r in caplog.records if "torchvision" in r.getMessage()]
    onnx.checker.check_model(exported.model, full_check=True)
    calls = [n.op_type for n in exported.lemo_nodes()]
    assert calls.count("random_block_scores") == 1 and calls.count("select_tokens") == 1
    random = next(n for n in exported.lemo_nodes() if n.op_type == "random_block_scores")
    assert {a.name: a.i for a in random.attribute} == {"n_blocks": 15, "layer": 1, "seed": 7}
    (function,) = [f for f in exported.model.functions if f.name == "random_block_scores"]
    assert "RandomUniformLike" in {n.op_type for n in function.node}
    (logits, loss), (ort_logits, ort_loss) = exported.run()
    assert ort_logits.shape == logits.shape and ort_loss.shape == loss.shape
    assert torch.isfinite(ort_logits).all() and torch.isfinite(ort_loss)
