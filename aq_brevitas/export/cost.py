"""What an exported QONNX graph costs (qonnx ``inference_cost``: MACs, BOPs, weight bits), and the
check that its weight memory equals what the model's policy predicts, per layer and in total.

qonnx 1.0.0 costs Conv, MatMul, Gemm and Upsample nodes only; ``ConvTranspose`` nodes are costed
here (:func:`convtranspose_cost`) with qonnx's own row format, so transposed convolutions have MACs,
BOPs and weight bits like every other layer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..nnutils import layer_geometry, quantizable_layers
from ..policy import cost_of
from .graph import GraphMap, example_input_for, load_qonnx, quantizer_bits, strict_map


def inference_cost(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, Any]:
    """Per-layer and total BOPs, MACs and weight bits of a QONNX file (qonnx ``inference_cost``).

    qonnx 1.0.0 costs weights behind a ``BipolarQuant`` as FLOAT32; such layers are corrected to
    1 bit per weight here (``bipolar_corrected`` lists them), so weight bits equal the policy's cost.
    qonnx has no cost for ``ConvTranspose``; those nodes are costed here (``aq_costed`` lists them,
    see :func:`convtranspose_cost`).
    With ``model`` (the Brevitas model the file came from), each row names its layer and the weight
    bits are checked against the model's policy, per layer and in total (``weight_bits``; see
    :func:`check_weight_memory`); a mismatch, or a graph that does not map to the model, raises
    :class:`ModelError`.
    """
    mw = load_qonnx(path)
    if model is None:
        return qonnx_cost(mw)
    graph = strict_map(mw.model, model, "qonnx")
    cost = qonnx_cost(mw, graph)
    expected, source = expected_weight_bits(model, example_input_for(mw))
    cost["weight_bits"] = check_weight_memory(cost, graph, expected, source)
    unexplained = unexplained_weight_bits(cost, graph, expected, source)
    if unexplained:
        raise ModelError(
            f"the weight bits do not add up: {unexplained}",
            "this is an aq-brevitas bug: please report it (with the model)",
        )
    cost["expected_from"] = source
    return cost


def cost_table(cost: dict[str, Any]) -> str:
    """The inference cost as a text table, one row per node (with its layer when known)."""
    rows = [f"{'node':<12} {'layer':<20} {'MACs':>12} {'BOPs':>14} {'weight bits':>12}"]
    for name, r in [*cost["layers"].items(), ("total", cost["total"])]:
        rows.append(
            f"{name:<12} {r.get('layer', ''):<20} {r.get('total_macs', 0):>12,.0f} {r.get('total_bops', 0):>14,.0f} {r.get('total_mem_w_bits', 0):>12,.0f}"
        )
    return "\n".join(rows)


def expected_weight_bits(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], str]:
    """Per-layer weight bits the model should export with, and where that prediction comes from.

    With the ``aq_policy`` that :func:`aq_brevitas.quantize` attaches, it is the policy's own cost
    (``cost_of``, layers without a spec at 32 bits); for any other Brevitas model, the bit widths of
    its weight quantizers times the layer's weight count. Each layer is predicted with its own weight
    count: a layer sharing another layer's Parameter, which the policy costs once under the first
    of them, stores its own quantized copy (at its own bits) in an exported graph.
    """
    layers = quantizable_layers(model)
    geometry = {
        n: dataclasses.replace(g, params=int(layers[n].weight.numel()))
        for n, g in layer_geometry(model, example_input).items()
    }
    policy = getattr(model, "aq_policy", None)
    if policy is not None:
        specs = policy.resolve(geometry)
        return {n: cost_of(specs, {n: g}).weight_bits for n, g in geometry.items()}, "policy"
    return {n: quantizer_bits(layers[n]) * g.params for n, g in geometry.items()}, "quantizers"


def check_weight_memory(
    cost: dict[str, Any], graph: GraphMap, expected: dict[str, int], source: str
) -> dict[str, dict[str, int]]:
    """Graph weight bits (qonnx ``inference_cost``) against the prediction, per layer.

    A layer's graph bits are those of its first node (one stored copy; see
    :func:`unexplained_weight_bits` for the total). Returns ``{layer: {"graph": bits, source: bits}}``;
    raises :class:`ModelError` on any difference.
    """
    rows = cost["layers"]
    table: dict[str, dict[str, int]] = {}
    for name, gl in graph.layers.items():
        row = rows.get(gl.node)
        if row is None:
            raise ModelError(
                f"inference_cost has no entry for node {gl.node} (layer {name})",
                "this is an aq-brevitas bug: please report it (with the model)",
            )
        graph_bits = int(row.get("total_mem_w_bits", 0))
        table[name] = {"graph": graph_bits, source: expected[name]}
        if graph_bits != expected[name]:
            raise ModelError(
                f"layer {name}: the exported graph stores {graph_bits} weight bits, the {source} predicts "
                f"{expected[name]}",
                "if model.aq_policy is stale (quantizers changed after quantize), re-quantize or delete it; "
                "otherwise a quantizer did not export at its bit width: this is an aq-brevitas bug, please report it",
            )
    return table


def unexplained_weight_bits(
    cost: dict[str, Any], graph: GraphMap, expected: dict[str, int], source: str
) -> str:
    """``""`` when the graph's total weight bits equal the prediction's; else what differs.

    Left out of the graph's total: the further nodes of a layer called more than once (qonnx's
    cleanup gives each node its own copy of the weight; the policy stores it once) and the float
    weights outside the quantizable layers (``graph.float_weights``, which no policy covers). With
    every layer checked by :func:`check_weight_memory`, a difference left here is a weight the
    read-back did not account for: this package's bug.
    """
    rows = cost["layers"]
    not_predicted = [n for gl in graph.layers.values() for n in gl.more_nodes] + list(
        graph.float_weights.values()
    )
    graph_total = cost["total"]["total_mem_w_bits"] - sum(
        rows[n].get("total_mem_w_bits", 0) for n in not_predicted
    )
    total = sum(expected.values())
    if int(graph_total) == total:
        return ""
    return (
        f"the graph stores {int(graph_total)} weight bits in total (one copy per layer), the {source} "
        f"predicts {total}"
    )


def qonnx_cost(mw: Any, graph: GraphMap | None = None) -> dict[str, Any]:
    """qonnx ``inference_cost`` of a (copy of a) ModelWrapper, BipolarQuant weights costed at 1 bit.

    Returns ``{"layers": {node: row}, "total": row, "bipolar_corrected": [node, ...],
    "aq_costed": [node, ...]}``, each row the ``total_*`` figures as floats, and a node's row naming
    its model layer (every call of it) or its float Parameter (``"w (float)"``) when ``graph`` has
    it. ``ConvTranspose`` nodes, which qonnx does not cost, get rows from :func:`convtranspose_cost`
    on qonnx's own preprocessed graph (same shapes and data types as qonnx's rows) and are listed in
    ``aq_costed``; the total is the sum of the rows.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.inference_cost import inference_cost as qonnx_inference_cost

    with tempfile.TemporaryDirectory(prefix="aq-cost-") as d:
        prepared = Path(d) / "prepared.onnx"  # qonnx's graph after its preprocessing
        res = qonnx_inference_cost(
            ModelWrapper(copy.deepcopy(mw.model)),
            discount_sparsity=False,
            cost_breakdown=True,
            output_onnx=str(prepared),
        )
        prepared_mw = ModelWrapper(str(prepared))
    own = {
        n.name: convtranspose_cost(prepared_mw, n)
        for n in prepared_mw.graph.node
        if n.op_type == "ConvTranspose" and n.name not in res["node_cost"]
    }
    graph = graph or GraphMap({})
    node_layer = {node: n for n, gl in graph.layers.items() for node in (gl.node, *gl.more_nodes)}
    node_layer.update({node: f"{p} (float)" for p, node in graph.float_weights.items()})
    bipolar = _bipolar_consumers(mw)
    out: dict[str, dict[str, Any]] = {}
    corrected = []
    # qonnx names nodes uniquely after its preprocessing (Conv_0, Gemm_1, ...), as cleanup_model
    # already did on the exported graph: the names are those of the written file.
    for name, c in {**res["node_cost"], **own}.items():
        row: dict[str, Any] = {k: float(v) for k, v in c.items() if k.startswith("total_")}
        if name in bipolar:
            row["total_mem_w_bits"] = row["total_mem_w_elems"]
            corrected.append(name)
        if name in node_layer:
            row["layer"] = node_layer[name]
        out[name] = row
    keys = {k for r in out.values() for k in r if k.startswith("total_")}
    total = {k: sum(r.get(k, 0.0) for r in out.values()) for k in sorted(keys)}
    return {"layers": out, "total": total, "bipolar_corrected": corrected, "aq_costed": sorted(own)}


def convtranspose_cost(mw: Any, node: Any) -> dict[str, float]:
    """A ``ConvTranspose`` node's cost in qonnx's format (``op_mac_*``, ``mem_w_*``, ``mem_o_*`` and
    the ``total_*`` figures qonnx derives from them), on a shape- and datatype-inferred graph.

    A transposed convolution multiplies every input element by every weight that input channel
    carries: input ``N x C_in x S_in`` (``S_in`` the spatial size), weight ``C_in x C_out/groups x K``,
    so ``MACs = N * C_in * (C_out / groups) * K * S_in = N * weight elements * S_in``. Products that
    land on cropped output positions (``pads``) are counted too: that is what the scatter computes,
    and what the policy's cost (``nnutils.layer_macs``) counts. Weight memory is the weight's
    elements at the weight tensor's data type (the ``Quant`` node's bit width after qonnx's datatype
    inference); no sparsity discount, as for the other rows here.
    """
    from qonnx.analysis.inference_cost import get_node_tensor_dtypes, get_node_tensor_shapes
    from qonnx.util.inference_cost import assign_mem_bits_and_elems, compute_bops_and_macs

    i_dtype, w_dtype, o_dtype = get_node_tensor_dtypes(mw, node)
    i_shape, w_shape, o_shape = get_node_tensor_shapes(mw, node)
    w_mem = math.prod(w_shape)
    row: dict[str, Any] = {
        f"op_mac_{i_dtype.name}_{w_dtype.name}": float(i_shape[0] * w_mem * math.prod(i_shape[2:])),
        f"mem_w_{w_dtype.name}": float(w_mem),
        f"mem_o_{o_dtype.name}": float(math.prod(o_shape)),
    }
    row = assign_mem_bits_and_elems(row)
    row["total_bops"], row["total_macs"] = compute_bops_and_macs(row)
    return row


def _bipolar_consumers(mw: Any) -> set[str]:
    """Names of the weight nodes fed by a BipolarQuant weight (names as GiveUniqueNodeNames gives them)."""
    from qonnx.transformation.general import GiveUniqueNodeNames

    named = mw.transform(GiveUniqueNodeNames())
    out = set()
    for node in named.graph.node:
        if node.op_type == "BipolarQuant" and named.get_initializer(node.input[0]) is not None:
            consumer = named.find_consumer(node.output[0])
            if consumer is not None:
                out.add(consumer.name)
    return out
