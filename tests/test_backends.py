"""One core, thin back-ends: flavour detection, import hygiene, private attributes, plan replay."""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.backends import flavour_of, same_flavour
from keras_rebuild.errors import InvalidArgumentError, MixedFlavoursError, NotAModelError
from keras_rebuild.masks import zero_channels
from keras_rebuild.testing import (
    FLAVOUR_VARIABLE,
    assert_outputs_close,
    flavour_keras,
    predict,
    random_inputs,
    randomize_weights,
)

keras = flavour_keras()
FLAVOUR = os.environ[FLAVOUR_VARIABLE]
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow") if FLAVOUR == "keras3" else "tensorflow"
PACKAGE = pathlib.Path(kr.__file__).parent

# Private Keras attributes only back-ends may touch (the core stays flavour-neutral).
PRIVATE = ["_nodes_by_depth", "_keras_history", "_inbound_nodes", "call_args", "compiled_loss",
           "_network_nodes", "_call_spec", "_run_through_graph", "_functional", "_input_layers"]


def test_no_module_outside_the_back_ends_touches_a_private_keras_attribute():
    pattern = re.compile(r"[.\"'](" + "|".join(map(re.escape, PRIVATE)) + r")\b")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("backends/"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "private Keras attributes outside keras_rebuild/backends:\n" + "\n".join(offenders)


def test_the_private_attribute_check_can_fail(tmp_path):
    line = "x = model._nodes_by_depth\n"
    pattern = re.compile(r"[.\"'](" + "|".join(map(re.escape, PRIVATE)) + r")\b")
    assert pattern.search(line)


def test_flavour_is_read_from_the_model_and_its_subclasses():
    model = kr.digits_cnn(width=4, flavour=FLAVOUR)
    assert flavour_of(model) == FLAVOUR
    assert flavour_of(model.layers[1]) == FLAVOUR

    class MyModel(keras.Model):  # a user's subclass, defined outside Keras
        pass

    assert flavour_of(MyModel) == FLAVOUR
    assert flavour_of(np.zeros(3)) is None
    with pytest.raises(NotAModelError, match="Expected `model` to be a Keras"):
        kr.rebuild(np.zeros(3))


def test_mixing_flavours_in_one_call_is_an_error():
    class FakeOther:  # stands for a model of the other Keras
        pass

    FakeOther.__module__ = "tf_keras.src.engine.functional" if FLAVOUR == "keras3" else "keras.src.models.functional"
    model = kr.digits_cnn(width=4, flavour=FLAVOUR)
    assert same_flavour(model=model, teacher=model) == FLAVOUR
    with pytest.raises(MixedFlavoursError, match="same Keras") as info:
        same_flavour(model=model, teacher=FakeOther())
    assert isinstance(info.value, TypeError)


NO_TENSORFLOW = textwrap.dedent("""
    import json, os, sys
    env_before = dict(os.environ)
    import keras_rebuild as kr
    report = {"keras_at_import": "keras" in sys.modules or "tf_keras" in sys.modules,
              "env_changed": dict(os.environ) != env_before}
    model = kr.digits_cnn(width=8, flavour="keras3")
    kr.analyze(model)
    small = kr.rebuild(model)
    plan = kr.select_channels(model, sparsity=0.5)
    small = kr.rebuild(model, plan)
    report["tensorflow"] = "tensorflow" in sys.modules
    report["params"] = [model.count_params(), small.count_params()]
    print("RESULT " + json.dumps(report))
""")


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend itself")
def test_keras3_on_jax_or_torch_never_loads_tensorflow(tmp_path):
    script = tmp_path / "no_tf.py"
    script.write_text(NO_TENSORFLOW)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result == {"keras_at_import": False, "env_changed": False, "tensorflow": False,
                      "params": result["params"]}
    assert result["params"][1] < result["params"][0] / 2


def test_importing_the_package_loads_no_keras_and_changes_no_environment_variable():
    code = ("import os, sys; before = dict(os.environ); import keras_rebuild; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'tf_keras', 'jax', 'torch') if m in sys.modules), "
            "dict(os.environ) == before)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[] True"


# ----------------------------------------------------------------------------- plans
def trained_model():
    """A digits CNN with non-trivial weights (stands for a trained model: no channel is zero)."""
    return randomize_weights(kr.digits_cnn(width=8, flavour=FLAVOUR), seed=3)


def test_select_channels_returns_a_plan_of_sorted_kept_indices_that_round_trips_as_json(tmp_path):
    model = trained_model()
    plan = kr.select_channels(model, sparsity=0.5, round_to=2)
    assert isinstance(plan, kr.Plan)
    assert plan.meta["criterion"] == "l1"
    for name, kept in plan.kept.items():
        assert kept == sorted(set(kept)) and len(kept) <= plan.sizes[name]
    assert plan.channels_after < plan.channels_before
    path = tmp_path / "plan.json"
    plan.save(path)
    assert kr.Plan.load(path) == plan


def test_plan_replays_onto_the_saved_model_and_equals_the_rebuilt_masked_model(tmp_path):
    model = trained_model()
    plan = kr.select_channels(model, sparsity=0.5)
    plan.save(tmp_path / "plan.json")
    model.save(tmp_path / "model.keras")

    analysis = kr.analyze(model)
    masked = zero_channels(model, plan.apply(analysis), analysis)
    expected = kr.rebuild(masked)

    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    small, report = kr.rebuild(loaded, kr.Plan.load(tmp_path / "plan.json"), return_report=True)
    assert [w.shape for w in small.get_weights()] == [w.shape for w in expected.get_weights()]
    x = random_inputs(model, seed=4)
    assert_outputs_close(expected, small, x, atol=1e-5)
    assert_outputs_close(masked, small, x, atol=1e-5)
    assert report.params_after == sum(int(np.size(w)) for w in expected.get_weights())


def test_plan_applies_exactly_even_when_the_pruned_channels_are_not_zero():
    model = trained_model()
    plan = kr.select_channels(model, sparsity=0.5)
    small = kr.rebuild(model, plan)
    widths = {layer.name: layer.filters for layer in small.layers if hasattr(layer, "filters")}
    for name, kept in plan.kept.items():
        if name in widths:
            assert widths[name] == len(kept)
    # Without the plan, nothing of the trained model is dead: nothing goes.
    assert kr.rebuild(model).count_params() == model.count_params()


def test_rebuild_with_a_plan_reports_dead_channels_the_plan_keeps():
    model = trained_model()
    conv = model.get_layer("conv1")
    kernel = conv.get_weights()[0]
    kernel[..., :3] = 0.0  # three dead output channels of conv1 (no bias; BN follows)
    conv.set_weights([kernel])
    bn = model.get_layer("bn1")
    gamma, beta, mean, var = bn.get_weights()
    gamma[:3] = beta[:3] = 0.0  # BN outputs exactly zero there
    bn.set_weights([gamma, beta, mean, var])
    plan = kr.Plan({name: list(range(size)) for name, size in
                    ((g.name, g.size) for g in kr.analyze(model).groups if g.prunable)},
                   {g.name: g.size for g in kr.analyze(model).groups if g.prunable})
    small, report = kr.rebuild(model, plan, return_report=True)
    assert small.count_params() == model.count_params()
    assert report.dead_beyond_plan.get("conv1") == 3
    assert "Provably dead channels the plan keeps" in str(report)


def test_plan_for_another_architecture_names_the_first_mismatching_layer():
    plan = kr.select_channels(trained_model(), sparsity=0.5)
    wider = kr.digits_cnn(width=16, flavour=FLAVOUR)
    with pytest.raises(InvalidArgumentError, match="differs at layer 'conv1'"):
        kr.rebuild(wider, plan)


def test_plan_rejects_bad_indices_in_one_place():
    with pytest.raises(InvalidArgumentError, match="distinct indices"):
        kr.Plan({"conv1": [0, 0]}, {"conv1": 8})
    with pytest.raises(InvalidArgumentError, match="distinct indices"):
        kr.Plan({"conv1": [0.5]}, {"conv1": 8})
    assert kr.Plan({"conv1": [3, 1]}, {"conv1": 8}).kept == {"conv1": [1, 3]}


@pytest.mark.tf_keras_only
def test_a_plan_chosen_on_keras3_replays_onto_the_same_tf_keras_architecture(tmp_path):
    code = textwrap.dedent("""
        import sys
        import keras_rebuild as kr
        from keras_rebuild.testing import randomize_weights
        model = randomize_weights(kr.digits_cnn(width=8, flavour="keras3"), seed=3)
        kr.select_channels(model, sparsity=0.5).save(sys.argv[1])
    """)
    env = dict(os.environ, KERAS_BACKEND="jax" if _has("jax") else "tensorflow")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "plan.json")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = kr.Plan.load(tmp_path / "plan.json")
    model = trained_model()  # the same architecture in tf_keras
    small = kr.rebuild(model, plan)
    assert small.get_layer("conv1").filters == len(plan.kept["conv1"])
    analysis = kr.analyze(model)
    masked = zero_channels(model, plan.apply(analysis), analysis)
    x = random_inputs(model, seed=1)
    np.testing.assert_allclose(predict(masked, x)[0], predict(small, x)[0], atol=1e-5)


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None
