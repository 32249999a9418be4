"""``compress``: prune a step, recover a little, repeat until a size or speed target is met."""
from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from typing import List, Optional

import numpy as np

from keras_rebuild.backends import flavour_of
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, received
from keras_rebuild.graph import check_model

log = logging.getLogger("keras_rebuild")

METRICS = ("macs", "params", "latency")


@dataclasses.dataclass
class CompressionStep:
    """One prune-and-recover step of :func:`compress`."""

    step: int
    sparsity: float
    params: int
    macs: int
    ratio: float
    val_metrics: dict
    latency_ms: Optional[float]
    seconds: float


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress` did, step by step; ``str(report)`` is a table."""

    metric: str
    target: float
    params_before: int
    macs_before: int
    latency_before_ms: Optional[float]
    val_metrics_before: dict
    steps: List[CompressionStep]

    @property
    def reached(self) -> bool:
        return bool(self.steps) and self.steps[-1].ratio <= self.target

    def __str__(self):
        from keras_rebuild.groups import _table

        names = sorted(self.val_metrics_before)
        head = ("step", "sparsity", "params", "MACs", f"{self.metric} ratio") + tuple(names)
        rows = [head, ("0", "-", f"{self.params_before:,}", f"{self.macs_before:,}", "1.000")
                + tuple(f"{self.val_metrics_before[n]:.4f}" for n in names)]
        for s in self.steps:
            rows.append((str(s.step), f"{s.sparsity:.3f}", f"{s.params:,}", f"{s.macs:,}", f"{s.ratio:.3f}")
                        + tuple(f"{s.val_metrics.get(n, float('nan')):.4f}" for n in names))
        status = "reached" if self.reached else "NOT reached"
        return _table(rows) + f"\n\ntarget {self.metric} ratio {self.target:.3f}: {status}"


def _measure(model, metric, sample):
    """(params, macs, latency_ms or None) of a plain Keras model."""
    from keras_rebuild.groups import Analysis
    from keras_rebuild.rebuild import cost_report

    report = cost_report(Analysis(model))
    latency = None
    if metric == "latency":
        from keras_rebuild.export import benchmark_tflite, export_tflite

        result = export_tflite(model, None, verify=False)
        latency = benchmark_tflite(result.content, num_threads=1, runs=30, warmup=5).median_ms
    return report.params_after, report.macs_after, latency


def _predicted_ratio(analysis, scores, metric, sparsity, select_kwargs, base):
    from keras_rebuild.plan import select_remove
    from keras_rebuild.rebuild import cost_report

    remove = select_remove(analysis, scores, sparsity=sparsity, **select_kwargs)
    rep = cost_report(analysis, remove)
    value = rep.params_after if metric == "params" else rep.macs_after
    return value / base


def _recompile_like(new, old):
    """Compile ``new`` like ``old``: a fresh optimizer of the same config, the same loss and metrics."""
    if flavour_of(old) == "keras3":
        new.compile_from_config(old.get_compile_config())
        return new
    optimizer = old.optimizer.__class__.from_config(old.optimizer.get_config())
    new.compile(optimizer=optimizer, loss=old.loss, metrics=_compiled_metric_names(old))
    return new


def _compiled_metric_names(model):
    metrics = getattr(model, "compiled_metrics", None)
    user = getattr(metrics, "_user_metrics", None) if metrics is not None else None
    return user


def compress(
    model,
    target: float,
    x=None,
    y=None,
    *,
    metric: str = "macs",
    validation_data=None,
    step: float = 0.2,
    max_steps: int = 10,
    recover_epochs: int = 1,
    teacher="model",
    criterion="l1",
    scope: str = "local",
    round_to: int = 1,
    ignore=(),
    verbose: int = 1,
    **fit_kwargs,
):
    """Prune and recover step by step until the model is ``target`` times its original cost.

    Each step prunes a fraction of the remaining channels (at most ``step``,
    less when that would overshoot a MACs or parameter target, predicted
    without building), rebuilds the smaller model, fine-tunes it for
    ``recover_epochs`` with distillation from the original model, and
    measures it. It stops when the target is met or after ``max_steps``.

    Args:
        model: A compiled Keras 3 (any backend) or tf_keras model (not
            modified, never returned). Its loss, metrics and optimizer
            settings are reused for recovery.
        target: The cost ratio to reach, in (0, 1): e.g. ``0.5`` for half the MACs.
        x, y: Training data, as for ``fit``.
        metric: ``"macs"``, ``"params"`` or ``"latency"`` (median LiteRT
            latency of the float32 TFLite export, 1 thread, measured each step;
            needs a model that :func:`keras_rebuild.export_tflite` can export).
        validation_data: Evaluated after every step (the report's accuracy columns).
        step: The largest fraction of the remaining channels pruned per step.
        max_steps: Give up after this many steps (the report says so); at least 1.
        recover_epochs: Fine-tuning epochs per step.
        teacher: ``"model"`` distils from the original model; ``None`` is plain
            fine-tuning; or any model with the same outputs.
        criterion, scope, round_to, ignore: As in :func:`keras_rebuild.prune_channels`.
        verbose: 0 silent, 1 a progress bar over steps.
        **fit_kwargs: Passed to :func:`keras_rebuild.recover` (``batch_size``, ``callbacks``...).

    Returns:
        ``(small_model, report)``: the rebuilt, recovered model (compiled, a
        new model: never ``model`` itself) and a :class:`CompressionReport`.

    Raises:
        InvalidArgumentError: bad ``target``, ``metric``, ``step``, ``max_steps``,
            ``recover_epochs`` or an uncompiled model.
        InvalidArgumentTypeError: a non-numeric ``target``, ``max_steps`` or ``recover_epochs``.

    Example:
        >>> small, report = kr.compress(model, 0.5, x, y, validation_data=(xv, yv))  # doctest: +SKIP
        >>> print(report)                                                           # doctest: +SKIP
    """
    import keras_rebuild as kr
    from keras_rebuild.groups import Analysis
    from keras_rebuild.importance import get_criterion
    from keras_rebuild.plan import make_plan

    check_model(model)
    if metric not in METRICS:
        raise InvalidArgumentError(f"Expected `metric` to be one of {METRICS}. Received: {received('metric', metric)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise InvalidArgumentTypeError(f"Expected `target` to be a number. Received: {received('target', target)}")
    if not 0 < target < 1:
        raise InvalidArgumentError(f"Expected `target` to be a ratio in (0, 1). Received: target={target}")
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise InvalidArgumentTypeError(f"Expected `step` to be a number in (0, 1). Received: {received('step', step)}")
    if not 0 < step < 1:
        raise InvalidArgumentError(f"Expected `step` to be in (0, 1). Received: step={step}")
    for name, value in (("max_steps", max_steps), ("recover_epochs", recover_epochs)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidArgumentTypeError(
                f"Expected `{name}` to be a positive integer. Received: {received(name, value)}")
        if value < 1:
            raise InvalidArgumentError(
                f"Expected `{name}` to be a positive integer: compress returns a new, smaller model "
                f"after at least one step. Received: {received(name, value)}")
    if getattr(model, "optimizer", None) is None or not getattr(model, "loss", None):
        raise InvalidArgumentError(
            f"Expected `model` to be compiled: compress() reuses its loss, metrics and optimizer. "
            f"Call model.compile(...) first. Received: model='{model.name}' (not compiled)"
        )
    teacher_model = model if isinstance(teacher, str) and teacher == "model" else teacher
    params0, macs0, lat0 = _measure(model, metric, None)
    base = {"params": params0, "macs": macs0, "latency": lat0}[metric]
    val0 = _evaluate(model, validation_data)
    report = CompressionReport(metric, float(target), params0, macs0, lat0, val0, [])
    current = model
    crit = get_criterion(criterion)
    progbar = check_model(model).keras.utils.Progbar(max_steps, stateful_metrics=["ratio"] + sorted(val0)) if verbose else None
    select_kwargs = dict(scope=scope, round_to=round_to, ignore=ignore)
    for i in range(1, max_steps + 1):
        t0 = time.perf_counter()
        analysis = Analysis(current)
        sparsity = step
        if metric in ("macs", "params"):
            scores = crit(analysis)
            sparsity = _sparsity_for_target(
                lambda s: _predicted_ratio(analysis, scores, metric, s, select_kwargs, base), target, step)
        if metric not in ("macs", "params"):
            scores = crit(analysis)
        small = kr.rebuild(current, make_plan(analysis, scores, sparsity=sparsity, **select_kwargs))
        if small.count_params() == current.count_params() and i > 1:
            log.warning("compress: step %d removed nothing; stopping", i)
            break
        _recompile_like(small, model)
        if x is not None:
            kr.recover(small, x, y, teacher=teacher_model, epochs=recover_epochs, verbose=0, **fit_kwargs)
        params, macs, lat = _measure(small, metric, None)
        value = {"params": params, "macs": macs, "latency": lat}[metric]
        val = _evaluate(small, validation_data)
        report.steps.append(CompressionStep(i, float(sparsity), params, macs, value / base, val, lat,
                                            time.perf_counter() - t0))
        log.info("compress step %d: sparsity %.3f, %s ratio %.3f, %s", i, sparsity, metric, value / base, val)
        if progbar is not None:
            progbar.update(i, values=[("ratio", value / base)] + sorted(val.items()))
        current = small
        if value / base <= target:
            break
    if progbar is not None and report.steps and report.steps[-1].step < max_steps:
        progbar.update(max_steps, values=[("ratio", report.steps[-1].ratio)] + sorted(report.steps[-1].val_metrics.items()))
    if not report.reached:
        log.warning("compress: target %s ratio %.3f not reached after %d steps", metric, target, len(report.steps))
    return current, report


def _sparsity_for_target(predict, target, step):
    """The sparsity in (0, step] whose predicted ratio lands closest to ``target`` from above-or-at."""
    if predict(step) >= target:
        return step
    lo, hi = 0.0, step
    for _ in range(12):
        mid = (lo + hi) / 2
        if predict(mid) > target:
            lo = mid
        else:
            hi = mid
    return max(hi, 1e-3)


def _evaluate(model, validation_data):
    if validation_data is None:
        return {}
    xv, yv = validation_data[0], validation_data[1]
    values = model.evaluate(xv, yv, verbose=0, return_dict=True)
    return {k: float(v) for k, v in values.items()}
