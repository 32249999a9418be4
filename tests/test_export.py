"""Tests of keras_rebuild.export: TFLite conversion, LiteRT verification, benchmarks."""
import os
import sys
import types

import numpy as np
import pytest
from tests.conftest import assert_models_close, predict, random_inputs, weights_digest

from keras_rebuild import export as export_mod
from keras_rebuild._compat import keras, tfmot
from keras_rebuild.data import digits_cnn, load_digits
from keras_rebuild.errors import (
    InvalidArgumentError,
    NotAModelError,
    OutputExistsError,
    VerificationError,
)
from keras_rebuild.export import (
    BenchmarkResult,
    ExportResult,
    benchmark_tflite,
    compare_latency,
    export_tflite,
    run_tflite,
)


def small_conv(seed=0):
    init = keras.initializers.GlorotUniform(seed=seed)
    inp = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", kernel_initializer=init, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depthwise_initializer=init, name="dw")(x)
    x = keras.layers.Conv2D(16, 1, kernel_initializer=init, name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(5, kernel_initializer=init, name="logits")(x)
    return keras.Model(inp, out, name="small_conv")


def multi_io(seed=0):
    """Inputs/outputs named so that alphabetical order differs from Keras order.

    Two outputs share a shape, so they can only be told apart by name.
    """
    init = keras.initializers.GlorotUniform(seed=seed)
    zeta = keras.Input((6, 6, 2), name="zeta")
    alpha = keras.Input((7,), name="alpha")
    a = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, kernel_initializer=init)(zeta))
    b = keras.layers.Dense(9, activation="tanh", kernel_initializer=init)(alpha)
    h = keras.layers.Concatenate()([a, b])
    y_probs = keras.layers.Dense(4, activation="softmax", kernel_initializer=init, name="y_probs")(h)
    b_reg = keras.layers.Dense(4, kernel_initializer=init, name="b_reg")(h)
    m_vec = keras.layers.Dense(3, kernel_initializer=init, name="m_vec")(h)
    return keras.Model([zeta, alpha], [y_probs, b_reg, m_vec], name="multi_io")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained_digits(digits):
    """A digits CNN trained briefly (about 98% test accuracy)."""
    keras.utils.set_random_seed(1234)
    (x, y), _ = digits
    model = digits_cnn(width=16, seed=0)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def digits_exports(trained_digits, digits):
    (x, _), _ = digits
    return {
        q: export_tflite(trained_digits, quantize=q, representative_data=x[:200] if q == "int8" else None)
        for q in ("float32", "float16", "dynamic", "int8")
    }


# --------------------------------------------------------------------------
# float32 correctness
# --------------------------------------------------------------------------


def test_float32_matches_keras_on_small_conv():
    model = small_conv()
    result = export_tflite(model)
    assert isinstance(result, ExportResult)
    assert result.path is None and result.quantize == "float32"
    assert result.size_bytes == len(result.content) > 0
    assert 0 < result.gzipped_size_bytes < result.size_bytes
    v = result.verification
    assert v.passed and v.num_samples == 32
    assert v.max_abs_error < 1e-4 * max(1.0, v.output_scale)
    assert v.top1_agreement == 1.0
    x = random_inputs(model, batch=6, seed=3)
    np.testing.assert_allclose(run_tflite(result, x, model=model)[0], predict(model, x)[0], atol=1e-5, rtol=1e-4)


def test_float32_matches_keras_on_multi_input_multi_output():
    model = multi_io()
    result = export_tflite(model)
    assert result.verification.passed
    assert len(result.verification.per_output) == 3
    assert [p["name"] for p in result.verification.per_output] == ["y_probs", "b_reg", "m_vec"]
    x = random_inputs(model, batch=5, seed=7)
    got = run_tflite(result.content, x, model=model)
    want = predict(model, x)
    assert [g.shape for g in got] == [(5, 4), (5, 4), (5, 3)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    # Dict inputs keyed by input name work the same.
    got_dict = run_tflite(result.content, {"alpha": x[1], "zeta": x[0]}, model=model)
    for g, w in zip(got_dict, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_int8_multi_input_calibrates_each_input_by_name():
    model = multi_io()
    rng = np.random.default_rng(0)
    rep = [rng.normal(size=(64, 6, 6, 2)).astype("float32"), rng.normal(size=(64, 7)).astype("float32")]
    result = export_tflite(model, quantize="int8", representative_data=rep)
    v = result.verification
    assert v.passed
    # Calibration swapped between inputs would blow these errors up.
    assert v.per_output[0]["max_abs_error"] < 0.1
    assert v.top1_agreement >= 0.8


# --------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------


def test_quantized_files_are_smaller(digits_exports):
    f32 = digits_exports["float32"].size_bytes
    assert digits_exports["float16"].size_bytes < 0.7 * f32
    assert digits_exports["dynamic"].size_bytes < 0.5 * f32
    assert digits_exports["int8"].size_bytes < 0.5 * f32
    for q, result in digits_exports.items():
        assert result.quantize == q
        assert result.verification.passed, str(result)
        assert result.verification.top1_agreement is not None


def test_int8_keeps_digits_accuracy(trained_digits, digits_exports, digits):
    _, (xt, yt) = digits
    keras_acc = float(np.mean(np.argmax(predict(trained_digits, xt)[0], axis=1) == yt))
    tfl_acc = float(np.mean(np.argmax(run_tflite(digits_exports["int8"], xt, model=trained_digits)[0], axis=1) == yt))
    assert keras_acc > 0.9  # the float model really learned
    assert abs(tfl_acc - keras_acc) <= 0.015, (keras_acc, tfl_acc)
    v = digits_exports["int8"].verification
    assert v.mean_abs_error < 0.01 and v.top1_agreement >= 0.95


def test_int8_io_makes_tensors_int8(trained_digits, digits):
    from ai_edge_litert.interpreter import Interpreter

    (x, _), (xt, yt) = digits
    result = export_tflite(
        trained_digits, quantize="int8", int8_io=True, representative_data=x[:100], sample_inputs=xt[:64]
    )
    interp = Interpreter(model_content=result.content)
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    assert interp.get_input_details()[0]["quantization"][0] > 0
    assert result.int8_io and result.verification.passed
    assert result.verification.num_samples == 64
    assert result.verification.top1_agreement >= 0.95
    # run_tflite quantizes float inputs and dequantizes outputs transparently.
    probs = run_tflite(result, xt[:64], model=trained_digits)[0]
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.05)


def test_int8_accepts_dataset_of_x_y_batches():
    from keras_rebuild._compat import tf

    model = small_conv()
    ds = tf.data.Dataset.from_tensor_slices((np.random.default_rng(0).normal(size=(40, 12, 12, 3)).astype("float32"),
                                             np.zeros(40))).batch(8)
    result = export_tflite(
        model, quantize="int8", representative_data=ds, num_calibration_samples=24, num_verify_samples=16
    )
    # Verified on the first representative samples (labels dropped).
    assert result.verification.passed and result.verification.num_samples == 16


def test_int8_without_representative_data_raises():
    with pytest.raises(InvalidArgumentError, match="representative_data"):
        export_tflite(small_conv(), quantize="int8")


def test_int8_io_requires_int8():
    with pytest.raises(InvalidArgumentError, match="int8_io"):
        export_tflite(small_conv(), quantize="dynamic", int8_io=True)


@pytest.mark.parametrize("bad", ["int4", "FP16", 8])
def test_bad_quantize_value_raises(bad):
    with pytest.raises(InvalidArgumentError, match="Received: quantize=") as info:
        export_tflite(small_conv(), quantize=bad)
    assert "Expected `quantize` to be one of" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_not_a_model_raises():
    with pytest.raises(NotAModelError, match="Received: model="):
        export_tflite("model.h5")


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def test_writes_file_atomically_and_refuses_to_overwrite(tmp_path):
    model = small_conv()
    path = tmp_path / "out" / "model.tflite"
    result = export_tflite(model, path)
    assert result.path == str(path)
    data = path.read_bytes()
    assert result.size_bytes == len(data) and result.content == data
    assert os.listdir(path.parent) == ["model.tflite"]  # no temp file left behind

    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export_tflite(small_conv(seed=1), path)
    assert path.read_bytes() == data  # untouched

    replaced = export_tflite(small_conv(seed=1), path, overwrite=True)
    assert path.read_bytes() == replaced.content != data
    assert os.listdir(path.parent) == ["model.tflite"]


def test_input_model_is_not_modified(digits):
    (x, _), _ = digits
    model = digits_cnn(width=8)
    before = weights_digest(model)
    export_tflite(model, quantize="int8", representative_data=x[:50])
    assert weights_digest(model) == before


# --------------------------------------------------------------------------
# Pruning wrappers
# --------------------------------------------------------------------------


def test_tfmot_pruned_model_is_stripped_and_exports():
    sparsity = tfmot().sparsity.keras
    base = small_conv()
    pruned = sparsity.prune_low_magnitude(
        base, pruning_schedule=sparsity.ConstantSparsity(0.5, begin_step=0, frequency=1)
    )
    pruned.compile(keras.optimizers.SGD(0.0), "mse")
    x = random_inputs(base, batch=8)
    pruned.fit(x, np.zeros((8, 5)), epochs=1, verbose=0, callbacks=[sparsity.UpdatePruningStep()])
    before = weights_digest(pruned)

    result = export_tflite(pruned)
    assert result.verification.passed
    assert weights_digest(pruned) == before  # wrappers still in the input model
    assert any(type(layer).__name__ == "PruneLowMagnitude" for layer in pruned.layers)
    stripped = sparsity.strip_pruning(pruned)
    kernel = stripped.get_layer("pw").kernel.numpy()
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.02)
    np.testing.assert_allclose(run_tflite(result, x, model=pruned)[0], predict(stripped, x)[0], atol=1e-5, rtol=1e-4)


def test_structured_pruning_wrappers_are_rebuilt_first(monkeypatch):
    """The hook calls keras_rebuild.rebuild when the model holds StructuredPruningWrapper layers."""
    import keras_rebuild

    class StructuredPruningWrapper(keras.layers.Layer):
        def call(self, inputs):
            return inputs

    fake = types.ModuleType("keras_rebuild.wrappers")
    fake.StructuredPruningWrapper = StructuredPruningWrapper
    monkeypatch.setitem(sys.modules, "keras_rebuild.wrappers", fake)
    monkeypatch.setattr(keras_rebuild, "wrappers", fake, raising=False)
    plain = small_conv()
    inp = keras.Input((12, 12, 3), name="image")
    wrapped = keras.Model(inp, StructuredPruningWrapper(name="spw")(plain(inp)))
    calls = []

    def fake_rebuild(model):
        calls.append(model)
        return plain

    monkeypatch.setattr(keras_rebuild, "rebuild", fake_rebuild, raising=False)
    result = export_tflite(wrapped)
    assert calls == [wrapped]
    assert result.verification.passed
    x = random_inputs(plain)
    np.testing.assert_allclose(run_tflite(result, x, model=plain)[0], predict(plain, x)[0], atol=1e-5, rtol=1e-4)


def test_real_structured_pruning_model_exports_smaller_and_matches():
    import keras_rebuild

    if not hasattr(keras_rebuild, "prune_channels"):
        pytest.skip("keras_rebuild.prune_channels is not available")
    dense = digits_cnn(width=16)
    wrapped = keras_rebuild.prune_channels(dense, sparsity=0.5)
    before = weights_digest(wrapped)
    result = export_tflite(wrapped)  # verified against the wrapped model itself
    assert result.verification.passed and result.verification.max_abs_error < 1e-5
    assert result.size_bytes < 0.6 * export_tflite(dense, verify=False).size_bytes
    assert weights_digest(wrapped) == before


def test_prepare_model_without_wrappers_module_is_identity(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_rebuild.wrappers", None)  # import raises ImportError
    import keras_rebuild

    monkeypatch.delattr(keras_rebuild, "wrappers", raising=False)
    model = small_conv()
    assert export_mod._prepare_model(model) is model


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def test_verification_error_when_outputs_differ(monkeypatch, tmp_path):
    real = export_mod._keras_outputs
    monkeypatch.setattr(export_mod, "_keras_outputs", lambda m, xs: [o + 0.01 for o in real(m, xs)])
    path = tmp_path / "m.tflite"
    with pytest.raises(VerificationError, match="max abs error") as info:
        export_tflite(small_conv(), path)
    assert "0.01" in str(info.value)
    assert not path.exists() and os.listdir(tmp_path) == []  # nothing written
    # The same difference passes a looser, explicit tolerance ...
    assert export_tflite(small_conv(), atol=0.02).verification.passed
    # ... and verify=False skips the comparison.
    assert export_tflite(small_conv(), verify=False).verification is None


def test_min_top1_is_enforced_when_given(monkeypatch):
    real = export_mod._keras_outputs
    # Reverse the class order of the reference: arg-max disagrees although values stay close in scale.
    monkeypatch.setattr(export_mod, "_keras_outputs", lambda m, xs: [o[:, ::-1] for o in real(m, xs)])
    with pytest.raises(VerificationError, match="top-1 agreement"):
        export_tflite(small_conv(), atol=100.0, min_top1=0.9)
    assert export_tflite(small_conv(), atol=100.0).verification.top1_agreement < 0.9


def test_verification_uses_sample_inputs():
    model = small_conv()
    x = random_inputs(model, batch=3, seed=5)
    result = export_tflite(model, sample_inputs=x)
    assert result.verification.num_samples == 3
    assert "passed" in str(result) and "float32" in result.summary()


# --------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------


def test_benchmark_returns_positive_latencies_and_honours_num_threads(monkeypatch, tmp_path):
    result = export_tflite(small_conv(), tmp_path / "m.tflite")
    seen = []
    real = export_mod._make_interpreter

    def spy(content, num_threads=1):
        seen.append(num_threads)
        return real(content, num_threads=num_threads)

    monkeypatch.setattr(export_mod, "_make_interpreter", spy)
    bench = benchmark_tflite(result.path, num_threads=2, runs=10, warmup=2)
    assert isinstance(bench, BenchmarkResult)
    assert seen == [2] and bench.num_threads == 2
    assert len(bench.times_ms) == 10 and all(t > 0 for t in bench.times_ms)
    assert 0 < bench.min_ms <= bench.median_ms <= bench.p90_ms
    assert bench.mean_ms > 0
    assert bench.size_bytes == result.size_bytes
    # Either an approximate RSS figure, or said plainly that it was not measured (never "~0 B").
    if bench.memory_bytes is None:
        assert bench.memory_method.startswith("not measured") and "not measured" in str(bench)
    else:
        assert "approximate" in bench.memory_method and bench.memory_bytes >= 1 << 20
    assert "median" in str(bench)
    with pytest.raises(InvalidArgumentError, match="Received: num_threads=0"):
        benchmark_tflite(result.path, num_threads=0)


def test_latency_of_a_model_reading_token_ids_runs_on_valid_ids():
    inp = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(5, 4)(inp)  # ids 0..4: a random int32 would read out of bounds
    content = export_tflite(keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(x))), verify=False).content
    assert benchmark_tflite(content, runs=2, warmup=1).median_ms > 0
    assert compare_latency({"a": content, "b": content}, runs=2, rounds=1).ratios["a"] == 1.0


def test_compare_latency_of_model_against_itself_is_near_one():
    content = export_tflite(small_conv(), verify=False).content
    cmp = compare_latency({"a": content, "b": content}, runs=20, rounds=5)
    assert list(cmp.medians_ms) == ["a", "b"]
    assert cmp.ratios["a"] == 1.0
    assert 0.5 < cmp.ratios["b"] < 2.0  # loose: timing noise on shared CI machines
    assert all(len(t) == 100 for t in cmp.times_ms.values())
    with pytest.raises(InvalidArgumentError):
        compare_latency({})
