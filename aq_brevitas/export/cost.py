"""What an exported QONNX graph costs (qonnx ``inference_cost``: MACs, BOPs, weight bits) as a typed
:class:`CostReport`, and the check that its weight memory equals what the model's weight quantizers
predict, per layer and in total.

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..nnutils import layer_geometry, quantizable_layers
from .graph import GraphMap, example_input_for, load_qonnx, quantizer_bits, strict_map


@dataclass(frozen=True)
class NodeCost:
    """One graph node's cost, qonnx's ``total_*`` figures: MACs, BOPs, weight and output memory (bits
    and elements); ``layer`` names the model layer (or ``"<param> (float)"``) when known."""

    macs: float = 0.0
    bops: float = 0.0
    mem_w_bits: float = 0.0
    mem_w_elems: float = 0.0
    mem_o_bits: float = 0.0
    mem_o_elems: float = 0.0
    layer: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any], layer: str = "") -> NodeCost:
        """From a qonnx ``node_cost`` row (its ``total_*`` keys)."""
        figures = {
            f.name: float(row.get(f"total_{f.name}", 0.0))
            for f in dataclasses.fields(cls)
            if f.name != "layer"
        }
        return cls(**figures, layer=layer)

    def plus(self, other: NodeCost) -> NodeCost:
        """The sum of two costs (no layer)."""
        figures = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        return NodeCost(**{**figures, "layer": ""})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeCost:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class CostReport:
    """What a QONNX graph costs: per node (:class:`NodeCost`), the total (sum of the nodes), the nodes
    whose ``BipolarQuant`` weights were corrected to 1 bit (``bipolar_corrected``) and the
    ``ConvTranspose`` nodes costed here rather than by qonnx (``costed_here``). With a model,
    ``weight_bits`` is the per-layer check ``{layer: {"graph": bits, expected_from: bits}}``."""

    layers: dict[str, NodeCost]
    total: NodeCost
    bipolar_corrected: list[str] = field(default_factory=list)
    costed_here: list[str] = field(default_factory=list)
    weight_bits: dict[str, dict[str, int]] = field(default_factory=dict)
    expected_from: str = ""

    def layer_rows(self, layer: str) -> list[NodeCost]:
        """The rows of the nodes that carry ``layer``'s weights (one per call)."""
        return [r for r in self.layers.values() if r.layer == layer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostReport:
        return cls(
            layers={n: NodeCost.from_dict(r) for n, r in d["layers"].items()},
            total=NodeCost.from_dict(d["total"]),
            bipolar_corrected=list(d.get("bipolar_corrected", [])),
            costed_here=list(d.get("costed_here", [])),
            weight_bits={k: dict(v) for k, v in d.get("weight_bits", {}).items()},
            expected_from=str(d.get("expected_from", "")),
        )


def inference_cost(path: str | os.PathLike[str], model: nn.Module | None = None) -> CostReport:
    """Per-node and total BOPs, MACs and weight bits of a QONNX file (qonnx ``inference_cost``).

    qonnx 1.0.0 costs weights behind a ``BipolarQuant`` as FLOAT32; such layers are corrected to
    1 bit per weight here (``bipolar_corrected`` lists them), so weight bits equal the policy's cost.
    qonnx has no cost for ``ConvTranspose``; those nodes are costed here (``costed_here`` lists
    them, see :func:`convtranspose_cost`).
    With ``model`` (the Brevitas model the file came from), each row names its layer and the weight
    bits are checked against the model's weight quantizers, per layer and in total (``weight_bits``;
    see :func:`check_weight_memory`); a mismatch, or a graph that does not map to the model, raises
    :class:`ModelError`.
    """
    mw = load_qonnx(path)
    if model is None:
        return qonnx_cost(mw)
    graph = strict_map(mw.model, model, "qonnx")
    cost = qonnx_cost(mw, graph)
    expected, source = expected_weight_bits(model, example_input_for(mw))
    cost.weight_bits = check_weight_memory(cost, graph, expected, source)
    unexplained = unexplained_weight_bits(cost, graph, expected, source)
    if unexplained:
        raise ModelError(
            f"the weight bits do not add up: {unexplained}",
            "this is an aq-brevitas bug: please report it (with the model)",
        )
    cost.expected_from = source
    return cost


def cost_table(cost: CostReport) -> str:
    """The inference cost as a text table, one row per node (with its layer when known)."""
    rows = [f"{'node':<12} {'layer':<20} {'MACs':>12} {'BOPs':>14} {'weight bits':>12}"]
    for name, r in [*cost.layers.items(), ("total", cost.total)]:
        rows.append(f"{name:<12} {r.layer:<20} {r.macs:>12,.0f} {r.bops:>14,.0f} {r.mem_w_bits:>12,.0f}")
    return "\n".join(rows)


def expected_weight_bits(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], str]:
    """Per-layer weight bits the model should export with, and where that prediction comes from
    (``"quantizers"``): the bit width of each layer's weight quantizer (32 for a float weight) times
    the layer's weight count -- what the quantizers say, for a model re-bitted after quantization or
    made by hand too. Each layer is predicted with its own weight count: a layer sharing another
    layer's Parameter, which a policy's cost counts once, stores its own quantized copy (at its own
    bits) in an exported graph.
    """
    layers = quantizable_layers(model)
    geometry = layer_geometry(model, example_input)
    return {n: quantizer_bits(layers[n]) * int(layers[n].weight.numel()) for n in geometry}, "quantizers"


def check_weight_memory(
    cost: CostReport, graph: GraphMap, expected: dict[str, int], source: str
) -> dict[str, dict[str, int]]:
    """Graph weight bits (qonnx ``inference_cost``) against the prediction, per layer.

    A layer's graph bits are those of its first node (one stored copy; see
    :func:`unexplained_weight_bits` for the total). Returns ``{layer: {"graph": bits, source: bits}}``;
    raises :class:`ModelError` on any difference.
    """
    rows = cost.layers
    table: dict[str, dict[str, int]] = {}
    for name, gl in graph.layers.items():
        row = rows.get(gl.node)
        if row is None:
            raise ModelError(
                f"inference_cost has no entry for node {gl.node} (layer {name})",
                "this is an aq-brevitas bug: please report it (with the model)",
            )
        graph_bits = int(row.mem_w_bits)
        table[name] = {"graph": graph_bits, source: expected[name]}
        if graph_bits != expected[name]:
            raise ModelError(
                f"layer {name}: the exported graph stores {graph_bits} weight bits, the model's {source} "
                f"predict {expected[name]}",
                "pass the model the file was exported from (re-export a model re-bitted since); if it is, a "
                "quantizer did not export at its bit width: an aq-brevitas bug, please report it",
            )
    return table


def unexplained_weight_bits(cost: CostReport, graph: GraphMap, expected: dict[str, int], source: str) -> str:
    """``""`` when the graph's total weight bits equal the prediction's; else what differs.

    Left out of the graph's total: the further nodes of a layer called more than once (qonnx's
    cleanup gives each node its own copy of the weight; the policy stores it once) and the float
    weights outside the quantizable layers (``graph.float_weights``, which no policy covers). With
    every layer checked by :func:`check_weight_memory`, a difference left here is a weight the
    read-back did not account for: this package's bug.
    """
    rows = cost.layers
    not_predicted = [n for gl in graph.layers.values() for n in gl.more_nodes] + list(
        graph.float_weights.values()
    )
    graph_total = cost.total.mem_w_bits - sum(rows[n].mem_w_bits for n in not_predicted)
    total = sum(expected.values())
    if int(graph_total) == total:
        return ""
    return (
        f"the graph stores {int(graph_total)} weight bits in total (one copy per layer), the model's "
        f"{source} predict {total}"
    )


def qonnx_cost(mw: Any, graph: GraphMap | None = None) -> CostReport:
    """qonnx ``inference_cost`` of a (copy of a) ModelWrapper, BipolarQuant weights costed at 1 bit.

    Returns a :class:`CostReport`: one :class:`NodeCost` per node, naming its model layer (every call
    of it) or its float Parameter (``"w (float)"``) when ``graph`` has it, and the total (the sum of
    the rows). ``ConvTranspose`` nodes, which qonnx does not cost, get rows from
    :func:`convtranspose_cost` on qonnx's own preprocessed graph (same shapes and data types as
    qonnx's rows) and are listed in ``costed_here``.
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
    out: dict[str, NodeCost] = {}
    corrected = []
    # qonnx names nodes uniquely after its preprocessing (Conv_0, Gemm_1, ...), as cleanup_model
    # already did on the exported graph: the names are those of the written file.
    for name, c in {**res["node_cost"], **own}.items():
        row = NodeCost.from_row(c, node_layer.get(name, ""))
        if name in bipolar:
            row = dataclasses.replace(row, mem_w_bits=row.mem_w_elems)
            corrected.append(name)
        out[name] = row
    total = NodeCost()
    for row in out.values():
        total = total.plus(row)
    return CostReport(out, total, corrected, sorted(own))


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
