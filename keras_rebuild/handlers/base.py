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
        pointwise kernel of a separable conv). Axes not listed are untouched.
        """
        return [{} for _ in getattr(layer, "weights", ())]

    def maskable(self, layer) -> List[bool]:
        """Per weight: whether pruning masks it (BN moving statistics are not)."""
        return [True for _ in getattr(layer, "weights", ())]

    def depth_multiplier(self, layer) -> int:
        return 1

    def update_config(self, layer, config: dict, n_in: int, n_out: int) -> dict:
        """The layer config for ``n_in`` input and ``n_out`` output channels."""
        return config

    def slice_weights(self, layer, weights, kept_in, kept_out):
        """Weights restricted to the kept channels (the default uses ``weight_roles``)."""
        return [
            _take(w, roles, kept_in, kept_out, self.depth_multiplier(layer))
            for w, roles in zip(weights, self.weight_roles(layer))
        ]

    def macs(self, layer, op, graph, n_in: int, n_out: int) -> int:
        """Multiply-accumulates of one call with ``n_in``/``n_out`` channels."""
        return 0


def _index_for(role, kept_in, kept_out, multiplier):
    if role == "in":
        return kept_in
    if role == "out":
        return kept_out
    if role == "in*m":
        return (kept_in[:, None] * multiplier + np.arange(multiplier)[None, :]).ravel()
    raise ValueError(role)


def _take(w, roles, kept_in, kept_out, multiplier):
    for axis, role in roles.items():
        idx = _index_for(role, kept_in, kept_out, multiplier)
        if idx is not None and len(idx) != w.shape[axis]:
            w = np.take(w, idx, axis=axis)
    return w


def mask_array(w, roles, keep_in, keep_out, multiplier):
    """Zero the entries of ``w`` that belong to pruned channels (boolean keep masks)."""
    out = w
    for axis, role in roles.items():
        if role == "in":
            keep = keep_in
        elif role == "out":
            keep = keep_out
        else:
            keep = None if keep_in is None else np.repeat(keep_in, multiplier)
        if keep is None or keep.all():
            continue
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        out = out * keep.reshape(shape).astype(w.dtype)
    return out
