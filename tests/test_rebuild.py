"""rebuild(): the rebuilt model computes exactly what the zeroed model computes, and is minimal."""
import numpy as np
import pytest

import os

import keras_rebuild as kr
from keras_rebuild.graph import all_layers
from keras_rebuild.groups import Analysis
from keras_rebuild.masks import masked_weights, zero_channels
from keras_rebuild.testing import (
    assert_outputs_close as assert_models_close,
    flavour_keras,
    predict,
    random_inputs,
    weights_digest,
)

keras = flavour_keras()
L = keras.layers
ON_TENSORFLOW = os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"


# ----------------------------------------------------------------------------- helpers
def randomize(model, seed=0):
    """Non-trivial weights: random kernels and biases, BN statistics away from 0/1."""
    rng = np.random.default_rng(seed)
    for layer in _leaf_layers(model):
        ws = layer.get_weights()
        if not ws:
            continue
        new = [rng.normal(0, 0.5, w.shape).astype(w.dtype) for w in ws]
        if isinstance(layer, L.BatchNormalization):
            new[-1] = np.abs(new[-1]) + 0.5  # moving variance
        layer.set_weights(new)
    return model


def _leaf_layers(model):
    return [layer for layer in all_layers(model) if not isinstance(layer, keras.Model)]


def zero_half(model, seed=0, fraction=0.5):
    """Zero a random ``fraction`` of every prunable group; return (zeroed, analysis, remove)."""
    analysis = Analysis(model)
    rng = np.random.default_rng(seed)
    remove = np.zeros(analysis.num_components, bool)
    for group in analysis.groups:
        if group.prunable:
            free = group.components[~group.blocked]
            remove[rng.permutation(free)[: int(len(free) * fraction)]] = True
    remove = analysis.keep_nonempty(remove)
    return zero_channels(model, remove, analysis), analysis, remove


def expected_out_channels(analysis, remove):
    kept = analysis.kept_indices(remove)
    out = {}
    for path, layer in analysis.graph.iter_layers():
        op = analysis.graph.first_op(path)
        if op is not None and op.kind == "layer" and analysis.weights.get(path) and op.outputs:
            out[path] = len(kept[op.outputs[0]])
    return out


def check_exact_and_minimal(model, seed=0, fraction=0.5, atol=1e-4, x=None):
    randomize(model, seed)
    zeroed, analysis, remove = zero_half(model, seed, fraction)
    small, report = kr.rebuild(zeroed, return_report=True)
    x = random_inputs(model, seed=seed) if x is None else x
    assert_models_close(zeroed, small, x, atol=atol)
    expected = expected_out_channels(analysis, remove)
    got = {r.name: r.out_after for r in report.layers}
    assert {k: got[k] for k in expected} == expected
    return zeroed, small, report


def conv_sandwich(middle, shape=(8, 8, 3), channels=8):
    """input -> Conv (writer) -> middle layers -> Conv (reader) -> GAP -> Dense."""
    inp = keras.Input(shape)
    x = L.Conv2D(channels, 3, padding="same", name="writer")(inp)
    for layer in middle:
        x = layer(x)
    x = L.Conv2D(6, 3, padding="same", name="reader")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


# ----------------------------------------------------------------------------- single layers
PASS_THROUGH = {
    "activation": lambda: [L.Activation("swish")],
    "relu": lambda: [L.ReLU()],
    "leaky_relu": lambda: [L.LeakyReLU(0.1)],
    "elu": lambda: [L.ELU()],
    "prelu": lambda: [L.PReLU()],
    "prelu_shared": lambda: [L.PReLU(shared_axes=[1, 2])],
    "dropout": lambda: [L.Dropout(0.3)],
    "spatial_dropout": lambda: [L.SpatialDropout2D(0.3)],
    "max_pool": lambda: [L.MaxPooling2D(2)],
    "avg_pool": lambda: [L.AveragePooling2D(2, padding="same")],
    "zero_padding": lambda: [L.ZeroPadding2D(1)],
    "cropping": lambda: [L.Cropping2D(1)],
    "upsampling": lambda: [L.UpSampling2D(interpolation="bilinear")],
    "identity": lambda: [L.Identity()],
    "batchnorm": lambda: [L.BatchNormalization()],
    "bn_relu_bn": lambda: [L.BatchNormalization(), L.ReLU(6.0), L.BatchNormalization(center=False)],
    "depthwise": lambda: [L.DepthwiseConv2D(3, padding="same")],
    "depthwise_multiplier": lambda: [L.DepthwiseConv2D(3, depth_multiplier=2, padding="same")],
    "separable": lambda: [L.SeparableConv2D(7, 3, padding="same", depth_multiplier=2)],
    "transpose": lambda: [L.Conv2DTranspose(5, 3, strides=2, padding="same")],
    "grouped_depthwise_like": lambda: [L.Conv2D(8, 3, groups=8, padding="same")],
}


@pytest.mark.parametrize("name", sorted(PASS_THROUGH))
def test_rebuild_is_exact_and_minimal_through_layer(name):
    check_exact_and_minimal(conv_sandwich(PASS_THROUGH[name]()))


def test_rebuild_global_poolings_feed_dense():
    for pool in (L.GlobalAveragePooling2D(), L.GlobalMaxPooling2D(keepdims=True)):
        inp = keras.Input((6, 6, 3))
        x = L.Conv2D(8, 3, name="c")(inp)
        x = pool(x)
        if len(x.shape) == 4:
            x = L.Flatten()(x)
        check_exact_and_minimal(keras.Model(inp, L.Dense(4, name="d")(x)))


def test_rebuild_dense_on_2d_and_nd_inputs():
    inp = keras.Input((5, 6))
    x = L.Dense(8, activation="relu", name="d1")(inp)  # Dense on a 3-D tensor
    x = L.Dense(8, name="d2")(x)
    x = L.Flatten()(x)
    x = L.Dense(8, activation="tanh", name="d3")(x)
    zeroed, small, report = check_exact_and_minimal(keras.Model(inp, L.Dense(2, name="out")(x)))
    assert report.params_after < report.params_before


@pytest.mark.parametrize("conv", ["1d", "3d"])
def test_rebuild_conv1d_and_conv3d(conv):
    if conv == "1d":
        inp = keras.Input((16, 2))
        x = L.Conv1D(8, 3, padding="same", name="c1")(inp)
        x = L.BatchNormalization()(x)
        x = L.MaxPooling1D()(x)
        x = L.SeparableConv1D(8, 3, name="sep")(x)
        x = L.Conv1DTranspose(6, 3, name="t")(x)
        x = L.GlobalAveragePooling1D()(x)
    else:
        inp = keras.Input((6, 6, 6, 2))
        x = L.Conv3D(8, 3, padding="same", name="c1")(inp)
        x = L.BatchNormalization()(x)
        x = L.UpSampling3D()(x)
        x = L.Conv3D(6, 3, name="c2")(x)
        x = L.GlobalMaxPooling3D()(x)
    check_exact_and_minimal(keras.Model(inp, L.Dense(3, name="out")(x)))


# ----------------------------------------------------------------------------- couplings
@pytest.mark.parametrize("merge", [L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum, L.Multiply])
def test_rebuild_merges_remove_shared_channels_together(merge):
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    b = L.Conv2D(8, 1, name="b")(inp)
    b = L.BatchNormalization(name="bn_b")(b)
    x = merge(name="merge")([a, b])
    x = L.Conv2D(4, 3, name="reader")(x)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    zeroed, small, report = check_exact_and_minimal(model)
    by_name = {r.name: r for r in report.layers}
    assert by_name["a"].out_after == by_name["b"].out_after == 4


def squeeze_excite(x, channels, name, use_dense=False):
    s = L.GlobalAveragePooling2D(name=name + "_gap")(x)
    s = L.Reshape((1, 1, channels), name=name + "_reshape")(s)
    if use_dense:
        s = L.Dense(4, activation="relu", name=name + "_reduce")(s)
        s = L.Dense(channels, activation="sigmoid", name=name + "_expand")(s)
    else:
        s = L.Conv2D(4, 1, activation="relu", name=name + "_reduce")(s)
        s = L.Conv2D(channels, 1, activation="sigmoid", name=name + "_expand")(s)
    return L.Multiply(name=name + "_gate")([x, s])


@pytest.mark.parametrize("use_dense", [False, True])
def test_rebuild_squeeze_excite_gate_goes_with_gated_channels(use_dense):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("swish")(x)
    x = squeeze_excite(x, 8, "se", use_dense)
    x = L.Conv2D(6, 1, name="project")(x)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    zeroed, small, report = check_exact_and_minimal(model)
    by_name = {r.name: r for r in report.layers}
    assert by_name["se_expand"].out_after == by_name["conv"].out_after == 4
    assert small.get_layer("se_reshape").output.shape[-1] == 4


def test_rebuild_concatenate_maps_channel_offsets():
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(inp)
    b = L.Conv2D(10, 1, name="b")(inp)
    x = L.Concatenate(name="cat")([a, L.ReLU()(b)])
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(4, 1, name="reader")(x)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    zeroed, small, report = check_exact_and_minimal(model)
    assert small.get_layer("bn").output.shape[-1] == 3 + 5


def test_rebuild_flatten_dense_removes_every_spatial_row():
    inp = keras.Input((5, 5, 2))
    x = L.Conv2D(16, 3, padding="same", name="c")(inp)
    x = L.Flatten(name="flat")(x)
    model = keras.Model(inp, L.Dense(3, name="fc")(x))
    zeroed, small, report = check_exact_and_minimal(model)
    assert small.get_layer("fc").get_weights()[0].shape == (5 * 5 * 8, 3)


def test_rebuild_reshape_flatten_like_then_dense():
    inp = keras.Input((3, 3, 2))
    x = L.Conv2D(4, 1, name="c")(inp)
    x = L.Reshape((36,), name="r")(x)
    check_exact_and_minimal(keras.Model(inp, L.Dense(3, name="fc")(x)))


def test_rebuild_never_removes_input_or_output_channels():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    out = L.Conv2D(5, 3, padding="same", name="c2")(x)
    model = randomize(keras.Model(inp, out))
    a = Analysis(model)
    remove = np.ones(a.num_components, bool)  # ask for everything
    remove &= ~a.comp_blocked
    small = kr.rebuild(zero_channels(model, a.keep_nonempty(remove), a))
    assert small.input_shape == model.input_shape
    assert small.output_shape == model.output_shape


def test_rebuild_keeps_one_channel_of_a_fully_zeroed_layer():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="dead", use_bias=False)(inp)
    x = L.Conv2D(4, 3, name="next")(x)
    model = randomize(keras.Model(inp, L.GlobalAveragePooling2D()(x)))
    model.get_layer("dead").set_weights([np.zeros_like(model.get_layer("dead").get_weights()[0])])
    small = kr.rebuild(model)
    assert small.get_layer("dead").filters == 1
    assert_models_close(model, small)


# ----------------------------------------------------------------------------- architectures
def test_rebuild_encoder_decoder_with_transposed_convs_and_skip_concats():
    inp = keras.Input((16, 16, 3))
    e1 = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="e1")(inp)))
    e2 = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="e2")(e1)
    b = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="bottleneck")(e2)
    d2 = L.Conv2DTranspose(16, 3, strides=2, padding="same", name="d2")(b)
    d2 = L.Concatenate(name="skip2")([d2, e2])
    d2 = L.Conv2D(16, 3, padding="same", activation="relu", name="d2c")(d2)
    d1 = L.Conv2DTranspose(8, 3, strides=2, padding="same", name="d1")(d2)
    d1 = L.Concatenate(name="skip1")([d1, e1])
    out = L.Conv2D(2, 1, name="mask")(d1)
    check_exact_and_minimal(keras.Model(inp, out))


def test_rebuild_1d_audio_net():
    inp = keras.Input((64, 1))
    x = L.Conv1D(16, 9, strides=2, padding="same", name="stem")(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    for i in range(2):
        y = L.SeparableConv1D(16, 5, padding="same", name=f"sep{i}")(x)
        y = L.BatchNormalization(name=f"bn{i}")(y)
        x = L.Add(name=f"res{i}")([x, L.ReLU()(y)])
        x = L.MaxPooling1D()(x)
    x = L.GlobalAveragePooling1D()(x)
    check_exact_and_minimal(keras.Model(inp, L.Dense(5, name="cls")(x)))


def test_rebuild_multi_input_multi_output_with_shared_layer():
    a = keras.Input((8, 8, 3), name="a")
    b = keras.Input((8, 8, 3), name="b")
    shared = L.Conv2D(8, 3, padding="same", name="shared")
    xa, xb = shared(a), shared(b)
    x = L.Add(name="sum")([L.ReLU()(xa), xb])
    x = L.Conv2D(6, 3, name="trunk")(x)
    pooled = L.GlobalAveragePooling2D()(x)
    out1 = L.Dense(3, name="cls")(pooled)
    out2 = L.Conv2D(2, 1, name="seg")(L.Conv2D(5, 1, name="seg_hidden")(xa))
    zeroed, small, report = check_exact_and_minimal(keras.Model([a, b], [out1, out2]))
    assert small.get_layer("shared").filters == 4


def test_rebuild_nested_model_used_twice_and_sequential_with_functional_backbone():
    bin_ = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", name="bb_conv")(bin_)
    h = L.BatchNormalization(name="bb_bn")(h)
    h = L.ReLU()(h)
    backbone = keras.Model(bin_, L.Conv2D(12, 3, padding="same", name="bb_out")(h), name="backbone")
    seq = keras.Sequential([
        keras.Input((8, 8, 3)),
        backbone,
        L.GlobalAveragePooling2D(),
        L.Dense(10, activation="relu", name="fc"),
        L.Dense(3, name="cls"),
    ])
    zeroed, small, report = check_exact_and_minimal(seq)
    assert isinstance(small, keras.Sequential)
    assert small.layers[0].name == "backbone"
    assert small.layers[0].get_layer("bb_conv").filters == 4

    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    twice = keras.Model([a, b], L.Dense(2, name="d")(L.GlobalAveragePooling2D()(L.Add()([backbone(a), backbone(b)]))))
    check_exact_and_minimal(twice)


class EDSRLike(keras.Model):
    """keras-io EDSR's pattern: a Functional subclass with methods of its own, made as ``EDSRLike(inputs, outputs)``."""

    def upscale(self, x):
        (y,) = predict(self, x)
        return np.clip(y * 127.5 + 127.5, 0.0, 255.0)


class ScaledModel(keras.Model):
    """A Functional subclass whose constructor takes another argument: it cannot be rebuilt as itself."""

    def __init__(self, inputs, outputs, scale=2.0, **kwargs):
        super().__init__(inputs, outputs, **kwargs)
        self.scale = scale


def _sr_graph():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="head")(inp)
    y = L.Conv2D(8, 3, padding="same", activation="relu", name="body")(x)
    y = L.Conv2D(8, 3, padding="same", name="body_out")(y)
    x = L.Add()([x, y])
    return inp, L.Conv2D(3, 3, padding="same", name="tail")(x)


def _masked_in_place(model, seed=0):
    """``model`` itself (its class kept) with random weights and half of every prunable group zeroed."""
    randomize(model, seed)
    zeroed, analysis, remove = zero_half(model, seed)
    model.set_weights(zeroed.get_weights())
    return model, expected_out_channels(analysis, remove)


def test_rebuild_keeps_a_functional_subclass_built_from_inputs_and_outputs():
    inp, out = _sr_graph()
    model, expected = _masked_in_place(EDSRLike(inp, out, name="edsr"))
    small, report = kr.rebuild(model, return_report=True)
    assert type(small) is EDSRLike and small.name == "edsr"
    assert not any("plain Functional" in note for note in report.notes), report.notes
    assert {r.name: r.out_after for r in report.layers if r.name in expected} == expected
    assert small.count_params() < model.count_params()
    x = random_inputs(model, seed=3)
    assert_models_close(model, small, x)
    np.testing.assert_allclose(small.upscale(x), model.upscale(x), atol=1e-3)


def test_rebuild_of_a_functional_subclass_with_its_own_constructor_is_a_plain_functional_and_says_so():
    inp, out = _sr_graph()
    model, expected = _masked_in_place(ScaledModel(inp, out, scale=4.0, name="scaled"))
    assert type(model) is ScaledModel
    small, report = kr.rebuild(model, return_report=True)
    assert not isinstance(small, ScaledModel) and type(small).__name__ == "Functional"
    assert small.name == "scaled"
    assert any("ScaledModel" in note and "plain Functional" in note for note in report.notes), report.notes
    assert {r.name: r.out_after for r in report.layers if r.name in expected} == expected
    assert_models_close(model, small, random_inputs(model, seed=3))


class NeedsConfigFile(keras.Model):
    """Takes ``(*args, **kwargs)`` like ``Functional`` but refuses to be made without its own argument."""

    def __init__(self, *args, config_file=None, **kwargs):
        if config_file is None:
            raise TypeError("NeedsConfigFile needs config_file")
        super().__init__(*args, **kwargs)


def test_rebuild_of_a_functional_subclass_whose_constructor_fails_is_a_plain_functional_and_says_why():
    inp, out = _sr_graph()
    model, expected = _masked_in_place(NeedsConfigFile(inp, out, config_file="sr.json", name="needs"))
    small, report = kr.rebuild(model, return_report=True)
    assert type(small).__name__ == "Functional" and small.name == "needs"
    assert any("NeedsConfigFile" in note and "needs config_file" in note and "plain Functional" in note
               for note in report.notes), report.notes
    assert {r.name: r.out_after for r in report.layers if r.name in expected} == expected
    assert_models_close(model, small, random_inputs(model, seed=3))


def test_rebuild_keeps_each_layers_trainable_flag():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="frozen", trainable=False)(inp)
    x = L.Conv2D(6, 3, padding="same", name="free")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)))
    zeroed, small, _ = check_exact_and_minimal(model)
    assert small.get_layer("frozen").filters < 8  # rebuilt, not copied
    assert [small.get_layer(n).trainable for n in ("frozen", "free", "head")] == [False, True, True]
    assert len(small.trainable_weights) == len(model.trainable_weights) == 4


# ----------------------------------------------------------------------------- honesty about the rest
def test_layer_normalization_and_softmax_over_channels_keep_their_channels():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="to_ln")(inp)
    x = L.LayerNormalization(name="ln")(x)
    y = L.Conv2D(8, 3, padding="same", name="to_softmax")(x)
    y = L.Softmax(name="sm")(y)
    y = L.Conv2D(4, 1, name="reader")(y)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(y))
    zeroed, small, report = check_exact_and_minimal(model)
    assert small.get_layer("to_ln").filters == 8
    assert small.get_layer("to_softmax").filters == 8
    reasons = " ".join(r for g in report.groups for r in g.reasons)
    assert "normalises over the channel axis" in reasons and "Softmax 'sm'" in reasons


def test_grouped_conv_loses_whole_groups_only():
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(12, 1, name="pre")(inp)
    x = L.Conv2D(6, 3, groups=3, padding="same", name="grouped")(x)  # 4 inputs, 2 outputs per group
    model = keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="post")(x)))
    analysis = Analysis(model)
    (group,) = [g for g in analysis.groups if g.name == "pre"]
    assert group.size == 3  # one unit per conv group
    zeroed, small, report = check_exact_and_minimal(model, fraction=0.34)
    grouped = small.get_layer("grouped")
    assert (grouped.groups, grouped.filters, small.get_layer("pre").filters) == (2, 4, 8)


def test_grouped_conv_with_one_live_channel_in_a_group_keeps_the_group():
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 1, name="pre", use_bias=False)(inp)
    x = L.Conv2D(4, 3, groups=2, padding="same", name="grouped", use_bias=False)(x)
    model = randomize(keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="post")(x))))
    kernel = model.get_layer("pre").get_weights()[0]
    kernel[..., :3] = 0  # 3 of the 4 inputs of group 0 dead: the group must stay
    model.get_layer("pre").set_weights([kernel])
    small = kr.rebuild(model)
    assert small.get_layer("grouped").groups == 2
    assert_models_close(model, small)


class Doubler(L.Layer):
    """A custom layer keras_rebuild does not know."""

    def call(self, x):
        return 2.0 * x


def test_unknown_layer_is_never_treated_as_pass_through():
    zeroed, small, report = check_exact_and_minimal(conv_sandwich([Doubler(name="doubler")]))
    assert small.get_layer("writer").filters == 8
    assert any("doubler" in r and "no channel handler" in r for g in report.groups for r in g.reasons)
    assert "doubler" in str(report)


def test_register_handler_teaches_a_custom_layer():
    class Halver(L.Layer):
        def call(self, x):
            return 0.5 * x

    @kr.register_handler(Halver)
    class HalverHandler(kr.handlers.TiedHandler):
        pass

    zeroed, small, report = check_exact_and_minimal(conv_sandwich([Halver(name="halver")]))
    assert small.get_layer("writer").filters == 4


# ----------------------------------------------------------------------------- invariants
def test_rebuild_without_dead_channels_changes_nothing():
    model = randomize(kr.digits_cnn())
    small, report = kr.rebuild(model, return_report=True)
    assert report.params_after == report.params_before == model.count_params()
    assert_models_close(model, small, atol=1e-6)
    for a, b in zip(model.get_weights(), small.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_rebuild_keeps_layer_names_and_leaves_the_input_untouched():
    model = randomize(kr.digits_cnn())
    zeroed, _, _ = zero_half(model)
    before = weights_digest(zeroed)
    small = kr.rebuild(zeroed)
    assert weights_digest(zeroed) == before
    assert [layer.name for layer in small.layers] == [layer.name for layer in zeroed.layers]


@pytest.mark.tf_keras_only
def test_rebuild_accepts_tfmot_pruned_models_and_removes_whole_dead_channels():
    from keras_rebuild._compat import tfmot

    model = randomize(kr.digits_cnn())
    pruned = tfmot().sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=tfmot().sparsity.keras.ConstantSparsity(0.5, 0))
    # kill whole output channels of conv2 through the wrapped weights
    wrapper = pruned.get_layer("prune_low_magnitude_conv2")
    kernel = wrapper.layer.kernel.numpy()
    kernel[..., ::2] = 0
    wrapper.layer.kernel.assign(kernel)
    bn = pruned.get_layer("prune_low_magnitude_bn2").layer
    gamma, beta, mean, var = bn.get_weights()
    gamma[::2] = 0
    beta[::2] = 0
    bn.set_weights([gamma, beta, mean, var])
    stripped = tfmot().sparsity.keras.strip_pruning(pruned)
    small, report = kr.rebuild(pruned, return_report=True)
    assert small.get_layer("conv2").filters == 16
    assert_models_close(stripped, small, atol=1e-5)


def test_report_prints_a_table_with_totals_and_round_trips_to_dict():
    zeroed, small, report = check_exact_and_minimal(randomize(kr.digits_cnn()))
    text = str(report)
    assert "conv1" in text and "total" in text and "->" in text
    d = report.to_dict()
    assert d["params_after"] == small.count_params() == report.params_after
    assert report.macs_after < report.macs_before


def test_analysis_summary_lists_groups_and_reasons():
    summary = kr.analyze(kr.digits_cnn()).summary()
    assert "conv1" in summary and "prunable" in summary and "model output 'probs'" in summary


def test_rebuild_rejects_nan_weights_naming_the_layer():
    model = kr.digits_cnn()
    w = model.get_layer("conv2").get_weights()
    w[0][0, 0, 0, 0] = np.nan
    model.get_layer("conv2").set_weights(w)
    with pytest.raises(kr.errors.InvalidWeightsError, match="conv2.*Received"):
        kr.rebuild(model)


# ----------------------------------------------------------------------------- model zoo
ZOO = {
    "VGG16": 32, "ResNet50": 32, "ResNet50V2": 32, "MobileNet": 32, "MobileNetV2": 32,
    "MobileNetV3Small": 32, "MobileNetV3Large": 32, "EfficientNetB0": 32, "EfficientNetV2B0": 32,
    "DenseNet121": 32, "Xception": 71, "InceptionV3": 75, "NASNetMobile": 32, "ConvNeXtTiny": 32,
    "RegNetX002": 32,  # tf_keras only
}


def zoo_model(name):
    size = ZOO[name]
    kwargs = {} if name == "NASNetMobile" else {"classifier_activation": None}
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), **kwargs)


# The whole zoo on one backend per flavour; a core subset on JAX and torch.
ZOO_HERE = sorted(n for n in ZOO if hasattr(keras.applications, n)) if ON_TENSORFLOW else [
    "EfficientNetB0", "MobileNetV2", "ResNet50"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", ZOO_HERE)
def test_rebuild_is_exact_on_keras_applications(name):
    model = zoo_model(name)
    x = np.random.default_rng(0).normal(size=(2,) + model.input_shape[1:]).astype("float32")
    randomize_bn(model)
    # Zero half of every prunable group in place (this test owns the model): saves a clone.
    analysis = Analysis(model)
    rng = np.random.default_rng(0)
    remove = np.zeros(analysis.num_components, bool)
    for group in analysis.groups:
        if group.prunable:
            free = group.components[~group.blocked]
            remove[rng.permutation(free)[: len(free) // 2]] = True
    remove = analysis.keep_nonempty(remove)
    for path, weights in masked_weights(analysis, remove).items():
        analysis.graph.layers[path].set_weights(weights)
    zeroed = model
    small, report = kr.rebuild(zeroed, return_report=True)
    y1, y2 = predict(zeroed, x)[0], predict(small, x)[0]
    scale = max(np.abs(y1).max(), 1e-3)
    assert np.abs(y1 - y2).max() <= 1e-4 * scale
    assert report.params_after < 0.75 * report.params_before
    expected = expected_out_channels(analysis, remove)
    assert {r.name: r.out_after for r in report.layers if r.name in expected} == expected


def randomize_bn(model, seed=0):
    """Random BatchNorm statistics (BN is not the identity) and LayerScale gammas (not 1e-6)."""
    rng = np.random.default_rng(seed)
    for layer in _leaf_layers(model):
        if type(layer).__name__ == "LayerScale":
            layer.set_weights([rng.normal(0, 1, w.shape).astype(w.dtype) for w in layer.get_weights()])
        if isinstance(layer, L.BatchNormalization):
            ws = [w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in layer.get_weights()]
            ws[-1] = np.abs(ws[-1]) + 0.5
            layer.set_weights(ws)
