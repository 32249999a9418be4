"""Back-ends: the only modules that touch Keras objects.

keras_rebuild's core (the graph of :mod:`keras_rebuild.graph`, channel groups,
zero propagation, handlers, plans, reports) works on a neutral description of
a model. A back-end turns a model of its Keras flavour into that description
(the walk), probes layers on zeros, and builds the smaller model. There are
two: :mod:`keras_rebuild.backends.tf_keras` (Keras 2 as ``tf_keras``, the API
that tensorflow-model-optimization needs) and :mod:`keras_rebuild.backends.keras3`
(Keras 3 on the TensorFlow, JAX or torch backend).

The flavour is read from the model object itself (the root module of its
class), never from ``tf.keras``, so both flavours work in one process and a
back-end's Keras is imported only when a model of that flavour arrives.
"""
from __future__ import annotations

import importlib
from typing import Optional

from keras_rebuild.errors import MixedFlavoursError, NotAModelError

FLAVOURS = ("tf_keras", "keras3")
_ROOTS = {"tf_keras": "tf_keras", "keras": "keras3", "tensorflow_model_optimization": "tf_keras"}
_MODULES = {"tf_keras": "keras_rebuild.backends.tf_keras", "keras3": "keras_rebuild.backends.keras3"}


def flavour_of(obj) -> Optional[str]:
    """``"tf_keras"`` or ``"keras3"`` for a Keras object (or class), else ``None``.

    The first class in the object's MRO that comes from a Keras package decides,
    so a user's subclass of ``keras.Model`` defined in ``__main__`` is found too.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in getattr(cls, "__mro__", (cls,)):
        root = (getattr(klass, "__module__", "") or "").split(".", 1)[0]
        if root in _ROOTS:
            return _ROOTS[root]
    return None


def get_backend(flavour: str):
    """The back-end module of a flavour (imported on first use)."""
    if flavour not in _MODULES:
        raise ValueError(f"Expected a flavour in {FLAVOURS}. Received: flavour={flavour!r}")
    return importlib.import_module(_MODULES[flavour])


def backend_for(obj, arg_name: str = "model"):
    """The back-end module for a Keras model or layer.

    Raises:
        NotAModelError: ``obj`` is not a Keras object of a known flavour.
    """
    flavour = flavour_of(obj)
    if flavour is None:
        raise NotAModelError(
            f"Expected `{arg_name}` to be a Keras model (Keras 3 or tf_keras). "
            f"Received: {arg_name}={type(obj).__name__} object"
        )
    return get_backend(flavour)


def same_flavour(**objects) -> str:
    """The one flavour of several Keras objects; mixing flavours is an error.

    Args:
        **objects: ``arg_name=object`` pairs; ``None`` values are skipped.

    Raises:
        MixedFlavoursError: when two objects come from different Kerases.
    """
    seen = {}
    for name, obj in objects.items():
        if obj is None:
            continue
        flavour = flavour_of(obj)
        if flavour is not None:
            seen[name] = flavour
    if len(set(seen.values())) > 1:
        parts = ", ".join(f"{k} is {v}" for k, v in seen.items())
        raise MixedFlavoursError(
            "Expected every model and layer of one call to come from the same Keras (all Keras 3 or all "
            f"tf_keras); save one and load it with the other Keras to convert it. Received: {parts}"
        )
    return next(iter(seen.values()), None)


def producer(tensor):
    """``(layer, tensor_index)`` of the layer call that produced a symbolic tensor, or ``None``.

    The same record (``_keras_history``) in both Kerases.
    """
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    layer = getattr(history, "operation", None) or getattr(history, "layer", None)
    return layer, history.tensor_index


def config_of(layer, path: str) -> dict:
    """``layer.get_config()``, or our error naming the layer when an object in it cannot be serialised."""
    try:
        return layer.get_config()
    except NotImplementedError as exc:
        from keras_rebuild.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"Expected every layer to have a config Keras can rebuild from. Layer '{path}' "
            f"({type(layer).__name__}) holds an object without `get_config()` (a custom regularizer, "
            "constraint, initializer or activation?): give that class a `get_config()` method returning its "
            f"constructor arguments. Received: {type(exc).__name__}: {exc}"
        ) from None


def plain_functional_note(name: str, cls: type, exc: BaseException = None) -> str:
    """The report's note when a Functional subclass comes back as a plain Functional (both flavours)."""
    if exc is None:
        why = "a Functional subclass whose constructor takes other arguments than (inputs, outputs)"
    else:
        message = " ".join(str(exc).split())[:200]
        why = f"whose constructor failed on (inputs, outputs) ({type(exc).__name__}: {message})"
    return f"'{name}' is a {cls.__name__}, {why}: it comes back as a plain Functional model with the same layers"


def leaves(x):
    """The leaves of nested lists, tuples and dict values (the arguments of a layer call)."""
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from leaves(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from leaves(item)
    else:
        yield x


def model_errors(model, arg_name, is_model, unbuilt_sequential, walkable):
    """Raise our errors for a model object a back-end cannot walk (shared by both back-ends)."""
    from keras_rebuild.errors import UnsupportedModelError

    if not is_model:
        raise NotAModelError(
            f"Expected `{arg_name}` to be a Keras Functional or Sequential model. "
            f"Received: {arg_name}={type(model).__name__!s} object"
        )
    if unbuilt_sequential:
        raise UnsupportedModelError(
            f"Expected `{arg_name}` to be a built model. The Sequential model '{model.name}' has no "
            "input shape yet: add `keras.Input(shape)` as its first layer or call `model.build(input_shape)`. "
            f"Received: {arg_name}=<unbuilt Sequential '{model.name}'>"
        )
    if not walkable:
        raise UnsupportedModelError(
            f"Expected `{arg_name}` to be a Functional or Sequential model with a layer graph. "
            f"'{model.name}' is a subclassed model ({type(model).__name__}); its `call()` is Python code "
            "whose channel dependencies cannot be followed. Rebuild it as a functional model "
            "(`keras.Model(inputs, outputs)`) and copy the weights over, then prune that. "
            f"Received: {arg_name}=<{type(model).__name__} '{model.name}'>"
        )


def probe_shape(shape):
    """A small input shape for probing element-wise layers on zeros: batch 1, spatial sizes at most 2.

    Probes only ask whether a layer maps 0 to 0 element by element, which the
    spatial size does not change; small probes keep the analysis fast.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        return (1,)
    inner = [2 if d is None else min(int(d), 2) for d in shape[1:-1]]
    return tuple([1] + inner + [4 if shape[-1] is None else int(shape[-1])])


def check_all_set(new_weights, used):
    """Fail loudly when a weight list found no layer (it would silently keep initial values)."""
    from keras_rebuild.errors import UnsupportedModelError

    missing = [path for path, w in new_weights.items() if w and path not in used]
    if missing:
        raise UnsupportedModelError(
            f"Expected every layer of the rebuilt model to keep its name. Received: no layer at "
            f"{missing[:5]} (a layer that renames itself in its constructor?)")



__all__ = ["FLAVOURS", "flavour_of", "get_backend", "backend_for", "same_flavour"]
