"""Structured (whole-channel) pruning wrappers, shaped like tfmot's pruning API.

tensorflow-model-optimization prunes single weights::

    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=...)
    pruned.fit(x, y, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    final = tfmot.sparsity.keras.strip_pruning(pruned)

keras_rebuild prunes whole channels with the same three steps, and the result
can then be :func:`~keras_rebuild.rebuild`-t into a physically smaller model::

    pruned = kr.prune_channels(model, pruning_schedule=kr.PolynomialDecay(...))  # or tfmot's schedule
    pruned.fit(x, y, callbacks=[kr.UpdatePruningStep()])
    small = kr.rebuild(pruned)          # or kr.strip_pruning(pruned): same shapes, zero channels

How it works. :func:`prune_channels` clones the model and wraps every layer
whose weights are indexed by the channels of a prunable group (the convs
writing the channels, their BatchNorms, the kernels reading them...) in a
:class:`StructuredPruningWrapper`. Each wrapper holds non-trainable float
masks over its input and output channels and a ``pruning_step`` counter.
Layers sharing a channel group share one decision: masks are always set for
the whole model at once from one :func:`keras_rebuild.plan.select_channels`
call. The wrapper calls its layer with *masked* weights (``weight * mask``, in
training and at inference alike), so the wrapped model computes exactly what
the stripped model computes, and pruned weights get zero gradient. The
:class:`UpdatePruningStep` callback advances the step, recomputes channel
importance from the current weights when the schedule says so, and assigns
the new masks on the host (also writing the zeros into the weights).

Per batch the cost is tfmot's: the wrapper advances its ``pruning_step``
in the training graph (as tfmot's wrapper does), and the callback's batch hook
only compares two Python ints; it does host work (importance, selection, mask
assignment) on pruning steps only, and never reads a tensor back otherwise.

Masks are monotone while the schedule's sparsity does not decrease
(``ConstantSparsity``, ``PolynomialDecay`` from :mod:`keras_rebuild.schedules`,
or tfmot's, converted to ours through their config): channels pruned earlier are
ranked below every other channel at each update, so once pruned a channel
stays pruned, whatever the criterion.
"""
from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from keras_rebuild import schedules as _schedules
from keras_rebuild._compat import keras, register_serializable, tf
from keras_rebuild.backends import tf_keras as _tf_keras_backend
from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    MissingCallbackError,
    NotAModelError,
    received,
)
from keras_rebuild.graph import all_layers, check_model, is_graph_model
from keras_rebuild.handlers import LayerHandler, get_handler, mask_array, register_handler, resolve_role
from keras_rebuild.pruning import Runtime as _Runtime
from keras_rebuild.pruning import WrapperHandler as _WrapperHandler
from keras_rebuild.pruning import clone_nested as _nested_clone
from keras_rebuild.pruning import copy_layer as _copy_layer
from keras_rebuild.pruning import internal_slices as _internal_slices
from keras_rebuild.pruning import mask_sizes as _mask_sizes
from keras_rebuild.pruning import join_internal as _join_internal
from keras_rebuild.pruning import split_internal as _split_internal
from keras_rebuild.pruning import layer_pairs as _pairs
from keras_rebuild.pruning import check_tfmot_only_arguments as _shared_check_tfmot_only_arguments
from keras_rebuild.pruning import apply_plan as _apply_plan
from keras_rebuild.pruning import criterion_name as _criterion_name
from keras_rebuild.pruning import jsonable as _jsonable
from keras_rebuild.pruning import make_plan as _plan
from keras_rebuild.pruning import plan_of_masks as _plan_of_masks
from keras_rebuild.pruning import rank_pruned_last as _rank_pruned_last
from keras_rebuild.pruning import select as _select
from keras_rebuild.pruning import serialize_schedule as _serialize_schedule
from keras_rebuild.pruning import split_data as _split_data
from keras_rebuild.pruning import with_frequency as _with_frequency

log = logging.getLogger("keras_rebuild")

_MODES = ("sparsity", "threshold", "schedule")


def _callback_message(name: str) -> str:
    return (
        "Expected the `keras_rebuild.UpdatePruningStep()` callback when training a model wrapped by "
        "`prune_channels(..., pruning_schedule=...)`: it advances the pruning step and updates the "
        "channel masks. Add it to training: "
        "`model.fit(x, y, callbacks=[keras_rebuild.UpdatePruningStep()])` (in a custom training "
        "loop call its `set_model(model)`, `on_train_begin()`, and `on_train_batch_begin(step)` / "
        "`on_train_batch_end(step)` around each step). "
        f"Received: a training call of the wrapped layer '{name}' without the callback"
    )


def _is_true(training) -> bool:
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    if isinstance(training, numbers.Integral):
        return bool(training)
    return False


# ----------------------------------------------------------------------------- the wrapper
@register_serializable()
class StructuredPruningWrapper(keras.layers.Wrapper):
    """Wraps a layer so that whole input/output channels of its weights can be masked.

    Created by :func:`prune_channels`; you rarely build one yourself. The
    wrapper keeps the wrapped layer's name, so layer names (``ignore=``, channel
    group names, ``model.get_layer``) are the same in the wrapped model.

    Weights of the wrapper: the wrapped layer's weights (in their order), then
    ``in_channel_mask`` and ``out_channel_mask`` (float 0/1, one entry per
    input/output channel of the layer's first input/output) and
    ``pruning_step`` (int64; ``-1`` until :class:`UpdatePruningStep` starts
    training with a schedule; each training call adds one in the graph, as
    tfmot's wrapper does). ``get_weights()``/``set_weights()`` use this
    order; ``set_weights`` also accepts the wrapped layer's weights alone.

    The layer is called with its maskable weights multiplied by the masks
    (BatchNorm moving statistics are never masked), in training and
    inference alike, so the wrapped model computes exactly what
    :func:`strip_pruning` returns.

    Args:
        layer: The Keras layer to wrap (its class must have a channel handler).
        pruning_params: The settings of :func:`prune_channels` (mode, schedule
            config, criterion name, scope, ...), shared by every wrapper of a
            model and read by :class:`UpdatePruningStep`.
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
        if params.get("mode", "sparsity") not in _MODES:
            raise InvalidArgumentError(
                f"Expected `pruning_params['mode']` to be one of {list(_MODES)}. "
                f"Received: {received('mode', params.get('mode'))}"
            )
        if isinstance(params.get("ignore"), (list, tuple)):
            params["ignore"] = [str(n) for n in params["ignore"]]
        object.__setattr__(self, "_pruning_params", params)
        self.bn_l1 = float(bn_l1)
        self.in_channel_mask = None
        self.out_channel_mask = None
        self.pruning_step = None
        self.internal_channel_mask = None
        object.__setattr__(self, "_internal", {})
        # Python-only state (never saved): set by UpdatePruningStep while it trains the model.
        self._callback_active = False
        object.__setattr__(self, "_runtime", None)
        object.__setattr__(self, "_masking", [])

    # -- properties ------------------------------------------------------------
    @property
    def pruning_params(self) -> dict:
        return dict(self._pruning_params)

    @property
    def needs_callback(self) -> bool:
        """Training needs :class:`UpdatePruningStep` (schedule mode)."""
        return self._pruning_params.get("mode") == "schedule"

    @property
    def weights(self):
        own = [v for v in (self.in_channel_mask, self.out_channel_mask, self.pruning_step,
                           self.internal_channel_mask) if v is not None]
        return list(self.layer.weights) + own

    def set_weights(self, weights):
        if len(weights) == len(self.layer.weights) and len(weights) != len(self.weights):
            self.layer.set_weights(weights)
            return
        super().set_weights(weights)

    # -- build -----------------------------------------------------------------
    def build(self, input_shape=None):
        super().build(input_shape)
        c_in = _last_dim(_first_shape(input_shape))
        try:
            c_out = _last_dim(_first_shape(self.layer.compute_output_shape(input_shape)))
        except Exception:  # pragma: no cover - layers without compute_output_shape
            c_out = None
        handler = get_handler(self.layer)
        roles = handler.weight_roles(self.layer) if handler else [{} for _ in self.layer.weights]
        m = handler.depth_multiplier(self.layer) if handler else 1
        c_in, c_out = _mask_sizes(self.layer.weights, roles, m, c_in, c_out)
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.in_channel_mask = self.add_weight(
            "in_channel_mask", shape=(int(c_in or 1),), initializer="ones", trainable=False, aggregation=agg)
        self.out_channel_mask = self.add_weight(
            "out_channel_mask", shape=(int(c_out or 1),), initializer="ones", trainable=False, aggregation=agg)
        start = -1 if self.needs_callback else 0
        self.pruning_step = self.add_weight(
            "pruning_step", shape=(), dtype=tf.int64, initializer=keras.initializers.Constant(start),
            trainable=False, aggregation=agg)
        slices = _internal_slices(handler, self.layer)
        object.__setattr__(self, "_internal", slices)
        if slices:  # attention heads: one mask over every internal channel set
            start = sum(n for _, n in slices.values())
            self.internal_channel_mask = self.add_weight(
                "internal_channel_mask", shape=(start,), initializer="ones", trainable=False, aggregation=agg)
        self._plan_masking(handler, roles, m)
        if self.bn_l1 > 0 and isinstance(self.layer, keras.layers.BatchNormalization) and self.layer.scale:
            gamma = self.layer.gamma
            mask = self.in_channel_mask
            coef = self.bn_l1
            self.add_loss(lambda: coef * tf.reduce_sum(tf.abs(gamma * tf.cast(mask, gamma.dtype))))

    def _plan_masking(self, handler, roles, m):
        """Find, per maskable weight, the attributes of the layer that hold it."""
        masking = []
        maskable = handler.maskable(self.layer) if handler else [False for _ in self.layer.weights]
        attrs = _variable_attributes(self.layer)
        for var, r, mk in zip(self.layer.weights, roles, maskable):
            if not mk or not r:
                continue
            names = [(owner, k) for owner, k, v in attrs if v is var]
            if not names:
                raise InvalidArgumentError(
                    f"Expected the weight '{var.name}' of layer '{self.layer.name}' to be an attribute of the "
                    "layer, so that it can be masked. Received: a weight the layer keeps elsewhere"
                )
            masking.append((var, tuple(names), dict(r)))
        object.__setattr__(self, "_masking", masking)
        object.__setattr__(self, "_multiplier", int(m))

    # -- call ------------------------------------------------------------------
    # The wrapper's own code has no tensor-dependent Python control flow: AutoGraph is
    # skipped for it (converting it per call is slow on big models); the wrapped layer's
    # call is converted as Keras itself would convert it.
    @tf.autograph.experimental.do_not_convert
    def _masked(self, var, roles):
        t = tf.convert_to_tensor(var) if not isinstance(var, tf.Tensor) else var
        out = t
        for axis, role in roles.items():
            source, index = resolve_role(role, self._multiplier, t.shape[axis])
            if source in self._internal:
                start, n = self._internal[source]
                mask = self.internal_channel_mask[start:start + n]
            else:
                mask = self.out_channel_mask if source == "out" else self.in_channel_mask
            if index is not None:
                mask = tf.gather(mask, index)
            shape = [1] * t.shape.rank
            shape[axis] = -1
            out = out * tf.reshape(tf.cast(mask, t.dtype), shape)
        return out

    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, *args, training=None, **kwargs):
        if self.needs_callback and _is_true(training) and not self._callback_active:
            error = MissingCallbackError(_callback_message(self.name))
            # Keep our error class (and message) through AutoGraph's and Keras' error rewriting.
            error.ag_pass_through = True
            error._keras_call_info_injected = True
            raise error
        if self.pruning_step is not None and _is_true(training):
            # Count training steps in the graph, as tfmot does: no host round trip per batch.
            self.pruning_step.assign_add(1)
        inner = self.layer
        expects_mask, expects_training = _tf_keras_backend.call_arguments(inner)
        kw = dict(kwargs)
        if not expects_mask:
            kw.pop("mask", None)
        if expects_training:
            kw["training"] = training
        masked = [(names, self._masked(var, roles)) for var, names, roles in self._masking]
        try:
            for names, value in masked:
                for owner, name in names:
                    object.__setattr__(owner, name, value)
            call_fn = tf.__internal__.autograph.tf_convert(
                inner.call, tf.__internal__.autograph.control_status_ctx())
            outputs = call_fn(inputs, *args, **kw)
            self._activity_loss(inner, outputs)
            return outputs
        finally:
            # Restore the variables themselves (not "what was there"): safe with replica threads.
            for var, names, _ in self._masking:
                for owner, name in names:
                    object.__setattr__(owner, name, var)

    def _activity_loss(self, inner, outputs):
        """The inner layer's activity-regularizer loss, as its own ``__call__`` would add it."""
        regularizer = inner.activity_regularizer
        if regularizer is None:
            return
        for output in tf.nest.flatten(outputs):
            loss = tf.convert_to_tensor(regularizer(output))
            batch = tf.cast(tf.shape(output)[0], loss.dtype)
            self.add_loss(tf.math.divide_no_nan(loss, batch))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["pruning_params"] = _jsonable(self._pruning_params)
        config["bn_l1"] = self.bn_l1
        return config

    # -- numpy helpers -----------------------------------------------------------
    def channel_masks(self):
        """``(keep_in, keep_out)`` boolean numpy arrays of the current masks."""
        return (np.asarray(keras.backend.get_value(self.in_channel_mask)) > 0.5,
                np.asarray(keras.backend.get_value(self.out_channel_mask)) > 0.5)

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

    def mask_sizes(self):
        """``(input channels, output channels)`` of the masks."""
        return int(self.in_channel_mask.shape[0]), int(self.out_channel_mask.shape[0])

    def internal_masks(self):
        """``name -> boolean keep mask`` of the layer's internal channels (attention heads)."""
        if not self._internal:
            return {}
        return _split_internal(keras.backend.get_value(self.internal_channel_mask), self._internal)

    def assign_masks(self, keep_in, keep_out, internal=None):
        """Set the masks from boolean keep arrays and zero the pruned weights."""
        self._assign_masks(keep_in, keep_out, internal)

    def _assign_masks(self, keep_in, keep_out, internal=None):
        self.in_channel_mask.assign(np.asarray(keep_in, np.float32).reshape(self.in_channel_mask.shape))
        self.out_channel_mask.assign(np.asarray(keep_out, np.float32).reshape(self.out_channel_mask.shape))
        if self._internal:
            self.internal_channel_mask.assign(_join_internal(internal, self._internal))
        self._zero_pruned_weights()

    def _zero_pruned_weights(self):
        """Write zeros into the pruned entries of the wrapped layer's variables (host side)."""
        keep_in, keep_out = self.channel_masks()
        internal = self.internal_masks()
        if keep_in.all() and keep_out.all() and all(k.all() for k in internal.values()):
            return
        for var, _, roles in self._masking:
            value = var.numpy()
            new = mask_array(value, roles, keep_in, keep_out, self._multiplier, internal)
            if not np.array_equal(new, value):
                var.assign(new)


def _variable_attributes(layer, depth: int = 3):
    """``(owner, attribute, value)`` for the attributes of ``layer`` and its sub-layers (an RNN's cell)."""
    out = []
    for name, value in list(vars(layer).items()):
        out.append((layer, name, value))
        if depth > 1 and isinstance(value, keras.layers.Layer) and value is not layer:
            out.extend(_variable_attributes(value, depth - 1))
    return out


def _first_shape(shape) -> tf.TensorShape:
    """The first shape of a (possibly nested) list of shapes."""
    while isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple, tf.TensorShape)):
        shape = shape[0]
    return tf.TensorShape(shape)


def _last_dim(shape: tf.TensorShape):
    if shape.rank is None or shape.rank < 1:
        return None
    d = shape[-1]
    return int(d) if d is not None else None



# ----------------------------------------------------------------------------- analysis handler
StructuredPruningWrapperHandler = register_handler(StructuredPruningWrapper)(_WrapperHandler)


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


def _has_foreign_wrappers(model) -> Optional[str]:
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if type(layer).__name__ == "PruneLowMagnitude":
            return layer.name
        if is_graph_model(layer):
            stack.extend(layer.layers)
    return None


def _clone(model, layer_fn):
    return _nested_clone(keras.models.clone_model, model, layer_fn)



def _schedule_final_sparsity(schedule) -> float:
    if isinstance(schedule, _schedules.PruningSchedule):
        return float(schedule.target)
    for attr in ("final_sparsity", "target_sparsity"):
        if hasattr(schedule, attr):
            return float(getattr(schedule, attr))
    end = getattr(schedule, "end_step", -1)
    step = end if isinstance(end, numbers.Integral) and end >= 0 else getattr(schedule, "begin_step", 0)
    _, sparsity = schedule(tf.constant(int(step), tf.int64))
    return float(np.asarray(sparsity))



def _deserialize_schedule(config: dict):
    name = config.get("class_name")
    schedule = _schedules.deserialize(config)
    if schedule is not None:
        return schedule
    cls = keras.saving.get_registered_object(name)
    if cls is None:
        raise InvalidArgumentError(
            f"Expected a known pruning schedule class to resume training; '{name}' is neither "
            "ConstantSparsity/PolynomialDecay nor registered with `keras.saving.register_keras_serializable`. "
            "Register it, or pass `UpdatePruningStep(pruning_schedule=...)`. "
            f"Received: {received('pruning_schedule', config)}"
        )
    return cls.from_config(config["config"]) if hasattr(cls, "from_config") else cls(**config["config"])






# ----------------------------------------------------------------------------- mask updates
def _current_weights(model, wrappers) -> Dict[str, List[np.ndarray]]:
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
# On tf_keras, tfmot itself is at hand for 2:4 kernels after the channel rebuild.
_TFMOT_ADVICE = {
    "sparsity_m_by_n": "keras_rebuild prunes channels, not weights inside a channel; for 2:4 sparse kernels, "
                       "`kr.rebuild` the channel-pruned model, then apply "
                       "`tfmot.sparsity.keras.prune_low_magnitude(small, sparsity_m_by_n=(2, 4), ...)` to it",
}


def _check_tfmot_only_arguments(kwargs):
    _shared_check_tfmot_only_arguments(kwargs, advice=_TFMOT_ADVICE)


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
    """Wrap a model for whole-channel pruning (the structured twin of tfmot's ``prune_low_magnitude``).

    Returns a new model (the input is never modified) in which every layer
    whose weights are indexed by the channels of a prunable group is wrapped
    in a :class:`StructuredPruningWrapper`. Layers sharing a channel group
    (a conv, its BatchNorm, the kernels reading it, every conv writing a
    residual stream) share one mask decision. Model inputs and outputs, and
    channels coupled by LayerNorm, softmax or unknown layers, are never pruned.

    Three modes, give exactly one of ``sparsity``, ``pruning_schedule`` and
    ``threshold``:

    * ``sparsity=0.5``: one-shot. Masks are chosen now from ``criterion``, so
      ``strip_pruning(prune_channels(m, sparsity=0.5))`` needs no training.
      The masks stay fixed afterwards: the model can be fine-tuned with or
      without :class:`UpdatePruningStep` (pruned weights get zero gradient).
    * ``pruning_schedule=kr.PolynomialDecay(...)`` (or ``ConstantSparsity``,
      ours or tfmot's, or any tfmot ``PruningSchedule``): gradual. The
      schedule's sparsity is used as the fraction of *channels* (tfmot: of
      weights); masks start full and :class:`UpdatePruningStep` (required in
      ``fit``) updates them when ``schedule(step)`` says prune. tfmot's
      ``ConstantSparsity``/``PolynomialDecay`` are converted to ours through
      their config, so no TensorFlow op runs per batch to ask them.
    * ``threshold=k``: one-shot; prune channels scoring more than ``k``
      standard deviations below the mean (see ``plan.select_channels``).

    Args:
        model: A tf_keras Functional or Sequential model (not modified). The
            whole model, not a layer: channels are shared between layers, so
            tfmot's per-layer ``clone_function`` pattern becomes ``ignore=``.
        sparsity: One-shot fraction of channels to prune per group (or of all
            channels with ``scope="global"``), in [0, 1).
        pruning_schedule: A :mod:`keras_rebuild.schedules` schedule or a tfmot
            one, ``schedule(step) -> (should_prune, sparsity)``; its final
            sparsity must be < 1.
        criterion: Importance criterion name (``"l1"``, ``"l2"``,
            ``"bn_scale"``, ``"activation"``, ``"apoz"``, ``"taylor"``,
            ``"random"``) or a :class:`keras_rebuild.importance.Criterion`.
        scope: ``"local"`` (each group prunes its own fraction) or ``"global"``.
        ignore: Layer names (or paths) whose channel groups stay whole.
        round_to: Kept channel counts are multiples of this.
        min_channels: Every group keeps at least this many channels.
        threshold: One-shot threshold mode (standard deviations).
        data: For data-driven criteria: ``(x, y)`` as a tuple, or ``x`` alone.
        bn_l1: Network-slimming L1 penalty on the (masked) BatchNorm gammas of
            the wrapped model, added to the training loss; 0 disables it.
        frequency: Schedule mode: recompute the masks every ``frequency``
            steps inside the schedule's ``[begin_step, end_step]`` instead of
            at the schedule's own frequency.
        **kwargs: tfmot's ``block_size``, ``block_pooling_type``,
            ``sparsity_m_by_n`` and ``pruning_policy`` are refused with an
            error that says what keras_rebuild does instead.

    Returns:
        A new ``keras.Model`` with :class:`StructuredPruningWrapper` layers
        (uncompiled: compile it, under a distribution strategy's scope if any).

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        UnsupportedModelError: ``model`` is a subclassed model.
        InvalidArgumentError: bad argument values: not exactly one mode, a
            sparsity outside [0, 1), a schedule whose final sparsity is >= 1,
            an unknown layer in ``ignore``, a data-driven criterion without
            ``data``, or a model that is already wrapped.
            Also tfmot-only arguments (``block_size``, ...).
        InvalidArgumentTypeError: arguments of the wrong type, unknown keyword
            arguments, or a single layer instead of a model.

    Warns:
        UserWarning: nothing in the model can be pruned (every channel group
            is blocked, ignored or a model input/output).

    Example:
        >>> pruned = kr.prune_channels(model, sparsity=0.5)       # doctest: +SKIP
        >>> small = kr.rebuild(pruned)                            # doctest: +SKIP
        >>> schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=1000)
        >>> pruned = kr.prune_channels(model, pruning_schedule=schedule)  # doctest: +SKIP
        >>> pruned.compile("adam", "sparse_categorical_crossentropy")     # doctest: +SKIP
        >>> pruned.fit(x, y, epochs=5, callbacks=[kr.UpdatePruningStep()])  # doctest: +SKIP
    """
    from keras_rebuild.groups import Analysis
    from keras_rebuild.importance import get_criterion

    _check_tfmot_only_arguments(kwargs)
    if isinstance(model, keras.layers.Layer) and not isinstance(model, keras.Model):
        raise NotAModelError(
            "Expected `model` to be a Keras model: `prune_channels` wraps a whole model, because a pruned "
            "channel must be removed from every layer that shares it. tfmot's per-layer pattern "
            "(`clone_model(model, clone_function=...)` calling `prune_low_magnitude(layer)`) becomes one call: "
            "`kr.prune_channels(model, ..., ignore=[names of the layers to leave whole])`. "
            f"Received: model={type(model).__name__} object (layer '{model.name}')"
        )
    check_model(model)
    if any(isinstance(layer, StructuredPruningWrapper) for layer in all_layers(model)):
        raise InvalidArgumentError(
            "Expected `model` not to be wrapped by `prune_channels` already: call "
            f"`keras_rebuild.strip_pruning(model)` first. Received: model='{model.name}' with StructuredPruningWrapper layers"
        )
    foreign = _has_foreign_wrappers(model)
    if foreign:
        raise InvalidArgumentError(
            "Expected `model` without tfmot pruning wrappers: call `tfmot.sparsity.keras.strip_pruning(model)` "
            f"(or `keras_rebuild.rebuild(model)`) first. Received: model with PruneLowMagnitude layer '{foreign}'"
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
    x, y = _split_data(data)
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
        schedule_config = _serialize_schedule(pruning_schedule)
    params = {
        "mode": mode, "sparsity": None if sparsity is None else float(sparsity) if isinstance(sparsity, numbers.Real)
        and not isinstance(sparsity, bool) else sparsity,
        "threshold": threshold, "pruning_schedule": schedule_config, "criterion": _criterion_name(crit),
        "scope": scope, "ignore": list(ignore or ()), "round_to": round_to, "min_channels": min_channels,
        "frequency": None if frequency is None else int(frequency),
    }

    analysis = Analysis(model)
    # Validate the plan arguments now (a dry run with uniform scores), and choose one-shot masks.
    uniform = {g.name: np.ones(g.size) for g in analysis.groups if g.prunable}
    plan = None
    if mode == "schedule":
        _select(analysis, uniform, params, sparsity=0.0)
    else:
        _select(analysis, uniform, params, sparsity=sparsity, threshold=threshold)  # validates first
        if crit.needs_data:
            crit.set_data(model, x, y)
        scores = crit(analysis)
        plan = _plan(analysis, scores, params, sparsity=sparsity, threshold=threshold)

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

    runtime = _Runtime(criterion=crit, data=(x, y) if x is not None else None, schedule=pruning_schedule)
    coef = float(bn_l1)

    def layer_fn(layer, path):
        new = _copy_layer(layer)
        if path in wrap:
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
    for path, new, old in _pairs(wrapped, model):
        if old.weights:
            target = new.layer if isinstance(new, StructuredPruningWrapper) else new
            target.set_weights(old.get_weights())
    if plan is not None:
        _apply_plan(analysis, wrapped_layers(wrapped), plan)
    n_pruned = 0 if plan is None else plan.channels_before - plan.channels_after
    log.info("prune_channels: wrapped %d layers (%s mode), %d channels pruned now", len(wrap), mode, n_pruned)
    return wrapped



# ----------------------------------------------------------------------------- strip
def strip_pruning(model):
    """Remove the pruning wrappers: the original architecture with the pruned channels zeroed.

    Like ``tfmot.sparsity.keras.strip_pruning``, for :func:`prune_channels`
    models. Every wrapped layer is replaced by a copy of the layer it wraps,
    whose maskable weights are the wrapped weights times the channel masks
    (pruned channels are zero; every other weight, and every BatchNorm moving
    statistic, is bit-identical). The result has the same layer names and
    configs as the model given to :func:`prune_channels`; pass it (or the
    wrapped model) to :func:`keras_rebuild.rebuild` to physically remove the
    zero channels. A model without wrappers is returned as a copy.

    Args:
        model: A model returned by :func:`prune_channels` (not modified), or
            any Functional/Sequential model.

    Returns:
        A new ``keras.Model`` without :class:`StructuredPruningWrapper` layers.

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        UnsupportedModelError: ``model`` is a subclassed model.

    Example:
        >>> final = kr.strip_pruning(pruned)      # doctest: +SKIP
        >>> final.save("pruned.keras")            # doctest: +SKIP
    """
    check_model(model)

    def layer_fn(layer, path):
        if isinstance(layer, StructuredPruningWrapper):
            return _copy_layer(layer.layer)
        return _copy_layer(layer)

    stripped = _clone(model, layer_fn)
    for path, new, old in _pairs(stripped, model):
        if isinstance(old, StructuredPruningWrapper):
            new.set_weights(old.masked_layer_weights())
        elif old.weights:
            new.set_weights(old.get_weights())
    if any(type(layer).__name__ == "PruneLowMagnitude" for layer in all_layers(stripped)):
        from keras_rebuild._compat import tfmot

        stripped = tfmot().sparsity.keras.strip_pruning(stripped)  # tfmot's wrappers go too (on our copy)
    return stripped


# ----------------------------------------------------------------------------- callback
class UpdatePruningStep(keras.callbacks.Callback):
    """Keras callback that drives :func:`prune_channels` models during training.

    The structured twin of ``tfmot.sparsity.keras.UpdatePruningStep``; pass it
    to ``fit`` of every model wrapped with a ``pruning_schedule`` (training
    without it raises :class:`~keras_rebuild.errors.MissingCallbackError`).

    Each training batch advances the wrappers' ``pruning_step`` inside the
    training graph (saved with the model, so a reloaded model resumes its
    schedule where it was). At a step where the schedule says prune
    (``schedule(step)[0]``, or every ``frequency`` steps when
    ``prune_channels(frequency=...)`` was given), before that batch, the
    callback computes channel importance from the current (masked) weights of
    the wrapped layers, selects the schedule's sparsity with
    :func:`keras_rebuild.plan.select_channels` and assigns the new masks to
    every wrapper on the host, writing zeros into the pruned weights. Channels
    pruned earlier rank below all others, so masks only grow while the
    sparsity does not decrease. At the end of each epoch the pruned weights
    are zeroed again (momentum or weight decay can move them).

    Between pruning steps a batch costs what it costs with tfmot's callback:
    the batch hook compares two Python ints, reads no tensor (batch logs stay
    on the device) and runs no TensorFlow op. A pruning step that falls on the
    first batch of ``fit`` runs in ``on_train_begin``.

    When ``fit`` ends before the schedule has reached its target sparsity
    (``end_step`` beyond the steps trained), the callback warns once, with
    the sparsity reached and the steps still needed.

    For one-shot models (``sparsity=`` or ``threshold=``) the callback is
    optional: it only re-zeroes weights; masks stay.

    Args:
        data: Data for data-driven criteria (``(x, y)`` or ``x``); defaults to
            the ``data`` given to :func:`prune_channels` (needed again after
            loading a saved model).
        criterion: Override the criterion (needed after loading a model that
            was pruned with a custom criterion object).
        pruning_schedule: Override the schedule (needed after loading a model
            pruned with a custom, unregistered schedule class).

    Attributes:
        step: The number of training steps done (the wrappers' ``pruning_step``).
        schedule: The schedule in use (a :mod:`keras_rebuild.schedules` object,
            or your own callable).
        last_sparsity: The sparsity of the last mask update, or ``None``.
        plan_: The :class:`~keras_rebuild.Plan` the masks carry out since the
            last update (``plan_.save("plan.json")`` keeps the decision;
            ``kr.rebuild(model, plan_)`` replays it), or ``None``.

    Example:
        >>> model.fit(x, y, epochs=3, callbacks=[kr.UpdatePruningStep()])  # doctest: +SKIP
    """

    def __init__(self, data=None, criterion=None, pruning_schedule=None):
        super().__init__()
        # Batch logs are not read: Keras must not copy them to the host for this callback.
        self._supports_tf_logs = True
        self._data = data
        self._criterion_override = criterion
        self._schedule_override = None if pruning_schedule is None else _schedules.get(pruning_schedule)
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
    def _setup(self):
        self._wrappers = wrapped_layers(self.model)
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
                _deserialize_schedule(self.params_["pruning_schedule"])
            self.schedule = _schedules.get(self.schedule)
        self.schedule = _with_frequency(self.schedule, self.params_.get("frequency"))
        if self._criterion_override is not None:
            from keras_rebuild.importance import get_criterion

            self.criterion = get_criterion(self._criterion_override)
        elif runtime is not None and runtime.criterion is not None:
            self.criterion = runtime.criterion
        else:
            self.criterion = None  # resolved lazily (by name) at the first update
        if self._data is None and runtime is not None:
            self._data = runtime.data
        step = min(int(v) for v in keras.backend.batch_get_value([w.pruning_step for w in self._wrappers.values()]))
        self.step = max(step, 0)
        self._epoch_start = self.step
        if step < 0:
            self._set_step(0)
        if self._analysis_model is not self.model:
            self._analysis = None
        for w in self._wrappers.values():
            w._callback_active = True
        if self.schedule is not None:
            self.analysis()  # now, outside the batch hooks
            self._next_prune = self._next_pruning_step(self.step)

    def _set_step(self, value):
        keras.backend.batch_set_value([(w.pruning_step, int(value)) for w in self._wrappers.values()])

    def _sync_step(self):
        """Read the step counted in the graph (one read, at epoch ends) and align every wrapper on it."""
        steps = [int(v) for v in keras.backend.batch_get_value([w.pruning_step for w in self._wrappers.values()])]
        self.step = min(steps)  # a wrapper called twice per step (a shared layer) counts twice
        if any(v != self.step for v in steps):
            self._set_step(self.step)

    def _next_pruning_step(self, step) -> Optional[int]:
        if self.schedule is None:
            return None
        if isinstance(self.schedule, _schedules.PruningSchedule):
            return self.schedule.next_pruning_step(step)
        return step  # a schedule of your own: asked at every step

    def set_model(self, model):
        super().set_model(model)
        self._wrappers = {}
        self._next_prune = -1

    def on_train_begin(self, logs=None):
        self._setup()
        if self._next_prune is not None and self._next_prune <= self.step:
            self._pruning_step(self.step)

    def on_epoch_begin(self, epoch, logs=None):
        if self._wrappers:
            self._epoch_start = self.step

    def on_train_batch_begin(self, batch, logs=None):
        # The whole per-batch cost between pruning steps: one comparison.
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
            self._sync_step()
            self._zero_weights()

    def on_train_end(self, logs=None):
        if not self._wrappers:
            return
        self._sync_step()
        self._zero_weights()
        for w in self._wrappers.values():
            w._callback_active = False
        self._warn_if_below_target()

    # -- logic -------------------------------------------------------------------
    def _pruning_step(self, step):
        """Host work at a pruning step (or the first step after one that a multi-step execution skipped)."""
        self.step = step
        if isinstance(self.schedule, _schedules.PruningSchedule):
            should, sparsity = True, self.schedule.sparsity(step)
        else:
            should, sparsity = self._decide(step)
        if should:
            self.update_masks(sparsity)
        self._next_prune = self._next_pruning_step(step + 1)

    def _decide(self, step):
        """``(should_prune, sparsity)`` of the schedule at ``step`` (with ``frequency`` applied)."""
        if isinstance(self.schedule, _schedules.PruningSchedule):
            return self.schedule(step)
        should, sparsity = self.schedule(tf.constant(step, tf.int64))
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

    def _warn_if_below_target(self):
        schedule = self.schedule
        if self._warned or not isinstance(schedule, _schedules.PruningSchedule):
            return
        target = schedule.target
        done = self.step  # steps 0 .. done-1 were trained
        last = None
        if done > schedule.begin_step:
            upto = done - 1 if schedule.end_step < 0 else min(done - 1, schedule.end_step)
            last = schedule.begin_step + ((upto - schedule.begin_step) // schedule.frequency) * schedule.frequency
        reached = 0.0 if last is None else schedule.sparsity(last)
        if reached >= target - 1e-9:
            return
        final = schedule.final_step if schedule.final_step is not None else schedule.begin_step
        if final < done:  # the schedule is over and ends below its own target (frequency vs end_step)
            return
        per_epoch = (self.params or {}).get("steps")
        hint = f" ({per_epoch} steps per epoch here)" if per_epoch else ""
        self._warned = True
        warnings.warn(
            f"UpdatePruningStep: training ended at step {done}, before the pruning schedule reached its target. "
            f"The model is below its target sparsity: {reached:.1%} of channels pruned, target {target:.1%} "
            f"(reached at step {final}, {final + 1 - done} more steps). Train on with the same callback (the "
            f"schedule resumes), or end the schedule within training: `end_step` <= epochs * steps per epoch - 1"
            f"{hint}. Received: {schedule!r}",
            UserWarning, stacklevel=2)

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
        if self._analysis is None or self._analysis_model is not self.model:
            from keras_rebuild.groups import Analysis

            self._analysis = Analysis(self.model)
            self._analysis_model = self.model
        return self._analysis

    def update_masks(self, sparsity: float):
        """Recompute importance from the current weights and set every mask for ``sparsity``."""
        if not self._wrappers:
            self._setup()
        analysis = self.analysis()
        crit = self._get_criterion()
        if crit.needs_data:
            x, y = _split_data(self._data)
            if x is None:
                raise InvalidArgumentError(
                    f"Expected data for the data-driven criterion '{crit.name}': pass "
                    "`UpdatePruningStep(data=(x, y))` (data given to prune_channels is not saved with the model). "
                    "Received: data=None"
                )
            crit.set_data(self.model, x, y)
        current = _current_weights(self.model, self._wrappers)
        current = {p: w for p, w in current.items() if p in analysis.weights}
        scores = crit(analysis, weights=current)
        if self.plan_ is None:  # resuming: the saved masks are the decision so far, read back once
            self.plan_ = _plan_of_masks(analysis, self._wrappers)
        scores = _rank_pruned_last(analysis, scores, self.plan_.apply(analysis))
        self.plan_ = _plan(analysis, scores, self.params_, sparsity=float(sparsity))
        _apply_plan(analysis, self._wrappers, self.plan_)
        self.last_sparsity = float(sparsity)
        log.info("UpdatePruningStep: step %d, sparsity %.3f, %d channels pruned", self.step, sparsity,
                 self.plan_.channels_before - self.plan_.channels_after)

    def _zero_weights(self):
        for w in self._wrappers.values():
            w._zero_pruned_weights()


__all__ = [
    "StructuredPruningWrapper", "StructuredPruningWrapperHandler", "UpdatePruningStep", "prune_channels",
    "strip_pruning", "wrapped_layers",
]
