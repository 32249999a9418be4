"""Rebuild a model with physically smaller layers that computes exactly the same function."""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from keras_rebuild.backends import config_of
from keras_rebuild.errors import InvalidArgumentTypeError
from keras_rebuild.graph import check_model
from keras_rebuild.groups import Analysis, _table
from keras_rebuild.handlers.common import spatial_size

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
    notes: List[str] = dataclasses.field(default_factory=list)
    dead_beyond_plan: Dict[str, int] = dataclasses.field(default_factory=dict)

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
        if self.dead_beyond_plan:
            text += "\n\nProvably dead channels the plan keeps (rebuild without a plan removes them):\n"
            text += "\n".join(f"  {name}: {n} channels" for name, n in self.dead_beyond_plan.items())
        if self.notes:
            text += "\n\nNotes:\n" + "\n".join(f"  {note}" for note in self.notes)
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
def rebuild(model, plan=None, *, return_report: bool = False):
    """Return a new, smaller model without the pruned or provably dead channels.

    Without a plan, every provably dead channel goes: a channel is dead when
    every parameter that writes it is zero (and every layer on its way maps 0
    to 0), or when every kernel that reads it ignores it. With a
    :class:`~keras_rebuild.Plan`, exactly the plan's channels go, whatever
    their weights (a plan chosen on a trained model replays onto that model
    or its saved file); the report then lists the provably dead channels the
    plan keeps. Channels are removed from every layer that shares them,
    following BatchNorm, depthwise convs, residual adds, concatenations,
    Flatten->Dense, squeeze-excite gates, nested models and shared layers.
    The new model computes the same function as the masked model up to float
    round-off. Channels that cannot be removed exactly stay, and the report
    says why. A LayerNormalization keeps its width (its statistics read every
    channel); its dropped output channels leave through a frozen one-hot
    ``Dense`` named ``<layer>_select`` right after it, counted in the report.

    Args:
        model: A Keras 3 (any backend) or tf_keras Functional or Sequential
            model: a model wrapped by :func:`keras_rebuild.prune_channels`, one
            wrapped by ``tfmot.sparsity.keras.prune_low_magnitude`` (wrappers
            are stripped first), or any model with zeroed channels. It is not
            modified.
        plan: A :class:`~keras_rebuild.Plan` (or its JSON text) to apply.
        return_report: Also return a :class:`RebuildReport`.

    Returns:
        The rebuilt ``keras.Model`` of the same flavour (layer names kept), or
        ``(model, report)``.

    Raises:
        NotAModelError: ``model`` is not a Keras model.
        UnsupportedModelError: ``model`` is a subclassed model.
        InvalidWeightsError: a layer holds NaN or Inf weights.
        InvalidArgumentError: the plan does not fit the model (the message
            names the first mismatching group).

    Example:
        >>> small, report = kr.rebuild(kr.strip_pruning(pruned), return_report=True)  # doctest: +SKIP
        >>> print(report)                                                             # doctest: +SKIP
        >>> plan = kr.select_channels(model, sparsity=0.5)                            # doctest: +SKIP
        >>> small = kr.rebuild(model, plan)                                           # doctest: +SKIP
    """
    backend = check_model(model)
    plan = _check_plan(plan)
    with backend.scope():
        return _rebuild(backend, model, plan, return_report)


def _rebuild(backend, model, plan, return_report):
    source = backend.strip_wrappers(model)
    analysis = Analysis(source)
    dead_beyond = {}
    if plan is None:
        remove = analysis.removable()
    else:
        remove = plan.apply(analysis)
        dead_beyond = _dead_beyond_plan(analysis, remove)
    new_model, report = rebuild_from_analysis(analysis, remove)
    report.dead_beyond_plan = dead_beyond
    log.info("rebuild: params %d -> %d, MACs %d -> %d", report.params_before, report.params_after,
             report.macs_before, report.macs_after)
    return (new_model, report) if return_report else new_model


def _check_plan(plan):
    from keras_rebuild.plan import Plan

    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        return Plan.from_json(plan)
    raise InvalidArgumentTypeError(
        "Expected `plan` to be a keras_rebuild Plan (from `kr.select_channels`) or its JSON text. "
        f"Received: plan={type(plan).__name__} object"
    )


def _dead_beyond_plan(analysis: Analysis, remove: np.ndarray) -> Dict[str, int]:
    """Per group: channels the plan keeps that are provably dead once the plan's channels are zeroed."""
    from keras_rebuild.masks import masked_weights

    masked = Analysis(analysis.model, check_weights=False, weights=masked_weights(analysis, remove))
    if masked.num_components != analysis.num_components:  # pragma: no cover - same graph, same components
        return {}
    dead = masked.removable() & ~remove
    out = {}
    for grp in analysis.groups:
        n = int(dead[grp.components].sum())
        if n:
            out[grp.name] = n
    return out


def strip_any_wrappers(model):
    """Strip keras_rebuild's or tfmot's pruning wrappers (on a copy); else return ``model``."""
    return check_model(model).strip_wrappers(model)


def slice_layers(analysis: Analysis, kept: Dict[int, np.ndarray], build: bool = True):
    """Per layer: the new config and sliced weights for ``kept`` channels, and the cost rows.

    Returns:
        ``(new_configs, new_weights, layer_reports, macs_before, macs_after, selections)``;
        with ``build=False`` only the reports and MACs are computed. ``selections``
        maps a layer path to ``(selection layer name, kept output indices)`` for a
        layer that keeps its width and is followed by a one-hot selection
        (LayerNormalization); the selection's kernel is in ``new_weights``.
    """
    g = analysis.graph
    selections: Dict[str, Tuple[str, np.ndarray]] = {}
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
        internal = {name: kept[t] for name, t in op.internal.items()}
        extra = {}
        if internal:  # attention heads: only handlers that declare them take the argument
            changed = changed or any(len(k) != g.tensors[t].channels
                                     for k, t in zip(internal.values(), op.internal.values()))
            extra = {"internal": internal}
        sliced = weights
        if changed and handler.kind != "blocked":
            if build:
                sizes = {"internal": {n: len(k) for n, k in internal.items()}} if internal else {}
                new_configs[path] = handler.update_config(layer, config_of(layer, path), len(k_in), len(k_out),
                                                          **sizes)
            sliced = handler.slice_weights(layer, weights, k_in, k_out, **extra) if weights else []
        new_weights[path] = sliced
        if internal:
            sizes_before = {"internal": {n: g.tensors[t].channels for n, t in op.internal.items()}}
            sizes_after = {"internal": {n: len(k) for n, k in internal.items()}}
        else:
            sizes_before = sizes_after = {}
        m_before = sum(handler.macs(layer, o, g, c_in, c_out, **sizes_before) for o in ops)
        m_after = sum(handler.macs(layer, o, g, len(k_in), len(k_out), **sizes_after) for o in ops)
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
        if len(k_out) < c_out and handler.selects_outputs(layer):
            name = _free_name(g, path, layer.name + "_select")
            selections[path] = (name, k_out)
            sel_path = path[: len(path) - len(layer.name)] + name
            kernel = np.zeros((c_out, len(k_out)), np.asarray(weights[0]).dtype if weights else np.float32)
            kernel[k_out, np.arange(len(k_out))] = 1
            new_weights[sel_path] = [kernel]
            sel_macs = sum(spatial_size(g.tensors[o.outputs[0]].shape) for o in ops) * c_out * len(k_out)
            macs_after += sel_macs
            layer_reports.append(LayerReport(
                name=sel_path, class_name="Dense", in_before=0, in_after=c_out, out_before=0,
                out_after=len(k_out), params_before=0, params_after=int(kernel.size),
                macs_before=0, macs_after=int(sel_macs),
            ))
    return new_configs, new_weights, layer_reports, int(macs_before), int(macs_after), selections


def _free_name(graph, path, name):
    """``name``, or ``name_1``, ``name_2``... whichever no layer next to ``path`` already has."""
    prefix = path[: path.rfind("/") + 1]
    taken = {p[len(prefix):] for p in graph.layers if p.startswith(prefix)}
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def cost_report(analysis: Analysis, remove: Optional[np.ndarray] = None) -> RebuildReport:
    """The report ``rebuild`` would give for ``remove`` (default: nothing), without building."""
    if remove is None:
        remove = np.zeros(analysis.num_components, bool)
    _, new_weights, rows, mb, ma, _ = slice_layers(analysis, analysis.kept_indices(remove), build=False)
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
    new_configs, new_weights, layer_reports, macs_before, macs_after, selections = slice_layers(analysis, kept)
    # Inputs of nested models change shape with the tensors that feed them.
    input_shapes: Dict[str, tuple] = {}
    for path, sub in g.models.items():
        if not path:
            continue
        for kt, name in g.backend.nested_inputs(sub):
            t = g.tensor_id(kt)
            shape = g.tensors[t].shape
            input_shapes[path + "/" + name] = tuple(shape[:-1]) + (len(kept[t]),)
    new_model, notes = g.backend.build(g.model, new_configs, input_shapes, new_weights, selections)
    report = _report(analysis, remove, new_weights, layer_reports, macs_before, macs_after)
    report.notes = list(notes)
    return new_model, report
