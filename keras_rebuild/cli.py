"""The ``keras-rebuild`` command line.

Subcommands::

    keras-rebuild inspect MODEL.keras
    keras-rebuild prune MODEL.keras --sparsity 0.5 [--criterion l1] [--scope global] -o SMALL.keras
    keras-rebuild export MODEL.keras -o MODEL.tflite [--quantize int8 --calibration DATA.npy]
    keras-rebuild bench A.tflite [B.tflite ...]
    keras-rebuild demo

Models load with Keras' safe mode on (a Lambda layer in an untrusted file is
code); ``--unsafe`` turns it off for files you trust. Existing outputs are
never overwritten without ``--force``. Errors print one line and exit with
status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


class CLIError(Exception):
    """An error reported to the user as one line, exit status 2."""


def _check_output(path: str, force: bool, suffixes=None):
    if suffixes and not path.endswith(tuple(suffixes)):
        raise CLIError(f"Expected the output to end with one of {', '.join(suffixes)}. Received: -o {path}")
    if os.path.exists(path) and not force:
        raise CLIError(f"Output {path} exists. Pass --force to overwrite it.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"Expected the output folder to exist. Received: -o {path}")


def load_model(path: str, unsafe: bool = False):
    """Load a ``.keras``/``.h5`` model with safe mode on unless ``unsafe``."""
    from keras_rebuild._compat import keras

    if not os.path.exists(path):
        raise CLIError(f"No such model file: {path}")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise CLIError(f"Expected a .keras or .h5 file or a SavedModel folder. Received: {path}")
        return keras.models.load_model(path, compile=False)
    if not path.endswith(MODEL_SUFFIXES):
        raise CLIError(f"Expected a model file ending in {', '.join(MODEL_SUFFIXES)}. Received: {path}")
    if path.endswith((".h5", ".hdf5")) and not unsafe and _h5_has_lambda(path):
        raise CLIError(
            f"{path} contains a Lambda layer, which runs code stored in the file. "
            "Load it only if you trust it: pass --unsafe."
        )
    try:
        if path.endswith(".keras"):
            return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as exc:
        raise CLIError(f"Could not load {path}: {exc}") from exc


def _h5_has_lambda(path: str) -> bool:
    try:
        import h5py
    except ImportError:  # pragma: no cover
        return False
    try:
        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config", b"")
    except OSError as exc:
        raise CLIError(f"Expected an HDF5 model file. Received: {path} ({exc})") from exc
    if isinstance(config, bytes):
        config = config.decode("utf-8", "replace")
    return '"class_name": "Lambda"' in str(config)


# ----------------------------------------------------------------------------- commands
def cmd_inspect(args) -> int:
    import keras_rebuild as kr
    from keras_rebuild.rebuild import cost_report

    model = load_model(args.model, args.unsafe)
    analysis = kr.analyze(model)
    prunable = [g for g in analysis.groups if g.prunable]
    print(f"Model '{model.name}': {model.count_params():,} parameters, "
          f"{len(analysis.groups)} channel groups, {len(prunable)} prunable\n")
    print(analysis.summary())
    print()
    print(cost_report(analysis).table())
    return 0


def cmd_prune(args) -> int:
    import keras_rebuild as kr

    _check_output(args.output, args.force, MODEL_SUFFIXES)
    model = load_model(args.model, args.unsafe)
    pruned = kr.prune_channels(
        model, sparsity=args.sparsity, criterion=args.criterion, scope=args.scope,
        round_to=args.round_to, ignore=tuple(args.ignore or ()),
    )
    small, report = kr.rebuild(pruned, return_report=True)
    print(report.table())
    _atomic_save(small, args.output)
    print(f"\nSaved {args.output}")
    return 0


def _atomic_save(model, path: str):
    suffix = os.path.splitext(path)[1]
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{suffix}")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_export(args) -> int:
    import numpy as np

    from keras_rebuild.export import export_tflite

    _check_output(args.output, args.force, (".tflite",))
    model = load_model(args.model, args.unsafe)
    calibration = None
    if args.calibration:
        if not os.path.exists(args.calibration):
            raise CLIError(f"No such calibration file: {args.calibration}")
        calibration = np.load(args.calibration)
    quantize = None if args.quantize in (None, "float32") else args.quantize
    result = export_tflite(model, args.output, quantize=quantize, representative_data=calibration,
                           int8_io=args.int8_io, overwrite=args.force)
    print(result)
    return 0


def cmd_bench(args) -> int:
    from keras_rebuild.export import compare_latency

    for p in args.models:
        if not os.path.exists(p):
            raise CLIError(f"No such .tflite file: {p}")
    variants = {os.path.basename(p) if list(map(os.path.basename, args.models)).count(os.path.basename(p)) == 1
                else p: p for p in args.models}
    result = compare_latency(variants, num_threads=args.threads, runs=args.runs)
    print(result)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-rebuild",
        description="Prune whole channels of Keras models, rebuild them smaller, export verified TFLite.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_cmd(name, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("model", help="a .keras or .h5 file (or a SavedModel folder)")
        p.add_argument("--unsafe", action="store_true", help="turn Keras safe mode off (trusted files only)")
        return p

    p = model_cmd("inspect", "dependency groups, what can be pruned and why not, params and MACs per layer")
    p.set_defaults(func=cmd_inspect)

    p = model_cmd("prune", "one-shot prune and rebuild, printing the before/after report")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of channels to remove, in [0, 1)")
    p.add_argument("--criterion", default="l1", help="l1, l2, bn_scale, random (default l1)")
    p.add_argument("--scope", default="local", choices=["local", "global"])
    p.add_argument("--round-to", type=int, default=1, help="kept channel counts rounded to a multiple")
    p.add_argument("--ignore", action="append", help="layer name to leave whole (repeatable)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_prune)

    p = model_cmd("export", "convert to a verified .tflite file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--quantize", choices=["float32", "float16", "dynamic", "int8"], default=None)
    p.add_argument("--calibration", help=".npy file of representative inputs (needed for int8)")
    p.add_argument("--int8-io", action="store_true", help="int8 input and output tensors (with --quantize int8)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="LiteRT latency table of .tflite files (interleaved runs)")
    p.add_argument("models", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.set_defaults(func=cmd_bench)

    # `demo` is dispatched before parsing (see main); listed here for --help.
    sub.add_parser("demo", help="prune -> rebuild -> recover -> export on bundled digits data "
                                "(keras-rebuild demo --help)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``keras-rebuild`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (-o, --force, ...)
        from keras_rebuild import demo

        return demo.main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from keras_rebuild.errors import KerasRebuildError

    try:
        return args.func(args)
    except (CLIError, KerasRebuildError) as exc:
        print(f"keras-rebuild: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
