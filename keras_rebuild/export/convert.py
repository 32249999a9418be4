"""Convert a Keras model to a ``.tflite`` flatbuffer: one path per Keras flavour and backend.

* tf_keras, and Keras 3 on TensorFlow: the TFLite converter with built-in ops
  only (``TFLiteConverter.from_keras_model`` for tf_keras; a Keras 3 model is
  first written as a SavedModel with ``model.export(format="tf_saved_model")``
  so its variables are frozen). float16, dynamic-range and the converter's own
  ("legacy") int8 are converter options.
* Keras 3 on torch: Keras' own ``model.export(format="litert")``, which goes
  through litert-torch; TensorFlow is not imported. The file has a fixed
  batch size of 1.
* Keras 3 on JAX (Keras has no LiteRT export there), and the converter's
  options on torch: the model is saved as ``.keras`` and converted by a
  subprocess running Keras on TensorFlow (or torch for float32 when
  TensorFlow is missing), see :mod:`keras_rebuild.export._worker`.

Every path takes ``shapes``: one full input shape per model input (batch
axis first), used instead of the model's own where given: a static batch
(recurrent layers convert to LiteRT's built-in loops only with one) and
concrete sizes for dimensions the model leaves unknown.

A TensorFlow op the built-in op set lacks is a :class:`FlexOpError` (unless
``select_tf_ops`` lets TensorFlow ops in); any other converter failure is a
:class:`~keras_rebuild.errors.ConversionError`.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from keras_rebuild.errors import ConversionError, UnsupportedModelError
from keras_rebuild.export.flatbuffer import FlexOpError, converter_error, flex_error_from_converter

Shapes = Optional[Sequence[Sequence[Optional[int]]]]

WORKER_TIMEOUT_S = 900


def keras_backend_of(model) -> str:
    """``"tf_keras"``, or the Keras 3 backend (``"tensorflow"``, ``"jax"``, ``"torch"``) of a model."""
    from keras_rebuild.backends import flavour_of

    if flavour_of(model) == "tf_keras":
        return "tf_keras"
    import keras

    return keras.backend.backend()


def layer_names(model) -> List[str]:
    names, stack = [], list(getattr(model, "layers", []) or [])
    while stack:
        layer = stack.pop()
        names.append(layer.name)
        stack.extend(getattr(layer, "layers", []) or [])
        inner = getattr(layer, "layer", None)
        if inner is not None:
            stack.append(inner)
    return names


def _run_converter(converter, names: Sequence[str], select_tf_ops: bool = False) -> bytes:
    with warnings.catch_warnings():
        # The converter's own calibrator uses tf.lite.Interpreter internally.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected.*")
        try:
            return bytes(converter.convert())
        except Exception as exc:  # ConverterError lives in TensorFlow's private modules
            if type(exc).__name__ != "ConverterError" and not isinstance(exc, (RuntimeError, ValueError)):
                raise
            flex = None if select_tf_ops else flex_error_from_converter(str(exc), names)
            if flex is None:
                raise converter_error(str(exc), names) from None
            if "could not be told" in str(flex):
                _locate_flex_layers(converter, names)  # raises a FlexOpError naming the layer when it can
            raise flex from None


def _locate_flex_layers(converter, names: Sequence[str]) -> None:
    """Convert once more with TensorFlow ops allowed, to read the layer from the Flex op's tensor names."""
    import tensorflow as tf

    from keras_rebuild.export.flatbuffer import check_builtin_only

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter._experimental_lower_tensor_list_ops = False
    try:
        content = bytes(converter.convert())
    except Exception:  # nothing more to learn
        return
    try:
        check_builtin_only(content, names)
    except FlexOpError as located:
        if "could not be told" not in str(located):
            raise located from None


def _configure(converter, tf, quantize: str, int8_io: bool, calibration, specs, select_tf_ops: bool = False) -> None:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        names = [s[0] for s in specs]
        dtypes = [s[2] for s in specs]

        def representative_dataset():
            for sample in calibration:
                # Dicts keyed by input name: the converter's own input order may differ from Keras's.
                # Each input keeps its own dtype (integer ids stay integers, e.g. for an Embedding).
                yield {n: a.astype(dtype, copy=False) for n, a, dtype in zip(names, sample, dtypes)}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    if select_tf_ops:
        # The explicit opt-in: TensorFlow ops (run by the Flex delegate) where LiteRT has no built-in,
        # tensor lists kept as they are rather than lowered.
        converter.target_spec.supported_ops = list(converter.target_spec.supported_ops) + [
            tf.lite.OpsSet.SELECT_TF_OPS]
        converter._experimental_lower_tensor_list_ops = False


def _full_shapes(specs, shapes: Shapes) -> List[tuple]:
    if shapes is None:
        return [(None,) + tuple(shape) for _, shape, _ in specs]
    return [tuple(None if d is None else int(d) for d in shape) for shape in shapes]


@contextlib.contextmanager
def _generic_rnn_loops(model):
    """Trace tf_keras' LSTM and GRU layers through their generic time loop while converting.

    Their default (cuDNN-compatible) function is fused by the converter into
    LiteRT's ``UNIDIRECTIONAL_SEQUENCE_LSTM``, whose state lives in variable
    tensors that carry over from one ``invoke()`` to the next: the file would
    answer the same input differently each time unless the app resets it. The
    generic loop converts to a ``WHILE`` loop that starts from zero each call,
    as the Keras layer does (and as Keras 3 models convert).
    """
    changed, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if getattr(layer, "_could_use_gpu_kernel", False) is True:
            layer._could_use_gpu_kernel = False
            changed.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
        for attr in ("layer", "forward_layer", "backward_layer"):
            inner = getattr(layer, attr, None)
            if inner is not None:
                stack.append(inner)
    try:
        yield
    finally:
        for layer in changed:
            layer._could_use_gpu_kernel = True


def convert_tf_keras(model, quantize: str, int8_io: bool, calibration, specs, shapes: Shapes = None,
                     select_tf_ops: bool = False) -> bytes:
    """The TFLite converter on a tf_keras model."""
    with _generic_rnn_loops(model):
        return _convert_tf_keras(model, quantize, int8_io, calibration, specs, shapes, select_tf_ops)


def _convert_tf_keras(model, quantize, int8_io, calibration, specs, shapes, select_tf_ops) -> bytes:
    from keras_rebuild._compat import tf

    if getattr(model, "inputs", None) and shapes is None:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    else:  # a built subclassed model, or given shapes: trace it on an input signature
        signature = [tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
                     for (name, _, dtype), shape in zip(specs, _full_shapes(specs, shapes))]

        @tf.function(input_signature=signature)
        def serve(*xs):
            return model(list(xs) if len(xs) > 1 else xs[0], training=False)

        converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)
    _configure(converter, tf, quantize, int8_io, calibration, specs, select_tf_ops)
    return _run_converter(converter, layer_names(model), select_tf_ops)


def keras3_input_signature(model, specs, shapes: Shapes):
    """Keras' own input signature of ``model`` (the structure ``model.export`` takes), with ``shapes``; or ``None``."""
    if shapes is None:
        return None
    import keras

    full = _full_shapes(specs, shapes)
    try:
        from keras.src.export.export_utils import get_input_signature

        signature = get_input_signature(model)
        leaves = keras.tree.flatten(signature)
    except (ImportError, TypeError, ValueError, AttributeError):
        leaves, signature = [], None
    if signature is None or len(leaves) != len(full):
        return [keras.InputSpec(shape=shape, dtype=np.dtype(dtype).name, name=name)
                for (name, _, dtype), shape in zip(specs, full)]
    new = [keras.InputSpec(shape=shape, dtype=getattr(leaf, "dtype", None) or np.dtype(spec[2]).name,
                           name=getattr(leaf, "name", None))
           for leaf, spec, shape in zip(leaves, specs, full)]
    return keras.tree.pack_sequence_as(signature, new)


def convert_keras3_tensorflow(model, quantize: str, int8_io: bool, calibration, specs, shapes: Shapes = None,
                              select_tf_ops: bool = False) -> bytes:
    """The TFLite converter on a Keras 3 model (TensorFlow backend), through a SavedModel."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="keras_rebuild_sm_") as folder:
        saved = os.path.join(folder, "saved_model")
        signature = keras3_input_signature(model, specs, shapes)
        kwargs = {} if signature is None else {"input_signature": signature}
        model.export(saved, format="tf_saved_model", verbose=False, **kwargs)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        _configure(converter, tf, quantize, int8_io, calibration, specs, select_tf_ops)
        return _run_converter(converter, layer_names(model), select_tf_ops)


def convert_keras3_torch(model, specs=None, shapes: Shapes = None) -> bytes:
    """Keras' own LiteRT export on the torch backend (litert-torch; no TensorFlow).

    Unknown dimensions become 1 in litert-torch's trace, so ``shapes`` gives
    them their sizes (and the batch, 1 when ``None``).
    """
    try:
        import litert_torch  # noqa: F401
    except ImportError as exc:
        raise UnsupportedModelError(
            "Expected the `litert-torch` package for LiteRT export on the torch backend "
            "(pip install keras-rebuild[torch]). Received: it is not installed"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="keras_rebuild_lt_") as folder:
        path = os.path.join(folder, "model.tflite")
        signature = keras3_input_signature(model, specs, shapes) if specs is not None else None
        kwargs = {} if signature is None else {"input_signature": signature}
        try:
            model.export(path, format="litert", verbose=False, **kwargs)
        except RuntimeError as exc:
            raise ConversionError(
                f"Expected litert-torch to convert the model. Received: {str(exc)[:2000]}"
            ) from None
        with open(path, "rb") as f:
            return f.read()


def _worker_backend(quantize: str, converter_needed: bool) -> str:
    """The backend the subprocess converts on: TensorFlow when it is installed (the converter), else torch."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        return "tensorflow"
    if converter_needed or quantize != "float32":
        raise UnsupportedModelError(
            "Expected TensorFlow to be installed for the converter's quantization "
            f"({quantize!r}). Received: it is not installed; use int8_backend='quantizer'"
        )
    return "torch"


def convert_in_subprocess(model, quantize: str, int8_io: bool, calibration, specs,
                          converter_needed: bool = False, shapes: Shapes = None, select_tf_ops: bool = False) -> bytes:
    """Save ``model`` as ``.keras`` and convert it in a subprocess under another Keras backend."""
    backend = _worker_backend(quantize, converter_needed)
    with tempfile.TemporaryDirectory(prefix="keras_rebuild_x_") as folder:
        model_path = os.path.join(folder, "model.keras")
        model.save(model_path)
        job: Dict[str, Any] = {"model": model_path, "out": os.path.join(folder, "model.tflite"),
                               "error": os.path.join(folder, "error.json"), "quantize": quantize,
                               "int8_io": bool(int8_io), "calibration": None,
                               "shapes": None if shapes is None else [list(s) for s in _full_shapes(specs, shapes)],
                               "select_tf_ops": bool(select_tf_ops)}
        if calibration:
            job["calibration"] = os.path.join(folder, "calibration.npz")
            np.savez(job["calibration"], **{f"input_{i}": np.concatenate([s[i] for s in calibration], axis=0)
                                            for i in range(len(calibration[0]))})
        job_path = os.path.join(folder, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        env = dict(os.environ, KERAS_BACKEND=backend)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.run([sys.executable, "-m", "keras_rebuild.export._worker", job_path], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=WORKER_TIMEOUT_S)
        if os.path.exists(job["error"]):
            with open(job["error"]) as f:
                err = json.load(f)
            cls = {"FlexOpError": FlexOpError, "ConversionError": ConversionError}.get(err["type"],
                                                                                      UnsupportedModelError)
            raise cls(err["message"])
        if proc.returncode != 0 or not os.path.exists(job["out"]):
            tail = proc.stderr.decode(errors="replace")[-2000:]
            raise UnsupportedModelError(
                f"Expected the model to convert under the {backend} backend (it was saved as .keras and "
                f"re-loaded there). Received: exit status {proc.returncode}: {tail}"
            )
        with open(job["out"], "rb") as f:
            return f.read()


__all__ = ["keras_backend_of", "convert_tf_keras", "convert_keras3_tensorflow", "convert_keras3_torch",
           "convert_in_subprocess", "layer_names"]
