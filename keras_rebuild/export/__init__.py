"""Export Keras models to LiteRT (``.tflite``), verify them, and time them.

``export_tflite`` converts a model (float32, float16, dynamic-range int8 or full
int8), runs the result in the LiteRT interpreter on sample inputs and compares
it with the Keras model before anything is written. ``benchmark_tflite`` and
``compare_latency`` measure single-inference latency of ``.tflite`` models.

Both Keras flavours and every Keras 3 backend are served; the pieces live in
submodules: :mod:`~keras_rebuild.export.convert` (one conversion path per
flavour/backend), :mod:`~keras_rebuild.export.quantize` (int8 through the
LiteRT Quantizer), :mod:`~keras_rebuild.export.flatbuffer` (the Flex check,
float I/O for int8 files). This module holds the LiteRT runner, verification,
the benchmarks and ``export_tflite`` itself. TensorFlow is imported only by the
paths that need it (tf_keras models, Keras 3 on the TensorFlow backend, the
converter's options).

Failures are our errors: ``FlexOpError`` / ``ConversionError`` when the
converter refuses the model (naming the op and layer), ``LiteRTRuntimeError``
when the file fails in the interpreter, ``StochasticModelError`` when the
Keras model itself is random, ``VerificationError`` when the outputs differ.
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import time
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from keras_rebuild.errors import (
    ConversionError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    LiteRTRuntimeError,
    NotAModelError,
    OutputExistsError,
    StochasticModelError,
    UnsupportedModelError,
    VerificationError,
    received,
)
from keras_rebuild.export.flatbuffer import FlexOpError, check_builtin_only, layer_at_node
from keras_rebuild.export.quantize import QuantizerValidation
from keras_rebuild.io import check_output_path, write_bytes

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("float32", "float16", "dynamic", "int8")
INT8_BACKENDS = ("quantizer", "converter")

# Default verification tolerances per quantization mode. A model passes when,
# for every output,
# ``max_abs_error <= atol + rtol * output_scale + ctol * roundoff``
# where ``output_scale`` is the largest absolute value of the Keras output and
# ``roundoff`` the largest change of that output when the Keras model's float
# inputs move by ``ROUNDOFF_PERTURBATION`` (two float32 units in the last
# place): an output that is a small difference of large values (a Siamese
# distance, a residual) amplifies the round-off of those values, and its own
# scale says nothing about that. ``ctol`` is a multiple of it: round-off piles
# up along the layers (20 for float32), and float16 and int8 round 2**11 and
# 2**14 times coarser than that perturbation. And
# (if ``min_top1`` is set) the top-1 agreement must be at least ``min_top1``.
DEFAULT_TOLERANCES: Dict[str, Dict[str, float]] = {
    "float32": {"atol": 1e-6, "rtol": 1e-4, "ctol": 20.0},
    "float16": {"atol": 1e-3, "rtol": 2e-2, "ctol": 4e4},
    "dynamic": {"atol": 1e-2, "rtol": 0.3, "ctol": 3e5},
    "int8": {"atol": 1e-2, "rtol": 0.3, "ctol": 3e5},
}
ROUNDOFF_PERTURBATION = 2.0 ** -22

# Layer classes (and their subclasses, by class name in the MRO) whose time loop
# the converter turns into LiteRT built-ins only for a static batch.
_RECURRENT_BASES = frozenset({"RNN", "ConvRNN", "ConvLSTM", "Bidirectional"})

PathOrBytes = Union[str, "os.PathLike[str]", bytes, bytearray]


# --------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------


@dataclasses.dataclass
class VerificationResult:
    """How closely a TFLite model reproduces its Keras model.

    Attributes:
        max_abs_error: Largest absolute difference over all outputs.
        mean_abs_error: Mean absolute difference over all output elements.
        top1_agreement: Fraction of samples whose arg-max agrees, the minimum
            over the outputs that have a class axis (rank 2, more than one
            column); ``None`` when no output has one.
        passed: Whether the errors are within tolerance.
        num_samples: How many samples were compared.
        output_scale: Largest absolute Keras output value (over all outputs).
        atol: Absolute tolerance used.
        rtol: Tolerance relative to each output's scale.
        min_top1: Required top-1 agreement, or ``None`` if not checked.
        per_output: One dict per output with ``name``, ``max_abs_error``,
            ``mean_abs_error``, ``scale``, ``spread``, ``top1_agreement``.
        output_spread: Largest standard deviation of a Keras output element
            across the samples.
        vacuous: The Keras outputs are (nearly) the same for every sample
            (spread within tolerance, or one sample): agreement then proves
            nothing about the conversion.
        roundoff: Largest change of a Keras output when the float inputs move
            by their round-off (``ROUNDOFF_PERTURBATION``, relative): how much
            the model amplifies round-off, large for an output that is a
            small difference of large values (cancellation).
        ctol: Tolerance as a multiple of each output's ``roundoff``.
    """

    max_abs_error: float
    mean_abs_error: float
    top1_agreement: Optional[float]
    passed: bool
    num_samples: int = 0
    output_scale: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    min_top1: Optional[float] = None
    per_output: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    output_spread: float = 0.0
    vacuous: bool = False
    roundoff: float = 0.0
    ctol: float = 0.0

    def __str__(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.1f}%"
        status = "passed" if self.passed else "FAILED"
        if self.passed and self.vacuous:
            return (
                f"verification vacuous on {self.num_samples} samples: the Keras outputs are (nearly) the same "
                f"for every sample (largest std across samples {self.output_spread:.3g} <= tolerance), so "
                f"agreement proves nothing; pass varied `sample_inputs` (max abs error {self.max_abs_error:.3g})"
            )
        return (
            f"verification {status} on {self.num_samples} samples: "
            f"max abs error {self.max_abs_error:.3g}, mean abs error {self.mean_abs_error:.3g}, "
            f"top-1 agreement {top1} (output scale {self.output_scale:.3g}, round-off "
            f"{self.roundoff:.3g}; tolerance atol={self.atol:g}, rtol={self.rtol:g}, ctol={self.ctol:g}"
            + (f", min_top1={self.min_top1:g}" if self.min_top1 is not None else "")
            + ")"
        )


@dataclasses.dataclass
class ExportResult:
    """What ``export_tflite`` produced.

    Attributes:
        path: Where the ``.tflite`` file was written, or ``None``.
        size_bytes: Size of the flatbuffer in bytes.
        gzipped_size_bytes: Size after ``gzip`` (level 9), a proxy for the
            download size; it shows the effect of zeroed (sparse) weights.
        quantize: The quantization mode (``"float32"``, ``"float16"``,
            ``"dynamic"`` or ``"int8"``).
        int8_io: Whether input and output tensors are int8.
        verification: A ``VerificationResult``, or ``None`` if ``verify=False``.
        inputs: Per input tensor of the ``.tflite`` model: ``name``, ``shape``,
            ``dtype``, and the ``scale`` and ``zero_point`` an app needs to
            quantize its data (``real = scale * (q - zero_point)``); these two
            are ``None`` for float tensors.
        outputs: The same per output tensor.
        converter: How the file was made: ``"tflite-converter"`` (in this
            process), ``"litert-torch"`` (Keras' torch export), or either
            with `` (subprocess, <backend> backend)`` for a model converted
            in a subprocess (JAX backend).
        int8_backend: For ``"int8"``: ``"quantizer"`` (the LiteRT Quantizer)
            or ``"converter"`` (the TFLite converter's own quantization);
            for ``"dynamic"`` likewise; else ``None``.
        fallback_reason: Why the quantizer's result was not used and the
            converter's was, or ``None``.
        quantizer_validation: The LiteRT Quantizer's per-layer comparison of
            the quantized and float files (a ``QuantizerValidation``), or
            ``None``.
        flex_ops: The TensorFlow (Flex) ops in the file (only with
            ``select_tf_ops=True``; the app then needs the Flex delegate).
        content: The flatbuffer bytes (read from ``path`` when not kept).
    """

    path: Optional[str]
    size_bytes: int
    gzipped_size_bytes: int
    quantize: str
    int8_io: bool = False
    verification: Optional[VerificationResult] = None
    inputs: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    converter: str = "tflite-converter"
    int8_backend: Optional[str] = None
    fallback_reason: Optional[str] = None
    quantizer_validation: Optional[QuantizerValidation] = None
    flex_ops: List[str] = dataclasses.field(default_factory=list)
    _content: Optional[bytes] = dataclasses.field(default=None, repr=False)

    @property
    def content(self) -> bytes:
        """The ``.tflite`` flatbuffer bytes."""
        if self._content is not None:
            return self._content
        with open(self.path, "rb") as f:
            return f.read()

    def summary(self) -> str:
        """A multi-line human-readable summary."""
        lines = [
            f"TFLite export ({self.quantize}{', int8 I/O' if self.int8_io else ''})",
            f"  path:    {self.path if self.path else '(in memory)'}",
            f"  size:    {_fmt_bytes(self.size_bytes)} ({_fmt_bytes(self.gzipped_size_bytes)} gzipped)",
            f"  made by: {self.converter}" + (f", int8 by the {self.int8_backend}" if self.int8_backend else ""),
        ]
        if self.fallback_reason:
            lines.append(f"  fallback: {self.fallback_reason}")
        if self.flex_ops:
            lines.append(f"  TensorFlow (Flex) ops: {', '.join(self.flex_ops)} (the app needs the Flex delegate)")
        if self.quantizer_validation is not None:
            lines.append(f"  {self.quantizer_validation}")
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            for t in tensors:
                if t.get("scale") is not None:
                    lines.append(f"  {kind} {t['name']}: {t['dtype']} {list(t['shape'])}, scale {t['scale']:.9g}, "
                                 f"zero point {t['zero_point']} (real = scale * (q - zero point))")
        if self.verification is None:
            lines.append("  verification: skipped")
        else:
            lines.append(f"  {self.verification}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclasses.dataclass
class BenchmarkResult:
    """Single-inference latency of a TFLite model in the LiteRT interpreter.

    Attributes:
        median_ms: Median latency of one ``invoke()`` in milliseconds.
        mean_ms: Mean latency in milliseconds.
        p90_ms: 90th percentile latency in milliseconds.
        min_ms: Fastest run in milliseconds.
        runs: Number of timed runs.
        warmup: Number of untimed warm-up runs.
        num_threads: Interpreter threads.
        size_bytes: Size of the model flatbuffer.
        memory_bytes: Approximate memory taken by the interpreter: the growth
            of the process resident set size (RSS) across interpreter creation
            and ``allocate_tensors()``. It is an approximation: the allocator
            may reuse freed pages or map more than is used, and memory
            allocated lazily on the first ``invoke()`` is not included.
        memory_method: How ``memory_bytes`` was measured.
        memory_after_first_invoke_bytes: The same RSS growth measured up to
            the end of the first (warm-up) ``invoke()``, which also counts
            buffers some delegates (e.g. XNNPACK's packed weights) allocate
            lazily. Also approximate.
        times_ms: Every timed run in milliseconds.
    """

    median_ms: float
    mean_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    warmup: int
    num_threads: int
    size_bytes: int
    memory_bytes: Optional[int]
    memory_method: str
    memory_after_first_invoke_bytes: Optional[int] = None
    times_ms: List[float] = dataclasses.field(default_factory=list, repr=False)

    def __str__(self) -> str:
        if self.memory_bytes is None:
            mem = self.memory_method if self.memory_method.startswith("not measured") else "n/a"
        else:
            mem = f"~{_fmt_bytes(self.memory_bytes)}"
            if self.memory_after_first_invoke_bytes is not None:
                mem += f" (~{_fmt_bytes(self.memory_after_first_invoke_bytes)} after first invoke)"
            mem += f", {self.memory_method}"
        return (
            f"LiteRT latency ({self.num_threads} thread{'s' if self.num_threads != 1 else ''}, "
            f"{self.runs} runs): median {self.median_ms:.3f} ms, mean {self.mean_ms:.3f} ms, "
            f"p90 {self.p90_ms:.3f} ms; model {_fmt_bytes(self.size_bytes)}; interpreter memory {mem}"
        )


@dataclasses.dataclass
class LatencyComparison:
    """Latencies of several TFLite models measured interleaved.

    Attributes:
        medians_ms: Median single-inference latency per variant, in ms.
        ratios: Each median divided by the first variant's median.
        times_ms: Every timed run per variant.
        num_threads: Interpreter threads.
        runs: Timed runs per variant per round.
        rounds: Number of round-robin rounds.
    """

    medians_ms: Dict[str, float]
    ratios: Dict[str, float]
    times_ms: Dict[str, List[float]] = dataclasses.field(default_factory=dict, repr=False)
    num_threads: int = 1
    runs: int = 0
    rounds: int = 0

    def __str__(self) -> str:
        width = max([len(k) for k in self.medians_ms] + [7])
        lines = [f"{'variant':<{width}}  median ms   ratio"]
        for name, med in self.medians_ms.items():
            lines.append(f"{name:<{width}}  {med:9.3f}  {self.ratios[name]:6.3f}")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.2f} MiB"


# --------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------


def _iter_layers(model) -> Iterable[Any]:
    """All layers of ``model``, recursing into nested models and wrappers."""
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        yield layer
        stack.extend(getattr(layer, "layers", []) or [])
        inner = getattr(layer, "layer", None)
        if inner is not None:
            stack.append(inner)


def _has_tfmot_pruning(model) -> bool:
    # Check class names first so tfmot (slow to import) is only imported when needed.
    if not any(type(layer).__name__ == "PruneLowMagnitude" for layer in _iter_layers(model)):
        return False
    from keras_rebuild._compat import tfmot

    tfmot()  # makes sure the package is importable before its internal module is
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude as wrapper

    return any(isinstance(layer, wrapper) for layer in _iter_layers(model))


def _strip_tfmot_pruning(model):
    """``strip_pruning`` applied to a copy, so ``model`` is left untouched."""
    from keras_rebuild._compat import keras, tfmot

    sparsity = tfmot().sparsity.keras
    with sparsity.prune_scope():
        copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return sparsity.strip_pruning(copy)


def _prepare_model(model):
    """Return a model ready to convert; ``model`` itself is never modified.

    A model still wrapped for pruning is stripped and rebuilt first:
    keras_rebuild's ``StructuredPruningWrapper`` layers are handled by
    ``keras_rebuild.rebuild`` (when that module is available) and
    tensorflow-model-optimization's ``PruneLowMagnitude`` wrappers by
    ``tfmot.sparsity.keras.strip_pruning`` on a copy.
    """
    if _flavour(model) == "keras3":
        # Never import the tf_keras wrappers module (it loads TensorFlow) for a Keras 3 model.
        if any(type(layer).__name__ == "StructuredPruningWrapper" for layer in _iter_layers(model)):
            import keras_rebuild

            logger.info("Model has StructuredPruningWrapper layers: rebuilding it before export.")
            model = keras_rebuild.rebuild(model)
        return model
    try:
        from keras_rebuild import wrappers as _wrappers  # noqa: WPS433 (lazy on purpose)

        wrapper_cls = _wrappers.StructuredPruningWrapper
        if any(isinstance(layer, wrapper_cls) for layer in _iter_layers(model)):
            import keras_rebuild

            logger.info("Model has StructuredPruningWrapper layers: rebuilding it before export.")
            model = keras_rebuild.rebuild(model)
    except (ImportError, AttributeError):
        pass
    if _has_tfmot_pruning(model):
        logger.info("Model has tfmot PruneLowMagnitude wrappers: stripping them (on a copy) before export.")
        model = _strip_tfmot_pruning(model)
    return model


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------


def _flavour(model) -> Optional[str]:
    from keras_rebuild.backends import flavour_of

    return flavour_of(model)


def _spec_dtype(dtype) -> np.dtype:
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    name = str(name or dtype)
    if name in ("float16", "bfloat16"):
        return np.dtype(np.float32)  # mixed-precision models are exported with float32 inputs
    as_numpy = getattr(dtype, "as_numpy_dtype", None)
    return np.dtype(as_numpy) if as_numpy is not None else np.dtype(name)


def _input_specs(model) -> List[tuple]:
    """``[(name, shape_without_batch, numpy_dtype)]`` for each model input.

    A built subclassed model has no ``inputs``; its input signature comes
    from the inputs it was called (or trained) on (``model.save_spec()``).
    """
    inputs = getattr(model, "inputs", None)
    if not inputs:
        specs = _saved_input_specs(model)
        if specs:
            return specs
        raise NotAModelError(
            "Expected `model` to be a Keras model with known inputs: a functional or Sequential model, "
            "or a subclassed model that has been called on data (or built with `model.build(shape)`). "
            f"Received: {received('model', model)} (never called)"
        )
    names = list(getattr(model, "input_names", None) or [])
    specs = []
    for i, t in enumerate(inputs):
        name = names[i] if i < len(names) else t.name.split(":")[0]
        specs.append((name, tuple(t.shape[1:]), _spec_dtype(t.dtype)))
    return specs


def _saved_input_specs(model) -> Optional[List[tuple]]:
    """Input specs of a subclassed model from the signature it was called with, else ``None``."""
    save_spec = getattr(model, "save_spec", None)
    try:
        spec = save_spec(dynamic_batch=True) if callable(save_spec) else None
    except (TypeError, ValueError, AttributeError):
        spec = None
    if not spec:
        return None
    args, kwargs = spec
    if kwargs or len(args) != 1:
        return None
    from keras_rebuild._compat import tf

    flat = args[0]
    if isinstance(flat, Mapping):
        items = list(flat.items())
    elif isinstance(flat, (list, tuple)):
        items = [(getattr(t, "name", None) or f"input_{i}", t) for i, t in enumerate(flat)]
    else:
        items = [(getattr(flat, "name", None) or "input_0", flat)]
    specs = []
    for name, t in items:
        if not isinstance(t, tf.TensorSpec) or t.shape.rank is None:
            return None
        specs.append((str(name), tuple(t.shape[1:]), _spec_dtype(t.dtype)))
    return specs


def _output_names(model, n: Optional[int] = None) -> List[str]:
    names = list(getattr(model, "output_names", None) or [])
    outputs = getattr(model, "outputs", None)
    if n is None:
        n = len(outputs) if outputs else len(names)
    if len(names) != n:
        names = [f"output_{i}" for i in range(n)]
    return names


def _check_array(a: np.ndarray, arg_name: str, name: str, dtype) -> None:
    """Numbers of a kind the model takes, all finite."""
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_)):
        raise InvalidArgumentTypeError(
            f"Expected `{arg_name}` for input {name!r} to hold numbers. Received: an array of dtype {a.dtype}"
        )
    if np.issubdtype(a.dtype, np.complexfloating):
        raise InvalidArgumentTypeError(
            f"Expected `{arg_name}` for input {name!r} to hold real numbers. Received: an array of dtype {a.dtype}"
        )
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        raise InvalidArgumentError(
            f"Expected `{arg_name}` for input {name!r} to hold finite values (NaN and Inf cannot be "
            f"calibrated or compared). Received: the data hold {n_nan} NaN and {n_inf} Inf values"
        )
    if np.issubdtype(dtype, np.integer) and np.issubdtype(a.dtype, np.floating) and not np.all(a == np.round(a)):
        raise InvalidArgumentError(
            f"Expected `{arg_name}` for integer input {name!r} to hold whole numbers. "
            f"Received: fractional values of dtype {a.dtype}"
        )


def _as_sample_list(x, specs, arg_name) -> List[np.ndarray]:
    """Normalise one batch (array, list/tuple or dict of arrays) to a list in model-input order."""
    n = len(specs)
    if isinstance(x, Mapping):
        missing = [name for name, _, _ in specs if name not in x]
        if missing:
            raise InvalidArgumentError(
                f"Expected `{arg_name}` to have a key for each model input {[s[0] for s in specs]}. "
                f"Received: keys={sorted(map(str, x))}"
            )
        x = [x[name] for name, _, _ in specs]
    elif not isinstance(x, (list, tuple)):
        x = [x]
    x = [np.asarray(a) for a in x]
    if len(x) != n:
        raise InvalidArgumentError(
            f"Expected `{arg_name}` to hold {n} array(s), one per model input. Received: {len(x)} array(s)"
        )
    out = []
    for a, (name, shape, dtype) in zip(x, specs):
        _check_array(a, arg_name, name, dtype)
        if a.ndim == len(shape):  # a single sample without batch axis
            a = a[None]
        if a.ndim != len(shape) + 1 or any(d is not None and d != e for d, e in zip(shape, a.shape[1:])):
            raise InvalidArgumentError(
                f"Expected `{arg_name}` arrays for input {name!r} of shape "
                f"(batch, {', '.join('None' if d is None else str(d) for d in shape)}). Received: shape={a.shape}"
            )
        if a.shape[0] == 0:
            raise InvalidArgumentError(
                f"Expected `{arg_name}` to hold at least one sample. Received: shape={a.shape}"
            )
        out.append(a.astype(dtype, copy=False))
    if len({a.shape[0] for a in out}) != 1:
        raise InvalidArgumentError(
            f"Expected all `{arg_name}` arrays to have the same batch size. "
            f"Received: batch sizes={[a.shape[0] for a in out]}"
        )
    return out


def _split_element(element, n_inputs):
    """Pick the model inputs out of a dataset element that may be ``(x, y)`` or ``(x, y, w)``."""
    if isinstance(element, Mapping):
        return element
    if isinstance(element, (list, tuple)):
        if n_inputs == 1 and len(element) in (2, 3):
            return element[0]
        if n_inputs > 1 and len(element) in (2, 3) and isinstance(element[0], (list, tuple, Mapping)):
            return element[0]
    return element


def _is_x_y_pair(data, specs) -> bool:
    """``(x, y)`` arrays with one sample axis, for a model with one input that ``x`` fits and ``y`` does not."""
    if len(specs) != 1 or not isinstance(data, tuple) or len(data) != 2:
        return False
    x, y = data
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)) or len(x) != len(y):
        return False
    shape = specs[0][1]
    fits = lambda a: a.ndim == len(shape) + 1 and all(d is None or d == e for d, e in zip(shape, a.shape[1:]))  # noqa: E731
    return fits(x) and not fits(y)


def _representative_batches(data, specs, limit: int) -> List[List[np.ndarray]]:
    """Materialise up to ``limit`` samples of representative data, as lists of batch-1 arrays.

    ``(x, y)`` as given to ``fit`` is accepted for a single-input model: the inputs ``x`` are used.
    """
    if _is_x_y_pair(data, specs):
        data = data[0]
    if isinstance(data, (np.ndarray, Mapping)) or (
        isinstance(data, (list, tuple)) and data and all(isinstance(a, np.ndarray) for a in data)
        and len(data) == len(specs)
    ):
        batches = [_as_sample_list(data, specs, "representative_data")]
    else:
        if hasattr(data, "as_numpy_iterator"):  # a tf.data.Dataset
            data = data.as_numpy_iterator()
        elif callable(data):
            data = data()
        batches = []
        total = 0
        try:
            iterator = iter(data)
        except TypeError as exc:
            raise InvalidArgumentTypeError(
                "Expected `representative_data` to be a numpy array, a list/dict of arrays (one per input), "
                f"a tf.data.Dataset or an iterable of batches. Received: {received('representative_data', data)}"
            ) from exc
        for element in iterator:
            element = _map_arrays(_split_element(element, len(specs)))
            batch = _as_sample_list(element, specs, "representative_data")
            batches.append(batch)
            total += batch[0].shape[0]
            if total >= limit:
                break
    samples = []
    for batch in batches:
        for i in range(batch[0].shape[0]):
            samples.append([a[i : i + 1] for a in batch])
            if len(samples) >= limit:
                return samples
    if not samples:
        raise InvalidArgumentError("Expected `representative_data` to hold at least one sample. Received: none")
    return samples


def _map_arrays(x):
    """``np.asarray`` over the leaves of nested dicts/lists/tuples (keras.ops tensors included)."""
    if isinstance(x, Mapping):
        return {k: _map_arrays(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_arrays(v) for v in x) if not hasattr(x, "_fields") else type(x)(*map(_map_arrays, x))
    return _to_numpy(x)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__.split(".", 1)[0]
    if module == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _concat_samples(samples: List[List[np.ndarray]]) -> List[np.ndarray]:
    return [np.concatenate([s[i] for s in samples], axis=0) for i in range(len(samples[0]))]


def _random_inputs(specs, batch: int, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = []
    for name, shape, dtype in specs:
        if any(d is None for d in shape):
            raise InvalidArgumentError(
                f"Expected `sample_inputs` or `representative_data` for input {name!r} of unknown size "
                f"{_fmt_shape(shape)}: they give the exported file its size. Received: sample_inputs=None, "
                "representative_data=None"
            )
        size = (batch,) + tuple(shape)
        if np.issubdtype(dtype, np.integer):
            xs.append(rng.integers(0, 10, size=size).astype(dtype))
        elif np.issubdtype(dtype, np.bool_):
            xs.append(rng.integers(0, 2, size=size).astype(bool))
        else:
            xs.append(rng.normal(size=size).astype(dtype))
    return xs


# --------------------------------------------------------------------------
# Interpreter helpers
# --------------------------------------------------------------------------


def _make_interpreter(content: bytes, num_threads: int = 1):
    """A LiteRT interpreter for ``content`` (a seam the tests spy on)."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=bytes(content), num_threads=num_threads)


def _load_content(path_or_bytes: PathOrBytes) -> bytes:
    if isinstance(path_or_bytes, ExportResult):
        content = path_or_bytes.content
    elif isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        content = bytes(path_or_bytes)
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        path = os.fspath(path_or_bytes)
        if os.path.isdir(path):
            raise InvalidArgumentError(f"Expected a .tflite file. Received: path={path!r} is a folder")
        with open(path, "rb") as f:
            content = f.read()
    else:
        raise InvalidArgumentTypeError(
            "Expected a path to a .tflite file, its bytes or an ExportResult. "
            f"Received: {received('path_or_bytes', path_or_bytes)}"
        )
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise InvalidArgumentError(
            "Expected a TFLite flatbuffer (file identifier 'TFL3'). "
            f"Received: {len(content)} bytes starting with {content[:8]!r}"
        )
    return content


def _quantize_input(x: np.ndarray, detail) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale and not np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(dtype)
        q = np.round(x.astype(np.float64) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _dequantize_output(y: np.ndarray, detail) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.issubdtype(y.dtype, np.integer) and scale:
        return (y.astype(np.float32) - zero_point) * np.float32(scale)
    return y


def _shape_key(shape) -> tuple:
    return tuple(int(d) if d is not None and int(d) >= 0 else -1 for d in list(shape)[1:])


def _match(names: Sequence[str], shapes: Sequence[tuple], details: Sequence[dict], what: str) -> List[dict]:
    """Match Keras tensors (by name, then shape, then order) to interpreter tensor details.

    ``details`` carry a ``"key"`` (signature name, if any) and ``"shape_signature"``.
    """
    if len(details) != len(names):
        raise VerificationError(
            f"The TFLite model has {len(details)} {what}s but the Keras model has {len(names)}."
        )
    by_key = {d.get("key"): d for d in details if d.get("key") is not None}
    if by_key and all(n in by_key for n in names):
        return [by_key[n] for n in names]
    # Name suffixes such as ``serving_default_<name>:0``.
    chosen: List[Optional[dict]] = [None] * len(names)
    used = set()
    for i, n in enumerate(names):
        for j, d in enumerate(details):
            if j in used:
                continue
            tname = d["name"].split(":")[0]
            if d.get("key") == n or tname == n or tname.endswith("_" + n):
                chosen[i], _ = d, used.add(j)
                break
    # Then unique shapes, then the remaining ones in order.
    for i, s in enumerate(shapes):
        if chosen[i] is not None:
            continue
        cands = [j for j, d in enumerate(details) if j not in used and _shape_key(d["shape_signature"]) == s]
        if len(cands) == 1 or (cands and sum(1 for t in shapes if t == s) == 1):
            chosen[i] = details[cands[0]]
            used.add(cands[0])
    rest = [j for j in range(len(details)) if j not in used]
    for i in range(len(chosen)):
        if chosen[i] is None:
            chosen[i] = details[rest.pop(0)]
    return chosen  # type: ignore[return-value]


def _io_details(interpreter):
    """Input and output details, keyed by signature names when the model has a signature."""
    inputs = [dict(d) for d in interpreter.get_input_details()]
    outputs = [dict(d) for d in interpreter.get_output_details()]
    try:
        signatures = interpreter.get_signature_list()
    except Exception:  # pragma: no cover - very old flatbuffers
        signatures = {}
    if len(signatures) == 1:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        in_idx = {d["index"]: k for k, d in runner.get_input_details().items()}
        out_idx = {d["index"]: k for k, d in runner.get_output_details().items()}
        for d in inputs:
            d["key"] = in_idx.get(d["index"])
        for d in outputs:
            d["key"] = out_idx.get(d["index"])
    return inputs, outputs


def _resize_inputs(interpreter, in_details, xs: List[np.ndarray]) -> None:
    """Resize the interpreter's inputs to the arrays' shapes where they differ from its current ones, then allocate."""
    current = {d["index"]: tuple(int(v) for v in d["shape"]) for d in interpreter.get_input_details()}
    for d, x in zip(in_details, xs):
        if current.get(d["index"], tuple(d["shape"])) != x.shape:
            interpreter.resize_tensor_input(d["index"], list(x.shape), strict=False)
    interpreter.allocate_tensors()


def _run_once(interpreter, in_details, out_details, xs: List[np.ndarray]) -> List[np.ndarray]:
    _resize_inputs(interpreter, in_details, xs)
    for d, x in zip(in_details, xs):
        interpreter.set_tensor(d["index"], _quantize_input(x, d))
    interpreter.invoke()
    return [_dequantize_output(interpreter.get_tensor(d["index"]).copy(), d) for d in out_details]


def _runtime_error(exc: BaseException, where, batch_error: Optional[BaseException] = None) -> LiteRTRuntimeError:
    """Our error for a file that fails in the interpreter: its message, and the op and layer where it tells."""
    import re

    def clean(e):  # the interpreter repeats its message once per failed attempt
        return re.sub(r"(.+?failed to (?:prepare|invoke)\.)\1+", r"\1", str(e).strip())

    text = f"{type(exc).__name__}: {clean(exc)}"
    content, names = where if where else (None, ())
    node = re.search(r"Node number (\d+) \((\w+)\)", str(exc))
    located = ""
    if node:
        layers = layer_at_node(content, int(node.group(1)), names, op=node.group(2)) if content is not None else []
        in_layers = f" in layer(s) {', '.join(repr(n) for n in layers)}" if layers else ""
        located = f" (op {node.group(2)}{in_layers})"
    if "Flex delegate" in str(exc) or "Select TensorFlow op" in str(exc):
        advice = ("The file holds TensorFlow (Flex) ops that this interpreter cannot run: pass verify=False to "
                  "export it unverified (the app needs the Flex delegate)")
    else:
        advice = ("The file cannot run in LiteRT as converted: replace the layer with built-in Keras layers, or "
                  "try batch_size=1 (a static batch)")
    also = ""
    if batch_error and clean(batch_error[1]) != clean(exc):
        also = (f"; at batch {batch_error[0]} it failed first with {type(batch_error[1]).__name__}: "
                f"{clean(batch_error[1])[:300]}")
    return LiteRTRuntimeError(
        f"Expected the converted model to run in the LiteRT interpreter. Received: {text[:1500]}{located}{also}. "
        + advice
    )


def _invoke(interpreter, in_details, out_details, xs: List[np.ndarray], where=None) -> List[np.ndarray]:
    """Run the interpreter on a batch, resizing the batch axis (or in chunks of a static batch, or sample by sample).

    ``where`` is ``(content, layer_names)``, to name the op and layer of a failure.

    Raises:
        LiteRTRuntimeError: If the file fails in the interpreter (also at batch 1).
    """
    batch = xs[0].shape[0]
    static = {int(d["shape_signature"][0]) for d in in_details if len(d["shape_signature"])}
    fixed = static.pop() if len(static) == 1 else -1
    if fixed > 0 and batch != fixed:
        # A file with a fixed batch (litert-torch's, or batch_size=...): resizing would break its reshapes and
        # loops, so run chunks of that batch (the last one padded with its last sample).
        outs = []
        for start in range(0, batch, fixed):
            chunk = [x[start : start + fixed] for x in xs]
            n = chunk[0].shape[0]
            if n < fixed:
                chunk = [np.concatenate([c, np.repeat(c[-1:], fixed - n, axis=0)], axis=0) for c in chunk]
            outs.append([o[:n] for o in _invoke(interpreter, in_details, out_details, chunk, where)])
        return [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(out_details))]
    try:
        return _run_once(interpreter, in_details, out_details, xs)
    except (ValueError, RuntimeError) as exc:
        if batch == 1:
            raise _runtime_error(exc, where) from None
        first = (batch, exc)
    logger.debug("Batch resize failed; running the TFLite model one sample at a time.")
    outs = []
    for i in range(batch):
        try:
            outs.append(_run_once(interpreter, in_details, out_details, [x[i : i + 1] for x in xs]))
        except (ValueError, RuntimeError) as exc:
            raise _runtime_error(exc, where, first) from None
    return [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(out_details))]


def run_tflite(path_or_bytes: PathOrBytes, inputs, model=None, num_threads: int = 1) -> List[np.ndarray]:
    """Run a TFLite model in the LiteRT interpreter on a batch of inputs.

    Int8/uint8 input tensors are quantized with their scale and zero point and
    quantized outputs are dequantized, so float inputs and float outputs work
    for every quantization mode.

    Args:
        path_or_bytes: Path of a ``.tflite`` file, its bytes, or an ``ExportResult``.
        inputs: A batch: an array, a list of arrays, or a dict keyed by input name.
        model: Optional Keras model the file was exported from. When given,
            lists follow ``model.inputs`` order and outputs are returned in
            ``model.outputs`` order, matched by name and shape. Otherwise lists
            follow the interpreter's input order.
        num_threads: Interpreter threads.

    Returns:
        A list of float (or the model's output dtype) numpy arrays, one per output.

    Raises:
        InvalidArgumentError: If the inputs do not fit the model.
        LiteRTRuntimeError: If the file fails in the LiteRT interpreter (the
            interpreter's message, with the op and layer where it tells).

    Example:
        >>> result = export_tflite(model)                  # doctest: +SKIP
        >>> probs, = run_tflite(result, x_test, model=model)  # doctest: +SKIP
    """
    content = _load_content(path_or_bytes)
    interpreter = _make_interpreter(content, num_threads=num_threads)
    in_details, out_details = _io_details(interpreter)
    if model is not None:
        specs = _input_specs(model)
        xs = _as_sample_list(inputs, specs, "inputs")
        in_details = _match([s[0] for s in specs], [_shape_key((None,) + s[1]) for s in specs], in_details, "input")
        if getattr(model, "outputs", None):
            out_names = _output_names(model)
            out_shapes = [_shape_key(t.shape) for t in model.outputs]
            out_details = _match(out_names, out_shapes, out_details, "output")
        else:  # a subclassed model: outputs in the order of its traced signature
            out_details = sorted(out_details, key=lambda d: (d.get("key") is None, str(d.get("key")), d["index"]))
    else:
        if isinstance(inputs, Mapping):
            keys = [d.get("key") or d["name"] for d in in_details]
            inputs = [inputs[k] for k in keys]
        elif not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        xs = [np.asarray(a) for a in inputs]
    names = _c_layer_names(model) if model is not None else ()
    return _invoke(interpreter, in_details, out_details, xs, where=(content, names))


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def _keras_outputs(model, xs: List[np.ndarray]) -> List[np.ndarray]:
    """The Keras model's outputs on ``xs`` as a list (a seam the tests patch)."""
    if _flavour(model) == "keras3":
        import keras

        convert = keras.ops.convert_to_numpy
    else:
        convert = np.asarray
    out = model(xs if len(xs) > 1 else xs[0], training=False)
    if isinstance(out, Mapping):
        return [np.asarray(convert(out[k])) for k in _output_names(model)]
    if isinstance(out, (list, tuple)):
        return [np.asarray(convert(o)) for o in out]
    return [np.asarray(convert(out))]


_LOW_PRECISION = frozenset({"float16", "bfloat16", "mixed_float16", "mixed_bfloat16"})


def _policy_names(layer) -> set:
    policy = getattr(layer, "dtype_policy", None)
    names = {getattr(policy, "name", None), getattr(policy, "compute_dtype", None),
             getattr(policy, "variable_dtype", None)}
    return {str(n) for n in names if n is not None}


def _is_low_precision(model) -> bool:
    """Whether any layer computes or stores in float16/bfloat16 (mixed precision included)."""
    layers = [model] + list(_iter_layers(model))
    if any(_policy_names(layer) & _LOW_PRECISION for layer in layers):
        return True
    return any(str(getattr(t, "dtype", "")).endswith(("float16", "bfloat16"))
               for t in (getattr(model, "inputs", None) or []))


def _float32_config(value):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "dtype" and ((isinstance(v, str) and v in _LOW_PRECISION) or (
                    isinstance(v, dict) and isinstance(v.get("config"), dict)
                    and v["config"].get("name") in _LOW_PRECISION)):
                out[k] = "float32"
            else:
                out[k] = _float32_config(v)
        return out
    if isinstance(value, list):
        return [_float32_config(v) for v in value]
    return value


def _float32_copy(model):
    """A float32 copy of a float16 / bfloat16 / mixed-precision model (same weights, cast)."""
    try:
        config = model.get_config()
        copy = type(model).from_config(_float32_config(config))
    except (NotImplementedError, TypeError, ValueError, KeyError) as exc:
        raise InvalidArgumentError(
            "Expected a float16/bfloat16 model to be functional or Sequential, so that it can be exported as "
            "float32 (the TFLite converter cannot take float16 Keras layers). Received: "
            f"{received('model', model)} ({type(exc).__name__}: {exc})"
        ) from None
    weights = [np.asarray(w, np.float32) if np.issubdtype(np.asarray(w).dtype, np.floating) else w
               for w in model.get_weights()]
    copy.set_weights(weights)
    return copy


def _convert(model, quantize: str, int8_io: bool, calibration: Optional[List[List[np.ndarray]]], specs,
             shapes=None, select_tf_ops: bool = False) -> bytes:
    """The TFLite converter's file for ``model`` (float32, or its float16 / dynamic / int8 quantization).

    tf_keras models and Keras 3 models on TensorFlow convert in this process;
    Keras 3 models on JAX or torch in a TensorFlow-backend subprocess.
    ``shapes`` (one full input shape per input, or ``None``) replaces the
    model's own input shapes.
    """
    from keras_rebuild.export import convert as _c

    backend = _c.keras_backend_of(model)
    if backend == "tf_keras":
        return _c.convert_tf_keras(model, quantize, int8_io, calibration, specs, shapes, select_tf_ops)
    if backend == "tensorflow":
        return _c.convert_keras3_tensorflow(model, quantize, int8_io, calibration, specs, shapes, select_tf_ops)
    return _c.convert_in_subprocess(model, quantize, int8_io, calibration, specs, converter_needed=True,
                                    shapes=shapes, select_tf_ops=select_tf_ops)


def _float32_file(model, specs, shapes=None, select_tf_ops: bool = False) -> Tuple[bytes, str]:
    """A float32 file made the native way of the model's backend, and how it was made."""
    from keras_rebuild.export import convert as _c

    backend = _c.keras_backend_of(model)
    if backend == "torch":
        return _c.convert_keras3_torch(model, specs, shapes), "litert-torch"
    if backend == "jax":
        content = _c.convert_in_subprocess(model, "float32", False, None, specs, shapes=shapes,
                                           select_tf_ops=select_tf_ops)
        return content, f"tflite-converter (subprocess, {_c._worker_backend('float32', False)} backend)"
    return _convert(model, "float32", False, None, specs, shapes, select_tf_ops), "tflite-converter"


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _has_recurrent_layers(model) -> bool:
    """Whether any layer (nested ones included) is a recurrent layer: LSTM, GRU, SimpleRNN, their wrappers."""
    return any(any(c.__name__ in _RECURRENT_BASES for c in type(layer).__mro__) for layer in _iter_layers(model))


def _set_key(value, key: str, new):
    """A copy of a nested config with every ``key`` set to ``new``."""
    if isinstance(value, dict):
        return {k: (new if k == key else _set_key(v, key, new)) for k, v in value.items()}
    if isinstance(value, list):
        return [_set_key(v, key, new) for v in value]
    return value


def _unrolled_copy(model, specs):
    """A copy of ``model`` whose recurrent layers unroll their time loop (same weights).

    Raises:
        InvalidArgumentError: If an input has an unknown dimension (the number of time steps must be fixed),
            or the model cannot be rebuilt from its config.
    """
    unknown = [(name, shape) for name, shape, _ in specs if any(d is None for d in shape)]
    if unknown:
        name, shape = unknown[0]
        raise InvalidArgumentError(
            "Expected inputs of fixed size with unroll_rnn=True (the loop is unrolled once per time step). "
            f"Received: input {name!r} of shape (batch, {', '.join('None' if d is None else str(d) for d in shape)})"
            "; leave unroll_rnn=False for a loop over any number of steps"
        )
    try:
        copy = type(model).from_config(_set_key(model.get_config(), "unroll", True))
        copy.set_weights(model.get_weights())
    except (NotImplementedError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidArgumentError(
            "Expected a functional or Sequential model whose recurrent layers have a fixed number of time steps "
            "with unroll_rnn=True (the loop is unrolled once per step). Received: "
            f"{received('model', model)} ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    return copy


# --------------------------------------------------------------------------
# The Keras reference: layer outputs, determinism
# --------------------------------------------------------------------------


def _graph_tensors(model) -> Tuple[List[Any], List[str]]:
    """Every float layer output of a functional (or Sequential) model's own graph, in order, with its layer's name.

    A nested model counts as one layer (its outputs); what is inside it cannot be a model output here.
    """
    from keras_rebuild.errors import KerasRebuildError
    from keras_rebuild.graph import Graph, is_graph_model

    if not is_graph_model(model):
        return [], []
    try:
        graph = Graph(model)
    except KerasRebuildError:
        return [], []
    tensors, names = [], []
    for op in graph.ops:
        top_level = "/" not in op.path and op.kind in ("layer", "link_out")
        if not top_level:
            continue
        for t in op.outputs:
            info = graph.tensors[t]
            if "float" in str(info.dtype) and getattr(info, "_ref", None) is not None:
                tensors.append(info._ref)
                names.append(op.path)
    return tensors, names


def _layer_outputs_fn(model):
    """``(fn, layer names)``: ``fn(xs)`` gives every float layer output of ``model`` as numpy.

    ``(None, [])`` when the layers cannot be read (a subclassed model).
    """
    try:
        tensors, names = _graph_tensors(model)
        if not tensors:
            return None, []
        if _flavour(model) == "keras3":
            import keras

            convert = keras.ops.convert_to_numpy
        else:
            from keras_rebuild._compat import keras

            convert = np.asarray
        probe = keras.Model(model.inputs, tensors)
    except Exception as exc:  # noqa: BLE001 - only a refinement of the tolerance
        logger.debug("Cannot read the layer outputs of %s: %s", getattr(model, "name", model), exc)
        return None, []

    def fn(xs):
        out = probe(xs if len(xs) > 1 else xs[0], training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [np.asarray(convert(o)) for o in out]

    return fn, names


def _roundoff(model, xs: List[np.ndarray], expected: List[np.ndarray], seed: int = 0) -> List[float]:
    """Per output: the largest change when every float input moves by ``ROUNDOFF_PERTURBATION`` (relative)."""
    rng = np.random.default_rng(seed)
    moved = []
    for x in xs:
        if np.issubdtype(x.dtype, np.floating):
            signs = rng.choice(np.array([-1.0, 1.0]), size=x.shape)
            x = (x.astype(np.float64) * (1.0 + ROUNDOFF_PERTURBATION * signs)).astype(x.dtype)
        moved.append(x)
    if all(np.array_equal(a, b) for a, b in zip(moved, xs)):
        return [0.0] * len(expected)
    out = []
    for e, m in zip(expected, _keras_outputs(model, moved)):
        e, m = np.asarray(e), np.asarray(m)
        if e.shape != m.shape or not np.issubdtype(e.dtype, np.floating) or not e.size:
            out.append(0.0)
            continue
        d = np.abs(e.astype(np.float64) - m.astype(np.float64))
        out.append(float(d[np.isfinite(d)].max()) if np.isfinite(d).any() else 0.0)
    return out


def _stochastic_layer(fn, names: List[str], xs: List[np.ndarray]) -> Optional[str]:
    """The first layer (from the inputs) whose output differs between two identical calls, or ``None``."""
    if fn is None:
        return None
    try:
        small = [x[:2] for x in xs]
        first, second = fn(small), fn(small)
    except Exception:  # noqa: BLE001 - only a hint for the error message
        return None
    for name, a, b in zip(names, first, second):
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            return name
    return None


def _reference_outputs(model, xs: List[np.ndarray], tol: Dict[str, float]) -> Tuple[List[np.ndarray], List[float]]:
    """The Keras outputs on ``xs`` and their round-off (``_roundoff``); checks they are finite and deterministic.

    Raises:
        VerificationError: If the Keras outputs hold NaN or Inf.
        StochasticModelError: If two identical calls give outputs that differ by more than the tolerance.
    """
    expected = [np.asarray(e) for e in _keras_outputs(model, xs)]
    for e in expected:
        if np.issubdtype(e.dtype, np.floating) and not np.isfinite(e).all():
            raise VerificationError(
                "Expected the Keras model to give finite outputs on the verification inputs. Received: "
                f"{int((~np.isfinite(e)).sum())} NaN/Inf output values: the model itself is broken on these inputs "
                "(check its weights or pass other `sample_inputs`); raising the tolerances would not help"
            )
    scales = [float(np.max(np.abs(e))) if e.size and np.issubdtype(e.dtype, np.number) else 0.0 for e in expected]
    again = [np.asarray(e) for e in _keras_outputs(model, xs)]
    out_names = _output_names(model, len(expected))
    for name, e, a, scale in zip(out_names, expected, again, scales):
        if e.shape != a.shape:
            diff = float("inf")
        elif not np.issubdtype(e.dtype, np.number):
            diff = 0.0 if np.array_equal(e, a) else float("inf")
        else:
            diff = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))) if e.size else 0.0
        if diff > tol["atol"] + tol["rtol"] * scale:
            layer = _stochastic_layer(*_layer_outputs_fn(model), xs)
            where = f" (first in layer {layer!r})" if layer else ""
            raise StochasticModelError(
                "Expected the Keras model to give the same outputs for the same inputs, so that the LiteRT file "
                f"can be compared with it. Received: output {name!r} differs by up to {diff:.3g} between two "
                f"identical calls{where}: a random layer (e.g. a VAE's sampling layer) makes verification "
                "meaningless. Export the deterministic part (e.g. the decoder), or pass verify=False to export "
                "unverified"
            )
    return expected, _roundoff(model, xs, expected)


def _signature_samples(content: bytes, specs, samples: List[List[np.ndarray]]) -> List[Dict[str, np.ndarray]]:
    """Samples keyed by the file's signature input names (matched to the Keras inputs by name, then shape)."""
    interpreter = _make_interpreter(content)
    in_details, _ = _io_details(interpreter)
    matched = _match([s[0] for s in specs], [_shape_key((None,) + s[1]) for s in specs], in_details, "input")
    keys = [d.get("key") or d["name"] for d in matched]
    return [{k: a for k, a in zip(keys, sample)} for sample in samples]


def _verify(
    model, content: bytes, xs: List[np.ndarray], atol: float, rtol: float, min_top1: Optional[float],
    ctol: float = 0.0, expected: Optional[List[np.ndarray]] = None, roundoff: Optional[List[float]] = None,
) -> VerificationResult:
    if expected is None:
        expected, roundoff = _reference_outputs(model, xs, {"atol": atol, "rtol": rtol, "ctol": ctol})
    roundoff = list(roundoff) if roundoff is not None else [0.0] * len(expected)
    got = run_tflite(content, xs, model=model)
    names = _output_names(model, len(expected))
    per_output = []
    passed = True
    abs_sum, count, top1s = 0.0, 0, []
    for name, e, g, noise in zip(names, expected, got, roundoff):
        e = np.asarray(e, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if e.shape != g.shape:
            raise VerificationError(
                f"The TFLite output {name!r} has shape {g.shape} but the Keras output has shape {e.shape}."
            )
        diff = np.abs(e - g)
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        spread = float(np.max(np.std(e, axis=0))) if e.ndim and e.shape[0] > 1 and e.size else 0.0
        max_err = float(diff.max()) if diff.size else 0.0
        top1 = None
        if e.ndim == 2 and e.shape[1] > 1:
            top1 = float(np.mean(np.argmax(e, axis=1) == np.argmax(g, axis=1)))
            top1s.append(top1)
        tolerance = atol + rtol * scale + ctol * noise
        ok = bool(np.isfinite(max_err) and max_err <= tolerance)
        passed = passed and ok
        abs_sum += float(diff.sum())
        count += diff.size
        per_output.append(
            {"name": name, "max_abs_error": max_err, "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
             "scale": scale, "spread": spread, "top1_agreement": top1, "passed": ok, "tolerance": tolerance,
             "roundoff": noise,
             "vacuous": spread <= tolerance}
        )
    top1_agreement = min(top1s) if top1s else None
    if min_top1 is not None and top1_agreement is not None and top1_agreement < min_top1:
        passed = False
    output_scale = max(p["scale"] for p in per_output)
    return VerificationResult(
        max_abs_error=max(p["max_abs_error"] for p in per_output),
        mean_abs_error=abs_sum / max(count, 1),
        top1_agreement=top1_agreement,
        passed=passed,
        num_samples=int(xs[0].shape[0]),
        output_scale=output_scale,
        atol=atol,
        rtol=rtol,
        min_top1=min_top1,
        per_output=per_output,
        output_spread=max(p["spread"] for p in per_output),
        vacuous=int(xs[0].shape[0]) < 2 or all(p["vacuous"] for p in per_output),
        roundoff=max(p["roundoff"] for p in per_output),
        ctol=ctol,
    )


def _is_fully_integer(content: bytes) -> bool:
    """Whether a converted model holds integer weights (an int8 model with no quantized tensor is float)."""
    interpreter = _make_interpreter(content)
    return any(np.issubdtype(d["dtype"], np.integer) and d["quantization"][0]
               for d in interpreter.get_tensor_details())


def _io_quantization(content: bytes) -> tuple:
    """Per input and output tensor: name, shape, dtype, and scale and zero point when quantized."""
    interpreter = _make_interpreter(content)
    in_details, out_details = _io_details(interpreter)

    def describe(d):
        scale, zero_point = d["quantization"]
        return {"name": d.get("key") or d["name"], "shape": tuple(int(x) for x in d["shape_signature"]),
                "dtype": np.dtype(d["dtype"]).name, "scale": float(scale) if scale else None,
                "zero_point": int(zero_point) if scale else None}

    return [describe(d) for d in in_details], [describe(d) for d in out_details]


def export_tflite(
    model: "keras.Model",
    path: Optional[Union[str, "os.PathLike[str]"]] = None,
    quantize: Optional[str] = None,
    representative_data: Any = None,
    verify: bool = True,
    int8_io: bool = False,
    sample_inputs: Any = None,
    overwrite: bool = False,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    min_top1: Optional[float] = None,
    num_calibration_samples: int = 200,
    num_verify_samples: int = 32,
    seed: int = 0,
    int8_backend: str = "quantizer",
    ctol: Optional[float] = None,
    batch_size: Optional[int] = None,
    unroll_rnn: bool = False,
    select_tf_ops: bool = False,
) -> ExportResult:
    """Convert a Keras model to LiteRT (``.tflite``), check it in LiteRT, and write it atomically.

    Works on tf_keras models and on Keras 3 models on every backend: the
    TensorFlow backend (and tf_keras) use the TFLite converter with built-in ops
    only; torch uses Keras' own ``model.export(format="litert")`` through
    litert-torch, without TensorFlow; JAX saves the model as ``.keras`` and
    converts it in a subprocess under the TensorFlow backend. Every file is
    verified here, against the model as given, in the LiteRT interpreter. A
    file that would need TensorFlow (Flex) or custom ops is a ``FlexOpError``:
    standalone LiteRT on phones cannot run it (``select_tf_ops=True`` lets
    TensorFlow ops in explicitly).

    ``quantize="int8"`` goes through the LiteRT Quantizer (``litert-quantizer``)
    by default: static int8 weights and activations calibrated on
    ``representative_data``, applied to the float32 file, with the
    quantizer's per-layer validation in ``result.quantizer_validation``. When
    the quantizer fails, or its file fails verification, the TFLite
    converter's own int8 is used instead (``result.fallback_reason`` says
    why). ``int8_backend="converter"`` asks for the converter directly.
    ``"float16"`` and ``"dynamic"`` use the converter, except ``"dynamic"`` on
    the torch backend, which uses the quantizer's dynamic-range recipe.

    A model still wrapped for pruning is stripped and rebuilt first
    (keras_rebuild's structured pruning wrappers via ``rebuild``, and
    tensorflow-model-optimization's ``prune_low_magnitude`` wrappers via
    ``strip_pruning`` on a copy). The model passed in is never modified.

    Input shapes. The file keeps the model's dynamic batch, with two
    exceptions. Models with recurrent layers (``LSTM``, ``GRU``,
    ``SimpleRNN``, ``Bidirectional``, ``ConvLSTM``) get a static batch of 1 by
    default: the converter turns their time loop into LiteRT built-ins (the
    fused ``UNIDIRECTIONAL_SEQUENCE_LSTM`` for tf_keras' LSTM, a ``WHILE``
    loop otherwise) only for a static batch, the batch an app runs anyway.
    ``unroll_rnn=True`` unrolls the loop instead (one copy of the cell per
    time step: a dynamic batch, a larger file, and the number of time steps
    must be fixed); ``batch_size`` sets any static batch. Dimensions the model
    leaves unknown (``Input((None, None, 3))``, as in pix2pix or U-Nets) take
    their sizes from ``sample_inputs``, else from ``representative_data``: the
    file gets that concrete shape.

    With ``verify=True`` the converted model runs in the LiteRT interpreter on
    sample inputs (``sample_inputs``, else the first samples of
    ``representative_data``, else seeded standard-normal inputs) and its
    outputs are compared with the Keras model's. Quantized inputs and outputs
    are (de)quantized with their scale and zero point, and tensors are matched
    to the Keras inputs and outputs by name, then shape. An output passes when
    ``max_abs_error <= atol + rtol * scale + ctol * roundoff``, where
    ``scale`` is its largest absolute Keras value and ``roundoff`` the
    largest change of the Keras output when the float inputs move by their
    own round-off (two float32 units in the last place): an output that is a
    small difference of large values, such as a Siamese distance, amplifies
    round-off far beyond its own scale. Defaults (``DEFAULT_TOLERANCES``):

    - ``"float32"``: ``atol=1e-6, rtol=1e-4, ctol=20`` (round-off only).
    - ``"float16"``: ``atol=1e-3, rtol=2e-2, ctol=4e4``.
    - ``"dynamic"`` and ``"int8"``: ``atol=1e-2, rtol=0.3, ctol=3e5`` --
      generous, to catch broken conversions, not to certify accuracy.

    Before converting, the Keras model is called twice on the same inputs: a
    model whose outputs differ (a random layer in ``call``, such as a VAE's
    sampling layer) cannot be verified, and is a ``StochasticModelError``
    naming the first layer that differs (export its deterministic part, or
    pass ``verify=False``).

    Top-1 agreement is reported for outputs of shape ``(batch, classes)`` and
    is only enforced when ``min_top1`` is given (on random inputs an untrained
    model's near-tied classes flip easily, so it is not checked by default).
    Nothing is written when verification fails.

    Args:
        model: A built Keras model (functional, Sequential, or built subclassed).
        path: Where to write the ``.tflite`` file. ``None`` keeps the bytes
            in memory only (``result.content``).
        quantize: ``None`` or ``"float32"`` (no quantization), ``"float16"``
            (float16 weights), ``"dynamic"`` (int8 weights, float activations)
            or ``"int8"`` (full integer; needs ``representative_data``).
        representative_data: Calibration inputs for ``"int8"``: a numpy array
            of samples ``(n, ...)``, a list or dict of arrays for multi-input
            models, a ``tf.data.Dataset`` or an iterable of batches (elements
            ``(x, y)`` are accepted; ``y`` is ignored). Also the sizes of
            unknown input dimensions when ``sample_inputs`` is not given.
        verify: Compare LiteRT with Keras before writing.
        int8_io: Make the input and output tensors int8 (microcontrollers,
            NPUs). Only valid with ``quantize="int8"``.
        sample_inputs: Inputs to verify on (same forms as ``representative_data``
            for a single batch). They also give unknown input dimensions
            their sizes in the file.
        overwrite: Replace an existing file at ``path``.
        atol: Absolute verification tolerance; default per mode (see above).
        rtol: Verification tolerance relative to each output's scale.
        min_top1: Minimum top-1 agreement (0..1) required to pass, or ``None``.
        num_calibration_samples: At most this many representative samples are
            used for calibration.
        num_verify_samples: Samples used for verification when
            ``sample_inputs`` is not given.
        seed: Seed of the random verification inputs.
        int8_backend: ``"quantizer"`` (the LiteRT Quantizer, falling back to
            the converter) or ``"converter"`` (the TFLite converter's own
            int8, as before; needs TensorFlow) for ``quantize="int8"``.
        ctol: Verification tolerance as a multiple of each output's
            round-off (see above); default per mode. ``0`` judges every
            output by its own scale only.
        batch_size: A static batch for the file's inputs, or ``None``: a
            dynamic batch, or 1 for models with recurrent layers (see above).
        unroll_rnn: Unroll the time loop of recurrent layers (needs a fixed
            number of time steps) and keep a dynamic batch, instead of the
            default static batch of 1.
        select_tf_ops: Explicit opt-in to TensorFlow ops (``SELECT_TF_OPS``)
            where LiteRT has no built-in op (e.g. ``tf.image.extract_patches``,
            tensor lists). The file then runs only with the Flex delegate
            (``org.tensorflow:tensorflow-lite-select-tf-ops`` on Android,
            several MB); ``result.flex_ops`` lists its TensorFlow ops and a
            warning says so. The LiteRT interpreter here has no Flex delegate,
            so such a file needs ``verify=False``. Only for the TFLite
            converter (not the torch backend's float32 path).

    Returns:
        An ``ExportResult`` with the path, sizes, verification numbers and
        the flatbuffer bytes (``result.content``).

    Raises:
        NotAModelError: If ``model`` is not a Keras model.
        FlexOpError: If the model needs TensorFlow (Flex) or custom ops (and
            ``select_tf_ops`` is not set), naming the op and the layer.
        ConversionError: If the converter fails otherwise (its message, and
            the layer where it tells).
        LiteRTRuntimeError: If the converted file fails in the LiteRT
            interpreter (its message, and the op and layer where it tells).
        InvalidArgumentError: For an unknown ``quantize``, ``"int8"`` without
            ``representative_data``, ``int8_io`` without ``"int8"``,
            malformed data, or unknown input dimensions without
            ``sample_inputs`` or ``representative_data``.
        OutputExistsError: If ``path`` exists and ``overwrite`` is False.
        StochasticModelError: If the Keras model's outputs differ between
            two identical calls (verification would be meaningless).
        VerificationError: If the TFLite outputs are outside tolerance.

    Example:
        >>> (x, y), (xt, yt) = load_digits()                                 # doctest: +SKIP
        >>> result = export_tflite(model, "digits_int8.tflite", quantize="int8",
        ...                        representative_data=x[:200])              # doctest: +SKIP
        >>> print(result)                                                   # doctest: +SKIP
    """
    if not _is_model(model):
        raise NotAModelError(f"Expected `model` to be a keras.Model. Received: {received('model', model)}")
    mode = "float32" if quantize is None else quantize
    if int8_backend not in INT8_BACKENDS:
        raise InvalidArgumentError(
            f"Expected `int8_backend` to be one of {INT8_BACKENDS}. Received: {received('int8_backend', int8_backend)}"
        )
    if mode not in QUANTIZE_MODES:
        raise InvalidArgumentError(
            f"Expected `quantize` to be one of {(None,) + QUANTIZE_MODES}. Received: {received('quantize', quantize)}"
        )
    if int8_io and mode != "int8":
        raise InvalidArgumentError(
            "Expected `int8_io=True` only with quantize='int8' (integer input/output tensors need a fully "
            f"integer model). Received: int8_io=True, {received('quantize', quantize)}"
        )
    if mode == "int8" and representative_data is None:
        raise InvalidArgumentError(
            "Expected `representative_data` (e.g. a few hundred training inputs) with quantize='int8': "
            "full-integer quantization calibrates activation ranges on it. Received: representative_data=None"
        )
    for arg, value in (("atol", atol), ("rtol", rtol), ("ctol", ctol)):
        if value is not None and not value >= 0:
            raise InvalidArgumentError(f"Expected `{arg}` to be >= 0. Received: {received(arg, value)}")
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
        raise InvalidArgumentError(f"Expected `min_top1` to be in [0, 1]. Received: {received('min_top1', min_top1)}")
    for arg, value, low in (("num_calibration_samples", num_calibration_samples, 1),
                            ("num_verify_samples", num_verify_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentTypeError(f"Expected `{arg}` to be an int. Received: {received(arg, value)}")
        if value < low:
            raise InvalidArgumentError(f"Expected `{arg}` to be >= {low}. Received: {received(arg, value)}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise InvalidArgumentTypeError(
                f"Expected `batch_size` to be an int or None. Received: {received('batch_size', batch_size)}"
            )
        if batch_size < 1:
            raise InvalidArgumentError(
                f"Expected `batch_size` to be >= 1. Received: {received('batch_size', batch_size)}"
            )
    for arg, value in (("unroll_rnn", unroll_rnn), ("select_tf_ops", select_tf_ops)):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgumentTypeError(f"Expected `{arg}` to be a bool. Received: {received(arg, value)}")
    if path is not None:
        check_output_path(path, overwrite=overwrite, arg="path")
        path = os.fspath(path)

    specs = _input_specs(model)
    prepared = _prepare_model(model)
    backend = _keras_backend(prepared)
    converter_on_torch = mode == "float16" or (mode == "int8" and int8_backend == "converter")
    if select_tf_ops and backend == "torch" and not converter_on_torch:
        raise InvalidArgumentError(
            "Expected `select_tf_ops=True` only where the TFLite converter converts (tf_keras, Keras 3 on "
            "TensorFlow or JAX): the torch backend's litert-torch has no TensorFlow ops. Received: "
            "select_tf_ops=True on the torch backend"
        )
    low_precision = _is_low_precision(prepared)
    if low_precision:
        logger.info("Model computes in float16/bfloat16: exporting a float32 copy of it (%s).", mode)
        prepared = _float32_copy(prepared)
    recurrent = _has_recurrent_layers(prepared)
    if unroll_rnn and recurrent:
        prepared = _unrolled_copy(prepared, specs)
    calibration = None
    if representative_data is not None:
        limit = max(num_calibration_samples, num_verify_samples) if mode == "int8" else num_verify_samples
        calibration = _representative_batches(representative_data, specs, limit)
    xs = None
    if sample_inputs is not None:
        xs = _as_sample_list(sample_inputs, specs, "sample_inputs")

    # The file's input shapes: concrete sizes for unknown dimensions, a static batch for recurrent layers.
    file_specs = _concrete_specs(specs, xs, calibration)
    static_batch = batch_size
    if static_batch is None and recurrent and not unroll_rnn:
        static_batch = 1
        logger.info("Model has recurrent layers: exporting with a static batch of 1 (batch_size=1; "
                    "unroll_rnn=True unrolls the time loop instead).")
    shapes = None
    if static_batch is not None or file_specs != specs:
        shapes = [(static_batch,) + tuple(shape) for _, shape, _ in file_specs]

    logger.info("Converting %s to LiteRT (%s).", model.name, mode)
    cal = calibration[:num_calibration_samples] if calibration else None
    if verify and xs is None:
        if calibration is not None:
            xs = _concat_samples(calibration[:num_verify_samples])
        else:
            xs = _random_inputs(file_specs, num_verify_samples, seed)
    # A float16/mixed-precision model is only as exact as float16.
    tol = dict(DEFAULT_TOLERANCES["float16" if low_precision and mode == "float32" else mode])
    tol["atol"] = tol["atol"] if atol is None else float(atol)
    tol["rtol"] = tol["rtol"] if rtol is None else float(rtol)
    tol["ctol"] = tol["ctol"] if ctol is None else float(ctol)
    names = _c_layer_names(model) + _c_layer_names(prepared)
    reference = _reference_outputs(model, xs, tol) if verify else None

    def check(content: bytes) -> Optional[VerificationResult]:
        check_builtin_only(content, names, allow_flex=select_tf_ops)
        if not verify:
            return None
        # Compare with the model as given (not the stripped/rebuilt copy), so
        # stripping and rebuilding are checked end to end too.
        verification = _verify(model, content, xs, atol=tol["atol"], rtol=tol["rtol"], min_top1=min_top1,
                               ctol=tol["ctol"], expected=reference[0], roundoff=reference[1])
        logger.info("%s", verification)
        if not verification.passed:
            details = "; ".join(
                f"{p['name']}: max abs error {p['max_abs_error']:.3g} (scale {p['scale']:.3g}, "
                f"tolerance {p['tolerance']:.3g}"
                + (f", top-1 agreement {100 * p['top1_agreement']:.1f}%" if p["top1_agreement"] is not None else "")
                + ")"
                for p in verification.per_output
            )
            raise VerificationError(
                f"The {mode} TFLite model does not match the Keras model: {verification}. Per output: {details}. "
                f"Nothing was written; raise `atol`/`rtol`/`ctol`/lower `min_top1`, or pass verify=False to export "
                "anyway."
            )
        return verification

    made_by, used_int8, fallback, qvalidation = "tflite-converter", None, None, None
    use_quantizer = (mode == "int8" and int8_backend == "quantizer") or (mode == "dynamic" and backend == "torch")
    content = None
    if use_quantizer:
        from keras_rebuild.export import quantize as _q

        try:
            float_content, made_by = _float32_file(prepared, specs, shapes, select_tf_ops)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the final file's check warns about Flex ops
                check_builtin_only(float_content, names, allow_flex=select_tf_ops)
            val = cal[: min(len(cal), 16)] if cal else _random_sample_list(file_specs, 4, seed)
            content, qvalidation = _q.quantize(
                float_content, mode,
                calibration=_signature_samples(float_content, file_specs, cal) if cal else None,
                validation_samples=_signature_samples(float_content, file_specs, val),
                int8_io=int8_io,
            )
            if mode == "int8" and not _is_fully_integer(content):
                raise VerificationError("the quantizer left the model in float")
            verification = check(content)
            used_int8 = "quantizer"
        except (FlexOpError, ConversionError, StochasticModelError):
            raise
        except (ImportError, ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            if mode == "dynamic" and backend == "torch":
                raise UnsupportedModelError(
                    "Expected the LiteRT Quantizer to quantize the model (dynamic-range int8 on the torch backend). "
                    f"Received: {type(exc).__name__}: {exc}"
                ) from exc
            fallback = f"the LiteRT Quantizer failed ({type(exc).__name__}: {str(exc)[:300]}); used the converter"
            logger.warning("int8 export: %s.", fallback)
            content, qvalidation = None, None
    if content is None and mode == "float32":
        content, made_by = _float32_file(prepared, specs, shapes, select_tf_ops)
        verification = check(content)
    elif content is None:
        content = _convert(prepared, mode, int8_io, cal, specs, shapes, select_tf_ops)
        made_by = "tflite-converter" if backend in ("tf_keras", "tensorflow") else \
            "tflite-converter (subprocess, tensorflow backend)"
        if mode in ("int8", "dynamic"):
            used_int8 = "converter"
        if mode == "int8" and not _is_fully_integer(content):
            raise VerificationError(
                "Expected the int8 model to compute in integers. Received: the converter left float operations "
                "(too little calibration data?); nothing was written"
            )
        verification = check(content)

    if path is not None:
        write_bytes(path, content, overwrite=overwrite, arg="path")
        logger.info("Wrote %s (%d bytes).", path, len(content))
    inputs_q, outputs_q = _io_quantization(content)
    from keras_rebuild.export.flatbuffer import flex_ops as _flex_ops

    return ExportResult(
        path=path,
        size_bytes=len(content),
        gzipped_size_bytes=len(gzip.compress(content, compresslevel=9, mtime=0)),
        quantize=mode,
        int8_io=bool(int8_io),
        verification=verification,
        inputs=inputs_q,
        outputs=outputs_q,
        converter=made_by,
        int8_backend=used_int8,
        fallback_reason=fallback,
        quantizer_validation=qvalidation,
        flex_ops=_flex_ops(content) if select_tf_ops else [],
        _content=content if path is None else None,
    )


def _concrete_specs(specs, xs: Optional[List[np.ndarray]], calibration) -> List[tuple]:
    """``specs`` with unknown dimensions sized from ``sample_inputs`` (``xs``), else the representative data.

    Raises:
        InvalidArgumentError: If a dimension is unknown and no data is given, or the representative
            samples disagree with the sizes chosen.
    """
    unknown = [name for name, shape, _ in specs if any(d is None for d in shape)]
    if not unknown:
        return specs
    source = xs if xs is not None else (calibration[0] if calibration else None)
    if source is None:
        shapes = ", ".join(f"{name!r} {_fmt_shape(shape)}" for name, shape, _ in specs if name in unknown)
        raise InvalidArgumentError(
            f"Expected `sample_inputs` (or `representative_data`) for a model with inputs of unknown size: "
            f"{shapes}. Their sizes become the exported file's input shape (LiteRT's GPU and NPU delegates "
            "need static shapes). Received: sample_inputs=None, representative_data=None"
        )
    out = [(name, tuple(a.shape[1:]), dtype) for (name, _, dtype), a in zip(specs, source)]
    for sample in calibration or []:
        for (name, shape, _), a in zip(out, sample):
            if tuple(a.shape[1:]) != shape:
                raise InvalidArgumentError(
                    f"Expected every `representative_data` sample for input {name!r} to have the size "
                    f"{_fmt_shape(shape)} (taken from {'sample_inputs' if xs is not None else 'its first sample'}"
                    f"), the exported file's input shape. Received: a sample of shape {_fmt_shape(a.shape[1:])}"
                )
    logger.info("Inputs of unknown size exported as %s.", ", ".join(f"{n!r} {_fmt_shape(s)}" for n, s, _ in out))
    return out


def _is_model(model) -> bool:
    flavour = _flavour(model)
    if flavour == "keras3":
        import keras

        return isinstance(model, keras.Model)
    if flavour == "tf_keras":
        from keras_rebuild._compat import keras

        return isinstance(model, keras.Model)
    return False


def _keras_backend(model) -> str:
    from keras_rebuild.export.convert import keras_backend_of

    return keras_backend_of(model)


def _c_layer_names(model) -> List[str]:
    from keras_rebuild.export.convert import layer_names

    return layer_names(model)


def _random_sample_list(specs, n: int, seed: int) -> List[List[np.ndarray]]:
    xs = _random_inputs(specs, n, seed)
    return [[a[i : i + 1] for a in xs] for i in range(n)]


# --------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------


_RSS_RESOLUTION = 1 << 20


def _rss_bytes() -> tuple:
    """``(current RSS in bytes or None, method)``."""
    try:
        import psutil

        return psutil.Process().memory_info().rss, "psutil RSS delta"
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm RSS delta"
    except (OSError, ValueError, IndexError, AttributeError):
        return None, "unavailable"


def _benchmark_inputs(interpreter, in_details, inputs, seed: int = 0) -> None:
    """Set benchmark inputs (random if ``inputs`` is None) and allocate.

    Random inputs: normal floats, quantized integers over their range, and
    zeros for plain integer inputs (token or position ids, which a gather
    reads: 0 is the one id every vocabulary has).
    """
    if inputs is None:
        rng = np.random.default_rng(seed)
        xs = []
        for d in in_details:
            shape = [int(s) for s in d["shape"]]
            scale = (d.get("quantization") or (0.0, 0))[0]
            if np.issubdtype(d["dtype"], np.integer) and not scale:
                xs.append(np.zeros(shape, d["dtype"]))
            elif np.issubdtype(d["dtype"], np.integer):
                info = np.iinfo(d["dtype"])
                xs.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(d["dtype"]))
            else:
                xs.append(rng.normal(size=shape).astype(d["dtype"]))
    else:
        if isinstance(inputs, Mapping):
            inputs = [inputs[d.get("key") or d["name"]] for d in in_details]
        elif not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        xs = [np.asarray(a) for a in inputs]
        if len(xs) != len(in_details):
            raise InvalidArgumentError(
                f"Expected `inputs` to hold {len(in_details)} array(s). Received: {len(xs)} array(s)"
            )
        _resize_inputs(interpreter, in_details, xs)
    for d, x in zip(in_details, xs):
        interpreter.set_tensor(d["index"], _quantize_input(x, d))


def _check_counts(num_threads, runs, warmup, rounds=1):
    for name, value, low in (("num_threads", num_threads, 1), ("runs", runs, 1), ("warmup", warmup, 0),
                             ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentTypeError(f"Expected `{name}` to be an int. Received: {received(name, value)}")
        if value < low:
            raise InvalidArgumentError(f"Expected `{name}` to be >= {low}. Received: {received(name, value)}")


def _time_invokes(interpreter, n: int) -> List[float]:
    times = []
    invoke = interpreter.invoke
    for _ in range(n):
        t0 = time.perf_counter()
        invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def benchmark_tflite(
    path_or_bytes: PathOrBytes,
    num_threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    inputs: Any = None,
) -> BenchmarkResult:
    """Measure single-inference latency of a TFLite model in the LiteRT interpreter.

    Only ``interpreter.invoke()`` is timed (``time.perf_counter``), after
    ``warmup`` untimed runs (at least one, which also sizes the lazily
    allocated buffers). Inputs are set once before timing.

    Args:
        path_or_bytes: Path of a ``.tflite`` file, its bytes, or an ``ExportResult``.
        num_threads: Interpreter threads.
        runs: Number of timed runs.
        warmup: Number of untimed warm-up runs.
        inputs: Inputs to run on (array, list in the interpreter's input order,
            or dict keyed by signature input name). Default: random values of
            the model's input shape (batch 1).

    Returns:
        A ``BenchmarkResult`` with median, mean and p90 latency in ms, the
        file size and an approximate interpreter memory figure (process RSS
        growth across interpreter creation and ``allocate_tensors()``).

    Raises:
        InvalidArgumentError: If a count is out of range or inputs do not fit.

    Example:
        >>> result = export_tflite(model, quantize="dynamic")   # doctest: +SKIP
        >>> print(benchmark_tflite(result.content, runs=100))   # doctest: +SKIP
    """
    _check_counts(num_threads, runs, warmup)
    content = _load_content(path_or_bytes)
    rss0, method = _rss_bytes()
    interpreter = _make_interpreter(content, num_threads=num_threads)
    interpreter.allocate_tensors()
    rss1, _ = _rss_bytes()
    memory = None if rss0 is None or rss1 is None else max(0, rss1 - rss0)
    in_details, _ = _io_details(interpreter)
    _benchmark_inputs(interpreter, in_details, inputs)
    interpreter.invoke()  # first warm-up run, also for the memory figure
    rss2, _ = _rss_bytes()
    memory_first = None if rss0 is None or rss2 is None else max(0, rss2 - rss0)
    if memory is not None and max(memory, memory_first or 0) < _RSS_RESOLUTION:
        # Below page/allocator resolution: an RSS delta of ~0 B says nothing. Report it as not measured.
        memory = memory_first = None
        method = f"not measured (process RSS changed by less than {_fmt_bytes(_RSS_RESOLUTION)})"
    _time_invokes(interpreter, max(warmup - 1, 0))
    times = _time_invokes(interpreter, runs)
    arr = np.asarray(times)
    return BenchmarkResult(
        median_ms=float(np.median(arr)),
        mean_ms=float(arr.mean()),
        p90_ms=float(np.percentile(arr, 90)),
        min_ms=float(arr.min()),
        runs=runs,
        warmup=warmup,
        num_threads=num_threads,
        size_bytes=len(content),
        memory_bytes=memory,
        memory_method=method if memory is None and method.startswith("not measured") else method + " (approximate)",
        memory_after_first_invoke_bytes=memory_first,
        times_ms=times,
    )


def compare_latency(
    paths_or_bytes: Mapping[str, PathOrBytes],
    num_threads: int = 1,
    runs: int = 10,
    rounds: int = 5,
    warmup: int = 5,
) -> LatencyComparison:
    """Time several TFLite models interleaved, so machine noise hits all alike.

    Every variant gets its own interpreter and ``warmup`` untimed runs; then,
    in each of ``rounds`` rounds, each variant runs ``runs`` timed
    ``invoke()`` calls in turn (the starting variant rotates every round).
    Each variant is thus timed ``runs * rounds`` times.

    Args:
        paths_or_bytes: ``{name: path, bytes or ExportResult}``; the first
            entry is the baseline of the ratios.
        num_threads: Interpreter threads.
        runs: Timed runs per variant per round.
        rounds: Round-robin rounds.
        warmup: Untimed warm-up runs per variant.

    Returns:
        A ``LatencyComparison`` with per-variant median latency (ms) and the
        ratio of each median to the first variant's.

    Raises:
        InvalidArgumentError: If ``paths_or_bytes`` is empty or a count is out of range.

    Example:
        >>> cmp = compare_latency({"dense": "dense.tflite", "pruned": "pruned.tflite"})  # doctest: +SKIP
        >>> cmp.ratios["pruned"]                                                         # doctest: +SKIP
        0.52
    """
    _check_counts(num_threads, runs, warmup, rounds)
    if not isinstance(paths_or_bytes, Mapping) or not paths_or_bytes:
        raise InvalidArgumentError(
            "Expected `paths_or_bytes` to be a non-empty dict {name: path or bytes}. "
            f"Received: {received('paths_or_bytes', paths_or_bytes)}"
        )
    names = list(paths_or_bytes)
    interpreters = {}
    for name in names:
        interpreter = _make_interpreter(_load_content(paths_or_bytes[name]), num_threads=num_threads)
        interpreter.allocate_tensors()
        in_details, _ = _io_details(interpreter)
        _benchmark_inputs(interpreter, in_details, None)
        _time_invokes(interpreter, warmup)
        interpreters[name] = interpreter
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].extend(_time_invokes(interpreters[name], runs))
    medians = {name: float(np.median(times[name])) for name in names}
    base = medians[names[0]]
    ratios = {name: (medians[name] / base if base > 0 else float("nan")) for name in names}
    return LatencyComparison(
        medians_ms=medians, ratios=ratios, times_ms=times, num_threads=num_threads, runs=runs, rounds=rounds
    )


__all__ = [
    "export_tflite",
    "ExportResult",
    "VerificationResult",
    "run_tflite",
    "benchmark_tflite",
    "BenchmarkResult",
    "compare_latency",
    "LatencyComparison",
    "QUANTIZE_MODES",
    "DEFAULT_TOLERANCES",
]
