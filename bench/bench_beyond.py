"""Beyond plain CNNs: what ``prune_channels(0.5)`` + ``strip_pruning`` + ``rebuild`` keeps, and why.

Usage:
    python bench/bench_beyond.py --flavours tf_keras,keras3:tensorflow --out bench/BEYOND_RESULTS.md

For each model of ``bench/beyond_models.py`` (keras-io-style VAE decoder,
CycleGAN generator and PatchGAN discriminator, LSTM/GRU text classifier, a
small ViT and one of keras-io's size, MobileViT, ``InceptionResNetV2`` and
``ConvNeXtTiny``), with ``ResNet50`` and ``MobileNetV2`` as the
comparable CNNs: one-shot ``prune_channels(model, sparsity=0.5)`` (L1
criterion), ``strip_pruning``, ``rebuild``. Reported: parameters before and
after, their ratio, the largest ``|rebuilt - stripped|`` over random inputs
(and relative to the output scale), and the channel groups that kept the most
channels whatever their weights, with the report's reasons.

Each flavour (tf_keras, or Keras 3 on one backend) runs in its own process,
since Keras reads ``KERAS_BACKEND`` at import. Weights are random
(``weights=None``) under a fixed seed; nothing is downloaded.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["vae_decoder", "cyclegan_generator", "patchgan_discriminator", "text_classifier", "vit",
          "vit_keras_io", "mobilevit", "convnext_tiny", "inception_resnet_v2", "resnet50", "mobilenetv2"]
COMPARABLE = ("resnet50", "mobilenetv2")


def _builders(keras):
    sys.path.insert(0, HERE)
    import beyond_models as bm

    builders = {name: getattr(bm, name) for name in MODELS if hasattr(bm, name)}
    builders["resnet50"] = lambda k: k.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    builders["mobilenetv2"] = lambda k: k.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    builders["convnext_tiny"] = lambda k: k.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3))
    return bm, builders


def _kept_reasons(report, top):
    """The ``top`` groups with reasons that kept the most channels: ``name (n ch): reason; reason``."""
    kept = sorted((g for g in report.groups if g.reasons), key=lambda g: (-g.channels_after, g.name))
    return [f"{g.name} ({g.channels_after}/{g.channels_before} ch): " + "; ".join(g.reasons[:2]) for g in kept[:top]]


def _latency_ratio(stripped, small, x, rounds):
    """LiteRT (1 thread, batch 1) median latency of the rebuilt model over the stripped one's, interleaved."""
    import tempfile

    import keras_rebuild as kr
    from keras_rebuild.export import compare_latency

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for label, m in (("stripped", stripped), ("rebuilt", small)):
            files[label] = os.path.join(tmp, label + ".tflite")
            kr.export_tflite(m, files[label], sample_inputs=x)  # verified against Keras
        result = compare_latency(files, num_threads=1, runs=10, rounds=rounds)
    return result.ratios["rebuilt"], result.medians_ms["stripped"], result.medians_ms["rebuilt"]


def measure(flavour, models, top, latency=(), rounds=5):
    """Runs inside the flavour's own process; returns one row per model."""
    import numpy as np

    import keras_rebuild as kr
    from keras_rebuild.testing import flavour_keras, predict, random_inputs

    keras = flavour_keras(flavour)
    bm, builders = _builders(keras)
    rows = []
    for name in models:
        keras.utils.set_random_seed(0)
        model = builders[name](keras)
        stripped = kr.strip_pruning(kr.prune_channels(model, sparsity=0.5))
        small, report = kr.rebuild(stripped, return_report=True)
        x = bm.vit_inputs(model, batch=2) if name.startswith("vit") else random_inputs(model, batch=2, seed=1)
        abs_err = rel_err = 0.0
        for a, b in zip(predict(stripped, x), predict(small, x)):
            diff = float(np.max(np.abs(a - b)))
            abs_err = max(abs_err, diff)
            rel_err = max(rel_err, diff / max(1.0, float(np.max(np.abs(a)))))
        row = {"model": name, "before": report.params_before, "after": report.params_after,
               "ratio": report.params_ratio, "abs_err": abs_err, "rel_err": rel_err,
               "kept": _kept_reasons(report, top), "notes": list(report.notes)}
        if name in latency:
            row["latency"] = _latency_ratio(stripped, small, x, rounds)
        rows.append(row)
        keras.backend.clear_session()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--flavours", default="tf_keras,keras3:tensorflow")
    parser.add_argument("--top", type=int, default=2, help="kept groups (with reasons) listed per model")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    parser.add_argument("--latency", default="", help="models whose stripped and rebuilt .tflite files are "
                                                      "exported, verified and timed (LiteRT, 1 thread)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the latency comparison")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; expected some of {MODELS}")
    if args.child:
        latency = [m for m in args.latency.split(",") if m]
        print("ROWS " + json.dumps(measure(args.child, models, args.top, latency, args.rounds)))
        return
    lines = ["`prune_channels(model, sparsity=0.5)` (L1), `strip_pruning`, `rebuild`; random weights under a fixed "
             "seed, errors over 2 random inputs (rebuilt vs stripped; relative: divided by max(1, max |output|)). "
             "Kept: the groups that kept the most channels whatever their weights, with the report's reasons.", "",
             "| flavour | backend | model | params before | params after | ratio | max abs error | max rel error "
             "| main kept reasons |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    ratios, timings = {}, []
    for spec in args.flavours.split(","):
        flavour, _, backend = spec.partition(":")
        backend = backend or "tensorflow"
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend, KERAS_REBUILD_FLAVOUR=flavour)
        if flavour == "tf_keras":
            env.setdefault("TF_USE_LEGACY_KERAS", "1")
        proc = subprocess.run([sys.executable, __file__, "--child", flavour, "--models", args.models,
                               "--top", str(args.top), "--latency", args.latency, "--rounds", str(args.rounds)], env=env, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode or not found:
            raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        for row in json.loads(found[0][5:]):
            ratios[(spec, row["model"])] = row["ratio"]
            kept = "<br>".join(r.replace("|", "/") for r in row["kept"]) or "-"
            if row["notes"]:
                kept += "<br>notes: " + "; ".join(row["notes"])
            lines.append(f"| {flavour} | {backend} | {row['model']} | {row['before']:,} | {row['after']:,} | "
                         f"{row['ratio']:.1%} | {row['abs_err']:.2g} | {row['rel_err']:.2g} | {kept} |")
            if "latency" in row:
                ratio, before, after = row["latency"]
                timings.append(f"| {flavour} | {backend} | {row['model']} | {before:.2f} | {after:.2f} | {ratio:.2f}x |")
            print(lines[-1], flush=True)
    if timings:
        lines += ["", "LiteRT latency, 1 thread, batch 1, stripped and rebuilt files interleaved (each verified "
                      "against Keras when exported):", "",
                  "| flavour | backend | model | stripped ms | rebuilt ms | ratio |", "|---|---|---|---:|---:|---:|"]
        lines += timings
    reference = [v for (spec, name), v in ratios.items() if name in COMPARABLE]
    if reference:
        lines += ["", f"Comparable CNNs ({', '.join(COMPARABLE)}) keep {min(reference):.1%}-{max(reference):.1%} "
                      "of their parameters."]
    lines += ["", "Where the only groups listed are model outputs, nothing else was kept whatever its weights. "
                  "Channels that LayerNormalization normalises over (a transformer's or ConvNeXt's residual "
                  "stream) stay: removing even a zero channel would change its mean and variance. The "
                  "normalisations' own outputs go through a one-hot selection (`<name>_select`, counted in "
                  "'params after') where that costs fewer weights than their readers lose."]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Command: `python bench/bench_beyond.py {command}`"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
