"""LiteRT export of the flavour and backend under test: float32 per backend, int8 through the LiteRT Quantizer.

Runs in every test process: tf_keras, and Keras 3 on TensorFlow, JAX and torch.
Each backend has its own conversion path (TFLite converter; a TensorFlow-backend
subprocess for JAX; litert-torch for torch) and every file is verified against
the Keras model in the LiteRT interpreter.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild import export as export_mod
from keras_rebuild.data import digits_cnn, load_digits
from keras_rebuild.errors import InvalidArgumentError
from keras_rebuild.export import ExportResult, export_tflite, run_tflite
from keras_rebuild.export.flatbuffer import FlexOpError, check_builtin_only, op_names
from keras_rebuild.testing import flavour_keras

FLAVOUR = os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras")
keras = flavour_keras(FLAVOUR)
BACKEND = "tf_keras" if FLAVOUR == "tf_keras" else keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x)) if FLAVOUR == "keras3" else np.asarray(x)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def rebuilt(digits):
    """A digits CNN trained briefly, with half its channels removed by kr.rebuild, then fine-tuned."""
    keras.utils.set_random_seed(7)
    (x, y), _ = digits
    model = digits_cnn(width=8, seed=0, flavour=FLAVOUR)
    model.compile(keras.optimizers.Adam(5e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    small = kr.rebuild(model, plan=kr.select_channels(model, sparsity=0.5))
    assert small.count_params() < model.count_params()
    small.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    small.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return small


def _accuracy(probs, y):
    return float(np.mean(np.argmax(probs, axis=1) == y))


def test_rebuilt_digits_cnn_float32_matches_keras(rebuilt, digits):
    _, (xt, _) = digits
    result = export_tflite(rebuilt, sample_inputs=xt[:16])
    assert isinstance(result, ExportResult) and result.quantize == "float32"
    expected = {"tf_keras": "tflite-converter", "tensorflow": "tflite-converter", "torch": "litert-torch",
                "jax": "tflite-converter (subprocess, tensorflow backend)"}[BACKEND]
    assert result.converter == expected
    v = result.verification
    assert v.passed and v.num_samples == 16 and v.max_abs_error < 1e-5 and v.top1_agreement == 1.0
    got = run_tflite(result, xt[:40], model=rebuilt)[0]
    np.testing.assert_allclose(got, _numpy(rebuilt(xt[:40], training=False)), atol=1e-5)


def test_int8_through_the_quantizer_keeps_accuracy(rebuilt, digits):
    (x, _), (xt, yt) = digits
    result = export_tflite(rebuilt, quantize="int8", representative_data=x[:200])
    assert result.int8_backend == "quantizer" and result.fallback_reason is None
    assert result.verification.passed and result.verification.top1_agreement >= 0.9
    q = result.quantizer_validation
    assert q is not None and q.num_tensors > 0 and q.outputs and q.worst_layers
    assert all(np.isfinite(v) for v in q.outputs.values())
    assert "quantizer validation" in result.summary()
    # float I/O by default: the file takes and returns float32
    assert [t["dtype"] for t in result.inputs + result.outputs] == ["float32", "float32"]
    assert "QUANTIZE" in op_names(result.content) and "DEQUANTIZE" in op_names(result.content)
    keras_acc = _accuracy(_numpy(rebuilt(xt, training=False)), yt)
    int8_acc = _accuracy(run_tflite(result, xt, model=rebuilt)[0], yt)
    assert keras_acc > 0.8, keras_acc  # the float model learned
    assert abs(int8_acc - keras_acc) <= 0.015, (keras_acc, int8_acc)
    assert result.size_bytes < export_tflite(rebuilt, verify=False).size_bytes


def test_int8_io_through_the_quantizer(rebuilt, digits):
    (x, _), (xt, _) = digits
    result = export_tflite(rebuilt, quantize="int8", int8_io=True, representative_data=x[:100],
                           sample_inputs=xt[:16])
    assert result.int8_backend == "quantizer" and result.int8_io
    assert result.inputs[0]["dtype"] == "int8" and result.outputs[0]["dtype"] == "int8"
    assert result.inputs[0]["scale"] > 0 and result.verification.passed


@pytest.mark.skipif(BACKEND in ("jax", "torch"), reason="same subprocess converter path as the fallback test; time")
def test_converter_int8_is_an_option(rebuilt, digits):
    (x, _), _ = digits
    result = export_tflite(rebuilt, quantize="int8", representative_data=x[:100], int8_backend="converter")
    assert result.int8_backend == "converter" and result.quantizer_validation is None
    assert result.verification.passed


def test_quantizer_failure_falls_back_to_the_converter(rebuilt, digits, monkeypatch, caplog):
    from keras_rebuild.export import quantize as quantize_mod

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op for the test")

    monkeypatch.setattr(quantize_mod, "quantize", broken)
    (x, _), _ = digits
    result = export_tflite(rebuilt, quantize="int8", representative_data=x[:100])
    assert result.int8_backend == "converter"
    assert "unsupported op for the test" in result.fallback_reason
    assert result.verification.passed
    assert "fallback" in result.summary()


def test_unknown_int8_backend_raises(rebuilt):
    with pytest.raises(InvalidArgumentError, match="Received: int8_backend="):
        export_tflite(rebuilt, quantize="int8", representative_data=np.zeros((4, 8, 8, 1)), int8_backend="tfmot")


def test_dynamic_range_export_is_verified(rebuilt, digits):
    (x, _), _ = digits
    result = export_tflite(rebuilt, quantize="dynamic", representative_data=x[:32])
    assert result.verification.passed
    assert result.int8_backend == ("quantizer" if BACKEND == "torch" else "converter")


FLEX_SCRIPT = textwrap.dedent("""
    import sys
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def f(x):
        with tf.name_scope("cumulative_layer"):
            return tf.math.cumprod(x, axis=1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    open(sys.argv[1], "wb").write(converter.convert())
""")


def test_flex_op_in_a_file_is_an_error_naming_op_and_layer(tmp_path):
    path = tmp_path / "flex.tflite"
    subprocess.run([sys.executable, "-c", FLEX_SCRIPT, str(path)], check=True, capture_output=True, timeout=300)
    content = path.read_bytes()
    assert "FlexCumprod" in op_names(content)
    with pytest.raises(FlexOpError, match="FlexCumprod") as info:
        check_builtin_only(content, ["dense", "cumulative_layer"])
    assert "'cumulative_layer'" in str(info.value) and "'dense'" not in str(info.value)
    assert isinstance(info.value, ValueError) and "Expected" in str(info.value)


@pytest.mark.skipif(BACKEND not in ("tf_keras", "tensorflow"), reason="a Lambda layer converts in this process only")
def test_model_with_a_tensorflow_only_op_raises_flex_error():
    import tensorflow as tf

    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, name="dense")(inp)
    out = keras.layers.Lambda(lambda t: tf.math.cumprod(t, axis=1), name="cumulative")(h)
    model = keras.Model(inp, out)
    with pytest.raises(FlexOpError, match="Cumprod") as info:
        export_tflite(model)
    assert "'cumulative'" in str(info.value)


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND != "torch", reason="the torch path")
def test_torch_export_loads_no_tensorflow():
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from keras_rebuild.data import digits_cnn
        from keras_rebuild.export import export_tflite
        model = digits_cnn(width=4, flavour="keras3")
        rep = np.random.default_rng(0).random((40, 8, 8, 1)).astype("float32")
        results = [export_tflite(model), export_tflite(model, quantize="int8", representative_data=rep)]
        print(json.dumps({"converters": [r.converter for r in results], "int8": results[1].int8_backend,
                          "tf": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras"))}))
    """)
    env = dict(os.environ, KERAS_BACKEND="torch")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert report == {"converters": ["litert-torch", "litert-torch"], "int8": "quantizer", "tf": []}


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND != "jax", reason="the JAX path")
def test_jax_model_is_converted_in_a_subprocess_and_verified_here(monkeypatch):
    calls = []
    real = export_mod._keras_outputs

    def spy(model, xs):
        calls.append(type(model).__module__)
        return real(model, xs)

    monkeypatch.setattr(export_mod, "_keras_outputs", spy)
    model = digits_cnn(width=4, flavour="keras3")
    result = export_tflite(model)
    assert "subprocess" in result.converter and result.verification.passed
    assert calls and all(m.startswith("keras") for m in calls)  # the JAX model itself is the reference


def test_verification_says_it_is_vacuous_when_the_keras_outputs_do_not_vary(tmp_path):
    import keras_rebuild as kr
    from keras_rebuild.testing import flavour_keras

    k = flavour_keras()
    inp = k.Input((8, 8, 3))
    x = k.layers.Conv2D(4, 3, padding="same", kernel_initializer="zeros", bias_initializer="ones")(inp)
    constant = k.Model(inp, k.layers.Dense(3)(k.layers.GlobalAveragePooling2D()(x)))
    result = kr.export_tflite(constant, tmp_path / "constant.tflite")
    assert result.verification.vacuous and "vacuous" in str(result.verification)

    varied = kr.digits_cnn(width=4, flavour=os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras"))
    result = kr.export_tflite(varied, tmp_path / "varied.tflite")
    assert not result.verification.vacuous and "passed" in str(result.verification)


def test_benchmark_says_memory_was_not_measured_instead_of_about_zero_bytes():
    import keras_rebuild as kr

    small = kr.digits_cnn(width=4, flavour=os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras"))
    result = kr.benchmark_tflite(kr.export_tflite(small).content, runs=3, warmup=1)
    text = str(result)
    assert "~0 B" not in text
    assert (result.memory_bytes is None and "not measured" in text) or result.memory_bytes >= 1 << 20


def test_int8_export_takes_x_from_x_y_representative_data():
    import numpy as np

    import keras_rebuild as kr

    (x, y), _ = kr.load_digits()
    model = kr.digits_cnn(width=4, flavour=os.environ.get("KERAS_REBUILD_FLAVOUR", "tf_keras"))
    with_pair = kr.export_tflite(model, quantize="int8", representative_data=(x[:40], y[:40]))
    with_x = kr.export_tflite(model, quantize="int8", representative_data=x[:40])
    assert with_pair.verification.passed and with_x.verification.passed
    # The same calibration data gives the same quantisation parameters, hence outputs.
    sample = x[:8]
    np.testing.assert_array_equal(kr.run_tflite(with_pair.content, sample)[0], kr.run_tflite(with_x.content, sample)[0])
