"""Benchmark accuracy recovery of a 60%-channel-pruned digits CNN.

Compares, from the same pruned starting point: no recovery, BN recalibration
alone, plain fine-tuning, distillation from the unpruned model, distillation +
BN recalibration, and the same (pruned-width) architecture trained from
scratch. Prints a markdown table.

    python bench/bench_recover.py --epochs 5 --seeds 3
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

import keras_rebuild as kr
from keras_rebuild._compat import keras
from keras_rebuild.data import digits_cnn, load_digits
from keras_rebuild.recover import recalibrate_batchnorm, recover

LR = 3e-3
FT_LR = 1e-3


def compiled(model, lr):
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=512, verbose=0), -1) == y))


def l1_prune_local(wide, sparsity, base_width):
    """Fallback pruning: copy the top-L1 channels of a trained digits_cnn into a narrower one.

    Used only while keras_rebuild.prune_channels/rebuild are unavailable.
    """
    width = int(round((1.0 - sparsity) * base_width))
    small = digits_cnn(width=width)

    def top(kernel, k):
        scores = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)
        return np.sort(np.argsort(-scores)[:k])

    keep_in = np.arange(1)
    for conv, bn, k in (("conv1", "bn1", width), ("conv2", "bn2", width), ("conv3", "bn3", 2 * width)):
        (kernel,) = wide.get_layer(conv).get_weights()
        kernel = kernel[:, :, keep_in, :]
        keep = top(kernel, k)
        small.get_layer(conv).set_weights([kernel[..., keep]])
        small.get_layer(bn).set_weights([w[keep] for w in wide.get_layer(bn).get_weights()])
        keep_in = keep
    # Flatten of (2, 2, C): index = position * C + channel.
    channels = wide.get_layer("conv3").filters
    rows = np.concatenate([p * channels + keep_in for p in range(4)])
    kernel, bias = wide.get_layer("fc1").get_weights()
    kernel = kernel[rows]
    keep = top(kernel, 2 * width)
    small.get_layer("fc1").set_weights([kernel[:, keep], bias[keep]])
    kernel, bias = wide.get_layer("probs").get_weights()
    small.get_layer("probs").set_weights([kernel[keep], bias])
    return small


def prune(wide, sparsity, base_width):
    """Prune with keras_rebuild if available, else the local L1 fallback. Returns (model, how)."""
    if hasattr(kr, "prune_channels") and hasattr(kr, "rebuild"):
        try:
            copy = keras.models.clone_model(wide)
            copy.set_weights(wide.get_weights())
            small = kr.rebuild(kr.prune_channels(copy, sparsity=sparsity))
            return small, "keras_rebuild.prune_channels + rebuild"
        except Exception as exc:  # API still in flux: fall back, and say so
            logging.warning("prune_channels/rebuild failed (%s); using local L1 fallback", exc)
    return l1_prune_local(wide, sparsity, base_width), (
        "local top-L1 channel copy (keras_rebuild.prune_channels/rebuild not available)"
    )


def run_seed(seed, args, data):
    (x, y), (xt, yt) = data
    rows = []
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    teacher = compiled(digits_cnn(width=args.width, seed=seed), LR)
    teacher.fit(x, y, epochs=args.teacher_epochs, batch_size=args.batch_size, verbose=0)
    rows.append(("unpruned teacher", teacher.count_params(), test_accuracy(teacher, xt, yt),
                 args.teacher_epochs, time.perf_counter() - start))

    pruned, how = prune(teacher, args.sparsity, args.width)
    weights = pruned.get_weights()

    def fresh():
        model = keras.models.clone_model(pruned)
        model.set_weights(weights)
        return compiled(model, FT_LR)

    model = fresh()
    rows.append(("pruned, no recovery", model.count_params(), test_accuracy(model, xt, yt), 0, 0.0))

    start = time.perf_counter()
    model = fresh()
    recalibrate_batchnorm(model, x, steps=args.recalibration_steps, batch_size=args.batch_size)
    rows.append(("BN recalibration only", model.count_params(), test_accuracy(model, xt, yt), 0,
                 time.perf_counter() - start))

    methods = (
        ("plain fine-tuning", dict()),
        ("fine-tuning + BN recalibration", dict(recalibrate_bn=True)),
        (f"distillation (a={args.alpha}, T={args.temperature})", dict(teacher=teacher)),
        ("distillation + BN recalibration", dict(teacher=teacher, recalibrate_bn=True)),
    )
    for name, kwargs in methods:
        keras.utils.set_random_seed(seed)
        model = fresh()
        start = time.perf_counter()
        recover(model, x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0,
                distillation_weight=args.alpha, temperature=args.temperature,
                recalibration_steps=args.recalibration_steps, **kwargs)
        rows.append((name, model.count_params(), test_accuracy(model, xt, yt), args.epochs,
                     time.perf_counter() - start))

    for epochs in sorted({args.epochs, args.teacher_epochs}):
        keras.utils.set_random_seed(seed)
        start = time.perf_counter()
        model = compiled(keras.models.clone_model(pruned), LR)  # fresh random init
        model.fit(x, y, epochs=epochs, batch_size=args.batch_size, verbose=0)
        rows.append((f"pruned width from scratch ({epochs} ep)", model.count_params(),
                     test_accuracy(model, xt, yt), epochs, time.perf_counter() - start))
    keras.backend.clear_session()
    return rows, how


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32, help="width of the unpruned digits_cnn")
    parser.add_argument("--sparsity", type=float, default=0.6, help="fraction of channels pruned")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation_weight")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--recalibration-steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1, help="repeat over this many seeds")
    args = parser.parse_args(argv)

    data = load_digits()
    results, how = {}, None
    for seed in range(args.seeds):
        rows, how = run_seed(seed, args, data)
        for name, params, acc, epochs, seconds in rows:
            results.setdefault(name, []).append((params, acc, epochs, seconds))

    (x, _), (xt, _) = data
    print(f"digits: {len(x)} train / {len(xt)} test; digits_cnn(width={args.width}), "
          f"{args.sparsity:.0%} of channels pruned; pruning: {how}; seeds: {args.seeds}\n")
    print("| method | params | test accuracy | epochs | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        accs = np.array([r[1] for r in runs]) * 100
        acc = f"{accs.mean():.2f}" + (f" ± {accs.std():.2f}" if len(accs) > 1 else "")
        print(f"| {name} | {runs[0][0]:,} | {acc} | {runs[0][2]} | {np.mean([r[3] for r in runs]):.1f} |")


if __name__ == "__main__":
    main()
