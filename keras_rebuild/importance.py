"""Channel importance criteria: a score per channel of every prunable group.

A criterion is a small object: ``criterion(analysis, weights=None)`` returns
``{group.name: scores}`` for every prunable :class:`~keras_rebuild.groups.ChannelGroup`
of an :class:`~keras_rebuild.groups.Analysis`, one float64 score per channel
(``len(scores) == group.size``, in the group's channel order). Higher means
more important; :func:`keras_rebuild.plan.select_channels` prunes the lowest.

Built-in criteria, selectable by name with :func:`get_criterion`:

* ``"l1"`` / ``"l2"``: magnitude of every parameter slice indexed by the
  channel, across every member layer of the group (kernel output slices,
  biases, BatchNorm gamma/beta, depthwise slices; optionally the input rows of
  the kernels that read the channel).
* ``"bn_scale"``: ``|gamma|`` of the group's BatchNorm layers (network
  slimming); groups without BatchNorm fall back to ``"l1"``.
* ``"activation"``: mean absolute activation on a batch of data.
* ``"apoz"``: ``1 - `` the average percentage of zeros of the activation.
* ``"taylor"``: first-order Taylor estimate of the loss change,
  ``|sum(activation * gradient)|`` per channel, on a batch with labels.
* ``"random"``: a seeded random baseline.

Data-driven criteria (``needs_data = True``) must be given data first with
``criterion.set_data(model, x, y)``.

Which activations are measured: a channel is measured on the tensors that
kernel layers (Dense, Conv, ...) read, i.e. what the next layers see after
BatchNorm and the activation function; where a channel is read by several
kernels (a residual stream) the statistics of all these tensors are pooled.
Limits: only tensors of the top-level model's graph can be measured (a
``keras.Model(model.inputs, tensors)`` is built over them). For channels that
live only inside a nested model (the inner layers of a ``backbone`` called as a
layer), the tensors of the outer graph tied to them (the nested model's inputs
and outputs) are used when there are any; otherwise the group falls back to
the ``"l1"`` score and a warning is logged.

Example:
    >>> import keras_rebuild as kr                                  # doctest: +SKIP
    >>> from keras_rebuild.importance import get_criterion          # doctest: +SKIP
    >>> analysis = kr.analyze(model)                                # doctest: +SKIP
    >>> scores = get_criterion("l1")(analysis)                      # doctest: +SKIP
    >>> taylor = get_criterion("taylor").set_data(model, x, y)      # doctest: +SKIP
    >>> scores = taylor(analysis)                                   # doctest: +SKIP
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, received
from keras_rebuild.groups import Analysis
from keras_rebuild.handlers import resolve_role

log = logging.getLogger("keras_rebuild")

Scores = Dict[str, np.ndarray]


# ----------------------------------------------------------------------------- base
class Criterion:
    """Base class of channel importance criteria.

    Subclasses implement :meth:`component_scores` (a score per component of the
    analysis) or override :meth:`__call__` directly.

    Attributes:
        name: Short name used in logs and by :func:`get_criterion`.
        needs_data: Whether :meth:`set_data` must be called before scoring.

    Example:
        >>> class WidthPrior(Criterion):                       # doctest: +SKIP
        ...     name = "width_prior"
        ...     def __call__(self, analysis, weights=None):
        ...         return {g.name: np.arange(g.size, 0, -1.0)
        ...                 for g in analysis.groups if g.prunable}
    """

    name = "criterion"
    needs_data = False

    def __init__(self):
        self.model = None
        self.x = None
        self.y = None

    def set_data(self, model, x, y=None) -> "Criterion":
        """Give a data-driven criterion the batch to measure on.

        Args:
            model: The model the data is for (its compiled loss is used by
                ``"taylor"`` when no loss was given).
            x: A batch of inputs (numpy array, or list for several inputs).
            y: Labels, needed by ``"taylor"``.

        Returns:
            The criterion itself, so calls can be chained.
        """
        self.model = model
        self.x = x
        self.y = y
        return self

    def component_scores(self, analysis: Analysis, weights: Dict[str, List[np.ndarray]]) -> np.ndarray:
        """A float64 score per component of ``analysis`` (higher is more important)."""
        raise NotImplementedError

    def __call__(self, analysis: Analysis, weights: Optional[Dict[str, List[np.ndarray]]] = None) -> Scores:
        """Score every channel of every prunable group.

        Args:
            analysis: The :class:`~keras_rebuild.groups.Analysis` of the model.
            weights: Optional ``{layer path: [numpy arrays]}`` overriding
                ``analysis.weights`` (e.g. the current weights during training).

        Returns:
            ``{group.name: float64 array of group.size scores}`` for every
            prunable group.
        """
        _check_analysis(analysis)
        merged = _merged_weights(analysis, weights)
        comp = np.asarray(self.component_scores(analysis, merged), np.float64)
        return {g.name: comp[g.components].copy() for g in analysis.groups if g.prunable}

    def __repr__(self):
        return f"{type(self).__name__}()"


def _check_analysis(analysis):
    if not isinstance(analysis, Analysis):
        raise InvalidArgumentTypeError(
            "Expected `analysis` to be a keras_rebuild Analysis (from `kr.analyze(model)`). "
            f"Received: analysis={type(analysis).__name__} object"
        )


def _merged_weights(analysis, weights):
    if weights is None:
        return analysis.weights
    if not isinstance(weights, dict):
        raise InvalidArgumentTypeError(
            "Expected `weights` to be a dict {layer path: [numpy arrays]}. "
            f"Received: weights={type(weights).__name__} object"
        )
    unknown = [p for p in weights if p not in analysis.weights]
    if unknown:
        raise InvalidArgumentError(
            f"Expected `weights` keys to be layer paths of the analysed model; unknown: {unknown[:5]}. "
            f"Received: weights keys={list(weights)[:10]}"
        )
    merged = dict(analysis.weights)
    for path, ws in weights.items():
        ws = [np.asarray(w) for w in ws]
        if len(ws) != len(analysis.weights[path]) or any(
            a.shape != np.shape(b) for a, b in zip(ws, analysis.weights[path])
        ):
            raise InvalidArgumentError(
                f"Expected `weights['{path}']` to have the shapes of layer '{path}' "
                f"{[tuple(np.shape(w)) for w in analysis.weights[path]]}. "
                f"Received: {[tuple(w.shape) for w in ws]}"
            )
        merged[path] = ws
    return merged


def _scatter(analysis, values: np.ndarray, elements: np.ndarray, out: np.ndarray, count: Optional[np.ndarray] = None):
    comps = analysis.labels[elements]
    np.add.at(out, comps, values)
    if count is not None:
        np.add.at(count, comps, 1)


# ----------------------------------------------------------------------------- magnitude
def _slice_reduce(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    """Per index along ``axis``: sum of ``|w|**p`` over every other axis."""
    a = np.abs(np.asarray(w, np.float64))
    if p == 2:
        a = a * a
    a = np.moveaxis(a, axis, 0)
    return a.reshape(a.shape[0], -1).sum(axis=1)


def magnitude_components(analysis: Analysis, weights, p: int = 1, include_readers: bool = False,
                         roles_filter=None) -> np.ndarray:
    """Per component: ``sum |w|**p`` over every maskable parameter slice indexed by it.

    Args:
        analysis: The analysis.
        weights: ``{path: [arrays]}``.
        p: 1 or 2.
        include_readers: Also count the input rows of kernel (mixing) layers.
        roles_filter: Optional predicate ``(path, layer, weight_index) -> bool``.

    Returns:
        A float64 array of ``analysis.num_components`` sums (not yet rooted for p=2).
    """
    g = analysis.graph
    out = np.zeros(analysis.num_components, np.float64)
    for path, layer in g.iter_layers():
        ws = weights.get(path)
        op = g.first_op(path)
        if not ws or op is None or op.kind != "layer" or not op.inputs or not op.outputs:
            continue
        handler = getattr(op, "handler", None)
        if handler is None or handler.kind == "blocked":
            continue
        m = handler.depth_multiplier(layer)
        e_in, e_out = analysis.elements(op.inputs[0]), analysis.elements(op.outputs[0])
        for i, (w, roles, maskable) in enumerate(zip(ws, handler.weight_roles(layer), handler.maskable(layer))):
            if not maskable or (roles_filter is not None and not roles_filter(path, layer, i)):
                continue
            for axis, role in roles.items():
                source, index = resolve_role(role, m, np.shape(w)[axis])
                if source == "in" and handler.kind == "mixing" and not include_readers:
                    continue
                per = _slice_reduce(w, axis, p)
                if source in op.internal:
                    elems = analysis.elements(op.internal[source])
                else:
                    elems = e_out if source == "out" else e_in
                if index is not None:  # position j belongs to channel index[j] (gates, depth multiplier)
                    elems = elems[index] if index.max(initial=-1) < len(elems) else None
                if elems is None or len(elems) != len(per):
                    continue
                _scatter(analysis, per, elems, out)
    return out


class Magnitude(Criterion):
    """L1 or L2 norm of every parameter slice that a channel indexes.

    The norm runs over all member layers of the channel's group: the output
    slices of the kernels writing it, their biases, BatchNorm gamma and beta,
    depthwise kernel slices (several slices per channel with a depth
    multiplier), PReLU alphas... BatchNorm moving statistics are not counted.

    Args:
        p: 1 (L1, sum of absolute values) or 2 (L2, root of the sum of squares).
        include_readers: Also count the input rows of the kernels that read
            the channel (the "in" side of the next Dense/Conv).
    """

    needs_data = False

    def __init__(self, p: int = 1, include_readers: bool = False):
        super().__init__()
        if p not in (1, 2):
            raise InvalidArgumentError(f"Expected `p` to be 1 or 2. Received: {received('p', p)}")
        self.p = p
        self.include_readers = bool(include_readers)
        self.name = f"l{p}"

    def component_scores(self, analysis, weights):
        s = magnitude_components(analysis, weights, self.p, self.include_readers)
        return np.sqrt(s) if self.p == 2 else s

    def __repr__(self):
        return f"Magnitude(p={self.p}, include_readers={self.include_readers})"


class BatchNormScale(Criterion):
    """``|gamma|`` of the BatchNorm layers of a group (network slimming, Liu et al. 2017).

    Several BatchNorm layers on one group (a residual stream) are summed.
    Groups where some channel has no BatchNorm with a scale fall back to the
    ``fallback`` criterion (L1 by default).
    """

    name = "bn_scale"

    def __init__(self, fallback: Optional[Criterion] = None):
        super().__init__()
        self.fallback = fallback or Magnitude(1)

    def component_scores(self, analysis, weights):
        g = analysis.graph
        score = np.zeros(analysis.num_components, np.float64)
        has = np.zeros(analysis.num_components, np.int64)
        for path, layer in g.iter_layers():
            if not g.backend.is_batch_norm(layer) or not getattr(layer, "scale", False):
                continue
            op = g.first_op(path)
            if op is None or op.kind != "layer" or not weights.get(path):
                continue
            gamma = np.abs(np.asarray(weights[path][0], np.float64))
            elems = analysis.elements(op.inputs[0])
            if len(elems) != len(gamma):
                continue
            _scatter(analysis, gamma, elems, score, has)
        fb = None
        for grp in analysis.groups:
            if grp.prunable and not (has[grp.components] > 0).all():
                if fb is None:
                    fb = np.asarray(self.fallback.component_scores(analysis, weights), np.float64)
                score[grp.components] = fb[grp.components]
        return score


class RandomCriterion(Criterion):
    """Uniform random scores: a baseline. The same ``seed`` gives the same scores."""

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def component_scores(self, analysis, weights):
        return np.random.default_rng(self.seed).random(analysis.num_components)


# ----------------------------------------------------------------------------- data-driven
def _top_level_tensors(analysis) -> set:
    """Tensor ids of the model's own graph (a ``keras.Model(inputs, t)`` can reach them)."""
    g = analysis.graph
    ids = set(g.inputs)
    for op in g.ops:
        if "/" in op.path:
            continue
        if op.kind == "layer" or op.kind == "link_out":
            ids.update(op.outputs)
        if op.kind == "link_in":
            ids.update(op.inputs)
    return ids


def _measured_tensors(analysis) -> List[int]:
    """Tensors on which channels are measured: those kernel layers read, plus fallbacks.

    Every component of a prunable group gets at least one top-level tensor when
    one exists: read tensors first, else any top-level tensor holding it.
    """
    top = _top_level_tensors(analysis)
    read = []
    for _, _, t in analysis.read_log:
        if t in top and t not in read and t not in analysis.graph.inputs:
            read.append(t)
    covered = np.zeros(analysis.num_components, bool)
    for t in read:
        covered[analysis.labels[analysis.elements(t)]] = True
    need = np.zeros(analysis.num_components, bool)
    for grp in analysis.groups:
        if grp.prunable:
            need[grp.components] = True
    extra = []
    for t in sorted(top):
        if t in analysis.graph.inputs:
            continue
        comps = analysis.labels[analysis.elements(t)]
        if (need[comps] & ~covered[comps]).any():
            extra.append(t)
            covered[comps] = True
    return read + extra


def _apply_weights(model, analysis, weights):
    """A clone of ``model`` carrying ``weights`` (the user's model is not touched)."""
    return analysis.graph.backend.clone_with_weights(model, weights)


class DataCriterion(Criterion):
    """Base of criteria measured on a batch: subclasses implement :meth:`statistic`.

    Args:
        batch_size: Batch size when running the model over ``x``.
        fallback: Criterion used for groups whose channels cannot be measured
            (see the module notes on nested models). L1 by default.
    """

    needs_data = True
    needs_labels = False

    def __init__(self, batch_size: int = 64, fallback: Optional[Criterion] = None):
        super().__init__()
        self.batch_size = int(batch_size)
        self.fallback = fallback or Magnitude(1)

    # Per tensor: (sum of per-element statistic, count) for each channel; subclasses fill in.
    def statistic(self, values: List[np.ndarray], grads: Optional[List[np.ndarray]]):
        raise NotImplementedError

    def _check_data(self):
        if self.x is None:
            raise InvalidArgumentError(
                f"Expected the '{self.name}' criterion to have data: call "
                f"`criterion.set_data(model, x{', y' if self.needs_labels else ''})` first. Received: x=None"
            )
        if self.needs_labels and self.y is None:
            raise InvalidArgumentError(
                f"Expected labels for the '{self.name}' criterion: call `criterion.set_data(model, x, y)`. "
                "Received: y=None"
            )

    def _model_for(self, analysis, weights):
        model = analysis.model
        if weights is not analysis.weights:
            model = _apply_weights(model, analysis, weights)
            # The clone has the same graph shape: map tensors through a fresh analysis graph.
            from keras_rebuild.graph import Graph

            graph = Graph(model)
            refs = [getattr(t, "_ref", None) for t in graph.tensors]  # internal channels have none
            if len(refs) != len(analysis.graph.tensors):  # pragma: no cover - defensive
                raise InvalidArgumentError("the cloned model's graph differs from the analysed one")
            return model, refs
        return model, [getattr(t, "_ref", None) for t in analysis.graph.tensors]

    def _run(self, analysis, weights, tensors):
        model, refs = self._model_for(analysis, weights)
        backend = analysis.graph.backend
        probe = backend.keras.Model(model.inputs, [refs[t] for t in tensors] + list(model.outputs))
        x = self.x
        n = len(x[0]) if isinstance(x, (list, tuple)) else len(x)
        sums = [np.zeros(analysis.channels(t), np.float64) for t in tensors]
        counts = [0 for _ in tensors]
        for start in range(0, n, max(self.batch_size, 1)):
            sl = slice(start, start + self.batch_size)
            xb = [np.asarray(v)[sl] for v in x] if isinstance(x, (list, tuple)) else np.asarray(x)[sl]
            if self.needs_labels:
                yb = _slice_labels(self.y, sl)
                acts, grads = backend.activations_and_gradients(
                    probe, xb, len(tensors), lambda preds, yb=yb: self._loss(model, yb, preds))
                grads = [np.asarray(gr, np.float64) for gr in grads]
            else:
                outs = probe(xb, training=False)
                acts = outs[: len(tensors)]
                grads = None
            acts = [np.asarray(backend.to_numpy(a), np.float64) for a in acts]
            for k, (s, c) in enumerate(self.statistic(acts, grads)):
                sums[k] += s
                counts[k] += c
        return sums, counts

    def _loss(self, model, y, preds):  # pragma: no cover - overridden by Taylor
        raise NotImplementedError

    def finalize(self, total: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Per component score from the pooled statistic sums and counts."""
        return total / np.maximum(count, 1)

    def component_scores(self, analysis, weights):
        self._check_data()
        tensors = _measured_tensors(analysis)
        total = np.zeros(analysis.num_components, np.float64)
        count = np.zeros(analysis.num_components, np.float64)
        if tensors:
            sums, counts = self._run(analysis, weights, tensors)
            for t, s, c in zip(tensors, sums, counts):
                elems = analysis.elements(t)
                _scatter(analysis, s, elems, total)
                np.add.at(count, analysis.labels[elems], c)
        score = self.finalize(total, count)
        missing = count == 0
        fb = None
        for grp in analysis.groups:
            if grp.prunable and missing[grp.components].any():
                if fb is None:
                    fb = np.asarray(self.fallback.component_scores(analysis, weights), np.float64)
                    log.warning(
                        "Criterion '%s' cannot measure some channels (inside a nested model, or attention "
                        "heads, which no tensor carries); "
                        "their groups are scored by %r instead.", self.name, self.fallback,
                    )
                score[grp.components] = fb[grp.components]
        return score


def _slice_labels(y, sl):
    if isinstance(y, dict):
        return {k: np.asarray(v)[sl] for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return [np.asarray(v)[sl] for v in y]
    return np.asarray(y)[sl]


def _per_channel(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(-1, 1)


class MeanActivation(DataCriterion):
    """Mean absolute activation of each channel over a batch (and spatial positions)."""

    name = "activation"

    def statistic(self, values, grads):
        out = []
        for a in values:
            a = _per_channel(a)
            out.append((np.abs(a).sum(axis=0) / max(a.shape[0], 1), 1))
        return out


class APoZ(DataCriterion):
    """``1 - APoZ``: one minus the average percentage of zeros of each channel (Hu et al. 2016).

    Args:
        tol: Activations with ``|a| <= tol`` count as zeros.
    """

    name = "apoz"

    def __init__(self, tol: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.tol = float(tol)

    def statistic(self, values, grads):
        out = []
        for a in values:
            a = _per_channel(a)
            out.append(((np.abs(a) > self.tol).sum(axis=0) / max(a.shape[0], 1), 1))
        return out


class Taylor(DataCriterion):
    """First-order Taylor importance (Molchanov et al. 2017): ``|sum(a * dL/da)|`` per channel.

    The sum runs over the batch and the spatial positions, so the score is the
    first-order estimate of how much the batch loss changes when the channel
    is zeroed. A channel read at several tensors (a residual stream) sums the
    scores of these tensors.

    Args:
        loss: A loss (name or callable ``loss(y_true, y_pred)``); defaults to
            the compiled loss of the model given to ``set_data`` (or of the
            analysed model).
        batch_size: Batch size for the gradient passes.
    """

    name = "taylor"
    needs_labels = True

    def __init__(self, loss=None, **kwargs):
        super().__init__(**kwargs)
        self.loss = loss

    def _loss_fn(self, model):
        from keras_rebuild.backends import backend_for

        backend = backend_for(model)
        if self.loss is not None:
            return backend.keras.losses.get(self.loss)
        for m in (self.model, model):
            compiled = backend.loss_of(m) if m is not None else None
            if compiled is not None:
                return compiled
        raise InvalidArgumentError(
            "Expected a loss for the 'taylor' criterion: compile the model or pass "
            "`Taylor(loss=...)`. Received: loss=None and an uncompiled model"
        )

    def _loss(self, model, y, preds):
        fn = self._loss_fn(model)
        from keras_rebuild.backends import backend_for

        return backend_for(model).loss_value(fn, y, preds)

    def statistic(self, values, grads):
        out = []
        for a, gr in zip(values, grads):
            prod = _per_channel(a * gr)
            out.append((prod.sum(axis=0), 1))
        return out

    def finalize(self, total, count):
        # Sum over every tensor holding the component, then abs: a first-order loss change.
        return np.abs(total)

    def component_scores(self, analysis, weights):
        self._check_data()
        self._loss_fn(analysis.model)  # fail early without a loss
        return super().component_scores(analysis, weights)


# ----------------------------------------------------------------------------- registry
_BUILTINS = {
    "l1": lambda: Magnitude(1),
    "l2": lambda: Magnitude(2),
    "bn_scale": BatchNormScale,
    "activation": MeanActivation,
    "apoz": APoZ,
    "taylor": Taylor,
    "random": RandomCriterion,
}


def criterion_names() -> List[str]:
    """The names :func:`get_criterion` accepts."""
    return list(_BUILTINS)


def get_criterion(criterion) -> Criterion:
    """A criterion object from a name or an object.

    Args:
        criterion: One of ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"activation"``,
            ``"apoz"``, ``"taylor"``, ``"random"`` (a new object each call), or a
            :class:`Criterion` instance (returned as is).

    Returns:
        A :class:`Criterion`.

    Raises:
        InvalidArgumentError: for an unknown name (the message lists the valid ones).
        InvalidArgumentTypeError: for anything that is not a string or a Criterion.

    Example:
        >>> get_criterion("l1")
        Magnitude(p=1, include_readers=False)
    """
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        return criterion()
    if isinstance(criterion, str):
        key = criterion.strip().lower()
        if key not in _BUILTINS:
            raise InvalidArgumentError(
                f"Expected `criterion` to be one of {criterion_names()} or a Criterion object. "
                f"Received: {received('criterion', criterion)}"
            )
        return _BUILTINS[key]()
    raise InvalidArgumentTypeError(
        f"Expected `criterion` to be a string (one of {criterion_names()}) or a "
        f"keras_rebuild.importance.Criterion. Received: criterion={type(criterion).__name__} object"
    )


__all__ = [
    "Criterion", "Magnitude", "BatchNormScale", "RandomCriterion", "DataCriterion", "MeanActivation",
    "APoZ", "Taylor", "get_criterion", "criterion_names", "magnitude_components",
]
