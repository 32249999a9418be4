"""The tf_keras flavour's imports: TensorFlow, tf_keras and (lazily) tfmot.

Only modules that work on tf_keras models import this module, and only when
such a model (or a tfmot object) arrives: importing ``keras_rebuild`` itself
imports no Keras and no TensorFlow. Nothing here changes the process
environment: ``tf_keras`` is imported by name, so ``tf.keras`` stays whatever
the user's ``TF_USE_LEGACY_KERAS`` makes it.
"""
import tensorflow as tf
import tf_keras as keras

KERAS_VERSION = keras.__version__


def tfmot():
    """Import tensorflow_model_optimization lazily (it is slow to import)."""
    import tensorflow_model_optimization as _tfmot

    return _tfmot


def register_serializable(package="keras_rebuild"):
    """Class decorator registering a Keras object for saving without a custom scope."""
    return keras.saving.register_keras_serializable(package=package)


__all__ = ["keras", "tf", "tfmot", "KERAS_VERSION", "register_serializable"]
