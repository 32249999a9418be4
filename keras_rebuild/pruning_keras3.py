"""Structured pruning during training for Keras 3 (TensorFlow, JAX and torch backends).

The Keras 3 twin of :mod:`keras_rebuild.wrappers` (tf_keras), with the same
API and semantics; :mod:`keras_rebuild.pruning` dispatches to it::

    pruned = kr.prune_channels(model, pruning_schedule=kr.PolynomialDecay(0.0, 0.5, 0, 1000))
    pruned.compile("adam", "sparse_categorical_crossentropy")
    pruned.fit(x, y, epochs=3, callbacks=[kr.UpdatePruningStep()])
    small = kr.rebuild(pruned)          # or kr.strip_pruning(pruned): same shapes, zero channels

This module imports only ``keras``: on JAX or torch, TensorFlow is never loaded.

How the wrapper masks on every backend. :class:`StructuredPruningWrapper`
holds non-trainable float masks over its layer's input and output channels
and an int ``pruning_step``. Its ``call`` computes ``weight * mask`` for each
maskable weight of the wrapped layer and calls the layer inside a
``keras.StatelessScope`` that maps each of those variables to its masked value,
so the layer reads masked weights whatever the backend. The scope falls back to
the enclosing stateless scope (JAX's stateless training step, nested) for every
other variable and passes updates (BatchNorm moving statistics, seed states)
and losses on to it, or assigns them when there is none (TensorFlow, torch).
Gradients reach the real variables through the product, so pruned entries get
zero gradient, and the wrapped model computes exactly what
:func:`strip_pruning` returns.

On JAX, ``fit`` keeps the model's variables in a separate state during an
epoch; a variable assigned from a callback mid-epoch is lost unless the
trainer's state is synced first. :class:`UpdatePruningStep` syncs (by reading
``self.model``) on pruning steps only, then assigns the masks; the trainer
re-reads its state before the next batch.
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
import warnings
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
from keras.src.backend.common.stateless_scope import StatelessScope, get_stateless_scope

from keras_rebuild import pruning as _shared
from keras_rebuild.pruning import internal_slices as _internal_slices
from keras_rebuild.pruning import mask_sizes as _mask_sizes
from keras_rebuild.pruning import join_internal as _join_internal
from keras_rebuild.pruning import split_internal as _split_internal
from keras_rebuild import schedules as _schedules
from keras_rebuild.backends import keras3 as _backend
from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    MissingCallbackError,
    NotAModelError,
    received,
)
from keras_rebuild.graph import all_layers, check_model, is_graph_model
from keras_rebuild.handlers import get_handler, mask_array, register_handler, resolve_role

log = logging.getLogger("keras_rebuild")

__all__ = ["StructuredPruningWrapper", "UpdatePruningStep", "prune_channels", "strip_pruning", "wrapped_layers"]


def _callback_message(name: str) -> str:
    return (
        "Expected the `keras_rebuild.UpdatePruningStep()` callback when training a model wrapped by "
        "`prune_channels(..., pruning_schedule=...)`: it advances the pruning step and updates the "
        "channel masks. Add it to training: "
        "`model.fit(x, y, callbacks=[keras_rebuild.UpdatePruningStep()])` (in a custom training "
        "loop call its `set_model(model)`, `on_train_begin()`, and `on_train_batch_begin(step)` "
        "before each step). "
        f"Received: a training call of the wrapped layer '{name}' without the callback"
    )


def _is_true(training) -> bool:
    return isinstance(training, (bool, np.bool_, numbers.Integral)) and bool(training)


class _MaskScope(StatelessScope):
    """A stateless scope mapping some variables to masked values, transparent for everything else.

    Reads of other variables fall back to the enclosing stateless scope (or the
    variables themselves); updates and losses go to the enclosing scope, or are
    kept in ``updates``/``losses`` to be applied after the call when there is none.
    """

    def __init__(self, masked):
        parent = get_stateless_scope()
        super().__init__(state_mapping=masked, collect_losses=True, initialize_variables=False)
        self.parent = parent
        self.masked_ids = set(self.state_mapping)
        self.updates = []

    def get_current_value(self, variable):
        value = self.state_mapping.get(id(variable))
        if value is None and self.parent is not None:
            return self.parent.get_current_value(variable)
        return value

    def add_update(self, update):
        if self.parent is not None:
            self.parent.add_update(update)
            return
        variable, value = update
        self.updates.append((variable, value))
        if id(variable) not in self.masked_ids:
            self.state_mapping[id(variable)] = value

    def add_loss(self, loss):
        if self.parent is not None and self.parent.collect_losses:
            self.parent.add_loss(loss)
        else:
            self.losses.append(loss)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------- the wrapper
@keras.saving.register_keras_serializable(package="keras_rebuild")
class StructuredPruningWrapper(keras.layers.Wrapper):
    """Wraps a Keras 3 layer so that whole input/output channels of its weights can be masked.

    Created by :func:`prune_channels`; you rarely build one yourself. The
    wrapper keeps the wrapped layer's name, so layer names (``ignore=``,
    channel group names, ``model.get_layer``) are the same in the wrapped model.

    Weights (``get_weights()`` order): the wrapped layer's weights, then
    ``in_channel_mask`` and ``out_channel_mask`` (float 0/1) and
    ``pruning_step`` (int32; ``-1`` until :class:`UpdatePruningStep` starts
    training with a schedule; each training call adds one in the graph).
    ``set_weights`` also accepts the wrapped layer's weights alone.

    The layer is called with its maskable weights multiplied by the masks
    (BatchNorm moving statistics are never masked), in training and inference
    alike, on every backend, so the wrapped model computes exactly what
    :func:`strip_pruning` returns. Registered as ``keras_rebuild>StructuredPruningWrapper``:
    a wrapped model saves and loads as ``.keras`` without a custom scope.

    Args:
        layer: The Keras 3 layer to wrap (its class must have a channel handler).
        pruning_params: The settings of :func:`prune_channels`, shared by every
            wrapper of a model and read by :class:`UpdatePruningStep`.
        bn_l1: Weight of an L1 penalty on the masked BatchNorm ``gamma`` (only
            used when ``layer`` is a ``BatchNormalization`` with ``scale=True``).
        **kwargs: Base layer arguments (``name`` defaults to ``layer.name``).
    """

    def __init__(self, layer, pruning_params: Optional[dict] = None, bn_l1: float = 0.0, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise InvalidArgumentTypeError(
                f"Expected `layer` to be a Keras layer. Received: layer={type(layer).__name__} object"
            )
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        params = dict(pruning_params or {"mode": "sparsity"})
        if params.get("mode", "sparsity") not in _shared.MODES:
            raise InvalidArgumentError(
                f"Expected `pruning_params['mode']` to be one of {list(_shared.MODES)}. "
                f"Received: {received('mode', params.get('mode'))}"
            )
        if isinstance(params.get("ignore"), (list, tuple)):
            params["ignore"] = [str(n) for n in params["ignore"]]
        # Plain Python state: kept out of Keras' attribute tracking.
        object.__setattr__(self, "_pruning_params", params)
        object.__setattr__(self, "_runtime", None)
        object.__setattr__(self, "_masking", [])
        object.__setattr__(self, "_multiplier", 1)
        object.__setattr__(self, "_internal", {})
        object.__setattr__(self, "_callback_active", False)
        self.bn_l1 = float(bn_l1)

    # -- properties ------------------------------------------------------------
    @property
    def pruning_params(self) -> dict:
        return dict(self._pruning_params)

    @property
    def needs_callback(self) -> bool:
        """Training needs :class:`UpdatePruningStep` (schedule mode)."""
        return self._pruning_params.get("mode") == "schedule"

    def _own(self):
        names = ("in_channel_mask", "out_channel_mask", "pruning_step", "internal_channel_mask")
        return [getattr(self, n, None) for n in names]

    @property
    def weights(self):
        inner = list(self.layer.weights)
        return inner + [v for v in self._own() if v is not None]

    def set_weights(self, weights):
        if len(weights) == len(self.layer.weights) and len(weights) != len(self.weights):
            self.layer.set_weights(weights)
            return
        super().set_weights(weights)

    def mask_sizes(self):
        """``(input channels, output channels)`` of the masks."""
        return int(self.in_channel_mask.shape[0]), int(self.out_channel_mask.shape[0])

    # -- build -----------------------------------------------------------------
    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        first = _first_shape(input_shape)
        c_in = _last_dim(first)
        try:
            c_out = _last_dim(_first_shape(self.layer.compute_output_shape(input_shape)))
        except Exception:  # pragma: no cover - layers without compute_output_shape
            c_out = None
        handler = get_handler(self.layer)
        roles = handler.weight_roles(self.layer) if handler else [{} for _ in self.layer.weights]
        m = handler.depth_multiplier(self.layer) if handler else 1
        c_in, c_out = _mask_sizes(self.layer.weights, roles, m, c_in, c_out)
        agg = "only_first_replica"
        self.in_channel_mask = self.add_weight(
            name="in_channel_mask", shape=(int(c_in or 1),), initializer="ones", trainable=False,
            aggregation=agg)
        self.out_channel_mask = self.add_weight(
            name="out_channel_mask", shape=(int(c_out or 1),), initializer="ones", trainable=False,
            aggregation=agg)
        start = -1 if self.needs_callback else 0
        self.pruning_step = self.add_weight(
            name="pruning_step", shape=(), dtype="int32", initializer=keras.initializers.Constant(start),
            trainable=False, aggregation=agg)
        slices = _internal_slices(handler, self.layer)
        object.__setattr__(self, "_internal", slices)
        if slices:  # attention heads: one mask over every internal channel set
            start = sum(n for _, n in slices.values())
            self.internal_channel_mask = self.add_weight(
                name="internal_channel_mask", shape=(start,), initializer="ones", trainable=False,
                aggregation=agg)
        maskable = handler.maskable(self.layer) if handler else [False for _ in self.layer.weights]
        masking = [(var, dict(r)) for var, r, mk in zip(self.layer.weights, roles, maskable) if mk and r]
        object.__setattr__(self, "_masking", masking)
        object.__setattr__(self, "_multiplier", int(m))
        object.__setattr__(self, "_pass_training", _accepts(self.layer.call, "training"))
        self.built = True

    # -- call ------------------------------------------------------------------
    def _masked(self, var, roles):
        out = var.value
        for axis, role in roles.items():
            source, index = resolve_role(role, self._multiplier, var.shape[axis])
            if source in self._internal:
                start, n = self._internal[source]
                mask = self.internal_channel_mask[start:start + n]
            else:
                mask = self.out_channel_mask if source == "out" else self.in_channel_mask
            if index is not None:
                mask = keras.ops.take(mask, index)
            shape = [1] * len(var.shape)
            shape[axis] = -1
            out = out * keras.ops.reshape(keras.ops.cast(mask, out.dtype), shape)
        return out

    def call(self, inputs, *args, training=None, **kwargs):
        training_call = _is_true(training)
        if self.needs_callback and training_call and not self._callback_active:
            raise MissingCallbackError(_callback_message(self.name))
        if training_call:
            # Count training steps in the graph, as tfmot does: no host round trip per batch.
            self.pruning_step.assign(self.pruning_step + 1)
        inner = self.layer
        if (self.bn_l1 > 0 and isinstance(inner, keras.layers.BatchNormalization) and inner.scale
                and training_call):
            gamma = keras.ops.convert_to_tensor(inner.gamma)
            mask = keras.ops.cast(self.in_channel_mask, gamma.dtype)
            self.add_loss(self.bn_l1 * keras.ops.sum(keras.ops.abs(gamma * mask)))
        kw = dict(kwargs)
        if training is not None and getattr(self, "_pass_training", False):
            kw["training"] = training
        masked = [(var, self._masked(var, roles)) for var, roles in self._masking]
        with _MaskScope(masked) as scope:
            outputs = inner(inputs, *args, **kw)
        if scope.parent is None:
            for variable, value in scope.updates:
                variable.assign(value)
            for loss in scope.losses:
                inner.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args, **kwargs):
        kwargs.pop("training", None)
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["pruning_params"] = _shared.jsonable(self._pruning_params)
        config["bn_l1"] = self.bn_l1
        return config

    # -- numpy helpers -----------------------------------------------------------
    def channel_masks(self):
        """``(keep_in, keep_out)`` boolean numpy arrays of the current masks."""
        return (np.asarray(keras.ops.convert_to_numpy(self.in_channel_mask)) > 0.5,
                np.asarray(keras.ops.convert_to_numpy(self.out_channel_mask)) > 0.5)

    def masked_layer_weights(self) -> List[np.ndarray]:
        """The wrapped layer's weights with the pruned channels zeroed (others bit-identical)."""
        weights = self.layer.get_weights()
        handler = get_handler(self.layer)
        if handler is None:
            return weights
        keep_in, keep_out = self.channel_masks()
        internal = self.internal_masks()
        if keep_in.all() and keep_out.all() and all(k.all() for k in internal.values()):
            return weights
        m = handler.depth_multiplier(self.layer)
        return [
            mask_array(w, roles, keep_in, keep_out, m, internal) if mk and roles else w
            for w, roles, mk in zip(weights, handler.weight_roles(self.layer), handler.maskable(self.layer))
        ]

    def internal_masks(self):
        """``name -> boolean keep mask`` of the layer's internal channels (attention heads)."""
        if not self._internal:
            return {}
        return _split_internal(keras.ops.convert_to_numpy(self.internal_channel_mask), self._internal)

    def assign_masks(self, keep_in, keep_out, internal=None):
        """Set the masks (host side) and write zeros into the pruned weights."""
        self.in_channel_mask.assign(np.asarray(keep_in, np.float32).reshape(self.in_channel_mask.shape))
        self.out_channel_mask.assign(np.asarray(keep_out, np.float32).reshape(self.out_channel_mask.shape))
        if self._internal:
            self.internal_channel_mask.assign(_join_internal(internal, self._internal))
        self.zero_pruned_weights()

    def zero_pruned_weights(self):
        """Write zeros into the pruned entries of the wrapped layer's variables (host side)."""
        keep_in, keep_out = self.channel_masks()
        internal = self.internal_masks()
        if keep_in.all() and keep_out.all() and all(k.all() for k in internal.values()):
            return
        for var, roles in self._masking:
            value = keras.ops.convert_to_numpy(var)
            new = mask_array(value, roles, keep_in, keep_out, self._multiplier, internal)
            if not np.array_equal(new, value):
                var.assign(new)


def _build_like(new, old):
    """Build ``new`` as ``old`` was when its ``build`` needs several shapes (MultiHeadAttention).

    The wrapper's own ``build`` sees the first input's shape only.
    """
    try:
        params = inspect.signature(type(new).build).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    required = [p for p in params if p.name != "self" and p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    config = old.get_build_config() if old.built else None
    if len(required) > 1 and config:
        new.build_from_config(config)


def _first_shape(shape):
    """The first shape of a (possibly nested) structure of shapes, as a tuple."""
    while isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    if isinstance(shape, dict):  # pragma: no cover - dict inputs
        shape = next(iter(shape.values()))
    return tuple(shape) if shape is not None else ()


def _last_dim(shape):
    if not shape:
        return None
    d = shape[-1]
    return int(d) if d is not None else None


register_handler(StructuredPruningWrapper)(_shared.WrapperHandler)


# ----------------------------------------------------------------------------- helpers
def wrapped_layers(model) -> Dict[str, StructuredPruningWrapper]:
    """``{path: wrapper}`` for every :class:`StructuredPruningWrapper` of ``model`` (nested models too)."""
    out: Dict[str, StructuredPruningWrapper] = {}
    seen = set()

    def walk(m, prefix):
        for layer in m.layers:
            path = prefix + layer.name
            if is_graph_model(layer):
                if id(layer) not in seen:
                    seen.add(id(layer))
                    walk(layer, path + "/")
            elif isinstance(layer, StructuredPruningWrapper):
                out.setdefault(path, layer)

    walk(model, "")
    return out


def _clone(model, layer_fn):
    return _shared.clone_nested(keras.models.clone_model, model, layer_fn)


def _schedule_final_sparsity(schedule) -> float:
    if isinstance(schedule, _schedules.PruningSchedule):
        return float(schedule.target)
    for attr in ("final_sparsity", "target_sparsity"):
        if hasattr(schedule, attr):
            return float(getattr(schedule, attr))
    end = getattr(schedule, "end_step", -1)
    step = end if isinstance(end, numbers.Integral) and end >= 0 else getattr(schedule, "begin_step", 0)
    return float(np.asarray(schedule(int(step))[1]))


def _current_weights(model) -> Dict[str, List[np.ndarray]]:
    """``{path: weights}`` for every layer with weights; wrapped layers' weights masked."""
    out = {}

    def walk(m, prefix, seen):
        for layer in m.layers:
            path = prefix + layer.name
            if is_graph_model(layer):
                if id(layer) not in seen:
                    seen.add(id(layer))
                    walk(layer, path + "/", seen)
            elif isinstance(layer, StructuredPruningWrapper):
                out[path] = layer.masked_layer_weights()
            elif layer.weights:
                out[path] = layer.get_weights()

    walk(model, "", set())
    return out


# ----------------------------------------------------------------------------- prune_channels
def prune_channels(
    model,
    sparsity: Optional[float] = None,
    pruning_schedule=None,
    criterion="l1",
    scope: str = "local",
    ignore: Sequence[str] = (),
    round_to: int = 1,
    min_channels: int = 1,
    threshold: Optional[float] = None,
    data=None,
    bn_l1: float = 0.0,
    frequency: Optional[int] = None,
    **kwargs,
):
    """Wrap a Keras 3 model for whole-channel pruning (the structured twin of tfmot's ``prune_low_magnitude``).

    The same arguments, modes and results as the tf_keras
    :func:`keras_rebuild.wrappers.prune_channels`; see
    :func:`keras_rebuild.prune_channels`. Give exactly one of ``sparsity``
    (one-shot: masks set now), ``pruning_schedule`` (gradual: masks set by
    :class:`UpdatePruningStep` during ``fit``) and ``threshold``.

    Args:
        model: A Keras 3 Functional or Sequential model (not modified).
        sparsity: One-shot fraction of channels to prune per group (or of all
            channels with ``scope="global"``), in [0, 1).
        pruning_schedule: A :mod:`keras_rebuild.schedules` schedule or a tfmot one.
        criterion: ``"l1"``, ``"l2"``, ``"bn_scale"``, a data-driven criterion
            (``"activation"``, ``"apoz"``, ``"taylor"``: with ``data``), or a
            :class:`keras_rebuild.importance.Criterion`.
        scope: ``"local"`` or ``"global"``.
        ignore: Layer names (or paths) whose channel groups stay whole.
        round_to: Kept channel counts are multiples of this.
        min_channels: Every group keeps at least this many channels.
        threshold: One-shot threshold mode (standard deviations).
        data: For data-driven criteria: ``(x, y)`` as a tuple, or ``x`` alone.
        bn_l1: Network-slimming L1 penalty on the masked BatchNorm gammas.
        frequency: Schedule mode: recompute the masks every ``frequency`` steps.
        **kwargs: tfmot's ``block_size``, ... are refused with an explanation.

    Returns:
        A new, uncompiled ``keras.Model`` with :class:`StructuredPruningWrapper` layers.

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        UnsupportedModelError: ``model`` is a subclassed model.
        InvalidArgumentError, InvalidArgumentTypeError: bad arguments.

    Example:
        >>> pruned = prune_channels(model, sparsity=0.5)     # doctest: +SKIP
    """
    with _backend.scope():  # serialising configs must not import TensorFlow on JAX or torch
        return _prune_channels(model, sparsity, pruning_schedule, criterion, scope, ignore, round_to, min_channels,
                               threshold, data, bn_l1, frequency, kwargs)


def _prune_channels(model, sparsity, pruning_schedule, criterion, scope, ignore, round_to, min_channels, threshold,
                    data, bn_l1, frequency, kwargs):
    from keras_rebuild.groups import Analysis
    from keras_rebuild.importance import get_criterion

    _shared.check_tfmot_only_arguments(kwargs)
    if isinstance(model, keras.layers.Layer) and not isinstance(model, keras.Model):
        raise NotAModelError(
            "Expected `model` to be a Keras model: `prune_channels` wraps a whole model, because a pruned "
            "channel must be removed from every layer that shares it. Use "
            "`kr.prune_channels(model, ..., ignore=[names of the layers to leave whole])`. "
            f"Received: model={type(model).__name__} object (layer '{model.name}')"
        )
    check_model(model)
    if any(isinstance(layer, StructuredPruningWrapper) for layer in all_layers(model)):
        raise InvalidArgumentError(
            "Expected `model` not to be wrapped by `prune_channels` already: call "
            f"`keras_rebuild.strip_pruning(model)` first. Received: model='{model.name}' with "
            "StructuredPruningWrapper layers"
        )
    given = [n for n, v in (("sparsity", sparsity), ("pruning_schedule", pruning_schedule), ("threshold", threshold))
             if v is not None]
    if len(given) != 1:
        raise InvalidArgumentError(
            "Expected exactly one of `sparsity` (one-shot), `pruning_schedule` (gradual, with "
            "UpdatePruningStep) and `threshold`. "
            f"Received: sparsity={sparsity!r}, pruning_schedule={pruning_schedule!r}, threshold={threshold!r}"
        )
    if isinstance(bn_l1, bool) or not isinstance(bn_l1, numbers.Real) or not (math.isfinite(bn_l1) and bn_l1 >= 0):
        raise InvalidArgumentError(f"Expected `bn_l1` to be a float >= 0. Received: {received('bn_l1', bn_l1)}")
    if frequency is not None and (isinstance(frequency, bool) or not isinstance(frequency, numbers.Integral)
                                  or frequency < 1):
        raise InvalidArgumentError(
            f"Expected `frequency` to be None or an integer >= 1. Received: {received('frequency', frequency)}")
    if isinstance(ignore, str):
        ignore = [ignore]
    crit = get_criterion(criterion)
    x, y = _shared.split_data(data)
    if crit.needs_data and x is None:
        raise InvalidArgumentError(
            f"Expected `data` for the data-driven criterion '{crit.name}': pass `data=(x, y)` or `data=x`. "
            "Received: data=None"
        )
    mode = given[0] if given[0] != "pruning_schedule" else "schedule"
    schedule_config = None
    if mode == "schedule":
        pruning_schedule = _schedules.get(pruning_schedule)  # tfmot's built-ins become ours
        final = _schedule_final_sparsity(pruning_schedule)
        if not 0.0 <= final < 1.0:
            raise InvalidArgumentError(
                "Expected the pruning schedule's final sparsity to be in [0, 1): a sparsity of 1 would prune every "
                f"channel. Received: final_sparsity={final!r} from {type(pruning_schedule).__name__}"
            )
        schedule_config = _shared.serialize_schedule(pruning_schedule)
    params = {
        "mode": mode, "sparsity": None if sparsity is None else float(sparsity) if isinstance(sparsity, numbers.Real)
        and not isinstance(sparsity, bool) else sparsity,
        "threshold": threshold, "pruning_schedule": schedule_config, "criterion": _shared.criterion_name(crit),
        "scope": scope, "ignore": list(ignore or ()), "round_to": round_to, "min_channels": min_channels,
        "frequency": None if frequency is None else int(frequency),
    }

    analysis = Analysis(model)
    uniform = {g.name: np.ones(g.size) for g in analysis.groups if g.prunable}
    plan = None
    if mode == "schedule":
        _shared.select(analysis, uniform, params, sparsity=0.0)
    else:
        _shared.select(analysis, uniform, params, sparsity=sparsity, threshold=threshold)  # validates first
        if crit.needs_data:
            crit.set_data(model, x, y)
        scores = crit(analysis)
        plan = _shared.make_plan(analysis, scores, params, sparsity=sparsity, threshold=threshold)

    wrap = set()
    for g in analysis.groups:
        if not g.prunable:
            continue
        for path in g.members:
            op = analysis.graph.first_op(path)
            handler = getattr(op, "handler", None)
            if handler is None or handler.kind == "blocked":
                continue
            layer = analysis.graph.layers[path]
            if any(mk and r for r, mk in zip(handler.weight_roles(layer), handler.maskable(layer))):
                wrap.add(path)

    runtime = _shared.Runtime(criterion=crit, data=(x, y) if x is not None else None, schedule=pruning_schedule)
    coef = float(bn_l1)

    def layer_fn(layer, path):
        new = _shared.copy_layer(layer)
        if path in wrap:
            _build_like(new, layer)
            w = StructuredPruningWrapper(new, pruning_params=params, bn_l1=coef)
            object.__setattr__(w, "_runtime", runtime)
            return w
        return new

    if not wrap:
        warnings.warn(
            f"prune_channels: nothing in model '{model.name}' can be pruned: every channel group is a model "
            "input or output, ignored, or blocked (print `kr.analyze(model).summary()` to see why). The returned "
            "model has no pruning wrappers and `rebuild` will not make it smaller.",
            UserWarning, stacklevel=2)
    wrapped = _clone(model, layer_fn)
    for path, new, old in _shared.layer_pairs(wrapped, model):
        if old.weights:
            target = new.layer if isinstance(new, StructuredPruningWrapper) else new
            target.set_weights(old.get_weights())
    if plan is not None:
        _shared.apply_plan(analysis, wrapped_layers(wrapped), plan)
    n_pruned = 0 if plan is None else plan.channels_before - plan.channels_after
    log.info("prune_channels: wrapped %d layers (%s mode), %d channels pruned now", len(wrap), mode, n_pruned)
    return wrapped


# ----------------------------------------------------------------------------- strip
def strip_pruning(model):
    """Remove the pruning wrappers: the original architecture with the pruned channels zeroed.

    Every wrapped layer is replaced by a copy of the layer it wraps whose
    maskable weights are the wrapped weights times the channel masks (every
    other weight, and every BatchNorm moving statistic, is bit-identical).

    Args:
        model: A Keras 3 model returned by :func:`prune_channels` (not modified).

    Returns:
        A new ``keras.Model`` without :class:`StructuredPruningWrapper` layers.

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        UnsupportedModelError: ``model`` is a subclassed model.

    Example:
        >>> final = strip_pruning(pruned)     # doctest: +SKIP
    """
    check_model(model)

    def layer_fn(layer, path):
        if isinstance(layer, StructuredPruningWrapper):
            return _shared.copy_layer(layer.layer)
        return _shared.copy_layer(layer)

    with _backend.scope():
        stripped = _clone(model, layer_fn)
    for path, new, old in _shared.layer_pairs(stripped, model):
        if isinstance(old, StructuredPruningWrapper):
            new.set_weights(old.masked_layer_weights())
        elif old.weights:
            new.set_weights(old.get_weights())
    return stripped


# ----------------------------------------------------------------------------- callback
class UpdatePruningStep(keras.callbacks.Callback):
    """Keras 3 callback that drives :func:`prune_channels` models during training.

    The Keras 3 twin of :class:`keras_rebuild.wrappers.UpdatePruningStep`,
    with the same semantics (use :class:`keras_rebuild.UpdatePruningStep`,
    which picks the right one):

    * each training batch advances the wrappers' ``pruning_step`` inside the
      training graph (saved with the model, so a reloaded model resumes its
      schedule where it was);
    * at a step where the schedule prunes, before that batch, the callback
      computes channel importance from the current (masked) weights, selects
      the schedule's sparsity and assigns the new masks on the host (writing
      zeros into the pruned weights). Channels pruned earlier rank below all
      others, so masks only grow while the sparsity does not decrease. On JAX
      it first syncs the trainer's state (by reading ``self.model``), so the
      assignments are not lost; it does so on pruning steps only;
    * between pruning steps the batch hook compares two Python ints;
    * at the end of each epoch the step is read back and pruned weights are
      zeroed again; when ``fit`` ends below the schedule's target sparsity it
      warns once.

    Args:
        data: Data for data-driven criteria (``(x, y)`` or ``x``).
        criterion: Override the criterion.
        pruning_schedule: Override the schedule.

    Attributes:
        step: The number of training steps done.
        schedule: The schedule in use.
        last_sparsity: The sparsity of the last mask update, or ``None``.
        plan_: The :class:`~keras_rebuild.Plan` the masks carry out since the
            last update, or ``None``.
    """

    def __init__(self, data=None, criterion=None, pruning_schedule=None):
        super().__init__()
        self._data = data
        self._criterion_override = criterion
        self._schedule_override = None if pruning_schedule is None else _schedules.get(pruning_schedule)
        self._trained = None  # the model given to set_model (read without a JAX state sync)
        self._wrappers: Dict[str, StructuredPruningWrapper] = {}
        self._analysis = None
        self._analysis_model = None
        self._epoch_start = 0
        self._next_prune: Optional[int] = -1  # -1: not set up yet (the batch hook sets up)
        self._warned = False
        self.step = 0
        self.params_ = {}
        self.schedule = None
        self.criterion = None
        self.last_sparsity = None
        self.plan_ = None

    # -- setup -------------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        self._trained = model
        self._wrappers = {}
        self._next_prune = -1

    def _synced_model(self):
        """The model with its variables up to date (on JAX: the trainer's state synced into them)."""
        return self.model  # Keras 3's Callback.model syncs the JAX trainer state

    def _setup(self):
        model = self._synced_model()
        self._wrappers = wrapped_layers(model)
        self._next_prune = None
        self.plan_ = None  # read from the masks at the first update of this training
        if not self._wrappers:
            log.warning("UpdatePruningStep: the model has no StructuredPruningWrapper layers; nothing to do.")
            return
        first = next(iter(self._wrappers.values()))
        self.params_ = first.pruning_params
        runtime = first._runtime
        self.schedule = self._schedule_override
        if self.schedule is None and self.params_.get("mode") == "schedule":
            self.schedule = runtime.schedule if runtime is not None and runtime.schedule is not None else \
                _shared.deserialize_schedule(self.params_["pruning_schedule"], keras.saving.get_registered_object)
            self.schedule = _schedules.get(self.schedule)
        self.schedule = _shared.with_frequency(self.schedule, self.params_.get("frequency"))
        if self._criterion_override is not None:
            from keras_rebuild.importance import get_criterion

            self.criterion = get_criterion(self._criterion_override)
        elif runtime is not None and runtime.criterion is not None:
            self.criterion = runtime.criterion
        else:
            self.criterion = None
        if self._data is None and runtime is not None:
            self._data = runtime.data
        step = min(self._read_steps())
        self.step = max(step, 0)
        self._epoch_start = self.step
        if step < 0:
            self._set_step(0)
        if self._analysis_model is not model:
            self._analysis = None
        for w in self._wrappers.values():
            object.__setattr__(w, "_callback_active", True)
        if self.schedule is not None:
            self.analysis()
            self._next_prune = self._next_pruning_step(self.step)

    def _read_steps(self):
        return [int(keras.ops.convert_to_numpy(w.pruning_step)) for w in self._wrappers.values()]

    def _set_step(self, value):
        for w in self._wrappers.values():
            w.pruning_step.assign(int(value))

    def _sync_step(self):
        steps = self._read_steps()
        self.step = min(steps)  # a wrapper called twice per step (a shared layer) counts twice
        if any(v != self.step for v in steps):
            self._set_step(self.step)

    def _next_pruning_step(self, step) -> Optional[int]:
        if self.schedule is None:
            return None
        if isinstance(self.schedule, _schedules.PruningSchedule):
            return self.schedule.next_pruning_step(step)
        return step  # a schedule of your own: asked at every step

    def on_train_begin(self, logs=None):
        self._setup()
        if self._next_prune is not None and self._next_prune <= self.step:
            self._pruning_step(self.step)

    def on_epoch_begin(self, epoch, logs=None):
        if self._wrappers:
            self._epoch_start = self.step

    def on_train_batch_begin(self, batch, logs=None):
        # The whole per-batch cost between pruning steps: one comparison (no JAX state sync).
        nxt = self._next_prune
        if nxt is None or self._epoch_start + batch < nxt:
            return
        if nxt == -1 and not self._wrappers:  # used without on_train_begin (custom loop)
            self._setup()
            if self._next_prune is None or self._epoch_start + batch < self._next_prune:
                return
        self._pruning_step(self._epoch_start + batch)

    def on_epoch_end(self, epoch, logs=None):
        if self._wrappers:
            self._synced_model()
            self._sync_step()
            self._zero_weights()

    def on_train_end(self, logs=None):
        if not self._wrappers:
            return
        self._synced_model()
        self._sync_step()
        self._zero_weights()
        for w in self._wrappers.values():
            object.__setattr__(w, "_callback_active", False)
        steps = (self.params or {}).get("steps")
        message = None if self._warned else _shared.below_target_message(self.schedule, self.step, steps)
        if message:
            self._warned = True
            warnings.warn(message, UserWarning, stacklevel=2)

    # -- logic -------------------------------------------------------------------
    def _pruning_step(self, step):
        self.step = step
        if isinstance(self.schedule, _schedules.PruningSchedule):
            should, sparsity = True, self.schedule.sparsity(step)
        else:
            should, sparsity = self._decide(step)
        if should:
            self.update_masks(sparsity)
        self._next_prune = self._next_pruning_step(step + 1)

    def _decide(self, step):
        if isinstance(self.schedule, _schedules.PruningSchedule):
            return self.schedule(step)
        should, sparsity = self.schedule(int(step))
        should = bool(np.asarray(should))
        sparsity = float(np.asarray(sparsity))
        freq = self.params_.get("frequency")
        if freq:
            begin = int(getattr(self.schedule, "begin_step", 0))
            end = int(getattr(self.schedule, "end_step", -1))
            should = step >= begin and (end < 0 or step <= end) and (step - begin) % int(freq) == 0
        return should, sparsity

    def target_sparsity(self, step: Optional[int] = None) -> Optional[float]:
        """The schedule's sparsity at ``step`` (default: the current step); ``None`` without a schedule."""
        if self.schedule is None:
            return None
        step = self.step if step is None else int(step)
        if isinstance(self.schedule, _schedules.PruningSchedule):
            return self.schedule.sparsity(step)
        return self._decide(step)[1]

    def _get_criterion(self):
        if self.criterion is None:
            from keras_rebuild.importance import get_criterion

            name = self.params_.get("criterion", "l1")
            try:
                self.criterion = get_criterion(name)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(
                    f"Expected a criterion to update the masks; the model was pruned with '{name}', which is not a "
                    "built-in name. Pass it again: `UpdatePruningStep(criterion=...)`. "
                    f"Received: criterion={name!r}"
                ) from exc
        return self.criterion

    def analysis(self):
        """The (cached) channel analysis of the wrapped model being trained."""
        model = self._trained
        if self._analysis is None or self._analysis_model is not model:
            from keras_rebuild.groups import Analysis

            with _backend.scope():
                self._analysis = Analysis(self._synced_model())
            self._analysis_model = model
        return self._analysis

    def update_masks(self, sparsity: float):
        """Recompute importance from the current weights and set every mask for ``sparsity``."""
        model = self._synced_model()  # JAX: the trainer's state into the variables before reading/assigning
        if not self._wrappers:
            self._setup()
        analysis = self.analysis()
        crit = self._get_criterion()
        if crit.needs_data:
            x, y = _shared.split_data(self._data)
            if x is None:
                raise InvalidArgumentError(
                    f"Expected data for the data-driven criterion '{crit.name}': pass "
                    "`UpdatePruningStep(data=(x, y))` (data given to prune_channels is not saved with the model). "
                    "Received: data=None"
                )
            crit.set_data(model, x, y)
        current = _current_weights(model)
        current = {p: w for p, w in current.items() if p in analysis.weights}
        if crit.needs_data:
            # Measured on the live wrapped model (which applies its masks itself); the analysis' weights
            # (read by fallbacks for unmeasurable groups) are brought up to date first.
            analysis.weights.update(current)
            scores = crit(analysis)
        else:
            scores = crit(analysis, weights=current)
        if self.plan_ is None:  # resuming: the saved masks are the decision so far, read back once
            self.plan_ = _shared.plan_of_masks(analysis, self._wrappers)
        scores = _shared.rank_pruned_last(analysis, scores, self.plan_.apply(analysis))
        self.plan_ = _shared.make_plan(analysis, scores, self.params_, sparsity=float(sparsity))
        _shared.apply_plan(analysis, self._wrappers, self.plan_)
        self.last_sparsity = float(sparsity)
        log.info("UpdatePruningStep: step %d, sparsity %.3f, %d channels pruned", self.step, sparsity,
                 self.plan_.channels_before - self.plan_.channels_after)

    def _zero_weights(self):
        for w in self._wrappers.values():
            w.zero_pruned_weights()
