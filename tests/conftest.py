"""Test-session settings: the Keras flavour and backend under test, fixed seeds.

One pytest process tests one flavour (and, for Keras 3, one backend), chosen by
the environment before anything imports Keras:

* ``KERAS_REBUILD_FLAVOUR=tf_keras`` (the default for a bare ``pytest``): the
  whole suite on tf_keras, with tfmot;
* ``KERAS_REBUILD_FLAVOUR=keras3`` with ``KERAS_BACKEND=tensorflow|jax|torch``:
  the flavour-neutral core on Keras 3. Test files that exercise only tf_keras
  code are not collected, and tests marked ``tf_keras_only`` / ``keras3_only``
  are deselected in the other flavour.

``python -m tests`` starts one process per flavour and backend (the README's
test command). Helpers live in :mod:`keras_rebuild.testing`.
"""
import os

import pytest

FLAVOUR = os.environ.setdefault("KERAS_REBUILD_FLAVOUR", "tf_keras")
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow") if FLAVOUR == "keras3" else "tensorflow"

# Test files of code that supports tf_keras only (so far): not collected on Keras 3.
TF_KERAS_ONLY_FILES = [
    "test_wrappers.py", "test_recover.py", "test_export.py", "test_cli.py",
    "test_safety.py", "test_schedules.py",
]
collect_ignore = TF_KERAS_ONLY_FILES if FLAVOUR == "keras3" else []

if BACKEND == "torch":
    import torch

    torch.set_num_threads(1)  # one process per core (pytest-xdist): more threads only contend
if FLAVOUR == "tf_keras":
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot and tf.keras in tests agree with tf_keras
if BACKEND == "tensorflow":
    import tensorflow as tf

    # Two logical CPU devices so tf.distribute.MirroredStrategy can be tested on one CPU.
    # This must run before TensorFlow initialises its devices.
    _cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
        )
    except RuntimeError:  # already initialised
        pass

from keras_rebuild.testing import (  # noqa: E402,F401  (old test modules import these from here)
    assert_outputs_close as assert_models_close,
    flavour_keras,
    predict,
    random_inputs,
    weights_digest,
)

keras = flavour_keras(FLAVOUR)


def pytest_configure(config):
    config.addinivalue_line("markers", "tf_keras_only: runs only in the tf_keras process")
    config.addinivalue_line("markers", "keras3_only: runs only in the Keras 3 processes")


def pytest_report_header(config):
    return f"keras_rebuild flavour: {FLAVOUR}, backend: {BACKEND}"


def pytest_collection_modifyitems(config, items):
    other = "keras3_only" if FLAVOUR == "tf_keras" else "tf_keras_only"
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker(other) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
