"""Zero whole channels in place of removing them: the masked twin of a rebuild."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from keras_rebuild.groups import Analysis
from keras_rebuild.handlers import mask_array


def layer_keep_masks(analysis: Analysis, remove: np.ndarray) -> Dict[str, tuple]:
    """Per layer path with weights: ``(keep_in, keep_out)`` boolean channel masks."""
    g = analysis.graph
    keep_elem = ~remove[analysis.labels]
    masks = {}
    for path, layer in g.iter_layers():
        ops = [o for o in g.layer_ops.get(path, []) if o.kind == "layer"]
        if not ops or not analysis.weights.get(path):
            continue
        op = ops[0]
        keep_in = keep_elem[analysis.elements(op.inputs[0])] if op.inputs else None
        keep_out = keep_elem[analysis.elements(op.outputs[0])] if op.outputs else None
        masks[path] = (keep_in, keep_out)
    return masks


def internal_keep_masks(analysis: Analysis, remove: np.ndarray, path: str) -> Dict[str, np.ndarray]:
    """``name -> boolean keep mask`` of one layer's internal channels (attention heads)."""
    op = analysis.graph.first_op(path)
    keep_elem = ~remove[analysis.labels]
    return {name: keep_elem[analysis.elements(t)] for name, t in (op.internal if op is not None else {}).items()}


def masked_weights(analysis: Analysis, remove: np.ndarray) -> Dict[str, List[np.ndarray]]:
    """Per layer path: its weights with the removed channels zeroed (maskable weights only)."""
    out = {}
    for path, (keep_in, keep_out) in layer_keep_masks(analysis, remove).items():
        op = analysis.graph.first_op(path)
        handler, layer = op.handler, op.layer
        if handler.kind == "blocked":
            out[path] = analysis.weights[path]
            continue
        m = handler.depth_multiplier(layer)
        internal = internal_keep_masks(analysis, remove, path)
        out[path] = [
            mask_array(w, roles, keep_in, keep_out, m, internal) if maskable else w
            for w, roles, maskable in zip(analysis.weights[path], handler.weight_roles(layer), handler.maskable(layer))
        ]
    return out


def zero_channels(model, remove: np.ndarray, analysis: Analysis = None):
    """A copy of ``model`` with the channels of the removed components zeroed.

    Args:
        model: The model (not modified).
        remove: Boolean per component of ``analysis``.
        analysis: The model's :class:`Analysis` (computed if omitted).

    Returns:
        A new model of the same architecture.
    """
    analysis = analysis or Analysis(model)
    weights = masked_weights(analysis, remove)
    return analysis.graph.backend.clone_with_weights(model, weights)
