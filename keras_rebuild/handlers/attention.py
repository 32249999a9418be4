"""``MultiHeadAttention``: whole heads, and the output projection's channels.

A head whose value projection (kernel slice and bias) is zero attends over
zero vectors, so it adds exactly nothing to the output, whatever the softmax
says; a head whose slice of the output projection is zero is read by nobody.
Either way it goes: out of the query, key and value projections and out of
the output projection, and ``num_heads`` drops by one. Heads are channels
that no tensor carries, so the handler declares them as the layer's internal
``"heads"`` channels; importance criteria score them like any other group,
and pruning masks them during training.

In self-attention (query, key and value are one tensor, ``mha(x, x)``) an
input channel goes when it is zero or when the query, key and value kernels
all ignore it; the output then keeps its width through ``output_shape``. In a
pre-norm transformer that tensor is a LayerNormalization's output, whose
channels go with zero gamma and beta. Cross-attention inputs stay whole. The
output projection writes ordinary channels, which go when they are dead.
"""
from __future__ import annotations

import numpy as np

from keras_rebuild.handlers.base import LayerHandler, Role
from keras_rebuild.handlers.builtin import builtin_handler
from keras_rebuild.handlers.common import spatial_size


def _config(layer) -> dict:
    return layer.get_config()


def _split(layer, weights):
    """``(query, key, value, output)`` as ``(kernel, bias or None)`` pairs."""
    if len(weights) == 8:
        return [(weights[i], weights[i + 1]) for i in range(0, 8, 2)]
    return [(w, None) for w in weights]


@builtin_handler("MultiHeadAttention")
class MultiHeadAttentionHandler(LayerHandler):
    """``MultiHeadAttention`` with its kernels in Keras' layout (query/key/value: ``(d, heads, dim)``)."""

    kind = "mixing"
    claims_outputs = True  # its inputs stay whole, yet what is known of its heads and output holds

    def _supported(self, layer):
        config = _config(layer)
        if len(layer.weights) not in (4, 8):
            return f"MultiHeadAttention '{layer.name}' has {len(layer.weights)} weights, not Keras' 4 or 8"
        shape = config.get("output_shape")
        if shape is not None and not isinstance(shape, int) and len(tuple(shape)) != 1:
            return f"MultiHeadAttention '{layer.name}' projects to output_shape={shape}"
        return None

    def internal_channels(self, layer):
        return {"heads": int(_config(layer)["num_heads"])}

    @staticmethod
    def _self_attention(op) -> bool:
        return len(set(op.inputs)) == 1

    def connect(self, ctx, op):
        layer = op.layer
        if self._self_attention(op):
            ctx.reads(op, op.inputs[0])
        else:
            for t in op.inputs:
                ctx.block(t, f"MultiHeadAttention '{layer.name}' reads its query, key and value whole "
                             "(they are different tensors)", op.path)
        reason = self._supported(layer)
        heads = op.internal["heads"]
        if reason:
            ctx.block_all(op, reason)
            ctx.block(heads, reason, op.path)
            return
        ctx.writes(op, heads)
        ctx.requires_zero(heads)
        ctx.writes(op, op.outputs[0])
        for t in op.outputs[1:]:  # return_attention_scores: (batch, heads, query, key)
            ctx.block(t, f"attention scores of '{layer.name}'", op.path)

    def _dead_heads(self, layer, weights):
        (_, _), (_, _), (vk, vb), (ok, _) = _split(layer, weights)
        heads = vk.shape[1]
        value_zero = (vk == 0).transpose(1, 0, 2).reshape(heads, -1).all(axis=1)
        if vb is not None:
            value_zero &= (vb == 0).reshape(heads, -1).all(axis=1)
        unread = (ok == 0).reshape(heads, -1).all(axis=1)
        return value_zero | unread

    def forward_zero(self, layer, weights, op, in_zero, out_channels):
        n_out = len(op.outputs)
        if self._supported(layer):
            return [np.zeros(c, bool) for c in out_channels] + [np.zeros(op_heads(layer), bool)]
        dead = self._dead_heads(layer, weights)
        (_, _), (_, _), (_, _), (ok, ob) = _split(layer, weights)
        reaches = (ok[~dead] != 0).reshape(-1, ok.shape[-1]).any(axis=0)
        out_zero = ~reaches & (np.ones(ok.shape[-1], bool) if ob is None else ob == 0)
        outs = [out_zero] + [np.zeros(c, bool) for c in out_channels[1:n_out]]
        return outs + [dead]

    def ignored_inputs(self, layer, weights, op):
        """Self-attention: the input channels that the query, key and value kernels all ignore."""
        if self._supported(layer) or not self._self_attention(op):
            return [None for _ in op.inputs]
        kernels = [k for k, _ in _split(layer, weights)[:3]]
        ignored = np.logical_and.reduce([(k == 0).reshape(k.shape[0], -1).all(axis=1) for k in kernels])
        return [ignored for _ in op.inputs]

    def weight_roles(self, layer):
        heads = Role("heads", np.arange(op_heads(layer)))
        with_bias = len(layer.weights) == 8
        roles = []
        widths = [int(layer.weights[i * (1 + with_bias)].shape[0]) for i in range(3)] if layer.weights else [0] * 3
        for i in range(3):  # query, key, value: kernel (d, heads, dim), bias (heads, dim)
            # A key or value of another width is cross-attention, whose inputs stay whole.
            same = widths[i] == widths[0]
            roles.append({0: "in", 1: heads} if same else {1: heads})
            if with_bias:
                roles.append({0: heads})
        roles.append({0: heads, 2: "out"})  # output kernel (heads, dim, out)
        if with_bias:
            roles.append({0: "out"})
        return roles

    def update_config(self, layer, config, n_in, n_out, internal=None):
        config = dict(config)
        if internal and "heads" in internal:
            config["num_heads"] = int(internal["heads"])
        out_dim = int(layer.weights[-1].shape[-1])
        in_dim = int(layer.weights[0].shape[0])
        if n_out != out_dim or n_in != in_dim:  # by default the output takes the query's width
            config["output_shape"] = int(n_out)
        if n_in != in_dim:  # self-attention: tf_keras keeps the shapes it was built with
            for key in ("query_shape", "key_shape", "value_shape"):
                if config.get(key) is not None:
                    config[key] = list(config[key])[:-1] + [int(n_in)]
        return config

    def macs(self, layer, op, graph, n_in, n_out, internal=None):
        (qk, _), (_, _), (vk, _), _ = _split(layer, layer.weights)
        heads, key_dim, value_dim = qk.shape[1], qk.shape[2], vk.shape[2]
        heads = int((internal or {}).get("heads", heads))
        t_q = spatial_size(graph.tensors[op.inputs[0]].shape)
        t_v = spatial_size(graph.tensors[op.inputs[min(1, len(op.inputs) - 1)]].shape)
        d_q, d_v = qk.shape[0], vk.shape[0]
        if d_q == d_v and len(set(op.inputs)) == 1:  # self-attention: one input, which may shrink
            d_q = d_v = n_in
        projections = t_q * d_q * heads * key_dim + t_v * d_v * heads * (key_dim + value_dim)
        attention = t_q * t_v * heads * (key_dim + value_dim)
        return int(projections + attention + t_q * heads * value_dim * n_out)


def op_heads(layer) -> int:
    return int(_config(layer)["num_heads"])
