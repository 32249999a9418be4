"""Choose which channels to prune from importance scores, and keep the choice as a plan.

:func:`select_channels` turns per-group scores (from
:mod:`keras_rebuild.importance`) into a boolean "remove" array over the
components of an :class:`~keras_rebuild.groups.Analysis`, the array that
:func:`keras_rebuild.masks.zero_channels` and the rebuild take. :class:`Plan`
is the same choice as kept channel indices per group name, with a JSON form.

Example:
    >>> import keras_rebuild as kr                                     # doctest: +SKIP
    >>> from keras_rebuild.importance import get_criterion             # doctest: +SKIP
    >>> from keras_rebuild.plan import select_channels, make_plan      # doctest: +SKIP
    >>> analysis = kr.analyze(model)                                   # doctest: +SKIP
    >>> scores = get_criterion("l1")(analysis)                         # doctest: +SKIP
    >>> remove = select_channels(analysis, scores, sparsity=0.5)       # doctest: +SKIP
    >>> plan = make_plan(analysis, scores, sparsity=0.5)               # doctest: +SKIP
    >>> print(plan.summary())                                          # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, received
from keras_rebuild.groups import Analysis, ChannelGroup, _table

SCOPES = ("local", "global")
NORMALIZATIONS = ("mean", "max", "none")


# ----------------------------------------------------------------------------- validation
def _check_sparsity(sparsity):
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= float(sparsity) < 1:
        raise InvalidArgumentError(
            f"Expected `sparsity` to be a float in [0, 1). Received: {received('sparsity', sparsity)}"
        )
    return float(sparsity)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise InvalidArgumentError(
            f"Expected `{name}` to be an integer >= {low}. Received: {received(name, value)}"
        )
    return int(value)


def _check_scores(analysis, scores, groups):
    if not isinstance(scores, dict):
        raise InvalidArgumentTypeError(
            "Expected `scores` to be a dict {group name: per-channel scores} (from a Criterion). "
            f"Received: scores={type(scores).__name__} object"
        )
    out = {}
    missing = [g.name for g in groups if g.name not in scores]
    if missing:
        raise InvalidArgumentError(
            f"Expected `scores` to hold every prunable group; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Received: scores keys={list(scores)[:10]}"
        )
    for g in groups:
        s = np.asarray(scores[g.name], np.float64).reshape(-1)
        if len(s) != g.size:
            raise InvalidArgumentError(
                f"Expected `scores['{g.name}']` to have one score per channel ({g.size}). "
                f"Received: {len(s)} scores"
            )
        if not np.isfinite(s).all():
            raise InvalidArgumentError(
                f"Expected finite scores for group '{g.name}'. Received: "
                f"{int((~np.isfinite(s)).sum())} NaN/Inf scores"
            )
        out[g.name] = s
    return out


def _layer_names(analysis) -> Dict[str, List[str]]:
    """``name or path -> [paths]`` for every layer and nested model of the graph."""
    names: Dict[str, List[str]] = {}
    for path in analysis.graph.layers:
        names.setdefault(path, []).append(path)
        short = path.rsplit("/", 1)[-1]
        if short != path:
            names.setdefault(short, []).append(path)
    return names


def check_ignore(ignore) -> List[str]:
    """``ignore`` as a list of layer names (one name may be given alone).

    Raises:
        InvalidArgumentTypeError: when ``ignore`` is not a name or a list of names.
    """
    if isinstance(ignore, str):
        return [ignore]
    try:
        names = list(ignore or ())
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise InvalidArgumentTypeError(
            f"Expected `ignore` to be a list of layer names or paths. Received: ignore={ignore!r}"
        )
    return names


def ignored_groups(analysis: Analysis, ignore: Iterable[str]) -> set:
    """Names of the groups left whole because a member layer is in ``ignore``.

    ``ignore`` holds layer names or paths; a nested model's name covers every
    layer inside it.

    Raises:
        InvalidArgumentError: for a name that is no layer of the model (the
            message lists close matches).
    """
    ignore = check_ignore(ignore)
    names = _layer_names(analysis)
    paths = set()
    for name in ignore:
        if not isinstance(name, str):
            raise InvalidArgumentTypeError(
                f"Expected `ignore` to hold layer names (strings). Received: ignore={ignore!r}"
            )
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InvalidArgumentError(
                f"Expected `ignore` to name layers of the model; '{name}' is not one.{hint} "
                f"Received: ignore={ignore!r}"
            )
        paths.update(names[name])
    out = set()
    for g in analysis.groups:
        for member in g.members + g.writers:
            if member in paths or any(member.startswith(p + "/") for p in paths):
                out.add(g.name)
                break
    return out


def _normalise(s: np.ndarray, free: np.ndarray, how: str) -> np.ndarray:
    ref = s[free] if free.any() else s
    if how == "none":
        return s
    d = float(np.mean(np.abs(ref))) if how == "mean" else float(np.max(np.abs(ref)))
    return s / d if d > 0 else np.zeros_like(s)


def _max_prunable(g: ChannelGroup, min_channels: int, round_to: int) -> int:
    """The most channels of ``g`` that can go, with the kept count a multiple of ``round_to``."""
    free = int((~g.blocked).sum())
    kept = max(g.size - free, min_channels, 0)
    kept = _round_kept(kept, g.size, round_to)
    return max(g.size - kept, 0)


def _round_kept(kept: int, size: int, round_to: int) -> int:
    return min(int(math.ceil(kept / round_to)) * round_to if kept else 0, size)


def _finalise_count(g: ChannelGroup, n_prune: int, min_channels: int, round_to: int) -> int:
    """Adjust a wished prune count to the blocked channels, ``min_channels`` and ``round_to``."""
    n_prune = min(max(n_prune, 0), _max_prunable(g, min_channels, round_to))
    kept = _round_kept(g.size - n_prune, g.size, round_to)
    return g.size - kept


def _lowest(s: np.ndarray, free: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` lowest-scored free channels (ties: lower index first)."""
    idx = np.flatnonzero(free)
    order = idx[np.argsort(s[idx], kind="stable")]
    return order[:n]


# ----------------------------------------------------------------------------- selection
def select_remove(
    analysis: Analysis,
    scores: Dict[str, np.ndarray],
    *,
    sparsity: Optional[float] = None,
    threshold: Optional[float] = None,
    scope: str = "local",
    round_to: int = 1,
    min_channels: int = 1,
    ignore: Sequence[str] = (),
    normalize: str = "mean",
) -> np.ndarray:
    """Choose the channels to prune, as a boolean array over components (see :func:`select_channels`).

    This is the array form of :func:`select_channels`: the lowest-scored channels of every prunable group.

    Blocked channels (model inputs and outputs, channels of LayerNorm, softmax
    or unknown layers...) are never chosen, nor are groups that are not
    prunable or that hold an ``ignore``\\ d layer.

    Modes (give exactly one of ``sparsity`` and ``threshold``):

    * ``sparsity`` with ``scope="local"``: every group prunes its
      ``floor(sparsity * group.size)`` lowest-scored channels.
    * ``sparsity`` with ``scope="global"``: scores are first normalised per
      group (``normalize``: divided by the mean, default, or the max of the
      group's free channels' absolute scores; ``"none"`` keeps raw scores),
      then all channels of all groups are ranked together and the lowest
      ``floor(sparsity * N)`` go, ``N`` being the number of channels of all
      considered groups (every channel counts one, whatever its cost).
    * ``threshold=k``: a channel goes when its z-score ``(s - mean) / std``
      is below ``-k`` ("more than k standard deviations below the mean").
      With ``scope="local"`` mean and std are the group's (over its free
      channels); with ``scope="global"`` they are those of all channels of
      all groups after the per-group normalisation above. A group with
      ``std == 0`` prunes nothing locally.

    After choosing, every group keeps at least ``min_channels`` channels and a
    kept count that is a multiple of ``round_to`` (rounded up, capped at the
    group size; in global and threshold modes the highest-scored of the chosen
    channels are given back to reach it). Finally no tensor is left without
    channels (see ``Analysis.keep_nonempty``).

    Args:
        analysis: The model's :class:`~keras_rebuild.groups.Analysis`.
        scores: ``{group name: per-channel scores}``, as returned by a
            :class:`~keras_rebuild.importance.Criterion`; higher is more important.
        sparsity: Fraction in [0, 1) of channels to prune.
        threshold: Number ``k >= 0`` of standard deviations (see above).
        scope: ``"local"`` or ``"global"``.
        round_to: Kept channel counts are multiples of this (e.g. 8 or 16 for
            phone kernels).
        min_channels: Every group keeps at least this many channels.
        ignore: Layer names or paths whose groups are left whole.
        normalize: Per-group normalisation for global scope: ``"mean"``,
            ``"max"`` or ``"none"``.

    Returns:
        A boolean numpy array with one entry per component of ``analysis``;
        ``True`` means prune.

    Raises:
        InvalidArgumentError: on a bad argument value, scores that do not fit
            the analysis, or an unknown layer in ``ignore``.
        InvalidArgumentTypeError: on an argument of the wrong type.

    Example:
        >>> remove = select_remove(analysis, scores, sparsity=0.5, round_to=8)   # doctest: +SKIP
        >>> pruned = zero_channels(model, remove, analysis)                      # doctest: +SKIP
    """
    if not isinstance(analysis, Analysis):
        raise InvalidArgumentTypeError(
            "Expected `analysis` to be a keras_rebuild Analysis (from `kr.analyze(model)`). "
            f"Received: analysis={type(analysis).__name__} object"
        )
    if (sparsity is None) == (threshold is None):
        raise InvalidArgumentError(
            "Expected exactly one of `sparsity` and `threshold`. "
            f"Received: sparsity={sparsity!r}, threshold={threshold!r}"
        )
    if sparsity is not None:
        sparsity = _check_sparsity(sparsity)
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
            math.isfinite(threshold) and threshold >= 0
        ):
            raise InvalidArgumentError(
                "Expected `threshold` to be a finite number >= 0 (standard deviations below the mean). "
                f"Received: {received('threshold', threshold)}"
            )
        threshold = float(threshold)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"Expected `scope` to be one of {list(SCOPES)}. Received: {received('scope', scope)}")
    if normalize not in NORMALIZATIONS:
        raise InvalidArgumentError(
            f"Expected `normalize` to be one of {list(NORMALIZATIONS)}. Received: {received('normalize', normalize)}"
        )
    round_to = _check_int("round_to", round_to, 1)
    min_channels = _check_int("min_channels", min_channels, 0)
    skip = ignored_groups(analysis, ignore)
    groups = [g for g in analysis.groups if g.prunable and g.name not in skip]
    _warn_about_whole_groups(groups, round_to, min_channels)
    scores = _check_scores(analysis, scores, groups)

    pruned: Dict[str, np.ndarray] = {}
    if sparsity is not None and scope == "local":
        for g in groups:
            n = _finalise_count(g, int(math.floor(sparsity * g.size + 1e-9)), min_channels, round_to)
            pruned[g.name] = _lowest(scores[g.name], ~g.blocked, n)
    elif sparsity is not None:  # global
        normed = {g.name: _normalise(scores[g.name], ~g.blocked, normalize) for g in groups}
        target = int(math.floor(sparsity * sum(g.size for g in groups) + 1e-9))
        cap = {g.name: _max_prunable(g, min_channels, round_to) for g in groups}
        cand = [(normed[g.name][i], k, i) for k, g in enumerate(groups) for i in np.flatnonzero(~g.blocked)]
        cand.sort(key=lambda c: (c[0], c[1], c[2]))
        chosen: Dict[str, List[int]] = {g.name: [] for g in groups}
        total = 0
        for _, k, i in cand:
            if total >= target:
                break
            name = groups[k].name
            if len(chosen[name]) < cap[name]:
                chosen[name].append(int(i))
                total += 1
        for g in groups:
            pruned[g.name] = _give_back(g, scores[g.name], chosen[g.name], min_channels, round_to)
    else:  # threshold
        if scope == "local":
            z = {}
            for g in groups:
                s, free = scores[g.name], ~g.blocked
                mu, sd = (s[free].mean(), s[free].std()) if free.any() else (0.0, 0.0)
                z[g.name] = (s - mu) / sd if sd > 0 else np.zeros_like(s)
        else:
            normed = {g.name: _normalise(scores[g.name], ~g.blocked, normalize) for g in groups}
            pool = np.concatenate([normed[g.name][~g.blocked] for g in groups]) if groups else np.zeros(0)
            mu, sd = (pool.mean(), pool.std()) if len(pool) else (0.0, 0.0)
            z = {g.name: (normed[g.name] - mu) / sd if sd > 0 else np.zeros(g.size) for g in groups}
        for g in groups:
            chosen = np.flatnonzero((z[g.name] < -threshold) & ~g.blocked)
            cap = _max_prunable(g, min_channels, round_to)
            chosen = chosen[np.argsort(scores[g.name][chosen], kind="stable")][:cap]
            pruned[g.name] = _give_back(g, scores[g.name], list(chosen), min_channels, round_to)

    remove = np.zeros(analysis.num_components, bool)
    for g in groups:
        remove[g.components[pruned[g.name]]] = True
    return analysis.keep_nonempty(remove)


def _warn_about_whole_groups(groups, round_to, min_channels):
    """Warn when ``round_to`` or ``min_channels`` leave whole groups unprunable (silently, otherwise)."""
    import warnings

    whole = [g for g in groups if round_to >= g.size or min_channels >= g.size]
    if whole:
        names = ", ".join(f"'{g.name}' ({g.size} channels)" for g in whole[:5])
        more = f" and {len(whole) - 5} more" if len(whole) > 5 else ""
        warnings.warn(
            f"round_to={round_to} / min_channels={min_channels} keep every channel of {len(whole)} group(s): "
            f"{names}{more}; nothing can be pruned there. Lower them to prune those groups.",
            UserWarning, stacklevel=3)


def _give_back(g, s, chosen, min_channels, round_to) -> np.ndarray:
    """Keep the lowest-scored of ``chosen`` so that the kept count fits the constraints."""
    chosen = np.asarray(chosen, np.int64)
    n = _finalise_count(g, len(chosen), min_channels, round_to)
    return chosen[np.argsort(s[chosen], kind="stable")][:n]


# ----------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Plan:
    """Which channels each group keeps: a portable, reviewable pruning decision.

    Attributes:
        kept: ``{group name: sorted kept channel indices}`` (in the group's
            channel order). Groups not listed keep every channel.
        sizes: ``{group name: channel count}``, checked by :meth:`apply`.
        meta: Free-form information (criterion, sparsity, ...), kept in JSON.

    Example:
        >>> plan = make_plan(analysis, scores, sparsity=0.5)   # doctest: +SKIP
        >>> Plan.from_json(plan.to_json()) == plan             # doctest: +SKIP
        True
        >>> remove = plan.apply(kr.analyze(model))             # doctest: +SKIP
    """

    kept: Dict[str, List[int]]
    sizes: Dict[str, int]
    meta: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """Validate and normalise: kept indices become sorted, unique, in range (the one place they are checked)."""
        if not isinstance(self.kept, dict) or not isinstance(self.sizes, dict):
            raise InvalidArgumentTypeError(
                "Expected `kept` and `sizes` to be dicts keyed by group name. "
                f"Received: kept={type(self.kept).__name__}, sizes={type(self.sizes).__name__}"
            )
        kept = {}
        for name, idx in self.kept.items():
            try:
                arr = np.asarray(idx).reshape(-1)
                ok = arr.size == 0 or np.issubdtype(arr.dtype, np.integer)
            except (TypeError, ValueError):
                ok = False
            size = self.sizes.get(name)
            out_of_range = ok and len(arr) and (arr.min() < 0 or (size is not None and arr.max() >= size))
            if not ok or out_of_range or len(np.unique(arr)) != len(arr):
                raise InvalidArgumentError(
                    f"Expected the kept channels of group '{name}' to be distinct indices (integers) in "
                    f"[0, {size if size is not None else 'size'}). Received: {received('kept', idx)}"
                )
            kept[str(name)] = [int(i) for i in np.sort(arr)]
        self.kept = kept
        self.sizes = {str(k): int(v) for k, v in self.sizes.items()}

    def save(self, path) -> None:
        """Write the plan as JSON to ``path`` (atomically)."""
        import os
        import tempfile

        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json(indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan written by :meth:`save`."""
        with open(path) as f:
            return cls.from_json(f.read())

    @classmethod
    def from_remove(cls, analysis: Analysis, remove: np.ndarray, meta: Optional[dict] = None) -> "Plan":
        """The plan of a boolean remove array over the components of ``analysis``."""
        remove = np.asarray(remove, bool)
        if remove.shape != (analysis.num_components,):
            raise InvalidArgumentError(
                f"Expected `remove` to be a boolean array of {analysis.num_components} components. "
                f"Received: shape {remove.shape}"
            )
        kept, sizes = {}, {}
        for g in analysis.groups:
            if g.prunable:
                kept[g.name] = [int(i) for i in np.flatnonzero(~remove[g.components])]
                sizes[g.name] = int(g.size)
        return cls(kept, sizes, dict(meta or {}))

    def apply(self, analysis: Analysis) -> np.ndarray:
        """The boolean remove array (one entry per component) of this plan on ``analysis``.

        Raises:
            InvalidArgumentError: when a group of the plan is not in the
                analysis, has another size, lists bad indices, or would remove
                a blocked channel.
        """
        by_name = {g.name: g for g in analysis.groups}
        remove = np.zeros(analysis.num_components, bool)
        for name, kept in self.kept.items():
            g = by_name.get(name)
            if g is None:
                close = difflib.get_close_matches(name, list(by_name), n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise InvalidArgumentError(
                    f"Expected the plan's groups to be channel groups of the model (the model's architecture "
                    f"differs at layer '{name}'); '{name}' is not one.{hint} "
                    f"Received: plan groups={list(self.kept)[:10]}"
                )
            size = self.sizes.get(name, g.size)
            if size != g.size:
                raise InvalidArgumentError(
                    f"Expected group '{name}' to have {size} channels as in the plan; the model's has {g.size} "
                    f"(its architecture differs at layer '{name}'). "
                    f"Received: a model whose group '{name}' has {g.size} channels"
                )
            idx = np.asarray(kept, np.int64).reshape(-1)
            if len(idx) and (idx.min() < 0 or idx.max() >= g.size or len(np.unique(idx)) != len(idx)):
                raise InvalidArgumentError(
                    f"Expected the kept channels of group '{name}' to be distinct indices in [0, {g.size}). "
                    f"Received: {received('kept', list(kept))}"
                )
            drop = np.ones(g.size, bool)
            drop[idx] = False
            if (drop & g.blocked).any():
                bad = np.flatnonzero(drop & g.blocked)[:5].tolist()
                raise InvalidArgumentError(
                    f"Expected the plan to keep the blocked channels {bad} of group '{name}' "
                    f"({'; '.join(g.reasons[:2])}). Received: kept={list(kept)[:20]}"
                )
            remove[g.components[drop]] = True
        return remove

    def to_json(self, **kwargs) -> str:
        """The plan as a JSON string (``kwargs`` go to ``json.dumps``)."""
        return json.dumps({"format": "keras_rebuild.plan/1", "kept": self.kept, "sizes": self.sizes,
                           "meta": self.meta}, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan of a JSON string written by :meth:`to_json`."""
        try:
            data = json.loads(text)
            kept = {str(k): [int(i) for i in v] for k, v in data["kept"].items()}
            sizes = {str(k): int(v) for k, v in data["sizes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArgumentError(
                f"Expected a plan JSON written by Plan.to_json(). Received: {received('text', text, 120)} ({e})"
            ) from None
        return cls(kept, sizes, dict(data.get("meta") or {}))

    @property
    def channels_before(self) -> int:
        return int(sum(self.sizes.values()))

    @property
    def channels_after(self) -> int:
        return int(sum(len(v) for v in self.kept.values()))

    def summary(self) -> str:
        """A text table: per group, channels before and after, and the share pruned."""
        rows = [("group", "channels", "kept", "pruned")]
        for name, kept in self.kept.items():
            n = self.sizes.get(name, len(kept))
            rows.append((name, str(n), str(len(kept)), f"{100.0 * (n - len(kept)) / max(n, 1):.1f}%"))
        b, a = self.channels_before, self.channels_after
        rows.append(("total", str(b), str(a), f"{100.0 * (b - a) / max(b, 1):.1f}%"))
        return _table(rows)

    def __str__(self):
        return self.summary()


def make_plan(analysis: Analysis, scores: Dict[str, np.ndarray], **kwargs) -> Plan:
    """:func:`select_remove` as a :class:`Plan` (same arguments).

    Returns:
        The plan; its ``meta`` records the selection arguments.
    """
    remove = select_remove(analysis, scores, **kwargs)
    meta = {k: (list(v) if isinstance(v, (tuple, set)) else v) for k, v in kwargs.items()}
    return Plan.from_remove(analysis, remove, meta)


def select_channels(model, scores: Optional[Dict[str, np.ndarray]] = None, *, criterion="l1", **kwargs) -> Plan:
    """Choose which channels of a model to prune, as a replayable :class:`Plan`.

    The plan holds, per channel group, the sorted indices of the channels that
    stay. Apply it with ``kr.rebuild(model, plan)`` (also to the same
    architecture loaded from a file, in either Keras flavour), save it with
    :meth:`Plan.save` and read it back with :meth:`Plan.load`.

    Args:
        model: A Keras 3 or tf_keras model, or its :class:`~keras_rebuild.Analysis`.
            It is only read.
        scores: ``{group name: per-channel scores}``; computed with
            ``criterion`` when omitted.
        criterion: A criterion name (``"l1"``, ``"l2"``, ``"bn_scale"``, ...) or
            :class:`~keras_rebuild.Criterion`, used when ``scores`` is omitted.
        **kwargs: Selection settings: ``sparsity`` or ``threshold``, ``scope``,
            ``round_to``, ``min_channels``, ``ignore``, ``normalize`` (see
            :func:`select_remove`).

    Returns:
        A :class:`Plan`; its ``meta`` records the criterion and settings.

    Raises:
        NotAModelError: ``model`` is neither a Keras model nor an Analysis.
        InvalidArgumentError: on bad settings (see :func:`select_remove`).

    Example:
        >>> plan = kr.select_channels(model, sparsity=0.5, round_to=8)   # doctest: +SKIP
        >>> plan.save("plan.json")                                       # doctest: +SKIP
        >>> small = kr.rebuild(model, kr.Plan.load("plan.json"))         # doctest: +SKIP
    """
    analysis = model if isinstance(model, Analysis) else _analyze(model)
    if scores is None:
        from keras_rebuild.importance import get_criterion

        crit = get_criterion(criterion)
        scores = crit(analysis)
        kwargs = dict(kwargs, criterion=getattr(crit, "name", str(criterion)))
    plan = make_plan(analysis, scores, **{k: v for k, v in kwargs.items() if k != "criterion"})
    if "criterion" in kwargs:
        plan.meta["criterion"] = kwargs["criterion"]
    return plan


def _analyze(model) -> Analysis:
    from keras_rebuild.rebuild import strip_any_wrappers

    return Analysis(strip_any_wrappers(model))


__all__ = ["select_channels", "select_remove", "make_plan", "Plan", "ignored_groups"]
