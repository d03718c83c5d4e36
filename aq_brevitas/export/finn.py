"""FINN readiness: what FINN's QONNX->FINN conversion needs, checked on a QONNX file.

FINN itself needs Vivado and is not run here; the op list and limits are read from FINN's sources.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from .graph import load_qonnx, map_layers

# Op types a cleaned QONNX graph of a CNN/MLP may contain for FINN's flow, read from FINN's sources
# (github.com/Xilinx/finn, commit 39f0c9a, src/finn/...; no FINN code is used here):
#   transformation/qonnx/convert_qonnx_to_finn.py   ConvertQONNXtoFINN: Quant/BipolarQuant/Trunc,
#       Conv (ExtractBiasFromConv), Gemm (GemmToMatMul)
#   transformation/qonnx/fold_quant_weights.py      weight Quant successors it folds into
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


@dataclass
class FinnCheck:
    """One FINN-readiness check: its name, whether the graph passed, and what failed where."""

    name: str
    passed: bool
    detail: str


def finn_check(
    path: str | os.PathLike[str], policy: Any = None, model: nn.Module | None = None
) -> list[FinnCheck]:
    """Check what FINN's QONNX→FINN flow needs; this does not run FINN (it needs Vivado).

    Checks: only FINN-supported op types; every Quant has an integer bit width in 2..8 (BipolarQuant
    is the 1-bit form); weight zero-points are 0; the graph input is quantized; and every layer whose
    spec asks for ``po2`` scaling has power-of-two weight scales. The po2 check needs the layer names,
    so it needs ``model`` (the Brevitas model the file came from; its ``aq_policy`` is used when
    ``policy`` is not given); failures name the layers. Raises :class:`ConfigError` for a missing
    file, or for a po2 policy without ``model``; :class:`ModelError` for a file that is not ONNX.
    """
    mw = load_qonnx(path)
    unsupported = sorted({n.op_type for n in mw.graph.node} - FINN_OP_TYPES)
    named = [f"{op} ({FINN_OP_NOTES[op]})" if op in FINN_OP_NOTES else op for op in unsupported]
    checks = [
        FinnCheck(
            "supported_op_types",
            not unsupported,
            "all supported" if not unsupported else f"unsupported: {', '.join(named)}",
        ),
        *_quant_node_checks(mw, model),
        _input_check(mw),
    ]
    policy = policy if policy is not None else getattr(model, "aq_policy", None)
    if policy is not None:
        checks.append(_po2_check(mw, policy, model))
    return checks


def _quant_node_checks(mw: Any, model: nn.Module | None) -> list[FinnCheck]:
    """Bit widths in 2..FINN_MAX_BITS and zero zero-points at every Quant node, failures named by layer."""
    layer_of: dict[str, str] = {}
    if model is not None:  # names only: a node that cannot be mapped is named by itself
        layer_of = {gl.node: n for n, gl in map_layers(mw.model, model, "qonnx").layers.items()}

    def where(q: Any) -> str:
        consumer = mw.find_consumer(q.output[0])
        cname = consumer.name if consumer is not None else ""
        return f"{layer_of[cname]} ({q.name})" if cname in layer_of else q.name

    bad_bits, nonzero_zp = [], []
    for n in mw.graph.node:
        if n.op_type != "Quant":
            continue
        bw = mw.get_initializer(n.input[3])
        if bw is None or float(bw) != int(bw) or not 1 < int(bw) <= FINN_MAX_BITS:
            bad_bits.append(f"{where(n)}={bw}")
        zp = mw.get_initializer(n.input[2])
        if zp is None or np.any(zp != 0):
            nonzero_zp.append(where(n))
    return [
        FinnCheck(
            "integer_bit_widths_le_8",
            not bad_bits,
            "all Quant nodes have integer widths in 2..8" if not bad_bits else f"bad: {', '.join(bad_bits)}",
        ),
        FinnCheck(
            "zero_zero_points",
            not nonzero_zp,
            "all Quant zero-points are 0" if not nonzero_zp else f"non-zero: {', '.join(nonzero_zp)}",
        ),
    ]


def _input_check(mw: Any) -> FinnCheck:
    """FINN needs integer inputs: the graph input must feed a Quant or BipolarQuant node."""
    first = mw.find_consumer(mw.graph.input[0].name)
    quantized_input = first is not None and first.op_type in ("Quant", "BipolarQuant")
    return FinnCheck(
        "input_quantized",
        quantized_input,
        "graph input feeds a Quant node"
        if quantized_input
        else "the input is float: give the first layer act_bit_width (FINN needs integer inputs)",
    )


def _is_po2(scale: Any) -> bool:
    s = np.asarray(scale, dtype=np.float64)
    return bool(np.all(s > 0) and np.all(np.exp2(np.round(np.log2(s))) == s))


def _po2_check(mw: Any, policy: Any, model: nn.Module | None) -> FinnCheck:
    specs = [*policy.layers.values(), *([policy.default] if policy.default else [])]
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
        if name in resolved and resolved[name].scaling == "po2" and not _is_po2(gl.weight_scale)
    ]
    n_po2 = sum(1 for n in layers if n in resolved and resolved[n].scaling == "po2")
    return FinnCheck(
        "po2_scales",
        not bad,
        f"power-of-two weight scales in all {n_po2} po2 layers"
        if not bad
        else f"non-po2 scales: {', '.join(bad)}",
    )
