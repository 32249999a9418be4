"""Tests of the structured pruning wrappers: prune_channels, UpdatePruningStep, strip_pruning."""
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_rebuild as kr
from keras_rebuild._compat import keras, tfmot
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, MissingCallbackError
from keras_rebuild.groups import Analysis
from keras_rebuild.wrappers import (
    StructuredPruningWrapper,
    UpdatePruningStep,
    prune_channels,
    strip_pruning,
    wrapped_layers,
)

from tests.conftest import assert_models_close, predict, random_inputs, weights_digest


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def digits():
    return kr.load_digits()


def small_data(digits, n=256):
    (x, y), _ = digits
    return x[:n], y[:n]


def kernel_layers(model):
    """Top-level Conv/Dense layers (unwrapped view), by name."""
    out = {}
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, StructuredPruningWrapper) else layer
        if isinstance(inner, (keras.layers.Conv2D, keras.layers.Dense)):
            out[inner.name] = inner
    return out


def zero_out_channels(model):
    """Per Conv/Dense layer: boolean array, output channel whose kernel slice is all zero."""
    return {name: np.all(layer.get_weights()[0].reshape(-1, layer.get_weights()[0].shape[-1]) == 0, axis=0)
            for name, layer in kernel_layers(model).items()}


def mask_state(model):
    return {p: tuple(m.copy() for m in w.channel_masks()) for p, w in wrapped_layers(model).items()}


def step_of(model):
    steps = {int(keras.backend.get_value(w.pruning_step)) for w in wrapped_layers(model).values()}
    assert len(steps) == 1, steps
    return steps.pop()


def pruned_fraction(model):
    """Fraction of pruned output channels of the prunable writers conv1..fc1 of digits_cnn."""
    z = zero_out_channels(strip_pruning(model))
    return {k: float(v.mean()) for k, v in z.items() if k != "probs"}


def schedule(final=0.5, end=20, frequency=5, initial=0.0):
    return tfmot().sparsity.keras.PolynomialDecay(initial, final, begin_step=0, end_step=end, frequency=frequency)


def compiled(model, lr=3e-3):
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def assert_weights_unchanged_or_zero(stripped, original):
    for a, b in zip(stripped.layers, original.layers):
        assert type(a) is type(b) and a.name == b.name
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            assert wa.shape == wb.shape
            assert np.all((wa == wb) | (wa == 0)), a.name


# ----------------------------------------------------------------------------- one-shot
def randomize_batchnorm(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i != 1 else
                               rng.normal(size=w.shape).astype("float32") for i, w in enumerate(layer.get_weights())])
    return model


def test_one_shot_sparsity_then_strip_gives_original_architecture_with_half_the_channels_zero():
    model = randomize_batchnorm(kr.digits_cnn())
    pruned = prune_channels(model, sparsity=0.5)
    assert isinstance(pruned.get_layer("conv2"), StructuredPruningWrapper)
    assert not isinstance(pruned.get_layer("relu1"), StructuredPruningWrapper)
    stripped = strip_pruning(pruned)
    assert [type(layer) for layer in stripped.layers] == [type(layer) for layer in model.layers]
    for a, b in zip(stripped.layers, model.layers):
        ca, cb = a.get_config(), b.get_config()
        assert ca == cb, a.name
    assert_weights_unchanged_or_zero(stripped, model)
    zero = zero_out_channels(stripped)
    assert zero["conv1"].sum() == 16 and zero["conv2"].sum() == 16
    assert zero["conv3"].sum() == 32 and zero["fc1"].sum() == 32
    assert zero["probs"].sum() == 0  # model output: never pruned
    # The BatchNorm of a pruned conv shares its decision: gamma and beta zero on the same channels.
    gamma, beta, mean, var = stripped.get_layer("bn1").get_weights()
    np.testing.assert_array_equal(gamma == 0, zero["conv1"])
    np.testing.assert_array_equal(beta == 0, zero["conv1"])
    np.testing.assert_array_equal(mean, model.get_layer("bn1").get_weights()[2])  # moving stats not masked
    # The wrapped model computes the stripped model exactly.
    x = random_inputs(model, batch=8)
    np.testing.assert_array_equal(predict(pruned, x)[0], predict(stripped, x)[0])


def test_rebuild_of_wrapped_model_equals_stripped_model_and_has_fewer_params():
    model = kr.digits_cnn()
    pruned = prune_channels(model, sparsity=0.5)
    stripped = strip_pruning(pruned)
    small, report = kr.rebuild(pruned, return_report=True)
    assert not any(isinstance(layer, StructuredPruningWrapper) for layer in small.layers)
    assert small.count_params() < 0.5 * model.count_params()
    assert report.params_after == small.count_params()
    assert small.get_layer("conv2").filters == 16
    x = random_inputs(model, batch=16, seed=3)
    assert_models_close(small, stripped, x, atol=1e-5)


def test_zero_sparsity_is_noop_and_strip_returns_the_original_bit_for_bit():
    model = kr.digits_cnn()
    stripped = strip_pruning(prune_channels(model, sparsity=0.0))
    for wa, wb in zip(stripped.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert stripped.get_config()["layers"] == model.get_config()["layers"]
    x = random_inputs(model, batch=8)
    np.testing.assert_array_equal(predict(stripped, x)[0], predict(model, x)[0])


def test_prune_channels_and_strip_leave_the_input_model_untouched(digits):
    model = kr.digits_cnn()
    before = weights_digest(model)
    pruned = compiled(prune_channels(model, sparsity=0.5))
    x, y = small_data(digits, 64)
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0)
    strip_pruning(pruned)
    kr.rebuild(pruned)
    assert weights_digest(model) == before
    assert not any(isinstance(layer, StructuredPruningWrapper) for layer in model.layers)


def test_strip_pruning_of_an_unwrapped_model_returns_an_equal_copy():
    model = kr.digits_cnn()
    copy = strip_pruning(model)
    assert copy is not model
    assert weights_digest(copy) == weights_digest(model)


def test_analysis_of_wrapped_model_sees_the_groups_and_weights_of_the_original():
    model = kr.digits_cnn()
    pruned = prune_channels(model, sparsity=0.5)
    a, b = Analysis(model), Analysis(pruned)
    assert [(g.name, g.size, g.members, g.prunable) for g in a.groups] == \
           [(g.name, g.size, g.members, g.prunable) for g in b.groups]
    assert len(b.weights["bn1"]) == 4
    np.testing.assert_array_equal(b.weights["conv2"][0], pruned.get_layer("conv2").layer.get_weights()[0])


def test_wrapper_weights_are_the_layer_weights_then_masks_and_step():
    pruned = prune_channels(kr.digits_cnn(), sparsity=0.5)
    w = pruned.get_layer("bn1")
    names = [v.name.split("/")[-1].split(":")[0] for v in w.weights]
    assert names[:4] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert names[4:] == ["in_channel_mask", "out_channel_mask", "pruning_step"]
    inner = w.layer.get_weights()
    w.set_weights([v * 2 for v in inner])  # the layer's weights alone are accepted
    np.testing.assert_allclose(w.layer.get_weights()[2], inner[2] * 2)


def test_one_shot_model_predicts_evaluates_and_fine_tunes_without_callback_with_fixed_masks(digits):
    x, y = small_data(digits, 128)
    pruned = compiled(prune_channels(kr.digits_cnn(), sparsity=0.5))
    masks = mask_state(pruned)
    pruned.predict(x[:8], verbose=0)
    pruned.evaluate(x, y, verbose=0)
    w_before = pruned.get_layer("conv2").layer.get_weights()[0].copy()
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0)
    after = mask_state(pruned)
    for p in masks:
        for m0, m1 in zip(masks[p], after[p]):
            np.testing.assert_array_equal(m0, m1)
    w_after = pruned.get_layer("conv2").layer.get_weights()[0]
    keep_out = masks["conv2"][1]
    assert not np.allclose(w_after[..., keep_out], w_before[..., keep_out])  # kept channels trained
    # Pruned weights got no gradient, so Adam left them at zero.
    assert np.all(w_after[..., ~keep_out] == 0)
    assert pruned_fraction(pruned)["conv2"] == 0.5


def test_threshold_mode_prunes_outlier_channels_at_wrap_time():
    model = kr.digits_cnn()
    k = model.get_layer("conv2").get_weights()[0]
    k[..., :3] *= 1e-3  # three channels far below the others
    model.get_layer("conv2").set_weights([k])
    pruned = prune_channels(model, threshold=2.0)
    zero = zero_out_channels(strip_pruning(pruned))["conv2"]
    assert zero[:3].all()
    assert zero.sum() < 8


def test_global_scope_prunes_the_requested_fraction_of_all_channels():
    pruned = prune_channels(kr.digits_cnn(), sparsity=0.5, scope="global")
    zero = zero_out_channels(strip_pruning(pruned))
    total = sum(len(zero[k]) for k in ("conv1", "conv2", "conv3", "fc1"))
    assert sum(zero[k].sum() for k in ("conv1", "conv2", "conv3", "fc1")) == total // 2


# ----------------------------------------------------------------------------- schedules and the callback
def test_polynomial_decay_with_update_pruning_step_reaches_final_sparsity_with_monotone_masks(digits):
    x, y = small_data(digits, 256)  # 8 steps per epoch at batch 32
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule(0.5, end=16, frequency=4)))
    assert step_of(pruned) == -1
    assert all(v == 0 for v in pruned_fraction(pruned).values())
    cb = UpdatePruningStep()
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False, callbacks=[cb])
    assert step_of(pruned) == 8
    mid = mask_state(pruned)
    mid_frac = pruned_fraction(pruned)
    assert 0 < mid_frac["conv3"] < 0.5
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False, callbacks=[cb])
    assert step_of(pruned) == 24
    assert pruned_fraction(pruned) == {"conv1": 0.5, "conv2": 0.5, "conv3": 0.5, "fc1": 0.5}
    for p, (ki, ko) in mask_state(pruned).items():  # pruned once, pruned for good
        assert not np.any(ki & ~mid[p][0]) and not np.any(ko & ~mid[p][1])
    assert cb.last_sparsity == pytest.approx(0.5)
    x8 = x[:8]
    np.testing.assert_allclose(predict(pruned, x8)[0], predict(strip_pruning(pruned), x8)[0], atol=1e-6)


def test_fit_without_update_pruning_step_raises_missing_callback_error(digits):
    x, y = small_data(digits, 64)
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule()))
    with pytest.raises(MissingCallbackError, match="UpdatePruningStep"):
        pruned.fit(x, y, epochs=1, batch_size=32, verbose=0)
    with pytest.raises(MissingCallbackError, match="conv1"):
        pruned(x[:2], training=True)
    # Inference needs no callback.
    assert pruned.predict(x[:4], verbose=0).shape == (4, 10)


def test_constant_sparsity_prunes_from_its_begin_step(digits):
    x, y = small_data(digits, 128)  # 4 steps per epoch
    sched = tfmot().sparsity.keras.ConstantSparsity(0.25, begin_step=6, frequency=2)
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=sched))
    cb = UpdatePruningStep()
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    assert all(v == 0 for v in pruned_fraction(pruned).values())  # steps 0..3: before begin_step
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    assert pruned_fraction(pruned) == {"conv1": 0.25, "conv2": 0.25, "conv3": 0.25, "fc1": 0.25}


def test_frequency_overrides_the_schedules_own_frequency(digits):
    x, y = small_data(digits, 64)  # 2 steps per epoch
    sched = tfmot().sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=100)
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=sched, frequency=3))
    cb = UpdatePruningStep()
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])  # steps 0, 1: prunes at 0
    assert pruned_fraction(pruned)["conv2"] == 0.5
    assert cb._decide(3)[0] and not cb._decide(4)[0] and not cb._decide(100)[0]


def test_data_driven_criterion_uses_the_data_given_to_prune_channels(digits):
    x, y = small_data(digits, 64)
    model = kr.digits_cnn(width=8)
    with pytest.raises(InvalidArgumentError, match="data"):
        prune_channels(model, sparsity=0.5, criterion="taylor")
    compiled(model)
    one_shot = prune_channels(model, sparsity=0.5, criterion="taylor", data=(x, y))
    assert pruned_fraction(one_shot)["conv2"] == 0.5
    gradual = compiled(prune_channels(model, pruning_schedule=schedule(0.5, end=2, frequency=1),
                                      criterion="activation", data=x))
    gradual.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[UpdatePruningStep()])
    assert pruned_fraction(gradual)["conv2"] == 0.5


@pytest.mark.parametrize("ext", ["keras", "h5"])
def test_save_and_load_mid_training_without_custom_scope_resumes_the_schedule(digits, tmp_path, ext):
    x, y = small_data(digits, 128)  # 4 steps per epoch
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule(0.5, end=12, frequency=2)))
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[UpdatePruningStep()])
    assert step_of(pruned) == 4
    path = os.path.join(tmp_path, "mid." + ext)
    pruned.save(path)
    keras.backend.clear_session()
    loaded = keras.models.load_model(path)  # no custom_objects, no scope
    assert isinstance(loaded.get_layer("conv2"), StructuredPruningWrapper)
    assert step_of(loaded) == 4
    before, after = mask_state(pruned), mask_state(loaded)
    assert before.keys() == after.keys()
    for p in before:
        np.testing.assert_array_equal(before[p][0], after[p][0])
        np.testing.assert_array_equal(before[p][1], after[p][1])
    np.testing.assert_array_equal(predict(loaded, x[:8])[0], predict(pruned, x[:8])[0])
    assert 0 < pruned_fraction(loaded)["conv3"] < 0.5
    # Training without the callback still fails after loading; with it, the schedule goes on.
    with pytest.raises(MissingCallbackError):
        loaded.fit(x, y, epochs=1, batch_size=32, verbose=0)
    compiled(loaded)
    cb = UpdatePruningStep()
    loaded.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[cb])
    assert step_of(loaded) == 16
    assert pruned_fraction(loaded) == {"conv1": 0.5, "conv2": 0.5, "conv3": 0.5, "fc1": 0.5}


def test_mirrored_strategy_fit_reaches_final_sparsity_with_masks_equal_on_every_replica(digits, mirrored_strategy):
    x, y = small_data(digits, 256)
    strategy = mirrored_strategy
    with strategy.scope():
        pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule(0.5, end=8, frequency=2)))
    history = pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[UpdatePruningStep()])
    assert np.isfinite(history.history["loss"]).all()
    assert step_of(pruned) == 16
    assert pruned_fraction(pruned) == {"conv1": 0.5, "conv2": 0.5, "conv3": 0.5, "fc1": 0.5}
    for w in wrapped_layers(pruned).values():
        for var in (w.in_channel_mask, w.out_channel_mask, w.pruning_step):
            replicas = [np.asarray(v) for v in var.values]
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0], replicas[1])
        kernel = w.layer.weights[0]
        np.testing.assert_array_equal(np.asarray(kernel.values[0]), np.asarray(kernel.values[1]))
    np.testing.assert_allclose(predict(pruned, x[:8])[0], predict(strip_pruning(pruned), x[:8])[0], atol=1e-6)


def test_our_schedule_and_tfmots_give_the_same_masks_at_every_epoch(digits):
    from keras_rebuild.schedules import PolynomialDecay

    x, y = small_data(digits, 128)  # 4 steps per epoch
    states = []
    for sched in (schedule(0.5, end=9, frequency=3), PolynomialDecay(0.0, 0.5, begin_step=0, end_step=9, frequency=3)):
        keras.utils.set_random_seed(1)
        pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=sched))
        cb = UpdatePruningStep()
        per_epoch = []
        for _ in range(3):
            pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False, callbacks=[cb])
            per_epoch.append(mask_state(pruned))
        assert type(cb.schedule) is PolynomialDecay  # tfmot's object was read through its config
        states.append(per_epoch)
    for a, b in zip(*states):
        for p in a:
            np.testing.assert_array_equal(a[p][1], b[p][1])
    assert pruned_fraction(pruned) == {"conv1": 0.5, "conv2": 0.5, "conv3": 0.5, "fc1": 0.5}


def test_training_that_ends_before_end_step_warns_once_that_the_model_is_below_target(digits, recwarn):
    x, y = small_data(digits, 128)  # 4 steps per epoch
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule(0.5, end=12, frequency=2)))
    cb = UpdatePruningStep()
    with pytest.warns(UserWarning, match=r"below its target sparsity.*target 50\.0%.*reached at step 12, 9 more steps"):
        pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    recwarn.clear()
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])  # still below: the same callback is quiet
    assert not [w for w in recwarn if "below its target" in str(w.message)]
    cb2 = UpdatePruningStep()
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb2])  # step 16 > 12: target reached
    assert not [w for w in recwarn if "below its target" in str(w.message)]
    assert pruned_fraction(pruned)["conv2"] == 0.5


def test_the_batch_hook_leaves_logs_on_the_device_and_the_step_is_counted_in_the_graph(digits):
    x, y = small_data(digits, 128)

    class Probe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True
            self.log_types, self.steps = set(), []

        def on_train_batch_end(self, batch, logs=None):
            self.log_types.add(type(logs["loss"]).__name__)
            self.steps.append(step_of(self.model))

    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule(0.5, end=6, frequency=2)))
    probe, cb = Probe(), UpdatePruningStep()
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb, probe])
    # Keras would turn every batch's logs into Python floats (a device-to-host copy per batch) for a callback
    # without `_supports_tf_logs`; with ours in the list, the probe still gets tensors.
    assert probe.log_types and not probe.log_types & {"float", "float32", "float64"}, probe.log_types
    assert probe.steps == list(range(1, 9))  # advanced by the training graph itself
    assert cb.step == 8 and pruned_fraction(pruned)["conv2"] == 0.5


def test_between_pruning_steps_the_callback_asks_nothing_of_the_schedule(digits):
    from keras_rebuild.schedules import ConstantSparsity

    class Counting(ConstantSparsity):
        calls = 0

        def sparsity(self, step):
            Counting.calls += 1
            return super().sparsity(step)

        def should_prune(self, step):  # pragma: no cover - must not be called per batch
            raise AssertionError("asked per batch")

    x, y = small_data(digits, 256)  # 8 steps per epoch
    sched = Counting(0.25, begin_step=2, end_step=13, frequency=5)  # prunes at 2, 7, 12
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=sched))
    updates = []
    cb = UpdatePruningStep()
    original = cb.update_masks
    cb.update_masks = lambda s: (updates.append(cb.step), original(s))
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert updates == [2, 7, 12] and Counting.calls == 3 + 1  # + the target check at train end
    assert pruned_fraction(pruned)["conv2"] == 0.25


def test_steps_per_execution_prunes_at_the_first_batch_boundary_after_each_pruning_step(digits):
    x, y = small_data(digits, 256)  # 8 steps per epoch, 2 executions of 4 steps
    pruned = prune_channels(kr.digits_cnn(width=8), pruning_schedule=schedule(0.5, end=10, frequency=5))
    pruned.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", steps_per_execution=4)
    updates = []
    cb = UpdatePruningStep()
    original = cb.update_masks
    cb.update_masks = lambda s: (updates.append(cb.step), original(s))
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert updates == [0, 8, 12]  # scheduled at 0, 5, 10
    assert step_of(pruned) == 16
    assert pruned_fraction(pruned)["conv2"] == 0.5


# ----------------------------------------------------------------------------- coming from tfmot
@pytest.mark.parametrize("name,value,advice", [
    ("block_size", (1, 4), "round_to"),
    ("block_pooling_type", "AVG", "criterion"),
    ("sparsity_m_by_n", (2, 4), "prune_low_magnitude"),
    ("pruning_policy", object(), "ignore"),
])
def test_tfmot_only_arguments_are_named_with_what_to_do_instead(name, value, advice):
    with pytest.raises(InvalidArgumentError, match=rf"`{name}` does not apply.*{advice}.*Received: {name}="):
        prune_channels(kr.digits_cnn(width=8), sparsity=0.5, **{name: value})
    with pytest.raises(InvalidArgumentTypeError, match="unknown keyword arguments: \\['blocksize'\\]"):
        prune_channels(kr.digits_cnn(width=8), sparsity=0.5, blocksize=2)


def test_a_single_layer_gets_an_error_that_points_to_ignore():
    from keras_rebuild.errors import NotAModelError

    model = kr.digits_cnn(width=8)
    with pytest.raises(NotAModelError, match=r"ignore=.*Received: model=Conv2D object \(layer 'conv2'\)"):
        prune_channels(model.get_layer("conv2"), sparsity=0.5)


def test_pruning_a_model_with_nothing_prunable_warns():
    inp = keras.Input((8,))
    model = keras.Model(inp, keras.layers.Dense(4, name="only")(inp))
    with pytest.warns(UserWarning, match="nothing in model .* can be pruned"):
        pruned = prune_channels(model, sparsity=0.5)
    assert not wrapped_layers(pruned)


# ----------------------------------------------------------------------------- options
def test_ignore_leaves_the_named_layer_whole():
    model = kr.digits_cnn()
    pruned = prune_channels(model, sparsity=0.5, ignore=["conv2"])
    small = kr.rebuild(pruned)
    # conv2 keeps all its input and output channels (so conv1's output group stays whole too).
    assert small.get_layer("conv2").get_weights()[0].shape == (3, 3, 32, 32)
    assert small.get_layer("conv1").filters == 32
    assert small.get_layer("conv3").filters == 32
    assert small.get_layer("fc1").units == 32
    with pytest.raises(InvalidArgumentError, match="conv_2"):
        prune_channels(model, sparsity=0.5, ignore=["conv_2"])


def test_round_to_gives_channel_counts_that_are_multiples_after_rebuild():
    model = kr.digits_cnn(width=24)
    small = kr.rebuild(prune_channels(model, sparsity=0.6, round_to=8))
    counts = [small.get_layer(n).filters for n in ("conv1", "conv2", "conv3")] + [small.get_layer("fc1").units]
    assert all(c % 8 == 0 for c in counts), counts
    assert counts[0] < 24 and counts[2] < 48


def test_bn_l1_shrinks_batchnorm_gammas_compared_to_no_penalty(digits):
    x, y = small_data(digits, 256)
    sums = {}
    for coef in (0.0, 0.1):
        keras.utils.set_random_seed(0)
        pruned = compiled(prune_channels(kr.digits_cnn(width=8), sparsity=0.0, bn_l1=coef), lr=1e-2)
        gammas = lambda: [pruned.get_layer(f"bn{i}").layer.get_weights()[0] for i in (1, 2, 3)]  # noqa: E731
        if coef:
            assert len(pruned.losses) == 3  # one penalty per wrapped BatchNorm
            expected = coef * sum(np.abs(g).sum() for g in gammas())
            assert float(sum(pruned.losses)) == pytest.approx(expected, rel=1e-5)
        else:
            assert not pruned.losses
        pruned.fit(x, y, epochs=4, batch_size=32, verbose=0)
        sums[coef] = sum(np.abs(g).sum() for g in gammas())
    assert sums[0.1] < 0.85 * sums[0.0], sums


def test_invalid_arguments_raise_keras_style_errors():
    model = kr.digits_cnn(width=8)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        prune_channels(model)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        prune_channels(model, sparsity=0.5, pruning_schedule=schedule())
    with pytest.raises(InvalidArgumentError, match=r"Received: sparsity=1.5"):
        prune_channels(model, sparsity=1.5)
    bad = schedule(0.5)
    bad.final_sparsity = 1.0
    with pytest.raises(InvalidArgumentError, match="final_sparsity=1.0"):
        prune_channels(model, pruning_schedule=bad)
    with pytest.raises(InvalidArgumentError, match="bn_l1"):
        prune_channels(model, sparsity=0.5, bn_l1=-1.0)
    with pytest.raises(InvalidArgumentError, match="scope"):
        prune_channels(model, pruning_schedule=schedule(), scope="everywhere")
    with pytest.raises(InvalidArgumentTypeError):
        prune_channels(model, pruning_schedule=0.5)
    with pytest.raises(InvalidArgumentError, match="strip_pruning"):
        prune_channels(prune_channels(model, sparsity=0.5), sparsity=0.5)


def test_nested_backbone_layers_are_wrapped_stripped_and_rebuilt():
    inner_in = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inner_in)
    h = keras.layers.BatchNormalization(name="b1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(16, 3, padding="same", name="c2")(h)
    backbone = keras.Model(inner_in, h, name="backbone")
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(backbone(inp)))
    model = keras.Model(inp, out)
    pruned = prune_channels(model, sparsity=0.5)
    assert {"backbone/c1", "backbone/b1", "backbone/c2", "head"} <= set(wrapped_layers(pruned))
    stripped = strip_pruning(pruned)
    assert weights_digest(strip_pruning(stripped)) == weights_digest(stripped)
    small = kr.rebuild(pruned)
    assert small.get_layer("backbone").get_layer("c1").filters == 8
    assert_models_close(small, stripped, random_inputs(model, batch=4), atol=1e-5)
    assert_models_close(pruned, stripped, random_inputs(model, batch=4), atol=1e-6)


# ----------------------------------------------------------------------------- tfmot interplay
def test_tfmot_prune_low_magnitude_model_is_rebuilt_exactly_like_tfmot_strip(digits):
    x, y = small_data(digits, 128)
    sparsity = tfmot().sparsity.keras
    model = kr.digits_cnn(width=8)
    pruned = sparsity.prune_low_magnitude(model, pruning_schedule=sparsity.ConstantSparsity(0.8, 0, frequency=1))
    compiled(pruned)
    pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[sparsity.UpdatePruningStep()])
    reference = sparsity.strip_pruning(pruned)
    small = kr.rebuild(pruned)
    assert small.count_params() <= reference.count_params()
    assert_models_close(small, reference, x[:16], atol=1e-5)


def test_channels_first_then_tfmot_2_by_4_sparsity_trains_and_strips(digits):
    x, y = small_data(digits, 128)
    sparsity = tfmot().sparsity.keras
    small = kr.rebuild(prune_channels(kr.digits_cnn(), sparsity=0.5))
    assert small.get_layer("conv2").filters == 16
    sparse = sparsity.prune_low_magnitude(
        small, pruning_schedule=sparsity.ConstantSparsity(0.5, 0, frequency=1), sparsity_m_by_n=(2, 4))
    compiled(sparse)
    sparse.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[sparsity.UpdatePruningStep()])
    final = sparsity.strip_pruning(sparse)
    kernel = final.get_layer("conv2").get_weights()[0]  # (3, 3, 16 in, 16 out): 2:4 along the input axis
    blocks = np.moveaxis(kernel, 2, -1).reshape(-1, 4)
    assert np.all((blocks != 0).sum(axis=1) <= 2)
    assert final.get_layer("conv2").filters == 16
    assert_models_close(final, sparse, x[:8], atol=1e-5)


# ----------------------------------------------------------------------------- acceptance
def test_digits_cnn_pruned_to_half_the_channels_stays_within_one_point_of_unpruned(digits):
    (x, y), (xt, yt) = digits
    epochs, batch = 20, 32
    steps = epochs * int(np.ceil(len(x) / batch))
    accuracy = {}
    for kind in ("unpruned", "pruned"):
        keras.utils.set_random_seed(0)
        model = kr.digits_cnn()
        callbacks = []
        if kind == "pruned":
            model = prune_channels(model, pruning_schedule=schedule(0.5, end=int(0.4 * steps), frequency=steps // 20))
            callbacks = [UpdatePruningStep()]
        compiled(model, lr=1e-3)  # 3e-3 ends on a noisy epoch (95.5% pruned, 99.1% unpruned with seed 0)
        model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0, callbacks=callbacks)
        accuracy[kind] = model.evaluate(xt, yt, verbose=0)[1]
        if kind == "pruned":
            small, report = kr.rebuild(model, return_report=True)
            assert report.macs_ratio <= 0.5
            compiled(small)
            assert small.evaluate(xt, yt, verbose=0)[1] == pytest.approx(accuracy["pruned"], abs=1e-6)
    print(f"digits accuracy: unpruned {accuracy['unpruned']:.4f}, pruned {accuracy['pruned']:.4f}, "
          f"MACs ratio {report.macs_ratio:.3f}")
    assert accuracy["unpruned"] > 0.95
    assert accuracy["pruned"] >= accuracy["unpruned"] - 0.01


ZOO = [
    ("VGG16", 32), ("ResNet50", 32), ("ResNet50V2", 32), ("MobileNet", 32), ("MobileNetV2", 32),
    ("MobileNetV3Small", 32), ("MobileNetV3Large", 32), ("EfficientNetB0", 32), ("EfficientNetV2B0", 32),
    ("DenseNet121", 32), ("Xception", 71), ("InceptionV3", 75), ("NASNetMobile", 32), ("ConvNeXtTiny", 32),
    ("RegNetX002", 32),
]


@pytest.mark.zoo
@pytest.mark.parametrize("name,size", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_prune_half_then_strip_and_rebuild_are_exact_and_smaller(name, size):
    builder = getattr(keras.applications, name)
    model = builder(weights=None, input_shape=(size, size, 3))
    pruned = prune_channels(model, sparsity=0.5)
    stripped = strip_pruning(pruned)
    assert [type(layer) for layer in stripped.layers] == [type(layer) for layer in model.layers]
    assert_weights_unchanged_or_zero(stripped, model)
    small = kr.rebuild(pruned)
    assert small.count_params() < 0.75 * model.count_params()
    x = random_inputs(model, batch=2, seed=1)
    assert_models_close(small, stripped, x, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- TensorBoard
def read_scalars(log_dir):
    """``{tag: [(step, value), ...]}`` from the event files under ``log_dir``."""
    import glob

    out = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                out.setdefault(value.tag, []).append((int(event.step), number))
    return out


def test_pruning_summaries_log_each_layers_channel_sparsity_the_total_and_the_target(digits, tmp_path):
    from keras_rebuild.callbacks import PruningSummaries, channel_sparsity
    from keras_rebuild.schedules import PolynomialDecay

    x, y = small_data(digits, 128)  # 4 steps per epoch
    sched = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=8, frequency=2)
    pruned = compiled(prune_channels(kr.digits_cnn(width=8), pruning_schedule=sched))
    pruned.fit(x, y, epochs=3, batch_size=32, verbose=0,
               callbacks=[UpdatePruningStep(), PruningSummaries(tmp_path, update_freq=2)])
    scalars = read_scalars(tmp_path / "pruning")
    layers = {t.split("/")[-1] for t in scalars if t.startswith("pruning/channel_sparsity/")}
    assert layers == {"conv1", "conv2", "conv3", "fc1", "probs"}  # the layers writing channels
    steps = [s for s, _ in scalars["pruning/target_sparsity"]]
    assert steps == [2, 4, 4, 6, 8, 8, 10, 12, 12]  # every 2 steps, and at each epoch end
    for step, value in scalars["pruning/target_sparsity"]:
        assert value == pytest.approx(sched.sparsity(step), abs=1e-6)
    final = channel_sparsity(pruned)
    assert scalars["pruning/channel_sparsity/conv2"][-1] == (12, pytest.approx(0.5))
    assert scalars["pruning/channel_sparsity/probs"][-1][1] == 0.0
    assert scalars["pruning/channel_sparsity_total"][-1][1] == pytest.approx(final["total"])
    assert 0.4 < final["total"] < 0.5  # the output layer keeps its 10 channels
    totals = [v for _, v in scalars["pruning/channel_sparsity_total"]]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    with pytest.raises(InvalidArgumentError, match="update_freq"):
        PruningSummaries(tmp_path, update_freq="batch")
