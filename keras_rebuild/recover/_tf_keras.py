"""Recovery for tf_keras models: distillation steps and BatchNormalization recalibration.

The public functions live in :mod:`keras_rebuild.recover`, which checks the
arguments and calls this module for tf_keras models only (it imports
TensorFlow and tf_keras).

How distillation plugs into ``fit``: for the duration of the call, the
student's own ``train_step``, ``test_step`` and ``reset_metrics`` are replaced
(on the instance only) by distillation-aware versions, then restored. So the
student's own ``fit`` runs: callbacks (``ModelCheckpoint``, ``EarlyStopping``,
``BackupAndRestore``, ``ReduceLROnPlateau``...) see and save the student, the
student's optimizer and its iteration counter carry on, and the returned
``History.model`` is the student. No wrapper model is ever saved.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from keras_rebuild._compat import keras, tf
from keras_rebuild.backends import tf_keras as _tf_keras_backend
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError
from keras_rebuild.recover._common import EPSILON as _EPSILON
from keras_rebuild.recover._common import logger, plan_outputs


def _plan_outputs(student, teacher):
    return plan_outputs(student, teacher, keras, tf.nest.flatten)

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
            hard = _tf_keras_backend.training_loss(model, y, y_pred, sample_weight)
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
        _tf_keras_backend.training_loss(model, y, y_pred, sample_weight)
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


def recalibrate_batchnorm(model, x, steps, batch_size, seed) -> int:
    """:func:`keras_rebuild.recover.recalibrate_batchnorm` for tf_keras (arguments checked)."""
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


def training_part(x, validation_split):
    """The samples fit trains on when it holds out ``validation_split``."""
    if not validation_split or not _is_array_like(x):
        return x
    split_at = int(math.floor(_num_samples(x) * (1.0 - validation_split)))
    return tf.nest.map_structure(lambda a: a[:split_at], x)


def is_generator(x) -> bool:
    """Data that cannot be read twice (recalibration and training)."""
    return hasattr(x, "__next__") and not isinstance(x, keras.utils.Sequence)


def fit(model, x, y, teacher, weight, temperature, fit_kwargs):
    """``model.fit`` with the distillation steps installed when there is a teacher."""
    if teacher is None:
        return model.fit(x, y, **fit_kwargs)
    with _Distillation(model, teacher, weight, temperature):
        history = model.fit(x, y, **fit_kwargs)
    history.model = model
    return history
