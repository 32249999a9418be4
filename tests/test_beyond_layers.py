"""Attention heads, recurrent units, normalisation groups and structural index maps, in both flavours.

The registry harness (test_handlers.py) checks every handler on random zeroing;
these tests pin the rules that make each removal exact, with hand-made cases
that fail when a rule is too bold or too timid.
"""
import os

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.groups import Analysis
from keras_rebuild.testing import FLAVOUR_VARIABLE, flavour_keras, max_relative_error, random_inputs, randomize_weights

keras = flavour_keras()
L = keras.layers
FLAVOUR = os.environ[FLAVOUR_VARIABLE]
TOL = 2e-5


def _number(value) -> float:
    """A scalar tensor of any backend as a float (torch's may require grad)."""
    value = value.detach() if hasattr(value, "detach") else value
    return float(np.asarray(value))


def _set(model, name, fn):
    """Edit the weights of layer ``name`` with ``fn(list of arrays) -> list of arrays``."""
    layer = model.get_layer(name)
    layer.set_weights(fn([w.copy() for w in layer.get_weights()]))


def _lstm_model(units=6, writer=8):
    inp = keras.Input((5, 4))
    x = L.Dense(writer, name="writer")(inp)
    x = L.LSTM(units, return_sequences=True, name="lstm")(x)
    x = L.GRU(units, name="gru")(x)
    return randomize_weights(keras.Model(inp, L.Dense(3, name="head")(x)), seed=3)


# ----------------------------------------------------------------------------- recurrent units
def test_lstm_unit_with_a_zero_candidate_column_goes_whatever_its_other_gates():
    model = _lstm_model()
    units = 6

    def kill_candidate(ws):
        kernel, recurrent, bias = ws
        for w in (kernel, recurrent):
            w[:, 2 * units + 1] = 0.0  # candidate block (i, f, c, o) of unit 1
        bias[2 * units + 1] = 0.0
        return [kernel, recurrent, bias]

    _set(model, "lstm", kill_candidate)
    small, report = kr.rebuild(model, return_report=True)
    assert small.get_layer("lstm").units == units - 1
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL


def test_recurrent_unit_fed_by_a_live_unit_stays():
    model = _lstm_model()
    units = 6

    def kill_all_but_recurrence(ws):
        kernel, recurrent, bias = ws
        kernel[:, 2 * units + 1] = 0.0
        bias[2 * units + 1] = 0.0
        recurrent[:, 2 * units + 1] = 0.0
        recurrent[0, 2 * units + 1] = 0.5  # unit 0 (alive) still writes unit 1's candidate
        return [kernel, recurrent, bias]

    _set(model, "lstm", kill_all_but_recurrence)
    small = kr.rebuild(model)
    assert small.get_layer("lstm").units == units


def test_gru_unit_goes_only_when_its_recurrent_bias_is_zero_too():
    model = _lstm_model()
    units = 6

    def kill(ws, recurrent_bias):
        kernel, recurrent, bias = ws
        kernel[:, 2 * units + 4] = 0.0
        recurrent[:, 2 * units + 4] = 0.0
        bias[..., 2 * units + 4] = 0.0
        if bias.ndim == 2:  # reset_after: (input bias, recurrent bias)
            bias[1, 2 * units + 4] = recurrent_bias
        return [kernel, recurrent, bias]

    _set(model, "gru", lambda ws: kill(ws, 0.3))
    assert kr.rebuild(model).get_layer("gru").units == units
    _set(model, "gru", lambda ws: kill(ws, 0.0))
    small = kr.rebuild(model)
    assert small.get_layer("gru").units == units - 1
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL


def test_pruned_recurrent_stack_trains_strips_and_rebuilds_exactly_at_the_pruned_size():
    model = _lstm_model(units=8)
    pruned = kr.prune_channels(model, sparsity=0.5)
    pruned.compile("adam", "mse")
    x = random_inputs(model, batch=16, seed=2)
    pruned.fit(x, np.zeros((16, 3), "float32"), epochs=1, batch_size=8, verbose=0)
    stripped = kr.strip_pruning(pruned)
    small = kr.rebuild(stripped)
    assert small.get_layer("lstm").units == 4 and small.get_layer("gru").units == 4
    assert max_relative_error(stripped, small, x[:4]) <= TOL
    twin = _lstm_model(units=4, writer=small.get_layer("writer").units)  # the same builder, half the units
    assert small.count_params() == twin.count_params()


# ----------------------------------------------------------------------------- attention heads
def _attention_block(heads=4):
    inp = keras.Input((6, 16))
    h = L.LayerNormalization(name="ln")(inp)
    a = L.MultiHeadAttention(heads, 8, name="mha")(h, h)
    x = L.Add()([inp, a])
    return randomize_weights(keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x))), seed=5)


def test_attention_head_with_zero_value_projection_goes_and_num_heads_drops():
    model = _attention_block()

    def kill_value_of_head_2(ws):
        ws[4][:, 2, :] = 0.0  # value kernel (d, heads, dim)
        ws[5][2, :] = 0.0  # value bias (heads, dim)
        return ws

    _set(model, "mha", kill_value_of_head_2)
    small = kr.rebuild(model)
    assert small.get_layer("mha").get_config()["num_heads"] == 3
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL
    assert small.count_params() == _attention_block(heads=3).count_params()


def test_attention_head_with_live_values_stays():
    model = _attention_block()
    _set(model, "mha", lambda ws: [w if i != 0 else w * 0 for i, w in enumerate(ws)])  # query kernel only
    assert kr.rebuild(model).get_layer("mha").get_config()["num_heads"] == 4


def test_prune_channels_prunes_attention_heads_during_training():
    model = _attention_block()
    pruned = kr.prune_channels(model, sparsity=0.5)
    pruned.compile("adam", "mse")
    x = random_inputs(model, batch=8, seed=2)
    pruned.fit(x, np.zeros((8, 3), "float32"), epochs=1, verbose=0)
    stripped = kr.strip_pruning(pruned)
    small = kr.rebuild(stripped)
    assert small.get_layer("mha").get_config()["num_heads"] == 2
    assert max_relative_error(stripped, small, x[:4]) <= TOL
    assert "mha:heads" in [g.name for g in Analysis(model).groups]


# ----------------------------------------------------------------------------- LayerNormalization outputs
def _pre_norm_mlp(readers=32, dim=16):
    inp = keras.Input((6, dim))
    h = L.LayerNormalization(name="ln")(inp)
    h = L.Dense(readers, activation="relu", name="mlp")(h)
    return randomize_weights(keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(h))), seed=6)


def _zero_norm_channels(model, channels, beta=True, name="ln"):
    def kill(ws):
        ws[0][channels] = 0.0  # gamma
        if beta:
            ws[1][channels] = 0.0
        return ws

    _set(model, name, kill)


def test_layer_norm_output_channels_with_zero_gamma_and_beta_go_through_a_frozen_selection():
    model = _pre_norm_mlp()
    dead = [1, 5, 6, 11]
    _zero_norm_channels(model, dead)
    small, report = kr.rebuild(model, return_report=True)
    ln, select, mlp = (small.get_layer(n) for n in ("ln", "ln_select", "mlp"))
    assert ln.get_weights()[0].shape == (16,)  # the statistics still cover every channel
    kept = np.setdiff1d(np.arange(16), dead)
    np.testing.assert_array_equal(select.get_weights()[0], np.eye(16, dtype="float32")[:, kept])
    assert not select.trainable and not select.use_bias and len(select.get_weights()) == 1
    np.testing.assert_array_equal(mlp.get_weights()[0], model.get_layer("mlp").get_weights()[0][kept])
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL
    assert report.params_after == small.count_params()
    assert report.params_before - report.params_after == 4 * 32 - 16 * 12
    assert "ln_select" in [r.name for r in report.layers]
    # Rebuilding again changes nothing: shrinking the selection's input would need another selection.
    again, second = kr.rebuild(small, return_report=True)
    assert second.params_after == second.params_before
    assert any("needs a selection" in r for g in second.groups for r in g.reasons)


def test_layer_norm_output_channel_with_a_live_beta_or_gamma_stays():
    model = _pre_norm_mlp()
    _zero_norm_channels(model, [1, 5], beta=False)  # gamma zero, beta not: the channel outputs beta
    small = kr.rebuild(model)
    assert "ln_select" not in [layer.name for layer in small.layers]
    assert small.count_params() == model.count_params()


def test_layer_norm_outputs_stay_when_the_selection_costs_more_than_it_saves():
    model = _pre_norm_mlp(readers=8)  # 8 weights per channel read, 16 per kept channel selected
    _zero_norm_channels(model, [1, 5, 6, 11])
    small, report = kr.rebuild(model, return_report=True)
    assert small.count_params() == model.count_params()
    assert any("needs a selection" in r and "'ln'" in r for g in report.groups for r in g.reasons)


def test_pruned_pre_norm_mlp_trains_strips_and_rebuilds_exactly():
    model = _pre_norm_mlp()
    pruned = kr.prune_channels(model, sparsity=0.5)
    pruned.compile("adam", "mse")
    x = random_inputs(model, batch=16, seed=2)
    pruned.fit(x, np.zeros((16, 3), "float32"), epochs=1, batch_size=8, verbose=0)
    stripped = kr.strip_pruning(pruned)
    gamma, beta = stripped.get_layer("ln").get_weights()
    assert ((gamma == 0) & (beta == 0)).sum() == 8  # the mask held through training
    small = kr.rebuild(stripped)
    assert small.get_layer("ln_select").units == 8 and small.get_layer("mlp").units == 16
    assert max_relative_error(stripped, small, x[:4]) <= TOL


@pytest.mark.parametrize("structure", ["sequential", "nested", "shared"])
def test_layer_norm_selection_in_sequential_nested_and_shared_layers(structure):
    dead = [0, 2, 7]
    if structure == "sequential":
        model = keras.Sequential([keras.Input((6, 8)), L.Dense(8, name="writer"), L.LayerNormalization(name="ln"),
                                  L.Dense(16, name="mlp"), L.Flatten(), L.Dense(3, name="head")])
    elif structure == "nested":  # the normalisation's output is the nested model's output
        inner_in = keras.Input((6, 8))
        inner = keras.Model(inner_in, L.LayerNormalization(name="ln")(L.Dense(8, name="writer")(inner_in)),
                            name="inner")
        inp = keras.Input((6, 8))
        model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(L.Dense(16, name="mlp")(inner(inp)))))
    else:  # one normalisation called on two tensors: one selection, called twice
        inp = keras.Input((6, 8))
        ln, mlp = L.LayerNormalization(name="ln"), L.Dense(16, name="mlp")
        a = mlp(ln(L.Dense(8, name="writer")(inp)))
        b = mlp(ln(L.Dense(8, name="other")(inp)))
        model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(L.Add()([a, b]))))
    model = randomize_weights(model, seed=7)
    host = model.get_layer("inner") if structure == "nested" else model
    _zero_norm_channels(host, dead)
    small = kr.rebuild(model)
    small_host = small.get_layer("inner") if structure == "nested" else small
    assert small_host.get_layer("ln_select").units == 5
    assert small.get_layer("mlp").get_weights()[0].shape == (5, 16)
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") == "torch",
                    reason="Keras' own LayerNormalization(axis=1) fails on torch (torch's layer_norm wants the last axes)")
def test_layer_norm_over_another_axis_follows_its_channels_and_keeps_its_weights():
    inp = keras.Input((6, 8))
    x = L.Dense(8, name="writer")(inp)
    x = L.LayerNormalization(axis=1, name="ln")(x)  # over time: gamma and beta are per step, not per channel
    model = randomize_weights(keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(L.Dense(5, name="reader")(x)))),
                              seed=8)
    _set(model, "reader", lambda ws: [np.where(np.isin(np.arange(8), [1, 3])[:, None], 0.0, ws[0]).astype("float32"),
                                      ws[1]])
    small = kr.rebuild(model)
    assert small.get_layer("writer").units == 6 and small.get_layer("reader").get_weights()[0].shape == (6, 5)
    for a, b in zip(model.get_layer("ln").get_weights(), small.get_layer("ln").get_weights()):
        np.testing.assert_array_equal(a, b)
    assert "ln_select" not in [layer.name for layer in small.layers]
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL
    # Pruning never masks its per-step weights (they index no channel).
    stripped = kr.strip_pruning(kr.prune_channels(model, sparsity=0.5))
    for a, b in zip(model.get_layer("ln").get_weights(), stripped.get_layer("ln").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_self_attention_inputs_shrink_and_the_output_keeps_its_width():
    model = _attention_block()
    _zero_norm_channels(model, [0, 3, 9])
    small = kr.rebuild(model)
    mha = small.get_layer("mha")
    assert mha.get_weights()[0].shape[0] == 13  # query kernel (d, heads, dim)
    assert int(mha.output.shape[-1]) == 16  # added back to the 16-wide input
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL


def test_cross_attention_inputs_stay_whole():
    inp = keras.Input((6, 16))
    h = L.LayerNormalization(name="ln")(inp)
    other = L.Dense(16, name="other")(inp)
    a = L.MultiHeadAttention(4, 8, name="mha")(h, other)
    model = randomize_weights(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(L.Add()([inp, a])))), seed=5)
    _zero_norm_channels(model, [0, 3, 9])
    small, report = kr.rebuild(model, return_report=True)
    assert small.get_layer("mha").get_weights()[0].shape[0] == 16
    assert any("different tensors" in r for g in report.groups for r in g.reasons)


# ----------------------------------------------------------------------------- groups and index maps
def test_group_norm_cnn_with_dead_groups_matches_the_builder_at_fewer_groups():
    def build(groups):
        inp = keras.Input((8, 8, 3))
        x = L.Conv2D(4 * groups, 3, padding="same", name="conv")(inp)
        x = L.GroupNormalization(groups=groups, name="gn")(x)
        x = L.Conv2D(5, 1, name="reader")(x)
        return keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))

    model = randomize_weights(build(8), seed=1)
    dead = np.concatenate([np.arange(4, 8), np.arange(16, 24)])  # groups 1, 4 and 5

    def kill(ws):
        ws[0][..., dead] = 0.0
        ws[1][dead] = 0.0
        return ws

    _set(model, "conv", kill)
    _set(model, "gn", lambda ws: [ws[0], np.where(np.isin(np.arange(32), dead), 0.0, ws[1]).astype("float32")])
    small = kr.rebuild(model)
    assert small.get_layer("gn").get_config()["groups"] == 5
    assert small.count_params() == build(5).count_params()
    x = random_inputs(model, batch=2, seed=1)
    assert max_relative_error(model, small, x) <= TOL


def test_group_with_one_live_channel_stays_whole():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = L.GroupNormalization(groups=2, name="gn")(x)
    model = randomize_weights(keras.Model(inp, L.Conv2D(2, 1)(x)), seed=2)

    def kill_three_of_group_0(ws):
        ws[0][..., :3] = 0.0
        ws[1][:3] = 0.0
        return ws

    _set(model, "conv", kill_three_of_group_0)
    _set(model, "gn", lambda ws: [ws[0], np.concatenate([np.zeros(3), ws[1][3:]]).astype("float32")])
    assert kr.rebuild(model).get_layer("gn").get_config()["groups"] == 2


def test_unflattening_reshape_removes_the_dense_units_of_dead_channels():
    inp = keras.Input((6,))
    x = L.Dense(4 * 4 * 8, name="project")(inp)
    x = L.Reshape((4, 4, 8), name="unflatten")(x)
    x = L.Conv2DTranspose(3, 3, padding="same", name="deconv")(x)
    model = randomize_weights(keras.Model(inp, x), seed=4)
    dead_channels = [1, 6]
    units = np.array([s * 8 + c for s in range(16) for c in dead_channels])

    def kill(ws):
        ws[0][:, units] = 0.0
        ws[1][units] = 0.0
        return ws

    _set(model, "project", kill)
    small = kr.rebuild(model)
    assert small.get_layer("project").units == 4 * 4 * 6
    assert tuple(small.get_layer("unflatten").output.shape[1:]) == (4, 4, 6)
    x = random_inputs(model, batch=3, seed=1)
    assert max_relative_error(model, small, x) <= TOL


def test_unflattening_reshape_keeps_a_channel_with_one_live_position():
    inp = keras.Input((6,))
    x = L.Dense(2 * 2 * 4, name="project")(inp)
    x = L.Reshape((2, 2, 4))(x)
    model = randomize_weights(keras.Model(inp, L.Conv2D(3, 1)(x)), seed=4)

    def kill_all_but_one_position(ws):
        units = np.array([s * 4 + 2 for s in range(3)])  # channel 2 at positions 0..2, alive at 3
        ws[0][:, units] = 0.0
        ws[1][units] = 0.0
        return ws

    _set(model, "project", kill_all_but_one_position)
    assert kr.rebuild(model).get_layer("project").units == 16


def test_embedding_loses_dead_output_dimensions():
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(20, 8, name="embedding")(inp)
    x = L.Dense(4, name="reader")(x)
    model = randomize_weights(keras.Model(inp, L.Dense(2)(L.Flatten()(x))), seed=6)
    _set(model, "embedding", lambda ws: [np.where(np.arange(8) % 3 == 0, 0.0, ws[0]).astype("float32")])
    small = kr.rebuild(model)
    assert small.get_layer("embedding").output_dim == 5
    x = [np.random.default_rng(0).integers(0, 20, (3, 5)).astype("int32")]
    assert max_relative_error(model, small, x) <= TOL


@pytest.mark.tf_keras_only
def test_depth_to_space_moves_channels_in_blocks():
    import tensorflow as tf

    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(12, 3, padding="same", name="writer")(inp)
    x = tf.nn.depth_to_space(x, 2)  # 12 channels -> 3 channels, each from 4 input channels
    x = L.Conv2D(5, 3, padding="same", name="reader")(x)
    model = randomize_weights(keras.Model(inp, x), seed=7)
    analysis = Analysis(model)
    writer = [g for g in analysis.groups if g.name == "writer"][0]
    assert writer.size == 3  # 12 channels in 3 units of removal: one per output channel
    dead = np.array([k * 3 + 1 for k in range(4)])  # output channel 1 of depth_to_space
    _set(model, "writer", lambda ws: [np.where(np.isin(np.arange(12), dead), 0.0, ws[0]).astype("float32"),
                                      np.where(np.isin(np.arange(12), dead), 0.0, ws[1]).astype("float32")])
    small = kr.rebuild(model)
    assert small.get_layer("writer").filters == 8
    x = random_inputs(model, batch=2, seed=1)
    assert max_relative_error(model, small, x) <= TOL


# ----------------------------------------------------------------------------- wrapper losses
def test_pruning_wrapper_keeps_the_inner_layers_activity_regularizer_loss():
    inp = keras.Input((4,))
    x = L.Dense(6, activity_regularizer=keras.regularizers.L2(0.1), name="dense")(inp)
    model = keras.Model(inp, L.Dense(2, name="head")(x))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    model(x)
    expected = float(sum(_number(loss) for loss in model.losses))
    assert expected > 0
    pruned = kr.prune_channels(model, sparsity=0.0)
    pruned(x)
    got = float(sum(_number(loss) for loss in pruned.losses))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_data_driven_criteria_score_attention_heads_by_their_weights():
    from keras_rebuild.importance import Magnitude, get_criterion

    model = _attention_block()
    x = random_inputs(model, batch=8, seed=0)
    analysis = Analysis(model)
    expected = Magnitude()(analysis)["mha:heads"]
    scores = get_criterion("activation").set_data(model, x)(analysis)
    np.testing.assert_allclose(scores["mha:heads"], expected)
    plan = kr.select_channels(analysis, scores, sparsity=0.5)
    small = kr.rebuild(model, plan)
    assert small.get_layer("mha").get_config()["num_heads"] == 2


def test_report_counts_the_macs_of_removed_heads():
    model = _attention_block()

    def kill_two_heads(ws):
        ws[4][:, 1:3, :] = 0.0
        ws[5][1:3, :] = 0.0
        return ws

    _set(model, "mha", kill_two_heads)
    _, report = kr.rebuild(model, return_report=True)
    row = [r for r in report.layers if r.name == "mha"][0]
    _, twin = kr.rebuild(_attention_block(heads=2), return_report=True)
    twin_row = [r for r in twin.layers if r.name == "mha"][0]
    assert row.macs_after == twin_row.macs_before < row.macs_before


def test_a_pruning_schedule_prunes_attention_heads_of_the_wrapped_model():
    model = _attention_block()
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=2, frequency=1)
    pruned = kr.prune_channels(model, pruning_schedule=schedule)
    assert "mha:heads" in [g.name for g in Analysis(pruned).groups]  # the wrapped model's own analysis
    pruned.compile("adam", "mse")
    x = random_inputs(model, batch=8, seed=2)
    pruned.fit(x, np.zeros((8, 3), "float32"), epochs=4, batch_size=4, verbose=0,
               callbacks=[kr.UpdatePruningStep()])
    stripped = kr.strip_pruning(pruned)
    small = kr.rebuild(stripped)
    assert small.get_layer("mha").get_config()["num_heads"] == 2
    assert max_relative_error(stripped, small, x[:4]) <= TOL


def test_group_norm_without_weights_keeps_its_group_size():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(12, 3, padding="same", name="conv")(inp)
    x = L.GroupNormalization(groups=4, center=False, scale=False, name="gn")(x)
    model = randomize_weights(keras.Model(inp, L.Conv2D(2, 1)(x)), seed=2)
    _set(model, "conv", lambda ws: [np.where(np.arange(12) < 3, 0.0, ws[0]).astype("float32"),
                                    np.where(np.arange(12) < 3, 0.0, ws[1]).astype("float32")])
    small = kr.rebuild(model)
    assert small.get_layer("gn").get_config()["groups"] == 3  # groups of 3 channels, one group gone
    x = random_inputs(model, batch=2, seed=1)
    assert max_relative_error(model, small, x) <= TOL
