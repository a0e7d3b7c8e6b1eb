"""explain(), `lemo inspect` and LEMO_DEBUG_DIR: what lemo shows of its work, checked against the plan."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, token_batch

import lemo_compile
from lemo_compile.config import LemoConfig
from lemo_compile.tools.explain import explain

OPTIONS = {"keep_ratio": 0.5, "block_size": 8, "dense_layers": [0], "loss_segment": None}


def _lemo_nodes(gm) -> dict[int, dict[str, list]]:
    """Per layer, the lemo-tagged nodes of a graph, by role."""
    found: dict[int, dict[str, list]] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get("custom") or {}
        if "lemo" in tag:
            found.setdefault(tag["lemo_layer"], {}).setdefault(tag["lemo"], []).append(node)
    return found


@pytest.mark.parametrize("mlp", ["off", "tokens"])
def test_explain_matches_the_plan(mlp):
    model = tiny_llama().eval()
    ids = token_batch(2, 64)
    explanation = explain(model, input_ids=ids, labels=ids, options={**OPTIONS, "mlp": mlp})
    assert not model.training, "explain must restore the model's mode"
    assert all(p.grad is None for p in model.parameters())
    plans = explanation.plans
    assert [p.sparse for p in plans] == [False, True, True, True]
    inserted = _lemo_nodes(explanation._graph)
    assert sorted(inserted) == [1, 2, 3]  # nothing inserted in the dense layer
    for plan in plans[1:]:
        (select,) = inserted[plan.layer]["select"]
        assert select.args[1] == plan.kept_blocks == 4
        assert ("mlp_select" in inserted[plan.layer]) == (mlp == "tokens")
        blocks = explanation.selected["attention"][plan.layer]
        assert blocks.shape == (2, plan.kept_blocks)
        assert all(row.tolist() == sorted(set(row.tolist())) for row in blocks)
        assert 0 <= blocks.min() and blocks.max() < plan.n_blocks
        keep = explanation.keep_map("attention", sample=1)[plan.layer]
        assert keep.tolist() == [int(b in blocks[1].tolist()) for b in range(plan.n_blocks)]
    assert explanation.keep_map()[0].tolist() == [-1] * 8  # dense layer
    assert set(explanation.selected["mlp"]) == ({1, 2, 3} if mlp == "tokens" else set())
    assert explanation.counters["sparse_layers"] == 3
    assert explanation.counters["nodes_inserted"] == sum(
        len(nodes) for roles in inserted.values() for nodes in roles.values())
    # one gather + RMSNorm chain per sparse block, as the compiled model fuses them
    blocks = 3 * (2 if mlp == "tokens" else 1)
    assert explanation.counters["fused_gather_norm"] == blocks
    assert explanation.counters["fused_scatter_add"] + explanation.counters.get(
        "folded_zero_scatter", 0) >= blocks


def test_explain_selects_what_the_compiled_model_selects():
    """The recorded selection is the oracle's: the same step through the eager reference, fed the
    recorded blocks as its scores, gives the compiled model's loss."""
    from reference import lemo_forward

    model = tiny_llama()
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids, options=OPTIONS)
    selected = explanation.selected["attention"]

    def recorded(layer, h):
        scores = torch.zeros(h.shape[0], 8)
        scores.scatter_(1, selected[layer], 1.0)
        return scores

    backend = lemo_compile.LemoBackend({**OPTIONS, "compiler": "aot_eager"})
    compiled = torch.compile(model, backend=backend)
    loss = compiled(input_ids=ids, labels=ids).loss
    _, want = lemo_forward(model, ids, ids, keep_ratio=0.5, block_size=8, dense_layers=[0],
                           scorer=recorded)
    _, other = lemo_forward(model, ids, ids, keep_ratio=0.5, block_size=8, dense_layers=[0],
                            scorer=lambda layer, h: -recorded(layer, h))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loss, other, rtol=1e-5, atol=1e-5)
    loss.backward()  # compiles the backward graph, whose fusions count too
    compiled_counters = backend.reports[-1].counters
    fused = {k: v for k, v in compiled_counters.items() if k.startswith(("fused", "folded"))}
    assert fused and all(explanation.counters[k] == v for k, v in fused.items()), (
        fused, explanation.counters)


def test_layer_diffs_show_selection_in_sparse_layers_and_only_causal_attention_in_dense_ones():
    model = tiny_llama(layers=5)
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids,
                          options={**OPTIONS, "dense_layers": [0, 2]})
    selecting = {layer for layer, diff in explanation.layer_diffs.items() if "select_tokens" in diff}
    assert selecting == {p.layer for p in explanation.plans if p.sparse} == {1, 3, 4}
    for layer in (0, 2):
        # the mask HF passes became is_causal=True, and the key/value heads are read unrepeated
        # (enable_gqa=True) instead of through repeat_kv's getitem / expand / reshape; nothing else
        changed = [line for line in explanation.layer_diffs[layer].splitlines()
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        attention = [line for line in changed if "scaled_dot_product_attention" in line]
        assert len(attention) == 2 and "is_causal=True" in attention[1]
        assert "attn_mask" not in attention[1] and "enable_gqa=True" in attention[1]
        repeats = [line for line in changed if line not in attention]
        assert len(repeats) == 6 and all(line.startswith("-") for line in repeats)
        assert sorted(line.split(" = ")[1].split("(")[0] for line in repeats) == [
            "expand", "expand", "getitem", "getitem", "reshape", "reshape"]
    assert list(explanation.diffs()) == ["select"]
    assert explanation.diffs()["select"].startswith("--- dynamo\n+++ select\n")


def test_activation_memory_is_lower_for_sparse_layers_only():
    model = tiny_llama(layers=5)
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids, options={**OPTIONS, "dense_layers": [0, 1]})
    memory = explanation.activation_bytes
    # layer 1 hands its output to sparse layer 2 (module docstring); layer 0 keeps the same
    # activations but for the causal mask (a [64, 64] float32 additive mask on the CPU), which
    # the masked attention of the graph as Dynamo gave it keeps for backward and is_causal=True
    # does not need, and but for K and V saved at the key/value heads' count (2) instead of
    # repeated to the query's (4): [1, 2, 64, 16] float32 each instead of [1, 4, 64, 16]
    mask, repeats = 64 * 64 * 4, 2 * (4 - 2) * 64 * 16 * 4
    assert memory[0]["dense"] - memory[0]["lemo"] == mask + repeats and memory[0]["lemo"] > 0
    for layer in (2, 3, 4):
        assert 0 < memory[layer]["lemo"] < memory[layer]["dense"]
    assert sum(m["lemo"] for m in memory.values()) < sum(m["dense"] for m in memory.values())
    table = explanation.table()
    assert table.count("4/8 blocks (32 tokens)") == 3 and table.count("dense (dense_layers)") == 2


def test_write_produces_parseable_artefacts(tmp_path):
    networkx = pytest.importorskip("networkx")
    pytest.importorskip("pydot")
    image = pytest.importorskip("PIL.Image")
    onnx = pytest.importorskip("onnx")
    model = tiny_llama()
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids, options=OPTIONS)
    written = explanation.write(tmp_path)
    assert (tmp_path / "graphs" / "00_dynamo.py").read_text() == explanation.graphs["dynamo"]
    assert (tmp_path / "graphs" / "01_select.diff").read_text() == explanation.diffs()["select"]
    layer_0 = (tmp_path / "layers" / "layer_0.diff").read_text()  # a dense layer
    assert "is_causal=True" in layer_0 and "select_tokens" not in layer_0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [p["kept_blocks"] for p in plan["plans"]] == [8, 4, 4, 4]
    assert plan["selected_blocks"]["attention"]["1"] == explanation.selected["attention"][1].tolist()
    with image.open(written["keep_map.png"]) as picture:
        picture.verify()
        assert picture.format == "PNG" and picture.size[0] > 100
    graph = networkx.nx_pydot.read_dot(written["regions.dot"])
    labels = {name: data.get("label", "") for name, data in graph.nodes(data=True)}
    assert sum("select top 4 blocks" in label for label in labels.values()) == 3
    assert "layer0_attention" in graph and graph.has_edge("layer0_attention", "layer0_mlp")
    model_proto = onnx.load(written["model.onnx"])
    onnx.checker.check_model(model_proto)
    assert {f.name for f in model_proto.functions if f.domain == "lemo"} >= {
        "block_scores", "select_tokens", "gather_tokens", "scatter_add_tokens"}


def test_lemo_debug_dir_dumps_every_training_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMO_DEBUG_DIR", str(tmp_path))
    model = tiny_llama()
    ids = token_batch(1, 64)
    backend = lemo_compile.LemoBackend({**OPTIONS, "compiler": "aot_eager"})
    compiled = torch.compile(model, backend=backend)
    before = torch.random.get_rng_state()
    for _ in range(2):
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(torch.random.get_rng_state(), before)
    folder = tmp_path / "graph_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_0"]  # one graph, dumped once
    for name in ("plan.txt", "plan.json", "keep_map.png", "regions.dot", "model.onnx"):
        assert (folder / name).stat().st_size > 0, name
    plan = json.loads((folder / "plan.json").read_text())
    assert sorted(plan["selected_blocks"]["attention"]) == ["1", "2", "3"]


def test_lemo_inspect_command(tmp_path, capsys):
    from transformers import LlamaConfig

    from lemo_compile.tools.cli import main

    LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    code = main(["inspect", str(tmp_path / "model"), "--seq-len", "64", "--no-onnx", "--out",
                 str(out), "--options", json.dumps({"keep_ratio": 0.5, "block_size": 16})])
    printed = capsys.readouterr().out
    assert code == 0
    assert "random initialisation" in printed and "2/4 blocks (32 tokens)" in printed
    assert (out / "keep_map.png").exists() and not (out / "model.onnx").exists()
    assert json.loads((out / "plan.json").read_text())["seq_len"] == 64


def test_lemo_inspect_rejects_bad_options(tmp_path):
    from lemo_compile.tools.cli import main

    with pytest.raises(SystemExit, match="not JSON"):
        main(["inspect", str(tmp_path), "--seq-len", "64", "--options", "{keep"])
    with pytest.raises(ValueError, match="keep_ratio"):
        explain(tiny_llama(), input_ids=token_batch(1, 64), options={"keep_ratio": 2})


def test_explain_of_a_model_without_decoder_layers_has_an_empty_plan():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    explanation = explain(model, torch.randn(2, 4), options=LemoConfig())
    assert explanation.plans == [] and explanation.layer_diffs == {}
    assert "layer" in explanation.table()


def test_padded_batch_selection_is_recorded_per_row(tmp_path):
    """Each row of a padded batch selects on its own grid; explain records it there, and a row's
    selection is the one it gets when explained alone."""
    model = tiny_llama(layers=3)  # two sparse layers, the second reading the first's output
    ids = token_batch(2, 64)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :24] = 0  # left padding: row 1 has 40 real tokens, 5 full blocks of 8
    labels = ids.masked_fill(mask == 0, -100)
    explanation = explain(model, input_ids=ids, attention_mask=mask, labels=labels, options=OPTIONS)
    assert [p.sparse for p in explanation.plans] == [False, True, True]
    assert explanation.row_blocks.tolist() == [8, 5]
    assert sorted(explanation.selected["attention"]) == [1, 2]
    alone = [explain(model, input_ids=ids[row:row + 1, 24 * row:], labels=ids[row:row + 1, 24 * row:],
                     options=OPTIONS) for row in (0, 1)]
    for layer, blocks in explanation.selected["attention"].items():
        assert blocks.shape == (2, 4)  # 4 of 8 blocks, and 3 of 5 then a filler
        assert blocks[1, 3] == -1
        for row in (0, 1):
            own = blocks[row][blocks[row] >= 0]
            assert torch.equal(own, alone[row].selected["attention"][layer][0]), (layer, row)
    keep = explanation.keep_map(sample=1)
    assert keep[0].tolist() == [-1] * 8
    assert (keep[1:, 5:] == -3).all() and ((keep[1:, :5] == 1).sum(dim=1) == 3).all()
    assert (explanation.keep_map(sample=0)[1:] >= 0).all()
    pytest.importorskip("onnxscript")
    with pytest.raises(NotImplementedError, match="padded batches"):
        explanation.write(tmp_path)
    written = explanation.write(tmp_path / "no_onnx", onnx=False)
    assert json.loads(written["plan.json"].read_text())["row_blocks"] == [8, 5]


def test_mlp_channels_in_the_table_and_the_onnx_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = tiny_llama()
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids,
                          options={**OPTIONS, "mlp": "channels", "mlp_channel_ratio": 0.25})
    assert explanation.table().count("backward through 24/96 channels") == 3
    # the ONNX file shows the forward, where the channel MLP is the dense down projection
    written = explanation.write(tmp_path)
    onnx.checker.check_model(onnx.load(written["model.onnx"]))
    assert written["regions.dot"].read_text().count("backward through 24/96 channels") == 3


def test_the_dense_copy_does_not_share_checkpoint_bodies():
    """explain's and LEMO_DEBUG_DIR's "before" graph is a copy whose checkpoint bodies are its
    own: lemo's passes rewrite the bodies of the graph they compile in place."""
    from torch import fx

    from lemo_compile.fx_utils import own_copy

    model = tiny_llama()
    model.gradient_checkpointing_enable()
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids,
                          options={**OPTIONS, "scorer": "random", "seed": 0})
    gm = explanation._graph
    bodies = {name: m for name, m in gm.named_children() if isinstance(m, fx.GraphModule)}
    assert bodies and any("select_tokens" in body.code for body in bodies.values())
    copy = own_copy(gm)
    for name, body in bodies.items():
        assert getattr(copy, name) is not body and getattr(copy, name).code == body.code


def test_own_copy_copies_dotted_bodies_and_never_changes_the_original():
    from torch import fx

    from lemo_compile.fx_utils import own_copy

    body = fx.symbolic_trace(lambda x: x + 1)
    root = torch.nn.Module()
    root.outer = torch.nn.Module()
    root.outer.body = body
    root.shared = torch.nn.Module()
    root.shared.body = body
    graph = fx.Graph()
    graph.get_attr("outer.body")
    graph.get_attr("shared")  # the graph uses "shared" itself: its body stays shared
    graph.get_attr("shared.body")
    graph.output(None)
    gm = fx.GraphModule(root, graph)
    copy = own_copy(gm)
    assert copy.outer.body is not body and copy.outer.body.code == body.code
    assert gm.outer.body is body and gm.shared.body is body and copy.shared is gm.shared


def test_selection_inside_checkpointed_regions_is_recorded():
    """With gradient checkpointing the sparse layers sit in checkpoint bodies; explain records
    their selection, the same as without checkpointing."""
    ids = token_batch(1, 64)
    plain = explain(tiny_llama(), input_ids=ids, labels=ids, options=OPTIONS)
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    checkpointed = explain(model, input_ids=ids, labels=ids, options=OPTIONS)
    assert any("tag_activation_checkpoint" in str(node.target)
               for node in checkpointed._graph.graph.nodes)
    assert sorted(checkpointed.selected["attention"]) == [1, 2, 3]
    for layer, blocks in plain.selected["attention"].items():
        assert torch.equal(checkpointed.selected["attention"][layer], blocks), layer
    assert (checkpointed.keep_map()[1:] >= 0).all()


def test_a_graph_without_gradients_explains_without_memory(tmp_path):
    model = tiny_llama()
    ids = token_batch(1, 64)
    model.requires_grad_(False)
    explanation = explain(model, input_ids=ids, labels=ids, options=OPTIONS)
    assert all(m == {"dense": 0, "lemo": 0} for m in explanation.activation_bytes.values())
    assert sorted(explanation.selected["attention"]) == [1, 2, 3]


def test_debug_dump_takes_the_first_free_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMO_DEBUG_DIR", str(tmp_path))
    (tmp_path / "graph_0").mkdir()
    (tmp_path / "graph_2").mkdir()
    model = tiny_llama()
    ids = token_batch(1, 64)
    backend = lemo_compile.LemoBackend({**OPTIONS, "compiler": "aot_eager"})
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    assert (tmp_path / "graph_1" / "plan.json").exists()


def test_explain_does_not_make_a_later_compile_dynamic():
    """Like calibration (test_predictors): explaining at one length, then training at another."""
    model = tiny_llama()
    ids = token_batch(1, 128)
    lemo_compile.explain(model, input_ids=ids, labels=ids, options={"block_size": 16})
    backend = lemo_compile.LemoBackend({"compiler": "aot_eager", "block_size": 16,
                                        "loss_segment": None})
    ids = token_batch(1, 160)
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    report = backend.reports[-1]
    assert not report.warnings and report.counters["sparse_layers"] == 1


def test_explain_with_the_predictor_scorer():
    """The predictor scorer adds graph inputs (its weights): explain rewrites its own copy of the
    graph, so Dynamo's graph keeps the inputs it knows (it crashed with KeyError: grapharg)."""
    from lemo_compile.predictors import ModelSignature, PredictorBank

    signature = ModelSignature(hidden_size=64, heads=4, head_dim=16, layers=4, block_size=16)
    torch.manual_seed(0)
    bank = PredictorBank(signature, [2], width=32, rank=8).requires_grad_(False).eval()
    model = tiny_llama()
    ids = token_batch(1, 64)
    explanation = explain(model, input_ids=ids, labels=ids,
                          options={**OPTIONS, "block_size": 16, "dense_layers": [0, 1, 3],
                                   "scorer": "predictor", "predictors": bank})
    assert [p.layer for p in explanation.plans if p.sparse] == [2]
    assert explanation.selected["attention"][2].shape == (1, 2)
