"""A catalogue of awkward inputs: each gives correct behaviour or one of our errors.

Every error asserted here is a keras_rebuild exception whose message names
what was wrong and contains "Received". Every "supported" case checks that the
rebuilt model computes exactly what the model it was given computes.
"""
import os

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild import masks
from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    InvalidWeightsError,
    KerasRebuildError,
    NotAModelError,
    UnsupportedModelError,
)
from keras_rebuild.groups import Analysis
from keras_rebuild.testing import assert_models_close, flavour_keras, layer_channels, random_inputs

keras = flavour_keras()

L = keras.layers


def zero_out_channels(model, layer_name, channels):
    """Zero output channels of a Conv/Dense layer (kernel columns and bias) in place."""
    layer = model.get_layer(layer_name)
    w = layer.get_weights()
    w[0][..., channels] = 0.0
    if len(w) > 1:
        w[1][channels] = 0.0
    layer.set_weights(w)
    return model


def assert_our_error(excinfo, *needles):
    message = str(excinfo.value)
    assert isinstance(excinfo.value, KerasRebuildError)
    assert "Received" in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def rebuild_report(model):
    small, report = kr.rebuild(model, return_report=True)
    return small, {r.name: r for r in report.layers}, report


def conv_chain(middle, name="mid"):
    """input -> c1 (8) -> middle -> c2 (6) -> c3 (3): c1's group reads through `middle`."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = middle(x)
    x = L.Conv2D(6, 1, name="c2")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(3, 1, name="c3")(x)
    return keras.Model(inp, x)


# ---------------------------------------------------------------------------- not a walkable model
class TwoDense(keras.Model):
    def __init__(self):
        super().__init__(name="two_dense")
        self.d1 = L.Dense(8)
        self.d2 = L.Dense(2)

    def call(self, x):
        return self.d2(self.d1(x))


@pytest.mark.parametrize("fn", [kr.rebuild, kr.analyze, Analysis], ids=["rebuild", "analyze", "Analysis"])
def test_subclassed_model_raises_unsupported_model_error_naming_its_class(fn):
    model = TwoDense()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(UnsupportedModelError) as excinfo:
        fn(model)
    assert_our_error(excinfo, "TwoDense", "subclassed", "functional")


@pytest.mark.parametrize("obj", ["model.keras", np.zeros((2, 3)), L.Dense(3), None],
                         ids=["string", "numpy_array", "keras_layer", "none"])
@pytest.mark.parametrize("fn", [kr.rebuild, kr.analyze, Analysis], ids=["rebuild", "analyze", "Analysis"])
def test_objects_that_are_not_models_raise_not_a_model_error(fn, obj):
    with pytest.raises(NotAModelError) as excinfo:
        fn(obj)
    assert isinstance(excinfo.value, TypeError)
    assert_our_error(excinfo, "`model`", type(obj).__name__)


def test_zero_channels_of_a_non_model_raises_not_a_model_error():
    with pytest.raises(NotAModelError) as excinfo:
        masks.zero_channels(np.zeros(3), np.zeros(0, bool))
    assert_our_error(excinfo, "ndarray")


def test_a_keras_layer_given_as_the_model_raises_not_a_model_error():
    with pytest.raises(NotAModelError) as excinfo:
        kr.rebuild(L.Dense(2))
    assert_our_error(excinfo, "Functional or Sequential", "Dense")


@pytest.mark.parametrize("fn", [kr.rebuild, kr.analyze], ids=["rebuild", "analyze"])
def test_unbuilt_sequential_raises_unsupported_model_error_with_advice(fn):
    model = keras.Sequential([L.Dense(4), L.Dense(2)], name="lazy")
    with pytest.raises(UnsupportedModelError) as excinfo:
        fn(model)
    assert_our_error(excinfo, "lazy", "keras.Input", "build")


def test_built_sequential_without_input_layer_rebuilds_exactly():
    model = keras.Sequential([L.Dense(6, name="d1"), L.Dense(2, name="d2")])
    model.build((None, 5))
    zero_out_channels(model, "d1", [1, 4])
    small, layers, _ = rebuild_report(model)
    assert layers["d1"].out_after == 4
    assert_models_close(model, small, tol=1e-5)


# ---------------------------------------------------------------------------- layers without a handler
class TimesTwo(L.Layer):
    """A custom layer keras_rebuild has no handler for."""

    def call(self, x):
        return 2.0 * x


def test_unknown_custom_layer_is_kept_whole_and_named_in_the_reasons():
    model = conv_chain(TimesTwo(name="times_two"))
    zero_out_channels(model, "c1", [0, 3, 5])
    zero_out_channels(model, "c2", [1, 2])
    summary = kr.analyze(model).summary()
    assert "times_two" in summary and "TimesTwo" in summary
    small, layers, report = rebuild_report(model)
    (c1_group,) = [g for g in report.groups if g.name == "c1"]
    assert any("TimesTwo" in r for r in c1_group.reasons)
    assert c1_group.channels_after == 8
    assert layers["c1"].out_after == 8  # read by the unknown layer: kept whole
    assert layers["c2"].out_after == 4  # the rest of the model still prunes
    assert_models_close(model, small, tol=1e-5)


def test_custom_layer_with_registered_handler_is_pruned_through():
    class Halve(L.Layer):
        def call(self, x):
            return 0.5 * x

    try:
        kr.register_handler(Halve)(kr.handlers.PassThroughHandler)
        model = conv_chain(Halve(name="halve"))
        zero_out_channels(model, "c1", [0, 3, 5])
        small, layers, _ = rebuild_report(model)
        assert layers["c1"].out_after == 5
        assert_models_close(model, small, tol=1e-5)
    finally:
        kr.handlers.base._REGISTRY.pop(Halve, None)


def test_lambda_layer_is_kept_whole_and_the_reason_mentions_the_lambda():
    model = conv_chain(L.Lambda(lambda t: t * 2.0 + 1.0, name="affine_lambda"))
    zero_out_channels(model, "c1", [2, 6])
    summary = kr.analyze(model).summary()
    assert "Lambda" in summary and "affine_lambda" in summary
    small, layers, report = rebuild_report(model)
    assert layers["c1"].out_after == 8
    assert any("Lambda" in r for g in report.groups for r in g.reasons)
    assert_models_close(model, small, tol=1e-5)


def test_time_distributed_follows_the_layer_it_wraps_and_rebuild_is_exact():
    inp = keras.Input((5, 6))
    x = L.Dense(8, name="d1")(inp)
    x = L.TimeDistributed(L.Dense(4), name="td")(x)
    x = L.Dense(6, name="d2")(x)
    x = L.Dense(2, name="d3")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "d1", [0, 1])
    zero_out_channels(model, "d2", [5])
    small, layers, _ = rebuild_report(model)
    assert layers["d1"].out_after == 6 and layers["td"].in_after == 6  # the wrapped Dense reads zeros
    assert layers["d2"].out_after == 5
    assert_models_close(model, small, tol=1e-5)


@pytest.mark.parametrize("rnn", [L.LSTM, L.GRU, L.SimpleRNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize("before", ["dense", "conv1d"])
def test_recurrent_layer_after_dense_or_conv_reads_the_zeroed_channels_and_rebuild_is_exact(rnn, before):
    inp = keras.Input((6, 5))
    if before == "dense":
        x = L.Dense(8, name="pre")(inp)
    else:
        x = L.Conv1D(8, 3, padding="same", name="pre")(inp)
    x = rnn(4, return_sequences=True, name="rnn")(x)
    x = L.Dense(6, name="post")(x)
    x = L.Dense(2, name="head")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "pre", [0, 3, 7])
    zero_out_channels(model, "post", [2])
    small, layers, report = rebuild_report(model)
    assert layers["pre"].out_after == 5 and layers["rnn"].in_after == 5
    assert layers["rnn"].out_after == 4  # its units are alive
    assert layers["post"].out_after == 5
    assert_models_close(model, small, tol=1e-5)


def test_embedding_keeps_its_integer_ids_and_rebuilds_exactly():
    inp = keras.Input((7,), dtype="int32")
    x = L.Embedding(10, 8, name="emb")(inp)
    x = L.Dense(6, activation="relu", name="d1")(x)
    x = L.GlobalAveragePooling1D()(x)
    x = L.Dense(2, name="d2")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "d1", [0, 4])
    analysis = kr.analyze(model)
    emb = analysis.graph.first_op("emb")
    ids = analysis.labels[analysis.elements(emb.inputs[0])]
    assert analysis.comp_blocked[ids].all()
    assert not analysis.comp_blocked[analysis.labels[analysis.elements(emb.outputs[0])]].any()
    small, layers, _ = rebuild_report(model)
    assert small.get_layer("emb").get_weights()[0].shape == (10, 8)  # every dimension is alive
    assert layers["d1"].in_after == 8
    assert layers["d1"].out_after == 4
    x = random_inputs(model)
    assert x.dtype.kind == "i"
    assert_models_close(model, small, x=x, tol=1e-5)


def test_channels_first_conv_is_kept_and_the_reason_says_channels_first():
    inp = keras.Input((3, 8, 8))
    x = L.Conv2D(8, 3, padding="same", data_format="channels_first", name="cf1")(inp)
    x = L.Conv2D(4, 1, data_format="channels_first", name="cf2")(x)
    x = L.Flatten()(x)
    x = L.Dense(2, name="head")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "cf1", [0, 1, 2])  # zero filters on axis -1 of the kernel
    analysis = kr.analyze(model)
    assert "channels_first" in analysis.summary()
    small, layers, report = rebuild_report(model)
    assert layers["cf1"].out_before == layers["cf1"].out_after
    assert small.get_layer("cf1").filters == 8
    assert any("channels_first" in r for g in report.groups for r in g.reasons)
    # TensorFlow's CPU kernels cannot run NCHW convs: compare what defines the function instead.
    for old, new in zip(model.layers, small.layers):
        assert old.get_config() == new.get_config()
        for u, v in zip(old.get_weights(), new.get_weights()):
            np.testing.assert_array_equal(u, v)


def test_conv_with_softmax_activation_keeps_its_channels():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", activation="softmax", name="c1")(inp)
    x = L.Conv2D(2, 1, name="c2")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "c1", [1, 2])  # softmax(0) is not 0 and couples the channels
    small, layers, report = rebuild_report(model)
    assert layers["c1"].out_after == 6
    assert any("softmax" in r for g in report.groups for r in g.reasons)
    assert_models_close(model, small, tol=1e-5)


def test_unknown_spatial_size_rebuilds_exactly_and_blocks_flatten():
    inp = keras.Input((None, None, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Conv2D(4, 3, padding="same", name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(2, name="head")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "c1", [0, 5])
    bn = model.get_layer("bn1")
    w = bn.get_weights()
    w[0][[0, 5]] = 0.0
    w[1][[0, 5]] = 0.0
    bn.set_weights(w)
    small, layers, _ = rebuild_report(model)
    assert layers["c1"].out_after == 6
    for size in (5, 11):
        x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype("float32")
        assert_models_close(model, small, x=x, tol=1e-5)


# ---------------------------------------------------------------------------- numerics
def test_mixed_float16_policy_rebuilds_exactly_within_float16_tolerance():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((8, 8, 3))
        x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
        x = L.BatchNormalization(name="bn1")(x)
        x = L.ReLU()(x)
        x = L.Conv2D(4, 1, name="c2")(x)
        x = L.Activation("linear", dtype="float32", name="out")(x)
        model = keras.Model(inp, x)
        zero_out_channels(model, "c1", [1, 2, 6])
        bn = model.get_layer("bn1")
        w = bn.get_weights()
        w[0][[1, 2, 6]] = 0.0
        w[1][[1, 2, 6]] = 0.0
        bn.set_weights(w)
        small, layers, _ = rebuild_report(model)
        assert layers["c1"].out_after == 5
        assert small.get_layer("c1").dtype_policy.name == "mixed_float16"
        assert small.get_layer("c1").compute_dtype == "float16"
        assert_models_close(model, small, tol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "minus_inf"])
@pytest.mark.parametrize("fn", [kr.rebuild, kr.analyze], ids=["rebuild", "analyze"])
def test_nan_or_inf_weights_raise_invalid_weights_error_naming_the_layer(fn, bad):
    model = conv_chain(L.BatchNormalization(name="bn_mid"))
    bn = model.get_layer("bn_mid")
    w = bn.get_weights()
    w[3][2] = bad  # moving variance
    bn.set_weights(w)
    with pytest.raises(InvalidWeightsError) as excinfo:
        fn(model)
    assert isinstance(excinfo.value, ValueError)
    assert_our_error(excinfo, "'bn_mid'", "moving_variance")


def test_nan_weights_in_a_nested_model_name_the_nested_path():
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(inner_in, L.Conv2D(4, 3, padding="same", name="conv")(inner_in), name="block")
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 1, name="stem")(inp)
    model = keras.Model(inp, L.Conv2D(2, 1, name="head")(inner(x)))
    w = inner.get_layer("conv").get_weights()
    w[0][0, 0, 0, 0] = np.nan
    inner.get_layer("conv").set_weights(w)
    with pytest.raises(InvalidWeightsError) as excinfo:
        kr.rebuild(model)
    assert_our_error(excinfo, "'block/conv'")


def test_group_zeroed_entirely_keeps_one_channel_and_stays_exact():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c0")(inp)
    x = L.Conv2D(8, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 1, name="c2")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "c1", list(range(8)))
    bn = model.get_layer("bn1")
    w = bn.get_weights()
    w[0][:] = 0.0
    w[1][:] = 0.0
    bn.set_weights(w)
    small, layers, _ = rebuild_report(model)
    assert layers["c1"].out_after == 1
    assert layers["bn1"].out_after == 1
    assert layers["c2"].in_after == 1
    # c0 now feeds a conv whose kernel is zero: its channels are ignored, bar one.
    assert layers["c0"].out_after == 1
    assert_models_close(model, small, tol=1e-5)


def test_dense_head_zeroed_entirely_keeps_one_input_channel():
    inp = keras.Input((5,))
    x = L.Dense(6, name="d1")(inp)
    x = L.Dense(3, name="d2")(x)
    model = keras.Model(inp, x)
    zero_out_channels(model, "d1", list(range(6)))
    small, layers, _ = rebuild_report(model)
    assert layers["d1"].out_after == 1
    assert layers["d2"].out_after == 3
    assert_models_close(model, small, tol=1e-6)


def test_model_with_dict_inputs_and_outputs_rebuilds_exactly():
    a = keras.Input((8, 8, 3), name="image")
    b = keras.Input((4,), name="meta")
    x = L.Conv2D(8, 3, padding="same", name="c1")(a)
    x = L.GlobalAveragePooling2D()(x)
    y = L.Dense(8, name="d1")(b)
    z = L.Concatenate(name="cat")([x, y])
    h = L.Dense(6, activation="relu", name="d2")(z)
    model = keras.Model({"image": a, "meta": b}, {"cls": L.Dense(3, name="cls")(h), "reg": L.Dense(1, name="reg")(h)})
    zero_out_channels(model, "c1", [0, 7])
    zero_out_channels(model, "d1", [1])
    zero_out_channels(model, "d2", [5])
    small, layers, _ = rebuild_report(model)
    assert (layers["c1"].out_after, layers["d1"].out_after, layers["d2"].out_after) == (6, 7, 5)
    rng = np.random.default_rng(0)
    x = {"image": rng.normal(size=(3, 8, 8, 3)).astype("float32"), "meta": rng.normal(size=(3, 4)).astype("float32")}
    assert_models_close(model, small, x=x, tol=1e-5)


def test_shared_dense_layer_called_on_two_inputs_prunes_once_and_stays_exact():
    a, b = keras.Input((5,)), keras.Input((5,))
    shared = L.Dense(6, name="shared")
    x = L.Add()([shared(a), shared(b)])
    model = keras.Model([a, b], L.Dense(2, name="head")(x))
    zero_out_channels(model, "shared", [0, 2])
    small, layers, _ = rebuild_report(model)
    assert layers["shared"].out_after == 4
    assert layer_channels(small)["shared"] == (5, 4)
    assert_models_close(model, small, tol=1e-6)


# ---------------------------------------------------------------------------- prune_channels arguments
@pytest.fixture
def wrappers():
    from keras_rebuild import wrappers

    return wrappers


def small_cnn():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(8, 3, padding="same", name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_prune_channels_rejects_sparsity_outside_unit_interval(wrappers, sparsity):
    with pytest.raises(InvalidArgumentError) as excinfo:
        wrappers.prune_channels(small_cnn(), sparsity=sparsity)
    assert_our_error(excinfo, "sparsity", "[0, 1)")


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("sparsity", ["half", [0.5]], ids=["string", "list"])
def test_prune_channels_rejects_sparsity_of_the_wrong_type(wrappers, sparsity):
    with pytest.raises(KerasRebuildError) as excinfo:
        wrappers.prune_channels(small_cnn(), sparsity=sparsity)
    assert_our_error(excinfo, "sparsity")


class OvershootingSchedule:
    """A pruning schedule whose sparsity ramps past 1 (tfmot's own classes refuse that)."""

    def __init__(self, final_sparsity=None, end_step=10):
        if final_sparsity is not None:
            self.final_sparsity = final_sparsity
        self.begin_step, self.end_step = 0, end_step

    def __call__(self, step):
        from keras_rebuild._compat import tf

        frac = tf.minimum(tf.cast(step, tf.float32) / self.end_step, 1.0)
        return tf.constant(True), 1.2 * frac

    def get_config(self):
        return {"class_name": "OvershootingSchedule", "config": {"end_step": self.end_step}}


@pytest.mark.parametrize("schedule", [OvershootingSchedule(), OvershootingSchedule(final_sparsity=1.0)],
                         ids=["ramps_to_1.2", "final_sparsity_1.0"])
@pytest.mark.tf_keras_only
def test_prune_channels_rejects_schedule_that_reaches_full_sparsity(wrappers, schedule):
    with pytest.raises(InvalidArgumentError) as excinfo:
        wrappers.prune_channels(small_cnn(), pruning_schedule=schedule)
    assert_our_error(excinfo, "final_sparsity", "OvershootingSchedule")


@pytest.mark.tf_keras_only
def test_prune_channels_rejects_a_schedule_that_is_not_callable(wrappers):
    with pytest.raises(KerasRebuildError) as excinfo:
        wrappers.prune_channels(small_cnn(), pruning_schedule=0.5)
    assert isinstance(excinfo.value, TypeError)
    assert_our_error(excinfo, "pruning_schedule")


@pytest.mark.tf_keras_only
def test_prune_channels_rejects_ignore_naming_a_missing_layer(wrappers):
    with pytest.raises(InvalidArgumentError) as excinfo:
        wrappers.prune_channels(small_cnn(), sparsity=0.5, ignore=["c1", "no_such_layer"])
    assert_our_error(excinfo, "ignore", "no_such_layer")


@pytest.mark.tf_keras_only
def test_prune_channels_of_a_subclassed_model_raises_unsupported_model_error(wrappers):
    model = TwoDense()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(UnsupportedModelError) as excinfo:
        wrappers.prune_channels(model, sparsity=0.5)
    assert_our_error(excinfo, "TwoDense")


@pytest.mark.tf_keras_only
def test_prune_channels_of_a_non_model_raises_not_a_model_error(wrappers):
    with pytest.raises(NotAModelError) as excinfo:
        wrappers.prune_channels("model.keras", sparsity=0.5)
    assert_our_error(excinfo, "str")


@pytest.mark.tf_keras_only
def test_prune_channels_with_ignore_keeps_that_group_whole_and_rebuild_is_exact(wrappers):
    model = small_cnn()
    # `head` reads c2's channels, so c2's group stays whole; c1's group is pruned.
    pruned = wrappers.prune_channels(model, sparsity=0.5, ignore=["head"])
    small, layers, _ = rebuild_report(pruned)
    assert layers["c1"].out_after == 4
    assert layers["c2"].out_after == 8
    assert_models_close(wrappers.strip_pruning(pruned), small, tol=1e-5)


# ---------------------------------------------------------------------------- export_tflite inputs (issue 12)
def small_conv():
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, activation="relu", name="c1")(inp)
    return keras.Model(inp, L.Dense(3, name="d")(L.Flatten()(x)))


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_export_int8_with_non_finite_calibration_data_raises_our_error_not_a_crash(tmp_path, bad):
    x = np.random.default_rng(0).random((8, 6, 6, 2), dtype=np.float32)
    x[3, 1, 1, 0] = bad
    with pytest.raises(InvalidArgumentError) as excinfo:
        kr.export_tflite(small_conv(), tmp_path / "m.tflite", quantize="int8", representative_data=x)
    assert_our_error(excinfo, "NaN" if np.isnan(bad) else "Inf", "representative_data")
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.tf_keras_only
def test_export_int8_of_a_model_with_integer_inputs_keeps_their_dtype(tmp_path):
    inp = keras.Input((5,), dtype="int32")
    x = L.Flatten()(L.Embedding(20, 4)(inp))
    model = keras.Model(inp, L.Dense(3)(x))
    ids = np.random.default_rng(0).integers(0, 20, size=(16, 5)).astype("int32")
    result = kr.export_tflite(model, quantize="int8", representative_data=ids)
    assert result.verification.passed


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("arg", ["num_calibration_samples", "num_verify_samples"])
@pytest.mark.parametrize("value", [0, -1])
def test_export_rejects_non_positive_sample_counts(arg, value):
    x = np.random.default_rng(0).random((8, 6, 6, 2), dtype=np.float32)
    with pytest.raises(InvalidArgumentError) as excinfo:
        kr.export_tflite(small_conv(), quantize="int8", representative_data=x, **{arg: value})
    assert_our_error(excinfo, arg)


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("shape", [(8, 6, 6, 3), (8, 5, 6, 2), (8, 7, 7, 2)])
def test_export_rejects_data_of_the_right_rank_but_wrong_sizes(shape):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    with pytest.raises(InvalidArgumentError) as excinfo:
        kr.export_tflite(small_conv(), quantize="int8", representative_data=x)
    assert_our_error(excinfo, "(batch, 6, 6, 2)", str(shape))
    with pytest.raises(InvalidArgumentError) as excinfo:
        kr.export_tflite(small_conv(), sample_inputs=x)
    assert_our_error(excinfo, "sample_inputs")


@pytest.mark.parametrize("path, error", [("", InvalidArgumentError), (b"m.tflite", TypeError)],
                         ids=["empty", "bytes"])
@pytest.mark.tf_keras_only
def test_export_rejects_empty_and_bytes_paths_without_writing(tmp_path, monkeypatch, path, error):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as excinfo:
        kr.export_tflite(small_conv(), path)
    assert_our_error(excinfo, "path")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("data", [np.array([["a"] * 72] * 2).reshape(2, 6, 6, 2),
                                  np.ones((2, 6, 6, 2), np.complex64)], ids=["strings", "complex"])
@pytest.mark.tf_keras_only
def test_export_rejects_string_and_complex_data(data):
    with pytest.raises(TypeError) as excinfo:
        kr.export_tflite(small_conv(), quantize="int8", representative_data=data)
    assert_our_error(excinfo, "representative_data")


@pytest.mark.tf_keras_only
def test_benchmark_of_bytes_that_are_not_a_flatbuffer_raises_our_error():
    with pytest.raises(InvalidArgumentError) as excinfo:
        kr.benchmark_tflite(b"not a flatbuffer at all")
    assert_our_error(excinfo, "TFLite")


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("policy", ["float16", "mixed_float16", "bfloat16"])
def test_export_of_a_low_precision_model_is_float32_and_verified(policy):
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, dtype=policy, name="c1")(inp)
    x = L.Flatten(dtype=policy)(x)
    model = keras.Model(inp, L.Dense(3, dtype="float32", name="d")(x))
    result = kr.export_tflite(model)
    assert result.verification.passed and result.quantize == "float32"


@pytest.mark.tf_keras_only
def test_export_of_a_built_trained_subclassed_model(tmp_path):
    model = TwoDense()
    model.compile("adam", "mse")
    model.fit(np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32"), epochs=1, verbose=0)
    result = kr.export_tflite(model, tmp_path / "sub.tflite")
    assert result.verification.passed and result.size_bytes > 0


@pytest.mark.tf_keras_only
def test_export_of_an_uncalled_subclassed_model_says_to_call_it():
    with pytest.raises(NotAModelError) as excinfo:
        kr.export_tflite(TwoDense())
    assert_our_error(excinfo, "called", "subclassed")


@pytest.mark.tf_keras_only
def test_nan_weights_are_reported_as_such_not_as_a_tolerance_problem():
    model = small_conv()
    w = model.get_layer("d").get_weights()
    w[0][0, 0] = np.nan
    model.get_layer("d").set_weights(w)
    with pytest.raises(KerasRebuildError) as excinfo:
        kr.export_tflite(model)
    assert "NaN" in str(excinfo.value) and "raise `atol`" not in str(excinfo.value)


@pytest.mark.tf_keras_only
def test_int8_io_export_reports_scale_and_zero_point():
    x = np.random.default_rng(0).random((16, 6, 6, 2), dtype=np.float32)
    result = kr.export_tflite(small_conv(), quantize="int8", representative_data=x, int8_io=True)
    assert result.inputs[0]["dtype"] == "int8" and result.inputs[0]["scale"] > 0
    assert isinstance(result.outputs[0]["zero_point"], int)
    assert "zero point" in result.summary()



# ---------------------------------------------------------------------------- issue 12: items 12, 14
@pytest.mark.parametrize("ignore", [5, 1.5, ["conv1", 3]])
def test_prune_channels_and_select_channels_refuse_an_ignore_that_is_not_names(ignore):
    model = kr.digits_cnn(width=4, flavour=os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras"))
    for fn in (kr.prune_channels, kr.select_channels):
        with pytest.raises(InvalidArgumentTypeError) as excinfo:
            fn(model, sparsity=0.5, ignore=ignore)
        assert_our_error(excinfo, "Expected `ignore`", "Received: ignore=")


@pytest.mark.parametrize("step", ["0.2", None, True])
def test_compress_refuses_a_step_that_is_not_a_number(step):
    model = kr.digits_cnn(width=4, flavour=os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras"))
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.zeros((8, 8, 8, 1), "float32")
    with pytest.raises(InvalidArgumentTypeError) as excinfo:
        kr.compress(model, 0.5, x, np.zeros(8, "int64"), step=step)
    assert_our_error(excinfo, "Expected `step`", "Received: step=")


@pytest.mark.tf_keras_only
def test_strip_pruning_of_a_tfmot_model_strips_tfmot_wrappers_too_and_leaves_it_untouched():
    from keras_rebuild._compat import tfmot
    from keras_rebuild.testing import weights_digest

    sparsity = tfmot().sparsity.keras
    pruned = sparsity.prune_low_magnitude(kr.digits_cnn(width=4), pruning_schedule=sparsity.ConstantSparsity(0.5, 0))
    digest = weights_digest(pruned)
    stripped = kr.strip_pruning(pruned)
    assert weights_digest(pruned) == digest
    names = {type(layer).__name__ for layer in stripped.layers}
    assert "PruneLowMagnitude" not in names and "Conv2D" in names
    x = random_inputs(stripped, seed=2)
    np.testing.assert_allclose(predict_of(stripped, x), predict_of(sparsity.strip_pruning(pruned), x), atol=1e-6)


def predict_of(model, x):
    from keras_rebuild.testing import predict

    return predict(model, x)[0]


def test_a_custom_regularizer_without_get_config_is_named_with_what_to_do():
    class Penalty(keras.regularizers.Regularizer):
        def __call__(self, x):
            return 1e-3 * keras.ops.sum(keras.ops.abs(x)) if hasattr(keras, "ops") else 1e-3 * abs(x).sum()

        def get_config(self):
            raise NotImplementedError

    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1", kernel_regularizer=Penalty())(inp)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="c2")(x))))
    kernel = model.get_layer("c1").get_weights()
    kernel[0][..., :4] = 0.0
    kernel[1][:4] = 0.0
    model.get_layer("c1").set_weights(kernel)
    with pytest.raises(UnsupportedModelError) as excinfo:
        kr.rebuild(model)
    assert_our_error(excinfo, "'c1'", "get_config()", "Received: NotImplementedError")


@pytest.mark.parametrize("kwargs", [{"round_to": 64}, {"min_channels": 64}])
def test_round_to_or_min_channels_beyond_a_group_size_warns_naming_the_groups(kwargs):
    model = kr.digits_cnn(width=8, flavour=os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras"))
    with pytest.warns(UserWarning, match="keep every channel of .* 'conv1' \\(8 channels\\)"):
        plan = kr.select_channels(model, sparsity=0.5, **kwargs)
    assert plan.channels_after == plan.channels_before
