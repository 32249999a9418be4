"""Pruning schedules: tfmot's ``ConstantSparsity`` and ``PolynomialDecay`` in pure Python.

A schedule answers, for a training step, whether the masks are updated at that
step and to which sparsity::

    should_prune, sparsity = schedule(step)

These classes take tensorflow-model-optimization's exact arguments, config keys
(``get_config()`` / ``from_config()``) and semantics, so a tfmot schedule can be
replaced by ours by changing the import. They need no TensorFlow: ``schedule(step)``
is plain Python arithmetic on ints and floats, cheap enough to ask at every batch.
For keras_rebuild the sparsity is the fraction of *channels* pruned (tfmot: of
weights).

tfmot schedule objects are still accepted wherever a schedule is: :func:`get`
reads them through their config (``ConstantSparsity`` and ``PolynomialDecay``
become ours). Other schedule objects (your own ``PruningSchedule`` subclass) are
called as they are.

Example:
    >>> from keras_rebuild.schedules import PolynomialDecay
    >>> s = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=100, frequency=10)
    >>> s(0)
    (True, 0.0)
    >>> s(5)[0], round(s(50)[1], 4), s(100)
    (False, 0.4375, (True, 0.5))
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, received

__all__ = ["PruningSchedule", "ConstantSparsity", "PolynomialDecay", "get", "serialize", "deserialize"]


def _check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentTypeError(f"Expected `{name}` to be an integer. Received: {received(name, value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"Expected `{name}` to be >= {minimum}. Received: {received(name, value)}")
    return value


def _check_sparsity(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentTypeError(f"Expected `{name}` to be a float in [0, 1). Received: {received(name, value)}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise InvalidArgumentError(
            f"Expected `{name}` to be in [0, 1) (a sparsity of 1 would prune every channel). "
            f"Received: {received(name, value)}"
        )
    return value


def _as_step(step) -> int:
    """An int from a Python/numpy int or a scalar tensor (anything with ``__index__`` or ``numpy()``)."""
    if isinstance(step, numbers.Integral):
        return int(step)
    numpy = getattr(step, "numpy", None)
    if callable(numpy):
        step = numpy()
    try:
        return int(step)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentTypeError(
            f"Expected `step` to be an integer training step. Received: {received('step', step)}") from exc


class PruningSchedule:
    """Base class: when to update the masks, and to which sparsity.

    Subclasses implement :meth:`sparsity` and :meth:`get_config`; the
    ``begin_step``, ``end_step`` and ``frequency`` attributes define the pruning
    steps exactly as tfmot's ``PruningSchedule._should_prune_in_step`` does:
    ``begin_step <= step``, ``step <= end_step`` unless ``end_step < 0``, and
    ``(step - begin_step) % frequency == 0``.
    """

    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def should_prune(self, step) -> bool:
        """Whether the masks are updated at ``step`` (tfmot's ``_should_prune_in_step``)."""
        step = _as_step(step)
        in_range = step >= self.begin_step and (step <= self.end_step or self.end_step < 0)
        return in_range and (step - self.begin_step) % self.frequency == 0

    def sparsity(self, step) -> float:  # pragma: no cover - abstract
        """The target fraction of channels pruned at ``step``."""
        raise NotImplementedError

    @property
    def final_step(self) -> Optional[int]:
        """The last step at which the masks are updated, or ``None`` if pruning never ends."""
        if self.end_step < 0:
            return None
        return self.end_step - (self.end_step - self.begin_step) % self.frequency

    @property
    def target(self) -> float:
        """The sparsity the schedule ends at."""
        raise NotImplementedError  # pragma: no cover - abstract

    def next_pruning_step(self, step) -> Optional[int]:
        """The first step ``>= step`` at which :meth:`should_prune` is true, or ``None``."""
        step = _as_step(step)
        if step <= self.begin_step:
            nxt = self.begin_step
        else:
            nxt = self.begin_step + -(-(step - self.begin_step) // self.frequency) * self.frequency
        if self.end_step >= 0 and nxt > self.end_step:
            return None
        return nxt

    def __call__(self, step) -> Tuple[bool, float]:
        """``(should_prune, sparsity)`` at ``step``, as tfmot's schedules return them."""
        step = _as_step(step)
        return self.should_prune(step), self.sparsity(step)

    def get_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict):
        """Instantiate from the ``"config"`` part of :meth:`get_config` (as tfmot does)."""
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config()["config"].items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config()["config"].items())
        return f"{type(self).__name__}({args})"

    def _validate_steps(self, allow_negative_1: bool):
        self.begin_step = _check_int("begin_step", self.begin_step, 0)
        self.end_step = _check_int("end_step", self.end_step)
        self.frequency = _check_int("frequency", self.frequency, 1)
        if self.end_step == -1 and not allow_negative_1:
            raise InvalidArgumentError(
                f"Expected `end_step` >= `begin_step` for {type(self).__name__}: the sparsity needs an end step to "
                f"decay to. Received: end_step=-1"
            )
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise InvalidArgumentError(
                "Expected `end_step` to be -1 (prune until training ends) or >= `begin_step`. "
                f"Received: begin_step={self.begin_step}, end_step={self.end_step}"
            )


class ConstantSparsity(PruningSchedule):
    """The same sparsity at every pruning step (tfmot's ``ConstantSparsity``).

    Masks are updated to ``target_sparsity`` at ``begin_step`` and then every
    ``frequency`` steps until ``end_step`` (``-1``: until training ends).

    Args:
        target_sparsity: Fraction of channels to prune, in [0, 1).
        begin_step: First pruning step (>= 0).
        end_step: Last step at which pruning may happen; ``-1`` (the default)
            prunes until training ends.
        frequency: Update the masks every ``frequency`` steps (>= 1).

    Raises:
        InvalidArgumentError: A sparsity outside [0, 1), a negative
            ``begin_step``, ``end_step < begin_step`` (other than -1) or
            ``frequency < 1``.

    Example:
        >>> s = ConstantSparsity(0.5, begin_step=10, frequency=5)
        >>> [s(step) for step in (9, 10, 12, 15)]
        [(False, 0.5), (True, 0.5), (False, 0.5), (True, 0.5)]
    """

    def __init__(self, target_sparsity: float, begin_step: int, end_step: int = -1, frequency: int = 100):
        self.target_sparsity = _check_sparsity("target_sparsity", target_sparsity)
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self._validate_steps(allow_negative_1=True)

    @property
    def target(self) -> float:
        return self.target_sparsity

    def sparsity(self, step) -> float:
        return self.target_sparsity

    def get_config(self) -> dict:
        return {
            "class_name": type(self).__name__,
            "config": {
                "target_sparsity": self.target_sparsity,
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "frequency": self.frequency,
            },
        }


class PolynomialDecay(PruningSchedule):
    """Sparsity rising from ``initial_sparsity`` to ``final_sparsity`` (tfmot's ``PolynomialDecay``).

    At step ``t`` the sparsity is::

        p = clip((t - begin_step) / (end_step - begin_step), 0, 1)
        final_sparsity + (initial_sparsity - final_sparsity) * (1 - p) ** power

    and the masks are updated at ``begin_step`` and every ``frequency`` steps
    up to ``end_step``. The sparsity grows fast at first and flattens out
    near ``final_sparsity`` (Zhu and Gupta, 2017). One deliberate difference
    from tfmot: with ``begin_step == end_step``, tfmot returns NaN at that
    step (0 / 0); ours returns ``final_sparsity``.

    Args:
        initial_sparsity: Sparsity at ``begin_step``, in [0, 1).
        final_sparsity: Sparsity from ``end_step`` on, in [0, 1).
        begin_step: First pruning step (>= 0).
        end_step: Last pruning step (>= ``begin_step``; -1 is not allowed).
        power: Exponent of the decay (3 by default).
        frequency: Update the masks every ``frequency`` steps (>= 1).

    Raises:
        InvalidArgumentError: Sparsities outside [0, 1), a negative
            ``begin_step``, ``end_step < begin_step`` or ``frequency < 1``.

    Example:
        >>> s = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100, power=1, frequency=50)
        >>> [s(step) for step in (0, 50, 100, 150)]
        [(True, 0.0), (True, 0.4), (True, 0.8), (False, 0.8)]
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: float = 3, frequency: int = 100):
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        self.final_sparsity = _check_sparsity("final_sparsity", final_sparsity)
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not math.isfinite(power):
            raise InvalidArgumentTypeError(f"Expected `power` to be a finite number. Received: {received('power', power)}")
        self.power = power
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self._validate_steps(allow_negative_1=False)

    @property
    def target(self) -> float:
        return self.final_sparsity

    def sparsity(self, step) -> float:
        step = _as_step(step)
        span = self.end_step - self.begin_step
        if span == 0:
            p = 1.0 if step >= self.begin_step else 0.0
        else:
            p = min(1.0, max(0.0, (step - self.begin_step) / span))
        return (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power + self.final_sparsity

    def get_config(self) -> dict:
        return {
            "class_name": type(self).__name__,
            "config": {
                "initial_sparsity": self.initial_sparsity,
                "final_sparsity": self.final_sparsity,
                "power": self.power,
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "frequency": self.frequency,
            },
        }


_BUILTIN = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}


def _is_tfmot_schedule(obj) -> bool:
    cls = type(obj)
    return cls.__module__.startswith("tensorflow_model_optimization.") and cls.__name__ in _BUILTIN


def serialize(schedule) -> dict:
    """``{"class_name": ..., "config": {...}}`` of a schedule (ours, tfmot's, or one with ``get_config``)."""
    config = schedule.get_config()
    if not (isinstance(config, dict) and "class_name" in config and "config" in config):
        config = {"class_name": type(schedule).__name__, "config": config}
    return config


def deserialize(config: dict, custom_objects: Optional[dict] = None):
    """A schedule from :func:`serialize`'s output; ``ConstantSparsity``/``PolynomialDecay`` become ours.

    Args:
        config: ``{"class_name": name, "config": {...}}``.
        custom_objects: ``{name: class}`` for your own schedule classes.

    Returns:
        The schedule, or ``None`` when ``class_name`` is not known (neither
        built in nor in ``custom_objects``).
    """
    name = config.get("class_name")
    cls = (custom_objects or {}).get(name) or _BUILTIN.get(name)
    if cls is None:
        return None
    inner = config.get("config", {})
    return cls.from_config(inner) if hasattr(cls, "from_config") else cls(**inner)


def get(schedule):
    """Our schedule for ``schedule``: ours as is, tfmot's converted through its config.

    tfmot's ``ConstantSparsity`` and ``PolynomialDecay`` (the exact classes)
    become :class:`ConstantSparsity` and :class:`PolynomialDecay`, so no
    TensorFlow op runs when the schedule is asked. Any other callable (e.g.
    your own tfmot ``PruningSchedule`` subclass) is returned unchanged.

    Raises:
        InvalidArgumentTypeError: ``schedule`` is not callable.
        InvalidArgumentError: a tfmot schedule whose config is invalid here
            (for instance a sparsity of 1 set on the object after creation).
    """
    if isinstance(schedule, PruningSchedule):
        return schedule
    if _is_tfmot_schedule(schedule):
        return deserialize(serialize(schedule))
    if not callable(schedule):
        raise InvalidArgumentTypeError(
            "Expected `pruning_schedule` to be a schedule, like `keras_rebuild.PolynomialDecay(...)` or a tfmot "
            f"PruningSchedule (callable as `schedule(step) -> (should_prune, sparsity)`). "
            f"Received: {received('pruning_schedule', schedule)}"
        )
    return schedule
