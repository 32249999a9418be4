"""Benchmark loading a tf_keras model from ``.keras`` and ``.h5``: tf_keras' own loader against ours.

tf_keras reads a ``.keras`` archive's ``model.weights.h5`` through the zip
member itself: every backward seek of HDF5 re-reads the member from its start.
``keras_rebuild.safety.load_model`` (the loader of every CLI command) reads the
member in one pass first. This script saves one ``keras.applications`` model
(``weights=None``: random weights, no download) in both formats to a temporary
folder, loads each file with each loader in interleaved rounds, checks that
every loader returns the same weights, and prints a markdown table of median
load times (written to ``--out`` too).

    python bench/bench_load.py --model resnet50 --rounds 3 --out bench/LOAD_RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

from keras_rebuild import safety
from keras_rebuild._compat import keras

MODELS = {
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
    "resnet152": lambda: keras.applications.ResNet152(weights=None),
    "mobilenetv2": lambda: keras.applications.MobileNetV2(weights=None),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--rounds", type=int, default=3, help="loads per loader and file (median reported)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    model = MODELS[args.model]()
    reference = model.get_weights()
    with tempfile.TemporaryDirectory() as folder:
        files = {fmt: os.path.join(folder, f"model.{fmt}") for fmt in ("keras", "h5")}
        for path in files.values():
            model.save(path)
        loaders = [
            ("tf_keras.models.load_model", "keras", lambda p: keras.models.load_model(p, compile=False)),
            ("keras_rebuild.safety.load_model", "keras", lambda p: safety.load_model(p)),
            ("tf_keras.models.load_model", "h5", lambda p: keras.models.load_model(p, compile=False)),
            ("keras_rebuild.safety.load_model", "h5", lambda p: safety.load_model(p)),
        ]
        times = {(name, fmt): [] for name, fmt, _ in loaders}
        for _ in range(args.rounds):
            for name, fmt, load in loaders:  # interleaved: machine noise hits every loader alike
                keras.backend.clear_session()
                start = time.perf_counter()
                loaded = load(files[fmt])
                times[(name, fmt)].append(time.perf_counter() - start)
                for got, want in zip(loaded.get_weights(), reference):
                    if not np.array_equal(got, want):
                        raise SystemExit(f"{name} on .{fmt} loaded different weights")
                del loaded
        sizes = {fmt: os.path.getsize(path) for fmt, path in files.items()}

    median = {key: statistics.median(values) for key, values in times.items()}
    ours_h5 = median[("keras_rebuild.safety.load_model", "h5")]
    lines = [
        f"# Loading a tf_keras {args.model} (`weights=None`, {model.count_params():,} parameters)",
        "",
        f"Command: `python bench/bench_load.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"tf_keras {keras.__version__}. Median of {args.rounds} loads each, loaders interleaved; "
        "every load checked for identical weights.",
        "",
        "| loader | file | size | median load (s) | vs ours on .h5 |",
        "|---|---|---:|---:|---:|",
    ]
    for name, fmt, _ in loaders:
        value = median[(name, fmt)]
        lines.append(f"| `{name}` | .{fmt} | {sizes[fmt] / 2**20:.0f} MiB | {value:.2f} | {value / ours_h5:.1f}x |")
    speedup = median[("tf_keras.models.load_model", "keras")] / median[("keras_rebuild.safety.load_model", "keras")]
    lines += ["", f"keras_rebuild loads the `.keras` file {speedup:.1f}x faster than tf_keras' own loader."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
