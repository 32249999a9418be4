"""Property-based tests: ``rebuild`` is exact and minimal on random functional graphs.

Hypothesis draws a random graph step by step (``keras_rebuild.testing.graph_specs``)
from the layers and couplings keras_rebuild supports, fills it with seeded random
weights (non-trivial BatchNorm statistics included), zeroes random whole channel
components of its prunable groups with ``masks.zero_channels``, and rebuilds it.
Properties checked on every example:

* exact: the rebuilt model computes what the zeroed model computes, on random
  inputs, up to float round-off relative to the output scale;
* minimal: every zeroed component is gone, i.e. each layer keeps exactly the
  channels predicted from the analysis of the original model
  (``len(analysis.kept_indices(remove)[tensor])``), in the report and in the
  physical layer shapes, and the rebuilt model has nothing left to remove;
* untouched: the model given to ``rebuild`` is not modified.

Runs are deterministic (``derandomize=True``, no example database). A failing
example shrinks to a short graph; the graph listing, the Keras summary and the
analysis are attached with ``note()``.
"""
import io
import os

import numpy as np
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from keras_rebuild.groups import Analysis
from keras_rebuild.rebuild import rebuild
from keras_rebuild.testing import (
    flavour_keras,
    build_model,
    candidate_components,
    describe_spec,
    expected_channels,
    graph_specs,
    layer_channels,
    max_relative_error,
    random_inputs,
    weights_digest,
    zero_random_components,
)

# 270 random graphs per TensorFlow process (tf_keras, Keras 3); 70 on each of JAX and torch, whose
# eager layer calls cost more per graph.
_SCALE = 1.0 if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow" else 0.26
ZEROED_EXAMPLES = round(150 * _SCALE)
DEAD_EXAMPLES = round(70 * _SCALE)
UNTOUCHED_EXAMPLES = round(50 * _SCALE)
TOL = 2e-5  # max |diff| / max(1, max |output|)

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

keras = flavour_keras()


def keras_summary(model) -> str:
    buf = io.StringIO()
    model.summary(print_fn=lambda line, **kwargs: buf.write(line + "\n"), expand_nested=True)
    return buf.getvalue()


def build_and_note(spec, seed):
    keras.backend.clear_session()
    note("graph:\n" + describe_spec(spec))
    model = build_model(spec, seed=seed)
    note(keras_summary(model))
    return model


def op_kinds(spec):
    kinds = set()
    for kind, params, _ in spec["ops"]:
        kinds.add(kind)
        if kind == "nested":
            kinds |= {"nested called twice"} if params.get("call") else op_kinds(params["spec"])
    if len(spec["inputs"]) > 1:
        kinds.add("several inputs")
    if len(spec["outputs"]) > 1:
        kinds.add("several outputs")
    return kinds


def check_zeroed_rebuild(spec, seed, data, readers):
    model = build_and_note(spec, seed)
    analysis = Analysis(model)
    note(analysis.summary())
    cands = candidate_components(analysis)
    chosen = data.draw(st.lists(st.booleans(), min_size=len(cands), max_size=len(cands)), label="zeroed")
    masked, _, remove_effective = zero_random_components(model, analysis=analysis, choices=chosen, readers=readers)
    n = int(remove_effective.sum())
    event("zeroed components: " + ("0" if n == 0 else "1-3" if n <= 3 else "4+"))
    for kind in sorted(op_kinds(spec)):
        event(f"has {kind}")
    digest = weights_digest(masked)

    small, report = rebuild(masked, return_report=True)

    assert weights_digest(masked) == digest, "rebuild modified the model it was given"
    x = random_inputs(model, batch=3, seed=seed)
    err = max_relative_error(masked, small, x)
    assert err <= TOL, f"rebuilt model differs from the zeroed one: relative error {err:.3g}"

    expected = expected_channels(analysis, remove_effective)
    reported = {r.name: (r.in_after, r.out_after) for r in report.layers}
    physical = layer_channels(small)
    for path, channels in expected.items():
        assert reported.get(path) == channels, f"report of '{path}': {reported.get(path)} != expected {channels}"
        assert physical.get(path) == channels, f"layer '{path}' has {physical.get(path)} != expected {channels}"
    # Minimal: nothing provably removable is left behind.
    leftover = Analysis(small).removable()
    assert not leftover.any(), f"{int(leftover.sum())} removable components survived the rebuild"
    # Per channel group, the report counts the components left.
    assert [g.name for g in report.groups] == [g.name for g in analysis.groups]
    for grp, grp_report in zip(analysis.groups, report.groups):
        assert grp_report.channels_after == int((~remove_effective[grp.components]).sum()), grp.name


@settings(FUZZ, max_examples=ZEROED_EXAMPLES)
@given(spec=graph_specs(min_ops=2, max_ops=6, max_channels=16, spatial=8), seed=st.integers(0, 2**16 - 1),
       data=st.data())
def test_rebuild_of_randomly_zeroed_graph_is_exact_and_minimal(spec, seed, data):
    """Channels zeroed as pruning zeroes them: writers, per-channel layers and the kernel rows reading them."""
    check_zeroed_rebuild(spec, seed, data, readers=True)


@settings(FUZZ, max_examples=DEAD_EXAMPLES)
@given(spec=graph_specs(min_ops=2, max_ops=6, max_channels=16, spatial=8, zero_preserving=True),
       seed=st.integers(0, 2**16 - 1), data=st.data())
def test_rebuild_removes_dead_channels_whose_zeros_propagate_to_every_reader(spec, seed, data):
    """Channels that died in training: only writers are zero, readers still hold weights for them.

    Removing them is exact only because the zeros propagate through BatchNorm,
    activations, merges, concatenations, pooling, ... to every kernel reading them.
    """
    check_zeroed_rebuild(spec, seed, data, readers=False)


@settings(FUZZ, max_examples=UNTOUCHED_EXAMPLES)
@given(spec=graph_specs(max_ops=5, max_channels=12, spatial=8), seed=st.integers(0, 2**16 - 1))
def test_rebuild_of_random_graph_without_zeros_keeps_every_channel(spec, seed):
    model = build_and_note(spec, seed)
    digest = weights_digest(model)

    small, report = rebuild(model, return_report=True)

    assert weights_digest(model) == digest, "rebuild modified the model it was given"
    assert report.params_after == report.params_before
    assert layer_channels(small) == layer_channels(model)
    for a, b in zip(model.get_weights(), small.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert max_relative_error(model, small, random_inputs(model, batch=2, seed=seed)) <= TOL
