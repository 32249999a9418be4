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


@pytest.fixture(autouse=True)
def _seed_everything():
    """Fixed seeds for every test."""
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def random_inputs(model, batch=4, seed=0):
    """Random float inputs matching a model's input shapes (None dims -> batch)."""
    rng = np.random.default_rng(seed)
    xs = []
    for t in model.inputs:
        shape = [batch] + [d if d is not None else 8 for d in t.shape[1:]]
        if t.dtype.is_integer:
            xs.append(rng.integers(0, 10, size=shape).astype(t.dtype.as_numpy_dtype))
        else:
            xs.append(rng.normal(size=shape).astype("float32"))
    return xs if len(xs) > 1 else xs[0]


def predict(model, x):
    out = model(x, training=False)
    if isinstance(out, (list, tuple)):
        return [np.asarray(o) for o in out]
    if isinstance(out, dict):
        return [np.asarray(out[k]) for k in sorted(out)]
    return [np.asarray(out)]


def assert_models_close(a, b, x=None, atol=1e-4, rtol=1e-4):
    """Assert two models give the same outputs on ``x`` (random if omitted)."""
    if x is None:
        x = random_inputs(a)
    ya, yb = predict(a, x), predict(b, x)
    assert len(ya) == len(yb)
    for u, v in zip(ya, yb):
        assert u.shape == v.shape, (u.shape, v.shape)
        np.testing.assert_allclose(u, v, atol=atol, rtol=rtol)


def weights_digest(model):
    """A digest of a model's weights and config, to check nothing was modified."""
    import hashlib
    import json

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    h.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    return h.hexdigest()
