"""The tf_keras back-end: Keras 2 models (``import tf_keras``), as tfmot uses them.

Importing this module imports TensorFlow and tf_keras; it is imported only
when a tf_keras model arrives. It changes no environment variable.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np

from keras_rebuild._compat import keras, tf
from keras_rebuild.graph import Op
from keras_rebuild.backends import check_all_set, config_of, model_errors, plain_functional_note, probe_shape
from keras_rebuild.handlers import builtin

NAME = "tf_keras"

# tf_keras' TFOpLambda function names -> the canonical op names shared with Keras 3.
TF_FUNCTIONS = {
    "__operators__.add": "add", "math.add": "add", "math.subtract": "subtract", "__operators__.sub": "subtract",
    "math.maximum": "maximum", "math.minimum": "minimum", "math.truediv": "divide",
    "__operators__.truediv": "divide", "math.divide": "divide",
    "math.multiply": "multiply", "__operators__.mul": "multiply", "math.multiply_no_nan": "multiply",
    "nn.relu": "relu", "nn.relu6": "relu6", "math.sigmoid": "sigmoid", "nn.sigmoid": "sigmoid",
    "math.tanh": "tanh", "nn.tanh": "tanh", "nn.silu": "silu", "nn.swish": "silu", "nn.gelu": "gelu",
    "math.abs": "abs", "nn.elu": "elu", "nn.selu": "selu", "nn.softplus": "softplus", "math.softplus": "softplus",
    "math.negative": "negative", "math.square": "square", "math.sqrt": "sqrt", "math.exp": "exp",
    "identity": "identity", "nn.leaky_relu": "leaky_relu", "cast": "cast", "clip_by_value": "clip",
    "math.reduce_mean": "mean", "math.reduce_max": "max", "math.reduce_sum": "sum", "math.reduce_min": "min",
    "concat": "concatenate", "nn.depth_to_space": "depth_to_space", "nn.space_to_depth": "space_to_depth",
}


def _extra_classes():
    """Classes outside ``tf_keras.layers`` that have built-in handlers."""
    extra = {}
    with contextlib.suppress(ImportError):
        from tf_keras.src.layers.core.tf_op_layer import TFOpLambda

        extra["op"] = [TFOpLambda]
    with contextlib.suppress(ImportError):
        from tf_keras.src.applications import convnext

        extra["LayerScale"] = [convnext.LayerScale]
        extra["StochasticDepth"] = [convnext.StochasticDepth]
    with contextlib.suppress(ImportError, AttributeError):
        from tf_keras.src.applications import inception_resnet_v2

        extra["CustomScaleLayer"] = [inception_resnet_v2.CustomScaleLayer]
    return extra


builtin.register_flavour(keras.layers, _extra_classes())


# ----------------------------------------------------------------------------- models
def is_graph_model(obj) -> bool:
    return isinstance(obj, keras.Model) and getattr(obj, "_is_graph_network", False)


def check_model(model, arg_name: str = "model"):
    is_model = isinstance(model, keras.Model)
    model_errors(model, arg_name, is_model, is_model and isinstance(model, keras.Sequential) and not model.built,
                 is_graph_model(model))


def model_inputs(model):
    return model.inputs


def model_outputs(model):
    return model.outputs


def io_names(model):
    return list(model.input_names), list(model.output_names)


def tensor_info(kt):
    shape = tuple(kt.shape.as_list()) if kt.shape.rank is not None else ()
    return shape, (kt.dtype.name if kt.dtype else "float32"), kt.name


def _is_tensor(x) -> bool:
    return hasattr(x, "_keras_history")


def walk(graph, model, prefix: str):
    network_nodes = model._network_nodes
    for depth in sorted(model._nodes_by_depth.keys(), reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if isinstance(layer, keras.layers.InputLayer):
                continue
            node_index = layer._inbound_nodes.index(node)
            if f"{layer.name}_ib-{node_index}" not in network_nodes:
                continue
            path = prefix + layer.name
            inputs = [graph.tensor_id(t) for t in node.keras_inputs]
            outputs = [graph.tensor_id(t) for t in tf.nest.flatten(node.outputs)]
            if is_graph_model(layer):
                calls = len([n for n in layer._inbound_nodes if not n.is_input])
                graph.add_nested(layer, path, inputs, outputs, layer.inputs, layer.outputs, node, calls)
                continue
            fn = constants = None
            options = {}
            if type(layer).__name__ == "TFOpLambda":
                name = layer.get_config().get("function", "")
                fn = TF_FUNCTIONS.get(name, "tf." + name)
                constants = tuple(a for a in tf.nest.flatten(node.call_args) if not _is_tensor(a))
                options = {k: v for k, v in (node.call_kwargs or {}).items()
                           if not any(_is_tensor(a) for a in tf.nest.flatten(v))}
            graph.add_layer_op(Op("layer", layer, path, inputs, outputs, node, fn=fn,
                                  constants=constants or (), options=options))


def probe_zero(op) -> bool:
    """Call a parameterless layer on all-zero inputs; True if every output is all zero."""
    node = op.node
    values = {}
    for kt in node.keras_inputs:
        shape = probe_shape(kt.shape.as_list() if kt.shape.rank is not None else [None, None])
        values.setdefault(str(id(kt)), []).append(tf.zeros(shape, kt.dtype))
    tensor_dict = {k: v * 4 for k, v in values.items()}
    args, kwargs = node.map_arguments(tensor_dict)
    kwargs = dict(kwargs)
    if getattr(getattr(op.layer, "_call_spec", None), "expects_training_arg", False):
        kwargs.setdefault("training", False)
    try:
        out = op.layer(*args, **kwargs)
    except Exception:  # a probe that cannot run proves nothing
        return False
    return all(bool(np.all(np.asarray(o) == 0)) for o in tf.nest.flatten(out))


def call_arguments(layer):
    """``(expects_mask, expects_training)``: which of these keywords ``layer.call`` takes."""
    spec = getattr(layer, "_call_spec", None)
    if spec is None:
        return True, True
    return bool(spec.expects_mask_arg), bool(spec.expects_training_arg)


def nested_inputs(sub):
    """``[(tensor, input layer name), ...]`` of a nested model."""
    return list(zip(sub.inputs, [layer.name for layer in sub._input_layers]))


def to_numpy(x):
    return np.asarray(x)


def loss_of(model):
    """The loss ``model`` was compiled with, or None."""
    compiled = getattr(model, "compiled_loss", None)
    return compiled if compiled is not None and getattr(model, "loss", None) is not None else None


def training_loss(model, y, y_pred, sample_weight=None):
    """The compiled loss of ``model`` (hard loss + regularisation, tracked as ``loss``), as in ``train_step``."""
    return model.compiled_loss(y, y_pred, sample_weight, regularization_losses=model.losses)


def loss_value(fn, y, preds):
    pred = preds[0] if len(preds) == 1 else list(preds)
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    out = fn(y, pred)
    return tf.reduce_sum(out) if out.shape.rank else out


def activations_and_gradients(probe, x, n_acts, loss_of_preds):
    """The first ``n_acts`` outputs of ``probe`` on ``x`` and the loss gradients with respect to them."""
    with tf.GradientTape() as tape:
        outs = probe(x, training=False)
        acts = outs[:n_acts]
        loss = loss_of_preds(outs[n_acts:])
    grads = tape.gradient(loss, acts, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return acts, grads


def is_batch_norm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


# ----------------------------------------------------------------------------- wrappers
def strip_wrappers(model):
    """Strip keras_rebuild's or tfmot's pruning wrappers (on a copy); else return ``model``."""
    from keras_rebuild.graph import all_layers

    names = {type(layer).__name__ for layer in all_layers(model)}
    if "StructuredPruningWrapper" in names:
        from keras_rebuild.wrappers import strip_pruning

        model = strip_pruning(model)
        names = {type(layer).__name__ for layer in all_layers(model)}
    if "PruneLowMagnitude" in names:
        from keras_rebuild._compat import tfmot

        model = tfmot().sparsity.keras.strip_pruning(model)
    return model


# ----------------------------------------------------------------------------- rebuild
def scope():
    """Context of a rebuild (nothing to set up for tf_keras)."""
    return contextlib.nullcontext()


def build(model, new_configs, input_shapes, new_weights=None, selections=None):
    """A new model from ``model``'s config with the layer configs of ``new_configs`` swapped in.

    A layer listed in ``selections`` (path -> ``(name, kept indices)``) is
    followed by a frozen ``Dense`` of that name without bias, whose one-hot
    kernel (in ``new_weights``) selects the kept channels.
    Nested models' inputs take the shapes of ``input_shapes``; weights are set afterwards.
    Returns ``(model, notes)``; ``notes`` say what did not carry over.
    """
    from tf_keras.src.engine import functional

    sequential = isinstance(model, keras.Sequential)
    try:
        if sequential:
            config = copy.deepcopy(model.get_config())
        else:
            # The graph's own config: a Functional subclass may override get_config (or, with a
            # constructor of its own, leave the layers out of it).
            config = copy.deepcopy(functional.get_network_config(
                model, config={"name": model.name, "trainable": model.trainable}))
    except NotImplementedError:
        from keras_rebuild.graph import all_layers

        for layer in all_layers(model):
            config_of(layer, layer.name)  # raises our error naming the first layer that cannot serialise
        raise
    _edit_config(config, "", new_configs, input_shapes, top=True, selections=selections or {})
    custom = {}
    from keras_rebuild.graph import all_layers

    for layer in all_layers(model) + [model]:
        cls = type(layer)
        custom[cls.__name__] = cls
        with contextlib.suppress(Exception):
            custom[keras.saving.get_registered_name(cls)] = cls
    # The config is the caller's own in-memory model: a Python `lambda` in a Lambda layer is
    # their code, so Keras' safe mode (meant for loading untrusted files) must not refuse it.
    with keras.utils.custom_object_scope(custom), _unsafe_deserialization():
        notes = []
        if sequential:
            new = keras.Sequential.from_config(config)
        else:
            new = _functional_subclass(type(model), config, notes)
            if new is None:
                new = keras.Model.from_config(config)
    set_weights(new, new_weights or {})
    return new, notes


def _functional_subclass(cls, config, notes):
    """A model of ``cls``, a Functional subclass, from a Functional ``config``; else ``None`` with a note.

    Like Keras 3, a subclass is rebuilt as itself when its constructor takes
    what ``Functional``'s does (``inputs, outputs, name``), either by name or
    as ``*args, **kwargs`` (keras-io's EDSR: ``class EDSRModel(keras.Model)``
    with its own ``train_step``, made as ``EDSRModel(inputs, outputs)``).
    The subclass' own ``from_config`` is not used: it may expect a config of
    its own. A constructor taking other arguments cannot be called, and one
    that fails is not retried: the model comes back as a plain Functional.
    """
    from tf_keras.src.engine import functional
    from tf_keras.src.utils import tf_inspect

    if cls in (keras.Model, functional.Functional):
        return None
    spec = tf_inspect.getfullargspec(cls.__init__)
    functional_args = tf_inspect.getfullargspec(functional.Functional.__init__).args[1:]
    if spec.args[1:] != functional_args and (spec.varargs is None or spec.varkw is None):
        notes.append(plain_functional_note(config.get("name"), cls))
        return None
    inputs, outputs, layers = functional.reconstruct_from_config(config)
    try:
        new = cls(inputs, outputs, name=config.get("name"))
    except Exception as exc:  # noqa: BLE001 - a constructor that cannot take (inputs, outputs): plain Functional
        notes.append(plain_functional_note(config.get("name"), cls, exc))
        return None
    functional.connect_ancillary_layers(new, layers)
    return new


def _unsafe_deserialization():
    scope = getattr(getattr(getattr(keras, "src", None), "saving", None), "serialization_lib", None)
    scope = getattr(scope, "SafeModeScope", None)
    return scope(False) if scope is not None else contextlib.nullcontext()


def _edit_config(config, prefix, new_configs, input_shapes, top=False, selections=None):
    selections = selections or {}
    layers = config.get("layers", [])
    for entry in list(layers):
        path = prefix + str(entry.get("config", {}).get("name"))
        if path in selections:
            _insert_selection(config, entry, *selections[path])
    for i, entry in enumerate(layers):
        cfg = entry.get("config", {})
        name = cfg.get("name")
        path = prefix + str(name)
        entry.pop("build_config", None)
        if "layers" in cfg:  # nested model
            _edit_config(cfg, path + "/", new_configs, input_shapes, selections=selections)
            continue
        if path in new_configs:
            entry["config"] = dict(new_configs[path])
            cfg = entry["config"]
        if not top and path in input_shapes:
            cfg["batch_input_shape"] = (None,) + tuple(input_shapes[path][1:])
        elif not top and i == 0 and "batch_input_shape" in cfg and config.get("layers") is not None:
            # first layer of a nested Sequential without an InputLayer
            key = prefix + "__first__"
            if key in input_shapes:
                cfg["batch_input_shape"] = (None,) + tuple(input_shapes[key][1:])
    if not top and "build_input_shape" in config:
        config.pop("build_input_shape", None)


def _insert_selection(config, entry, name, kept):
    """Put a frozen one-hot ``Dense`` called ``name`` after the layer of ``entry``; its readers read it."""
    source = entry["config"]["name"]
    select = keras.layers.serialize(keras.layers.Dense(
        len(kept), use_bias=False, trainable=False, name=name, dtype=entry["config"].get("dtype")))
    select["name"] = name
    layers = config["layers"]
    position = layers.index(entry) + 1
    if "inbound_nodes" not in entry:  # Sequential: the next layer reads the previous one
        layers.insert(position, select)
        return
    calls = len(entry["inbound_nodes"])
    select["inbound_nodes"] = [[[source, j, 0, {}]] for j in range(calls)]

    def rewire(value):
        if (isinstance(value, list) and len(value) in (3, 4) and value[0] == source
                and isinstance(value[1], int) and value[2] == 0):
            return [name] + [rewire(v) for v in value[1:]]
        if isinstance(value, list):
            return [rewire(v) for v in value]
        if isinstance(value, dict):
            return {k: rewire(v) for k, v in value.items()}
        return value

    for other in layers:
        if other is not entry and "inbound_nodes" in other:
            other["inbound_nodes"] = rewire(other["inbound_nodes"])
    if "output_layers" in config:
        config["output_layers"] = rewire(config["output_layers"])
    layers.insert(position, select)


def set_weights(model, new_weights, prefix="", used=None):
    """Set ``new_weights[path]`` on every layer of ``model`` (nested models included)."""
    top = used is None
    used = set() if top else used
    for layer in model.layers:
        path = prefix + layer.name
        if is_graph_model(layer):
            set_weights(layer, new_weights, path + "/", used)
            continue
        w = new_weights.get(path)
        if w:
            layer.set_weights(w)
            used.add(path)
    if top:
        check_all_set(new_weights, used)


def clone_with_weights(model, weights):
    """A clone of ``model`` (same architecture) whose layers get ``weights[path]`` where given."""
    clone = keras.models.clone_model(model)
    _assign(clone, model, weights, prefix="")
    return clone


def _assign(clone, original, weights, prefix):
    for new_layer, old_layer in zip(clone.layers, original.layers):
        path = prefix + old_layer.name
        if is_graph_model(old_layer):
            _assign(new_layer, old_layer, weights, path + "/")
        elif old_layer.weights:
            new_layer.set_weights(weights.get(path, old_layer.get_weights()))
