"""Walk a Keras functional graph, nested models flattened, in dependency order.

The walk turns a ``Functional`` or ``Sequential`` model into a flat list of
:class:`Op` records over :class:`TensorInfo` records. A nested model called as
a layer contributes its own ops once, plus two *link* ops per call that tie the
outer tensors to the nested model's inputs and outputs. Layers are identified
by a path such as ``"backbone/conv1"`` that is unique even when nested models
reuse names.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from keras_rebuild._compat import keras, tf
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
    """One call of a layer (``kind="layer"``), or a link into/out of a nested model."""

    kind: str  # "layer" | "link_in" | "link_out"
    layer: object
    path: str
    inputs: List[int]
    outputs: List[int]
    node: object = None
    call_index: int = 0
    multi_call: bool = False


def is_graph_model(obj) -> bool:
    """True for a Functional or built Sequential model whose graph can be walked."""
    return isinstance(obj, keras.Model) and getattr(obj, "_is_graph_network", False)


def all_layers(model) -> list:
    """Every layer of ``model``, nested models' layers included (after the nested model)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if is_graph_model(layer):
            out.extend(all_layers(layer))
    return out


def check_model(model, arg_name: str = "model"):
    """Raise our errors for objects that are not walkable Keras models."""
    if not isinstance(model, keras.Model):
        hint = ""
        if type(model).__module__.startswith("keras") and not type(model).__module__.startswith("keras_rebuild"):
            hint = (
                " It looks like a Keras 3 object: keras_rebuild uses the Keras 2 API "
                "(`import tf_keras as keras`, or set TF_USE_LEGACY_KERAS=1 before importing TensorFlow)."
            )
        raise NotAModelError(
            f"Expected `{arg_name}` to be a tf_keras Functional or Sequential model.{hint} "
            f"Received: {arg_name}={type(model).__name__!s} object"
        )
    if isinstance(model, keras.Sequential) and not model.built:
        raise UnsupportedModelError(
            f"Expected `{arg_name}` to be a built model. The Sequential model '{model.name}' has no "
            "input shape yet: add `keras.Input(shape)` as its first layer or call `model.build(input_shape)`. "
            f"Received: {arg_name}=<unbuilt Sequential '{model.name}'>"
        )
    if not is_graph_model(model):
        raise UnsupportedModelError(
            f"Expected `{arg_name}` to be a Functional or Sequential model with a layer graph. "
            f"'{model.name}' is a subclassed model ({type(model).__name__}); its `call()` is Python code "
            "whose channel dependencies cannot be followed. Rebuild it as a functional model "
            "(`keras.Model(inputs, outputs)`) and copy the weights over, then prune that. "
            f"Received: {arg_name}=<{type(model).__name__} '{model.name}'>"
        )


class Graph:
    """The flattened graph of a model: ``ops`` in dependency order over ``tensors``.

    Attributes:
        model: The walked model.
        tensors: Every symbolic tensor, as :class:`TensorInfo`.
        ops: Layer calls and nested-model links, in an order where every op
            comes after the ops producing its inputs.
        inputs, outputs: Tensor indices of the model's own inputs and outputs.
        layers: ``path -> layer`` for every layer (nested models included).
        layer_ops: ``path -> [op, ...]`` calls of each layer.
    """

    def __init__(self, model):
        check_model(model)
        self.model = model
        self.tensors: List[TensorInfo] = []
        self.ops: List[Op] = []
        self.layers: Dict[str, object] = {}
        self.layer_ops: Dict[str, List[Op]] = {}
        self.models: Dict[str, object] = {"": model}
        self._tid: Dict[int, int] = {}
        self._walked_models = set()
        self.inputs = [self.tensor_id(t) for t in model.inputs]
        self._walk(model, prefix="")
        self.outputs = [self.tensor_id(t) for t in model.outputs]
        offset = 0
        for t in self.tensors:
            t.offset = offset
            offset += t.channels
        self.num_elements = offset

    # -- tensors -------------------------------------------------------------
    def tensor_id(self, kt) -> int:
        key = id(kt)
        if key not in self._tid:
            shape = tuple(kt.shape.as_list()) if kt.shape.rank is not None else ()
            info = TensorInfo(len(self.tensors), shape, kt.dtype.name if kt.dtype else "float32", kt.name)
            info._ref = kt  # keep the tensor alive so ids stay unique
            self._tid[key] = info.index
            self.tensors.append(info)
        return self._tid[key]

    # -- walk ----------------------------------------------------------------
    def _walk(self, model, prefix: str):
        self._walked_models.add(id(model))
        network_nodes = model._network_nodes
        depth_keys = sorted(model._nodes_by_depth.keys(), reverse=True)
        for depth in depth_keys:
            for node in model._nodes_by_depth[depth]:
                layer = node.layer
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                node_index = layer._inbound_nodes.index(node)
                if f"{layer.name}_ib-{node_index}" not in network_nodes:
                    continue
                path = prefix + layer.name
                inputs = [self.tensor_id(t) for t in node.keras_inputs]
                outputs = [self.tensor_id(t) for t in tf.nest.flatten(node.outputs)]
                if is_graph_model(layer):
                    self._walk_nested(layer, path, inputs, outputs, node)
                    continue
                self._add_op(Op("layer", layer, path, inputs, outputs, node))

    def _walk_nested(self, sub, path, inputs, outputs, node):
        calls = [n for n in sub._inbound_nodes if not n.is_input]
        multi = len(calls) > 1
        inner_in = [self.tensor_id(t) for t in sub.inputs]
        inner_out = [self.tensor_id(t) for t in sub.outputs]
        if len(inner_in) != len(inputs) or len(inner_out) != len(outputs):
            raise UnsupportedModelError(
                f"Expected the nested model '{path}' to be called on as many tensors as it has inputs. "
                f"Received: {len(inputs)} inputs for {len(inner_in)} model inputs"
            )
        self.layers[path] = sub
        self.models[path] = sub
        call_index = len(self.layer_ops.setdefault(path, []))
        link_in = Op("link_in", sub, path, inputs, inner_in, node, call_index, multi)
        self.ops.append(link_in)
        self.layer_ops[path].append(link_in)
        if id(sub) not in self._walked_models:
            self._walk(sub, prefix=path + "/")
        self.ops.append(Op("link_out", sub, path, inner_out, outputs, node, call_index, multi))

    def _add_op(self, op: Op):
        self.layers[op.path] = op.layer
        calls = self.layer_ops.setdefault(op.path, [])
        op.call_index = len(calls)
        calls.append(op)
        self.ops.append(op)

    # -- helpers -------------------------------------------------------------
    def iter_layers(self):
        """Yield ``(path, layer)`` for every non-model layer, in graph order."""
        for path, layer in self.layers.items():
            if not is_graph_model(layer):
                yield path, layer

    def first_op(self, path: str) -> Optional[Op]:
        ops = self.layer_ops.get(path)
        return ops[0] if ops else None
