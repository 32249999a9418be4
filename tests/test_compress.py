"""compress(): iterative prune-and-recover to a target; and the recovery acceptance on digits."""
import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild._compat import keras
from tests.conftest import weights_digest


@pytest.fixture(scope="module")
def digits():
    return kr.load_digits()


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = kr.digits_cnn()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=12, batch_size=64, verbose=0)
    return model


def _accuracy(model, data):
    x, y = data
    return float((model.predict(x, verbose=0).argmax(-1) == y).mean())


def test_one_shot_60_percent_rebuilt_recovers_within_one_point_with_half_the_params(digits, trained):
    (x, y), test = digits
    keras.utils.set_random_seed(1)
    dense_acc = _accuracy(trained, test)
    small = kr.rebuild(kr.prune_channels(trained, sparsity=0.6))
    assert small.count_params() <= 0.5 * trained.count_params()
    small.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    kr.recover(small, x, y, teacher=trained, epochs=8, batch_size=64, verbose=0)
    assert _accuracy(small, test) >= dense_acc - 0.01


def test_compress_reaches_a_macs_target_without_touching_the_model(digits, trained):
    (x, y), test = digits
    before = weights_digest(trained)
    small, report = kr.compress(trained, 0.4, x, y, validation_data=test, step=0.3,
                                batch_size=64, verbose=0)
    assert weights_digest(trained) == before
    assert report.reached and report.steps[-1].ratio <= 0.4
    assert kr.analyze(small).graph.model is small
    ratios = [s.ratio for s in report.steps]
    assert ratios == sorted(ratios, reverse=True)
    assert report.steps[-1].val_metrics["accuracy"] > 0.9
    assert "target macs ratio 0.400: reached" in str(report)
    # the final step does not overshoot far past the target (its sparsity was solved for)
    assert report.steps[-1].ratio > 0.25


def test_compress_params_target_and_latency_target(digits, trained):
    (x, y), test = digits
    small, report = kr.compress(trained, 0.5, x, y, metric="params", step=0.5, batch_size=64, verbose=0)
    assert small.count_params() <= 0.5 * trained.count_params()
    small, report = kr.compress(trained, 0.9, None, metric="latency", step=0.5, max_steps=2, verbose=0)
    assert report.latency_before_ms > 0 and report.steps[0].latency_ms > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.5), "target"),
    (dict(target=0.5, metric="flops"), "metric"),
    (dict(target=0.5, step=0.0), "step"),
])
def test_compress_rejects_bad_arguments(trained, kwargs, match):
    with pytest.raises(kr.errors.InvalidArgumentError, match=f"{match}.*Received"):
        kr.compress(trained, **kwargs)


def test_compress_needs_a_compiled_model():
    with pytest.raises(kr.errors.InvalidArgumentError, match="compile"):
        kr.compress(kr.digits_cnn(), 0.5, np.zeros((4, 8, 8, 1)), np.zeros(4))
