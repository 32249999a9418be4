"""The neutral graph of a model: ops over tensors, nested models flattened.

A back-end (:mod:`keras_rebuild.backends`) walks a ``Functional`` or
``Sequential`` model of its Keras flavour into a flat list of :class:`Op`
records over :class:`TensorInfo` records. A nested model called as a layer
contributes its own ops once, plus two *link* ops per call that tie the outer
tensors to the nested model's inputs and outputs. Layers are identified by a
path such as ``"backbone/conv1"`` that is unique even when nested models reuse
names. Everything after the walk (channel groups, zero propagation, plans,
reports) reads only these records, the layers' public attributes and configs,
and numpy weights.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from keras_rebuild.backends import backend_for, flavour_of, get_backend
from keras_rebuild.errors import NotAModelError, UnsupportedModelError


@dataclasses.dataclass
class TensorInfo:
    """A symbolic tensor of the graph; its channel axis is the last axis."""

    index: int
    shape: tuple
    dtype: str
    name: str
    offset: int = 0  # first element id of this tensor's channels

    @property
    def channels(self) -> int:
        if len(self.shape) < 2 or self.shape[-1] is None:
            return 1
        return int(self.shape[-1])


@dataclasses.dataclass
class Op:
    """One call of a layer or operation (``kind="layer"``), or a link into/out of a nested model.

    Attributes:
        kind: ``"layer"``, ``"link_in"`` or ``"link_out"``.
        layer: The Keras layer or operation (read through public attributes only).
        path: Unique path of the layer, ``"nested/name"`` inside nested models.
        inputs, outputs: Tensor indices.
        node: The back-end's call record (only back-ends look inside it).
        call_index: Which call of the layer this is.
        multi_call: For links: the nested model is called more than once.
        fn: Canonical name of a plain operation on Keras tensors (``"add"``,
            ``"relu"``, ``"mean"``...), the same for Keras 3 ops and tf_keras'
            ``TFOpLambda``; ``None`` for layers.
        constants: Non-tensor positional arguments of the call.
        options: Non-tensor keyword arguments of the call.
        internal: ``name -> tensor index`` of the layer's internal channels
            (attention heads): channels no Keras tensor carries, declared by
            the layer's handler (``internal_channels``) and shared by its calls.
    """

    kind: str
    layer: object
    path: str
    inputs: List[int]
    outputs: List[int]
    node: object = None
    call_index: int = 0
    multi_call: bool = False
    fn: Optional[str] = None
    constants: tuple = ()
    options: dict = dataclasses.field(default_factory=dict)
    internal: dict = dataclasses.field(default_factory=dict)

    def config(self) -> dict:
        """The layer's ``get_config()``, computed once per op."""
        cached = self.__dict__.get("_config")
        if cached is None:
            cached = self.layer.get_config()
            self.__dict__["_config"] = cached
        return cached


def is_graph_model(obj) -> bool:
    """True for a Functional or built Sequential model (either flavour) whose graph can be walked."""
    flavour = flavour_of(obj)
    return flavour is not None and get_backend(flavour).is_graph_model(obj)


def all_layers(model) -> list:
    """Every layer of ``model``, nested models' layers included (after the nested model)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if is_graph_model(layer):
            out.extend(all_layers(layer))
    return out


def check_model(model, arg_name: str = "model"):
    """Raise our errors for objects that are not walkable Keras models; return the back-end."""
    flavour = flavour_of(model)
    if flavour is None:
        raise NotAModelError(
            f"Expected `{arg_name}` to be a Keras Functional or Sequential model (Keras 3 or tf_keras). "
            f"Received: {arg_name}={type(model).__name__!s} object"
        )
    backend = get_backend(flavour)
    backend.check_model(model, arg_name)
    return backend


class Graph:
    """The flattened graph of a model: ``ops`` in dependency order over ``tensors``.

    Attributes:
        model: The walked model.
        backend: The back-end module of the model's Keras flavour.
        tensors: Every symbolic tensor, as :class:`TensorInfo`.
        ops: Layer calls and nested-model links, in an order where every op
            comes after the ops producing its inputs.
        inputs, outputs: Tensor indices of the model's own inputs and outputs.
        input_names, output_names: Names of the model's inputs and outputs.
        layers: ``path -> layer`` for every layer (nested models included).
        layer_ops: ``path -> [op, ...]`` calls of each layer.
        models: ``path -> model`` for the model (``""``) and every nested model.
    """

    def __init__(self, model):
        self.backend = check_model(model)
        self.model = model
        self.tensors: List[TensorInfo] = []
        self.ops: List[Op] = []
        self.layers: Dict[str, object] = {}
        self.layer_ops: Dict[str, List[Op]] = {}
        self.models: Dict[str, object] = {"": model}
        self._tid: Dict[int, int] = {}
        self._walked_models = set()
        self.inputs = [self.tensor_id(t) for t in self.backend.model_inputs(model)]
        self.walk_model(model, prefix="")
        self.outputs = [self.tensor_id(t) for t in self.backend.model_outputs(model)]
        self.input_names, self.output_names = self.backend.io_names(model)
        self._add_internal_tensors()
        offset = 0
        for t in self.tensors:
            t.offset = offset
            offset += t.channels
        self.num_elements = offset

    # -- tensors -------------------------------------------------------------
    def tensor_id(self, kt) -> int:
        """The index of a back-end symbolic tensor (added on first sight)."""
        key = id(kt)
        if key not in self._tid:
            shape, dtype, name = self.backend.tensor_info(kt)
            info = TensorInfo(len(self.tensors), shape, dtype, name)
            info._ref = kt  # keep the tensor alive so ids stay unique
            self._tid[key] = info.index
            self.tensors.append(info)
        return self._tid[key]

    def _add_internal_tensors(self):
        """One tensor per internal channel set a handler declares (attention heads), per layer."""
        from keras_rebuild.handlers import get_handler

        for path, ops in self.layer_ops.items():
            calls = [o for o in ops if o.kind == "layer"]
            handler = get_handler(calls[0].layer) if calls else None
            sizes = handler.internal_channels(calls[0].layer) if handler is not None else {}
            ids = {}
            for name, n in sizes.items():
                info = TensorInfo(len(self.tensors), (None, int(n)), "float32", f"{path}:{name}")
                self.tensors.append(info)
                ids[name] = info.index
            for o in calls:
                o.internal = ids

    # -- building, called by the back-end's walk --------------------------------
    def walk_model(self, model, prefix: str):
        self._walked_models.add(id(model))
        self.backend.walk(self, model, prefix)

    def add_layer_op(self, op: Op):
        self.layers[op.path] = op.layer
        calls = self.layer_ops.setdefault(op.path, [])
        op.call_index = len(calls)
        calls.append(op)
        self.ops.append(op)

    def add_nested(self, sub, path, inputs, outputs, inner_inputs, inner_outputs, node, calls: int):
        """Link a call of nested model ``sub`` (walked once) into the graph."""
        inner_in = [self.tensor_id(t) for t in inner_inputs]
        inner_out = [self.tensor_id(t) for t in inner_outputs]
        if len(inner_in) != len(inputs) or len(inner_out) != len(outputs):
            raise UnsupportedModelError(
                f"Expected the nested model '{path}' to be called on as many tensors as it has inputs. "
                f"Received: {len(inputs)} inputs for {len(inner_in)} model inputs"
            )
        self.layers[path] = sub
        self.models[path] = sub
        multi = calls > 1
        call_index = len(self.layer_ops.setdefault(path, []))
        link_in = Op("link_in", sub, path, inputs, inner_in, node, call_index, multi)
        self.ops.append(link_in)
        self.layer_ops[path].append(link_in)
        if id(sub) not in self._walked_models:
            self.walk_model(sub, prefix=path + "/")
        self.ops.append(Op("link_out", sub, path, inner_out, outputs, node, call_index, multi))

    # -- helpers -------------------------------------------------------------
    def iter_layers(self):
        """Yield ``(path, layer)`` for every non-model layer, in graph order."""
        for path, layer in self.layers.items():
            if path not in self.models:
                yield path, layer

    def first_op(self, path: str) -> Optional[Op]:
        ops = self.layer_ops.get(path)
        return ops[0] if ops else None


__all__ = ["Graph", "Op", "TensorInfo", "is_graph_model", "all_layers", "check_model", "backend_for"]
