"""Recurrent layers: whole units of ``SimpleRNN``, ``GRU`` and ``LSTM``, also inside ``Bidirectional``.

A unit is a channel of the layer's output (and of its states). From a zero
initial state, a unit whose *candidate* pre-activation is always zero keeps a
state of exactly zero:

* SimpleRNN: ``h = act(x W + h U + b)``;
* GRU: ``h = z * h_prev + (1 - z) * act(x Wh + r * (h Uh + b_rh) + b_h)``
  (``reset_after``; ``act(x Wh + (r * h) Uh + b_h)`` otherwise);
* LSTM: ``c = f * c_prev + i * act(x Wc + h Uc + b_c)``, ``h = o * act(c)``,

with ``act(0) == 0`` (tanh, relu, ...). The candidate's input-kernel column,
bias and recurrent-kernel column (on the units that are alive) must be zero;
the other gates do not matter. Removing the unit takes its column out of every
gate block, its row out of the recurrent kernel, and its channel out of every
consumer. The layer reads its own output through the recurrent kernel, so a
unit goes only when it is provably zero (never just because the next layer
ignores it).

Layers called with an explicit initial state, ``stateful`` layers and
``Bidirectional(merge_mode=None)`` keep all their units, with the reason.
"""
from __future__ import annotations

import numpy as np

from keras_rebuild.handlers.base import LayerHandler, Role
from keras_rebuild.handlers.builtin import builtin_handler
from keras_rebuild.handlers.common import MixingHandler, activation_check

# (number of gate blocks, index of the candidate block) in Keras' kernel layout.
_GATES = {"SimpleRNN": (1, 0), "GRU": (3, 2), "LSTM": (4, 2)}


def _gates(layer):
    return _GATES[type(layer).__name__]


def _cell_roles(layer, units_index: np.ndarray):
    """Roles of ``[kernel, recurrent_kernel, bias]`` with unit ``k`` at output channel ``units_index[k]``."""
    g, _ = _gates(layer)
    cols = Role("out", np.tile(units_index, g))
    roles = [{0: "in", 1: cols}, {0: Role("out", units_index), 1: cols}]
    if layer.use_bias:
        roles.append({-1: cols})
    return roles


def dead_units(layer, weights, live_in: np.ndarray) -> np.ndarray:
    """Per unit: its state is provably always zero (from a zero initial state).

    The greatest set of units whose candidate pre-activation reads only zeros:
    zero input-kernel columns on the live inputs, zero bias, and zero
    recurrent-kernel columns on the units outside the set.
    """
    units = int(layer.units)
    _, cand = _gates(layer)
    block = slice(cand * units, (cand + 1) * units)
    kernel, recurrent = weights[0][:, block], weights[1][:, block]
    dead = ~((kernel != 0) & live_in[:, None]).any(axis=0)
    if layer.use_bias:
        bias = np.asarray(weights[2])[..., block]
        dead &= (bias == 0).reshape(-1, units).all(axis=0)
    _, act0 = activation_check(layer)
    if not act0:
        return np.zeros(units, bool)
    reads = recurrent != 0
    while True:
        live = ~dead
        new = dead & ~(reads & live[:, None]).any(axis=0)
        if (new == dead).all():
            return dead
        dead = new


def _time_steps(shape) -> int:
    return int(shape[1]) if len(shape) > 2 and shape[1] is not None else 1


def _cell_macs(layer, steps: int, n_in: int, units: int) -> int:
    g, _ = _gates(layer)
    return steps * (n_in * g * units + units * g * units)


def _blocking_reason(layer, op):
    if len(op.inputs) != 1:
        return f"'{layer.name}' is called with an initial state"
    if getattr(layer, "stateful", False):
        return f"'{layer.name}' is stateful"
    return None


@builtin_handler("SimpleRNN", "GRU", "LSTM")
class RecurrentHandler(MixingHandler):
    """``SimpleRNN``, ``GRU`` (both ``reset_after`` settings) and ``LSTM``: whole units."""

    units_key = "units"

    def connect(self, ctx, op):
        reason = _blocking_reason(op.layer, op)
        if reason:
            ctx.block_all(op, reason)
            for t in op.outputs[:1]:
                ctx.writes(op, t)
            return
        super().connect(ctx, op)
        y = op.outputs[0]
        for state in op.outputs[1:]:  # return_state: h (and c) carry the same units
            ctx.tie(y, state)
        ctx.requires_zero(y)

    def kernel_zero_matrix(self, layer, weights):
        g, _ = _gates(layer)
        k = weights[0] == 0
        return k.reshape(k.shape[0], g, -1).all(axis=1)

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        dead = dead_units(layer, weights, ~in_zero[0])
        return [dead for _ in out_channels]

    def weight_roles(self, layer):
        return _cell_roles(layer, np.arange(int(layer.units)))

    def macs(self, layer, op, graph, n_in, n_out):
        return _cell_macs(layer, _time_steps(graph.tensors[op.inputs[0]].shape), n_in, n_out)


@builtin_handler("Bidirectional")
class BidirectionalHandler(LayerHandler):
    """``Bidirectional`` around a SimpleRNN, GRU or LSTM.

    Unit ``k`` of the forward and of the backward layer are removed together,
    so both keep the same number of units. With ``merge_mode="concat"`` they
    are output channels ``k`` and ``units + k``; with ``"sum"``, ``"ave"`` or
    ``"mul"`` both are channel ``k``, which goes when both units are dead.
    """

    kind = "mixing"

    def _supported(self, layer, op):
        inner = getattr(layer, "forward_layer", None)
        if type(inner).__name__ not in _GATES or type(layer.backward_layer) is not type(inner):
            return f"Bidirectional '{layer.name}' wraps a {type(inner).__name__}, not a SimpleRNN, GRU or LSTM"
        if layer.merge_mode not in ("concat", "sum", "ave", "mul"):
            return f"Bidirectional '{layer.name}' has merge_mode={layer.merge_mode!r}"
        return _blocking_reason(layer, op) or _blocking_reason(inner, op)

    def connect(self, ctx, op):
        layer = op.layer
        reason = self._supported(layer, op)
        if reason:
            ctx.block_all(op, reason)
            ctx.writes(op, op.outputs[0])
            return
        units = int(layer.forward_layer.units)
        y = op.outputs[0]
        ctx.reads(op, op.inputs[0])
        ctx.writes(op, y)
        elementwise, _ = activation_check(layer.forward_layer)
        if not elementwise:
            ctx.block(y, f"the activation of '{layer.name}' couples its units", op.path)
        if layer.merge_mode == "concat":
            ctx.tie(y, y, np.tile(np.arange(units), 2))  # forward unit k with backward unit k
        for state in op.outputs[1:]:
            ctx.tie(y, state, np.arange(units))
        ctx.requires_zero(y)

    def _split(self, layer, weights):
        n = len(layer.forward_layer.weights)
        return weights[:n], weights[n:]

    def _indices(self, layer):
        units = int(layer.forward_layer.units)
        fw = np.arange(units)
        return fw, fw + units if layer.merge_mode == "concat" else fw

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        if self._supported(layer, op):
            return [np.zeros(c, bool) for c in out_channels]
        fw_w, bw_w = self._split(layer, weights)
        live_in = ~in_zero[0]
        dead = dead_units(layer.forward_layer, fw_w, live_in) & dead_units(layer.backward_layer, bw_w, live_in)
        y = np.tile(dead, 2) if layer.merge_mode == "concat" else dead
        return [y] + [dead for _ in out_channels[1:]]

    def ignored_inputs(self, layer, weights, op):
        fw_w, bw_w = self._split(layer, weights)
        return [(fw_w[0] == 0).all(axis=1) & (bw_w[0] == 0).all(axis=1)]

    def weight_roles(self, layer):
        if type(layer.forward_layer).__name__ not in _GATES:
            return [{} for _ in layer.weights]
        fw, bw = self._indices(layer)
        return _cell_roles(layer.forward_layer, fw) + _cell_roles(layer.backward_layer, bw)

    def update_config(self, layer, config, n_in, n_out):
        config = dict(config)
        units = n_out // 2 if layer.merge_mode == "concat" else n_out
        for key in ("layer", "backward_layer"):
            inner = config.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
                inner = dict(inner)
                inner.pop("build_config", None)
                inner["config"] = dict(inner["config"], units=int(units))
                config[key] = inner
        return config

    def macs(self, layer, op, graph, n_in, n_out):
        units = n_out // 2 if layer.merge_mode == "concat" else n_out
        steps = _time_steps(graph.tensors[op.inputs[0]].shape)
        return 2 * _cell_macs(layer.forward_layer, steps, n_in, units)
