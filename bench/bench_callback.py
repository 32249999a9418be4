"""Benchmark the per-batch cost of pruning during training: plain fit vs tfmot vs keras_rebuild.

For each model, in one run, with the conditions interleaved round-robin (so
machine noise hits them alike), times ``fit`` of:

* ``plain``: the unwrapped model, no callback;
* ``tfmot``: ``tfmot.sparsity.keras.prune_low_magnitude`` + its ``UpdatePruningStep``;
* ``keras_rebuild``: ``keras_rebuild.prune_channels`` + ``keras_rebuild.UpdatePruningStep``;
* ``keras_rebuild, no callback``: the same wrappers with one-shot masks, trained
  without the callback (the cost of the wrappers' masking alone).

Both pruning runs use ``PolynomialDecay(0, 0.5)`` with tfmot's default
``frequency=100`` over the whole run, so their pruning steps are included.
Overheads are ``time / plain time - 1``; the column that matters is
``keras_rebuild`` minus ``tfmot`` (the target: within 5% of plain fit time).

    python bench/bench_callback.py --out bench/CALLBACK_RESULTS.md
    python bench/bench_callback.py --models cnn8 --rounds 3 --epochs 2   # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

import keras_rebuild as kr  # noqa: E402
from keras_rebuild.schedules import PolynomialDecay  # noqa: E402
from keras_rebuild.wrappers import UpdatePruningStep, prune_channels  # noqa: E402

CONDITIONS = ("plain", "tfmot", "keras_rebuild", "keras_rebuild, no callback")


def cnn(size: int, channels: int, width: int = 16, seed: int = 0) -> keras.Model:
    """A small conv-BN-ReLU CNN with a Dense head for ``size x size x channels`` inputs."""
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    inp = keras.Input((size, size, channels))
    x = inp
    for i, filters in enumerate((width, width, 2 * width)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init(i),
                                name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i:
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(2 * width, activation="relu", kernel_initializer=init(3), name="fc1")(x)
    out = keras.layers.Dense(10, activation="softmax", kernel_initializer=init(4), name="probs")(x)
    return keras.Model(inp, out, name=f"cnn{size}")


MODELS = {"cnn8": (8, 1), "cnn32": (32, 3)}


class EpochTimer(keras.callbacks.Callback):
    """Wall and CPU time of every epoch (put it last: its epoch end runs after the other callbacks')."""

    def __init__(self):
        super().__init__()
        self.times, self.cpu = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu)


def build(condition, base, total_steps):
    if condition == "plain":
        model, callbacks = keras.models.clone_model(base), []
        model.set_weights(base.get_weights())
    elif condition == "tfmot":
        sched = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=total_steps, frequency=100)
        model = tfmot.sparsity.keras.prune_low_magnitude(keras.models.clone_model(base), pruning_schedule=sched)
        callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    elif condition == "keras_rebuild":
        sched = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=total_steps, frequency=100)
        model = prune_channels(base, pruning_schedule=sched)
        callbacks = [UpdatePruningStep()]
    else:
        model, callbacks = prune_channels(base, sparsity=0.5), []
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model, callbacks


def bench_model(name, args):
    size, channels = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, size, size, channels)).astype("float32")
    y = rng.integers(0, 10, size=args.samples)
    steps_per_epoch = int(np.ceil(args.samples / args.batch))
    total_steps = steps_per_epoch * args.epochs * (args.rounds + 1)
    base = cnn(size, channels)
    runs = {c: build(c, base, total_steps) for c in CONDITIONS}
    epoch_times = {c: [] for c in CONDITIONS}
    epoch_cpu = {c: [] for c in CONDITIONS}
    fit_times = {c: [] for c in CONDITIONS}
    for round_ in range(args.rounds + 1):  # round 0 traces the functions: not counted
        order = CONDITIONS if round_ % 2 == 0 else CONDITIONS[::-1]
        for c in order:
            model, callbacks = runs[c]
            timer = EpochTimer()
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0, shuffle=False,
                      callbacks=callbacks + [timer])
            elapsed = time.perf_counter() - start
            if round_:
                epoch_times[c].extend(timer.times)
                epoch_cpu[c].extend(timer.cpu)
                fit_times[c].append(elapsed / args.epochs)
    med = {c: statistics.median(epoch_times[c]) for c in CONDITIONS}
    cpu = {c: statistics.median(epoch_cpu[c]) for c in CONDITIONS}
    fit = {c: statistics.median(fit_times[c]) for c in CONDITIONS}
    kr_model = runs["keras_rebuild"][0]
    achieved = kr.rebuild(kr_model).count_params() / base.count_params()
    return {"name": name, "shape": (size, size, channels), "steps": steps_per_epoch, "epoch": med, "fit": fit, "cpu": cpu,
            "params_ratio": achieved, "n": len(epoch_times["plain"])}


def table(results, args):
    lines = [
        "# Pruning callback overhead: plain fit vs tfmot vs keras_rebuild",
        "",
        f"Command: `python bench/bench_callback.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"tf_keras {keras.__version__}, TensorFlow {tf.__version__}, tfmot {tfmot.__version__}, "
        f"{platform.machine()} CPU, {os.cpu_count()} cores (shared); batch {args.batch}, {args.samples} samples, "
        f"{args.rounds} interleaved rounds of {args.epochs} epochs after one untimed round; verbose=0.",
        "Epoch: median wall time of an epoch (callbacks' epoch-end work included); CPU: median CPU time of this "
        "process per epoch (all threads; less sensitive to other load on a shared machine); fit per epoch: "
        "median wall time of a whole `fit` call (setup and `on_train_begin`/`end` included) / epochs. "
        "Overhead: time / plain - 1. Both pruning runs: PolynomialDecay(0 -> 0.5), frequency=100, "
        "pruning steps included.",
        "",
        "| model | steps/epoch | condition | epoch (ms) | overhead | CPU (ms) | overhead | fit per epoch (ms) | overhead |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for c in CONDITIONS:
            e, f, u = r["epoch"][c], r["fit"][c], r["cpu"][c]
            lines.append(f"| {r['name']} {r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]} | {r['steps']} | {c} | "
                         f"{1e3 * e:.1f} | {e / r['epoch']['plain'] - 1:+.1%} | {1e3 * u:.1f} | "
                         f"{u / r['cpu']['plain'] - 1:+.1%} | {1e3 * f:.1f} | {f / r['fit']['plain'] - 1:+.1%} |")
    lines += ["", "keras_rebuild minus tfmot, as a fraction of plain fit time (target: <= +5%):", ""]
    for r in results:
        d_epoch = (r["epoch"]["keras_rebuild"] - r["epoch"]["tfmot"]) / r["epoch"]["plain"]
        d_fit = (r["fit"]["keras_rebuild"] - r["fit"]["tfmot"]) / r["fit"]["plain"]
        d_cpu = (r["cpu"]["keras_rebuild"] - r["cpu"]["tfmot"]) / r["cpu"]["plain"]
        lines.append(f"- {r['name']}: {d_epoch:+.1%} per epoch (wall), {d_cpu:+.1%} (CPU), {d_fit:+.1%} per fit epoch "
                     f"(rebuilt model: {r['params_ratio']:.0%} of the parameters)")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn8,cnn32", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed fit call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the markdown table to this file too")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    results = [bench_model(name, args) for name in args.models.split(",")]
    text = table(results, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
