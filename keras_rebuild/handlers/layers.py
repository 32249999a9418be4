"""Handlers for the built-in Keras layers."""
from __future__ import annotations

import numpy as np

from keras_rebuild.backends import leaves
from keras_rebuild.handlers.base import LayerHandler
from keras_rebuild.handlers.builtin import builtin_handler
from keras_rebuild.handlers.common import (
    MergeHandler,
    MixingHandler,
    PassThroughHandler,
    ProbedPassThroughHandler,
    TiedHandler,
    activation_check,
    probe_zero,
    spatial_size,
)



def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


class _ChannelsFirstAware:
    def connect(self, ctx, op):
        if not _channels_last(op.layer):
            ctx.block_all(op, f"'{op.layer.name}' uses data_format='channels_first' (only channels_last is supported)")
            if getattr(self, "kind", "") == "mixing":  # still a writer: its group shows why it is kept
                for t in op.outputs:
                    ctx.writes(op, t)
            return
        super().connect(ctx, op)


# --------------------------------------------------------------------------- Dense
@builtin_handler("Dense")
class DenseHandler(MixingHandler):
    units_key = "units"
    kernel_in_axis = 0
    kernel_out_axis = 1

    def macs(self, layer, op, graph, n_in, n_out):
        return spatial_size(graph.tensors[op.outputs[0]].shape) * n_in * n_out


# --------------------------------------------------------------------------- Conv
@builtin_handler("Conv1D", "Conv2D", "Conv3D")
class ConvHandler(_ChannelsFirstAware, MixingHandler):
    """Conv1D/2D/3D. Grouped convs (``groups > 1``) lose whole groups only.

    In a grouped conv, the ``C_in / groups`` input channels and the
    ``filters / groups`` output channels of one group are tied together, so a
    group goes only when all of it is dead and every remaining group keeps its
    size (``groups == C_in`` is the depthwise case: one input per group).
    """

    def connect(self, ctx, op):
        layer = op.layer
        groups = getattr(layer, "groups", 1)
        if groups == 1 or not _channels_last(layer):
            super().connect(ctx, op)
            return
        c_in, c_out = ctx.channels(op.inputs[0]), ctx.channels(op.outputs[0])
        gi, go = c_in // groups, c_out // groups
        ctx.tie(op.inputs[0], op.inputs[0], (np.arange(c_in) // gi) * gi)  # a group's inputs together
        ctx.tie(op.inputs[0], op.outputs[0], (np.arange(c_out) // go) * gi)  # ... with its outputs
        elementwise, _ = activation_check(layer)
        if not elementwise:
            ctx.block(op.outputs[0], f"the activation of '{layer.name}' couples its channels", op.path)

    def _is_grouped(self, layer):
        return getattr(layer, "groups", 1) != 1

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        if not self._is_grouped(layer):
            return super().forward_zero(layer, weights, op, in_zero, out_channels)
        k = weights[0]  # (..., C_in / groups, filters)
        gi, c_out = k.shape[-2], k.shape[-1]
        go = c_out // layer.groups
        kz = (k == 0).reshape(-1, gi, c_out).all(axis=0)  # (gi, c_out)
        live_in = ~in_zero[0].reshape(layer.groups, gi)  # (groups, gi)
        live_for_out = live_in[np.arange(c_out) // go].T  # (gi, c_out)
        reaches = (live_for_out & ~kz).any(axis=0)
        b = self.bias(layer, weights)
        bz = np.ones(c_out, bool) if b is None else b == 0
        _, act0 = activation_check(layer)
        return [~reaches & bz & act0]

    def ignored_inputs(self, layer, weights, op):
        if self._is_grouped(layer):
            return [None]
        return super().ignored_inputs(layer, weights, op)

    def weight_roles(self, layer):
        if self._is_grouped(layer):
            roles = [{-1: "out"}]
            if layer.use_bias:
                roles.append({0: "out"})
            return roles
        return super().weight_roles(layer)

    def update_config(self, layer, config, n_in, n_out):
        config = super().update_config(layer, config, n_in, n_out)
        if self._is_grouped(layer):
            group_in = layer.kernel.shape[-2]
            config["groups"] = int(n_in // group_in)
        return config

    def macs(self, layer, op, graph, n_in, n_out):
        k = int(np.prod(layer.kernel_size))
        per_group_in = layer.kernel.shape[-2] if self._is_grouped(layer) else n_in
        return spatial_size(graph.tensors[op.outputs[0]].shape) * k * per_group_in * n_out


@builtin_handler("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
class ConvTransposeHandler(_ChannelsFirstAware, MixingHandler):
    kernel_in_axis = -1
    kernel_out_axis = -2

    def macs(self, layer, op, graph, n_in, n_out):
        k = int(np.prod(layer.kernel_size))
        return spatial_size(graph.tensors[op.inputs[0]].shape) * k * n_in * n_out


@builtin_handler("SeparableConv1D", "SeparableConv2D")
class SeparableConvHandler(_ChannelsFirstAware, MixingHandler):
    """Depthwise then pointwise: mixing from input to output channels."""

    def depth_multiplier(self, layer):
        return layer.depth_multiplier

    def kernel_zero_matrix(self, layer, weights):
        dw, pw = weights[0], weights[1]
        m = layer.depth_multiplier
        c_in = dw.shape[-2]
        dwz = (dw == 0).reshape(-1, c_in, m).all(axis=0)  # (c_in, m)
        pwz = (pw == 0).reshape(-1, c_in, m, pw.shape[-1]).all(axis=0)  # (c_in, m, out)
        return (dwz[:, :, None] | pwz).all(axis=1)

    def bias(self, layer, weights):
        return weights[2] if layer.use_bias else None

    def weight_roles(self, layer):
        roles = [{-2: "in"}, {-2: "in*m", -1: "out"}]
        if layer.use_bias:
            roles.append({0: "out"})
        return roles

    def macs(self, layer, op, graph, n_in, n_out):
        s = spatial_size(graph.tensors[op.outputs[0]].shape)
        m = layer.depth_multiplier
        return s * int(np.prod(layer.kernel_size)) * n_in * m + s * n_in * m * n_out


@builtin_handler("DepthwiseConv1D", "DepthwiseConv2D")
class DepthwiseConvHandler(_ChannelsFirstAware, TiedHandler):
    def depth_multiplier(self, layer):
        return layer.depth_multiplier

    def connect(self, ctx, op):
        super().connect(ctx, op)
        elementwise, _ = activation_check(op.layer)
        if not elementwise:
            ctx.block(op.outputs[0], f"the activation of '{op.layer.name}' couples its channels", op.path)

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        k = weights[0]  # (..., C, m)
        kz = (k == 0).reshape(-1, k.shape[-2] * k.shape[-1]).all(axis=0)
        bz = (weights[1] == 0) if layer.use_bias else np.ones_like(kz)
        _, act0 = activation_check(layer)
        return [(np.repeat(in_zero[0], layer.depth_multiplier) | kz) & bz & act0]

    def weight_roles(self, layer):
        roles = [{-2: "in"}]
        if layer.use_bias:
            roles.append({0: "out"})
        return roles

    def macs(self, layer, op, graph, n_in, n_out):
        return spatial_size(graph.tensors[op.outputs[0]].shape) * int(np.prod(layer.kernel_size)) * n_out


# --------------------------------------------------------------------------- normalisation
def _last_axis_only(layer, rank) -> bool:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return [a % rank for a in axes] == [rank - 1]


@builtin_handler("BatchNormalization")
class BatchNormHandler(TiedHandler):
    def connect(self, ctx, op):
        rank = len(ctx.shape(op.inputs[0]))
        if not _last_axis_only(op.layer, rank):
            ctx.block_all(op, f"BatchNormalization '{op.layer.name}' normalises axis {op.layer.axis}, "
                             "not the channel axis")
            return
        super().connect(ctx, op)

    def _params(self, layer, weights):
        i = 0
        gamma = beta = None
        if layer.scale:
            gamma = weights[i]
            i += 1
        if layer.center:
            beta = weights[i]
            i += 1
        return gamma, beta, weights[i], weights[i + 1]

    def zero_map(self, layer, weights, op, channels):
        gamma, beta, mean, var = self._params(layer, weights)
        g = np.ones(channels, np.float32) if gamma is None else gamma
        b = np.zeros(channels, np.float32) if beta is None else beta
        inv = (1.0 / np.sqrt(var + np.float32(layer.epsilon))).astype(np.float32) * g
        preserves = (b - mean * inv) == 0
        kills = (g == 0) & (b == 0)
        return preserves, kills

    def weight_roles(self, layer):
        return [{0: "in"} for _ in layer.weights]

    def maskable(self, layer):
        n = int(layer.scale) + int(layer.center)
        return [i < n for i in range(len(layer.weights))]


@builtin_handler("LayerNormalization", "UnitNormalization")
class LayerNormHandler(LayerHandler):
    """Normalises over channels: its input channels all stay; its output channels may go.

    Removing an input channel would change the statistics of the others, so the
    input is kept whole. An *output* channel whose gamma and beta are both zero
    is exactly zero, ``(x - mean) / std * 0 + 0``, whatever the statistics. Such
    channels go from the layers that read them; the normalisation itself keeps
    its full width (Keras' LayerNormalization cannot output fewer channels than
    it reads), and the rebuilt model selects the kept channels right after it
    with a frozen one-hot ``Dense`` without bias, ``<name>_select`` (exact: each
    output is one input times 1 plus zeros). This pays when the readers spend
    more weights per channel than the selection does (a transformer's MLP, the
    ``Flatten -> Dense`` head of a ViT, ConvNeXt's pointwise expansion); when it
    does not, the output channels stay, with that reason.
    """

    kind = "mixing"  # its output channels are a new set that it writes
    claims_outputs = True  # the blocked input does not make its outputs unknown

    def selects_outputs(self, layer):
        return bool(layer.weights) and self._channels_only(layer)

    def connect(self, ctx, op):
        rank = len(ctx.shape(op.inputs[0]))
        axes = getattr(op.layer, "axis", -1)
        axes = {a % rank for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
        if rank - 1 not in axes:
            ctx.tie(op.inputs[0], op.outputs[0])
            return
        reason = f"{type(op.layer).__name__} '{op.layer.name}' normalises over the channel axis"
        layer = op.layer
        writes = (axes == {rank - 1} and len(op.outputs) == 1 and bool(layer.weights)
                  and all(tuple(w.shape) == (ctx.channels(op.outputs[0]),) for w in layer.weights))
        if not writes:
            ctx.block_all(op, reason)
            return
        ctx.block(op.inputs[0], reason, op.path)
        ctx.writes(op, op.outputs[0])

    @staticmethod
    def _channels_only(layer) -> bool:
        """Whether the layer normalises the last (channel) axis and no other: gamma and beta are per channel."""
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        axes = [int(a) for a in axes]
        if axes == [-1]:
            return True
        try:
            rank = len(layer.get_build_config()["input_shape"])
        except Exception:  # noqa: BLE001 - not built: its weights do not exist yet either
            return False
        return {a % rank for a in axes} == {rank - 1}

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        if not self._channels_only(layer):  # normalises another axis: its output is tied to its input
            return [np.zeros(c, bool) for c in out_channels]
        gamma = np.ones(out_channels[0], np.float32)
        beta = np.zeros(out_channels[0], np.float32)
        for w, var in zip(weights, layer.weights):
            name = var.name.split("/")[-1].split(":")[0]
            if name == "gamma":
                gamma = w
            elif name == "beta":
                beta = w
        return [(gamma == 0) & (beta == 0) if weights else np.zeros(out_channels[0], bool)]

    def weight_roles(self, layer):
        return [{0: "out"} if self._channels_only(layer) else {} for _ in layer.weights]

    def update_config(self, layer, config, n_in, n_out):
        return config  # full width (a selection after it drops channels), or another axis normalised

    def slice_weights(self, layer, weights, kept_in, kept_out, internal=None):
        return list(weights)


@builtin_handler("GroupNormalization")
class GroupNormHandler(TiedHandler):
    """GroupNormalization over the channel axis: whole groups go.

    The channels of a group are tied. A group whose inputs are all zero
    normalises to ``(0 - 0) / sqrt(0 + eps) == 0`` and outputs beta; one with
    gamma and beta zero outputs zero whatever its input. Removing a whole
    group leaves the statistics of the others unchanged, and ``groups`` drops
    with it (``groups=-1``, instance norm, makes every channel a group).
    """

    def _group_size(self, layer, channels):
        groups = int(getattr(layer, "groups", 1))
        return 1 if groups in (-1, 0) else max(channels // groups, 1)

    def connect(self, ctx, op):
        rank = len(ctx.shape(op.inputs[0]))
        axis = op.layer.axis if isinstance(op.layer.axis, int) else None
        if axis is None or axis % rank != rank - 1:
            ctx.block_all(op, f"GroupNormalization '{op.layer.name}' normalises axis {op.layer.axis}, "
                             "not the channel axis")
            return
        c = ctx.channels(op.inputs[0])
        size = self._group_size(op.layer, c)
        if size > 1:
            ctx.tie(op.inputs[0], op.inputs[0], (np.arange(c) // size) * size)  # a group's channels together
        super().connect(ctx, op)

    def _params(self, layer, weights, channels):
        i = 0
        gamma = np.ones(channels, np.float32)
        beta = np.zeros(channels, np.float32)
        if layer.scale:
            gamma = weights[i]
            i += 1
        if layer.center:
            beta = weights[i]
        return gamma, beta

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        c = out_channels[0]
        if len(in_zero) != 1 or len(in_zero[0]) != c:
            return [np.zeros(c, bool)]
        gamma, beta = self._params(layer, weights, c)
        size = self._group_size(layer, c)
        group_zero = np.repeat(in_zero[0].reshape(-1, size).all(axis=1), size)
        return [(beta == 0) & (group_zero | (gamma == 0))]

    def weight_roles(self, layer):
        return [{0: "in"} for _ in layer.weights]

    def _channels(self, layer) -> int:
        """The layer's own channel count (its weights', else its built input spec's)."""
        if layer.weights:
            return int(layer.weights[0].shape[0])
        axes = getattr(getattr(layer, "input_spec", None), "axes", None) or {}
        return int(next(iter(axes.values())))

    def update_config(self, layer, config, n_in, n_out):
        config = dict(config)
        if config.get("groups", -1) != -1:
            size = self._group_size(layer, self._channels(layer))
            config["groups"] = int(n_in // size)
        return config


@builtin_handler("PReLU")
class PReLUHandler(TiedHandler):
    def weight_roles(self, layer):
        # alpha's last axis is the channel axis, or 1 when shared over channels.
        return [{-1: "in"}] if layer.weights[0].shape[-1] != 1 else [{}]


# --------------------------------------------------------------------------- pass-through
PASS_THROUGH = [
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "RepeatVector", "Identity", "StochasticDepth",
]


@builtin_handler(*PASS_THROUGH)
class _PassThrough(_ChannelsFirstAware, PassThroughHandler):
    pass


@builtin_handler("ReLU", "LeakyReLU", "ELU", "ThresholdedReLU")
class _ProbedActivation(ProbedPassThroughHandler):
    pass


@builtin_handler("Activation")
class ActivationHandler(ProbedPassThroughHandler):
    def connect(self, ctx, op):
        elementwise, _ = activation_check(op.layer)
        if not elementwise:
            ctx.block_all(op, f"activation of '{op.layer.name}' is not element-wise")
            return
        super().connect(ctx, op)


@builtin_handler("Softmax")
class SoftmaxHandler(ProbedPassThroughHandler):
    def connect(self, ctx, op):
        rank = len(ctx.shape(op.inputs[0]))
        axes = op.layer.axis if isinstance(op.layer.axis, (list, tuple)) else [op.layer.axis]
        if (rank - 1) in [a % rank for a in axes]:
            ctx.block_all(op, f"Softmax '{op.layer.name}' normalises over the channel axis")
            return
        super().connect(ctx, op)


@builtin_handler("Rescaling")
class RescalingHandler(TiedHandler):
    def connect(self, ctx, op):
        if np.ndim(op.layer.scale) or np.ndim(op.layer.offset):
            ctx.block_all(op, f"Rescaling '{op.layer.name}' has per-channel scale or offset")
            return
        super().connect(ctx, op)

    def zero_map(self, layer, weights, op, channels):
        return float(layer.offset) == 0.0, float(layer.scale) == 0.0


# --------------------------------------------------------------------------- merges
@builtin_handler("Add", "Subtract", "Average", "Maximum", "Minimum")
class _SumLike(MergeHandler):
    pass


@builtin_handler("Multiply")
class _Product(MergeHandler):
    product = True


@builtin_handler("Concatenate")
class ConcatenateHandler(LayerHandler):
    kind = "tied"

    def _is_channel_axis(self, ctx, op):
        rank = len(ctx.shape(op.outputs[0]))
        return op.layer.axis % rank == rank - 1

    def connect(self, ctx, op):
        out = op.outputs[0]
        if self._is_channel_axis(ctx, op):
            offset = 0
            for t in op.inputs:
                c = ctx.channels(t)
                ctx.tie_slice(out, offset, t)
                offset += c
        else:
            for t in op.inputs:
                ctx.tie(t, out)

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        if sum(len(z) for z in in_zero) == out_channels[0]:
            return [np.concatenate(in_zero)]
        return [np.logical_and.reduce(in_zero)]


# --------------------------------------------------------------------------- reshapes
def _flatten_map(in_shape, out_channels):
    c = in_shape[-1]
    return np.arange(out_channels) % c


@builtin_handler("Flatten")
class FlattenHandler(LayerHandler):
    """Flatten: output index ``s * C + c`` carries input channel ``c``."""

    kind = "tied"

    def connect(self, ctx, op):
        if not _channels_last(op.layer):
            ctx.block_all(op, f"'{op.layer.name}' uses data_format='channels_first'")
            return
        in_shape = ctx.shape(op.inputs[0])
        c_out = ctx.channels(op.outputs[0])
        if any(d is None for d in in_shape[1:]):
            ctx.block_all(op, f"Flatten '{op.layer.name}' has an input of unknown size {in_shape}")
            return
        ctx.tie(op.inputs[0], op.outputs[0], _flatten_map(in_shape, c_out))

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        return [in_zero[0][np.arange(out_channels[0]) % len(in_zero[0])]]


@builtin_handler("Reshape")
class ReshapeHandler(LayerHandler):
    """Reshape that keeps the channel axis last (as in squeeze-excite), or flattens."""

    kind = "tied"

    def _mode(self, in_shape, out_shape):
        if None in in_shape[1:] or None in out_shape[1:]:
            if in_shape[-1] == out_shape[-1] and in_shape[-1] is not None:
                return "same"
            return None
        if in_shape[-1] == out_shape[-1]:
            return "same"
        if len(out_shape) == 2 and out_shape[-1] == int(np.prod(in_shape[1:])):
            return "flatten"
        if len(in_shape) == 2 and len(out_shape) > 2 and in_shape[-1] == int(np.prod(out_shape[1:])):
            return "unflatten"
        return None

    def connect(self, ctx, op):
        in_shape, out_shape = ctx.shape(op.inputs[0]), ctx.shape(op.outputs[0])
        mode = self._mode(in_shape, out_shape)
        if mode == "same":
            ctx.tie(op.inputs[0], op.outputs[0])
        elif mode == "flatten":
            ctx.tie(op.inputs[0], op.outputs[0], _flatten_map(in_shape, out_shape[-1]))
        elif mode == "unflatten":  # Dense(7*7*64) -> (7, 7, 64): channel c is units {s*64 + c}
            ctx.tie(op.outputs[0], op.inputs[0], _flatten_map(out_shape, in_shape[-1]))
        else:
            ctx.block_all(op, f"Reshape '{op.layer.name}' moves channels between axes "
                             f"({in_shape[1:]} -> {out_shape[1:]})")

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        c_in, c_out = len(in_zero[0]), out_channels[0]
        if c_in > c_out and c_in % c_out == 0:  # unflatten: every spatial copy must be zero
            return [in_zero[0].reshape(-1, c_out).all(axis=0)]
        return [in_zero[0][np.arange(c_out) % c_in]]

    def update_config(self, layer, config, n_in, n_out):
        config = dict(config)
        target = list(config["target_shape"])
        if target[-1] != -1:
            target[-1] = int(n_out)
        config["target_shape"] = tuple(target)
        return config


# --------------------------------------------------------------------------- plain ops
_UNARY = {
    "relu", "relu6", "sigmoid", "tanh", "silu", "gelu", "abs", "elu", "selu", "softplus", "negative", "square",
    "sqrt", "exp", "identity", "leaky_relu", "cast", "clip", "hard_sigmoid", "hard_silu", "mish", "softsign",
}
_SUM = {"add", "subtract", "maximum", "minimum", "divide"}
_PRODUCT = {"multiply"}
_REDUCE = {"mean", "max", "sum", "min"}


def _constants_scalar(op) -> bool:
    for arg in leaves((op.constants, op.options)):
        if arg is None or isinstance(arg, (str, bool)):
            continue
        if np.ndim(arg) != 0:
            return False
    return True


def _op_axis(op, default=None):
    """The ``axis`` argument of an op: an attribute (Keras 3 ops), a keyword or the first constant."""
    axis = getattr(op.layer, "axis", None)
    if axis is None:
        axis = op.options.get("axis")
    if axis is None and op.constants and not isinstance(op.constants[0], (bool, str)):
        axis = op.constants[0]
    return default if axis is None else axis


def _key_keeps_channels(key, rank: int) -> bool:
    """Whether an indexing key leaves the last (channel) axis whole."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is None for k in key):
        return False
    if any(k is Ellipsis for k in key):
        after = key[key.index(Ellipsis) + 1:]
        if not after:
            return True
        last = after[-1]
    elif len(key) < rank:
        return True
    elif len(key) == rank:
        last = key[-1]
    else:
        return False
    return isinstance(last, slice) and last == slice(None)


@builtin_handler("op")
class OpHandler(LayerHandler):
    """Plain operations on Keras tensors, in both flavours.

    Keras 3's ``x + 3``, ``keras.ops.relu(x)``, ``keras.ops.mean(x, axis=(1, 2))``,
    ``x[..., :8]`` and tf_keras' ``TFOpLambda`` (``tf.nn.relu6(x)``,
    ``tf.reduce_mean(x, [1, 2])``) reach this handler with the same canonical
    name in ``op.fn``. Element-wise ops tie channels; sums and products follow
    the merge rules; reductions and indexing that leave the channel axis whole
    tie it; concatenation follows ``Concatenate``. Everything else is blocked.
    """

    kind = "tied"

    def connect(self, ctx, op):
        fn = op.fn
        rank = len(ctx.shape(op.inputs[0])) if op.inputs else 0
        same = len(op.inputs) == 1 and len(op.outputs) == 1 and ctx.channels(op.inputs[0]) == ctx.channels(op.outputs[0])
        if fn in _UNARY and same:
            ctx.tie(op.inputs[0], op.outputs[0])
            return
        if fn in _SUM | _PRODUCT:
            if not _constants_scalar(op):
                ctx.block_all(op, f"'{op.layer.name}' ({fn}) uses a non-scalar constant")
                return
            MergeHandler.connect(self, ctx, op)
            return
        if fn in _REDUCE and same:
            axes = _op_axis(op)
            axes = None if axes is None else [int(a) for a in np.ravel(axes)]
            if axes is not None and (rank - 1) not in [a % rank for a in axes]:
                ctx.tie(op.inputs[0], op.outputs[0])
                return
            ctx.block_all(op, f"'{op.layer.name}' ({fn}) reduces over the channel axis")
            return
        if fn == "get_item" and same and op.constants and _key_keeps_channels(op.constants[0], rank):
            ctx.tie(op.inputs[0], op.outputs[0])
            return
        if fn in ("depth_to_space", "space_to_depth") and len(op.inputs) == 1 and rank == 4:
            if str(op.options.get("data_format", "NHWC")) != "NHWC":
                ctx.block_all(op, f"'{op.layer.name}' ({fn}) is not channels-last")
                return
            c_in, c_out = ctx.channels(op.inputs[0]), ctx.channels(op.outputs[0])
            if fn == "depth_to_space":  # input channel k*C_out + c moves to output channel c
                ctx.tie(op.outputs[0], op.inputs[0], np.arange(c_in) % c_out)
            else:  # output channel k*C_in + c comes from input channel c
                ctx.tie(op.inputs[0], op.outputs[0], np.arange(c_out) % c_in)
            return
        if fn == "concatenate" and len(op.outputs) == 1:
            out_rank = len(ctx.shape(op.outputs[0]))
            if int(_op_axis(op, 0)) % out_rank == out_rank - 1:
                offset = 0
                for t in op.inputs:
                    ctx.tie_slice(op.outputs[0], offset, t)
                    offset += ctx.channels(t)
            else:
                for t in op.inputs:
                    ctx.tie(t, op.outputs[0])
            return
        ctx.block_all(op, f"op '{op.layer.name}' ({fn}) is not known to keep channels apart")

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        fn = op.fn
        c = out_channels[0]
        if fn == "concatenate":
            if sum(len(z) for z in in_zero) == c:
                return [np.concatenate(in_zero)]
            return [np.logical_and.reduce(in_zero)]
        if fn in _REDUCE or fn == "get_item":
            return [in_zero[0]]
        if fn == "depth_to_space":
            return [in_zero[0].reshape(-1, c).all(axis=0)]
        if fn == "space_to_depth":
            return [np.tile(in_zero[0], c // len(in_zero[0]))]
        cache = op.__dict__.setdefault("_probe", {})
        if "zero" not in cache:
            cache["zero"] = probe_zero(op)
        zs = [z if len(z) == c else np.full(c, bool(z.all())) for z in in_zero]
        if fn in _PRODUCT and len(zs) > 1:
            return [np.logical_or.reduce(zs)]
        return [np.logical_and.reduce(zs) & cache["zero"]]


# --------------------------------------------------------------------------- keras.applications extras
@builtin_handler("LayerScale")
class LayerScaleHandler(TiedHandler):
    """ConvNeXt's per-channel scale ``gamma * x``."""

    def zero_map(self, layer, weights, op, channels):
        return True, weights[0] == 0

    def weight_roles(self, layer):
        return [{0: "in"}]

    def update_config(self, layer, config, n_in, n_out):
        return dict(config, projection_dim=int(n_out))


@builtin_handler("CustomScaleLayer")
class CustomScaleHandler(MergeHandler):
    """InceptionResNetV2's residual ``inputs[0] + inputs[1] * scale``: a sum of two tied tensors."""


# --------------------------------------------------------------------------- Embedding
@builtin_handler("Embedding")
class EmbeddingHandler(LayerHandler):
    """Embedding: its output dimensions are channels it writes; its integer input has none."""

    kind = "mixing"
    claims_outputs = True  # the ids are kept, yet what is known of the vectors holds

    def connect(self, ctx, op):
        for t in op.inputs:
            ctx.block(t, f"integer ids read by Embedding '{op.layer.name}'", op.path)
        ctx.writes(op, op.outputs[0])

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        return [(weights[0] == 0).all(axis=0)]

    def weight_roles(self, layer):
        return [{1: "out"}]

    def maskable(self, layer):
        return [True]

    def update_config(self, layer, config, n_in, n_out):
        return dict(config, output_dim=int(n_out))

    def macs(self, layer, op, graph, n_in, n_out):
        return 0


# --------------------------------------------------------------------------- TimeDistributed
class _InnerOp:
    """An op seen as a call of the layer a wrapper holds (same tensors, path and weights)."""

    def __init__(self, op, layer, handler):
        self._op, self.layer, self.handler = op, layer, handler

    def __getattr__(self, name):
        return getattr(self._op, name)


@builtin_handler("TimeDistributed")
class TimeDistributedHandler(LayerHandler):
    """``TimeDistributed`` around a layer with a handler: the inner layer's rules, one more axis."""

    kind = "mixing"  # as its usual contents, Dense and Conv

    def _inner(self, layer):
        from keras_rebuild.handlers.base import get_handler

        inner = getattr(layer, "layer", None)
        handler = get_handler(inner) if inner is not None else None
        return inner, (handler if handler is not None and handler.kind != "blocked" else None)

    def connect(self, ctx, op):
        inner, handler = self._inner(op.layer)
        if handler is None:
            ctx.block_all(op, f"TimeDistributed '{op.layer.name}' wraps {type(inner).__name__}, "
                             "which has no channel handler")
            return
        handler.connect(ctx, _InnerOp(op, inner, handler))

    def _delegate(self, layer, name, *args, default=None):
        inner, handler = self._inner(layer)
        if handler is None:
            return default
        return getattr(handler, name)(inner, *args)

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        inner, handler = self._inner(layer)
        if handler is None:
            return [np.zeros(c, bool) for c in out_channels]
        return handler.forward_zero(inner, weights, _InnerOp(op, inner, handler), in_zero, out_channels)

    def ignored_inputs(self, layer, weights, op):
        inner, handler = self._inner(layer)
        if handler is None:
            return [None for _ in op.inputs]
        return handler.ignored_inputs(inner, weights, _InnerOp(op, inner, handler))

    def weight_roles(self, layer):
        return self._delegate(layer, "weight_roles", default=[{} for _ in layer.weights])

    def maskable(self, layer):
        return self._delegate(layer, "maskable", default=[False for _ in layer.weights])

    def depth_multiplier(self, layer):
        return self._delegate(layer, "depth_multiplier", default=1)

    def update_config(self, layer, config, n_in, n_out):
        inner, handler = self._inner(layer)
        config = dict(config)
        sub = dict(config["layer"])
        sub.pop("build_config", None)
        sub["config"] = handler.update_config(inner, dict(sub["config"]), n_in, n_out)
        config["layer"] = sub
        return config

    def slice_weights(self, layer, weights, kept_in, kept_out):
        return self._delegate(layer, "slice_weights", weights, kept_in, kept_out, default=weights)

    def macs(self, layer, op, graph, n_in, n_out):
        inner, handler = self._inner(layer)
        if handler is None:
            return 0
        return handler.macs(inner, _InnerOp(op, inner, handler), graph, n_in, n_out)


# --------------------------------------------------------------------------- EinsumDense
def _einsum_dense_axes(layer):
    """``(kernel_in_axis, kernel_out_axis)`` when EinsumDense acts as a Dense on the last axis, else None.

    That is the case when the input's last index is contracted with the
    kernel's first, the kernel has exactly two indices, and the output's last
    index is the kernel's second (``"abc,cd->abd"``); the bias, if any, is
    over that output index only.
    """
    try:
        lhs, out = layer.equation.replace(" ", "").split("->")
        x, k = lhs.split(",")
    except (AttributeError, ValueError):
        return None
    if len(k) != 2 or "." in x + k + out:
        return None
    c_in, c_out = k
    if not (x.endswith(c_in) and c_in not in out and out.endswith(c_out) and c_out not in x):
        return None
    bias_axes = getattr(layer, "bias_axes", None)
    if bias_axes not in (None, "", c_out):
        return None
    return 0, 1


@builtin_handler("EinsumDense")
class EinsumDenseHandler(MixingHandler):
    """Keras' ``EinsumDense`` where its equation is a Dense over the channel axis; blocked otherwise."""

    kernel_in_axis = 0
    kernel_out_axis = 1

    def connect(self, ctx, op):
        if _einsum_dense_axes(op.layer) is None:
            ctx.block_all(op, f"EinsumDense '{op.layer.name}' ({op.layer.equation}) does not keep a channel axis")
            for t in op.outputs:
                ctx.writes(op, t)
            return
        super().connect(ctx, op)

    def bias(self, layer, weights):
        return weights[1] if getattr(layer, "bias_axes", None) and len(weights) > 1 else None

    def ignored_inputs(self, layer, weights, op):
        if _einsum_dense_axes(layer) is None:
            return [None for _ in op.inputs]
        return super().ignored_inputs(layer, weights, op)

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        if _einsum_dense_axes(layer) is None:
            return [np.zeros(c, bool) for c in out_channels]
        return super().forward_zero(layer, weights, op, in_zero, out_channels)

    def weight_roles(self, layer):
        if _einsum_dense_axes(layer) is None:
            return [{} for _ in layer.weights]
        roles = [{0: "in", 1: "out"}]
        if getattr(layer, "bias_axes", None):
            roles.append({0: "out"})
        return roles

    def update_config(self, layer, config, n_in, n_out):
        config = dict(config)
        shape = list(config["output_shape"]) if isinstance(config["output_shape"], (list, tuple)) else [config["output_shape"]]
        shape[-1] = int(n_out)
        config["output_shape"] = shape if len(shape) > 1 else shape[0]
        return config

    def macs(self, layer, op, graph, n_in, n_out):
        return spatial_size(graph.tensors[op.outputs[0]].shape) * n_in * n_out


@builtin_handler("Normalization")
class NormalizationHandler(TiedHandler):
    """Preprocessing normalisation: per-channel mean/variance on the last axis."""

    def connect(self, ctx, op):
        cfg = op.layer.get_config()
        axis = cfg.get("axis")
        axis = axis if isinstance(axis, (list, tuple)) else (axis,)
        rank = len(ctx.shape(op.inputs[0]))
        if cfg.get("mean") is not None or tuple(a % rank for a in axis) != (rank - 1,):
            ctx.block_all(op, f"Normalization '{op.layer.name}' has fixed statistics or another axis")
            return
        super().connect(ctx, op)

    def zero_map(self, layer, weights, op, channels):
        if not weights:
            return False, False
        mean = np.asarray(weights[0]).reshape(-1)
        return (mean == 0) if mean.size == channels else False, False

    def weight_roles(self, layer):
        return [{-1: "in"}, {-1: "in"}, {}]

    def maskable(self, layer):
        return [False, False, False]
