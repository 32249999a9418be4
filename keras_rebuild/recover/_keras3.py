"""Recovery for Keras 3 models on the TensorFlow, JAX and torch backends.

The public functions live in :mod:`keras_rebuild.recover`, which checks the
arguments and calls this module for Keras 3 models. Everything here is
written with ``keras.ops``, so it runs unchanged on every backend, and it
imports no TensorFlow (a ``tf.data.Dataset`` given by the user is read
through its own methods).

How distillation plugs into ``fit``: Keras 3's ``train_step`` and
``test_step`` (one per backend, the JAX one stateless) all call
``model.compute_loss`` and ``model.compute_metrics``. For the duration of
``recover``, those two methods are replaced *on the student instance* by
distillation-aware versions, and the distillation-loss trackers are attached
to the student as metrics (so the JAX trainer carries their state like any
metric), then everything is removed again. So the student's own ``fit`` runs:
callbacks see and save the student, the student's optimizer and iteration
counter carry on, and ``History.model`` is the student.

The loss the student's trainer reports as ``loss`` stays the compiled
hard-label loss plus regularisation (as on tf_keras, and as ``evaluate``
reports it): ``compute_loss`` returns ``objective + stop_gradient(hard -
objective)``, whose value is ``hard`` and whose gradient is the gradient of
the distillation objective.

Why not ``keras.distillation.Distiller`` (Keras 3.12+): it is a separate
model wrapping teacher and student, so ``fit`` callbacks
(``ModelCheckpoint``, ``EarlyStopping``) see and save the Distiller, teacher
included, and ``History.model`` is the Distiller; it is compiled anew, so the
student's optimizer state and compiled metrics are not used; its
``LogitsDistillation`` applies ``softmax(output / T)`` to whatever the models
return, which is wrong for models that end in a softmax (the usual Keras
classifier, and the digits CNN); it ignores sample weights and class weights
and drops the student's regularisation losses; and it sets
``teacher.trainable = False`` on the user's teacher.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import keras
import numpy as np
from keras import ops

from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError
from keras_rebuild.recover._common import EPSILON, logger, plan_outputs


# --------------------------------------------------------------------------
# Keras 3 details this module relies on (kept in one place)
# --------------------------------------------------------------------------


def _scale_for_distribution(value):
    """Divide a per-replica loss by the replica count under ``tf.distribute`` (as Keras' losses do)."""
    try:
        from keras.src.losses.loss import scale_loss_for_distribution
    except ImportError:  # pragma: no cover - older/newer Keras layouts
        return value
    return scale_loss_for_distribution(value)


def _attach_metric(model, name: str, metric) -> None:
    """Track ``metric`` as one of ``model.metrics`` (so the JAX trainer carries its state)."""
    setattr(model, name, metric)


def _detach_metric(model, name: str, metric) -> None:
    """Undo :func:`_attach_metric`: Keras 3 keeps tracking a deleted attribute's metric otherwise."""
    tracker = getattr(model, "_tracker", None)
    if tracker is not None and hasattr(tracker, "untrack"):
        tracker.untrack(metric)
    with contextlib.suppress(AttributeError):
        delattr(model, name)


def _teacher_scope():
    """No autograd graph through the teacher on torch (its outputs are constants anyway)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------
# Distillation maths
# --------------------------------------------------------------------------


def _to_logits(output, task: str, is_prob: bool):
    """Logits of a classification output (exact when Keras kept them on the tensor)."""
    if not is_prob:
        return ops.cast(output, "float32")
    cached = getattr(output, "_keras_logits", None)
    if cached is not None:
        return ops.cast(cached, "float32")
    p = ops.cast(output, "float32")
    if task == "softmax":  # logits up to a per-sample constant
        return ops.log(ops.clip(p, EPSILON, 1.0))
    p = ops.clip(p, EPSILON, 1.0 - EPSILON)
    return ops.log(p) - ops.log1p(-p)


def _mean_over_features(values):
    rank = len(values.shape)
    if rank > 1:
        return ops.mean(values, axis=tuple(range(1, rank)))
    return values


def _per_sample_distillation(s_out, t_out, task, s_prob, t_prob, temperature):
    """Per-sample distillation loss, shape (batch,)."""
    if task == "regression":
        diff = ops.cast(s_out, "float32") - ops.stop_gradient(ops.cast(t_out, "float32"))
        return _mean_over_features(ops.square(diff))
    zs = _to_logits(s_out, task, s_prob) / temperature
    zt = ops.stop_gradient(_to_logits(t_out, task, t_prob)) / temperature
    if task == "softmax":
        log_ps = ops.log_softmax(zs, axis=-1)
        log_pt = ops.log_softmax(zt, axis=-1)
        kl = ops.sum(ops.exp(log_pt) * (log_pt - log_ps), axis=-1)
    else:  # sigmoid: KL between Bernoulli distributions, per unit
        log_ps, log_1ms = ops.log_sigmoid(zs), ops.log_sigmoid(-zs)
        log_pt, log_1mt = ops.log_sigmoid(zt), ops.log_sigmoid(-zt)
        kl = ops.exp(log_pt) * (log_pt - log_ps) + ops.exp(log_1mt) * (log_1mt - log_1ms)
    return _mean_over_features(kl) * (temperature**2)


def _takes_training(fn) -> bool:
    try:
        return "training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _Distillation:
    """The distillation ``compute_loss``/``compute_metrics`` installed on a student during ``recover``."""

    _PREFIX = "_keras_rebuild_distillation_"

    def __init__(self, student, teacher, weight, temperature):
        self.student = student
        self.teacher = teacher
        self.weight = weight
        self.temperature = temperature
        self.plan = plan_outputs(student, teacher, keras, keras.tree.flatten)
        names = list(getattr(student, "output_names", None) or [])
        strategy = getattr(student, "distribute_strategy", None)  # TensorFlow backend only
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            self.total = keras.metrics.Mean(name="distillation_loss")
            self.per_output = []
            if len(self.plan) > 1:
                for i in range(len(self.plan)):
                    name = names[i] if i < len(names) else f"output_{i}"
                    self.per_output.append(keras.metrics.Mean(name=f"{name}_distillation_loss"))
        self.trackers = [self.total] + self.per_output

    # -- loss ---------------------------------------------------------------
    def _terms(self, y_pred, t_pred, sample_weight):
        s_list, t_list = keras.tree.flatten(y_pred), keras.tree.flatten(t_pred)
        if len(s_list) != len(t_list) or len(s_list) != len(self.plan):
            raise InvalidArgumentError(
                f"Expected the teacher to return {len(s_list)} outputs like student "
                f"'{self.student.name}'. Received: {len(t_list)} teacher outputs"
            )
        weights = keras.tree.flatten(sample_weight) if sample_weight is not None else [None]
        if len(weights) != len(s_list):
            weights = [weights[0]] * len(s_list)
        terms = []
        for i, (s, t, plan, w) in enumerate(zip(s_list, t_list, self.plan, weights)):
            if tuple(s.shape)[1:] != tuple(t.shape)[1:]:
                raise InvalidArgumentError(
                    f"Expected teacher output {i} to have the shape of student output "
                    f"{i} {tuple(s.shape)}. Received: teacher output shape={tuple(t.shape)}"
                )
            per_sample = _per_sample_distillation(s, t, *plan, self.temperature)
            if w is not None:  # same reduction as Keras losses: sum(w * l) / batch
                per_sample = per_sample * ops.reshape(ops.cast(w, "float32"), (-1,))
            terms.append(ops.mean(per_sample))
        return terms

    def _regularization(self):
        losses = self.student.losses
        if not losses:
            return None
        total = ops.sum(ops.stack([ops.sum(ops.cast(r, "float32")) for r in losses]))
        return _scale_for_distribution(total)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        model = self.student
        if y_pred is None:
            y_pred = model(x, training=training)
        reg = self._regularization()
        if y is None:  # label-free: the student learns from the teacher alone
            hard = reg if reg is not None else ops.zeros((), "float32")
        elif self._loss_takes_training:
            hard = self._original_loss(x, y, y_pred, sample_weight, training=training)
        else:
            hard = self._original_loss(x, y, y_pred, sample_weight)
        with _teacher_scope():
            t_pred = keras.tree.map_structure(ops.stop_gradient, self.teacher(x, training=False))
        terms = self._terms(y_pred, t_pred, sample_weight)
        total = terms[0] if len(terms) == 1 else ops.sum(ops.stack(terms))
        batch = ops.shape(keras.tree.flatten(y_pred)[0])[0]
        self.total.update_state(total, sample_weight=batch)
        for tracker, term in zip(self.per_output, terms):
            tracker.update_state(term, sample_weight=batch)
        soft = _scale_for_distribution(total)
        hard = ops.cast(hard, "float32")
        if y is None:
            objective = soft + (reg if reg is not None else 0.0)
        else:
            # (1-a) * (hard + reg) + a * (soft + reg) = (1-a) * hard + a * soft + reg
            objective = (1.0 - self.weight) * hard + self.weight * (soft + (reg if reg is not None else 0.0))
        # The value is the hard loss (what fit reports as "loss" and evaluate returns);
        # the gradient is the distillation objective's.
        return objective + ops.stop_gradient(hard - objective)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is not None:
            return self._original_metrics(x, y, y_pred, sample_weight)
        return self.get_metrics_result()  # no labels: the compiled metrics stay as they are

    def get_metrics_result(self):
        """The student's metric results, leaving out compiled metrics never built (label-free data)."""
        logs = {}
        for metric in self.student.metrics:
            if not getattr(metric, "built", True):
                continue
            result = metric.result()
            if isinstance(result, dict):
                logs.update(result)
            else:
                logs[metric.name] = result
        return logs

    # -- install / uninstall ------------------------------------------------
    def __enter__(self):
        model = self.student
        self._original_loss = model.compute_loss
        self._loss_takes_training = _takes_training(self._original_loss)
        self._original_metrics = model.compute_metrics
        for i, tracker in enumerate(self.trackers):
            _attach_metric(model, f"{self._PREFIX}{i}", tracker)
        model.compute_loss = self.compute_loss
        model.compute_metrics = self.compute_metrics
        model.get_metrics_result = self.get_metrics_result
        model.train_function = None
        model.test_function = None
        return self

    def __exit__(self, *exc):
        model = self.student
        for name in ("compute_loss", "compute_metrics", "get_metrics_result"):
            if name in model.__dict__:
                delattr(model, name)
        for i, tracker in enumerate(self.trackers):
            _detach_metric(model, f"{self._PREFIX}{i}", tracker)
        model.train_function = None
        model.test_function = None
        return False


def fit(model, x, y, teacher, weight, temperature, fit_kwargs):
    """``model.fit`` with the distillation loss installed when there is a teacher."""
    if teacher is None:
        return model.fit(x, y, **fit_kwargs)
    with _Distillation(model, teacher, weight, temperature):
        return model.fit(x, y, **fit_kwargs)  # its History's model is the student


# --------------------------------------------------------------------------
# BatchNormalization recalibration
# --------------------------------------------------------------------------


def _sublayers(layer) -> Iterator:
    yield layer
    for child in list(getattr(layer, "layers", None) or []):
        yield from _sublayers(child)
    inner = getattr(layer, "layer", None)  # wrappers
    if isinstance(inner, keras.layers.Layer):
        yield from _sublayers(inner)


def _batchnorm_layers(model) -> list:
    found, seen = [], set()
    for layer in _sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def _leaves_are_arrays(x) -> bool:
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(
        isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "dtype") and len(v.shape) > 0)
        for v in leaves
    )


def _is_tf_dataset(x) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "cardinality") and hasattr(x, "take")


def _inputs_of(element):
    """The inputs of a data element (``x`` or ``(x, y[, sample_weight])``), as NumPy."""
    return keras.tree.map_structure(ops.convert_to_numpy, keras.utils.unpack_x_y_sample_weight(element)[0])


def _recalibration_batches(x, steps, batch_size, seed) -> Iterator:
    if _is_tf_dataset(x):
        if steps is None and int(x.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
            raise InvalidArgumentError(
                "Expected `steps` to be set when `x` is an infinite dataset. "
                "Received: steps=None"
            )
        ds = x.take(steps) if steps is not None else x
        for element in ds.as_numpy_iterator():
            yield _inputs_of(element)
    elif isinstance(x, keras.utils.PyDataset):
        n = len(x) if steps is None else min(steps, len(x))
        for i in range(n):
            yield _inputs_of(x[i])
    elif _leaves_are_arrays(x):
        arrays = keras.tree.map_structure(ops.convert_to_numpy, x)
        n = int(keras.tree.flatten(arrays)[0].shape[0])
        order = np.random.default_rng(seed).permutation(n)
        limit = n if steps is None else min(n, steps * batch_size)
        for start in range(0, limit, batch_size):
            idx = order[start : min(start + batch_size, limit)]
            yield keras.tree.map_structure(lambda a: a[idx], arrays)
    elif hasattr(x, "__iter__") or hasattr(x, "__next__"):  # generators, torch DataLoaders
        for i, element in enumerate(x):
            if steps is not None and i >= steps:
                break
            yield _inputs_of(element)
    else:
        raise InvalidArgumentTypeError(
            "Expected `x` to be NumPy arrays / tensors (or a list/dict of them), a "
            "`tf.data.Dataset`, a `keras.utils.PyDataset`, a torch `DataLoader` or an iterator. "
            f"Received: x of type {type(x).__name__}"
        )


def _numpy(variable) -> np.ndarray:
    return np.array(ops.convert_to_numpy(variable.value))


def recalibrate_batchnorm(model, x, steps, batch_size, seed) -> int:
    """:func:`keras_rebuild.recover.recalibrate_batchnorm` for Keras 3 (arguments checked)."""
    layers = _batchnorm_layers(model)
    if not layers:
        logger.warning("recalibrate_batchnorm: model '%s' has no BatchNormalization layer.", model.name)
        return 0

    bn_vars = {id(v) for layer in layers for v in (layer.moving_mean, layer.moving_variance)}
    others = [v for v in model.weights if id(v) not in bn_vars]
    snapshot = [_numpy(v) for v in others]
    saved = [(layer.momentum, layer.trainable) for layer in layers]

    sums = [[0.0, 0.0] for _ in layers]  # sum of n*mean, sum of n*(var + mean^2)
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving stats := statistics of the last batch
            if not layer.trainable:  # frozen BN ignores training=True
                layer.trainable = True
        for batch in _recalibration_batches(x, steps, batch_size, seed):
            n = int(keras.tree.flatten(batch)[0].shape[0])
            if n == 0:
                continue
            model(batch, training=True)
            for acc, layer in zip(sums, layers):
                mean = _numpy(layer.moving_mean).astype(np.float64)
                var = _numpy(layer.moving_variance).astype(np.float64)
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
        layer.moving_mean.assign(mean.astype(np.dtype(layer.moving_mean.dtype)))
        layer.moving_variance.assign(var.astype(np.dtype(layer.moving_variance.dtype)))
    for v, value in zip(others, snapshot):
        if not np.array_equal(_numpy(v), value):
            logger.debug("recalibrate_batchnorm: restoring variable %s", v.path)
            v.assign(value)
    logger.info(
        "Recalibrated %d BatchNormalization layers of '%s' on %d samples.",
        len(layers),
        model.name,
        count,
    )
    return len(layers)


# --------------------------------------------------------------------------
# fit arguments
# --------------------------------------------------------------------------


def training_part(x: Any, validation_split):
    """The samples fit trains on when it holds out ``validation_split`` (the first part, like Keras)."""
    if not validation_split or _is_tf_dataset(x) or not _leaves_are_arrays(x):
        return x
    n = int(keras.tree.flatten(x)[0].shape[0])
    split_at = int(np.floor(n * (1.0 - validation_split)))
    return keras.tree.map_structure(lambda a: a[:split_at], x)


def is_generator(x) -> bool:
    """Data that cannot be read twice (recalibration and training)."""
    return hasattr(x, "__next__") and not isinstance(x, keras.utils.PyDataset)
