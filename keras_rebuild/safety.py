"""What a model file may contain before we load it: configs read and checked without deserialising.

Loading a Keras model runs code named by its file: a ``Lambda`` layer holds
Python bytecode or names any function of any module (``{"module": "os",
"config": "system"}``), and an unknown class is imported from the module the
file names. Keras' own safe mode refuses only bytecode lambdas in ``.keras``
zips, and nothing at all in ``.h5`` files or SavedModel folders.

This module decides what to trust *before* anything is deserialised. It reads
the model config as plain JSON from every format, whatever the file's name:

- a ``.keras`` zip (Keras 3 or tf_keras): ``config.json`` and ``metadata.json``;
- an HDF5 file: its ``model_config`` and ``keras_version`` attributes;
- a tf_keras SavedModel folder: the JSON records in ``keras_metadata.pb``
  (decoded here from the protobuf wire format, without TensorFlow).

It walks every serialised object of that config against an allow-list:
Keras' own classes and functions (of the file's Keras flavour) and
keras_rebuild's own classes. Every ``Lambda``, every function named from an
arbitrary module, every layer that loads code or other files
(``TFSMLayer``, ``TorchModuleWrapper``, ``TensorFlowOpLayer``...), every
TensorFlow op outside the tensor-math namespaces, and every unknown class is
refused, naming the layer and the refused name. ``load_model(path,
unsafe=True)`` skips the check for files the user trusts.

Example:
    >>> from keras_rebuild.safety import load_model   # doctest: +SKIP
    >>> model = load_model("model.keras")             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

from keras_rebuild.errors import KerasRebuildError

__all__ = [
    "ModelFile", "UnsafeModelError", "ModelFileError", "read_model_file", "check_model_file",
    "load_model", "FLAVOURS",
]

FLAVOURS = ("tf_keras", "keras3")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
MAX_CONFIG_BYTES = 256 * 1024 * 1024  # a config larger than this is not a model config we can check
# A tf_keras .keras archive's weights are read into memory up to this size, else into a temporary file.
MAX_IN_MEMORY_WEIGHTS = 1 << 30

# Serialisation markers that carry data only (tuples, tensors, numpy arrays, bytes, slices...).
DATA_MARKERS = frozenset({
    "__tuple__", "__ellipsis__", "__slice__", "__tensor__", "__numpy__", "__bytes__", "__keras_tensor__",
    "__typespec__", "TensorShape", "__passive_serialization__", "__list__", "__dict__", "InputSpec",
})
# TensorFlow modules whose initializer classes tf_keras models may name (``tf.constant_initializer``...).
TF_INITIALIZER_MODULES = ("tensorflow.python.ops.init_ops_v2", "tensorflow.python.ops.init_ops")
# Keras classes that run code, load other files or unpickle data from their config.
DENIED_CLASSES = frozenset({
    "Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "TensorFlowOpLayer",
    "TFLambda", "KerasLayer", "__lambda__",
})
# TensorFlow API namespaces whose ops only compute on tensors (TFOpLambda / SlicingOpLambda functions).
SAFE_TF_NAMESPACES = ("math.", "nn.", "__operators__.", "linalg.", "image.", "signal.", "bitwise.", "random.")
# Top-level TensorFlow names that are not pure tensor math.
UNSAFE_TF_NAMES = frozenset({
    "print", "py_function", "numpy_function", "load_op_library", "load_library", "function", "Assert",
    "cond", "case", "switch_case", "while_loop", "map_fn", "vectorized_map", "scan", "foldl", "foldr",
    "custom_gradient", "recompute_grad", "init_scope", "control_dependencies", "device", "Variable",
    "Module", "py_func", "make_template", "tensor_scatter_nd_update",
})


class ModelFileError(KerasRebuildError, ValueError):
    """A model file that cannot be read: not a model, corrupt, unreadable, or of an unknown format."""


class UnsafeModelError(KerasRebuildError, ValueError):
    """A model file names code that loading it would run (a Lambda, an arbitrary function or class)."""


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A model file as read before loading.

    Attributes:
        path: The path given.
        format: ``"keras"`` (zip archive), ``"h5"`` or ``"savedmodel"``.
        flavour: ``"tf_keras"`` or ``"keras3"``: the Keras that saved it.
        keras_version: The Keras version recorded in the file, or ``None``.
        configs: The serialised model config(s) as plain JSON values (one for
            ``.keras`` and ``.h5``, one per saved object for a SavedModel).
    """

    path: str
    format: str
    flavour: str
    keras_version: Optional[str]
    configs: Tuple[Any, ...] = dataclasses.field(repr=False)


# ----------------------------------------------------------------------------- reading
def _flavour_from_version(version: Optional[str], config: Any, default: str) -> str:
    if version:
        major = str(version).strip().split(".", 1)[0]
        if major == "2":
            return "tf_keras"
        if major == "3":
            return "keras3"
    module = config.get("module") if isinstance(config, dict) else None
    if isinstance(module, str):
        return "tf_keras" if module.split(".", 1)[0] == "tf_keras" else "keras3"
    return default


def _json(text: Any, path: str, what: str) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"Expected {what} of {path} to be JSON. Received: {exc}") from None


def _read_zip(path: str) -> ModelFile:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                raise ModelFileError(
                    f"Expected a Keras .keras archive holding config.json. Received: {path} "
                    f"(a zip file holding {sorted(names)[:5]})"
                )
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelFileError(
                    f"Expected a model config under {MAX_CONFIG_BYTES >> 20} MiB. Received: {path} "
                    f"(config.json of {info.file_size:,} bytes)"
                )
            config = _json(archive.read("config.json"), path, "config.json")
            metadata = {}
            if "metadata.json" in names and archive.getinfo("metadata.json").file_size < 1 << 20:
                metadata = _json(archive.read("metadata.json"), path, "metadata.json")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise ModelFileError(f"Expected an intact .keras archive. Received: {path} is corrupt ({exc})") from None
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    return ModelFile(path, "keras", _flavour_from_version(version, config, "keras3"), version, (config,))


def _read_h5(path: str) -> ModelFile:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py comes with TensorFlow and Keras
        raise ModelFileError(f"Expected h5py to be installed to read HDF5 files. Received: {path}") from None
    try:
        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config")
            version = f.attrs.get("keras_version")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"Expected an intact HDF5 model file. Received: {path} ({exc})") from None
    if config is None:
        raise ModelFileError(
            f"Expected an HDF5 file holding a whole model (saved with model.save). Received: {path} "
            "holds no model config (weights only?)"
        )
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    config = _json(config, path, "the model_config attribute")
    return ModelFile(path, "h5", _flavour_from_version(version, config, "tf_keras"),
                     str(version) if version is not None else None, (config,))


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> Iterator[Tuple[int, Any]]:
    """``(field number, value)`` pairs of a protobuf message (wire format only)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise ValueError("truncated field")
            value, i = buf[i:i + size], i + size
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, value


def _read_savedmodel(path: str) -> ModelFile:
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ModelFileError(
            f"Expected a .keras or .h5 file or a SavedModel folder (holding saved_model.pb). Received: {path}"
        )
    meta = os.path.join(path, "keras_metadata.pb")
    if not os.path.isfile(meta):
        raise UnsafeModelError(
            f"Expected a Keras SavedModel (with keras_metadata.pb) whose layers can be checked before loading. "
            f"Received: {path} has no keras_metadata.pb; load it only if you trust it (--unsafe)"
        )
    try:
        with open(meta, "rb") as f:
            buf = f.read(MAX_CONFIG_BYTES + 1)
        if len(buf) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB")
        # SavedMetadata { repeated SavedObject nodes = 1 }; SavedObject { string identifier = 4; string metadata = 5 }
        configs: List[Any] = []
        for field, node in _proto_fields(buf):
            if field != 1 or not isinstance(node, bytes):
                continue
            for sub, value in _proto_fields(node):
                if sub == 5 and isinstance(value, bytes) and value:
                    configs.append(_json(value, path, "a keras_metadata.pb record"))
    except ValueError as exc:
        raise ModelFileError(f"Expected an intact keras_metadata.pb. Received: {path} ({exc})") from None
    version = None
    for cfg in configs:
        if isinstance(cfg, dict) and isinstance(cfg.get("keras_version"), str):
            version = cfg["keras_version"]
            break
    return ModelFile(path, "savedmodel", "tf_keras", version, tuple(configs))


def read_model_file(path: "str | os.PathLike[str]") -> ModelFile:
    """Read a model file's config and Keras flavour without deserialising anything.

    The format is recognised from the content, not the name: an HDF5 file
    named ``*.keras`` is read (and checked) as HDF5.

    Args:
        path: A ``.keras`` or ``.h5`` file, or a SavedModel folder.

    Returns:
        A :class:`ModelFile`.

    Raises:
        ModelFileError: If the path does not exist, cannot be read, or is not
            an intact model file.
        UnsafeModelError: For a SavedModel folder without Keras metadata (its
            layers cannot be checked).
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise ModelFileError(f"Expected an existing model file. Received: no such file {path}")
    if os.path.isdir(path):
        return _read_savedmodel(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelFileError(f"Expected a readable model file. Received: {path} ({exc.strerror or exc})") from None
    if head.startswith(ZIP_MAGIC):
        return _read_zip(path)
    if head == HDF5_MAGIC:
        return _read_h5(path)
    raise ModelFileError(
        f"Expected a Keras model file (a .keras zip archive or an HDF5 file) or a SavedModel folder. "
        f"Received: {path} is neither"
    )


# ----------------------------------------------------------------------------- the allow-list
class _AllowList:
    """Keras' own public classes and functions of one flavour, resolved lazily."""

    def __init__(self, flavour: str):
        self.flavour = flavour
        self._classes: Optional[Dict[str, type]] = None
        self._functions: Optional[set] = None
        self._bases: Optional[tuple] = None

    def _keras(self):
        if self.flavour == "keras3":
            import keras

            return keras
        from keras_rebuild._compat import keras

        return keras

    def _load(self):
        keras = self._keras()
        namespaces = ["layers", "initializers", "regularizers", "constraints", "losses", "metrics",
                      "optimizers", "models", "mixed_precision", "dtype_policies", "activations", "ops",
                      "quantizers"]
        classes: Dict[str, type] = {}
        functions = set()
        modules = [keras]
        for name in namespaces:
            mod = getattr(keras, name, None)
            if mod is not None:
                modules.append(mod)
                sub = getattr(mod, "schedules", None) or getattr(mod, "experimental", None)
                if sub is not None:
                    modules.append(sub)
        if self.flavour == "tf_keras":
            exp = getattr(getattr(keras.layers, "experimental", None), "preprocessing", None)
            if exp is not None:
                modules.append(exp)
        for mod in modules:
            for attr in dir(mod):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr, None)
                if isinstance(obj, type):
                    classes.setdefault(attr, obj)
                    classes.setdefault(obj.__name__, obj)
                elif callable(obj) and mod is not keras:
                    functions.add(obj)
        bases = [keras.layers.Layer, keras.initializers.Initializer, keras.regularizers.Regularizer,
                 keras.constraints.Constraint, keras.losses.Loss, keras.metrics.Metric,
                 keras.optimizers.Optimizer, keras.optimizers.schedules.LearningRateSchedule]
        for extra in ("Operation", "DTypePolicy"):
            if hasattr(keras, extra):
                bases.append(getattr(keras, extra))
        if self.flavour == "tf_keras":
            bases.append(keras.mixed_precision.Policy)
            import tensorflow as tf

            bases.append(tf.TypeSpec)
        self._classes, self._functions, self._bases = classes, functions, tuple(bases)

    @property
    def classes(self) -> Dict[str, type]:
        if self._classes is None:
            self._load()
        return self._classes  # type: ignore[return-value]

    @property
    def functions(self) -> set:
        if self._functions is None:
            self._load()
        return self._functions  # type: ignore[return-value]

    @property
    def bases(self) -> tuple:
        if self._bases is None:
            self._load()
        return self._bases  # type: ignore[return-value]

    def resolve_module_class(self, module: str, name: str) -> Optional[type]:
        """A class ``name`` of a module of Keras (the file's flavour), keras_rebuild or tfmot, or ``None``."""
        root = module.split(".", 1)[0]
        if module in TF_INITIALIZER_MODULES:
            mod = importlib.import_module(module)
            obj = getattr(mod, name, None)
            base = getattr(mod, "Initializer", None)
            return obj if isinstance(obj, type) and base is not None and issubclass(obj, base) else None
        trusted_roots = {"keras_rebuild", "tensorflow_model_optimization"}
        trusted_roots.add("keras" if self.flavour == "keras3" else "tf_keras")
        if self.flavour == "tf_keras" and root == "keras":
            # tf_keras writes "keras.layers" etc. for its own classes: they resolve in tf_keras.
            return self.classes.get(name)
        if root not in trusted_roots:
            return None
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - any import failure means "not a class we know"
            return None
        obj = getattr(mod, name, None)
        return obj if isinstance(obj, type) else None


_ALLOW_LISTS: Dict[str, _AllowList] = {}


def _allow_list(flavour: str) -> _AllowList:
    if flavour not in _ALLOW_LISTS:
        _ALLOW_LISTS[flavour] = _AllowList(flavour)
    return _ALLOW_LISTS[flavour]


def _is_ours(cls: type) -> bool:
    return (getattr(cls, "__module__", "") or "").split(".", 1)[0] == "keras_rebuild"


def _registered_ours(name: str, flavour: str) -> Optional[type]:
    """A keras_rebuild class registered as ``keras_rebuild>Name`` (our modules are imported to find it)."""
    package, _, short = name.partition(">")
    if package != "keras_rebuild" or not short:
        return None
    allow = _allow_list(flavour)
    keras = allow._keras()
    obj = keras.saving.get_registered_object(name)
    if obj is None:
        import keras_rebuild  # noqa: F401  (registers our serialisable classes)

        obj = keras.saving.get_registered_object(name)
    return obj if isinstance(obj, type) and _is_ours(obj) else None


def _denied(cls_name: str, cls: Optional[type]) -> bool:
    if cls_name in DENIED_CLASSES:
        return True
    if cls is not None:
        return any(klass.__name__ in DENIED_CLASSES for klass in getattr(cls, "__mro__", ())[:-1])
    return False


def _walk(value: Any, layer: Optional[str], skip=("compile_config", "training_config")
          ) -> Iterator[Tuple[dict, Optional[str]]]:
    """Every dict of a config that looks like a serialised object, with the layer it belongs to."""
    if isinstance(value, dict):
        if isinstance(value.get("class_name"), str):
            config = value.get("config")
            own = config.get("name") if isinstance(config, dict) else None
            own = own if isinstance(own, str) else value.get("name")
            layer = own if isinstance(own, str) else layer
            yield value, layer
        for k, v in value.items():
            if k in skip:
                continue  # never deserialised when models are loaded with compile=False
            yield from _walk(v, layer, skip)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, layer, skip)


def _check_object(obj: dict, flavour: str) -> Optional[str]:
    """Why the serialised object ``obj`` is refused, or ``None`` if it is trusted."""
    allow = _allow_list(flavour)
    cls_name = obj["class_name"]
    module = obj.get("module")
    registered = obj.get("registered_name")
    config = obj.get("config")
    if cls_name in DATA_MARKERS:
        return None
    if cls_name == "TypeSpec":  # tf_keras SavedModel metadata: a TensorFlow type spec by registered name
        spec = obj.get("type_spec")
        return None if isinstance(spec, str) and spec.startswith("tf.") else f"type spec {spec!r}"
    if cls_name in DENIED_CLASSES or registered in DENIED_CLASSES:
        return f"class {registered if registered in DENIED_CLASSES else cls_name!r}"
    if cls_name == "function":  # Keras 3: a function named by module and name
        fn_name = config if isinstance(config, str) else registered
        if not isinstance(module, str) or not isinstance(fn_name, str):
            return f"function {fn_name!r}"
        root = module.split(".", 1)[0]
        if root == ("keras" if flavour == "keras3" else "tf_keras") or (flavour == "tf_keras" and root == "keras"):
            try:
                fn = getattr(importlib.import_module(module if root != "keras" or flavour == "keras3"
                                                     else "tf_keras" + module[5:]), fn_name, None)
            except Exception:  # noqa: BLE001
                fn = None
            if fn is not None and fn in allow.functions:
                return None
        return f"function {fn_name!r} of module {module!r}"
    if isinstance(registered, str) and ">" in registered:
        cls = _registered_ours(registered, flavour)
        if cls is None:
            return f"class {registered!r}"
        return None
    if isinstance(cls_name, str) and ">" in cls_name:  # tf_keras: registered names are the class name
        return None if _registered_ours(cls_name, flavour) is not None else f"class {cls_name!r}"
    if isinstance(module, str):
        cls = allow.resolve_module_class(module, cls_name)
        if cls is None:
            return f"class {cls_name!r} of module {module!r}"
    else:
        cls = allow.classes.get(cls_name)
        if cls is None and cls_name == "Functional":
            cls = allow.classes.get("Model")
        if cls is None and flavour == "tf_keras" and cls_name in ("TFOpLambda", "SlicingOpLambda"):
            cls = allow.classes.get("Layer")  # their TensorFlow function is checked below
        if cls is None:
            return f"class {cls_name!r}"
    if _denied(cls_name, cls):
        return f"class {cls_name!r}"
    if not (issubclass(cls, allow.bases) or _is_ours(cls) or module in TF_INITIALIZER_MODULES):
        return f"class {cls_name!r} (not a layer, initializer, regularizer, constraint or policy)"
    if cls_name in ("TFOpLambda", "SlicingOpLambda") and isinstance(config, dict):
        function = config.get("function")
        if not _safe_tf_function(function):
            return f"TensorFlow function {function!r}"
    return None


def _safe_tf_function(name: Any) -> bool:
    if not isinstance(name, str) or not name:
        return False
    if name.startswith(SAFE_TF_NAMESPACES):
        return True
    return "." not in name and name not in UNSAFE_TF_NAMES and not name.startswith("_")


def check_model_file(model_file: ModelFile, compile: bool = False) -> None:
    """Refuse a model file that names code: raise on the first object not on the allow-list.

    Args:
        model_file: A :class:`ModelFile` from :func:`read_model_file`.
        compile: Check the training configuration (loss, metrics, optimizer)
            too, for a model loaded with ``compile=True``.

    Raises:
        UnsafeModelError: Naming the layer and the refused class or function.
    """
    for config in model_file.configs:
        for obj, layer in _walk(config, None, () if compile else ("compile_config", "training_config")):
            why = _check_object(obj, model_file.flavour)
            if why is not None:
                where = f"layer {layer!r}" if layer else "the model config"
                raise UnsafeModelError(
                    f"Expected a model file naming only Keras' own and keras_rebuild's classes and functions: "
                    f"loading it would run code. Received: {where} of {model_file.path} uses {why}. "
                    "Load it only if you trust the file (--unsafe)"
                )


def load_model(path: "str | os.PathLike[str]", *, unsafe: bool = False, compile: bool = False):
    """Load a model file of either Keras flavour, checking it first unless ``unsafe``.

    The flavour comes from the file (``keras_version`` in a ``.keras``
    archive's ``metadata.json`` or an HDF5 file's attributes; a SavedModel
    folder is tf_keras). Keras' own safe mode stays on too unless ``unsafe``.

    Args:
        path: A ``.keras`` or ``.h5`` file or a SavedModel folder.
        unsafe: Skip the checks (for files you trust).
        compile: Restore the training configuration too.

    Returns:
        The model: a ``tf_keras`` model or a Keras 3 model.

    Raises:
        ModelFileError: If the file cannot be read or loaded.
        UnsafeModelError: If the file names code and ``unsafe`` is False.
    """
    path = os.fspath(path)
    info = read_model_file(path)
    if not unsafe:
        check_model_file(info, compile=compile)
    try:
        if info.flavour == "keras3":
            import keras

            if info.format == "h5" and not path.endswith((".h5", ".hdf5")):
                raise ModelFileError(
                    f"Expected a Keras 3 HDF5 file to be named *.h5 (Keras 3 reads HDF5 only under that name). "
                    f"Received: {path}"
                )
            return keras.saving.load_model(path, compile=compile, safe_mode=not unsafe)
        from keras_rebuild._compat import keras

        with _without_false_alarms():
            if info.format == "keras":
                model = _load_tf_keras_archive(path, compile=compile, safe_mode=not unsafe)
                if model is not None:
                    return model
                return keras.models.load_model(path, compile=compile, safe_mode=not unsafe)
            if info.format == "h5":
                import h5py

                with h5py.File(path, "r") as f:
                    return keras.models.load_model(f, compile=compile)
            return keras.models.load_model(path, compile=compile)
    except KerasRebuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Keras raises becomes one clear error
        message = " ".join(str(exc).split())
        if len(message) > 300:
            message = message[:297] + "..."
        raise ModelFileError(
            f"Expected a model file that Keras ({'Keras 3' if info.flavour == 'keras3' else 'tf_keras'}) can load. "
            f"Received: {path} ({type(exc).__name__}: {message})"
        ) from None


# ----------------------------------------------------------------------------- tf_keras loading
class _DropFalseAlarms(logging.Filter):
    """Drops tf_keras' "Compiled the loaded model, but the compiled metrics have yet to be built".

    tf_keras' legacy code logs it whenever it fails to build a model's
    compiled metrics ahead of time: on saving any uncompiled model as ``.h5``
    or SavedModel, and on loading a compiled model whose metrics it cannot
    build before the first ``fit`` or ``evaluate`` (which builds them, as for
    any freshly compiled model).
    """

    def filter(self, record):
        return "Compiled the loaded model, but the compiled metrics" not in record.getMessage()


@contextlib.contextmanager
def _without_false_alarms():
    """Drop :class:`_DropFalseAlarms`' message from TensorFlow's logger while a model loads or saves."""
    logger = logging.getLogger("tensorflow")
    drop = _DropFalseAlarms()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _load_tf_keras_archive(path: str, compile: bool, safe_mode: bool):
    """A tf_keras ``.keras`` archive loaded as tf_keras loads it, its weights file read first.

    tf_keras reads ``model.weights.h5`` through the archive's ``ZipExtFile``:
    HDF5 seeks back and forth, and every backward seek re-reads the member
    from its start (ResNet50 loads in about 10x the time of its ``.h5``).
    Here the member is copied into memory (or a temporary file when larger
    than ``MAX_IN_MEMORY_WEIGHTS``) in one pass, and tf_keras' own store reads
    it from there. The model is deserialised exactly as tf_keras'
    ``saving_lib.load_model`` does it, with the same ``safe_mode``.

    Returns:
        The model, or ``None`` when this tf_keras lacks the pieces used here
        (the caller then loads with ``tf_keras.models.load_model``).
    """
    try:
        from tf_keras.src.saving import saving_lib as lib

        v3_flag = lib._SAVING_V3_ENABLED
        sharing, deserialize, load_state = lib.ObjectSharingScope, lib.deserialize_keras_object, lib._load_state
        h5_store, npz_store, disk_store = lib.H5IOStore, lib.NpzIOStore, lib.DiskIOStore
        config_name, vars_name, assets_name = lib._CONFIG_FILENAME, lib._VARS_FNAME, lib._ASSETS_DIRNAME
    except (ImportError, AttributeError):  # pragma: no cover - another tf_keras layout
        return None
    v3_before = getattr(v3_flag, "value", False)
    v3_flag.value = True
    try:
        with zipfile.ZipFile(path, "r") as archive, contextlib.ExitStack() as stack:
            config = json.loads(archive.read(config_name))
            if not compile:
                config["compile_config"] = None
            with sharing():
                model = deserialize(config, None, safe_mode=safe_mode)
            names = archive.namelist()
            if vars_name + ".h5" in names:
                weights = _extracted(archive, vars_name + ".h5", stack)
                weights_store = h5_store(weights, mode="r")
            elif vars_name + ".npz" in names:
                weights_store = npz_store(vars_name + ".npz", archive=archive, mode="r")
            else:
                raise ValueError(f"Expected a {vars_name}.h5 or {vars_name}.npz file.")
            stack.callback(weights_store.close)
            assets_store = disk_store(assets_name, archive=archive, mode="r") if len(names) > 3 else None
            if assets_store is not None:
                stack.callback(assets_store.close)
            load_state(model, weights_store=weights_store, assets_store=assets_store, inner_path="",
                       visited_trackables=set())
        return model
    finally:
        v3_flag.value = v3_before


def _extracted(archive: zipfile.ZipFile, name: str, stack: contextlib.ExitStack):
    """Member ``name`` of ``archive`` read in one pass: a file object in memory, or a temporary file's path."""
    if archive.getinfo(name).file_size <= MAX_IN_MEMORY_WEIGHTS:
        return io.BytesIO(archive.read(name))
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="keras_rebuild_"))
    target = os.path.join(folder, "weights.h5")
    with archive.open(name) as member, open(target, "wb") as out:
        shutil.copyfileobj(member, out, 1 << 20)
    return target
