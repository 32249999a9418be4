"""The one place that imports Keras.

keras_rebuild targets the Keras 2 API shipped as ``tf_keras`` (the API that
tensorflow-model-optimization requires). ``TF_USE_LEGACY_KERAS=1`` must be set
before TensorFlow is first imported so that ``tf.keras`` and tfmot agree with
us; importing this module sets it when the user has not.

Every other module does ``from keras_rebuild._compat import keras, tf``.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

KERAS_VERSION = keras.__version__


def tfmot():
    """Import tensorflow_model_optimization lazily (it is slow to import)."""
    import tensorflow_model_optimization as _tfmot

    return _tfmot


def register_serializable(package="keras_rebuild"):
    """Class decorator registering a Keras object for saving without a custom scope."""
    return keras.saving.register_keras_serializable(package=package)


__all__ = ["keras", "tf", "tfmot", "KERAS_VERSION", "register_serializable"]
