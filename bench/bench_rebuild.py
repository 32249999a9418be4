"""Rebuild cost: dependency analysis + rebuild vs. ``tf_keras.models.clone_model``, same model, same run.

Usage:
    python bench/bench_rebuild.py --models resnet50,densenet121 --repeats 3

For each model, half of every prunable channel group is zeroed first, then the
two operations are timed alternately (clone, rebuild, clone, rebuild, ...) so
machine noise hits both alike. Reported: median seconds and rebuild/clone ratio.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras_rebuild as kr  # noqa: E402
from keras_rebuild._compat import keras  # noqa: E402
from keras_rebuild.masks import zero_channels  # noqa: E402

MODELS = {
    "resnet50": lambda s: keras.applications.ResNet50(weights=None, input_shape=(s, s, 3)),
    "densenet121": lambda s: keras.applications.DenseNet121(weights=None, input_shape=(s, s, 3)),
    "mobilenetv2": lambda s: keras.applications.MobileNetV2(weights=None, input_shape=(s, s, 3)),
}


def half_zeroed(model, seed=0):
    analysis = kr.Analysis(model)
    rng = np.random.default_rng(seed)
    remove = np.zeros(analysis.num_components, bool)
    for group in analysis.groups:
        if group.prunable:
            free = group.components[~group.blocked]
            remove[rng.permutation(free)[: len(free) // 2]] = True
    return zero_channels(model, remove, analysis)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        t = time.perf_counter()
        model = MODELS[name](args.size)
        build_s = time.perf_counter() - t
        zeroed = half_zeroed(model)
        clone_t, rebuild_t = [], []
        for _ in range(args.repeats):
            keras.backend.clear_session()
            t = time.perf_counter()
            keras.models.clone_model(zeroed)
            clone_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            small, report = kr.rebuild(zeroed, return_report=True)
            rebuild_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        kr.Analysis(zeroed)
        analysis_s = time.perf_counter() - t
        c, r = statistics.median(clone_t), statistics.median(rebuild_t)
        rows.append((name, build_s, c, analysis_s, r, r / c, report.params_ratio))
    print(f"input {args.size}x{args.size}, median of {args.repeats}, clone and rebuild interleaved\n")
    print("| model | build (s) | clone_model (s) | analysis (s) | analysis+rebuild (s) | rebuild / clone | params kept |")
    print("|---|---|---|---|---|---|---|")
    for name, b, c, a, r, ratio, p in rows:
        print(f"| {name} | {b:.2f} | {c:.2f} | {a:.2f} | {r:.2f} | {ratio:.2f}x | {p:.1%} |")


if __name__ == "__main__":
    main()
