"""Layer handlers: how channels flow through each supported layer class.

Use :func:`register_handler` to teach keras_rebuild about your own layers.
"""
from keras_rebuild.handlers.base import (  # noqa: F401
    LayerHandler,
    Role,
    get_handler,
    mask_array,
    resolve_role,
    role_keep,
    register_handler,
    registered_classes,
)
from keras_rebuild.handlers.common import (  # noqa: F401
    MergeHandler,
    MixingHandler,
    PassThroughHandler,
    TiedHandler,
)
from keras_rebuild.handlers import layers as _builtin_layers  # noqa: F401  (declares built-ins)
from keras_rebuild.handlers import attention as _attention  # noqa: F401  (declares built-ins)
from keras_rebuild.handlers import recurrent as _recurrent  # noqa: F401  (declares built-ins)
from keras_rebuild.handlers.layers import OpHandler  # noqa: F401

__all__ = [
    "LayerHandler", "MixingHandler", "TiedHandler", "PassThroughHandler", "MergeHandler", "OpHandler",
    "register_handler", "get_handler", "registered_classes", "mask_array", "Role", "resolve_role", "role_keep",
]
