"""Export to FPGA toolchains: QONNX for FINN, QCDQ ONNX for onnxruntime -- parity-checked, costed.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``qonnx``          :func:`export_qonnx`: Brevitas QONNX export, qonnx cleanup, every check below
``qcdq``           :func:`export_qcdq`, :func:`ort_session`: QCDQ export checked in onnxruntime
``parity``         the parity bound ``max |ONNX - PyTorch| <= tol * max(1, max |PyTorch|)``
``flips``          QONNX parity node by node, forgiving rounding-boundary flips (and nothing else)
``graph``          reading a graph back: which node is which layer, at which weight/input bits
``cost``           :func:`inference_cost` (qonnx), weight memory against the policy, :func:`cost_table`
``finn``           :func:`finn_check` -> :class:`FinnReport`: static FINN checks, FINN's front end if present
``finn_build``     finn-plus's builder steps in-process through the estimate reports (``[finn]`` extra)
``exporter``       torch's exporter through Brevitas: input checks, one-line failures, onnx.checker
``result``         :class:`ExportResult`, :func:`layer_table`
=================  ===========================================================================

A new format is one module here that writes through ``storage.atomic_write_with`` (so no partial
file lands under the final name) after checking the graph with :mod:`.parity`; see
docs/concepts.md ("Where a newcomer adds...") and docs/export.md.
"""

from __future__ import annotations

from .cost import CostReport, NodeCost, cost_table, expected_weight_bits, inference_cost
from .exporter import ADAPTIVE_POOLS
from .finn import FinnReport, finn_check
from .finn_build import FinnEstimates, FinnRun, FinnStep, finn_available
from .finn_checks import FINN_MAX_BITS, FINN_OP_TYPES, FinnCheck
from .flips import BOUNDARY_ULPS, MAX_FLIP_FRACTION
from .graph import WEIGHT_OPS, GraphLayer
from .parity import DEFAULT_TOL
from .qcdq import ORT_DISABLED_OPTIMIZERS, export_qcdq, ort_session
from .qonnx import export_qonnx
from .result import ExportResult, layer_table

__all__ = [
    "ADAPTIVE_POOLS",
    "BOUNDARY_ULPS",
    "DEFAULT_TOL",
    "FINN_MAX_BITS",
    "FINN_OP_TYPES",
    "MAX_FLIP_FRACTION",
    "ORT_DISABLED_OPTIMIZERS",
    "WEIGHT_OPS",
    "CostReport",
    "ExportResult",
    "FinnCheck",
    "FinnEstimates",
    "FinnReport",
    "FinnRun",
    "FinnStep",
    "GraphLayer",
    "NodeCost",
    "cost_table",
    "expected_weight_bits",
    "export_qcdq",
    "export_qonnx",
    "finn_available",
    "finn_check",
    "inference_cost",
    "layer_table",
    "ort_session",
]
