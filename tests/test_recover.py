"""Tests for keras_rebuild.recover: fine-tuning, distillation, BN recalibration."""
import numpy as np
import pytest

from tests.conftest import weights_digest
from keras_rebuild._compat import keras, tf
from keras_rebuild.data import digits_cnn, load_digits
from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NotAModelError,
)
from keras_rebuild.recover import recalibrate_batchnorm, recover

TEACHER_WIDTH = 32
LR = 3e-3


# --------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def teacher_weights(digits):
    """Weights of a digits_cnn trained to ~98% test accuracy (trained once)."""
    (x, y), _ = digits
    keras.utils.set_random_seed(7)
    model = digits_cnn(width=TEACHER_WIDTH)
    model.compile(keras.optimizers.Adam(LR), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    weights = model.get_weights()
    keras.backend.clear_session()
    return weights


def compiled(model, lr=LR, loss="sparse_categorical_crossentropy", **kwargs):
    model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"], **kwargs)
    return model


def make_teacher(weights):
    teacher = digits_cnn(width=TEACHER_WIDTH)
    teacher.set_weights(weights)
    return teacher


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def damage(model, fraction=0.6, seed=0):
    """Zero a random `fraction` of each conv's output channels (kernel + BN gamma/beta)."""
    rng = np.random.default_rng(seed)
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
        kernel = model.get_layer(conv).get_weights()[0]
        n = kernel.shape[-1]
        dead = rng.choice(n, size=int(round(fraction * n)), replace=False)
        kernel[..., dead] = 0.0
        model.get_layer(conv).set_weights([kernel])
        gamma, beta, mean, var = model.get_layer(bn).get_weights()
        gamma[dead] = 0.0
        beta[dead] = 0.0
        model.get_layer(bn).set_weights([gamma, beta, mean, var])
    return model


def bn_stat_ids(model):
    return {
        id(v)
        for layer in model.submodules
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    }


def tiny_mlp(activation, seed=0, name="tiny"):
    init = keras.initializers.GlorotUniform(seed=seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", kernel_initializer=init)(inp)
    out = keras.layers.Dense(4, activation=activation, kernel_initializer=init)(h)
    return keras.Model(inp, out, name=name)


def tiny_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0).astype("int64")
    return x, y


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


def test_uncompiled_model_raises_naming_the_model(digits):
    (x, y), _ = digits
    model = digits_cnn(width=4)
    with pytest.raises(InvalidArgumentError, match=r"'digits_cnn' is not compiled.*model\.compile"):
        recover(model, x, y, epochs=1)


def test_not_a_model_raises():
    with pytest.raises(NotAModelError, match="Received: model="):
        recover("model")
    student = compiled(digits_cnn(width=4))
    with pytest.raises(NotAModelError, match="Received: teacher="):
        recover(student, teacher=object())


@pytest.mark.parametrize("value", [-1, 0, float("nan"), float("inf")])
def test_bad_temperature_value(value):
    student, teacher = compiled(digits_cnn(width=4)), digits_cnn(width=8)
    with pytest.raises(InvalidArgumentError) as info:
        recover(student, teacher=teacher, temperature=value)
    assert str(info.value) == (
        f"Expected `temperature` to be a positive number. Received: temperature={value!r}"
    )


@pytest.mark.parametrize("value", ["4", None, True])
def test_bad_temperature_type(value):
    student, teacher = compiled(digits_cnn(width=4)), digits_cnn(width=8)
    with pytest.raises(InvalidArgumentTypeError, match=f"Received: temperature={value!r}"):
        recover(student, teacher=teacher, temperature=value)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_bad_distillation_weight(value):
    student, teacher = compiled(digits_cnn(width=4)), digits_cnn(width=8)
    with pytest.raises(InvalidArgumentError, match=rf"\[0, 1\]. Received: distillation_weight={value}"):
        recover(student, teacher=teacher, distillation_weight=value)


def test_teacher_output_mismatch_raises():
    student = compiled(digits_cnn(width=4))
    with pytest.raises(InvalidArgumentError, match=r"shape of student output 0.*Received"):
        recover(student, teacher=digits_cnn(width=4, num_classes=7))
    with pytest.raises(InvalidArgumentError, match="as many outputs"):
        recover(student, teacher=_two_output_model())
    with pytest.raises(InvalidArgumentError, match="same model|different model"):
        recover(student, teacher=student)


def test_recalibrate_bn_refuses_generators(digits):
    (x, y), _ = digits
    model = compiled(digits_cnn(width=4))
    gen = ((x[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32))
    with pytest.raises(InvalidArgumentError, match="re-readable"):
        recover(model, gen, recalibrate_bn=True, epochs=1, steps_per_epoch=5)


# --------------------------------------------------------------------------
# fit compatibility
# --------------------------------------------------------------------------


def test_plain_fine_tuning_history(digits):
    (x, y), (xt, yt) = digits
    model = compiled(digits_cnn(width=8))
    history = recover(model, x, y, epochs=2, batch_size=64, validation_data=(xt, yt), verbose=0)
    assert isinstance(history, keras.callbacks.History)
    assert history.model is model
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history.epoch == [0, 1]
    assert history.history["loss"][1] < history.history["loss"][0]


def test_distillation_history_keys_and_model_is_student(digits, teacher_weights):
    (x, y), (xt, yt) = digits
    student = compiled(digits_cnn(width=8))
    teacher = make_teacher(teacher_weights)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(self.model)

    history = recover(
        student, x, y, teacher=teacher, epochs=2, batch_size=64,
        validation_split=0.2, callbacks=[Spy()], verbose=0,
    )
    assert set(history.history) == {
        "loss", "accuracy", "distillation_loss",
        "val_loss", "val_accuracy", "val_distillation_loss",
    }
    assert history.model is student and seen == [student]
    assert all(np.isfinite(v) for vals in history.history.values() for v in vals)
    # val_loss is the student's compiled loss, i.e. what evaluate reports.
    n_val = len(x) - int(np.floor(len(x) * 0.8))
    val_loss, _ = student.evaluate(x[-n_val:], y[-n_val:], batch_size=64, verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], val_loss, rtol=1e-4)
    # The student's own train_step is back: plain fit reports no distillation.
    assert "train_step" not in student.__dict__
    again = student.fit(x[:64], y[:64], epochs=1, verbose=0)
    assert set(again.history) == {"loss", "accuracy"}


def test_student_weights_change_teacher_frozen(digits, teacher_weights):
    (x, y), _ = digits
    student = compiled(digits_cnn(width=8))
    teacher = make_teacher(teacher_weights)
    teacher_before = weights_digest(teacher)
    student_before = [w.copy() for w in student.get_weights()]
    recover(student, x, y, teacher=teacher, epochs=1, batch_size=64, verbose=0)
    assert weights_digest(teacher) == teacher_before  # BN moving stats included
    assert teacher.trainable
    changed = [not np.array_equal(a, b) for a, b in zip(student_before, student.get_weights())]
    assert all(changed)  # every kernel, bias, gamma, beta and moving stat moved


def test_callbacks_can_stop_training(digits, teacher_weights):
    (x, y), _ = digits
    student = compiled(digits_cnn(width=8))

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    history = recover(
        student, x, y, teacher=make_teacher(teacher_weights), epochs=5,
        batch_size=64, callbacks=[StopAfterFirstEpoch()], verbose=0,
    )
    assert history.epoch == [0]


def test_tf_data_input_with_recalibration(digits, teacher_weights):
    (x, y), (xt, yt) = digits
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2048, seed=0).batch(64)
    val = tf.data.Dataset.from_tensor_slices((xt, yt)).batch(128)
    student = compiled(digits_cnn(width=8))
    history = recover(
        student, train, teacher=make_teacher(teacher_weights), recalibrate_bn=True,
        recalibration_steps=5, epochs=2, validation_data=val, verbose=0,
    )
    assert {"val_loss", "val_accuracy", "val_distillation_loss"} <= set(history.history)
    assert history.history["distillation_loss"][1] < history.history["distillation_loss"][0]


def test_sample_weights_scale_distillation(digits, teacher_weights):
    """Zero sample weights remove both the hard and the distillation terms."""
    (x, y), _ = digits
    x, y = x[:256], y[:256]
    student = compiled(digits_cnn(width=8))
    before = [w.numpy().copy() for w in student.trainable_weights]
    history = recover(
        student, x, y, teacher=make_teacher(teacher_weights), sample_weight=np.zeros(len(x)),
        epochs=1, batch_size=64, verbose=0,
    )
    assert history.history["distillation_loss"] == [0.0]
    # All gradients are zero, so Adam leaves every trainable weight untouched.
    for a, b in zip(before, student.trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())


# --------------------------------------------------------------------------
# distillation maths and logits/probabilities detection
# --------------------------------------------------------------------------


def _reference_kd(student_logits, teacher_logits, t):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = log_softmax(student_logits / t), log_softmax(teacher_logits / t)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)) * t * t)


@pytest.mark.parametrize("teacher_activation", ["softmax", None])
@pytest.mark.parametrize("student_setup", ["softmax", "logits"])
def test_distillation_loss_matches_hinton_formula(teacher_activation, student_setup):
    """With lr=0 the reported loss is exactly T^2 KL(teacher_T || student_T)."""
    x, y = tiny_data(128)
    t = 3.0
    teacher = tiny_mlp(teacher_activation, seed=1, name="teacher")
    if student_setup == "softmax":
        student = tiny_mlp("softmax", seed=2)
        student.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    else:
        student = tiny_mlp(None, seed=2)
        student.compile(
            keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )

    def raw_logits(model):
        last = model.layers[-1]
        kernel, bias = last.get_weights()
        hidden = keras.Model(model.input, model.layers[-2].output).predict(x, verbose=0)
        return hidden @ kernel + bias

    expected = _reference_kd(raw_logits(student), raw_logits(teacher), t)
    history = recover(student, x, y, teacher=teacher, temperature=t, epochs=1, batch_size=128, verbose=0)
    np.testing.assert_allclose(history.history["distillation_loss"][0], expected, rtol=1e-4)


def test_probability_and_logit_teachers_give_same_training(digits, teacher_weights):
    """A softmax teacher and its logits twin distil identically; losses fall."""
    (x, y), _ = digits
    x, y = x[:512], y[:512]
    prob_teacher = make_teacher(teacher_weights)
    config = prob_teacher.get_config()
    for layer in config["layers"]:
        if layer["name"] == "probs":
            layer["config"]["activation"] = "linear"
    logit_teacher = keras.Model.from_config(config)
    logit_teacher.set_weights(teacher_weights)

    runs = []
    for teacher in (prob_teacher, logit_teacher):
        keras.utils.set_random_seed(3)
        student = compiled(digits_cnn(width=8, seed=5))
        h = recover(student, x, y, teacher=teacher, epochs=3, batch_size=64, verbose=0)
        runs.append(h.history["distillation_loss"])
    for losses in runs:
        assert all(np.isfinite(losses))
        assert losses[2] < losses[1] < losses[0]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-3)


def test_label_free_distillation(teacher_weights, digits):
    (x, y), (xt, yt) = digits
    student = compiled(digits_cnn(width=8))
    history = recover(student, x, teacher=make_teacher(teacher_weights), epochs=4, batch_size=32, verbose=0)
    assert history.history["distillation_loss"][-1] < history.history["distillation_loss"][0]
    recalibrate_batchnorm(student, x)
    assert accuracy(student, xt, yt) > 0.8  # learned the labels from the teacher only


def _two_output_model(seed=0, width=8, name="two_heads"):
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(width, 3, activation="relu", kernel_initializer=init(0))(inp)
    h = keras.layers.Flatten()(h)
    cls = keras.layers.Dense(10, activation="softmax", kernel_initializer=init(1), name="cls")(h)
    reg = keras.layers.Dense(2, kernel_initializer=init(2), name="reg")(h)
    return keras.Model(inp, [cls, reg], name=name)


def test_multi_output_distillation(digits):
    (x, y), _ = digits
    x, y = x[:512], y[:512]
    reg_target = np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], -1)
    teacher = _two_output_model(seed=10, width=16, name="teacher")
    teacher.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    teacher.fit(x, [y, reg_target], epochs=5, batch_size=64, verbose=0)
    t_cls, t_reg = teacher.predict(x, verbose=0)

    student = _two_output_model(seed=0)
    student.compile(keras.optimizers.Adam(LR), ["sparse_categorical_crossentropy", "mse"],
                    metrics={"cls": "accuracy"})
    s_reg_before = student.predict(x, verbose=0)[1]
    history = recover(student, x, [y, reg_target], teacher=teacher, epochs=4, batch_size=64,
                      validation_split=0.25, verbose=0)
    keys = set(history.history)
    assert {"loss", "cls_loss", "reg_loss", "cls_accuracy", "distillation_loss",
            "cls_distillation_loss", "reg_distillation_loss", "val_reg_distillation_loss"} <= keys
    hh = history.history
    np.testing.assert_allclose(
        hh["distillation_loss"], np.add(hh["cls_distillation_loss"], hh["reg_distillation_loss"]),
        rtol=1e-4,
    )
    assert hh["cls_distillation_loss"][-1] < hh["cls_distillation_loss"][0]
    assert hh["reg_distillation_loss"][-1] < hh["reg_distillation_loss"][0]
    # The regression head moved toward the teacher's regression output (MSE term).
    s_reg_after = student.predict(x, verbose=0)[1]
    assert np.mean((s_reg_after - t_reg) ** 2) < 0.5 * np.mean((s_reg_before - t_reg) ** 2)


# --------------------------------------------------------------------------
# BatchNormalization recalibration
# --------------------------------------------------------------------------


def test_bn_recalibration_changes_only_bn_stats_and_restores_accuracy(digits, teacher_weights):
    (x, y), (xt, yt) = digits
    model = make_teacher(teacher_weights)
    reference = accuracy(model, xt, yt)
    # Perturb the conv kernels: the stored statistics no longer match.
    rng = np.random.default_rng(0)
    for name in ("conv1", "conv2", "conv3"):
        layer = model.get_layer(name)
        (k,) = layer.get_weights()
        layer.set_weights([k * rng.uniform(0.05, 5.0, size=k.shape[-1]).astype("float32")])
    damaged = accuracy(model, xt, yt)
    stats = bn_stat_ids(model)
    before = {id(v): v.numpy().copy() for v in model.weights}

    assert recalibrate_batchnorm(model, x, steps=20, batch_size=64) == 3

    for v in model.weights:
        if id(v) in stats:
            assert not np.array_equal(before[id(v)], v.numpy()), v.name
        else:
            np.testing.assert_array_equal(before[id(v)], v.numpy(), err_msg=v.name)
    recalibrated = accuracy(model, xt, yt)
    assert damaged < reference - 0.2
    assert recalibrated > damaged + 0.2
    assert recalibrated > reference - 0.05


def test_bn_recalibration_recovers_corrupted_stats(digits, teacher_weights):
    (x, y), (xt, yt) = digits
    model = make_teacher(teacher_weights)
    reference = accuracy(model, xt, yt)
    for name in ("bn1", "bn2", "bn3"):
        gamma, beta, mean, var = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([gamma, beta, mean + 5.0, var * 50.0])
    corrupted = accuracy(model, xt, yt)
    recalibrate_batchnorm(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(64), steps=None)
    assert corrupted < 0.5
    assert accuracy(model, xt, yt) >= reference - 0.02


def test_bn_recalibration_nested_exact_population_statistics():
    """BN in a nested, frozen model gets the exact mean/variance of all samples."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 5)) * [1, 2, 3, 4, 5] + [5, -1, 0, 2, 9]).astype("float32")
    inner = keras.Sequential([keras.Input((5,)), keras.layers.BatchNormalization(name="inner_bn"),
                              keras.layers.Dense(3)], name="inner")
    inner.trainable = False
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(2)(inner(inp)), name="outer")
    bn = inner.get_layer("inner_bn")
    momentum = bn.momentum

    assert recalibrate_batchnorm(model, x, steps=None, batch_size=64) == 1

    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=1e-4)
    assert bn.momentum == momentum and not bn.trainable and not inner.trainable


def test_recalibrate_uses_training_part_of_validation_split(digits):
    (x, y), _ = digits
    inp = keras.Input((8, 8, 1))
    bn = keras.layers.BatchNormalization()
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(
        keras.layers.Flatten()(bn(inp))))
    compiled(model)
    x = x.copy()
    x[-100:] += 10.0  # the validation part is far off
    at_train_begin = []
    grab = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: at_train_begin.append(bn.moving_mean.numpy().copy()))
    recover(model, x, y, recalibrate_bn=True, recalibration_steps=1000, batch_size=64,
            validation_split=100 / len(x), epochs=1, callbacks=[grab], verbose=0)
    split_at = int(np.floor(len(x) * (1.0 - 100 / len(x))))
    np.testing.assert_allclose(at_train_begin[0], [x[:split_at].mean()], rtol=1e-5)


# --------------------------------------------------------------------------
# recovery quality on digits
# --------------------------------------------------------------------------


def test_recover_restores_damaged_model(digits, teacher_weights):
    (x, y), (xt, yt) = digits
    teacher = make_teacher(teacher_weights)
    teacher_acc = accuracy(teacher, xt, yt)
    student = damage(make_teacher(teacher_weights))
    damaged_acc = accuracy(student, xt, yt)
    compiled(student, lr=1e-3)
    recover(student, x, y, teacher=teacher, recalibrate_bn=True, epochs=4, batch_size=32, verbose=0)
    recalibrate_batchnorm(student, x)
    recovered = accuracy(student, xt, yt)
    assert teacher_acc > 0.95
    assert damaged_acc < teacher_acc - 0.2
    assert recovered >= teacher_acc - 0.02


def _recover_damaged(teacher_weights, x, y, strategy=None):
    scope = strategy.scope() if strategy is not None else _null_scope()
    with scope:
        teacher = make_teacher(teacher_weights)
        student = damage(make_teacher(teacher_weights))
        compiled(student, lr=1e-3)
    keras.utils.set_random_seed(11)
    recover(student, x, y, teacher=teacher, recalibrate_bn=True, epochs=3, batch_size=64, verbose=0)
    recalibrate_batchnorm(student, x)
    return student


class _null_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mirrored_strategy_matches_single_device(digits, teacher_weights, mirrored_strategy):
    (x, y), (xt, yt) = digits
    strategy = mirrored_strategy
    assert strategy.num_replicas_in_sync == 2
    single = accuracy(_recover_damaged(teacher_weights, x, y), xt, yt)
    mirrored_model = _recover_damaged(teacher_weights, x, y, strategy)
    assert mirrored_model.distribute_strategy is strategy
    mirrored = accuracy(mirrored_model, xt, yt)
    assert single > 0.93
    assert abs(mirrored - single) <= 0.025
