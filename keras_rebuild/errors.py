"""Exception classes raised by keras_rebuild.

Every error the package raises on bad input is one of these. They subclass the
built-in ``ValueError`` or ``TypeError`` so existing ``except`` clauses keep
working, and their messages follow the Keras style: what was expected, then
``Received: arg=...``.
"""


class KerasRebuildError(Exception):
    """Base class of every keras_rebuild error."""


class NotAModelError(KerasRebuildError, TypeError):
    """An argument that must be a Keras model is something else."""


class UnsupportedModelError(KerasRebuildError, ValueError):
    """A model whose graph cannot be followed (e.g. a subclassed model)."""


class MixedFlavoursError(KerasRebuildError, TypeError):
    """Objects of Keras 3 and tf_keras are mixed in one call."""


class InvalidWeightsError(KerasRebuildError, ValueError):
    """A layer holds NaN or Inf weights."""


class InvalidArgumentError(KerasRebuildError, ValueError):
    """An argument has the wrong value."""


class InvalidArgumentTypeError(KerasRebuildError, TypeError):
    """An argument has the wrong type."""


class MissingCallbackError(KerasRebuildError, ValueError):
    """A pruning-wrapped model is trained without ``UpdatePruningStep``."""


class VerificationError(KerasRebuildError, ValueError):
    """An exported model does not match the Keras model within tolerance."""


class OutputExistsError(KerasRebuildError, ValueError):
    """An output file exists and overwriting was not allowed."""


class ConversionError(UnsupportedModelError):
    """A converter (the TFLite converter, litert-torch) cannot convert a model to LiteRT."""


class LiteRTRuntimeError(UnsupportedModelError):
    """A converted ``.tflite`` model fails to run in the LiteRT interpreter."""


class StochasticModelError(VerificationError):
    """A model gives different outputs for two identical calls, so its export cannot be verified."""


def received(name, value, limit=200):
    """Format ``name=value`` for an error message, truncated to ``limit`` chars."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{name}={text}"
