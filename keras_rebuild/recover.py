"""Recover the accuracy of a pruned model: fine-tuning, distillation, BN recalibration.

Two public functions:

* ``recover(model, x, y, teacher=..., **fit_kwargs)``: a drop-in replacement
  for ``model.fit`` that optionally distils from a teacher (usually the
  unpruned model) and optionally re-estimates BatchNormalization statistics
  first.
* ``recalibrate_batchnorm(model, x)``: re-estimate the moving mean/variance of
  every BatchNormalization layer (nested models included) on a few batches,
  without touching any other weight.

How distillation plugs into ``fit``: for the duration of the call, the
student's own ``train_step``, ``test_step`` and ``reset_metrics`` are replaced
(on the instance only) by distillation-aware versions, then restored. So the
student's own ``fit`` runs: callbacks (``ModelCheckpoint``, ``EarlyStopping``,
``BackupAndRestore``, ``ReduceLROnPlateau``...) see and save the student, the
student's optimizer and its iteration counter carry on, and the returned
``History.model`` is the student. No wrapper model is ever saved.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Iterator, Optional

import numpy as np

from keras_rebuild._compat import keras, tf
from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NotAModelError,
    received,
)

logger = logging.getLogger(__name__)

__all__ = ["recover", "recalibrate_batchnorm"]

DEFAULT_DISTILLATION_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 4.0
DEFAULT_RECALIBRATION_STEPS = 100

_EPSILON = 1e-7
_CLASSIFICATION = ("softmax", "sigmoid")

# Normalised loss names (lower case, no "_") -> output family.
_LOSS_FAMILIES = {
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


def _check_model(value: Any, name: str) -> None:
    if not isinstance(value, keras.Model):
        raise NotAModelError(
            f"Expected `{name}` to be a `keras.Model`. "
            f"Received: {received(name, value)} of type {type(value).__name__}"
        )


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentTypeError(
            f"Expected `{name}` to be a number. "
            f"Received: {received(name, value)} of type {type(value).__name__}"
        )
    return float(value)


def _check_temperature(value: Any) -> float:
    t = _check_number(value, "temperature")
    if not (math.isfinite(t) and t > 0):
        raise InvalidArgumentError(
            f"Expected `temperature` to be a positive number. "
            f"Received: {received('temperature', value)}"
        )
    return t


def _check_weight(value: Any) -> float:
    w = _check_number(value, "distillation_weight")
    if not (0.0 <= w <= 1.0):
        raise InvalidArgumentError(
            "Expected `distillation_weight` to be a number in [0, 1]. "
            f"Received: {received('distillation_weight', value)}"
        )
    return w


def _check_steps(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
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


def _check_compiled(model: "keras.Model") -> None:
    if not getattr(model, "_is_compiled", False) or getattr(model, "optimizer", None) is None:
        raise InvalidArgumentError(
            f"Model '{model.name}' is not compiled. recover() fine-tunes with the "
            "model's own optimizer and compiled loss (the hard-label loss): call "
            "`model.compile(optimizer=..., loss=..., metrics=...)` first. "
            f"Received: model={model.name!r} (uncompiled)"
        )


# --------------------------------------------------------------------------
# Output kinds: logits vs probabilities, classification vs regression
# --------------------------------------------------------------------------


def _activation_name(activation: Any) -> Optional[str]:
    if activation is None:
        return None
    if isinstance(activation, str):
        return activation.lower()
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def _producing_activation(tensor: Any) -> Optional[str]:
    """Name of the activation that produces a symbolic Keras tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    layer = history.layer
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.Model):
        inner = getattr(layer, "outputs", None)
        if inner:
            inner = tf.nest.flatten(inner)
            if history.tensor_index < len(inner):
                return _producing_activation(inner[history.tensor_index])
        return None
    if hasattr(layer, "activation"):
        return _activation_name(layer.activation) or "linear"
    return None


def _output_activations(model: "keras.Model") -> Optional[list]:
    try:
        outputs = model.outputs
    except AttributeError:
        return None
    if not outputs:
        return None
    return [_producing_activation(t) for t in tf.nest.flatten(outputs)]


def _loss_info(model: "keras.Model", index: int) -> tuple:
    """(family, from_logits) of the compiled loss of output ``index``."""
    loss = getattr(model, "loss", None) if getattr(model, "_is_compiled", False) else None
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
    family = _LOSS_FAMILIES.get(name.lower().replace("_", ""))
    return family, (bool(from_logits) if from_logits is not None else None)


def _plan_outputs(student: "keras.Model", teacher: "keras.Model") -> list:
    """Decide, per output position, how to compare student and teacher.

    Returns a list of ``(task, student_is_prob, teacher_is_prob)`` where task is
    "softmax", "sigmoid" or "regression". Raises on count/shape mismatch.
    """
    s_outs = getattr(student, "outputs", None)
    t_outs = getattr(teacher, "outputs", None)
    n = None
    if s_outs and t_outs:
        s_outs, t_outs = tf.nest.flatten(s_outs), tf.nest.flatten(t_outs)
        if len(s_outs) != len(t_outs):
            raise InvalidArgumentError(
                f"Expected the teacher to have as many outputs as the student "
                f"'{student.name}' ({len(s_outs)}); outputs are matched by position. "
                f"Received: teacher={teacher.name!r} with {len(t_outs)} outputs"
            )
        for i, (s, t) in enumerate(zip(s_outs, t_outs)):
            if not tf.TensorShape(s.shape[1:]).is_compatible_with(t.shape[1:]):
                raise InvalidArgumentError(
                    f"Expected teacher output {i} to have the shape of student output "
                    f"{i} {tuple(s.shape)}. Received: teacher output shape={tuple(t.shape)}"
                )
        n = len(s_outs)
    s_acts = _output_activations(student) or []
    t_acts = _output_activations(teacher) or []
    if n is None:
        n = max(len(s_acts), len(t_acts), len(tf.nest.flatten(getattr(student, "loss", None) or [None])))

    plan = []
    for i in range(n):
        s_act = s_acts[i] if i < len(s_acts) else None
        t_act = t_acts[i] if i < len(t_acts) else None
        s_fam, s_fl = _loss_info(student, i)
        t_fam, t_fl = _loss_info(teacher, i)
        task = next(
            (k for k in (s_act, s_fam, t_act, t_fam) if k in _CLASSIFICATION), "regression"
        )
        for who, act in (("student", s_act), ("teacher", t_act)):
            if act in _CLASSIFICATION and act != task:
                raise InvalidArgumentError(
                    f"Expected student and teacher output {i} to be the same kind of "
                    f"classification output ({task}). Received: {who} output {i} "
                    f"ends with activation={act!r}"
                )

        def is_prob(act, fam, from_logits):
            if act in _CLASSIFICATION:
                return True
            if fam in _CLASSIFICATION and from_logits is not None:
                return not from_logits
            return False

        plan.append((task, is_prob(s_act, s_fam, s_fl), is_prob(t_act, t_fam, t_fl)))
    logger.info(
        "Distillation plan (per output: task, student gives probabilities, "
        "teacher gives probabilities): %s",
        plan,
    )
    return plan


def _to_logits(output: tf.Tensor, task: str, is_prob: bool) -> tf.Tensor:
    """Logits of a classification output (exact when Keras cached them)."""
    if not is_prob:
        return tf.cast(output, tf.float32)
    cached = getattr(output, "_keras_logits", None)
    if cached is not None:
        return tf.cast(cached, tf.float32)
    op_type = "Softmax" if task == "softmax" else "Sigmoid"
    if not isinstance(output, tf.__internal__.EagerTensor) and getattr(
        getattr(output, "op", None), "type", None
    ) == op_type:
        return tf.cast(output.op.inputs[0], tf.float32)
    p = tf.cast(output, tf.float32)
    if task == "softmax":  # logits up to a per-sample constant
        return tf.math.log(tf.clip_by_value(p, _EPSILON, 1.0))
    p = tf.clip_by_value(p, _EPSILON, 1.0 - _EPSILON)
    return tf.math.log(p) - tf.math.log1p(-p)


def _mean_over_features(values: tf.Tensor) -> tf.Tensor:
    rank = values.shape.rank
    if rank is not None and rank > 1:
        return tf.reduce_mean(values, axis=list(range(1, rank)))
    return values


def _per_sample_distillation(s_out, t_out, task, s_prob, t_prob, temperature):
    """Per-sample distillation loss, shape (batch,)."""
    if task == "regression":
        diff = tf.cast(s_out, tf.float32) - tf.stop_gradient(tf.cast(t_out, tf.float32))
        return _mean_over_features(tf.square(diff))
    zs = _to_logits(s_out, task, s_prob) / temperature
    zt = tf.stop_gradient(_to_logits(t_out, task, t_prob)) / temperature
    if task == "softmax":
        log_ps = tf.nn.log_softmax(zs, axis=-1)
        log_pt = tf.nn.log_softmax(zt, axis=-1)
        kl = tf.reduce_sum(tf.exp(log_pt) * (log_pt - log_ps), axis=-1)
    else:  # sigmoid: KL between Bernoulli distributions, per unit
        log_ps, log_1ms = tf.math.log_sigmoid(zs), tf.math.log_sigmoid(-zs)
        log_pt, log_1mt = tf.math.log_sigmoid(zt), tf.math.log_sigmoid(-zt)
        kl = tf.exp(log_pt) * (log_pt - log_ps) + tf.exp(log_1mt) * (log_1mt - log_1ms)
    return _mean_over_features(kl) * (temperature**2)


class _Distillation:
    """The distillation train/test steps installed on a student during ``recover``."""

    def __init__(self, student, teacher, weight, temperature):
        self.student = student
        self.teacher = teacher
        self.weight = weight
        self.temperature = temperature
        self.plan = _plan_outputs(student, teacher)
        names = list(getattr(student, "output_names", None) or [])
        with student.distribute_strategy.scope():
            self.total = keras.metrics.Mean(name="distillation_loss")
            self.per_output = []
            if len(self.plan) > 1:
                for i in range(len(self.plan)):
                    name = names[i] if i < len(names) else f"output_{i}"
                    self.per_output.append(keras.metrics.Mean(name=f"{name}_distillation_loss"))

    # -- loss ---------------------------------------------------------------
    def _terms(self, y_pred, t_pred, sample_weight):
        s_list, t_list = tf.nest.flatten(y_pred), tf.nest.flatten(t_pred)
        if len(s_list) != len(t_list) or len(s_list) != len(self.plan):
            raise InvalidArgumentError(
                f"Expected the teacher to return {len(s_list)} outputs like student "
                f"'{self.student.name}'. Received: {len(t_list)} teacher outputs"
            )
        weights = tf.nest.flatten(sample_weight) if sample_weight is not None else [None]
        if len(weights) != len(s_list):
            weights = [weights[0]] * len(s_list)
        terms = []
        for i, (s, t, plan, w) in enumerate(zip(s_list, t_list, self.plan, weights)):
            if not s.shape[1:].is_compatible_with(t.shape[1:]):
                raise InvalidArgumentError(
                    f"Expected teacher output {i} to have the shape of student output "
                    f"{i} {tuple(s.shape)}. Received: teacher output shape={tuple(t.shape)}"
                )
            per_sample = _per_sample_distillation(s, t, *plan, self.temperature)
            if w is not None:  # same reduction as Keras losses: sum(w * l) / batch
                w = tf.reshape(tf.cast(w, tf.float32), [-1])
                per_sample = per_sample * w
            terms.append(tf.reduce_mean(per_sample))
        return terms

    def _update_trackers(self, terms, batch):
        total = tf.add_n(terms)
        self.total.update_state(total, sample_weight=batch)
        for tracker, term in zip(self.per_output, terms):
            tracker.update_state(term, sample_weight=batch)
        return total

    def _logs(self):
        logs = self.student.get_metrics_result()
        logs[self.total.name] = self.total.result()
        for tracker in self.per_output:
            logs[tracker.name] = tracker.result()
        return logs

    # -- steps ----------------------------------------------------------------
    def train_step(self, data):
        model = self.student
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        t_pred = self.teacher(x, training=False)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            # The compiled loss tracks "loss" (hard loss + regularisation, like
            # fit/evaluate) and returns it already divided by the replica count.
            hard = model.compiled_loss(
                y, y_pred, sample_weight, regularization_losses=model.losses
            )
            terms = self._terms(y_pred, t_pred, sample_weight)
            soft = tf.add_n(terms) / replicas
            reg = (
                tf.add_n([tf.cast(r, tf.float32) for r in model.losses]) / replicas
                if model.losses
                else 0.0
            )
            if y is None or hard is None:  # label-free: teacher only
                objective = soft + reg
            else:
                # (1-a) * (hard + reg) + a * (soft + reg) = (1-a) * hard + a * soft + reg
                objective = (1.0 - self.weight) * tf.cast(hard, tf.float32) + self.weight * (
                    soft + reg
                )
        model.optimizer.minimize(objective, model.trainable_variables, tape=tape)
        if y is not None:
            model.compiled_metrics.update_state(y, y_pred, sample_weight)
        self._update_trackers(terms, tf.shape(tf.nest.flatten(y_pred)[0])[0])
        return self._logs()

    def test_step(self, data):
        model = self.student
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = model(x, training=False)
        model.compiled_loss(y, y_pred, sample_weight, regularization_losses=model.losses)
        if y is not None:
            model.compiled_metrics.update_state(y, y_pred, sample_weight)
        t_pred = self.teacher(x, training=False)
        terms = self._terms(y_pred, t_pred, sample_weight)
        self._update_trackers(terms, tf.shape(tf.nest.flatten(y_pred)[0])[0])
        return self._logs()

    def reset_metrics(self, original):
        original()
        self.total.reset_state()
        for tracker in self.per_output:
            tracker.reset_state()

    # -- install / uninstall ------------------------------------------------
    def __enter__(self):
        model = self.student
        original_reset = model.reset_metrics
        object.__setattr__(model, "train_step", self.train_step)
        object.__setattr__(model, "test_step", self.test_step)
        object.__setattr__(model, "reset_metrics", lambda: self.reset_metrics(original_reset))
        model.train_function = None
        model.test_function = None
        return self

    def __exit__(self, *exc):
        model = self.student
        for name in ("train_step", "test_step", "reset_metrics"):
            if name in model.__dict__:
                object.__delattr__(model, name)
        model.train_function = None
        model.test_function = None
        return False


# --------------------------------------------------------------------------
# BatchNormalization recalibration
# --------------------------------------------------------------------------


def _batchnorm_layers(model: "keras.Model") -> list:
    classes = [keras.layers.BatchNormalization]
    sync = getattr(getattr(keras.layers, "experimental", None), "SyncBatchNormalization", None)
    if sync is not None:
        classes.append(sync)
    found, seen = [], set()
    for module in [model] + list(model.submodules):
        if isinstance(module, tuple(classes)) and id(module) not in seen:
            seen.add(id(module))
            if getattr(module, "renorm", False) or getattr(module, "virtual_batch_size", None):
                logger.warning(
                    "recalibrate_batchnorm: skipping layer '%s' (renorm / virtual "
                    "batches are not supported).",
                    module.name,
                )
                continue
            found.append(module)
    return found


def _is_array_like(x: Any) -> bool:
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(isinstance(v, (np.ndarray, tf.Tensor)) for v in leaves)


def _num_samples(x: Any) -> int:
    return int(tf.nest.flatten(x)[0].shape[0])


def _recalibration_batches(x, steps, batch_size, seed) -> Iterator:
    if isinstance(x, tf.data.Dataset):
        if steps is None and x.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise InvalidArgumentError(
                "Expected `steps` to be set when `x` is an infinite dataset. "
                "Received: steps=None"
            )
        ds = x.take(steps) if steps is not None else x
        for element in ds:
            yield keras.utils.unpack_x_y_sample_weight(element)[0]
    elif isinstance(x, keras.utils.Sequence):
        n = len(x) if steps is None else min(steps, len(x))
        for i in range(n):
            yield keras.utils.unpack_x_y_sample_weight(x[i])[0]
    elif _is_array_like(x):
        n = _num_samples(x)
        order = np.random.default_rng(seed).permutation(n)
        limit = n if steps is None else min(n, steps * batch_size)
        for start in range(0, limit, batch_size):
            idx = order[start : min(start + batch_size, limit)]
            yield tf.nest.map_structure(lambda a: tf.gather(a, idx), x)
    elif hasattr(x, "__next__"):
        for i, element in enumerate(x):
            if steps is not None and i >= steps:
                break
            yield keras.utils.unpack_x_y_sample_weight(element)[0]
    else:
        raise InvalidArgumentTypeError(
            "Expected `x` to be NumPy arrays / tensors (or a list/dict of them), a "
            "`tf.data.Dataset`, a `keras.utils.Sequence` or an iterator. "
            f"Received: x of type {type(x).__name__}"
        )


def recalibrate_batchnorm(
    model: "keras.Model",
    x: Any,
    *,
    steps: Optional[int] = DEFAULT_RECALIBRATION_STEPS,
    batch_size: int = 32,
    seed: int = 0,
) -> int:
    """Re-estimate the moving statistics of every BatchNormalization layer.

    After pruning (or any weight change) the moving mean/variance stored in
    BatchNormalization layers no longer describe the activations they see, and
    inference-mode accuracy collapses even when the weights are good. This
    function runs the model in training mode on up to ``steps`` batches and
    replaces each layer's ``moving_mean`` / ``moving_variance`` by the exact
    statistics of all the samples seen (a cumulative average pooled over
    batches, like PyTorch's ``update_bn`` with ``momentum=None``; the old
    statistics are discarded). As in training, each BatchNormalization layer
    normalises with batch statistics while the statistics are gathered.

    Every layer that is an instance of ``keras.layers.BatchNormalization``
    (or ``SyncBatchNormalization``) is recalibrated, including layers inside
    nested models and layers that were frozen with ``trainable=False``.
    Nothing else changes: all other weights are bit-identical afterwards
    (they are checked and restored if a layer updated state in training mode).
    The model is modified in place.

    Args:
        model: A `keras.Model`, compiled or not.
        x: Input data: NumPy arrays or tensors (or a list/dict of them for
            multi-input models), a `tf.data.Dataset` of batches (``x`` or
            ``(x, y[, sample_weight])`` elements, like `fit`), a
            `keras.utils.Sequence`, or an iterator of batches (it is consumed).
            Arrays are shuffled with ``seed`` first; datasets are read in order.
        steps: Number of batches to use; ``None`` for one full pass.
        batch_size: Batch size when ``x`` holds arrays.
        seed: Seed of the shuffle of array inputs.

    Returns:
        The number of BatchNormalization layers recalibrated (0 when the model
        has none; a warning is logged then).

    Raises:
        NotAModelError: If ``model`` is not a `keras.Model`.
        InvalidArgumentError: If ``steps`` or ``batch_size`` is not positive,
            ``x`` is empty, or ``x`` is an infinite dataset and ``steps=None``.
        InvalidArgumentTypeError: If ``x`` is of an unsupported type.

    Example:
        >>> import keras_rebuild as kr
        >>> from keras_rebuild.recover import recalibrate_batchnorm
        >>> (x, y), _ = kr.load_digits()
        >>> model = kr.digits_cnn(width=8)
        >>> recalibrate_batchnorm(model, x, steps=5, batch_size=64)
        3
    """
    _check_model(model, "model")
    steps = _check_steps(steps, "steps", allow_none=True)
    batch_size = _check_steps(batch_size, "batch_size")
    layers = _batchnorm_layers(model)
    if not layers:
        logger.warning("recalibrate_batchnorm: model '%s' has no BatchNormalization layer.", model.name)
        return 0

    bn_vars = {id(v) for layer in layers for v in (layer.moving_mean, layer.moving_variance)}
    others = [v for v in model.weights if id(v) not in bn_vars]
    snapshot = [v.numpy() for v in others]
    saved = [(layer.momentum, layer.trainable) for layer in layers]

    sums = [[0.0, 0.0] for _ in layers]  # sum of n*mean, sum of n*(var + mean^2)
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving stats := statistics of the last batch
            if not layer.trainable:  # frozen BN ignores training=True
                layer.trainable = True

        @tf.function(reduce_retracing=True)
        def forward(inputs):
            model(inputs, training=True)

        for batch in _recalibration_batches(x, steps, batch_size, seed):
            n = int(tf.shape(tf.nest.flatten(batch)[0])[0])
            if n == 0:
                continue
            forward(batch)
            for acc, layer in zip(sums, layers):
                mean = np.asarray(layer.moving_mean.numpy(), dtype=np.float64)
                var = np.asarray(layer.moving_variance.numpy(), dtype=np.float64)
                acc[0] = acc[0] + n * mean
                acc[1] = acc[1] + n * (var + mean**2)
            count += n
    finally:
        for layer, (momentum, trainable) in zip(layers, saved):
            layer.momentum = momentum
            if layer.trainable != trainable:
                layer.trainable = trainable

    if count == 0:
        for v, value in zip(others, snapshot):
            v.assign(value)
        raise InvalidArgumentError(
            "Expected `x` to contain at least one sample. Received: x with 0 samples"
        )
    for acc, layer in zip(sums, layers):
        mean = acc[0] / count
        var = np.maximum(acc[1] / count - mean**2, 0.0)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype.as_numpy_dtype))
        layer.moving_variance.assign(var.astype(layer.moving_variance.dtype.as_numpy_dtype))
    for v, value in zip(others, snapshot):
        if not np.array_equal(v.numpy(), value):
            logger.debug("recalibrate_batchnorm: restoring variable %s", v.name)
            v.assign(value)
    logger.info(
        "Recalibrated %d BatchNormalization layers of '%s' on %d samples.",
        len(layers),
        model.name,
        count,
    )
    return len(layers)


# --------------------------------------------------------------------------
# recover
# --------------------------------------------------------------------------


def _training_part(x, validation_split):
    """The samples fit trains on when it holds out ``validation_split``."""
    if not validation_split or not _is_array_like(x):
        return x
    split_at = int(math.floor(_num_samples(x) * (1.0 - validation_split)))
    return tf.nest.map_structure(lambda a: a[:split_at], x)


def recover(
    model: "keras.Model",
    x: Any = None,
    y: Any = None,
    *,
    teacher: Optional["keras.Model"] = None,
    distillation_weight: float = DEFAULT_DISTILLATION_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE,
    recalibrate_bn: bool = False,
    recalibration_steps: int = DEFAULT_RECALIBRATION_STEPS,
    **fit_kwargs: Any,
) -> "keras.callbacks.History":
    """Fine-tune a (pruned) model to recover accuracy, optionally distilling.

    A drop-in replacement for ``model.fit``: ``x``, ``y`` and every keyword
    argument of `fit` (``batch_size``, ``epochs``, ``validation_data``,
    ``validation_split``, ``callbacks``, ``class_weight``, ``sample_weight``,
    ``initial_epoch``, ``steps_per_epoch``, ``verbose``...) are passed through
    unchanged, and all input kinds `fit` accepts work (NumPy arrays,
    `tf.data.Dataset`, generators, `keras.utils.Sequence`). The model is
    trained **in place**, exactly like `fit`: with its own compiled optimizer
    (state and iteration count carry on), its compiled loss as the hard-label
    loss and its compiled metrics. The returned `History`'s ``.model`` is
    ``model``, and callbacks see ``model`` (so ``ModelCheckpoint`` saves the
    student, never a wrapper).

    **Distillation** (``teacher=`` given, usually the unpruned model). The
    student minimises::

        (1 - a) * hard_loss + a * distillation_loss + regularization

    with ``a = distillation_weight``. ``distillation_loss`` sums one term per
    output, outputs of student and teacher being matched by position (their
    count and shapes must agree):

    * classification outputs: ``T**2 * KL(softmax(z_t / T) || softmax(z_s / T))``
      (Hinton et al., 2015; ``T = temperature``), per sample, with the
      Bernoulli KL per unit for sigmoid outputs;
    * regression outputs: mean squared error to the teacher's output.

    Sample weights (and ``class_weight``) weight the distillation term like
    they weight Keras losses. The teacher is frozen: it is called with
    ``training=False`` (dropout off, BatchNormalization statistics untouched)
    and none of its weights is updated. If the data carry no labels (``x``
    only), the student learns from the teacher alone.

    How an output is classified, per position (student first, then teacher):
    an output is a *classification* output if the model's last layer on that
    output has a ``softmax``/``sigmoid`` activation (a `Dense`/`Conv`
    ``activation=``, an `Activation` layer or a `Softmax` layer), or if the
    compiled loss of that output is a cross-entropy/KL loss (``binary_*``
    means sigmoid, ``categorical_*``/``sparse_categorical_*``/KLD softmax);
    otherwise it is a *regression* output. For classification, each model's
    output is taken as **probabilities** if its last activation is
    softmax/sigmoid, or if its compiled cross-entropy has
    ``from_logits=False``; otherwise as **logits** (e.g. a linear last layer,
    or ``from_logits=True``). Logits are recovered exactly from
    softmax/sigmoid layers (Keras caches them); other probabilities are
    converted with ``log(clip(p, 1e-7, 1))``. The decision is logged at INFO
    level.

    History keys: those of `fit` (``loss`` = the compiled hard-label loss
    plus regularisation, the compiled metrics, ``val_*``), plus
    ``distillation_loss`` (and ``<output>_distillation_loss`` per output of a
    multi-output model) and their ``val_`` versions. Validation evaluates the
    student (``val_loss`` equals what ``model.evaluate`` returns), so
    ``monitor="val_loss"`` selects on the task loss.

    **BatchNormalization recalibration** (``recalibrate_bn=True``): before
    fine-tuning, ``recalibrate_batchnorm(model, x, steps=recalibration_steps)``
    re-estimates the moving statistics of every BatchNormalization layer
    (nested ones too) on the training data (the training part only when
    ``validation_split`` is set), without changing any other weight (to recalibrate
    without fine-tuning, call `recalibrate_batchnorm` directly). Python generators cannot be read twice,
    so they are refused here; call `recalibrate_batchnorm` yourself with
    re-readable data first.

    **Distribution.** Works when ``model`` (and ``teacher``) were created and
    compiled under a `tf.distribute` strategy scope, e.g.
    ``tf.distribute.MirroredStrategy()``: training runs on every replica and
    losses are scaled per replica like Keras does. For multi-worker training
    with ``tf.distribute.MultiWorkerMirroredStrategy``: set ``TF_CONFIG`` on
    every worker (``{"cluster": {"worker": ["host1:port", "host2:port"]},
    "task": {"type": "worker", "index": i}}``), create the strategy at program
    start, build **and compile** the student and build the teacher (load its
    weights) inside ``strategy.scope()``, then call ``recover(model, dataset,
    epochs=...)`` as usual on every worker with a `tf.data.Dataset` batched
    with the *global* batch size (it is sharded across workers
    automatically); save only from the chief (``task index 0``).

    Args:
        model: The compiled `keras.Model` to fine-tune (the student).
        x: Input data, as for `fit`.
        y: Targets, as for `fit`.
        teacher: Optional `keras.Model` to distil from, with the same inputs
            and the same number and shapes of outputs as ``model``. Need not
            be compiled (its compiled loss, if any, helps decide logits vs
            probabilities).
        distillation_weight: ``a`` in ``[0, 1]``, the weight of the
            distillation term (the hard loss gets ``1 - a``). Default 0.5.
            Ignored without a teacher.
        temperature: Positive softening temperature ``T`` for classification
            outputs. Default 4.
        recalibrate_bn: Whether to recalibrate BatchNormalization statistics
            on ``x`` before fine-tuning.
        recalibration_steps: Batches used by the recalibration (of
            ``batch_size`` samples, default 32, for array inputs).
        **fit_kwargs: Passed to ``model.fit`` unchanged.

    Returns:
        The `keras.callbacks.History` of the fine-tuning; ``history.model`` is
        ``model``.

    Raises:
        NotAModelError: If ``model`` or ``teacher`` is not a `keras.Model`.
        InvalidArgumentError: If ``model`` is not compiled, ``teacher`` is
            ``model``, ``distillation_weight`` is outside ``[0, 1]``,
            ``temperature`` is not positive and finite, ``recalibration_steps``
            is not positive, the teacher's outputs do not match the student's
            in number or shape, or ``recalibrate_bn=True`` with a generator.
        InvalidArgumentTypeError: If a numeric argument is not a number.

    Example:
        >>> import keras_rebuild as kr
        >>> from keras_rebuild.recover import recover
        >>> (x, y), (xt, yt) = kr.load_digits()
        >>> teacher = kr.digits_cnn(width=16)
        >>> student = kr.digits_cnn(width=8)
        >>> student.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> history = recover(student, x, y, teacher=teacher, epochs=1,
        ...                   validation_data=(xt, yt), verbose=0)
        >>> sorted(history.history)
        ['accuracy', 'distillation_loss', 'loss', 'val_accuracy', 'val_distillation_loss', 'val_loss']
        >>> history.model is student
        True
    """
    _check_model(model, "model")
    if teacher is not None:
        _check_model(teacher, "teacher")
        if teacher is model:
            raise InvalidArgumentError(
                "Expected `teacher` to be a different model from the student. "
                f"Received: teacher={teacher.name!r} (the student itself)"
            )
    weight = _check_weight(distillation_weight)
    temperature = _check_temperature(temperature)
    recalibration_steps = _check_steps(recalibration_steps, "recalibration_steps")
    if not isinstance(recalibrate_bn, bool):
        raise InvalidArgumentTypeError(
            f"Expected `recalibrate_bn` to be a bool. Received: {received('recalibrate_bn', recalibrate_bn)}"
        )
    _check_compiled(model)

    if recalibrate_bn:
        if x is None or (hasattr(x, "__next__") and not isinstance(x, keras.utils.Sequence)):
            raise InvalidArgumentError(
                "Expected `x` to be re-readable data (arrays, a `tf.data.Dataset` or a "
                "`keras.utils.Sequence`) when `recalibrate_bn=True`, since it is read "
                "once for recalibration and again for training; call "
                "`recalibrate_batchnorm(model, data)` first instead. "
                f"Received: x of type {type(x).__name__}"
            )
        recalibrate_batchnorm(
            model,
            _training_part(x, fit_kwargs.get("validation_split")),
            steps=recalibration_steps,
            batch_size=fit_kwargs.get("batch_size") or 32,
        )

    if teacher is None:
        return model.fit(x, y, **fit_kwargs)

    with _Distillation(model, teacher, weight, temperature):
        history = model.fit(x, y, **fit_kwargs)
    history.model = model
    return history
