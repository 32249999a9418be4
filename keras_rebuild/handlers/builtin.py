"""Built-in handlers are declared once per layer family, by class name, for both flavours.

A handler module declares ``@builtin_handler("Dense")``; when a back-end is
first imported it calls :func:`register_flavour` with its ``layers`` module,
and every declared name found there is registered with that class (exact
class, as everywhere). Classes outside ``layers`` (tf_keras' ``TFOpLambda``,
Keras 3's plain operations, the applications' ``LayerScale``) are passed by
the back-end under a key declared the same way.
"""
from __future__ import annotations

from typing import Dict, Iterable

_BY_NAME: Dict[str, object] = {}


def builtin_handler(*names: str):
    """Class decorator: the handler of the built-in layers of these class names (or keys)."""

    def decorator(handler_cls):
        handler = handler_cls()
        for name in names:
            _BY_NAME[name] = handler
        return handler_cls

    return decorator


def register_flavour(layers_module, extra: Dict[str, Iterable[type]] = None):
    """Register the built-in handlers with the classes of one Keras flavour.

    A class the user registered a handler for keeps the user's handler.
    """
    from keras_rebuild.handlers.base import _REGISTRY

    for name, handler in _BY_NAME.items():
        cls = getattr(layers_module, name, None)
        if isinstance(cls, type):
            _REGISTRY.setdefault(cls, handler)
    for key, classes in (extra or {}).items():
        handler = _BY_NAME.get(key)
        if handler is None:
            continue
        for cls in classes:
            _REGISTRY.setdefault(cls, handler)


def builtin_names():
    """The declared names (layer class names and extra keys)."""
    return sorted(_BY_NAME)
