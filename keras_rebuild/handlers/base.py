"""The layer-handler interface and registry: the package's extension point.

A handler tells the analysis how channels flow through one layer class and how
to slice or mask that layer's weights. Handlers work on numpy arrays and
configs and never mutate a layer. They are registered by *exact* class (a
subclass of ``Dense`` with a different ``call`` is a different layer), so an
unknown layer is never mistaken for a supported one.

Three kinds of layers:

* ``"mixing"`` layers (Dense, Conv) read input channels through a kernel and
  write a new space of output channels. Removing an input channel is exact only
  when it is always zero or when the kernel ignores it.
* ``"tied"`` layers (BatchNorm, activations, pooling, depthwise conv, ...) map
  output channel ``c`` to input channel ``c`` (or to ``c // multiplier``), so
  the channels are removed together.
* ``"blocked"`` layers couple every channel (LayerNormalization, Softmax over
  channels, unknown layers): their channels always stay.

Example: registering a handler for a custom per-channel scale layer::

    @kr.register_handler(MyScale)
    class MyScaleHandler(kr.handlers.TiedHandler):
        def weight_roles(self, layer):
            return [{0: "in"}]           # weight 0 is indexed by channel on axis 0

        def maps_zero_to_zero(self, layer, weights):
            return True                   # scale * 0 == 0
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from keras_rebuild.errors import InvalidArgumentTypeError

_REGISTRY: Dict[type, "LayerHandler"] = {}


def register_handler(*layer_classes):
    """Class decorator registering a handler for exact layer classes.

    Args:
        *layer_classes: The Keras layer classes the handler supports.

    Returns:
        The decorator; it instantiates the handler class once and registers it.

    Raises:
        InvalidArgumentTypeError: when given something that is not a class.

    Example:
        >>> @register_handler(MyLayer)          # doctest: +SKIP
        ... class MyLayerHandler(TiedHandler):
        ...     pass
    """
    for cls in layer_classes:
        if not isinstance(cls, type):
            raise InvalidArgumentTypeError(
                f"Expected `layer_classes` to be layer classes. Received: {cls!r}"
            )

    def decorator(handler_cls):
        handler = handler_cls() if isinstance(handler_cls, type) else handler_cls
        for cls in layer_classes:
            _REGISTRY[cls] = handler
        return handler_cls

    return decorator


def get_handler(layer) -> Optional["LayerHandler"]:
    """The handler registered for ``type(layer)``, or ``None`` if unknown."""
    return _REGISTRY.get(type(layer))


def registered_classes():
    """The layer classes that have a handler."""
    return list(_REGISTRY)


class LayerHandler:
    """Base class: a layer whose channels are all kept (blocked).

    Subclasses override the hooks below. ``weights`` is always the list of
    numpy arrays from ``layer.get_weights()``.
    """

    kind = "blocked"

    def connect(self, ctx, op):
        """Declare channel relations for one call of the layer (see ``Analysis``)."""
        reason = self.block_reason(op.layer)
        ctx.block_all(op, reason)

    def block_reason(self, layer) -> str:
        return f"layer '{layer.name}' of class {type(layer).__name__} has no channel handler"

    def forward_zero(self, layer, weights, op, in_zero: List[np.ndarray], out_channels: List[int]):
        """Which output channels are provably always zero, given which inputs are."""
        return [np.zeros(c, bool) for c in out_channels]

    def ignored_inputs(self, layer, weights, op) -> List[Optional[np.ndarray]]:
        """For mixing layers: per input, the channels its weights never read."""
        return [None for _ in op.inputs]

    # -- weights -------------------------------------------------------------
    def weight_roles(self, layer) -> List[Dict[int, str]]:
        """Per weight of ``layer.get_weights()``: ``{axis: role}``.

        Roles: ``"in"`` (input channel), ``"out"`` (output channel),
        ``"in*m"`` (input channel expanded by the depth multiplier, as in the
        pointwise kernel of a separable conv), or a :class:`Role` mapping each
        position to a channel (gate blocks of recurrent kernels). Axes not
        listed are untouched.
        """
        return [{} for _ in getattr(layer, "weights", ())]

    def maskable(self, layer) -> List[bool]:
        """Per weight: whether pruning masks it (BN moving statistics are not)."""
        return [True for _ in getattr(layer, "weights", ())]

    def depth_multiplier(self, layer) -> int:
        return 1

    def internal_channels(self, layer) -> Dict[str, int]:
        """Channel sets inside the layer that no tensor carries (``{"heads": 8}``); none by default.

        Each becomes a tensor of the analysis (``op.internal[name]``) that the
        handler writes and ties like any other; roles refer to it with
        ``Role(name, index)``, and ``update_config``/``slice_weights`` receive
        its kept counts/indices as ``internal``.
        """
        return {}

    def selects_outputs(self, layer) -> bool:
        """Whether ``layer`` keeps its width when its output channels go, and a selection after it drops them.

        LayerNormalization: its statistics read every channel, so it cannot
        output fewer; ``rebuild`` puts a frozen one-hot ``Dense`` after it.
        """
        return False

    def update_config(self, layer, config: dict, n_in: int, n_out: int) -> dict:
        """The layer config for ``n_in`` input and ``n_out`` output channels."""
        return config

    def slice_weights(self, layer, weights, kept_in, kept_out, internal=None):
        """Weights restricted to the kept channels (the default uses ``weight_roles``).

        ``internal`` (only for handlers with ``internal_channels``) maps each
        internal name to its kept indices.
        """
        return [
            _take(w, roles, kept_in, kept_out, self.depth_multiplier(layer), internal)
            for w, roles in zip(weights, self.weight_roles(layer))
        ]

    def macs(self, layer, op, graph, n_in: int, n_out: int) -> int:
        """Multiply-accumulates of one call with ``n_in``/``n_out`` channels.

        Handlers with ``internal_channels`` also receive ``internal`` (name -> count).
        """
        return 0


class Role:
    """A weight axis indexed through a map: position ``j`` belongs to channel ``index[j]`` of ``source``.

    The strings ``"in"``, ``"out"`` and ``"in*m"`` cover most layers; a ``Role``
    covers the rest, e.g. an LSTM kernel whose four gate blocks repeat the
    output channels: ``Role("out", np.tile(np.arange(units), 4))``.

    Args:
        source: ``"in"`` (the layer's first input's channels), ``"out"`` (its
            first output's channels) or the name of one of the handler's
            ``internal_channels`` (attention heads).
        index: Integer array, one entry per position along the axis.
    """

    __slots__ = ("source", "index")

    def __init__(self, source: str, index):
        if not isinstance(source, str):
            raise ValueError(f"Expected `source` to be 'in', 'out' or an internal name. Received: source={source!r}")
        self.source = source
        self.index = np.asarray(index, np.int64)

    def __repr__(self):
        return f"Role({self.source!r}, index of {len(self.index)})"


def resolve_role(role, multiplier: int = 1, size: Optional[int] = None):
    """``(source, index)`` of a role; ``index`` is ``None`` for the identity map.

    ``size`` (the axis length) is needed for ``"in*m"`` only.
    """
    if isinstance(role, Role):
        return role.source, role.index
    if role in ("in", "out"):
        return role, None
    if role == "in*m":
        if size is None:
            raise ValueError("the size of an 'in*m' axis is needed")
        return "in", np.arange(size) // max(int(multiplier), 1)
    raise ValueError(f"Expected a weight role 'in', 'out', 'in*m' or a Role. Received: {role!r}")


def _pick(source, a_in, a_out, internal):
    if source == "in":
        return a_in
    if source == "out":
        return a_out
    return (internal or {}).get(source)


def role_positions(role, kept_in, kept_out, multiplier: int, size: int, internal=None):
    """Positions along an axis that stay when ``kept_in``/``kept_out`` channels stay (``None``: all)."""
    source, index = resolve_role(role, multiplier, size)
    kept = _pick(source, kept_in, kept_out, internal)
    if kept is None or index is None:
        return kept
    return np.flatnonzero(np.isin(index, kept))


def _take(w, roles, kept_in, kept_out, multiplier, internal=None):
    for axis, role in roles.items():
        idx = role_positions(role, kept_in, kept_out, multiplier, w.shape[axis], internal)
        if idx is not None and len(idx) != w.shape[axis]:
            w = np.take(w, idx, axis=axis)
    return w


def role_keep(role, keep_in, keep_out, multiplier: int, size: int, internal=None):
    """The boolean keep mask along an axis for channel keep masks (``None``: keep all)."""
    source, index = resolve_role(role, multiplier, size)
    keep = _pick(source, keep_in, keep_out, internal)
    if keep is None or index is None:
        return keep
    return np.asarray(keep)[index]


def mask_array(w, roles, keep_in, keep_out, multiplier, internal=None):
    """Zero the entries of ``w`` that belong to pruned channels (boolean keep masks).

    ``internal`` maps the names of a handler's internal channels to their keep masks.
    """
    out = w
    for axis, role in roles.items():
        keep = role_keep(role, keep_in, keep_out, multiplier, w.shape[axis], internal)
        if keep is None or keep.all():
            continue
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        out = out * keep.reshape(shape).astype(w.dtype)
    return out
