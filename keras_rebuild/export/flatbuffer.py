"""Reading and editing ``.tflite`` flatbuffers without TensorFlow.

* :func:`check_builtin_only` - the Flex check: a file that needs TensorFlow
  ops (``SELECT_TF_OPS``, custom ops named ``Flex...``) cannot run in
  standalone LiteRT on a phone, so it is an error naming the op and, where the
  tensor names tell, the Keras layer it came from.
* :func:`flex_error_from_converter` - the same error from the converter's own
  message when it refuses a TensorFlow op with built-in ops only.
* :func:`add_float_io` - wrap an int8-I/O model with ``QUANTIZE`` /
  ``DEQUANTIZE`` ops so it takes and returns float32.

Only ``ai_edge_litert`` (its flatbuffer schema) is used here.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence

from keras_rebuild.errors import UnsupportedModelError


class FlexOpError(UnsupportedModelError):
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


def _message(ops: Sequence[str], layers: Sequence[str], what: str) -> str:
    where = (f" in layer(s) {', '.join(repr(n) for n in layers)}" if layers
             else " (the layer could not be told from the tensor names)")
    return (
        "Expected a model LiteRT runs with its built-in ops only (standalone LiteRT on phones cannot run "
        f"TensorFlow/Flex or custom ops). Received: {what} {', '.join(sorted(set(ops)))}{where}. Replace "
        "the layer with built-in Keras layers/ops, or build it from ops LiteRT supports"
    )


def check_builtin_only(content: bytes, layer_names: Iterable[str] = ()) -> None:
    """Raise :class:`FlexOpError` if the flatbuffer holds Flex (TensorFlow) or custom ops.

    Args:
        content: The ``.tflite`` bytes.
        layer_names: Names of the Keras layers, to say where an op came from
            (matched against the op's output tensor names).
    """
    model = read_model(content)
    bad, where = [], []
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            name = _op_name(model, op.opcodeIndex)
            code = model.operatorCodes[op.opcodeIndex]
            schema_fb, fb = _schema()
            if fb.get_builtin_code_from_operator_code(code) != schema_fb.BuiltinOperator.CUSTOM:
                continue
            bad.append(name)
            for t in list(op.outputs) + list(op.inputs):
                if 0 <= t < len(sg.tensors):
                    tname = sg.tensors[t].name
                    where.append(tname.decode() if isinstance(tname, bytes) else str(tname))
    if bad:
        flex = [b for b in bad if b.startswith("Flex")]
        layers = _layers_in(" ".join("/" + w for w in where), layer_names)
        raise FlexOpError(_message(bad, layers, "a file with TensorFlow (Flex) op(s)" if flex else "custom op(s)"))


def flex_error_from_converter(message: str, layer_names: Iterable[str] = ()) -> Optional[FlexOpError]:
    """Our error for a converter message that refuses TensorFlow ops, else ``None``."""
    ops = re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", message)
    for line in re.findall(r"(?:Flex ops|TF Select ops|Custom ops):\s*([^\n]+)", message):
        ops.extend(o.strip() for o in line.split(",") if o.strip())
    if not ops:
        return None
    locations = " ".join(re.findall(r'"([^"]*@__inference[^"]*)"', message)) or message
    return FlexOpError(_message(ops, _layers_in(locations, layer_names), "TensorFlow op(s)"))


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


__all__ = ["FlexOpError", "check_builtin_only", "flex_error_from_converter", "add_float_io", "op_names"]
