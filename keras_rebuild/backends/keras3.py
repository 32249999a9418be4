"""The Keras 3 back-end: models of ``import keras`` on the TensorFlow, JAX or torch backend.

Importing this module imports Keras 3 (and with it whatever backend
``KERAS_BACKEND`` names), never TensorFlow on its own. The rebuild re-runs the
model's graph with Keras' own machinery (``Function._run_through_graph``, the
engine of ``keras.models.clone_model``), giving each layer a new instance made
from its (sliced) config; nested models are rebuilt recursively with their new
input shapes, and shared layers and nested models stay shared.
"""
from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras.src import tree
from keras.src.models.functional import Functional, functional_like_constructor
from keras.src.saving import serialization_lib

from keras_rebuild.backends import (
    check_all_set,
    config_of,
    leaves,
    model_errors,
    plain_functional_note,
    probe_shape,
)
from keras_rebuild.graph import Op
from keras_rebuild.handlers import builtin

NAME = "keras3"

# Keras 3 operation classes (``x + y``, ``keras.ops.relu(x)``, ``x[..., :8]``...) -> canonical op names,
# the same names tf_keras' TFOpLambda functions map to.
OP_CLASSES = {
    "Add": "add", "Subtract": "subtract", "Maximum": "maximum", "Minimum": "minimum", "Divide": "divide",
    "TrueDivide": "divide", "Multiply": "multiply", "Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid",
    "Tanh": "tanh", "Silu": "silu", "Gelu": "gelu", "Absolute": "abs", "Abs": "abs", "Elu": "elu",
    "Selu": "selu", "Softplus": "softplus", "Negative": "negative", "Square": "square", "Sqrt": "sqrt",
    "Exp": "exp", "LeakyRelu": "leaky_relu", "HardSigmoid": "hard_sigmoid", "HardSilu": "hard_silu",
    "Cast": "cast", "Clip": "clip", "Mean": "mean", "Max": "max", "Sum": "sum", "Min": "min",
    "GetItem": "get_item", "Concatenate": "concatenate", "Mish": "mish", "Softsign": "softsign",
}


def _op_classes():
    from keras.src.ops import core, nn
    from keras.src.ops import numpy as knp

    found = {}
    for name, fn in OP_CLASSES.items():
        for module in (knp, nn, core):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                found[cls] = fn
    return found


OP_FUNCTIONS = _op_classes()


def _extra_classes():
    extra = {"op": list(OP_FUNCTIONS)}
    with contextlib.suppress(ImportError, AttributeError):
        from keras.src.applications import convnext

        extra["LayerScale"] = [convnext.LayerScale]
    with contextlib.suppress(ImportError, AttributeError):
        from keras.src.applications import inception_resnet_v2

        extra["CustomScaleLayer"] = [inception_resnet_v2.CustomScaleLayer]
    return extra


builtin.register_flavour(keras.layers, _extra_classes())


# ----------------------------------------------------------------------------- models
def _function_of(model):
    """The ``Functional`` whose graph a model runs (a built Sequential runs one)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def is_graph_model(obj) -> bool:
    return isinstance(obj, keras.Model) and _function_of(obj) is not None


def check_model(model, arg_name: str = "model"):
    is_model = isinstance(model, keras.Model)
    model_errors(model, arg_name, is_model,
                 is_model and isinstance(model, keras.Sequential) and _function_of(model) is None,
                 is_graph_model(model))


def model_inputs(model):
    return list(_function_of(model)._inputs)


def model_outputs(model):
    return list(_function_of(model)._outputs)


def _producer(kt):
    return kt._keras_history.operation


def io_names(model):
    return ([_producer(t).name for t in model_inputs(model)], [_producer(t).name for t in model_outputs(model)])


def tensor_info(kt):
    return tuple(kt.shape), str(kt.dtype), kt.name


def _is_tensor(x) -> bool:
    return isinstance(x, keras.KerasTensor)


def walk(graph, model, prefix: str):
    fn = _function_of(model)
    for depth in sorted(fn._nodes_by_depth.keys(), reverse=True):
        for node in fn._nodes_by_depth[depth]:
            layer = node.operation
            if layer is None or node.is_input or isinstance(layer, keras.layers.InputLayer):
                continue
            path = prefix + layer.name
            inputs = [graph.tensor_id(t) for t in node.input_tensors]
            outputs = [graph.tensor_id(t) for t in node.outputs]
            if is_graph_model(layer):
                calls = len([n for n in layer._inbound_nodes if not n.is_input])
                graph.add_nested(layer, path, inputs, outputs, model_inputs(layer), model_outputs(layer), node, calls)
                continue
            fn_name = OP_FUNCTIONS.get(type(layer))
            constants = tuple(a for a in node.arguments.args if not any(_is_tensor(t) for t in leaves(a)))
            options = {k: v for k, v in node.arguments.kwargs.items()
                       if not any(_is_tensor(t) for t in leaves(v))}
            if fn_name is None and not isinstance(layer, keras.layers.Layer):
                fn_name = "keras.ops." + type(layer).__name__
            graph.add_layer_op(Op("layer", layer, path, inputs, outputs, node, fn=fn_name,
                                  constants=constants, options=options))


def probe_zero(op) -> bool:
    """Call a parameterless layer or op on all-zero inputs; True if every output is all zero."""
    node = op.node
    values = {}
    for kt in node.input_tensors:
        values[id(kt)] = keras.ops.zeros(probe_shape(kt.shape), dtype=kt.dtype)
    try:
        args, kwargs = node.arguments.fill_in(values)
        kwargs = dict(kwargs)
        if getattr(op.layer, "_call_has_training_arg", False):
            kwargs["training"] = False
        out = op.layer(*args, **kwargs)
        return all(bool(np.all(keras.ops.convert_to_numpy(o) == 0)) for o in tree.flatten(out))
    except Exception:  # a probe that cannot run proves nothing
        return False


def nested_inputs(sub):
    """``[(tensor, input layer name), ...]`` of a nested model."""
    return [(t, _producer(t).name) for t in model_inputs(sub)]


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def loss_of(model):
    """The loss function ``model`` was compiled with (a name resolved through Keras), or None."""
    loss = getattr(model, "loss", None)
    if not loss:
        return None
    return keras.losses.get(loss) if isinstance(loss, (str, dict)) else loss


def loss_value(fn, y, preds):
    pred = preds[0] if len(preds) == 1 else list(preds)
    out = fn(y, pred)
    return keras.ops.sum(out)


def activations_and_gradients(probe, x, n_acts, loss_of_preds):
    """The first ``n_acts`` outputs of ``probe`` on ``x`` and the loss gradients with respect to them.

    Measured with the backend's own autodiff: ``tf.GradientTape`` on TensorFlow,
    ``torch.autograd`` on torch, and on JAX (which differentiates functions,
    not tensors) ``jax.value_and_grad`` of the loss with respect to zero-valued
    perturbations added to the measured tensors (see :func:`_jax_activations_and_gradients`).
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outs = probe(x, training=False)
            acts = outs[:n_acts]
            loss = loss_of_preds(outs[n_acts:])
        grads = tape.gradient(loss, acts, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return acts, [np.asarray(g) for g in grads]
    if name == "torch":
        import torch

        outs = probe(x, training=False)
        acts = list(outs[:n_acts])
        loss = loss_of_preds(outs[n_acts:])
        grads = torch.autograd.grad(loss, acts, allow_unused=True)
        grads = [np.zeros(tuple(a.shape), np.float32) if g is None else g.detach().cpu().numpy()
                 for a, g in zip(acts, grads)]
        return [a.detach() for a in acts], grads
    if name == "jax":
        return _jax_activations_and_gradients(probe, x, n_acts, loss_of_preds)
    from keras_rebuild.errors import UnsupportedModelError

    raise UnsupportedModelError(
        "Expected the TensorFlow, JAX or torch backend for the 'taylor' criterion: it needs gradients with "
        "respect to activations. Use criterion='l1', 'l2', 'bn_scale', 'activation' or 'apoz'. "
        f"Received: a Keras 3 model on the {name} backend"
    )


def _run_perturbed(probe, inputs, perturbations):
    """The outputs of the Functional ``probe`` on ``inputs`` in inference mode, as a list.

    ``perturbations`` maps ``id(KerasTensor)`` of graph tensors to values added
    to them where they are computed, so everything downstream sees
    ``tensor + perturbation``. The same node order and call arguments as
    ``Functional.call`` (``training=False``), with no new nodes on the layers.
    """
    values = {id(kt): v for kt, v in zip(probe.inputs, tree.flatten(probe._standardize_inputs(inputs)))}
    for kt in probe.inputs:
        if id(kt) in perturbations:
            values[id(kt)] = values[id(kt)] + perturbations[id(kt)]
    for depth in sorted(probe._nodes_by_depth.keys(), reverse=True):
        for node in probe._nodes_by_depth[depth]:
            if not node.operation or node.is_input or any(id(t) not in values for t in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(values)
            op = node.operation
            if hasattr(probe, "_get_operation_for_node"):
                op = probe._get_operation_for_node(node)
            context = getattr(op, "_call_context_args", None)
            if "training" in (context if context is not None else ()) or (
                    context is None and getattr(op, "_call_has_training_arg", False)):
                kwargs = dict(kwargs, training=False)
            for kt, v in zip(node.outputs, tree.flatten(op(*args, **kwargs))):
                values[id(kt)] = v + perturbations[id(kt)] if id(kt) in perturbations else v
    return [values[id(kt)] for kt in probe.outputs]


def _jax_activations_and_gradients(probe, x, n_acts, loss_of_preds):
    """JAX: ``dL/da`` as the gradient of the loss with respect to a zero perturbation ``e`` added to ``a``.

    With ``a' = a + e`` in the graph, ``dL/de`` at ``e = 0`` is exactly ``dL/da``
    (the same first-order derivative, not an approximation). The model is run
    statelessly (``keras.StatelessScope`` over its variables' current values),
    so nothing is assigned to the model; no TensorFlow is involved.
    """
    import jax
    import jax.numpy as jnp

    measured = list(probe.outputs[:n_acts])
    keys = [id(kt) for kt in measured]
    state = [(v, v.value) for v in probe.variables]

    def forward(eps):
        with keras.StatelessScope(state_mapping=state):
            outs = _run_perturbed(probe, x, dict(zip(keys, eps)))
        return outs

    def loss_fn(eps):
        outs = forward(eps)
        return jnp.sum(jnp.asarray(loss_of_preds(outs[n_acts:]))), outs[:n_acts]

    shapes = jax.eval_shape(lambda: forward([0.0] * len(keys))[:n_acts])
    eps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(eps)
    return list(acts), [np.asarray(g) for g in grads]


def is_batch_norm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def strip_wrappers(model):
    """Strip keras_rebuild's pruning wrappers (on a copy); else return ``model``."""
    from keras_rebuild.graph import all_layers

    if any(type(layer).__name__ == "StructuredPruningWrapper" for layer in all_layers(model)):
        from keras_rebuild.pruning_keras3 import strip_pruning

        return strip_pruning(model)
    return model


# ----------------------------------------------------------------------------- rebuild
@contextlib.contextmanager
def scope():
    """Keep TensorFlow unloaded while configs are serialised, when nothing has loaded it yet.

    Keras' ``serialize_keras_object`` asks its lazy ``tensorflow`` module
    whether an object is a ``tf.TensorShape``, which imports TensorFlow on
    every backend. No object can be a TensorFlow type before TensorFlow is
    imported, so while it is not, the lazy module may say "not available"
    without changing any result; its state is restored afterwards.
    """
    import sys

    lazy = getattr(serialization_lib, "tf", None)
    if "tensorflow" in sys.modules or lazy is None or not hasattr(lazy, "_available") or lazy._available:
        yield
        return
    saved = lazy._available
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = saved


class _Rebuilder:
    """Re-runs a model's graph, giving every layer a new instance from its (new) config."""

    def __init__(self, new_configs, input_shapes, selections=None):
        self.new_configs = new_configs
        self.input_shapes = input_shapes
        self.selections = selections or {}
        self.cache = {}
        self.notes = []

    def call(self, layer, path):
        """What to call for ``layer``: its new instance, followed by its selection if it has one."""
        new = self.layer(layer, path)
        if path not in self.selections:
            return new
        select = self.selection(layer, path)
        return lambda *args, **kwargs: select(new(*args, **kwargs))

    def selection(self, layer, path):
        key = ("select", id(layer))
        if key not in self.cache:
            name, kept = self.selections[path]
            self.cache[key] = keras.layers.Dense(len(kept), use_bias=False, trainable=False, name=name,
                                                 dtype=layer.dtype_policy)
        return self.cache[key]

    def layer(self, layer, path):
        if id(layer) in self.cache:
            return self.cache[id(layer)]
        if is_graph_model(layer):
            new = self.model(layer, path + "/")
        else:
            config = self.new_configs.get(path)
            if config is None:
                config = config_of(layer, path)
            new = type(layer).from_config(config)
            if new.name != layer.name:
                # Some layers rename themselves in their constructor, so from_config(get_config())
                # does not round-trip the name (keras-hub's DepthwiseConvBlock appends "_0"). Names
                # are kept, and weights are set by layer path afterwards: restore the name.
                new.name = layer.name
        self.cache[id(layer)] = new
        return new

    def model(self, model, prefix):
        fn = _function_of(model)
        inputs = []
        for t in fn._inputs:
            name = _producer(t).name
            shape = self.input_shapes.get(prefix + name, tuple(t.shape))
            inputs.append(keras.Input(batch_shape=(None,) + tuple(shape[1:]), dtype=t.dtype, name=name,
                                      sparse=getattr(t, "sparse", False)))
        if isinstance(model, keras.Sequential):
            new = keras.Sequential([inputs[0]._keras_history.operation], name=model.name,
                                   trainable=model.trainable)
            for layer in model.layers:
                new.add(self.layer(layer, prefix + layer.name))
                if prefix + layer.name in self.selections:
                    new.add(self.selection(layer, prefix + layer.name))
            return new
        structure = tree.pack_sequence_as(fn._inputs_struct, inputs)
        outputs = fn._run_through_graph(structure, operation_fn=lambda op: self.call(op, prefix + op.name))
        if type(model) is Functional or not functional_like_constructor(type(model)):
            if type(model) is not Functional:
                self.notes.append(plain_functional_note(prefix + model.name, type(model)))
            new = Functional(structure, outputs, name=model.name)
        else:
            try:
                new = type(model)(structure, outputs, name=model.name)
            except Exception as exc:  # noqa: BLE001 - a constructor that cannot take (inputs, outputs)
                self.notes.append(plain_functional_note(prefix + model.name, type(model), exc))
                new = Functional(structure, outputs, name=model.name)
        if not model.trainable:
            # Keras 3's setter passes the flag down to every sublayer: set it only to freeze, so that each
            # layer otherwise keeps the flag of its own config (a frozen layer, a frozen selection).
            new.trainable = False
        return new


def build(model, new_configs, input_shapes, new_weights=None, selections=None):
    """A new model of ``model``'s graph with the layer configs of ``new_configs`` swapped in.

    A layer listed in ``selections`` (path -> ``(name, kept indices)``) is
    followed by a frozen ``Dense`` of that name without bias, whose one-hot
    kernel (in ``new_weights``) selects the kept channels.
    Nested models' inputs take the shapes of ``input_shapes``. The layers are
    built inside a ``StatelessScope``, so their variables are created without
    drawing random initial values; each variable is then initialised once,
    directly with its weight from ``new_weights[path]`` (or, for a layer not
    listed, with its own initializer).

    Returns:
        ``(model, notes)``; ``notes`` say what did not carry over.
    """
    from keras.src.backend.common.stateless_scope import StatelessScope

    rebuilder = _Rebuilder(new_configs, input_shapes, selections)
    # The layers are the caller's own in-memory model: a Python `lambda` in a Lambda layer is
    # their code, so Keras' safe mode (meant for loading untrusted files) must not refuse it.
    with serialization_lib.SafeModeScope(False), StatelessScope(initialize_variables=False):
        new = rebuilder.model(model, "")
    used = set()
    try:
        _initialize(new, new_weights or {}, "", set(), used)
    finally:
        _forget_initialized()
    check_all_set(new_weights or {}, used)
    return new, rebuilder.notes


def _initialize(model, new_weights, prefix, seen, used):
    for layer in model.layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        path = prefix + layer.name
        if is_graph_model(layer):
            _initialize(layer, new_weights, path + "/", seen, used)
            continue
        values = new_weights.get(path)
        if values:
            used.add(path)
        weights = list(layer.weights)
        given = {}
        if values:
            if len(values) != len(weights):
                raise ValueError(f"layer '{path}' has {len(weights)} weights, received {len(values)}")
            given = {id(v): np.asarray(val) for v, val in zip(weights, values)}
        variables = list(layer.variables)
        known = {id(v) for v in variables}
        for variable in variables + [v for v in weights if id(v) not in known]:
            value = given.get(id(variable))
            if getattr(variable, "_value", None) is None:
                if value is not None:
                    variable._initializer = _constant(value, variable)
                variable._deferred_initialize()
            elif value is not None:
                variable.assign(value)
        finalize = getattr(layer, "finalize_state", None)
        if callable(finalize):  # preprocessing layers (Normalization...) read their variables here
            finalize()


def _constant(value, variable):
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(f"weight '{variable.path}' has shape {tuple(variable.shape)}, received {value.shape}")

    def initializer(shape, dtype=None):
        return value

    return initializer


def _forget_initialized():
    """Drop the variables we initialised from Keras' list of variables still to initialise."""
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute("uninitialized_variables")
    if pending:
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if getattr(v, "_value", None) is None])


def set_weights(model, new_weights, prefix=""):
    """Set ``new_weights[path]`` on every layer of ``model`` (nested models included)."""
    for layer in model.layers:
        path = prefix + layer.name
        if is_graph_model(layer):
            set_weights(layer, new_weights, path + "/")
            continue
        w = new_weights.get(path)
        if w:
            layer.set_weights(w)
            finalize = getattr(layer, "finalize_state", None)
            if callable(finalize):  # preprocessing layers compute from their variables only then
                finalize()


def clone_with_weights(model, weights):
    """A clone of ``model`` (same architecture) whose layers get ``weights[path]`` where given."""
    with scope():
        full = {}
        _collect(model, full, "")
        full.update(weights)
        new, _ = build(model, {}, {}, full)
    return new


def _collect(model, out, prefix):
    for layer in model.layers:
        path = prefix + layer.name
        if is_graph_model(layer):
            _collect(layer, out, path + "/")
        elif layer.weights:
            out[path] = layer.get_weights()
