"""Test utilities: random model graphs, output comparison, weight digests.

These helpers are used by keras_rebuild's own test suite and are public so
that users can check their own handlers and models the same way:

* :func:`weights_digest` - a hash of a model's weights and config, to prove a
  function left the model it was given untouched.
* :func:`random_inputs`, :func:`predict`, :func:`assert_models_close` -
  compare two models output by output, with a tolerance relative to the
  output scale.
* :func:`graph_specs` (needs ``hypothesis``) - a strategy drawing random
  functional graphs step by step from the layers keras_rebuild supports;
  :func:`build_model` turns a drawn spec into a ``keras.Model`` and
  :func:`randomize_weights` fills it with seeded random weights.
* :func:`zero_random_components` and :func:`expected_channels` - zero random
  whole channel groups of a model and predict, independently of
  :func:`keras_rebuild.rebuild`, how many channels each layer keeps.

Example:
    >>> from hypothesis import given
    >>> from keras_rebuild import testing
    >>> @given(testing.graph_specs())                   # doctest: +SKIP
    ... def test_rebuild_is_exact(spec):
    ...     model = testing.build_model(spec, seed=0)
    ...     testing.assert_models_close(model, kr.rebuild(model))
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from keras_rebuild.backends import backend_for
from keras_rebuild.graph import is_graph_model

FLAVOUR_VARIABLE = "KERAS_REBUILD_FLAVOUR"


def flavour_keras(flavour: Optional[str] = None):
    """The Keras module of a flavour: ``keras`` (Keras 3) or ``tf_keras``.

    Args:
        flavour: ``"keras3"`` or ``"tf_keras"``; by default the
            ``KERAS_REBUILD_FLAVOUR`` environment variable, else ``"keras3"``.
            keras_rebuild's own test suite runs once per flavour (and per
            Keras 3 backend) with that variable set.
    """
    import os

    flavour = flavour or os.environ.get(FLAVOUR_VARIABLE, "keras3")
    from keras_rebuild.data import _keras

    return _keras(flavour)

__all__ = [
    "flavour_keras", "weights_digest", "random_inputs", "predict", "max_relative_error", "assert_models_close",
    "assert_outputs_close",
    "graph_specs", "build_model", "randomize_weights", "describe_spec",
    "zero_random_components", "expected_channels", "layer_channels",
]


# ----------------------------------------------------------------------------- comparison
def weights_digest(model) -> str:
    """A SHA-256 digest of a model's weights (values, dtypes, shapes) and config.

    Args:
        model: A Keras model (or layer).

    Returns:
        A hex string that changes when any weight or the config changes.

    Example:
        >>> before = weights_digest(model)      # doctest: +SKIP
        >>> kr.rebuild(model)                   # doctest: +SKIP
        >>> assert weights_digest(model) == before  # doctest: +SKIP
    """
    h = hashlib.sha256()
    for w in model.get_weights():
        w = np.ascontiguousarray(w)
        h.update(f"{w.dtype.str}{w.shape}".encode())
        h.update(w.tobytes())
    h.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def random_inputs(model, batch: int = 4, seed: int = 0):
    """Random inputs matching ``model.inputs`` (unknown dims become 8).

    Float inputs are standard normal; integer inputs are drawn from ``[0, 10)``.

    Returns:
        One array for a single-input model, else a list of arrays.
    """
    rng = np.random.default_rng(seed)
    backend = backend_for(model)
    xs = []
    for t in backend.model_inputs(model):
        shape, dtype, _ = backend.tensor_info(t)
        shape = [batch] + [d if d is not None else 8 for d in shape[1:]]
        if "int" in dtype:
            xs.append(rng.integers(0, 10, size=shape).astype(dtype))
        else:
            xs.append(rng.normal(size=shape).astype("float32"))
    return xs if len(xs) > 1 else xs[0]


def predict(model, x) -> List[np.ndarray]:
    """The model's outputs on ``x`` in inference mode, as a list of float64 arrays."""
    out = model(x, training=False)
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    elif not isinstance(out, (list, tuple)):
        out = [out]
    to_numpy = backend_for(model).to_numpy
    return [np.asarray(to_numpy(o), dtype=np.float64) for o in out]


def max_relative_error(a, b, x=None) -> float:
    """``max |a(x) - b(x)| / max(1, max |a(x)|)`` over all outputs."""
    if x is None:
        x = random_inputs(a)
    ya, yb = predict(a, x), predict(b, x)
    if len(ya) != len(yb):
        raise AssertionError(f"models have {len(ya)} and {len(yb)} outputs")
    err = 0.0
    for u, v in zip(ya, yb):
        if u.shape != v.shape:
            raise AssertionError(f"output shapes differ: {u.shape} vs {v.shape}")
        scale = max(1.0, float(np.max(np.abs(u))) if u.size else 1.0)
        err = max(err, float(np.max(np.abs(u - v))) / scale if u.size else 0.0)
    return err


def assert_models_close(a, b, x=None, tol: float = 1e-4):
    """Assert two models compute the same function on ``x`` (random if omitted).

    Args:
        a, b: Keras models with the same inputs and outputs.
        x: Inputs; ``random_inputs(a)`` when omitted.
        tol: Allowed ``max |a - b|`` relative to ``max(1, max |a|)`` per output.

    Raises:
        AssertionError: with the relative error, when outputs differ.
    """
    err = max_relative_error(a, b, x)
    if not err <= tol:
        raise AssertionError(f"models differ: max relative error {err:.3g} > tol {tol:.1g}")


def assert_outputs_close(a, b, x=None, atol: float = 1e-4, rtol: float = 1e-4):
    """Assert two models give the same outputs on ``x`` (random if omitted), elementwise.

    Like ``numpy.testing.assert_allclose`` over every output, after checking
    that both models have as many outputs of the same shapes.
    """
    if x is None:
        x = random_inputs(a)
    ya, yb = predict(a, x), predict(b, x)
    assert len(ya) == len(yb), (len(ya), len(yb))
    for u, v in zip(ya, yb):
        assert u.shape == v.shape, (u.shape, v.shape)
        np.testing.assert_allclose(u, v, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- channels
def layer_channels(model) -> Dict[str, Tuple[int, int]]:
    """Per layer path with weights: ``(in_channels, out_channels)`` of its first call.

    A layer followed by the selection that ``rebuild`` puts after a
    LayerNormalization (``<name>_select``) counts the selection's output.
    """
    from keras_rebuild.graph import Graph

    g = Graph(model)
    out = {}
    for path, layer in g.iter_layers():
        op = g.first_op(path)  # a plain layer's calls are all of kind "layer"
        if op is None or not getattr(layer, "weights", None):
            continue
        c_in = g.tensors[op.inputs[0]].channels if op.inputs else 0
        c_out = g.tensors[op.outputs[0]].channels if op.outputs else 0
        select = g.first_op(path + "_select") if path + "_select" in g.layers else None
        if select is not None and op.outputs and select.inputs == [op.outputs[0]]:
            c_out = g.tensors[select.outputs[0]].channels
        out[path] = (c_in, c_out)
    return out


def zero_random_components(model, fraction: float = 0.5, seed: int = 0, analysis=None,
                           choices: Optional[Sequence[bool]] = None, readers: bool = True):
    """Zero random whole components of ``model``'s prunable groups.

    Args:
        model: The model (not modified).
        fraction: Probability that each candidate component is zeroed.
        seed: Seed of the draw.
        analysis: ``Analysis(model)``, computed when omitted.
        choices: Explicit per-candidate decisions (overrides ``fraction``/``seed``);
            candidates are the unblocked components of prunable groups, in group order.
        readers: Also zero the kernel rows that read the zeroed channels (what
            ``masks.zero_channels`` and pruning do). With ``False`` only the
            writers (and per-channel layers such as BatchNorm) are zeroed, as
            when channels die in training: removing them then relies on zeros
            propagating through the graph.

    Returns:
        ``(masked_model, analysis, remove)`` where ``remove`` (bool per component)
        is what was zeroed, already passed through ``analysis.keep_nonempty``.
    """
    from keras_rebuild import masks
    from keras_rebuild.groups import Analysis

    analysis = analysis or Analysis(model)
    cands = candidate_components(analysis)
    if choices is None:
        rng = np.random.default_rng(seed)
        choices = rng.random(len(cands)) < fraction
    remove = np.zeros(analysis.num_components, bool)
    remove[np.asarray(cands, np.int64)[np.asarray(choices[: len(cands)], bool)]] = True
    remove = analysis.keep_nonempty(remove)
    if readers:
        return masks.zero_channels(model, remove, analysis), analysis, remove
    return _zero_writers(model, analysis, remove), analysis, remove


def _zero_writers(model, analysis, remove):
    from keras_rebuild import masks
    from keras_rebuild.handlers import mask_array

    weights = {}
    for path, (keep_in, keep_out) in masks_layer_keep(analysis, remove).items():
        op = analysis.graph.first_op(path)
        handler, layer = op.handler, op.layer
        if handler.kind == "blocked":
            continue
        if handler.kind == "mixing":
            keep_in = None  # kernels still read every channel
        m = handler.depth_multiplier(layer)
        internal = masks.internal_keep_masks(analysis, remove, path)
        weights[path] = [
            mask_array(w, roles, keep_in, keep_out, m, internal) if maskable else w
            for w, roles, maskable in zip(analysis.weights[path], handler.weight_roles(layer), handler.maskable(layer))
        ]
    return analysis.graph.backend.clone_with_weights(model, weights)


def masks_layer_keep(analysis, remove):
    from keras_rebuild import masks

    return masks.layer_keep_masks(analysis, remove)


def candidate_components(analysis) -> List[int]:
    """Unblocked components of prunable groups, each once, in group order."""
    seen, out = set(), []
    for grp in analysis.groups:
        if not grp.prunable:
            continue
        for c, blocked in zip(grp.components, grp.blocked):
            if not blocked and int(c) not in seen:
                seen.add(int(c))
                out.append(int(c))
    return out


def expected_channels(analysis, remove) -> Dict[str, Tuple[int, int]]:
    """Per layer path with weights: ``(in, out)`` channels left after removing ``remove``.

    Computed from the analysis alone: ``len(analysis.kept_indices(remove)[tensor])``
    for the first call's first input and output tensor.
    """
    g = analysis.graph
    kept = analysis.kept_indices(remove)
    out = {}
    for path, layer in g.iter_layers():
        op = g.first_op(path)  # a plain layer's calls are all of kind "layer"
        if op is None or not getattr(layer, "weights", None):
            continue
        k_in = len(kept[op.inputs[0]]) if op.inputs else 0
        k_out = len(kept[op.outputs[0]]) if op.outputs else 0
        out[path] = (k_in, k_out)
    return out


# ----------------------------------------------------------------------------- random graphs
# A spec is a plain dict (so hypothesis can print and shrink it):
#   {"inputs": [shape, ...], "ops": [(kind, params, [input tensor ids]), ...], "outputs": [ids]}
# Tensor ids count the inputs first, then one output per op.
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "swish")
ZERO_PRESERVING_ACTIVATIONS = ("linear", "relu", "tanh", "swish")


def _img(shape):
    return len(shape) == 3


def graph_specs(max_ops: int = 8, max_channels: int = 16, spatial: int = 8, allow_nested: bool = True,
                min_ops: int = 1, zero_preserving: bool = False):
    """A hypothesis strategy of random functional-graph specs built from supported layers.

    The graph is drawn step by step (each op picks its inputs among earlier
    tensors) so that failing examples shrink to short chains. The palette:
    Conv2D/Dense with and without bias and with element-wise activations,
    BatchNormalization, Activation, Add/Subtract/Multiply/Average/Maximum
    residuals, channel Concatenate, squeeze-excite gates, DepthwiseConv2D
    (multiplier 1 or 2), SeparableConv2D, Conv2DTranspose, pooling,
    ZeroPadding2D, UpSampling2D, Flatten/GlobalAveragePooling heads with
    Dense, nested functional models (sometimes called twice), and one or two
    image inputs plus an optional vector input. Every tensor no op reads is a
    model output.

    Args:
        max_ops: Most drawn steps (a step such as squeeze-excite adds several layers).
        max_channels: Most channels of any tensor.
        spatial: Height and width of the image inputs.
        allow_nested: Whether nested functional models may be drawn.
        min_ops: Fewest drawn steps.
        zero_preserving: Only layers that map a zero channel to zero once its
            writers are zeroed (activations with ``f(0) == 0``, BatchNorm with
            ``scale=True``), for tests that zero writers only.

    Returns:
        A strategy of spec dicts; pass one to :func:`build_model`.
    """
    from hypothesis import strategies as st

    @st.composite
    def specs(draw):
        inputs = []
        for _ in range(draw(st.integers(1, 2))):
            inputs.append((spatial, spatial, draw(st.integers(1, 4))))
        if draw(st.integers(0, 4)) == 0:
            inputs.append((draw(st.integers(2, 6)),))
        shapes = list(inputs)
        ops = []
        _draw_ops(draw, st, shapes, ops, draw(st.integers(min_ops, max_ops)), max_channels, allow_nested,
                  zero_preserving=zero_preserving)
        used = {i for _, _, ins in ops for i in ins}
        leaves = [i for i in range(len(shapes)) if i not in used]
        outputs = []
        for t in leaves:
            # Most leaves get a head, so that the body's channels are not model outputs.
            head = draw(st.integers(0, 3)) if t >= len(inputs) else 3
            if head == 3:
                outputs.append(t)
            elif head != 1 or not _img(shapes[t]):
                outputs.append(_add_op(ops, shapes, "dense", dict(units=draw(st.integers(1, 4)), use_bias=True,
                                                                   activation="linear"), [t], None))
                shapes[-1] = shapes[t][:-1] + (ops[-1][1]["units"],)
            else:
                g = _add_op(ops, shapes, "gap", {}, [t], (shapes[t][-1],))
                outputs.append(_add_op(ops, shapes, "dense", dict(units=draw(st.integers(1, 4)), use_bias=True,
                                                                   activation="linear"), [g], (0,)))
                shapes[-1] = (ops[-1][1]["units"],)
        # An input no op reads is a model output (Keras allows it).
        return {"inputs": inputs, "ops": ops, "outputs": outputs, "shapes": shapes}

    return specs()


def _add_op(ops, shapes, kind, params, ins, shape):
    ops.append((kind, params, list(ins)))
    shapes.append(tuple(shape) if shape is not None else None)
    return len(shapes) - 1


def _pick(draw, st, shapes, pred):
    """Index of a tensor satisfying ``pred``; shrinks towards the newest one."""
    idx = [i for i, s in enumerate(shapes) if pred(s)]
    if not idx:
        return None
    return idx[len(idx) - 1 - draw(st.integers(0, len(idx) - 1))]


def _draw_ops(draw, st, shapes, ops, n_steps, max_c, allow_nested, nested_ok=True, zero_preserving=False):
    def add(kind, params, ins, shape):
        ops.append((kind, params, list(ins)))
        shapes.append(tuple(shape))
        return len(shapes) - 1

    chan = lambda: draw(st.integers(1, max_c))  # noqa: E731
    acts = ZERO_PRESERVING_ACTIVATIONS if zero_preserving else ACTIVATIONS
    act = lambda: draw(st.sampled_from(acts))  # noqa: E731
    for _ in range(n_steps):
        has_img = any(_img(s) for s in shapes)
        # Repeats weight the draw towards the layers that create and couple channel groups.
        kinds = ["conv", "conv", "conv", "dense", "bn", "bn", "activation", "residual", "residual", "concat",
                 "group_norm", "layer_norm"]
        if has_img:
            kinds += ["squeeze_excite", "depthwise", "separable", "conv_transpose", "pool", "zero_padding", "attention",
                      "recurrent",
                      "upsampling", "gap_head", "flatten_head"]
        if has_img and allow_nested and nested_ok:
            kinds.append("nested")
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            t = _pick(draw, st, shapes, _img)
            if t is None:
                kind = "dense"
            else:
                h, w, _ = shapes[t]
                strides = 2 if h % 2 == 0 and h >= 4 and draw(st.integers(0, 4)) == 0 else 1
                k = draw(st.sampled_from([1, 3]))
                p = dict(filters=chan(), kernel_size=k, strides=strides, padding="same",
                         use_bias=draw(st.booleans()), activation=act())
                add("conv", p, [t], (h // strides, w // strides, p["filters"]))
                continue
        if kind == "dense":
            t = _pick(draw, st, shapes, lambda s: True)
            p = dict(units=chan(), use_bias=draw(st.booleans()), activation=act())
            add("dense", p, [t], shapes[t][:-1] + (p["units"],))
        elif kind == "bn":
            t = _pick(draw, st, shapes, lambda s: True)
            p = dict(center=draw(st.booleans()), scale=zero_preserving or draw(st.booleans()))
            add("bn", p, [t], shapes[t])
        elif kind == "group_norm":
            t = _pick(draw, st, shapes, lambda s: True)
            c = shapes[t][-1]
            groups = draw(st.sampled_from([-1] + [g for g in range(1, c + 1) if c % g == 0]))
            p = dict(groups=groups, center=draw(st.booleans()), scale=draw(st.booleans()))
            add("group_norm", p, [t], shapes[t])
        elif kind == "layer_norm":  # its outputs go through a selection when its readers are wide enough
            t = _pick(draw, st, shapes, lambda s: True)
            add("layer_norm", dict(center=draw(st.booleans()), scale=draw(st.booleans())), [t], shapes[t])
        elif kind == "activation":
            t = _pick(draw, st, shapes, lambda s: True)
            names = ["relu", "tanh", "ReLU"] + ([] if zero_preserving else ["sigmoid"])
            add("activation", dict(activation=draw(st.sampled_from(names))),
                [t], shapes[t])
        elif kind == "residual":
            # A new branch with the same shape merged back: conv (or dense) then Add/...
            t = _pick(draw, st, shapes, lambda s: True)
            s = shapes[t]
            merge = draw(st.sampled_from(["add", "subtract", "multiply", "average", "maximum"]))
            same = [i for i, u in enumerate(shapes) if u == s and i != t]
            if draw(st.integers(0, 5)) == 5:
                other = t  # a tensor merged with itself
            elif same and draw(st.booleans()):
                other = same[len(same) - 1 - draw(st.integers(0, len(same) - 1))]
            elif _img(s):
                other = add("conv", dict(filters=s[-1], kernel_size=draw(st.sampled_from([1, 3])), strides=1,
                                         padding="same", use_bias=draw(st.booleans()), activation=act()), [t], s)
            else:
                other = add("dense", dict(units=s[-1], use_bias=draw(st.booleans()), activation=act()), [t], s)
            add(merge, {}, [t, other], s)
        elif kind == "concat":
            t = _pick(draw, st, shapes, lambda s: True)
            s = shapes[t]
            same = [i for i, u in enumerate(shapes) if u[:-1] == s[:-1] and i != t]
            if draw(st.integers(0, 5)) == 5:
                other = t  # a tensor concatenated with itself
            elif same and draw(st.booleans()):
                other = same[len(same) - 1 - draw(st.integers(0, len(same) - 1))]
            elif _img(s):
                other = add("conv", dict(filters=chan(), kernel_size=1, strides=1, padding="same",
                                         use_bias=draw(st.booleans()), activation=act()), [t], s[:-1] + (1,))
                shapes[-1] = s[:-1] + (ops[-1][1]["filters"],)
            else:
                units = chan()
                other = add("dense", dict(units=units, use_bias=draw(st.booleans()), activation=act()), [t],
                            s[:-1] + (units,))
            ins = [t, other] if draw(st.booleans()) else [other, t]
            c = sum(shapes[i][-1] for i in ins)
            if c > 2 * max_c:
                continue
            add("concat", {}, ins, s[:-1] + (c,))
        elif kind == "squeeze_excite":
            t = _pick(draw, st, shapes, _img)
            h, w, c = shapes[t]
            r = draw(st.integers(1, max(1, c)))
            reduce_layer = draw(st.sampled_from(["conv", "dense"]))
            p = dict(channels=c, reduced=r, layer=reduce_layer, use_bias=draw(st.booleans()))
            add("squeeze_excite", p, [t], (h, w, c))
        elif kind == "attention":  # self-attention over the pixels: heads are internal channels
            t = _pick(draw, st, shapes, _img)
            p = dict(num_heads=draw(st.integers(1, 3)), key_dim=draw(st.sampled_from([2, 4])),
                     use_bias=draw(st.booleans()))
            add("attention", p, [t], shapes[t])
        elif kind == "recurrent":  # the pixels as a sequence through an RNN, and back to an image
            t = _pick(draw, st, shapes, _img)
            h, w, _ = shapes[t]
            p = dict(cell=draw(st.sampled_from(["SimpleRNN", "GRU", "LSTM"])), units=chan(),
                     bidirectional=draw(st.booleans()), use_bias=draw(st.booleans()))
            add("recurrent", p, [t], (h, w, p["units"] * (2 if p["bidirectional"] else 1)))
        elif kind == "depthwise":
            t = _pick(draw, st, shapes, _img)
            h, w, c = shapes[t]
            m = draw(st.sampled_from([1, 2]))
            p = dict(depth_multiplier=m, kernel_size=3, padding="same", use_bias=draw(st.booleans()),
                     activation=act())
            add("depthwise", p, [t], (h, w, c * m))
        elif kind == "separable":
            t = _pick(draw, st, shapes, _img)
            h, w, c = shapes[t]
            p = dict(filters=chan(), kernel_size=3, padding="same", depth_multiplier=draw(st.sampled_from([1, 2])),
                     use_bias=draw(st.booleans()), activation=act())
            add("separable", p, [t], (h, w, p["filters"]))
        elif kind == "conv_transpose":
            t = _pick(draw, st, shapes, _img)
            h, w, c = shapes[t]
            strides = 2 if h <= 4 and draw(st.booleans()) else 1
            p = dict(filters=chan(), kernel_size=draw(st.sampled_from([2, 3])), strides=strides, padding="same",
                     use_bias=draw(st.booleans()), activation=act())
            add("conv_transpose", p, [t], (h * strides, w * strides, p["filters"]))
        elif kind == "pool":
            t = _pick(draw, st, shapes, lambda s: _img(s) and s[0] >= 2 and s[0] % 2 == 0)
            if t is None:
                continue
            h, w, c = shapes[t]
            add("pool", dict(kind=draw(st.sampled_from(["max", "average"]))), [t], (h // 2, w // 2, c))
        elif kind == "zero_padding":
            t = _pick(draw, st, shapes, lambda s: _img(s) and s[0] <= 8)
            if t is None:
                continue
            h, w, c = shapes[t]
            add("zero_padding", {}, [t], (h + 2, w + 2, c))
        elif kind == "upsampling":
            t = _pick(draw, st, shapes, lambda s: _img(s) and s[0] <= 4)
            if t is None:
                continue
            h, w, c = shapes[t]
            add("upsampling", {}, [t], (2 * h, 2 * w, c))
        elif kind == "gap_head":
            t = _pick(draw, st, shapes, _img)
            g = add("gap", {}, [t], (shapes[t][-1],))
            if draw(st.booleans()):
                add("dense", dict(units=chan(), use_bias=draw(st.booleans()), activation=act()), [g], (0,))
                shapes[-1] = (ops[-1][1]["units"],)
        elif kind == "flatten_head":
            t = _pick(draw, st, shapes, lambda s: _img(s) and s[0] * s[1] * s[2] <= 512)
            if t is None:
                continue
            h, w, c = shapes[t]
            f = add("flatten", {}, [t], (h * w * c,))
            add("dense", dict(units=chan(), use_bias=draw(st.booleans()), activation=act()), [f], (0,))
            shapes[-1] = (ops[-1][1]["units"],)
        elif kind == "nested":
            t = _pick(draw, st, shapes, _img)
            inner_shapes = [shapes[t]]
            inner_ops = []
            _draw_ops(draw, st, inner_shapes, inner_ops, draw(st.integers(1, 3)), max_c, False, nested_ok=False,
                      zero_preserving=zero_preserving)
            used = {i for _, _, ins in inner_ops for i in ins}
            inner_out = [i for i in range(len(inner_shapes)) if i not in used]
            if inner_out == [0]:
                continue  # the nested model would be an identity
            inner_out = [i for i in inner_out if i != 0][:1]  # one output keeps calls simple
            sub = {"inputs": [shapes[t]], "ops": inner_ops, "outputs": inner_out, "shapes": inner_shapes}
            out_shape = inner_shapes[inner_out[0]]
            first = add("nested", dict(spec=sub, call=0), [t], out_shape)
            same = [i for i, u in enumerate(shapes) if u == shapes[t] and i not in (t, first)]
            if same and draw(st.integers(0, 3)) == 0:  # call the same nested model again
                add("nested", dict(spec=sub, call=1, first=first), [same[-1]], out_shape)


def build_model(spec: dict, seed: int = 0, name: str = "fuzz", keras=None):
    """Build a functional model from a :func:`graph_specs` spec, with random weights.

    Args:
        spec: A spec drawn from :func:`graph_specs`.
        seed: Seed of :func:`randomize_weights`.
        name: Model name.
        keras: The Keras module to build with (``keras`` or ``tf_keras``);
            :func:`flavour_keras` by default. The same spec gives the same
            graph in either flavour.

    Returns:
        A ``keras.Model``.
    """
    keras = keras or flavour_keras()
    L = keras.layers
    inputs = [keras.Input(shape=s, name=f"in{i}") for i, s in enumerate(spec["inputs"])]
    tensors = list(inputs)
    nested_models: Dict[int, object] = {}
    counter = [0]

    def uname(kind):
        counter[0] += 1
        return f"{kind}_{counter[0]}"

    for kind, p, ins in spec["ops"]:
        xs = [tensors[i] for i in ins]
        x = xs[0]
        if kind == "conv":
            y = L.Conv2D(p["filters"], p["kernel_size"], strides=p["strides"], padding="same",
                         use_bias=p["use_bias"], activation=p["activation"], name=uname("conv"))(x)
        elif kind == "dense":
            y = L.Dense(p["units"], use_bias=p["use_bias"], activation=p["activation"], name=uname("dense"))(x)
        elif kind == "bn":
            y = L.BatchNormalization(center=p["center"], scale=p["scale"], name=uname("bn"))(x)
        elif kind == "group_norm":
            y = L.GroupNormalization(groups=p["groups"], center=p["center"], scale=p["scale"],
                                     name=uname("group_norm"))(x)
        elif kind == "layer_norm":
            y = L.LayerNormalization(center=p["center"], scale=p["scale"], name=uname("layer_norm"))(x)
        elif kind == "activation":
            if p["activation"] == "ReLU":
                y = L.ReLU(name=uname("relu"))(x)
            else:
                y = L.Activation(p["activation"], name=uname("act"))(x)
        elif kind in ("add", "subtract", "multiply", "average", "maximum"):
            cls = {"add": L.Add, "subtract": L.Subtract, "multiply": L.Multiply, "average": L.Average,
                   "maximum": L.Maximum}[kind]
            y = cls(name=uname(kind))(xs)
        elif kind == "concat":
            y = L.Concatenate(axis=-1, name=uname("concat"))(xs)
        elif kind == "squeeze_excite":
            c, r = p["channels"], p["reduced"]
            s = L.GlobalAveragePooling2D(name=uname("se_pool"))(x)
            s = L.Reshape((1, 1, c), name=uname("se_reshape"))(s)
            if p["layer"] == "conv":
                s = L.Conv2D(r, 1, use_bias=p["use_bias"], name=uname("se_reduce"))(s)
                s = L.ReLU(name=uname("se_relu"))(s)
                s = L.Conv2D(c, 1, activation="sigmoid", use_bias=p["use_bias"], name=uname("se_expand"))(s)
            else:
                s = L.Dense(r, use_bias=p["use_bias"], activation="relu", name=uname("se_reduce"))(s)
                s = L.Dense(c, use_bias=p["use_bias"], activation="sigmoid", name=uname("se_expand"))(s)
            y = L.Multiply(name=uname("se_scale"))([x, s])
        elif kind == "recurrent":
            h, w, c = (int(d) for d in x.shape[1:])
            rnn = getattr(L, p["cell"])(p["units"], use_bias=p["use_bias"], return_sequences=True, name=uname("rnn"))
            if p["bidirectional"]:
                rnn = L.Bidirectional(rnn, name=uname("birnn"))
            seq = rnn(L.Reshape((h * w, c), name=uname("to_sequence"))(x))
            y = L.Reshape((h, w, int(seq.shape[-1])), name=uname("to_image"))(seq)
        elif kind == "attention":
            y = L.MultiHeadAttention(p["num_heads"], p["key_dim"], use_bias=p["use_bias"], name=uname("mha"))(x, x)
        elif kind == "depthwise":
            y = L.DepthwiseConv2D(3, depth_multiplier=p["depth_multiplier"], padding="same", use_bias=p["use_bias"],
                                  activation=p["activation"], name=uname("dwconv"))(x)
        elif kind == "separable":
            y = L.SeparableConv2D(p["filters"], 3, padding="same", depth_multiplier=p["depth_multiplier"],
                                  use_bias=p["use_bias"], activation=p["activation"], name=uname("sepconv"))(x)
        elif kind == "conv_transpose":
            y = L.Conv2DTranspose(p["filters"], p["kernel_size"], strides=p["strides"], padding="same",
                                  use_bias=p["use_bias"], activation=p["activation"], name=uname("convT"))(x)
        elif kind == "pool":
            cls = L.MaxPooling2D if p["kind"] == "max" else L.AveragePooling2D
            y = cls(2, name=uname(p["kind"] + "pool"))(x)
        elif kind == "zero_padding":
            y = L.ZeroPadding2D(1, name=uname("pad"))(x)
        elif kind == "upsampling":
            y = L.UpSampling2D(2, name=uname("up"))(x)
        elif kind == "gap":
            y = L.GlobalAveragePooling2D(name=uname("gap"))(x)
        elif kind == "flatten":
            y = L.Flatten(name=uname("flatten"))(x)
        elif kind == "nested":
            if p["call"] == 0:
                sub = build_model(p["spec"], seed=seed + 1, name=uname("block"), keras=keras)
                nested_models[len(tensors)] = sub
            else:
                sub = nested_models[p["first"]]
            y = sub(x)
        else:  # pragma: no cover
            raise ValueError(f"unknown op kind {kind!r}")
        tensors.append(y)
    outputs = [tensors[i] for i in spec["outputs"]]
    model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=name)
    randomize_weights(model, seed)
    return model


def randomize_weights(model, seed: int = 0):
    """Fill every layer (nested models too) with seeded random, well-scaled weights.

    Kernels are normal with variance ``1 / fan_in``; biases and BatchNorm
    ``beta``/moving mean are small and non-zero; BatchNorm ``gamma`` has random
    sign and moving variance lies in ``[0.5, 1.5]``, so every statistic matters.
    Changes ``model`` in place and returns it.
    """
    rng = np.random.default_rng(seed)

    def fill(m):
        for layer in m.layers:
            if is_graph_model(layer):
                fill(layer)
                continue
            ws = layer.get_weights()
            if not ws:
                continue
            names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
            new = []
            for name, w in zip(names, ws):
                if "variance" in name:
                    v = rng.uniform(0.5, 1.5, w.shape)
                elif "gamma" in name:
                    v = rng.uniform(0.5, 1.5, w.shape) * rng.choice([-1.0, 1.0], w.shape)
                elif "beta" in name or "moving_mean" in name or "bias" in name:
                    v = rng.normal(0.0, 0.3, w.shape)
                else:
                    fan_in = max(1, int(np.prod(w.shape[:-1])))
                    if type(layer).__name__ == "DepthwiseConv2D" or "depthwise" in name:
                        fan_in = max(1, int(np.prod(w.shape[:-2])))
                    v = rng.normal(0.0, 1.0 / np.sqrt(fan_in), w.shape)
                new.append(v.astype(w.dtype))
            layer.set_weights(new)
            finalize = getattr(layer, "finalize_state", None)
            if callable(finalize):  # Keras 3 preprocessing layers read their variables only then
                finalize()

    fill(model)
    return model


def describe_spec(spec: dict, indent: str = "") -> str:
    """A readable listing of a spec: one line per op with its input and output shapes."""
    shapes = spec.get("shapes", [])
    lines = [f"{indent}inputs: " + ", ".join(f"t{i}{s}" for i, s in enumerate(spec["inputs"]))]
    n_in = len(spec["inputs"])
    for j, (kind, p, ins) in enumerate(spec["ops"]):
        tid = n_in + j
        params = {k: v for k, v in p.items() if k != "spec"}
        shape = shapes[tid] if tid < len(shapes) else "?"
        lines.append(f"{indent}t{tid}{shape} = {kind}({', '.join(f't{i}' for i in ins)}) {params}")
        if "spec" in p and p.get("call") == 0:
            lines.append(describe_spec(p["spec"], indent + "    "))
    lines.append(f"{indent}outputs: " + ", ".join(f"t{i}" for i in spec["outputs"]))
    return "\n".join(lines)
