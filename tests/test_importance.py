"""Tests for keras_rebuild.importance: channel importance criteria."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_rebuild.testing import flavour_keras, weights_digest
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError
from keras_rebuild.groups import Analysis
from keras_rebuild.importance import (
    Criterion,
    Magnitude,
    Taylor,
    criterion_names,
    get_criterion,
)
from keras_rebuild.plan import select_remove

keras = flavour_keras()
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow") if os.environ.get("KERAS_REBUILD_FLAVOUR") == "keras3" \
    else "tensorflow"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_numpy(x):
    """A model output as numpy, on any backend (torch outputs carry gradients)."""
    return keras.ops.convert_to_numpy(x) if hasattr(keras, "ops") else np.asarray(x)

L = keras.layers
DEAD = 5  # the channel of conv1 whose output is forced to zero


def small_cnn(dead=None):
    """conv1 -> bn1 -> relu -> conv2 -> relu -> GAP -> Dense(3)."""
    x = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", name="conv1")(x)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU(name="relu1")(h)
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.GlobalAveragePooling2D()(h)
    out = L.Dense(3, name="logits")(h)
    model = keras.Model(x, out)
    rng = np.random.default_rng(0)
    k, b = model.get_layer("conv1").get_weights()
    model.get_layer("conv1").set_weights([k, np.full_like(b, 0.5)])  # every channel alive...
    bn = model.get_layer("bn1")
    bn.set_weights([rng.uniform(0.8, 1.2, 8), np.full(8, 0.3), np.zeros(8), np.ones(8)])
    if dead is not None:  # ...but this one: beta = -10 puts it far below zero, so ReLU kills it
        w = bn.get_weights()
        w[1][dead] = -10.0
        bn.set_weights(w)
    return model


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


# ----------------------------------------------------------------------------- magnitude
def test_l1_ranks_a_shrunk_channel_lowest():
    model = small_cnn()
    k, b = model.get_layer("conv1").get_weights()
    k[..., 2] *= 1e-3
    b[2] = 0.0
    model.get_layer("conv1").set_weights([k, b])
    bn = model.get_layer("bn1").get_weights()
    bn[0][2] = bn[1][2] = 0.0
    model.get_layer("bn1").set_weights(bn)
    scores = get_criterion("l1")(Analysis(model))
    assert set(scores) == {"conv1", "conv2"}
    assert scores["conv1"].dtype == np.float64 and scores["conv1"].shape == (8,)
    assert np.argmin(scores["conv1"]) == 2


def test_l1_sums_writer_slices_bias_and_batchnorm_but_not_moving_statistics():
    model = small_cnn()
    analysis = Analysis(model)
    k, b = analysis.weights["conv1"]
    gamma, beta, _, _ = analysis.weights["bn1"]
    expected = np.abs(k).reshape(-1, 8).sum(0) + np.abs(b) + np.abs(gamma) + np.abs(beta)
    np.testing.assert_allclose(get_criterion("l1")(analysis)["conv1"], expected, rtol=1e-6)
    l2 = np.sqrt((k.astype(np.float64) ** 2).reshape(-1, 8).sum(0) + b ** 2 + gamma ** 2 + beta ** 2)
    np.testing.assert_allclose(get_criterion("l2")(analysis)["conv1"], l2, rtol=1e-6)


def test_l1_with_readers_adds_the_input_rows_of_the_next_kernel():
    model = small_cnn()
    analysis = Analysis(model)
    k2 = analysis.weights["conv2"][0]
    base = Magnitude(1)(analysis)["conv1"]
    with_readers = Magnitude(1, include_readers=True)(analysis)["conv1"]
    np.testing.assert_allclose(with_readers - base, np.abs(k2).sum(axis=(0, 1, 3)), rtol=1e-5)


def test_l1_aggregates_every_depthwise_slice_of_a_channel():
    x = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 1, name="pw")(x)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(h)
    h = L.Conv2D(5, 1, name="head")(h)
    model = keras.Model(x, h)
    analysis = Analysis(model)
    kpw, bpw = analysis.weights["pw"]
    kdw, bdw = analysis.weights["dw"]
    expected = (np.abs(kpw).reshape(-1, 4).sum(0) + np.abs(bpw) + np.abs(kdw).sum(axis=(0, 1, 3))
                + np.abs(bdw).reshape(4, 2).sum(1))
    np.testing.assert_allclose(get_criterion("l1")(analysis)["pw"], expected, rtol=1e-5)


def test_weights_override_replaces_the_analysed_weights():
    model = small_cnn()
    analysis = Analysis(model)
    k, b = analysis.weights["conv1"]
    k = k.copy()
    k[..., 7] = 0.0
    before = get_criterion("l1")(analysis)["conv1"]
    after = get_criterion("l1")(analysis, weights={"conv1": [k, b]})["conv1"]
    assert after[7] < before[7]
    np.testing.assert_allclose(after[:7], before[:7])
    with pytest.raises(InvalidArgumentError, match="unknown"):
        get_criterion("l1")(analysis, weights={"nope": []})
    with pytest.raises(InvalidArgumentError, match="shapes of layer 'conv1'"):
        get_criterion("l1")(analysis, weights={"conv1": [k]})


def test_bn_scale_prefers_small_gamma_and_falls_back_to_l1_without_batchnorm():
    model = small_cnn()
    bn = model.get_layer("bn1").get_weights()
    bn[0][:] = np.linspace(1.0, 2.0, 8)
    bn[0][4] = 0.01
    model.get_layer("bn1").set_weights(bn)
    analysis = Analysis(model)
    scores = get_criterion("bn_scale")(analysis)
    np.testing.assert_allclose(scores["conv1"], np.abs(bn[0]))
    np.testing.assert_allclose(scores["conv2"], get_criterion("l1")(analysis)["conv2"])


# ----------------------------------------------------------------------------- data-driven
@pytest.mark.parametrize("name", ["activation", "apoz", "taylor"])
def test_data_criteria_rank_a_dead_channel_lowest(name):
    model = small_cnn(dead=DEAD)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    digest = weights_digest(model)
    x, y = data()
    analysis = Analysis(model)
    scores = get_criterion(name).set_data(model, x, y)(analysis)
    assert set(scores) == {"conv1", "conv2"}
    for g in analysis.groups:
        if g.prunable:
            assert scores[g.name].shape == (g.size,) and np.isfinite(scores[g.name]).all()
    s = scores["conv1"]
    assert s[DEAD] == 0.0
    assert (np.delete(s, DEAD) > 0).all()
    assert weights_digest(model) == digest


def test_activation_is_the_mean_absolute_post_relu_value():
    model = small_cnn()
    x, _ = data(n=8)
    probe = keras.Model(model.inputs, model.get_layer("relu1").output)
    expected = np.abs(to_numpy(probe(x))).mean(axis=(0, 1, 2))
    scores = get_criterion("activation").set_data(model, x)(Analysis(model))
    np.testing.assert_allclose(scores["conv1"], expected, rtol=1e-5)


def test_apoz_counts_the_fraction_of_nonzero_activations():
    model = small_cnn()
    x, _ = data(n=8)
    probe = keras.Model(model.inputs, model.get_layer("relu1").output)
    expected = (to_numpy(probe(x)) != 0).mean(axis=(0, 1, 2))
    scores = get_criterion("apoz").set_data(model, x)(Analysis(model))
    np.testing.assert_allclose(scores["conv1"], expected, rtol=1e-6)


def test_data_criteria_use_overridden_weights_without_touching_the_model():
    model = small_cnn()
    analysis = Analysis(model)
    digest = weights_digest(model)
    x, _ = data(n=8)
    w = [a.copy() for a in analysis.weights["bn1"]]
    w[1][3] = -10.0  # kills channel 3 after ReLU
    crit = get_criterion("activation").set_data(model, x)
    scores = crit(analysis, weights={"bn1": w})["conv1"]
    assert scores[3] == 0.0 and (np.delete(scores, 3) > 0).all()
    assert weights_digest(model) == digest
    assert crit(analysis)["conv1"][3] > 0


def test_data_criteria_without_data_or_loss_raise():
    model = small_cnn()
    analysis = Analysis(model)
    with pytest.raises(InvalidArgumentError, match="set_data"):
        get_criterion("activation")(analysis)
    x, y = data(n=4)
    with pytest.raises(InvalidArgumentError, match="Received: y=None"):
        get_criterion("taylor").set_data(model, x)(analysis)
    with pytest.raises(InvalidArgumentError, match="compile the model"):
        get_criterion("taylor").set_data(model, x, y)(analysis)


def reference_gradient(model, x, y, loss):
    """``a`` (the ReLU output after bn1) and ``dL/da``, taken directly with this backend's autodiff."""
    probe = keras.Model(model.inputs, [model.get_layer("relu1").output, model.output])
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            a, out = probe(x)
            value = loss(y, out)
        return np.asarray(a), np.asarray(tape.gradient(value, a))
    if BACKEND == "torch":
        import torch

        a, out = probe(x)
        (g,) = torch.autograd.grad(loss(y, out), [a])
        return to_numpy(a.detach()), g.numpy()
    # JAX: the rest of the network as a function of `a`, called layer by layer, differentiated by jax.grad
    import jax

    a = probe(x)[0]
    head = [model.get_layer("conv2"), model.layers[-2], model.get_layer("logits")]

    def loss_of(a):
        for layer in head:
            a = layer(a)
        return loss(y, a)

    return np.asarray(a), np.asarray(jax.grad(loss_of)(a))


def test_taylor_with_an_explicit_loss_matches_activation_times_gradient():
    model = small_cnn()
    x, y = data(n=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    scores = Taylor(loss=loss).set_data(model, x, y)(Analysis(model))["conv1"]
    a, g = reference_gradient(model, x, y, loss)
    assert np.abs(g).max() > 0
    expected = np.abs((a.astype(np.float64) * g.astype(np.float64)).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-9)


TAYLOR_SCORES = textwrap.dedent("""
    import json, sys
    import numpy as np
    from keras_rebuild.groups import Analysis
    from keras_rebuild.importance import Taylor
    from tests.test_importance import data, keras, small_cnn

    model = small_cnn()
    with np.load(sys.argv[1]) as f:
        model.set_weights([f[k] for k in sorted(f.files, key=int)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(n=20, seed=3)
    scores = Taylor(batch_size=8).set_data(model, x, y)(Analysis(model))
    print("RESULT", json.dumps({k: v.tolist() for k, v in scores.items()}),
          keras.backend.backend(), "tensorflow" in sys.modules)
""")


def taylor_in_subprocess(backend, weights_file):
    """Taylor scores of ``small_cnn`` with the weights of ``weights_file`` in a fresh Keras 3 process."""
    env = dict(os.environ, KERAS_REBUILD_FLAVOUR="keras3", KERAS_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", TAYLOR_SCORES, str(weights_file)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, out.stderr[-3000:]
    scores, used, tf_loaded = lines[0][len("RESULT "):].rsplit(" ", 2)
    assert used == backend
    return {k: np.asarray(v) for k, v in json.loads(scores).items()}, tf_loaded == "True"


@pytest.mark.keras3_only
@pytest.mark.skipif(BACKEND != "torch", reason="torch's scores here, JAX's in a fresh process (with no TensorFlow)")
def test_taylor_on_jax_equals_torch_and_never_imports_tensorflow(tmp_path):
    """JAX's 'taylor' (jax.grad through zero perturbations) gives torch's scores on the same model and weights.

    The JAX scores come from a fresh process, which also shows that a JAX
    user's 'taylor' never imports TensorFlow. Same weights, same batches of 8
    (the last one partial), so the scores agree to float32 rounding.
    """
    model = small_cnn(dead=DEAD)
    rng = np.random.default_rng(7)  # move every weight off its initial value
    model.set_weights([w + rng.normal(scale=0.1, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    bn = model.get_layer("bn1").get_weights()
    model.get_layer("bn1").set_weights(bn[:3] + [np.abs(bn[3]) + 0.5])  # a positive moving variance
    np.savez(tmp_path / "w.npz", **{str(i): w for i, w in enumerate(model.get_weights())})
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(n=20, seed=3)
    ours = Taylor(batch_size=8).set_data(model, x, y)(Analysis(model))
    jax_scores, tf_loaded = taylor_in_subprocess("jax", tmp_path / "w.npz")
    assert not tf_loaded
    assert set(ours) == set(jax_scores) == {"conv1", "conv2"}
    for name in ours:
        assert np.abs(ours[name]).max() > 1e-3
        np.testing.assert_allclose(jax_scores[name], ours[name], rtol=1e-4, atol=1e-6)
    assert ours["conv1"][DEAD] == 0.0 and jax_scores["conv1"][DEAD] == 0.0


def test_nested_model_groups_get_finite_scores():
    inner_in = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="inner_conv")(inner_in)
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="inner_conv2")(h)
    backbone = keras.Model(inner_in, h, name="backbone")
    x = keras.Input((8, 8, 3))
    h = backbone(x)
    h = L.Conv2D(4, 1, activation="relu", name="outer_conv")(h)
    out = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(h))
    model = keras.Model(x, out)
    analysis = Analysis(model)
    xb, _ = data(n=4)
    scores = get_criterion("activation").set_data(model, xb)(analysis)
    assert set(scores) == {g.name for g in analysis.groups if g.prunable}
    for g in analysis.groups:
        if g.prunable:
            assert scores[g.name].shape == (g.size,) and np.isfinite(scores[g.name]).all()
    # backbone/inner_conv2's channels are measured on the backbone's output tensor
    probe = keras.Model(model.inputs, backbone(model.inputs[0]))
    expected = np.abs(to_numpy(probe(xb))).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(scores["backbone/inner_conv2"], expected, rtol=1e-5)


# ----------------------------------------------------------------------------- random, registry
def test_random_is_seeded():
    analysis = Analysis(small_cnn())
    a = get_criterion("random")(analysis)
    b = get_criterion("random")(analysis)
    from keras_rebuild.importance import RandomCriterion

    c = RandomCriterion(seed=1)(analysis)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["conv1"], c["conv1"])


def test_get_criterion_rejects_unknown_names_and_wrong_types():
    with pytest.raises(InvalidArgumentError, match=r"one of \['l1', 'l2', 'bn_scale'.*Received: criterion='l3'"):
        get_criterion("l3")
    with pytest.raises(InvalidArgumentTypeError, match="Received: criterion=int object"):
        get_criterion(3)
    assert set(criterion_names()) == {"l1", "l2", "bn_scale", "activation", "apoz", "taylor", "random"}
    assert get_criterion("L1").name == "l1"
    crit = Magnitude(2)
    assert get_criterion(crit) is crit


def test_a_user_criterion_subclass_drives_selection():
    class PreferLast(Criterion):
        name = "prefer_last"

        def component_scores(self, analysis, weights):
            return np.arange(analysis.num_components, dtype=np.float64)

    analysis = Analysis(small_cnn())
    scores = get_criterion(PreferLast())(analysis)
    remove = select_remove(analysis, scores, sparsity=0.5)
    g = next(g for g in analysis.groups if g.name == "conv1")
    np.testing.assert_array_equal(np.flatnonzero(remove[g.components]), np.argsort(scores["conv1"])[:4])
