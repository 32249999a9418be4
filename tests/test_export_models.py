"""LiteRT export of the model families beyond plain CNNs: recurrent, Flex-only, stochastic, distance heads, U-Nets.

Runs in every test process (tf_keras, and Keras 3 on TensorFlow, JAX and
torch); tests of the TFLite converter's own options skip the backends that do
not convert through it in this process.
"""
import os

import numpy as np
import pytest

from keras_rebuild import export as export_mod
from keras_rebuild.errors import (
    ConversionError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    LiteRTRuntimeError,
    StochasticModelError,
    VerificationError,
)
from keras_rebuild.export import export_tflite, run_tflite
from keras_rebuild.export.flatbuffer import FlexOpError, op_names, read_model
from keras_rebuild.testing import flavour_keras

FLAVOUR = os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras")
keras = flavour_keras(FLAVOUR)
BACKEND = "tf_keras" if FLAVOUR == "tf_keras" else keras.backend.backend()
CONVERTER_HERE = BACKEND in ("tf_keras", "tensorflow")  # the TFLite converter runs in this process
needs_converter = pytest.mark.skipif(not CONVERTER_HERE, reason="the TFLite converter in this process")


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x)) if FLAVOUR == "keras3" else np.asarray(x)


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def recurrent_model(bidirectional=False):
    init = keras.initializers.GlorotUniform(seed=0)
    inp = keras.Input((6, 4), name="seq")
    lstm = keras.layers.LSTM(5, return_sequences=True, kernel_initializer=init, name="lstm")
    x = (keras.layers.Bidirectional(lstm, name="bi") if bidirectional else lstm)(inp)
    x = keras.layers.GRU(3, kernel_initializer=init, name="gru")(x)
    return keras.Model(inp, keras.layers.Dense(2, kernel_initializer=init, name="head")(x))


# --------------------------------------------------------------------------
# 9. Recurrent layers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [
    False, pytest.param(True, marks=pytest.mark.skipif(BACKEND == "jax", reason="the TensorFlow path again; time"))])
def test_lstm_and_gru_export_with_a_static_batch_of_one_and_verify(bidirectional):
    model = recurrent_model(bidirectional)
    result = export_tflite(model)
    v = result.verification
    assert v.passed and v.num_samples == 32 and v.max_abs_error < 1e-5, v
    assert result.inputs[0]["shape"] == (1, 6, 4)  # the default for recurrent layers: a static batch of 1
    # The file keeps no state between calls: the same sample twice gives the same answer, the Keras one.
    x = _normal((1, 6, 4), seed=3)
    twice = run_tflite(result, np.concatenate([x, x]), model=model)[0]
    np.testing.assert_array_equal(twice[0], twice[1])
    np.testing.assert_allclose(twice[:1], _numpy(model(x, training=False)), atol=1e-5)


@needs_converter
def test_unroll_rnn_keeps_a_dynamic_batch_without_a_loop():
    model = recurrent_model()
    result = export_tflite(model, unroll_rnn=True)
    assert result.verification.passed and result.inputs[0]["shape"] == (-1, 6, 4)
    assert "WHILE" not in op_names(result.content)
    looped = export_tflite(model, verify=False)
    assert "WHILE" in op_names(looped.content) and looped.size_bytes < result.size_bytes


def test_unroll_rnn_needs_a_fixed_number_of_time_steps():
    inp = keras.Input((None, 4), name="seq")
    model = keras.Model(inp, keras.layers.LSTM(3, name="lstm")(inp))
    pattern = "unroll_rnn=True.*Received: input 'seq' of shape \\(batch, None, 4\\)"
    with pytest.raises(InvalidArgumentError, match=pattern):
        export_tflite(model, unroll_rnn=True, sample_inputs=_normal((2, 6, 4)))


@needs_converter
def test_a_static_batch_is_an_option_and_verification_runs_in_chunks_of_it():
    model = recurrent_model()
    result = export_tflite(model, batch_size=4, sample_inputs=_normal((10, 6, 4)))  # 10 = 4 + 4 + 2 (padded)
    assert result.inputs[0]["shape"] == (4, 6, 4)
    assert result.verification.passed and result.verification.num_samples == 10


@pytest.mark.parametrize("bad, error", [(0, InvalidArgumentError), (2.0, InvalidArgumentTypeError),
                                        (True, InvalidArgumentTypeError)])
def test_batch_size_must_be_a_positive_int(bad, error):
    with pytest.raises(error, match="Received: batch_size="):
        export_tflite(recurrent_model(), batch_size=bad)


@needs_converter
def test_a_recurrent_loop_with_a_dynamic_batch_names_tensor_lists_the_layer_and_the_options():
    from keras_rebuild.export import convert

    model = recurrent_model()
    specs = export_mod._input_specs(model)
    fn = convert.convert_tf_keras if BACKEND == "tf_keras" else convert.convert_keras3_tensorflow
    with pytest.raises(FlexOpError, match="TensorListReserve") as info:
        fn(model, "float32", False, None, specs)  # no static batch
    text = str(info.value)
    assert ("'lstm'" in text or "'gru'" in text) and "batch_size=1" in text and "select_tf_ops=True" in text
    assert isinstance(info.value, ConversionError) and text.startswith("Expected")


# --------------------------------------------------------------------------
# 10. A file that fails in LiteRT
# --------------------------------------------------------------------------


class _FailingInterpreter:
    """A real interpreter whose ``invoke`` fails like LiteRT's kernels do, at every batch or above batch 1."""

    def __init__(self, interpreter, node, op, only_batched):
        self._it, self._node, self._op, self._only_batched = interpreter, node, op, only_batched

    def __getattr__(self, name):
        return getattr(self._it, name)

    def invoke(self):
        batch = int(self._it.get_input_details()[0]["shape"][0])
        if batch > 1 or not self._only_batched:
            raise RuntimeError(f"tflite/kernels/broadcast_to.cc Output shape must be broadcastable from input "
                               f"shape.Node number {self._node} ({self._op}) failed to invoke.")
        return self._it.invoke()


def _node_of(content, op):
    model = read_model(content)
    names = op_names(content)
    return names.index(op) if len(model.subgraphs) == 1 else None


def _dense_model():
    init = keras.initializers.GlorotUniform(seed=0)
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="relu", kernel_initializer=init, name="hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(3, kernel_initializer=init, name="scores")(h))


def test_a_batch_the_file_cannot_run_falls_back_to_batch_one_after_resizing_back(monkeypatch):
    model = _dense_model()
    content = export_tflite(model, verify=False).content
    real = export_mod._make_interpreter
    monkeypatch.setattr(export_mod, "_make_interpreter",
                        lambda c, num_threads=1: _FailingInterpreter(real(c, num_threads), 0, "FULLY_CONNECTED", True))
    # Batch 32 fails, then every sample runs at batch 1 (formerly: "Dimension mismatch. Got 1 but expected 32").
    got = run_tflite(content, _normal((32, 6)), model=model)[0]
    np.testing.assert_allclose(got, _numpy(model(_normal((32, 6)), training=False)), atol=1e-5)
    assert export_tflite(model).verification.passed


def test_a_file_that_fails_in_litert_reports_the_interpreter_error_naming_op_and_layer(monkeypatch):
    model = _dense_model()
    content = export_tflite(model, verify=False).content
    node = _node_of(content, "FULLY_CONNECTED")
    if node is None:
        pytest.skip("a file with several subgraphs")
    real = export_mod._make_interpreter
    monkeypatch.setattr(export_mod, "_make_interpreter",
                        lambda c, num_threads=1: _FailingInterpreter(real(c, num_threads), node, "FULLY_CONNECTED",
                                                                     False))
    with pytest.raises(LiteRTRuntimeError, match="Node number .* failed to invoke") as info:
        export_tflite(model)
    text = str(info.value)
    assert "(op FULLY_CONNECTED" in text and text.startswith("Expected")
    if BACKEND != "torch":  # litert-torch's tensor names do not carry the Keras layer names
        assert "op FULLY_CONNECTED in layer(s) 'hidden'" in text
    assert "Dimension mismatch" not in text and text.count("failed to invoke") == 1
    assert isinstance(info.value, ValueError)


@pytest.mark.tf_keras_only
def test_tf_keras_group_normalization_fails_in_litert_with_its_cause_and_converts_with_a_static_batch():
    inp = keras.Input((8, 8, 4), name="image")
    x = keras.layers.Conv2D(8, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=0), name="conv")(inp)
    model = keras.Model(inp, keras.layers.GroupNormalization(groups=2, name="gn")(x))
    with pytest.raises(LiteRTRuntimeError, match="BROADCAST_TO") as info:
        export_tflite(model)
    assert "layer(s) 'gn'" in str(info.value) and "batch_size=1" in str(info.value)
    assert "Dimension mismatch" not in str(info.value)
    assert export_tflite(model, batch_size=1).verification.passed


# --------------------------------------------------------------------------
# 11. TensorFlow ops LiteRT has no built-in for
# --------------------------------------------------------------------------


def _patches_model():
    import tensorflow as tf

    class Patches(keras.layers.Layer):
        """tf.image.extract_patches, as in the keras-io ViT."""

        def call(self, images):
            return tf.image.extract_patches(images, sizes=[1, 2, 2, 1], strides=[1, 2, 2, 1], rates=[1, 1, 1, 1],
                                            padding="VALID")

    inp = keras.Input((8, 8, 3), name="image")
    x = Patches(name="patches")(inp)
    return keras.Model(inp, keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed=0),
                                                 name="embed")(x))


@needs_converter
def test_extract_patches_is_our_error_naming_layer_and_op_and_select_tf_ops_lets_it_in(tmp_path):
    model = _patches_model()
    with pytest.raises(FlexOpError, match="ExtractImagePatches") as info:
        export_tflite(model, tmp_path / "vit.tflite")
    text = str(info.value)
    assert "'patches'" in text and "select_tf_ops=True" in text and "Flex delegate" in text
    assert not (tmp_path / "vit.tflite").exists()

    with pytest.warns(UserWarning, match="Flex delegate"):
        result = export_tflite(model, tmp_path / "vit.tflite", select_tf_ops=True, verify=False)
    assert result.flex_ops == ["FlexExtractImagePatches"] and "FlexExtractImagePatches" in op_names(result.content)
    assert "Flex delegate" in result.summary() and (tmp_path / "vit.tflite").exists()
    # This LiteRT interpreter has no Flex delegate: verification says so, and how to export anyway.
    with pytest.raises(LiteRTRuntimeError, match="verify=False"), pytest.warns(UserWarning, match="Flex"):
        export_tflite(model, select_tf_ops=True)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend")
def test_select_tf_ops_is_refused_where_litert_torch_converts():
    with pytest.raises(InvalidArgumentError, match="Received: select_tf_ops=True"):
        export_tflite(_dense_model(), select_tf_ops=True)


def test_a_converter_failure_that_is_not_an_op_is_our_conversion_error():
    from keras_rebuild.export.flatbuffer import converter_error

    message = ('loc(callsite("model/blocks/mixer/MatMul@__inference_wrapped_model_12"("x.py":3:1))): '
               "error: 'tfl.batch_matmul' op operand #0 must be tensor of float values\n"
               "<unknown>:0: error: failed to legalize something")
    error = converter_error(message, ["blocks", "head"])
    assert isinstance(error, ConversionError) and isinstance(error, ValueError)
    assert str(error).startswith("Expected the TFLite converter to convert the model. Received: 'tfl.batch_matmul'")
    assert "layer(s) 'blocks'" in str(error)


# --------------------------------------------------------------------------
# 12. Tolerances: cancellation, stochastic layers
# --------------------------------------------------------------------------


def _siamese():
    """A Siamese distance head: the distance of two large embeddings is small."""
    tower_in = keras.Input((32,), name="tower_in")
    h = keras.layers.Dense(64, activation="relu", name="t1",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=3.0, seed=1))(tower_in)
    h = keras.layers.Dense(16, name="t2", kernel_initializer=keras.initializers.RandomNormal(stddev=3.0, seed=2))(h)
    tower = keras.Model(tower_in, h, name="tower")
    a, b = keras.Input((32,), name="a"), keras.Input((32,), name="b")
    diff = keras.layers.Subtract(name="diff")([tower(a), tower(b)])
    square = keras.layers.Multiply(name="square")([diff, diff])
    dist = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", trainable=False, name="distance")(square)
    return keras.Model([a, b], dist, name="siamese")


@pytest.mark.skipif(BACKEND == "jax", reason="the same verification code as on every backend; six conversions")
def test_tolerance_is_relative_to_the_cancellation_inside_the_model(monkeypatch):
    from keras_rebuild.data import digits_cnn

    model = _siamese()
    xa = _normal((16, 32), seed=1)
    xb = xa + np.float32(1e-5) * np.arange(1, 17, dtype="float32")[:, None] * _normal((16, 32), seed=2)
    v = export_tflite(model, sample_inputs=[xa, xb]).verification
    eps = export_mod.ROUNDOFF_PERTURBATION
    # Distances of large embeddings amplify round-off a hundredfold and more; a CNN's class scores do not.
    assert v.passed and not v.vacuous and v.roundoff > 100 * eps * v.output_scale, v
    assert "round-off" in str(v) and v.per_output[0]["tolerance"] > 20 * v.per_output[0]["roundoff"]
    cnn = export_tflite(digits_cnn(width=4, flavour=FLAVOUR)).verification
    assert cnn.passed and cnn.roundoff < 100 * eps * cnn.output_scale, cnn

    # A difference twenty times the former tolerance (atol + rtol * scale), of the size of the round-off:
    real = export_mod._keras_outputs
    former = v.atol + v.rtol * v.output_scale
    monkeypatch.setattr(export_mod, "_keras_outputs", lambda m, xs: [o + np.float32(20 * former) for o in real(m, xs)])
    # ... passes ...
    assert export_tflite(model, sample_inputs=[xa, xb]).verification.passed
    # ... though not by the output's own scale alone (ctol=0, the former rule) ...
    with pytest.raises(VerificationError, match="ctol=0"):
        export_tflite(model, sample_inputs=[xa, xb], ctol=0)
    # ... and a real error stays an error.
    monkeypatch.setattr(export_mod, "_keras_outputs", lambda m, xs: [o + np.float32(0.05) for o in real(m, xs)])
    with pytest.raises(VerificationError, match="max abs error 0.05"):
        export_tflite(model, sample_inputs=[xa, xb])


def test_ctol_must_be_non_negative():
    with pytest.raises(InvalidArgumentError, match="Received: ctol=-1"):
        export_tflite(_dense_model(), ctol=-1)


class Sampling(keras.layers.Layer):
    """The VAE's reparameterisation, as in the keras-io example: random normal noise in ``call``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if FLAVOUR == "keras3":
            self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        mean, log_var = inputs
        if FLAVOUR == "keras3":
            noise = keras.random.normal(keras.ops.shape(mean), seed=self.seed_generator)
            return mean + keras.ops.exp(0.5 * log_var) * noise
        import tensorflow as tf

        return mean + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mean))


def _vae():
    init = keras.initializers.GlorotUniform(seed=0)
    inp = keras.Input((6,), name="x")
    mean = keras.layers.Dense(2, kernel_initializer=init, name="z_mean")(inp)
    log_var = keras.layers.Dense(2, kernel_initializer=init, name="z_log_var")(inp)
    z = Sampling(name="sampling")([mean, log_var])
    return keras.Model(inp, keras.layers.Dense(3, kernel_initializer=init, name="decoder")(z), name="vae")


def test_a_stochastic_layer_is_detected_and_named_before_converting(monkeypatch):
    calls = []
    monkeypatch.setattr(export_mod, "_float32_file", lambda *a, **k: calls.append(a))
    with pytest.raises(StochasticModelError, match="between two identical calls") as info:
        export_tflite(_vae())
    text = str(info.value)
    assert "layer 'sampling'" in text and "verify=False" in text and "'decoder'" in text
    assert isinstance(info.value, VerificationError) and calls == []  # nothing was converted


def test_a_deterministic_model_is_not_taken_for_a_stochastic_one():
    inp = keras.Input((6,), name="x")
    x = keras.layers.Dropout(0.5, name="dropout")(keras.layers.Dense(8, name="d")(inp))  # off at inference
    x = keras.layers.GaussianNoise(1.0, name="noise")(x)
    result = export_tflite(keras.Model(inp, keras.layers.Dense(2, name="out")(x)))
    assert result.verification.passed


# --------------------------------------------------------------------------
# 13. Unknown sizes
# --------------------------------------------------------------------------


def _unet():
    init = keras.initializers.GlorotUniform(seed=0)
    inp = keras.Input((None, None, 3), name="image")
    d = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer=init, name="down")(inp)
    x = keras.layers.MaxPooling2D(name="pool")(d)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", kernel_initializer=init, name="mid")(x)
    x = keras.layers.UpSampling2D(name="up")(x)
    x = keras.layers.Concatenate(name="skip")([x, d])
    return keras.Model(inp, keras.layers.Conv2D(3, 1, kernel_initializer=init, name="out")(x), name="unet")


def test_unknown_sizes_come_from_sample_inputs():
    model = _unet()
    result = export_tflite(model, sample_inputs=_normal((3, 16, 12, 3)))
    assert result.inputs[0]["shape"][1:] == (16, 12, 3) and result.outputs[0]["shape"][1:] == (16, 12, 3)
    assert result.verification.passed and result.verification.num_samples == 3


@pytest.mark.skipif(BACKEND == "jax", reason="the same subprocess path as the sample_inputs test; time")
def test_unknown_sizes_come_from_representative_data_and_must_agree_with_sample_inputs():
    model = _unet()
    result = export_tflite(model, representative_data=_normal((4, 8, 8, 3)))
    assert result.inputs[0]["shape"][1:] == (8, 8, 3) and result.verification.passed
    with pytest.raises(InvalidArgumentError, match="representative_data.*size \\(16, 16, 3\\).*Received"):
        export_tflite(model, sample_inputs=_normal((2, 16, 16, 3)), representative_data=_normal((4, 8, 8, 3)))


def test_unknown_sizes_without_data_name_the_options():
    with pytest.raises(InvalidArgumentError, match="Expected `sample_inputs` \\(or `representative_data`\\)") as info:
        export_tflite(_unet(), verify=False)
    assert "'image' (None, None, 3)" in str(info.value) and "Received: sample_inputs=None" in str(info.value)
