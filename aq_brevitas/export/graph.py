"""Reading an exported graph back: which node carries which model layer, at which bit widths.

Layers are matched by weight values, not node names, so the mapping holds for QONNX (float weights in
front of a ``Quant``/``BipolarQuant`` node) and QCDQ (integer weights behind ``DequantizeLinear``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..nnutils import quantizable_layers

WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")

# (weight bits, bipolar, scale, zero_point) of a weight input, as found in the graph
WeightInfo = tuple[int, bool, Any, Any]
FLOAT_WEIGHT: WeightInfo = (32, False, None, None)


@dataclass
class GraphLayer:
    """One model layer as found in an exported graph."""

    node: str  # name of the Conv/Gemm/MatMul node
    weight_bits: int  # 32 for a float (unquantized) weight
    bipolar: bool
    act_bits: int | None  # the input quantizer's bit width; None for a float input
    weight_scale: Any = None  # the weight quantizer's scale (numpy), None for float weights
    weight_zero_point: Any = None


def load_qonnx(path: str | os.PathLike[str]) -> Any:
    """A qonnx ``ModelWrapper`` of the ONNX file at ``path``.

    Raises :class:`ConfigError` when the file does not exist, :class:`ModelError` when it is not ONNX.
    """
    from qonnx.core.modelwrapper import ModelWrapper

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ONNX file {p} does not exist", "export one first with `aq-brevitas export`")
    try:
        return ModelWrapper(str(p))
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX bytes
        raise ModelError(f"{p} is not a readable ONNX model ({type(exc).__name__})", "re-export it") from None


def example_input_for(mw: Any) -> torch.Tensor:
    """A random input of the graph's input shape (unknown dimensions as 1), e.g. for layer geometry."""
    shape = mw.get_tensor_shape(mw.graph.input[0].name)
    return torch.rand(*[int(s) if s else 1 for s in shape])


def graph_layers(proto: Any, model: nn.Module, fmt: str) -> dict[str, GraphLayer]:
    """Map every weight node of a QONNX or QCDQ graph (``fmt``) to the model layer whose weights it carries.

    Layers are matched by weight values (QONNX keeps the float weights in front of its ``Quant``
    node; QCDQ's ``DequantizeLinear`` gives back the quantized weights), so the mapping does not
    depend on node names or order. A weight node that matches no layer, or a layer found in no
    node, is a :class:`ModelError`: no layer is silently left out of the bit-width and cost checks.
    Returns the layers in the model's order.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    todo = {n: _match_weight(m, fmt) for n, m in quantizable_layers(model).items()}
    found: dict[str, GraphLayer] = {}
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        values, info = _weight_source(node.input[1], producer, inits)
        if values is None:
            continue  # both operands computed at run time: not a layer's weight
        cands = [values, values.T] if node.op_type == "MatMul" and values.ndim == 2 else [values]
        name = next(
            (
                n
                for n, w in todo.items()
                if any(c.shape == w.shape and np.allclose(c, w, rtol=1e-6, atol=0) for c in cands)
            ),
            None,
        )
        if name is None:
            raise ModelError(
                f"graph node {node.name or node.op_type} has weights that match no layer of the model",
                "report this model (the export changed a weight tensor)",
            )
        del todo[name]
        found[name] = GraphLayer(node.name, *info[:2], _act_bits(node.input[0], producer, inits), *info[2:])
    if todo:
        raise ModelError(
            f"layer(s) {', '.join(sorted(todo))} not found in the exported graph",
            "report this model; every quantizable layer must appear as a Conv/Gemm/MatMul node",
        )
    order = list(quantizable_layers(model))
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0])))


def _int_range_bits(lo: Any, hi: Any) -> int:
    """Bits of an integer range ``[lo, hi]`` (narrow ranges too: [-7, 7] is 4 bits)."""
    return math.ceil(math.log2(float(hi) - float(lo) + 1))


def _dtype_bits(dtype: np.dtype) -> int:
    """Bits of an integer dtype's whole range (int8, uint8: 8)."""
    return _int_range_bits(np.iinfo(dtype).min, np.iinfo(dtype).max)


def _match_weight(layer: nn.Module, fmt: str) -> np.ndarray:
    """The tensor a layer's graph weight must equal: float weights (QONNX), quantized ones (QCDQ)."""
    quant = getattr(layer, "weight_quant", None)
    if fmt == "qcdq" and quant is not None and quant.is_quant_enabled:
        with torch.no_grad():
            return layer.quant_weight().value.detach().cpu().numpy()
    return layer.weight.detach().cpu().numpy()


def _weight_source(tensor: str, producer: dict, inits: dict) -> tuple[Any, WeightInfo | tuple[()]]:
    """``(values to match, (bits, bipolar, scale, zero_point))`` of a weight input, or ``(None, ())``."""
    if tensor in inits:
        return inits[tensor], FLOAT_WEIGHT
    q = producer.get(tensor)
    if q is None:
        return None, ()
    if q.op_type == "BipolarQuant" and q.input[0] in inits:
        return inits[q.input[0]], (1, True, inits.get(q.input[1]), None)
    if q.op_type == "Quant" and q.input[0] in inits:
        return inits[q.input[0]], (
            int(inits[q.input[3]]),
            False,
            inits.get(q.input[1]),
            inits.get(q.input[2]),
        )
    if q.op_type == "DequantizeLinear":
        return _dequantized_weight(q, producer, inits)
    return None, ()


def _dequantized_weight(dq: Any, producer: dict, inits: dict) -> tuple[Any, WeightInfo | tuple[()]]:
    """A QCDQ weight, ``(ints - zero_point) * scale`` of ``[Clip ->] DequantizeLinear`` on an initializer."""
    from onnx import helper

    src, clip = dq.input[0], producer.get(dq.input[0])
    if clip is not None and clip.op_type == "Clip" and clip.input[0] in inits:
        ints, bits = inits[clip.input[0]], _int_range_bits(inits[clip.input[1]], inits[clip.input[2]])
    elif src in inits:
        ints = inits[src]
        bits = _dtype_bits(ints.dtype)
    else:
        return None, ()
    scale = inits[dq.input[1]]
    zp = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros((), ints.dtype)
    axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * ints.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = scale.size
    values = (ints.astype(np.float32) - zp.astype(np.float32).reshape(shape if zp.size > 1 else ())) * (
        scale.reshape(shape if scale.size > 1 else ())
    )
    return values, (bits, False, scale, zp)


def _act_bits(tensor: str, producer: dict, inits: dict) -> int | None:
    """Bit width of the quantizer directly feeding a layer's input (QONNX Quant or QCDQ Q[-Clip]-DQ)."""
    q = producer.get(tensor)
    if q is None:
        return None
    if q.op_type == "BipolarQuant":
        return 1
    if q.op_type == "Quant" and q.input[0] not in inits:
        return int(inits[q.input[3]])
    if q.op_type == "DequantizeLinear":
        clip = producer.get(q.input[0])
        if clip is not None and clip.op_type == "Clip":
            return _int_range_bits(inits[clip.input[1]], inits[clip.input[2]])
        if clip is not None and clip.op_type == "QuantizeLinear":
            return _dtype_bits(inits[clip.input[2]].dtype)
    return None
