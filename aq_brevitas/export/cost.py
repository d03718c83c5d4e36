"""What an exported QONNX graph costs (qonnx ``inference_cost``: MACs, BOPs, weight bits), and the
check that its weight memory equals what the model's policy predicts, per layer and in total."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..budget import cost_of
from ..errors import ModelError
from ..nnutils import layer_geometry, quantizable_layers
from .graph import GraphLayer, example_input_for, graph_layers, load_qonnx


def inference_cost(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, Any]:
    """Per-layer and total BOPs, MACs and weight bits of a QONNX file (qonnx ``inference_cost``).

    qonnx 1.0.0 costs weights behind a ``BipolarQuant`` as FLOAT32; such layers are corrected to
    1 bit per weight here (``bipolar_corrected`` lists them), so weight bits equal the policy's cost.
    With ``model`` (the Brevitas model the file came from), each row names its layer and the weight
    bits are checked against the model's policy, per layer and in total (``weight_bits``); a
    mismatch raises :class:`ModelError`.
    """
    mw = load_qonnx(path)
    if model is None:
        return qonnx_cost(mw)
    layers = graph_layers(mw.model, model, "qonnx")
    cost = qonnx_cost(mw, layers)
    expected, source = expected_weight_bits(model, example_input_for(mw))
    cost["weight_bits"] = check_weight_memory(cost, layers, expected, source)
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
    its weight quantizers times the layer's weight count.
    """
    geometry = layer_geometry(model, example_input)
    policy = getattr(model, "aq_policy", None)
    if policy is not None:
        specs = policy.resolve(geometry)
        return {n: cost_of(specs, {n: g}).weight_bits for n, g in geometry.items()}, "policy"
    layers = quantizable_layers(model)
    return {n: _quantizer_bits(layers[n]) * g.params for n, g in geometry.items()}, "quantizers"


def _quantizer_bits(layer: nn.Module) -> int:
    quant = getattr(layer, "weight_quant", None)
    return int(quant.bit_width()) if quant is not None and quant.is_quant_enabled else 32


def check_weight_memory(
    cost: dict[str, Any], layers: dict[str, GraphLayer], expected: dict[str, int], source: str
) -> dict[str, dict[str, int]]:
    """Graph weight bits (qonnx ``inference_cost``) against the prediction, per layer and in total.

    Returns ``{layer: {"graph": bits, source: bits}}``; raises :class:`ModelError` on any difference.
    """
    rows = cost["layers"]
    table: dict[str, dict[str, int]] = {}
    for name, gl in layers.items():
        row = rows.get(gl.node)
        if row is None:
            raise ModelError(
                f"inference_cost has no entry for node {gl.node} (layer {name})", "report this model"
            )
        graph_bits = int(row.get("total_mem_w_bits", 0))
        table[name] = {"graph": graph_bits, source: expected[name]}
        if graph_bits != expected[name]:
            raise ModelError(
                f"layer {name}: the exported graph stores {graph_bits} weight bits, the {source} predicts "
                f"{expected[name]}",
                "report this model (a quantizer did not export at its bit width)",
            )
    total_graph, total_expected = int(cost["total"]["total_mem_w_bits"]), sum(expected.values())
    if total_graph != total_expected:
        raise ModelError(
            f"the exported graph stores {total_graph} weight bits in total, the {source} predicts {total_expected}",
            "report this model (a weight tensor outside the model's layers was exported)",
        )
    return table


def qonnx_cost(mw: Any, layers: dict[str, GraphLayer] | None = None) -> dict[str, Any]:
    """qonnx ``inference_cost`` of a (copy of a) ModelWrapper, BipolarQuant weights costed at 1 bit.

    Returns ``{"layers": {node: row}, "total": row, "bipolar_corrected": [node, ...]}``, each row the
    ``total_*`` figures as floats, and a node's row naming its model layer when ``layers`` has it.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.inference_cost import inference_cost as qonnx_inference_cost

    res = qonnx_inference_cost(
        ModelWrapper(copy.deepcopy(mw.model)), discount_sparsity=False, cost_breakdown=True
    )
    node_layer = {gl.node: n for n, gl in (layers or {}).items()}
    bipolar = _bipolar_consumers(mw)
    out: dict[str, dict[str, Any]] = {}
    corrected = []
    # qonnx names nodes uniquely after its preprocessing (Conv_0, Gemm_1, ...), as cleanup_model
    # already did on the exported graph: the names are those of the written file.
    for name, c in res["node_cost"].items():
        row: dict[str, Any] = {k: float(v) for k, v in c.items() if k.startswith("total_")}
        if name in bipolar:
            row["total_mem_w_bits"] = row["total_mem_w_elems"]
            corrected.append(name)
        if name in node_layer:
            row["layer"] = node_layer[name]
        out[name] = row
    total = {k: float(v) for k, v in res["total_cost"].items() if k.startswith("total_")}
    total["total_mem_w_bits"] = sum(r.get("total_mem_w_bits", 0.0) for r in out.values())
    return {"layers": out, "total": total, "bipolar_corrected": corrected}


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
