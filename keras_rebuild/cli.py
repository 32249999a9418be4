"""The ``keras-rebuild`` command line.

Subcommands::

    keras-rebuild inspect MODEL.keras
    keras-rebuild prune MODEL.keras --sparsity 0.5 [--criterion l1] [--scope global] -o SMALL.keras
    keras-rebuild recover SMALL.keras --data TRAIN.npz [--teacher MODEL.keras] --epochs 5 -o RECOVERED.keras
    keras-rebuild export MODEL.keras -o MODEL.tflite [--quantize int8 --calibration DATA.npy]
    keras-rebuild bench A.tflite [B.tflite ...]
    keras-rebuild demo

Model files of both Keras flavours (Keras 3 and tf_keras; ``.keras``, ``.h5``
or a tf_keras SavedModel folder) are checked before anything in them is
deserialised: a Lambda layer, a function named from an arbitrary module or an
unknown class is refused (it would run code) unless ``--unsafe`` is given for
a file you trust. Outputs are written atomically and never overwritten without
``--force``. Errors print one line and exit with status 2. TensorFlow's own log
lines are hidden unless ``-v`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import threading
from typing import List, Optional

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
CRITERIA = ("l1", "l2", "bn_scale", "activation", "apoz", "taylor", "random")
DATA_CRITERIA = ("activation", "apoz", "taylor")


class CLIError(Exception):
    """An error reported to the user as one line, exit status 2."""


# ----------------------------------------------------------------------------- messages in flags
# Python arguments of the API -> the command line flags that set them.
_FLAGS = {
    "safe_mode": "--unsafe", "overwrite": "--force", "representative_data": "--calibration",
    "int8_io": "--int8-io", "round_to": "--round-to", "sparsity": "--sparsity", "criterion": "--criterion",
    "scope": "--scope", "ignore": "--ignore", "quantize": "--quantize", "data": "--data",
    "teacher": "--teacher", "epochs": "--epochs", "batch_size": "--batch-size", "num_threads": "--threads",
    "runs": "--runs", "path": "-o", "sample_inputs": "--calibration", "atol": "--atol", "rtol": "--rtol",
    "min_top1": "--min-top1", "verify": "--no-verify",
}
_SPECIAL = [
    (re.compile(r"pass `?data=\(x, y\)`?( or `?data=x`?)?"), "pass --data TRAIN.npz"),
    (re.compile(r"`?safe_mode=False`?"), "--unsafe"),
    (re.compile(r"`?overwrite=True`?"), "--force"),
    (re.compile(r"`?int8_io=True`?"), "--int8-io"),
    (re.compile(r"pass `?verify=False`?"), "pass --no-verify"),
    (re.compile(r"quantize='(\w+)'"), r"--quantize \1"),
    (re.compile(r"call `?(keras_rebuild\.)?strip_pruning\(model\)`? first"),
     "run keras-rebuild prune on the model before it was wrapped for pruning"),
]


def flagify(message: str) -> str:
    """Rewrite an API error message in terms of command line flags (``round_to=0`` -> ``--round-to 0``)."""
    for pattern, repl in _SPECIAL:
        message = pattern.sub(repl, message)
    names = "|".join(sorted(map(re.escape, _FLAGS), key=len, reverse=True))
    message = re.sub(rf"`({names})`", lambda m: _FLAGS[m.group(1)], message)
    message = re.sub(rf"(?<![\w.-])({names})=", lambda m: _FLAGS[m.group(1)] + " ", message)
    return message


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- quiet output
_LOG_LINE = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]*\] |WARNING: All log messages before absl::InitializeLog"
    rb"|To enable the following instructions:|INFO: Created TensorFlow Lite|INFO: Initialized TensorFlow Lite"
    rb"|\r?Running Calibration:)"
)


@contextlib.contextmanager
def _filtered_stderr():
    """Drop TensorFlow's C++ log lines written to file descriptor 2; pass everything else through."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
    except (OSError, ValueError, AttributeError):
        yield
        return

    def pump():
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not _LOG_LINE.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="keras-rebuild-stderr", daemon=True)
    thread.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
        thread.join(timeout=5)
        os.close(saved)


class _DropMessages(logging.Filter):
    """Drops known false alarms (a model saved uncompiled is 'compiled' by tf_keras' HDF5 code)."""

    def filter(self, record):
        return "Compiled the loaded model, but the compiled metrics" not in record.getMessage()


@contextlib.contextmanager
def _quiet(verbose: bool):
    """The entry point's output settings, restored afterwards (the library itself changes none)."""
    import warnings

    env_before = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    loggers = {name: logging.getLogger(name) for name in ("tensorflow", "absl", "keras", "h5py")}
    levels = {name: lg.level for name, lg in loggers.items()}
    ours = logging.getLogger("keras_rebuild")
    ours_level = ours.level
    drop = _DropMessages()
    handler = None
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger().addHandler(handler)
    for lg in loggers.values():
        lg.addFilter(drop)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        if verbose:
            ours.setLevel(logging.INFO)
        else:
            if env_before is None:
                os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
            for lg in loggers.values():
                lg.setLevel(logging.ERROR)
            warnings.simplefilter("ignore")
            stack.enter_context(_filtered_stderr())
        try:
            yield
        finally:
            ours.setLevel(ours_level)
            for name, lg in loggers.items():
                lg.setLevel(levels[name])
                lg.removeFilter(drop)
            if handler is not None:
                logging.getLogger().removeHandler(handler)
            if env_before is None:
                os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


# ----------------------------------------------------------------------------- inputs
def load_model(path: str, unsafe: bool = False, flag: str = "MODEL"):
    """Load a model file of either Keras flavour, refusing files that name code unless ``unsafe``."""
    from keras_rebuild import safety

    if not os.path.lexists(path):
        raise CLIError(f"No such model file: {path}")
    if not os.path.isdir(path) and not path.endswith(MODEL_SUFFIXES):
        raise CLIError(f"Expected a model file ending in {', '.join(MODEL_SUFFIXES)} or a SavedModel folder. "
                       f"Received: {flag} {path}")
    return safety.load_model(path, unsafe=unsafe)


def load_arrays(path: str, flag: str, want_labels: bool = False):
    """``(x, y)`` from an ``.npy`` file (x only) or an ``.npz`` archive (``x``/``y``, ``x_train``/``y_train``...)."""
    import numpy as np

    if not os.path.exists(path):
        raise CLIError(f"Expected {flag} to name an existing .npy or .npz file. Received: {flag} {path} (no such file)")
    if os.path.isdir(path):
        raise CLIError(f"Expected {flag} to name a .npy or .npz file. Received: {flag} {path} (a folder)")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise CLIError(f"Expected {flag} to be readable. Received: {flag} {path} ({exc.strerror or exc})") from None
    if head != b"\x93NUMPY" and not head.startswith(b"PK\x03\x04"):
        raise CLIError(f"Expected {flag} to be a NumPy .npy or .npz file. Received: {flag} {path} (another format)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            x, y = loaded, None
        else:
            with loaded:
                files = list(loaded.files)
                if not files:
                    raise CLIError(f"Expected {flag} to hold arrays. Received: {flag} {path} (an empty archive)")
                x_key = next((k for k in ("x", "x_train", "inputs", "arr_0") if k in files), None)
                y_key = next((k for k in ("y", "y_train", "labels", "arr_1") if k in files), None)
                if x_key is None:
                    if len(files) != 1:
                        raise CLIError(
                            f"Expected {flag} to hold an array named x (and y for labels). "
                            f"Received: {flag} {path} holds {', '.join(files[:6])}"
                        )
                    x_key = files[0]
                x = loaded[x_key]
                y = loaded[y_key] if y_key is not None else None
    except CLIError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise CLIError(f"Expected {flag} to hold numeric NumPy arrays. Received: {flag} {path} ({_one_line(exc, 200)})"
                       ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt archive raises many kinds of errors
        raise CLIError(f"Expected {flag} to be an intact .npy or .npz file. Received: {flag} {path} "
                       f"({type(exc).__name__}: {_one_line(exc, 200)})") from None
    for name, a in (("x", x), ("y", y)):
        if a is not None and (a.dtype == object or not (np.issubdtype(a.dtype, np.number)
                                                        or np.issubdtype(a.dtype, np.bool_))):
            raise CLIError(f"Expected {flag} to hold numeric arrays. Received: {name} of dtype {a.dtype} in {path}")
    if want_labels and y is None:
        raise CLIError(f"Expected {flag} to be an .npz archive holding x and y (inputs and labels). "
                       f"Received: {flag} {path} holds inputs only")
    return x, y


def _unique_names(paths: List[str]) -> dict:
    """Row names for bench: base names, or the paths when base names clash; repeats numbered."""
    bases = [os.path.basename(p) for p in paths]
    names = {}
    for p, base in zip(paths, bases):
        name = base if bases.count(base) == 1 else p
        candidate, k = name, 2
        while candidate in names:
            candidate, k = f"{name} #{k}", k + 1
        names[candidate] = p
    return names


def _is_pruning_wrapped(model) -> bool:
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        if type(layer).__name__ == "StructuredPruningWrapper":
            return True
        stack.extend(getattr(layer, "layers", []) or [])
    return False


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
    print("\nLayers in each group:")
    for group in analysis.groups:
        print(f"  {group.name} ({group.size} channels): {', '.join(group.members)}")
    print()
    report = cost_report(analysis)
    lines = report.table().splitlines()
    # Drop the before/after ratio line: nothing was removed, so it would only say 100%.
    lines = [line for line in lines if not (line.startswith("params ") and "(100.0%)" in line)]
    while lines and not lines[-1].strip():
        lines.pop()
    print("\n".join(lines))
    print(f"\nparams {report.params_before:,}, MACs {report.macs_before:,}")
    return 0


def cmd_prune(args) -> int:
    import keras_rebuild as kr
    from keras_rebuild.io import check_output_path, save_model

    check_output_path(args.output, overwrite=args.force, suffixes=MODEL_SUFFIXES, arg="-o", force_hint="--force")
    if args.criterion in DATA_CRITERIA and not args.data:
        raise CLIError(f"Expected --data TRAIN.npz with --criterion {args.criterion}: it scores channels on "
                       "activations. Received: no --data")
    data = None
    if args.data:
        x, y = load_arrays(args.data, "--data")
        data = (x, y) if y is not None else x
    model = load_model(args.model, args.unsafe)
    if _is_pruning_wrapped(model):
        model = kr.strip_pruning(model)
    pruned = kr.prune_channels(
        model, sparsity=args.sparsity, criterion=args.criterion, scope=args.scope,
        round_to=args.round_to, ignore=tuple(args.ignore or ()), data=data,
    )
    small, report = kr.rebuild(pruned, return_report=True)
    print(report.table())
    save_model(small, args.output, overwrite=args.force, suffixes=MODEL_SUFFIXES, arg="-o", force_hint="--force")
    print(f"\nSaved {args.output}: params {report.params_before:,} -> {report.params_after:,} "
          f"({report.params_ratio:.1%}), MACs {report.macs_before:,} -> {report.macs_after:,} "
          f"({report.macs_ratio:.1%})")
    stem, suffix = os.path.splitext(args.output)
    print("\nNext step: pruning lowers accuracy until the model is fine-tuned. Recover it with distillation "
          "from the original:\n"
          f"  keras-rebuild recover {args.output} --data TRAIN.npz --teacher {args.model} --epochs 5 "
          f"-o {stem}_recovered{suffix}")
    return 0


def _compile_for(model, x, y, loss: str, learning_rate: float):
    """Compile ``model`` with a loss suited to the labels (or ``loss`` if given) and Adam."""
    import numpy as np

    if loss == "auto":
        probe = model(x[:8], training=False)
        probe = np.asarray(probe[0] if isinstance(probe, (list, tuple)) else probe)
        probs = probe.ndim == 2 and probe.shape[1] > 1 and bool(
            np.all(probe >= 0) and np.allclose(probe.sum(axis=1), 1.0, atol=1e-3))
        y_arr = np.asarray(y) if y is not None else None
        if y_arr is None:  # distillation from the teacher alone: the hard-label loss is unused
            loss_obj = "categorical_crossentropy" if probs else "mse"
        elif np.issubdtype(y_arr.dtype, np.integer) and (y_arr.ndim == 1 or y_arr.shape[-1] == 1) and probe.shape[-1] > 1:
            loss_obj = "sparse_categorical_crossentropy" if probs else "sparse_categorical_crossentropy_logits"
        elif y_arr.shape[1:] == probe.shape[1:] and probe.shape[-1] > 1 and np.all((y_arr == 0) | (y_arr == 1)):
            loss_obj = "categorical_crossentropy" if probs else "categorical_crossentropy_logits"
        else:
            loss_obj = "mse"
        loss = loss_obj
    flavour_keras = _keras_of(model)
    losses = flavour_keras.losses
    table = {
        "sparse_categorical_crossentropy_logits": losses.SparseCategoricalCrossentropy(from_logits=True),
        "categorical_crossentropy_logits": losses.CategoricalCrossentropy(from_logits=True),
    }
    metrics = ["accuracy"] if "crossentropy" in loss else []
    model.compile(optimizer=flavour_keras.optimizers.Adam(learning_rate), loss=table.get(loss, loss), metrics=metrics)
    return loss


def _keras_of(model):
    root = type(model).__module__.split(".", 1)[0]
    if root == "keras":
        import keras

        return keras
    from keras_rebuild._compat import keras

    return keras


def cmd_recover(args) -> int:
    import keras_rebuild as kr
    from keras_rebuild.io import check_output_path, save_model

    check_output_path(args.output, overwrite=args.force, suffixes=MODEL_SUFFIXES, arg="-o", force_hint="--force")
    x, y = load_arrays(args.data, "--data", want_labels=args.teacher is None)
    model = load_model(args.model, args.unsafe)
    teacher = load_model(args.teacher, args.unsafe, flag="--teacher") if args.teacher else None
    loss = _compile_for(model, x, y, args.loss, args.learning_rate)
    print(f"Recovering {args.model} ({loss}{', distilled from ' + args.teacher if teacher is not None else ''}, "
          f"{args.epochs} epochs)")
    history = kr.recover(model, x, y, teacher=teacher, epochs=args.epochs, batch_size=args.batch_size,
                         validation_split=args.validation_split, recalibrate_bn=args.recalibrate_bn,
                         verbose=2 if args.verbose else 0)
    last = {k: v[-1] for k, v in history.history.items() if v}
    if last:
        print("After recovery: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items())))
    save_model(model, args.output, overwrite=args.force, suffixes=MODEL_SUFFIXES, arg="-o", force_hint="--force")
    print(f"Saved {args.output}")
    print(f"\nNext step: export it for phones:\n  keras-rebuild export {args.output} -o "
          f"{os.path.splitext(args.output)[0]}.tflite [--quantize int8 --calibration DATA.npy]")
    return 0


def cmd_export(args) -> int:
    from keras_rebuild.export import export_tflite
    from keras_rebuild.io import check_output_path

    check_output_path(args.output, overwrite=args.force, suffixes=(".tflite",), arg="-o", force_hint="--force")
    if args.int8_io and args.quantize != "int8":
        raise CLIError(f"Expected --int8-io only with --quantize int8. Received: --quantize {args.quantize}")
    if args.quantize == "int8" and not args.calibration:
        raise CLIError("Expected --calibration DATA.npy (a few hundred training inputs) with --quantize int8: "
                       "full-integer quantization calibrates activation ranges on it. Received: no --calibration")
    calibration = load_arrays(args.calibration, "--calibration")[0] if args.calibration else None
    model = load_model(args.model, args.unsafe)
    quantize = None if args.quantize == "float32" else args.quantize
    result = export_tflite(model, args.output, quantize=quantize, representative_data=calibration,
                           int8_io=args.int8_io, overwrite=args.force, verify=not args.no_verify,
                           atol=args.atol, rtol=args.rtol, ctol=args.ctol, batch_size=args.batch_size,
                           unroll_rnn=args.unroll_rnn, select_tf_ops=args.select_tf_ops)
    print(result)
    return 0


def cmd_bench(args) -> int:
    from keras_rebuild.export import compare_latency

    for p in args.models:
        if not os.path.exists(p):
            raise CLIError(f"No such .tflite file: {p}")
        if os.path.isdir(p):
            raise CLIError(f"Expected a .tflite file. Received: {p} (a folder)")
        try:
            with open(p, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise CLIError(f"Expected a readable .tflite file. Received: {p} ({exc.strerror or exc})") from None
        if head[4:8] != b"TFL3":
            raise CLIError(f"Expected a .tflite file (a TFLite flatbuffer). Received: {p} (another format)")
    if args.android:
        return _bench_on_android(args.models)
    result = compare_latency(_unique_names(args.models), num_threads=args.threads, runs=args.runs)
    print(result)
    return 0


def android_commands(models: List[str]) -> List[List[str]]:
    """The litert-cli commands that run LiteRT's ``benchmark_model`` for each file on a phone (over adb)."""
    return [["litert", "benchmark", path, "--android"] for path in models]


def _bench_on_android(models: List[str]) -> int:
    import shutil
    import subprocess

    if shutil.which("litert") is None:
        raise CLIError(
            "Expected the `litert` command of litert-cli for --android (pip install litert-cli; it pushes the "
            "file and runs benchmark_model on the phone connected over adb). Received: --android with no "
            "`litert` on PATH"
        )
    for command in android_commands(models):
        print("$ " + " ".join(command), flush=True)
        code = subprocess.run(command).returncode
        if code != 0:
            raise CLIError(f"Expected `{' '.join(command)}` to succeed (is a phone connected over adb?). "
                           f"Received: exit status {code}")
    return 0


# ----------------------------------------------------------------------------- parser
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), received {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), received {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, received {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("keras-rebuild")
    except (ImportError, PackageNotFoundError):  # pragma: no cover - running from a checkout
        return "unknown (not installed)"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.required or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 and action.default is False:  # a switch
            return text + " (default: off)"
        if action.default is None:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = _Parser(
        prog="keras-rebuild", formatter_class=fmt,
        description="Prune whole channels of Keras models, rebuild them smaller, recover accuracy, "
                    "export verified TFLite.",
    )
    parser.add_argument("--version", action="version", version=f"keras-rebuild {_version()}")
    verbose_help = "show progress and TensorFlow's own log lines"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name, help_):
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        return p

    def model_cmd(name, help_):
        p = command(name, help_)
        p.add_argument("model", metavar="MODEL", help="a .keras or .h5 file (Keras 3 or tf_keras), or a SavedModel folder")
        p.add_argument("--unsafe", action="store_true",
                       help="load files whose layers run code (Lambda layers, custom classes): trusted files only")
        return p

    p = model_cmd("inspect", "dependency groups, what can be pruned and why not, params and MACs per layer")
    p.set_defaults(func=cmd_inspect)

    p = model_cmd("prune", "one-shot prune and rebuild, printing the before/after report")
    p.add_argument("--sparsity", type=_fraction, required=True, help="fraction of channels to remove, in [0, 1)")
    p.add_argument("--criterion", default="l1", choices=CRITERIA,
                   help="channel importance; activation, apoz and taylor need --data")
    p.add_argument("--data", metavar="TRAIN.npz",
                   help=".npz with x (and y) for data-driven criteria, or a .npy of inputs")
    p.add_argument("--scope", default="local", choices=["local", "global"],
                   help="rank channels within each group (local) or across all groups (global)")
    p.add_argument("--round-to", type=_positive_int, default=1, metavar="N",
                   help="round kept channel counts to a multiple of N")
    p.add_argument("--ignore", action="append", metavar="LAYER", default=None,
                   help="layer name to leave whole (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="SMALL.keras", help="where to save the rebuilt model")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_prune)

    p = model_cmd("recover", "fine-tune a pruned model to recover accuracy, optionally distilling from the original")
    p.add_argument("--data", required=True, metavar="TRAIN.npz", help=".npz holding training inputs x and labels y")
    p.add_argument("--teacher", metavar="ORIGINAL.keras", default=None,
                   help="the unpruned model to distil from (then y may be omitted)")
    p.add_argument("--epochs", type=_positive_int, default=5, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="training batch size")
    p.add_argument("--learning-rate", type=_non_negative, default=1e-3, help="Adam learning rate")
    p.add_argument("--loss", default="auto",
                   help="a Keras loss name; auto: cross-entropy for class labels, else mean squared error")
    p.add_argument("--validation-split", type=_fraction, default=0.0, help="fraction of --data held out")
    p.add_argument("--recalibrate-bn", action="store_true", help="re-estimate BatchNorm statistics first")
    p.add_argument("-o", "--output", required=True, metavar="RECOVERED.keras", help="where to save the model")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_recover)

    p = model_cmd("export", "convert to a .tflite file, verified against the Keras model in LiteRT")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.tflite", help="where to write the .tflite file")
    p.add_argument("--quantize", choices=["float32", "float16", "dynamic", "int8"], default="float32",
                   help="weights and activations: float32, float16 weights, dynamic-range int8, or full int8")
    p.add_argument("--calibration", metavar="DATA.npy",
                   help=".npy (or .npz with x) of representative inputs; needed for --quantize int8")
    p.add_argument("--int8-io", action="store_true",
                   help="int8 input and output tensors (with --quantize int8); prints their scale and zero point")
    p.add_argument("--atol", type=_non_negative, default=None,
                   help="absolute verification tolerance (default: per mode, 1e-6 for float32)")
    p.add_argument("--rtol", type=_non_negative, default=None,
                   help="verification tolerance relative to the output scale (default: per mode, 1e-4 for float32)")
    p.add_argument("--ctol", type=_non_negative, default=None,
                   help="verification tolerance as a multiple of each output's float round-off "
                        "(default: per mode, 20 for float32)")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="static batch of the file (default: dynamic; 1 for recurrent models)")
    p.add_argument("--unroll-rnn", action="store_true",
                   help="unroll recurrent layers (needs a fixed number of time steps) to keep a dynamic batch")
    p.add_argument("--select-tf-ops", action="store_true",
                   help="allow TensorFlow (Flex) ops the built-in LiteRT ops lack; phones then need the Flex "
                        "delegate, and such files cannot be verified here (use with --no-verify)")
    p.add_argument("--no-verify", action="store_true", help="skip comparing LiteRT with Keras")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_export)

    p = command("bench", "LiteRT latency table of .tflite files (interleaved runs)")
    p.add_argument("models", nargs="+", metavar="MODEL.tflite", help=".tflite files to time; the first is the baseline")
    p.add_argument("--threads", type=_positive_int, default=1, help="interpreter threads")
    p.add_argument("--runs", type=_positive_int, default=50, help="timed runs per model per round")
    p.add_argument("--android", action="store_true",
                   help="time each file on the phone connected over adb, with litert-cli's `litert benchmark "
                        "MODEL --android` (default: off, time here)")
    p.set_defaults(func=cmd_bench)

    # `demo` is dispatched before parsing (see main); listed here for --help.
    sub.add_parser("demo", help="prune -> rebuild -> recover -> export on bundled digits data "
                                "(keras-rebuild demo --help)")
    return parser


def _run(args) -> int:
    from keras_rebuild.errors import KerasRebuildError
    from keras_rebuild.io import exit_on_signals

    try:
        with exit_on_signals():
            return args.func(args)
    except CLIError as exc:
        message = str(exc)
    except KerasRebuildError as exc:
        message = flagify(str(exc))
    except KeyboardInterrupt:
        message = "interrupted; nothing was written"
    except OSError as exc:
        message = f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
    except Exception as exc:  # noqa: BLE001 - the command line never shows a traceback
        message = f"{type(exc).__name__}: {exc}"
    print(f"keras-rebuild: error: {_one_line(message)}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``keras-rebuild`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (-o, --force, ...)
        from keras_rebuild import demo

        with _quiet(verbose):
            return demo.main(argv[1:]) or 0
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    args.verbose = getattr(args, "verbose", False)
    with _quiet(args.verbose):
        return _run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
