"""Our pure-Python pruning schedules against tfmot's, step by step."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_rebuild import schedules
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError
from keras_rebuild.schedules import ConstantSparsity, PolynomialDecay

STEPS = np.arange(0, 90)


@pytest.fixture(scope="module")
def tfmot_sparsity():
    from keras_rebuild._compat import tfmot

    return tfmot().sparsity.keras


def tfmot_at_every_step(schedule):
    """tfmot's ``(should_prune, sparsity)`` for every step of STEPS, in one vectorised call."""
    import tensorflow as tf

    should, sparsity = schedule(tf.constant(STEPS, tf.int64))
    should = np.broadcast_to(np.asarray(should), STEPS.shape)
    sparsity = np.broadcast_to(np.asarray(sparsity, np.float64), STEPS.shape)
    return should, sparsity


def ours_at_every_step(schedule):
    pairs = [schedule(int(s)) for s in STEPS]
    assert all(type(p[0]) is bool and type(p[1]) is float for p in pairs)
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


CONSTANT_GRID = list(itertools.product(
    [0.0, 0.3, 0.75],          # target_sparsity
    [0, 3, 10],                # begin_step
    [-1, 0, 10, 11, 40],       # end_step (offset from begin unless -1)
    [1, 2, 7, 100],            # frequency
))


@pytest.mark.parametrize("target,begin,end,frequency", CONSTANT_GRID)
def test_constant_sparsity_matches_tfmot_at_every_step(tfmot_sparsity, target, begin, end, frequency):
    end = end if end < 0 else begin + end
    theirs = tfmot_sparsity.ConstantSparsity(target, begin, end_step=end, frequency=frequency)
    ours = ConstantSparsity(target, begin, end_step=end, frequency=frequency)
    t_should, t_sparsity = tfmot_at_every_step(theirs)
    o_should, o_sparsity = ours_at_every_step(ours)
    np.testing.assert_array_equal(o_should, t_should)
    np.testing.assert_allclose(o_sparsity, t_sparsity, rtol=1e-6, atol=1e-7)
    assert ours.get_config() == theirs.get_config()


POLY_GRID = list(itertools.product(
    [(0.0, 0.5), (0.2, 0.9), (0.6, 0.1)],   # (initial, final); decreasing sparsity too
    [0, 5],                                  # begin_step
    [1, 8, 60],                              # end_step - begin_step
    [1, 3, 100],                             # frequency
    [3, 1, 2.5, 0.5],                        # power
))


@pytest.mark.parametrize("sparsities,begin,span,frequency,power", POLY_GRID)
def test_polynomial_decay_matches_tfmot_at_every_step(tfmot_sparsity, sparsities, begin, span, frequency, power):
    initial, final = sparsities
    kwargs = dict(begin_step=begin, end_step=begin + span, power=power, frequency=frequency)
    theirs = tfmot_sparsity.PolynomialDecay(initial, final, **kwargs)
    ours = PolynomialDecay(initial, final, **kwargs)
    t_should, t_sparsity = tfmot_at_every_step(theirs)
    o_should, o_sparsity = ours_at_every_step(ours)
    np.testing.assert_array_equal(o_should, t_should)
    np.testing.assert_allclose(o_sparsity, t_sparsity, rtol=2e-6, atol=1e-6)  # tfmot computes in float32
    assert ours.get_config() == theirs.get_config()


def test_polynomial_decay_with_begin_equal_to_end_gives_final_sparsity_where_tfmot_gives_nan(tfmot_sparsity):
    theirs = tfmot_sparsity.PolynomialDecay(0.1, 0.5, begin_step=5, end_step=5, frequency=1)
    ours = PolynomialDecay(0.1, 0.5, begin_step=5, end_step=5, frequency=1)
    t_should, t_sparsity = tfmot_at_every_step(theirs)
    o_should, o_sparsity = ours_at_every_step(ours)
    np.testing.assert_array_equal(o_should, t_should)
    assert np.isnan(t_sparsity[5]) and o_sparsity[5] == 0.5
    keep = STEPS != 5
    np.testing.assert_allclose(o_sparsity[keep], t_sparsity[keep], rtol=1e-6)


def test_configs_round_trip_between_tfmot_and_ours(tfmot_sparsity):
    for theirs in (tfmot_sparsity.ConstantSparsity(0.4, 3, end_step=30, frequency=4),
                   tfmot_sparsity.PolynomialDecay(0.1, 0.7, 2, 50, power=2, frequency=6)):
        config = theirs.get_config()
        ours = getattr(schedules, config["class_name"]).from_config(config["config"])
        assert ours.get_config() == config
        back = type(theirs).from_config(ours.get_config()["config"])
        assert back.get_config() == config
        assert schedules.get(theirs) == ours
        assert schedules.deserialize(schedules.serialize(ours)) == ours


def test_get_converts_tfmot_objects_and_keeps_ours_and_custom_callables(tfmot_sparsity):
    ours = PolynomialDecay(0.0, 0.5, 0, 10)
    assert schedules.get(ours) is ours
    converted = schedules.get(tfmot_sparsity.ConstantSparsity(0.25, 1, frequency=3))
    assert type(converted) is ConstantSparsity and converted.frequency == 3 and converted.target_sparsity == 0.25

    class Custom(tfmot_sparsity.PruningSchedule):
        def __call__(self, step):
            return True, 0.1

        def get_config(self):
            return {"class_name": "Custom", "config": {}}

    custom = Custom()
    assert schedules.get(custom) is custom
    assert schedules.deserialize(schedules.serialize(custom)) is None
    assert type(schedules.deserialize(schedules.serialize(custom), {"Custom": Custom})) is Custom
    with pytest.raises(InvalidArgumentTypeError, match="pruning_schedule=0.5"):
        schedules.get(0.5)


def test_tfmot_object_with_an_invalid_setting_is_refused_when_converted(tfmot_sparsity):
    bad = tfmot_sparsity.PolynomialDecay(0.0, 0.5, 0, 10)
    bad.final_sparsity = 1.0
    with pytest.raises(InvalidArgumentError, match="final_sparsity=1.0"):
        schedules.get(bad)


@pytest.mark.parametrize("cls,kwargs", [
    (ConstantSparsity, dict(target_sparsity=1.0, begin_step=0)),
    (ConstantSparsity, dict(target_sparsity=-0.1, begin_step=0)),
    (ConstantSparsity, dict(target_sparsity=0.5, begin_step=-1)),
    (ConstantSparsity, dict(target_sparsity=0.5, begin_step=5, end_step=4)),
    (ConstantSparsity, dict(target_sparsity=0.5, begin_step=0, end_step=-2)),
    (ConstantSparsity, dict(target_sparsity=0.5, begin_step=0, frequency=0)),
    (PolynomialDecay, dict(initial_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=-1)),
    (PolynomialDecay, dict(initial_sparsity=0.0, final_sparsity=1.5, begin_step=0, end_step=10)),
    (PolynomialDecay, dict(initial_sparsity=0.0, final_sparsity=0.5, begin_step=10, end_step=5)),
    (PolynomialDecay, dict(initial_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=5, frequency=-3)),
])
def test_arguments_tfmot_refuses_are_refused_with_our_value_error(tfmot_sparsity, cls, kwargs):
    with pytest.raises(ValueError):
        getattr(tfmot_sparsity, cls.__name__)(**kwargs)
    with pytest.raises(InvalidArgumentError, match="Received: "):
        cls(**kwargs)


def test_non_integer_steps_are_refused():
    with pytest.raises(InvalidArgumentTypeError, match="begin_step"):
        ConstantSparsity(0.5, begin_step=1.5)
    with pytest.raises(InvalidArgumentTypeError, match="power"):
        PolynomialDecay(0.0, 0.5, 0, 10, power="3")


@pytest.mark.parametrize("schedule", [
    ConstantSparsity(0.5, 3, frequency=4), ConstantSparsity(0.5, 0, end_step=9, frequency=3),
    PolynomialDecay(0.0, 0.5, 2, 17, frequency=5), PolynomialDecay(0.0, 0.5, 0, 0, frequency=1),
])
def test_next_pruning_step_and_final_step_agree_with_should_prune(schedule):
    steps = [s for s in range(60) if schedule.should_prune(s)]
    for start in range(60):
        expected = next((s for s in steps if s >= start), None)
        if expected is None and schedule.end_step < 0:
            expected = schedule.next_pruning_step(start)
            assert expected >= 60 and schedule.should_prune(expected)
        assert schedule.next_pruning_step(start) == expected, start
    assert schedule.final_step == (steps[-1] if schedule.end_step >= 0 else None)


def test_a_scalar_tensor_step_is_accepted():
    import tensorflow as tf

    s = PolynomialDecay(0.0, 0.5, 0, 10, frequency=5)
    assert s(tf.constant(5, tf.int64)) == s(5)
    assert s(np.int64(5)) == s(5)


def test_the_schedules_module_imports_no_tensorflow():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('keras_rebuild'); pkg.__path__ = [{os.path.join(root, 'keras_rebuild')!r}]\n"
        "sys.modules['keras_rebuild'] = pkg\n"
        "from keras_rebuild.schedules import PolynomialDecay\n"
        "assert PolynomialDecay(0.0, 0.5, 0, 10, frequency=5)(5) == (True, 0.4375)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'numpy')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
