"""float32 vs static int8 (LiteRT Quantizer and TFLite converter): latency, size, digits accuracy.

One interleaved run per model, LiteRT interpreter with 1 thread, batch 1:
the rebuilt VGG-style CIFAR net (50% of channels removed by ``kr.rebuild``),
keras.applications MobileNetV2 and ResNet50 (``weights=None``, small inputs),
and the rebuilt digits CNN, whose test accuracy is measured for every file.
Keras 3 on the TensorFlow backend (the converter runs in this process).
Calibration: 100 digits training images for the digits CNN, 100 standard-normal
inputs for the others (no data set is downloaded).

Usage:
    KERAS_BACKEND=tensorflow python bench/bench_int8.py --size 96 --rounds 5 --runs 10
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rebuild as kr  # noqa: E402
from keras_rebuild.data import digits_cnn, load_digits  # noqa: E402
from keras_rebuild.export import compare_latency, export_tflite, run_tflite  # noqa: E402


def vgg_cifar(width: float = 1.0) -> keras.Model:
    """The VGG-style CIFAR net of bench_tflite.py, in Keras 3."""
    inp = keras.Input((32, 32, 3), name="image")
    x = inp
    for block, filters in enumerate((64, 128, 256)):
        for i in range(2):
            x = keras.layers.Conv2D(int(filters * width), 3, padding="same", use_bias=False, name=f"b{block}_conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"b{block}_bn{i}")(x)
            x = keras.layers.ReLU(name=f"b{block}_relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"b{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(int(512 * width), activation="relu", name="fc1")(x)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="vgg_cifar")


def variants(model, rep, sample):
    out = {"float32": export_tflite(model, sample_inputs=sample)}
    out["int8 quantizer"] = export_tflite(model, quantize="int8", representative_data=rep, sample_inputs=sample,
                                          atol=1.0, rtol=1.0)
    out["int8 converter"] = export_tflite(model, quantize="int8", representative_data=rep, sample_inputs=sample,
                                          int8_backend="converter", atol=1.0, rtol=1.0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="input size of MobileNetV2/ResNet50")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "INT8_RESULTS.md"))
    args = p.parse_args(argv)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    rows, acc_rows = [], []

    (x, y), (xt, yt) = load_digits()
    digits = digits_cnn(width=16, flavour="keras3")
    digits.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    digits.fit(x, y, epochs=8, batch_size=32, verbose=0)
    digits_small = kr.rebuild(digits, plan=kr.select_channels(digits, sparsity=0.5))
    digits_small.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    digits_small.fit(x, y, epochs=4, batch_size=32, verbose=0)

    vgg = vgg_cifar()
    models = {
        "digits CNN (rebuilt)": (digits_small, x[:100]),
        "VGG CIFAR (rebuilt)": (kr.rebuild(vgg, plan=kr.select_channels(vgg, sparsity=0.5)), None),
        "MobileNetV2": (keras.applications.MobileNetV2(weights=None, input_shape=(args.size, args.size, 3)), None),
        "ResNet50": (keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3)), None),
    }
    for name, (model, rep) in models.items():
        shape = tuple(model.inputs[0].shape[1:])
        if rep is None:
            rep = rng.normal(size=(100,) + shape).astype("float32")
        files = variants(model, rep, rep[:8])
        cmp = compare_latency({k: r.content for k, r in files.items()}, num_threads=1, runs=args.runs,
                              rounds=args.rounds)
        for k, r in files.items():
            rows.append((name, k, cmp.medians_ms[k], cmp.ratios[k], r.size_bytes, r.int8_backend or "-",
                         r.fallback_reason or ""))
        if name.startswith("digits"):
            acc_rows.append(("Keras", float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(xt)), 1) == yt))))
            for k, r in files.items():
                acc_rows.append((k, float(np.mean(np.argmax(run_tflite(r, xt, model=model)[0], 1) == yt))))

    lines = [
        "# float32 vs int8 (LiteRT Quantizer, TFLite converter)", "",
        f"- Date: {datetime.date.today().isoformat()}; {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}, Keras {keras.__version__} "
        f"({keras.backend.backend()} backend)",
        f"- Command: `KERAS_BACKEND=tensorflow python bench/bench_int8.py {shlex.join(sys.argv[1:])}`",
        f"- LiteRT interpreter, 1 thread, batch 1; variants interleaved, {args.rounds} rounds x {args.runs} runs; "
        f"MobileNetV2/ResNet50 {args.size}x{args.size}x3, weights=None", "",
        "| model | variant | median ms | vs float32 | size bytes | int8 by | fallback |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    lines += [f"| {m} | {v} | {ms:.3f} | {ratio:.2f} | {size} | {by} | {fb[:60]} |"
              for m, v, ms, ratio, size, by, fb in rows]
    lines += ["", "Digits test accuracy (rebuilt digits CNN):", "", "| model | accuracy |", "|---|---:|"]
    lines += [f"| {k} | {100 * a:.2f}% |" for k, a in acc_rows]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
