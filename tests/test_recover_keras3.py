"""recover / recalibrate_batchnorm on the flavour and backend under test (Keras 3 on every backend).

The same promises as tests/test_recover.py (which tests the tf_keras path in
depth, with tf.data and tf.distribute): the arguments of ``fit``, the
``History``, callbacks that see and save the student, distillation from the
unpruned teacher, BatchNormalization recalibration, and the digits
acceptance (60% of channels pruned, within 1 point at half the parameters).
Kept fast: one trained digits CNN per session, few epochs.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, NotAModelError
from keras_rebuild.recover import recalibrate_batchnorm, recover
from keras_rebuild.testing import flavour_keras, weights_digest

keras = flavour_keras()
FLAVOUR = os.environ.get("KERAS_REBUILD_FLAVOUR", "keras3")
BACKEND = keras.backend.backend()
LR = 3e-3


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits():
    return kr.load_digits()


@pytest.fixture(scope="session")
def trained(digits):
    """The digits CNN trained once per session (about 99% test accuracy); tests never modify it."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = kr.digits_cnn(flavour=FLAVOUR)
    model.compile(keras.optimizers.Adam(LR), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=128, verbose=0)
    return model


def compiled(model, lr=LR, loss="sparse_categorical_crossentropy", **kwargs):
    model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"], **kwargs)
    return model


def student(width=8, seed=0):
    return compiled(kr.digits_cnn(width=width, seed=seed, flavour=FLAVOUR))


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def to_np(variable):
    """A variable's value as NumPy, in either flavour."""
    return np.array(variable.numpy())


def trainable_arrays(model):
    return [to_np(w) for w in model.trainable_weights]


def tiny_mlp(activation, seed=0, name="tiny"):
    init = keras.initializers.GlorotUniform(seed=seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", kernel_initializer=init)(inp)
    out = keras.layers.Dense(4, activation=activation, kernel_initializer=init)(h)
    return keras.Model(inp, out, name=name)


def tiny_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0).astype("int64")
    return x, y


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


def test_recover_checks_its_arguments(trained):
    with pytest.raises(InvalidArgumentError, match=r"'digits_cnn' is not compiled.*model\.compile"):
        recover(kr.digits_cnn(width=4, flavour=FLAVOUR), epochs=1)
    with pytest.raises(NotAModelError, match="Received: model="):
        recover("model")
    s = student(4)
    with pytest.raises(NotAModelError, match="Received: teacher="):
        recover(s, teacher=object())
    with pytest.raises(InvalidArgumentError, match="different model"):
        recover(s, teacher=s)
    with pytest.raises(InvalidArgumentError, match=r"shape of student output 0.*Received"):
        recover(s, teacher=kr.digits_cnn(width=4, num_classes=7, flavour=FLAVOUR))
    with pytest.raises(InvalidArgumentError, match="Received: temperature=0"):
        recover(s, teacher=trained, temperature=0)
    with pytest.raises(InvalidArgumentTypeError, match="Received: temperature='4'"):
        recover(s, teacher=trained, temperature="4")
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\]. Received: distillation_weight=1.5"):
        recover(s, teacher=trained, distillation_weight=1.5)
    gen = (np.zeros((4, 8, 8, 1), "float32") for _ in range(3))
    with pytest.raises(InvalidArgumentError, match="re-readable"):
        recover(s, gen, recalibrate_bn=True, epochs=1, steps_per_epoch=2)


# --------------------------------------------------------------------------
# fit compatibility: History, callbacks, the student restored
# --------------------------------------------------------------------------


def test_distillation_keeps_fit_promises_and_callbacks_save_the_student(digits, trained, tmp_path):
    (x, y), _ = digits
    x, y = x[:320], y[:320]
    model = student()
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(self.model)

    path = str(tmp_path / "student.keras")
    checkpoint = keras.callbacks.ModelCheckpoint(path, monitor="val_loss", save_best_only=False)
    stopper = keras.callbacks.EarlyStopping(monitor="val_distillation_loss", mode="min", patience=5)
    history = recover(model, x, y, teacher=trained, epochs=2, batch_size=64, validation_split=0.2,
                      callbacks=[Spy(), checkpoint, stopper], verbose=0)

    assert isinstance(history, keras.callbacks.History)
    assert history.model is model and seen == [model]
    assert history.epoch == [0, 1]
    assert set(history.history) == {
        "loss", "accuracy", "distillation_loss", "val_loss", "val_accuracy", "val_distillation_loss"}
    assert all(np.isfinite(v) for values in history.history.values() for v in values)
    assert stopper.model is model and not model.stop_training
    # "val_loss" is the student's compiled loss: what evaluate reports.
    n_val = len(x) - int(np.floor(len(x) * 0.8))
    val_loss, _ = model.evaluate(x[-n_val:], y[-n_val:], batch_size=64, verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], val_loss, rtol=1e-4)
    # ModelCheckpoint saved the student itself: same layers, same outputs, no teacher inside.
    saved = keras.models.load_model(path)
    assert [layer.name for layer in saved.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(saved.predict(x[:32], verbose=0), model.predict(x[:32], verbose=0), atol=1e-5)
    # Nothing of the distillation is left on the student: plain fit is plain again.
    assert "compute_loss" not in vars(model) and "compute_metrics" not in vars(model)
    assert not any("distillation" in m.name for m in model.metrics)
    again = model.fit(x[:64], y[:64], epochs=1, verbose=0)
    assert set(again.history) == {"loss", "accuracy"}


def test_plain_fine_tuning_is_fit(digits):
    (x, y), (xt, yt) = digits
    model = student()
    history = recover(model, x[:512], y[:512], epochs=2, batch_size=64, validation_data=(xt, yt), verbose=0)
    assert history.model is model
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history.history["loss"][1] < history.history["loss"][0]


def test_teacher_frozen_student_trained_optimizer_carries_on(digits, trained):
    (x, y), _ = digits
    model = student()
    model.fit(x[:64], y[:64], epochs=1, batch_size=64, verbose=0)
    iterations = int(to_np(model.optimizer.iterations))
    teacher_before = weights_digest(trained)
    before = trainable_arrays(model)
    recover(model, x[:256], y[:256], teacher=trained, epochs=1, batch_size=64, verbose=0)
    assert weights_digest(trained) == teacher_before and trained.trainable
    assert all(not np.array_equal(a, b) for a, b in zip(before, trainable_arrays(model)))
    assert int(to_np(model.optimizer.iterations)) == iterations + 4


def test_zero_sample_weights_remove_both_losses(digits, trained):
    (x, y), _ = digits
    x, y = x[:256], y[:256]
    model = student()
    before = trainable_arrays(model)
    history = recover(model, x, y, teacher=trained, sample_weight=np.zeros(len(x), "float32"),
                      epochs=1, batch_size=64, verbose=0)
    assert history.history["distillation_loss"] == [0.0]
    for a, b in zip(before, trainable_arrays(model)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# distillation maths
# --------------------------------------------------------------------------


def _reference_kd(student_logits, teacher_logits, t):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = log_softmax(student_logits / t), log_softmax(teacher_logits / t)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)) * t * t)


@pytest.mark.parametrize("teacher_activation, student_activation", [("softmax", "softmax"), (None, None)])
def test_distillation_loss_is_hintons(teacher_activation, student_activation):
    """With lr=0 the reported loss is T^2 KL(teacher_T || student_T), from probabilities or logits."""
    x, y = tiny_data()
    t = 3.0
    teacher = tiny_mlp(teacher_activation, seed=1, name="teacher")
    model = tiny_mlp(student_activation, seed=2)
    from_logits = student_activation is None
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))

    def raw_logits(m):
        kernel, bias = m.layers[-1].get_weights()
        hidden = keras.Model(m.inputs, m.layers[-2].output).predict(x, verbose=0)
        return hidden @ kernel + bias

    expected = _reference_kd(raw_logits(model), raw_logits(teacher), t)
    history = recover(model, x, y, teacher=teacher, temperature=t, epochs=1, batch_size=128, verbose=0)
    np.testing.assert_allclose(history.history["distillation_loss"][0], expected, rtol=1e-3)


def test_label_free_distillation_learns_from_the_teacher(digits, trained):
    (x, y), (xt, yt) = digits
    model = student()
    history = recover(model, x, teacher=trained, epochs=4, batch_size=64, verbose=0)
    losses = history.history["distillation_loss"]
    assert losses[-1] < losses[0]
    recalibrate_batchnorm(model, x)
    assert accuracy(model, xt, yt) > 0.8  # learned the labels from the teacher only


def _two_heads(seed=0, width=8, name="two_heads"):
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(width, 3, activation="relu", kernel_initializer=init(0))(inp)
    h = keras.layers.Flatten()(h)
    cls = keras.layers.Dense(10, activation="softmax", kernel_initializer=init(1), name="cls")(h)
    reg = keras.layers.Dense(2, kernel_initializer=init(2), name="reg")(h)
    return keras.Model(inp, [cls, reg], name=name)


def test_multi_output_distillation_reports_each_output(digits):
    (x, y), _ = digits
    x, y = x[:512], y[:512]
    reg_target = np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], -1)
    teacher = _two_heads(seed=10, width=16, name="teacher")
    teacher.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    teacher.fit(x, [y, reg_target], epochs=3, batch_size=64, verbose=0)
    model = _two_heads()
    model.compile(keras.optimizers.Adam(LR), ["sparse_categorical_crossentropy", "mse"])
    history = recover(model, x, [y, reg_target], teacher=teacher, epochs=3, batch_size=64,
                      validation_split=0.25, verbose=0)
    hh = history.history
    assert {"loss", "distillation_loss", "cls_distillation_loss", "reg_distillation_loss",
            "val_reg_distillation_loss"} <= set(hh)
    np.testing.assert_allclose(
        hh["distillation_loss"], np.add(hh["cls_distillation_loss"], hh["reg_distillation_loss"]), rtol=1e-4)
    assert hh["reg_distillation_loss"][-1] < hh["reg_distillation_loss"][0]


# --------------------------------------------------------------------------
# BatchNormalization recalibration
# --------------------------------------------------------------------------


def test_bn_recalibration_nested_frozen_exact_population_statistics():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 5)) * [1, 2, 3, 4, 5] + [5, -1, 0, 2, 9]).astype("float32")
    inner = keras.Sequential([keras.Input((5,)), keras.layers.BatchNormalization(name="inner_bn"),
                              keras.layers.Dense(3)], name="inner")
    inner.trainable = False
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(2)(inner(inp)), name="outer")
    bn = inner.get_layer("inner_bn")
    momentum = bn.momentum
    others = {w.name + str(i): to_np(w) for i, w in enumerate(model.weights)
              if w is not bn.moving_mean and w is not bn.moving_variance}

    assert recalibrate_batchnorm(model, x, steps=None, batch_size=64) == 1

    np.testing.assert_allclose(to_np(bn.moving_mean), x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(bn.moving_variance), x.var(0), rtol=1e-4)
    assert bn.momentum == momentum and not bn.trainable and not inner.trainable
    after = {w.name + str(i): to_np(w) for i, w in enumerate(model.weights)
             if w is not bn.moving_mean and w is not bn.moving_variance}
    for key, value in others.items():
        np.testing.assert_array_equal(value, after[key])


def test_recalibrate_bn_uses_the_training_part_of_validation_split(digits):
    (x, y), _ = digits
    inp = keras.Input((8, 8, 1))
    bn = keras.layers.BatchNormalization()
    model = compiled(keras.Model(inp, keras.layers.Dense(10, activation="softmax")(
        keras.layers.Flatten()(bn(inp)))))
    x = x[:600].copy()
    x[-100:] += 10.0  # the validation part is far off
    at_train_begin = []
    grab = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: at_train_begin.append(np.array(to_np(bn.moving_mean))))
    recover(model, x, y[:600], recalibrate_bn=True, recalibration_steps=1000, batch_size=64,
            validation_split=100 / len(x), epochs=1, callbacks=[grab], verbose=0)
    np.testing.assert_allclose(at_train_begin[0], [x[:500].mean()], rtol=1e-5)


def test_bn_recalibration_repairs_corrupted_statistics(digits, trained):
    (x, y), (xt, yt) = digits
    model = keras.models.clone_model(trained)
    model.set_weights(trained.get_weights())
    reference = accuracy(model, xt, yt)
    for name in ("bn1", "bn2", "bn3"):
        gamma, beta, mean, var = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([gamma, beta, mean + 5.0, var * 50.0])
    assert accuracy(model, xt, yt) < 0.5
    assert recalibrate_batchnorm(model, x, steps=None, batch_size=64) == 3
    assert accuracy(model, xt, yt) >= reference - 0.02


# --------------------------------------------------------------------------
# acceptance: digits, 60% of channels, within 1 point at no more than half the parameters
# --------------------------------------------------------------------------


def test_pruned_60_percent_recovers_within_one_point_at_half_the_params(digits, trained):
    (x, y), (xt, yt) = digits
    dense = accuracy(trained, xt, yt)
    small = kr.rebuild(trained, kr.select_channels(trained, sparsity=0.6))
    assert small.count_params() <= 0.5 * trained.count_params()
    compiled(small, lr=3e-3)
    keras.utils.set_random_seed(1)
    recover(small, x, y, teacher=trained, epochs=12, batch_size=64, verbose=0)
    recovered = accuracy(small, xt, yt)
    assert dense > 0.97
    assert recovered >= dense - 0.01, (dense, recovered, small.count_params(), trained.count_params())


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow is the backend here")
def test_recover_imports_no_tensorflow(digits, monkeypatch):
    """A JAX or torch user's recover (distillation + recalibration) never imports TensorFlow or tf_keras.

    The modules are made unimportable for the test (a plugin of the test run may have loaded them).
    """
    for name in ("tensorflow", "tf_keras", "keras_rebuild._compat", "keras_rebuild.recover._tf_keras"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    (x, y), _ = digits
    teacher = kr.digits_cnn(width=8, flavour=FLAVOUR)
    model = student(4)
    recover(model, x[:128], y[:128], teacher=teacher, recalibrate_bn=True, epochs=1, batch_size=64,
            validation_data=(x[:64], y[:64]), verbose=0)
    assert recalibrate_batchnorm(model, x[:64]) == 3


# --------------------------------------------------------------------------
# distribution: tf.distribute.MirroredStrategy (TensorFlow), keras.distribution.DataParallel (JAX)
# --------------------------------------------------------------------------


def _regularised_mlp(seed=2, name="student"):
    init = keras.initializers.GlorotUniform(seed=seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", kernel_initializer=init,
                           kernel_regularizer=keras.regularizers.L2(1e-2))(inp)
    out = keras.layers.Dense(4, activation="softmax", kernel_initializer=init)(h)
    return keras.Model(inp, out, name=name)


def _distil_tiny(strategy=None):
    x, y = tiny_data(n=128)
    with strategy.scope() if strategy is not None else _no_scope():
        teacher = tiny_mlp("softmax", seed=1, name="teacher")
        model = _regularised_mlp()
        model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    history = recover(model, x, y, teacher=teacher, epochs=2, batch_size=32, shuffle=False, verbose=0)
    return model, history.history


class _no_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs TensorFlow")
def test_distillation_under_mirrored_strategy_equals_one_device(mirrored_strategy):
    """Two replicas, each on half of every batch, take the single-device steps: losses scaled per replica."""
    assert mirrored_strategy.num_replicas_in_sync == 2
    initial = trainable_arrays(_regularised_mlp())
    single, h_single = _distil_tiny()
    mirrored, h_mirrored = _distil_tiny(mirrored_strategy)
    assert mirrored.distribute_strategy is mirrored_strategy
    assert set(h_mirrored) == set(h_single) == {"loss", "distillation_loss"}
    for key in h_single:
        np.testing.assert_allclose(h_mirrored[key], h_single[key], rtol=1e-4)
    for a, b, start in zip(trainable_arrays(mirrored), trainable_arrays(single), initial):
        assert np.abs(b - start).max() > 1e-2  # it trained
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs TensorFlow")
def test_bn_recalibration_under_mirrored_strategy_equals_one_device(digits, mirrored_strategy):
    (x, _), _ = digits
    single = kr.digits_cnn(width=4, flavour=FLAVOUR)
    with mirrored_strategy.scope():
        mirrored = kr.digits_cnn(width=4, flavour=FLAVOUR)
    for model in (single, mirrored):
        assert recalibrate_batchnorm(model, x[:300], steps=None, batch_size=64) == 3
    for name in ("bn1", "bn2", "bn3"):
        a, b = mirrored.get_layer(name), single.get_layer(name)
        assert not np.allclose(to_np(b.moving_variance), 1.0)  # recalibrated, not the initial value
        np.testing.assert_allclose(to_np(a.moving_mean), to_np(b.moving_mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(to_np(a.moving_variance), to_np(b.moving_variance), rtol=1e-5, atol=1e-6)


DATA_PARALLEL = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import numpy as np
    import keras_rebuild as kr
    from keras_rebuild.recover import recover

    def cnn(width, seed, name):
        init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)
        inp = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=init(0))(inp)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        out = keras.layers.Dense(10, activation="softmax", kernel_initializer=init(1))(h)
        return keras.Model(inp, out, name=name)

    def run():  # seeded initialisers, no dropout, no shuffling: nothing random
        teacher = cnn(8, 10, "teacher")
        student = cnn(4, 0, "student")
        student.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
        history = recover(student, x, y, teacher=teacher, recalibrate_bn=True, epochs=2, batch_size=64,
                          shuffle=False, verbose=0)
        return student, history

    (x, y), _ = kr.load_digits()
    x, y = x[:256], y[:256]
    initial = [np.asarray(w) for w in cnn(4, 0, "initial").get_weights()]
    plain, h_plain = run()
    with keras.distribution.DataParallel(devices=jax.devices()).scope():
        spread, h_spread = run()
        devices = min(len(v.value.sharding.device_set) for v in spread.variables)
    print("RESULT", json.dumps({
        "devices": len(jax.devices()), "variable_devices": devices,
        "history_model_is_student": h_spread.model is spread,
        "plain": h_plain.history, "spread": h_spread.history,
        "weight_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                           for a, b in zip(plain.get_weights(), spread.get_weights())),
        "trained": min(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(spread.get_weights(), initial)),
        "tensorflow": "tensorflow" in sys.modules,
    }))
""")


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on two host devices: a JAX process")
def test_recover_under_data_parallel_on_two_jax_devices_equals_one_device():
    """Distillation + BN recalibration under DataParallel (2 host devices) give the single-device model."""
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["devices"] == 2 and result["variable_devices"] == 2
    assert result["history_model_is_student"]
    assert set(result["spread"]) == {"loss", "accuracy", "distillation_loss"}
    for key, values in result["plain"].items():
        np.testing.assert_allclose(result["spread"][key], values, rtol=1e-4, atol=1e-6)
    assert result["trained"] > 1e-3  # every weight moved: trained, and moving statistics recalibrated
    assert result["weight_diff"] < 1e-4
    assert result["tensorflow"] is False
