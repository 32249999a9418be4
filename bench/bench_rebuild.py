"""Rebuild cost: dependency analysis + rebuild vs. Keras' own ``clone_model``, same model, same run.

Usage:
    python bench/bench_rebuild.py --models resnet50,densenet121 --repeats 5 \
        --flavours tf_keras,keras3:tensorflow,keras3:jax,keras3:torch --out bench/REBUILD_RESULTS.md

Each flavour (tf_keras, or Keras 3 on one backend) runs in its own process,
since Keras reads ``KERAS_BACKEND`` at import. For each model, half of every
prunable channel group is zeroed first, then ``clone_model`` and
``kr.rebuild`` are timed alternately (clone, rebuild, clone, rebuild, ...)
after one warm-up of each, so machine noise hits both alike. Reported: median
seconds, the rebuild/clone ratio, and the analysis time alone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def half_zeroed(kr, model, seed=0):
    import numpy as np

    from keras_rebuild.masks import zero_channels

    analysis = kr.analyze(model)
    rng = np.random.default_rng(seed)
    remove = np.zeros(analysis.num_components, bool)
    for group in analysis.groups:
        if group.prunable:
            free = group.components[~group.blocked]
            remove[rng.permutation(free)[: len(free) // 2]] = True
    return zero_channels(model, remove, analysis)


def measure(flavour, models, size, repeats):
    """Runs inside the flavour's own process; returns one row per model."""
    import keras_rebuild as kr
    from keras_rebuild.testing import flavour_keras

    keras = flavour_keras(flavour)
    builders = {
        "resnet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(size, size, 3)),
        "densenet121": lambda: keras.applications.DenseNet121(weights=None, input_shape=(size, size, 3)),
        "mobilenetv2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3)),
    }
    rows = []
    for name in models:
        zeroed = half_zeroed(kr, builders[name]())
        keras.models.clone_model(zeroed)  # warm-up: first calls compile kernels and fill caches
        kr.rebuild(zeroed)
        clone_t, rebuild_t, analysis_t = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            keras.models.clone_model(zeroed)
            clone_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            small, report = kr.rebuild(zeroed, return_report=True)
            rebuild_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            kr.analyze(zeroed)
            analysis_t.append(time.perf_counter() - t)
        c, r = statistics.median(clone_t), statistics.median(rebuild_t)
        rows.append({"model": name, "clone": c, "rebuild": r, "ratio": r / c,
                     "analysis": statistics.median(analysis_t), "params_kept": report.params_ratio})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flavours", default="tf_keras,keras3:tensorflow,keras3:jax,keras3:torch")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if args.child:
        print("ROWS " + json.dumps(measure(args.child, models, args.size, args.repeats)))
        return
    lines = [f"input {args.size}x{args.size}, median of {args.repeats} after a warm-up, clone and rebuild "
             "interleaved in one process per flavour", "",
             "| flavour | backend | model | clone_model (s) | analysis+rebuild (s) | rebuild / clone | analysis (s) "
             "| params kept |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for spec in args.flavours.split(","):
        flavour, _, backend = spec.partition(":")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend or "tensorflow")
        proc = subprocess.run([sys.executable, __file__, "--child", flavour, "--models", args.models,
                               "--size", str(args.size), "--repeats", str(args.repeats)],
                              env=env, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode or not found:
            raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        for row in json.loads(found[0][5:]):
            lines.append(f"| {flavour} | {backend or 'tensorflow'} | {row['model']} | {row['clone']:.2f} | "
                         f"{row['rebuild']:.2f} | {row['ratio']:.2f}x | {row['analysis']:.2f} | "
                         f"{row['params_kept']:.1%} |")
    lines += ["", "Command: `python bench/bench_rebuild.py " + " ".join(argv or sys.argv[1:]) + "`"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
