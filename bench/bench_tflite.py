"""Side-by-side TFLite benchmark: dense vs. tfmot sparsity vs. keras_rebuild vs. half width.

For each model, variants are built, exported with ``keras_rebuild.export_tflite``
(verified against Keras in LiteRT), and timed with ``compare_latency``
(LiteRT, variants interleaved round-robin so machine noise hits all alike).

Variants:
  dense        the model as built (random weights: latency does not depend on them)
  tfmot-50     tfmot ``prune_low_magnitude`` at 50% (ConstantSparsity), masks
               applied by one zero-learning-rate step with ``UpdatePruningStep``,
               then ``strip_pruning``: same shapes, half the weights zero
  tfmot-80     the same at 80%
  rebuild-50   ``keras_rebuild.prune_channels(model, sparsity=0.5)`` then
               ``keras_rebuild.rebuild(...)``
  half-width   the same architecture built with half the channels
  dense+int8, rebuild-50+int8
               those models with full-integer quantization (random calibration data)

Usage:
  python bench/bench_tflite.py --models vgg,mobilenetv2,resnet50 --runs 20 --out bench/RESULTS.md
  python bench/bench_tflite.py --models vgg,mobilenetv2 --size 96 --runs 10   # quick
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import time

import numpy as np

from keras_rebuild._compat import keras, tf, tfmot
from keras_rebuild.export import compare_latency, export_tflite

log = logging.getLogger("bench_tflite")

VARIANTS = ("dense", "tfmot-50", "tfmot-80", "rebuild-50", "half-width", "dense+int8", "rebuild-50+int8")
# A "+int8" variant is the same model exported with full-integer quantization (random calibration
# data: for latency and size only), so float and int8 ratios come from one interleaved run.


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def vgg_cifar(width: float = 1.0, input_size: int = 32, num_classes: int = 10) -> keras.Model:
    """A VGG-style CIFAR net: 3 blocks of 2 conv-BN-ReLU + max-pool, then a Dense head.

    Channels are 64/128/256 (times ``width``); the hidden Dense layer has 512 * width units.
    """
    inp = keras.Input((input_size, input_size, 3), name="image")
    x = inp
    for block, filters in enumerate((64, 128, 256)):
        f = max(1, int(round(filters * width)))
        for i in range(2):
            x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"b{block}_conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"b{block}_bn{i}")(x)
            x = keras.layers.ReLU(name=f"b{block}_relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"b{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(max(1, int(round(512 * width))), activation="relu", name="fc1")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=f"vgg_cifar_w{width:g}")


def resnet50_width(width: float = 1.0, input_shape=(224, 224, 3), classes: int = 1000) -> keras.Model:
    """ResNet50 with every layer's filters scaled by ``width``.

    Mirrors ``keras.applications.ResNet50`` (v1: stride on the first 1x1 conv
    of each stack's first block, conv shortcut there, BN epsilon 1.001e-5);
    with ``width=1.0`` it has exactly the same parameter count.
    """
    bn_axis = 3
    eps = 1.001e-5

    def w(f):
        return max(1, int(round(f * width)))

    def block(x, filters, stride=1, conv_shortcut=True, name=None):
        if conv_shortcut:
            shortcut = keras.layers.Conv2D(w(4 * filters), 1, strides=stride, name=name + "_0_conv")(x)
            shortcut = keras.layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_0_bn")(shortcut)
        else:
            shortcut = x
        x = keras.layers.Conv2D(w(filters), 1, strides=stride, name=name + "_1_conv")(x)
        x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_1_bn")(x)
        x = keras.layers.Activation("relu", name=name + "_1_relu")(x)
        x = keras.layers.Conv2D(w(filters), 3, padding="same", name=name + "_2_conv")(x)
        x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_2_bn")(x)
        x = keras.layers.Activation("relu", name=name + "_2_relu")(x)
        x = keras.layers.Conv2D(w(4 * filters), 1, name=name + "_3_conv")(x)
        x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_3_bn")(x)
        x = keras.layers.Add(name=name + "_add")([shortcut, x])
        return keras.layers.Activation("relu", name=name + "_out")(x)

    def stack(x, filters, blocks, stride1=2, name=None):
        x = block(x, filters, stride=stride1, name=name + "_block1")
        for i in range(2, blocks + 1):
            x = block(x, filters, conv_shortcut=False, name=name + "_block" + str(i))
        return x

    inp = keras.Input(input_shape, name="input_1")
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(inp)
    x = keras.layers.Conv2D(w(64), 7, strides=2, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=eps, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    x = stack(x, 64, 3, stride1=1, name="conv2")
    x = stack(x, 128, 4, name="conv3")
    x = stack(x, 256, 6, name="conv4")
    x = stack(x, 512, 3, name="conv5")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    out = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name=f"resnet50_w{width:g}")


def build(name: str, size: int, half: bool = False) -> keras.Model:
    if name == "vgg":
        return vgg_cifar(width=0.5 if half else 1.0)
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3), alpha=0.5 if half else 1.0)
    if name == "resnet50":
        if half:
            return resnet50_width(0.5, input_shape=(size, size, 3))
        return keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    raise SystemExit(f"unknown model {name!r}; choose from vgg, mobilenetv2, resnet50")


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------


def tfmot_pruned(model: keras.Model, sparsity: float) -> keras.Model:
    """Magnitude-prune ``model`` with tfmot at ``sparsity`` and strip the wrappers."""
    sp = tfmot().sparsity.keras
    pruned = sp.prune_low_magnitude(
        model, pruning_schedule=sp.ConstantSparsity(sparsity, begin_step=0, frequency=1)
    )
    # One step with learning rate 0: UpdatePruningStep computes and applies the
    # masks (weights * mask) without otherwise changing the weights.
    pruned.compile(keras.optimizers.SGD(0.0), "mse")
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]
    ys = [np.zeros((2,) + tuple(t.shape[1:]), "float32") for t in model.outputs]
    pruned.fit(xs if len(xs) > 1 else xs[0], ys if len(ys) > 1 else ys[0], epochs=1, batch_size=2, verbose=0,
               callbacks=[sp.UpdatePruningStep()])
    return sp.strip_pruning(pruned)


def rebuild_pruned(model: keras.Model, sparsity: float) -> keras.Model:
    """keras_rebuild channel pruning then physical rebuild (AttributeError if not available yet)."""
    import keras_rebuild

    prune_channels = getattr(keras_rebuild, "prune_channels")
    rebuild = getattr(keras_rebuild, "rebuild")
    return rebuild(prune_channels(model, sparsity=sparsity))


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------


def _leaf_layers(model):
    from keras_rebuild.graph import all_layers

    return [layer for layer in all_layers(model) if not isinstance(layer, keras.Model)]


def _spatial(shape) -> int:
    return int(np.prod([d for d in shape[1:-1]])) if len(shape) > 2 else 1


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one inference (batch 1) for Conv/Depthwise/Separable/Dense layers.

    Zero weights are counted: dense kernels compute them anyway.
    """
    L = keras.layers
    total = 0
    for layer in _leaf_layers(model):
        out_shape = layer.output_shape
        if isinstance(out_shape, list):
            out_shape = out_shape[0]
        if isinstance(layer, L.SeparableConv2D):
            in_ch = layer.input_shape[-1]
            dk = layer.depthwise_kernel.shape  # (kh, kw, in, mult)
            total += _spatial(out_shape) * int(np.prod(dk))
            total += _spatial(out_shape) * in_ch * int(dk[-1]) * layer.filters
        elif isinstance(layer, L.DepthwiseConv2D):
            total += _spatial(out_shape) * int(np.prod(layer.depthwise_kernel.shape))
        elif isinstance(layer, (L.Conv2DTranspose, L.Conv1DTranspose, L.Conv3DTranspose)):
            total += _spatial(layer.input_shape) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
            total += _spatial(out_shape) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, L.Dense):
            total += _spatial(out_shape) * int(np.prod(layer.kernel.shape))
    return int(total)


def count_params(model: keras.Model) -> tuple:
    """(parameters, non-zero parameters) over all weights (BN moving statistics included)."""
    ws = model.get_weights()
    return int(sum(w.size for w in ws)), int(sum(np.count_nonzero(w) for w in ws))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, (int, np.integer)) else str(n)


def _fmt_big(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def run_model(name: str, args) -> list:
    size = args.size
    rows = []
    exports = {}
    dense = build(name, size)
    dense_weights = dense.get_weights()

    def fresh():
        # tfmot's prune_low_magnitude wraps the *original* layer objects, so pruning
        # a model zeroes the weights of the model passed in: give every variant its own copy.
        copy = keras.models.clone_model(dense)
        copy.set_weights(dense_weights)
        return copy

    makers = {
        "dense": lambda: dense,
        "dense+int8": lambda: dense,
        "rebuild-50+int8": lambda: rebuild_pruned(fresh(), 0.5),
        "tfmot-50": lambda: tfmot_pruned(fresh(), 0.5),
        "tfmot-80": lambda: tfmot_pruned(fresh(), 0.8),
        "rebuild-50": lambda: rebuild_pruned(fresh(), 0.5),
        "half-width": lambda: build(name, size, half=True),
    }
    for variant in args.variants:
        t0 = time.time()
        try:
            model = makers[variant]()
        except AttributeError as exc:
            note = f"skipped: keras_rebuild.prune_channels/rebuild not available yet ({exc})"
            log.warning("%s/%s %s", name, variant, note)
            rows.append({"model": name, "variant": variant, "note": note})
            continue
        params, nonzero = count_params(model)
        macs = count_macs(model)
        quantize = "int8" if variant.endswith("+int8") else args.quantize
        result = export_tflite(
            model, quantize=quantize, verify=not args.no_verify, num_verify_samples=args.verify_samples,
            representative_data=(np.random.default_rng(0).normal(size=(16,) + tuple(model.inputs[0].shape[1:]))
                                 .astype("float32") if quantize == "int8" else None),
        )
        exports[variant] = result.content
        v = result.verification
        rows.append({
            "model": name, "variant": variant, "params": params, "nonzero": nonzero, "macs": macs,
            "bytes": result.size_bytes, "gz": result.gzipped_size_bytes,
            "verified": "skipped" if v is None else f"{'ok' if v.passed else 'FAIL'} (max err {v.max_abs_error:.2g})",
            "note": "",
        })
        log.info("%s/%s built+exported in %.1fs: %s params, %s MACs, %d bytes", name, variant, time.time() - t0,
                 _fmt_int(params), _fmt_big(macs), result.size_bytes)
        del model
    if exports:
        log.info("%s: timing %s (%d rounds x %d runs, %d thread(s))", name, list(exports), args.rounds, args.runs,
                 args.threads)
        cmp = compare_latency(exports, num_threads=args.threads, runs=args.runs, rounds=args.rounds,
                              warmup=args.warmup)
        base = "dense" if "dense" in cmp.medians_ms else next(iter(cmp.medians_ms))
        for row in rows:
            if row["variant"] in cmp.medians_ms:
                row["ms"] = cmp.medians_ms[row["variant"]]
                row["ratio"] = cmp.medians_ms[row["variant"]] / cmp.medians_ms[base]
        log.info("%s latency:\n%s", name, cmp)
    keras.backend.clear_session()
    return rows


def to_markdown(rows: list, args, argv: list, elapsed: float) -> str:
    cmd = "python bench/bench_tflite.py " + shlex.join(argv)
    lines = [
        "# TFLite side-by-side benchmark",
        "",
        f"Command: `{cmd}`",
        "",
        f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; total time {elapsed:.0f} s",
        f"- Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}, tf_keras {keras.__version__}",
        f"- Export: {args.quantize or 'float32'}; latency: LiteRT interpreter, {args.threads} thread(s), batch 1, "
        f"median of {args.rounds} interleaved rounds x {args.runs} runs after {args.warmup} warm-up runs",
        f"- Input size: VGG 32x32x3; MobileNetV2/ResNet50 {args.size}x{args.size}x3",
        "- MACs count Conv/Depthwise/Separable/Dense layers with zeros included (dense kernels compute them);"
        " params include BN statistics; 'non-zero' shows tfmot's sparsity.",
        "",
        "| model | variant | params | non-zero params | MACs | .tflite bytes | gzipped bytes | latency ms (median)"
        " | ratio to dense | verified |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("note"):
            lines.append(f"| {r['model']} | {r['variant']} | | | | | | | | {r['note']} |")
            continue
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {_fmt_int(r['params'])} | {_fmt_int(r['nonzero'])} | "
            f"{_fmt_big(r['macs'])} | {_fmt_int(r['bytes'])} | {_fmt_int(r['gz'])} | {ms} | {ratio} | {r['verified']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vgg,mobilenetv2,resnet50", help="comma list of vgg, mobilenetv2, resnet50")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--runs", type=int, default=20, help="timed runs per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved round-robin rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per variant")
    p.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    p.add_argument("--size", type=int, default=224, help="input size of MobileNetV2/ResNet50 (VGG is 32)")
    p.add_argument("--quantize", default=None, choices=[None, "float32", "float16", "dynamic", "int8"],
                   help="export mode of every variant (int8 calibrates on random data: for latency only)")
    p.add_argument("--no-verify", action="store_true", help="skip LiteRT-vs-Keras verification")
    p.add_argument("--verify-samples", type=int, default=4, help="samples used by verification")
    p.add_argument("--out", default=None, help="write a markdown table here (default: print it)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    keras.utils.set_random_seed(0)
    t0 = time.time()
    rows = []
    for name in args.models:
        rows.extend(run_model(name, args))
    md = to_markdown(rows, args, argv, time.time() - t0)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        log.info("wrote %s", args.out)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
