"""keras_rebuild: structured pruning that physically rebuilds smaller Keras models.

Prune whole channels with ``prune_channels``, train with ``UpdatePruningStep``,
``rebuild`` a smaller model that computes exactly what the pruned one does,
``recover`` accuracy with distillation, and ``export_tflite`` for phones.
"""
from keras_rebuild import _compat  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from keras_rebuild import errors
from keras_rebuild.data import digits_cnn, load_digits

__version__ = "0.1.0"

__all__ = ["errors", "digits_cnn", "load_digits", "__version__"]
