"""keras-hub backbones, built offline from their constructors: rebuild is exact and honest.

Each backbone gets a small configuration (few blocks, few filters, 32x32 images)
and seeded random weights with non-trivial BatchNorm statistics. Half of every
prunable channel group is zeroed in place (the test owns the model, so it stays
a keras-hub ``Backbone``), then ``kr.rebuild`` must

* compute the same function as the zeroed backbone (relative to the output scale),
* remove exactly the zeroed channels, so fewer parameters remain whenever
  anything was prunable,
* keep every layer name, and leave the zeroed backbone untouched,
* name the composite keras-hub blocks that hide their convolutions
  (``FusedMBConvBlock``, ``MBConvBlock``, ``DepthwiseConvBlock``) as opaque
  in the analysis and the report, while the layers around them are pruned,
* say in ``report.notes`` that the ``Backbone`` came back as a plain Functional model.

No preset, weight or data set is downloaded. keras-hub is imported inside the
builders, so the tf_keras test process (where this module is deselected) never loads it.
"""
import os

import numpy as np
import pytest

import keras_rebuild as kr
from keras_rebuild.groups import Analysis
from keras_rebuild.masks import masked_weights
from keras_rebuild.testing import expected_channels, max_relative_error, randomize_weights, weights_digest

pytestmark = [pytest.mark.keras3_only, pytest.mark.zoo]

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
IMAGE = (32, 32, 3)


def resnet():
    """ResNet (v1, basic blocks): every group but the output's is prunable; no custom layer."""
    import keras_hub

    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[2, 1], stackwise_num_strides=[1, 2],
        block_type="basic_block", image_shape=IMAGE)


def resnet_v2():
    """ResNetV2 (pre-activation bottlenecks, an `ops.pad` with -inf before the stem pooling)."""
    import keras_hub

    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[16], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2],
        block_type="bottleneck_block", use_pre_activation=True, image_shape=IMAGE)


def efficientnet():
    """EfficientNet with one stack of each block kind: a fused and an unfused (MBConv) stack are
    composite layers, the "v1" stack between them is built from plain Keras layers."""
    import keras_hub

    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 3, stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 3, 3], stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[16, 16, 24], stackwise_output_filters=[16, 24, 32],
        stackwise_expansion_ratios=[1, 4, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2], stackwise_block_types=["fused", "v1", "unfused"],
        num_features=64, input_shape=IMAGE)


def densenet():
    """DenseNet: two dense stacks with a transition between them (concatenations everywhere)."""
    import keras_hub

    return keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[2, 2], growth_rate=8, image_shape=IMAGE)


def mobilenet():
    """MobileNetV3-like: everything after the stem is a composite keras-hub block."""
    import keras_hub

    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[32, 48], [64]], stackwise_num_blocks=[2, 1],
        stackwise_num_filters=[[16, 16], [24]], stackwise_kernel_size=[[3, 3], [5]],
        stackwise_num_strides=[[2, 1], [2]], stackwise_se_ratio=[[None, 0.25], [0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"]], stackwise_padding=[[1, 1], [2]],
        output_num_filters=None, depthwise_filters=8, depthwise_stride=1, depthwise_residual=False,
        last_layer_filter=32, input_num_filters=16, image_shape=IMAGE)


# name: (builder, composite layer classes that must be reported as opaque, anything prunable?)
BACKBONES = {
    "ResNetBackbone": (resnet, (), True),
    "ResNetBackbone-v2": (resnet_v2, (), True),
    "EfficientNetBackbone": (efficientnet, ("FusedMBConvBlock", "MBConvBlock"), True),
    "DenseNetBackbone": (densenet, (), True),
    # The stem conv feeds the first DepthwiseConvBlock, and nothing else has plain layers.
    "MobileNetBackbone": (mobilenet, ("DepthwiseConvBlock",), False),
}
# All of them on TensorFlow and torch; on JAX (slow eager op compiles) one with opaque blocks
# around pruned layers and one that is all opaque blocks.
HERE = sorted(BACKBONES) if BACKEND != "jax" else ["EfficientNetBackbone", "MobileNetBackbone"]


def zero_half_in_place(model, seed=0):
    """Zero half of the free components of every prunable group of ``model``, in place."""
    analysis = Analysis(model)
    rng = np.random.default_rng(seed)
    remove = np.zeros(analysis.num_components, bool)
    for group in analysis.groups:
        if group.prunable:
            free = group.components[~group.blocked]
            remove[rng.permutation(free)[: len(free) // 2]] = True
    remove = analysis.keep_nonempty(remove)
    for path, weights in masked_weights(analysis, remove).items():
        analysis.graph.layers[path].set_weights(weights)
    return analysis, remove


@pytest.mark.parametrize("name", HERE)
def test_keras_hub_backbone_rebuild_is_exact_smaller_and_names_opaque_blocks(name):
    build, opaque, prunable = BACKBONES[name]
    model = randomize_weights(build(), seed=0)
    analysis, remove = zero_half_in_place(model)
    digest = weights_digest(model)

    small, report = kr.rebuild(model, return_report=True)

    # Exact, relative to the output scale.
    x = np.random.default_rng(1).normal(size=(2,) + IMAGE).astype("float32")
    err = max_relative_error(model, small, x)
    assert err <= 1e-4, f"{name}: max relative error {err:.3g}"
    assert weights_digest(model) == digest  # the zeroed backbone is untouched

    # Names kept (weights are set by layer path: a renamed layer would keep random weights).
    assert [layer.name for layer in small.layers] == [layer.name for layer in model.layers]

    # Minimal: exactly the zeroed channels go, and fewer parameters remain whenever any did.
    expected = {path: out for path, (_, out) in expected_channels(analysis, remove).items()}
    assert {r.name: r.out_after for r in report.layers if r.name in expected} == expected
    assert bool(remove.any()) == prunable
    if prunable:
        assert report.params_after < report.params_before
        assert small.count_params() == report.params_after < model.count_params()
    else:
        assert report.params_after == report.params_before == small.count_params()

    # Composite blocks that hide their convolutions are named as opaque, in analysis and report.
    analysis_reasons = " | ".join(r for g in analysis.groups for r in g.reasons)
    report_reasons = " | ".join(r for g in report.groups for r in g.reasons)
    for cls in opaque:
        assert f"of class {cls} has no channel handler" in analysis_reasons, analysis.summary()
        assert f"of class {cls} has no channel handler" in report_reasons, str(report)
    if opaque and prunable:
        # ...while the plain layers between them are pruned.
        opaque_paths = {path for path, layer in analysis.graph.iter_layers() if type(layer).__name__ in opaque}
        shrunk = [r.name for r in report.layers if r.out_after < r.out_before]
        assert shrunk and not set(shrunk) & opaque_paths

    # A Backbone is a Functional subclass with its own constructor: it comes back as a plain
    # Functional model, and the report says so.
    assert type(small).__name__ == "Functional"
    assert any(type(model).__name__ in note and "plain Functional model" in note for note in report.notes), \
        report.notes
