"""Pruning during training on Keras 3 (TensorFlow, JAX, torch): prune_channels, UpdatePruningStep, strip_pruning.

Runs in the Keras 3 processes (``KERAS_REBUILD_FLAVOUR=keras3 KERAS_BACKEND=tensorflow|jax|torch``).
The promises: the wrapped model computes exactly what ``strip_pruning`` returns
and what ``rebuild`` builds; masks change during ``fit`` on every backend and
stay in force after it (on JAX too, where a callback's assignments are lost
without a state sync); schedules reach their target; wrapped models save and
load as ``.keras`` and resume their schedule; training works under each
backend's own distribution.
"""
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.errors import InvalidArgumentError, MissingCallbackError, NotAModelError
from keras_rebuild.pruning import StructuredPruningWrapper, UpdatePruningStep, prune_channels, strip_pruning
from keras_rebuild.testing import flavour_keras, random_inputs

pytestmark = pytest.mark.keras3_only

keras = flavour_keras()
BACKEND = keras.backend.backend()


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def digits():
    (x, y), _ = kr.load_digits()
    return x[:256], y[:256]


def cnn(width=8, seed=0):
    return kr.digits_cnn(width=width, seed=seed, flavour="keras3")


def wrappers(model):
    from keras_rebuild.pruning_keras3 import wrapped_layers

    return wrapped_layers(model)


def masks(model):
    """``{path: (keep_in, keep_out)}`` of every wrapper (numpy booleans)."""
    return {p: w.channel_masks() for p, w in wrappers(model).items()}


def pruned_fraction(model):
    """Pruned channels over all channels of the prunable groups, read from the masks."""
    from keras_rebuild.groups import Analysis
    from keras_rebuild.pruning import plan_of_masks

    analysis = Analysis(model)
    plan = plan_of_masks(analysis, wrappers(model))
    before = sum(g.size for g in analysis.groups if g.prunable)
    return (plan.channels_before - plan.channels_after) / before


def outputs(model, x):
    if BACKEND == "jax":  # one compiled call instead of an eager dispatch per op
        return np.asarray(model.predict(x, batch_size=len(x), verbose=0))
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def assert_exact(a, b, x, atol=1e-5):
    np.testing.assert_allclose(outputs(a, x), outputs(b, x), rtol=1e-5, atol=atol)


def compiled(model, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    return model


class MaskRecorder(keras.callbacks.Callback):
    """Reads the masks at every epoch end (after UpdatePruningStep, which comes first in the list)."""

    def __init__(self):
        super().__init__()
        self.pruned = []

    def on_epoch_end(self, epoch, logs=None):
        self.pruned.append(sum(int((~ko).sum()) for _, ko in masks(self.model).values()))


# ----------------------------------------------------------------------------- one-shot
def test_one_shot_wrapped_equals_stripped_equals_rebuilt():
    model = cnn()
    pruned = prune_channels(model, sparsity=0.5)
    assert all(isinstance(w, StructuredPruningWrapper) for w in wrappers(pruned).values())
    assert isinstance(pruned.get_layer("conv2"), StructuredPruningWrapper)
    assert not isinstance(model.get_layer("conv2"), StructuredPruningWrapper)
    x = random_inputs(model, batch=8)
    stripped = strip_pruning(pruned)
    assert not wrappers(stripped)
    assert [l.name for l in stripped.layers] == [l.name for l in model.layers]
    assert_exact(pruned, stripped, x, atol=1e-6)
    small = kr.rebuild(pruned)  # strips first
    assert_exact(small, stripped, x)
    assert small.count_params() < 0.5 * model.count_params()
    assert pruned_fraction(pruned) == pytest.approx(0.5, abs=0.05)
    # the input model is not modified
    assert all(np.all(w != 0) for w in model.get_layer("conv2").get_weights())


@pytest.mark.parametrize("kwargs", [
    dict(sparsity=0.5, criterion="l2"),
    dict(sparsity=0.5, criterion="bn_scale", scope="global"),
    dict(threshold=0.0),
    dict(sparsity=0.5, round_to=4, min_channels=4, ignore=["conv1"]),
])
def test_every_one_shot_mode_is_exact(kwargs):
    model = cnn(width=8)
    pruned = prune_channels(model, **kwargs)
    x = random_inputs(model, batch=4)
    small = kr.rebuild(pruned)
    assert_exact(small, pruned, x)
    assert small.count_params() < model.count_params()
    if "ignore" in kwargs:
        assert small.get_layer("conv1").filters == 8  # its group stays whole
        kept = [small.get_layer(n).filters for n in ("conv3",)] + [small.get_layer("fc1").units]
        assert all(k % 4 == 0 and k >= 4 for k in kept)


def test_a_data_criterion_is_measured_on_this_backend(digits):
    x, y = digits
    model = cnn()
    pruned = prune_channels(model, sparsity=0.5, criterion="activation", data=(x[:64], y[:64]))
    assert pruned_fraction(pruned) == pytest.approx(0.5, abs=0.05)
    assert_exact(kr.rebuild(pruned), pruned, x[:8])


def test_bad_arguments_are_our_errors():
    model = cnn()
    with pytest.raises(InvalidArgumentError, match="exactly one of"):
        prune_channels(model)
    with pytest.raises(InvalidArgumentError, match="block_size"):
        prune_channels(model, sparsity=0.5, block_size=(1, 4))
    with pytest.raises(NotAModelError, match="Expected `model`"):
        prune_channels(model.get_layer("conv1"), sparsity=0.5)
    with pytest.raises(NotAModelError, match="Expected `model`"):
        prune_channels(np.zeros(3), sparsity=0.5)
    with pytest.raises(InvalidArgumentError, match="already"):
        prune_channels(prune_channels(model, sparsity=0.5), sparsity=0.5)


def test_wrapper_dispatches_on_the_layer_flavour():
    from keras_rebuild import pruning_keras3

    w = StructuredPruningWrapper(keras.layers.Dense(4, name="d"))
    assert type(w) is pruning_keras3.StructuredPruningWrapper
    assert isinstance(w, StructuredPruningWrapper) and w.name == "d"


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_applications_one_shot_prune_strip_rebuild_is_exact(name):
    app = getattr(keras.applications, name)
    model = app(weights=None, input_shape=(32, 32, 3), classes=10)
    pruned = prune_channels(model, sparsity=0.5)
    stripped = strip_pruning(pruned)
    small = kr.rebuild(stripped)
    x = random_inputs(model, batch=2, seed=1)
    ref = outputs(stripped, x)
    np.testing.assert_allclose(outputs(small, x), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs(pruned, x), ref, rtol=1e-4, atol=1e-5)
    assert small.count_params() < 0.75 * model.count_params()


# ----------------------------------------------------------------------------- schedule and callback
def test_masks_change_during_fit_and_stay_in_force_after(digits):
    x, y = digits
    # 8 batches per epoch; pruning at steps 0, 5, 10, ..., 20: most updates fall mid-epoch.
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=20, frequency=5)
    pruned = compiled(prune_channels(cnn(), pruning_schedule=schedule))
    cb, rec = UpdatePruningStep(), MaskRecorder()
    pruned.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[cb, rec])
    assert cb.step == 24
    assert rec.pruned[0] < rec.pruned[1] <= rec.pruned[2] and rec.pruned[0] > 0
    # the masks in the model are the last decision (not lost, not overwritten by the trainer's state)
    assert pruned_fraction(pruned) == pytest.approx(0.5, abs=0.05)
    from keras_rebuild.groups import Analysis
    from keras_rebuild.pruning import plan_of_masks

    analysis = Analysis(pruned)
    np.testing.assert_array_equal(plan_of_masks(analysis, wrappers(pruned)).apply(analysis),
                                  cb.plan_.apply(analysis))
    # pruned weights are zero, and the wrapped model is the stripped and the rebuilt model
    for w in wrappers(pruned).values():
        for kept, value in zip(w.layer.get_weights(), w.masked_layer_weights()):
            np.testing.assert_array_equal(kept, value)
    stripped = strip_pruning(pruned)
    assert_exact(pruned, stripped, x[:8], atol=1e-6)
    assert_exact(kr.rebuild(pruned), pruned, x[:8])


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX trainer keeps variables in a separate state")
def test_without_the_state_sync_jax_loses_the_masks(digits, monkeypatch):
    """The test above fails when the callback does not sync the JAX trainer before assigning."""
    from keras_rebuild import pruning_keras3

    x, y = digits
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=20, frequency=5)
    pruned = compiled(prune_channels(cnn(), pruning_schedule=schedule))
    monkeypatch.setattr(pruning_keras3.UpdatePruningStep, "_synced_model", lambda self: self._trained)
    lost = False
    try:
        pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
        lost = pruned_fraction(pruned) < 0.2  # the mid-epoch updates were overwritten at the epoch end
    except Exception:  # noqa: BLE001 - variables the trainer purged cannot even be read
        lost = True
    assert lost


def test_polynomial_decay_reaches_its_target_and_warns_when_training_is_too_short(digits):
    x, y = digits
    schedule = kr.PolynomialDecay(0.0, 0.6, begin_step=2, end_step=30, frequency=4)
    pruned = compiled(prune_channels(cnn(), pruning_schedule=schedule, criterion="l2", scope="global"))
    cb = UpdatePruningStep()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb])  # 16 steps of 31
    below = [w for w in record if "below its target sparsity" in str(w.message)]
    assert len(below) == 1
    assert pruned_fraction(pruned) < 0.6 - 0.1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb])  # resumes: steps 16..31
    assert not [w for w in record if "below its target sparsity" in str(w.message)]
    assert cb.step == 32
    assert pruned_fraction(pruned) == pytest.approx(0.6, abs=0.05)
    assert_exact(kr.rebuild(pruned), pruned, x[:8])


def test_a_data_criterion_drives_the_schedule(digits):
    x, y = digits
    schedule = kr.ConstantSparsity(0.5, begin_step=3, end_step=3)
    pruned = compiled(prune_channels(cnn(), pruning_schedule=schedule, criterion="activation", data=x[:32]))
    cb = UpdatePruningStep()
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    assert cb.last_sparsity == 0.5
    assert pruned_fraction(pruned) == pytest.approx(0.5, abs=0.05)


def test_training_a_scheduled_model_without_the_callback_fails(digits):
    x, y = digits
    pruned = compiled(prune_channels(cnn(), pruning_schedule=kr.ConstantSparsity(0.5, 0)))
    with pytest.raises(Exception, match="UpdatePruningStep"):
        pruned.fit(x, y, batch_size=64, epochs=1, verbose=0)


def test_one_shot_masks_stay_fixed_during_fine_tuning_with_the_bn_penalty(digits):
    x, y = digits
    pruned = compiled(prune_channels(cnn(), sparsity=0.5, bn_l1=1e-3))
    before = masks(pruned)
    history = pruned.fit(x, y, batch_size=64, epochs=1, verbose=0)  # no callback needed
    assert np.isfinite(history.history["loss"][-1])
    after = masks(pruned)
    for p in before:
        np.testing.assert_array_equal(before[p][1], after[p][1])
    assert_exact(kr.rebuild(pruned), pruned, x[:8])


def test_nested_models_are_pruned_through_their_paths(digits):
    x, y = digits
    inner = cnn()
    backbone = keras.Model(inner.input, inner.get_layer("fc1").output, name="backbone")
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="head")(backbone(inp)))
    pruned = compiled(prune_channels(model, pruning_schedule=kr.ConstantSparsity(0.5, begin_step=2)))
    assert "backbone/conv2" in wrappers(pruned) and "head" in wrappers(pruned)
    pruned.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
    small = kr.rebuild(pruned)
    assert_exact(small, pruned, x[:8])
    assert small.count_params() < 0.5 * model.count_params()


# ----------------------------------------------------------------------------- saving
def test_wrapped_model_saves_loads_and_resumes_its_schedule(digits, tmp_path):
    x, y = digits
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=12, frequency=4)
    pruned = compiled(prune_channels(cnn(), pruning_schedule=schedule))
    with pytest.warns(UserWarning, match="below its target sparsity"):
        pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
    assert 0 < pruned_fraction(pruned) < 0.45
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)  # no custom scope
    assert isinstance(loaded.get_layer("conv2"), StructuredPruningWrapper)
    assert_exact(pruned, loaded, x[:8], atol=1e-6)
    for p, (ki, ko) in masks(pruned).items():
        np.testing.assert_array_equal(masks(loaded)[p][1], ko)
    assert {int(keras.ops.convert_to_numpy(w.pruning_step)) for w in wrappers(loaded).values()} == {8}
    cb = UpdatePruningStep()
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
    assert cb.step == 16 and cb.schedule == schedule
    assert pruned_fraction(loaded) == pytest.approx(0.5, abs=0.05)
    assert_exact(kr.rebuild(loaded), loaded, x[:8])


# ----------------------------------------------------------------------------- distribution
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs the TensorFlow backend")
def test_trains_under_mirrored_strategy(digits, mirrored_strategy):
    x, y = digits
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=12, frequency=3)
    with mirrored_strategy.scope():
        pruned = compiled(prune_channels(cnn(), pruning_schedule=schedule))
    cb = UpdatePruningStep()
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb])
    assert cb.step == 16
    assert pruned_fraction(pruned) == pytest.approx(0.5, abs=0.05)
    assert_exact(kr.rebuild(pruned), pruned, x[:8])


DATA_PARALLEL = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import numpy as np
    import keras_rebuild as kr
    from keras_rebuild.pruning import UpdatePruningStep, prune_channels
    from keras_rebuild.pruning_keras3 import wrapped_layers

    assert len(jax.devices()) == 2, jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    (x, y), _ = kr.load_digits()
    x, y = x[:256], y[:256]
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=12, frequency=3)
    pruned = prune_channels(kr.digits_cnn(width=8, flavour="keras3"), pruning_schedule=schedule)
    pruned.compile("adam", "sparse_categorical_crossentropy")
    cb = UpdatePruningStep()
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[cb])
    pruned_out = sum(int((~w.channel_masks()[1]).sum()) for w in wrapped_layers(pruned).values())
    small = kr.rebuild(pruned)
    diff = float(np.abs(np.asarray(small(x[:8])) - np.asarray(pruned(x[:8]))).max())
    print("RESULT", cb.step, pruned_out, cb.plan_.channels_before - cb.plan_.channels_after, diff,
          "tensorflow" in sys.modules)
""")


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on two host devices: a JAX process")
def test_trains_under_data_parallel_on_two_jax_devices():
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, out.stderr[-3000:]
    _, step, pruned_masks, pruned_plan, diff, tf_loaded = lines[0].split()
    assert int(step) == 16
    assert int(pruned_plan) > 0 and int(pruned_masks) > 0
    assert float(diff) < 1e-5
    assert tf_loaded == "False"  # no TensorFlow through keras_rebuild on JAX


NO_TENSORFLOW = textwrap.dedent("""
    import sys
    import keras_rebuild as kr
    from keras_rebuild.pruning import UpdatePruningStep, prune_channels, strip_pruning

    (x, y), _ = kr.load_digits()
    schedule = kr.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2)
    pruned = prune_channels(kr.digits_cnn(width=8, flavour="keras3"), pruning_schedule=schedule)
    pruned.compile("adam", "sparse_categorical_crossentropy")
    pruned.fit(x[:128], y[:128], batch_size=16, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
    small = kr.rebuild(strip_pruning(pruned))
    print("RESULT", "tensorflow" in sys.modules, small.count_params() < pruned.count_params())
""")


@pytest.mark.skipif(BACKEND != "torch", reason="JAX is checked by the DataParallel subprocess; TF is the backend")
def test_pruning_on_torch_never_loads_tensorflow():
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, out.stderr[-3000:]
    assert lines[0].split()[1:] == ["False", "True"]
