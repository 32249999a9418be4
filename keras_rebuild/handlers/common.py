"""Handler building blocks: tied (channel-preserving), mixing (kernel) and merge layers."""
from __future__ import annotations

from typing import List

import numpy as np

from keras_rebuild.handlers.base import LayerHandler

# Activations Keras applies element by element (softmax and log_softmax are not), and their value at 0.
ELEMENTWISE_ACTIVATIONS = {
    "linear": True, "relu": True, "relu6": True, "sigmoid": False, "hard_sigmoid": False, "tanh": True,
    "swish": True, "silu": True, "gelu": True, "elu": True, "selu": True, "softplus": False, "softsign": True,
    "exponential": False, "mish": True, "leaky_relu": True, "hard_silu": True, "hard_swish": True,
}


def activation_name(fn) -> str:
    """The name of an activation function (``"linear"`` for ``None``), the same in both flavours."""
    if fn is None:
        return "linear"
    return str(getattr(fn, "__name__", type(fn).__name__))


def activation_check(layer):
    """``(elementwise, maps_zero_to_zero)`` for a layer's ``activation`` attribute."""
    name = activation_name(getattr(layer, "activation", None))
    if name not in ELEMENTWISE_ACTIVATIONS:
        return False, False
    return True, ELEMENTWISE_ACTIVATIONS[name]


def probe_zero(op) -> bool:
    """Call a parameterless layer on all-zero inputs (through its back-end); True if the output is all zero."""
    from keras_rebuild.backends import backend_for

    return backend_for(op.layer, "layer").probe_zero(op)


class TiedHandler(LayerHandler):
    """A layer whose output channel ``c`` comes from input channel ``c // m`` only."""

    kind = "tied"
    zero_preserving = True  # class default; ``zero_map`` may refine per channel

    def connect(self, ctx, op):
        m = self.depth_multiplier(op.layer)
        t_in, t_out = op.inputs[0], op.outputs[0]
        c_in, c_out = ctx.channels(t_in), ctx.channels(t_out)
        if c_in * m != c_out:
            ctx.block_all(op, f"layer '{op.layer.name}' changes the channel count from {c_in} to {c_out}")
            return
        ctx.tie(t_in, t_out, np.arange(c_out) // m)

    def zero_map(self, layer, weights, op, channels):
        """``(preserves, kills)``: channel maps 0 to 0; channel is 0 whatever the input."""
        return self.zero_preserving, False

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        m = self.depth_multiplier(layer)
        if len(in_zero) != 1 or len(in_zero[0]) * m != out_channels[0]:
            return [np.zeros(c, bool) for c in out_channels]
        preserves, kills = self.zero_map(layer, weights, op, out_channels[0])
        z = np.repeat(in_zero[0], m) & preserves
        return [z | kills]


class PassThroughHandler(TiedHandler):
    """Parameterless layers that map zero to zero (pooling, padding, dropout, ...)."""


class ProbedPassThroughHandler(TiedHandler):
    """Parameterless element-wise layers; whether 0 maps to 0 is measured once per call."""

    def zero_map(self, layer, weights, op, channels):
        cache = op.__dict__.setdefault("_probe", {})
        if "zero" not in cache:
            cache["zero"] = probe_zero(op)
        return cache["zero"], False


class MixingHandler(LayerHandler):
    """A layer with a kernel that reads input channels and writes output channels.

    Subclasses set ``kernel_in_axis``/``kernel_out_axis`` and ``units_key``.
    """

    kind = "mixing"
    kernel_in_axis = -2
    kernel_out_axis = -1
    units_key = "filters"

    def connect(self, ctx, op):
        elementwise, _ = activation_check(op.layer)
        for t in op.inputs:
            ctx.reads(op, t)
        for t in op.outputs:
            ctx.writes(op, t)
            if not elementwise:
                ctx.block(t, f"the activation of '{op.layer.name}' couples its output channels "
                             f"({activation_name(op.layer.activation)})", op.path)

    def kernel_zero_matrix(self, layer, weights) -> np.ndarray:
        """``Z[c, o]``: input channel ``c`` never reaches output ``o`` (kernel all zero)."""
        k = weights[0]
        k = np.moveaxis(k, [self.kernel_in_axis % k.ndim, self.kernel_out_axis % k.ndim], [-2, -1])
        z = k == 0
        return z.reshape(-1, z.shape[-2], z.shape[-1]).all(axis=0)

    def bias(self, layer, weights):
        return weights[1] if getattr(layer, "use_bias", False) and len(weights) > 1 else None

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        z = self.kernel_zero_matrix(layer, weights)
        live = ~in_zero[0]
        reaches = (~z & live[:, None]).any(axis=0)
        _, act0 = activation_check(layer)
        b = self.bias(layer, weights)
        bias_zero = np.ones(z.shape[1], bool) if b is None else (b == 0)
        return [(~reaches) & bias_zero & act0]

    def ignored_inputs(self, layer, weights, op):
        return [self.kernel_zero_matrix(layer, weights).all(axis=1)]

    def weight_roles(self, layer):
        roles = [{self.kernel_in_axis: "in", self.kernel_out_axis: "out"}]
        if getattr(layer, "use_bias", False):
            roles.append({0: "out"})
        return roles

    def update_config(self, layer, config, n_in, n_out):
        config = dict(config)
        config[self.units_key] = int(n_out)
        return config


class MergeHandler(LayerHandler):
    """Add/Subtract/Average/Maximum/Minimum/Multiply: inputs share channels with the output."""

    kind = "tied"
    product = False  # Multiply: zero if *any* input is zero

    def connect(self, ctx, op):
        c_out = ctx.channels(op.outputs[0])
        for t in op.inputs:
            c = ctx.channels(t)
            if c == c_out:
                ctx.tie(t, op.outputs[0])
            elif c == 1:
                ctx.block(t, f"broadcast to every channel by '{op.layer.name}'", op.path)
            else:
                ctx.block_all(op, f"'{op.layer.name}' combines tensors of {c} and {c_out} channels")
                return

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        c = out_channels[0]
        zs = [z if len(z) == c else np.full(c, bool(z.all())) for z in in_zero]
        if self.product:
            return [np.logical_or.reduce(zs)]
        return [np.logical_and.reduce(zs)]


def spatial_size(shape) -> int:
    dims = shape[1:-1]
    if any(d is None for d in dims):
        return 1
    return int(np.prod(dims)) if dims else 1
