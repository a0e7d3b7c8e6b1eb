"""Options validation and the per-layer plan."""

from __future__ import annotations

import pytest

from lemo_compile import LemoConfig, plan_layers


def test_defaults():
    config = LemoConfig.from_options(None)
    assert (config.block_size, config.keep_ratio, config.dense_layers) == (64, 0.4, "auto")
    assert (config.scorer, config.mlp, config.loss_segment, config.compiler) == (
        "oracle", "off", 2048, "inductor")
    assert config.mlp_channel_ratio == 0.5
    assert config.backward_buffer_reuse is False


@pytest.mark.parametrize(
    "options, named",
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": [0.5, 2.0]}, "keep_ratio"),
        ({"keep_ratio": []}, "keep_ratio"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 16.0}, "block_size"),
        ({"dense_layers": "none"}, "dense_layers"),
        ({"dense_layers": [-1]}, "dense_layers"),
        ({"scorer": "exact"}, "scorer"),
        ({"mlp": "all"}, "mlp"),
        ({"loss_segment": 0}, "loss_segment"),
        ({"compiler": "eager"}, "compiler"),
        ({"seed": -3}, "seed"),
        ({"keep": 0.4}, "keep"),
        ({"mlp_channel_ratio": 0.0}, "mlp_channel_ratio"),
        ({"mlp_channel_ratio": -0.5}, "mlp_channel_ratio"),
        ({"mlp_channel_ratio": 1.01}, "mlp_channel_ratio"),
        ({"mlp_channel_ratio": "0.5"}, "mlp_channel_ratio"),
        ({"mlp_channel_ratio": True}, "mlp_channel_ratio"),
        ({"mlp_channel_ratio": None}, "mlp_channel_ratio"),
        ({"mlp": "channels", "mlp_channel_ratio": 2}, "mlp_channel_ratio"),
        ({"explore": -0.1}, "explore"),
        ({"explore": 1.5}, "explore"),
        ({"explore": "0.5"}, "explore"),
        ({"explore": True}, "explore"),
        ({"explore": 0.5, "scorer": "random"}, "explore"),
        ({"keep_first_blocks": -1}, "keep_first_blocks"),
        ({"keep_last_blocks": 1.0}, "keep_last_blocks"),
        ({"distance_normalized": 1}, "distance_normalized"),
        ({"distance_normalized": True, "scorer": "random"}, "distance_normalized"),
        ({"distance_normalized": True, "scorer": "output"}, "distance_normalized"),
        ({"dropped_loss_weight": -0.1}, "dropped_loss_weight"),
        ({"dropped_loss_weight": 1.5}, "dropped_loss_weight"),
        ({"dropped_loss_weight": True}, "dropped_loss_weight"),
        ({"dropped_loss_weight": 0.5, "loss_segment": None}, "dropped_loss_weight"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, named):
    with pytest.raises(ValueError, match=named):
        LemoConfig.from_options(options)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ValueError, match=r"\['oracle', 'predictor', 'random', 'output'\]"):
        LemoConfig.from_options({"scorer": "exact"})


def test_predictor_scorer_without_predictors_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'predictors' were given"):
        LemoConfig.from_options({"scorer": "predictor"})


def test_auto_plan_keeps_first_half_and_last_layer_dense():
    plans = plan_layers(LemoConfig(), num_layers=8, seq_len=1000)
    assert [p.sparse for p in plans] == [False] * 4 + [True] * 3 + [False]
    sparse = plans[4]
    # n = 1000 // 64 = 15 full blocks, k = ceil(0.4 * 15) = 6, tail 1000 - 960 = 40 tokens kept
    assert (sparse.n_blocks, sparse.kept_blocks, sparse.kept_tokens) == (15, 6, 6 * 64 + 40)
    assert plans[0].reason == "dense_layers" and plans[0].kept_tokens == 1000


def test_per_layer_keep_ratio_and_explicit_dense_layers():
    config = LemoConfig(keep_ratio=[1.0, 0.5, 0.1, 0.25], dense_layers=[0], block_size=16)
    plans = plan_layers(config, num_layers=4, seq_len=160)
    assert [p.kept_blocks for p in plans] == [10, 5, 1, 3]
    assert [p.sparse for p in plans] == [False, True, True, True]


def test_keep_ratio_list_must_match_layer_count():
    with pytest.raises(ValueError, match="keep_ratio"):
        plan_layers(LemoConfig(keep_ratio=[0.5, 0.5]), num_layers=4, seq_len=512)


def test_dense_layers_out_of_range():
    with pytest.raises(ValueError, match="dense_layers"):
        plan_layers(LemoConfig(dense_layers=[9]), num_layers=4, seq_len=512)


def test_sequence_shorter_than_a_block_stays_dense():
    plans = plan_layers(LemoConfig(dense_layers=[]), num_layers=2, seq_len=40)
    assert not any(p.sparse for p in plans)
    assert "shorter than one block" in plans[0].reason


def test_keeping_every_block_is_dense():
    plans = plan_layers(LemoConfig(dense_layers=[], keep_ratio=1.0), num_layers=2, seq_len=640)
    assert not any(p.sparse for p in plans)
    assert plans[1].reason == "keeps every block"


def test_mlp_channels_plans_every_layer_not_listed_dense():
    config = LemoConfig(mlp="channels", mlp_channel_ratio=0.25, dense_layers=[0], block_size=16,
                        keep_ratio=[0.5, 0.5, 1.0, 0.5])
    plans = plan_layers(config, num_layers=4, seq_len=100)
    # layer 2 keeps every block (its attention is dense) but its MLP is still channel-sparse
    assert [p.mlp_channel_ratio for p in plans] == [None, 0.25, 0.25, 0.25]
    assert [p.sparse for p in plans] == [False, True, False, True]
    assert all(p.mlp_kept_tokens == 100 and not p.mlp_sparse for p in plans)
    assert all(p.mlp_kept_channels is None for p in plans)  # set once applied, in CompileReport
    every_channel = LemoConfig(mlp="channels", mlp_channel_ratio=1.0, dense_layers=[0])
    assert all(p.mlp_channel_ratio is None for p in plan_layers(every_channel, 4, 100))


def test_kept_channels():
    from lemo_compile.plan import kept_channels

    assert [kept_channels(r, 96) for r in (0.001, 0.5, 0.3, 0.995, 1.0)] == [1, 48, 29, 96, 96]
