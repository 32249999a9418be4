"""keras_rebuild: structured pruning that physically rebuilds smaller Keras models.

Prune whole channels with ``prune_channels``, train with ``UpdatePruningStep``,
``rebuild`` a smaller model that computes exactly what the pruned one does,
``recover`` accuracy with distillation, and ``export_tflite`` for phones.

Example:
    >>> import keras_rebuild as kr
    >>> model = kr.digits_cnn()
    >>> small, report = kr.rebuild(model, return_report=True)
"""
from keras_rebuild import _compat  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from keras_rebuild import errors, handlers
from keras_rebuild.data import digits_cnn, load_digits
from keras_rebuild.groups import Analysis, ChannelGroup
from keras_rebuild.handlers import register_handler
from keras_rebuild.importance import Criterion, get_criterion
from keras_rebuild.plan import Plan, make_plan, select_channels
from keras_rebuild.rebuild import RebuildReport, rebuild
from keras_rebuild.recover import recalibrate_batchnorm, recover
from keras_rebuild.compress import CompressionReport, compress
from keras_rebuild.wrappers import StructuredPruningWrapper, UpdatePruningStep, prune_channels, strip_pruning
from keras_rebuild.export import (
    BenchmarkResult, ExportResult, LatencyComparison, VerificationResult, benchmark_tflite,
    compare_latency, export_tflite, run_tflite,
)

__version__ = "0.1.0"


def analyze(model) -> Analysis:
    """The channel dependency analysis of ``model``: groups, what can be pruned, and why not.

    Args:
        model: A tf_keras Functional or Sequential model (not modified).

    Returns:
        An :class:`Analysis`; ``print(analysis.summary())`` shows the groups.
    """
    from keras_rebuild.rebuild import strip_any_wrappers

    return Analysis(strip_any_wrappers(model))


__all__ = [
    "Analysis", "ChannelGroup", "RebuildReport", "analyze", "rebuild", "register_handler",
    "Criterion", "get_criterion", "Plan", "make_plan", "select_channels",
    "recover", "recalibrate_batchnorm", "compress", "CompressionReport",
    "prune_channels", "strip_pruning", "UpdatePruningStep", "StructuredPruningWrapper",
    "export_tflite", "benchmark_tflite", "compare_latency", "run_tflite", "ExportResult", "BenchmarkResult",
    "VerificationResult", "LatencyComparison",
    "errors", "handlers", "digits_cnn", "load_digits", "__version__",
]
