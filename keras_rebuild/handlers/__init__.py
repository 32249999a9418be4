"""Layer handlers: how channels flow through each supported layer class.

Use :func:`register_handler` to teach keras_rebuild about your own layers.
"""
from keras_rebuild.handlers.base import (  # noqa: F401
    LayerHandler,
    get_handler,
    mask_array,
    register_handler,
    registered_classes,
)
from keras_rebuild.handlers.common import (  # noqa: F401
    MergeHandler,
    MixingHandler,
    PassThroughHandler,
    TiedHandler,
)
from keras_rebuild.handlers import layers as _builtin  # noqa: F401  (registers built-ins)

__all__ = [
    "LayerHandler", "MixingHandler", "TiedHandler", "PassThroughHandler", "MergeHandler",
    "register_handler", "get_handler", "registered_classes", "mask_array",
]
