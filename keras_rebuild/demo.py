"""The end-to-end demo: prune -> rebuild -> recover -> export on bundled digits data.

``python -m keras_rebuild demo`` (or ``keras-rebuild demo``) trains the small
digits CNN, removes 60% of its channels, rebuilds a physically smaller model,
recovers its accuracy by distilling from the unpruned model, exports both
models to float32 and int8 TFLite, and prints a before/after table::

    keras-rebuild demo --quick --output-dir demo_out
    KERAS_BACKEND=jax keras-rebuild demo        # Keras 3 (the default) on JAX
    keras-rebuild demo --flavour tf_keras       # the tf_keras (+ tfmot) flavour

The model is a Keras 3 model (``import keras``) on the backend that
``KERAS_BACKEND`` names (TensorFlow when unset), or a tf_keras model with
``--flavour tf_keras``.

Nothing is downloaded: the data are scikit-learn's bundled 8x8 digits.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

from keras_rebuild.errors import InvalidArgumentError, OutputExistsError, received

log = logging.getLogger(__name__)

#: The Keras flavours the demo runs on; the first is the default.
FLAVOURS = ("keras3", "tf_keras")

#: Files written by :func:`run_demo` into ``output_dir``.
OUTPUT_FILES = (
    "dense_float32.tflite",
    "dense_int8.tflite",
    "rebuilt_float32.tflite",
    "rebuilt_int8.tflite",
    "rebuilt.keras",
)


def _flavour_keras(flavour: str):
    """The Keras module of ``flavour``, imported now (Keras reads ``KERAS_BACKEND`` here)."""
    if flavour == "tf_keras":
        from keras_rebuild._compat import keras
    else:
        import keras
    return keras


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=-1) == y))


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _fmt_kb(n: float) -> str:
    return f"{n / 1024:.1f} KB"


def format_table(results: Dict[str, Any]) -> str:
    """The before/after table of a :func:`run_demo` result, as text.

    Args:
        results: The dict returned by :func:`run_demo`.

    Returns:
        A multi-line string with one row per metric and columns dense,
        rebuilt and rebuilt/dense.
    """
    d, r = results["dense"], results["rebuilt"]
    rows = [
        ("params", "params", _fmt_int),
        ("MACs", "macs", _fmt_int),
        (".tflite float32", "tflite_float32_bytes", _fmt_kb),
        (".tflite int8", "tflite_int8_bytes", _fmt_kb),
        ("latency float32 (ms, 1 thread)", "latency_float32_ms", lambda v: f"{v:.4f}"),
        ("latency int8 (ms, 1 thread)", "latency_int8_ms", lambda v: f"{v:.4f}"),
        ("test accuracy (Keras)", "accuracy_keras", lambda v: f"{v:.2%}"),
        ("test accuracy (int8 TFLite)", "accuracy_int8_tflite", lambda v: f"{v:.2%}"),
    ]
    table = [("", "dense", "rebuilt", "rebuilt/dense")]
    for label, key, fmt in rows:
        a, b = d[key], r[key]
        if key.startswith("accuracy"):
            ratio = f"{(b - a) * 100:+.1f} pts"
        else:
            ratio = f"{b / a:.2f}x" if a else "n/a"
        table.append((label, fmt(a), fmt(b), ratio))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = []
    for k, row in enumerate(table):
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    sparsity = results["sparsity"]
    lines.append("")
    where = "Keras 3, " + results["backend"] + " backend" if results.get("flavour") == "keras3" else "tf_keras"
    lines.append(f"{sparsity:.0%} of the channels of every prunable layer removed; recovered with distillation "
                 f"from the dense model ({where}). Files in {results['output_dir']}")
    return "\n".join(lines)


def run_demo(
    output_dir: Optional[str] = None,
    epochs: int = 25,
    sparsity: float = 0.6,
    quick: bool = False,
    recovery_epochs: Optional[int] = None,
    seed: int = 0,
    overwrite: bool = False,
    latency_runs: int = 50,
    flavour: str = "keras3",
) -> Dict[str, Any]:
    """Run the main job on bundled digits data and return every number of the table.

    Trains ``digits_cnn`` (fixed seed), prunes ``sparsity`` of the channels of
    every prunable layer one-shot (``prune_channels``, L1 criterion),
    rebuilds a physically smaller model, recovers its accuracy with
    distillation from the dense model, exports float32 and int8 TFLite files
    of both models (int8 calibrated on training images) and measures their
    LiteRT latency (1 thread, median, interleaved) and test accuracy.

    Args:
        output_dir: Folder for the ``.tflite`` files and ``rebuilt.keras``
            (created if missing). ``None`` makes a new temporary folder.
        epochs: Training epochs of the dense model.
        sparsity: Fraction of channels removed per prunable layer, in [0, 1).
        quick: Fewer epochs and latency runs (for tests; about a minute less).
        recovery_epochs: Fine-tuning epochs after pruning; default
            ``max(epochs // 2, 1)``.
        seed: Seed of the weights, the data split and the training.
        overwrite: Replace existing output files. When ``False``, the demo
            stops before training if any of its files already exists.
        latency_runs: Timed runs per model per round of the latency comparison.
        flavour: ``"keras3"`` (``import keras``, on the backend ``KERAS_BACKEND``
            names) or ``"tf_keras"`` (the Keras 2 API that tfmot uses).

    Returns:
        A dict with ``"dense"`` and ``"rebuilt"`` entries (each a dict with
        ``params``, ``macs``, ``tflite_float32_bytes``, ``tflite_int8_bytes``,
        ``latency_float32_ms``, ``latency_int8_ms``, ``accuracy_keras``,
        ``accuracy_int8_tflite``, ``paths``), plus ``"accuracy_pruned_before_recovery"``,
        ``"sparsity"``, ``"flavour"``, ``"backend"``, ``"output_dir"``, ``"seconds"``, ``"report"`` (the
        :class:`~keras_rebuild.rebuild.RebuildReport`) and ``"table"`` (text).

    Raises:
        InvalidArgumentError: ``sparsity`` or ``epochs`` out of range, or an
            unknown ``flavour``.
        OutputExistsError: An output file exists and ``overwrite`` is False.

    Example:
        >>> from keras_rebuild.demo import run_demo
        >>> results = run_demo(quick=True)                 # doctest: +SKIP
        >>> print(results["table"])                        # doctest: +SKIP
    """
    import keras_rebuild as kr
    from keras_rebuild.export import compare_latency, export_tflite, run_tflite

    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise InvalidArgumentError(
            f"Expected `sparsity` to be a float in [0, 1). Received: {received('sparsity', sparsity)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidArgumentError(f"Expected `epochs` to be an integer >= 1. Received: {received('epochs', epochs)}")
    if flavour not in FLAVOURS:
        raise InvalidArgumentError(
            f"Expected `flavour` to be one of {FLAVOURS}. Received: {received('flavour', flavour)}")
    if quick:
        epochs = min(epochs, 12)
        latency_runs = min(latency_runs, 20)
    if recovery_epochs is None:
        recovery_epochs = max(epochs // 2, 1)
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="keras_rebuild_demo_")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in OUTPUT_FILES}
    if not overwrite:
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing:
            raise OutputExistsError(
                f"Expected `output_dir` not to contain the demo's files already (pass overwrite=True or "
                f"--force to replace them). Received: output_dir={output_dir!r} with {os.path.basename(existing[0])}"
            )

    start = time.perf_counter()
    keras = _flavour_keras(flavour)
    backend = keras.backend.backend()
    keras.utils.set_random_seed(seed)
    (x, y), (xt, yt) = kr.load_digits(seed=seed)
    calibration = x[:256]

    log.info("Training the dense digits CNN (%s, %s backend; %d epochs)...", flavour, backend, epochs)
    dense = kr.digits_cnn(width=32, seed=seed, flavour=flavour)
    dense.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    dense.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    acc_dense = _accuracy(dense.predict(xt, verbose=0), yt)
    log.info("Dense test accuracy: %.2f%%", 100 * acc_dense)

    log.info("Pruning %.0f%% of the channels (one-shot, L1) and rebuilding...", 100 * sparsity)
    pruned = kr.prune_channels(dense, sparsity=sparsity, criterion="l1")
    small, report = kr.rebuild(pruned, return_report=True)
    acc_pruned = _accuracy(small.predict(xt, verbose=0), yt)
    log.info("Rebuilt: params %d -> %d, test accuracy before recovery %.2f%%",
             report.params_before, report.params_after, 100 * acc_pruned)

    log.info("Recovering with distillation from the dense model (%d epochs)...", recovery_epochs)
    small.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    kr.recover(small, x, y, teacher=dense, distillation_weight=0.5, temperature=4.0,
               epochs=recovery_epochs, batch_size=32, verbose=0)
    acc_small = _accuracy(small.predict(xt, verbose=0), yt)
    log.info("Rebuilt test accuracy after recovery: %.2f%%", 100 * acc_small)
    small.save(paths["rebuilt.keras"], overwrite=True)

    log.info("Exporting float32 and int8 TFLite files...")
    exports = {}
    for name, model in (("dense", dense), ("rebuilt", small)):
        exports[(name, "float32")] = export_tflite(
            model, paths[f"{name}_float32.tflite"], sample_inputs=xt[:32], overwrite=overwrite)
        exports[(name, "int8")] = export_tflite(
            model, paths[f"{name}_int8.tflite"], quantize="int8", representative_data=calibration,
            sample_inputs=xt[:32], overwrite=overwrite)

    log.info("Timing in LiteRT (1 thread, interleaved)...")
    latency = compare_latency(
        {f"{n}_{q}": paths[f"{n}_{q}.tflite"] for n in ("dense", "rebuilt") for q in ("float32", "int8")},
        num_threads=1, runs=latency_runs, rounds=5,
    )

    results: Dict[str, Any] = {"sparsity": float(sparsity), "flavour": flavour, "backend": backend,
                               "output_dir": output_dir, "report": report,
                               "accuracy_pruned_before_recovery": acc_pruned, "epochs": epochs,
                               "recovery_epochs": recovery_epochs}
    for name, model, acc, params, macs in (
        ("dense", dense, acc_dense, report.params_before, report.macs_before),
        ("rebuilt", small, acc_small, report.params_after, report.macs_after),
    ):
        int8_probs, = run_tflite(paths[f"{name}_int8.tflite"], xt, model=model)
        results[name] = {
            "params": int(params),
            "macs": int(macs),
            "tflite_float32_bytes": exports[(name, "float32")].size_bytes,
            "tflite_int8_bytes": exports[(name, "int8")].size_bytes,
            "latency_float32_ms": latency.medians_ms[f"{name}_float32"],
            "latency_int8_ms": latency.medians_ms[f"{name}_int8"],
            "accuracy_keras": acc,
            "accuracy_int8_tflite": _accuracy(int8_probs, yt),
            "paths": {q: paths[f"{name}_{q}.tflite"] for q in ("float32", "int8")},
        }
    results["seconds"] = time.perf_counter() - start
    results["table"] = format_table(results)
    log.info("Demo finished in %.1f s", results["seconds"])
    return results


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``keras-rebuild demo``."""
    parser = argparse.ArgumentParser(
        prog="keras-rebuild demo",
        description="Train a digits CNN, prune 60% of its channels, rebuild, recover with distillation, "
                    "export float32/int8 TFLite, and print a before/after table. Downloads nothing.",
    )
    parser.add_argument("-o", "--output-dir", default=None,
                        help="folder for the .tflite files (default: a new temporary folder)")
    parser.add_argument("--epochs", type=int, default=25, help="training epochs of the dense model (default 25)")
    parser.add_argument("--sparsity", type=float, default=0.6, help="fraction of channels to remove (default 0.6)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing runs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="keras3",
                        help="keras3: `import keras` on the backend KERAS_BACKEND names (TensorFlow when unset); "
                             "tf_keras: the Keras 2 API that tfmot uses (default keras3)")
    parser.add_argument("--force", action="store_true", help="overwrite the demo's files in --output-dir")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show TensorFlow's own log lines (hidden by default)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m keras_rebuild demo``; prints the table and returns 0.

    Args:
        argv: Command line arguments after ``demo`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a usage error.
    """
    from keras_rebuild.errors import KerasRebuildError

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.quiet:
        log.setLevel(logging.INFO)  # the demo's own progress lines; library loggers keep their level
    try:
        results = run_demo(output_dir=args.output_dir, epochs=args.epochs, sparsity=args.sparsity,
                           quick=args.quick, seed=args.seed, overwrite=args.force,
                           flavour=args.flavour)
    except KerasRebuildError as exc:
        print(f"error: {exc}")
        return 2
    print(results["table"])
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())


__all__ = ["run_demo", "format_table", "main", "OUTPUT_FILES", "FLAVOURS"]
