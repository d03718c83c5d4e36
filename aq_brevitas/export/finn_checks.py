"""The checks :func:`~aq_brevitas.export.finn.finn_check` runs on an exported graph: op types, Quant
nodes, the input, the dataflow between quantizers, power-of-two scales."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..quantization.value_ops import COPYING_ONNX
from .graph import map_layers

# Op types a cleaned QONNX graph of a CNN/MLP may contain for FINN's flow, read from FINN's sources
# (github.com/Xilinx/finn, commit 39f0c9a, src/finn/...; and finn-plus 1.6.1):
#   transformation/qonnx/convert_qonnx_to_finn.py   ConvertQONNXtoFINN: Quant/BipolarQuant/Trunc,
#       Conv (ExtractBiasFromConv), Gemm (GemmToMatMul)
#   transformation/qonnx/fold_quant_weights.py      weight (and bias) Quant nodes folded into constants
#   transformation/qonnx/qonnx_activation_handlers.py  Quant after Relu/Selu (QuantReluHandler) or
#       after BatchNormalization/Add/Sub/Mul/Div or the graph input (QuantIdentityHandler)
#   transformation/streamline/{__init__,absorb,reorder}.py  BatchNormToAffine, Div->Mul, Sub->Add,
#       Flatten/Reshape/Transpose absorbed before the FC layers
#   transformation/fpgadataflow/convert_to_hw_layers.py  hardware layers: MatMul (MVAU), MaxPool,
#       AveragePool (as QuantAvgPool2d, via Trunc), GlobalAveragePool, Add, Mul, Concat, Resize,
#       Upsample, Gather, TopK
# Left out on purpose: ConvTranspose (foldable, but no hardware layer in convert_to_hw_layers and
# not lowered by FINN's default build steps; see FINN_OP_NOTES), Sigmoid, Squeeze/Unsqueeze, Pad and
# Identity (cleanup_model removes the latter).
FINN_OP_TYPES = frozenset(
    {"Quant", "BipolarQuant", "Trunc", "Conv", "Gemm", "MatMul", "Relu", "Selu", "MaxPool", "AveragePool",
     "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Add", "Sub", "Mul", "Div", "BatchNormalization",
     "Concat", "Resize", "Upsample", "Gather", "TopK"}
)  # fmt: skip


FINN_MAX_BITS = 8  # ConvertQONNXtoFINN's default max_multithreshold_bit_width


# What an unsupported op needs, where FINN has a way that its default flow does not take. FINN's
# transformation/fpgadataflow/infer_pixel_padding_deconv.py (InferPixelPaddingDeconv) lowers a
# group=1, 2-D ConvTranspose to FMPadding_Pixel + Im2Col + MatMul; builder/build_dataflow_steps.py
# never applies it (FINN's tests and finn-examples' custom build steps do).
FINN_OP_NOTES = {
    "ConvTranspose": "FINN's default build steps do not lower it; a custom step applying FINN's "
    "InferPixelPaddingDeconv handles group=1 2-D ones",
}


MATRIX_OPS = ("Conv", "MatMul", "Gemm")


QUANT_OPS = ("Quant", "BipolarQuant")


# Ops that keep an integer tensor integer (and that FINN maps to hardware or absorbs on integer data).
LAYOUT_ONLY = ("Flatten", "Reshape", "Transpose")


# The ONNX forms of the value-copying ops (aq_brevitas.quantization.value_ops, the one list placement
# and the export read-back follow too): they keep an integer tensor integer.
INTEGER_PRESERVING = tuple(dict.fromkeys((*COPYING_ONNX, *LAYOUT_ONLY)))


# Float ops FINN's streamlining absorbs between a matrix layer and the next activation Quant (into its
# MultiThreshold): BatchNorm, the activation itself, and elementwise ops with a constant operand.
ABSORBABLE = ("BatchNormalization", "Relu", "Selu")


CONSTANT_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


@dataclass
class FinnCheck:
    """One FINN-readiness check: its name, whether the graph passed, and what failed where."""

    name: str
    passed: bool
    detail: str


def op_type_check(mw: Any) -> FinnCheck:
    unsupported = sorted({n.op_type for n in mw.graph.node} - FINN_OP_TYPES)
    named = [f"{op} ({FINN_OP_NOTES[op]})" if op in FINN_OP_NOTES else op for op in unsupported]
    return FinnCheck(
        "supported_op_types",
        not unsupported,
        "all supported" if not unsupported else f"unsupported: {', '.join(named)}",
    )


class FinnGraph:
    """Producers, consumers and constants of a graph, and node names with their model layers."""

    def __init__(self, mw: Any, layer_of: dict[str, str]) -> None:
        self.mw, self.layer_of = mw, layer_of
        self.nodes = list(mw.graph.node)
        self.inits = {t.name for t in mw.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in mw.graph.output}

    def is_const(self, tensor: str) -> bool:
        """A constant: an initializer, or computed from initializers only (a weight Quant's output)."""
        if tensor in self.inits or not tensor:
            return True
        p = self.producer.get(tensor)
        return p is not None and all(self.is_const(t) for t in p.input)

    def name(self, node: Any) -> str:
        """``layer (node)`` when the model maps the node (or the matrix node it feeds), else ``node``."""
        cands = [node, *self.consumers.get(node.output[0], [])] if node.output else [node]
        layer = next((self.layer_of[c.name] for c in cands if c.name in self.layer_of), None)
        return f"{layer} ({node.name})" if layer else node.name

    def is_bias_quant(self, q: Any) -> bool:
        """A constant Quant feeding only biases: input 2 of Conv/Gemm, or an Add after a matrix layer."""
        uses = self.consumers.get(q.output[0], [])
        return bool(uses) and all(
            (u.op_type in ("Conv", "Gemm") and list(u.input).index(q.output[0]) == 2)
            or (u.op_type == "Add" and any(self._after_matrix(t) for t in u.input if t != q.output[0]))
            for u in uses
        )

    def _after_matrix(self, tensor: str) -> bool:
        p = self.producer.get(tensor)
        return p is not None and p.op_type in MATRIX_OPS


def quant_node_checks(g: FinnGraph) -> list[FinnCheck]:
    """Bit widths in 2..FINN_MAX_BITS (bias Quants aside), zero zero-points, and no Quant on a Conv bias.

    FINN folds constant bias Quants (Brevitas ``Int32Bias``) whatever their width: on a Gemm that works
    (checked with finn-plus 1.6.1), but on a Conv qonnx's ``ExtractBiasFromConv`` (run by FINN's
    ``step_qonnx_to_finn``) raises "cannot reshape array of size 1 into shape (1,C,1,1)" on the scalar
    zero-point Brevitas exports."""
    bad_bits, nonzero_zp, conv_bias, biases = [], [], [], 0
    for n in g.nodes:
        if n.op_type != "Quant":
            continue
        zp = g.mw.get_initializer(n.input[2])
        if zp is None or np.any(zp != 0):
            nonzero_zp.append(g.name(n))
        if g.is_const(n.input[0]) and g.is_bias_quant(n):
            biases += 1
            if any(u.op_type == "Conv" for u in g.consumers[n.output[0]]):
                conv_bias.append(g.name(n))
            continue
        bw = g.mw.get_initializer(n.input[3])
        if bw is None or float(bw) != int(bw) or not 1 < int(bw) <= FINN_MAX_BITS:
            bad_bits.append(f"{g.name(n)}={bw}")
    ok_bits = "all activation/weight Quant nodes have integer widths in 2..8" + (
        f" ({biases} bias Quant(s) not counted: FINN folds them into constants)" if biases else ""
    )
    return [
        FinnCheck(
            "integer_bit_widths_le_8",
            not bad_bits,
            ok_bits if not bad_bits else f"bad: {', '.join(bad_bits)}",
        ),
        FinnCheck(
            "zero_zero_points",
            not nonzero_zp,
            "all Quant zero-points are 0" if not nonzero_zp else f"non-zero: {', '.join(nonzero_zp)}",
        ),
        FinnCheck(
            "no_conv_bias_quant",
            not conv_bias,
            "no Conv bias goes through a Quant node"
            if not conv_bias
            else f"quantized Conv biases: {', '.join(conv_bias)} (FINN's step_qonnx_to_finn cannot extract them; "
            "keep Conv biases float, bias_quant=None)",
        ),
    ]


def input_check(g: FinnGraph) -> FinnCheck:
    """FINN needs integer inputs: the graph input must reach a Quant/BipolarQuant node through nothing
    but elementwise ops with a constant operand (a ``2x - 1`` FINN absorbs), a BatchNorm (an affine it
    absorbs too) and layout ops."""
    todo, ok = list(g.consumers.get(g.mw.graph.input[0].name, [])), True
    while todo and ok:
        n = todo.pop()
        if n.op_type in QUANT_OPS:
            continue
        # a BatchNorm in front of the first quantizer is an affine FINN's streamlining absorbs
        ok = n.op_type in (*LAYOUT_ONLY, "BatchNormalization") or (
            n.op_type in CONSTANT_ELEMENTWISE and _absorbable(g, n)
        )
        todo += g.consumers.get(n.output[0], [])
    ok = ok and bool(g.consumers.get(g.mw.graph.input[0].name))
    return FinnCheck(
        "input_quantized",
        ok,
        "graph input feeds a Quant node"
        if ok
        else "the input is float: give the first layer act_bit_width (FINN needs integer inputs)",
    )


def dataflow_checks(g: FinnGraph) -> list[FinnCheck]:
    """Where FINN's partition step fails: float matrix inputs, lone Relus, stranded float ops."""
    float_inputs = [_float_input(g, n) for n in g.nodes if n.op_type in MATRIX_OPS]
    float_inputs = [f for f in float_inputs if f]
    lone = [
        f"{g.name(n)} -> {', '.join(c.op_type for c in g.consumers.get(n.output[0], [])) or 'graph output'}"
        for n in g.nodes
        if n.op_type in ("Relu", "Selu") and not _feeds_only_quant(g, n)
    ]
    stranded = _stranded(g)
    forks = _quant_forks(g)
    return [
        FinnCheck(
            "matrix_inputs_quantized",
            not float_inputs,
            "every Conv/MatMul/Gemm input comes from a Quant (through MaxPool/Flatten/Reshape/Transpose only)"
            if not float_inputs
            else f"float inputs: {'; '.join(float_inputs)} (quantize the activation at its producer's output)",
        ),
        FinnCheck(
            "relu_feeds_quant",
            not lone,
            "every Relu feeds a Quant directly (FINN folds the pair into a MultiThreshold)"
            if not lone
            else f"Relu not directly followed by a Quant: {'; '.join(lone)} (FINN cannot fold it)",
        ),
        FinnCheck(
            "no_stranded_float_ops",
            not stranded,
            "no float op between FINN layers"
            if not stranded
            else f"float ops between FINN layers: {', '.join(stranded)} (FINN's partition step rejects them; "
            "a global average pool needs FINN's averaging unit: quantize(target='finn') places it)",
        ),
        FinnCheck(
            "no_scale_at_fork",
            not forks,
            "every activation quantizer has one consumer"
            if not forks
            else f"quantizers read by several ops: {'; '.join(forks)} (FINN's default streamlining moves a "
            "quantizer's scale past a layer only where the scale has one consumer; residual branches need "
            "FINN's fork-aware streamlining, as in FINN's own ResNet builds)",
        ),
    ]


def _feeds_only_quant(g: FinnGraph, node: Any) -> bool:
    uses = g.consumers.get(node.output[0], [])
    return bool(uses) and node.output[0] not in g.outputs and all(u.op_type == "Quant" for u in uses)


def _float_input(g: FinnGraph, node: Any) -> str:
    """ "" when the matrix node's data input is a Quant output (through integer-preserving ops); else
    the path back to the float producer."""
    path, tensor = [], node.input[0]
    while True:
        p = g.producer.get(tensor)
        if p is None:
            src = "the graph input"
            break
        if (p.op_type in QUANT_OPS and not g.is_const(p.input[0])) or _avg_unit(g, p):
            return ""
        if p.op_type not in INTEGER_PRESERVING:
            src = p.name
            break
        path.append(p.name)
        tensor = p.input[0]
    return f"{g.name(node)} <- {' <- '.join([*path, src])}"


def _avg_unit(g: FinnGraph, node: Any) -> bool:
    """``node`` ends FINN's averaging unit: ``AveragePool [-> Mul (constant)] -> Trunc`` (FINN's
    ``AvgPoolAndTruncToQuantAvgPool``, Trunc v1 and v2); the Trunc's output is an integer."""
    if node is None or node.op_type != "Trunc":
        return False
    pool = g.producer.get(node.input[0])
    if pool is not None and pool.op_type == "Mul" and g.is_const(pool.input[1]):
        pool = g.producer.get(pool.input[0])
    return pool is not None and pool.op_type == "AveragePool"


def _quant_outputs(g: FinnGraph, tensor: str) -> list[Any]:
    """The activation Quant nodes (or averaging units) whose output reaches ``tensor`` through
    value-copying ops; an empty list when something else produces it."""
    p = g.producer.get(tensor)
    while p is not None and p.op_type in INTEGER_PRESERVING and p.op_type != "Concat":
        p = g.producer.get(p.input[0])
    if p is not None and ((p.op_type in QUANT_OPS and not g.is_const(p.input[0])) or _avg_unit(g, p)):
        return [p]
    return []


def _integer_join(g: FinnGraph, node: Any) -> bool:
    """An Add whose inputs all come from quantizers: FINN maps it (its elementwise layers take each
    input's scale as a constant factor). Not a Concat: FINN's default streamlining does not move the
    inputs' scales past it (``MoveMulPastJoinConcat`` is not among its steps), so it stays float."""
    if node.op_type != "Add":
        return False
    tensors = [t for t in node.input if not g.is_const(t)]
    quants = [q for t in tensors for q in _quant_outputs(g, t)]
    return len(tensors) >= 2 and len(quants) == len(tensors)


def _quant_forks(g: FinnGraph) -> list[str]:
    """Activation quantizers whose output (through value-copying ops) feeds several ops."""
    out = []
    for n in g.nodes:
        if n.op_type in QUANT_OPS and not g.is_const(n.input[0]):
            uses, todo = [], list(g.consumers.get(n.output[0], []))
            while todo:
                u = todo.pop()
                if u.op_type in LAYOUT_ONLY and len(g.consumers.get(u.output[0], [])) == 1:
                    todo += g.consumers.get(u.output[0], [])
                else:
                    uses.append(u)
            if len(uses) > 1:
                out.append(f"{g.name(n)} -> {', '.join(u.name for u in uses)}")
    return out


def _absorbable(g: FinnGraph, node: Any, integer: bool = False) -> bool:
    """Whether FINN takes ``node`` on a path between its layers: absorbed into thresholds, or (on an
    ``integer`` path, after a quantizer) a value-copying op, an add/concat of one scale, an averaging unit."""
    if node.op_type in ABSORBABLE or _integer_join(g, node):
        return True
    if integer and node.op_type in INTEGER_PRESERVING and node.op_type != "Concat":  # see _integer_join
        return True
    if node.op_type == "AveragePool":  # FINN's averaging unit: AveragePool [-> Mul] -> Trunc
        uses = g.consumers.get(node.output[0], [])
        nxt = g.consumers.get(uses[0].output[0], []) if len(uses) == 1 and uses[0].op_type == "Mul" else uses
        return len(nxt) == 1 and _avg_unit(g, nxt[0])
    if node.op_type == "MaxPool":  # right after a matrix layer and right before a Quant: FINN maps it
        src = g.producer.get(node.input[0])
        uses = g.consumers.get(node.output[0], [])
        return (
            src is not None
            and (src.op_type in MATRIX_OPS or (src.op_type == "MaxPool" and _absorbable(g, src)))
            and bool(uses)
            and all(u.op_type in (*QUANT_OPS, "MaxPool") for u in uses)
        )
    return node.op_type in CONSTANT_ELEMENTWISE and sum(not g.is_const(t) for t in node.input) == 1


def _stranded(g: FinnGraph) -> list[str]:
    """Non-absorbable ops on a float path from a matrix layer to a later Quant or matrix layer (what
    FINN's partition step calls "Unsupported/unmapped layer(s) found in between FINN operators"). Float
    ops after the last such layer (the output's scale, a TopK) stay outside the partition: allowed."""
    reaches: dict[str, bool] = {}

    def reaches_finn(node: Any) -> bool:  # a Quant or matrix layer downstream
        if node.name not in reaches:
            reaches[node.name] = False
            reaches[node.name] = any(
                c.op_type in (*QUANT_OPS, *MATRIX_OPS) or reaches_finn(c)
                for o in node.output
                for c in g.consumers.get(o, [])
            )
        return reaches[node.name]

    found: list[str] = []
    for integer in (False, True):
        starts = [
            n
            for n in g.nodes
            if (n.op_type in QUANT_OPS and not g.is_const(n.input[0])) == integer
            and (integer or n.op_type in MATRIX_OPS)
        ]
        seen: set[str] = set()
        todo = [c for n in starts for c in g.consumers.get(n.output[0], [])]
        while todo:
            node = todo.pop()
            if node.name in seen or node.op_type in (*QUANT_OPS, *MATRIX_OPS) or _avg_unit(g, node):
                continue
            seen.add(node.name)
            if not _absorbable(g, node, integer) and reaches_finn(node) and node.name not in found:
                found.append(node.name)
            todo += [c for o in node.output for c in g.consumers.get(o, [])]
    return sorted(found, key=[n.name for n in g.nodes].index)


def _is_po2(scale: Any) -> bool:
    s = np.asarray(scale, dtype=np.float64)
    return bool(np.all(s > 0) and np.all(np.exp2(np.round(np.log2(s))) == s))


def po2_check(mw: Any, policy: Any, model: nn.Module | None) -> FinnCheck:
    specs = [s for s in [*policy.layers.values(), policy.default] if s is not None]  # None: a float layer
    if not any(s.scaling == "po2" for s in specs):
        return FinnCheck("po2_scales", True, "no layer asks for po2 scaling")
    if model is None:
        raise ConfigError(
            "the po2 check needs the model to map graph nodes to the policy's layers",
            "pass model= (the Brevitas model the file was exported from)",
        )
    graph = map_layers(mw.model, model, "qonnx")
    layers, problem = graph.layers, graph.problem
    if problem:
        return FinnCheck(
            "po2_scales",
            False,
            f"not checked: cannot map the graph to the model's layers ({problem}); pass the model the file "
            "was exported from (if it is, this is an aq-brevitas bug: please report it)",
        )
    resolved = policy.resolve(layers)
    bad = [
        name
        for name, gl in layers.items()
        if resolved.get(name) and resolved[name].scaling == "po2" and not _is_po2(gl.weight_scale)
    ]
    n_po2 = sum(1 for n in layers if resolved.get(n) and resolved[n].scaling == "po2")
    return FinnCheck(
        "po2_scales",
        not bad,
        f"power-of-two weight scales in all {n_po2} po2 layers"
        if not bad
        else f"non-po2 scales: {', '.join(bad)}",
    )
