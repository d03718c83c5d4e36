"""Reading an exported graph back: which node carries which model layer, at which bit widths.

Layers are matched by weight values, not node names, so the mapping holds for QONNX (float weights in
front of a ``Quant``/``BipolarQuant`` node) and QCDQ (integer weights behind ``DequantizeLinear``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..nnutils import quantizable_layers
from ..quantization.value_ops import COPYING_ONNX

WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# Ops that only move a tensor's elements: the read-back follows them between a quantizer and its layer.
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "Identity")

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
    more_nodes: tuple[str, ...] = ()  # the nodes of further calls of the layer in the forward


@dataclass
class GraphMap:
    """A graph read back against its model (:func:`match_layers`)."""

    layers: dict[str, GraphLayer]  # the quantizable layers found, in the model's order
    # a Parameter the forward uses outside the quantizable layers (F.linear/F.conv2d on it) -> the node
    # that uses it: it stays float in the graph, as nnutils.warn_unsupported told the user
    float_weights: dict[str, str] = field(default_factory=dict)
    problem: str = ""  # "" when every weight node and every layer was accounted for; else what was not


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


def strict_map(proto: Any, model: nn.Module, fmt: str) -> GraphMap:
    """:func:`match_layers`, strict: a weight node that matches nothing of the model, or a layer found
    in no node, is a :class:`ModelError` (the model is not the one the file was exported from, or the
    read-back has a bug): no layer is silently left out of the bit-width and cost checks.
    """
    graph = match_layers(proto, model, fmt)
    if graph.problem:
        raise ModelError(
            f"cannot map the graph to the model's layers: {graph.problem}",
            "pass the model the file was exported from; if it is that model, this is an aq-brevitas bug: "
            "please report it",
        )
    return graph


def map_layers(proto: Any, model: nn.Module, fmt: str) -> GraphMap:
    """:func:`match_layers`, whose own failures become its ``problem`` too (no layers found then).

    An export calls this after its parity check passed: whatever goes wrong in the read-back is then
    this package's bug, reported with the file written, never a reason to throw the file away.
    """
    try:
        return match_layers(proto, model, fmt)
    except Exception as exc:  # the boundary: a read-back bug on a graph that computes what the model does
        return GraphMap({}, problem=failure_note("the read-back", exc))


def failure_note(what: str, exc: Exception) -> str:
    """``"<what> failed (<type>: <first line of the message>)"``: an internal failure, as a read-back problem."""
    first = (str(exc).splitlines() or [""])[0][:160]
    return f"{what} failed ({type(exc).__name__}: {first})"


def match_layers(proto: Any, model: nn.Module, fmt: str) -> GraphMap:
    """The model's layers found in a QONNX or QCDQ graph (``fmt``), and what could not be matched.

    Layers are matched by weight values (QONNX keeps the float weights in front of its ``Quant``
    node; QCDQ's ``DequantizeLinear`` gives back the quantized weights), so the mapping does not
    depend on node names or order. Between the weight's quantizer and the Conv/Gemm/MatMul/
    ConvTranspose node the exporters may put layout ops (:data:`LAYOUT_OPS`; Brevitas writes
    ``DequantizeLinear -> Transpose -> MatMul`` for a bias-free ``nn.Linear`` in QCDQ): they are
    followed and applied to the weight before matching. The same ops between a layer's input
    quantizer and the layer are followed for ``act_bits`` (quantization is elementwise, so it
    commutes with them).

    A layer the forward calls again appears as further nodes with its weights (``more_nodes``).
    Layers sharing one Parameter have equal float weights in QONNX; a node goes to the first such
    layer whose weight quantizer has the node's bit width. A node whose float weight is a Parameter
    the forward uses outside the quantizable layers goes to ``float_weights``. ``problem`` names every
    weight node that matches none of these and every layer found in no node (``""`` when there are
    none); the layers found are returned either way, in the model's order.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = quantizable_layers(model)
    todo = {n: _match_weight(m, fmt) for n, m in layers.items()}
    seen: dict[str, np.ndarray] = {}  # weights of the layers found, for their further calls
    outside = _outside_weights(model, layers)
    found: dict[str, GraphLayer] = {}
    graph = GraphMap(found)
    unmatched: list[str] = []
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        values, info = _weight_source(node.input[1], producer, inits)
        if values is None:
            continue  # both operands computed at run time: not a layer's weight
        cands = [values, values.T] if node.op_type == "MatMul" and values.ndim == 2 else [values]
        # a new layer or a further call of one found: at the node's bit width first (layers sharing
        # a Parameter have equal float weights), then a new layer before a further call
        hits = [(n, n in todo) for n in _matching(todo, cands) + _matching(seen, cands)]
        if hits:
            name, new = min(hits, key=lambda h: (quantizer_bits(layers[h[0]]) != info[0], not h[1]))
            if new:
                seen[name] = todo.pop(name)
                act = _act_bits(node.input[0], producer, inits)
                found[name] = GraphLayer(node.name, *info[:2], act, *info[2:])
            else:
                found[name].more_nodes += (node.name,)
        elif param := _matching(outside, cands):
            graph.float_weights[param[0]] = node.name
        else:
            unmatched.append(node.name or node.op_type)
    problems = []
    if unmatched:
        problems.append(f"graph node(s) {', '.join(unmatched)} have weights that match no layer of the model")
    if todo:
        problems.append(f"layer(s) {', '.join(sorted(todo))} not found as a {'/'.join(WEIGHT_OPS)} node")
    order = list(layers)
    graph.layers = dict(sorted(found.items(), key=lambda kv: order.index(kv[0])))
    graph.problem = "; ".join(problems)
    return graph


def _matching(pool: dict[str, np.ndarray], cands: list[np.ndarray]) -> list[str]:
    """The names in ``pool`` whose tensor equals one of ``cands`` (shape and values, to float32 rounding)."""
    return [
        n
        for n, w in pool.items()
        if any(c.shape == w.shape and np.allclose(c, w, rtol=1e-6, atol=0) for c in cands)
    ]


def quantizer_bits(layer: nn.Module) -> int:
    """The bit width of a layer's enabled weight quantizer; 32 for a float weight."""
    from ..quantization.readback import quantizer_bit_width

    quant = getattr(layer, "weight_quant", None)
    return quantizer_bit_width(quant) if quant is not None and quant.is_quant_enabled else 32


def _outside_weights(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, np.ndarray]:
    """Matrices and kernels (2-D and up) among the model's Parameters that no quantizable layer holds."""
    inside = {id(p) for m in layers.values() for p in m.parameters()}
    return {
        n: p.detach().cpu().numpy()
        for n, p in model.named_parameters()
        if id(p) not in inside and p.dim() >= 2
    }


# What an activation quantizer (per-tensor, zero-point 0) commutes with: the ONNX forms of the
# value-copying ops, the one list placement and FINN's checks follow too.
ACT_TRANSPARENT_OPS = COPYING_ONNX


def _through_layout(
    tensor: str, producer: dict, also_followed: tuple[str, ...] = ()
) -> tuple[str, list[Any]]:
    """The tensor in front of the layout ops (:data:`LAYOUT_OPS`, and ``also_followed``) that produce
    ``tensor``, and those ops in the order they run."""
    ops_followed = (*LAYOUT_OPS, *also_followed)  # read at call time: tests patch LAYOUT_OPS
    ops: list[Any] = []
    node = producer.get(tensor)
    while node is not None and node.op_type in ops_followed:
        ops.append(node)
        tensor = node.input[0]
        node = producer.get(tensor)
    return tensor, ops[::-1]


def _apply_layout(values: np.ndarray, ops: list[Any], inits: dict) -> np.ndarray | None:
    """``values`` after the layout ops ``ops`` (ONNX semantics); ``None`` if a shape is not a constant."""
    from onnx import helper

    for op in ops:
        attrs = {a.name: helper.get_attribute_value(a) for a in op.attribute}
        arg = inits.get(op.input[1]) if len(op.input) > 1 and op.input[1] else None
        if op.op_type == "Transpose":
            values = np.transpose(values, attrs.get("perm"))
        elif op.op_type == "Reshape":
            if arg is None:
                return None
            shape = [
                values.shape[i] if d == 0 and not attrs.get("allowzero") else d for i, d in enumerate(arg)
            ]
            values = values.reshape(shape)
        elif op.op_type == "Flatten":
            axis = attrs.get("axis", 1) % max(values.ndim, 1)
            values = values.reshape(math.prod(values.shape[:axis]), -1)
        elif op.op_type in ("Unsqueeze", "Squeeze"):
            axes = attrs.get("axes", arg)  # an attribute up to opset 12, an input from opset 13
            if op.op_type == "Squeeze":
                values = np.squeeze(values, axis=None if axes is None else tuple(int(a) for a in axes))
            elif axes is None:
                return None
            else:
                values = np.expand_dims(values, tuple(int(a) for a in axes))
    return values


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
    """``(values to match, (bits, bipolar, scale, zero_point))`` of a weight input, or ``(None, ())``.

    The values are those the weight node consumes: layout ops between the quantizer and the node
    are applied to them.
    """
    tensor, layout = _through_layout(tensor, producer)
    values, info = _quantized_source(tensor, producer, inits)
    if values is None or not layout:
        return values, info
    values = _apply_layout(values, layout, inits)
    return (values, info) if values is not None else (None, ())


def _quantized_source(tensor: str, producer: dict, inits: dict) -> tuple[Any, WeightInfo | tuple[()]]:
    """A weight initializer, or the weight behind its QONNX ``Quant``/``BipolarQuant`` or QCDQ
    ``[Clip ->] DequantizeLinear``: ``(values, (bits, bipolar, scale, zero_point))``, or ``(None, ())``."""
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
    """Bit width of the quantizer feeding a layer's input (QONNX Quant or QCDQ Q[-Clip]-DQ), directly or
    through the value-copying ops (the quantizer sits at the producer's output, as FINN needs)."""
    q = producer.get(_through_layout(tensor, producer, ACT_TRANSPARENT_OPS)[0])
    if q is None:
        return None
    if q.op_type == "BipolarQuant":
        return 1
    if q.op_type == "Quant" and q.input[0] not in inits:
        return int(inits[q.input[3]])
    if q.op_type == "Trunc":  # FINN's averaging unit (AveragePool -> Mul -> Trunc): its output bits
        return int(inits[q.input[-1]])  # out_bitwidth: the last input in Trunc v1 and v2
    if q.op_type == "DequantizeLinear":
        clip = producer.get(q.input[0])
        if clip is not None and clip.op_type == "Clip":
            return _int_range_bits(inits[clip.input[1]], inits[clip.input[2]])
        if clip is not None and clip.op_type == "QuantizeLinear":
            return _dtype_bits(inits[clip.input[2]].dtype)
    return None
