"""Nothing lost: inputs stay untouched, rebuilt models save, load and run as plain Keras.

* Every public entry point leaves the model it is given bit-identical
  (``weights_digest`` before/after) and shares no layer object with what it returns.
* Rebuilt models round-trip through ``.keras``, ``.h5`` and SavedModel with
  identical outputs.
* A rebuilt model loads in a fresh Python process that never imports
  keras_rebuild (no custom objects needed).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import keras_rebuild as kr
from keras_rebuild import masks
from keras_rebuild.groups import Analysis
from keras_rebuild.testing import (
    FLAVOUR_VARIABLE,
    assert_models_close,
    flavour_keras,
    build_model,
    describe_spec,
    graph_specs,
    predict,
    random_inputs,
    randomize_weights,
    weights_digest,
    zero_random_components,
)

pytestmark = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")

keras = flavour_keras()
L = keras.layers
FLAVOUR = os.environ[FLAVOUR_VARIABLE]
# Keras 3 writes .keras and legacy .h5; SavedModel folders are a tf_keras format.
FORMATS = ["keras", "h5", "savedmodel"] if FLAVOUR == "tf_keras" else ["keras", "h5"]


def rich_model():
    """Two inputs, two outputs, a nested block, BN, residual, concat, squeeze-excite, separable, Flatten->Dense."""
    block_in = keras.Input((8, 8, 8))
    b = L.Conv2D(8, 3, padding="same", name="conv")(block_in)
    b = L.BatchNormalization(name="bn")(b)
    b = L.ReLU(name="relu")(b)
    block = keras.Model(block_in, L.Add(name="add")([block_in, b]), name="block")

    img = keras.Input((8, 8, 3), name="image")
    aux = keras.Input((8, 8, 2), name="aux")
    x = L.Conv2D(8, 3, padding="same", name="stem")(img)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = block(x)
    s = L.GlobalAveragePooling2D(name="se_pool")(x)
    s = L.Reshape((1, 1, 8), name="se_reshape")(s)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_scale")([x, s])
    y = L.Conv2D(6, 1, name="aux_conv")(aux)
    z = L.Concatenate(name="cat")([x, y])
    z = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(z)
    z = L.SeparableConv2D(8, 3, padding="same", name="sep")(z)
    z = L.MaxPooling2D(name="pool")(z)
    cls = L.Dense(4, name="cls")(L.Flatten(name="flat")(z))
    reg = L.Dense(1, name="reg")(L.GlobalAveragePooling2D(name="gap")(z))
    model = keras.Model([img, aux], [cls, reg], name="rich")
    return randomize_weights(model, seed=3)


def sequential_model():
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        L.Conv2D(8, 3, padding="same", name="c1"),
        L.BatchNormalization(name="bn1"),
        L.ReLU(),
        L.Conv2D(8, 3, padding="same", name="c2"),
        L.GlobalAveragePooling2D(),
        L.Dense(3, name="head"),
    ], name="seq")
    return randomize_weights(model, seed=4)


MODELS = {"rich": rich_model, "sequential": sequential_model}


def zeroed(model, seed=0):
    """A copy of ``model`` with half the prunable components zeroed."""
    masked, _, remove = zero_random_components(model, fraction=0.5, seed=seed)
    assert remove.any()
    return masked


def layer_ids(model):
    out = set()
    for layer in model.layers:
        out.add(id(layer))
        if hasattr(layer, "layers"):
            out |= layer_ids(layer)
    return out


def assert_untouched_and_unshared(model, digest, result):
    assert weights_digest(model) == digest, "the model passed in was modified"
    if isinstance(result, keras.Model):
        assert result is not model
        assert not (layer_ids(result) & layer_ids(model)), "the returned model shares layers with the input"
        assert not ({id(v) for v in result.weights} & {id(v) for v in model.weights})


# ---------------------------------------------------------------------------- inputs stay untouched
@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_rebuild_leaves_the_model_passed_in_untouched(make):
    model = zeroed(make())
    digest = weights_digest(model)
    small = kr.rebuild(model)
    assert_untouched_and_unshared(model, digest, small)
    assert small.count_params() < model.count_params()


@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_analysis_functions_leave_the_model_passed_in_untouched(make):
    model = zeroed(make())
    digest = weights_digest(model)
    analysis = kr.analyze(model)
    Analysis(model).removable()
    remove = analysis.removable()
    masks.layer_keep_masks(analysis, remove)
    masks.masked_weights(analysis, remove)
    analysis.summary()
    assert_untouched_and_unshared(model, digest, None)


@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_zero_channels_leaves_the_model_passed_in_untouched(make):
    model = make()
    digest = weights_digest(model)
    analysis = Analysis(model)
    remove = np.zeros(analysis.num_components, bool)
    remove[[g.components[0] for g in analysis.groups if g.prunable and not g.blocked[0]]] = True
    masked = masks.zero_channels(model, remove, analysis)
    assert_untouched_and_unshared(model, digest, masked)
    assert weights_digest(masked) != digest


def test_rebuild_of_a_compiled_model_leaves_its_optimizer_and_weights_alone():
    model = zeroed(sequential_model())
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    model.fit(x, np.zeros((8, 3), "float32"), epochs=1, verbose=0)
    optimizer = model.optimizer
    variables = optimizer.variables if isinstance(optimizer.variables, list) else optimizer.variables()
    opt_state = [keras.ops.convert_to_numpy(v) if hasattr(keras, "ops") else np.array(v) for v in variables]
    digest = weights_digest(model)
    small = kr.rebuild(model)
    assert_untouched_and_unshared(model, digest, small)
    assert model.optimizer is optimizer
    for before, after in zip(opt_state, variables):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(after) if hasattr(keras, "ops") else np.array(after))


@pytest.fixture
def wrappers():
    from keras_rebuild import wrappers

    return wrappers


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_prune_channels_strip_pruning_and_rebuild_leave_their_inputs_untouched(wrappers, make):
    model = make()
    digest = weights_digest(model)
    pruned = wrappers.prune_channels(model, sparsity=0.5)
    assert_untouched_and_unshared(model, digest, pruned)

    pruned_digest = weights_digest(pruned)
    stripped = wrappers.strip_pruning(pruned)
    assert_untouched_and_unshared(pruned, pruned_digest, stripped)
    small = kr.rebuild(pruned)
    assert_untouched_and_unshared(pruned, pruned_digest, small)
    kr.analyze(pruned)
    assert weights_digest(pruned) == pruned_digest
    assert weights_digest(model) == digest
    assert small.count_params() < model.count_params()
    assert_models_close(stripped, small, x=random_inputs(model, seed=1), tol=1e-5)


@pytest.mark.tf_keras_only
def test_prune_channels_with_a_schedule_leaves_the_model_untouched(wrappers):
    from keras_rebuild._compat import tfmot

    model = sequential_model()
    digest = weights_digest(model)
    schedule = tfmot().sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4)
    pruned = wrappers.prune_channels(model, pruning_schedule=schedule)
    assert_untouched_and_unshared(model, digest, pruned)


# ---------------------------------------------------------------------------- save and load
def save(model, directory, fmt):
    os.makedirs(str(directory), exist_ok=True)
    path = os.path.join(str(directory), {"keras": "model.keras", "h5": "model.h5", "savedmodel": "model_tf"}[fmt])
    if fmt == "savedmodel":
        model.save(path, save_format="tf")
    else:
        model.save(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_rebuilt_model_round_trips_through_every_save_format(tmp_path, make, fmt):
    model = zeroed(make())
    small = kr.rebuild(model)
    x = random_inputs(model, seed=5)
    path = save(small, tmp_path, fmt)
    loaded = keras.models.load_model(path, compile=False)
    assert [w.shape for w in loaded.get_weights()] == [w.shape for w in small.get_weights()]
    for a, b in zip(small.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for u, v in zip(predict(small, x), predict(loaded, x)):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-6)
    assert_models_close(model, loaded, x=x, tol=1e-5)  # still the zeroed model's function


def test_rebuilt_config_names_no_keras_rebuild_class():
    small = kr.rebuild(zeroed(rich_model()))
    text = json.dumps(small.get_config(), default=str)
    assert "keras_rebuild" not in text
    assert "StructuredPruningWrapper" not in text


LOADER = textwrap.dedent("""
    import importlib.abc, json, os, sys

    class NoKerasRebuild(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "keras_rebuild" or name.startswith("keras_rebuild."):
                raise ImportError(f"{name} must not be needed to load a rebuilt model")

    sys.meta_path.insert(0, NoKerasRebuild())
    try:
        import keras_rebuild  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True

    import numpy as np
    if os.environ["KERAS_REBUILD_FLAVOUR"] == "tf_keras":
        import tf_keras as keras
    else:
        import keras

    paths = json.loads(sys.argv[1])
    data = np.load(sys.argv[2])
    xs = [data[k] for k in sorted(k for k in data.files if k.startswith("x"))]
    errors = {}
    for name, path in paths.items():
        model = keras.models.load_model(path, compile=False)
        out = model(xs if len(xs) > 1 else xs[0], training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        out = [np.asarray(o.detach() if hasattr(o, "detach") else o) for o in out]
        errors[name] = max(float(np.max(np.abs(np.asarray(o) - data[f"y_{name.split(':')[0]}_{i}"])))
                           for i, o in enumerate(out))
    leaked = sorted(m for m in sys.modules if m.startswith("keras_rebuild"))
    print("RESULT " + json.dumps({"errors": errors, "leaked": leaked, "blocked": blocked}))
""")


def test_rebuilt_models_load_in_a_process_that_never_imports_keras_rebuild(tmp_path):
    models = {"rich": kr.rebuild(zeroed(rich_model()))}
    if FLAVOUR == "tf_keras":
        models["pruned"] = kr.rebuild(kr.prune_channels(rich_model(), sparsity=0.5))
    x = random_inputs(models["rich"], seed=9)
    arrays = {f"x{i}": a for i, a in enumerate(x)}
    paths = {}
    for name, model in models.items():
        for i, y in enumerate(predict(model, x)):
            arrays[f"y_{name}_{i}"] = y
        for fmt in FORMATS:
            paths[f"{name}:{fmt}"] = save(model, tmp_path / f"{name}_{fmt}", fmt)
    np.savez(tmp_path / "data.npz", **arrays)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    script = tmp_path / "load_plain.py"
    script.write_text(LOADER)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(paths), str(tmp_path / "data.npz")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["blocked"], "the loader process could import keras_rebuild"
    assert result["leaked"] == []
    assert set(result["errors"]) == set(paths)
    for name, err in result["errors"].items():
        assert err <= 1e-5, (name, err)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(spec=graph_specs(min_ops=2, max_ops=5, max_channels=8), seed=st.integers(0, 2**16 - 1))
def test_rebuilt_random_graph_round_trips_through_keras_format(tmp_path, spec, seed):
    keras.backend.clear_session()
    note(describe_spec(spec))
    model = build_model(spec, seed=seed)
    masked, _, _ = zero_random_components(model, fraction=0.5, seed=seed)
    small = kr.rebuild(masked)
    path = os.path.join(str(tmp_path), f"fuzz_{seed}.keras")
    small.save(path)
    loaded = keras.models.load_model(path, compile=False)
    x = random_inputs(model, seed=seed)
    for u, v in zip(predict(small, x), predict(loaded, x)):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-6)


@pytest.mark.tf_keras_only
@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_model_round_trips_through_every_save_format(tmp_path, fmt):
    pruned = kr.prune_channels(kr.digits_cnn(width=8), sparsity=0.5)
    x = random_inputs(pruned, seed=3)
    path = save(pruned, tmp_path, fmt)
    keras.backend.clear_session()
    loaded = keras.models.load_model(path, compile=False)
    assert isinstance(loaded.get_layer("conv2"), kr.StructuredPruningWrapper)
    for u, v in zip(predict(pruned, x), predict(loaded, x)):
        np.testing.assert_array_equal(u, v)
    assert_models_close(kr.rebuild(pruned), kr.rebuild(loaded), x=x, tol=1e-6)
