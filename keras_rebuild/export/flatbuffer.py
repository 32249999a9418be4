"""Reading and editing ``.tflite`` flatbuffers without TensorFlow.

* :func:`check_builtin_only` - the Flex check: a file that needs TensorFlow
  ops (``SELECT_TF_OPS``, custom ops named ``Flex...``) cannot run in
  standalone LiteRT on a phone, so it is an error naming the op and, where the
  tensor names tell, the Keras layer it came from. With the explicit opt-in
  (``export_tflite(..., select_tf_ops=True)``) Flex ops are allowed, with a
  warning; other custom ops never are.
* :func:`flex_error_from_converter` - the same error from the converter's own
  message when it refuses a TensorFlow op with built-in ops only.
* :func:`layer_at_node` - the Keras layer(s) an interpreter node number came
  from, to name them when the file fails in LiteRT.
* :func:`add_float_io` - wrap an int8-I/O model with ``QUANTIZE`` /
  ``DEQUANTIZE`` ops so it takes and returns float32.

Only ``ai_edge_litert`` (its flatbuffer schema) is used here.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable, List, Optional, Sequence

from keras_rebuild.errors import ConversionError

SELECT_TF_OPS_HINT = (
    "or pass select_tf_ops=True to let TensorFlow ops into the file (phones then need the Flex delegate, "
    "'org.tensorflow:tensorflow-lite-select-tf-ops', which adds several MB to the app)"
)


class FlexOpError(ConversionError):
    """A model needs TensorFlow (Flex / ``SELECT_TF_OPS``) or custom ops that standalone LiteRT cannot run."""


def _schema():
    from ai_edge_litert import schema_py_generated as schema_fb
    from ai_edge_litert.tools import flatbuffer_utils

    return schema_fb, flatbuffer_utils


def read_model(content: bytes):
    """The ``ModelT`` object of a flatbuffer."""
    _, fb = _schema()
    return fb.read_model_from_bytearray(bytearray(content))  # resolves buffers stored by offset


def write_model(model) -> bytes:
    _, fb = _schema()
    return bytes(fb.convert_object_to_bytearray(model))


def _op_name(model, opcode_index: int) -> str:
    schema_fb, fb = _schema()
    code = model.operatorCodes[opcode_index]
    builtin = fb.get_builtin_code_from_operator_code(code)
    if builtin == schema_fb.BuiltinOperator.CUSTOM:
        custom = code.customCode
        return custom.decode() if isinstance(custom, bytes) else str(custom)
    for name, value in vars(schema_fb.BuiltinOperator).items():
        if value == builtin and not name.startswith("_"):
            return name
    return str(builtin)


def op_names(content: bytes) -> List[str]:
    """The operator names of every op of every subgraph (custom ops by their custom code)."""
    model = read_model(content)
    return [_op_name(model, op.opcodeIndex) for sg in model.subgraphs or [] for op in sg.operators or []]


def _layers_in(text: str, layer_names: Iterable[str]) -> List[str]:
    """Layer names that occur as a path component (``.../<name>[_N]/...``) of ``text``."""
    found = []
    for name in sorted(set(layer_names), key=len, reverse=True):
        if re.search(r"(^|[/\"'\s])" + re.escape(name) + r"(_\d+)?/", text) and not any(name in f for f in found):
            found.append(name)
    return found


def _where(layers: Sequence[str]) -> str:
    return (f" in layer(s) {', '.join(repr(n) for n in layers)}" if layers
            else " (the layer could not be told from the tensor names)")


def _message(ops: Sequence[str], layers: Sequence[str], what: str, flex: bool = True) -> str:
    advice = ("Replace the layer with built-in Keras layers/ops, or build it from ops LiteRT supports"
              + (f", {SELECT_TF_OPS_HINT}" if flex else ""))
    if any(re.sub("^Flex", "", o).startswith("TensorList") for o in ops):
        advice = ("A loop over a dimension that is unknown when converting (a recurrent layer with a dynamic "
                  "batch) needs tensor lists: pass batch_size=1 (or unroll_rnn=True for a fixed number of "
                  f"time steps), {SELECT_TF_OPS_HINT}")
    return (
        "Expected a model LiteRT runs with its built-in ops only (standalone LiteRT on phones cannot run "
        f"TensorFlow/Flex or custom ops). Received: {what} {', '.join(sorted(set(ops)))}{_where(layers)}. "
        + advice
    )


def _tensor_names(sg, op):
    """Names of an operator's output tensors, then of its input tensors."""
    names = []
    for t in list(op.outputs) + list(op.inputs):
        if 0 <= t < len(sg.tensors):
            name = sg.tensors[t].name
            names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


def _custom_ops(model):
    """``[(op name, [tensor names])]`` of every custom (Flex included) op of every subgraph."""
    schema_fb, fb = _schema()
    found = []
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            if fb.get_builtin_code_from_operator_code(code) != schema_fb.BuiltinOperator.CUSTOM:
                continue
            found.append((_op_name(model, op.opcodeIndex), _tensor_names(sg, op)))
    return found


def flex_ops(content: bytes) -> List[str]:
    """The TensorFlow (Flex) ops of a flatbuffer, sorted, each once."""
    return sorted({name for name, _ in _custom_ops(read_model(content)) if name.startswith("Flex")})


def check_builtin_only(content: bytes, layer_names: Iterable[str] = (), allow_flex: bool = False) -> List[str]:
    """Raise :class:`FlexOpError` if the flatbuffer holds Flex (TensorFlow) or custom ops.

    Args:
        content: The ``.tflite`` bytes.
        layer_names: Names of the Keras layers, to say where an op came from
            (matched against the op's output tensor names).
        allow_flex: Allow TensorFlow (Flex) ops, with a warning that the app
            then needs the Flex delegate (``select_tf_ops=True``). Custom ops
            that are not Flex ops are refused all the same.

    Returns:
        The Flex ops found (empty unless ``allow_flex``).

    Raises:
        FlexOpError: If the file holds custom ops, or Flex ops without ``allow_flex``.
    """
    found = _custom_ops(read_model(content))
    layer_names = list(layer_names)
    flex = [(n, w) for n, w in found if n.startswith("Flex")]
    refused = [(n, w) for n, w in found if not (allow_flex and n.startswith("Flex"))]
    if refused:
        bad = [n for n, _ in refused]
        layers = _layers_in(" ".join("/" + t for _, w in refused for t in w), layer_names)
        any_flex = any(b.startswith("Flex") for b in bad)
        raise FlexOpError(_message(bad, layers, "a file with TensorFlow (Flex) op(s)" if any_flex else "custom op(s)",
                                   flex=any_flex))
    if flex:
        ops = sorted({n for n, _ in flex})
        layers = _layers_in(" ".join("/" + t for _, w in flex for t in w), layer_names)
        warnings.warn(
            f"The LiteRT file holds TensorFlow (Flex) op(s) {', '.join(ops)}{_where(layers)} "
            "(select_tf_ops=True): standalone LiteRT cannot run it; the app needs the Flex delegate "
            "('org.tensorflow:tensorflow-lite-select-tf-ops' on Android).",
            UserWarning, stacklevel=3,
        )
    return sorted({n for n, _ in flex})


def _converter_locations(message: str) -> str:
    return " ".join(re.findall(r'"([^"]*@__inference[^"]*)"', message)) or message


def flex_error_from_converter(message: str, layer_names: Iterable[str] = ()) -> Optional[FlexOpError]:
    """Our error for a converter message that refuses TensorFlow ops, else ``None``."""
    ops = re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", message)
    ops += re.findall(r"failed to legalize operation 'tf\.(\w+)'", message)
    ops += re.findall(r"'tf\.(\w+)' op requires [^\n]* during TF Lite transformation", message)
    for line in re.findall(r"(?:Flex ops|TF Select ops|Custom ops):\s*([^\n]+)", message):
        ops.extend(o.strip() for o in line.split(",") if o.strip())
    if not ops:
        return None
    return FlexOpError(_message(ops, _layers_in(_converter_locations(message), layer_names), "TensorFlow op(s)"))


def converter_error(message: str, layer_names: Iterable[str] = ()) -> ConversionError:
    """Our error for any other converter failure: the converter's first error lines, and the layer where it tells."""
    lines = [ln.strip() for ln in message.splitlines() if "error:" in ln]
    text = " | ".join(dict.fromkeys(ln.split("error:", 1)[1].strip() for ln in lines)) or message.strip()
    if len(text) > 1500:
        text = text[:1497] + "..."
    layers = _layers_in(_converter_locations(message), layer_names)
    return ConversionError(
        f"Expected the TFLite converter to convert the model. Received: {text}{_where(layers) if layers else ''}"
    )


def layer_at_node(content: bytes, node: int, layer_names: Iterable[str] = (), op: Optional[str] = None) -> List[str]:
    """The Keras layer(s) the interpreter's node number ``node`` (of op ``op``, if known) came from.

    The interpreter numbers nodes per subgraph; the first subgraph whose op
    ``node`` is ``op`` is taken (the main graph when ``op`` is ``None``).
    """
    try:
        model = read_model(content)
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return []
    layer_names = list(layer_names)
    for sg in model.subgraphs or []:
        ops = sg.operators or []
        if not 0 <= node < len(ops):
            continue
        found = ops[node]
        if op is not None and _op_name(model, found.opcodeIndex) != op:
            continue
        names = _tensor_names(sg, found)
        # The op's outputs first: its inputs may come from the layer before.
        for group in (names[: len(found.outputs)], names):
            layers = _layers_in(" ".join("/" + n for n in group), layer_names)
            if layers:
                return layers
        return []
    return []


def add_float_io(content: bytes) -> bytes:
    """Give an int8-I/O model float32 inputs and outputs (``QUANTIZE`` in, ``DEQUANTIZE`` out).

    Quantized input/output tensors keep their scale and zero point inside the
    model; new float tensors take their places in the subgraph and signature.
    """
    schema_fb, fb = _schema()
    model = read_model(content)
    sg = model.subgraphs[0]

    def opcode(builtin) -> int:
        for i, code in enumerate(model.operatorCodes):
            if fb.get_builtin_code_from_operator_code(code) == builtin:
                return i
        code = schema_fb.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = builtin if builtin < 127 else 127
        code.version = 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(index: int) -> int:
        old = sg.tensors[index]
        new = schema_fb.TensorT()
        new.name = old.name
        old.name = (old.name if isinstance(old.name, bytes) else str(old.name).encode()) + b"_int8"
        new.shape = old.shape
        new.shapeSignature = old.shapeSignature
        new.type = schema_fb.TensorType.FLOAT32
        buf = schema_fb.BufferT()
        model.buffers.append(buf)
        new.buffer = len(model.buffers) - 1
        sg.tensors.append(new)
        return len(sg.tensors) - 1

    quantized = (schema_fb.TensorType.INT8, schema_fb.TensorType.UINT8, schema_fb.TensorType.INT16)
    remap = {}
    new_ops_in, new_ops_out = [], []
    for pos, t in enumerate(list(sg.inputs)):
        if sg.tensors[t].type in quantized:
            f = float_twin(t)
            op = schema_fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema_fb.BuiltinOperator.QUANTIZE), [f], [t]
            new_ops_in.append(op)
            sg.inputs[pos] = f
            remap[t] = f
    for pos, t in enumerate(list(sg.outputs)):
        if sg.tensors[t].type in quantized:
            f = float_twin(t)
            op = schema_fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema_fb.BuiltinOperator.DEQUANTIZE), [t], [f]
            new_ops_out.append(op)
            sg.outputs[pos] = f
            remap[t] = f
    if not remap:
        return content
    sg.operators = new_ops_in + list(sg.operators) + new_ops_out
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex != 0:
            continue
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            if tm.tensorIndex in remap:
                tm.tensorIndex = remap[tm.tensorIndex]
    return write_model(model)


__all__ = ["FlexOpError", "check_builtin_only", "flex_error_from_converter", "converter_error", "add_float_io",
           "op_names", "flex_ops", "layer_at_node"]
