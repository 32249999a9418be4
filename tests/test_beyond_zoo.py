"""Models beyond plain CNNs, as keras-io writes them: exact rebuilds and real savings.

The builders live in ``bench/beyond_models.py`` (shared with
``bench/bench_beyond.py``). For each model, ``prune_channels(0.5)``,
``strip_pruning`` and ``rebuild`` give a model that computes what the stripped
one does, with at most a measured share of its parameters. For each family of
layers that can now shrink (recurrent units, GroupNormalization groups,
attention heads), a model with half of them dead rebuilds to exactly the
parameter count of the same builder at half the size.
"""
import importlib.util
import os

import pytest

import keras_rebuild as kr
from keras_rebuild.masks import zero_channels
from keras_rebuild.testing import assert_models_close, flavour_keras, max_relative_error, random_inputs

keras = flavour_keras()


def _load_builders():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "beyond_models.py")
    spec = importlib.util.spec_from_file_location("beyond_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bm = _load_builders()


def _inputs(model):
    return bm.vit_inputs(model) if model.name == "vit" else random_inputs(model, seed=1)


def _prune_strip_rebuild(model):
    stripped = kr.strip_pruning(kr.prune_channels(model, sparsity=0.5))
    small, report = kr.rebuild(stripped, return_report=True)
    return stripped, small, report


def _channels(layer):
    return int(layer.output.shape[-1])


# ----------------------------------------------------------------------------- whole models
def _is_instance_norm(layer):
    # Keras 3 resolves groups=-1 to the channel count when it builds the layer; tf_keras keeps -1.
    return layer.groups in (-1, _channels(layer))


def _check_vae(small):
    units = small.get_layer("dense").units
    assert units < 7 * 7 * 64
    assert units == 7 * 7 * _channels(small.get_layer("unflatten"))  # whole channels of the unflattened map


def _check_generator(small):
    # The residual stream (down1 -> every res*_add) is narrower, and instance norm stays instance norm.
    assert _channels(small.get_layer("res2_add")) < 32
    assert _channels(small.get_layer("stem")) < 8
    for layer in small.layers:
        if type(layer).__name__ == "GroupNormalization":
            assert _is_instance_norm(layer), layer.name


def _check_discriminator(small):
    assert _channels(small.get_layer("c3")) < 64
    assert _is_instance_norm(small.get_layer("c3_norm"))


def _check_text(small):
    assert small.get_layer("embedding").output_dim < 16
    assert small.get_layer("bilstm").forward_layer.units < 16
    assert small.get_layer("gru").units < 16


def _check_vit(small, dim=32, blocks=2):
    assert small.get_layer("block0_mlp1").units < 2 * dim  # MLP hidden units go
    for i in range(blocks):  # and attention heads
        assert small.get_layer(f"block{i}_mha").get_config()["num_heads"] < 4, i
    assert _channels(small.get_layer("encoded_patches")) == dim  # the residual stream is normalised: it stays
    # The normalisations' outputs go through selections: attention and MLP inputs, and the head's rows.
    for name in ("block0_ln1", "block0_ln2", "final_ln"):
        assert small.get_layer(name + "_select").units < dim, name
    assert small.get_layer("block0_mha").get_weights()[0].shape[0] < dim
    assert small.get_layer("head0").get_weights()[0].shape[0] < small.get_layer("flatten").input.shape[1] * dim


MODELS = {
    # name: (builder, parameter ratio bound, structural check). Measured ratios (both flavours):
    # VAE decoder 0.288, CycleGAN generator 0.260, PatchGAN 0.259, text classifier 0.290, ViT 0.484 (its
    # residual stream stays, normalised by LayerNormalization; at this tiny width the stream and the
    # selections after the normalisations weigh more than at keras-io's size, below).
    "vae_decoder": (bm.vae_decoder, 0.35, _check_vae),
    "cyclegan_generator": (bm.cyclegan_generator, 0.35, _check_generator),
    "patchgan_discriminator": (bm.patchgan_discriminator, 0.35, _check_discriminator),
    "text_classifier": (bm.text_classifier, 0.4, _check_text),
    "vit": (bm.vit, 0.55, _check_vit),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_rebuilds_exactly_and_smaller(name):
    builder, bound, check = MODELS[name]
    model = builder(keras)
    stripped, small, report = _prune_strip_rebuild(model)
    x = _inputs(model)
    # Pruning changed the function well beyond the tolerance, so the comparison is not vacuous.
    assert max_relative_error(model, stripped, x) > 1e-4
    assert_models_close(stripped, small, x, tol=1e-5)
    assert report.params_before == model.count_params()
    assert report.params_after == small.count_params()
    assert report.params_ratio < bound, str(report)
    check(small)


def _exact_and_below(model, bound, x):
    """``prune_channels(0.5)``, ``strip_pruning``, ``rebuild``: exact on ``x``, fewer than ``bound`` of the parameters."""
    stripped, small, report = _prune_strip_rebuild(model)
    assert_models_close(stripped, small, x, tol=1e-5)
    assert report.params_ratio < bound, str(report)
    return small


@pytest.mark.slow
@pytest.mark.zoo
def test_inception_resnet_v2_rebuilds_exactly_like_comparable_cnns():
    """CustomScaleLayer no longer blocks the residual channels: about a quarter of the parameters stay (0.258)."""
    model = bm.inception_resnet_v2(keras)
    small = _exact_and_below(model, 0.3, random_inputs(model, batch=2, seed=1))
    assert _channels(small.get_layer("block35_1_ac")) < 320  # after the CustomScaleLayer: the residual channels
    assert _channels(small.get_layer("block17_1_ac")) < 1088
    assert _channels(small.get_layer("block8_1_ac")) < 2080


# The two largest models run where the full zoo runs: on TensorFlow, in both flavours (JAX and torch run the
# small ViT above and every layer rule in test_beyond_layers.py).
on_tensorflow = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
                                   reason="full-size zoo models run on the TensorFlow backend of each flavour")


@pytest.mark.slow
@pytest.mark.zoo
@on_tensorflow
def test_keras_io_size_vit_keeps_a_share_like_comparable_cnns():
    """keras-io's ViT (72 px, dim 64, 8 blocks, head 2048/1024): 0.256 of the parameters stay (0.476 when the
    final LayerNormalization's outputs could not go, since its Flatten -> Dense head is 87% of the model)."""
    model = bm.vit_keras_io(keras)
    small = _exact_and_below(model, 0.3, bm.vit_inputs(model, batch=2))
    _check_vit(small, dim=64, blocks=8)


@pytest.mark.slow
@pytest.mark.zoo
@on_tensorflow
def test_mobilevit_rebuilds_exactly_with_its_attention_and_normalisation_outputs_pruned():
    """keras-io's MobileViT: 0.357 of the parameters stay (0.404 before LayerNormalization outputs could go)."""
    model = bm.mobilevit(keras)
    small = _exact_and_below(model, 0.4, random_inputs(model, batch=2, seed=1))
    selections = [layer for layer in small.layers if layer.name.endswith("_select")]
    assert len(selections) == 18  # both normalisations of each of the 9 transformer blocks
    attention = [layer for layer in small.layers if type(layer).__name__ == "MultiHeadAttention"]
    assert all(layer.get_weights()[0].shape[0] < int(layer.output.shape[-1]) for layer in attention)


# ----------------------------------------------------------------------------- one family at half size
def _halve_every_group(model, keep):
    """A plan keeping ``keep(size)`` of every prunable group, and the model with the others zeroed."""
    analysis = kr.analyze(model)
    kept, sizes = {}, {}
    for g in analysis.groups:
        if g.prunable:
            kept[g.name], sizes[g.name] = keep(g.size), g.size
    assert kept, analysis.summary()
    plan = kr.Plan(kept=kept, sizes=sizes)
    return plan, zero_channels(model, plan.apply(analysis), analysis)


def _assert_same_as_smaller_builder(model, plan, masked, smaller):
    x = _inputs(model)
    by_plan = kr.rebuild(model, plan)
    by_zeros = kr.rebuild(masked)  # no plan: the zeroed units, groups or heads are found dead
    assert_models_close(masked, by_plan, x, tol=1e-5)
    assert_models_close(masked, by_zeros, x, tol=1e-5)
    assert by_plan.count_params() == by_zeros.count_params() == smaller.count_params() < model.count_params()
    return by_zeros


def test_rnn_stack_with_half_its_units_dead_is_the_builder_at_half_the_units():
    model = bm.rnn_stack(keras, units=8)
    plan, masked = _halve_every_group(model, lambda n: list(range(0, n, 2)))
    assert sorted(plan.kept) == ["bilstm", "gru", "rnn"]
    small = _assert_same_as_smaller_builder(model, plan, masked, bm.rnn_stack(keras, units=4))
    bilstm = small.get_layer("bilstm")
    assert (bilstm.forward_layer.units, bilstm.backward_layer.units) == (4, 4)
    assert small.get_layer("gru").units == small.get_layer("rnn").units == 4


def test_groupnorm_cnn_with_half_its_groups_dead_is_the_builder_at_half_the_groups():
    model = bm.groupnorm_cnn(keras, groups=8, group_size=4)
    # A group's channels are tied: the analysis sees 8 channels (one per GroupNormalization group) per stage.
    plan, masked = _halve_every_group(model, lambda n: list(range(0, n, 2)))
    assert plan.sizes == {"conv0": 8, "conv1": 8}
    small = _assert_same_as_smaller_builder(model, plan, masked, bm.groupnorm_cnn(keras, groups=4, group_size=4))
    assert small.get_layer("gn0").groups == small.get_layer("gn1").groups == 4
    assert _channels(small.get_layer("conv1")) == 16


def test_attention_with_two_dead_value_heads_is_the_builder_at_two_heads():
    model = bm.attention_block(keras, heads=4, key_dim=8)
    mha = model.get_layer("mha")
    weights = mha.get_weights()
    value = [i for i, w in enumerate(weights) if w.shape == (16, 4, 8)][2]  # query, key, value kernels
    for head in (1, 3):  # a dead value projection: kernel slice and bias
        weights[value][:, head, :] = 0
        weights[value + 1][head, :] = 0
    masked = keras.models.clone_model(model)
    masked.set_weights(model.get_weights())
    masked.get_layer("mha").set_weights(weights)
    x = _inputs(model)
    assert max_relative_error(model, masked, x) > 1e-4
    small = kr.rebuild(masked)
    assert_models_close(masked, small, x, tol=1e-5)
    assert small.get_layer("mha").get_config()["num_heads"] == 2
    smaller = bm.attention_block(keras, heads=2, key_dim=8)
    assert small.count_params() == smaller.count_params()
    # The same two heads chosen by a plan (heads are the group "<layer>:heads"), on the unmasked model.
    plan = kr.Plan(kept={"mha:heads": [0, 2]}, sizes={"mha:heads": 4})
    by_plan = kr.rebuild(model, plan)
    assert by_plan.count_params() == smaller.count_params()
    assert_models_close(zero_channels(model, plan.apply(kr.analyze(model))), by_plan, x, tol=1e-5)

