"""The registry-driven handler harness: every registered layer class, in the flavour under test.

For each class with a built-in handler there is one example model that calls
it between a kernel that writes channels and a kernel that reads them. Every
example must hold four invariants:

* masked == rebuilt: zero half of every prunable group, rebuild, and the
  rebuilt model computes the zeroed model's function; nothing provably
  removable is left (minimal);
* keep-all is a no-op: a model without dead channels rebuilds to the same
  parameters, bit-identical weights and bit-identical outputs;
* the rebuilt layers' configs round-trip through ``from_config``;
* the rebuilt model saves as ``.keras`` and loads with the same outputs.

``test_examples_cover_every_registered_class`` fails when a handler is
registered without an example here.
"""
import copy
import os

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.backends import flavour_of, get_backend
from keras_rebuild.groups import Analysis
from keras_rebuild.handlers import registered_classes
from keras_rebuild.testing import (
    FLAVOUR_VARIABLE,
    flavour_keras,
    max_relative_error,
    predict,
    random_inputs,
    randomize_weights,
    zero_random_components,
)

keras = flavour_keras()
L = keras.layers
FLAVOUR = os.environ[FLAVOUR_VARIABLE]
get_backend(FLAVOUR)  # registers the flavour's built-in handlers
TOL = 2e-5


def _registered(name):
    """The registered class called ``name`` in this flavour (layers, ops, applications' layers)."""
    for cls in registered_classes():
        if flavour_of(cls) == FLAVOUR and cls.__name__ == name and _key(cls) == _key(cls):
            return cls
    raise LookupError(name)


def _is_op(cls) -> bool:
    return ".ops." in cls.__module__


def _key(cls) -> str:
    """Example key of a registered class: its name, ``op:Name`` for Keras 3 operations."""
    return ("op:" if _is_op(cls) else "") + cls.__name__


def _op(name):
    from keras.src.ops import core, nn
    from keras.src.ops import numpy as knp

    for module in (knp, nn, core):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    raise LookupError(name)


# ----------------------------------------------------------------------------- example builders
def sandwich(middle, rank=2, size=8, channels=8):
    """input -> ConvND (writer) -> ``middle`` -> ConvND 1x1 (reader) -> global pool -> Dense."""
    conv = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[rank]
    pool = {1: L.GlobalAveragePooling1D, 2: L.GlobalAveragePooling2D, 3: L.GlobalAveragePooling3D}[rank]
    size = size if rank < 3 else 4
    inp = keras.Input((size,) * rank + (3,))
    x = conv(channels, 3, padding="same", name="writer")(inp)
    x = middle(x)
    x = conv(6, 1, name="reader")(x)
    return keras.Model(inp, L.Dense(3, name="head")(pool()(x)))


def wide_sandwich(middle, channels=8, reader=16):
    """input -> Conv2D (writer) -> ``middle`` -> Conv2D 1x1 reading each channel with ``reader`` weights.

    LayerNormalization's output channels go through a selection of ``channels``
    weights per kept channel, which pays only for a reader wider than that.
    """
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(channels, 3, padding="same", name="writer")(inp)
    x = L.Conv2D(reader, 1, name="reader")(middle(x))
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)))


def dense_sandwich(middle, units=8):
    """input -> Dense (writer) -> ``middle`` -> Dense (reader)."""
    inp = keras.Input((5,))
    x = L.Dense(units, name="writer")(inp)
    return keras.Model(inp, L.Dense(3, name="reader")(middle(x)))


def sequence_sandwich(middle, units=8):
    """(time, features) input -> Dense (writer) -> ``middle`` -> Dense (reader) -> pool -> Dense."""
    inp = keras.Input((6, 5))
    x = L.Dense(units, name="writer")(inp)
    x = middle(x)
    if isinstance(x, (list, tuple)):  # return_state: the output and the last state
        x = L.Concatenate()([x[0], x[-1]])
    x = L.Dense(4, name="reader")(x)
    if len(x.shape) == 3:
        x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


def embedding_model():
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(20, 8, name="embedding")(inp)
    x = L.Dense(4, name="reader")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(x)))


def chain(*layers):
    def apply(x):
        for layer in layers:
            x = layer(x)
        return x
    return apply


def two_branch(merge):
    """Two convs writing the same channels, merged (the merge ties their channels)."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="writer_a")(inp)
    b = L.Conv2D(8, 3, padding="same", name="writer_b")(inp)
    x = merge(a, b)
    x = L.Conv2D(6, 1, name="reader")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)))


def _layer_examples():
    ex = {
        "Dense": lambda: dense_sandwich(L.Dense(7, name="mid")),
        "Conv1D": lambda: sandwich(L.Conv1D(7, 3, padding="same"), rank=1),
        "Conv2D": lambda: sandwich(L.Conv2D(8, 3, groups=4, padding="same")),
        "Conv3D": lambda: sandwich(L.Conv3D(5, 3, padding="same"), rank=3),
        "Conv1DTranspose": lambda: sandwich(L.Conv1DTranspose(5, 3, strides=2, padding="same"), rank=1),
        "Conv2DTranspose": lambda: sandwich(L.Conv2DTranspose(5, 3, strides=2, padding="same")),
        "Conv3DTranspose": lambda: sandwich(L.Conv3DTranspose(5, 3, padding="same"), rank=3),
        "SeparableConv1D": lambda: sandwich(L.SeparableConv1D(5, 3, padding="same", depth_multiplier=2), rank=1),
        "SeparableConv2D": lambda: sandwich(L.SeparableConv2D(5, 3, padding="same", depth_multiplier=2)),
        "DepthwiseConv1D": lambda: sandwich(L.DepthwiseConv1D(3, padding="same", depth_multiplier=2), rank=1),
        "DepthwiseConv2D": lambda: sandwich(L.DepthwiseConv2D(3, padding="same")),
        "BatchNormalization": lambda: sandwich(L.BatchNormalization()),
        "LayerNormalization": lambda: wide_sandwich(L.LayerNormalization()),
        "UnitNormalization": lambda: sandwich(L.UnitNormalization()),
        "Normalization": lambda: sandwich(L.Normalization()),
        "PReLU": lambda: sandwich(L.PReLU()),
        "Activation": lambda: sandwich(L.Activation("tanh")),
        "ReLU": lambda: sandwich(L.ReLU(6.0)),
        "LeakyReLU": lambda: sandwich(L.LeakyReLU()),
        "ELU": lambda: sandwich(L.ELU()),
        "ThresholdedReLU": lambda: sandwich(L.ThresholdedReLU(0.5)) if hasattr(L, "ThresholdedReLU") else None,
        "Softmax": lambda: sandwich(L.Softmax()),
        "Rescaling": lambda: sandwich(L.Rescaling(2.0, offset=0.5)),
        "Dropout": lambda: sandwich(L.Dropout(0.5)),
        "SpatialDropout1D": lambda: sandwich(L.SpatialDropout1D(0.5), rank=1),
        "SpatialDropout2D": lambda: sandwich(L.SpatialDropout2D(0.5)),
        "SpatialDropout3D": lambda: sandwich(L.SpatialDropout3D(0.5), rank=3),
        "GaussianNoise": lambda: sandwich(L.GaussianNoise(0.5)),
        "GaussianDropout": lambda: sandwich(L.GaussianDropout(0.5)),
        "AlphaDropout": lambda: sandwich(L.AlphaDropout(0.5)),
        "ActivityRegularization": lambda: sandwich(L.ActivityRegularization(l1=0.01)),
        "MaxPooling1D": lambda: sandwich(L.MaxPooling1D(2), rank=1),
        "MaxPooling2D": lambda: sandwich(L.MaxPooling2D(2)),
        "MaxPooling3D": lambda: sandwich(L.MaxPooling3D(2), rank=3),
        "AveragePooling1D": lambda: sandwich(L.AveragePooling1D(2), rank=1),
        "AveragePooling2D": lambda: sandwich(L.AveragePooling2D(2, padding="same")),
        "AveragePooling3D": lambda: sandwich(L.AveragePooling3D(2), rank=3),
        "GlobalAveragePooling1D": lambda: sandwich(chain(L.GlobalAveragePooling1D(keepdims=True)), rank=1),
        "GlobalAveragePooling2D": lambda: sandwich(chain(L.GlobalAveragePooling2D(keepdims=True))),
        "GlobalAveragePooling3D": lambda: sandwich(chain(L.GlobalAveragePooling3D(keepdims=True)), rank=3),
        "GlobalMaxPooling1D": lambda: sandwich(chain(L.GlobalMaxPooling1D(keepdims=True)), rank=1),
        "GlobalMaxPooling2D": lambda: sandwich(chain(L.GlobalMaxPooling2D(keepdims=True))),
        "GlobalMaxPooling3D": lambda: sandwich(chain(L.GlobalMaxPooling3D(keepdims=True)), rank=3),
        "ZeroPadding1D": lambda: sandwich(L.ZeroPadding1D(1), rank=1),
        "ZeroPadding2D": lambda: sandwich(L.ZeroPadding2D(1)),
        "ZeroPadding3D": lambda: sandwich(L.ZeroPadding3D(1), rank=3),
        "Cropping1D": lambda: sandwich(L.Cropping1D(1), rank=1),
        "Cropping2D": lambda: sandwich(L.Cropping2D(1)),
        "Cropping3D": lambda: sandwich(L.Cropping3D(1), rank=3),
        "UpSampling1D": lambda: sandwich(L.UpSampling1D(2), rank=1),
        "UpSampling2D": lambda: sandwich(L.UpSampling2D(2)),
        "UpSampling3D": lambda: sandwich(L.UpSampling3D(2), rank=3),
        "RepeatVector": lambda: dense_sandwich(chain(L.RepeatVector(3), L.Flatten())),
        "Identity": lambda: sandwich(L.Identity()),
        "Flatten": lambda: sandwich(chain(L.MaxPooling2D(4), L.Flatten(), L.Reshape((1, 1, 32)))),
        "Reshape": lambda: sandwich(chain(L.GlobalAveragePooling2D(), L.Reshape((1, 1, 8)))),
        "Add": lambda: two_branch(lambda a, b: L.Add()([a, b])),
        "Subtract": lambda: two_branch(lambda a, b: L.Subtract()([a, b])),
        "Average": lambda: two_branch(lambda a, b: L.Average()([a, b])),
        "Maximum": lambda: two_branch(lambda a, b: L.Maximum()([a, b])),
        "Minimum": lambda: two_branch(lambda a, b: L.Minimum()([a, b])),
        "Multiply": lambda: two_branch(lambda a, b: L.Multiply()([a, b])),
        "Concatenate": lambda: two_branch(lambda a, b: L.Concatenate()([a, L.ReLU()(b)])),
        "EinsumDense": lambda: sandwich(L.EinsumDense("abcd,de->abce", output_shape=(None, None, 7), bias_axes="e")),
        "LayerScale": lambda: sandwich(_registered("LayerScale")(0.5, 8)),
        "SimpleRNN": lambda: sequence_sandwich(L.SimpleRNN(7, return_sequences=True)),
        "GRU": lambda: sequence_sandwich(L.GRU(7, return_state=True)),
        "LSTM": lambda: sequence_sandwich(L.LSTM(7, return_state=True)),
        "Bidirectional": lambda: sequence_sandwich(L.Bidirectional(L.LSTM(5, return_sequences=True))),
        "GroupNormalization": lambda: sandwich(L.GroupNormalization(groups=4)),
        "MultiHeadAttention": lambda: sequence_sandwich(lambda x: L.MultiHeadAttention(4, 3, name="mha")(x, x)),
        "Embedding": embedding_model,
        "TimeDistributed": lambda: sequence_sandwich(L.TimeDistributed(L.Dense(7, activation="relu"))),
        "CustomScaleLayer": lambda: two_branch(lambda a, b: _registered("CustomScaleLayer")(0.17)([a, b])),
        "StochasticDepth": lambda: two_branch(lambda a, b: L.Add()([a, _registered("StochasticDepth")(0.5)(b)])),
    }
    if FLAVOUR == "tf_keras":
        import tensorflow as tf

        ex["TFOpLambda"] = lambda: two_branch(lambda a, b: tf.nn.relu6(a) + tf.reduce_mean(b, [1, 2], keepdims=True))
    return ex


def _op_examples():
    if FLAVOUR != "keras3":
        return {}
    ops = keras.ops

    def unary(fn):
        return lambda: sandwich(fn)

    return {
        "op:Add": lambda: two_branch(lambda a, b: a + b + 0.5),
        "op:Subtract": lambda: two_branch(lambda a, b: a - b),
        "op:Multiply": lambda: two_branch(lambda a, b: a * ops.sigmoid(b)),
        "op:Divide": lambda: sandwich(lambda x: ops.divide(x, 2.0)),
        "op:TrueDivide": lambda: sandwich(lambda x: ops.true_divide(x, 2.0)),
        "op:Maximum": lambda: two_branch(lambda a, b: ops.maximum(a, b)),
        "op:Minimum": lambda: sandwich(lambda x: ops.minimum(x, 0.5)),
        "op:Relu": unary(ops.relu),
        "op:Relu6": unary(ops.relu6),
        "op:Sigmoid": unary(ops.sigmoid),
        "op:Tanh": unary(ops.tanh),
        "op:Silu": unary(ops.silu),
        "op:Gelu": unary(ops.gelu),
        "op:Elu": unary(ops.elu),
        "op:Selu": unary(ops.selu),
        "op:Softplus": unary(ops.softplus),
        "op:Softsign": unary(ops.softsign),
        "op:LeakyRelu": unary(ops.leaky_relu),
        "op:HardSigmoid": unary(ops.hard_sigmoid),
        "op:HardSilu": unary(ops.hard_silu),
        "op:Absolute": unary(ops.absolute),
        "op:Abs": unary(lambda x: _op("Abs")()(x)),
        "op:Negative": unary(ops.negative),
        "op:Square": unary(ops.square),
        "op:Sqrt": unary(lambda x: ops.sqrt(ops.square(x))),
        "op:Exp": unary(ops.exp),
        "op:Cast": unary(lambda x: ops.cast(x, "float32")),
        "op:Clip": unary(lambda x: ops.clip(x, -0.5, 0.5)),
        "op:Mean": unary(lambda x: ops.mean(x, axis=(1, 2), keepdims=True)),
        "op:Max": unary(lambda x: ops.max(x, axis=(1, 2), keepdims=True)),
        "op:Min": unary(lambda x: ops.min(x, axis=(1, 2), keepdims=True)),
        "op:Sum": unary(lambda x: ops.sum(x, axis=(1, 2), keepdims=True)),
        "op:GetItem": unary(lambda x: x[:, 1:, :, :]),
        "op:Concatenate": lambda: two_branch(lambda a, b: ops.concatenate([a, b], axis=-1)),
    }


EXAMPLES = {**_layer_examples(), **_op_examples()}


def _builtin_keys():
    # Keras' own classes only: tests elsewhere register handlers for their own layers in the same process.
    return sorted({_key(cls) for cls in registered_classes()
                   if flavour_of(cls) == FLAVOUR and cls.__module__.split(".")[0] in ("keras", "tf_keras")})


def _build(key):
    model = EXAMPLES[key]()
    assert model is not None, f"no {key} in this Keras"
    return randomize_weights(model, seed=sum(map(ord, key)))


def test_examples_cover_every_registered_class():
    assert len(_builtin_keys()) > 50
    missing = [k for k in _builtin_keys() if k not in EXAMPLES]
    assert not missing, f"registered classes without a harness example: {missing}"


def _uses(model, key) -> bool:
    from keras_rebuild.graph import Graph

    return any(_key(type(op.layer)) == key for op in Graph(model).ops if op.kind == "layer")


def _without_build_configs(config):
    if isinstance(config, dict):
        return {k: _without_build_configs(v) for k, v in config.items() if k != "build_config"}
    if isinstance(config, (list, tuple)):
        return [_without_build_configs(v) for v in config]
    return config


@pytest.mark.parametrize("key", _builtin_keys())
def test_handler_masked_equals_rebuilt_and_rebuild_is_minimal(key):
    model = _build(key)
    assert _uses(model, key), f"the example for {key} does not call it"
    masked, analysis, remove = zero_random_components(model, fraction=0.5, seed=1)
    small, report = kr.rebuild(masked, return_report=True)
    x = random_inputs(model, batch=3, seed=2)
    err = max_relative_error(masked, small, x)
    assert err <= TOL, f"{key}: rebuilt model differs from the masked one ({err:.3g})"
    assert not Analysis(small).removable().any(), f"{key}: removable channels survived the rebuild"
    if remove.any():
        assert report.params_after < report.params_before, key


@pytest.mark.parametrize("key", _builtin_keys())
def test_handler_keep_all_is_a_bit_identical_no_op(key):
    model = _build(key)
    small, report = kr.rebuild(model, return_report=True)
    assert report.params_after == report.params_before
    for a, b in zip(model.get_weights(), small.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = random_inputs(model, batch=2, seed=3)
    for u, v in zip(predict(model, x), predict(small, x)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("key", _builtin_keys())
def test_handler_rebuilt_configs_round_trip_and_the_model_saves_and_loads(key, tmp_path):
    model = _build(key)
    masked, _, _ = zero_random_components(model, fraction=0.5, seed=4)
    small = kr.rebuild(masked)
    for layer in small.layers:
        config = layer.get_config()
        # from_config may consume its argument (wrappers pop "layer"), and tf_keras' copy is
        # unbuilt: compare without the nested build configs.
        again = type(layer).from_config(copy.deepcopy(config)).get_config()
        assert _without_build_configs(again) == _without_build_configs(config), layer.name
    path = str(tmp_path / "small.keras")
    small.save(path)
    # Applications' private layers (ConvNeXt's LayerScale...) are not registered with Keras' serialisation.
    private = {cls.__name__: cls for cls in registered_classes()
               if flavour_of(cls) == FLAVOUR and ".applications." in cls.__module__}
    loaded = keras.models.load_model(path, compile=False, custom_objects=private)
    x = random_inputs(model, batch=2, seed=5)
    for u, v in zip(predict(small, x), predict(loaded, x)):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-6)
