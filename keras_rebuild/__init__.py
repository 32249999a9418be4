"""keras_rebuild: structured pruning that physically rebuilds smaller Keras models.

Prune whole channels with ``prune_channels``, train with ``UpdatePruningStep``,
``rebuild`` a smaller model that computes exactly what the pruned one does,
``recover`` accuracy with distillation, and ``export_tflite`` for phones.
Keras 3 models (TensorFlow, JAX or torch backend) and tf_keras models work the
same way; the flavour is read from each model.

Importing the package imports no Keras and no TensorFlow and changes nothing in
the process: each name below is loaded on first use.

Example:
    >>> import keras_rebuild as kr
    >>> model = kr.digits_cnn()
    >>> small, report = kr.rebuild(model, return_report=True)
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "errors": None, "handlers": None, "backends": None, "schedules": None, "testing": None,
    "digits_cnn": "data", "load_digits": "data",
    "Analysis": "groups", "ChannelGroup": "groups",
    "register_handler": "handlers",
    "Criterion": "importance", "get_criterion": "importance",
    "Plan": "plan", "make_plan": "plan", "select_channels": "plan",
    "RebuildReport": "rebuild", "rebuild": "rebuild",
    "recalibrate_batchnorm": "recover", "recover": "recover",
    "CompressionReport": "compress", "compress": "compress",
    "StructuredPruningWrapper": "pruning", "UpdatePruningStep": "pruning",
    "prune_channels": "pruning", "strip_pruning": "pruning",
    "ConstantSparsity": "schedules", "PolynomialDecay": "schedules", "PruningSummaries": "callbacks",
    "BenchmarkResult": "export", "ExportResult": "export", "LatencyComparison": "export",
    "VerificationResult": "export", "benchmark_tflite": "export", "compare_latency": "export",
    "export_tflite": "export", "run_tflite": "export",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_rebuild' has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        value = importlib.import_module(f"keras_rebuild.{name}")
    else:
        value = getattr(importlib.import_module(f"keras_rebuild.{module}"), name)
    globals()[name] = value
    return value


class _PackageModule(types.ModuleType):
    """Keeps ``kr.rebuild``, ``kr.recover``, ``kr.compress`` the functions when their modules load.

    Importing a submodule sets an attribute of that name on the package; the
    public functions that share a submodule's name must win over it.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PackageModule


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


def analyze(model):
    """The channel dependency analysis of ``model``: groups, what can be pruned, and why not.

    Args:
        model: A Keras 3 or tf_keras Functional or Sequential model (not modified).

    Returns:
        An :class:`Analysis`; ``print(analysis.summary())`` shows the groups.

    Example:
        >>> analysis = kr.analyze(model)      # doctest: +SKIP
        >>> print(analysis.summary())         # doctest: +SKIP
    """
    from keras_rebuild.groups import Analysis
    from keras_rebuild.rebuild import strip_any_wrappers

    return Analysis(strip_any_wrappers(model))


__all__ = sorted(list(_EXPORTS) + ["analyze", "__version__"])
