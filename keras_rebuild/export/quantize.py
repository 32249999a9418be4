"""int8 through the LiteRT Quantizer (``litert-quantizer``, formerly ai-edge-quantizer).

The quantizer works on a float32 ``.tflite`` file, whatever produced it (the
TensorFlow converter, litert-torch), so it serves every Keras flavour and
backend without TensorFlow:

* ``static``: int8 weights and activations, calibrated on representative
  samples (recipe ``static_wi8_ai8``); the file has int8 inputs and outputs,
  which :func:`keras_rebuild.export.flatbuffer.add_float_io` turns into float32
  unless int8 I/O is asked for;
* ``dynamic``: int8 weights, float activations quantized on the fly
  (recipe ``dynamic_wi8_afp32``).

The quantizer's own side-by-side validation (float vs quantized model, every
tensor) is summarised in a :class:`QuantizerValidation`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizerValidation:
    """The LiteRT Quantizer's per-layer comparison of the quantized model with the float one.

    Attributes:
        metric: The error metric (``"mse"``).
        outputs: Error per model output tensor.
        worst_layers: The tensors (named after their layers) with the largest
            error, largest first: ``[(tensor name, error), ...]``.
        num_tensors: How many intermediate tensors were compared.
        num_samples: How many samples the comparison ran on.
    """

    metric: str
    outputs: Dict[str, float]
    worst_layers: List[Tuple[str, float]]
    num_tensors: int
    num_samples: int

    def __str__(self) -> str:
        outs = ", ".join(f"{k}: {v:.3g}" for k, v in self.outputs.items())
        worst = "; ".join(f"{k} {v:.3g}" for k, v in self.worst_layers[:3])
        return (f"quantizer validation ({self.metric}, {self.num_samples} samples, {self.num_tensors} tensors): "
                f"outputs {outs}; worst layers {worst}")


def available() -> bool:
    try:
        import litert_quantizer  # noqa: F401
    except ImportError:
        return False
    return True


def _signature(content: bytes):
    from ai_edge_litert.interpreter import Interpreter

    sigs = Interpreter(model_content=bytes(content)).get_signature_list()
    if len(sigs) != 1:
        raise ValueError(f"the LiteRT Quantizer needs a file with one signature; this one has {len(sigs)}")
    key = next(iter(sigs))
    return key, list(sigs[key]["inputs"])


def _signature_samples(key: str, samples: Sequence[Dict[str, np.ndarray]]):
    return {key: [dict(sample) for sample in samples]}


def _summarise(result, key: str, num_samples: int, top: int = 5) -> QuantizerValidation:
    sig = result.get_signature_comparison_result(key)

    def value(metrics):
        return float(next(iter(metrics.values()))) if metrics else float("nan")

    metric = str(next(iter(next(iter(sig.output_tensors.values()), {})), "mse"))
    inter = sorted(((name, value(m)) for name, m in sig.intermediate_tensors.items()),
                   key=lambda kv: -kv[1] if np.isfinite(kv[1]) else 0.0)
    # Fused tensor names list every op fused into them ("model/relu1/Relu;model/bn1/..."): keep the first.
    worst = [(name.split(";")[0], v) for name, v in inter[:top]]
    return QuantizerValidation(
        metric=metric,
        outputs={name: value(m) for name, m in sig.output_tensors.items()},
        worst_layers=worst,
        num_tensors=len(sig.intermediate_tensors),
        num_samples=num_samples,
    )


def _calibrate(float_content: bytes, data) -> dict:
    """Activation ranges: the minimum and maximum over all samples.

    ``Quantizer.calibrate`` keeps a moving average (factor 0.95) of each
    sample's min and max, which on batch-1 samples clips outliers: on the
    digits CNN it narrowed the logits' range so much that softmax outputs
    differed by 0.4 from Keras. The TFLite converter uses the overall min/max,
    and so do we (the quantizer's own ``min_max_update``).
    """
    from litert_quantizer import calibrator, recipe, recipe_manager
    from litert_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe.static_wi8_ai8())
    calib = calibrator.Calibrator(bytearray(float_content), num_threads=1,
                                  qsv_update_func=qsv_utils.min_max_update)
    calib.calibrate(data, manager)
    return calib.get_model_qsvs()


def quantize(
    float_content: bytes,
    mode: str,
    calibration: Optional[Sequence[Dict[str, np.ndarray]]] = None,
    validation_samples: Optional[Sequence[Dict[str, np.ndarray]]] = None,
    int8_io: bool = False,
) -> Tuple[bytes, Optional[QuantizerValidation]]:
    """Quantize a float32 ``.tflite`` with the LiteRT Quantizer.

    Args:
        float_content: The float32 flatbuffer (one signature).
        mode: ``"int8"`` (static, needs ``calibration``) or ``"dynamic"``.
        calibration: Samples, each a dict of batch-1 arrays keyed by the
            file's signature input names.
        validation_samples: Samples (same form) for the quantizer's validation.
        int8_io: Keep int8 input/output tensors (static only).

    Returns:
        ``(content, validation summary or None)``.

    Raises:
        ImportError: ``litert-quantizer`` is not installed.
        ValueError, RuntimeError: the quantizer cannot handle the model.
    """
    from litert_quantizer import quantizer as lq
    from litert_quantizer import recipe

    key, _ = _signature(float_content)
    qt = lq.Quantizer(bytearray(float_content))
    if mode == "int8":
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        calib = _calibrate(float_content, _signature_samples(key, calibration))
        result = qt.quantize(calib, enable_progress_report=False, enable_progress_bar=False)
    elif mode == "dynamic":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        result = qt.quantize(enable_progress_report=False, enable_progress_bar=False)
    else:
        raise ValueError(f"the LiteRT Quantizer path takes 'int8' or 'dynamic', not {mode!r}")
    content = bytes(result.quantized_model)
    summary = None
    if validation_samples:
        try:
            comparison = qt.validate(test_data=_signature_samples(key, validation_samples),
                                     num_threads=1)
            summary = _summarise(comparison, key, len(validation_samples))
        except Exception as exc:  # the summary is informative only
            logger.warning("The LiteRT Quantizer's validation failed (%s: %s); no per-layer summary.",
                           type(exc).__name__, exc)
    if mode == "int8" and not int8_io:
        from keras_rebuild.export.flatbuffer import add_float_io

        content = add_float_io(content)
    return content, summary


__all__ = ["QuantizerValidation", "quantize", "available"]
