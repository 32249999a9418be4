"""What recovery needs in both Keras flavours: argument checks and the distillation plan.

Nothing here imports Keras or TensorFlow: the flavour's ``keras`` module and a
``flatten`` function (``tf.nest.flatten`` for tf_keras, ``keras.tree.flatten``
for Keras 3) are passed in by the flavour modules.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Optional

from keras_rebuild.backends import flavour_of
from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NotAModelError,
    received,
)

logger = logging.getLogger("keras_rebuild.recover")

DEFAULT_DISTILLATION_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 4.0
DEFAULT_RECALIBRATION_STEPS = 100

EPSILON = 1e-7
CLASSIFICATION = ("softmax", "sigmoid")

# Normalised loss names (lower case, no "_") -> output family.
LOSS_FAMILIES = {
    "binarycrossentropy": "sigmoid",
    "binaryfocalcrossentropy": "sigmoid",
    "categoricalcrossentropy": "softmax",
    "sparsecategoricalcrossentropy": "softmax",
    "categoricalfocalcrossentropy": "softmax",
    "kldivergence": "softmax",
    "kld": "softmax",
    "kullbackleiblerdivergence": "softmax",
    "meansquarederror": "regression",
    "mse": "regression",
    "meanabsoluteerror": "regression",
    "mae": "regression",
    "meanabsolutepercentageerror": "regression",
    "mape": "regression",
    "meansquaredlogarithmicerror": "regression",
    "msle": "regression",
    "huber": "regression",
    "huberloss": "regression",
    "logcosh": "regression",
    "cosinesimilarity": "regression",
}


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def keras_of(value: Any, name: str):
    """The ``keras`` module of a model's flavour; raise if ``value`` is no Keras model."""
    flavour = flavour_of(value)
    if flavour is not None:
        from keras_rebuild.data import _keras

        keras = _keras(flavour)
        if isinstance(value, keras.Model):
            return keras
    raise NotAModelError(
        f"Expected `{name}` to be a `keras.Model`. "
        f"Received: {received(name, value)} of type {type(value).__name__}"
    )


def check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentTypeError(
            f"Expected `{name}` to be a number. "
            f"Received: {received(name, value)} of type {type(value).__name__}"
        )
    return float(value)


def check_temperature(value: Any) -> float:
    t = check_number(value, "temperature")
    if not (math.isfinite(t) and t > 0):
        raise InvalidArgumentError(
            f"Expected `temperature` to be a positive number. "
            f"Received: {received('temperature', value)}"
        )
    return t


def check_weight(value: Any) -> float:
    w = check_number(value, "distillation_weight")
    if not (0.0 <= w <= 1.0):
        raise InvalidArgumentError(
            "Expected `distillation_weight` to be a number in [0, 1]. "
            f"Received: {received('distillation_weight', value)}"
        )
    return w


def check_steps(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentTypeError(
            f"Expected `{name}` to be a positive integer"
            f"{' or None' if allow_none else ''}. Received: {received(name, value)}"
        )
    if value < 1:
        raise InvalidArgumentError(
            f"Expected `{name}` to be a positive integer. Received: {received(name, value)}"
        )
    return int(value)


def is_compiled(model) -> bool:
    """Whether a model of either flavour was compiled (``compiled`` on Keras 3)."""
    return bool(getattr(model, "compiled", False) or getattr(model, "_is_compiled", False))


def check_compiled(model) -> None:
    if not is_compiled(model) or getattr(model, "optimizer", None) is None:
        raise InvalidArgumentError(
            f"Model '{model.name}' is not compiled. recover() fine-tunes with the "
            "model's own optimizer and compiled loss (the hard-label loss): call "
            "`model.compile(optimizer=..., loss=..., metrics=...)` first. "
            f"Received: model={model.name!r} (uncompiled)"
        )


# --------------------------------------------------------------------------
# Output kinds: logits vs probabilities, classification vs regression
# --------------------------------------------------------------------------


def shapes_compatible(a, b) -> bool:
    """``TensorShape.is_compatible_with`` for tuples of ints/None (unknown rank: ``None``)."""
    if a is None or b is None:
        return True
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(x is None or y is None or int(x) == int(y) for x, y in zip(a, b))


def _activation_name(activation: Any) -> Optional[str]:
    if activation is None:
        return None
    if isinstance(activation, str):
        return activation.lower()
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def _producing_activation(tensor: Any, keras, flatten) -> Optional[str]:
    """Name of the activation that produces a symbolic Keras tensor, or None."""
    from keras_rebuild.backends import producer

    made_by = producer(tensor)
    if made_by is None:
        return None
    layer, tensor_index = made_by
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.Model):
        inner = getattr(layer, "outputs", None)
        if inner:
            inner = flatten(inner)
            if tensor_index < len(inner):
                return _producing_activation(inner[tensor_index], keras, flatten)
        return None
    if hasattr(layer, "activation"):
        return _activation_name(layer.activation) or "linear"
    return None


def _output_activations(model, keras, flatten) -> Optional[list]:
    try:
        outputs = model.outputs
    except AttributeError:
        return None
    if not outputs:
        return None
    return [_producing_activation(t, keras, flatten) for t in flatten(outputs)]


def _loss_info(model, index: int, keras) -> tuple:
    """(family, from_logits) of the compiled loss of output ``index``."""
    loss = getattr(model, "loss", None) if is_compiled(model) else None
    if isinstance(loss, dict):
        names = list(getattr(model, "output_names", None) or [])
        loss = loss.get(names[index]) if index < len(names) else None
    elif isinstance(loss, (list, tuple)):
        loss = loss[index] if index < len(loss) else None
    if loss is None:
        return None, None
    from_logits = None
    if isinstance(loss, str):
        name, from_logits = loss, False
    elif isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        name = type(loss).__name__
        if name == "LossFunctionWrapper" and fn is not None:
            name = getattr(fn, "__name__", name)
        try:
            from_logits = loss.get_config().get("from_logits", False)
        except Exception:  # custom losses without a config
            from_logits = None
    else:
        name = getattr(loss, "__name__", type(loss).__name__)
        from_logits = False
    family = LOSS_FAMILIES.get(name.lower().replace("_", ""))
    return family, (bool(from_logits) if from_logits is not None else None)


def plan_outputs(student, teacher, keras, flatten) -> list:
    """Decide, per output position, how to compare student and teacher.

    Returns a list of ``(task, student_is_prob, teacher_is_prob)`` where task is
    "softmax", "sigmoid" or "regression". Raises on count/shape mismatch.
    """
    s_outs = getattr(student, "outputs", None)
    t_outs = getattr(teacher, "outputs", None)
    n = None
    if s_outs and t_outs:
        s_outs, t_outs = flatten(s_outs), flatten(t_outs)
        if len(s_outs) != len(t_outs):
            raise InvalidArgumentError(
                f"Expected the teacher to have as many outputs as the student "
                f"'{student.name}' ({len(s_outs)}); outputs are matched by position. "
                f"Received: teacher={teacher.name!r} with {len(t_outs)} outputs"
            )
        for i, (s, t) in enumerate(zip(s_outs, t_outs)):
            if not shapes_compatible(tuple(s.shape)[1:], tuple(t.shape)[1:]):
                raise InvalidArgumentError(
                    f"Expected teacher output {i} to have the shape of student output "
                    f"{i} {tuple(s.shape)}. Received: teacher output shape={tuple(t.shape)}"
                )
        n = len(s_outs)
    s_acts = _output_activations(student, keras, flatten) or []
    t_acts = _output_activations(teacher, keras, flatten) or []
    if n is None:
        n = max(len(s_acts), len(t_acts), len(flatten(getattr(student, "loss", None) or [None])))

    plan = []
    for i in range(n):
        s_act = s_acts[i] if i < len(s_acts) else None
        t_act = t_acts[i] if i < len(t_acts) else None
        s_fam, s_fl = _loss_info(student, i, keras)
        t_fam, t_fl = _loss_info(teacher, i, keras)
        task = next(
            (k for k in (s_act, s_fam, t_act, t_fam) if k in CLASSIFICATION), "regression"
        )
        for who, act in (("student", s_act), ("teacher", t_act)):
            if act in CLASSIFICATION and act != task:
                raise InvalidArgumentError(
                    f"Expected student and teacher output {i} to be the same kind of "
                    f"classification output ({task}). Received: {who} output {i} "
                    f"ends with activation={act!r}"
                )

        def is_prob(act, fam, from_logits):
            if act in CLASSIFICATION:
                return True
            if fam in CLASSIFICATION and from_logits is not None:
                return not from_logits
            return False

        plan.append((task, is_prob(s_act, s_fam, s_fl), is_prob(t_act, t_fam, t_fl)))
    logger.info(
        "Distillation plan (per output: task, student gives probabilities, "
        "teacher gives probabilities): %s",
        plan,
    )
    return plan


def training_part(x, validation_split, flatten, map_structure):
    """The samples fit trains on when it holds out ``validation_split`` (arrays only)."""
    if not validation_split:
        return x
    leaves = flatten(x)
    if not leaves or not all(hasattr(v, "shape") and hasattr(v, "__getitem__") and len(v.shape) for v in leaves):
        return x
    split_at = int(math.floor(int(leaves[0].shape[0]) * (1.0 - validation_split)))
    return map_structure(lambda a: a[:split_at], x)
