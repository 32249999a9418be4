"""Tests for keras_rebuild.plan: choosing channels from scores, and plans."""
import math

import numpy as np
import pytest

from keras_rebuild.testing import assert_outputs_close as assert_models_close, flavour_keras, random_inputs
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError
from keras_rebuild.groups import Analysis
from keras_rebuild.importance import get_criterion
from keras_rebuild.masks import zero_channels
from keras_rebuild.plan import Plan, make_plan, select_remove
from keras_rebuild.rebuild import rebuild

keras = flavour_keras()

L = keras.layers


def resnet_like(extra_output=False):
    """A small functional net: BN, residual Add, concat, squeeze-excite Multiply, Flatten->Dense."""
    x = keras.Input((12, 12, 3))
    h = L.Conv2D(16, 3, padding="same", name="stem")(x)
    h = L.BatchNormalization(name="stem_bn")(h)
    h = L.ReLU(name="stem_relu")(h)
    r = L.Conv2D(16, 3, padding="same", name="b1_conv1")(h)
    r = L.BatchNormalization(name="b1_bn1")(r)
    r = L.ReLU()(r)
    r = L.Conv2D(16, 3, padding="same", name="b1_conv2")(r)
    r = L.BatchNormalization(name="b1_bn2")(r)
    h = L.ReLU()(L.Add(name="b1_add")([h, r]))
    a = L.Conv2D(8, 1, activation="relu", name="br_a")(h)
    b = L.Conv2D(8, 3, padding="same", activation="relu", name="br_b")(h)
    c = L.Concatenate(name="concat")([a, b])
    se = L.GlobalAveragePooling2D()(c)
    se = L.Dense(4, activation="relu", name="se_reduce")(se)
    se = L.Dense(16, activation="sigmoid", name="se_expand")(se)
    se = L.Reshape((1, 1, 16))(se)
    c = L.Multiply(name="se_mul")([c, se])
    c = L.MaxPooling2D(4)(c)
    f = L.Flatten()(c)
    f = L.Dense(12, activation="relu", name="fc")(f)
    out = L.Dense(5, name="logits")(f)
    outputs = [out, a] if extra_output else out
    model = keras.Model(x, outputs)
    rng = np.random.default_rng(3)
    for layer in model.layers:  # non-trivial BN statistics so that zeroing is a real test
        if isinstance(layer, L.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(size=n) * 0.1,
                               rng.normal(size=n) * 0.1, rng.uniform(0.5, 2.0, n)])
    return model


@pytest.fixture
def model():
    return resnet_like()


@pytest.fixture
def analysis(model):
    return Analysis(model)


def prunable(analysis):
    return [g for g in analysis.groups if g.prunable]


def pruned_per_group(analysis, remove):
    return {g.name: int(remove[g.components].sum()) for g in analysis.groups}


def l1(analysis):
    return get_criterion("l1")(analysis)


def const_scores(analysis, fn):
    return {g.name: np.asarray(fn(g), np.float64) for g in prunable(analysis)}


# ----------------------------------------------------------------------------- sparsity
def test_zero_sparsity_prunes_nothing(analysis):
    remove = select_remove(analysis, l1(analysis), sparsity=0.0)
    assert remove.shape == (analysis.num_components,)
    assert not remove.any()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_local_sparsity_prunes_floor_of_sparsity_times_size_in_every_group(analysis, sparsity):
    remove = select_remove(analysis, l1(analysis), sparsity=sparsity)
    counts = pruned_per_group(analysis, remove)
    for g in analysis.groups:
        expected = math.floor(sparsity * g.size) if g.prunable else 0
        assert counts[g.name] == expected, g


def test_local_sparsity_prunes_the_lowest_scored_channels(analysis):
    scores = const_scores(analysis, lambda g: np.random.default_rng(len(g.name)).permutation(g.size))
    remove = select_remove(analysis, scores, sparsity=0.5)
    for g in prunable(analysis):
        gone = remove[g.components]
        assert scores[g.name][gone].max() < scores[g.name][~gone].min()


def test_blocked_channels_and_model_outputs_are_never_pruned():
    model = resnet_like(extra_output=True)  # br_a is also a model output
    analysis = Analysis(model)
    assert not next(g for g in analysis.groups if g.name == "br_a").prunable
    grp = next(g for g in analysis.groups if g.name == "b1_conv1")
    grp.blocked = grp.blocked.copy()
    grp.blocked[[1, 4, 6]] = True  # pretend these must stay; give them the lowest scores
    scores = l1(analysis)
    scores["b1_conv1"][[1, 4, 6]] = -1.0
    for kwargs in (dict(sparsity=0.9), dict(sparsity=0.9, scope="global"), dict(threshold=0.0)):
        remove = select_remove(analysis, scores, **kwargs)
        blocked_components = np.unique(analysis.labels[analysis.blocked])
        assert not remove[blocked_components].any()
        assert not remove[grp.components[[1, 4, 6]]].any()
        assert remove[grp.components].sum() > 0


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_makes_kept_counts_multiples(analysis, round_to):
    remove = select_remove(analysis, l1(analysis), sparsity=0.6, round_to=round_to)
    for g in prunable(analysis):
        kept = g.size - int(remove[g.components].sum())
        assert kept % round_to == 0 or kept == g.size, (g.name, kept)
        # rounded up: never more pruned than floor(s * n)
        assert g.size - kept <= math.floor(0.6 * g.size)
    assert remove.any()


def test_min_channels_is_respected(analysis):
    remove = select_remove(analysis, l1(analysis), sparsity=0.95, min_channels=3)
    for g in prunable(analysis):
        kept = g.size - int(remove[g.components].sum())
        assert kept == max(3, g.size - math.floor(0.95 * g.size))


def test_global_scope_prunes_more_from_a_group_with_many_small_channels(analysis):
    # fc: most channels tiny; b1_conv1: all alike.
    scores = const_scores(analysis, lambda g: np.ones(g.size))
    scores["fc"] = np.array([1e-3] * 9 + [10.0] * 3)
    local = select_remove(analysis, scores, sparsity=0.25)
    glob = select_remove(analysis, scores, sparsity=0.25, scope="global")
    assert pruned_per_group(analysis, local)["fc"] == 3
    counts = pruned_per_group(analysis, glob)
    assert counts["fc"] == 9
    total = sum(g.size for g in prunable(analysis))
    assert sum(counts.values()) == math.floor(0.25 * total)


def test_global_scope_without_normalisation_prunes_a_globally_small_group_first(analysis):
    scores = const_scores(analysis, lambda g: 1.0 + np.arange(g.size) / g.size)
    scores["b1_conv1"] = scores["b1_conv1"] * 1e-3  # every channel of this group is small
    remove = select_remove(analysis, scores, sparsity=0.3, scope="global", normalize="none")
    counts = pruned_per_group(analysis, remove)
    assert counts["b1_conv1"] == 15  # all it may lose (min_channels=1)
    remove_mean = select_remove(analysis, scores, sparsity=0.3, scope="global")
    assert pruned_per_group(analysis, remove_mean)["b1_conv1"] < 15


def test_threshold_prunes_exactly_the_planted_outliers(analysis):
    rng = np.random.default_rng(0)
    planted = {}
    scores = {}
    for g in prunable(analysis):
        s = 1.0 + 0.01 * rng.standard_normal(g.size)
        idx = rng.choice(g.size, size=1, replace=False)
        s[idx] = 0.2
        planted[g.name] = set(idx.tolist())
        scores[g.name] = s
    remove = select_remove(analysis, scores, threshold=1.5)
    for g in prunable(analysis):
        assert set(np.flatnonzero(remove[g.components]).tolist()) == planted[g.name], g.name


def test_threshold_with_equal_scores_prunes_nothing(analysis):
    scores = const_scores(analysis, lambda g: np.ones(g.size))
    assert not select_remove(analysis, scores, threshold=0.5).any()


# ----------------------------------------------------------------------------- ignore
def test_ignore_leaves_the_named_layers_group_whole(analysis):
    remove = select_remove(analysis, l1(analysis), sparsity=0.5, ignore=["stem_bn"])
    counts = pruned_per_group(analysis, remove)
    assert counts["stem"] == 0
    assert counts["b1_conv1"] == 8


def test_ignore_an_unknown_name_raises_listing_close_matches(analysis):
    with pytest.raises(InvalidArgumentError, match=r"stem_bn.*Received: ignore=\['stem_bm'\]"):
        select_remove(analysis, l1(analysis), sparsity=0.5, ignore=["stem_bm"])


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "0.5", True])
def test_bad_sparsity_raises(analysis, sparsity):
    with pytest.raises(InvalidArgumentError, match=r"Expected `sparsity` to be a float in \[0, 1\). Received: sparsity="):
        select_remove(analysis, l1(analysis), sparsity=sparsity)


def test_bad_scope_raises(analysis):
    with pytest.raises(InvalidArgumentError, match="Received: scope='globl'"):
        select_remove(analysis, l1(analysis), sparsity=0.5, scope="globl")


def test_sparsity_and_threshold_together_raise(analysis):
    with pytest.raises(InvalidArgumentError, match="exactly one of `sparsity` and `threshold`"):
        select_remove(analysis, l1(analysis), sparsity=0.5, threshold=1.0)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        select_remove(analysis, l1(analysis))


def test_scores_of_wrong_length_or_missing_group_raise(analysis):
    scores = l1(analysis)
    scores["stem"] = scores["stem"][:3]
    with pytest.raises(InvalidArgumentError, match=r"scores\['stem'\].*\(16\). Received: 3"):
        select_remove(analysis, scores, sparsity=0.5)
    scores = l1(analysis)
    del scores["fc"]
    with pytest.raises(InvalidArgumentError, match="missing \\['fc'\\]"):
        select_remove(analysis, scores, sparsity=0.5)
    with pytest.raises(InvalidArgumentTypeError):
        select_remove(analysis, [1, 2], sparsity=0.5)


# ----------------------------------------------------------------------------- Plan
def test_plan_json_round_trip_is_identical(analysis):
    plan = make_plan(analysis, l1(analysis), sparsity=0.5, round_to=2, ignore=("fc",))
    again = Plan.from_json(plan.to_json())
    assert again == plan
    np.testing.assert_array_equal(again.apply(analysis), select_remove(
        analysis, l1(analysis), sparsity=0.5, round_to=2, ignore=("fc",)))
    assert plan.kept["fc"] == list(range(12))
    assert "stem" in plan.summary() and "50.0%" in plan.summary()


def test_plan_apply_rejects_a_model_it_does_not_fit(analysis):
    plan = make_plan(analysis, l1(analysis), sparsity=0.5)
    plan.sizes["stem"] = 32
    with pytest.raises(InvalidArgumentError, match="group 'stem' to have 32 channels"):
        plan.apply(analysis)
    bad = Plan({"stme": [0, 1]}, {"stme": 16})
    with pytest.raises(InvalidArgumentError, match="'stme' is not one. Did you mean 'stem'"):
        bad.apply(analysis)
    with pytest.raises(InvalidArgumentError, match="distinct indices"):
        Plan({"stem": [0, 99]}, {"stem": 16}).apply(analysis)
    with pytest.raises(InvalidArgumentError, match="Plan.to_json"):
        Plan.from_json("{not json")


# ----------------------------------------------------------------------------- end to end
def expected_widths(analysis, remove):
    """Per kernel writer layer: output channels left (sum over the groups it writes)."""
    widths = {}
    for g in analysis.groups:
        kept = g.size - int(remove[g.components].sum())
        for w in g.writers:
            widths[w] = widths.get(w, 0) + kept
    return widths


@pytest.mark.parametrize("kwargs", [
    dict(sparsity=0.5),
    dict(sparsity=0.4, scope="global", round_to=2),
    dict(threshold=0.5, min_channels=2),
])
def test_zeroed_then_rebuilt_model_equals_the_zeroed_model(model, analysis, kwargs):
    remove = select_remove(analysis, l1(analysis), **kwargs)
    assert remove.any()
    zeroed = zero_channels(model, remove, analysis)
    small = rebuild(zeroed)
    x = random_inputs(model, batch=4)
    assert_models_close(zeroed, small, x, atol=1e-5)
    layers = {layer.name: layer for layer in small.layers}
    for path, width in expected_widths(analysis, remove).items():
        assert layers[path].output.shape[-1] == width, path
    assert small.count_params() < model.count_params()


@pytest.mark.zoo
def test_mobilenetv2_prunes_and_rebuilds_exactly():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    analysis = Analysis(model)
    scores = get_criterion("l2")(analysis)
    remove = select_remove(analysis, scores, sparsity=0.5, round_to=8)
    assert remove.any()
    zeroed = zero_channels(model, remove, analysis)
    small = rebuild(zeroed)
    assert_models_close(zeroed, small, random_inputs(model, batch=2), atol=1e-4)
    layers = {layer.name: layer for layer in small.layers}
    for path, width in expected_widths(analysis, remove).items():
        assert layers[path].output.shape[-1] == width, path
        assert width % 8 == 0 or width == analysis.graph.layers[path].output.shape[-1]
    assert small.count_params() < 0.6 * model.count_params()
