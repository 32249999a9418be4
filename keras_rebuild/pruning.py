"""Pruning during training, for both Kerases: the entry points and the flavour-neutral logic.

``prune_channels``, ``strip_pruning``, ``UpdatePruningStep`` and
``StructuredPruningWrapper`` here are the public names (``kr.prune_channels``...).
Each reads the Keras flavour from the model (or layer) it is given and hands
over to that flavour's implementation:

* tf_keras: :mod:`keras_rebuild.wrappers` (TensorFlow, tfmot-compatible);
* Keras 3 on TensorFlow, JAX or torch: :mod:`keras_rebuild.pruning_keras3`.

Importing this module imports no Keras: a Keras 3 user on JAX or torch never
loads TensorFlow through it. The rest of the module is the logic both
implementations share, on numpy arrays and :class:`~keras_rebuild.Plan` objects:
turning importance scores into a plan (channels pruned earlier rank last, so
masks only grow), setting the wrappers' masks from a plan, reading a plan back
from saved masks, and the warning when training ends below the target sparsity.

Example:
    >>> import keras_rebuild as kr
    >>> pruned = kr.prune_channels(model, pruning_schedule=kr.PolynomialDecay(0.0, 0.5, 0, 1000))  # doctest: +SKIP
    >>> pruned.fit(x, y, epochs=3, callbacks=[kr.UpdatePruningStep()])                         # doctest: +SKIP
    >>> small = kr.rebuild(pruned)                                                              # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, Optional

import numpy as np

from keras_rebuild import schedules as _schedules
from keras_rebuild.backends import flavour_of
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, received
from keras_rebuild.handlers import LayerHandler, get_handler

__all__ = ["prune_channels", "strip_pruning", "UpdatePruningStep", "StructuredPruningWrapper"]

_IMPLEMENTATIONS = {"tf_keras": "keras_rebuild.wrappers", "keras3": "keras_rebuild.pruning_keras3"}


def _implementation(flavour: str):
    return importlib.import_module(_IMPLEMENTATIONS[flavour])


def _implementation_for(model, arg_name: str = "model"):
    """The pruning module of ``model``'s flavour; our error for objects that are not Keras models."""
    flavour = flavour_of(model)
    if flavour is None:
        from keras_rebuild.graph import check_model

        check_model(model, arg_name)  # raises NotAModelError
    return _implementation(flavour)


# ----------------------------------------------------------------------------- entry points
def prune_channels(model, sparsity: Optional[float] = None, pruning_schedule=None, **kwargs):
    """Wrap a model for whole-channel pruning (the structured twin of tfmot's ``prune_low_magnitude``).

    Dispatches on the model's Keras: :func:`keras_rebuild.wrappers.prune_channels`
    for tf_keras, :func:`keras_rebuild.pruning_keras3.prune_channels` for
    Keras 3 (any backend). Both take the same arguments and behave the same:
    one-shot (``sparsity=``), gradual (``pruning_schedule=`` with
    :class:`UpdatePruningStep` in ``fit``) or ``threshold=``; ``criterion``,
    ``scope``, ``ignore``, ``round_to``, ``min_channels``, ``data``,
    ``bn_l1``, ``frequency``.

    Args:
        model: A Functional or Sequential model of either Keras (not modified).
        sparsity: One-shot fraction of channels to prune.
        pruning_schedule: A :mod:`keras_rebuild.schedules` schedule or a tfmot one.
        **kwargs: The other arguments of the flavour's ``prune_channels``.

    Returns:
        A new model of the same Keras with ``StructuredPruningWrapper`` layers.

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        InvalidArgumentError, InvalidArgumentTypeError: bad arguments.

    Example:
        >>> pruned = kr.prune_channels(model, sparsity=0.5)   # doctest: +SKIP
    """
    if "ignore" in kwargs:
        from keras_rebuild.plan import check_ignore

        kwargs["ignore"] = check_ignore(kwargs["ignore"])
    return _implementation_for(model).prune_channels(model, sparsity=sparsity, pruning_schedule=pruning_schedule,
                                                      **kwargs)


def strip_pruning(model):
    """Remove the pruning wrappers: the original architecture with the pruned channels zeroed.

    Dispatches on the model's Keras (see :func:`prune_channels`).

    Args:
        model: A model returned by :func:`prune_channels` (not modified).

    Returns:
        A new model of the same Keras without ``StructuredPruningWrapper`` layers.

    Raises:
        NotAModelError: ``model`` is not a Keras model.

    Example:
        >>> final = kr.strip_pruning(pruned)   # doctest: +SKIP
    """
    return _implementation_for(model).strip_pruning(model)


def _loaded_wrapper_classes():
    """The wrapper classes of the implementations already imported (never imports one)."""
    out = []
    for module_name in _IMPLEMENTATIONS.values():
        module = sys.modules.get(module_name)
        cls = getattr(module, "StructuredPruningWrapper", None) if module is not None else None
        if isinstance(cls, type):
            out.append(cls)
    return out


class _WrapperMeta(type):
    """``isinstance(layer, kr.StructuredPruningWrapper)`` is true for either flavour's wrapper."""

    def __instancecheck__(cls, obj):
        return any(isinstance(obj, c) for c in _loaded_wrapper_classes())

    def __subclasscheck__(cls, sub):
        return sub is cls or any(issubclass(sub, c) for c in _loaded_wrapper_classes())

    def __call__(cls, layer, *args, **kwargs):
        flavour = flavour_of(layer)
        if flavour is None:
            raise InvalidArgumentTypeError(
                f"Expected `layer` to be a Keras layer. Received: layer={type(layer).__name__} object")
        return _implementation(flavour).StructuredPruningWrapper(layer, *args, **kwargs)


class StructuredPruningWrapper(metaclass=_WrapperMeta):
    """Wraps a layer so that whole input/output channels of its weights can be masked.

    ``StructuredPruningWrapper(layer, ...)`` makes the wrapper of the layer's
    Keras (:class:`keras_rebuild.wrappers.StructuredPruningWrapper` for
    tf_keras, :class:`keras_rebuild.pruning_keras3.StructuredPruningWrapper`
    for Keras 3), and ``isinstance(layer, kr.StructuredPruningWrapper)`` is
    true for either. Created by :func:`prune_channels`; you rarely build one
    yourself.
    """


def _hook(method):
    """A callback hook forwarded to the flavour's implementation (once ``set_model`` chose it)."""
    name = method.__name__

    def forward(self, *args, **kwargs):
        impl = self.__dict__.get("_impl")
        if impl is not None:
            return getattr(impl, name)(*args, **kwargs)
        return None

    forward.__name__ = name
    forward.__doc__ = method.__doc__
    return forward


def _default(method):
    """Mark a hook as not overridden (Keras 3 then keeps its asynchronous batch-end dispatch)."""
    method._is_default = True
    return method


class UpdatePruningStep:
    """Keras callback that drives :func:`prune_channels` models during training, in either Keras.

    Pass it to ``fit`` of every model wrapped with a ``pruning_schedule``.
    When ``fit`` hands it the model (``set_model``), it creates the callback
    of the model's Keras: :class:`keras_rebuild.wrappers.UpdatePruningStep`
    (tf_keras) or :class:`keras_rebuild.pruning_keras3.UpdatePruningStep`
    (Keras 3, any backend), and forwards every hook to it. Both behave the
    same: the pruning step advances in the training graph, masks are
    recomputed on the schedule's pruning steps only (host work only then),
    and a warning says when training ends below the target sparsity.

    Args:
        data: Data for data-driven criteria (``(x, y)`` or ``x``).
        criterion: Override the criterion (after loading a model pruned with a
            custom criterion object).
        pruning_schedule: Override the schedule (after loading a model pruned
            with a custom, unregistered schedule class).

    Attributes:
        step, schedule, last_sparsity, plan_: Read from the flavour's callback
            (see its documentation) once training has started.

    Example:
        >>> model.fit(x, y, epochs=3, callbacks=[kr.UpdatePruningStep()])  # doctest: +SKIP
    """

    _supports_tf_logs = True  # tf_keras: batch logs are not read, so they are not copied to the host

    def __init__(self, data=None, criterion=None, pruning_schedule=None):
        self._kwargs = {"data": data, "criterion": criterion, "pruning_schedule": pruning_schedule}
        self._impl = None
        self._flavour = None
        self.params = None

    @property
    def implementation(self):
        """The flavour's callback (``None`` until ``set_model``)."""
        return self._impl

    @property
    def model(self):
        return None if self._impl is None else self._impl.model

    def set_model(self, model):
        flavour = flavour_of(model)
        if flavour is None:
            raise InvalidArgumentTypeError(
                "Expected `UpdatePruningStep` to be used with a Keras model (Keras 3 or tf_keras). "
                f"Received: model={type(model).__name__} object")
        if self._impl is None or flavour != self._flavour:
            self._impl = _implementation(flavour).UpdatePruningStep(**self._kwargs)
            self._flavour = flavour
            if self.params is not None:
                self._impl.set_params(self.params)
        self._impl.set_model(model)

    def set_params(self, params):
        self.params = params
        if self._impl is not None:
            self._impl.set_params(params)

    def __getattr__(self, name):
        # Only called for attributes not found here: step, schedule, plan_, update_masks, ...
        impl = self.__dict__.get("_impl")
        if impl is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(impl, name)

    # tf_keras' CallbackList asks which batch hooks a callback implements.
    def _implements_train_batch_hooks(self):
        return True

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False

    @_hook
    def on_train_begin(self, logs=None):
        """Set up, and prune if the schedule prunes at the first step."""

    @_hook
    def on_train_end(self, logs=None):
        """Re-zero pruned weights; warn when the target sparsity was not reached."""

    @_hook
    def on_epoch_begin(self, epoch, logs=None):
        """Note the step at which the epoch starts."""

    @_hook
    def on_epoch_end(self, epoch, logs=None):
        """Read the step counted in the graph; re-zero pruned weights."""

    @_hook
    def on_train_batch_begin(self, batch, logs=None):
        """Update the masks when the schedule prunes at this step."""

    @_hook
    def on_batch_begin(self, batch, logs=None):
        """Alias of ``on_train_batch_begin`` in old training loops."""

    # Hooks that do nothing (marked as such, so Keras 3 dispatches batch ends asynchronously).
    @_default
    def on_train_batch_end(self, batch, logs=None):
        pass

    @_default
    def on_batch_end(self, batch, logs=None):
        pass

    @_default
    def on_test_begin(self, logs=None):
        pass

    @_default
    def on_test_end(self, logs=None):
        pass

    @_default
    def on_test_batch_begin(self, batch, logs=None):
        pass

    @_default
    def on_test_batch_end(self, batch, logs=None):
        pass

    @_default
    def on_predict_begin(self, logs=None):
        pass

    @_default
    def on_predict_end(self, logs=None):
        pass

    @_default
    def on_predict_batch_begin(self, batch, logs=None):
        pass

    @_default
    def on_predict_batch_end(self, batch, logs=None):
        pass


# ----------------------------------------------------------------------------- shared logic
def clone_nested(clone_model, model, layer_fn, prefix=""):
    """``clone_model`` (the flavour's) with ``layer_fn(layer, path)`` applied at every depth of nested models."""
    from keras_rebuild.graph import is_graph_model

    def fn(layer):
        path = prefix + layer.name
        if is_graph_model(layer):
            return clone_nested(clone_model, layer, layer_fn, path + "/")
        return layer_fn(layer, path)

    return clone_model(model, clone_function=fn)


def copy_layer(layer):
    """A new layer of the same class and config (no weights)."""
    return layer.__class__.from_config(layer.get_config())


def layer_pairs(new, old, prefix=""):
    """Yield ``(path, new_layer, old_layer)`` over two models of one graph, nested models flattened."""
    from keras_rebuild.graph import is_graph_model

    seen = set()

    def walk(n, o, prefix):
        if len(n.layers) != len(o.layers):  # pragma: no cover - defensive
            raise InvalidArgumentError(f"cloned model '{n.name}' has a different layer list")
        for nl, ol in zip(n.layers, o.layers):
            path = prefix + ol.name
            if is_graph_model(ol):
                if id(ol) not in seen:
                    seen.add(id(ol))
                    yield from walk(nl, ol, path + "/")
            else:
                yield path, nl, ol

    yield from walk(new, old, prefix)


class WrapperHandler(LayerHandler):
    """Makes a pruning wrapper transparent to :class:`~keras_rebuild.groups.Analysis`.

    The analysis of a wrapped model then has the same channel groups, layer
    paths and ``analysis.weights`` (the wrapped layers' own weights) as the
    analysis of the stripped model: each op of a wrapper is rewritten to the
    wrapped layer and its handler before the channels are connected.
    """

    kind = "tied"

    def internal_channels(self, layer):
        inner = layer.layer
        handler = get_handler(inner)
        return handler.internal_channels(inner) if handler is not None else {}

    def connect(self, ctx, op):
        inner = op.layer.layer
        handler = get_handler(inner) or LayerHandler()
        op.layer = inner
        op.handler = handler
        ctx.graph.layers[op.path] = inner
        if op.path in ctx.weights:
            ctx.weights[op.path] = ctx.weights[op.path][: len(inner.weights)]
        handler.connect(ctx, op)


def mask_sizes(weights, roles, multiplier: int, c_in, c_out):
    """``(input channels, output channels)`` of a wrapper's masks, from the weights' roles where unknown."""
    from keras_rebuild.handlers import resolve_role

    for w, r in zip(weights, roles):
        for axis, role in r.items():
            source, index = resolve_role(role, multiplier, int(w.shape[axis]))
            n = int(w.shape[axis]) if index is None else (int(index.max()) + 1 if len(index) else 0)
            if source == "out" and c_out is None:
                c_out = n
            if source == "in" and c_in is None:
                c_in = n
    return c_in, c_out


def internal_slices(handler, layer) -> Dict[str, tuple]:
    """``name -> (start, size)`` of a layer's internal channels (heads) in the wrapper's one internal mask."""
    slices, start = {}, 0
    for name, n in (handler.internal_channels(layer) if handler is not None else {}).items():
        slices[name] = (start, int(n))
        start += int(n)
    return slices


def split_internal(mask: np.ndarray, slices: Dict[str, tuple]) -> Dict[str, np.ndarray]:
    """The wrapper's internal mask (float) as ``name -> boolean keep mask``."""
    keep = np.asarray(mask) > 0.5
    return {name: keep[start:start + n] for name, (start, n) in slices.items()}


def join_internal(internal: Optional[Dict[str, np.ndarray]], slices: Dict[str, tuple]) -> np.ndarray:
    """``name -> keep mask`` as the wrapper's one float internal mask (names not given stay kept)."""
    full = np.ones(sum(n for _, n in slices.values()), np.float32)
    for name, (start, n) in slices.items():
        keep = (internal or {}).get(name)
        if keep is not None and len(keep) == n:
            full[start:start + n] = np.asarray(keep, np.float32)
    return full


class Runtime:
    """Python objects shared by the wrappers of one ``prune_channels`` call (not saved)."""

    def __init__(self, criterion=None, data=None, schedule=None):
        self.criterion = criterion
        self.data = data
        self.schedule = schedule


MODES = ("sparsity", "threshold", "schedule")

TFMOT_ONLY = {
    "block_size": "keras_rebuild always prunes whole channels (every weight of a channel, in every layer that "
                  "shares it); use `round_to=` to keep channel counts multiples of a block",
    "block_pooling_type": "keras_rebuild ranks whole channels by `criterion=` (\"l1\", \"l2\", \"bn_scale\", "
                          "\"taylor\", ...) instead of pooling weight blocks",
    "sparsity_m_by_n": "keras_rebuild prunes channels, not weights inside a channel; for 2:4 sparse kernels, "
                       "`kr.rebuild` the channel-pruned model, then apply a 2:4 weight-pruning tool to it",
    "pruning_policy": "keras_rebuild decides itself which layers it can prune (channel groups it can follow "
                      "exactly, never model inputs/outputs); use `ignore=[layer names]` to leave layers whole",
}


def check_tfmot_only_arguments(kwargs, advice: Optional[Dict[str, str]] = None):
    """Refuse tfmot's weight-pruning arguments (with what to do instead) and unknown keywords.

    ``advice`` replaces the default advice for some arguments (a flavour with tfmot at hand says more).
    """
    if not kwargs:
        return
    texts = {**TFMOT_ONLY, **(advice or {})}
    tfmot_only = [k for k in kwargs if k in texts]
    if tfmot_only:
        raise InvalidArgumentError(
            "Expected no tfmot-only arguments: `prune_channels` prunes whole channels, so "
            + "; ".join(f"`{k}` does not apply ({texts[k]})" for k in tfmot_only)
            + ". Received: " + ", ".join(received(k, kwargs[k]) for k in tfmot_only)
        )
    raise InvalidArgumentTypeError(
        "Expected only the arguments of `prune_channels` (model, sparsity, pruning_schedule, criterion, scope, "
        "ignore, round_to, min_channels, threshold, data, bn_l1, frequency). "
        f"Received unknown keyword arguments: {sorted(kwargs)}"
    )


def jsonable(obj):
    """``obj`` with numpy scalars made Python numbers and tuples made lists (for layer configs)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def split_data(data):
    """``(x, y)`` of ``data`` given as ``(x, y)`` or ``x``."""
    if data is None:
        return None, None
    if isinstance(data, tuple) and len(data) == 2:
        return data[0], data[1]
    return data, None


def with_frequency(schedule, frequency):
    """``schedule`` with its pruning frequency replaced (ours only; others keep theirs)."""
    if not frequency or not isinstance(schedule, _schedules.PruningSchedule):
        return schedule
    config = schedule.get_config()["config"]
    return type(schedule).from_config({**config, "frequency": int(frequency)})


def criterion_name(crit) -> str:
    from keras_rebuild.importance import criterion_names

    name = getattr(crit, "name", None)
    return name if isinstance(name, str) and name in criterion_names() else str(name or type(crit).__name__)


def serialize_schedule(schedule) -> dict:
    try:
        config = _schedules.serialize(schedule)
    except Exception as exc:
        raise InvalidArgumentError(
            "Expected `pruning_schedule` to have a `get_config()` (like keras_rebuild's and tfmot's schedules) so "
            f"that wrapped models can be saved. Received: {received('pruning_schedule', schedule)}"
        ) from exc
    return jsonable(config)


def deserialize_schedule(config: dict, get_registered_object):
    """The schedule of a saved config; ``get_registered_object`` is the flavour's Keras registry lookup."""
    name = config.get("class_name")
    schedule = _schedules.deserialize(config)
    if schedule is not None:
        return schedule
    cls = get_registered_object(name)
    if cls is None:
        raise InvalidArgumentError(
            f"Expected a known pruning schedule class to resume training; '{name}' is neither "
            "ConstantSparsity/PolynomialDecay nor registered with `keras.saving.register_keras_serializable`. "
            "Register it, or pass `UpdatePruningStep(pruning_schedule=...)`. "
            f"Received: {received('pruning_schedule', config)}"
        )
    return cls.from_config(config["config"]) if hasattr(cls, "from_config") else cls(**config["config"])


def select(analysis, scores, params, sparsity=None, threshold=None):
    """Boolean per component: removed by one selection with the settings of ``params``."""
    from keras_rebuild.plan import select_remove

    return select_remove(
        analysis, scores, sparsity=sparsity, threshold=threshold, scope=params.get("scope", "local"),
        round_to=params.get("round_to", 1), min_channels=params.get("min_channels", 1),
        ignore=tuple(params.get("ignore", ())),
    )


def make_plan(analysis, scores, params, sparsity=None, threshold=None):
    """The :class:`~keras_rebuild.Plan` of one selection (the decision that masks carry out)."""
    from keras_rebuild.plan import Plan

    remove = select(analysis, scores, params, sparsity=sparsity, threshold=threshold)
    meta = {k: params.get(k) for k in ("criterion", "scope", "round_to", "min_channels")}
    meta.update(sparsity=sparsity, threshold=threshold)
    return Plan.from_remove(analysis, remove, meta)


def rank_pruned_last(analysis, scores, removed) -> dict:
    """Scores where already-pruned channels rank strictly below every other channel."""
    out = {}
    for g in analysis.groups:
        if g.name not in scores:
            continue
        s = np.asarray(scores[g.name], np.float64).copy()
        gone = removed[g.components]
        if gone.any():
            lo = min(float(s.min()), 0.0)
            eps = max(1e-12, 1e-9 * float(np.abs(s).max()))
            s = np.where(gone, lo, np.maximum(s, lo + eps))
        out[g.name] = s
    return out


def removed_components(analysis, wrappers) -> np.ndarray:
    """Per component of ``analysis``: pruned by the wrappers' current masks (``w.channel_masks()``)."""
    removed = np.zeros(analysis.num_components, bool)
    for path, w in wrappers.items():
        op = analysis.graph.first_op(path)
        if op is None or op.kind != "layer" or not w.built:
            continue
        keep_in, keep_out = w.channel_masks()
        internal = w.internal_masks()
        pairs = [(op.inputs[0] if op.inputs else None, keep_in), (op.outputs[0] if op.outputs else None, keep_out)]
        pairs += [(t, internal[name]) for name, t in op.internal.items() if name in internal]
        for t, keep in pairs:
            if t is None:
                continue
            labels = analysis.labels[analysis.elements(t)]
            if len(labels) == len(keep):
                removed[labels[~keep]] = True
    return removed


def plan_of_masks(analysis, wrappers):
    """The plan the wrappers' current masks carry out (read when training resumes from a saved model)."""
    from keras_rebuild.plan import Plan

    return Plan.from_remove(analysis, removed_components(analysis, wrappers), {"source": "masks"})


def apply_plan(analysis, wrappers, plan):
    """Set every wrapper's masks to carry out ``plan`` (``w.mask_sizes()``, ``w.assign_masks(in, out)``)."""
    from keras_rebuild.masks import internal_keep_masks, layer_keep_masks

    remove = plan.apply(analysis)
    keep = layer_keep_masks(analysis, remove)
    for path, w in wrappers.items():
        if path not in keep:
            continue
        keep_in, keep_out = keep[path]
        n_in, n_out = w.mask_sizes()
        keep_in = np.ones(n_in, bool) if keep_in is None or len(keep_in) != n_in else keep_in
        keep_out = np.ones(n_out, bool) if keep_out is None or len(keep_out) != n_out else keep_out
        internal = internal_keep_masks(analysis, remove, path)
        if internal:
            w.assign_masks(keep_in, keep_out, internal)
        else:
            w.assign_masks(keep_in, keep_out)


def below_target_message(schedule, done: int, steps_per_epoch=None) -> Optional[str]:
    """The warning when training ended at step ``done`` before ``schedule`` reached its target, else ``None``."""
    if not isinstance(schedule, _schedules.PruningSchedule):
        return None
    target = schedule.target
    last = None
    if done > schedule.begin_step:
        upto = done - 1 if schedule.end_step < 0 else min(done - 1, schedule.end_step)
        last = schedule.begin_step + ((upto - schedule.begin_step) // schedule.frequency) * schedule.frequency
    reached = 0.0 if last is None else schedule.sparsity(last)
    if reached >= target - 1e-9:
        return None
    final = schedule.final_step if schedule.final_step is not None else schedule.begin_step
    if final < done:  # the schedule is over and ends below its own target (frequency vs end_step)
        return None
    hint = f" ({steps_per_epoch} steps per epoch here)" if steps_per_epoch else ""
    return (
        f"UpdatePruningStep: training ended at step {done}, before the pruning schedule reached its target. "
        f"The model is below its target sparsity: {reached:.1%} of channels pruned, target {target:.1%} "
        f"(reached at step {final}, {final + 1 - done} more steps). Train on with the same callback (the "
        f"schedule resumes), or end the schedule within training: `end_step` <= epochs * steps per epoch - 1"
        f"{hint}. Received: {schedule!r}"
    )


def channel_sparsity_of(wrappers: Dict[str, object]) -> float:
    """Pruned output channels over all output channels of the channel-writing wrapped layers."""
    pruned = total = 0
    for w in wrappers.values():
        handler = get_handler(w.layer)
        if handler is None or getattr(handler, "kind", None) != "mixing":
            continue
        _, keep_out = w.channel_masks()
        pruned += int((~keep_out).sum())
        total += int(keep_out.size)
    return pruned / total if total else 0.0
