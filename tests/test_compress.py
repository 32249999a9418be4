"""compress(): iterative prune-and-recover to a target, on the flavour and backend under test.

The recovery acceptance on digits (60% of channels, within one point at half
the parameters) lives in tests/test_recover_keras3.py, which runs in every
process.
"""
import os

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.testing import flavour_keras, weights_digest

keras = flavour_keras()
FLAVOUR = os.environ.get("KERAS_REBUILD_FLAVOUR", "keras3")


@pytest.fixture(scope="module")
def digits():
    return kr.load_digits()


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = kr.digits_cnn(flavour=FLAVOUR)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=128, verbose=0)
    return model


def test_compress_reaches_a_macs_target_without_touching_the_model(digits, trained):
    (x, y), test = digits
    before = weights_digest(trained)
    small, report = kr.compress(trained, 0.4, x, y, validation_data=test, step=0.3,
                                batch_size=64, verbose=0)
    assert weights_digest(trained) == before
    assert small is not trained
    assert report.reached and report.steps[-1].ratio <= 0.4
    assert kr.analyze(small).graph.model is small
    ratios = [s.ratio for s in report.steps]
    assert ratios == sorted(ratios, reverse=True)
    assert report.steps[-1].val_metrics["accuracy"] > 0.9
    assert "target macs ratio 0.400: reached" in str(report)
    # the final step does not overshoot far past the target (its sparsity was solved for)
    assert report.steps[-1].ratio > 0.25
    # the small model is compiled like the original and trains on
    assert set(small.evaluate(*test, verbose=0, return_dict=True)) == {"loss", "accuracy"}


def test_compress_params_target(digits, trained):
    (x, y), _ = digits
    small, report = kr.compress(trained, 0.5, x[:256], y[:256], metric="params", step=0.5,
                                batch_size=64, verbose=0)
    assert small.count_params() <= 0.5 * trained.count_params()
    assert report.metric == "params" and report.reached


def test_compress_latency_target(trained, monkeypatch):
    """metric="latency" on every backend: each model exported and run by the LiteRT interpreter.

    No assertion on the times themselves (they depend on the machine): the
    benchmarked files are the original and then the smaller model, and the
    report's ratios are the measured latencies' ratios.
    """
    import keras_rebuild.export as export

    benchmarked = []
    real_benchmark = export.benchmark_tflite

    def spy(content, **kwargs):
        benchmarked.append(len(content))
        return real_benchmark(content, **kwargs)

    monkeypatch.setattr(export, "benchmark_tflite", spy)
    before = weights_digest(trained)
    small, report = kr.compress(trained, 0.9, None, metric="latency", step=0.5, max_steps=1, verbose=0)
    assert weights_digest(trained) == before and small is not trained
    assert report.metric == "latency" and len(report.steps) == 1
    assert report.latency_before_ms > 0 and report.steps[0].latency_ms > 0
    assert report.steps[0].ratio == pytest.approx(report.steps[0].latency_ms / report.latency_before_ms)
    assert small.count_params() < 0.5 * trained.count_params()
    # two LiteRT files benchmarked: the original, then the rebuilt model (a smaller file)
    assert len(benchmarked) == 2 and benchmarked[1] < 0.5 * benchmarked[0]
    assert "latency ratio" in str(report)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.5), "target"),
    (dict(target=0.5, metric="flops"), "metric"),
    (dict(target=0.5, step=0.0), "step"),
    (dict(target=0.5, max_steps=0), "max_steps"),
    (dict(target=0.5, max_steps=-1), "max_steps"),
    (dict(target=0.5, recover_epochs=0), "recover_epochs"),
])
def test_compress_rejects_bad_arguments(trained, kwargs, match):
    with pytest.raises(kr.errors.InvalidArgumentError, match=f"{match}.*Received"):
        kr.compress(trained, **kwargs)


def test_compress_never_returns_the_callers_model(trained):
    """max_steps=0 used to hand back the caller's own model object (issue 12, item 10)."""
    with pytest.raises(kr.errors.InvalidArgumentError, match=r"Expected `max_steps` to be a positive integer.*"
                                                              r"Received: max_steps=0"):
        kr.compress(trained, 0.5, max_steps=0)
    with pytest.raises(kr.errors.InvalidArgumentTypeError, match="Received: max_steps=2.5"):
        kr.compress(trained, 0.5, max_steps=2.5)
    small, _ = kr.compress(trained, 0.9, None, metric="params", step=0.05, max_steps=1, verbose=0)
    assert small is not trained


def test_compress_needs_a_compiled_model():
    with pytest.raises(kr.errors.InvalidArgumentError, match="compile"):
        kr.compress(kr.digits_cnn(flavour=FLAVOUR), 0.5, np.zeros((4, 8, 8, 1)), np.zeros(4))
