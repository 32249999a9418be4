"""Shared fixtures and helpers for the test suite."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so tf.distribute.MirroredStrategy can be tested on one CPU.
# This must run before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:  # already initialised
    pass

from keras_rebuild._compat import keras  # noqa: E402
from keras_rebuild.testing import predict, random_inputs, weights_digest  # noqa: E402,F401


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by every test of the process.

    Two strategy objects in one process start their collective-op keys at the
    same number, and TensorFlow then mixes their all-reduces up ("Shape
    mismatch in the collective instance"): tests share a single strategy.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(autouse=True)
def _seed_everything():
    """Fixed seeds for every test."""
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def assert_models_close(a, b, x=None, atol=1e-4, rtol=1e-4):
    """Assert two models give the same outputs on ``x`` (random if omitted)."""
    if x is None:
        x = random_inputs(a)
    ya, yb = predict(a, x), predict(b, x)
    assert len(ya) == len(yb)
    for u, v in zip(ya, yb):
        assert u.shape == v.shape, (u.shape, v.shape)
        np.testing.assert_allclose(u, v, atol=atol, rtol=rtol)
