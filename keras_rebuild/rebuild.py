"""Rebuild a model with physically smaller layers that computes exactly the same function."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from keras_rebuild._compat import keras
from keras_rebuild.graph import all_layers, check_model, is_graph_model
from keras_rebuild.groups import Analysis, _table

log = logging.getLogger("keras_rebuild")


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class LayerReport:
    """Before/after figures of one layer with weights."""

    name: str
    class_name: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclasses.dataclass
class GroupReport:
    """One channel group: how many channels it had, how many stayed, and why."""

    name: str
    channels_before: int
    channels_after: int
    reasons: Tuple[str, ...]


@dataclasses.dataclass
class RebuildReport:
    """What ``rebuild`` removed: per layer and per channel group, with totals.

    ``str(report)`` is a readable table; ``report.plot()`` draws channels kept per layer.
    """

    layers: List[LayerReport]
    groups: List[GroupReport]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def table(self, max_rows: Optional[int] = None) -> str:
        rows = [("layer", "class", "in", "out", "params", "MACs")]
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        for r in shown:
            rows.append((
                r.name, r.class_name, _arrow(r.in_before, r.in_after), _arrow(r.out_before, r.out_after),
                _arrow(r.params_before, r.params_after), _arrow(r.macs_before, r.macs_after),
            ))
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append((f"... {len(self.layers) - max_rows} more layers", "", "", "", "", ""))
        rows.append(("total", "", "", "", _arrow(self.params_before, self.params_after),
                     _arrow(self.macs_before, self.macs_after)))
        text = _table(rows, align=[False, False, True, True, True, True])
        kept = [g for g in self.groups if g.reasons]
        if kept:
            text += "\n\nChannels kept whatever their weights:\n"
            text += "\n".join(f"  {g.name}: {g.channels_after} channels - " + "; ".join(g.reasons[:3])
                              for g in kept)
        text += (f"\n\nparams {self.params_after:,} / {self.params_before:,} ({self.params_ratio:.1%}), "
                 f"MACs {self.macs_after:,} / {self.macs_before:,} ({self.macs_ratio:.1%})")
        return text

    def __str__(self):
        return self.table(max_rows=60)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def plot(self, ax=None, max_layers: int = 60):
        """Bar chart of output channels per layer before and after (needs matplotlib)."""
        import matplotlib.pyplot as plt

        rows = [r for r in self.layers if r.out_before != r.out_after or r.class_name != "BatchNormalization"]
        rows = rows[:max_layers]
        if ax is None:
            _, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 3.5))
        x = np.arange(len(rows))
        ax.bar(x, [r.out_before for r in rows], color="#cccccc", label="before")
        ax.bar(x, [r.out_after for r in rows], color="#1f77b4", label="after")
        ax.set_xticks(x)
        ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=7)
        ax.set_ylabel("output channels")
        ax.set_title(f"Channels kept per layer (params {self.params_ratio:.0%}, MACs {self.macs_ratio:.0%})")
        ax.legend()
        return ax


def _arrow(a, b):
    return f"{a:,}" if a == b else f"{a:,} -> {b:,}"


# ----------------------------------------------------------------------------- rebuild
def rebuild(model, *, return_report: bool = False):
    """Return a new, smaller model without the channels that are provably dead.

    A channel is dead when every parameter that writes it is zero (and every
    layer on its way maps 0 to 0), or when every kernel that reads it ignores
    it. Dead channels are removed from every layer that shares them, following
    BatchNorm, depthwise convs, residual adds, concatenations, Flatten->Dense,
    squeeze-excite gates, nested models and shared layers. The new model
    computes the same function as ``model`` up to float round-off. Channels
    that cannot be removed exactly stay, and the report says why.

    Args:
        model: A tf_keras Functional or Sequential model: a model wrapped by
            :func:`keras_rebuild.prune_channels`, one wrapped by
            ``tfmot.sparsity.keras.prune_low_magnitude`` (wrappers are stripped
            first), or any model with zeroed channels. It is not modified.
        return_report: Also return a :class:`RebuildReport`.

    Returns:
        The rebuilt ``keras.Model`` (layer names kept), or ``(model, report)``.

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        UnsupportedModelError: ``model`` is a subclassed model.
        InvalidWeightsError: a layer holds NaN or Inf weights.

    Example:
        >>> small, report = kr.rebuild(kr.strip_pruning(pruned), return_report=True)  # doctest: +SKIP
        >>> print(report)                                                             # doctest: +SKIP
    """
    check_model(model)
    source = strip_any_wrappers(model)
    analysis = Analysis(source)
    remove = analysis.removable()
    new_model, report = rebuild_from_analysis(analysis, remove)
    log.info("rebuild: params %d -> %d, MACs %d -> %d", report.params_before, report.params_after,
             report.macs_before, report.macs_after)
    return (new_model, report) if return_report else new_model


def strip_any_wrappers(model):
    """Strip keras_rebuild's or tfmot's pruning wrappers (on a copy); else return ``model``."""
    check_model(model)  # NotAModelError/UnsupportedModelError, not AttributeError, for bad input
    layers = all_layers(model)
    names = {type(layer).__name__ for layer in layers}
    if "StructuredPruningWrapper" in names:
        from keras_rebuild.wrappers import strip_pruning

        model = strip_pruning(model)
        names = {type(layer).__name__ for layer in all_layers(model)}
    if "PruneLowMagnitude" in names:
        from keras_rebuild._compat import tfmot

        model = tfmot().sparsity.keras.strip_pruning(model)
    return model



def slice_layers(analysis: Analysis, kept: Dict[int, np.ndarray], build: bool = True):
    """Per layer: the new config and sliced weights for ``kept`` channels, and the cost rows.

    Returns:
        ``(new_configs, new_weights, layer_reports, macs_before, macs_after)``;
        with ``build=False`` only the reports and MACs are computed.
    """
    g = analysis.graph
    new_configs: Dict[str, dict] = {}
    new_weights: Dict[str, List[np.ndarray]] = {}
    layer_reports: List[LayerReport] = []
    macs_before = macs_after = 0
    for path, layer in g.iter_layers():
        ops = [o for o in g.layer_ops.get(path, []) if o.kind == "layer"]
        if not ops:
            continue
        op = ops[0]
        handler = op.handler
        weights = analysis.weights[path]
        in_t = op.inputs[0] if op.inputs else None
        out_t = op.outputs[0] if op.outputs else None
        c_in = g.tensors[in_t].channels if in_t is not None else 0
        c_out = g.tensors[out_t].channels if out_t is not None else 0
        k_in = kept[in_t] if in_t is not None else np.arange(0)
        k_out = kept[out_t] if out_t is not None else np.arange(0)
        changed = len(k_in) != c_in or len(k_out) != c_out
        sliced = weights
        if changed and handler.kind != "blocked":
            if build:
                new_configs[path] = handler.update_config(layer, layer.get_config(), len(k_in), len(k_out))
            sliced = handler.slice_weights(layer, weights, k_in, k_out) if weights else []
        new_weights[path] = sliced
        m_before = sum(handler.macs(layer, o, g, c_in, c_out) for o in ops)
        m_after = sum(handler.macs(layer, o, g, len(k_in), len(k_out)) for o in ops)
        macs_before += m_before
        macs_after += m_after
        if weights:
            layer_reports.append(LayerReport(
                name=path, class_name=type(layer).__name__, in_before=c_in, in_after=len(k_in),
                out_before=c_out, out_after=len(k_out),
                params_before=int(sum(np.size(w) for w in weights)),
                params_after=int(sum(np.size(w) for w in sliced)),
                macs_before=int(m_before), macs_after=int(m_after),
            ))
    return new_configs, new_weights, layer_reports, int(macs_before), int(macs_after)


def cost_report(analysis: Analysis, remove: Optional[np.ndarray] = None) -> RebuildReport:
    """The report ``rebuild`` would give for ``remove`` (default: nothing), without building."""
    if remove is None:
        remove = np.zeros(analysis.num_components, bool)
    _, new_weights, rows, mb, ma = slice_layers(analysis, analysis.kept_indices(remove), build=False)
    return _report(analysis, remove, new_weights, rows, mb, ma)


def _report(analysis, remove, new_weights, rows, macs_before, macs_after) -> RebuildReport:
    params_before = int(sum(np.size(w) for ws in analysis.weights.values() for w in ws))
    params_after = int(sum(np.size(w) for ws in new_weights.values() for w in ws))
    groups = [GroupReport(grp.name, grp.size, int((~remove[grp.components]).sum()), grp.reasons)
              for grp in analysis.groups]
    return RebuildReport(rows, groups, params_before, params_after, int(macs_before), int(macs_after))


def rebuild_from_analysis(analysis: Analysis, remove: np.ndarray):
    """Build the smaller model for a removal decision (``remove``: bool per component)."""
    g = analysis.graph
    kept = analysis.kept_indices(remove)
    new_configs, new_weights, layer_reports, macs_before, macs_after = slice_layers(analysis, kept)
    # Inputs of nested models change shape with the tensors that feed them.
    input_shapes: Dict[str, tuple] = {}
    for path, sub in g.models.items():
        if not path:
            continue
        for kt, in_layer in zip(sub.inputs, sub._input_layers):
            t = g.tensor_id(kt)
            shape = g.tensors[t].shape
            input_shapes[path + "/" + in_layer.name] = tuple(shape[:-1]) + (len(kept[t]),)
    new_model = _build(g.model, new_configs, input_shapes)
    _set_weights(new_model, new_weights, prefix="")
    return new_model, _report(analysis, remove, new_weights, layer_reports, macs_before, macs_after)


def _build(model, new_configs, input_shapes):
    config = copy.deepcopy(model.get_config())
    _edit_config(config, "", new_configs, input_shapes, top=True)
    custom = {}
    for layer in all_layers(model) + [model]:
        cls = type(layer)
        custom[cls.__name__] = cls
        try:
            custom[keras.saving.get_registered_name(cls)] = cls
        except Exception:  # pragma: no cover - defensive
            pass
    # The config is the caller's own in-memory model: a Python `lambda` in a Lambda layer is
    # their code, so Keras' safe mode (meant for loading untrusted files) must not refuse it.
    with keras.utils.custom_object_scope(custom), _unsafe_deserialization():
        if isinstance(model, keras.Sequential):
            return keras.Sequential.from_config(config)
        return keras.Model.from_config(config)


def _unsafe_deserialization():
    scope = getattr(getattr(getattr(keras, "src", None), "saving", None), "serialization_lib", None)
    scope = getattr(scope, "SafeModeScope", None)
    return scope(False) if scope is not None else contextlib.nullcontext()


def _edit_config(config, prefix, new_configs, input_shapes, top=False):
    layers = config.get("layers", [])
    for i, entry in enumerate(layers):
        cfg = entry.get("config", {})
        name = cfg.get("name")
        path = prefix + str(name)
        entry.pop("build_config", None)
        if "layers" in cfg:  # nested model
            _edit_config(cfg, path + "/", new_configs, input_shapes)
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


def _set_weights(model, new_weights, prefix):
    for layer in model.layers:
        path = prefix + layer.name
        if is_graph_model(layer):
            _set_weights(layer, new_weights, path + "/")
            continue
        w = new_weights.get(path)
        if w:
            layer.set_weights(w)
